"""Model import: Keras .h5 and ONNX files into the internal NHWC graph, checked against onnxruntime, an independent
numpy computation (Keras layers), the ONNX light model-zoo outputs and the golden ImageNet images."""
import json
import os
import sys

import numpy as np
import pytest

from tests.conftest import shared_path
from transfercl_cli.backends import NumpyBackend
from transfercl_cli.errors import ModelError
from transfercl_cli.executor import run_forward
from transfercl_cli.importers import load_model
from transfercl_cli.ops.shapes import infer_shapes, macs, total_macs

onnx = pytest.importorskip("onnx")
h5py = pytest.importorskip("h5py")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

RNG = np.random.default_rng(1234)


def forward(g, be, *xs):
    """Run a graph on a backend; returns the outputs (host arrays) in graph order."""
    be.forget_params()  # the backend caches parameters by node name; graphs in these tests reuse names
    feeds = dict(zip(g.inputs, xs))
    out = run_forward(g, be, feeds)
    return [out[t] for t in g.outputs]


def np32():
    return NumpyBackend(np.float32)


def rel(a, e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
    return float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-12))


def ort_run(model, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString() if hasattr(model, "SerializeToString") else model, so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def preprocess(path):
    """RGB, shorter side to 256, center crop 224, x / 127.5 - 1 (the shared models' preprocessing)."""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = 256.0 / min(w, h)
    im = im.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - 224) // 2, (h - 224) // 2
    im = im.crop((left, top, left + 224, top + 224))
    return np.asarray(im, np.float32) / 127.5 - 1.0


# --- the shared MobileNet V1 ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mobilenet_h5():
    return load_model(shared_path("models", "mobilenet_v1_1.0_224.h5"))


@pytest.fixture(scope="module")
def mobilenet_onnx():
    return load_model(shared_path("models", "mobilenet_v1_1.0_224.onnx"))


@pytest.fixture(scope="module")
def images():
    return np.stack([preprocess(shared_path("images", "chelsea.png")),
                     preprocess(shared_path("images", "coffee.png"))])


def test_mobilenet_h5_structure(mobilenet_h5):
    g = mobilenet_h5
    names = g.names()
    for want in ("conv1", "conv1_bn", "conv1_relu", "conv_dw_1", "conv_pw_1", "conv_pad_2", "conv_dw_13",
                 "conv_pw_13", "conv_pw_13_bn", "conv_pw_13_relu", "global_average_pooling2d", "dropout",
                 "conv_preds", "reshape_2", "predictions"):
        assert want in names, want
    assert g.num_params() == 4253864
    assert g.inputs == {"input_layer": (224, 224, 3)}
    assert g.meta["format"] == "keras_h5" and g.meta["keras_version"].startswith("3.")
    assert g.meta["input_size"] == (224, 224)
    assert "preprocess" not in g.meta  # no Rescaling/Normalization layer in this model
    n = g.node("conv_dw_1")
    assert (n.op, n.source, n.attrs["groups"], n.params["weight"].shape) == ("conv2d", "DepthwiseConv2D", 32,
                                                                              (3, 3, 1, 32))
    assert g.node("conv1").attrs["pads"] == (0, 0, 1, 1)  # Keras 'same', stride 2: the extra pixel goes after
    assert g.node("conv_pw_13_relu").op == "relu6"
    assert g.node("predictions").op == "softmax"
    shapes = infer_shapes(g)
    assert shapes[g.node("conv_pw_13_relu").output] == (7, 7, 1024)
    assert shapes[g.outputs[0]] == (1000,)
    # MobileNet V1 1.0/224 is known as ~569M multiply-adds in its convolutions.
    conv_macs = sum(macs(n, [shapes[t] for t in n.inputs], shapes[n.output]) for n in g.nodes if n.op == "conv2d")
    assert 560e6 < conv_macs < 580e6, conv_macs
    assert total_macs(g) > conv_macs


def test_mobilenet_onnx_structure(mobilenet_onnx):
    g = mobilenet_onnx
    assert g.meta["format"] == "onnx" and g.meta["input_layout"] == "NHWC"
    assert g.inputs == {"input": (224, 224, 3)}
    ops = [n.op for n in g.nodes]
    # tf2onnx's NHWC input + Transpose pair is dropped: no layout change anywhere in the graph.
    assert "transpose" not in ops
    assert ops.count("conv2d") == 28 and ops.count("relu6") == 27 and ops.count("pad") == 4
    # The depthwise BatchNorms (Mul + Add) are merged into one scale node each.
    assert ops.count("scale") == 13
    assert "Conv__227" in g.names()


def test_mobilenet_onnx_matches_onnxruntime(mobilenet_onnx, images):
    path = shared_path("models", "mobilenet_v1_1.0_224.onnx")
    ref = ort_run(path, {"input": images})[0]
    got = forward(mobilenet_onnx, np32(), images)[0]
    assert rel(got, ref) <= 1e-4


def test_mobilenet_h5_and_onnx_agree(mobilenet_h5, mobilenet_onnx, images):
    a = forward(mobilenet_h5, np32(), images[:1])[0]
    b = forward(mobilenet_onnx, np32(), images[:1])[0]
    assert rel(a, b) <= 1e-4


@pytest.mark.parametrize("fmt", ["h5", "onnx"])
def test_mobilenet_golden_images_opencl(fmt, mobilenet_h5, mobilenet_onnx, images, clbe):
    g = mobilenet_h5 if fmt == "h5" else mobilenet_onnx
    p = forward(g, clbe, images)[0]
    assert p.shape == (2, 1000)
    assert int(np.argmax(p[0])) == 281  # tabby cat
    assert int(np.argmax(p[1])) == 967  # espresso
    assert 0.3 < p[0, 281] < 0.7 and p[1, 967] > 0.9
    ref = forward(g, np32(), images)[0]
    assert rel(p, ref) <= 1e-4


# --- synthetic ONNX models --------------------------------------------------------------------------------------------
def _w(*shape, scale=None):
    fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return (RNG.standard_normal(shape) * (scale if scale is not None else np.sqrt(2.0 / fan))).astype(np.float32)


def _init(name, arr):
    arr = np.asarray(arr)
    return numpy_helper.from_array(arr, name)


def _model(nodes, inputs, outputs, inits, opset=13):
    g = helper.make_graph(nodes, "t", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    onnx.checker.check_model(m)
    return m


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _bn_inits(prefix, c):
    return [_init(prefix + "_s", RNG.uniform(0.5, 1.5, c).astype(np.float32)),
            _init(prefix + "_b", RNG.uniform(-0.5, 0.5, c).astype(np.float32)),
            _init(prefix + "_m", RNG.uniform(-0.5, 0.5, c).astype(np.float32)),
            _init(prefix + "_v", RNG.uniform(0.5, 1.5, c).astype(np.float32))]


def _bn(prefix, x, y, eps=1e-5):
    return helper.make_node("BatchNormalization", [x, prefix + "_s", prefix + "_b", prefix + "_m", prefix + "_v"],
                            [y], name=prefix, epsilon=eps)


def check_onnx(m, x, tol=1e-4, be=None):
    """Import, run, compare every output with onnxruntime (4-D outputs of NCHW models come back NHWC)."""
    from transfercl_cli.importers.onnx_import import convert_model

    g = convert_model(m)
    refs = ort_run(m, {m.graph.input[0].name: x})
    xin = x.transpose(0, 2, 3, 1) if g.meta["input_layout"] == "NCHW" else x
    outs = forward(g, be or np32(), xin)
    for o, r, got in zip(m.graph.output, refs, outs):
        if r.ndim == 4 and g.meta["input_layout"] == "NCHW":
            r = r.transpose(0, 2, 3, 1)
        assert rel(got, r) <= tol, o.name
    return g


def torch_style_model():
    """NCHW input, Conv+BN+Relu, MaxPool(ceil), grouped Conv, AveragePool(pads, count_include_pad), Flatten, Gemm."""
    inits = [_init("w1", _w(8, 3, 3, 3)), _init("b1", _w(8, scale=0.1)), *_bn_inits("bn1", 8),
             _init("w2", _w(8, 4, 3, 3)), _init("fc1_w", _w(10, 8 * 3 * 2)), _init("fc1_b", _w(10, scale=0.1)),
             _init("fc2_w", _w(10, 4)), _init("fc2_b", _w(1, 4, scale=0.1))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        _bn("bn1", "c1", "n1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], name="conv2", group=2, pads=[1, 0, 1, 2], strides=[1, 2]),
        helper.make_node("AveragePool", ["c2"], ["p2"], name="pool2", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1], count_include_pad=1),
        helper.make_node("Flatten", ["p2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc1_w", "fc1_b"], ["g1"], name="fc1", transB=1),
        helper.make_node("Relu", ["g1"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "fc2_w", "fc2_b"], ["y"], name="fc2", alpha=0.5, beta=2.0),
    ]
    return _model(nodes, [_vi("x", ["N", 3, 11, 9])], [_vi("y", ["N", 4])], inits)


def test_onnx_torch_style_nchw_flatten_gemm():
    m = torch_style_model()
    x = RNG.standard_normal((2, 3, 11, 9)).astype(np.float32)
    g = check_onnx(m, x)
    assert g.meta["input_layout"] == "NCHW"
    assert g.inputs == {"x": (11, 9, 3)}  # graph inputs are always NHWC
    assert [n.name for n in g.nodes if n.op == "transpose"] == ["p2/to_nchw"]  # only before the Flatten
    assert g.node("conv1").params["weight"].shape == (3, 3, 3, 8)  # OIHW -> HWIO
    assert g.node("fc1").params["weight"].shape == (48, 10)  # transB folded
    assert g.node("pool1").attrs["ceil_mode"] is True
    assert g.node("pool2").attrs["count_include_pad"] is True


def test_onnx_torch_view_via_shape_gather_concat():
    """x.view(x.size(0), -1) after global pooling: Shape/Gather/Unsqueeze/Concat fold to a constant shape."""
    inits = [_init("w", _w(6, 3, 1, 1)), _init("idx", np.asarray(0, np.int64)), _init("m1", np.asarray([-1], np.int64)),
             _init("fc", _w(6, 5)), _init("fcb", _w(5, scale=0.1))]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("GlobalAveragePool", ["c"], ["gap"], name="gap"),
        helper.make_node("Shape", ["gap"], ["shp"], name="shape"),
        helper.make_node("Gather", ["shp", "idx"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "zero_axes"], ["n1"], name="unsq"),
        helper.make_node("Constant", [], ["zero_axes"], name="cst",
                         value=numpy_helper.from_array(np.asarray([0], np.int64))),
        helper.make_node("Concat", ["n1", "m1"], ["newshape"], name="concat", axis=0),
        helper.make_node("Reshape", ["gap", "newshape"], ["flat"], name="view"),
        helper.make_node("MatMul", ["flat", "fc"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "fcb"], ["y"], name="bias"),
    ]
    # Constant must come before its reader in a valid graph.
    nodes = nodes[:4] + [nodes[5], nodes[4]] + nodes[6:]
    m = _model(nodes, [_vi("x", [1, 3, 5, 7])], [_vi("y", [1, 5])], inits)
    g = check_onnx(m, RNG.standard_normal((1, 3, 5, 7)).astype(np.float32))
    assert "transpose" not in [n.op for n in g.nodes]  # (N,C,1,1) -> (N,C) needs no layout change
    assert "bias" in g.node("matmul").params  # MatMul + Add(bias) became one dense node


def tf2onnx_style_model(opset=13):
    """NHWC input + Transpose to NCHW, Pad, Conv with folded BN, BN as Mul/Add, Clip(0,6) (inputs or attrs),
    depthwise Conv, ReduceMean over H,W, Reshape, 1x1 Conv, Softmax; a second output transposed back to NHWC."""
    inits = [_init("perm_pads", np.asarray([0, 0, 0, 0, 0, 0, 1, 1], np.int64)), _init("w1", _w(6, 3, 3, 3)),
             _init("b1", _w(6, scale=0.1)), _init("mul", RNG.uniform(0.5, 1.5, (1, 6, 1, 1)).astype(np.float32)),
             _init("add", RNG.uniform(-0.5, 0.5, (1, 6, 1, 1)).astype(np.float32)),
             _init("wd", _w(6, 1, 3, 3)), _init("shape1", np.asarray([-1, 6, 1, 1], np.int64)),
             _init("w3", _w(5, 6, 1, 1)), _init("b3", _w(5, scale=0.1)), _init("shape2", np.asarray([-1, 5], np.int64))]
    if opset >= 11:
        inits += [_init("lo", np.asarray(0.0, np.float32)), _init("hi", np.asarray(6.0, np.float32))]

        def clip(x, y, name):
            return helper.make_node("Clip", [x, "lo", "hi"], [y], name=name)

        pad = helper.make_node("Pad", ["t", "perm_pads"], ["pd"], name="pad")
    else:
        def clip(x, y, name):
            return helper.make_node("Clip", [x], [y], name=name, min=0.0, max=6.0)

        pad = helper.make_node("Pad", ["t"], ["pd"], name="pad", pads=[0, 0, 0, 0, 0, 0, 1, 1])
    reduce = (helper.make_node("ReduceMean", ["r2"], ["gap"], name="mean", axes=[2, 3], keepdims=1) if opset < 18
              else None)
    nodes = [
        helper.make_node("Transpose", ["input"], ["t"], name="to_nchw", perm=[0, 3, 1, 2]),
        pad,
        helper.make_node("Conv", ["pd", "w1", "b1"], ["c1"], name="Conv__1", strides=[2, 2], kernel_shape=[3, 3]),
        clip("c1", "r1", "relu1"),
        helper.make_node("Conv", ["r1", "wd"], ["dw"], name="dw/depthwise", group=6, pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["dw", "mul"], ["m"], name="dw_bn/mul_1"),
        helper.make_node("Add", ["m", "add"], ["a"], name="dw_bn/add_1"),
        clip("a", "r2", "relu2"),
        reduce,
        helper.make_node("Reshape", ["gap", "shape1"], ["gr"], name="reshape1"),
        helper.make_node("Conv", ["gr", "w3", "b3"], ["c3"], name="preds"),
        helper.make_node("Reshape", ["c3", "shape2"], ["logits"], name="reshape2"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax"),
        helper.make_node("Transpose", ["r2"], ["feat"], name="to_nhwc", perm=[0, 2, 3, 1]),
    ]
    return _model([n for n in nodes if n is not None], [_vi("input", ["N", 10, 13, 3])],
                  [_vi("probs", ["N", 5]), _vi("feat", ["N", 5, 7, 6])], inits, opset=opset)


@pytest.mark.parametrize("opset", [9, 13])
def test_onnx_tf2onnx_style_nhwc(opset):
    m = tf2onnx_style_model(opset)
    x = RNG.standard_normal((2, 10, 13, 3)).astype(np.float32)
    g = check_onnx(m, x)
    assert g.meta["input_layout"] == "NHWC"
    assert g.inputs == {"input": (10, 13, 3)}
    ops = [n.op for n in g.nodes]
    assert "transpose" not in ops  # the NHWC -> NCHW pair is gone, and the NHWC output needs no transpose back
    assert ops.count("relu6") == 2 and ops.count("scale") == 1  # Clip(0,6) -> relu6; Mul+Add -> one scale
    assert g.node("pad").attrs["pads"] == (0, 0, 1, 1)


def inverted_residual_model(opset=13):
    """MobileNetV2 block: 1x1 expand + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 project + BN, residual Add."""
    inits = [_init("we", _w(16, 8, 1, 1)), *_bn_inits("bne", 16), _init("wd", _w(16, 1, 3, 3)), *_bn_inits("bnd", 16),
             _init("wp", _w(8, 16, 1, 1)), *_bn_inits("bnp", 8), _init("lo", np.asarray(0.0, np.float32)),
             _init("hi", np.asarray(6.0, np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "we"], ["e"], name="expand"), _bn("bne", "e", "eb"),
        helper.make_node("Clip", ["eb", "lo", "hi"], ["er"], name="expand_relu"),
        helper.make_node("Conv", ["er", "wd"], ["d"], name="depthwise", group=16, pads=[1, 1, 1, 1]),
        _bn("bnd", "d", "db"), helper.make_node("Clip", ["db", "lo", "hi"], ["dr"], name="depthwise_relu"),
        helper.make_node("Conv", ["dr", "wp"], ["p"], name="project"), _bn("bnp", "p", "pb"),
        helper.make_node("Add", ["x", "pb"], ["y"], name="add"),
    ]
    return _model(nodes, [_vi("x", [1, 8, 7, 9])], [_vi("y", [1, 8, 7, 9])], inits, opset)


def test_onnx_inverted_residual(clbe):
    m = inverted_residual_model()
    x = RNG.standard_normal((1, 8, 7, 9)).astype(np.float32)
    g = check_onnx(m, x)
    check_onnx(m, x, be=clbe)
    assert [n.op for n in g.nodes].count("relu6") == 2
    assert "transpose" not in [n.op for n in g.nodes]
    assert g.node("add").inputs == ["x", "bnp"] or g.node("add").op == "add"


def channel_shuffle_model():
    """ShuffleNet unit: grouped 1x1 conv, channel shuffle (Reshape/Transpose/Reshape), depthwise conv, concat."""
    inits = [_init("w1", _w(12, 4, 1, 1)), _init("s5", np.asarray([0, 3, 4, 5, 6], np.int64)),
             _init("s4", np.asarray([1, -1, 5, 6], np.int64)), _init("wd", _w(12, 1, 3, 3))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="gconv", group=3),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Reshape", ["r1", "s5"], ["rs"], name="shuffle/reshape1"),
        helper.make_node("Transpose", ["rs"], ["tr"], name="shuffle/transpose", perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["tr", "s4"], ["sh"], name="shuffle/reshape2"),
        helper.make_node("Conv", ["sh", "wd"], ["d"], name="dwconv", group=12, pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["x", "d"], ["y"], name="concat", axis=1),
    ]
    return _model(nodes, [_vi("x", [1, 12, 5, 6])], [_vi("y", [1, 24, 5, 6])], inits)


def test_onnx_channel_shuffle(clbe):
    m = channel_shuffle_model()
    x = RNG.standard_normal((1, 12, 5, 6)).astype(np.float32)
    g = check_onnx(m, x)
    check_onnx(m, x, be=clbe)
    # The shuffle is one transpose of the channel groups, done in NHWC; the reshapes around it are free views.
    assert [n.op for n in g.nodes].count("transpose") == 1
    assert g.node("concat").attrs["axis"] == 3


def test_onnx_zoo_style_ops():
    """Old model-zoo ops: Sum, LRN, Dropout, Unsqueeze'd constants, ConstantOfShape weights, Concat on channels,
    AveragePool with auto_pad, Softmax (opset 9, axis=1 on a 4-D tensor), Sub/Div by constants."""
    inits = [_init("wshape", np.asarray([6, 3, 3, 3], np.int64)), _init("w2", _w(6, 3, 1, 1)),
             _init("sc", RNG.uniform(0.5, 1.5, 6).astype(np.float32)), _init("ax", np.asarray([1, 2], np.int64)),
             _init("sub", np.asarray(0.25, np.float32)), _init("div", np.asarray(2.0, np.float32))]
    nodes = [
        helper.make_node("ConstantOfShape", ["wshape"], ["w1"], name="w1const",
                         value=numpy_helper.from_array(np.asarray([0.05], np.float32))),
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", auto_pad="SAME_UPPER"),
        helper.make_node("Conv", ["x", "w2"], ["c2"], name="conv2"),
        helper.make_node("Sum", ["c1", "c2", "c1"], ["s"], name="sum"),
        helper.make_node("Unsqueeze", ["sc"], ["scu"], name="unsq", axes=[1, 2]),
        helper.make_node("Mul", ["s", "scu"], ["ms"], name="mul"),
        helper.make_node("LRN", ["ms"], ["l"], name="lrn", size=3, alpha=1e-2, beta=0.75, bias=1.0),
        helper.make_node("Dropout", ["l"], ["dr"], name="drop", ratio=0.3),
        helper.make_node("AveragePool", ["dr"], ["ap"], name="apool", kernel_shape=[3, 3], strides=[2, 2],
                         auto_pad="SAME_UPPER"),
        helper.make_node("MaxPool", ["dr"], ["mp"], name="mpool", kernel_shape=[3, 3], strides=[2, 2],
                         auto_pad="SAME_LOWER"),
        helper.make_node("Concat", ["ap", "mp"], ["cat"], name="concat", axis=1),
        helper.make_node("Sub", ["cat", "sub"], ["cs"], name="sub"),
        helper.make_node("Div", ["cs", "div"], ["cd"], name="div"),
        helper.make_node("Softmax", ["cd"], ["y"], name="softmax", axis=1),
    ]
    m = _model(nodes, [_vi("x", [1, 3, 9, 8])], [_vi("y", [1, 12, 5, 4])], inits, opset=9)
    g = check_onnx(m, RNG.standard_normal((1, 3, 9, 8)).astype(np.float32))
    ops = [n.op for n in g.nodes]
    assert {"lrn", "dropout", "concat", "softmax", "add", "avgpool", "maxpool"} <= set(ops)
    assert g.node("apool").attrs["count_include_pad"] is False


def test_onnx_unsupported_ops_listed_together():
    inits = [_init("w", _w(4, 3, 3, 3)), _init("scales", np.asarray([1, 1, 2, 2], np.float32)),
             _init("roi", np.zeros(0, np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Elu", ["c"], ["e"], name="my_elu"),
        helper.make_node("Resize", ["e", "roi", "scales"], ["r"], name="upsample"),
        helper.make_node("GlobalMaxPool", ["r"], ["y"]),
    ]
    m = _model(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 4, 1, 1])], inits)
    from transfercl_cli.importers.onnx_import import convert_model

    with pytest.raises(ModelError) as ei:
        convert_model(m)
    msg = str(ei.value)
    for name, typ in (("my_elu", "Elu"), ("upsample", "Resize"), ("y", "GlobalMaxPool")):
        assert f"'{name}' ({typ})" in msg
    assert "'conv'" not in msg and "3 layer(s)" in msg


def test_onnx_swish_fusion_and_dynamic_input_size():
    """x * Sigmoid(x) becomes one swish node, x * HardSigmoid(x; 1/6, 0.5) one hard_swish node; an input with
    unknown H, W needs input_size."""
    inits = [_init("w", _w(4, 3, 3, 3))]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
        helper.make_node("Mul", ["c", "s"], ["sw"], name="swish"),
        helper.make_node("HardSigmoid", ["sw"], ["h"], name="hsig", alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["h", "sw"], ["y"], name="hswish"),
    ]
    m = _model(nodes, [_vi("x", ["N", 3, "H", "W"])], [_vi("y", ["N", 4, "H", "W"])], inits)
    from transfercl_cli.importers.onnx_import import convert_model

    with pytest.raises(ModelError, match="input_size"):
        convert_model(m)
    g = convert_model(m, input_size=(6, 5))
    assert g.inputs == {"x": (6, 5, 3)} and g.meta["input_size"] == (6, 5)
    assert [n.op for n in g.nodes] == ["conv2d", "swish", "hard_swish"]
    x = RNG.standard_normal((2, 3, 6, 5)).astype(np.float32)
    ref = ort_run(m, {"x": x})[0].transpose(0, 2, 3, 1)
    assert g.meta["output_layout"] == {"y": "NHWC"}
    assert rel(forward(g, np32(), x.transpose(0, 2, 3, 1))[0], ref) <= 1e-4


# --- the ONNX light model zoo shipped in the onnx wheel ------------------------------------------------------------
LIGHT = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
         "vgg19", "zfnet512"]


def light_path(name):
    p = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", f"light_{name}.onnx")
    if not os.path.exists(p):
        pytest.skip(f"{p} is not in this onnx wheel")
    return p


def light_input(m):
    """The input onnx's backend runner feeds the light models: arange(n)/n in the input's shape (see
    onnx/backend/test/runner/__init__.py, generate_dummy_data(random=False)), from which *_output_0.pb was made."""
    inits = {i.name for i in m.graph.initializer}
    vi = [i for i in m.graph.input if i.name not in inits][0]
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim)
    n = int(np.prod(shape))
    return vi.name, (np.arange(n).reshape(shape) / n).astype(np.float32)


@pytest.mark.parametrize("name", LIGHT)
def test_light_model_zoo_opencl(name, clbe):
    path = light_path(name)
    m = onnx.load(path)
    g = load_model(path)
    _, x = light_input(m)
    expected = numpy_helper.to_array(onnx.load_tensor(path.replace(".onnx", "_output_0.pb")))
    got = forward(g, clbe, x.transpose(0, 2, 3, 1))[0]
    if expected.ndim == 4:  # (1, 1000, 1, 1) NCHW comes back NHWC
        expected = expected.transpose(0, 2, 3, 1)
    assert rel(got, expected) <= 1e-4


@pytest.mark.parametrize("name", ["shufflenet", "inception_v1", "squeezenet", "densenet121"])
def test_light_model_zoo_random_weights(name):
    """The zoo's weights are all 0.02 (channels indistinguishable): redo the check with random weights and without
    the final Softmax, against onnxruntime, so that a channel-order mistake cannot hide."""
    m = onnx.load(light_path(name))
    rng = np.random.default_rng(7)
    # Replace each ConstantOfShape weight by a random initializer around the same value.
    new_nodes, inits = [], list(m.graph.initializer)
    shapes = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "ConstantOfShape" and n.input[0] in shapes:
            v = float(numpy_helper.to_array(n.attribute[0].t).reshape(-1)[0])
            shp = tuple(int(d) for d in shapes[n.input[0]])
            inits.append(_init(n.output[0], (v * rng.uniform(0.5, 1.5, shp)).astype(np.float32)))
        else:
            new_nodes.append(n)
    if new_nodes[-1].op_type == "Softmax":
        last = new_nodes.pop()
        m.graph.output[0].name = last.input[0]
        m.graph.output[0].type.tensor_type.ClearField("shape")
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    inp, x = light_input(m)
    x = x * 4.0 - 1.0
    ref = ort_run(m, {inp: x})[0]
    from transfercl_cli.importers.onnx_import import convert_model

    g = convert_model(m)
    got = forward(g, np32(), x.transpose(0, 2, 3, 1))[0]
    if ref.ndim == 4:
        ref = ref.transpose(0, 2, 3, 1)
    assert rel(got, ref) <= 1e-4


# --- synthetic Keras .h5 files ---------------------------------------------------------------------------------------
def k3_tensor(src, shape=None):
    return {"class_name": "__keras_tensor__", "config": {"shape": shape, "dtype": "float32",
                                                         "keras_history": [src, 0, 0]}}


def k3_layer(cls, name, inputs, **cfg):
    cfg = dict(cfg, name=name, trainable=True, dtype="float32")
    if inputs is None:
        nodes = []
    elif len(inputs) == 1:
        nodes = [{"args": [k3_tensor(inputs[0])], "kwargs": {}}]
    else:
        nodes = [{"args": [[k3_tensor(i) for i in inputs]], "kwargs": {}}]
    return {"module": "keras.layers", "class_name": cls, "config": cfg, "registered_name": None, "name": name,
            "inbound_nodes": nodes}


def write_legacy_h5(path, config, weights, keras_version="3.15.1", full=True, suffix=""):
    """weights: {top-level layer name: [(weight name, array)]} written the way Keras' legacy HDF5 saver does."""
    with h5py.File(path, "w") as f:
        root = f
        if full:
            f.attrs["model_config"] = json.dumps(config)
            f.attrs["keras_version"] = keras_version
            f.attrs["backend"] = "tensorflow"
            root = f.create_group("model_weights")
        root.attrs["layer_names"] = [n.encode() for n in weights]
        root.attrs["backend"] = "tensorflow"
        root.attrs["keras_version"] = keras_version
        for lname, ws in weights.items():
            g = root.create_group(lname)
            g.attrs["weight_names"] = [(n + suffix).encode() for n, _ in ws]
            for n, a in ws:
                g.create_dataset(n + suffix, data=np.asarray(a, np.float32))


# Independent numpy versions of the Keras layers (NHWC, TF 'same' padding).
def np_pad_same(x, k, s):
    h, w = x.shape[1:3]
    ph = max((-(-h // s[0]) - 1) * s[0] + k[0] - h, 0)
    pw = max((-(-w // s[1]) - 1) * s[1] + k[1] - w, 0)
    return (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)


def np_conv(x, w, s=(1, 1), padding="valid", depthwise=False):
    k = w.shape[:2]
    if padding == "same":
        (t, b), (l, r) = np_pad_same(x, k, s)
        x = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))
    n, h, wd, c = x.shape
    oh, ow = (h - k[0]) // s[0] + 1, (wd - k[1]) // s[1] + 1
    out = None
    for i in range(k[0]):
        for j in range(k[1]):
            patch = x[:, i:i + s[0] * (oh - 1) + 1:s[0], j:j + s[1] * (ow - 1) + 1:s[1], :]
            if depthwise:  # w (kh, kw, c, mult)
                term = (patch[..., :, None] * w[i, j][None, None, None]).reshape(n, oh, ow, -1)
            else:
                term = patch @ w[i, j]
            out = term if out is None else out + term
    return out


def np_pool(x, k, s, padding, kind):
    pads = np_pad_same(x, k, s) if padding == "same" else ((0, 0), (0, 0))
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=fill)
    ones = np.pad(np.ones_like(x), ((0, 0), pads[0], pads[1], (0, 0)))
    n, h, w, c = xp.shape
    oh, ow = (h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1
    out = np.empty((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            win = xp[:, i * s[0]:i * s[0] + k[0], j * s[1]:j * s[1] + k[1]]
            if kind == "max":
                out[:, i, j] = win.max(axis=(1, 2))
            else:
                cnt = ones[:, i * s[0]:i * s[0] + k[0], j * s[1]:j * s[1] + k[1]].sum(axis=(1, 2))
                out[:, i, j] = win.sum(axis=(1, 2)) / cnt
    return out


def relu6(v):
    return np.clip(v, 0, 6)


def keras3_model(tmp_path):
    """A Keras 3 Functional model using every supported layer type, its weights, and a numpy forward."""
    L = k3_layer
    W = {
        "c1/kernel": _w(3, 3, 3, 4, scale=0.3), "c1/bias": _w(4, scale=0.1),
        "bn/gamma": RNG.uniform(0.5, 1.5, 4), "bn/beta": _w(4, scale=0.1), "bn/moving_mean": _w(4, scale=0.1),
        "bn/moving_variance": RNG.uniform(0.5, 1.5, 4),
        "dw/kernel": _w(3, 3, 4, 2, scale=0.3), "dw/bias": _w(8, scale=0.1),
        "ca/kernel": _w(1, 1, 8, 8, scale=0.3), "ca/bias": _w(8, scale=0.1),
        "sep/depthwise_kernel": _w(3, 3, 16, 1, scale=0.3), "sep/pointwise_kernel": _w(1, 1, 16, 6, scale=0.3),
        "sep/bias": _w(6, scale=0.1),
        "d1/kernel": _w(40, 10, scale=0.3), "d1/bias": _w(10, scale=0.1),
        "d2/kernel": _w(10, 5, scale=0.3), "d2/bias": _w(5, scale=0.1),
    }
    W = {k: np.asarray(v, np.float32) for k, v in W.items()}
    mean, var = [0.1, -0.2, 0.05], [0.9, 1.2, 0.7]
    layers = [
        L("InputLayer", "image", None, batch_shape=[None, 9, 10, 3]),
        L("Rescaling", "rescale", ["image"], scale=1 / 127.5, offset=-1.0),
        L("Normalization", "norm", ["rescale"], axis=-1, mean=mean, variance=var, invert=False),
        L("Conv2D", "c1", ["norm"], filters=4, kernel_size=[3, 3], strides=[2, 2], padding="same",
          dilation_rate=[1, 1], groups=1, activation="relu", use_bias=True, data_format="channels_last"),
        L("BatchNormalization", "bn", ["c1"], axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True),
        L("ReLU", "r1", ["bn"], max_value=6.0, negative_slope=0.0, threshold=0.0),
        L("DepthwiseConv2D", "dw", ["r1"], kernel_size=[3, 3], strides=[1, 1], padding="same", depth_multiplier=2,
          activation="linear", use_bias=True, dilation_rate=[1, 1]),
        L("Conv2D", "ca", ["dw"], filters=8, kernel_size=[1, 1], strides=[1, 1], padding="valid",
          activation="hard_sigmoid", use_bias=True),
        L("Add", "add", ["dw", "ca"]),
        L("Multiply", "mul", ["add", "dw"]),
        L("Concatenate", "cat", ["mul", "add"], axis=-1),
        L("MaxPooling2D", "mp", ["cat"], pool_size=[2, 2], strides=[2, 2], padding="same"),
        L("AveragePooling2D", "ap", ["cat"], pool_size=[3, 3], strides=[2, 2], padding="same"),
        L("ZeroPadding2D", "zp", ["mp"], padding=[[1, 0], [0, 1]]),
        L("SeparableConv2D", "sep", ["zp"], filters=6, kernel_size=[3, 3], strides=[1, 1], padding="valid",
          depth_multiplier=1, activation="tanh", use_bias=True),
        L("GlobalAveragePooling2D", "gap", ["ap"], keepdims=False),
        L("Flatten", "flat", ["sep"]),
        L("Concatenate", "cat2", ["gap", "flat"], axis=-1),
        L("Dense", "d1", ["cat2"], units=10, activation="swish", use_bias=True),
        L("Activation", "act", ["d1"], activation="sigmoid"),
        L("Reshape", "rs", ["act"], target_shape=[2, 5]),
        L("Flatten", "flat2", ["rs"]),
        L("Dropout", "drop", ["flat2"], rate=0.5),
        L("Dense", "d2", ["drop"], units=5, activation="softmax", use_bias=True),
    ]
    config = {"module": "keras.src.models.functional", "class_name": "Functional",
              "config": {"name": "tiny", "trainable": True, "layers": layers, "input_layers": [["image", 0, 0]],
                         "output_layers": [["d2", 0, 0]]}, "registered_name": "Functional"}
    weights = {}
    for lname in [l["name"] for l in layers]:
        weights[lname] = [(k, v) for k, v in W.items() if k.split("/")[0] == lname]

    def reference(x):
        x = x.astype(np.float64) / 127.5 - 1.0
        x = (x - np.asarray(mean)) / np.sqrt(var)
        c1 = np.maximum(np_conv(x, W["c1/kernel"], (2, 2), "same") + W["c1/bias"], 0)
        bn = (c1 - W["bn/moving_mean"]) / np.sqrt(W["bn/moving_variance"] + 1e-3) * W["bn/gamma"] + W["bn/beta"]
        r1 = relu6(bn)
        dw = np_conv(r1, W["dw/kernel"], (1, 1), "same", depthwise=True) + W["dw/bias"]
        ca = np.clip((np_conv(dw, W["ca/kernel"]) + W["ca/bias"]) / 6 + 0.5, 0, 1)  # Keras 3 hard_sigmoid
        add = dw + ca
        cat = np.concatenate([add * dw, add], axis=-1)
        mp = np_pool(cat, (2, 2), (2, 2), "same", "max")
        ap = np_pool(cat, (3, 3), (2, 2), "same", "avg")
        zp = np.pad(mp, ((0, 0), (1, 0), (0, 1), (0, 0)))
        sep = np.tanh(np_conv(np_conv(zp, W["sep/depthwise_kernel"], depthwise=True), W["sep/pointwise_kernel"])
                      + W["sep/bias"])
        cat2 = np.concatenate([ap.mean(axis=(1, 2)), sep.reshape(len(x), -1)], axis=-1)
        d1 = cat2 @ W["d1/kernel"] + W["d1/bias"]
        d1 = d1 / (1 + np.exp(-d1))
        act = 1 / (1 + np.exp(-d1))
        d2 = act @ W["d2/kernel"] + W["d2/bias"]
        e = np.exp(d2 - d2.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return config, weights, reference


def test_keras3_h5_every_layer(tmp_path):
    config, weights, reference = keras3_model(tmp_path)
    path = tmp_path / "tiny.h5"
    write_legacy_h5(path, config, weights)
    g = load_model(path)
    assert g.meta["format"] == "keras_h5" and g.meta["keras_version"] == "3.15.1"
    assert g.inputs == {"image": (9, 10, 3)}
    assert g.node("c1/relu").op == "relu" and g.node("c1").source == "Conv2D"
    assert g.node("sep/depthwise").attrs["groups"] == 16 and g.node("sep/pointwise").params["weight"].shape == (
        1, 1, 16, 6)
    assert g.node("mp").attrs["pads"] == (0, 0, 1, 1)  # 5 -> 3 with 'same': the extra pad at the end
    assert g.node("ap").attrs["count_include_pad"] is False
    pre = g.meta["preprocess"]
    assert pre["size"] == (9, 10) and pre["in_model"] is True
    np.testing.assert_allclose(pre["scale"], 1 / 127.5 / np.sqrt([0.9, 1.2, 0.7]), rtol=1e-6)
    np.testing.assert_allclose(pre["offset"], (-1 - np.asarray([0.1, -0.2, 0.05])) / np.sqrt([0.9, 1.2, 0.7]),
                               rtol=1e-6)
    # Keras' weights, plus Normalization's per-channel scale and offset (3 + 3) that the graph keeps as parameters.
    assert g.num_params() == sum(int(np.prod(v.shape)) for ws in weights.values() for _, v in ws) + 6
    x = RNG.uniform(0, 255, (2, 9, 10, 3)).astype(np.float32)
    assert rel(forward(g, np32(), x)[0], reference(x)) <= 1e-4


def test_keras_weights_only_plus_config(tmp_path):
    config, weights, reference = keras3_model(tmp_path)
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    # Legacy layout (model.save_weights('w.h5') in Keras 2).
    write_legacy_h5(tmp_path / "w.h5", config, weights, full=False)
    with pytest.raises(ModelError, match="only weights"):
        load_model(tmp_path / "w.h5")
    x = RNG.uniform(0, 255, (1, 9, 10, 3)).astype(np.float32)
    g = load_model(tmp_path / "w.h5", config=tmp_path / "tiny.json")
    assert rel(forward(g, np32(), x)[0], reference(x)) <= 1e-4
    # Keras 3 .weights.h5 layout: layers/NAME/vars/0..
    with h5py.File(tmp_path / "w3.weights.h5", "w") as f:
        for lname, ws in weights.items():
            vs = f.create_group(f"layers/{lname}/vars")
            for i, (_n, a) in enumerate(ws):
                vs.create_dataset(str(i), data=a)
    g3 = load_model(tmp_path / "w3.weights.h5", config=tmp_path / "tiny.json")
    assert rel(forward(g3, np32(), x)[0], reference(x)) <= 1e-4


def test_keras2_nested_functional_in_sequential(tmp_path):
    """tf.keras 2 layout: Sequential([Functional base, GlobalAveragePooling2D, Dense]); inner names kept."""
    def k2(cls, name, inbound, **cfg):
        return {"class_name": cls, "config": dict(cfg, name=name), "name": name,
                "inbound_nodes": [[[i, 0, 0, {}] for i in inbound]] if inbound else []}

    base = {"class_name": "Functional", "config": {
        "name": "base", "layers": [
            k2("InputLayer", "input_1", None, batch_input_shape=[None, 8, 8, 3], dtype="float32"),
            k2("Conv2D", "conv", ["input_1"], filters=5, kernel_size=[3, 3], strides=[2, 2], padding="valid",
               activation="linear", use_bias=True, data_format="channels_last", dilation_rate=[1, 1], groups=1),
            k2("BatchNormalization", "conv_bn", ["conv"], axis=[3], epsilon=1e-3, momentum=0.99, center=True,
               scale=False),
            k2("ReLU", "conv_relu", ["conv_bn"], max_value=None, negative_slope=0.0, threshold=0.0),
            k2("Activation", "hsig", ["conv_relu"], activation="hard_sigmoid"),
        ],
        "input_layers": [["input_1", 0, 0]], "output_layers": [["hsig", 0, 0]]}, "name": "base"}
    config = {"class_name": "Sequential", "config": {"name": "classifier", "layers": [
        base,
        {"class_name": "GlobalAveragePooling2D", "config": {"name": "gap", "data_format": "channels_last"}},
        {"class_name": "Dense", "config": {"name": "head", "units": 3, "activation": "linear", "use_bias": True}},
    ]}}
    wk, bk = _w(3, 3, 3, 5, scale=0.5), _w(5, scale=0.1)
    beta, mm, mv = _w(5, scale=0.1), _w(5, scale=0.1), RNG.uniform(0.5, 1.5, 5).astype(np.float32)
    hk, hb = _w(5, 3), _w(3, scale=0.1)
    weights = {"base": [("conv/kernel", wk), ("conv/bias", bk), ("conv_bn/beta", beta),
                        ("conv_bn/moving_mean", mm), ("conv_bn/moving_variance", mv)],
               "gap": [], "head": [("head/kernel", hk), ("head/bias", hb)]}
    write_legacy_h5(tmp_path / "k2.h5", config, weights, keras_version="2.13.1", suffix=":0")
    g = load_model(tmp_path / "k2.h5")
    assert g.names() == ["conv", "conv_bn", "conv_relu", "hsig", "gap", "head"]
    assert g.inputs == {"input_1": (8, 8, 3)}
    x = RNG.standard_normal((2, 8, 8, 3)).astype(np.float32)
    c = np_conv(x.astype(np.float64), wk, (2, 2)) + bk
    r = np.maximum((c - mm) / np.sqrt(mv + 1e-3) + beta, 0)
    h = np.clip(0.2 * r + 0.5, 0, 1)  # Keras 2 hard_sigmoid
    ref = h.mean(axis=(1, 2)) @ hk + hb
    assert rel(forward(g, np32(), x)[0], ref) <= 1e-4


# Input of any size, and unsupported layers listed together: tests/test_import_keras.py.


# --- file errors -----------------------------------------------------------------------------------------------------
def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01 this is not protobuf \xff" * 10)
    with pytest.raises(ModelError, match="not a readable ONNX"):
        load_model(tmp_path / "junk.onnx")
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 50)
    with pytest.raises(ModelError, match="not a readable HDF5"):
        load_model(tmp_path / "junk.h5")
    with pytest.raises(ModelError, match="folder"):
        load_model(tmp_path)
    # An ONNX file under a .h5 name is recognised by its content... and an HDF5 file under an odd suffix too.
    m = inverted_residual_model()
    onnx.save(m, str(tmp_path / "model.bin"))
    assert load_model(tmp_path / "model.bin").meta["format"] == "onnx"


def test_missing_optional_dependencies(tmp_path, monkeypatch):
    (tmp_path / "m.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    onnx.save(inverted_residual_model(), str(tmp_path / "m.onnx"))
    monkeypatch.setitem(sys.modules, "h5py", None)
    monkeypatch.setitem(sys.modules, "onnx", None)
    # The hint works from a clone too (`pip install 'transfercl[h5]'` would look for a package on PyPI).
    with pytest.raises(ModelError, match=r"pip install h5py.*\.venv/bin/pip install -e '\.\[h5\]'"):
        load_model(tmp_path / "m.h5")
    with pytest.raises(ModelError, match=r"pip install onnx"):
        load_model(tmp_path / "m.onnx")
