"""`tcl evaluate` and `tcl predict`: a model (file or run directory) on images, with the same report files as a
fine-tuning run."""
import os
import time

import numpy as np

from .data import summarize_bad
from .errors import DataError, ModelError, TclError


def num_outputs(graph):
    """Number of classes the graph's output has (None when shapes cannot be inferred, e.g. a dynamic input)."""
    from .ops.shapes import infer_shapes

    try:
        return int(np.prod(infer_shapes(graph)[graph.outputs[0]]))
    except Exception:  # noqa: BLE001 - unknown sizes: the first batch's output is checked instead
        return None


def _labels_for(graph, labels_file=None):
    """Class names in output order: the --labels file (one per line), else the model's own. A names list whose
    length differs from the model's outputs would label every prediction wrongly: refused."""
    if labels_file:
        if not os.path.isfile(labels_file):
            raise DataError(f"The labels file '{labels_file}' does not exist.", "Check the path.")
        try:
            with open(labels_file, encoding="utf-8") as f:
                names = [ln.strip() for ln in f if ln.strip()]
        except UnicodeDecodeError as e:
            raise DataError(f"The labels file '{labels_file}' is not UTF-8 text ({e.reason}).",
                            "Save it as UTF-8, one class name per line.") from None
        where = f"the labels file '{labels_file}'"
    else:
        names = list(graph.meta.get("classes") or [])
        where = "the model's class list"
    k = num_outputs(graph)
    if names and k is not None and len(names) != k:
        raise DataError(f"{where[0].upper() + where[1:]} has {len(names)} class names, but the model has {k} outputs, "
                        "so every prediction would get the wrong name.",
                        "Give one class name per output, in output order (ImageNet label files with a 'background' "
                        "first line have 1001 lines for 1000 outputs: drop that line).")
    return names


def image_paths(args):
    """The images named on the command line: files as given, folders replaced by the images inside them (sorted,
    recursively). A path that does not exist, or a folder without images, is an error before any work starts."""
    from .data import IMAGE_EXTENSIONS, _image_files

    out = []
    for path in args:
        if os.path.isdir(path):
            found = _image_files(path, IMAGE_EXTENSIONS)
            if not found:
                raise DataError(f"The folder '{path}' holds no images ({', '.join(IMAGE_EXTENSIONS)}).",
                                "Name image files or folders that contain them.")
            out.extend(found)
        elif os.path.lexists(path):
            out.append(path)
        else:
            raise DataError(f"The image '{path}' does not exist.", "Check the path.")
    return out


def _model_preprocess(graph, overrides=None):
    from .session import resolve_preprocess

    return resolve_preprocess(overrides or {}, graph)


class Predictor:
    """Inference on a whole graph (frozen Conv+BN folded) with the selected backend."""

    def __init__(self, graph, device=None):
        from .backends import make_backend
        from .executor import Executor
        from .plan import fold_frozen

        self.graph = fold_frozen(graph, set(), engine=True)
        self.be = make_backend(device)
        self.ex = Executor(self.graph, self.be)
        self.input = next(iter(self.graph.inputs))
        self.output = self.graph.outputs[0]

    def probs(self, x):
        out = self.ex.forward({self.input: x})[self.output]
        z = self.be.to_host(out).astype(np.float64).reshape(len(x), -1)
        self.be.release(out)
        # Models that end in softmax already give probabilities; logits get one here.
        if np.all(z >= 0) and np.allclose(z.sum(1), 1.0, atol=1e-3):
            return z
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def device_name(self):
        return self.be.rt.info.name if hasattr(self.be, "rt") else "numpy"


def input_overrides(recipe=None, **flags):
    """A recipe-style `input` section from --recipe R and/or the --mean/--std/--scale/--offset/--resize/
    --channel-order flags (flags win), validated like a recipe. None when nothing was given (the model's own)."""
    from .recipe import SCHEMA, _validate, load_recipe

    section = dict(load_recipe(recipe)["input"]) if recipe else {}
    given = {k: v for k, v in flags.items() if v is not None}
    if not section and not given:
        return None
    if given.keys() & {"mean", "std"}:
        section.pop("scale", None)
        section.pop("offset", None)
    if given.keys() & {"scale", "offset"}:
        section.pop("mean", None)
        section.pop("std", None)
    section.update(given)
    return _validate({"input": {k: v for k, v in section.items() if v is not None}},
                     {"input": SCHEMA["input"]})["input"]


def predict(model, images, labels=None, top=5, device=None, preprocess=None, **load_opts):
    """Top-k classes per image: [{"image", "top": [{"index", "label", "probability"}]}], or {"image", "error"} for
    an image that cannot be read (the CLI then exits non-zero). Folders in `images` stand for the images inside.
    `preprocess`: a recipe-style `input` section (see input_overrides), else the model's own preprocessing."""
    from .data import BadImage
    from .runfile import load_any_model

    images = image_paths(images)
    graph = load_any_model(model, **load_opts)
    names = _labels_for(graph, labels)
    pre = _model_preprocess(graph, preprocess)
    pr = Predictor(graph, device)
    out = []
    bar = _bar(len(images), "predicting", quiet=len(images) < 2)
    try:
        for path in images:
            bar.update(1)
            try:
                x = pre(path)[None]
            except BadImage as e:
                out.append({"image": path, "error": e.reason})
                continue
            p = pr.probs(x)[0]
            _check_width(p, names)
            out.append({"image": path, "top": top_k(p, names, top)})
    finally:
        bar.close()
    return out


def _bar(total, desc, quiet=False):
    """A progress bar on a terminal only (the rule of `tcl finetune`: piped into a log it would write every
    redraw)."""
    from .train import _bar as bar

    return bar(total, desc, quiet)


def top_k(p, names, k):
    """[{"index", "label", "probability"}] of the k most probable classes of one probability vector."""
    return [{"index": int(i), "label": names[i] if i < len(names) else str(int(i)), "probability": float(p[i])}
            for i in np.argsort(-p)[:k]]


def _check_width(p, names):
    """The model's real output width against the class names (when shapes could not be inferred up front)."""
    if names and p.shape[-1] != len(names):
        raise DataError(f"The model gives {p.shape[-1]} outputs but {len(names)} class names were given, so every "
                        "prediction would get the wrong name.",
                        "Give one class name per output, in output order (--labels FILE).")


def evaluate(model, data=None, recipe=None, split=None, device=None, labels=None, out_dir=None, batch_size=32,
             preprocess=None, **load_opts):
    """Evaluate a run directory (its own data split) or a model on a data folder; writes the report files."""
    from .data import ImageLoader, load_splits, recipe_splits
    from .recipe import load_recipe
    from .report import compute_metrics, write_report
    from .runfile import load_any_model

    is_run = os.path.isdir(model) and os.path.exists(os.path.join(model, "model.json"))
    rec = None
    if recipe:
        rec = load_recipe(recipe)
    elif is_run and os.path.exists(os.path.join(model, "recipe.resolved.yaml")):
        rec = load_recipe(os.path.join(model, "recipe.resolved.yaml"))
    graph = load_any_model(model, **load_opts)
    classes = _labels_for(graph, labels)
    if rec is not None:
        # The recipe's split (fractions, seed, extensions), on --data when given.
        splits = recipe_splits(rec["data"], root=data, min_classes=1)
        data = data or rec["data"]["root"]
        split = split or "test"
    elif data is not None:
        splits = load_splits(data, val=0.0, test=0.0, min_classes=1)
        split = split or "all"
    else:
        raise TclError("No data to evaluate on.", "Pass --data DIR (one sub-folder per class), or a run directory.")
    data_classes = list(splits.classes)
    if not classes:
        raise ModelError(
            f"The model '{model}' does not say which class each output is.",
            "Pass --labels FILE (one class name per line, in output order), or evaluate a tcl run directory.")
    unknown = [c for c in data_classes if c not in classes]
    if unknown:
        raise DataError(
            f"The data folder '{data}' has classes the model does not know: {', '.join(unknown[:10])}"
            f"{' ...' if len(unknown) > 10 else ''} (the model knows {len(classes)} classes: "
            f"{', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''}).",
            "Remove or rename those class folders, or pass --labels with the model's class names.")
    remap = np.array([classes.index(c) for c in data_classes])
    if split == "all":
        items = splits["train"] + splits["val"] + splits["test"]
    else:
        if split not in ("train", "val", "test"):
            raise TclError(f"Unknown split '{split}'.", "Use test, val, train or all.")
        items = splits[split]
    if not items:
        raise DataError(f"The {split} split of '{data}' has no images.", "Choose another --split, e.g. all.")
    items = [(p, int(remap[y])) for p, y in items]
    pre = _model_preprocess(graph, preprocess or (rec["input"] if rec else None))
    pr = Predictor(graph, device)
    bad = []
    loader = ImageLoader(items, batch_size=batch_size, preprocess=pre, on_bad_image=lambda p, r: bad.append((p, r)))
    probs, ys, paths = [], [], []
    t0 = time.perf_counter()
    bar = _bar(len(items), f"evaluating ({split})")
    try:
        for x, y, p in loader:
            probs.append(pr.probs(x))
            _check_width(probs[-1], classes)
            ys.append(y)
            paths.extend(p)
            bar.update(len(y))
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    if bad:
        import warnings

        from .data import BadImageWarning

        shown = summarize_bad(bad)
        warnings.warn(f"{len(bad)} unreadable image(s) skipped, not counted in the accuracy: {shown}.",
                      BadImageWarning, stacklevel=2)
    probs = np.concatenate(probs) if probs else np.zeros((0, len(classes)))
    ys = np.concatenate(ys).astype(np.int64) if ys else np.zeros(0, np.int64)
    metrics = compute_metrics(ys, np.argmax(probs, 1), probs, classes, paths=paths)
    meta = {"model": os.path.abspath(model), "data": os.path.abspath(data), "split": split,
            "device": pr.device_name(), "images_per_sec": round(len(ys) / dt, 1) if dt > 0 else None,
            "bad_images": [{"path": p, "reason": r} for p, r in bad]}
    out_dir = out_dir or (model if is_run else None)
    if out_dir:
        history = read_history(os.path.join(model, "metrics.jsonl")) if is_run else None
        write_report(out_dir, metrics, meta, history=history)
    return metrics, meta


def read_history(path):
    """The epochs of a run's metrics.jsonl for the training curves; a damaged log costs the curves (with a note),
    not the evaluation."""
    import json
    import warnings

    from .errors import TclNote

    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            history = [json.loads(ln) for ln in f if ln.strip()]
        if all(isinstance(h, dict) and "epoch" in h for h in history):
            return history
    except (ValueError, UnicodeDecodeError):
        pass
    warnings.warn(f"'{path}' is damaged; the report has no training curves.", TclNote, stacklevel=2)
    return None


def run_items(run_dir, split):
    """[(path, label)] of a run's split, as the run made it (its resolved recipe's data section)."""
    from .data import recipe_splits
    from .recipe import load_recipe

    splits = recipe_splits(load_recipe(os.path.join(run_dir, "recipe.resolved.yaml"))["data"])
    return splits[split]


def run_eval_items(run_dir, split="test"):
    """[(path, label)] a run is evaluated on: its `split`, else its validation split, else its training split."""
    from .data import recipe_splits
    from .recipe import load_recipe

    splits = recipe_splits(load_recipe(os.path.join(run_dir, "recipe.resolved.yaml"))["data"])
    return splits[split] or splits["val"] or splits["train"]


def evaluate_graph_on_run(run_dir, graph, device=None, split="test"):
    """Accuracy of `graph` on a run's own split (used to measure what int8 quantization changes)."""
    from .data import ImageLoader

    items = run_eval_items(run_dir, split)
    pr = Predictor(graph, device)
    pre = _model_preprocess(graph)
    correct = total = 0
    for x, y, _ in ImageLoader(items, batch_size=32, preprocess=pre, on_bad_image=lambda p, r: None):
        correct += int(np.sum(np.argmax(pr.probs(x), 1) == y))
        total += len(y)
    return correct / max(total, 1)
