"""The frozen-prefix feature cache survives full disks, kill -9, damaged files and a second process (issue 13).

Features here are derived from each image file's bytes, so every row read back can be checked against the one
image it belongs to: a shifted or stale row fails the comparison instead of training on wrong inputs."""
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from transfercl_cli import cache as cache_mod
from transfercl_cli.cache import CacheWarning, FeatureCache, file_digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (3, 5)
ROW_BYTES = 15 * 4
KEY = {"prefix": "test", "tensor": "t"}


def make_images(d, n, start=0):
    os.makedirs(d, exist_ok=True)
    items = []
    for i in range(start, start + n):
        p = os.path.join(d, f"img{i:03d}.bin")
        with open(p, "wb") as f:
            f.write(f"image number {i}".encode() * (i % 3 + 1))
        items.append((p, i % 2))
    return items


def expected(path, dtype=np.float32):
    with open(path, "rb") as f:
        seed = int.from_bytes(hashlib.sha1(f.read()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32).astype(dtype)


class Compute:
    """compute_batches fake: batches of `batch` images; records what it was asked to compute."""

    def __init__(self, batch=2, before_batch=None):
        self.batch, self.before_batch, self.asked = batch, before_batch, []

    def __call__(self, missing):
        self.asked.extend(p for p, _ in missing)
        for b, k in enumerate(range(0, len(missing), self.batch)):
            if self.before_batch:
                self.before_batch(b)
            paths = [p for p, _ in missing[k:k + self.batch]]
            yield paths, np.stack([expected(p) for p in paths])


def never(missing):
    if missing:
        raise AssertionError(f"computed {len(missing)} images that should have been cached")
    return iter(())


def check(cache, items, compute):
    """Run features() and assert every item's row is exactly its own image's features."""
    data, rows, ok = cache.features(items, compute)
    assert ok.all()
    for (p, _), r in zip(items, rows):
        np.testing.assert_array_equal(data[r], expected(p, cache.dtype), err_msg=p)
    return data, rows


def data_size(cache):
    return os.path.getsize(cache.data_path)


@pytest.fixture
def commit_every_batch(monkeypatch):
    monkeypatch.setattr(FeatureCache, "commit_bytes", 1)


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        yield


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip_misses_then_hits(tmp_path, dtype, no_warnings):
    items = make_images(tmp_path / "img", 7)
    items.append((items[2][0], 1))  # the same file twice
    dup = tmp_path / "img" / "copy.bin"
    dup.write_bytes(open(items[3][0], "rb").read())  # equal content, another name: one row
    items.append((str(dup), 0))
    c1 = FeatureCache(KEY, SHAPE, root=tmp_path / "c", dtype=dtype)
    comp = Compute()
    check(c1, items, comp)
    assert (c1.hits, c1.misses) == (0, 9) and len(comp.asked) == 7
    assert data_size(c1) == 7 * 15 * np.dtype(dtype).itemsize  # headerless raw rows, one per distinct image
    assert np.fromfile(c1.data_path, dtype).size == 7 * 15
    c2 = FeatureCache(KEY, SHAPE, root=tmp_path / "c", dtype=dtype)
    check(c2, items, never)
    assert (c2.hits, c2.misses) == (9, 0) and c2.seconds_per_image > 0


class FailingFile:
    """Wraps the data file: writes fail with ENOSPC once `state['budget']` bytes are spent (a partial write first)."""

    def __init__(self, f, state):
        self.f, self.state = f, state

    def write(self, b):
        if self.state["budget"] is None:
            return self.f.write(b)
        n = min(len(b), self.state["budget"])
        self.state["budget"] -= n
        if n:
            self.f.write(bytes(b[:n]))
        if n < len(b):
            raise OSError(errno.ENOSPC, "No space left on device")
        return n

    def truncate(self, size):
        if self.state.get("truncate_fails") and self.state["budget"] == 0:
            raise OSError(errno.EIO, "Input/output error")
        return self.f.truncate(size)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("truncate_fails", [False, True])
def test_full_disk_mid_row_then_next_run_repairs(tmp_path, monkeypatch, commit_every_batch, truncate_fails):
    items = make_images(tmp_path / "img", 9)
    real = cache_mod._append_file
    # 2 committed batches of 2 rows, then the disk fills half-way through the 2nd row of the 3rd batch.
    state = {"budget": 5 * ROW_BYTES + ROW_BYTES // 2 + 3, "truncate_fails": truncate_fails}
    monkeypatch.setattr(cache_mod, "_append_file", lambda p: FailingFile(real(p), state))
    c1 = FeatureCache(KEY, SHAPE, root=tmp_path / "c")
    with pytest.raises(OSError) as e:
        c1.features(items, Compute())
    assert e.value.errno == errno.ENOSPC
    with open(c1.index_path) as f:
        assert json.load(f)["committed_rows"] == 4
    assert data_size(c1) == (4 * ROW_BYTES if not truncate_fails else 5 * ROW_BYTES + ROW_BYTES // 2 + 3)

    state["budget"] = None  # space freed
    c2 = FeatureCache(KEY, SHAPE, root=tmp_path / "c")
    comp = Compute()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always", CacheWarning)
        check(c2, items, comp)
    w = [x for x in w if issubclass(x.category, CacheWarning)]  # not a ResourceWarning from another test's GC
    assert (c2.hits, c2.misses) == (4, 5) and comp.asked == [p for p, _ in items[4:]]
    assert data_size(c2) == 9 * ROW_BYTES  # the partial row was dropped, not numbered around
    assert len(w) == (1 if truncate_fails else 0), [str(x.message) for x in w]
    check(FeatureCache(KEY, SHAPE, root=tmp_path / "c"), items, never)


def test_failed_index_write_leaves_only_committed_rows(tmp_path, monkeypatch, commit_every_batch):
    items = make_images(tmp_path / "img", 6)
    real, calls = cache_mod._write_json_synced, []

    def write_json(path, obj):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, obj)

    monkeypatch.setattr(cache_mod, "_write_json_synced", write_json)
    with pytest.raises(OSError):
        FeatureCache(KEY, SHAPE, root=tmp_path / "c").features(items, Compute())
    c2 = FeatureCache(KEY, SHAPE, root=tmp_path / "c")
    with pytest.warns(CacheWarning, match="interrupted run"):
        check(c2, items, Compute())
    assert (c2.hits, c2.misses) == (2, 4) and data_size(c2) == 6 * ROW_BYTES


CHILD = r"""
import os, sys, time
from transfercl_cli import cache as C
from tests.test_cache import Compute, KEY, SHAPE, ROW_BYTES
mode, img_dir, root, marker = sys.argv[1:]
items = [(os.path.join(img_dir, n), 0) for n in sorted(os.listdir(img_dir))]
C.FeatureCache.commit_bytes = 1

def hang():
    open(marker, "w").close()
    time.sleep(60)

def before_batch(b):
    if mode == "compute" and b == 3:  # batches 0-2 are committed by the time batch 3 is asked for
        hang()

real = C._append_file
class HangingFile:  # the 8th row is half written when the process is killed
    def __init__(self, f): self.f = f
    def write(self, b):
        if os.fstat(self.f.fileno()).st_size == 7 * ROW_BYTES:
            self.f.write(bytes(b[:ROW_BYTES // 2]))
            hang()
        return self.f.write(b)
    def __getattr__(self, n): return getattr(self.f, n)
    def __enter__(self): return self
    def __exit__(self, *a): self.f.close()
if mode == "write":
    C._append_file = lambda p: HangingFile(real(p))
C.FeatureCache(KEY, SHAPE, root=root).features(items, Compute(before_batch=before_batch))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="no SIGKILL on this platform")
@pytest.mark.parametrize("mode,committed", [("compute", 6), ("write", 6)])
def test_kill_9_while_caching(tmp_path, mode, committed):
    items = make_images(tmp_path / "img", 10)
    marker = tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(tmp_path / "img"), str(tmp_path / "c"),
                             str(marker)], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None, "the caching process ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    c = FeatureCache(KEY, SHAPE, root=tmp_path / "c")
    comp = Compute()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always", CacheWarning)
        check(c, items, comp)
    w = [x for x in w if issubclass(x.category, CacheWarning)]
    # Rows are committed per batch of 2: in 'write' mode the 4th batch's 1st row was on disk but uncommitted.
    assert c.hits == committed and comp.asked == [p for p, _ in items[committed:]]
    assert data_size(c) == 10 * ROW_BYTES
    assert [("interrupted run" in str(x.message)) for x in w] == ([True] if mode == "write" else [])


@pytest.fixture
def full_cache(tmp_path):
    items = make_images(tmp_path / "img", 6)
    c = FeatureCache(KEY, SHAPE, root=tmp_path / "c")
    check(c, items, Compute())
    return items, c


def reopen_warns(c, items, match, misses):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always", CacheWarning)
        c2 = FeatureCache(KEY, SHAPE, root=os.path.dirname(c.dir))
        comp = Compute()
        check(c2, items, comp)
    msgs = [str(x.message) for x in w if issubclass(x.category, CacheWarning)]
    assert len(msgs) == 1, msgs
    assert c.dir in msgs[0] and match in msgs[0] and "\n" not in msgs[0]
    assert c2.misses == misses and len(comp.asked) == misses
    check(FeatureCache(KEY, SHAPE, root=os.path.dirname(c.dir)), items, never)  # repaired for good
    return c2


def test_truncated_data_file_drops_rows_past_its_end(full_cache):
    items, c = full_cache
    with open(c.data_path, "r+b") as f:
        f.truncate(4 * ROW_BYTES + 7)
    reopen_warns(c, items, "shorter than the index", misses=2)


def test_deleted_data_file_drops_every_row(full_cache):
    items, c = full_cache
    os.unlink(c.data_path)
    reopen_warns(c, items, "shorter than the index", misses=6)


def test_flipped_byte_in_a_committed_row_is_never_served(full_cache):
    items, c = full_cache
    with open(c.data_path, "r+b") as f:
        f.seek(2 * ROW_BYTES + 9)
        b = f.read(1)
        f.seek(2 * ROW_BYTES + 9)
        f.write(bytes([b[0] ^ 0x10]))
    c2 = reopen_warns(c, items, "failed their checksum", misses=1)
    assert c2.hits == 5


def test_index_entries_swapped_between_images_fail_their_checksum(full_cache):
    """Each checksum covers the image's content hash too: a row numbered for the wrong image is caught."""
    items, c = full_cache
    meta = json.load(open(c.index_path))
    d0, d1 = [file_digest(p) for p, _ in items[:2]]
    meta["rows"][d0], meta["rows"][d1] = meta["rows"][d1], meta["rows"][d0]
    open(c.index_path, "w").write(json.dumps(meta))
    reopen_warns(c, items, "failed their checksum", misses=2)


@pytest.mark.parametrize("index,match", [
    ('{"version": 2, "rows": {', "not valid JSON"),
    ("\xff\xfe garbage", "not valid JSON"),
    (None, "no row checksums"),  # the old format: rows numbered, nothing to verify them by
    ("[1, 2]", "no row checksums"),
    ("bad-rows", "malformed"),
    ("past-end", "outside its committed length"),
    ("other-shape", "another shape"),
])
def test_unusable_index_discards_the_cache(full_cache, index, match):
    items, c = full_cache
    meta = json.load(open(c.index_path))
    if index is None:
        index = json.dumps({"shape": list(SHAPE), "rows": {d: r for d, (r, _) in meta["rows"].items()}})
    elif index == "bad-rows":
        index = json.dumps(dict(meta, rows={"x": 3}))
    elif index == "past-end":
        index = json.dumps(dict(meta, committed_rows=3))
    elif index == "other-shape":
        index = json.dumps(dict(meta, shape=[5, 3]))
    with open(c.index_path, "w", encoding="latin-1") as f:
        f.write(index)
    reopen_warns(c, items, match, misses=6)


def test_stale_tail_is_dropped_not_numbered(tmp_path, no_warnings):
    items = make_images(tmp_path / "img", 6)
    c = FeatureCache(KEY, SHAPE, root=tmp_path / "c")
    check(c, items[:3], Compute())
    with open(c.data_path, "ab") as f:
        f.write(b"\x7f" * (ROW_BYTES + ROW_BYTES // 2))  # 1.5 rows nobody committed
    c2 = FeatureCache(KEY, SHAPE, root=tmp_path / "c")
    check(c2, items[:3], never)  # reading alone leaves the tail be
    with pytest.warns(CacheWarning, match=r"90 bytes after the 3 committed rows .* dropped them"):
        data, rows = check(c2, items, Compute())
    assert list(rows) == [0, 1, 2, 3, 4, 5] and data_size(c2) == 6 * ROW_BYTES


def test_two_caches_on_one_folder_append_after_each_other(tmp_path, commit_every_batch, no_warnings):
    """A process that opened the cache before another one committed rows numbers its own after them, even when the
    other commits while this one is computing."""
    items = make_images(tmp_path / "img", 10)
    a = FeatureCache(KEY, SHAPE, root=tmp_path / "c")
    b = FeatureCache(KEY, SHAPE, root=tmp_path / "c")
    da, _ = check(a, items[:2], Compute())

    def meanwhile(batch):
        if batch == 1:  # b has committed items 2-3 as rows 2-3; a reuses them and commits 4-5 as rows 4-5
            check(a, items[:6], Compute())
            assert a.hits == 4

    _, rows = check(b, items[2:], Compute(before_batch=meanwhile))
    assert b.hits == 0 and data_size(b) == 12 * ROW_BYTES  # items 4-5 computed by both
    np.testing.assert_array_equal(da[1], expected(items[1][0]))  # a's first map stays valid while b appends
    check(FeatureCache(KEY, SHAPE, root=tmp_path / "c"), items, never)


CONCURRENT = r"""
import sys, time
from transfercl_cli import cache as C
from tests.test_cache import Compute, KEY, SHAPE, make_images
img_dir, root, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
C.FeatureCache.commit_bytes = 1
real = C._append_file
C._append_file = lambda p: (time.sleep(0.01), real(p))[1]  # a long critical section: without the lock, a race
items = make_images(img_dir + start * "x", 12, start=start)
C.FeatureCache(KEY, SHAPE, root=root).features(items, Compute(batch=1))
"""


@pytest.mark.skipif(cache_mod.fcntl is None, reason="no advisory locks on this platform")
def test_two_processes_share_a_cache_folder(tmp_path, no_warnings):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(tmp_path / "img"), str(tmp_path / "c"),
                               str(s)], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True) for s in (0, 6)]
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and "CacheWarning" not in "".join(errs), errs
    items = make_images(str(tmp_path / "img"), 12) + make_images(str(tmp_path / "img") + "x" * 6, 12, start=6)
    c = FeatureCache(KEY, SHAPE, root=tmp_path / "c")
    check(c, items, never)
    assert c.hits == 24 and data_size(c) <= 24 * ROW_BYTES
