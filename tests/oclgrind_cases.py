"""Small-shape cases that launch every kernel in kernels/*.cl at least once, in the style that TCL_TEST_STYLE names
(gpu: local-memory GEMM tiles, float4 depthwise, 8-channel BatchNorm, per-element pooling; cpu: float16 register
blocks, single work-items, 32-channel BatchNorm, row kernels), each result checked against the numpy reference.

Not collected by the default run (the name does not start with test_): tests/test_oclgrind.py runs this file on the
Oclgrind simulator in subprocesses, once per style, with its bounds and data-race checks on. It also runs on any
device: `TCL_TEST_STYLE=cpu python -m pytest tests/oclgrind_cases.py`. With TCL_OCLGRIND_COVERAGE=FILE the kernels
launched (file:kernel) are written to FILE as JSON at the end."""
import atexit
import json
import os

import numpy as np
import pytest

from tests.helpers import assert_close, check_op, make_node, run_node

STYLE = os.environ.get("TCL_TEST_STYLE", "gpu")
RNG = np.random.default_rng(18)
_LAUNCHED = set()


def _record_launches():
    """Wrap Runtime.kernel/launch to note which (file, kernel) ran; written out at exit when asked."""
    from transfercl_cli import runtime

    names = {}
    kernel, launch = runtime.Runtime.kernel, runtime.Runtime.launch

    def kernel_rec(self, name, kernel_name, defines=None):
        k = kernel(self, name, kernel_name, defines)
        names[id(k)] = f"{name}:{kernel_name}"
        return k

    def launch_rec(self, k, *a, **kw):
        _LAUNCHED.add(names.get(id(k), getattr(k, "function_name", "?")))
        return launch(self, k, *a, **kw)

    runtime.Runtime.kernel, runtime.Runtime.launch = kernel_rec, launch_rec
    path = os.environ.get("TCL_OCLGRIND_COVERAGE")
    if path:
        def write():
            with open(path, "w") as f:
                json.dump(sorted(_LAUNCHED), f)

        atexit.register(write)


_record_launches()


@pytest.fixture(autouse=True)
def _style(rt, monkeypatch):
    from transfercl_cli.ops import cl_conv, cl_elementwise

    monkeypatch.setattr(rt, "is_cpu", STYLE == "cpu")
    monkeypatch.setattr(cl_conv, "PORTABLE", STYLE != "cpu")
    monkeypatch.setattr(cl_elementwise, "BN_PORTABLE", STYLE != "cpu")


def randn(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# runtime


def test_every_kernel_file_builds(rt):
    from transfercl_cli.runtime import kernel_names

    extra = {"gemm": [{"GEMM_GPU_ONLY": 1}, {"MR": 6, "NV": 4}],
             "conv": [{"DEPTHWISE": 1, "KH": 5, "KW": 5, "SH": 2, "SW": 2, "DH": 1, "DW": 1, "MULT": 1, "VW": 16,
                       "PIX": 3, "MINVEC": 0}],
             "batchnorm": [{"CW": 8}, {"CW": 32}]}
    for name in kernel_names():
        for defines in [{}] + extra.get(name, []):
            assert rt.program(name, defines) is not None


def test_runtime_saxpy_and_half_storage(rt):
    x = np.arange(37, dtype=np.float32)
    dx, dy = rt.to_device(x), rt.to_device(np.ones(37, np.float32))
    rt.launch(rt.kernel("selftest", "saxpy"), (37,), None, np.int32(37), np.float32(2), dx, dy)
    np.testing.assert_array_equal(rt.to_host(dy), 2 * x + 1)
    v = randn(45, scale=3)
    a = rt.to_device(v)
    assert rt.to_half(a)
    rt.to_float(a)
    np.testing.assert_array_equal(rt.to_host(a), v.astype(np.float16).astype(np.float32))


# ---------------------------------------------------------------------------------------------------------------
# GEMM: every variant (forced; style-independent, so only in the gpu run) with transposes, alpha, bias, act and
# accumulate, on shapes with edges in every direction.


def _gemm_variants():
    from transfercl_cli.ops import cl_gemm

    extra = cl_gemm.cpu_test_configs() + [dict(kind="cpu", MR=8, NV=2, apack=0, pack="auto", kc=0, kb=16, gi=2)]
    return list(cl_gemm.VARIANTS) + [repr(c) for c in extra]


@pytest.mark.skipif(STYLE != "gpu", reason="forced variants: run once")
@pytest.mark.parametrize("variant", _gemm_variants())
def test_gemm_variant(rt, variant):
    from transfercl_cli.ops import cl_gemm

    M, K, N = 21, 70, 37
    for ta, tb in ((False, False), (True, False), (False, True), (True, True)):
        a = randn(*((K, M) if ta else (M, K)))
        b = randn(*((N, K) if tb else (K, N)))
        c0, bias = randn(M, N), randn(N)
        out = rt.to_device(c0)
        cl_gemm.gemm(rt, rt.to_device(a), rt.to_device(b), out, trans_a=ta, trans_b=tb, alpha=0.5, accumulate=True,
                     bias=rt.to_device(bias), act="relu6", variant=variant)
        ref = np.clip(c0 + 0.5 * (a.T if ta else a).astype(np.float64) @ (b.T if tb else b) + bias, 0, 6)
        assert_close(out.get(), ref, 1e-5, f"{variant} ta={ta} tb={tb}")


@pytest.mark.skipif(STYLE != "cpu", reason="panels are the CPU path's")
def test_gemm_packed_panels(rt):
    """A constant B packed once (gemm_pack_b_rows into 16- and 32-column panels), read by gemm_small_m and
    gemm_cpu."""
    from transfercl_cli.ops import cl_gemm

    for M in (3, 21):
        a, b, bias = randn(M, 40), randn(40, 37), randn(37)
        packs = {}
        out = cl_gemm.gemm(rt, rt.to_device(a), rt.to_device(b), bias=rt.to_device(bias), b_packs=packs)
        assert packs
        assert_close(out.get(), a.astype(np.float64) @ b + bias, 1e-5, f"packed panels M={M}")


def test_dense_with_bias_gradient_in_parts(npbe, clbe):
    # 300 rows: the bias gradient sums in row chunks (colsum + colsum_parts); relu: act_bwd (cl_gemm.act_masked).
    for rows in (300, 10):
        node = make_node("dense", attrs={"act": "relu"}, params={"weight": randn(7, 5), "bias": randn(5)})
        check_op(npbe, clbe, node, [randn(rows, 7)])


# ---------------------------------------------------------------------------------------------------------------
# convolution, pooling, padding


def conv_node(cin, cout, k=(3, 3), s=(1, 1), d=(1, 1), pads=(1, 1, 1, 1), groups=1, bias=True, act=None):
    kh, kw = k
    params = {"weight": randn(kh, kw, cin // groups, cout) / np.sqrt(kh * kw * cin / groups)}
    if bias:
        params["bias"] = randn(cout, scale=0.5)
    return make_node("conv2d", attrs=dict(kernel=k, strides=s, dilations=d, pads=pads, groups=groups, act=act),
                     params=params)


CONV = [
    # (x shape, cout, kernel, strides, dilations, pads, groups, bias, act)
    ((2, 6, 7, 17), 17, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 17, True, "relu6"),   # depthwise 16 + 1 / 4*4 + 1
    ((1, 7, 6, 20), 20, (3, 3), (2, 2), (1, 1), (0, 0, 1, 1), 20, False, None),     # depthwise stride 2, 16 + 4
    ((2, 5, 6, 3), 6, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 3, True, None),         # depth multiplier 2
    ((1, 7, 6, 5), 5, (3, 3), (2, 1), (2, 2), (2, 1, 2, 3), 5, True, "relu"),       # depthwise dilated
    ((2, 9, 9, 3), 32, (3, 3), (2, 2), (1, 1), (0, 0, 1, 1), 1, True, "relu6"),     # direct (RGB), 2 x float16
    ((1, 7, 6, 3), 21, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1, False, None),       # direct, 16 + 4 + 1
    ((1, 9, 7, 3), 64, (7, 7), (2, 2), (1, 1), (3, 3, 3, 3), 1, True, "relu"),      # direct, 4 x float16 (stem)
    ((1, 6, 5, 6), 4, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 2, True, "relu"),       # groups 2: im2col per group
    ((2, 5, 6, 5), 9, (3, 3), (2, 2), (1, 1), (0, 0, 1, 1), 1, True, None),         # im2col + GEMM, stride 2
    ((1, 5, 4, 20), 8, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), 1, True, None),        # im2col/col2im rows 16 + 4
    ((2, 5, 7, 32), 32, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 2, True, "relu"),     # direct KxK, 16 per group
    ((1, 7, 6, 8), 32, (3, 3), (2, 2), (2, 2), (0, 0, 1, 1), 1, False, "relu6"),    # direct KxK, 2 x 16, stride 2
    ((2, 7, 9, 32), 32, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), 2, True, "relu"),     # CPU: strided dx in 4 phases
    ((2, 4, 5, 17), 33, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 1, True, "relu"),     # pointwise: one GEMM
]


@pytest.mark.parametrize("case", CONV, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}k{c[2][0]}s{c[3][0]}g{c[6]}")
def test_conv2d(npbe, clbe, case, monkeypatch):
    from transfercl_cli.ops import cl_conv

    monkeypatch.setattr(cl_conv, "FLIPPED_DX_MIN_PIXELS", 0)  # small maps: the stride-1 dx takes the flipped path
    shape, cout, k, s, d, pads, groups, bias, act = case
    node = conv_node(shape[3], cout, k, s, d, pads, groups, bias, act)
    check_op(npbe, clbe, node, [randn(*shape, scale=2)])


@pytest.mark.skipif(STYLE != "cpu", reason="Winograd runs the CPU-style kernels")
def test_conv2d_winograd(npbe, clbe, monkeypatch):
    """F(4x4, 3x3): the weight, input and output transforms around the batched gemm_cpu (16- and 4-channel
    vectors), forward and the input gradient through the flipped weights."""
    from transfercl_cli.ops import cl_conv, cl_winograd

    monkeypatch.setattr(cl_winograd, "WINOGRAD", True)
    monkeypatch.setattr(cl_conv, "FLIPPED_DX_MIN_PIXELS", 0)
    check_op(npbe, clbe, conv_node(16, 20, act="relu"), [randn(1, 5, 6, 16, scale=2)])


def test_conv2d_residual(npbe, clbe, monkeypatch):
    """A fused residual Add before the activation (forward only): gemm_cpu's epilogue and, CPU style, wino_output's;
    the GPU style adds it in a separate pass."""
    from transfercl_cli.ops import cl_winograd

    monkeypatch.setattr(cl_winograd, "WINOGRAD", True)
    for shape, cout, k, pads in (((1, 4, 5, 17), 20, (1, 1), (0, 0, 0, 0)), ((1, 5, 6, 16), 20, (3, 3), (1, 1, 1, 1))):
        node = conv_node(shape[3], cout, k, pads=pads, act="relu")
        node.inputs, node.attrs["residual"] = ["x0", "x1"], True
        check_op(npbe, clbe, node, [randn(*shape, scale=2), randn(*shape[:3], cout, scale=2)], backward=False)


@pytest.mark.parametrize("act", ["swish", "hard_swish"])
def test_conv2d_engine_activations(npbe, clbe, act):
    """The epilogue activations without a fused gradient (forward only): depthwise, direct and GEMM epilogues."""
    for shape, cout, groups, k in (((1, 5, 6, 17), 17, 17, (3, 3)), ((1, 5, 6, 3), 21, 1, (3, 3)),
                                   ((1, 4, 5, 17), 20, 1, (1, 1))):
        pads = (1, 1, 1, 1) if k == (3, 3) else (0, 0, 0, 0)
        check_op(npbe, clbe, conv_node(shape[3], cout, k, pads=pads, groups=groups, act=act),
                 [randn(*shape, scale=4)], backward=False)


@pytest.mark.parametrize("node", [
    make_node("maxpool", attrs=dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1))),
    make_node("avgpool", attrs=dict(kernel=(3, 3), strides=(2, 1), pads=(1, 1, 1, 1), count_include_pad=True)),
    make_node("avgpool", attrs=dict(kernel=(2, 3), strides=(2, 2), pads=(0, 1, 1, 0), count_include_pad=False)),
    make_node("global_avgpool", attrs={"keepdims": True}),
    make_node("pad", attrs={"pads": (1, 2, 0, 1), "value": 0.5}),
], ids=["maxpool", "avgpool_pad", "avgpool_nopad", "global_avgpool", "pad"])
def test_pooling_and_pad(npbe, clbe, node):
    check_op(npbe, clbe, node, [randn(2, 5, 6, 70)])  # 70 channels: a 64-channel block and a tail


def test_maxpool_training(npbe, clbe):
    """CPU style: the training forward stores the argmax indices with the maximum (maxpool_fwd_argmax_rows)."""
    node = make_node("maxpool", attrs=dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1)))
    check_op(npbe, clbe, node, [randn(2, 5, 6, 70)], training=True)


def test_global_avgpool_segments(npbe, clbe, monkeypatch):
    """The CPU-style global pool split into pixel segments (two launches), 40 channels: a 16-wide and 8 tails."""
    from transfercl_cli.ops import cl_conv

    monkeypatch.setattr(cl_conv, "GAP_MIN_SEGMENT", 4)
    monkeypatch.setattr(cl_conv, "GAP_ITEMS_PER_CU", 8)
    check_op(npbe, clbe, make_node("global_avgpool", attrs={"keepdims": False}), [randn(1, 5, 3, 40)])


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm and the per-channel kernels: 45 channels (a 32-block + 8 + 5, or 5 x 8 + 5)


def _bn_node(C, **attrs):
    params = {"mean": RNG.standard_normal(C) * 0.5, "var": RNG.uniform(0.5, 2.0, C),
              "gamma": RNG.uniform(2.0, 5.0, C), "beta": RNG.standard_normal(C)}
    return make_node("batchnorm", attrs=dict({"eps": 1e-3, "momentum": 0.9}, **attrs), params=params)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("attrs", [{}, {"act": "relu6"}, {"pool": "global_avg", "keepdims": False, "act": "relu"}],
                         ids=["plain", "relu6", "pool"])
def test_batchnorm(npbe, clbe, training, attrs):
    check_op(npbe, clbe, _bn_node(45, **attrs), [randn(2, 3, 5, 45, scale=3) + 1.0], training=training)


@pytest.mark.parametrize("groups,act", [(1, "relu6"), (45, None)], ids=["pointwise-relu6", "depthwise"])
def test_conv_carrying_batchnorm(npbe, clbe, groups, act):
    """A trainable convolution carrying a trainable inference-mode BatchNorm (attr bn, plan.fold_frozen): the BN
    folded into the weights, the one-pass mask and bias sums, gamma's gradient from the folded weights' (bn_fold_dgamma)."""
    k = (1, 1) if groups == 1 else (3, 3)
    node = conv_node(45 if groups > 1 else 7, 45, k=k, pads=(0, 0, 0, 0) if groups == 1 else (1, 1, 1, 1),
                     groups=groups, act=act)
    node.attrs["bn"] = make_node("batchnorm", attrs={"eps": 1e-3, "bn_mode": "inference"}, params=_bn_node(45).params,
                                 name="n_bn")
    check_op(npbe, clbe, node, [randn(2, 3, 5, node.params["weight"].shape[2] * groups)], training=True)
    npbe.forget_params()
    clbe.forget_params()


def test_concat_batchnorm(npbe, clbe):
    """A frozen BatchNorm over the channel Concat of its inputs (plan.fold_frozen): inputs of 37 (a 32-block and a
    tail), 3 and 5 channels, written at offsets 0, 37 and 40 (unaligned vector stores)."""
    node = make_node("batchnorm", 3, attrs={"eps": 1e-3, "concat": True, "act": "relu"}, params=_bn_node(45).params)
    check_op(npbe, clbe, node, [randn(2, 3, 5, 37, scale=3), randn(2, 3, 5, 3, scale=3), randn(2, 3, 5, 5, scale=3)],
             backward=False)


def test_scale(npbe, clbe):
    check_op(npbe, clbe, make_node("scale", params={"scale": np.linspace(0.5, 2, 45)}), [randn(2, 3, 45)])


# ---------------------------------------------------------------------------------------------------------------
# elementwise.cl


@pytest.mark.parametrize("op", ["relu", "relu6", "clip", "leaky_relu", "sigmoid", "tanh", "swish", "hard_sigmoid",
                                "hard_swish", "identity"])
def test_activation(npbe, clbe, op):
    attrs = {"clip": {"min": -0.5, "max": 1.5}, "leaky_relu": {"alpha": 0.2}}.get(op, {})
    check_op(npbe, clbe, make_node(op, attrs=attrs), [randn(3, 37, scale=4)])


def test_fake_quant(npbe, clbe):
    # 3 x 37 values: whole float8 blocks and a scalar tail; wide enough to saturate at both ends.
    x = randn(3, 37, scale=4) + 0.0037  # off the rounding ties of the 0.05 steps
    check_op(npbe, clbe, make_node("fake_quant", attrs={"scale": 0.05, "zero_point": 20, "dtype": "uint8"}), [x])


@pytest.mark.parametrize("shapes", [((2, 3, 19), (2, 3, 19)), ((2, 3, 19), (19,)), ((2, 3, 4, 27), (2, 1, 1, 27)),
                                    ((2, 1, 5, 3), (1, 4, 1, 3)), ((3, 1, 5), (3, 4, 1))], ids=str)
@pytest.mark.parametrize("op", ["add", "mul", "sub", "div"])
def test_binary(npbe, clbe, op, shapes):
    xs = [randn(*s) for s in shapes]
    if op == "div":
        xs[1] = np.abs(xs[1]) + 0.5
    check_op(npbe, clbe, make_node(op, n_inputs=2), xs)


def test_concat_transpose_softmax(npbe, clbe):
    check_op(npbe, clbe, make_node("concat", n_inputs=2, attrs={"axis": 3}), [randn(2, 3, 4, 5), randn(2, 3, 4, 11)])
    check_op(npbe, clbe, make_node("transpose", attrs={"perm": (0, 3, 1, 2)}), [randn(2, 3, 4, 5)])
    for axis in (-1, 1):
        check_op(npbe, clbe, make_node("softmax", attrs={"axis": axis}), [randn(2, 5, 7)])


def test_lrn(npbe, clbe):
    # C = 30: interior float8 windows and per-channel edges, both ways.
    check_op(npbe, clbe, make_node("lrn", attrs={"size": 5, "alpha": 0.5, "beta": 0.6, "bias": 1.0}), [randn(2, 3, 30)])


def test_dropout(clbe):
    node = make_node("dropout", attrs={"rate": 0.3, "seed": 11})
    x = randn(5, 37) + 3.0
    y, gx, _ = run_node(clbe, node, [x], training=True, grad_out=np.ones_like(x))
    kept = y != 0
    assert 0.5 < kept.mean() < 0.9
    np.testing.assert_allclose(y[kept], x[kept] / 0.7, rtol=1e-6)
    np.testing.assert_allclose(gx[0][kept], 1 / 0.7, rtol=1e-6)
    assert not gx[0][~kept].any()


# ---------------------------------------------------------------------------------------------------------------
# tensor.cl


@pytest.mark.parametrize("op,attrs,kind", [
    ("erf", {}, "any"), ("gelu", {"approximate": "tanh"}, "any"), ("sqrt", {}, "pos"), ("pow", {"exponent": 3}, "any"),
    ("pow", {"exponent": 2.5}, "pos"), ("pow", {"exponent": 20}, "pos"), ("reciprocal", {}, "pos"), ("neg", {}, "any"),
], ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}{x}" for k, x in v.items()))
def test_unary(npbe, clbe, op, attrs, kind):
    x = randn(3, 37)
    x = np.abs(x) * 0.5 + 0.6 if kind == "pos" else x
    check_op(npbe, clbe, make_node(op, attrs=attrs), [x], grad_tol=2e-3)


def test_slice_reduce_layer_norm(npbe, clbe):
    check_op(npbe, clbe, make_node("slice", attrs=dict(axes=[3, 1], starts=[-2, 3], ends=[1, 0], steps=[-3, -2])),
             [randn(2, 4, 4, 17)])
    check_op(npbe, clbe, make_node("slice", attrs=dict(axes=[3], starts=[0], ends=[16])), [randn(2, 3, 3, 35)])
    for op, axes in (("reduce_mean", [1, 2]), ("reduce_sum", [1, 2]), ("reduce_mean", [2, 3])):  # [2, 3]: row_reduce
        check_op(npbe, clbe, make_node(op, attrs=dict(axes=axes, keepdims=True)), [randn(2, 5, 7, 17)])
    ln = make_node("layer_norm", attrs={"axis": -1}, params={"gamma": RNG.uniform(0.5, 1.5, 17),
                                                             "beta": RNG.normal(0, 0.3, 17)})
    check_op(npbe, clbe, ln, [randn(4, 8, 8, 17)])


# ---------------------------------------------------------------------------------------------------------------
# loss.cl and optim.cl


def test_softmax_xent(npbe, clbe):
    z, labels, cw = randn(6, 5, scale=3), np.array([0, 4, 2, 2, 1, 3], np.int32), np.linspace(0.5, 2, 5)
    out = []
    for be in (npbe, clbe):
        lab = be.asarray(labels)
        loss, grad = be.fn("softmax_xent")(be, be.asarray(z), lab, label_smoothing=0.1, class_weights=cw)
        losses, probs = be.fn("softmax_xent_forward")(be, be.asarray(z), labels, label_smoothing=0.1)
        out.append((loss, be.to_host(grad), np.asarray(losses), be.to_host(probs)))
    (l0, g0, ls0, p0), (l1, g1, ls1, p1) = out
    assert abs(l1 - l0) <= 1e-5 * abs(l0)
    assert_close(g1, g0, 1e-5, "xent grad")
    assert_close(ls1, ls0, 1e-5, "xent losses")
    assert_close(p1, p0, 1e-5, "xent probs")


def test_optimizer_steps(npbe, clbe):
    w, grads = randn(37), [randn(37) for _ in range(3)]
    for fn, kw in (("sgd_step", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
                   ("sgd_step", dict(lr=0.1)),
                   ("adam_step", dict(lr=0.01, weight_decay=1e-2, decoupled=True))):
        res = []
        for be in (npbe, clbe):
            p, state = be.asarray(w), {}
            for t, g in enumerate(grads, start=1):
                be.fn(fn)(be, p, be.asarray(g), state, **(dict(kw, step=t) if fn == "adam_step" else kw))
            res.append(be.to_host(p))
        assert_close(res[1], res[0], 1e-5, fn)
    for be in (npbe, clbe):
        a, b = be.asarray(w), be.asarray(grads[0])
        be.fn("scale_inplace")(be, a, 0.5)
        be.fn("add_inplace")(be, a, b)
        np.testing.assert_allclose(be.to_host(a), 0.5 * w + grads[0], rtol=1e-6)
        sq = be.fn("grad_norm_sq")(be, [a, b])
        np.testing.assert_allclose(sq, np.sum((0.5 * w + grads[0]) ** 2) + np.sum(grads[0] ** 2), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# executor: a small network end to end (the `tcl doctor --selftest` check)


def test_network_selftest(rt):
    from transfercl_cli.doctor import network_selftest

    ok, detail = network_selftest(rt)
    assert ok, detail
