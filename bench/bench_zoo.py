"""Speed across architectures (issue 15): tcl against onnxruntime (inference) and PyTorch CPU (training), same run.

    python bench/bench_zoo.py [--models resnet18,mobilenet_v1,...] [--work fwd1,fwd8,fwd32,train_all]
                              [--rounds 3] [--repeats 5] [--layers] [--quick] [--timeout 600]
                              [--markdown bench/results/bench_zoo.md] [--list]

Models: the torchvision classifiers of bench/zoo_build.py (random weights, BatchNorm statistics randomised, exported
by torch.onnx at opset 17, cached in $TCL_ZOO_CACHE like bench/zoo.py) and the real MobileNet V1 (tcl reads
sample_data/models/mobilenet_v1_1.0_224.h5, onnxruntime ../shared/models/mobilenet_v1_1.0_224.onnx, the same network).
Work (each measured in its own process, so peak RSS is its own; a crash or timeout is a row's error, not the end):
  fwd1, fwd8, fwd32   inference at batch 1 / 8 / 32 (fwd32: MobileNet V1 only): tcl (BN folded, fused epilogues)
                      against onnxruntime with 2 intra-op threads and 1 inter-op thread, same float32 input
  train_all           a training step at batch 16 with every layer trainable (SGD, cross-entropy): tcl (cut before
                      the classifier, new global_avg_pool + dense head; its ONNX graph has the BatchNorms folded)
                      against PyTorch channels_last, 2 threads, the torchvision model with its BatchNorms in train
                      mode and its own classifier (MobileNet V1's training rows are bench/bench_mobilenet.py's)
Contenders alternate within each round; a figure is the median over rounds of each process's median of --repeats
timed calls after one warm-up call. "warm-up" is the first call's time (tcl: kernels from the on-disk cache;
onnxruntime: session creation + first run). Ratios are tcl / other (> 1: tcl faster); the geometric mean is per work
column. --layers prints tcl's per-op time, GFLOP/s and fraction of the GEMM rate (bench_mobilenet.py's tables).
A section of the --markdown file headed "## Notes (hand-written, kept when the script rewrites this file)" is kept;
JSON of every measurement goes next to it (.json).

Set-up: the venv of bench/zoo.py (torch 2.14.1, torchvision 0.29.1, onnxruntime, onnx, tcl installed editable);
`make bench-zoo` runs it with $(BENCH_PY) (default /work/zoo-venv/bin/python).
"""
import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from bench_mobilenet import layer_times, peak_rss_mb, sgd_step, train_layer_times  # noqa: E402
from zoo import KEEP, _sub, ensure_built, find_cut, paths  # noqa: E402
from zoo_build import zoo  # noqa: E402

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
          "regnet_x_400mf", "densenet121", "squeezenet1_1", "inception_v3", "vgg11", "mobilenet_v1"]
WORK = ["fwd1", "fwd8", "fwd32", "train_all"]
TRAIN_BATCH = 16
MNV1_H5 = os.path.join(ROOT, "sample_data", "models", "mobilenet_v1_1.0_224.h5")
MNV1_ONNX = os.path.join(os.path.dirname(ROOT), "shared", "models", "mobilenet_v1_1.0_224.onnx")


def spec_of(model):
    if model == "mobilenet_v1":
        return {"name": "mobilenet_v1", "size": 224, "tcl": MNV1_H5, "onnx": MNV1_ONNX, "nchw": False}
    s = dict(zoo()[f"{model}-onnx17"])
    p = paths(s)["model"]
    return dict(s, tcl=p, onnx=p, nchw=True)


def contenders(model, work):
    if work == "fwd32" and model != "mobilenet_v1":
        return []
    if work.startswith("fwd"):
        return ["tcl", "onnxruntime"]
    return [] if model == "mobilenet_v1" else ["tcl", "torch"]


def batch_of(work):
    return TRAIN_BATCH if work.startswith("train") else int(work[3:])


def inputs(size, batch):
    return np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)  # NHWC


# --- workers (one process each) ---------------------------------------------------------------------------------------
def timed(call, repeats):
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:])


def tcl_forward(spec, batch, repeats, layers):
    from transfercl_cli.backends import make_backend
    from transfercl_cli.executor import Executor
    from transfercl_cli.plan import fold_frozen
    from transfercl_cli.runfile import load_any_model

    be = make_backend(os.environ.get("TCL_DEVICE", "cpu"))
    eg = fold_frozen(load_any_model(spec["tcl"]), set())
    ex = Executor(eg, be)
    inp, outn = next(iter(eg.inputs)), eg.outputs[0]
    x = inputs(spec["size"], batch)

    def call():
        out = ex.forward({inp: x})
        be.to_host(out[outn])
        be.release(out[outn])

    warm, med = timed(call, repeats)
    if layers:
        layer_times(eg, be, x)
    return {"warmup_s": warm, "median_s": med}


def tcl_train(spec, batch, repeats, layers):
    from transfercl_cli.backends import make_backend
    from transfercl_cli.executor import Executor
    from transfercl_cli.plan import build_plan
    from transfercl_cli.recipe import recipe_from_dict
    from transfercl_cli.runfile import load_any_model
    from transfercl_cli.train import Optimizer

    be = make_backend(os.environ.get("TCL_DEVICE", "cpu"))
    g = load_any_model(spec["tcl"])
    cut, head, _ = find_cut(g)
    r = recipe_from_dict({"model": spec["tcl"], "data": {"root": "."}, "cut_after": cut, "head": head,
                          "freeze": "none", "train": {"cache": "off", "lr": 0.001}})
    plan = build_plan(g, r, ["a", "b"])
    eg = plan.exec_graph
    ex = Executor(eg, be, plan.trainable)
    opt = Optimizer(be, r["train"])
    y = be.asarray(np.arange(batch, dtype=np.int32) % 2)
    step = sgd_step(be, ex, opt, inputs(spec["size"], batch), y)

    warm, med = timed(step, repeats)
    if layers:
        train_layer_times(ex, be, step, batch)
    return {"warmup_s": warm, "median_s": med}


def ort_forward(spec, batch, repeats, layers):
    import onnxruntime as ort

    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    sess = ort.InferenceSession(spec["onnx"], so, providers=["CPUExecutionProvider"])
    x = inputs(spec["size"], batch)
    if spec["nchw"]:
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})
    warm = time.perf_counter() - t0
    _, med = timed(lambda: sess.run(None, {name: x}), repeats)
    return {"warmup_s": warm, "median_s": med}


def torch_train(spec, batch, repeats, layers):
    import torch
    import torchvision
    from zoo_build import TORCHVISION

    torch.set_num_threads(2)
    torch.manual_seed(0)
    ctor, kwargs, _ = TORCHVISION[spec["base"]]
    kwargs = dict(kwargs, aux_logits=False) if spec["base"] == "inception_v3" else kwargs
    model = getattr(torchvision.models, ctor)(weights=None, **kwargs).train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    x = torch.from_numpy(inputs(spec["size"], batch).transpose(0, 3, 1, 2).copy()).to(
        memory_format=torch.channels_last)
    y = torch.arange(batch) % 2
    lossf = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        lossf(model(x), y).backward()
        opt.step()

    warm, med = timed(step, repeats)
    return {"warmup_s": warm, "median_s": med}


WORKERS = {("tcl", "fwd"): tcl_forward, ("tcl", "train"): tcl_train, ("onnxruntime", "fwd"): ort_forward,
           ("torch", "train"): torch_train}


def worker(who, model, work, repeats, layers):
    spec = spec_of(model)
    batch = batch_of(work)
    res = WORKERS[(who, work[:3] if work.startswith("fwd") else "train")](spec, batch, repeats, layers)
    res.update(img_s=batch / res["median_s"], peak_rss_mb=peak_rss_mb())
    print("RESULT " + json.dumps(res))


# --- the driver ------------------------------------------------------------------------------------------------------
def measure(who, model, work, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", who, model, work, str(args.repeats)]
    if args.layers and who == "tcl":
        cmd.append("--layers")
    ok, out, msg = _sub(cmd, args.timeout)
    if args.layers and who == "tcl" and out:
        print("\n".join(ln for ln in out.splitlines() if not ln.startswith("RESULT ")))
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None) if ok else None
    return json.loads(line[7:]) if line else {"error": (msg or "no result").splitlines()[0]}


def prepare(model, args, log):
    """The model file (built on first use); an error string when it cannot be had."""
    if model == "mobilenet_v1":
        return None if os.path.exists(MNV1_ONNX) else f"{MNV1_ONNX} is absent (../shared)"
    s = zoo()[f"{model}-onnx17"]
    return ensure_built(s, False, args.timeout, log)


def ratio(r, who_other):
    a, b = r.get("tcl", {}), r.get(who_other, {})
    return a["img_s"] / b["img_s"] if "img_s" in a and "img_s" in b else None


def geomean(vals):
    vals = [v for v in vals if v]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None


def summarise(samples):
    """samples: [{who: result}] per round -> {who: median result (img_s median over rounds, max RSS, min warm-up)}."""
    out = {}
    for who in {w for s in samples for w in s}:
        rs = [s[who] for s in samples if who in s]
        good = [r for r in rs if "img_s" in r]
        if not good:
            out[who] = {"error": rs[0].get("error", "failed")}
            continue
        out[who] = {"img_s": statistics.median(r["img_s"] for r in good),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in good),
                    "warmup_s": min(r["warmup_s"] for r in good), "rounds": [round(r["img_s"], 2) for r in good]}
    return out


def fmt(r, key, f):
    return f.format(r[key]) if key in r else ("error" if "error" in r else "-")


def markdown(table, works, load):
    other = {w: "onnxruntime" if w.startswith("fwd") else "torch" for w in works}
    lines = [f"Generated {datetime.date.today()} by `bench/bench_zoo.py`; load average {load[0]} before, {load[1]} "
             "after; PoCL on 2 cores. Cells: tcl img/s / other img/s = ratio (tcl / other); other is onnxruntime "
             "(2 threads) for forward, PyTorch channels_last (2 threads) for training.", "",
             "| model | " + " | ".join(works) + " | tcl warm-up fwd8 (s) | ORT warm-up fwd8 (s) | peak RSS train tcl / torch (MB) |",
             "|---" * (len(works) + 4) + "|"]
    for model, rows in table.items():
        cells = []
        for w in works:
            r = rows.get(w)
            if not r:
                cells.append("-")
                continue
            t, o, q = r.get("tcl", {}), r.get(other[w], {}), ratio(r, other[w])
            cells.append(f"{fmt(t, 'img_s', '{:.1f}')} / {fmt(o, 'img_s', '{:.1f}')}" + (f" = {q:.2f}x" if q else ""))
        f8 = rows.get("fwd8", {})
        tr = rows.get("train_all", {})
        cells += [fmt(f8.get("tcl", {}), "warmup_s", "{:.2f}"), fmt(f8.get("onnxruntime", {}), "warmup_s", "{:.2f}"),
                  f"{fmt(tr.get('tcl', {}), 'peak_rss_mb', '{:.0f}')} / {fmt(tr.get('torch', {}), 'peak_rss_mb', '{:.0f}')}"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    gm = [geomean([ratio(rows[w], other[w]) for rows in table.values() if w in rows]) for w in works]
    lines.append("| geometric mean | " + " | ".join(f"{g:.2f}x" if g else "-" for g in gm) + " | | | |")
    errs = [f"- {m} {w} {who}: {r['error']}" for m, rows in table.items() for w, rr in rows.items()
            for who, r in rr.items() if "error" in r]
    return "\n".join(lines + ([""] + ["Errors:"] + errs if errs else [])) + "\n"


def write_markdown(path, text, data):
    notes = ""
    if os.path.exists(path):
        old = open(path).read()
        if KEEP in old:
            notes = "\n" + old[old.index(KEEP):]
    for p, body in ((path, "# tcl vs onnxruntime / PyTorch across architectures\n\n" + text + notes),
                    (os.path.splitext(path)[0] + ".json", json.dumps(data, indent=1))):
        with open(p + ".part", "w") as f:
            f.write(body)
        os.replace(p + ".part", p)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--work", default=",".join(WORK))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", action="store_true")
    ap.add_argument("--quick", action="store_true", help="1 round of 2 repeats: does it work?")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--markdown")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--worker", nargs=4, metavar=("WHO", "MODEL", "WORK", "REPEATS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        who, model, work, reps = args.worker
        return worker(who, model, work, int(reps), args.layers)
    if args.list:
        print("\n".join(MODELS))
        return
    if args.quick:
        args.rounds, args.repeats = 1, 2
    models = [m for m in args.models.split(",") if m]
    works = [w for w in args.work.split(",") if w]
    unknown = [m for m in models if m not in MODELS] + [w for w in works if w not in WORK]
    if unknown:
        raise SystemExit(f"unknown model or work: {', '.join(unknown)} (--list; work: {', '.join(WORK)})")
    load0 = os.getloadavg()[0]
    print(f"load average {load0:.2f}", flush=True)
    table = {}
    for model in models:
        err = prepare(model, args, lambda s: print(s, flush=True))
        table[model] = {}
        for work in works:
            whos = contenders(model, work)
            if not whos:
                continue
            if err:
                table[model][work] = {w: {"error": err} for w in whos}
                continue
            samples = []
            for rnd in range(args.rounds):
                order = whos if rnd % 2 == 0 else whos[::-1]  # alternate who goes first
                samples.append({who: measure(who, model, work, args) for who in order})
            table[model][work] = summarise(samples)
            r = table[model][work]
            print(f"{model:20s} {work:10s} " + "  ".join(
                f"{w} {fmt(r[w], 'img_s', '{:.1f}')} img/s" for w in whos) +
                (f"  ratio {ratio(r, whos[1]):.2f}x" if ratio(r, whos[1]) else ""), flush=True)
        if args.markdown:  # after every model: an interrupted run keeps the rows it measured
            report(args.markdown, table, works, load0)
    print(report(args.markdown, table, works, load0))


def report(path, table, works, load0):
    load1 = os.getloadavg()[0]
    text = markdown(table, works, (f"{load0:.2f}", f"{load1:.2f}"))
    if path:
        write_markdown(path, text, {"load": [load0, load1], "table": table})
    return text


if __name__ == "__main__":
    main()
