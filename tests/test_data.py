"""Dataset scanning, splits, image decoding/preprocessing, augmentation and the threaded loader."""
import os
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_path
from transfercl_cli.data import (Augment, BadImage, BadImageWarning, ImageLoader, Preprocess, load_image,
                                 load_splits, scan_dataset, stratified_split)
from transfercl_cli.errors import DataError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _solid(path, color, size=(12, 10), mode="RGB", **save):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return str(path)


def _corrupt_png(path):
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    return str(path)


@pytest.fixture
def folder(tmp_path):
    """3 classes with mixed formats, a corrupt PNG, a nested folder, and files that must be ignored."""
    root = tmp_path / "ds"
    for i in range(4):
        _solid(root / "apple" / f"a{i}.png", RED)
    _solid(root / "apple" / "UPPER.PNG", RED)
    _solid(root / "apple" / "nested" / "deep.jpg", RED)
    for i in range(3):
        _solid(root / "banana" / f"b{i}.bmp", GREEN)
    _corrupt_png(root / "banana" / "broken.png")
    (root / "cherry").mkdir()
    Image.new("RGB", (12, 10), BLUE).convert("P").save(root / "cherry" / "c0.gif")
    _solid(root / "cherry" / "c1.png", BLUE)
    (root / "cherry" / "notes.txt").write_text("not an image")
    (root / "cherry" / ".hidden.png").write_bytes(b"")
    (root / ".cache").mkdir()
    _solid(root / ".cache" / "x.png", BLUE)
    return root


# ------------------------------------------------------------------------------------------------- scanning


def test_scan_classes_items_and_ignored_files(folder):
    ds = scan_dataset(folder)
    assert ds.classes == ["apple", "banana", "cherry"]
    names = {os.path.relpath(p, folder): y for p, y in ds.items}
    assert names["apple/UPPER.PNG"] == 0 and names["apple/nested/deep.jpg"] == 0
    assert names["banana/broken.png"] == 1 and names["cherry/c0.gif"] == 2
    assert not any(n.endswith((".txt", ".hidden.png")) or n.startswith(".cache") for n in names)
    assert ds.counts() == [6, 4, 2] and len(ds) == 12
    assert [p for p, _ in ds.items] == sorted(p for p, _ in ds.items)


def test_scan_errors_name_cause_and_fix(tmp_path, folder):
    with pytest.raises(DataError, match="does not exist") as e:
        scan_dataset(tmp_path / "nope")
    assert e.value.fix
    f = _solid(tmp_path / "file.png", RED)
    with pytest.raises(DataError, match="is a file"):
        scan_dataset(f)
    loose = tmp_path / "loose"
    _solid(loose / "x.png", RED)
    with pytest.raises(DataError, match="no class sub-folders.*1 images directly"):
        scan_dataset(loose)
    (folder / "durian").mkdir()
    (folder / "durian" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="durian.*contains no images"):
        scan_dataset(folder)


def test_scan_min_classes_flag_and_fixed_classes(tmp_path):
    root = tmp_path / "one"
    _solid(root / "cat" / "1.png", RED)
    with pytest.raises(DataError, match="at least 2"):
        scan_dataset(root)
    ds = scan_dataset(root, min_classes=1)
    assert ds.classes == ["cat"] and ds.items[0][1] == 0
    ds = scan_dataset(root, min_classes=1, classes=["ant", "cat", "dog"])
    assert ds.classes == ["ant", "cat", "dog"] and ds.items[0][1] == 1
    with pytest.raises(DataError, match="\\['cat'\\] that are not among.*did you mean 'cats'"):
        scan_dataset(root, min_classes=1, classes=["cats", "dog"])


# ------------------------------------------------------------------------------------------------- splits


def _many(tmp_path, counts, name="many"):
    root = tmp_path / name
    for c, n in counts.items():
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (d / f"{i:03d}.png").write_bytes(b"")  # scanning never decodes
    return root


def test_stratified_split_fractions_disjoint_deterministic(tmp_path):
    root = _many(tmp_path, {"a": 50, "b": 20, "c": 3, "d": 2, "e": 1})
    sp = load_splits(root, val=0.1, test=0.2, seed=3)
    assert sp.layout == "stratified" and sp.classes == ["a", "b", "c", "d", "e"]
    counts = sp.counts()
    assert counts["val"] == [5, 2, 1, 1, 0] and counts["test"] == [10, 4, 1, 0, 0]
    assert counts["train"] == [35, 14, 1, 1, 1]  # train always keeps >= 1; priority train > val > test
    all_items = [it for s in sp.splits.values() for it in s]
    assert len(all_items) == len(set(all_items)) == 76
    again = load_splits(root, val=0.1, test=0.2, seed=3)
    assert again.splits == sp.splits
    other = load_splits(root, val=0.1, test=0.2, seed=4)
    assert other.splits["test"] != sp.splits["test"] and other.counts() == counts


def test_split_of_one_class_is_independent_of_other_classes(tmp_path):
    a = load_splits(_many(tmp_path, {"x": 30, "y": 10}, "r1"), seed=0)
    b = load_splits(_many(tmp_path, {"x": 30, "y": 17, "z": 5}, "r2"), seed=0)
    names = lambda items: sorted(os.path.basename(p) for p, y in items if y == 0)  # noqa: E731
    assert all(names(a[s]) == names(b[s]) for s in ("train", "val", "test"))


def test_split_bad_fractions(tmp_path):
    root = _many(tmp_path, {"a": 5, "b": 5})
    with pytest.raises(DataError, match="leaves no images"):
        load_splits(root, val=0.5, test=0.5)
    with pytest.raises(DataError, match="fraction"):
        load_splits(root, val=-0.1)


def test_stratified_split_matches_requested_fractions_generally():
    rng = np.random.default_rng(0)
    items = [(f"p{i}", int(y)) for i, y in enumerate(rng.integers(0, 4, 400))]
    parts = stratified_split(items, 4, {"val": 0.15, "test": 0.25}, seed=1)
    for y in range(4):
        n = sum(1 for _, l in items if l == y)
        assert abs(sum(1 for _, l in parts["val"] if l == y) - 0.15 * n) <= 1
        assert abs(sum(1 for _, l in parts["test"] if l == y) - 0.25 * n) <= 1


def test_split_folders(tmp_path):
    root = tmp_path / "sf"
    for s, n in (("train", 10), ("validation", 2), ("test", 3)):
        for c in ("cat", "dog"):
            for i in range(n):
                _solid(root / s / c / f"{i}.png", RED)
    sp = load_splits(root)
    assert sp.layout == "folders" and sp.classes == ["cat", "dog"]
    assert sp.counts() == {"train": [10, 10], "val": [2, 2], "test": [3, 3]}
    assert all(f"{os.sep}validation{os.sep}" in p for p, _ in sp["val"])
    # val may hold a subset of the classes; an extra class is an error naming it
    import shutil

    shutil.rmtree(root / "validation" / "dog")
    assert load_splits(root).counts()["val"] == [2, 0]
    _solid(root / "validation" / "emu" / "0.png", RED)
    with pytest.raises(DataError, match="emu"):
        load_splits(root)
    # no val folder: carved from train, stratified; test folder untouched
    shutil.rmtree(root / "validation")
    sp = load_splits(root, val=0.2)
    assert sp.counts() == {"train": [8, 8], "val": [2, 2], "test": [3, 3]}


def test_class_named_train_is_not_a_split_layout(tmp_path):
    root = tmp_path / "vehicles"
    _solid(root / "train" / "1.png", RED)
    _solid(root / "truck" / "1.png", RED)
    sp = load_splits(root, val=0, test=0)
    assert sp.layout == "stratified" and sp.classes == ["train", "truck"]


# ------------------------------------------------------------------------------------------------- decoding


def _px(v):
    return np.float32(v) / np.float32(127.5) - 1  # the default normalisation


def _close(actual, desired, **kw):
    np.testing.assert_allclose(actual, np.broadcast_to(desired, np.shape(actual)), **kw)


def test_modes_become_rgb_on_white(tmp_path):
    p = _solid(tmp_path / "gray.png", 100, mode="L")
    _close(load_image(p, size=4), _px(100), atol=1e-6)
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 4, 8))
    rgba.save(tmp_path / "rgba.png")
    x = load_image(tmp_path / "rgba.png", size=(8, 8), resize="stretch")
    _close(x[:, :3], [1, -1, -1], atol=1e-6)  # opaque red
    _close(x[:, 5:], 1.0, atol=1e-6)  # transparent -> white
    la = Image.new("LA", (6, 6), (30, 0))
    la.save(tmp_path / "la.png")
    _close(load_image(tmp_path / "la.png", size=6, resize="stretch"), 1.0, atol=1e-6)
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    _close(load_image(tmp_path / "pal.png", size=8)[2, 2], _px(np.array([10, 20, 30])),
                               atol=1e-6)
    pal.save(tmp_path / "pal_t.png", transparency=1)
    _close(load_image(tmp_path / "pal_t.png", size=8), 1.0, atol=1e-6)
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "g16.png")
    _close(load_image(tmp_path / "g16.png", size=8), 1.0, atol=1e-6)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    x = load_image(tmp_path / "cmyk.jpg", size=8)
    assert x[..., 0].mean() > 0.9 and x[..., 1:].mean() < -0.9


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = RED  # left half red, right half blue
    a[:, 20:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left half ends up on top
    Image.fromarray(a).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    x = load_image(tmp_path / "rot.jpg", size=(40, 20), resize="stretch")
    assert x.shape == (40, 20, 3)
    top, bottom = x[2:18].mean((0, 1)), x[22:38].mean((0, 1))
    assert top[0] > 0.8 and top[2] < -0.8 and bottom[2] > 0.8 and bottom[0] < -0.8


def test_shorter_crop_and_stretch_match_pillow_pipeline(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "r.png")
    img = Image.fromarray(a)
    x = load_image(tmp_path / "r.png", size=(224, 224))
    # shorter side 200 -> 256 (width 384), centre 224 crop
    want = np.asarray(img.resize((384, 256), Image.BILINEAR).crop((80, 16, 304, 240)), np.float32)
    np.testing.assert_allclose(x, want / 127.5 - 1, atol=1e-5)
    x = load_image(tmp_path / "r.png", size=(32, 48), resize="stretch")
    want = np.asarray(img.resize((48, 32), Image.BILINEAR), np.float32)
    np.testing.assert_allclose(x, want / 127.5 - 1, atol=1e-5)
    assert x.dtype == np.float32 and x.flags.c_contiguous
    # non-square target with shorter_crop keeps the aspect ratio and covers the target
    assert load_image(tmp_path / "r.png", size=(64, 32)).shape == (64, 32, 3)


def test_normalisation_and_channel_order(tmp_path):
    p = _solid(tmp_path / "c.png", (255, 128, 0))
    rgb = np.array([255, 128, 0], np.float64)
    np.testing.assert_allclose(load_image(p, size=4)[0, 0], rgb / 127.5 - 1, atol=1e-6)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    np.testing.assert_allclose(load_image(p, size=4, mean=mean, std=std)[0, 0],
                               (rgb / 255 - mean) / std, rtol=1e-5)
    caffe = load_image(p, size=4, channel_order="BGR", scale=1.0, offset=[-103.939, -116.779, -123.68])
    np.testing.assert_allclose(caffe[0, 0], rgb[::-1] - [103.939, 116.779, 123.68], rtol=1e-5)
    with pytest.raises(ValueError):
        load_image(p, mean=mean)
    with pytest.raises(ValueError):
        load_image(p, channel_order="RBG")
    pp = Preprocess.from_dict({"size": [8, 8], "resize": "stretch", "mean": mean, "std": std})
    assert Preprocess.from_dict(pp.to_dict()).to_dict() == pp.to_dict()


def test_bad_files_raise_bad_image(tmp_path):
    bad = [_corrupt_png(tmp_path / "corrupt.png")]
    (tmp_path / "text.jpg").write_text("hello")
    bad.append(str(tmp_path / "text.jpg"))
    good = _solid(tmp_path / "ok.png", RED, size=(64, 64))
    data = open(good, "rb").read()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    bad += [str(tmp_path / "trunc.png"), str(tmp_path / "missing.png")]
    for p in bad:
        with pytest.raises(BadImage) as e:
            load_image(p, size=8)
        assert e.value.path == p and e.value.reason and isinstance(e.value, DataError)


# ------------------------------------------------------------------------------------------------- augmentation


def test_augment_reproducible_and_effective(tmp_path):
    rng0 = np.random.default_rng(0)
    p = tmp_path / "n.png"
    Image.fromarray(rng0.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(p)
    aug = Augment(hflip=True, random_resized_crop=(0.3, 1.0), brightness=0.3, contrast=0.3)
    a = load_image(p, size=16, augment=aug, rng=np.random.default_rng(7))
    b = load_image(p, size=16, augment=aug, rng=np.random.default_rng(7))
    c = load_image(p, size=16, augment=aug, rng=np.random.default_rng(8))
    assert a.shape == (16, 16, 3) and np.array_equal(a, b) and not np.allclose(a, c)
    plain = load_image(p, size=16)
    flip = Augment(hflip=True)
    outs = [load_image(p, size=16, augment=flip, rng=np.random.default_rng(s)) for s in range(12)]
    assert all(np.array_equal(o, plain) or np.array_equal(o, plain[:, ::-1]) for o in outs)
    assert any(np.array_equal(o, plain) for o in outs) and any(np.array_equal(o, plain[:, ::-1]) for o in outs)
    assert not Augment().enabled and Augment.from_dict(None) is None
    with pytest.raises(ValueError):
        Augment(random_resized_crop=(0.5, 0.2))
    with pytest.raises(ValueError):
        Augment.from_dict({"hflp": True})


# ------------------------------------------------------------------------------------------------- loader


def _loader_items(tmp_path, n=11, bad_at=()):
    items = []
    for i in range(n):
        p = tmp_path / "imgs" / f"{i:02d}.png"
        os.makedirs(p.parent, exist_ok=True)
        if i in bad_at:
            _corrupt_png(p)
        else:
            _solid(p, (i * 20 % 256, 255 - i * 20 % 256, 7), size=(10, 8))
        items.append((str(p), i % 3))
    return items


def _collect(it):
    return [(x.copy(), y.copy(), list(p)) for x, y, p in it]


def _loader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("tcl-loader")]


def _wait_no_threads(timeout=5.0):
    end = time.time() + timeout
    while _loader_threads() and time.time() < end:
        time.sleep(0.02)
    return _loader_threads()


def test_loader_order_batches_and_values(tmp_path):
    items = _loader_items(tmp_path)
    loader = ImageLoader(items, batch_size=4, size=(6, 6))
    out = _collect(loader)
    assert [len(y) for _, y, _ in out] == [4, 4, 3] and len(loader) == 3
    assert [p for _, _, ps in out for p in ps] == [p for p, _ in items]
    assert np.concatenate([y for _, y, _ in out]).tolist() == [y for _, y in items]
    x0, y0, _ = out[0]
    assert x0.dtype == np.float32 and y0.dtype == np.int32 and x0.shape == (4, 6, 6, 3)
    np.testing.assert_array_equal(x0[1], load_image(items[1][0], size=(6, 6)))
    dl = ImageLoader(items, batch_size=4, size=(6, 6), drop_last=True)
    assert [len(y) for _, y, _ in dl] == [4, 4] and len(dl) == 2


def test_loader_shuffle_reproducible_per_epoch(tmp_path):
    items = _loader_items(tmp_path)
    kw = dict(batch_size=3, shuffle=True, seed=5, size=(6, 6))
    a, b = ImageLoader(items, **kw), ImageLoader(items, **kw, num_workers=0)
    ea = [[p for _, _, ps in _collect(a) for p in ps] for _ in range(3)]
    eb = [[p for _, _, ps in _collect(b) for p in ps] for _ in range(3)]
    assert ea == eb
    assert ea[0] != ea[1] != ea[2] and all(sorted(e) == sorted(p for p, _ in items) for e in ea)
    assert [p for _, _, ps in _collect(a.epoch(1)) for p in ps] == ea[1]  # resume at an epoch
    c = ImageLoader(items, batch_size=3, shuffle=True, seed=6, size=(6, 6))
    assert [p for _, _, ps in _collect(c) for p in ps] != ea[0]


def test_loader_augmentation_independent_of_threads(tmp_path):
    items = _loader_items(tmp_path, n=7)
    aug = Augment(hflip=True, random_resized_crop=(0.5, 1.0), brightness=0.2)
    kw = dict(batch_size=3, shuffle=True, seed=1, size=(6, 6), augment=aug)
    r1 = _collect(ImageLoader(items, num_workers=2, **kw))
    r2 = _collect(ImageLoader(items, num_workers=0, **kw))
    assert all(np.array_equal(a[0], b[0]) and a[2] == b[2] for a, b in zip(r1, r2))
    loader = ImageLoader(items, **kw)
    e0, e1 = _collect(loader), _collect(loader)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(e0, e1))


def test_loader_skips_bad_images_and_lists_them(tmp_path):
    items = _loader_items(tmp_path, n=9, bad_at=(2, 7))
    items.append((str(tmp_path / "gone.png"), 0))
    loader = ImageLoader(items, batch_size=3, size=(6, 6))
    with pytest.warns(BadImageWarning) as rec:
        out = _collect(loader)
    assert len(rec) == 3
    assert [len(y) for _, y, _ in out] == [3, 3, 1]  # batches refilled from the next images
    got = [p for _, _, ps in out for p in ps]
    bad = {items[2][0], items[7][0], items[9][0]}
    assert set(got) == {p for p, _ in items} - bad
    assert {p for p, _ in loader.bad_images} == bad and loader.num_bad == 3
    assert all(reason for _, reason in loader.bad_images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad images are skipped silently in later epochs
        assert [p for _, _, ps in _collect(loader) for p in ps] == got
    assert loader.num_bad == 3 and len(loader) == 3
    seen = []
    cb = ImageLoader(items, batch_size=4, size=(6, 6), on_bad_image=lambda p, r: seen.append(p))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _collect(cb)
    assert set(seen) == bad
    all_bad = ImageLoader([items[2], items[7]], batch_size=2, size=(6, 6), on_bad_image=lambda p, r: None)
    assert _collect(all_bad) == [] and all_bad.num_bad == 2


@pytest.mark.parametrize("how", ["close", "break", "interrupt", "loader_close"])
def test_loader_stops_threads_when_consumer_stops_early(tmp_path, how):
    items = _loader_items(tmp_path, n=12) * 5
    loader = ImageLoader(items, batch_size=2, size=(6, 6), prefetch=1)
    before = len(_loader_threads())
    assert before == 0
    if how == "close":
        it = iter(loader)
        next(it)
        it.close()
    elif how == "break":
        for _ in loader:
            break
    elif how == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            for _ in loader:
                raise KeyboardInterrupt
    else:
        it = iter(loader)
        next(it)
        loader.close()
        rest = list(it)
        assert len(rest) <= 2  # at most what was already queued
    assert _wait_no_threads() == []


def test_loader_on_shared_dataset():
    root = shared_path("datasets", "cifar-dogs-cats")
    sp = load_splits(root, val=0.1, test=0.2, seed=0)
    assert sp.classes == ["cat", "dog"] and sp.counts()["test"] == [200, 200]
    loader = ImageLoader(sp["val"][:40], batch_size=16, size=(64, 64))
    out = _collect(loader)
    assert sum(len(y) for _, y, _ in out) == 40 and loader.num_bad == 0
    x = np.concatenate([b[0] for b in out])
    assert -1.0 <= x.min() < -0.5 and 0.5 < x.max() <= 1.0
