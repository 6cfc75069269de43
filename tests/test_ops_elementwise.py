"""Non-convolution ops on both backends: the OpenCL kernels against the float64 numpy reference (check_op), the
reference backwards against finite differences (check_reference_grads), BatchNorm running statistics, dropout
masks, and the fused softmax cross-entropy loss."""
import numpy as np
import pytest

from tests.helpers import assert_close, check_op, check_reference_grads, make_node, numeric_grad, run_node
from transfercl_cli.ops import Need

RNG = np.random.default_rng(1234)

# Shapes with batch 1, odd spatial sizes and channel counts that are not multiples of the vector width.
SHAPES = [(1, 5, 7, 3), (2, 3, 3, 17), (3, 33), (2, 1, 1, 5), (1, 2, 3, 1)]
SMALL = [(1, 3, 5, 3), (2, 5)]  # for finite differences

ACTS = [
    ("relu", {}, 1.0),
    ("relu6", {}, 4.0),
    ("clip", {"min": -0.5, "max": 1.2}, 1.0),
    ("clip", {"min": 0.0, "max": None}, 1.0),
    ("leaky_relu", {"alpha": 0.1}, 1.0),
    ("sigmoid", {}, 3.0),
    ("tanh", {}, 2.0),
    ("swish", {}, 3.0),
    ("hard_sigmoid", {"alpha": 0.2, "beta": 0.5}, 4.0),
    ("hard_swish", {}, 4.0),
]


def randn(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("op,attrs,spread", ACTS, ids=[f"{a[0]}-{i}" for i, a in enumerate(ACTS)])
def test_activation_opencl(npbe, clbe, op, attrs, spread):
    node = make_node(op, attrs=attrs)
    for shape in SHAPES:
        check_op(npbe, clbe, node, [randn(*shape, scale=spread)])


@pytest.mark.parametrize("op,attrs,spread", ACTS, ids=[f"{a[0]}-{i}" for i, a in enumerate(ACTS)])
def test_activation_reference_grads(npbe, op, attrs, spread):
    node = make_node(op, attrs=attrs)
    for shape in SMALL:
        check_reference_grads(npbe, node, [randn(*shape, scale=spread).astype(np.float64)])


def test_activation_values(npbe):
    # Spot the formulas themselves (not only their consistency across backends).
    x = np.array([[-7.0, -3.5, -1.0, 0.5, 2.0, 7.0]])
    y = lambda op, **a: run_node(npbe, make_node(op, attrs=a), [x])[0]  # noqa: E731
    np.testing.assert_allclose(y("relu6"), np.clip(x, 0, 6))
    np.testing.assert_allclose(y("hard_sigmoid", alpha=0.2, beta=0.5), np.clip(0.2 * x + 0.5, 0, 1))
    np.testing.assert_allclose(y("hard_swish"), x * np.minimum(np.maximum(x + 3, 0), 6) / 6)
    np.testing.assert_allclose(y("swish"), x / (1 + np.exp(-x)))
    np.testing.assert_allclose(y("leaky_relu", alpha=0.3), np.where(x > 0, x, 0.3 * x))
    np.testing.assert_allclose(y("sigmoid"), 1 / (1 + np.exp(-x)))


FAKE_QUANT = [{"scale": 0.05, "zero_point": 0, "dtype": "uint8"}, {"scale": 0.02, "zero_point": 0, "dtype": "int8"},
              {"scale": 0.013, "zero_point": 97, "dtype": "uint8"}, {"scale": 0.3, "zero_point": -5, "dtype": "int8"}]


def _off_ties(x, scale):
    """Inputs at least 1e-3 of a step away from a rounding tie: a division that is not correctly rounded (OpenCL
    allows 2.5 ulp) must not decide a tie differently from numpy's."""
    f = x / scale - np.floor(x / scale)
    return np.where(np.abs(f - 0.5) < 1e-3, x + 0.01 * scale, x).astype(np.float32)


@pytest.mark.parametrize("attrs", FAKE_QUANT, ids=lambda a: f"{a['dtype']}-zp{a['zero_point']}")
def test_fake_quant(npbe, clbe, attrs):
    """QuantizeLinear + DequantizeLinear: both backends against the formula, saturation at both ends included, and
    the straight-through gradient (1 inside the representable range, 0 outside)."""
    node = make_node("fake_quant", attrs=attrs)
    s, zp = attrs["scale"], attrs["zero_point"]
    qmin, qmax = (0, 255) if attrs["dtype"] == "uint8" else (-128, 127)
    for shape in SHAPES:
        x = _off_ties(randn(*shape, scale=200 * s), s)  # wide enough to saturate
        check_op(npbe, clbe, node, [x])
        y = run_node(npbe, node, [x.astype(np.float64)])[0]
        q = np.clip(np.round(x.astype(np.float64) / s) + zp, qmin, qmax)
        np.testing.assert_allclose(y, (q - zp) * s, rtol=1e-6, atol=1e-9)
    # Ties round to even, as ONNX QuantizeLinear does: 0.5 and 2.5 steps go down, 1.5 up.
    # (A power-of-two scale keeps the ties exact in float32.)
    x = np.array([[0.5, 1.5, 2.5, -0.5]]) * 0.25
    for be in (npbe, clbe):
        y = run_node(be, make_node("fake_quant", attrs=dict(attrs, scale=0.25)), [x])[0] / 0.25
        np.testing.assert_allclose(y, np.clip([[0, 2, 2, 0]], qmin - zp, qmax - zp), atol=1e-6)
    x = np.array([[(qmin - zp - 3) * s, (qmin + qmax) / 2 * s - zp * s, (qmax - zp + 3) * s]])
    _, gx, _ = run_node(npbe, node, [x], grad_out=np.ones_like(x))
    np.testing.assert_array_equal(gx[0], [[0.0, 1.0, 0.0]])


def test_fake_quant_refuses_bad_attributes(npbe):
    for bad in ({"scale": 0.0}, {"scale": 0.1, "zero_point": 300}, {"scale": 0.1, "dtype": "int4"}):
        with pytest.raises(ValueError):
            run_node(npbe, make_node("fake_quant", attrs=bad), [np.zeros((1, 3))])


def test_sigmoid_extreme_inputs(npbe, clbe):
    x = np.array([[-200.0, -90.0, 0.0, 90.0, 200.0]], np.float32)
    for op in ("sigmoid", "swish", "tanh"):
        y = check_op(npbe, clbe, make_node(op), [x])
        assert np.all(np.isfinite(y))


# ---------------------------------------------------------------------------------------------------------------
# add / mul

BCAST = [
    [(2, 3, 5, 17), (17,)],
    [(1, 4, 4, 5), (1, 1, 1, 5)],
    [(2, 1, 1, 3), (2, 4, 5, 3)],
    [(3, 1, 5), (1, 4, 1)],
    [(2, 3, 4), (2, 3, 4), (4,)],
    [(2, 3, 1), (3, 4), (2, 1, 4)],
    [(3, 5), (3, 5)],
    [(2, 3, 3, 33), (2, 3, 3, 33)],
    [(2, 3, 5), (1,)],
    [(4, 8, 8, 5), (5,)],  # several row chunks in the two-pass column sum
    [(2, 3, 4), (2, 3, 1)],  # one value per row
    [(1, 9, 9, 17), (1, 9, 9, 1)],
    [(3, 5, 7, 27), (3, 1, 1, 27)],  # squeeze-excite's scale: per image, 16 + 8 + 3 channels
]


@pytest.mark.parametrize("op", ["add", "mul"])
@pytest.mark.parametrize("shapes", BCAST, ids=[str(s) for s in BCAST])
@pytest.mark.parametrize("rows", [None, True, False], ids=["device", "portable", "row-kernels"])
def test_add_mul_opencl(npbe, clbe, op, shapes, rows, monkeypatch):
    """Every broadcast pattern, with the row kernels chosen by device type and forced either way."""
    from transfercl_cli.ops import cl_elementwise

    monkeypatch.setattr(cl_elementwise, "ROWS_PORTABLE", rows)
    node = make_node(op, n_inputs=len(shapes))
    check_op(npbe, clbe, node, [randn(*s) for s in shapes])


@pytest.mark.parametrize("op", ["add", "mul"])
def test_add_mul_reference_grads(npbe, op):
    for shapes in ([(2, 3, 4), (4,)], [(1, 1, 3), (2, 2, 3), (2, 1, 3)], [(2, 3), (2, 3)]):
        node = make_node(op, n_inputs=len(shapes))
        check_reference_grads(npbe, node, [randn(*s).astype(np.float64) for s in shapes])


def test_add_without_node(npbe, clbe):
    # The executor accumulates gradients with add(be, None, [a, b], False).
    a, b = randn(2, 3, 5), randn(2, 3, 5)
    for be in (npbe, clbe):
        ys, _ = be.forward_fn("add")(be, None, [be.asarray(a), be.asarray(b)], False)
        assert_close(be.to_host(ys[0]), a.astype(np.float64) + b, 1e-6, "add(None)")


# ---------------------------------------------------------------------------------------------------------------
# scale

SCALES = [
    ({"scale": 1 / 127.5, "offset": -1.0}, {}),
    ({}, {"scale": np.linspace(0.5, 2, 17), "offset": np.linspace(-1, 1, 17)}),
    ({"offset": 0.25}, {"scale": np.linspace(0.5, 2, 17)}),
    ({"scale": 3.0}, {"offset": np.linspace(-1, 1, 17)}),
]


@pytest.mark.parametrize("attrs,params", SCALES)
def test_scale(npbe, clbe, attrs, params):
    node = make_node("scale", attrs=attrs, params=params)
    for shape in [(1, 5, 7, 17), (3, 17)]:
        check_op(npbe, clbe, node, [randn(*shape, scale=3)])
    check_reference_grads(npbe, node, [randn(2, 2, 17).astype(np.float64)])


# ---------------------------------------------------------------------------------------------------------------
# softmax


@pytest.mark.parametrize("shape,axis", [((3, 10), -1), ((1, 7), 1), ((2, 3, 4, 5), 1), ((2, 3, 4, 17), 3)])
def test_softmax(npbe, clbe, shape, axis):
    node = make_node("softmax", attrs={"axis": axis})
    x = randn(*shape, scale=4)
    y = check_op(npbe, clbe, node, [x])
    assert_close(y.sum(axis=axis), np.ones_like(y.sum(axis=axis)), 1e-5, "softmax sums")


def test_softmax_reference_grads(npbe):
    check_reference_grads(npbe, make_node("softmax", attrs={"axis": -1}), [randn(2, 5).astype(np.float64)])
    check_reference_grads(npbe, make_node("softmax", attrs={"axis": 1}), [randn(2, 3, 2).astype(np.float64)])


# ---------------------------------------------------------------------------------------------------------------
# data movement


@pytest.mark.parametrize("axis,shapes", [
    (3, [(2, 3, 5, 3), (2, 3, 5, 17), (2, 3, 5, 1)]),
    (-1, [(1, 4, 5), (1, 4, 3)]),
    (1, [(2, 3, 4, 5), (2, 1, 4, 5)]),
])
def test_concat(npbe, clbe, axis, shapes):
    node = make_node("concat", n_inputs=len(shapes), attrs={"axis": axis})
    y = check_op(npbe, clbe, node, [randn(*s) for s in shapes])
    assert y.shape[axis] == sum(s[axis] for s in shapes)
    check_reference_grads(npbe, node, [randn(*s).astype(np.float64) for s in shapes])


@pytest.mark.parametrize("op,attrs,shape", [
    ("flatten", {}, (2, 3, 5, 3)),
    ("reshape", {"shape": [-1, 5]}, (2, 3, 5)),
    ("reshape", {"shape": [3, 5, 1]}, (1, 15)),
    ("identity", {}, (2, 3, 17)),
])
def test_reshapes(npbe, clbe, op, attrs, shape):
    node = make_node(op, attrs=attrs)
    x = randn(*shape)
    y = check_op(npbe, clbe, node, [x])
    np.testing.assert_array_equal(y.reshape(-1), x.reshape(-1))
    check_reference_grads(npbe, node, [x.astype(np.float64)])


@pytest.mark.parametrize("shape,perm", [
    ((2, 3, 5, 17), (0, 3, 1, 2)),  # NHWC -> NCHW
    ((1, 17, 3, 5), (0, 2, 3, 1)),
    ((2, 3, 3, 2, 5), (0, 1, 2, 4, 3)),  # ShuffleNet channel shuffle on (N, H, W, groups, C/groups)
    ((2, 1, 4, 1, 3), (0, 4, 3, 2, 1)),
    ((3, 4, 5), (0, 1, 2)),
])
def test_transpose(npbe, clbe, shape, perm):
    node = make_node("transpose", attrs={"perm": perm})
    x = randn(*shape)
    y = check_op(npbe, clbe, node, [x])
    np.testing.assert_array_equal(y, np.transpose(x, perm))


def test_transpose_reference_grads(npbe):
    node = make_node("transpose", attrs={"perm": (0, 2, 3, 1)})
    check_reference_grads(npbe, node, [randn(1, 2, 3, 2).astype(np.float64)])


# ---------------------------------------------------------------------------------------------------------------
# LRN


@pytest.mark.parametrize("size,shape", [(5, (2, 3, 5, 17)), (4, (1, 5, 3, 3)), (3, (2, 33)), (1, (1, 2, 2, 5)),
                                        (4, (1, 2, 3, 40)), (7, (2, 64))])
def test_lrn(npbe, clbe, size, shape):
    node = make_node("lrn", attrs={"size": size, "alpha": 0.3, "beta": 0.75, "bias": 1.5})
    check_op(npbe, clbe, node, [randn(*shape, scale=2)])


def test_lrn_reference(npbe):
    node = make_node("lrn", attrs={"size": 4, "alpha": 0.3, "beta": 0.75, "bias": 1.5})
    x = randn(2, 7).astype(np.float64)
    # ONNX semantics, written out: window [c - 1, c + 2] for size 4.
    C = x.shape[1]
    want = np.empty_like(x)
    for c in range(C):
        s = np.sum(x[:, max(0, c - 1):min(C, c + 3)] ** 2, axis=1)
        want[:, c] = x[:, c] / (1.5 + 0.3 / 4 * s) ** 0.75
    assert_close(run_node(npbe, node, [x])[0], want, 1e-12, "lrn")
    check_reference_grads(npbe, node, [x])
    check_reference_grads(npbe, make_node("lrn", attrs={"size": 5, "alpha": 0.5, "beta": 0.6, "bias": 1.0}),
                          [randn(1, 2, 2, 6).astype(np.float64)])


# ---------------------------------------------------------------------------------------------------------------
# dropout


def _drop(be, node, x, training=True):
    ys, saved = be.forward_fn("dropout")(be, node, [be.asarray(x)], training)
    return be.to_host(ys[0]).astype(np.float64), saved


@pytest.fixture
def fixed_step(npbe, clbe):
    npbe.step = clbe.step = 5
    yield
    clbe.step = None  # the OpenCL backend is shared by the session


def test_dropout_matches_across_backends(npbe, clbe, fixed_step):
    for shape in [(2, 5, 7, 17), (1, 33), (3, 3)]:
        node = make_node("dropout", attrs={"rate": 0.3, "seed": 11})
        check_op(npbe, clbe, node, [randn(*shape)], training=True)
    check_reference_grads(npbe, make_node("dropout", attrs={"rate": 0.4, "seed": 2}), [randn(2, 9).astype(np.float64)],
                          training=True)


def test_dropout_masks(npbe, clbe, fixed_step):
    x = np.abs(randn(4, 16, 16, 8)) + 0.5  # no zeros: a zero output means dropped
    rate = 0.25
    node = make_node("dropout", attrs={"rate": rate, "seed": 7})
    for be in (npbe, clbe):
        y1, _ = _drop(be, node, x)
        y2, _ = _drop(be, node, x)
        np.testing.assert_array_equal(y1, y2)  # same seed and step: same mask
        kept = y1 != 0
        np.testing.assert_allclose(y1[kept], x[kept] / (1 - rate), rtol=1e-6)  # inverted scaling
        frac = 1 - kept.mean()
        sd = np.sqrt(rate * (1 - rate) / x.size)
        assert abs(frac - rate) < 5 * sd, f"dropped fraction {frac} for rate {rate}"
        other, _ = _drop(be, make_node("dropout", attrs={"rate": rate, "seed": 8}), x)
        assert np.mean((other != 0) != kept) > 0.2  # another seed: another mask
        be.step = 6
        later, _ = _drop(be, node, x)
        be.step = 5
        assert np.mean((later != 0) != kept) > 0.2  # another step: another mask
        yi, _ = _drop(be, node, x, training=False)
        np.testing.assert_array_equal(yi, x.astype(np.float64))  # identity at inference


def test_dropout_counter_advances_per_step(npbe, clbe):
    # Without be.step, each backward moves the node to a new mask; a new backend restarts the sequence.
    from transfercl_cli.backends import NumpyBackend

    x = np.ones((2, 50), np.float32)
    node = make_node("dropout", attrs={"rate": 0.5, "seed": 3}, name="drop_counter")
    masks = []
    for be in (npbe, NumpyBackend()):
        seq = []
        for _ in range(2):
            y, saved = _drop(be, node, x)
            seq.append(y != 0)
            be.backward_fn("dropout")(be, node, saved, [be.asarray(np.ones_like(x))], Need([True], False))
        masks.append(seq)
    assert (masks[0][0] != masks[0][1]).any()
    np.testing.assert_array_equal(masks[0][0], masks[1][0])
    np.testing.assert_array_equal(masks[0][1], masks[1][1])


# ---------------------------------------------------------------------------------------------------------------
# batchnorm


def _bn_node(C, with_affine=True, eps=1e-3, momentum=0.9, rng=RNG):
    params = {"mean": rng.standard_normal(C) * 0.5, "var": rng.uniform(0.5, 2.0, C)}
    if with_affine:
        params.update(gamma=rng.uniform(0.5, 1.5, C), beta=rng.standard_normal(C))
    return make_node("batchnorm", attrs={"eps": eps, "momentum": momentum}, params=params)


@pytest.mark.parametrize("channels", [(37, 3, 5), (0, 16, 40), (8,)], ids=["37-3-5", "0-16-40", "one-input"])
@pytest.mark.parametrize("act", [None, "relu6"])
def test_batchnorm_over_concat(npbe, clbe, channels, act):
    """A frozen BatchNorm over the channel Concat of its inputs (attr concat, plan.fold_frozen): each input
    normalised into its slice (unaligned offsets, an input without channels, a single input) against the float64
    reference of Concat then BatchNorm; training mode is refused (fold_frozen never fuses a BatchNorm that trains)."""
    bn = _bn_node(sum(channels))
    node = make_node("batchnorm", len(channels), attrs=dict(bn.attrs, concat=True, act=act), params=bn.params)
    xs = [RNG.standard_normal((2, 3, 5, c)) * 2 + 0.5 for c in channels]
    y = check_op(npbe, clbe, node, xs, backward=False)
    ref = make_node("batchnorm", attrs=dict(bn.attrs, act=act), params=bn.params)
    assert_close(y, run_node(npbe, ref, [np.concatenate(xs, axis=-1)])[0], 1e-6, "concat then batchnorm")
    with pytest.raises(ValueError, match="inference mode only"):
        run_node(clbe, node, xs, training=True)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 17), (1, 5, 7, 3), (4, 16, 16, 5), (3, 33), (1, 1, 1, 1)])
def test_batchnorm_opencl(npbe, clbe, training, shape):
    if training and int(np.prod(shape[:-1])) == 1:
        shape = (3,) + shape[1:]  # with two values xhat = +-1 and dx vanishes; three do not
    node = _bn_node(shape[-1])
    check_op(npbe, clbe, node, [randn(*shape, scale=2) + 1.0], training=training)


@pytest.mark.parametrize("act", ["relu", "relu6"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 17), (3, 4, 8), (1, 5, 7, 3)])
def test_batchnorm_fused_activation(npbe, clbe, act, training, shape):
    # plan.fold_frozen fuses a ReLU/ReLU6 into a BatchNorm that stays; its mask is recomputed from the input.
    node = _bn_node(shape[-1])
    node.attrs["act"] = act
    node.params["gamma"] = RNG.uniform(2.0, 5.0, shape[-1])  # outputs beyond 6 as well as below 0
    x = randn(*shape, scale=3) + 1.0
    check_op(npbe, clbe, node, [x], training=training)
    check_reference_grads(npbe, node, [randn(2, 3, shape[-1]).astype(np.float64) * 3 + 1], training=training)


@pytest.mark.parametrize("act", [None, "relu6"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape,keepdims", [((2, 3, 5, 17), False), ((3, 7, 7, 70), True), ((2, 1, 3, 40), False)])
def test_batchnorm_fused_pool(npbe, clbe, act, training, shape, keepdims):
    # plan.fold_frozen also fuses the head's global average pool: the output is (N, C) (or (N, 1, 1, C)), and the
    # backward reads the pooled gradient once per image. C = 70: two 32-channel blocks and a tail. N >= 2: with one
    # image, a training BN pools to beta and every input gradient vanishes.
    node = _bn_node(shape[-1])
    node.attrs.update(pool="global_avg", keepdims=keepdims)
    if act:
        node.attrs["act"] = act
    node.params["gamma"] = RNG.uniform(2.0, 5.0, shape[-1])
    x = randn(*shape, scale=3) + 1.0
    y = check_op(npbe, clbe, node, [x], training=training)
    assert y.shape == ((shape[0], 1, 1, shape[-1]) if keepdims else (shape[0], shape[-1]))
    check_reference_grads(npbe, node, [randn(2, 2, 3, shape[-1]).astype(np.float64) * 3 + 1], training=training,
                          max_points=60)


def test_batchnorm_fused_activation_matches_two_nodes(npbe):
    from transfercl_cli.graph import Graph, Node

    rng = np.random.default_rng(11)
    C = 6
    bn = _bn_node(C, rng=rng)
    bn.params["gamma"] = rng.uniform(2.0, 5.0, C)
    g1 = Graph([Node("bn", "batchnorm", ["x"], ["b"], dict(bn.attrs), dict(bn.params)),
                Node("act", "relu6", ["b"], ["y"])], {"x": (4, C)}, ["y"])
    g2 = Graph([Node("bn", "batchnorm", ["x"], ["y"], dict(bn.attrs, act="relu6"), dict(bn.params))],
               {"x": (4, C)}, ["y"])
    x = rng.normal(2, 3, (3, 4, C))
    gy = rng.normal(0, 1, (3, 4, C))
    from transfercl_cli.executor import Executor

    res = []
    for g in (g1, g2):
        npbe.forget_params()
        ex = Executor(g, npbe, {"bn"})
        y = ex.forward({"x": x}, training=True)["y"]
        grads = ex.backward({"y": gy})
        res.append((y, grads[("bn", "gamma")], grads[("bn", "beta")]))
    assert 0 < np.mean(res[0][0] == 0) < 1 and np.any(res[0][0] == 6)  # both kinks are exercised
    for a, b in zip(*res):
        assert_close(b, a, 1e-12, "fused vs separate")


def test_batchnorm_large_mean(npbe, clbe):
    # float32 statistics must not cancel when the mean dwarfs the spread (E[x^2] - E[x]^2 would be off by ~100%).
    # The output y = x * a + b (b = beta - mean * a) still rounds at |x * a| ~ 3000 / |y| ~ 1: ~1e-4 of it, so 1e-3
    # (1e-4 failed or passed with the random stream's position, i.e. with which tests ran before).
    node = _bn_node(17)
    x = randn(4, 8, 8, 17) * 0.1 + 300.0  # 256 rows: several chunks merged
    check_op(npbe, clbe, node, [x], training=True, fwd_tol=1e-3)


@pytest.mark.parametrize("training", [False, True])
def test_batchnorm_no_affine(npbe, clbe, training):
    node = _bn_node(3, with_affine=False)
    check_op(npbe, clbe, node, [randn(2, 3, 3, 3)], training=training)
    check_reference_grads(npbe, node, [randn(2, 2, 3).astype(np.float64)], training=training)


@pytest.mark.parametrize("training", [False, True])
def test_batchnorm_reference_grads(npbe, training):
    node = _bn_node(3)
    check_reference_grads(npbe, node, [randn(2, 2, 3, 3).astype(np.float64) * 2 + 1], training=training)


def test_batchnorm_reference_values(npbe):
    node = _bn_node(5, eps=1e-3)
    x = randn(3, 4, 5).astype(np.float64)
    p = node.params
    want = (x - p["mean"]) / np.sqrt(p["var"].astype(np.float64) + 1e-3) * p["gamma"] + p["beta"]
    assert_close(run_node(npbe, node, [x])[0], want, 1e-6, "bn inference")
    m, v = x.mean(axis=(0, 1)), x.var(axis=(0, 1))
    want = (x - m) / np.sqrt(v + 1e-3) * p["gamma"] + p["beta"]
    npbe.forget_params()
    assert_close(run_node(npbe, node, [x], training=True)[0], want, 1e-6, "bn training")


def test_batchnorm_running_stats(npbe, clbe):
    C = 17
    node = _bn_node(C, momentum=0.8)
    x = randn(3, 5, 7, C, scale=2) + 0.5
    xd = x.astype(np.float64).reshape(-1, C)
    m0 = node.params["mean"].astype(np.float64)
    v0 = node.params["var"].astype(np.float64)
    want_m = 0.8 * m0 + 0.2 * xd.mean(axis=0)
    want_v = 0.8 * v0 + 0.2 * xd.var(axis=0, ddof=1)  # unbiased, as Keras
    for be in (npbe, clbe):
        be.forget_params(node)
        run_node(be, node, [x], training=True)
        assert_close(be.to_host(be.param(node, "mean")), want_m, 1e-5, f"{be.name} running mean")
        assert_close(be.to_host(be.param(node, "var")), want_v, 1e-5, f"{be.name} running var")
        # Inference leaves them alone; the graph's host copy is untouched until synced.
        run_node(be, node, [x], training=False)
        assert_close(be.to_host(be.param(node, "mean")), want_m, 1e-5, f"{be.name} running mean (inference)")
        np.testing.assert_array_equal(node.params["mean"], m0.astype(np.float32))
        be.forget_params(node)


def test_batchnorm_backward_need_subsets(npbe, clbe):
    # Frozen BN in the gradient path (dx only) and params-only both work and agree.
    node = _bn_node(5)
    x, g = randn(2, 3, 3, 5), randn(2, 3, 3, 5)
    res = {}
    for be in (npbe, clbe):
        for training in (False, True):
            for need in (Need([True], False), Need([False], True)):
                ys, saved = be.forward_fn("batchnorm")(be, node, [be.asarray(x)], training)
                gxs, gps = be.backward_fn("batchnorm")(be, node, saved, [be.asarray(g)], need)
                assert (gxs[0] is None) != need.inputs[0]
                assert bool(gps) == need.params
                res[(be.name, training, need.params)] = [be.to_host(gxs[0]) if gxs[0] is not None else None,
                                                         {k: be.to_host(v) for k, v in gps.items()}]
            be.forget_params(node)
    for training in (False, True):
        for p in (False, True):
            a, b = res[("opencl", training, p)], res[("numpy", training, p)]
            if a[0] is not None:
                assert_close(a[0], b[0], 1e-4, "dx")
            for k in b[1]:
                assert_close(a[1][k], b[1][k], 1e-4, k)


# ---------------------------------------------------------------------------------------------------------------
# softmax cross-entropy


def xent_ref(z, labels, ls=0.0, cw=None):
    """Independent float64 formula: -sum q log softmax(z), weighted mean."""
    z = z.astype(np.float64)
    N, K = z.shape
    logp = z - z.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    q = np.eye(K)[labels] * (1 - ls) + ls / K
    li = -(q * logp).sum(1)
    w = np.ones(N) if cw is None else np.asarray(cw, np.float64)[labels]
    return float((w * li).sum() / w.sum()), li


@pytest.mark.parametrize("ls,weighted", [(0.0, False), (0.1, False), (0.0, True), (0.2, True)])
def test_softmax_xent(npbe, clbe, ls, weighted):
    N, K = 7, 5
    z = randn(N, K, scale=3)
    z[0] += 80.0  # large logits: the kernel must subtract the max
    labels = RNG.integers(0, K, N)
    cw = RNG.uniform(0.2, 3.0, K) if weighted else None
    want, _ = xent_ref(z, labels, ls, cw)
    fd = numeric_grad(lambda zz: xent_ref(zz, labels, ls, cw)[0], z.astype(np.float64))
    for be in (npbe, clbe):
        for lab in (labels, be.asarray(labels)):  # host labels, and labels already on the device
            cws = None if cw is None else (cw if lab is labels else be.asarray(cw))
            loss, grad = be.fn("softmax_xent")(be, be.asarray(z), lab, label_smoothing=ls, class_weights=cws)
            assert isinstance(loss, float)
            assert abs(loss - want) <= 1e-5 * max(1.0, abs(want)), (be.name, loss, want)
            assert_close(be.to_host(grad), fd, 1e-4 if be.name == "opencl" else 1e-6, f"{be.name} xent grad")
            be.release(grad)


def test_softmax_xent_forward(npbe, clbe):
    N, K = 6, 17
    z = randn(N, K, scale=3)
    labels = RNG.integers(0, K, N)
    _, li = xent_ref(z, labels, 0.1)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for be in (npbe, clbe):
        losses, probs = be.fn("softmax_xent_forward")(be, be.asarray(z), labels, label_smoothing=0.1)
        assert_close(losses, li, 1e-5, f"{be.name} per-sample losses")
        assert_close(be.to_host(probs), p, 1e-5, f"{be.name} probabilities")
        none, probs2 = be.fn("softmax_xent_forward")(be, be.asarray(z))
        assert none is None
        assert_close(be.to_host(probs2), p, 1e-5, f"{be.name} probabilities without labels")


def test_softmax_xent_bad_labels(npbe, clbe):
    for be in (npbe, clbe):
        with pytest.raises(ValueError):
            be.fn("softmax_xent")(be, be.asarray(randn(2, 3)), np.array([0, 3]))


# ---------------------------------------------------------------------------------------------------------------
# Through the executor: a small training step agrees across backends, and no buffer goes back to the pool twice.


def _graph():
    from transfercl_cli.graph import Graph, Node

    rng = np.random.default_rng(5)
    C = 6
    nodes = [
        Node("sc", "scale", ["x"], ["a"], params={"scale": rng.uniform(0.5, 1.5, C).astype(np.float32),
                                               "offset": rng.standard_normal(C).astype(np.float32)}),
        Node("bn", "batchnorm", ["a"], ["b"], attrs={"eps": 1e-3, "momentum": 0.9},
             params={"gamma": rng.uniform(0.5, 1.5, C).astype(np.float32), "beta": np.zeros(C, np.float32),
                     "mean": np.zeros(C, np.float32), "var": np.ones(C, np.float32)}),
        Node("act", "swish", ["b"], ["c"]),
        Node("res", "add", ["c", "a"], ["d"]),
        Node("se", "mul", ["d", "a"], ["e"]),
        Node("drop", "dropout", ["e"], ["f"], attrs={"rate": 0.2, "seed": 1}),
        Node("tr", "transpose", ["f"], ["g"], attrs={"perm": (0, 3, 1, 2)}),
        Node("fl", "flatten", ["g"], ["h"]),
        Node("sm", "softmax", ["h"], ["y"], attrs={"axis": -1}),
    ]
    return Graph(nodes=nodes, inputs={"x": (3, 5, C)}, outputs=["y"])


def test_executor_training_step(npbe, clbe, fixed_step):
    from transfercl_cli.executor import Executor

    x = randn(2, 3, 5, 6)
    g = randn(2, 90)
    res = {}
    for be in (npbe, clbe):
        graph = _graph()
        ex = Executor(graph, be, trainable={"sc", "bn"})
        out = ex.forward({"x": x}, training=True)
        y = be.to_host(out["y"])
        grads = ex.backward({"y": be.asarray(g)})
        res[be.name] = (y, {k: be.to_host(v) for k, v in grads.items()})
        if be.name == "opencl":
            pooled = [id(b) for bufs in be.rt._pool.values() for b in bufs]
            assert len(pooled) == len(set(pooled)), "a buffer was released twice"
        for v in grads.values():
            be.release(v)
        be.release(out["y"])
        be.forget_params()
    y_cl, g_cl = res["opencl"]
    y_np, g_np = res["numpy"]
    assert_close(y_cl, y_np, 1e-4, "graph forward")
    assert set(g_cl) == set(g_np) == {("sc", "scale"), ("sc", "offset"), ("bn", "gamma"), ("bn", "beta")}
    for k in g_np:
        assert_close(g_cl[k], g_np[k], 1e-3, f"graph grad {k}")
