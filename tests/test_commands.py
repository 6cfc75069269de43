"""evaluate, predict, inspect and export-weights through the CLI, on a tiny fine-tuned run (fast) and on the real
pretrained MobileNet V1 shipped in sample_data/."""
import importlib.util
import json
import os

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from transfercl_cli.cli import main
from transfercl_cli.runfile import save_run_model

from .helpers import tiny_mobilenet
from .test_train import SAMPLE, make_subset

MODEL = os.path.join(SAMPLE, "models", "mobilenet_v1_1.0_224.h5")
LABELS = os.path.join(SAMPLE, "models", "imagenet_classes.txt")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, rt):
    tmp = tmp_path_factory.mktemp("run")
    os.environ["TCL_FEATURE_CACHE"] = str(tmp / "fc")
    model_dir = tmp / "tiny_model"
    os.makedirs(model_dir)
    save_run_model(tiny_mobilenet(size=16), str(model_dir))
    data = make_subset(str(tmp / "data"), 10)
    rec = tmp / "r.yaml"
    rec.write_text(yaml.safe_dump(dict(
        model=str(model_dir), cut_after="conv_pw_2_relu", freeze="all", unfreeze=["conv_pw_2*"],
        data={"root": data, "test": 0.3}, input={"size": 16}, device="cpu", output=str(tmp / "run"),
        train={"epochs": 2, "batch_size": 4, "lr": 0.05, "optimizer": "adam"})))
    r = invoke("finetune", rec, "--quiet")
    assert r.exit_code == 0, r.output
    os.environ.pop("TCL_FEATURE_CACHE")
    return tmp / "run", data


def test_evaluate_run_dir_writes_reports(tiny_run):
    run, _ = tiny_run
    os.unlink(run / "report.json")
    r = invoke("evaluate", run)
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output and "precision" in r.output
    rep = json.loads((run / "report.json").read_text())
    assert rep["num_samples"] == 6 and rep["classes"] == ["cat", "dog"]
    assert (run / "confusion_matrix.png").exists() and (run / "training_curves.png").exists()
    r = invoke("evaluate", run, "--json", "--split", "all")
    data = json.loads(r.output)
    assert data["metrics"]["num_samples"] == 20 and data["meta"]["split"] == "all"


def test_evaluate_model_on_folder_needs_known_classes(tiny_run, tmp_path):
    run, data = tiny_run
    out = tmp_path / "rep"
    r = invoke("evaluate", run, "--data", data, "--split", "all", "-o", out)
    assert r.exit_code == 0, r.output
    assert (out / "report.md").exists()
    os.makedirs(tmp_path / "d2" / "horse")
    from PIL import Image

    Image.new("RGB", (20, 20), (10, 20, 30)).save(tmp_path / "d2" / "horse" / "h.png")
    r = CliRunner().invoke(main, ["evaluate", str(run), "--data", str(tmp_path / "d2")])
    assert r.exit_code == 2 and "horse" in r.output and "Traceback" not in r.output


def test_predict_run_dir_uses_class_names(tiny_run):
    run, data = tiny_run
    img = os.path.join(data, "cat", sorted(os.listdir(os.path.join(data, "cat")))[0])
    r = invoke("predict", run, img, "--json", "--top", "2")
    res = json.loads(r.output)
    assert {t["label"] for t in res[0]["top"]} == {"cat", "dog"}
    assert sum(t["probability"] for t in res[0]["top"]) == pytest.approx(1.0, abs=1e-5)


def test_predict_real_mobilenet_golden_images():
    pytest.importorskip("h5py")
    r = invoke("predict", MODEL, os.path.join(SAMPLE, "images", "chelsea.png"),
               os.path.join(SAMPLE, "images", "coffee.png"), "--labels", LABELS, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res[0]["top"][0]["index"] == 281 and "tabby" in res[0]["top"][0]["label"]
    assert res[1]["top"][0]["index"] == 967 and res[1]["top"][0]["label"] == "espresso"


def test_predict_corrupt_image_is_reported_and_fails_the_exit_code(tmp_path):
    """The readable images are still predicted; the unreadable one is named on stderr and the exit code says a
    script must not trust the whole batch."""
    pytest.importorskip("h5py")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    good = os.path.join(SAMPLE, "images", "chelsea.png")
    r = invoke("predict", MODEL, good, bad, "--labels", LABELS, "--device", "cpu")
    assert r.exit_code == 2 and "unreadable" in r.stdout and "tabby" in r.stdout
    assert "1 of 2 images could not be read" in r.stderr and "bad.jpg" in r.stderr


def test_inspect_real_model_and_recipe(tmp_path):
    pytest.importorskip("h5py")
    r = invoke("inspect", MODEL)
    assert r.exit_code == 0, r.output
    assert "conv_pw_13_bn" in r.output and "4,253,864" in r.output and "MiB" in r.output
    rec = os.path.join(os.path.dirname(SAMPLE), "configs", "sample_dogs_cats.yaml")
    r = invoke("inspect", MODEL, "--recipe", rec, "--json")
    data = json.loads(r.output)
    status = {row["name"]: row["status"] for row in data["layers"]}
    assert status["conv_pw_13"] == "trainable" and status["conv_pw_12"] == "frozen"
    assert status["predictions"] == "cut" and status["head_dense"] == "new"
    assert data["total_macs"] > 5e8


def test_export_onnx_matches_tcl(tiny_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    run, data = tiny_run
    out = tmp_path / "m.onnx"
    r = invoke("export-weights", run, "--format", "onnx", "-o", out)
    assert r.exit_code == 0, r.output
    from transfercl_cli.data import Preprocess
    from transfercl_cli.evaluate import Predictor
    from transfercl_cli.runfile import load_run_model

    g = load_run_model(str(run))
    pre = Preprocess.from_dict(g.meta["preprocess"])
    imgs = [os.path.join(data, c, f) for c in ("cat", "dog") for f in sorted(os.listdir(os.path.join(data, c)))[:3]]
    x = np.stack([pre(p) for p in imgs])
    pr = Predictor(g, "cpu")
    out_t = pr.ex.forward({pr.input: x})[pr.output]
    ours = pr.be.to_host(out_t)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    theirs = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.max(np.abs(theirs - ours)) <= 1e-4 * np.max(np.abs(ours))
    r = CliRunner().invoke(main, ["export-weights", str(run), "--format", "onnx", "-o", str(out)])
    assert r.exit_code == 2 and "--force" in r.output
    assert invoke("export-weights", run, "--format", "onnx", "-o", out, "--force").exit_code == 0


def test_export_h5_npz_and_int8(tiny_run, tmp_path):
    h5py = pytest.importorskip("h5py")
    run, _ = tiny_run
    r = invoke("export-weights", run, "--format", "h5", "-o", tmp_path / "w.h5")
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "w.h5", "r") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
        assert "conv_pw_2" in names and "head_dense" in names
    r = invoke("export-weights", run, "--format", "npz", "--json")
    res = json.loads(r.output)
    z = np.load(res["path"], allow_pickle=False)
    assert "head_dense/weight" in z.files and os.path.exists(res["path"] + ".json")
    r = invoke("export-weights", run, "--format", "npz", "--int8", "-o", tmp_path / "q.npz")
    assert r.exit_code == 0, r.output
    assert "int8: test accuracy" in r.output
    q = json.loads((tmp_path / "q.npz.int8.json").read_text())
    assert 0 <= q["accuracy_int8"] <= 1 and abs(q["accuracy_change"]) <= 1
    sens = q["sensitivity"]
    layers = [n for n in json.loads((run / "model.json").read_text())["nodes"] if n["op"] in ("conv2d", "dense")]
    assert set(sens["cost_points"]) == {n["name"] for n in layers} and sens["calibration_images"] == 14
    # Every layer costing more than the threshold alone stays float; then more, until the whole int8 model costs
    # no more than the threshold on the calibration images (or everything is float).
    alone = {n for n, c in sens["cost_points"].items() if c > sens["threshold_points"]}
    assert alone <= set(q["kept_float"]) and set(sens["combined_steps"][-1]["kept_float"]) == set(q["kept_float"])
    assert sens["combined_cost_points"] <= sens["threshold_points"] or len(q["kept_float"]) == len(layers)
    with np.load(tmp_path / "q.npz", allow_pickle=False) as z:
        for n in layers:  # a layer kept float is stored float, every other one as int8 + scales
            assert (f"{n['name']}/weight:int8" in z.files) == (n["name"] not in q["kept_float"]), n["name"]
    # The threshold decides: below every cost all layers stay float, above every cost none does.
    for thr, expect_all in (("-1000", True), ("1000", False)):
        r = invoke("export-weights", run, "--format", "npz", "--int8", "--int8-threshold", thr, "--force",
                   "-o", tmp_path / "t.npz", "--json")
        kept = json.loads(r.stdout)["int8"]["kept_float"]
        assert kept == ([n["name"] for n in layers] if expect_all else []), thr
    # Keras HDF5 has no int8 weights: refused rather than writing floats that look like an int8 export.
    r = CliRunner().invoke(main, ["export-weights", str(run), "--format", "h5", "--int8", "-o", str(tmp_path / "q.h5")])
    assert r.exit_code == 2 and "not available with --format h5" in r.output and not (tmp_path / "q.h5").exists()
    # Quantized activations exist only in the ONNX export: asking for them elsewhere is refused, not ignored.
    r = CliRunner().invoke(main, ["export-weights", str(run), "--format", "npz", "--int8", "--int8-activations",
                                  "-o", str(tmp_path / "a.npz")])
    assert r.exit_code == 2 and "--format onnx" in r.output and not (tmp_path / "a.npz").exists()


def test_export_onnx_int8_static_and_weight_only(tiny_run, tmp_path):
    """--int8 --format onnx is static int8 by default (QuantizeLinear on every int8 layer's input, activations
    uint8 in the report); --no-int8-activations stores int8 weights only."""
    onnx = pytest.importorskip("onnx")
    run, _ = tiny_run
    for flag, acts in ((None, "uint8"), ("--no-int8-activations", "float32")):
        p = tmp_path / f"{acts}.onnx"
        r = invoke("export-weights", run, "--format", "onnx", "--int8", "-o", p, *([flag] if flag else []))
        assert r.exit_code == 0, r.output
        q = json.loads((tmp_path / f"{acts}.onnx.int8.json").read_text())
        assert q["activations"] == acts and 0 <= q["accuracy_int8"] <= 1
        ops = [n.op_type for n in onnx.load(str(p)).graph.node]
        n_int8 = len(q["sensitivity"]["cost_points"]) - len(q["kept_float"])
        assert ops.count("QuantizeLinear") == (n_int8 if acts == "uint8" else 0)
        assert ops.count("DequantizeLinear") == n_int8 * (2 if acts == "uint8" else 1)
        if acts == "uint8" and importlib.util.find_spec("onnxruntime"):
            assert "int8 in onnxruntime" in r.output and 0 <= q["accuracy_int8_onnxruntime"] <= 1


def test_export_missing_run_dir(tmp_path):
    r = CliRunner().invoke(main, ["export-weights", str(tmp_path / "nope"), "--format", "npz"])
    assert r.exit_code == 2 and "run directory" in r.output


def test_weights_only_h5_with_config(tmp_path):
    """A weights-only .h5 (as `model.save_weights` writes) plus the Keras model config JSON."""
    h5py = pytest.importorskip("h5py")
    cfg = tmp_path / "config.json"
    weights = tmp_path / "weights.h5"
    with h5py.File(MODEL, "r") as src, h5py.File(weights, "w") as dst:
        cfg.write_text(src.attrs["model_config"] if isinstance(src.attrs["model_config"], str)
                       else src.attrs["model_config"].decode())
        for k, v in src["model_weights"].attrs.items():
            dst.attrs[k] = v
        for name in src["model_weights"]:
            src.copy(src["model_weights"][name], dst, name=name)
    r = CliRunner().invoke(main, ["predict", str(weights), os.path.join(SAMPLE, "images", "chelsea.png")])
    assert r.exit_code == 2 and "config" in r.output
    r = invoke("predict", weights, os.path.join(SAMPLE, "images", "chelsea.png"), "--config", cfg,
               "--labels", LABELS, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)[0]["top"][0]["index"] == 281


def test_export_onnx_keeps_the_untouched_source_graph(tmp_path, rt):
    """Fine-tuned from an ONNX file: the export copies the frozen part node for node from the original (its names,
    its NHWC input) and onnxruntime reproduces tcl's outputs."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from .conftest import shared_path

    src = shared_path("models", "mobilenet_v1_1.0_224.onnx")
    from transfercl_cli.importers import load_model

    g = load_model(src)
    convs = [n.name for n in g.nodes if n.op == "conv2d"]
    relus = [n.name for n in g.nodes if n.op == "relu6"]
    data = make_subset(str(tmp_path / "data"), 6)
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(dict(model=src, cut_after=relus[-1], freeze="all", unfreeze=[convs[-2]],
                                       data={"root": data, "test": 0.34}, device="cpu", output=str(tmp_path / "run"),
                                       train={"epochs": 1, "batch_size": 4, "lr": 0.01})))
    os.environ["TCL_FEATURE_CACHE"] = str(tmp_path / "fc")
    try:
        assert invoke("finetune", rec, "-q").exit_code == 0
    finally:
        os.environ.pop("TCL_FEATURE_CACHE")
    out = tmp_path / "m.onnx"
    assert invoke("export-weights", tmp_path / "run", "--format", "onnx", "-o", out).exit_code == 0
    orig, exp = onnx.load(src), onnx.load(str(out))
    # Nodes copied unchanged (same op, names, attributes, inputs) vs written anew from the fine-tuned IR.
    orig_nodes = {n.SerializeToString() for n in orig.graph.node}
    kept = [n.name for n in exp.graph.node if n.SerializeToString() in orig_nodes]
    assert convs[0] in kept and len(kept) > 50 and convs[-2] not in kept
    assert convs[-2] in {n.name for n in exp.graph.node}  # the fine-tuned layer keeps its name
    assert [i.name for i in exp.graph.input] == [i.name for i in orig.graph.input]
    from transfercl_cli.data import Preprocess
    from transfercl_cli.evaluate import Predictor
    from transfercl_cli.runfile import load_run_model

    run = load_run_model(str(tmp_path / "run"))
    pre = Preprocess.from_dict(run.meta["preprocess"])
    imgs = [os.path.join(data, c, sorted(os.listdir(os.path.join(data, c)))[0]) for c in ("cat", "dog")]
    x = np.stack([pre(p) for p in imgs])
    pr = Predictor(run, "cpu")
    ours = pr.be.to_host(pr.ex.forward({pr.input: x})[pr.output])
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    theirs = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.max(np.abs(theirs - ours)) <= 1e-4 * np.max(np.abs(ours))


def test_predict_and_evaluate_take_the_models_preprocessing_from_flags_or_a_recipe(tmp_path):
    """A model file that does not say how its images were prepared (a torchvision ONNX export wants ImageNet mean/std)
    gets it from --mean/--std/--scale/--offset or --recipe; the flags give exactly what the same recipe keys give."""
    pytest.importorskip("h5py")
    img = os.path.join(SAMPLE, "images", "chelsea.png")

    def top(*extra):
        r = invoke("predict", MODEL, img, "--labels", LABELS, "--top", "1", "--json", *extra)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)[0]["top"][0]["probability"]

    default = top()
    assert top("--scale", "0.00784313725490196", "--offset", "-1") == pytest.approx(default, abs=1e-6)
    imagenet = top("--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225")
    assert abs(imagenet - default) > 1e-3
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump({"model": MODEL, "data": str(tmp_path), "input": {
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}))
    assert top("--recipe", rec) == pytest.approx(imagenet, abs=1e-6)
    r = CliRunner().invoke(main, ["predict", MODEL, img, "--mean", "0.5,0.5", "--std", "1"])
    assert r.exit_code == 2 and "input.mean" in r.output and "exactly 3" in r.output


def test_exports_come_back_in_with_their_classes_and_preprocessing(tiny_run, tmp_path):
    """finetune -> export (onnx, npz, npz int8, onnx int8) -> predict/evaluate with tcl: the float exports give the
    run's own probabilities and class names; the two int8 exports agree with each other."""
    pytest.importorskip("onnx")
    run, data = tiny_run
    imgs = [os.path.join(data, c, sorted(os.listdir(os.path.join(data, c)))[0]) for c in ("cat", "dog")]

    def probs(model):
        r = invoke("predict", model, *imgs, "--json", "--top", "2")
        assert r.exit_code == 0, r.output
        return [{t["label"]: t["probability"] for t in x["top"]} for x in json.loads(r.stdout)]

    ref = probs(run)
    paths = {}
    for fmt, extra in (("onnx", ()), ("npz", ()), ("npz", ("--int8",)), ("onnx", ("--int8",))):
        p = tmp_path / f"m{'_int8' if extra else ''}.{fmt}"
        r = invoke("export-weights", run, "--format", fmt, "-o", p, *extra)
        assert r.exit_code == 0, r.output
        paths[(fmt, bool(extra))] = p
    for fmt in ("onnx", "npz"):
        got = probs(paths[(fmt, False)])
        for a, b in zip(got, ref):
            assert set(a) == {"cat", "dog"} and all(a[k] == pytest.approx(b[k], abs=1e-4) for k in b), fmt
    # The int8 npz gives the fake-quantized run's probabilities (its weights are q * scale).
    from transfercl_cli.evaluate import Predictor, _model_preprocess
    from transfercl_cli.export import quantize_int8
    from transfercl_cli.runfile import load_run_model

    q = json.loads((tmp_path / "m_int8.npz.int8.json").read_text())
    qg, _ = quantize_int8(load_run_model(str(run)), skip=q["kept_float"])
    pre = _model_preprocess(qg)
    expect = Predictor(qg, "cpu").probs(np.stack([pre(p) for p in imgs]))
    for a, e in zip(probs(paths[("npz", True)]), expect):
        assert a["cat"] == pytest.approx(e[0], abs=1e-4) and a["dog"] == pytest.approx(e[1], abs=1e-4)
    # The ONNX int8 export is static int8 (QuantizeLinear/DequantizeLinear on activations too): tcl reads it back as
    # the network onnxruntime runs when it computes those nodes as written (no integer-kernel fusion).
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(paths[("onnx", True)]), opts, providers=["CPUExecutionProvider"])
    x = np.stack([pre(p) for p in imgs]).astype(np.float32)
    z = sess.run(None, {sess.get_inputs()[0].name: x})[0].astype(np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    e /= e.sum(1, keepdims=True)
    for a, row in zip(probs(paths[("onnx", True)]), e):
        assert a["cat"] == pytest.approx(row[0], abs=1e-4) and a["dog"] == pytest.approx(row[1], abs=1e-4)
    assert json.loads((tmp_path / "m_int8.onnx.int8.json").read_text())["activations"] == "uint8"
    r = invoke("evaluate", paths[("npz", False)], "--data", data, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["metrics"]["num_samples"] == 20, r.output
