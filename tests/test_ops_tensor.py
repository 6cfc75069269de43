"""The tensor ops of issue 14 (slice, layer_norm, erf / gelu / sqrt / pow / reciprocal / neg, sub / div,
reduce_mean / reduce_sum) on both backends: the OpenCL kernels against the float64 numpy reference (check_op), the
reference backwards against finite differences (check_reference_grads), shape inference (axis 0 refused) and MAC
counts, and a small graph through the executor."""
import math

import numpy as np
import pytest

from tests.helpers import assert_close, check_op, check_reference_grads, make_node, run_node
from transfercl_cli.errors import ModelError
from transfercl_cli.executor import Executor
from transfercl_cli.graph import Graph, Node
from transfercl_cli.ops.shapes import infer_node, infer_shapes, macs

RNG = np.random.default_rng(2024)
BIG = 2 ** 63 - 1  # ONNX's "to the end"


def randn(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def positive(*shape, lo=0.5, hi=2.0):
    return RNG.uniform(lo, hi, shape).astype(np.float32)


def f64(x):
    return np.asarray(x, np.float64)


# ---------------------------------------------------------------------------------------------------------------
# slice

SLICES = [
    # (input shape, attrs, expected numpy index)
    ((2, 5, 7, 17), dict(axes=[3], starts=[0], ends=[8]), np.s_[:, :, :, 0:8]),  # channel split (ONNX Split)
    ((2, 5, 7, 17), dict(axes=[-1], starts=[8], ends=[BIG]), np.s_[:, :, :, 8:]),
    ((2, 3, 3, 16), dict(axes=[3], starts=[8], ends=[16]), np.s_[:, :, :, 8:16]),  # whole float8 rows
    ((1, 9, 8, 3), dict(axes=[1, 2], starts=[1, 2], ends=[-1, -2]), np.s_[:, 1:-1, 2:-2]),  # Cropping2D
    ((2, 6, 5, 3), dict(axes=[2], starts=[-1], ends=[-BIG], steps=[-1]), np.s_[:, :, ::-1]),  # reversed W
    ((2, 4, 4, 17), dict(axes=[3, 1], starts=[-2, 3], ends=[1, 0], steps=[-3, -2]), np.s_[:, 3:0:-2, :, -2:1:-3]),
    ((2, 5, 7, 5), dict(axes=[1, 3], starts=[-4, -3], ends=[-1, -1]), np.s_[:, -4:-1, :, -3:-1]),  # negative
    ((2, 5, 7, 5), dict(axes=[2], starts=[-100], ends=[1000]), np.s_[:, :, -100:1000]),  # clamped both ends
    ((3, 33), dict(axes=[1], starts=[2], ends=[1000], steps=[3]), np.s_[:, 2::3]),
    ((2, 7, 5), dict(axes=[1, 2], starts=[0, 1], ends=[7, 4], steps=[2, 1]), np.s_[:, 0:7:2, 1:4]),
    ((2, 4, 3), dict(axes=[1], starts=[5], ends=[9]), np.s_[:, 5:9]),  # empty
    ((1, 6, 6, 17), dict(axes=[2, 3], starts=[1, 3], ends=[5, 12]), np.s_[:, :, 1:5, 3:12]),  # batch 1
]


@pytest.mark.parametrize("shape,attrs,index", SLICES, ids=[f"slice{i}" for i in range(len(SLICES))])
def test_slice_opencl(npbe, clbe, shape, attrs, index):
    node = make_node("slice", attrs=attrs)
    x = randn(*shape)
    y = check_op(npbe, clbe, node, [x])
    np.testing.assert_array_equal(y, x[index])
    assert infer_node(node, [shape[1:]]) == [x[index].shape[1:]]


def test_slice_reference_grads(npbe):
    for shape, attrs, _ in (SLICES[3], SLICES[5], SLICES[9]):
        check_reference_grads(npbe, make_node("slice", attrs=attrs), [f64(randn(*shape))])


# ---------------------------------------------------------------------------------------------------------------
# layer_norm

def ln_params(norm_shape, beta=True, gamma=True):
    p = {}
    if gamma:
        p["gamma"] = RNG.uniform(0.5, 1.5, norm_shape)
    if beta:
        p["beta"] = RNG.normal(0, 0.3, norm_shape)
    return p


LAYER_NORMS = [
    ((2, 3, 5, 17), dict(axis=-1), (17,), True, True),
    ((2, 3, 5, 17), dict(axis=3, epsilon=1e-3), (17,), False, True),  # no beta
    ((3, 33), dict(axis=-1), (33,), True, True),
    ((4, 16), dict(axis=1, epsilon=1e-6), (16,), False, True),
    ((2, 7), dict(axis=-1), (7,), False, False),  # neither parameter
    ((2, 4, 6, 5), dict(axis=-2), (6, 5), True, True),  # over (W, C)
    ((2, 3, 4, 5), dict(axis=1), (3, 4, 5), True, True),  # over everything but the batch
    ((4, 8, 8, 17), dict(axis=-1), (17,), True, True),  # several row chunks in the parameter gradients
    ((1, 1, 1, 300), dict(axis=-1), (300,), True, True),  # one long row
]


@pytest.mark.parametrize("shape,attrs,norm,beta,gamma", LAYER_NORMS, ids=[f"ln{i}" for i in range(len(LAYER_NORMS))])
def test_layer_norm_opencl(npbe, clbe, shape, attrs, norm, beta, gamma):
    node = make_node("layer_norm", attrs=attrs, params=ln_params(norm, beta, gamma))
    x = randn(*shape, scale=2.0) + 0.7
    y = check_op(npbe, clbe, node, [x])
    if not beta and not gamma:
        axes = tuple(range(x.ndim - len(norm), x.ndim))
        np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-6)
        np.testing.assert_allclose(y.std(axis=axes), 1.0, atol=1e-4)
    assert infer_node(node, [shape[1:]]) == [shape[1:]]


def test_layer_norm_reference_grads(npbe):
    for shape, attrs, norm, beta, gamma in [((2, 2, 3, 5), dict(axis=-1), (5,), True, True),
                                            ((3, 7), dict(axis=1, epsilon=1e-3), (7,), False, True),
                                            ((2, 3, 2, 3), dict(axis=-2), (2, 3), True, True),
                                            ((2, 4), dict(axis=-1), (4,), False, False)]:
        node = make_node("layer_norm", attrs=attrs, params=ln_params(norm, beta, gamma))
        check_reference_grads(npbe, node, [f64(randn(*shape))], tol=1e-5)


def test_layer_norm_matches_formula(npbe):
    x = f64(randn(3, 10))
    node = make_node("layer_norm", attrs={"axis": -1, "epsilon": 1e-5}, params=ln_params((10,)))
    y = run_node(npbe, node, [x])[0]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    want = (x - mu) / np.sqrt(var + 1e-5) * node.params["gamma"] + node.params["beta"]
    assert_close(y, want, 1e-6, "layer_norm formula")


# ---------------------------------------------------------------------------------------------------------------
# unary ops

SHAPES = [(1, 5, 7, 3), (2, 3, 3, 17), (3, 33), (2, 1, 1, 5)]

UNARY = [
    ("erf", {}, "any"),
    ("gelu", {}, "any"),
    ("gelu", {"approximate": "none"}, "any"),
    ("gelu", {"approximate": "tanh"}, "any"),
    ("sqrt", {}, "pos"),
    ("pow", {"exponent": 2}, "any"),
    ("pow", {"exponent": 3.0}, "any"),
    ("pow", {"exponent": 0.5}, "pos"),
    ("pow", {"exponent": -1}, "pos"),
    ("pow", {"exponent": 1.5}, "pos"),
    ("pow", {"exponent": 0}, "any"),
    ("pow", {"exponent": -3}, "neg"),  # integral exponents keep the sign of a negative base
    ("pow", {"exponent": 20}, "pos"),  # beyond the multiply-by-squaring range
    ("pow", {"exponent": 2.5}, "pos"),
    ("reciprocal", {}, "pos"),
    ("neg", {}, "any"),
]


def unary_input(kind, shape):
    if kind == "pos":
        return positive(*shape)
    if kind == "neg":
        return -positive(*shape)
    return randn(*shape, scale=2.0)


@pytest.mark.parametrize("op,attrs,kind", UNARY, ids=[f"{u[0]}-{i}" for i, u in enumerate(UNARY)])
def test_unary_opencl(npbe, clbe, op, attrs, kind):
    node = make_node(op, attrs=attrs)
    for shape in SHAPES:
        check_op(npbe, clbe, node, [unary_input(kind, shape)])
        assert infer_node(node, [shape[1:]]) == [shape[1:]]


@pytest.mark.parametrize("op,attrs,kind", UNARY, ids=[f"{u[0]}-{i}" for i, u in enumerate(UNARY)])
def test_unary_reference_grads(npbe, op, attrs, kind):
    node = make_node(op, attrs=attrs)
    for shape in [(1, 3, 5, 3), (2, 5)]:
        check_reference_grads(npbe, node, [f64(unary_input(kind, shape))])


def test_unary_values(npbe, clbe):
    x = np.array([[-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.5]])
    erf = np.vectorize(math.erf)
    cases = [
        ("erf", {}, erf(x)),
        ("gelu", {}, 0.5 * x * (1 + erf(x / math.sqrt(2)))),
        ("gelu", {"approximate": "tanh"}, 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))),
        ("pow", {"exponent": 3}, x ** 3),
        ("pow", {"exponent": 2}, x * x),
        ("neg", {}, -x),
    ]
    for op, attrs, want in cases:
        y = check_op(npbe, clbe, make_node(op, attrs=attrs), [x.astype(np.float32)], backward=False)
        np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6, err_msg=op)
    assert abs(run_node(npbe, make_node("gelu"), [np.array([[1.0]])])[0][0, 0] - 0.8413447460685429) < 1e-12


def test_pow_of_negative_base(npbe, clbe):
    # numpy / ONNX: NaN for a negative base and a non-integer exponent; integer exponents keep the sign rule.
    x = np.array([[-2.0, -0.5, 0.5, 2.0]], np.float32)
    for be in (npbe, clbe):
        def pw(e):
            return be.to_host(be.forward_fn("pow")(be, make_node("pow", attrs={"exponent": e}), [be.asarray(x)],
                                                   False)[0][0])

        y = pw(0.5)
        assert np.isnan(y[0, :2]).all() and np.allclose(y[0, 2:], np.sqrt(x[0, 2:]))
        np.testing.assert_allclose(pw(3), x ** 3, rtol=1e-6)
        np.testing.assert_allclose(pw(-2), x ** -2.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# sub / div

BCAST = [
    [(2, 3, 5, 17), (17,)],  # per channel
    [(2, 3, 5, 17), (1,)],  # scalar-like
    [(1,), (2, 3, 5, 17)],  # scalar-like first: the kernels swap the operands
    [(17,), (2, 3, 3, 17)],
    [(1, 4, 4, 5), (1, 1, 1, 5)],
    [(2, 1, 1, 3), (2, 4, 5, 3)],  # squeeze-excite style, broadcast first operand
    [(2, 4, 5, 3), (2, 1, 1, 3)],
    [(3, 1, 5), (1, 4, 1)],  # both broadcast
    [(2, 3, 4), (2, 3, 1)],  # one value per row (a decomposed layer norm)
    [(2, 3, 3, 33), (2, 3, 3, 33)],
    [(4, 8, 8, 5), (5,)],  # several row chunks in the gradient's column sums
]


@pytest.mark.parametrize("op", ["sub", "div"])
@pytest.mark.parametrize("shapes", BCAST, ids=[str(s) for s in BCAST])
def test_sub_div_opencl(npbe, clbe, op, shapes):
    node = make_node(op, n_inputs=2)
    a = randn(*shapes[0])
    b = positive(*shapes[1]) * np.where(RNG.random(shapes[1]) < 0.5, -1, 1).astype(np.float32)
    y = check_op(npbe, clbe, node, [a, b])
    want = a.astype(np.float64) - b if op == "sub" else a.astype(np.float64) / b
    assert_close(y, want, 1e-6, op)
    assert infer_node(node, [shapes[0][1:], shapes[1][1:]]) == [want.shape[1:]]


@pytest.mark.parametrize("op", ["sub", "div"])
def test_sub_div_reference_grads(npbe, op):
    for shapes in ([(2, 3, 4), (4,)], [(1,), (2, 2, 3)], [(2, 1, 3), (2, 2, 3)], [(2, 3), (2, 3)]):
        node = make_node(op, n_inputs=2)
        check_reference_grads(npbe, node, [f64(randn(*shapes[0])), f64(positive(*shapes[1]))])


def test_add_mul_still_commute(npbe, clbe):
    # sub / div share the broadcast kernels with add / mul; the operand swap must stay correct for those too.
    for op in ("add", "mul"):
        check_op(npbe, clbe, make_node(op, n_inputs=2), [randn(1, 1, 1, 5), randn(2, 3, 4, 5)])


# ---------------------------------------------------------------------------------------------------------------
# reduce_mean / reduce_sum

REDUCES = [
    ((2, 5, 7, 17), dict(axes=[1, 2], keepdims=True)),  # spatial mean (squeeze-excite, GAP)
    ((2, 5, 7, 17), dict(axes=[1, 2], keepdims=False)),
    ((2, 3, 4, 17), dict(axes=[-1], keepdims=True)),  # over channels
    ((2, 3, 4, 17), dict(axes=[3], keepdims=False)),
    ((2, 3, 4, 5), dict(axes=[1, 3], keepdims=False)),  # non-adjacent axes
    ((2, 3, 4, 5), dict(axes=[1, 2, 3], keepdims=True)),
    ((2, 6, 5), dict(axes=[1])),  # keepdims defaults to True (ONNX)
    ((3, 33), dict(axes=[1], keepdims=False)),
    ((2, 3, 4), {}),  # default: every axis but the batch
    ((2, 1, 4, 3), dict(axes=[1], keepdims=False)),  # a unit axis
    ((4, 9, 9, 5), dict(axes=[1, 2], keepdims=False)),
    ((1, 5, 7, 17), dict(axes=[1, 2], keepdims=True)),  # batch 1
    ((1, 5, 7, 17), dict(axes=[2, 3], keepdims=False)),
    ((0, 3, 4), dict(axes=[2], keepdims=False)),  # an empty batch
]


@pytest.mark.parametrize("op", ["reduce_mean", "reduce_sum"])
@pytest.mark.parametrize("shape,attrs", REDUCES, ids=[f"r{i}" for i in range(len(REDUCES))])
def test_reduce_opencl(npbe, clbe, op, shape, attrs):
    node = make_node(op, attrs=attrs)
    x = randn(*shape)
    y = check_op(npbe, clbe, node, [x])
    axes = tuple(a % len(shape) for a in attrs.get("axes", range(1, len(shape))))
    keep = attrs.get("keepdims", True)
    f = np.mean if op == "reduce_mean" else np.sum
    want = f(x.astype(np.float64), axis=axes, keepdims=keep)
    assert_close(y, want, 1e-5, op)
    assert infer_node(node, [shape[1:]]) == [want.shape[1:]]


@pytest.mark.parametrize("op", ["reduce_mean", "reduce_sum"])
def test_reduce_reference_grads(npbe, op):
    for shape, attrs in (((2, 3, 4, 2), dict(axes=[1, 2], keepdims=True)), ((2, 3, 4), dict(axes=[-1], keepdims=False)),
                         ((2, 3, 2, 3), dict(axes=[1, 3], keepdims=False))):
        check_reference_grads(npbe, make_node(op, attrs=attrs), [f64(randn(*shape))])


# ---------------------------------------------------------------------------------------------------------------
# shape inference and MAC counts


@pytest.mark.parametrize("op,attrs,shape", [
    ("slice", dict(axes=[0], starts=[0], ends=[1]), (4, 4, 3)),
    ("slice", dict(axes=[-4], starts=[0], ends=[1]), (4, 4, 3)),  # -4 of rank 4 is the batch
    ("reduce_mean", dict(axes=[0, 1]), (4, 4, 3)),
    ("reduce_sum", dict(axes=[-3], keepdims=False), (4, 3)),
    ("layer_norm", dict(axis=0), (4, 4, 3)),
    ("layer_norm", dict(axis=-4), (4, 4, 3)),
])
def test_batch_axis_refused(op, attrs, shape):
    with pytest.raises(ModelError, match="batch"):
        infer_node(make_node(op, attrs=attrs), [shape])


@pytest.mark.parametrize("op,attrs,shape,n_in,params", [
    ("slice", dict(axes=[1], starts=[0], ends=[2], steps=[0]), (4, 4, 3), 1, {}),  # step 0
    ("slice", dict(axes=[1, 2], starts=[0], ends=[2]), (4, 4, 3), 1, {}),  # lists of unequal length
    ("slice", dict(axes=[1, 1], starts=[0, 1], ends=[2, 3]), (4, 4, 3), 1, {}),  # an axis twice
    ("slice", dict(axes=[4], starts=[0], ends=[1]), (4, 4, 3), 1, {}),  # out of range
    ("reduce_mean", dict(axes=[5]), (4, 4, 3), 1, {}),
    ("layer_norm", dict(axis=-1), (4, 4, 3), 1, {"gamma": np.ones(4)}),  # gamma does not fit C
    ("layer_norm", dict(axis=-2), (4, 4, 3), 1, {"gamma": np.ones(3)}),  # nor the normalised (W, C)
    ("gelu", dict(approximate="fast"), (4, 3), 1, {}),
    ("pow", dict(exponent="two"), (4, 3), 1, {}),
    ("sub", {}, (4, 3), 3, {}),
    ("div", {}, (4, 3), 1, {}),
])
def test_bad_attributes_refused(op, attrs, shape, n_in, params):
    node = make_node(op, n_inputs=n_in, attrs=attrs, params=params)
    with pytest.raises(ModelError):
        infer_node(node, [shape] * n_in)


def test_shapes_and_macs():
    def infer(op, shapes, attrs=None, params=None):
        node = make_node(op, n_inputs=len(shapes), attrs=attrs, params=params)
        out = infer_node(node, shapes)
        return out[0], macs(node, shapes, out[0])

    assert infer("slice", [(8, 8, 16)], dict(axes=[3], starts=[4], ends=[12])) == ((8, 8, 8), 0)
    assert infer("slice", [(8, 8, 16)], dict(axes=[1, 2], starts=[1, 1], ends=[-1, -1])) == ((6, 6, 16), 0)
    assert infer("slice", [(8, 8, 16)], dict(axes=[2], starts=[BIG], ends=[-BIG], steps=[-3])) == ((8, 3, 16), 0)
    assert infer("layer_norm", [(5, 16)], dict(axis=-1), {"gamma": np.ones(16), "beta": np.zeros(16)}) \
        == ((5, 16), 80)
    assert infer("layer_norm", [(4, 5, 16)], dict(axis=-2), {"gamma": np.ones((1, 5, 16))})[0] == (4, 5, 16)
    assert infer("gelu", [(4, 3)], dict(approximate="tanh")) == ((4, 3), 12)
    assert infer("pow", [(4, 3)], dict(exponent=2)) == ((4, 3), 12)
    assert infer("sub", [(4, 4, 3), (3,)]) == ((4, 4, 3), 48)
    assert infer("div", [(1, 1, 3), (4, 4, 1)]) == ((4, 4, 3), 48)
    assert infer("reduce_mean", [(4, 4, 3)], dict(axes=[1, 2], keepdims=True)) == ((1, 1, 3), 48)
    assert infer("reduce_sum", [(4, 4, 3)], dict(axes=[-1], keepdims=False)) == ((4, 4), 48)
    assert infer("reduce_mean", [(4, 4, 3)]) == ((1, 1, 1), 48)


# ---------------------------------------------------------------------------------------------------------------
# A graph of these ops through the executor (pinning, pooled outputs, fan-out)


def tensor_graph(rng):
    C = 16
    nodes = [
        Node("ln", "layer_norm", ["x"], ["ln"], {"axis": -1, "epsilon": 1e-5},
             {"gamma": rng.uniform(0.5, 1.5, C).astype(np.float32), "beta": rng.normal(0, 0.2, C).astype(np.float32)}),
        Node("lo", "slice", ["ln"], ["lo"], {"axes": [3], "starts": [0], "ends": [8]}),
        Node("hi", "slice", ["ln"], ["hi"], {"axes": [3], "starts": [8], "ends": [BIG]}),
        Node("erf", "erf", ["hi"], ["erf"]),
        Node("d", "sub", ["lo", "erf"], ["d"]),
        Node("act", "gelu", ["d"], ["act"], {"approximate": "tanh"}),
        Node("sq", "pow", ["act"], ["sq"], {"exponent": 2}),
        Node("ms", "reduce_mean", ["sq"], ["ms"], {"axes": [-1], "keepdims": True}),
        Node("eps", "scale", ["ms"], ["eps"], {"scale": 1.0, "offset": 1e-2}),
        Node("rms", "sqrt", ["eps"], ["rms"]),
        Node("inv", "reciprocal", ["rms"], ["inv"]),
        Node("norm", "div", ["act", "rms"], ["norm"]),
        Node("gate", "mul", ["norm", "inv"], ["gate"]),
        Node("pool", "reduce_sum", ["gate"], ["pool"], {"axes": [1, 2], "keepdims": False}),
        Node("fc", "dense", ["pool"], ["fc"], {}, {"weight": rng.normal(0, 0.5, (8, 3)).astype(np.float32),
                                                  "bias": np.zeros(3, np.float32)}),
        Node("logits", "neg", ["fc"], ["logits"]),
    ]
    return Graph(nodes, {"x": (3, 4, C)}, ["logits"])


def test_graph_through_executor(npbe, clbe):
    rng = np.random.default_rng(5)
    g = tensor_graph(rng)
    assert infer_shapes(g)["logits"] == (3,)
    x = rng.normal(0, 1.5, (2, 3, 4, 16)).astype(np.float32)
    w = rng.standard_normal((2, 3))
    out = {}
    for be, wt in ((npbe, w), (clbe, w.astype(np.float32))):
        ex = Executor(g, be, {"ln", "fc"})
        y = be.to_host(ex.forward({"x": x}, training=True)["logits"]).astype(np.float64)
        pg = ex.backward({"logits": be.asarray(wt)})
        out[be.name] = y, {k: be.to_host(v).astype(np.float64) for k, v in pg.items()}
    (y_ref, g_ref), (y_cl, g_cl) = out["numpy"], out["opencl"]
    assert_close(y_cl, y_ref, 1e-4, "forward")
    assert set(g_ref) == set(g_cl) == {("ln", "gamma"), ("ln", "beta"), ("fc", "weight"), ("fc", "bias")}
    for k in g_ref:
        assert_close(g_cl[k], g_ref[k], 1e-3, f"d/d{k}")
