"""Winograd F(4x4, 3x3) (kernels/winograd.cl, ops/cl_winograd.py) and the batched GEMM under it: the float64
reference on tile edges, paddings, channel counts that take every vector width, fused activations and the input
gradient that runs through it; the frozen weight's transform kept once; the rule that chooses the path."""
import numpy as np
import pytest

from tests.helpers import assert_close, check_op, make_node, run_node


@pytest.fixture(autouse=True)
def _cpu_path(rt, monkeypatch):
    from transfercl_cli.ops import cl_conv

    monkeypatch.setenv("TCL_NO_AUTOTUNE", "1")
    if not rt.is_cpu:
        monkeypatch.setattr(cl_conv, "PORTABLE", False)  # the Winograd path runs the CPU-style kernels


@pytest.fixture
def calls(monkeypatch):
    """Counts winograd_forward calls (and forces the path wherever the shape allows)."""
    from transfercl_cli.ops import cl_winograd

    seen = []
    real = cl_winograd.winograd_forward

    def spy(rt, x, w, *a, **kw):
        seen.append((tuple(x.shape), tuple(w.shape)))
        return real(rt, x, w, *a, **kw)

    monkeypatch.setattr(cl_winograd, "winograd_forward", spy)
    monkeypatch.setattr(cl_winograd, "WINOGRAD", True)
    return seen


def conv3(cin, cout, pads=(1, 1, 1, 1), bias=True, act=None, seed=0, name="n"):
    rng = np.random.default_rng(seed)
    params = {"weight": rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)}
    if bias:
        params["bias"] = rng.standard_normal(cout) * 0.5
    return make_node("conv2d", attrs=dict(kernel=(3, 3), strides=(1, 1), dilations=(1, 1), pads=pads, groups=1,
                                          act=act), params=params, name=name)


def rand(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# (N, H, W, Cin, Cout, pads, bias, act): maps that are not multiples of the 4x4 tile, VW 16/8/4/1 on either side
CASES = [
    (1, 7, 7, 32, 32, (1, 1, 1, 1), True, None),
    (2, 13, 11, 48, 40, (1, 1, 1, 1), True, "relu"),
    (3, 9, 10, 16, 20, (1, 1, 1, 1), False, "relu6"),
    (2, 8, 8, 33, 35, (1, 1, 1, 1), True, None),
    (1, 10, 9, 12, 17, (0, 1, 2, 1), True, "relu"),
    (2, 6, 5, 8, 16, (0, 0, 0, 0), True, None),
    (1, 3, 4, 8, 8, (2, 2, 2, 2), True, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"p{''.join(map(str, c[5]))}")
def test_winograd_matches_reference(npbe, clbe, case, calls, monkeypatch):
    """Forward, and the input and weight gradients (dx: gy convolved with the flipped weights, through Winograd
    too), against the float64 reference at the usual tolerances."""
    from transfercl_cli.ops import cl_conv

    monkeypatch.setattr(cl_conv, "FLIPPED_DX_MIN_PIXELS", 0)
    N, H, W, C, Cout, pads, bias, act = case
    check_op(npbe, clbe, conv3(C, Cout, pads, bias, act), [rand((N, H, W, C), scale=2)])
    assert (N, H, W, C) in [c[0] for c in calls], "the forward did not take the Winograd path"
    if C % 4 == 0:  # (the flipped dx needs a direct kernel's vector width: see cl_conv.flipped_dx_ok)
        assert any(c[1][2:] == (Cout, C) for c in calls), "dx did not take the Winograd path"


@pytest.mark.parametrize("act", ["swish", "hard_swish", "sigmoid"])
def test_winograd_epilogue_activations(npbe, clbe, act, calls):
    check_op(npbe, clbe, conv3(16, 24, act=act), [rand((2, 9, 7, 16), scale=3)], backward=False)
    assert calls


def test_winograd_error_on_wide_sums(npbe, clbe, calls):
    """512 input channels: the transforms' rounding stays far below the tolerance every op meets."""
    x = rand((1, 8, 8, 512))
    node = conv3(512, 32)
    y_ref = run_node(npbe, node, [x])[0]
    y_cl = run_node(clbe, node, [x])[0]
    clbe.forget_params(node)
    assert_close(y_cl, y_ref, 2e-5, "Winograd, 512 channels")
    assert calls


def test_frozen_weight_transformed_once(clbe, calls):
    """A weight no executor trains keeps its U panels in the backend's const cache: the second call reuses them
    (bit-identical output); a trained node transforms its weight on every call and caches nothing."""
    from transfercl_cli.ops import lookup

    fwd = lookup("opencl", "conv2d", "forward")
    node = conv3(16, 32, name="wino_frozen")
    x = clbe.asarray(rand((1, 8, 8, 16)))
    y1 = clbe.to_host(fwd(clbe, node, [x], False)[0][0])
    cache = clbe.const_cache(node, "weight")
    keys = [k for k in cache if k[0] == "winograd"]
    assert len(keys) == 1
    u = cache[keys[0]]
    y2 = clbe.to_host(fwd(clbe, node, [x], False)[0][0])
    assert cache[keys[0]] is u
    np.testing.assert_array_equal(y1, y2)
    trained = conv3(16, 32, name="wino_trained")
    clbe.declare_trained({"wino_trained"})
    y3 = clbe.to_host(fwd(clbe, trained, [x], False)[0][0])
    assert clbe.const_cache(trained, "weight") is None
    np.testing.assert_array_equal(y1, y3)  # same weights (same seed), same sums
    clbe.forget_params(node)
    clbe.forget_params(trained)


def test_choice_rule(rt, monkeypatch):
    from transfercl_cli.ops import cl_winograd

    def geom(H, W, s=1, d=1):
        return (3, 3, s, s, d, d, 1, 1, 1, 1, H, W)

    monkeypatch.setattr(cl_winograd, "WINOGRAD", None)
    assert cl_winograd.use_winograd(rt, geom(56, 56), 1, 8, 64, 64)  # ResNet-18's first stage
    # 7x7x512 (ResNet's last stage): at batch 1 its 37.7 MB of transformed weights cost more than the im2col GEMM;
    # at batch 8 the GEMM's arithmetic dominates and Winograd's 4x fewer multiplies win.
    assert not cl_winograd.use_winograd(rt, geom(7, 7), 1, 1, 512, 512)
    assert cl_winograd.use_winograd(rt, geom(7, 7), 1, 8, 512, 512)
    assert cl_winograd.use_winograd(rt, geom(14, 14), 1, 1, 256, 256)  # 16 tiles, 9.4 MB of transformed weights
    assert not cl_winograd.use_winograd(rt, geom(8, 8), 1, 1, 448, 384)  # 4 tiles, narrower
    assert not cl_winograd.use_winograd(rt, geom(7, 7), 1, 1, 128, 32)  # 3.6 MFLOP
    assert not cl_winograd.use_winograd(rt, geom(56, 56, s=2), 1, 8, 64, 64)
    assert not cl_winograd.use_winograd(rt, geom(56, 56, d=2), 1, 8, 64, 64)
    assert not cl_winograd.use_winograd(rt, geom(56, 56), 2, 8, 64, 64)
    monkeypatch.setattr(cl_winograd, "WINOGRAD", False)
    assert not cl_winograd.use_winograd(rt, geom(56, 56), 1, 8, 64, 64)
    monkeypatch.setattr(cl_winograd, "WINOGRAD", True)
    assert cl_winograd.use_winograd(rt, geom(2, 2), 1, 1, 4, 4)


@pytest.mark.parametrize("M,N,K", [(13, 40, 37), (9, 64, 300), (1, 16, 8)])
def test_gemm_batched_panels(rt, M, N, K):
    """Z GEMMs in one launch, B from caller-made panels (zero past N), K longer than a k chunk (running sums in a
    scratch area per GEMM), against float64."""
    from transfercl_cli.ops import cl_gemm

    Z = 3
    cfg = cl_gemm.batched_config(rt, M, N, K)
    NR = 16 * int(cfg["NV"])
    nbj = -(-N // NR)
    a, b = rand((Z, M, K), seed=1), rand((Z, K, N), seed=2)
    bp = np.zeros((Z, nbj, K, NR), np.float32)
    for jb in range(nbj):
        cols = b[:, :, jb * NR:(jb + 1) * NR]
        bp[:, jb, :, :cols.shape[2]] = cols
    out = rt.empty((Z * M * N,))
    cl_gemm.gemm_batched_panels(rt, cfg, rt.to_device(a.ravel()), rt.to_device(bp.ravel()), out, Z, M, N, K)
    assert_close(out.get().reshape(Z, M, N), a.astype(np.float64) @ b, 1e-5, "batched GEMM")
