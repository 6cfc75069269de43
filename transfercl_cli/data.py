"""Image datasets: folder scanning, train/val/test splits, image decoding + preprocessing, augmentation, and a
batched loader that decodes in background threads.

Layouts (``root`` is the folder the user names):

- ImageFolder: one sub-folder per class, images anywhere below it (``root/cat/1.jpg``, ``root/dog/a/2.png``).
  Class names are the sub-folder names, sorted; label = index in that sorted list.
- Split folders: ``root/train``, optionally ``root/val`` and ``root/test`` (aliases: ``training``; ``valid``,
  ``validation``; ``testing``), each an ImageFolder with the same classes. Only used when *every* sub-folder of
  ``root`` is a split name, so a dataset with a class called "train" still works as an ImageFolder.

Hidden files and folders (names starting with ".") are ignored; extensions are matched case-insensitively.
All listings are sorted, so results never depend on the file system's order.

Preprocessing (``load_image`` / ``Preprocess``): EXIF orientation is applied; grayscale, palette, 16-bit and CMYK
images become RGB; transparency is flattened onto a white background. Then either ``resize="shorter_crop"`` (scale
so the image covers ``size * 256/224`` and take the centre ``size`` crop; 224 -> 256 -> 224 as in Keras/PyTorch
ImageNet evaluation) or ``resize="stretch"`` (resize straight to ``size``), with Pillow's BILINEAR filter.
Pixel values x in [0, 255] are then mapped by ``x * scale + offset`` (default ``1/127.5, -1``: range [-1, 1]), or
by ``(x / 255 - mean) / std`` when ``mean``/``std`` are given. Per-channel constants are in the order of the
*output* channels (``channel_order``), e.g. Caffe-style BGR means are written in BGR order. ``size`` is
``(height, width)``, like the model's input shape; the result is float32 HWC.
"""
import math
import os
import queue
import threading
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np

from .errors import DataError, TclNote, closest

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}
SPLITS = ("train", "val", "test")


class BadImage(DataError):
    """A file that cannot be decoded as an image (corrupt, truncated, not an image, unsupported format)."""

    def __init__(self, path, reason):
        super().__init__(f"Cannot read image '{path}': {reason}.",
                         "Re-export or delete the file, or remove it from the dataset.")
        self.path = str(path)
        self.reason = str(reason)


class BadImageWarning(TclNote):
    """Issued by ImageLoader for each unreadable image it skips (once per file)."""


# --------------------------------------------------------------------------------------------------------------
# Scanning and splitting


@dataclass
class Dataset:
    """A scanned ImageFolder: ``classes`` (sorted names) and ``items`` (list of (path, label), sorted by path)."""

    root: str
    classes: list
    items: list = field(default_factory=list)

    def counts(self):
        """Images per class, as a list aligned with ``classes``."""
        return class_counts(self.items, len(self.classes))

    def __len__(self):
        return len(self.items)


def class_counts(items, num_classes):
    c = [0] * num_classes
    for _, y in items:
        c[y] += 1
    return c


def _visible_dirs(path):
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise DataError(f"Cannot list the dataset folder '{path}': {e.strerror or e}.",
                        "Check that the folder exists and is readable.") from e
    return [n for n in names if not n.startswith(".") and os.path.isdir(os.path.join(path, n))]


def _image_files(folder, extensions):
    exts = tuple(e.lower() for e in extensions)
    out = []
    seen = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(exts):
                out.append(os.path.join(dirpath, f))
    return sorted(out)


def scan_dataset(root, extensions=IMAGE_EXTENSIONS, min_classes=2, classes=None):
    """Scan an ImageFolder ``root`` (one sub-folder per class) into a Dataset.

    ``min_classes``: raise DataError when fewer class folders exist (2 for training; pass 1 to evaluate or predict
    on a single class). ``classes``: a fixed class list (e.g. the trained model's); labels then index into it, a
    folder not in it is an error, and classes without a folder are allowed (the returned ``classes`` is this list).
    Raises DataError (cause + fix) when the folder is missing, has no class sub-folders, or a class folder has no
    images.
    """
    root = os.fspath(root)
    shown_ext = ", ".join(extensions)
    if not os.path.exists(root):
        raise DataError(f"Dataset folder '{root}' does not exist.",
                        "Check the path; it should contain one sub-folder per class "
                        f"(e.g. {os.path.join(root, 'cat')}/*.jpg, {os.path.join(root, 'dog')}/*.jpg).")
    if not os.path.isdir(root):
        raise DataError(f"Dataset path '{root}' is a file, not a folder.",
                        "Pass the folder that contains one sub-folder per class.")
    dirs = _visible_dirs(root)
    if not dirs:
        loose = _image_files(root, extensions)
        hint = (f" It holds {len(loose)} images directly; move them into one sub-folder per class."
                if loose else "")
        raise DataError(f"Dataset folder '{root}' has no class sub-folders.{hint}",
                        "Use the ImageFolder layout: one sub-folder per class, named after the class, holding "
                        f"that class's images ({shown_ext}).")
    if classes is not None:
        classes = [str(c) for c in classes]
        unknown = [d for d in dirs if d not in classes]
        if unknown:
            hint = closest(unknown[0], classes)
            hint = f" (did you mean '{hint}'?)" if hint else ""
            raise DataError(f"Dataset folder '{root}' has class folder(s) {unknown} that are not among the expected "
                            f"classes{hint}: {classes[:20]}{' ...' if len(classes) > 20 else ''}.",
                            "Rename or remove those folders so every folder name is one of the classes the model "
                            "was trained on.")
    else:
        classes = list(dirs)
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for d in dirs:
        files = _image_files(os.path.join(root, d), extensions)
        if not files:
            raise DataError(f"Class folder '{os.path.join(root, d)}' (class '{d}') contains no images.",
                            f"Add images with one of the extensions {shown_ext} to it, or remove the folder.")
        items.extend((p, index[d]) for p in files)
    if len(dirs) < min_classes:
        raise DataError(f"Dataset folder '{root}' has {len(dirs)} class folder(s) ({', '.join(dirs)}); at least "
                        f"{min_classes} are needed.",
                        "Add one sub-folder per class (a classifier needs two or more classes to learn from).")
    items.sort(key=lambda t: t[0])
    return Dataset(root=root, classes=classes, items=items)


@dataclass
class Splits:
    """Result of load_splits: ``classes``, ``splits`` {"train"|"val"|"test": [(path, label), ...]} and ``layout``
    ("folders" when the dataset ships split sub-folders, "stratified" when split here by fractions)."""

    classes: list
    splits: dict
    layout: str

    def __getitem__(self, split):
        return self.splits[split]

    def counts(self):
        """{split: images per class}."""
        return {s: class_counts(v, len(self.classes)) for s, v in self.splits.items()}


def _split_dirs(root):
    """{canonical split: folder} when every sub-folder of root is a split name and 'train' is among them."""
    dirs = _visible_dirs(root)
    if not dirs or any(d.lower() not in SPLIT_ALIASES for d in dirs):
        return None
    found = {}
    for d in dirs:
        s = SPLIT_ALIASES[d.lower()]
        if s in found:
            raise DataError(f"Dataset folder '{root}' has two folders for the {s} split: '{found[s]}' and '{d}'.",
                            "Keep one of them.")
        found[s] = d
    return {s: os.path.join(root, d) for s, d in found.items()} if "train" in found else None


def _check_fractions(val, test):
    for name, v in (("val", val), ("test", test)):
        if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
            raise DataError(f"The {name} fraction must be a number in [0, 1), got {v!r}.",
                            f"Use e.g. {name}: 0.1.")
    if val + test >= 1.0:
        raise DataError(f"val ({val}) + test ({test}) leaves no images for training.",
                        "Make val + test smaller than 1 (e.g. val 0.1, test 0.2).")


def stratified_split(items, num_classes, fractions, seed=0, classes=None):
    """Split (path, label) items per class by ``fractions`` {split: fraction}; the rest goes to "train".

    Deterministic for a given seed and set of files: each class is shuffled by its own generator seeded from
    (seed, crc32(class name)), so adding images to one class never moves another class's images. Per class, a split
    with a non-zero fraction gets round(n * fraction) images but at least 1 when the class has enough images
    ("train" keeps at least 1; with few images, priority is train, then the splits in the order given).
    Each returned list is sorted by (label, path).
    """
    names = list(fractions)
    out = {"train": [], **{s: [] for s in names}}
    by_class = [[] for _ in range(num_classes)]
    for p, y in items:
        by_class[y].append(p)
    for y, paths in enumerate(by_class):
        paths = sorted(paths)
        n = len(paths)
        if n == 0:
            continue
        key = (classes[y] if classes is not None else str(y)).encode("utf-8")
        rng = np.random.default_rng([int(seed), zlib.crc32(key)])
        order = rng.permutation(n)
        want = {s: int(math.floor(n * fractions[s] + 0.5)) for s in names}
        avail = n - 1  # train keeps one
        take = {}
        for s in names:  # guarantee one image per requested split, in priority order, while images remain
            take[s] = 1 if (fractions[s] > 0 and avail > 0) else 0
            avail -= take[s]
        for s in names:  # then top up towards the rounded target
            extra = max(0, min(want[s] - take[s], avail))
            take[s] += extra
            avail -= extra
        start = 0
        for s in names:
            out[s].extend((paths[i], y) for i in order[start:start + take[s]])
            start += take[s]
        out["train"].extend((paths[i], y) for i in order[start:])
    for s in out:
        out[s].sort(key=lambda t: (t[1], t[0]))
    return out


def load_splits(root, val=0.1, test=0.2, seed=0, extensions=IMAGE_EXTENSIONS, min_classes=2):
    """Train/val/test items of a dataset folder -> Splits(classes, splits, layout).

    With split sub-folders (``root/train``, ``root/val``, ``root/test``) those are used as given; the classes are
    train's, val/test may hold a subset of them. A missing ``val`` folder is carved from train (stratified, fraction
    ``val``); a missing ``test`` folder gives an empty test split. Without split folders, ``root`` is an ImageFolder
    split per class by the ``val`` and ``test`` fractions (see stratified_split), deterministic in ``seed``.
    """
    _check_fractions(val, test)
    root = os.fspath(root)
    sd = _split_dirs(root) if os.path.isdir(root) else None
    if sd is None:
        ds = scan_dataset(root, extensions, min_classes=min_classes)
        parts = stratified_split(ds.items, len(ds.classes), {"val": val, "test": test}, seed, ds.classes)
        return Splits(ds.classes, {s: parts[s] for s in SPLITS}, "stratified")
    train = scan_dataset(sd["train"], extensions, min_classes=min_classes)
    splits = {"train": train.items}
    for s in ("val", "test"):
        if s in sd:
            extra = [d for d in _visible_dirs(sd[s]) if d not in train.classes]
            if extra:
                raise DataError(f"The {s} folder '{sd[s]}' has class folder(s) {extra} that the train folder "
                                f"'{sd['train']}' lacks.",
                                f"Every {s} class folder needs a matching folder (same name) in the train folder.")
            splits[s] = scan_dataset(sd[s], extensions, min_classes=1, classes=train.classes).items
        else:
            splits[s] = []
    if "val" not in sd and val > 0:
        parts = stratified_split(train.items, len(train.classes), {"val": val}, seed, train.classes)
        splits["train"], splits["val"] = parts["train"], parts["val"]
    return Splits(train.classes, {s: splits[s] for s in SPLITS}, "folders")


def recipe_splits(data_cfg, root=None, min_classes=2):
    """load_splits with a recipe's `data` section (root, val, test, seed, extensions); `root` overrides data.root."""
    return load_splits(root or data_cfg["root"], val=data_cfg["val"], test=data_cfg["test"], seed=data_cfg["seed"],
                       extensions=tuple(data_cfg["extensions"]), min_classes=min_classes)


# --------------------------------------------------------------------------------------------------------------
# Decoding and preprocessing


def open_image(path):
    """Open ``path`` (or a file object / PIL image) as an RGB PIL image: EXIF orientation applied, transparency
    flattened onto white, grayscale/palette/16-bit/CMYK converted. Raises BadImage when it cannot be decoded."""
    from PIL import Image, ImageOps

    try:
        if isinstance(path, Image.Image):
            img = ImageOps.exif_transpose(path)
        else:
            with Image.open(path) as f:
                f.load()  # decode now: truncation and corruption show up here, not later
                img = ImageOps.exif_transpose(f)
                if img is f:
                    img = f.copy()
        return _to_rgb(img)
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, struct.error, ...)
        reason = str(e) or type(e).__name__
        raise BadImage(path if not isinstance(path, Image.Image) else "<image>", reason) from e


def check_image(path):
    """None when ``path`` decodes as an image, else the reason it does not (a dangling symlink, an empty file,
    truncated or corrupt data, not an image). JPEGs decode at reduced scale (draft mode): every byte is still read,
    so truncation shows, at a fraction of the cost of a full decode."""
    from PIL import Image

    if not os.path.exists(path):
        return "dangling symbolic link" if os.path.islink(path) else "file not found"
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as f:
            if f.format == "JPEG":
                f.draft("RGB", (max(1, f.size[0] // 8), max(1, f.size[1] // 8)))
            f.load()
        return None
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, struct.error, ...)
        return str(e) or type(e).__name__


def find_unreadable(paths, num_workers=2):
    """[(path, reason)] for the paths that are not readable images, in the order given (decoded in threads)."""
    from concurrent.futures import ThreadPoolExecutor

    paths = list(paths)
    if num_workers > 1 and len(paths) > 8:
        with ThreadPoolExecutor(num_workers, thread_name_prefix="tcl-image-check") as pool:
            reasons = list(pool.map(check_image, paths, chunksize=16))
    else:
        reasons = [check_image(p) for p in paths]
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


def summarize_bad(bad, first=3):
    """'a.jpg (reason); b.png (reason); ...' for the first unreadable images of [(path, reason)] (one-line messages)."""
    return "; ".join(f"{p} ({r})" for p, r in bad[:first]) + ("; ..." if len(bad) > first else "")


def _to_rgb(img):
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0  # 16-bit -> 8-bit
        img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa", "RGBA"):
        img = img.convert("RGBA")
    elif mode != "RGB":
        img = img.convert("RGB")
    if img.mode == "RGBA":
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img).convert("RGB")
    return img


def _size_hw(size):
    if isinstance(size, int):
        return (size, size)
    h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    return h, w


def resize_image(img, size, resize="shorter_crop"):
    """Resize a PIL image to ``size`` (h, w): "shorter_crop" = scale to cover size*256/224, centre crop;
    "stretch" = resize directly (aspect ratio not kept). Bilinear."""
    from PIL import Image

    h, w = _size_hw(size)
    if resize == "stretch":
        return img.resize((w, h), Image.BILINEAR) if img.size != (w, h) else img
    if resize != "shorter_crop":
        raise ValueError(f"resize must be 'shorter_crop' or 'stretch', got {resize!r}")
    iw, ih = img.size
    s = max(h * 256.0 / 224.0 / ih, w * 256.0 / 224.0 / iw)
    nw, nh = max(w, int(round(iw * s))), max(h, int(round(ih * s)))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    return img.crop((left, top, left + w, top + h))


@dataclass
class Augment:
    """Random training augmentation, applied to the PIL image with a numpy Generator (reproducible per seed).

    hflip: mirror left-right with probability 0.5. random_resized_crop: (scale_min, scale_max) area fraction of
    a random crop (aspect ratio log-uniform in [3/4, 4/3]) that is resized straight to the output size (it replaces
    the deterministic resize), or None. brightness / contrast: strength b; a factor is drawn uniformly from
    [1-b, 1+b] (0 disables; PIL ImageEnhance).
    """

    hflip: bool = False
    random_resized_crop: tuple = None
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self):
        if self.random_resized_crop is not None:
            lo, hi = (float(v) for v in self.random_resized_crop)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"random_resized_crop needs 0 < scale_min <= scale_max <= 1, got ({lo}, {hi})")
            self.random_resized_crop = (lo, hi)
        for name in ("brightness", "contrast"):
            v = float(getattr(self, name))
            if not 0 <= v < 1:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
            setattr(self, name, v)

    @classmethod
    def from_dict(cls, d):
        """From a recipe dict (keys: hflip, random_resized_crop, brightness, contrast); None -> no augmentation."""
        if not d:
            return None
        unknown = set(d) - {"hflip", "random_resized_crop", "brightness", "contrast"}
        if unknown:
            raise ValueError(f"unknown augmentation key(s): {sorted(unknown)}")
        return cls(**d)

    @property
    def enabled(self):
        return bool(self.hflip or self.random_resized_crop or self.brightness or self.contrast)

    def crop(self, img, size, rng):
        """Random resized crop of a PIL image to size (h, w)."""
        from PIL import Image

        h, w = _size_hw(size)
        iw, ih = img.size
        lo, hi = self.random_resized_crop
        area = iw * ih
        for _ in range(10):
            target = area * rng.uniform(lo, hi)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw = int(round(math.sqrt(target * ratio)))
            ch = int(round(math.sqrt(target / ratio)))
            if 0 < cw <= iw and 0 < ch <= ih:
                x0 = int(rng.integers(0, iw - cw + 1))
                y0 = int(rng.integers(0, ih - ch + 1))
                break
        else:  # fall back to the largest centred crop
            cw, ch = iw, ih
            x0 = y0 = 0
        return img.resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))

    def photometric(self, img, rng):
        """Flip, brightness and contrast on a PIL image (draws from rng in a fixed order)."""
        from PIL import ImageEnhance, ImageOps

        if self.hflip and rng.random() < 0.5:
            img = ImageOps.mirror(img)
        if self.brightness:
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - self.brightness, 1 + self.brightness))
        if self.contrast:
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - self.contrast, 1 + self.contrast))
        return img


def _per_channel(v, name):
    a = np.asarray(v, dtype=np.float32)
    if a.ndim > 1 or a.size not in (1, 3):
        raise ValueError(f"{name} must be a number or 3 numbers (one per channel), got {v!r}")
    return a.reshape(-1) if a.size == 3 else a.reshape(())


@dataclass
class Preprocess:
    """How images become model input (see the module docstring). Build from a recipe/model hint with from_dict."""

    size: tuple = (224, 224)
    resize: str = "shorter_crop"
    mean: object = None
    std: object = None
    scale: object = 1.0 / 127.5
    offset: object = -1.0
    channel_order: str = "RGB"

    def __post_init__(self):
        self.size = _size_hw(self.size)
        if self.resize not in ("shorter_crop", "stretch"):
            raise ValueError(f"resize must be 'shorter_crop' or 'stretch', got {self.resize!r}")
        self.channel_order = str(self.channel_order).upper()
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither (then scale/offset are used)")
        if self.mean is not None:
            self._mul = 1.0 / (255.0 * _per_channel(self.std, "std"))
            self._add = -_per_channel(self.mean, "mean") / _per_channel(self.std, "std")
        else:
            self._mul = _per_channel(self.scale, "scale")
            self._add = _per_channel(self.offset, "offset")

    @classmethod
    def from_dict(cls, d):
        keys = {"size", "resize", "mean", "std", "scale", "offset", "channel_order"}
        unknown = set(d or {}) - keys
        if unknown:
            raise ValueError(f"unknown preprocessing key(s): {sorted(unknown)}; known: {sorted(keys)}")
        return cls(**(d or {}))

    def to_dict(self):
        out = {"size": list(self.size), "resize": self.resize, "channel_order": self.channel_order}
        if self.mean is not None:
            out.update(mean=np.asarray(self.mean).tolist(), std=np.asarray(self.std).tolist())
        else:
            out.update(scale=np.asarray(self.scale).tolist(), offset=np.asarray(self.offset).tolist())
        return out

    def __call__(self, path, augment=None, rng=None):
        """Decode + preprocess one image -> float32 (h, w, 3). Raises BadImage."""
        img = open_image(path)
        if augment is not None and augment.enabled:
            if rng is None:
                rng = np.random.default_rng()
            img = augment.crop(img, self.size, rng) if augment.random_resized_crop else \
                resize_image(img, self.size, self.resize)
            img = augment.photometric(img, rng)
        else:
            img = resize_image(img, self.size, self.resize)
        x = np.asarray(img, dtype=np.float32)
        if self.channel_order == "BGR":
            x = x[..., ::-1]
        x = x * self._mul + self._add
        return np.ascontiguousarray(x, dtype=np.float32)


def load_image(path, size=(224, 224), resize="shorter_crop", mean=None, std=None, scale=1.0 / 127.5, offset=-1.0,
               channel_order="RGB", augment=None, rng=None):
    """Decode and preprocess one image -> float32 (h, w, 3) array; ``size`` is (height, width) or an int.
    Raises BadImage (a DataError) when the file cannot be decoded. See the module docstring for the steps."""
    return Preprocess(size, resize, mean, std, scale, offset, channel_order)(path, augment, rng)


# --------------------------------------------------------------------------------------------------------------
# Batched loading in background threads

_END = object()


class ImageLoader:
    """Batches of preprocessed images, decoded ahead of time by background threads.

    ``for x, y, paths in loader:`` runs one epoch: x float32 (B, h, w, 3), y int32 (B,), paths list of str.
    Every batch holds ``batch_size`` images except possibly the last (dropped when ``drop_last``). With
    ``shuffle`` the order of epoch e is a permutation seeded by (seed, e); each ``iter()`` starts the next epoch
    (or call ``epoch(e)`` to pick one, e.g. when resuming). Augmentation draws from a generator seeded by
    (seed, epoch, position), so results are reproducible however the threads interleave.

    Unreadable images are skipped (the batch is filled from the next images), reported once each through
    ``on_bad_image(path, reason)`` when given, else a BadImageWarning, and listed in ``bad_images``
    [(path, reason)]; later epochs skip them silently. Stopping early (``break``, ``close()``, an exception such as
    KeyboardInterrupt in the loop) stops and joins the threads; ``loader.close()`` stops every open epoch.
    ``num_workers=0`` decodes in the calling thread.
    """

    def __init__(self, items, batch_size=32, shuffle=False, seed=0, drop_last=False, preprocess=None, augment=None,
                 num_workers=2, prefetch=2, on_bad_image=None, **preprocess_kwargs):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.items = [(os.fspath(p), int(y)) for p, y in items]
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        if preprocess is None:
            preprocess = Preprocess(**preprocess_kwargs)
        elif preprocess_kwargs:
            raise TypeError("pass either preprocess= or preprocessing keywords, not both")
        self.preprocess = preprocess
        self.augment = augment if (augment is not None and augment.enabled) else None
        self.num_workers = max(0, int(num_workers))
        self.prefetch = max(1, int(prefetch))
        self.on_bad_image = on_bad_image
        self.bad_images = []
        self._bad = set()
        self._epoch = 0
        self._open = []  # stop events of running epochs

    def __len__(self):
        n = len(self.items) - len(self._bad)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_bad(self):
        return len(self.bad_images)

    def order(self, epoch):
        """Item indices in the order epoch ``epoch`` visits them."""
        n = len(self.items)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(n)

    def __iter__(self):
        e = self._epoch
        self._epoch += 1
        return self.epoch(e)

    def epoch(self, epoch):
        """A generator over the batches of epoch ``epoch`` (sets the next iter() to epoch + 1)."""
        self._epoch = int(epoch) + 1
        return self._run(int(epoch))

    def close(self):
        """Stop every running epoch (their generators end)."""
        for ev in list(self._open):
            ev.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _record_bad(self, bad):
        for path, reason in bad:
            if path in self._bad:
                continue
            self._bad.add(path)
            self.bad_images.append((path, reason))
            if self.on_bad_image is not None:
                self.on_bad_image(path, reason)
            else:
                warnings.warn(f"skipping unreadable image {path}: {reason}", BadImageWarning, stacklevel=3)

    def _decode(self, epoch, pos, idx):
        path, _ = self.items[idx]
        rng = np.random.default_rng([self.seed, epoch, pos]) if self.augment is not None else None
        try:
            return self.preprocess(path, self.augment, rng), None
        except BadImage as e:
            return None, e.reason

    def _batches(self, epoch, stop):
        """Yield (x, y, paths, new_bad) in order, decoding with a pool; stops soon after ``stop`` is set."""
        from concurrent.futures import ThreadPoolExecutor

        skip = set(self._bad)
        todo = [(pos, int(i)) for pos, i in enumerate(self.order(epoch)) if self.items[i][0] not in skip]
        h, w = self.preprocess.size
        bs = self.batch_size
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="tcl-loader-decode") \
            if self.num_workers > 0 else None
        window = max(2 * self.num_workers, bs)
        pending = []  # futures (or results) in visiting order
        nxt = 0
        xs, ys, ps, bad = [], [], [], []
        try:
            while not stop.is_set():
                while nxt < len(todo) and len(pending) < window:
                    pos, i = todo[nxt]
                    nxt += 1
                    pending.append((i, pool.submit(self._decode, epoch, pos, i) if pool else (pos, i)))
                if not pending:
                    break
                i, fut = pending.pop(0)
                x, reason = fut.result() if pool else self._decode(epoch, *fut)
                path, label = self.items[i]
                if x is None:
                    bad.append((path, reason))
                    continue
                xs.append(x)
                ys.append(label)
                ps.append(path)
                if len(xs) == bs:
                    yield np.stack(xs), np.asarray(ys, np.int32), ps, bad
                    xs, ys, ps, bad = [], [], [], []
            if not stop.is_set():
                if xs and not self.drop_last:
                    yield np.stack(xs), np.asarray(ys, np.int32), ps, bad
                elif bad:
                    yield None, None, None, bad
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, epoch):
        stop = threading.Event()
        self._open.append(stop)
        try:
            if self.num_workers == 0:
                for x, y, p, bad in self._batches(epoch, stop):
                    self._record_bad(bad)
                    if x is not None:
                        yield x, y, p
                return
            q = queue.Queue(maxsize=self.prefetch)
            gen = self._batches(epoch, stop)
            t = threading.Thread(target=_produce, args=(gen, q, stop), name="tcl-loader", daemon=True)
            t.start()
            try:
                while True:
                    try:
                        got = q.get(timeout=0.1)
                    except queue.Empty:
                        if stop.is_set():
                            return  # close() from elsewhere
                        continue
                    if got is _END:
                        return
                    if isinstance(got, BaseException):
                        raise got
                    x, y, p, bad = got
                    self._record_bad(bad)
                    if x is not None:
                        yield x, y, p
            finally:
                stop.set()
                while t.is_alive():  # unblock a producer waiting on a full queue, then join it
                    try:
                        while True:
                            q.get_nowait()
                    except queue.Empty:
                        pass
                    t.join(timeout=0.05)
        finally:
            stop.set()
            if stop in self._open:
                self._open.remove(stop)


def _produce(gen, q, stop):
    """Producer thread: move batches from ``gen`` into ``q`` until done or stopped; errors go to the consumer."""
    try:
        for item in gen:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                break
        item = _END
    except BaseException as e:  # surfaced in the consumer's thread
        item = e
    finally:
        gen.close()
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return
        except queue.Full:
            continue
