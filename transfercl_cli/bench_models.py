"""`tcl bench MODEL...`: how fast each model runs on the selected device, one row per model.

Per model: the first forward pass (kernel builds, GEMM tuning, first allocations: reported separately as the
warm-up), the forward latency at the small batch (median of `runs` passes), the throughput at the large batch
(median of `runs`), with `train` the training step of a typical recipe (the old classifier cut off as `tcl init`
cuts it, the last block and a new 10-class head trainable, no feature cache: the frozen layers run every step;
median of `runs` steps on a random batch), and the peak memory: the process's maximum resident set (getrusage) and
the device memory tcl's buffer pool allocated (`Runtime.peak_bytes`; the numpy device has none). With several
models each runs in a process of its own, so no model's warm-up or memory is hidden by another's.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from .errors import TclError

TRAIN_CLASSES = 10


def _max_rss_bytes():
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)  # bytes on macOS, KiB on Linux


def _timed(fn, sync):
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _input_shape(graph):
    shp = next(iter(graph.inputs.values()))
    if any(not d for d in shp):
        raise TclError(f"The model's input size is not fixed ({tuple(shp)}).", "Give one with --input-size H W.")
    return tuple(int(d) for d in shp)


def bench_one(model, batches=(1, 8), runs=10, train=False, device=None, config=None, input_size=None, seed=0):
    """One model's row (a dict; see the module docstring)."""
    from .evaluate import Predictor
    from .runfile import load_any_model

    t0 = time.perf_counter()
    graph = load_any_model(model, config=config, input_size=input_size)
    load_s = time.perf_counter() - t0
    shape = _input_shape(graph)
    rng = np.random.default_rng(seed)
    small, large = int(batches[0]), int(batches[1])
    xs = rng.uniform(-1, 1, (small,) + shape).astype(np.float32)
    xl = rng.uniform(-1, 1, (large,) + shape).astype(np.float32)
    pr = Predictor(graph, device)
    be = pr.be
    sync = be.finish

    def fwd(x):
        return lambda: be.release(pr.ex.forward({pr.input: x})[pr.output])

    warm = _timed(fwd(xs), sync) + _timed(fwd(xl), sync)  # first passes: kernel builds, tuning, allocations
    lat = [_timed(fwd(xs), sync) for _ in range(runs)]
    thr = [_timed(fwd(xl), sync) for _ in range(runs)]
    row = {"model": model, "device": pr.device_name(), "input": list(shape), "layers": len(graph.nodes),
           "parameters": graph.num_params(), "load_seconds": round(load_s, 3), "warmup_seconds": round(warm, 3),
           "runs": runs, "latency_batch": small, "latency_ms": round(1000 * statistics.median(lat), 2),
           "throughput_batch": large, "images_per_sec": round(large / statistics.median(thr), 1)}
    if train:
        row["train"] = _train_step(graph, be, large, runs, rng)
    row["peak_rss_bytes"] = _max_rss_bytes()
    row["device_peak_bytes"] = int(be.rt.peak_bytes) if hasattr(be, "rt") else None
    return row


def _train_step(graph, be, batch, runs, rng):
    """Median training step of the typical recipe on a random batch: {batch, step_ms, images_per_sec, warmup,
    trainable (layer names), cut_after}."""
    from types import SimpleNamespace

    from .init_recipe import classifier_cut, last_block
    from .plan import build_plan
    from .recipe import recipe_from_dict
    from .train import Trainer

    cut, _ = classifier_cut(graph)
    block = last_block(graph, cut) if cut else []
    raw = {"model": "bench", "data": {"root": "."}, "unfreeze": block,
           "train": {"cache": "off", "batch_size": batch, "optimizer": "sgd", "lr": 1e-4}}
    if cut:
        raw["cut_after"] = cut
    recipe = recipe_from_dict(raw)
    plan = build_plan(graph, recipe, [str(i) for i in range(TRAIN_CLASSES)])
    session = SimpleNamespace(be=be, plan=plan, recipe=recipe, micro_batch=None, class_weights=None,
                              classes=[str(i) for i in range(TRAIN_CLASSES)])
    trainer = Trainer(session)
    shape = _input_shape(graph)
    x = rng.uniform(-1, 1, (batch,) + shape).astype(np.float32)
    y = rng.integers(0, TRAIN_CLASSES, batch).astype(np.int32)
    step = [0]

    def one():
        trainer.step(x, y, 1e-4, step[0])
        step[0] += 1

    warm = _timed(one, be.finish)
    times = [_timed(one, be.finish) for _ in range(runs)]
    med = statistics.median(times)
    return {"batch": batch, "warmup_seconds": round(warm, 3), "step_ms": round(1000 * med, 1),
            "images_per_sec": round(batch / med, 1), "cut_after": cut,
            "trainable": sorted(plan.trainable), "memory_estimate_bytes": int(plan.memory["total"])}


def bench(models, batches=(1, 8), runs=10, train=False, device=None, config=None, input_size=None, isolate=None):
    """Rows for every model. `isolate` (default: with more than one model) runs each in its own process."""
    if runs < 1:
        raise TclError(f"--runs must be at least 1, got {runs}.", "Use e.g. --runs 10.")
    if min(batches) < 1:
        raise TclError(f"Batch sizes must be at least 1, got {list(batches)}.", "Use e.g. --batch 1 8.")
    for m in models:
        if not os.path.exists(m):
            raise TclError(f"The model '{m}' does not exist.", "Check the path.")
    isolate = len(models) > 1 if isolate is None else isolate
    opts = {"batches": list(batches), "runs": runs, "train": train, "device": device, "config": config,
            "input_size": list(input_size) if input_size else None}
    if not isolate:
        return [bench_one(m, **opts) for m in models]
    rows = []
    for m in models:
        proc = subprocess.run([sys.executable, "-m", "transfercl_cli.bench_models", json.dumps(dict(opts, model=m))],
                              stdout=subprocess.PIPE, text=True)
        try:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise TclError(f"Benchmarking '{m}' failed (exit code {proc.returncode}).",
                           "Run `tcl bench` on that model alone, with --verbose, to see why.") from None
        if "error" in res:
            err = TclError(res["error"])
            err.exit_code = res.get("exit_code", 2)
            raise err
        rows.append(res)
    return rows


def _mib(v):
    if v is None:
        return "-"
    return f"{v / 2**10:.0f} KiB" if v < 2**20 else f"{v / 2**20:.0f} MiB" if v < 2**30 else f"{v / 2**30:.1f} GiB"


def format_rows(rows):
    """The table `tcl bench` prints."""
    if not rows:
        return ""
    r0 = rows[0]
    devices = sorted({r["device"] for r in rows})
    lines = [f"tcl bench on {', '.join(devices)}: medians of {r0['runs']} runs after a warm-up"
             + ("; each model in a process of its own" if len(rows) > 1 else "")]
    head = ["model", "warm-up", f"latency b{r0['latency_batch']}", f"throughput b{r0['throughput_batch']}"]
    if any("train" in r for r in rows):
        head.append(f"train step b{r0['throughput_batch']}")
    head += ["peak RSS", "device peak"]
    table = []
    for r in rows:
        cells = [os.path.basename(os.path.normpath(r["model"])), f"{r['warmup_seconds']:.2f} s",
                 f"{r['latency_ms']:.1f} ms", f"{r['images_per_sec']:.1f} img/s"]
        if "train" in r:
            t = r["train"]
            cells.append(f"{t['images_per_sec']:.1f} img/s ({t['step_ms']:.0f} ms)")
        elif len(head) == 7:
            cells.append("-")
        cells += [_mib(r["peak_rss_bytes"]), _mib(r["device_peak_bytes"])]
        table.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in table)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    lines += [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(c) for c in table]
    lines.append("warm-up: the first forward passes at both batch sizes (kernel builds, tuning, first allocations); "
                 "peak RSS: the process's maximum resident memory; device peak: the buffers tcl allocated on the "
                 "device")
    if any("train" in r for r in rows):
        lines.append("train step: the old classifier cut off, the last block and a new 10-class head trainable, no "
                     "feature cache (the frozen layers run every step); forward, backward and an SGD update")
    return "\n".join(lines)


def _child(arg):  # pragma: no cover - run in a subprocess by bench()
    import warnings

    opts = json.loads(arg)
    warnings.simplefilter("ignore", RuntimeWarning)  # the numpy device's note: printed once by the parent's command
    try:
        row = bench_one(opts.pop("model"), **opts)
    except TclError as e:
        print(json.dumps({"error": str(e), "exit_code": e.exit_code}))
        return 0
    print(json.dumps(row))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_child(sys.argv[1]))
