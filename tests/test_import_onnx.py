"""ONNX import of the classifiers issue 14 names: small graphs written the way torch.onnx writes ShuffleNetV2's
channel split and ConvNeXt's block (opset 13: LayerNorm written out, opset 17: LayerNormalization; GELU as Erf),
compared with onnxruntime on the same input (max |diff| <= 1e-4 * max |reference|) on the numpy and OpenCL
backends; the LayerNorm / GELU fusions and the cases where they must not fire; and the rule that the importer never
drops an attribute it does not understand, checked for every registered converter."""
import math

import numpy as np
import pytest

from transfercl_cli.backends import NumpyBackend
from transfercl_cli.errors import ModelError
from transfercl_cli.executor import run_forward

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from transfercl_cli.importers.onnx_import import ONNX, convert_model  # noqa: E402

RNG = np.random.default_rng(14)
TOL = 1e-4
SQRT2 = np.float32(math.sqrt(2.0))


# --- helpers ----------------------------------------------------------------------------------------------------------
def _w(*shape, scale=None):
    fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return (RNG.standard_normal(shape) * (scale if scale is not None else np.sqrt(2.0 / fan))).astype(np.float32)


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _const(name, value, dtype=np.float32):
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(np.asarray(value, dtype)))


def _model(nodes, inputs, outputs, inits=(), opset=13, check=True):
    g = helper.make_graph(nodes, "t", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    if check:
        onnx.checker.check_model(m)
    return m


def ort_run(m, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def check(m, x, be=None, tol=TOL):
    """Import, run on `be` (numpy float32 by default), compare every output with onnxruntime."""
    g = convert_model(m)
    refs = ort_run(m, {m.graph.input[0].name: x})
    nchw = g.meta["input_layout"] == "NCHW"
    be = be or NumpyBackend(np.float32)
    be.forget_params()
    out = run_forward(g, be, {next(iter(g.inputs)): x.transpose(0, 2, 3, 1) if nchw else x})
    for o, r in zip(m.graph.output, refs):
        got = np.asarray(out[o.name], np.float64)
        if g.meta.get("output_layout", {}).get(o.name) == "NHWC":
            r = r.transpose(0, 2, 3, 1)
        assert got.shape == r.shape, f"{o.name}: shape {got.shape} != {r.shape}"
        err = float(np.abs(got - r).max() / max(np.abs(r).max(), 1e-12))
        assert err <= tol, f"{o.name}: relative error {err:.3g}"
    return g


def ops(g):
    return [n.op for n in g.nodes]


# --- ShuffleNetV2: the channel split ----------------------------------------------------------------------------------
def shufflenet_unit(split="slice", opset=13, c=8, h=5, w=6):
    """torchvision's InvertedResidual, stride 1: x1, x2 = x.chunk(2, dim=1); out = cat(x1, branch2(x2)); then
    channel_shuffle(out, 2) = view(N, 2, C/2, H, W) -> transpose(1, 2) -> view(N, C, H, W)."""
    half = c // 2
    inits = [_init("w1", _w(half, half, 1, 1)), _init("b1", _w(half, scale=0.1)), _init("wd", _w(half, 1, 3, 3)),
             _init("bd", _w(half, scale=0.1)), _init("w2", _w(half, half, 1, 1)), _init("b2", _w(half, scale=0.1)),
             _init("s5", np.asarray([1, 2, half, h, w], np.int64)), _init("s4", np.asarray([1, c, h, w], np.int64))]
    nodes = [helper.make_node("Relu", ["x"], ["xr"], name="/stem/Relu")]
    if split == "slice":
        # torch.onnx (TorchScript, opset 13): chunk -> Shape/Gather/Add/Div/Mul on the channel count -> 2 Slices.
        nodes += [
            helper.make_node("Shape", ["xr"], ["shp"], name="/stage/Shape"),
            _const("i1", [1], np.int64), _const("z", [0], np.int64), _const("one", [1], np.int64),
            _const("two", [2], np.int64), _const("ax", [1], np.int64),
            helper.make_node("Gather", ["shp", "i1"], ["cdim"], name="/stage/Gather", axis=0),
            helper.make_node("Add", ["cdim", "one"], ["cp1"], name="/stage/Add"),
            helper.make_node("Div", ["cp1", "two"], ["chunk"], name="/stage/Div"),
            helper.make_node("Mul", ["chunk", "one"], ["e1"], name="/stage/Mul"),
            helper.make_node("Slice", ["xr", "z", "e1", "ax"], ["x1"], name="/stage/Slice"),
            helper.make_node("Mul", ["chunk", "two"], ["e2"], name="/stage/Mul_1"),
            helper.make_node("Slice", ["xr", "e1", "e2", "ax"], ["x2"], name="/stage/Slice_1"),
        ]
    elif split == "split_input":  # Split with the sizes as an input (opset 13)
        inits.append(_init("sizes", np.asarray([half, half], np.int64)))
        nodes.append(helper.make_node("Split", ["xr", "sizes"], ["x1", "x2"], name="/stage/Split", axis=1))
    else:  # torch.onnx dynamo (opset 18): Split with num_outputs
        nodes.append(helper.make_node("Split", ["xr"], ["x1", "x2"], name="/stage/Split", axis=1, num_outputs=2))
    nodes += [
        helper.make_node("Conv", ["x2", "w1", "b1"], ["c1"], name="/branch2/0/Conv", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="/branch2/2/Relu"),
        helper.make_node("Conv", ["r1", "wd", "bd"], ["d"], name="/branch2/3/Conv", group=half, pads=[1, 1, 1, 1],
                         kernel_shape=[3, 3]),
        helper.make_node("Conv", ["d", "w2", "b2"], ["c2"], name="/branch2/5/Conv", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="/branch2/7/Relu"),
        helper.make_node("Concat", ["x1", "r2"], ["cat"], name="/stage/Concat", axis=1),
        helper.make_node("Reshape", ["cat", "s5"], ["v"], name="/stage/Reshape"),
        helper.make_node("Transpose", ["v"], ["tr"], name="/stage/Transpose", perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["tr", "s4"], ["y"], name="/stage/Reshape_1"),
    ]
    return _model(nodes, [_vi("x", [1, c, h, w])], [_vi("y", [1, c, h, w])], inits, opset)


@pytest.mark.parametrize("split,opset", [("slice", 13), ("split_input", 13), ("num_outputs", 18)])
def test_shufflenet_channel_split(split, opset, clbe):
    m = shufflenet_unit(split, opset)
    x = RNG.standard_normal((1, 8, 5, 6)).astype(np.float32)
    g = check(m, x)
    check(m, x, be=clbe)
    assert ops(g).count("slice") == 2
    # The channel halves are cut on the physical channel axis of the NHWC tensor: no layout change for the split.
    assert all(n.attrs["axes"] == [3] for n in g.nodes if n.op == "slice")
    assert ops(g).count("transpose") == 1  # only the shuffle itself


# --- ConvNeXt: Permute -> LayerNorm -> Linear -> GELU -> Linear -> Permute --------------------------------------------
def layer_norm_nodes(p, x, y, c, form, eps=1e-6, axis_const=None, two=2.0, opset=13, inits=None):
    """LayerNorm over the last axis as torch.onnx writes it: opset 17 LayerNormalization, else written out."""
    inits.extend([_init(p + ".weight", RNG.uniform(0.5, 1.5, c).astype(np.float32)),
                  _init(p + ".bias", RNG.uniform(-0.5, 0.5, c).astype(np.float32))])
    if form == "op":
        return [helper.make_node("LayerNormalization", [x, p + ".weight", p + ".bias"], [y], name=p + "/LayerNorm",
                                 axis=-1, epsilon=eps)]
    red = {} if opset >= 18 else {"axes": [-1] if axis_const is None else axis_const}
    rin = [f"{p}/axes"] if opset >= 18 else []
    nodes = []
    if opset >= 18:
        nodes.append(_const(f"{p}/axes", [-1] if axis_const is None else axis_const, np.int64))
    nodes += [
        helper.make_node("ReduceMean", [x] + rin, [p + "/m"], name=p + "/ReduceMean", **red),
        helper.make_node("Sub", [x, p + "/m"], [p + "/d"], name=p + "/Sub"),
        _const(p + "/two", two),
        helper.make_node("Pow", [p + "/d", p + "/two"], [p + "/p"], name=p + "/Pow"),
        helper.make_node("ReduceMean", [p + "/p"] + rin, [p + "/v"], name=p + "/ReduceMean_1", **red),
        _const(p + "/eps", eps),
        helper.make_node("Add", [p + "/v", p + "/eps"], [p + "/ve"], name=p + "/Add"),
        helper.make_node("Sqrt", [p + "/ve"], [p + "/s"], name=p + "/Sqrt"),
        helper.make_node("Div", [p + "/d", p + "/s"], [p + "/n"], name=p + "/Div"),
        helper.make_node("Mul", [p + "/n", p + ".weight"], [p + "/g"], name=p + "/Mul"),
        helper.make_node("Add", [p + "/g", p + ".bias"], [y], name=p + "/Add_1"),
    ]
    return nodes


def gelu_nodes(p, x, y, order="torchscript", c=None):
    """x * 0.5 * (1 + erf(x / sqrt(2))) in the orders exporters write it."""
    if order == "torchscript":  # Div, Erf, Add 1, Mul x, Mul 0.5
        return [_const(p + "/c", c if c is not None else SQRT2),
                helper.make_node("Div", [x, p + "/c"], [p + "/q"], name=p + "/Div"),
                helper.make_node("Erf", [p + "/q"], [p + "/e"], name=p + "/Erf"),
                _const(p + "/one", 1.0), helper.make_node("Add", [p + "/e", p + "/one"], [p + "/a"], name=p + "/Add"),
                helper.make_node("Mul", [x, p + "/a"], [p + "/xa"], name=p + "/Mul"),
                _const(p + "/half", 0.5), helper.make_node("Mul", [p + "/xa", p + "/half"], [y], name=p + "/Mul_1")]
    if order == "onnxscript":  # Div, Erf, Add 1, Mul(0.5, .), Mul(x, .)
        return [_const(p + "/c", SQRT2), helper.make_node("Div", [x, p + "/c"], [p + "/q"], name=p + "/Div"),
                helper.make_node("Erf", [p + "/q"], [p + "/e"], name=p + "/Erf"),
                _const(p + "/one", 1.0), helper.make_node("Add", [p + "/e", p + "/one"], [p + "/a"], name=p + "/Add"),
                _const(p + "/half", 0.5), helper.make_node("Mul", [p + "/half", p + "/a"], [p + "/ha"], name=p + "/M"),
                helper.make_node("Mul", [x, p + "/ha"], [y], name=p + "/Mul")]
    if order == "mul_inv_sqrt2":  # Mul by 1/sqrt(2), 0.5 * x first, then times (erf + 1)
        return [_const(p + "/c", np.float32(1 / math.sqrt(2.0))),
                helper.make_node("Mul", [p + "/c", x], [p + "/q"], name=p + "/Scale"),
                helper.make_node("Erf", [p + "/q"], [p + "/e"], name=p + "/Erf"),
                _const(p + "/one", 1.0), helper.make_node("Sum", [p + "/one", p + "/e"], [p + "/a"], name=p + "/Sum"),
                _const(p + "/half", 0.5), helper.make_node("Mul", [x, p + "/half"], [p + "/xh"], name=p + "/Half"),
                helper.make_node("Mul", [p + "/xh", p + "/a"], [y], name=p + "/Mul")]
    if order in ("tanh_torchscript", "tanh_pow"):  # 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
        if order == "tanh_torchscript":
            cube = [helper.make_node("Mul", [x, x], [p + "/xx"], name=p + "/Mul_xx"),
                    helper.make_node("Mul", [x, p + "/xx"], [p + "/x3"], name=p + "/Mul_xxx")]
        else:
            cube = [_const(p + "/three", 3.0), helper.make_node("Pow", [x, p + "/three"], [p + "/x3"], name=p + "/Pow")]
        return cube + [
            _const(p + "/k", np.float32(0.044715)),
            helper.make_node("Mul", [p + "/k", p + "/x3"], [p + "/kx3"], name=p + "/Mul_k"),
            helper.make_node("Add", [x, p + "/kx3"], [p + "/s"], name=p + "/Add_s"),
            _const(p + "/b", np.float32(math.sqrt(2 / math.pi))),
            helper.make_node("Mul", [p + "/b", p + "/s"], [p + "/u"], name=p + "/Mul_b"),
            helper.make_node("Tanh", [p + "/u"], [p + "/t"], name=p + "/Tanh"),
            _const(p + "/one", 1.0), helper.make_node("Add", [p + "/one", p + "/t"], [p + "/a"], name=p + "/Add"),
            helper.make_node("Mul", [x, p + "/a"], [p + "/xa"], name=p + "/Mul"),
            _const(p + "/half", 0.5), helper.make_node("Mul", [p + "/half", p + "/xa"], [y], name=p + "/Mul_1")]
    raise ValueError(order)


def convnext_block(ln="decomposed", opset=13, gelu="torchscript", c=8, h=10, w=12, ln_kwargs=None, gelu_c=None):
    """torchvision's CNBlock after a LayerNorm2d stem: Conv 2x2/2 -> Permute -> LN -> Permute, then
    dwconv 7x7 -> Permute(0,2,3,1) -> LN -> Linear(C,4C) (MatMul + Add) -> GELU -> Linear(4C,C) -> Permute(0,3,1,2)
    -> * layer_scale (C,1,1) -> + input."""
    inits = [_init("stem.w", _w(c, 3, 2, 2)), _init("stem.b", _w(c, scale=0.1)), _init("dw.w", _w(c, 1, 7, 7)),
             _init("dw.b", _w(c, scale=0.1)), _init("fc1.w", _w(c, 4 * c).reshape(c, 4 * c) * 0.5),
             _init("fc1.b", _w(4 * c, scale=0.1)), _init("fc2.w", _w(4 * c, c).reshape(4 * c, c) * 0.5),
             _init("fc2.b", _w(c, scale=0.1)),
             _init("layer_scale", RNG.uniform(0.5, 1.5, (c, 1, 1)).astype(np.float32))]
    form = "op" if ln == "op" else "decomposed"
    kw = dict(ln_kwargs or {})
    nodes = [
        helper.make_node("Conv", ["x", "stem.w", "stem.b"], ["s"], name="/stem/0/Conv", strides=[2, 2],
                         kernel_shape=[2, 2]),
        helper.make_node("Transpose", ["s"], ["sp"], name="/stem/1/Transpose", perm=[0, 2, 3, 1]),
        *layer_norm_nodes("/stem/1", "sp", "sn", c, form, opset=opset, inits=inits),
        helper.make_node("Transpose", ["sn"], ["x0"], name="/stem/1/Transpose_1", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x0", "dw.w", "dw.b"], ["d"], name="/block/0/Conv", group=c, pads=[3, 3, 3, 3],
                         kernel_shape=[7, 7]),
        helper.make_node("Transpose", ["d"], ["dp"], name="/block/1/Transpose", perm=[0, 2, 3, 1]),
        *layer_norm_nodes("/block/2", "dp", "n", c, form, opset=opset, inits=inits, **kw),
        helper.make_node("MatMul", ["n", "fc1.w"], ["h1"], name="/block/3/MatMul"),
        helper.make_node("Add", ["fc1.b", "h1"], ["h1b"], name="/block/3/Add"),
        *gelu_nodes("/block/4", "h1b", "gl", gelu, c=gelu_c),
        helper.make_node("MatMul", ["gl", "fc2.w"], ["h2"], name="/block/5/MatMul"),
        helper.make_node("Add", ["fc2.b", "h2"], ["h2b"], name="/block/5/Add"),
        helper.make_node("Transpose", ["h2b"], ["bp"], name="/block/6/Transpose", perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["layer_scale", "bp"], ["ls"], name="/Mul"),
        helper.make_node("Add", ["ls", "x0"], ["y"], name="/Add"),
    ]
    hh, ww = h // 2, w // 2
    return _model(nodes, [_vi("x", ["N", 3, h, w])], [_vi("y", ["N", c, hh, ww])], inits, opset)


@pytest.mark.parametrize("ln,opset", [("decomposed", 13), ("op", 17), ("decomposed", 18)])
def test_convnext_block(ln, opset, clbe):
    m = convnext_block(ln, opset)
    x = RNG.standard_normal((1, 3, 10, 12)).astype(np.float32)
    g = check(m, x)
    check(m, x, be=clbe)
    o = ops(g)
    assert o.count("layer_norm") == 2 and o.count("gelu") == 1
    assert not {"sub", "pow", "sqrt", "div", "erf", "reduce_mean", "transpose"} & set(o)
    # Linear on the channels-last tensor is a 1x1 convolution with the bias joined; the fused nodes are named
    # after the source module.
    assert g.node("/block/3/MatMul").op == "conv2d" and "bias" in g.node("/block/3/MatMul").params
    # ... and its output carries the Add's ONNX name (what export.py's copy of frozen source nodes stops at).
    assert g.node("/block/3/MatMul").outputs == ["h1b"] and g.node("/block/4").outputs == ["gl"]
    ln_name = "/block/2" if ln == "decomposed" else "/block/2/LayerNorm"
    assert g.node(ln_name).op == "layer_norm" and g.node("/block/4").op == "gelu"
    ln_node = g.node(ln_name)
    assert ln_node.attrs["axis"] == 3 and ln_node.attrs["epsilon"] == pytest.approx(1e-6, rel=1e-6)
    assert ln_node.params["gamma"].shape == (8,)


@pytest.mark.parametrize("order", ["torchscript", "onnxscript", "mul_inv_sqrt2", "tanh_torchscript", "tanh_pow"])
def test_gelu_forms_fuse(order):
    m = convnext_block("op", 17, gelu=order)
    g = check(m, RNG.standard_normal((2, 3, 10, 12)).astype(np.float32))
    assert ops(g).count("gelu") == 1
    assert g.node("/block/4").attrs["approximate"] == ("tanh" if order.startswith("tanh") else "none")
    assert not {"erf", "tanh", "pow"} & set(ops(g))


# --- fusions that must not fire ---------------------------------------------------------------------------------------
def test_fusions_need_matching_constants():
    """sqrt(2) replaced by 1.5, the LayerNorm's square by a fourth power: nothing is fused, every op runs on its
    own and the outputs still match onnxruntime."""
    m = convnext_block("decomposed", 13, gelu_c=np.float32(1.5), ln_kwargs={"two": 4.0})
    g = check(m, RNG.standard_normal((1, 3, 10, 12)).astype(np.float32))
    o = ops(g)
    assert o.count("gelu") == 0 and o.count("erf") == 1
    assert o.count("layer_norm") == 1  # the stem's LayerNorm still fuses; the block's does not
    assert o.count("pow") == 1 and o.count("reduce_mean") == 2 and o.count("sub") == 1 and o.count("div") == 1


def test_fusions_keep_shared_intermediates():
    """An intermediate of the pattern that is also a model output keeps the ops separate."""
    m = convnext_block("decomposed", 13)
    m.graph.output.append(_vi("/block/2/d", None))
    m.graph.output.append(_vi("/block/4/e", None))
    g = check(m, RNG.standard_normal((1, 3, 10, 12)).astype(np.float32))
    assert ops(g).count("layer_norm") == 1 and ops(g).count("gelu") == 0


def test_layer_norm_eps_and_axes_are_read():
    """The fused eps is the graph's; LayerNorm over the channels of an NCHW tensor (ConvNeXt's original
    channels-first form: mean over axis 1, gamma (C, 1, 1)) fuses with no transpose; over (H, W) it fuses after one
    (to NCHW, and back for the NHWC output)."""
    c = 6
    for axes, gshape, transposes in (([1], (c, 1, 1), 0), ([2, 3], (1, 5, 7), 2)):
        inits = [_init("w", _w(c, 3, 1, 1)), _init("g", RNG.uniform(0.5, 1.5, gshape).astype(np.float32)),
                 _init("b", RNG.uniform(-0.5, 0.5, gshape).astype(np.float32))]
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv")]
        nodes += layer_norm_nodes("ln", "c", "ln_out", 1, "decomposed", eps=1e-3, axis_const=axes, inits=[])
        nodes = [n for n in nodes if not n.name.startswith("ln/Mul") and not n.name.startswith("ln/Add_1")]
        nodes += [helper.make_node("Mul", ["g", "ln/n"], ["lg"], name="ln/Mul"),
                  helper.make_node("Add", ["lg", "b"], ["y"], name="ln/Add_1")]
        m = _model(nodes, [_vi("x", [2, 3, 5, 7])], [_vi("y", [2, c, 5, 7])], inits)
        g = check(m, RNG.standard_normal((2, 3, 5, 7)).astype(np.float32))
        assert ops(g).count("layer_norm") == 1 and ops(g).count("transpose") == transposes
        n = g.node("ln")
        assert n.attrs["epsilon"] == pytest.approx(1e-3) and n.attrs["axis"] == 4 - len(axes)


def test_layer_normalization_statistics_outputs():
    """LayerNormalization's Mean and InvStdDev outputs, when the graph uses them, are computed too."""
    inits = [_init("s", RNG.uniform(0.5, 1.5, (5, 6)).astype(np.float32)), _init("b", _w(5, 6, scale=0.3))]
    nodes = [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y", "mean", "istd"], name="ln", axis=2,
                              epsilon=1e-4)]
    m = _model(nodes, [_vi("x", [2, 4, 5, 6])],
               [_vi("y", [2, 4, 5, 6]), _vi("mean", [2, 4, 1, 1]), _vi("istd", [2, 4, 1, 1])], inits, 17)
    check(m, (RNG.standard_normal((2, 4, 5, 6)) * 3 + 1).astype(np.float32))


# --- Slice / Split / elementwise and reductions -----------------------------------------------------------------------
def test_slice_forms(clbe):
    """Negative steps on the channels, steps on a spatial axis, several axes at once, opset 9 attributes; each
    cut lands on the right physical axis of the NHWC tensor."""
    inits = [_init("w", _w(6, 3, 1, 1)), _init("st", np.asarray([-1, 1], np.int64)),
             _init("en", np.asarray([-(2 ** 63), 7], np.int64)), _init("ax", np.asarray([1, 3], np.int64)),
             _init("sp", np.asarray([-2, 3], np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Slice", ["c", "st", "en", "ax", "sp"], ["y"], name="slice")]
    m = _model(nodes, [_vi("x", [1, 3, 4, 7])], [_vi("y", [1, 3, 4, 2])], inits)
    x = RNG.standard_normal((1, 3, 4, 7)).astype(np.float32)
    g = check(m, x)
    check(m, x, be=clbe)
    n = g.node("slice")
    assert n.attrs["axes"] == [3, 2] or sorted(n.attrs["axes"]) == [2, 3]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Slice", ["c"], ["y"], name="slice", starts=[1, 0], ends=[3, -1], axes=[2, 1])]
    check(_model(nodes, [_vi("x", [1, 3, 4, 7])], [_vi("y", [1, 5, 2, 7])], inits[:1], opset=9), x)


def test_split_attribute_and_unused_output():
    inits = [_init("w", _w(6, 3, 1, 1))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Split", ["c"], ["a", "b", "unused"], name="split", axis=1, split=[1, 3, 2]),
             helper.make_node("Concat", ["b", "a"], ["y"], name="cat", axis=1)]
    m = _model(nodes, [_vi("x", [2, 3, 4, 5])], [_vi("y", [2, 4, 4, 5])], inits, opset=11)
    g = check(m, RNG.standard_normal((2, 3, 4, 5)).astype(np.float32))
    assert ops(g).count("slice") == 2  # the unused third part is not computed


def test_elementwise_with_constants_and_reductions(clbe):
    """Sub/Div with constants on either side (scalar and per-channel), Pow/Sqrt/Reciprocal, tensor-tensor Sub/Div
    with broadcasting over a keepdims reduction, ReduceSum over the channels (axes input) and ReduceMean without
    keepdims (axes attribute)."""
    c = 4
    inits = [_init("w", _w(c, 3, 1, 1)), _init("two", np.asarray(2.0, np.float32)),
             _init("pc", RNG.uniform(0.5, 1.5, (c, 1, 1)).astype(np.float32)),
             _init("three", np.asarray([3.0], np.float32)), _init("ax1", np.asarray([1], np.int64)),
             _init("hw", np.asarray(0.25, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
             helper.make_node("Sub", ["two", "s"], ["a"], name="rsub"),          # 2 - s, in (1, 2)
             helper.make_node("Div", ["pc", "a"], ["b"], name="rdiv"),           # per-channel c / a
             helper.make_node("Div", ["b", "pc"], ["b2"], name="div_pc"),
             helper.make_node("Pow", ["b2", "three"], ["p"], name="cube"),
             helper.make_node("Sqrt", ["p"], ["q"], name="sqrt"),
             helper.make_node("Reciprocal", ["q"], ["r"], name="recip"),
             helper.make_node("ReduceSum", ["r", "ax1"], ["rs"], name="rsum", keepdims=1),
             helper.make_node("Div", ["r", "rs"], ["rn"], name="div_t"),
             helper.make_node("Sub", ["rn", "hw"], ["rm"], name="sub_c"),
             helper.make_node("Sub", ["rm", "rs"], ["rt"], name="sub_t"),
             helper.make_node("ReduceMean", ["rt"], ["y"], name="rmean", axes=[1], keepdims=0)]
    m = _model(nodes, [_vi("x", [2, 3, 5, 6])], [_vi("y", [2, 5, 6])], inits)
    x = RNG.standard_normal((2, 3, 5, 6)).astype(np.float32)
    g = check(m, x)
    check(m, x, be=clbe)
    assert {"sub", "div", "pow", "sqrt", "reciprocal", "reduce_sum", "reduce_mean", "scale"} <= set(ops(g))
    assert g.node("rsum").attrs["axes"] == [3]  # NCHW channels = NHWC axis 3


def test_constant_that_is_not_per_channel_is_a_clear_error():
    inits = [_init("w", _w(4, 3, 1, 1)), _init("hwc", _w(1, 1, 5, 6))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Sub", ["c", "hwc"], ["y"], name="sub_map")]
    m = _model(nodes, [_vi("x", [1, 3, 5, 6])], [_vi("y", [1, 4, 5, 6])], inits)
    with pytest.raises(ModelError, match=r"'sub_map' \(Sub\).*varies along more than the channel axis"):
        convert_model(m)


def test_matmul_on_a_sequence():
    """(N, L, C) x (C, M) + bias: a 1x1 convolution between two free reshapes, the bias joined to it."""
    inits = [_init("w", _w(6, 5).reshape(6, 5)), _init("b", _w(5, scale=0.1))]
    nodes = [helper.make_node("Transpose", ["x"], ["t"], name="t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "w"], ["mm"], name="fc"),
             helper.make_node("Add", ["mm", "b"], ["y"], name="bias")]
    m = _model(nodes, [_vi("x", [2, 6, 7])], [_vi("y", [2, 7, 5])], inits)
    g = check(m, RNG.standard_normal((2, 6, 7)).astype(np.float32))
    assert "bias" in g.node("fc").params and "scale" not in ops(g)


def test_batch_axis_is_refused():
    inits = [_init("st", np.asarray([0], np.int64)), _init("en", np.asarray([1], np.int64)),
             _init("ax", np.asarray([0], np.int64))]
    nodes = [helper.make_node("Slice", ["x", "st", "en", "ax"], ["y"], name="batch_slice")]
    m = _model(nodes, [_vi("x", [2, 3])], [_vi("y", [1, 3])], inits)
    with pytest.raises(ModelError, match="'batch_slice' .*batch axis"):
        convert_model(m)


# --- the importer never drops what it does not understand -------------------------------------------------------------
X = ("x", [1, 4, 5, 6])
_f = np.float32
# op -> (extra inputs as {name: array}, node inputs, attributes, opset, input spec, extra nodes after it)
PROBES = {
    "Relu": {}, "Sigmoid": {}, "Tanh": {}, "HardSwish": {"opset": 14}, "Erf": {}, "Sqrt": {}, "Reciprocal": {},
    "Neg": {}, "Identity": {}, "GlobalAveragePool": {}, "Gelu": {"opset": 20}, "LeakyRelu": {"attrs": {"alpha": 0.1}},
    "HardSigmoid": {}, "Softmax": {}, "Dropout": {}, "LRN": {"attrs": {"size": 3}},
    "PRelu": {"inits": {"slope": np.asarray([0.2], _f)}},
    "Clip": {"inits": {"lo": np.asarray(0.0, _f), "hi": np.asarray(6.0, _f)}},
    "Cast": {"attrs": {"to": TensorProto.FLOAT}},
    "CastLike": {"inputs": ["x", "x"]},
    # QDQ: a QuantizeLinear is read only with the DequantizeLinear after it, and a DequantizeLinear of a computed
    # tensor only after a QuantizeLinear.
    "QuantizeLinear": {"inits": {"qs": np.asarray(0.05, _f), "qz": np.asarray(3, np.uint8)},
                       "after": lambda: [helper.make_node("DequantizeLinear", ["y", "qs", "qz"], ["d"], name="dq")],
                       "out": "d"},
    "DequantizeLinear": {"inputs": ["q", "qs", "qz"],
                         "inits": {"qs": np.asarray(0.05, _f), "qz": np.asarray(3, np.uint8)},
                         "before": lambda: [helper.make_node("QuantizeLinear", ["x", "qs", "qz"], ["q"], name="q")]},
    "Conv": {"inits": {"W": _w(2, 4, 3, 3)}},
    "BatchNormalization": {"inits": {"s": np.ones(4, _f), "b": np.zeros(4, _f), "m": np.zeros(4, _f),
                                     "v": np.ones(4, _f)}},
    "MaxPool": {"attrs": {"kernel_shape": [2, 2]}}, "AveragePool": {"attrs": {"kernel_shape": [2, 2]}},
    "LayerNormalization": {"opset": 17, "inits": {"s": np.ones(6, _f)}},
    "ReduceMean": {"attrs": {"axes": [1]}}, "ReduceSum": {"inits": {"axes": np.asarray([1], np.int64)}},
    "Flatten": {}, "Reshape": {"inits": {"shape": np.asarray([1, -1], np.int64)}},
    "Squeeze": {"spec": ("x", [1, 4, 1, 6]), "inits": {"axes": np.asarray([2], np.int64)}},
    "Unsqueeze": {"inits": {"axes": np.asarray([2], np.int64)}},
    "Transpose": {"attrs": {"perm": [0, 2, 3, 1]}}, "Concat": {"inputs": ["x", "x"], "attrs": {"axis": 1}},
    "Slice": {"inits": {"st": np.asarray([1], np.int64), "en": np.asarray([3], np.int64),
                        "ax": np.asarray([1], np.int64)}},
    "Split": {"attrs": {"axis": 1}, "outputs": ["y", "y2"]},
    "Pad": {"inits": {"pads": np.asarray([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}},
    "Gemm": {"spec": ("x", [1, 4]), "inits": {"B": _w(4, 3)}},
    "MatMul": {"spec": ("x", [1, 4]), "inits": {"B": _w(4, 3)}},
    "Add": {"inputs": ["x", "x"]}, "Sum": {"inputs": ["x", "x", "x"]}, "Mul": {"inputs": ["x", "x"]},
    "Sub": {"inputs": ["x", "x"]}, "Div": {"inputs": ["x", "x"]},
    "Pow": {"inits": {"e": np.asarray(2.0, _f)}},
    # Shape / Size give constants: a Reshape reads them so that the model has a computed output.
    "Shape": {"after": lambda: [helper.make_node("Reshape", ["x", "y"], ["z"], name="after")], "out": "z"},
    "Size": {"after": lambda: [_const("one", [1], np.int64),
                               helper.make_node("Unsqueeze", ["y", "zero"], ["yv"], name="uq"),
                               _const("zero", [0], np.int64),
                               helper.make_node("Concat", ["one", "yv"], ["shp"], name="cc", axis=0),
                               helper.make_node("Reshape", ["x", "shp"], ["z"], name="after")], "out": "z"},
}


def probe_model(op, extra_attr=None):
    p = PROBES[op]
    inits = p.get("inits", {})
    spec = p.get("spec", X)
    inputs = p.get("inputs", [spec[0]] + list(inits))
    attrs = dict(p.get("attrs", {}))
    if extra_attr:
        attrs.update(extra_attr)
    outs = p.get("outputs", ["y"])
    nodes = [helper.make_node(op, inputs, outs, name="probe", **attrs)]
    before = p.get("before", lambda: [])()
    after = p.get("after")
    if after:
        nodes += after()
        nodes = [nodes[0]] + sorted(nodes[1:], key=lambda n: n.op_type != "Constant")
    g_outs = [_vi(p.get("out", o), None) for o in (outs if not after else [p["out"]])]
    return _model(before + nodes, [_vi(*spec)], g_outs, [_init(k, v) for k, v in inits.items()], p.get("opset", 13),
                  check=False)


def test_every_converter_has_a_probe():
    """A converter added without a probe here fails: the never-drops check below must cover it."""
    assert set(ONNX.table) <= set(PROBES), sorted(set(ONNX.table) - set(PROBES))


@pytest.mark.parametrize("op", sorted(PROBES))
def test_unknown_attribute_is_an_error_naming_it(op):
    assert op in ONNX.table
    convert_model(probe_model(op))  # the probe itself converts
    with pytest.raises(ModelError) as ei:
        convert_model(probe_model(op, {"tcl_unknown_attr": 73}))
    msg = str(ei.value)
    assert "'probe'" in msg and "tcl_unknown_attr=73" in msg and f"({op})" in msg


def test_unknown_attribute_inside_a_fused_pattern():
    """A pattern member with an attribute the fusion does not read is not fused, and its converter names it."""
    m = convnext_block("op", 17)
    erf = next(n for n in m.graph.node if n.op_type == "Erf")
    erf.attribute.append(helper.make_attribute("approximate_erf", 1))
    with pytest.raises(ModelError, match=r"'/block/4/Erf' \(Erf\).*approximate_erf=1"):
        convert_model(m)


def test_legacy_attributes_are_understood():
    """Opset 6 arithmetic broadcast along an axis (a per-channel constant, consumed_inputs too) computes what the
    opset 13 spelling does (onnxruntime no longer runs opset 6 Mul)."""
    w, c = _w(4, 3, 1, 1), RNG.uniform(0.5, 1.5, 4).astype(np.float32)
    old = [helper.make_node("Conv", ["x", "w"], ["cv"], name="conv"),
           helper.make_node("Mul", ["cv", "c"], ["y"], name="mul", broadcast=1, axis=1, consumed_inputs=[0, 0])]
    new = [old[0], helper.make_node("Mul", ["cv", "c"], ["y"], name="mul")]
    io = [_vi("x", [1, 3, 5, 6])], [_vi("y", [1, 4, 5, 6])]
    m6 = _model(old, *io, [_init("w", w), _init("c", c)], opset=6, check=False)
    m13 = _model(new, *io, [_init("w", w), _init("c", c.reshape(4, 1, 1))])
    x = RNG.standard_normal((1, 3, 5, 6)).astype(np.float32)
    check(m13, x)
    a, b = (run_forward(convert_model(m), NumpyBackend(np.float32), {"x": x.transpose(0, 2, 3, 1)})["y"]
            for m in (m6, m13))
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_flatten_gather_view_is_a_reshape():
    """torch.onnx (dynamo) writes ConvNeXt's as_strided after the pool as Reshape(x, [-1]) + Gather(arange):
    run as the reshape it is; other indices stay refused."""
    c = 5
    for idx, ok in ((np.arange(c).reshape(1, c, 1, 1), True), (np.arange(c)[::-1].reshape(1, c, 1, 1).copy(), False)):
        inits = [_init("w", _w(c, 3, 3, 3)), _init("flat", np.asarray([-1], np.int64)), _init("idx", idx),
                 _init("fc", _w(3, c)), _init("fcb", _w(3, scale=0.1))]
        nodes = [helper.make_node("Conv", ["x", "w"], ["cv"], name="conv"),
                 helper.make_node("GlobalAveragePool", ["cv"], ["gap"], name="gap"),
                 helper.make_node("Reshape", ["gap", "flat"], ["f1"], name="node_Reshape"),
                 helper.make_node("Gather", ["f1", "idx"], ["view"], name="node_as_strided", axis=0),
                 helper.make_node("Flatten", ["view"], ["f"], name="flatten"),
                 helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], name="fc", transB=1)]
        m = _model(nodes, [_vi("x", [1, 3, 6, 7])], [_vi("y", [1, 3])], inits, opset=18)
        if ok:
            g = check(m, RNG.standard_normal((1, 3, 6, 7)).astype(np.float32))
            assert "transpose" not in ops(g)
        else:
            with pytest.raises(ModelError, match="'node_Reshape' .*merges the batch axis"):
                convert_model(m)
