"""SGEMM speed of tcl's OpenCL GEMM against numpy matmul, measured side by side in the same process.

Shapes: MobileNet V1 pointwise convolutions at batch 32 as (M, K, N), in the three forms training runs:
  fwd    Y  = X @ W          X (M, K), W (K, N)
  wgrad  dW = X^T @ dY       trans_a: (K x M) @ (M x N)
  dgrad  dX = dY @ W^T       trans_b: (M x N) @ (N x K)
Each row: median GFLOP/s over --runs runs. numpy and tcl alternate, so machine load hits both alike, with a pause
after every timed call: OpenBLAS's worker threads keep spinning for up to ~0.1 s after a call returns
(OPENBLAS_THREAD_TIMEOUT), which would steal a core from whatever is timed next.

    PYTHONPATH=. python bench/bench_gemm.py [--runs 7] [--variant auto|naive|cpu|gpu] [--shapes 1568,1024,1024 ...]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [(1568, 1024, 1024), (6272, 512, 512), (25088, 256, 256), (100352, 128, 128)]


def _median_time(fn, runs):
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--variant", default="auto", help="auto (tuned), or a variant name from cl_gemm.variants()")
    ap.add_argument("--device", default=os.environ.get("TCL_DEVICE", "cpu"))
    ap.add_argument("--shapes", nargs="*", help="M,K,N triples (default: MobileNet V1 pointwise, batch 32)")
    ap.add_argument("--modes", default="fwd,wgrad,dgrad")
    ap.add_argument("--pause", type=float, default=0.25, help="seconds of rest after each timed call")
    args = ap.parse_args(argv)

    from transfercl_cli.ops import cl_gemm
    from transfercl_cli.runtime import get_runtime

    load0 = os.getloadavg()
    rt = get_runtime(args.device)
    variant = None if args.variant == "auto" else args.variant
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    t0 = time.perf_counter()
    chosen = cl_gemm.tuned_variant(rt) if variant is None else variant
    t_tune = time.perf_counter() - t0
    print(f"device: {rt.info.name} ({rt.info.platform_name}, driver {rt.info.driver_version})")
    print(f"variant: {chosen}  (choice took {t_tune:.2f} s)")
    print(f"numpy {np.__version__}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '-')}, "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '-')}; median of {args.runs} runs")
    print(f"{'mode':6} {'M':>7} {'K':>7} {'N':>7} | {'numpy GF/s':>10} {'tcl GF/s':>9} {'ratio':>6} | max rel err")
    rng = np.random.default_rng(0)
    ratios = []
    for (M, K, N) in shapes:
        x = rng.standard_normal((M, K), dtype=np.float32)
        w = rng.standard_normal((K, N), dtype=np.float32)
        dy = rng.standard_normal((M, N), dtype=np.float32)
        dx, dw, dyd = rt.to_device(x), rt.to_device(w), rt.to_device(dy)
        for mode in args.modes.split(","):
            if mode == "fwd":
                ref = lambda: x @ w  # noqa: E731
                out = rt.empty((M, N))
                run = lambda: cl_gemm.gemm(rt, dx, dw, out, variant=variant)  # noqa: E731
                flops = 2.0 * M * K * N
            elif mode == "wgrad":
                ref = lambda: x.T @ dy  # noqa: E731
                out = rt.empty((K, N))
                run = lambda: cl_gemm.gemm(rt, dx, dyd, out, trans_a=True, variant=variant)  # noqa: E731
                flops = 2.0 * M * K * N
            elif mode == "dgrad":
                ref = lambda: dy @ w.T  # noqa: E731
                out = rt.empty((M, K))
                run = lambda: cl_gemm.gemm(rt, dyd, dw, out, trans_b=True, variant=variant)  # noqa: E731
                flops = 2.0 * M * K * N
            else:
                raise SystemExit(f"unknown mode {mode}")
            expect = ref()
            # Warm-up; with --variant auto also the per-shape tuner's first calls (it tries a few plans, then
            # keeps the fastest), so the timed runs see the plan that training would settle on.
            for _ in range(1 + (cl_gemm.shape_tuner_warmup_calls() if variant is None else 0)):
                run()
                rt.finish()
            got = out.get()
            err = float(np.max(np.abs(got - expect)) / np.max(np.abs(expect)))

            def tcl():
                run()
                rt.finish()

            tn, tt = [], []
            for _ in range(args.runs):  # alternate so both see the same machine load
                tn.append(_median_time(ref, 1))
                time.sleep(args.pause)
                tt.append(_median_time(tcl, 1))
                time.sleep(args.pause)
            gn, gt = flops / np.median(tn) / 1e9, flops / np.median(tt) / 1e9
            ratios.append(gt / gn)
            dm, dk, dn = (M, K, N) if mode == "fwd" else (K, M, N) if mode == "wgrad" else (M, N, K)
            print(f"{mode:6} {dm:7d} {dk:7d} {dn:7d} | {gn:10.1f} {gt:9.1f} {gt / gn:6.2f} | {err:.1e}")
            out.release()
        for t in (dx, dw, dyd):
            t.release()
    print(f"ratio tcl/numpy: min {min(ratios):.2f}, geometric mean {float(np.exp(np.mean(np.log(ratios)))):.2f}")
    print(f"load average before {load0[0]:.2f}, after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
