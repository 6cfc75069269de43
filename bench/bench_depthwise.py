"""Depthwise 3x3 convolution benchmark (MobileNet's conv_dw_12/13 shape by default: N=32, C=512, 14x14, stride 1).

tcl's OpenCL conv2d op against PyTorch CPU in channels_last (when torch is importable; it is not a requirement),
else against tcl's numpy reference (float32). Forward (inference) and forward+backward (dX, dW), medians.

    PYTHONPATH=. python bench/bench_depthwise.py [--n 32] [--c 512] [--hw 14] [--stride 1] [--repeat 20]
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transfercl_cli.backends import CLBackend, NumpyBackend  # noqa: E402
from transfercl_cli.graph import Node  # noqa: E402
from transfercl_cli.ops import Need  # noqa: E402
from transfercl_cli.runtime import get_runtime  # noqa: E402


BEST = []  # best (minimum) times of the last median_ms call, for the report under noisy load


def median_ms(fns, repeat, rounds=3):
    """Median milliseconds of each function. Each runs in blocks of consecutive calls (interleaving single calls
    would make OpenCL's and OpenMP's spinning worker threads fight over the cores), and the blocks take turns over
    a few rounds so that load from other processes hits all alike."""
    ts = [[] for _ in fns]
    per = max(1, -(-repeat // rounds))
    for _ in range(rounds):
        for fn, t in zip(fns, ts):
            fn()  # warm-up after the other's block
            for _ in range(per):
                t0 = time.perf_counter()
                fn()
                t.append(time.perf_counter() - t0)
    BEST.extend(min(t) * 1e3 for t in ts)
    return [statistics.median(t) * 1e3 for t in ts]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--c", type=int, default=512)
    ap.add_argument("--hw", type=int, default=14)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--device", default=os.environ.get("TCL_DEVICE", "cpu"))
    ap.add_argument("--no-torch", action="store_true", help="compare with the numpy reference even if torch exists")
    a = ap.parse_args(argv)

    load0 = os.getloadavg()
    N, C, HW, k, s = a.n, a.c, a.hw, a.k, a.stride
    # TF 'SAME' padding (what Keras MobileNet uses): total k - 1 at stride 1, 0 before / 1 after at stride 2.
    total = max((-(-HW // s) - 1) * s + k - HW, 0)
    pads = (total // 2, total // 2, total - total // 2, total - total // 2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, HW, HW, C)).astype(np.float32)
    w = (rng.standard_normal((k, k, 1, C)) / k).astype(np.float32)
    node = Node("dw", "conv2d", ["x"], ["y"], attrs=dict(kernel=(k, k), strides=(s, s), dilations=(1, 1), pads=pads,
                                                      groups=C, act=None), params={"weight": w})
    OH = (HW + pads[0] + pads[2] - k) // s + 1
    flop = 2.0 * N * OH * OH * C * k * k
    gy = rng.standard_normal((N, OH, OH, C)).astype(np.float32)

    rt = get_runtime(a.device)
    be = CLBackend(rt)
    fwd, bwd = be.forward_fn("conv2d"), be.backward_fn("conv2d")
    xd, gyd = be.asarray(x), be.asarray(gy)

    def tcl_fwd():
        y = fwd(be, node, [xd], False)[0][0]
        rt.finish()
        y.release()

    def tcl_fwdbwd():
        (y,), saved = fwd(be, node, [xd], True)
        (dx,), g = bwd(be, node, saved, [gyd], Need([True], True))
        rt.finish()
        for t in [y, dx, *g.values()]:
            t.release()

    # correctness of what is timed, against the float64 reference
    (y,), saved = fwd(be, node, [xd], True)
    (dx,), g = bwd(be, node, saved, [gyd], Need([True], True))
    npbe = NumpyBackend()
    (yr,), sr = npbe.forward_fn("conv2d")(npbe, node, [x.astype(np.float64)], True)
    (dxr,), gr = npbe.backward_fn("conv2d")(npbe, node, sr, [gy.astype(np.float64)], Need([True], True))

    def rel(a_, e_):
        return float(np.max(np.abs(a_ - e_)) / np.max(np.abs(e_)))

    errs = (rel(be.to_host(y), yr), rel(be.to_host(dx), dxr), rel(be.to_host(g["weight"]), gr["weight"]))
    for t in [y, dx, *g.values()]:
        t.release()

    torch = None
    if not a.no_torch:
        try:
            import torch
        except ImportError:
            torch = None
    if torch is not None:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))  # (C, 1, k, k)
        gyt = torch.from_numpy(gy).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        conv = torch.nn.functional.conv2d
        tpad = (pads[1], pads[3], pads[0], pads[2])

        def torch_fwd():
            with torch.inference_mode():
                conv(torch.nn.functional.pad(xt, tpad) if pads[0] != pads[2] else xt, wt, stride=s,
                     padding=0 if pads[0] != pads[2] else pads[0], groups=C)

        xg = xt.clone().requires_grad_(True)
        wg = wt.clone().requires_grad_(True)

        def torch_fwdbwd():
            xg.grad = None
            wg.grad = None
            xi = torch.nn.functional.pad(xg, tpad) if pads[0] != pads[2] else xg
            yt = conv(xi, wg, stride=s, padding=0 if pads[0] != pads[2] else pads[0], groups=C)
            yt.backward(gyt)

        name = f"PyTorch {torch.__version__} CPU channels_last ({torch.get_num_threads()} threads)"
        t_fwd, o_fwd, t_fb, o_fb = median_ms([tcl_fwd, torch_fwd, tcl_fwdbwd, torch_fwdbwd], a.repeat)
    else:
        np32 = NumpyBackend(np.float32)
        f32, b32 = np32.forward_fn("conv2d"), np32.backward_fn("conv2d")

        def np_fwd():
            f32(np32, node, [x], False)

        def np_fwdbwd():
            (_,), sv = f32(np32, node, [x], True)
            b32(np32, node, sv, [gy], Need([True], True))

        name = "numpy reference (float32)"
        t_fwd, o_fwd, t_fb, o_fb = median_ms([tcl_fwd, np_fwd, tcl_fwdbwd, np_fwdbwd], max(3, a.repeat // 4))
    other = (name, o_fwd, o_fb)

    print(f"depthwise {k}x{k} stride {s}: N={N} C={C} {HW}x{HW} -> {OH}x{OH}; {flop / 1e6:.1f} MFLOP forward; "
          f"device {rt.info.name}")
    print(f"tcl vs float64 reference: rel err forward {errs[0]:.1e}, dX {errs[1]:.1e}, dW {errs[2]:.1e}")
    print(f"{'':44s} {'forward ms':>10s} {'GFLOP/s':>8s} {'fwd+bwd ms':>11s} {'GFLOP/s':>8s}")
    rows = [("tcl OpenCL", t_fwd, t_fb), other]
    for name, tf, tb in rows:
        print(f"{name:44s} {tf:10.3f} {flop / tf / 1e6:8.1f} {tb:11.3f} {3 * flop / tb / 1e6:8.1f}")
    print(f"ratio (other / tcl, > 1 means tcl is faster): forward {other[1] / t_fwd:.2f}x, "
          f"forward+backward {other[2] / t_fb:.2f}x")
    print(f"load average before {load0[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    b = BEST[-4:]
    print(f"best times (ms): tcl forward {b[0]:.3f}, other forward {b[1]:.3f}, tcl fwd+bwd {b[2]:.3f}, "
          f"other fwd+bwd {b[3]:.3f}")


if __name__ == "__main__":
    main()
