"""A zoo of the project's own (issue 14): random-weight torchvision (ONNX) and Keras (.h5) classifiers, imported by tcl
and checked against the framework that wrote them; run by hand, not in CI.

    python bench/zoo.py [--only NAME,...] [--skip-finetune] [--markdown FILE] [--device cpu] [--rebuild]
                        [--list] [--timeout S]

For every model: build it once with random weights (BatchNorm moving mean/variance and gamma/beta randomised, so
tcl's BN folding is exercised) and cache it; feed the same preprocessed batch (sample_data/images/*.png and four
sample_data/dogs-cats photos, NHWC float32) to tcl (its OpenCL kernels on --device, PoCL on a CPU) and to the
reference (onnxruntime with 2 threads for ONNX, Keras `model.predict` on the saved .h5 for Keras); then run a one-epoch
fine-tune with the library (`recipe_from_dict` + `train.finetune`) on 8 images per class of sample_data/dogs-cats,
batch 4, cut before the classifier (`cut_after` = the layer feeding the last dense / 1x1-conv classifier, skipping
dropout/flatten/reshape; head `global_avg_pool + dense` for a 4-D cut, `dense` for a 2-D one).

The table: model, source format, loads (or the first line of the error), max relative error of the logits
(max|tcl - ref| / max|ref|), top-1 agreement over the batch (sign agreement for one-logit models), fine-tune (ok, or
the first line of the error), and times. When the error is above 1e-3 the row's details also give the float32 numpy
reference backend's error on the worst image (kernel bug or importer bug?) and the first node that departs: from the
numpy backend (OpenCL suspect), or from onnxruntime's tensor of the same name (ONNX) or Keras' output of the same layer
(Keras). Between 1e-4 and 1e-3 they compare both sides with tcl's float64 numpy backend (is the model itself that
sensitive to float32 rounding?). Full error messages are under the table.

--only takes row names (`resnet18-onnx13`) or base names (`resnet18`: both opsets); --list prints them. Each model
runs in subprocesses (build and reference: `bench/zoo_build.py`, with torch/keras; tcl: this script with --worker,
which never imports torch or keras), so one failure or crash does not stop the table; a worker killed by a signal is
run once more, and the row says so. A section of the --markdown file headed "## Notes (hand-written, kept when the
script rewrites this file)" is kept at its end. Built models, references and the
feature cache live in $TCL_ZOO_CACHE (default ~/.cache/transfercl-zoo/), keyed by row name; --rebuild rebuilds the
selected rows' models.

Set-up (kept out of the project's dependencies; the machine's pip constraint in /etc/xdg/pip caps torch at 2.14.1 /
torchvision 0.29.1, both on local disk):

    python3 -m venv /work/zoo-venv
    /work/zoo-venv/bin/pip install -e /work/main onnx onnxruntime h5py
    /work/zoo-venv/bin/pip install torch==2.14.1 torchvision==0.29.1   # (PyPI's torchvision fails next to 2.13.0)
    /work/zoo-venv/bin/pip install keras                               # Keras 3, run as KERAS_BACKEND=torch
    /work/zoo-venv/bin/pip install jax          # only for NASNetMobile, which Keras refuses to build on torch
    /work/zoo-venv/bin/python bench/zoo.py --markdown bench/results/zoo.md

torch.onnx.export is the TorchScript exporter (dynamo=False; the dynamo exporter needs onnxscript and opset 18+), eval
mode, dynamic batch. Keras models are keras.applications with weights=None and classifier_activation=None (logits),
saved with model.save('x.h5') (legacy HDF5).
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from zoo_build import zoo  # noqa: E402  (no torch/keras import at module level)

CACHE = os.path.expanduser(os.environ.get("TCL_ZOO_CACHE", "~/.cache/transfercl-zoo"))
TOL = 1e-3  # above this the row gets the diagnostics
NOTE_TOL = 1e-4  # above this (and within TOL) a float64 run tells model sensitivity from error
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CAFFE_MEAN = [-103.939, -116.779, -123.68]
COMPARE_IMAGES = ["images/chelsea.png", "images/coffee.png", "dogs-cats/cat/cat_0100.png",
                  "dogs-cats/cat/cat_0101.png", "dogs-cats/dog/dog_0100.png", "dogs-cats/dog/dog_0101.png"]
FINETUNE_PER_CLASS = 8
KEEP = "## Notes (hand-written, kept when the script rewrites this file)"


def input_section(spec):
    """The recipe `input` for a preprocessing family (the same numbers make the comparison batch)."""
    d = {"size": spec["size"], "resize": "shorter_crop"}
    if spec["pre"] == "torch":
        d.update(mean=MEAN, std=STD)
    elif spec["pre"] == "tf":
        d.update(scale=1.0 / 127.5, offset=-1.0)
    elif spec["pre"] == "caffe":
        d.update(channel_order="BGR", scale=1.0, offset=CAFFE_MEAN)
    else:  # raw: the model rescales itself
        d.update(scale=1.0, offset=0.0)
    return d


def comparison_batch(spec):
    """The NHWC float32 batch both sides get, preprocessed by tcl's own Preprocess (as a fine-tune would)."""
    from transfercl_cli.data import Preprocess

    sec = dict(input_section(spec))
    sec["size"] = (spec["size"], spec["size"])
    pre = Preprocess.from_dict(sec)
    return np.stack([pre(os.path.join(ROOT, "sample_data", p)) for p in COMPARE_IMAGES]).astype(np.float32)


def paths(spec):
    x_key = f"{spec['size']}-{spec['pre']}"
    return {"model": os.path.join(CACHE, "models", spec["name"] + spec["ext"]),
            "x": os.path.join(CACHE, "inputs", x_key + ".npy"),
            "run": os.path.join(CACHE, "runs", spec["name"]),
            "features": os.path.join(CACHE, "features", spec["name"]),
            "diag": os.path.join(CACHE, "diag", spec["name"] + "-tcl.npz"),
            "diag_x": os.path.join(CACHE, "diag", spec["name"] + "-x.npy"),
            "data": os.path.join(CACHE, "data", f"dogs-cats-{FINETUNE_PER_CLASS}")}


def ref_path(spec, x):
    h = hashlib.sha1(x.tobytes()).hexdigest()[:12]
    return os.path.join(CACHE, "refs", f"{spec['name']}-{h}.npz")


def first_line(e):
    s = str(e).strip() or type(e).__name__
    return s.splitlines()[0]


def finetune_data():
    """8 images per class of sample_data/dogs-cats, as symlinks in the cache (the recipe's data.root)."""
    root = paths(next(iter(zoo().values())))["data"]
    for c in ("cat", "dog"):
        d = os.path.join(root, c)
        os.makedirs(d, exist_ok=True)
        src = os.path.join(ROOT, "sample_data", "dogs-cats", c)
        for f in sorted(os.listdir(src))[:FINETUNE_PER_CLASS]:
            if not os.path.lexists(os.path.join(d, f)):
                os.symlink(os.path.join(src, f), os.path.join(d, f))
    return root


# --- the tcl side (a subprocess per model: `zoo.py --worker NAME`) ----------------------------------------------------
SKIP_BACK = {"dropout", "identity", "flatten", "reshape"}


def find_cut(g):
    """(cut_after layer, head, classifier) for 'a cut before the classifier': the input of the last dense or conv2d
    node (a 1x1-conv classifier in Keras MobileNet and SqueezeNet), walking back over dropout/identity/flatten/
    reshape; head global_avg_pool + dense after a 4-D tensor, dense after a 2-D one."""
    from transfercl_cli.ops.shapes import infer_shapes

    prod = g.producer()
    cls = next((n for n in reversed(g.nodes) if n.op in ("dense", "conv2d")), None)
    if cls is None:
        raise RuntimeError("no dense or conv2d layer to cut before")
    t = cls.inputs[0]
    while t in prod and prod[t].op in SKIP_BACK:
        t = prod[t].inputs[0]
    if t not in prod:
        raise RuntimeError(f"the classifier '{cls.name}' reads the graph input")
    shape = infer_shapes(g)[t]
    head = ["global_avg_pool", {"dense": "auto"}] if len(shape) == 3 else [{"dense": "auto"}]
    return prod[t].name, head, cls.name


def first_departure(g, got, want, tol, what):
    """The first node (graph order) whose output in `got` departs from `want` by more than tol (relative)."""
    checked = 0
    for n in g.nodes:
        t = n.output
        if t not in got or t not in want:
            continue
        a, r = np.asarray(got[t], np.float64), np.asarray(want[t], np.float64)
        checked += 1
        e = float(np.abs(a - r).max() / max(np.abs(r).max(), 1e-12)) if a.shape == r.shape else float("inf")
        if not np.isfinite(e) or e > tol:
            return (f"first OpenCL departure from {what} at node '{n.name}' ({n.op}, from {n.source}): rel err "
                    f"{e:.2e} ({checked - 1} nodes before it agree)")
    return f"no node departs from {what} ({checked} compared)"


def onnx_first_divergence(g, model_path, x, got_env, tol):
    """The first tcl tensor (graph order) whose onnxruntime namesake departs from it by more than tol (relative)."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(model_path)
    m = onnx.shape_inference.infer_shapes(m)
    known = {o.name for o in m.graph.output}
    vis = {v.name: v for v in m.graph.value_info}
    want = [t for n in g.nodes for t in n.outputs if t in vis or t in known]
    for t in want:
        if t not in known:
            m.graph.output.append(vis[t])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    vals = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x.transpose(0, 3, 1, 2).copy()})))
    nchw = g.meta.get("input_layout") == "NCHW"
    checked = 0
    for n in g.nodes:
        for t in n.outputs:
            if t not in vals or t not in got_env:
                continue
            r, a = vals[t], got_env[t]
            if r.ndim == 4 and nchw and a.ndim == 4:
                r = r.transpose(0, 2, 3, 1)
            if r.shape != a.shape:
                return f"tensor '{t}' of node '{n.name}' ({n.op}, from {n.source}): shape {a.shape} vs onnxruntime " \
                       f"{r.shape}"
            checked += 1
            e = float(np.abs(a.astype(np.float64) - r).max() / max(np.abs(r).max(), 1e-12))
            if not np.isfinite(e) or e > tol:
                return f"first departure at node '{n.name}' ({n.op}, from {n.source}), tensor '{t}': rel err {e:.2e} " \
                       f"({checked - 1} tensors before it agree)"
    return f"no named intermediate tensor departs ({checked} compared)"


def worker(name, device, skip_finetune, diagnose=True):
    from transfercl_cli.backends import CLBackend, NumpyBackend, make_backend
    from transfercl_cli.executor import run_forward
    from transfercl_cli.importers import load_model

    spec = zoo()[name]
    p = paths(spec)
    x = np.load(p["x"])
    res = {"name": name, "notes": []}
    t0 = time.perf_counter()
    try:
        g = load_model(p["model"])
    except Exception as e:  # noqa: BLE001 - every failure is a row of the table
        res.update(loads=False, error=first_line(e), error_full=f"{type(e).__name__}: {e}")
        return res
    res.update(loads=True, load_s=round(time.perf_counter() - t0, 1), nodes=len(g.nodes), params=g.num_params())
    with np.load(ref_path(spec, x)) as f:
        ref = f["y"]
        if "note" in f.files and str(f["note"]):
            res["notes"].append("reference: " + str(f["note"]))
    if device == "numpy":
        be = NumpyBackend(np.float32)
    else:
        from transfercl_cli.runtime import get_runtime

        rt = get_runtime(device)
        be = CLBackend(rt) if rt is not None else make_backend(device)
    res["device"] = getattr(getattr(be, "rt", None), "info", None).name if hasattr(be, "rt") else "numpy float32"
    inp = next(iter(g.inputs))
    try:
        t0 = time.perf_counter()
        got = run_forward(g, be, {inp: x})[g.outputs[0]]
        res["forward_s"] = round(time.perf_counter() - t0, 1)
        got = np.asarray(got).reshape(len(x), -1) if got.size == ref.size else got
        if got.shape != ref.shape:
            raise RuntimeError(f"tcl's output shape {got.shape} differs from the reference's {ref.shape}")
        err = float(np.abs(got.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))
        res["rel_err"] = err if np.isfinite(err) else "nan"
        res["ref_max"] = float(np.abs(ref).max())
        # Do the logits depend on the image? (made-up BN statistics can wash every input out to one answer)
        res["ref_spread"] = float((ref.max(axis=0) - ref.min(axis=0)).max() / max(np.abs(ref).max(), 1e-12))
        if ref.shape[1] == 1:
            res["top1"] = f"{int(np.sum((got[:, 0] > 0) == (ref[:, 0] > 0)))}/{len(x)} (sign)"
        else:
            res["top1"] = f"{int(np.sum(got.argmax(1) == ref.argmax(1)))}/{len(x)}"
        if diagnose and np.isfinite(err) and NOTE_TOL < err <= TOL:
            # Close, but above float32 noise: is the model itself that sensitive? Ask the float64 numpy backend.
            d = np.abs(got.astype(np.float64) - ref).max(axis=1)
            i = int(np.argmax(d))
            e64 = run_forward(g, NumpyBackend(np.float64), {inp: x[i:i + 1]})[g.outputs[0]].reshape(1, -1)
            scale = max(np.abs(e64).max(), 1e-12)
            res["notes"].append(f"worst image {COMPARE_IMAGES[i]}: against tcl's float64 numpy backend the reference "
                                f"departs by {np.abs(ref[i:i + 1] - e64).max() / scale:.1e} and OpenCL by "
                                f"{np.abs(got[i:i + 1] - e64).max() / scale:.1e} (similar numbers: the model is "
                                "that sensitive to float32 rounding, not an error in either)")
        if diagnose and not (np.isfinite(err) and err <= TOL):
            try:
                # One image (the worst), every intermediate tensor, on the float32 numpy reference backend.
                d = np.abs(got.astype(np.float64) - ref).max(axis=1)
                i = int(np.argmax(np.where(np.isfinite(d), d, np.inf)))
                xi, refi = x[i:i + 1], ref[i:i + 1]
                env_outs = [t for n in g.nodes for t in n.outputs]
                ngot = run_forward(g, NumpyBackend(np.float32), {inp: xi}, outputs=env_outs)
                a = ngot[g.outputs[0]].reshape(refi.shape)
                e2 = float(np.abs(a.astype(np.float64) - refi).max() / max(np.abs(refi).max(), 1e-12))
                e1 = float(d[i] / max(np.abs(refi).max(), 1e-12))
                res["notes"].append(f"worst image {COMPARE_IMAGES[i]}: OpenCL rel err {e1:.2e}, numpy float32 "
                                    f"backend {e2:.2e} ({'importer/op semantics' if e2 > TOL else 'OpenCL kernels'}"
                                    " suspect)")
                if e2 <= TOL:  # the numpy backend agrees: find the first OpenCL node that departs from it
                    cl = run_forward(g, be, {inp: xi}, outputs=env_outs)
                    res["notes"].append(first_departure(g, cl, ngot, TOL, "the numpy backend"))
                elif spec["family"] == "torchvision":
                    res["notes"].append(onnx_first_divergence(g, p["model"], xi, ngot, TOL))
                else:  # the driver asks Keras (zoo_build.py diverge) with this image's tensors
                    os.makedirs(os.path.dirname(p["diag"]), exist_ok=True)
                    np.save(p["diag_x"], xi)
                    np.savez(p["diag"], **{n.name: ngot[n.output] for n in g.nodes if n.output in ngot})
                    res["keras_diag"] = True
            except Exception as e:  # noqa: BLE001
                res["notes"].append(f"diagnosis failed: {type(e).__name__}: {first_line(e)}")
    except Exception as e:  # noqa: BLE001
        res.update(run_error=first_line(e), run_error_full=f"{type(e).__name__}: {e}")
    if skip_finetune:
        return res
    try:
        from transfercl_cli.recipe import recipe_from_dict
        from transfercl_cli.train import finetune

        cut, head, cls = find_cut(g)
        res["cut_after"], res["head"], res["classifier"] = cut, head, cls
        # A fresh feature cache per row: rows that share weights (the two opsets) must each run their own prefix.
        shutil.rmtree(p["features"], ignore_errors=True)
        os.environ["TCL_FEATURE_CACHE"] = p["features"]
        shutil.rmtree(p["run"], ignore_errors=True)
        recipe = recipe_from_dict({
            "model": p["model"], "data": {"root": finetune_data(), "test": 0.25}, "input": input_section(spec),
            "cut_after": cut, "head": head, "train": {"epochs": 1, "batch_size": 4, "lr": 0.01},
            "device": device, "output": p["run"]}, base_dir=ROOT)
        t0 = time.perf_counter()
        s = finetune(recipe, quiet=True, log=lambda *a: None, force=True)
        res["finetune_s"] = round(time.perf_counter() - t0, 1)
        with open(os.path.join(p["run"], "report.json")) as f:
            rep = json.load(f)
        hist = rep.get("history") or [{}]
        res["finetune"] = "ok"
        shutil.rmtree(p["run"], ignore_errors=True)  # (a failed run's directory stays, to look at)
        shutil.rmtree(p["features"], ignore_errors=True)
        res["finetune_info"] = (f"train loss {hist[-1].get('train_loss', float('nan')):.3f}, test accuracy "
                                f"{rep.get('accuracy', float('nan')):.2f} on {rep.get('num_samples', '?')} images")
        del s
    except Exception as e:  # noqa: BLE001
        res.update(finetune=None, finetune_error=first_line(e), finetune_error_full=f"{type(e).__name__}: {e}")
    return res


# --- the driver -------------------------------------------------------------------------------------------------------
def _sub(cmd, timeout, env=None):
    """Run a subprocess; (ok, stdout, message) with the stderr tail when it fails."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return False, "", f"timed out after {timeout} s"
    if r.returncode != 0:
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        last = next((ln for ln in reversed(tail) if not ln.startswith(" ")), tail[-1] if tail else "")
        return False, r.stdout, f"exit code {r.returncode}: {last}" + ("\n" + "\n".join(tail[-25:]) if tail else "")
    return True, r.stdout, ""


def ensure_built(spec, rebuild, timeout, log):
    p = paths(spec)
    if rebuild and os.path.exists(p["model"]):
        os.remove(p["model"])
    if os.path.exists(p["model"]):
        return None
    os.makedirs(os.path.dirname(p["model"]), exist_ok=True)
    log(f"  building {spec['name']} ...")
    spec["_built"] = True
    ok, _, msg = _sub([sys.executable, os.path.join(HERE, "zoo_build.py"), "build", spec["name"], p["model"]],
                      timeout)
    return None if ok else f"build failed: {msg}"


def ensure_ref(spec, timeout, log):
    p = paths(spec)
    os.makedirs(os.path.dirname(p["x"]), exist_ok=True)
    x = comparison_batch(spec)
    if not os.path.exists(p["x"]) or not np.array_equal(np.load(p["x"]), x):
        np.save(p["x"], x)
    rp = ref_path(spec, x)
    if os.path.exists(rp) and os.path.getmtime(rp) >= os.path.getmtime(p["model"]):
        return None
    os.makedirs(os.path.dirname(rp), exist_ok=True)
    log(f"  reference for {spec['name']} ...")
    spec["_ref"] = True
    ok, _, msg = _sub([sys.executable, os.path.join(HERE, "zoo_build.py"), "ref", spec["name"], p["model"], p["x"],
                       rp], timeout)
    return None if ok else f"reference failed: {msg}"


def run_row(spec, args, log):
    t0 = time.perf_counter()
    row = {"name": spec["name"], "format": spec["fmt"], "notes": []}
    err = ensure_built(spec, args.rebuild, args.timeout, log) or ensure_ref(spec, args.timeout, log)
    if err:
        row.update(loads=None, setup_error=err)
        return row
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec["name"], "--device", args.device]
    if args.skip_finetune:
        cmd.append("--skip-finetune")
    ok, out, msg = _sub(cmd, args.timeout)
    if not ok and msg.startswith("exit code -"):  # killed by a signal (a crash in the OpenCL driver?): once more
        log(f"  tcl worker crashed ({msg.splitlines()[0]}); trying once more")
        row["notes"].append(f"the tcl worker crashed once ({msg.splitlines()[0]}; stderr tail: "
                            f"{' / '.join(msg.splitlines()[-3:])[:400]}) and was run again")
        ok, out, msg = _sub(cmd, args.timeout)
    if ok:
        row.update(json.loads(out.strip().splitlines()[-1]))
        if row.pop("keras_diag", False):
            p = paths(spec)
            ok, out, msg = _sub([sys.executable, os.path.join(HERE, "zoo_build.py"), "diverge", spec["name"],
                                 p["model"], p["diag_x"], p["diag"], str(TOL)], args.timeout)
            row["notes"].append(out.strip().splitlines()[-1] if ok and out.strip() else f"Keras diagnosis failed: "
                                                                                        f"{msg.splitlines()[0]}")
            for k in ("diag", "diag_x"):
                if os.path.exists(p[k]):
                    os.remove(p[k])
    else:
        row.update(loads=None, worker_error=f"tcl worker failed: {msg}")
    row["row_s"] = round(time.perf_counter() - t0, 1)
    row["built"], row["ref_computed"] = bool(spec.get("_built")), bool(spec.get("_ref"))
    return row


def _cell(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


def table(rows, skip_finetune):
    head = ["model", "source format", "loads", "max rel err", "top-1", "fine-tune", "time (s): load / fwd / ft"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("setup_error"):
            loads = f"(not run: {r['setup_error'].splitlines()[0]})"
        elif r.get("worker_error"):
            loads = f"(worker crashed: {r['worker_error'].splitlines()[0]})"
        elif r.get("loads"):
            loads = "yes" if not r.get("run_error") else f"yes; forward fails: {r['run_error']}"
        else:
            loads = f"no: {r.get('error')}"
        err = r.get("rel_err")
        err = "-" if err is None else (err if isinstance(err, str) else f"{err:.1e}")
        if skip_finetune or not r.get("loads"):
            ft = "-"
        else:
            ft = r.get("finetune") or f"fails: {r.get('finetune_error')}"
        times = " / ".join("-" if r.get(k) is None else str(r[k]) for k in ("load_s", "forward_s", "finetune_s"))
        lines.append("| " + " | ".join(_cell(c) for c in (r["name"], r["format"], loads, err, r.get("top1", "-"),
                                                           ft, times)) + " |")
    return "\n".join(lines)


def details(rows):
    out = []
    for r in rows:
        bits = []
        if r.get("cut_after"):
            bits.append(f"cut after `{r['cut_after']}` (classifier `{r['classifier']}`), head {r['head']}"
                        + (f", one epoch: {r['finetune_info']}" if r.get("finetune_info") else ""))
        if r.get("ref_max") is not None:
            bits.append(f"max |reference logit| {r['ref_max']:.3g}" + (
                f", spread across the images {r['ref_spread']:.2f} of it" if r.get("ref_spread") is not None else ""))
        bits += r.get("notes", [])
        for k in ("setup_error", "worker_error", "error_full", "run_error_full", "finetune_error_full"):
            if r.get(k):
                bits.append(f"{k.replace('_full', '').replace('_', ' ')}:\n\n```\n{r[k].strip()[:3000]}\n```")
        if bits:
            out.append(f"- **{r['name']}**: " + "; ".join(b for b in bits if not b.startswith(("setup", "worker",
                                                                                              "error", "run error",
                                                                                              "finetune error")))
                       + "".join("\n\n  " + b.replace("\n", "\n  ") for b in bits
                                 if b.startswith(("setup", "worker", "error", "run error", "finetune error"))))
    return "\n".join(out)


def versions():
    v = {"python": platform.python_version()}
    for mod in ("numpy", "onnx", "onnxruntime", "h5py", "torch", "torchvision", "keras", "jax", "pyopencl"):
        try:
            out = subprocess.run([sys.executable, "-c", f"import {mod}; print({mod}.__version__)"], capture_output=True,
                                 text=True, timeout=120, env=dict(os.environ, KERAS_BACKEND="torch"))
            v[mod] = out.stdout.strip() or "?"
        except Exception:  # noqa: BLE001
            v[mod] = "?"
    try:
        v["tcl"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True).stdout.strip() + (" + uncommitted changes" if subprocess.run(
                                      ["git", "-C", ROOT, "status", "--porcelain"], capture_output=True,
                                      text=True).stdout.strip() else "")
    except OSError:
        v["tcl"] = "?"
    return v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated row or base names (resnet18-onnx13, resnet18, k_xception)")
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--markdown", help="write the table (with date, versions, command, details) to this file")
    ap.add_argument("--device", default=os.environ.get("TCL_DEVICE", "cpu"), help="tcl device (default cpu: PoCL)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the selected models (and their references)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per subprocess (build, reference, tcl)")
    ap.add_argument("--list", action="store_true", help="print the row names and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = worker(args.worker, args.device, args.skip_finetune)
        print(json.dumps(res, default=str))
        return 0
    specs = zoo()
    if args.list:
        print("\n".join(specs))
        return 0
    if args.only:
        want = [w.strip() for w in args.only.split(",") if w.strip()]
        bad = [w for w in want if w not in specs and not any(s["base"] == w for s in specs.values())]
        if bad:
            ap.error(f"unknown model(s) {bad}; --list prints the names")
        specs = {k: s for k, s in specs.items() if k in want or s["base"] in want}
    cmdline = "python bench/zoo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = datetime.datetime.now()
    t_all = time.perf_counter()
    rows = []

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    for i, spec in enumerate(specs.values()):
        log(f"[{i + 1}/{len(specs)}] {spec['name']}")
        row = run_row(spec, args, log)
        rows.append(row)
        log("  " + table([row], args.skip_finetune).splitlines()[-1])
    total = time.perf_counter() - t_all
    tab = table(rows, args.skip_finetune)
    print(tab)
    print(f"\n{len(rows)} rows in {total / 60:.1f} min")
    if args.markdown:
        v = versions()
        ok = sum(1 for r in rows if r.get("loads") and isinstance(r.get("rel_err"), float) and r["rel_err"] <= TOL)
        nb, nr = sum(r.get("built", False) for r in rows), sum(r.get("ref_computed", False) for r in rows)
        md = ["# The zoo (issue 14)", "",
              f"Date: {started:%Y-%m-%d %H:%M} ({total / 60:.1f} min for {len(rows)} rows, {nb} models built and "
              f"{nr} references computed in this run, the others from the cache; {os.cpu_count()} CPU cores shared "
              f"with other work, so times are upper bounds). Command: `{cmdline}` "
              f"(environment: the docstring of bench/zoo.py).", "",
              "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
              f"tcl device: {next((r['device'] for r in rows if r.get('device')), args.device)}. Inputs: "
              f"{len(COMPARE_IMAGES)} images ({', '.join(os.path.basename(c) for c in COMPARE_IMAGES)}), "
              "preprocessed once by tcl's Preprocess for the model's family, the same float32 array for both sides. "
              f"Fine-tune: {FINETUNE_PER_CLASS} images per class of sample_data/dogs-cats (test split 0.25), batch 4, "
              "1 epoch, frozen backbone, new head. Random weights, so top-1 agreement is over near-random logits.", "",
              f"{ok} of {len(rows)} rows load and match their reference within {TOL:g}.", "",
              tab, "", "## Details (cut points, diagnostics, full errors)", "", details(rows), ""]
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        if os.path.exists(args.markdown):  # a hand-written section at the end survives the rewrite
            with open(args.markdown) as f:
                old = f.read()
            if KEEP in old:
                md += [old[old.index(KEEP):].rstrip(), ""]
        with open(args.markdown, "w") as f:
            f.write("\n".join(md))
        with open(os.path.splitext(args.markdown)[0] + ".json", "w") as f:
            json.dump({"date": started.isoformat(timespec="seconds"), "command": cmdline, "versions": v,
                       "minutes": round(total / 60, 1), "rows": rows}, f, indent=1, default=str)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
