"""Whole-network speed: tcl vs PyTorch CPU on MobileNet V1 1.0/224, batch 32, measured side by side.

    python bench/bench_mobilenet.py [--model sample_data/models/mobilenet_v1_1.0_224.h5] [--batch 32] [--repeats 5]
                                    [--work forward train_all train_pw13] [--rounds 2] [--nchw] [--layers]

Each (framework, work) pair runs in its own process so that peak RSS is its own. Work:
  forward     inference of the whole network (tcl: frozen BN folded, fused epilogues)
  train_all   a training step with every layer trainable (SGD), BatchNorm in training mode
  train_pw13  frozen backbone + conv_pw_13/BN/ReLU6 + a new dense head, no feature cache
PyTorch runs with 2 threads, channels_last (and NCHW with --nchw) (`pip install torch==2.13.0`). The contenders
alternate over --rounds rounds (the machine is shared); prints img/s (median over rounds of the median of the
repeats after a warm-up), peak RSS, the ratio tcl / PyTorch channels_last and the load average. `--layers` also
prints tcl's per-layer time (forward, and backward for the training work), GFLOP/s and fraction of the GEMM peak
measured in the same process, so the next bottleneck is visible.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_MODEL = os.path.join(ROOT, "sample_data", "models", "mobilenet_v1_1.0_224.h5")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def plan_for(model, work, classes=2):
    from transfercl_cli.plan import build_plan
    from transfercl_cli.recipe import recipe_from_dict
    from transfercl_cli.runfile import load_any_model

    g = load_any_model(model)
    if work == "forward":
        return g, None
    freeze = {"freeze": "none"} if work == "train_all" else {"freeze": "all", "unfreeze": ["conv_pw_13*"]}
    r = recipe_from_dict(dict({"model": model, "data": {"root": "."}, "cut_after": "conv_pw_13_relu",
                               "train": {"cache": "off", "lr": 0.001}}, **freeze))
    return g, (build_plan(g, r, [str(i) for i in range(classes)]), r)


def sgd_step(be, ex, opt, x, y, lr=0.001):
    """One training step of executor `ex` on device input x and labels y (softmax cross-entropy), as a callable."""
    from transfercl_cli.train import PARAM_TRAINED

    eg = ex.graph
    inp, outn = next(iter(eg.inputs)), eg.outputs[0]

    def step():
        out = ex.forward({inp: x}, training=True)[outn]
        _, gl = be.fn("softmax_xent")(be, out, y)
        be.release(out)
        grads = ex.backward({outn: gl})
        be.release(gl)
        grads = {k: v for k, v in grads.items() if k[1] in PARAM_TRAINED}
        opt.step({k: be.param(eg.node(k[0]), k[1]) for k in grads}, grads, lr)
        for v in grads.values():
            be.release(v)
        be.finish()

    return step


def run_tcl(model, work, batch, repeats, layers=False):
    from transfercl_cli.backends import make_backend
    from transfercl_cli.executor import Executor
    from transfercl_cli.plan import fold_frozen
    from transfercl_cli.train import Optimizer

    be = make_backend(os.environ.get("TCL_DEVICE", "cpu"))
    g, pr = plan_for(model, work)
    x = np.random.default_rng(0).uniform(-1, 1, (batch, 224, 224, 3)).astype(np.float32)
    times = []
    if work == "forward":
        eg = fold_frozen(g, set(), engine=True)
        ex = Executor(eg, be)
        inp = next(iter(eg.inputs))
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            out = ex.forward({inp: x})
            be.to_host(out[eg.outputs[0]])
            be.release(out[eg.outputs[0]])
            times.append(time.perf_counter() - t0)
        if layers:
            layer_times(eg, be, x)
    else:
        plan, r = pr
        ex = Executor(plan.exec_graph, be, plan.trainable)
        y = be.asarray(np.arange(batch, dtype=np.int32) % 2)
        step = sgd_step(be, ex, Optimizer(be, r["train"]), x, y)
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        if layers:
            train_layer_times(ex, be, step, batch)
    med = statistics.median(times[1:])
    import transfercl_cli

    return {"img_s": batch / med, "median_s": med, "peak_rss_mb": peak_rss_mb(),
            "versions": f"tcl {transfercl_cli.__version__}, numpy {np.__version__}, {be.rt.info.name} "
                        f"({be.rt.info.platform_name} {be.rt.info.driver_version})"}


def gemm_peak(be, reps=3):
    """GFLOP/s of tcl's GEMM on (1568, 1024, 1024) in this process: the yardstick for 'of peak' columns."""
    from transfercl_cli.ops.cl_gemm import gemm

    rng = np.random.default_rng(0)
    a, b = be.asarray(rng.random((1568, 1024), np.float32)), be.asarray(rng.random((1024, 1024), np.float32))
    out = gemm(be.rt, a, b)
    best = float("inf")
    for _ in range(reps):
        be.finish()
        t0 = time.perf_counter()
        gemm(be.rt, a, b, out)
        be.finish()
        best = min(best, time.perf_counter() - t0)
    for t in (a, b, out):
        be.release(t)
    return 2 * 1568 * 1024 * 1024 / best / 1e9


def train_layer_times(ex, be, step, batch, reps=2):
    """Per-layer time of a training step, forward and backward apart (a finish around every op), with GFLOP/s
    (backward counted as twice the forward's multiply-adds) and the fraction of the GEMM peak."""
    from transfercl_cli.ops.shapes import infer_shapes, macs
    from transfercl_cli.plan import fused_label

    shapes = infer_shapes(ex.graph)
    acc = {}

    with ex.per_node_times(acc):
        for _ in range(reps):
            step()
    peak = gemm_peak(be)
    rows = []
    for n in ex.graph.nodes:
        m = macs(n, [shapes[t] for t in n.inputs], shapes[n.outputs[0]]) * batch
        for kind, flops in (("fwd", 2 * m), ("bwd", 4 * m)):
            if (n.name, kind) in acc:
                t = acc[(n.name, kind)] / reps
                rows.append((n.name, fused_label(n), kind, t * 1e3,
                             flops / t / 1e9 if t > 0 and flops else 0.0))
    _print_layer_rows(rows, peak)


def _print_layer_rows(rows, peak):
    total = sum(r[3] for r in rows)
    print(f"{'layer':<22} {'op':<20} {'pass':<4} {'ms':>8} {'GFLOP/s':>8} {'of peak':>7} {'share':>6}",
          file=sys.stderr)
    for name, op, kind, ms, gf in rows:
        print(f"{name:<22} {op:<20} {kind:<4} {ms:8.2f} {gf:8.1f} {gf / peak:7.0%} {ms / total:6.1%}",
              file=sys.stderr)
    print(f"{'total':<22} {'':<20} {'':<4} {total:8.2f}   (GEMM peak in this process: {peak:.0f} GFLOP/s on "
          f"1568x1024x1024)", file=sys.stderr)


def layer_times(eg, be, x, reps=3):
    """Per-layer forward time (each node run alone after finish), GFLOP/s and the fraction of the GEMM peak."""
    from transfercl_cli.ops.shapes import infer_shapes, macs
    from transfercl_cli.plan import fused_label

    shapes = infer_shapes(eg)
    env = {next(iter(eg.inputs)): be.asarray(x)}
    rows = []
    for n in eg.nodes:
        fwd = be.forward_fn(n.op)
        xs = [env[t] for t in n.inputs]
        best = float("inf")
        for rep in range(reps):
            be.finish()
            t0 = time.perf_counter()
            ys, _ctx = fwd(be, n, xs, False)
            be.finish()
            best = min(best, time.perf_counter() - t0)
            if rep < reps - 1:
                for yv in ys:
                    be.release(yv)
        for t, yv in zip(n.outputs, ys):
            env[t] = yv
        m = macs(n, [shapes[t] for t in n.inputs], shapes[n.outputs[0]]) * len(x)
        rows.append((n.name, fused_label(n), "fwd", best * 1e3,
                     2 * m / best / 1e9 if best > 0 else 0))
    _print_layer_rows(rows, gemm_peak(be))


def torch_model(torch, g, work):
    """An nn.Module for the graph (a chain of conv/bn/relu6/pad/gap/dense), from our imported weights."""
    import torch.nn as nn
    import torch.nn.functional as F

    from transfercl_cli.plan import add_head, cut_after

    if work != "forward":
        g = cut_after(g, "conv_pw_13_relu")
        add_head(g, [{"global_avg_pool": None}, {"dense": "auto"}], 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.steps = []
            self.mods = nn.ModuleDict()
            for n in g.nodes:
                key = n.name.replace(".", "_").replace("/", "_")
                if n.op == "conv2d":
                    kh, kw = n.attrs["kernel"]
                    cin = n.params["weight"].shape[2] * n.attrs["groups"]
                    m = nn.Conv2d(cin, n.params["weight"].shape[3], (kh, kw), stride=tuple(n.attrs["strides"]),
                                  groups=n.attrs["groups"], bias="bias" in n.params)
                    m.weight.data = torch.from_numpy(n.params["weight"].transpose(3, 2, 0, 1).copy())
                    if "bias" in n.params:
                        m.bias.data = torch.from_numpy(n.params["bias"].copy())
                    self.mods[key] = m
                    self.steps.append(("conv", key, tuple(n.attrs["pads"])))
                elif n.op == "batchnorm":
                    m = nn.BatchNorm2d(len(n.params["gamma"]), eps=n.attrs["eps"], momentum=1 - n.attrs["momentum"])
                    m.weight.data = torch.from_numpy(n.params["gamma"].copy())
                    m.bias.data = torch.from_numpy(n.params["beta"].copy())
                    m.running_mean.data = torch.from_numpy(n.params["mean"].copy())
                    m.running_var.data = torch.from_numpy(n.params["var"].copy())
                    self.mods[key] = m
                    self.steps.append(("mod", key, None))
                elif n.op in ("relu6", "relu"):
                    self.steps.append((n.op, None, None))
                elif n.op == "pad":
                    self.steps.append(("pad", None, tuple(n.attrs["pads"])))
                elif n.op == "global_avgpool":
                    self.steps.append(("gap", None, n.attrs.get("keepdims", False)))
                elif n.op == "dropout" or n.op == "identity":
                    continue
                elif n.op == "dense":
                    m = nn.Linear(*n.params["weight"].shape)
                    m.weight.data = torch.from_numpy(n.params["weight"].T.copy())
                    m.bias.data = torch.from_numpy(n.params["bias"].copy())
                    self.mods[key] = m
                    self.steps.append(("mod", key, None))
                elif n.op in ("reshape", "flatten"):
                    self.steps.append(("flatten", None, None))
                elif n.op == "softmax":
                    self.steps.append(("softmax", None, None))
                else:
                    raise SystemExit(f"torch model: op {n.op} not handled")

        def forward(self, x):
            for kind, key, arg in self.steps:
                if kind == "conv":
                    t, l, b, r = arg
                    if any(arg):
                        x = F.pad(x, (l, r, t, b))
                    x = self.mods[key](x)
                elif kind == "mod":
                    x = self.mods[key](x)
                elif kind == "relu6":
                    x = F.relu6(x)
                elif kind == "relu":
                    x = F.relu(x)
                elif kind == "pad":
                    t, l, b, r = arg
                    x = F.pad(x, (l, r, t, b))
                elif kind == "gap":
                    x = x.mean((2, 3), keepdim=bool(arg))
                elif kind == "flatten":
                    x = x.reshape(x.shape[0], -1)
                elif kind == "softmax":
                    x = torch.softmax(x, 1)
            return x

    net = Net()
    if work == "train_pw13":
        for name, p in net.named_parameters():
            p.requires_grad = name.startswith("mods.conv_pw_13") or name.startswith("mods.head_dense")
    return net


def run_torch(model, work, batch, repeats, layout):
    import torch

    from transfercl_cli.runfile import load_any_model

    torch.set_num_threads(2)
    g = load_any_model(model)
    net = torch_model(torch, g, work)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (batch, 3, 224, 224)).astype(np.float32))
    x = x.contiguous(memory_format=fmt)
    times = []
    if work == "forward":
        net.eval()
        with torch.inference_mode():
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                net(x)
                times.append(time.perf_counter() - t0)
    else:
        y = torch.arange(batch) % 2
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.001)
        net.train()
        if work == "train_pw13":
            # Frozen layers run in inference mode (their BatchNorm uses moving statistics), as in tcl.
            for name, m in net.mods.items():
                if not (name.startswith("conv_pw_13") or name.startswith("head")):
                    m.eval()
        lossf = torch.nn.CrossEntropyLoss()
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = lossf(net(x), y)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    med = statistics.median(times[1:])
    return {"img_s": batch / med, "median_s": med, "peak_rss_mb": peak_rss_mb(),
            "versions": f"torch {torch.__version__}"}


def one(args):
    if args.one[0] == "tcl":
        res = run_tcl(args.model, args.one[1], args.batch, args.repeats, args.layers)
    else:
        res = run_torch(args.model, args.one[1], args.batch, args.repeats, args.one[0].split(":")[1])
    print(json.dumps(res))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", nargs="+", default=["forward", "train_all", "train_pw13"])
    ap.add_argument("--layers", action="store_true", help="per-layer times for tcl (forward, and backward in training)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of all contenders (median reported)")
    ap.add_argument("--nchw", action="store_true", help="also PyTorch in NCHW (slower than channels_last)")
    ap.add_argument("--markdown", help="also write the results as a Markdown table (the README's) to this file")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)
    try:
        import torch  # noqa: F401

        have_torch = not args.no_torch
    except ImportError:
        have_torch = False
        print("torch is not installed: printing tcl alone (pip install torch==2.13.0 for the comparison)")
    fws = ["tcl"] + (["torch:channels_last"] if have_torch else []) + (["torch:nchw"] if have_torch and args.nchw
                                                                         else [])
    load0 = os.getloadavg()
    runs = {}
    # The contenders alternate (rounds x frameworks), so load from other processes hits all of them alike; each
    # reported figure is the median img/s over the rounds (each round: the median of --repeats steps).
    for rnd in range(args.rounds):
        for work in args.work:
            for fw in fws:
                layers = args.layers and fw == "tcl" and rnd == 0
                cmd = [sys.executable, __file__, "--one", fw, work, "--model", args.model, "--batch",
                       str(args.batch), "--repeats", str(args.repeats)] + (["--layers"] if layers else [])
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    print(p.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{fw} {work} failed")
                if layers:
                    print(f"tcl per layer, {work}:\n{p.stderr}")
                runs.setdefault((fw, work), []).append(json.loads(p.stdout.strip().splitlines()[-1]))
    results = {}
    for key, rs in runs.items():
        results[key] = {"img_s": statistics.median(r["img_s"] for r in rs),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                        "all": [round(r["img_s"], 1) for r in rs], "versions": rs[0].get("versions", "")}
    import platform

    load1 = os.getloadavg()
    versions = "; ".join(dict.fromkeys(results[(fw, args.work[0])]["versions"] for fw in fws))
    setup = (f"MobileNet V1 1.0/224, batch {args.batch}, median over {args.rounds} alternating rounds of the median of "
             f"{args.repeats} steps after a warm-up; {platform.processor() or platform.machine()}, {os.cpu_count()} "
             f"CPUs; load average before {load0[0]:.2f}, after {load1[0]:.2f}")
    print(setup)
    print(versions)
    hdr = f"{'work':<12} {'framework':<22} {'img/s':>8} {'peak RSS MB':>12} {'tcl ratio':>10}  per round"
    print(hdr)
    print("-" * len(hdr))
    for work in args.work:
        base = results.get(("torch:channels_last", work))
        for fw in fws:
            r = results[(fw, work)]
            ratio = f"{results[('tcl', work)]['img_s'] / r['img_s']:.2f}x" if fw != "tcl" else ""
            print(f"{work:<12} {fw:<22} {r['img_s']:8.1f} {r['peak_rss_mb']:12.0f} {ratio:>10}  {r['all']}")
        if base:
            print(f"{'':<12} tcl / torch channels_last: {results[('tcl', work)]['img_s'] / base['img_s']:.2f}x speed, "
                  f"{results[('tcl', work)]['peak_rss_mb'] / base['peak_rss_mb']:.2f}x memory")
    if args.markdown:
        write_markdown(args.markdown, args.work, results, setup, versions)


WORK_TITLES = {"forward": "forward (inference)", "train_all": "training step, every layer trainable",
               "train_pw13": "frozen backbone + conv_pw_13/BN/ReLU6 + dense head, no cache"}


def write_markdown(path, works, results, setup, versions):
    """The README's results table, so that one command regenerates it."""
    from transfercl_cli.fsutil import write_text

    lines = [f"{setup}.", f"Versions: {versions}.", "",
             "| work | tcl img/s | PyTorch img/s, same run | tcl / PyTorch | peak RSS tcl / PyTorch |",
             "|---|---|---|---|---|"]
    for work in works:
        t, p = results[("tcl", work)], results.get(("torch:channels_last", work))
        if p:
            lines.append(f"| {WORK_TITLES.get(work, work)} | {t['img_s']:.1f} | {p['img_s']:.1f} | "
                         f"{t['img_s'] / p['img_s']:.2f}x | {t['peak_rss_mb']:.0f} / {p['peak_rss_mb']:.0f} MB |")
        else:
            lines.append(f"| {WORK_TITLES.get(work, work)} | {t['img_s']:.1f} | - | - | {t['peak_rss_mb']:.0f} MB |")
    write_text(path, "\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
