"""Disk cache of the frozen prefix's output, one row per image.

When only the last layers train, the frozen prefix gives the same output for an image every epoch: compute it once
and memory-map it afterwards. The cache folder is keyed by the prefix (structure and weights), the cut tensor and the
preprocessing (and the storage precision: float32, or float16 with `precision: fp16`); each row is keyed by the image file's content hash, so a changed image or model never reuses stale
features. Rows are appended to a raw float32 file; the index (hash -> row) is written atomically after the rows are
on disk, so an interrupted run leaves at worst unused rows, never a wrong one.
"""
import hashlib
import json
import os
import time

import numpy as np

from .fsutil import write_json
from .runtime import cache_dir


def file_digest(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class FeatureCache:
    def __init__(self, key_parts, shape, root=None, dtype=np.float32):
        self.dtype = np.dtype(dtype)
        key_parts = dict(key_parts, dtype=self.dtype.name) if self.dtype != np.float32 else key_parts
        h = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
        self.key = h
        self.dir = os.path.join(root or cache_dir("features"), h)
        os.makedirs(self.dir, exist_ok=True)
        self.shape = tuple(int(s) for s in shape)
        self.row_floats = int(np.prod(self.shape))
        self.data_path = os.path.join(self.dir, "features.f16" if self.dtype == np.float16 else "features.f32")
        self.index_path = os.path.join(self.dir, "index.json")
        self.index = {}
        self.seconds_per_image = None
        if os.path.exists(self.index_path):
            try:
                with open(self.index_path) as f:
                    meta = json.load(f)
                if tuple(meta.get("shape", ())) == self.shape:
                    self.index = {k: int(v) for k, v in meta["rows"].items()}
                    self.seconds_per_image = meta.get("seconds_per_image")
            except (OSError, ValueError, KeyError):
                self.index = {}
        # Rows beyond what the index knows (an interrupted append) are simply never referenced.
        self._rows_on_disk = os.path.getsize(self.data_path) // (self.dtype.itemsize * self.row_floats) if os.path.exists(self.data_path) else 0
        if self.index and max(self.index.values()) >= self._rows_on_disk:
            self.index = {}  # the data file is shorter than the index says: start over
        self.hits = 0
        self.misses = 0
        self.compute_seconds = 0.0

    def _save_index(self):
        write_json(self.index_path, {"shape": list(self.shape), "rows": self.index,
                                     "seconds_per_image": self.seconds_per_image})

    def features(self, items, compute_batches, progress=None):
        """Rows for `items` [(path, label)]: cached where the file's content hash is known, else computed.

        `compute_batches(missing_items)` yields (paths, array (B, *shape)) for the images it could read; an image
        it never yields is unreadable. Returns (data (rows, *shape) memmap, row index per item, ok mask per item)."""
        digests = [file_digest(p) for p, _ in items]
        missing = [i for i, d in enumerate(digests) if d not in self.index]
        self.hits = len(items) - len(missing)
        self.misses = len(missing)
        if missing:
            by_path = {}
            for i in missing:
                by_path.setdefault(os.path.abspath(items[i][0]), []).append(i)
            t0 = time.perf_counter()
            done = 0
            with open(self.data_path, "ab") as f:
                rows = self._rows_on_disk
                try:
                    for paths, feats in compute_batches([items[i] for i in missing]):
                        feats = np.ascontiguousarray(feats, dtype=self.dtype).reshape(len(paths), -1)
                        for j, p in enumerate(paths):
                            f.write(feats[j].tobytes())
                            for i in by_path.get(os.path.abspath(p), []):
                                self.index[digests[i]] = rows
                            rows += 1
                            done += 1
                        if progress is not None:
                            progress(len(paths))
                finally:
                    f.flush()
                    os.fsync(f.fileno())
                    self._rows_on_disk = rows
                    self.compute_seconds = time.perf_counter() - t0
                    if done:
                        self.seconds_per_image = self.compute_seconds / done
                    self._save_index()
        ok = np.array([d in self.index for d in digests], dtype=bool)
        data = np.memmap(self.data_path, dtype=self.dtype, mode="r", shape=(self._rows_on_disk,) + self.shape) \
            if self._rows_on_disk else np.zeros((0,) + self.shape, self.dtype)
        rows = np.array([self.index.get(d, 0) for d in digests], dtype=np.int64)
        return data, rows, ok

    def seconds_saved(self):
        """Estimated time the cache hits saved (hits x measured seconds per image)."""
        return (self.seconds_per_image or 0.0) * self.hits
