"""`tcl evaluate` and `tcl predict`: a model (file or run directory) on images, with the same report files as a
fine-tuning run."""
import os
import time

import numpy as np

from .errors import DataError, ModelError, TclError


def _labels_for(graph, labels_file=None):
    if labels_file:
        with open(labels_file, encoding="utf-8") as f:
            return [ln.strip() for ln in f if ln.strip()]
    return list(graph.meta.get("classes") or [])


def _model_preprocess(graph, overrides=None):
    from .train import resolve_preprocess

    return resolve_preprocess(overrides or {}, graph)


class Predictor:
    """Inference on a whole graph (frozen Conv+BN folded) with the selected backend."""

    def __init__(self, graph, device=None):
        from .backends import make_backend
        from .executor import Executor
        from .plan import fold_frozen

        self.graph = fold_frozen(graph, set())
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


def predict(model, images, labels=None, top=5, device=None, **load_opts):
    """Top-k classes per image: [{"image", "top": [{"index", "label", "probability"}]}]."""
    from .data import BadImage
    from .runfile import load_any_model

    graph = load_any_model(model, **load_opts)
    names = _labels_for(graph, labels)
    pre = _model_preprocess(graph)
    pr = Predictor(graph, device)
    out = []
    for path in images:
        if not os.path.exists(path):
            raise DataError(f"The image '{path}' does not exist.", "Check the path.")
        try:
            x = pre(path)[None]
        except BadImage as e:
            out.append({"image": path, "error": e.reason})
            continue
        p = pr.probs(x)[0]
        idx = np.argsort(-p)[:top]
        out.append({"image": path, "top": [{"index": int(i), "label": names[i] if i < len(names) else str(int(i)),
                                            "probability": float(p[i])} for i in idx]})
    return out


def evaluate(model, data=None, recipe=None, split=None, device=None, labels=None, out_dir=None, batch_size=32,
             **load_opts):
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
    pre = _model_preprocess(graph, rec["input"] if rec else None)
    pr = Predictor(graph, device)
    bad = []
    loader = ImageLoader(items, batch_size=batch_size, preprocess=pre, on_bad_image=lambda p, r: bad.append((p, r)))
    probs, ys, paths = [], [], []
    t0 = time.perf_counter()
    for x, y, p in loader:
        probs.append(pr.probs(x))
        ys.append(y)
        paths.extend(p)
    dt = time.perf_counter() - t0
    probs = np.concatenate(probs) if probs else np.zeros((0, len(classes)))
    ys = np.concatenate(ys).astype(np.int64) if ys else np.zeros(0, np.int64)
    metrics = compute_metrics(ys, np.argmax(probs, 1), probs, classes, paths=paths)
    meta = {"model": os.path.abspath(model), "data": os.path.abspath(data), "split": split,
            "device": pr.device_name(), "images_per_sec": round(len(ys) / dt, 1) if dt > 0 else None,
            "bad_images": [{"path": p, "reason": r} for p, r in bad]}
    out_dir = out_dir or (model if is_run else None)
    if out_dir:
        history = None
        mpath = os.path.join(model, "metrics.jsonl") if is_run else None
        if mpath and os.path.exists(mpath):
            import json

            with open(mpath) as f:
                history = [json.loads(ln) for ln in f if ln.strip()]
        write_report(out_dir, metrics, meta, history=history)
    return metrics, meta


def evaluate_graph_on_run(run_dir, graph, device=None, split="test"):
    """Accuracy of `graph` on a run's own split (used to measure what int8 quantization changes)."""
    from .data import ImageLoader, recipe_splits
    from .recipe import load_recipe

    splits = recipe_splits(load_recipe(os.path.join(run_dir, "recipe.resolved.yaml"))["data"])
    items = splits[split] or splits["val"] or splits["train"]
    pr = Predictor(graph, device)
    pre = _model_preprocess(graph)
    correct = total = 0
    for x, y, _ in ImageLoader(items, batch_size=32, preprocess=pre, on_bad_image=lambda p, r: None):
        correct += int(np.sum(np.argmax(pr.probs(x), 1) == y))
        total += len(y)
    return correct / max(total, 1)
