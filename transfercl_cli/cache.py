"""Disk cache of the frozen prefix's output, one row per image.

When only the last layers train, the frozen prefix gives the same output for an image every epoch: compute it once
and memory-map it afterwards. The cache folder is keyed by the prefix (structure and weights), the cut tensor and the
preprocessing (and the storage precision: float32, or float16 with `precision: fp16`); each row is keyed by the image
file's content hash, so a changed image or model never reuses stale features.

Crash safety by construction: the data file (`features.f32`/`.f16`, raw rows, no header) only ever grows past a
*committed* length recorded in `index.json`, and the index is replaced atomically only after the rows are fsync'ed.
Row numbers come from the committed count, never from the file size, and every append first truncates the file to
the committed length, so a partial or uncommitted tail (a full disk, kill -9, a power cut) is dropped instead of
shifting later rows. Each index entry carries a CRC32 of (content hash + row bytes), checked before a row is served:
a row that does not match, or an index that cannot be trusted, is discarded and recomputed with one CacheWarning.
Processes sharing the folder serialise appends with an advisory lock (fcntl.flock where available) and re-read the
index under it, so concurrent runs never number rows over each other.
"""
import contextlib
import hashlib
import json
import os
import time
import warnings
import zlib

import numpy as np

from .errors import TclNote
from .fsutil import atomic_path
from .runtime import cache_dir

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a single tcl process per cache folder is then assumed
    fcntl = None

INDEX_VERSION = 2


class CacheWarning(TclNote):
    """A damaged feature cache was found and repaired or discarded (its features are recomputed)."""


def file_digest(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def row_checksum(digest, row_bytes):
    """CRC32 of the image's content hash and its row: a row served for the wrong image fails it, like a flipped bit."""
    return zlib.crc32(row_bytes, zlib.crc32(digest.encode()))


def _append_file(path):
    """The data file opened for appending, unbuffered: a failed write raises at once, nothing is left to flush on
    close (tests replace this to inject write failures)."""
    return open(path, "ab", buffering=0)


class _DamagedIndex(ValueError):
    pass


class FeatureCache:
    # Rows are committed (fsync + index) once this many bytes are pending, and at the end: a crash loses at most
    # about this much work, and the index (~70 bytes per row) is rewritten at most once per such chunk.
    commit_bytes = 8 << 20

    def __init__(self, key_parts, shape, root=None, dtype=np.float32):
        self.dtype = np.dtype(dtype)
        key_parts = dict(key_parts, dtype=self.dtype.name) if self.dtype != np.float32 else key_parts
        h = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
        self.key = h
        self.dir = os.path.join(root or cache_dir("features"), h)
        os.makedirs(self.dir, exist_ok=True)
        self.shape = tuple(int(s) for s in shape)
        self.row_floats = int(np.prod(self.shape))
        self.row_bytes = self.row_floats * self.dtype.itemsize
        self.data_path = os.path.join(self.dir, "features.f16" if self.dtype == np.float16 else "features.f32")
        self.index_path = os.path.join(self.dir, "index.json")
        self.lock_path = os.path.join(self.dir, "lock")
        self.entries = {}  # content hash -> (row, checksum), committed rows only
        self.committed_rows = 0
        self.seconds_per_image = None
        self.hits = 0
        self.misses = 0
        self.compute_seconds = 0.0
        with self._locked():
            self._load()

    # ---------------------------------------------------------------------------------------------------------
    # Index: load and verify, save

    def _warn(self, what, done):
        warnings.warn(f"feature cache '{self.dir}': {what}; {done}", CacheWarning, stacklevel=4)

    @contextlib.contextmanager
    def _locked(self):
        """Exclusive advisory lock on the cache folder, for everything that reads-then-writes the index or data."""
        if fcntl is None:
            yield
            return
        with open(self.lock_path, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _read_index(self):
        """(entries, committed_rows, seconds_per_image) from index.json; _DamagedIndex when it cannot be trusted."""
        try:
            with open(self.index_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise _DamagedIndex(f"index.json is not valid JSON ({type(e).__name__})") from e
        if not isinstance(meta, dict) or meta.get("version") != INDEX_VERSION:
            raise _DamagedIndex("index.json has no row checksums (an older tcl, or not tcl's)")
        if meta.get("shape") != list(self.shape) or meta.get("dtype") != self.dtype.name \
                or meta.get("row_bytes") != self.row_bytes:
            raise _DamagedIndex("index.json describes rows of another shape or dtype")
        try:
            n = meta["committed_rows"]
            entries = {str(d): (int(r), int(c)) for d, (r, c) in meta["rows"].items()}
            spi = meta.get("seconds_per_image")
            spi = float(spi) if spi is not None else None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _DamagedIndex(f"index.json is malformed ({type(e).__name__})") from e
        if not isinstance(n, int) or n < 0 or any(not 0 <= r < n for r, _ in entries.values()):
            raise _DamagedIndex("index.json refers to rows outside its committed length")
        return entries, n, spi

    def _load(self):
        """(Re-)read the committed state under the lock; an untrusted index discards the cache, a data file shorter
        than the index says drops the rows past its end. Repairs are saved at once, so each is warned about once."""
        if not os.path.exists(self.index_path):
            self.entries, self.committed_rows = {}, 0
            return
        try:
            self.entries, self.committed_rows, self.seconds_per_image = self._read_index()
        except _DamagedIndex as e:
            self._discard()
            self._warn(str(e), "discarded the cache, its features will be recomputed")
            return
        size = os.path.getsize(self.data_path) if os.path.exists(self.data_path) else 0
        if size < self.committed_rows * self.row_bytes:
            n = size // self.row_bytes
            lost = [d for d, (r, _) in self.entries.items() if r >= n]
            for d in lost:
                del self.entries[d]
            self._warn(f"{os.path.basename(self.data_path)} is shorter than the index says ({size} of "
                       f"{self.committed_rows * self.row_bytes} bytes)",
                       f"dropped the {len(lost)} rows past its end, they will be recomputed")
            self.committed_rows = n
            self._save_index()
            if size:
                os.truncate(self.data_path, n * self.row_bytes)  # and the partial row: nothing valid maps it

    def _discard(self):
        """Start over. Unlink rather than truncate: another process's memory map of the old file stays valid."""
        for p in (self.index_path, self.data_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        self.entries, self.committed_rows = {}, 0

    def _save_index(self):
        _write_json_synced(self.index_path, {
            "version": INDEX_VERSION, "shape": list(self.shape), "dtype": self.dtype.name,
            "row_bytes": self.row_bytes, "committed_rows": self.committed_rows,
            "seconds_per_image": self.seconds_per_image,
            "rows": {d: [r, c] for d, (r, c) in self.entries.items()}})

    def _verify(self, digests):
        """Drop (and warn once about) the entries among `digests` whose row fails its checksum: never serve them."""
        want = sorted({d for d in digests if d in self.entries}, key=lambda d: self.entries[d][0])
        if not want:
            return
        raw = np.memmap(self.data_path, dtype=np.uint8, mode="r", shape=(self.committed_rows * self.row_bytes,))
        bad = []
        for d in want:
            r, c = self.entries[d]
            if row_checksum(d, raw[r * self.row_bytes:(r + 1) * self.row_bytes]) != c:
                bad.append(d)
        del raw
        if bad:
            for d in bad:
                del self.entries[d]
            self._save_index()
            self._warn(f"{len(bad)} row(s) of {os.path.basename(self.data_path)} failed their checksum",
                       "dropped them, they will be recomputed")

    # ---------------------------------------------------------------------------------------------------------
    # Appending

    def _commit(self, pending, seconds_per_image=None):
        """Append `pending` [(digest, row bytes)] after the committed rows and commit them, under the lock.

        The index is re-read first (another process may have committed rows since) and the file truncated to the
        committed length (a tail left by a crash). A failed write (ENOSPC, EIO) truncates back, best effort, and
        propagates unchanged; the index still describes only rows that are fully on disk."""
        with self._locked():
            self._load()
            start = self.committed_rows * self.row_bytes
            with _append_file(self.data_path) as f:
                size = os.fstat(f.fileno()).st_size
                if size != start:
                    f.truncate(start)
                    if size > start:
                        self._warn(f"{size - start} bytes after the {self.committed_rows} committed rows of "
                                   f"{os.path.basename(self.data_path)} were left by an interrupted run",
                                   "dropped them")
                try:
                    for _, row in pending:
                        _write_all(f, row)
                    os.fsync(f.fileno())
                except OSError:
                    with contextlib.suppress(OSError):
                        f.truncate(start)
                    raise
            for k, (d, row) in enumerate(pending):
                self.entries[d] = (self.committed_rows + k, row_checksum(d, row))
            self.committed_rows += len(pending)
            if seconds_per_image is not None:
                self.seconds_per_image = seconds_per_image
            self._save_index()

    def _compute(self, todo, compute_batches, progress):
        """Run compute_batches over `todo` {abs path: (item, digest)}, committing rows every `commit_bytes`."""
        pending, pending_bytes, done = [], 0, 0
        t0 = time.perf_counter()
        try:
            for paths, feats in compute_batches([item for item, _ in todo.values()]):
                feats = np.ascontiguousarray(feats, dtype=self.dtype).reshape(len(paths), -1)
                for j, p in enumerate(paths):
                    entry = todo.get(os.path.abspath(p))
                    if entry is not None:
                        pending.append((entry[1], feats[j].tobytes()))
                        pending_bytes += self.row_bytes
                        done += 1
                if progress is not None:
                    progress(len(paths))
                if pending and pending_bytes >= self.commit_bytes:
                    self._finish_chunk(pending, done, t0)
                    pending, pending_bytes = [], 0
        except BaseException as e:
            # Keep the rows computed before an interrupt (Ctrl-C, a failing loader); a failed write is not retried.
            if pending and not isinstance(e, OSError):
                with contextlib.suppress(Exception):
                    self._finish_chunk(pending, done, t0)
            raise
        if pending:
            self._finish_chunk(pending, done, t0)
        self.compute_seconds = time.perf_counter() - t0

    def _finish_chunk(self, pending, done, t0):
        self.compute_seconds = time.perf_counter() - t0
        self._commit(pending, self.compute_seconds / max(done, 1))

    # ---------------------------------------------------------------------------------------------------------
    # Public

    def features(self, items, compute_batches, progress=None):
        """Rows for `items` [(path, label)]: cached where the file's content hash is known, else computed.

        `compute_batches(missing_items)` yields (paths, array (B, *shape)) for the images it could read; an image
        it never yields is unreadable. Returns (data (rows, *shape) memmap, row index per item, ok mask per item)."""
        digests = [file_digest(p) for p, _ in items]
        with self._locked():
            self._load()
            self._verify(digests)
        missing = [i for i, d in enumerate(digests) if d not in self.entries]
        self.hits = len(items) - len(missing)
        self.misses = len(missing)
        self.compute_seconds = 0.0
        if missing:
            todo = {}  # one computation per file (and per content: equal files share a row)
            seen = set()
            for i in missing:
                if digests[i] not in seen:
                    seen.add(digests[i])
                    todo.setdefault(os.path.abspath(items[i][0]), (items[i], digests[i]))
            self._compute(todo, compute_batches, progress)
        ok = np.array([d in self.entries for d in digests], dtype=bool)
        # Only committed rows are mapped: later appends (ours or another process's) never move or truncate them.
        data = np.memmap(self.data_path, dtype=self.dtype, mode="r", shape=(self.committed_rows,) + self.shape) \
            if self.committed_rows else np.zeros((0,) + self.shape, self.dtype)
        rows = np.array([self.entries[d][0] if d in self.entries else 0 for d in digests], dtype=np.int64)
        return data, rows, ok

    def seconds_saved(self):
        """Estimated time the cache hits saved (hits x measured seconds per image)."""
        return (self.seconds_per_image or 0.0) * self.hits


def _write_json_synced(path, obj):
    """fsutil.write_json plus an fsync before the rename, so a power cut leaves the old index or the new one."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())


def _write_all(f, data):
    """Write all of `data` to an unbuffered file (a raw write may write less than asked)."""
    view = memoryview(data)
    while view:
        n = f.write(view)
        if not n:
            raise OSError("short write to the feature cache")
        view = view[n:]
