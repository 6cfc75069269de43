"""Evaluation metrics, report files and drawings."""
import json
import math
import os
import re

import numpy as np
import pytest
from PIL import Image

from transfercl_cli import report
from transfercl_cli.report import (compute_metrics, confusion_matrix_image, format_table, training_curves_image,
                                   write_report)

# 3 classes, 6 images; rows are the predicted distributions (argmax = y_pred)
Y_TRUE = [0, 0, 0, 1, 1, 2]
PROBS = [[0.7, 0.2, 0.1],   # 0 -> 0
         [0.6, 0.3, 0.1],   # 0 -> 0
         [0.2, 0.5, 0.3],   # 0 -> 1 (true class 3rd: a top-2 miss)
         [0.1, 0.8, 0.1],   # 1 -> 1
         [0.1, 0.3, 0.6],   # 1 -> 2
         [0.2, 0.2, 0.6]]   # 2 -> 2
CLASSES = ["ant", "bee", "cow"]


def test_metrics_hand_computed():
    m = compute_metrics(Y_TRUE, None, PROBS, CLASSES, paths=[f"im{i}.png" for i in range(6)], top_k=(1, 2, 5))
    assert m["num_samples"] == 6 and m["num_classes"] == 3 and m["classes"] == CLASSES
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["top_k_accuracy"] == pytest.approx({"1": 4 / 6, "2": 5 / 6})  # k=5 > K: left out
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.6, 0.2, 0.8, 0.3, 0.6])))
    pc = {r["class"]: r for r in m["per_class"]}
    assert pc["ant"]["precision"] == 1.0 and pc["ant"]["recall"] == pytest.approx(2 / 3)
    assert pc["ant"]["f1"] == pytest.approx(0.8)
    assert pc["bee"]["precision"] == 0.5 and pc["bee"]["recall"] == 0.5 and pc["bee"]["f1"] == 0.5
    assert pc["cow"]["precision"] == 0.5 and pc["cow"]["recall"] == 1.0 and pc["cow"]["f1"] == pytest.approx(2 / 3)
    assert [r["support"] for r in m["per_class"]] == [3, 2, 1]
    assert [r["predicted"] for r in m["per_class"]] == [2, 2, 2]
    assert m["macro_avg"] == pytest.approx({"precision": 2 / 3, "recall": 13 / 18, "f1": 59 / 90, "num_classes": 3})
    assert m["weighted_avg"] == pytest.approx({"precision": 0.75, "recall": 4 / 6, "f1": 61 / 90, "support": 6})
    # most confident mistake first
    assert [(e["path"], e["true"], e["predicted"]) for e in m["misclassified"]] == \
        [("im4.png", "bee", "cow"), ("im2.png", "ant", "bee")]
    assert m["misclassified"][0]["confidence"] == pytest.approx(0.6)
    assert m["misclassified"][0]["true_confidence"] == pytest.approx(0.3)
    json.dumps(m, allow_nan=False)  # plain JSON types


def test_zero_divisions_are_zero_and_absent_classes_leave_macro():
    probs = [[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]]
    m = compute_metrics([0, 0], [0, 1], probs, CLASSES)
    bee, cow = m["per_class"][1], m["per_class"][2]
    assert (bee["precision"], bee["recall"], bee["f1"], bee["support"], bee["predicted"]) == (0, 0, 0, 0, 1)
    assert (cow["precision"], cow["recall"], cow["f1"], cow["predicted"]) == (0, 0, 0, 0)
    assert m["macro_avg"]["num_classes"] == 2  # cow: neither in the data nor predicted
    assert m["macro_avg"]["precision"] == pytest.approx(0.5) and m["macro_avg"]["recall"] == pytest.approx(0.25)
    assert m["misclassified"][0]["path"] is None and m["misclassified"][0]["index"] == 1


def test_top_k_ties_prefer_lower_index_and_loss_clip():
    m = compute_metrics([1, 2], None, [[0.4, 0.4, 0.2], [1.0, 0.0, 0.0]], CLASSES, top_k=(1, 2, 3))
    assert m["accuracy"] == 0.0 and m["top_k_accuracy"] == {"1": 0.0, "2": 0.5, "3": 1.0}
    assert m["loss"] == pytest.approx((-math.log(0.4) - math.log(1e-12)) / 2)


def _independent(y_true, y_pred, probs, k_cls, ks):
    """Straightforward loops, written without looking at compute_metrics."""
    n = len(y_true)
    out = {"cm": [[0] * k_cls for _ in range(k_cls)], "per": []}
    for t, p in zip(y_true, y_pred):
        out["cm"][t][p] += 1
    for c in range(k_cls):
        tp = sum(1 for t, p in zip(y_true, y_pred) if t == c and p == c)
        fp = sum(1 for t, p in zip(y_true, y_pred) if t != c and p == c)
        fn = sum(1 for t, p in zip(y_true, y_pred) if t == c and p != c)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        out["per"].append((prec, rec, f1, tp + fn))
    out["acc"] = sum(t == p for t, p in zip(y_true, y_pred)) / n
    out["topk"] = {}
    for k in ks:
        hits = 0
        for i in range(n):
            higher = sum(1 for j in range(k_cls) if probs[i][j] > probs[i][y_true[i]])
            hits += higher < k
        out["topk"][str(k)] = hits / n
    out["loss"] = sum(-math.log(probs[i][y_true[i]]) for i in range(n)) / n
    out["w_f1"] = sum(f * s for _, _, f, s in out["per"]) / n
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_independent_computation(seed):
    rng = np.random.default_rng(seed)
    n, k_cls = 300, 7
    y_true = rng.integers(0, k_cls, n)
    logits = rng.normal(size=(n, k_cls)) + 1.5 * np.eye(k_cls)[y_true]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y_pred = probs.argmax(1)
    if seed:  # predictions given separately (e.g. a thresholded rule), not argmax
        y_pred = np.where(rng.random(n) < 0.2, rng.integers(0, k_cls, n), y_pred)
    m = compute_metrics(y_true, y_pred, probs.astype(np.float32), [f"c{i}" for i in range(k_cls)], top_k=(1, 3, 5))
    ref = _independent(y_true.tolist(), y_pred.tolist(), probs.astype(np.float32).tolist(), k_cls, (1, 3, 5))
    assert m["confusion_matrix"] == ref["cm"]
    assert m["accuracy"] == pytest.approx(ref["acc"])
    assert m["top_k_accuracy"] == pytest.approx(ref["topk"])
    assert m["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    for r, (p, rc, f, s) in zip(m["per_class"], ref["per"]):
        assert (r["precision"], r["recall"], r["f1"], r["support"]) == pytest.approx((p, rc, f, s))
    assert m["weighted_avg"]["f1"] == pytest.approx(ref["w_f1"])
    assert m["macro_avg"]["f1"] == pytest.approx(np.mean([f for _, _, f, _ in ref["per"]]))
    assert len(m["misclassified"]) == int((y_true != y_pred).sum())
    conf = [e["confidence"] for e in m["misclassified"]]
    assert conf == sorted(conf, reverse=True)


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="logits"):
        compute_metrics([0, 1], None, [[2.0, -1.0, 0.5], [0.1, 3.0, 0.0]], CLASSES)
    with pytest.raises(ValueError, match="shape"):
        compute_metrics([0, 1], None, [[1.0, 0.0]] * 2, CLASSES)
    with pytest.raises(ValueError, match="outside"):
        compute_metrics([0, 3], None, [[1.0, 0, 0]] * 2, CLASSES)
    with pytest.raises(ValueError, match="outside"):
        compute_metrics([0, 1], [0, -1], [[1.0, 0, 0]] * 2, CLASSES)


def test_format_table():
    m = compute_metrics(Y_TRUE, None, PROBS, CLASSES, top_k=(1, 2))
    t = format_table(m)
    lines = t.splitlines()
    assert lines[0].startswith("accuracy 0.6667") and "top-2 0.8333" in lines[0]
    assert any(ln.split()[:2] == ["ant", "1.0000"] for ln in lines)
    assert lines[-1].split()[:2] == ["weighted", "avg"] and lines[-1].split()[-2:] == ["0.6778", "6"]
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(40), 200)
    big = format_table(compute_metrics(rng.integers(0, 40, 200), None, probs, [f"k{i}" for i in range(40)]),
                       max_rows=10)
    assert "10 lowest-F1 of 40 classes" in big and len(big.splitlines()) == 1 + 1 + 1 + 10 + 2


def _documented_fields():
    return set(re.findall(r"^- ``(\w+)``", report.__doc__, re.M))


def _history():
    hist = [{"type": "step", "step": i, "loss": 9.0} for i in range(3)]  # ignored: epoch records exist
    for e in range(1, 7):
        hist.append({"type": "epoch", "epoch": e, "train_loss": 1.2 / e, "val_loss": 1.4 / e + 0.05,
                     "train_accuracy": 1 - 0.4 / e, "val_accuracy": 0.95 - 0.45 / e, "lr": np.float32(0.01)})
    hist[-1]["val_loss"] = float("nan")
    return hist


def test_write_report_files(tmp_path):
    paths = [f"data/{c}/img|{i}.png" for i, c in enumerate(["ant"] * 3 + ["bee"] * 2 + ["cow"])]
    m = compute_metrics(Y_TRUE, None, PROBS, CLASSES, paths=paths)
    meta = {"model": "m.h5", "device": "pocl cpu", "split": "test", "images_per_sec": np.float64(41.5),
            "batch_size": np.int64(8), "shape": np.array([224, 224, 3])}
    out = write_report(tmp_path / "run", m, meta, history=_history())
    assert sorted(os.listdir(tmp_path / "run")) == ["confusion_matrix.png", "report.json", "report.md",
                                                    "training_curves.png"]  # no temporaries left
    with open(out["json"]) as f:
        doc = json.load(f, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert doc["schema_version"] == report.SCHEMA_VERSION == 2 and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["generated_at"])
    assert doc["meta"] == {"model": "m.h5", "device": "pocl cpu", "split": "test", "images_per_sec": 41.5,
                           "batch_size": 8, "shape": [224, 224, 3]}
    for k, v in m.items():
        assert doc[k] == v, k
    assert set(doc) == _documented_fields()  # every field documented, none undocumented
    assert doc["history"][-1]["val_loss"] is None and doc["history"][-1]["lr"] == pytest.approx(0.01)
    assert doc["files"] == {"markdown": "report.md", "confusion_matrix": "confusion_matrix.png",
                            "training_curves": "training_curves.png"}
    text = open(out["json"]).read()
    assert "\n    [2, 1, 0],\n" in text  # matrix rows on one line each

    md = open(out["markdown"]).read()
    assert "| accuracy | 66.67% |" in md and "| ant | 1.0000 | 0.6667 | 0.8000 | 3 | 2 |" in md
    assert "| **ant** | 2 | 1 | 0 |" in md and "img\\|4.png" in md and "![Confusion matrix](confusion_matrix.png)" in md
    assert "| images/s | 41.5 |" in md and "training_curves.png" in md

    cm = Image.open(out["confusion_matrix"])
    assert cm.format == "PNG" and cm.size == confusion_matrix_image(m).size and cm.width >= 3 * 64
    tc = Image.open(out["training_curves"])
    assert tc.format == "PNG" and tc.size == training_curves_image(report._history_series(_history())).size
    assert tc.size[0] > 1000 and tc.size[1] > 400


def test_write_report_without_history_and_rewrite(tmp_path):
    m = compute_metrics(Y_TRUE, None, PROBS, CLASSES)
    out = write_report(tmp_path, m, {"split": "val"})
    assert out["training_curves"] is None and not os.path.exists(tmp_path / "training_curves.png")
    doc = json.load(open(out["json"]))
    assert doc["history"] is None and doc["files"]["training_curves"] is None
    out2 = write_report(tmp_path, compute_metrics([0, 1], None, [[0.9, 0.1, 0], [0.2, 0.8, 0]], CLASSES))
    assert json.load(open(out2["json"]))["num_samples"] == 2
    assert sorted(os.listdir(tmp_path)) == ["confusion_matrix.png", "report.json", "report.md"]


def test_history_series_keys():
    s = report._history_series(_history())
    assert [x for x, _ in s["train_loss"]] == [1, 2, 3, 4, 5, 6]  # step records ignored
    assert [x for x, _ in s["val_loss"]] == [1, 2, 3, 4, 5]  # NaN dropped
    s = report._history_series([{"loss": 1.0, "acc": 0.5}, {"epoch": 2, "train": {"loss": 0.5},
                                                           "val": {"accuracy": 0.7}},
                                {"epoch": 2, "val_acc": 0.8}])
    assert s["train_loss"] == [(1, 1.0), (2, 0.5)] and s["train_acc"] == [(1, 0.5)]
    assert s["val_acc"] == [(2, 0.8)]  # last record of an epoch wins


def _dark_blue(img):
    a = np.asarray(img.convert("RGB")).astype(int)
    return int(((a[..., 2] > 90) & (a[..., 0] < 60)).sum())


def test_confusion_image_content():
    # a perfect 4-class result: the diagonal cells are the darkest colour, the rest white
    probs = np.eye(4)[[0, 1, 2, 3, 3]]
    m = compute_metrics([0, 1, 2, 3, 3], None, probs, ["north", "east", "south", "a much longer west name"])
    img = confusion_matrix_image(m)
    a = np.asarray(img).astype(int)
    assert img.mode == "RGB" and a.min() == 0 and a.max() == 255  # text and background present
    cell = max(1, min(96, 640 // 4))
    assert _dark_blue(img) > 4 * (cell // 2) ** 2  # four filled diagonal cells (plus the colour bar)
    many = confusion_matrix_image(compute_metrics(np.arange(300) % 150, None, np.eye(150)[np.arange(300) % 150],
                                                  [f"c{i}" for i in range(150)]))
    assert 500 < many.width < 1200 and 500 < many.height < 1200  # large K stays a sensible size


def test_training_curves_partial_history():
    img = training_curves_image(report._history_series([{"epoch": 1, "loss": 0.7}]))
    assert img.size == training_curves_image(report._history_series(_history())).size
    a = np.asarray(img).astype(int)
    blue = (abs(a[..., 0] - 31) < 10) & (abs(a[..., 1] - 119) < 10) & (abs(a[..., 2] - 180) < 10)
    assert blue.sum() > 20  # the single train point and its legend entry are drawn


def test_empty_evaluation_and_bad_images_section(tmp_path):
    # every image unreadable: an empty set must still give a report (after a long training run)
    m = compute_metrics(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3)), CLASSES)
    assert m["num_samples"] == 0 and m["accuracy"] is None and m["loss"] is None
    assert m["top_k_accuracy"] == {"1": None} and m["confusion_matrix"] == [[0] * 3] * 3
    assert m["macro_avg"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "num_classes": 0}
    assert "accuracy n/a" in format_table(m)
    bad = [{"path": "x/broken.png", "reason": "cannot identify image file"}]
    out = write_report(tmp_path, m, {"split": "test", "bad_images": bad})
    doc = json.load(open(out["json"]))
    assert doc["accuracy"] is None and doc["meta"]["bad_images"] == bad
    md = open(out["markdown"]).read()
    assert "| accuracy | n/a |" in md and "No images were evaluated." in md
    assert "| unreadable images (skipped) | 1 |" in md and "| x/broken.png | cannot identify image file |" in md
    assert Image.open(out["confusion_matrix"]).size[0] > 200


# --------------------------------------------------------------------------------------------------------------
# Reports at any scale (issue 17): a 1000-class model evaluated on a few images


def _thousand_classes(n=6):
    rng = np.random.default_rng(3)
    k = 1000
    y = np.array([5, 5, 17, 17, 900, 901][:n])
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), [5, 6, 17, 3, 900, 901][:n]] += 12  # four right, two confused (5 -> 6, 17 -> 3)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return compute_metrics(y, None, probs, [f"class_{i}" for i in range(k)], paths=[f"im{i}.jpg" for i in range(n)])


def test_many_classes_report_lists_what_occurs(tmp_path):
    m = _thousand_classes()
    assert m["confusion_matrix"] is None and m["omitted_classes"] == 1000 - 6
    assert [r["index"] for r in m["per_class"]] == [3, 5, 6, 17, 900, 901]  # in the data or predicted
    assert sorted(map(tuple, m["confusion"])) == [(5, 5, 1), (5, 6, 1), (17, 3, 1), (17, 17, 1), (900, 900, 1),
                                                  (901, 901, 1)]
    assert m["macro_avg"]["num_classes"] == 6 and m["accuracy"] == pytest.approx(4 / 6)
    out = write_report(tmp_path, m, {"split": "all", "cache": None})
    assert os.path.getsize(out["json"]) < 40_000  # was 3.2 MB: a dense 1000 x 1000 matrix
    doc = json.load(open(out["json"]))
    assert set(doc) == _documented_fields() and doc["schema_version"] == 2
    md = open(out["markdown"]).read()
    assert len(md.splitlines()) < 80  # was 1,040 lines
    assert "other 994 classes are neither" in md and "| class_900 |" in md and "| class_42 |" not in md
    assert "| **class_17** |" in md and "| cache | off |" in md
    img = Image.open(out["confusion_matrix"])
    # the six classes that occur, drawn large enough to read (not 1000 one-pixel cells)
    assert _dark_blue(img) > 4 * (640 // 6 // 2) ** 2
    table = format_table(m)
    assert "994 classes neither in the data nor predicted" in table and "class_42" not in table
    assert len(table.splitlines()) < 15


def test_many_classes_confusion_image_draws_the_most_confused():
    k = 200
    y = np.repeat(np.arange(k), 2)
    pred = y.copy()
    pred[::2] = (y[::2] + 1) % k  # every class confused once
    pred[:20] = 7  # class 7 predicted for images of classes 0-9: the most confused
    probs = np.full((len(y), k), 0.1 / (k - 1))
    probs[np.arange(len(y)), pred] = 0.9
    m = compute_metrics(y, pred, probs, [f"c{i}" for i in range(k)])
    idx, note = report.shown_classes(m)
    assert len(idx) == 30 and 7 in idx and idx == sorted(idx) and "most confused" in note
    img = confusion_matrix_image(m)
    assert 400 < img.width < 1200 and 400 < img.height < 1200


def test_report_version_1_metrics_still_draw():
    m = compute_metrics(Y_TRUE, None, PROBS, CLASSES)
    del m["confusion"]  # a metrics record written before schema 2: only the dense matrix
    assert report.confusion_cells(m) == [(0, 0, 2), (0, 1, 1), (1, 1, 1), (1, 2, 1), (2, 2, 1)]
    assert confusion_matrix_image(m).size == confusion_matrix_image(compute_metrics(Y_TRUE, None, PROBS, CLASSES)).size


def test_meta_rows_for_people(tmp_path):
    m = compute_metrics(Y_TRUE, None, PROBS, CLASSES)
    cache = {"hits": 240, "misses": 60, "compute_seconds": 4.2, "seconds_per_image": 0.07, "dir": "/c/features",
             "seconds_saved_now": 16.8, "seconds_saved_over_epochs": 612.3}
    gap = {"train_accuracy": 0.95, "train_accuracy_inference_mode": 0.78, "points": 17.0}
    out = write_report(tmp_path, m, {"split": "test", "cache": cache, "batchnorm_gap": gap, "initial_accuracy": None})
    md = open(out["markdown"]).read()
    row = next(ln for ln in md.splitlines() if ln.startswith("| cache |"))
    assert "{" not in row and "240 images read from the cache, 60 computed in 4.2 s; the frozen layers take 70.0 ms per image" in row
    assert "about 612 s saved" in row and "/c/features" in row
    assert "training accuracy 0.9500 with batch statistics, 0.7800 in inference mode (17.0 points)" in md
    assert "| initial_accuracy | n/a |" in md


def test_format_preprocess():
    f = report.format_preprocess
    assert f({"size": [224, 224], "resize": "shorter_crop", "channel_order": "RGB", "scale": 1 / 127.5,
              "offset": -1.0}) == ("224x224 (shorter side to 256, centre crop), RGB, x * 0.007843 - 1 "
                                   "(pixels [0, 255] -> [-1, 1])")
    assert f({"size": [160, 128], "resize": "stretch", "channel_order": "BGR", "mean": [0.485, 0.456, 0.406],
              "std": [0.229, 0.224, 0.225]}) == ("160x128 (stretched), BGR, (x / 255 - mean [0.485, 0.456, 0.406]) "
                                                 "/ std [0.229, 0.224, 0.225]")
    assert f({"size": [8, 8], "scale": 1.0, "offset": 0.0, "in_model": True}).endswith(
        "raw pixels [0, 255], rescaled inside the model")
    assert f({"size": [8, 8], "scale": 1.0, "offset": [-103.939, -116.779, -123.68]}).endswith(
        "x * 1 + [-103.9, -116.8, -123.7]")
    assert f(None) == "the model's own"
