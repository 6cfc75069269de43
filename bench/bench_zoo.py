"""Speed across architectures (issue 15): tcl against onnxruntime (inference) and PyTorch CPU (training), same run.

    python bench/bench_zoo.py [--models resnet18,mobilenet_v1,...] [--work fwd1,fwd8,train_last,train_all]
                              [--rounds 3] [--repeats 5] [--quick] [--layers] [--timeout S] [--device cpu]
                              [--opset 17] [--torch-no-bn] [--markdown FILE] [--list]

Models: ResNet-18/50, MobileNetV2, MobileNetV3-Small/Large, EfficientNet-B0, RegNetX-400MF, DenseNet-121,
SqueezeNet 1.1, Inception v3 (299x299), VGG-11 (random-weight torchvision models, exported to ONNX and cached by
bench/zoo_build.py, as bench/zoo.py does: $TCL_ZOO_CACHE, default ~/.cache/transfercl-zoo/), and the real MobileNet
V1 1.0/224 (tcl: sample_data/models/mobilenet_v1_1.0_224.h5; onnxruntime: ../shared/models/mobilenet_v1_1.0_224.onnx,
the same network converted by tf2onnx; PyTorch: the same layers built by bench/bench_mobilenet.py's torch_model, with
random weights). `--list` prints them with the layers each one's `train_last` trains.

Work (the columns; each a (contender, model, work) measurement in its own subprocess):
  fwd1, fwd8    forward at batch 1 and 8: tcl (frozen graph, BN folded) vs onnxruntime (CPU provider, 2 intra-op
                threads, 1 inter-op thread, default graph optimisations); fwd32 too for MobileNet V1
  train_last    a training step at batch 16, SGD (lr 0.001): the last stage + a new 2-class head trainable, the rest
                frozen (tcl: the frozen part runs in inference mode, no feature cache; PyTorch: requires_grad off and
                eval mode for the frozen BatchNorms), vs PyTorch channels_last, torch.set_num_threads(2)
  train_all     the same with every layer trainable
Both sides get the same input: fixed-seed uniform(-1, 1) float32 images (NHWC for tcl, NCHW / channels_last for the
others), labels 0,1,0,1... The training graph on both sides is the model cut before its classifier (tcl: the cut of
bench/zoo.py's find_cut, i.e. the layer feeding the last dense / 1x1-conv classifier) plus global_avg_pool + dense
(2 classes), or dense alone after a 2-D cut; PyTorch replaces the same classifier module by a new nn.Linear.
Note: torch.onnx.export folds the BatchNorms of the torchvision models into their convolutions, so tcl trains a
graph without BatchNorm (except where a BN follows no conv, e.g. DenseNet's pre-activation BNs), while PyTorch
trains the torchvision module with its BatchNorms; --torch-no-bn replaces them by nn.Identity in PyTorch to compare
like with like (the issue's "12.95 with PyTorch's BatchNorms removed").

The contenders alternate (every round runs every measurement, the two contenders in turn, tcl first in even rounds),
over --rounds rounds (default 3; the machine is shared). Each round: warm-up calls (10, or as many as run in 1 s
if fewer: timed_calls), then the median of --repeats timed calls (forward: upload, run, download; training: forward,
loss, backward, SGD update); reported: the median img/s over the rounds, the peak RSS of the process (max over
rounds), tcl / other, the geometric mean of the ratios per work column, and the first-call warm-up: tcl's first
forward after the model is loaded and the executor built (OpenCL kernels come from tcl's on-disk cache after the
first process; the median over rounds, so round 0's compiles count only with --rounds 1) against onnxruntime's
session creation + first run. A crash or timeout (--timeout S seconds per subprocess, default 600) is a row with the
error; that measurement is not retried in later rounds.
The load average is printed at start and end. `--quick` = 1 round of 2 repeats (to check that it works).

`--layers`: after the rounds, one more tcl process per (model, work) prints every node's time (forward, and backward
for training; Executor.per_node_times: the queue drained around every op, so the sum exceeds a normal step), its
share, GFLOP/s for conv/dense and the fraction of tcl's GEMM rate measured in the same process (1568x1024x1024, as
bench/bench_mobilenet.py --layers), then the same summed per op kind; the markdown gets the per-op-kind summary.

--markdown FILE writes the tables (and FILE with .json: every figure and error); a section headed
"## Notes (hand-written, kept when the script rewrites this file)" at the end of FILE is kept. `make bench-zoo`
writes bench/results/bench_zoo.md.

Set-up (benchmark-only dependencies, kept out of the project's; see bench/zoo.py):

    python3 -m venv /work/zoo-venv
    /work/zoo-venv/bin/pip install -e /work/main onnx onnxruntime h5py
    /work/zoo-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/zoo-venv/bin/python bench/bench_zoo.py --markdown bench/results/bench_zoo.md

The first run builds the missing torchvision models (bench/zoo_build.py, a subprocess each; minutes).
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import zoo  # noqa: E402  (no torch/keras/onnxruntime import at module level)
from zoo_build import OPSETS  # noqa: E402

MNV1_H5 = os.path.join(ROOT, "sample_data", "models", "mobilenet_v1_1.0_224.h5")
MNV1_ONNX = os.path.join(os.path.dirname(ROOT), "shared", "models", "mobilenet_v1_1.0_224.onnx")
CLASSES = 2
TRAIN_BATCH = 16
LR = 0.001


def _r(a, b):
    return range(a, b + 1)


# name -> (title, input size, last stage as tcl node-name globs (the ONNX node names tcl imports), the same as
# PyTorch parameter-name prefixes, the PyTorch classifier module the new head replaces). The new head always trains.
def _tv(title, last_tcl, last_torch, head, size=224):
    return dict(title=title, kind="torchvision", size=size, last_tcl=last_tcl, last_torch=last_torch, head=head)


MODELS = {
    "resnet18": _tv("ResNet-18", ["/layer4/*"], ["layer4."], "fc"),
    "resnet50": _tv("ResNet-50", ["/layer4/*"], ["layer4."], "fc"),
    "mobilenet_v2": _tv("MobileNetV2", [f"/features/features.{i}/*" for i in _r(14, 18)],
                        [f"features.{i}." for i in _r(14, 18)], "classifier.1"),
    "mobilenet_v3_small": _tv("MobileNetV3-Small",
                              [f"/features/features.{i}/*" for i in _r(9, 12)] + ["/classifier/classifier.0/*"],
                              [f"features.{i}." for i in _r(9, 12)] + ["classifier.0."], "classifier.3"),
    "mobilenet_v3_large": _tv("MobileNetV3-Large",
                              [f"/features/features.{i}/*" for i in _r(13, 16)] + ["/classifier/classifier.0/*"],
                              [f"features.{i}." for i in _r(13, 16)] + ["classifier.0."], "classifier.3"),
    "efficientnet_b0": _tv("EfficientNet-B0", [f"/features/features.{i}/*" for i in _r(6, 8)],
                           [f"features.{i}." for i in _r(6, 8)], "classifier.1"),
    "regnet_x_400mf": _tv("RegNetX-400MF", ["/trunk_output/block4/*"], ["trunk_output.block4."], "fc"),
    "densenet121": _tv("DenseNet-121", ["/features/denseblock4/*", "/features/norm5*"],
                       ["features.denseblock4.", "features.norm5."], "classifier"),
    "squeezenet1_1": _tv("SqueezeNet 1.1", [f"/features/features.{i}/*" for i in _r(9, 12)],
                         [f"features.{i}." for i in _r(9, 12)], "classifier"),
    "inception_v3": _tv("Inception v3", ["/Mixed_7a/*", "/Mixed_7b/*", "/Mixed_7c/*"],
                        ["Mixed_7a.", "Mixed_7b.", "Mixed_7c."], "fc", size=299),
    "vgg11": _tv("VGG-11", [f"/features/features.{i}/*" for i in _r(16, 20)] + ["/classifier/*"],
                 ["features.16.", "features.18.", "classifier."], "classifier.6"),  # 17, 19, 20: no parameters
    "mobilenet_v1": dict(title="MobileNet V1 1.0/224 (real weights)", kind="mobilenet_v1", size=224,
                         last_tcl=["conv_pw_13*"], last_torch=["mods.conv_pw_13"], head="mods.head_dense",
                         cut="conv_pw_13_relu", extra_fwd=[32]),
}
WORKS = ["fwd1", "fwd8", "fwd32", "train_last", "train_all"]
WORK_TITLES = {"fwd1": "forward b1", "fwd8": "forward b8", "fwd32": "forward b32", "train_last": "train last b16",
               "train_all": "train all b16"}


def works_of(name, wanted):
    extra = {f"fwd{b}" for b in MODELS[name].get("extra_fwd", [])}
    return [w for w in wanted if not (w.startswith("fwd") and w not in ("fwd1", "fwd8") and w not in extra)]


def other_of(work):
    return "ort" if work.startswith("fwd") else "torch"


def batch_of(work):
    return int(work[3:]) if work.startswith("fwd") else TRAIN_BATCH


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def model_file(name, who, opset):
    """The model file a contender loads (tcl/torch read the same file for MobileNet V1: the .h5)."""
    spec = MODELS[name]
    if spec["kind"] == "mobilenet_v1":
        return MNV1_ONNX if who == "ort" else MNV1_H5
    return zoo.paths(zoo.zoo()[f"{name}-onnx{opset}"])["model"]


def images(batch, size, nchw=False):
    x = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if nchw else x


WARMUP_CALLS, WARMUP_S = 10, 1.0


def timed_calls(fn, repeats):
    """(first call seconds, median of `repeats` further calls), after warm-up calls until WARMUP_CALLS calls or
    WARMUP_S seconds, whichever comes first (the same for every contender). tcl on PoCL reaches its steady speed only
    after ~10 calls (MobileNetV2 at batch 1: 6.6 ms at the third call, 4.5 ms from the twelfth; the kernels' own
    times fall alike, measured with OpenCL profiling events), onnxruntime after 2-3 (2.8 ms from the third)."""
    t_start = time.perf_counter()
    warm = []
    while not warm or (len(warm) < WARMUP_CALLS and time.perf_counter() - t_start < WARMUP_S):
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return warm[0], statistics.median(times)


# --- tcl ------------------------------------------------------------------------------------------------------------
def tcl_setup(name, work, opset, device):
    """(backend, executor, step function, info) for one measurement; the step runs one forward or training step."""
    from bench_mobilenet import sgd_step

    from transfercl_cli.backends import make_backend
    from transfercl_cli.executor import Executor
    from transfercl_cli.plan import build_plan, fold_frozen
    from transfercl_cli.recipe import recipe_from_dict
    from transfercl_cli.runfile import load_any_model
    from transfercl_cli.train import PARAM_TRAINED, Optimizer

    spec = MODELS[name]
    be = make_backend(device)
    path = model_file(name, "tcl", opset)
    t0 = time.perf_counter()
    g = load_any_model(path)
    batch = batch_of(work)
    x = images(batch, spec["size"])
    info = {}
    if work.startswith("fwd"):
        eg = fold_frozen(g, set(), engine=True)
        ex = Executor(eg, be)
        inp, outn = next(iter(eg.inputs)), eg.outputs[0]

        def step():
            out = ex.forward({inp: x})[outn]
            be.to_host(out)
            be.release(out)
    else:
        if spec.get("cut"):
            cut, head = spec["cut"], ["global_avg_pool", {"dense": "auto"}]
        else:
            cut, head, _cls = zoo.find_cut(g)
        freeze = {"freeze": "none"} if work == "train_all" else {"freeze": "all", "unfreeze": spec["last_tcl"]}
        r = recipe_from_dict(dict({"model": path, "data": {"root": "."}, "cut_after": cut, "head": head,
                                   "train": {"cache": "off", "lr": LR, "batch_size": batch}}, **freeze))
        plan = build_plan(g, r, [str(i) for i in range(CLASSES)])
        eg = plan.exec_graph
        ex = Executor(eg, be, plan.trainable, plan.half_saved)
        opt = Optimizer(be, r["train"])
        y = be.asarray(np.arange(batch, dtype=np.int32) % CLASSES)
        info.update(cut_after=cut, trainable_params=int(sum(
            v.size for n in plan.graph.nodes if n.name in plan.trainable for k, v in n.params.items()
            if k in PARAM_TRAINED)))
        step = sgd_step(be, ex, opt, x, y, LR)
    info["build_s"] = time.perf_counter() - t0
    return be, ex, step, info


def run_tcl(name, work, repeats, opset, device):
    import transfercl_cli

    be, _ex, step, info = tcl_setup(name, work, opset, device)
    first, med = timed_calls(step, repeats)
    return dict(info, img_s=batch_of(work) / med, median_s=med, first_s=first, peak_rss_mb=peak_rss_mb(),
                versions=f"tcl {transfercl_cli.__version__} on {be.rt.info.name} ({be.rt.info.platform_name} "
                         f"{be.rt.info.driver_version})" if hasattr(be, "rt") else "tcl (numpy backend)")


class _Tap:
    """An executor as bench_mobilenet.train_layer_times sees it, keeping the per-node times it collects."""

    def __init__(self, ex):
        self.graph, self._ex, self.times = ex.graph, ex, {}

    @contextlib.contextmanager
    def per_node_times(self, times):
        self.times = times
        with self._ex.per_node_times(times):
            yield times


def tcl_layers(name, work, opset, device, reps=2):
    """Per-node times on stderr (bench_mobilenet's table), and the same summed per op kind (returned)."""
    import bench_mobilenet

    from transfercl_cli.ops.shapes import infer_shapes, macs
    from transfercl_cli.plan import fused_label

    be, ex, step, _info = tcl_setup(name, work, opset, device)
    step()  # warm-up (kernels built)
    batch = batch_of(work)
    tap = _Tap(ex)
    print(f"== tcl per node: {name} {work} (batch {batch}) ==", file=sys.stderr)
    peaks, gemm_peak = [], bench_mobilenet.gemm_peak
    # train_layer_times measures the GEMM rate itself: keep its figure, for the per-op-kind fractions below too
    bench_mobilenet.gemm_peak = lambda be_, reps=3: peaks.append(gemm_peak(be_, reps)) or peaks[-1]
    try:
        bench_mobilenet.train_layer_times(tap, be, step, batch, reps)
    finally:
        bench_mobilenet.gemm_peak = gemm_peak
    peak = peaks[-1] if peaks else gemm_peak(be)
    shapes = infer_shapes(ex.graph)
    ops = {}
    for n in ex.graph.nodes:
        m = macs(n, [shapes[t] for t in n.inputs], shapes[n.outputs[0]]) * batch
        for kind, flops in (("fwd", 2 * m), ("bwd", 4 * m)):
            if (n.name, kind) in tap.times:
                o = ops.setdefault((fused_label(n), kind), {"ms": 0.0, "flops": 0.0, "nodes": 0})
                o["ms"] += tap.times[(n.name, kind)] / reps * 1e3
                o["flops"] += flops if n.op in ("conv2d", "dense") else 0.0
                o["nodes"] += 1
    total = sum(o["ms"] for o in ops.values())
    rows = []
    for (op, kind), o in sorted(ops.items(), key=lambda kv: -kv[1]["ms"]):
        gf = o["flops"] / (o["ms"] / 1e3) / 1e9 if o["flops"] and o["ms"] > 0 else None
        rows.append(dict(op=op, pass_=kind, nodes=o["nodes"], ms=round(o["ms"], 2), share=o["ms"] / total,
                         gflops=gf, of_gemm=gf / peak if gf else None))
    print(f"-- per op kind: {name} {work} --", file=sys.stderr)
    print(f"{'op':<28} {'pass':<4} {'nodes':>5} {'ms':>9} {'share':>6} {'GFLOP/s':>8} {'of GEMM':>7}",
          file=sys.stderr)
    for r in rows:
        gf = f"{r['gflops']:8.1f} {r['of_gemm']:7.0%}" if r["gflops"] else f"{'':>8} {'':>7}"
        print(f"{r['op']:<28} {r['pass_']:<4} {r['nodes']:5d} {r['ms']:9.2f} {r['share']:6.1%} {gf}", file=sys.stderr)
    print(f"{'total':<28} {'':<4} {'':>5} {total:9.2f}   (GEMM rate in this process: {peak:.0f} GFLOP/s)",
          file=sys.stderr)
    return {"gemm_gflops": peak, "total_ms": total, "ops": rows}


# --- onnxruntime ----------------------------------------------------------------------------------------------------
def run_ort(name, work, repeats, opset):
    import onnxruntime as ort

    path = model_file(name, "ort", opset)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no ONNX model at {path} (MobileNet V1's comes from ../shared; see its README)")
    spec = MODELS[name]
    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = images(batch_of(work), spec["size"], nchw=inp.shape[-1] != 3)
    session_s = time.perf_counter() - t0
    first, med = timed_calls(lambda: sess.run(None, {inp.name: x}), repeats)
    return dict(img_s=batch_of(work) / med, median_s=med, first_s=session_s + first, session_s=session_s,
                peak_rss_mb=peak_rss_mb(), versions=f"onnxruntime {ort.__version__}")


# --- PyTorch --------------------------------------------------------------------------------------------------------
def torch_net(torch, name, no_bn):
    """The PyTorch module for training: the model with its classifier replaced by a new 2-class nn.Linear."""
    import torch.nn as nn

    spec = MODELS[name]
    torch.manual_seed(0)
    if spec["kind"] == "mobilenet_v1":
        from bench_mobilenet import torch_model

        from transfercl_cli.runfile import load_any_model

        net = torch_model(torch, load_any_model(MNV1_H5), "train_all")  # cut at conv_pw_13_relu + GAP + dense
        for m in net.modules():  # random weights, as the torchvision models have
            if hasattr(m, "reset_parameters") and m is not net:
                m.reset_parameters()
        return net
    import torchvision

    from zoo_build import TORCHVISION

    ctor, kwargs, _size = TORCHVISION[name]
    kwargs = dict(kwargs, **({"aux_logits": False} if name == "inception_v3" else {}))
    net = getattr(torchvision.models, ctor)(weights=None, **kwargs)
    parent_path, _, attr = spec["head"].rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    old = getattr(parent, attr)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, CLASSES)
    else:  # SqueezeNet: Dropout, Conv2d(512, 1000, 1), ReLU, AdaptiveAvgPool2d -> GAP + dense, as tcl's head
        cin = next(m for m in old.modules() if isinstance(m, nn.Conv2d)).in_channels
        new = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, CLASSES))
    if isinstance(parent, nn.Sequential):
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)
    if no_bn:
        for mod in list(net.modules()):
            for k, child in list(mod.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(mod, k, nn.Identity())
    return net


def run_torch(name, work, repeats, no_bn):
    import torch

    torch.set_num_threads(2)
    spec = MODELS[name]
    net = torch_net(torch, name, no_bn and spec["kind"] != "mobilenet_v1")
    train_pfx = [spec["head"] + "."] + (spec["last_torch"] if work == "train_last" else [])
    for pfx in train_pfx:  # a prefix that names nothing would freeze what tcl trains
        if not any(n.startswith(pfx) for n, _ in net.named_parameters()):
            raise RuntimeError(f"{work}: no PyTorch parameter name starts with '{pfx}'")
    for n, p in net.named_parameters():
        p.requires_grad = work == "train_all" or any(n.startswith(pfx) for pfx in train_pfx)
    net.train()
    for m in net.modules():  # frozen BatchNorms use their moving statistics, as in tcl
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()
    net = net.to(memory_format=torch.channels_last)
    x = torch.from_numpy(images(TRAIN_BATCH, spec["size"], nchw=True)).contiguous(memory_format=torch.channels_last)
    y = torch.arange(TRAIN_BATCH) % CLASSES
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    lossf = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        lossf(net(x), y).backward()
        opt.step()

    first, med = timed_calls(step, repeats)
    return dict(img_s=TRAIN_BATCH / med, median_s=med, first_s=first, peak_rss_mb=peak_rss_mb(),
                trainable_params=int(sum(p.numel() for p in params)),
                versions=f"torch {torch.__version__} (channels_last, 2 threads" + (", BN removed" if no_bn else "")
                         + ")")


def worker(args):
    who, name, work = args.worker
    if who == "tcl" and args.layers:
        with contextlib.redirect_stderr(sys.stdout):  # the tables come back with the result (the driver prints them)
            res = {"layers": tcl_layers(name, work, args.opset, args.device)}
    elif who == "tcl":
        res = run_tcl(name, work, args.repeats, args.opset, args.device)
    elif who == "ort":
        res = run_ort(name, work, args.repeats, args.opset)
    else:
        res = run_torch(name, work, args.repeats, args.torch_no_bn)
    print(json.dumps(res, default=float))


# --- the driver -----------------------------------------------------------------------------------------------------
def measure(who, name, work, args, layers=False):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", who, name, work, "--repeats", str(args.repeats),
           "--opset", str(args.opset), "--device", args.device] + (["--layers"] if layers else []) + (
               ["--torch-no-bn"] if args.torch_no_bn else [])
    t0 = time.perf_counter()
    ok, out, msg = zoo._sub(cmd, args.timeout)
    if ok:
        if layers:
            print("\n".join(out.strip().splitlines()[:-1]), flush=True)
        try:
            res = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            res = {"error": f"no result line in the output: {out.strip()[-300:]!r}"}
    else:
        res = {"error": msg}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res, msg


def gmean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarise(runs):
    """{(who, model, work): runs} -> the reported figures (medians over rounds; the first error if none ran)."""
    out = {}
    for key, rs in runs.items():
        good = [r for r in rs if "error" not in r]
        if not good:
            out[key] = {"error": rs[0]["error"]}
            continue
        s = {"img_s": statistics.median(r["img_s"] for r in good), "rounds": [round(r["img_s"], 2) for r in good],
             "peak_rss_mb": max(r["peak_rss_mb"] for r in good),
             "first_s": statistics.median(r["first_s"] for r in good), "versions": good[0].get("versions", "")}
        for k in ("build_s", "session_s"):
            if k in good[0]:
                s[k] = statistics.median(r[k] for r in good)
        for k in ("trainable_params", "cut_after"):
            if k in good[0]:
                s[k] = good[0][k]
        out[key] = s
    return out


def ratio(res, name, work):
    t, o = res.get(("tcl", name, work)), res.get((other_of(work), name, work))
    if t and o and "img_s" in t and "img_s" in o:
        return t["img_s"] / o["img_s"]
    return None


def _err1(s):
    return str(s).strip().splitlines()[0][:160] if s else ""


def summary_table(res, models, works):
    wb = next((w for w in works if w.startswith("fwd")), None)  # the warm-up column: the smallest forward batch
    head = ["model"] + [f"{WORK_TITLES[w]}: tcl / {'ORT' if w.startswith('fwd') else 'PyTorch'}" for w in works] + (
        [f"warm-up {WORK_TITLES[wb]} (s): tcl first call (load+build) / ORT session + first run"] if wb else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in models:
        cells = [MODELS[name]["title"]]
        for w in works:
            if w not in works_of(name, works):
                cells.append("")
                continue
            t, o = res.get(("tcl", name, w), {}), res.get((other_of(w), name, w), {})
            q = ratio(res, name, w)
            if q is not None:
                cells.append(f"**{q:.2f}x** ({t['img_s']:.1f} / {o['img_s']:.1f} img/s)")
            else:
                cells.append("; ".join(f"{who} failed: {_err1(d.get('error'))[:90]}" for who, d in
                                       (("tcl", t), (other_of(w), o)) if d.get("error")) or "-")
        if wb:
            t, o = res.get(("tcl", name, wb), {}), res.get(("ort", name, wb), {})
            cells.append(f"{t['first_s']:.2f} ({t['build_s']:.2f}) / {o['first_s']:.2f}"
                         if "first_s" in t and "first_s" in o else "-")
        lines.append("| " + " | ".join(zoo._cell(c) for c in cells) + " |")
    gm = ["geometric mean"]
    for w in works:
        qs = [ratio(res, n, w) for n in models if w in works_of(n, works)]
        g = gmean(qs)
        gm.append(f"**{g:.2f}x** over {sum(q is not None for q in qs)}" if g else "-")
    lines.append("| " + " | ".join(gm + ([""] if wb else [])) + " |")
    return "\n".join(lines)


def details_table(res, models, works):
    head = ["model", "work", "contender", "img/s (median)", "per round", "peak RSS MB", "first call s", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in models:
        for w in works_of(name, works):
            for who in ("tcl", other_of(w)):
                d = res.get((who, name, w))
                if d is None:
                    continue
                if "error" in d:
                    cells = [name, w, who, "-", "-", "-", "-", f"failed: {_err1(d['error'])}"]
                else:
                    note = []
                    if "trainable_params" in d:
                        note.append(f"{d['trainable_params']:,} trainable params")
                    if d.get("cut_after"):
                        note.append(f"cut after {d['cut_after']}")
                    cells = [name, w, who, f"{d['img_s']:.2f}", " ".join(map(str, d["rounds"])),
                             f"{d['peak_rss_mb']:.0f}", f"{d['first_s']:.2f}", ", ".join(note)]
                lines.append("| " + " | ".join(zoo._cell(c) for c in cells) + " |")
    return "\n".join(lines)


def layers_md(layers):
    out = []
    for (name, work), d in layers.items():
        if "error" in d:
            out += [f"- {name} {work}: failed: {_err1(d['error'])}"]
            continue
        lay = d["layers"]
        out += ["", f"### {name} {work}: tcl per op kind (sum {lay['total_ms']:.1f} ms with a queue drain around "
                    f"every op; GEMM rate {lay['gemm_gflops']:.0f} GFLOP/s)", "",
                "| op | pass | nodes | ms | share | GFLOP/s | of GEMM |", "|---|---|---|---|---|---|---|"]
        for r in lay["ops"]:
            gf = (f"{r['gflops']:.1f} | {r['of_gemm']:.0%}" if r.get("gflops") else " | ")
            out.append(f"| {r['op']} | {r['pass_']} | {r['nodes']} | {r['ms']:.2f} | {r['share']:.1%} | {gf} |")
    return "\n".join(out)


def write_outputs(path, md_body, data, quiet=False):
    from transfercl_cli.fsutil import write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    notes = f"{zoo.KEEP}\n\n(none yet)"
    if os.path.exists(path):  # the hand-written section at the end survives the rewrite
        with open(path) as f:
            old = f.read()
        if zoo.KEEP in old:
            notes = old[old.index(zoo.KEEP):].rstrip()
    md = md_body + "\n" + notes + "\n"
    write_text(path, md)
    write_text(os.path.splitext(path)[0] + ".json", json.dumps(data, indent=1, default=str) + "\n")
    if not quiet:
        print(f"wrote {path} and {os.path.splitext(path)[0]}.json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated model names (--list); default all")
    ap.add_argument("--work", default=",".join(WORKS), help=f"comma-separated work columns ({','.join(WORKS)}; "
                                                           "fwd32 is MobileNet V1's only)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (the median is reported)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per round after a warm-up (median)")
    ap.add_argument("--quick", action="store_true", help="1 round of 2 repeats: checks that it works")
    ap.add_argument("--layers", action="store_true", help="also tcl's per-op times (one more process per row)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per subprocess (default 600)")
    ap.add_argument("--device", default=os.environ.get("TCL_DEVICE", "cpu"), help="tcl device (default cpu: PoCL)")
    ap.add_argument("--opset", type=int, default=17, choices=OPSETS,
                    help="ONNX opset of the torchvision exports (default 17)")
    ap.add_argument("--torch-no-bn", action="store_true", help="PyTorch without BatchNorm (as the folded ONNX graph)")
    ap.add_argument("--markdown", help="write the tables to this file (and every figure to FILE with .json)")
    ap.add_argument("--list", action="store_true", help="print the models and exit")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.repeats = 1, 2
    if args.worker:
        return worker(args)
    if args.list:
        for n, s in MODELS.items():
            print(f"{n:<20} {s['title']}, {s['size']}x{s['size']}; train_last trains {', '.join(s['last_tcl'])} "
                  f"(PyTorch: {', '.join(s['last_torch'])}) + the new head")
        return 0
    models = list(MODELS) if not args.models else [m.strip() for m in args.models.split(",") if m.strip()]
    works = [w.strip() for w in args.work.split(",") if w.strip()]
    bad = [m for m in models if m not in MODELS] + [w for w in works if w not in WORKS]
    if bad:
        ap.error(f"unknown model(s) or work {bad}; --list prints the models, work is one of {WORKS}")
    cmdline = "python bench/bench_zoo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = datetime.datetime.now()
    load0 = os.getloadavg()
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} ({os.cpu_count()} CPUs)", flush=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    runs, setup_err = {}, {}
    for name in models:  # build the missing torchvision exports first (bench/zoo_build.py, cached)
        if MODELS[name]["kind"] == "torchvision":
            err = zoo.ensure_built(zoo.zoo()[f"{name}-onnx{args.opset}"], False, max(args.timeout, 1800), log)
            if err:
                setup_err[name] = err
    jobs = [(n, w) for n in models for w in works_of(n, works)]
    ctx = dict(args=args, models=models, works=works, load0=load0, t0=time.perf_counter(), started=started,
               cmdline=cmdline)
    layers = {}
    for rnd in range(args.rounds):
        for i, (name, work) in enumerate(jobs):
            order = ["tcl", other_of(work)] if rnd % 2 == 0 else [other_of(work), "tcl"]
            for who in order:
                key = (who, name, work)
                if name in setup_err:
                    runs[key] = [{"error": setup_err[name]}]
                    continue
                if any("error" in r for r in runs.get(key, [])):
                    continue  # failed in an earlier round: not retried
                res, msg = measure(who, name, work, args)
                runs.setdefault(key, []).append(res)
                log(f"[round {rnd + 1}/{args.rounds}, {i + 1}/{len(jobs)}] {name} {work} {who}: " + (
                    f"{res['img_s']:.2f} img/s, {res['peak_rss_mb']:.0f} MB, first call {res['first_s']:.2f} s"
                    if "error" not in res else f"FAILED ({msg.splitlines()[0] if msg else res['error']})")
                    + f" [{res['wall_s']} s]")
            report(ctx, runs, layers)
    if args.layers:
        for name, work in jobs:
            if name in setup_err:
                continue
            res, msg = measure("tcl", name, work, args, layers=True)
            layers[(name, work)] = res
            if "error" in res:
                log(f"layers {name} {work}: FAILED ({res['error'][:2000]})")
            report(ctx, runs, layers)
    report(ctx, runs, layers, final=True)
    return 0


def report(ctx, runs, layers, final=False):
    """The tables from what has run so far: printed at the end (final), written to --markdown every time (so an
    interrupted run keeps the measurements it made)."""
    args, models, works, load0 = ctx["args"], ctx["models"], ctx["works"], ctx["load0"]
    if not (final or args.markdown):
        return
    res = summarise(runs)
    load1 = os.getloadavg()
    total = time.perf_counter() - ctx["t0"]
    vers = "; ".join(dict.fromkeys(d["versions"] for d in res.values() if d.get("versions")))
    cpu = platform.processor() or platform.machine()
    setup = (f"{len(models)} model{'s' if len(models) > 1 else ''}, median over {args.rounds} alternating rounds of "
             f"the median of {args.repeats} calls after warm-up calls (10, or 1 s), every measurement in its own "
             f"process; {cpu}, {os.cpu_count()} CPUs; load average at start {load0[0]:.2f}, "
             f"{'at end' if final else 'now (run in progress)'} {load1[0]:.2f}; {total / 60:.1f} min")
    summ, det = summary_table(res, models, works), details_table(res, models, works)
    if final:
        print(f"load average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
        print(setup)
        print(f"versions: {vers}")
        print(summ)
        print()
        print(det)
    if not args.markdown:
        return
    lay_md = layers_md(layers) if layers else ""
    md = "\n".join([
        "# tcl against onnxruntime and PyTorch across architectures (issue 15)", "",
        f"Date: {ctx['started']:%Y-%m-%d %H:%M}. Command: `{ctx['cmdline']}` (set-up: the docstring of "
        "bench/bench_zoo.py).", "", f"{setup}.", "", f"Versions: {vers}.", "",
        "Forward: tcl vs onnxruntime (CPU provider, 2 intra-op threads, 1 inter-op). Training step, batch 16, "
        "SGD, new 2-class head: `last` = last stage + head trainable (`python bench/bench_zoo.py --list` names "
        "it), `all` = every layer; tcl vs PyTorch channels_last, 2 threads"
        + (", BatchNorm removed" if args.torch_no_bn else " (PyTorch keeps the BatchNorms that the ONNX "
           "export folded into tcl's convolutions)") + ". Cells: tcl / other (tcl img/s / other img/s), "
        f"median over the rounds; random-weight torchvision models (ONNX opset {args.opset}) except MobileNet V1.", "",
        summ, "", "## Every measurement", "", det, ""]
        + (["## tcl per op kind (`--layers`)", lay_md, ""] if lay_md else []))
    data = {"date": ctx["started"].isoformat(timespec="seconds"), "command": ctx["cmdline"], "setup": setup,
            "versions": vers, "complete": final, "load_start": load0, "load_end": load1,
            "results": [dict(who=k[0], model=k[1], work=k[2], **v) for k, v in res.items()],
            "runs": [dict(who=k[0], model=k[1], work=k[2], rounds=v) for k, v in runs.items()],
            "geomean": {w: gmean([ratio(res, n, w) for n in models if w in works_of(n, works)]) for w in works},
            "layers": [dict(model=k[0], work=k[1], **v) for k, v in layers.items()]}
    write_outputs(args.markdown, md, data, quiet=not final)

if __name__ == "__main__":
    sys.exit(main())
