"""Evaluation metrics and reports: report.json, report.md, confusion_matrix.png, training_curves.png.

report.json (schema_version 2)
==============================
A JSON object (strict JSON: no NaN/Infinity; numbers that are not finite are written as null). `tcl evaluate --json`
and `tcl finetune --json` print the same metric fields (their ``metrics`` object) and ``schema_version``. Fields:

- ``schema_version`` (int): 2. Fields are only ever added within a version; a change or removal bumps it.
  Version 2 (a model with many classes evaluated on a few images wrote megabytes of zeros in version 1): with
  more than 100 classes (``DENSE_MAX_CLASSES``), ``per_class`` lists only the classes that occur in the data or
  the predictions and ``confusion_matrix`` is null; ``confusion`` and ``omitted_classes`` are new. With 100
  classes or fewer every version-1 field is as it was.
- ``generated_at`` (str): UTC time the report was written, ISO 8601 (``2024-05-01T12:00:00Z``).
- ``tcl_version`` (str): the TransferCL version that wrote it.
- ``meta`` (object): what was evaluated, as given by the caller; usually ``model`` (path or name), ``device``,
  ``split`` (train/val/test or a folder), ``images_per_sec`` (inference throughput), ``batch_size``, ``run_dir``,
  ``bad_images`` (list of {"path", "reason"}: unreadable images that were skipped).
- ``num_samples`` (int): N, images evaluated (unreadable images are not counted).
- ``num_classes`` (int): K, classes of the model.
- ``classes`` (list of str): class names; index i is label i.
- ``accuracy`` (float in [0, 1]): fraction of images whose predicted class equals the true class (null when
  N = 0, as are ``loss`` and the ``top_k_accuracy`` values).
- ``top_k_accuracy`` (object): {"k": fraction of images whose true class is among the k most probable}, for the
  requested k <= K only (by default k = 1 and 5). Ties in probability rank the lower class index first.
- ``loss`` (float): mean cross-entropy, mean over images of -ln(p_true), with p_true clipped below at 1e-12.
- ``per_class`` (list, one object per class, in class order; with more than 100 classes only those with
  ``support`` > 0 or ``predicted`` > 0, whose ``index`` says which): ``class`` (name), ``index`` (label), ``precision``
  = TP / (TP + FP), ``recall`` = TP / (TP + FN), ``f1`` = 2 * precision * recall / (precision + recall),
  ``support`` (true images of the class, TP + FN), ``predicted`` (images predicted as the class, TP + FP).
  Zero division: a ratio whose denominator is 0 is defined as 0 (precision of a never-predicted class, recall of
  a class absent from the data, F1 when precision + recall = 0).
- ``macro_avg`` (object): ``precision``, ``recall``, ``f1`` averaged with equal weight over the classes that occur
  in the data or the predictions (support > 0 or predicted > 0; classes in neither are left out);
  ``num_classes``: how many classes that average covers.
- ``weighted_avg`` (object): ``precision``, ``recall``, ``f1`` averaged with weights = support; ``support`` = N.
- ``omitted_classes`` (int): classes left out of ``per_class`` (0 with 100 classes or fewer); each of them has
  support 0, predicted 0 and every ratio 0.
- ``confusion_matrix`` (K x K list of int, or null with more than 100 classes): row = true class, column =
  predicted class, value = image count.
- ``confusion`` (list of [true index, predicted index, count]): the non-zero cells of the confusion matrix, in row
  order (true class, then predicted class), for any K.
- ``misclassified`` (list): every wrongly predicted image, most confident first: ``index`` (position in the
  evaluated list), ``path`` (image file, or null), ``true`` and ``predicted`` (class names), ``confidence``
  (probability of the predicted class), ``true_confidence`` (probability given to the true class).
- ``history`` (list or null): the training log records (metrics.jsonl lines) the curves were drawn from.
- ``files`` (object): names, relative to the report's folder, of ``markdown`` (report.md), ``confusion_matrix``
  (confusion_matrix.png) and ``training_curves`` (training_curves.png, or null without a history).

training_curves.png reads these keys from each history record: ``epoch`` (x axis; the record's position when
absent); train loss ``train_loss`` or ``loss``; validation loss ``val_loss``; train accuracy ``train_accuracy``,
``train_acc``, ``accuracy`` or ``acc``; validation accuracy ``val_accuracy`` or ``val_acc``; nested
``{"train": {"loss": ..}, "val": {"accuracy": ..}}`` works too. When some records carry ``"type"``,
``"event"`` or ``"kind"`` equal to ``"epoch"``, only those are used; the last record of an epoch wins.
"""
import datetime
import json
import math
import os
import re

import numpy as np

from .fsutil import atomic_path, jsonable, write_text

SCHEMA_VERSION = 2
LOSS_EPS = 1e-12
# Above this many classes report.json keeps the confusion matrix sparse (``confusion``) and ``per_class`` lists only
# the classes that occur: a 1000-class model evaluated on a few images wrote a 3 MB dense matrix of zeros.
DENSE_MAX_CLASSES = 100
# Classes drawn in confusion_matrix.png (and tabulated in report.md) at most: the ones that occur, most confused
# first. Beyond about 30 the cells are too small to read.
DRAW_MAX_CLASSES = 30


# --------------------------------------------------------------------------------------------------------------
# Metrics


def _ratio(a, b):
    return float(a) / float(b) if b else 0.0


def compute_metrics(y_true, y_pred, probs, classes, paths=None, top_k=(1, 5)):
    """Classification metrics as a JSON-ready dict (the fields of report.json listed in the module docstring,
    from ``num_samples`` to ``misclassified``).

    y_true: (N,) int labels. y_pred: (N,) int predictions, or None for argmax(probs). probs: (N, K) class
    probabilities (rows sum to 1; logits are rejected). classes: K names. paths: N image paths or None.
    top_k: the k values to report; those larger than K are skipped.
    """
    classes = [str(c) for c in classes]
    k_cls = len(classes)
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    n = y_true.shape[0]
    if n == 0 and probs.size == 0:
        probs = probs.reshape(0, k_cls)  # nothing readable to evaluate: metrics of an empty set
    if probs.shape != (n, k_cls):
        raise ValueError(f"probs must have shape (N={n}, K={k_cls}), got {probs.shape}")
    if n and (not np.all(np.isfinite(probs)) or probs.min() < -1e-6 or np.abs(probs.sum(1) - 1).max() > 1e-3):
        raise ValueError("probs must be class probabilities (finite, >= 0, rows summing to 1): pass the softmax "
                         "output, not logits")
    y_pred = probs.argmax(1) if y_pred is None else np.asarray(y_pred).astype(np.int64).reshape(-1)
    if y_pred.shape != (n,):
        raise ValueError(f"y_pred must have shape ({n},), got {y_pred.shape}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if n and (y.min() < 0 or y.max() >= k_cls):
            raise ValueError(f"{name} holds labels outside [0, {k_cls})")
    if paths is not None and len(paths) != n:
        raise ValueError(f"paths must have {n} entries, got {len(paths)}")

    cm = np.zeros((k_cls, k_cls), np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm)
    support = cm.sum(1)
    predicted = cm.sum(0)

    per_class = []
    for i, c in enumerate(classes):
        p = _ratio(tp[i], predicted[i])
        r = _ratio(tp[i], support[i])
        f = _ratio(2 * p * r, p + r)
        per_class.append({"class": c, "index": i, "precision": p, "recall": r, "f1": f,
                          "support": int(support[i]), "predicted": int(predicted[i])})
    present = [pc for pc in per_class if pc["support"] > 0 or pc["predicted"] > 0]
    macro = {m: _ratio(sum(pc[m] for pc in present), len(present)) for m in ("precision", "recall", "f1")}
    macro["num_classes"] = len(present)
    weighted = {m: _ratio(sum(pc[m] * pc["support"] for pc in per_class), n) for m in ("precision", "recall", "f1")}
    weighted["support"] = int(n)
    dense = k_cls <= DENSE_MAX_CLASSES
    rows_i, cols_j = np.nonzero(cm)  # row-major order
    sparse = [[int(i), int(j), int(cm[i, j])] for i, j in zip(rows_i, cols_j)]

    rank = np.argsort(-probs, axis=1, kind="stable")  # ties: lower class index first
    topk = {}
    for k in sorted(set(int(k) for k in top_k)):
        if 1 <= k <= k_cls:
            topk[str(k)] = float(np.mean(np.any(rank[:, :k] == y_true[:, None], axis=1))) if n else None

    p_true = probs[np.arange(n), y_true]
    loss = float(np.mean(-np.log(np.maximum(p_true, LOSS_EPS)))) if n else None

    wrong = np.nonzero(y_pred != y_true)[0]
    conf = probs[wrong, y_pred[wrong]]
    wrong = wrong[np.argsort(-conf, kind="stable")]
    mis = [{"index": int(i), "path": None if paths is None else str(paths[i]),
            "true": classes[y_true[i]], "predicted": classes[y_pred[i]],
            "confidence": float(probs[i, y_pred[i]]), "true_confidence": float(p_true[i])} for i in wrong]

    return {
        "num_samples": int(n),
        "num_classes": k_cls,
        "classes": classes,
        "accuracy": float(np.mean(y_pred == y_true)) if n else None,
        "top_k_accuracy": topk,
        "loss": loss,
        "per_class": per_class if dense else present,
        "omitted_classes": 0 if dense else k_cls - len(present),
        "macro_avg": macro,
        "weighted_avg": weighted,
        "confusion_matrix": cm.tolist() if dense else None,
        "confusion": sparse,
        "misclassified": mis,
    }


# --------------------------------------------------------------------------------------------------------------
# Terminal table


def format_table(metrics, max_rows=30):
    """A compact text table for the terminal: summary line, per-class precision/recall/F1/support, averages.
    Only classes that occur in the data or the predictions are listed (a 1000-class model on a few images would
    print 1000 rows of zeros); with more than ``max_rows`` of them only the lowest-F1 ones."""
    m = metrics
    head = [f"accuracy {_num(m['accuracy'])}"]
    for k, v in m.get("top_k_accuracy", {}).items():
        if k != "1":
            head.append(f"top-{k} {_num(v)}")
    head.append(f"loss {_num(m['loss'])}")
    head.append(f"({m['num_samples']} images, {m['num_classes']} classes)")
    rows = _present(m)
    notes = []
    omitted = m["num_classes"] - len(rows)
    if len(rows) > max_rows:
        notes.append(f"({max_rows} lowest-F1 of {len(rows)} classes shown)")
        rows = sorted(rows, key=lambda r: (r["f1"], r["index"]))[:max_rows]
    if omitted:
        notes.append(f"({omitted} class{'es' if omitted != 1 else ''} neither in the data nor predicted "
                     f"{'are' if omitted != 1 else 'is'} not listed)")
    names = [_clip(r["class"], 28) for r in rows]
    w = max([len(s) for s in names] + [len("weighted avg")])
    lines = ["  ".join(head)] + notes
    lines.append(f"{'class':<{w}}  {'precision':>9}  {'recall':>7}  {'f1':>7}  {'support':>7}")
    for s, r in zip(names, rows):
        lines.append(f"{s:<{w}}  {r['precision']:>9.4f}  {r['recall']:>7.4f}  {r['f1']:>7.4f}  {r['support']:>7d}")
    for label, a in (("macro avg", m["macro_avg"]), ("weighted avg", m["weighted_avg"])):
        lines.append(f"{label:<{w}}  {a['precision']:>9.4f}  {a['recall']:>7.4f}  {a['f1']:>7.4f}  "
                     f"{m['num_samples']:>7d}")
    return "\n".join(lines)


def _present(metrics):
    """The per-class rows of the classes that occur in the data or the predictions."""
    return [r for r in metrics["per_class"] if r["support"] > 0 or r["predicted"] > 0]


def confusion_cells(metrics):
    """The confusion matrix's non-zero cells [(true, predicted, count)], from ``confusion`` (schema 2) or the dense
    ``confusion_matrix`` (metrics written by version 1)."""
    if metrics.get("confusion") is not None:
        return [(int(i), int(j), int(c)) for i, j, c in metrics["confusion"]]
    cm = np.asarray(metrics.get("confusion_matrix") or [], np.int64)
    return [(int(i), int(j), int(cm[i, j])) for i, j in zip(*np.nonzero(cm))] if cm.size else []


def shown_classes(metrics, limit=DRAW_MAX_CLASSES):
    """(class indices, note) for drawing or tabulating the confusion matrix: every class when there are at most
    ``limit``; else the classes that occur in the data or the predictions, and when those are still more than
    ``limit``, the ``limit`` most confused ones (most misclassified images as the true or the predicted class, then
    most images), in class order. ``note`` says what was left out (None when nothing was)."""
    k = int(metrics["num_classes"])
    if k <= limit:
        return list(range(k)), None
    cells = confusion_cells(metrics)
    seen = np.zeros(k, np.int64)
    wrong = np.zeros(k, np.int64)
    for i, j, c in cells:
        seen[i] += c
        seen[j] += c
        if i != j:
            wrong[i] += c
            wrong[j] += c
    present = [i for i in range(k) if seen[i] > 0]
    if not present:
        return list(range(limit)), f"no images: the first {limit} of {k} classes"
    if len(present) <= limit:
        return present, f"{len(present)} of {k} classes: those in the data or predicted"
    top = sorted(present, key=lambda i: (-wrong[i], -seen[i], i))[:limit]
    return sorted(top), f"{limit} of {k} classes: the most confused of the {len(present)} in the data or predicted"


def _sub_matrix(metrics, idx):
    """The confusion matrix restricted to the classes ``idx`` (rows and columns), and each row's full total (its
    images, including those predicted as classes outside ``idx``)."""
    pos = {c: a for a, c in enumerate(idx)}
    cm = np.zeros((len(idx), len(idx)), np.int64)
    rows = np.zeros(len(idx), np.int64)
    for i, j, c in confusion_cells(metrics):
        if i in pos:
            rows[pos[i]] += c
            if j in pos:
                cm[pos[i], pos[j]] += c
    return cm, rows


def _num(v, fmt=".4f"):
    return "n/a" if v is None else format(v, fmt)


def _clip(s, n):
    s = str(s)
    return s if len(s) <= n else s[: n - 1] + "…"


# --------------------------------------------------------------------------------------------------------------
# Files


def _jsonable(v):
    """Strict JSON for report.json: non-finite floats become null."""
    return jsonable(v, finite=True)


_NUM_ARRAY = re.compile(r"\[\n\s+([-+0-9.eE,\s]+?)\n\s*\]")


def _dumps(obj):
    """json.dumps(indent=2) with arrays of plain numbers on one line (confusion-matrix rows stay readable).
    Safe: raw newlines never occur inside JSON strings, and the pattern admits no quotes."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)
    return _NUM_ARRAY.sub(lambda mt: "[" + ", ".join(x.strip() for x in mt.group(1).split(",")) + "]", text)


def write_report(out_dir, metrics, meta=None, history=None):
    """Write report.json, report.md, confusion_matrix.png and (with a history) training_curves.png into
    ``out_dir`` (created if needed), each atomically. Returns {"json", "markdown", "confusion_matrix",
    "training_curves"}: the written paths (training_curves None without a history)."""
    from . import __version__

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    meta = _jsonable(dict(meta or {}))
    hist = _jsonable(list(history)) if history else None
    curves = _history_series(hist) if hist else None
    has_curves = bool(curves and any(curves.values()))
    files = {"markdown": "report.md", "confusion_matrix": "confusion_matrix.png",
             "training_curves": "training_curves.png" if has_curves else None}
    doc = {"schema_version": SCHEMA_VERSION,
           "generated_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "tcl_version": __version__,
           "meta": meta}
    doc.update(_jsonable(metrics))
    doc["history"] = hist
    doc["files"] = files

    paths = {"json": os.path.join(out_dir, "report.json"), "markdown": os.path.join(out_dir, "report.md"),
             "confusion_matrix": os.path.join(out_dir, "confusion_matrix.png"), "training_curves": None}
    _save_png(confusion_matrix_image(metrics, title_extra=meta.get("split")), paths["confusion_matrix"])
    if has_curves:
        paths["training_curves"] = os.path.join(out_dir, "training_curves.png")
        _save_png(training_curves_image(curves), paths["training_curves"])
    write_text(paths["markdown"], _markdown(doc))
    write_text(paths["json"], _dumps(doc) + "\n")  # last: its presence means the report is complete
    return paths


def _save_png(img, path):
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", optimize=True)


def _md(s):
    return str(s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _fmt_meta(v, key=None):
    """A meta value for people: numbers rounded, the feature cache and the BatchNorm check in words, other
    mappings as `key: value` pairs (not raw JSON)."""
    if key == "cache" and isinstance(v, dict):
        return format_cache(v)
    if key == "cache" and v is None:
        return "off"
    if key == "batchnorm_gap" and v is None:
        return "none (no BatchNorm trains in batch mode)"
    if key == "batchnorm_gap" and isinstance(v, dict) and {"train_accuracy", "train_accuracy_inference_mode"} <= set(v):
        return (f"training accuracy {_num(v['train_accuracy'])} with batch statistics, "
                f"{_num(v['train_accuracy_inference_mode'])} in inference mode ({_num(v.get('points'), '.1f')} points)")
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt_meta(x)}" for k, x in v.items()) or "none"
    if isinstance(v, list):
        if all(not isinstance(x, (dict, list)) for x in v):
            return ", ".join(_fmt_meta(x) for x in v) or "none"
        return json.dumps(v)
    return str(v)


def format_cache(info):
    """The feature-cache record of a run (meta['cache']) as one sentence."""
    def sec(v):
        return "?" if not isinstance(v, (int, float)) else f"{v:.1f} s" if abs(v) < 100 else f"{v:.0f} s"

    hits, misses = info.get("hits", 0), info.get("misses", 0)
    parts = [f"{hits} image{'s' if hits != 1 else ''} read from the cache, {misses} computed "
             f"in {sec(info.get('compute_seconds'))}"]
    if isinstance(info.get("seconds_per_image"), (int, float)) and info["seconds_per_image"]:
        parts.append(f"the frozen layers take {1000 * info['seconds_per_image']:.1f} ms per image")
    saved = info.get("seconds_saved_over_epochs")
    if isinstance(saved, (int, float)):
        parts.append(f"about {sec(saved)} saved against recomputing the frozen layers every epoch" if saved >= 0
                     else "no time saved in a run this short")
    if info.get("dir"):
        parts.append(f"in {info['dir']}")
    return "; ".join(parts)


def _num_list(v, fmt=".4g"):
    v = np.asarray(v, np.float64).reshape(-1)
    if v.size == 1:
        return format(float(v[0]), fmt)
    return "[" + ", ".join(format(float(x), fmt) for x in v) + "]"


def format_preprocess(d):
    """A preprocessing record (Preprocess.to_dict(), a recipe's resolved `input`, a model's meta['preprocess']) in
    words, for the plan line and reports: '224x224 (shorter side to 256, centre crop), RGB, x * 0.007843 - 1
    (pixels [0, 255] -> [-1, 1])'."""
    if not isinstance(d, dict) or not d:
        return "the model's own"
    size = d.get("size")
    if isinstance(size, (int, float)):
        size = [size, size]
    parts = []
    if size:
        h, w = int(size[0]), int(size[1])
        resize = d.get("resize") or "shorter_crop"
        if resize == "shorter_crop":
            parts.append(f"{h}x{w} (shorter side to {round(min(h, w) * 256 / 224)}, centre crop)")
        else:
            parts.append(f"{h}x{w} (stretched)")
    parts.append(d.get("channel_order") or "RGB")
    if d.get("mean") is not None and d.get("std") is not None:
        parts.append(f"(x / 255 - mean {_num_list(d['mean'])}) / std {_num_list(d['std'])}")
    elif d.get("scale") is not None or d.get("offset") is not None:
        sc = np.asarray(1.0 if d.get("scale") is None else d["scale"], np.float64).reshape(-1)
        of = np.asarray(0.0 if d.get("offset") is None else d["offset"], np.float64).reshape(-1)
        if sc.size == 1 and of.size == 1 and float(sc[0]) == 1.0 and float(of[0]) == 0.0:
            text = "raw pixels [0, 255]"
        else:
            off = _num_list(of)
            text = f"x * {_num_list(sc)}" + ("" if off == "0" else
                                             f" - {off[1:]}" if off.startswith("-") else f" + {off}")
            if sc.size == 1 and of.size == 1:
                lo, hi = sorted((float(of[0]), 255 * float(sc[0]) + float(of[0])))
                text += f" (pixels [0, 255] -> [{lo:.4g}, {hi:.4g}])"
        parts.append(text)
    if d.get("in_model"):
        parts.append("rescaled inside the model")
    return ", ".join(parts)


def _markdown(doc):
    meta = doc["meta"]
    k_cls = doc["num_classes"]
    title = "Evaluation report" + (f": {meta['split']}" if meta.get("split") else "")
    out = [f"# {title}", ""]
    out += ["| | |", "|---|---|"]
    for key in ("model", "device", "split"):
        if key in meta:
            out.append(f"| {key} | {_md(_fmt_meta(meta[key], key))} |")
    out.append(f"| images | {doc['num_samples']} |")
    out.append(f"| classes | {k_cls} |")
    if meta.get("images_per_sec") is not None:
        out.append(f"| images/s | {_md(_fmt_meta(meta['images_per_sec']))} |")
    bad = meta.get("bad_images")
    for key, v in meta.items():
        if key in ("model", "device", "split", "images_per_sec"):
            continue
        if key == "bad_images" and isinstance(v, list):
            out.append(f"| unreadable images (skipped) | {len(v)} |")
        else:
            out.append(f"| {_md(key)} | {_md(_fmt_meta(v, key))} |")
    out.append(f"| generated | {doc['generated_at']} (tcl {doc['tcl_version']}) |")

    ma, wa = doc["macro_avg"], doc["weighted_avg"]
    out += ["", "## Summary", "", "| metric | value |", "|---|---:|", f"| accuracy | {_num(doc['accuracy'], '.2%')} |"]
    for k, v in doc["top_k_accuracy"].items():
        if k != "1":
            out.append(f"| top-{k} accuracy | {_num(v, '.2%')} |")
    out.append(f"| loss (cross-entropy) | {_num(doc['loss'])} |")
    out.append(f"| macro precision / recall / F1 | {ma['precision']:.4f} / {ma['recall']:.4f} / {ma['f1']:.4f} |")
    out.append(f"| weighted precision / recall / F1 | {wa['precision']:.4f} / {wa['recall']:.4f} / "
               f"{wa['f1']:.4f} |")

    rows = _present(doc)
    omitted = k_cls - len(rows)
    out += ["", "## Per class", ""]
    if omitted:
        out += [f"The {len(rows)} classes in the data or the predictions; the model's other {omitted} "
                + ("classes are neither (every figure 0) and are" if omitted != 1 else
                   "class is neither (every figure 0) and is") + " not listed.", ""]
    out += ["| class | precision | recall | F1 | support | predicted |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {_md(r['class'])} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | "
                   f"{r['support']} | {r['predicted']} |")
    out.append("")
    out.append("Precision, recall or F1 whose denominator is zero are reported as 0.")

    out += ["", "## Confusion matrix", "", "Rows: true class; columns: predicted class.", ""]
    idx, note = shown_classes(doc, limit=15)
    if idx:
        cm, _ = _sub_matrix(doc, idx)
        if note:
            out += [f"{note[0].upper()}{note[1:]}.", ""]
        names = [_md(_clip(doc["classes"][i], 16)) for i in idx]
        out.append("| true \\ predicted | " + " | ".join(names) + " |")
        out.append("|---|" + "---:|" * len(idx))
        for name, row in zip(names, cm.tolist()):
            out.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
        out.append("")
    out.append(f"![Confusion matrix]({doc['files']['confusion_matrix']})")
    if doc["files"].get("training_curves"):
        out += ["", "## Training curves", "", f"![Training curves]({doc['files']['training_curves']})"]

    mis = doc["misclassified"]
    shown = mis[:20]
    out += ["", f"## Most confident mistakes ({len(shown)} of {len(mis)})", ""]
    if mis:
        out += ["| # | image | true | predicted | confidence | p(true) |", "|---:|---|---|---|---:|---:|"]
        for j, e in enumerate(shown, 1):
            img = e["path"] if e["path"] is not None else f"#{e['index']}"
            out.append(f"| {j} | {_md(img)} | {_md(e['true'])} | {_md(e['predicted'])} | {e['confidence']:.3f} | "
                       f"{e['true_confidence']:.3f} |")
    elif doc["num_samples"]:
        out.append("None: every image was classified correctly.")
    else:
        out.append("No images were evaluated.")
    if isinstance(bad, list) and bad:
        out += ["", f"## Unreadable images ({len(bad)}, skipped)", "", "| image | reason |", "|---|---|"]
        for e in bad[:200]:
            p, r = (e.get("path"), e.get("reason")) if isinstance(e, dict) else (list(e) + [None, None])[:2]
            out.append(f"| {_md(p)} | {_md(r)} |")
        if len(bad) > 200:
            out.append(f"| ... {len(bad) - 200} more (see report.json) | |")
    out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------
# Drawing (Pillow only)

_FONTS = {}
_BLUES = [(247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107)]
_TRAIN_COLOR = (31, 119, 180)
_VAL_COLOR = (230, 97, 1)
_GRID = (225, 225, 225)
_AXIS = (60, 60, 60)


def _font(size):
    size = int(size)
    if size not in _FONTS:
        from PIL import ImageFont

        try:
            f = ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
        except (TypeError, AttributeError, OSError):
            try:
                f = ImageFont.truetype("DejaVuSans.ttf", size)
            except OSError:
                f = ImageFont.load_default()
        _FONTS[size] = f
    return _FONTS[size]


def _tsize(draw, text, font):
    b = draw.textbbox((0, 0), text, font=font)
    return b[2] - b[0], b[3] - b[1]


def _text(draw, xy, text, font, fill=_AXIS, anchor="la"):
    draw.text(xy, text, font=font, fill=fill, anchor=anchor)


def _text_rot90(img, xy, text, font, fill=_AXIS, anchor="center"):
    """Text rotated 90 degrees counter-clockwise (reads bottom to top); xy = centre, or the bottom-centre
    ('bottom') / top-centre ('top') of the rotated text."""
    from PIL import Image, ImageDraw

    tmp = ImageDraw.Draw(Image.new("L", (1, 1)))
    b = tmp.textbbox((0, 0), text, font=font)
    w, h = b[2] - b[0] + 2, b[3] - b[1] + 2
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).text((-b[0] + 1, -b[1] + 1), text, font=font, fill=255)
    mask = mask.rotate(90, expand=True)
    x, y = xy
    x0 = int(round(x - mask.width / 2))
    if anchor == "center":
        y0 = int(round(y - mask.height / 2))
    elif anchor == "top":
        y0 = int(round(y))
    else:
        y0 = int(round(y - mask.height))
    img.paste(Image.new("RGB", mask.size, fill), (x0, y0), mask)


def _cmap(t):
    t = min(1.0, max(0.0, float(t))) * (len(_BLUES) - 1)
    i = min(int(t), len(_BLUES) - 2)
    f = t - i
    a, b = _BLUES[i], _BLUES[i + 1]
    return tuple(int(round(a[j] + (b[j] - a[j]) * f)) for j in range(3))


def _cmap_array(t):
    t = np.clip(np.asarray(t, np.float64), 0, 1) * (len(_BLUES) - 1)
    i = np.minimum(t.astype(np.int64), len(_BLUES) - 2)
    f = (t - i)[..., None]
    stops = np.asarray(_BLUES, np.float64)
    return np.round(stops[i] + (stops[i + 1] - stops[i]) * f).astype(np.uint8)


def _ink_for(bg):
    lum = 0.2126 * bg[0] + 0.7152 * bg[1] + 0.0722 * bg[2]
    return (0, 0, 0) if lum > 140 else (255, 255, 255)


def confusion_matrix_image(metrics, title_extra=None):
    """The confusion matrix as a PIL image: cells coloured by the row share (recall per true class), cell counts
    (when cells are big enough), class names on both axes, axis titles and a colour bar."""
    from PIL import Image, ImageDraw

    idx, subset_note = shown_classes(metrics, DRAW_MAX_CLASSES)
    cm, row_total = _sub_matrix(metrics, idx)
    classes = [metrics["classes"][i] for i in idx]
    k = len(classes)
    # A row's share is of all the true class's images (also those predicted as classes not drawn).
    rows = row_total.reshape(-1, 1)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)

    cell = max(1, min(96, 640 // max(k, 1)))
    show_counts = cell >= 22
    show_names = cell >= 10
    name_font = _font(min(15, max(9, cell - 3)))
    count_font = _font(int(min(20, max(9, cell * 0.32))))
    pct_font = _font(int(min(14, max(8, cell * 0.2))))
    title_font, label_font, tick_font = _font(20), _font(16), _font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    if show_names:
        labels = [_clip(c, 24) for c in classes]
        step = 1
    else:  # too many classes for names: index ticks every `step` classes
        need = max(18, _tsize(probe, str(max(idx)), tick_font)[0] + 8)  # pixels between labels
        step = _nice_int_step(int(math.ceil(need / cell)))
        labels = [str(i) for i in idx]
    name_w = max(_tsize(probe, labels[i], name_font if show_names else tick_font)[0] for i in range(0, k, step))
    name_h = _tsize(probe, "Hg", name_font if show_names else tick_font)[1]
    x_rot = show_names and name_w > cell - 4  # rotate predicted-class names when they do not fit a cell

    mat = cell * k
    pad = 20
    left = pad + 24 + 8 + name_w + 8
    top = pad + 34 + (22 if subset_note else 0)
    bottom_labels = (name_w if x_rot else name_h) + 8
    bottom = bottom_labels + 8 + 24 + pad
    cbar_w, cbar_gap = 18, 24
    cbar_txt = _tsize(probe, "100%", tick_font)[0]
    right = cbar_gap + cbar_w + 6 + cbar_txt + 10 + 22 + pad
    acc = metrics.get("accuracy")
    title = "Confusion matrix" + (f" ({_clip(title_extra, 40)})" if title_extra else "")
    title += f" - {int(metrics.get('num_samples', row_total.sum()))} images" + (
        f", accuracy {acc:.1%}" if acc is not None else "")
    width = max(left + mat + right, _tsize(probe, title, title_font)[0] + 2 * pad, 460)
    height = top + mat + bottom
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    _text(d, (width // 2, pad), title, title_font, anchor="mt")
    if subset_note:
        _text(d, (width // 2, pad + 30), subset_note, label_font, anchor="mt")

    ox = (width - (left + mat + right)) // 2  # centre the figure under a wide title
    x0, y0 = left + ox, top
    colors = _cmap_array(share)  # (k, k, 3) uint8, scaled up to cells in one step (fast for 1000 classes)
    img.paste(Image.fromarray(colors, "RGB").resize((mat, mat), Image.NEAREST), (x0, y0))
    if show_counts:
        for i, j in np.ndindex(k, k):
            bg = tuple(int(v) for v in colors[i, j])
            cx, cy = x0 + j * cell + cell / 2, y0 + i * cell + cell / 2
            ink = _ink_for(bg)
            if cell >= 56 and rows[i, 0] > 0:
                _text(d, (cx, cy - 2), str(cm[i, j]), count_font, fill=ink, anchor="mb")
                _text(d, (cx, cy + 2), f"{share[i, j]:.0%}", pct_font, fill=ink, anchor="mt")
            else:
                _text(d, (cx, cy), str(cm[i, j]), count_font, fill=ink, anchor="mm")
    d.rectangle((x0 - 1, y0 - 1, x0 + mat, y0 + mat), outline=_AXIS)

    lf = name_font if show_names else tick_font
    for i in range(0, k, step):
        c = i * cell + cell / 2
        _text(d, (x0 - 8, y0 + c), labels[i], lf, anchor="rm")  # true class names (rows)
        if x_rot:
            _text_rot90(img, (x0 + c, y0 + mat + 8), labels[i], lf, anchor="top")
        else:
            _text(d, (x0 + c, y0 + mat + 8), labels[i], lf, anchor="mt")
        if not show_names:
            d.line((x0 - 4, y0 + c, x0 - 1, y0 + c), fill=_AXIS)
            d.line((x0 + c, y0 + mat, x0 + c, y0 + mat + 3), fill=_AXIS)
    suffix = "" if show_names else " (index)"
    _text(d, (x0 + mat / 2, y0 + mat + bottom_labels + 8), "Predicted class" + suffix, label_font, anchor="mt")
    _text_rot90(img, (ox + pad + 12, y0 + mat / 2), "True class" + suffix, label_font)

    # colour bar: share of the true class's images
    bx0 = x0 + mat + cbar_gap
    bh = max(mat, 120)
    by0 = y0 + (mat - bh) // 2 if bh <= mat else y0
    for yy in range(bh):
        d.line((bx0, by0 + yy, bx0 + cbar_w, by0 + yy), fill=_cmap(1 - yy / max(bh - 1, 1)))
    d.rectangle((bx0, by0, bx0 + cbar_w, by0 + bh), outline=_AXIS)
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        yy = by0 + (1 - t) * bh
        d.line((bx0 + cbar_w, yy, bx0 + cbar_w + 4, yy), fill=_AXIS)
        _text(d, (bx0 + cbar_w + 6, yy), f"{t:.0%}", tick_font, anchor="lm")
    _text_rot90(img, (bx0 + cbar_w + 6 + cbar_txt + 20, by0 + bh / 2), "share of true class (row %)", tick_font)
    return img


def _nice_int_step(s):
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is >= s."""
    p = 1
    while True:
        for m in (1, 2, 5):
            if m * p >= s:
                return m * p
        p *= 10


def _nice_ticks(lo, hi, n=5):
    """Round-number ticks covering [lo, hi]: (lo', hi', ticks, step)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi - lo < 1e-12:
        d = abs(lo) * 0.1 or 0.5
        lo, hi = lo - d, hi + d
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    start = math.floor(lo / step + 1e-9) * step
    end = math.ceil(hi / step - 1e-9) * step
    ticks = [start + i * step for i in range(int(round((end - start) / step)) + 1)]
    return start, end, ticks, step


def _tick_label(v, step):
    dec = max(0, -int(math.floor(math.log10(step) + 1e-9)))
    if abs(step * 10 ** dec - round(step * 10 ** dec)) > 1e-6:
        dec += 1
    s = f"{v:.{dec}f}"
    return "0" if float(s) == 0 else s


_SERIES_KEYS = {
    "train_loss": ("train_loss", "loss"),
    "val_loss": ("val_loss", "validation_loss"),
    "train_acc": ("train_accuracy", "train_acc", "accuracy", "acc"),
    "val_acc": ("val_accuracy", "val_acc", "validation_accuracy"),
}


def _history_series(history):
    """{series: [(epoch, value), ...]} from metrics.jsonl records (keys: module docstring)."""
    recs = [r for r in history if isinstance(r, dict)]
    kinds = [r for r in recs if any(r.get(t) == "epoch" for t in ("type", "event", "kind"))]
    if kinds:
        recs = kinds
    out = {s: {} for s in _SERIES_KEYS}
    for pos, r in enumerate(recs):
        flat = dict(r)
        for part in ("train", "val"):
            if isinstance(r.get(part), dict):
                for key, v in r[part].items():
                    flat.setdefault(f"{part}_{key}", v)
        ep = flat.get("epoch")
        x = ep if isinstance(ep, (int, float)) and not isinstance(ep, bool) else pos + 1
        for s, keys in _SERIES_KEYS.items():
            for key in keys:
                v = flat.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    out[s][x] = float(v)
                    break
    return {s: sorted(v.items()) for s, v in out.items()}


def training_curves_image(series):
    """Loss and accuracy per epoch (train and validation) side by side, as a PIL image."""
    from PIL import Image, ImageDraw

    pw, ph = 560, 360  # plot area of one panel
    ml, mr, mt, mb = 78, 24, 110, 64
    width, height = 2 * (ml + pw + mr), mt + ph + mb
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    _text(d, (width // 2, 14), "Training curves", _font(20), anchor="mt")
    panels = [("Loss", "loss (cross-entropy)", "train_loss", "val_loss", False),
              ("Accuracy", "accuracy", "train_acc", "val_acc", True)]
    for p, (title, ylabel, tr, va, is_acc) in enumerate(panels):
        ox = p * (ml + pw + mr) + ml
        _plot_panel(img, d, (ox, mt, ox + pw, mt + ph), title, ylabel,
                    [("train", series.get(tr) or [], _TRAIN_COLOR, "circle"),
                     ("validation", series.get(va) or [], _VAL_COLOR, "square")], is_acc)
    return img


def _plot_panel(img, d, box, title, ylabel, series, is_acc):
    x0, y0, x1, y1 = box
    tf, lf, kf = _font(17), _font(14), _font(12)
    _text(d, ((x0 + x1) / 2, y0 - 58), title, tf, anchor="mt")
    present = [s for s in series if s[1]]
    # legend, above the plot so it never hides a line
    lx = x0
    for name, pts, color, marker in series:
        if not pts:
            continue
        d.line((lx, y0 - 22, lx + 26, y0 - 22), fill=color, width=3)
        _marker(d, lx + 13, y0 - 22, color, marker)
        _text(d, (lx + 32, y0 - 22), name, lf, anchor="lm")
        lx += 32 + _tsize(d, name, lf)[0] + 24
    d.rectangle(box, outline=_AXIS)
    if not present:
        _text(d, ((x0 + x1) / 2, (y0 + y1) / 2), "no data in the history", lf, anchor="mm")
        return
    xs = [x for _, pts, _, _ in present for x, _ in pts]
    ys = [y for _, pts, _, _ in present for _, y in pts]
    ylo, yhi = min(ys), max(ys)
    if is_acc and 0 <= ylo and yhi <= 1:
        yhi = min(1.0, yhi + 0.02)
        ylo = max(0.0, ylo - 0.02)
    ylo, yhi, yticks, ystep = _nice_ticks(ylo, yhi)
    xlo, xhi = min(xs), max(xs)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    xstep = _nice_int_step(max(1, int(math.ceil((xhi - xlo) / 10)))) if all(float(x).is_integer() for x in xs) \
        else _nice_ticks(xlo, xhi)[3]
    xticks = [v * xstep for v in range(int(math.ceil(xlo / xstep - 1e-9)), int(math.floor(xhi / xstep + 1e-9)) + 1)]
    pad = 0.03 * (xhi - xlo)
    xlo, xhi = xlo - pad, xhi + pad

    def px(x):
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)

    def py(y):
        return y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    for t in yticks:
        yy = py(t)
        d.line((x0 + 1, yy, x1 - 1, yy), fill=_GRID)
        d.line((x0 - 5, yy, x0, yy), fill=_AXIS)
        _text(d, (x0 - 8, yy), _tick_label(t, ystep), kf, anchor="rm")
    for t in xticks:
        xx = px(t)
        d.line((xx, y0 + 1, xx, y1 - 1), fill=_GRID)
        d.line((xx, y1, xx, y1 + 5), fill=_AXIS)
        _text(d, (xx, y1 + 8), _tick_label(t, xstep) if xstep < 1 else str(int(round(t))), kf, anchor="mt")
    d.rectangle((x0, y0, x1, y1), outline=_AXIS)
    _text(d, ((x0 + x1) / 2, y1 + 30), "epoch", lf, anchor="mt")
    _text_rot90(img, (x0 - 62, (y0 + y1) / 2), ylabel, lf)

    for name, pts, color, marker in present:
        xy = [(px(x), py(y)) for x, y in pts]
        if len(xy) > 1:
            d.line(xy, fill=color, width=3, joint="curve")
        if len(xy) <= 60:
            for xx, yy in xy:
                _marker(d, xx, yy, color, marker)
    if is_acc:  # mark the best validation epoch
        val = next((pts for name, pts, _, _ in present if name == "validation"), None)
        if val:
            bx, by = max(val, key=lambda t: t[1])
            d.line((px(bx), y0 + 1, px(bx), y1 - 1), fill=(150, 150, 150))
            lab = f"best val {by:.1%}" if by <= 1 else f"best val {by:.4g}"
            anchor = "rt" if px(bx) > (x0 + x1) / 2 else "lt"
            _text(d, (px(bx) + (-4 if anchor == "rt" else 4), y0 + 4), lab, kf, anchor=anchor)


def _marker(d, x, y, color, kind, r=4):
    if kind == "square":
        d.rectangle((x - r, y - r, x + r, y + r), fill=color, outline="white")
    else:
        d.ellipse((x - r, y - r, x + r, y + r), fill=color, outline="white")
