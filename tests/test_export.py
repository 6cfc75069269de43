"""Exporters: ONNX (checked by running onnxruntime against a numpy forward), Keras-layout .h5 weights, npz, int8,
overwrite refusal and atomic writes."""
import json
import os

import h5py
import numpy as np
import pytest

from tests.conftest import shared_path
from transfercl_cli.errors import TclError
from transfercl_cli.export import (build_onnx, export_h5, export_npz, export_onnx, load_npz_params, quantize_int8,
                                   read_h5_weights)
from transfercl_cli.graph import Graph, Node

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


# ---------------------------------------------------------------------------------------------------------------
# a direct float64 numpy forward for the ops these tests use (independent of the project's op implementations)


def _conv(x, w, b, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), groups=1, act=None, **_):
    N, H, W, C = x.shape
    kh, kw, cg, cout = w.shape
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = strides, dilations, pads
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    OH = (H + pt + pb - dh * (kh - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((N, OH, OW, cout))
    cog = cout // groups
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                v = xp[:, i * dh: i * dh + sh * (OH - 1) + 1: sh, j * dw: j * dw + sw * (OW - 1) + 1: sw,
                       g * cg: (g + 1) * cg]
                y[..., g * cog: (g + 1) * cog] += v @ w[i, j, :, g * cog: (g + 1) * cog]
    if b is not None:
        y = y + b
    return _act(y, act)


def _act(y, act):
    return {None: y, "relu": np.maximum(y, 0), "relu6": np.clip(y, 0, 6)}[act]


def _pool(x, kernel, strides, pads, kind, count_include_pad=True):
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = kernel, strides, pads
    N, H, W, C = x.shape
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=fill)
    ones = np.pad(np.ones((1, H, W, 1)), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    OH, OW = (H + pt + pb - kh) // sh + 1, (W + pl + pr - kw) // sw + 1
    y = np.zeros((N, OH, OW, C))
    for a in range(OH):
        for c in range(OW):
            win = xp[:, a * sh: a * sh + kh, c * sw: c * sw + kw, :]
            if kind == "max":
                y[:, a, c] = win.max(axis=(1, 2))
            else:
                cnt = kh * kw if count_include_pad else ones[:, a * sh: a * sh + kh, c * sw: c * sw + kw].sum()
                y[:, a, c] = win.sum(axis=(1, 2)) / cnt
    return y


def np_forward(graph, feeds):
    env = {k: np.asarray(v, np.float64) for k, v in feeds.items()}
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    for n in graph.nodes:
        xs = [env[t] for t in n.inputs]
        x, a, p = xs[0], n.attrs, {k: np.asarray(v, np.float64) for k, v in n.params.items()}
        if n.op == "conv2d":
            y = _conv(x, p["weight"], p.get("bias"), **a)
        elif n.op == "dense":
            y = _act(x @ p["weight"] + p.get("bias", 0), a.get("act"))
        elif n.op == "batchnorm":
            y = (x - p["mean"]) / np.sqrt(p["var"] + a["eps"]) * p["gamma"] + p["beta"]
        elif n.op == "relu":
            y = np.maximum(x, 0)
        elif n.op == "relu6":
            y = np.clip(x, 0, 6)
        elif n.op == "clip":
            y = np.clip(x, a["min"], a["max"])
        elif n.op == "sigmoid":
            y = sig(x)
        elif n.op == "tanh":
            y = np.tanh(x)
        elif n.op == "swish":
            y = x * sig(x)
        elif n.op == "hard_swish":
            y = x * np.clip(x + 3, 0, 6) / 6
        elif n.op == "hard_sigmoid":
            y = np.clip(a["alpha"] * x + a["beta"], 0, 1)
        elif n.op == "leaky_relu":
            y = np.where(x > 0, x, a["alpha"] * x)
        elif n.op == "softmax":
            e = np.exp(x - x.max(axis=a.get("axis", -1), keepdims=True))
            y = e / e.sum(axis=a.get("axis", -1), keepdims=True)
        elif n.op == "global_avgpool":
            y = x.mean(axis=(1, 2), keepdims=bool(a.get("keepdims", False)))
        elif n.op == "flatten":
            y = x.reshape(x.shape[0], -1)
        elif n.op == "reshape":
            y = x.reshape((x.shape[0],) + tuple(a["shape"]))
        elif n.op == "transpose":
            y = x.transpose(a["perm"])
        elif n.op == "add":
            y = sum(xs[1:], xs[0])
        elif n.op == "mul":
            y = np.prod(np.broadcast_arrays(*xs), axis=0)
        elif n.op == "concat":
            y = np.concatenate(xs, axis=a["axis"])
        elif n.op == "pad":
            pt, pl, pb, pr = a["pads"]
            y = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=a.get("value", 0.0))
        elif n.op == "maxpool":
            y = _pool(x, a["kernel"], a["strides"], a["pads"], "max")
        elif n.op == "avgpool":
            y = _pool(x, a["kernel"], a["strides"], a["pads"], "avg", a["count_include_pad"])
        elif n.op == "scale":
            y = x * p.get("scale", a.get("scale", 1.0)) + p.get("offset", a.get("offset", 0.0))
        elif n.op in ("dropout", "identity"):
            y = x
        else:
            raise NotImplementedError(n.op)
        env[n.outputs[0]] = y
    return {t: env[t] for t in graph.outputs}


def run_ort(path_or_model, feeds, basic=False):
    src = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if basic:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {k: np.asarray(v, np.float32) for k, v in feeds.items()})))


def rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / max(np.max(np.abs(want)), 1e-30))


# ---------------------------------------------------------------------------------------------------------------
# graphs


def _w(rng, *shape, s=0.3):
    return (rng.standard_normal(shape) * s).astype(np.float32)


def _bn(rng, c):
    return {"gamma": (1 + 0.2 * rng.standard_normal(c)).astype(np.float32), "beta": _w(rng, c, s=0.1),
            "mean": _w(rng, c, s=0.1), "var": (0.5 + rng.random(c)).astype(np.float32)}


def small_cnn(seed=0, H=9, W=11):
    """conv (stride 2, TF-SAME asymmetric pad, fused relu6) - BN - depthwise (multiplier 2) - BN - relu6 -
    pointwise - global avgpool - dense - softmax."""
    rng = np.random.default_rng(seed)
    nodes = [
        Node("conv1", "conv2d", ["input"], ["c1"], {"kernel": (3, 3), "strides": (2, 2), "dilations": (1, 1),
                                                    "pads": (0, 0, 1, 1), "groups": 1, "act": "relu6"},
             {"weight": _w(rng, 3, 3, 3, 5), "bias": _w(rng, 5)}, "Conv2D"),
        Node("conv1_bn", "batchnorm", ["c1"], ["b1"], {"eps": 1e-3, "momentum": 0.99}, _bn(rng, 5),
             "BatchNormalization"),
        Node("conv_dw_1", "conv2d", ["b1"], ["d1"], {"kernel": (3, 3), "strides": (1, 1), "dilations": (1, 1),
                                                      "pads": (1, 1, 1, 1), "groups": 5},
             {"weight": _w(rng, 3, 3, 1, 10)}, "DepthwiseConv2D"),
        Node("conv_dw_1_bn", "batchnorm", ["d1"], ["b2"], {"eps": 1e-3, "momentum": 0.99}, _bn(rng, 10),
             "BatchNormalization"),
        Node("conv_dw_1_relu", "relu6", ["b2"], ["r2"], source="ReLU"),
        Node("conv_pw_1", "conv2d", ["r2"], ["p1"], {"kernel": (1, 1), "strides": (1, 1), "dilations": (1, 1),
                                                      "pads": (0, 0, 0, 0), "groups": 1, "act": "relu"},
             {"weight": _w(rng, 1, 1, 10, 17), "bias": _w(rng, 17)}, "Conv2D"),
        Node("gap", "global_avgpool", ["p1"], ["g"], {"keepdims": False}, source="GlobalAveragePooling2D"),
        Node("head", "dense", ["g"], ["logits"], {}, {"weight": _w(rng, 17, 4), "bias": _w(rng, 4)}, "Dense"),
        Node("predictions", "softmax", ["logits"], ["probs"], {"axis": -1}, source="Activation"),
    ]
    g = Graph(nodes, {"input": (H, W, 3)}, ["probs"], name="small",
              meta={"classes": ["a", "b", "c", "d"], "preprocessing": {"scale": 1 / 127.5, "offset": -1.0}})
    g.topo_check()
    return g


def flatten_net(seed=1):
    """conv -> flatten of a 4-D tensor (NHWC physical order) -> dense: catches a missing NCHW->NHWC transpose."""
    rng = np.random.default_rng(seed)
    nodes = [
        Node("conv", "conv2d", ["x"], ["c"], {"kernel": (3, 3), "strides": (1, 1), "dilations": (1, 1),
                                              "pads": (1, 1, 1, 1), "groups": 1}, {"weight": _w(rng, 3, 3, 3, 3)}),
        Node("flat", "flatten", ["c"], ["f"]),
        Node("fc", "dense", ["f"], ["h"], {"act": "relu6"}, {"weight": _w(rng, 5 * 7 * 3, 6), "bias": _w(rng, 6)}),
        Node("fc_bn", "batchnorm", ["h"], ["hb"], {"eps": 1e-3}, _bn(rng, 6)),
        Node("rescale", "scale", ["hb"], ["y"], {"scale": 0.5, "offset": 0.25}),
    ]
    return Graph(nodes, {"x": (5, 7, 3)}, ["y"], name="flat")


def many_ops_net(seed=2):
    """The remaining ops, with layout-sensitive ones (concat on channels, reshape/transpose, 4-D output)."""
    rng = np.random.default_rng(seed)
    conv = {"kernel": (3, 3), "strides": (1, 1), "dilations": (2, 2), "pads": (2, 2, 2, 2), "groups": 1}
    nodes = [
        Node("scale_in", "scale", ["x"], ["s"], {}, {"scale": _w(rng, 3, s=1.0), "offset": _w(rng, 3)}),
        Node("pad", "pad", ["s"], ["pd"], {"pads": (1, 0, 2, 1), "value": 0.5}),
        Node("conv_a", "conv2d", ["pd"], ["ca"], conv, {"weight": _w(rng, 3, 3, 3, 6), "bias": _w(rng, 6)}),
        Node("grouped", "conv2d", ["ca"], ["gc"], {"kernel": (1, 1), "strides": (1, 1), "dilations": (1, 1),
                                                   "pads": (0, 0, 0, 0), "groups": 3},
             {"weight": _w(rng, 1, 1, 2, 6)}),
        Node("sw", "swish", ["ca"], ["a1"]),
        Node("hs", "hard_swish", ["gc"], ["a2"]),
        Node("cat", "concat", ["a1", "a2"], ["cc"], {"axis": 3}),
        Node("mp", "maxpool", ["cc"], ["m"], {"kernel": (2, 2), "strides": (2, 2), "pads": (0, 0, 1, 1)}),
        Node("ap", "avgpool", ["cc"], ["ap_"], {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1),
                                                "count_include_pad": False}),
        Node("lr", "leaky_relu", ["ap_"], ["l"], {"alpha": 0.1}),
        Node("sum", "add", ["m", "l", "m"], ["sm"]),
        Node("hsig", "hard_sigmoid", ["sm"], ["hsg"], {"alpha": 0.2, "beta": 0.5}),
        Node("prod", "mul", ["sm", "hsg"], ["pr"]),
        Node("th", "tanh", ["pr"], ["t"]),
        Node("cl", "clip", ["t"], ["ct"], {"min": -0.5, "max": 0.7}),
        Node("drop", "dropout", ["ct"], ["dr"], {"rate": 0.5}),
        Node("tr", "transpose", ["dr"], ["tp"], {"perm": (0, 2, 1, 3)}),
        Node("rs", "reshape", ["tp"], ["rsh"], {"shape": (-1, 12)}),
        Node("bn3d", "batchnorm", ["rsh"], ["b3"], {"eps": 1e-3}, _bn(rng, 12)),
        Node("sig", "sigmoid", ["b3"], ["sg"]),
        Node("soft", "softmax", ["ct"], ["soft_out"], {"axis": 3}),
    ]
    return Graph(nodes, {"x": (7, 9, 3)}, ["sg", "soft_out"], name="many")


# ---------------------------------------------------------------------------------------------------------------
# ONNX


def test_onnx_small_cnn_matches_numpy(tmp_path):
    g = small_cnn()
    p = str(tmp_path / "m.onnx")
    export_onnx(g, p)
    m = onnx.load(p)
    onnx.checker.check_model(m)
    # NHWC input, one Transpose to NCHW, our layer names on the nodes, fused activations as their own nodes.
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert m.graph.input[0].name == "input" and [d.dim_value for d in dims[1:]] == [9, 11, 3]
    assert m.graph.node[0].op_type == "Transpose"
    assert sum(n.op_type == "Transpose" for n in m.graph.node) == 1
    ops = {n.name: n.op_type for n in m.graph.node}
    assert ops["conv1"] == "Conv" and ops["conv1/relu6"] == "Clip" and ops["conv_pw_1/relu"] == "Relu"
    assert ops["conv1_bn"] == "BatchNormalization" and ops["head"] == "Gemm" and ops["predictions"] == "Softmax"
    conv1 = next(n for n in m.graph.node if n.name == "conv1")
    assert list(onnx.helper.get_attribute_value(next(a for a in conv1.attribute if a.name == "pads"))) == [0, 0, 1, 1]
    dw = next(n for n in m.graph.node if n.name == "conv_dw_1")
    assert onnx.helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 5
    props = {pp.key: pp.value for pp in m.metadata_props}
    assert json.loads(props["classes"]) == ["a", "b", "c", "d"]
    assert json.loads(props["preprocessing"])["offset"] == -1.0
    x = np.random.default_rng(5).standard_normal((2, 9, 11, 3)).astype(np.float32)
    got = run_ort(p, {"input": x})["probs"]
    want = np_forward(g, {"input": x})["probs"]
    assert got.shape == (2, 4)
    assert rel_err(got, want) <= 1e-4


def test_onnx_logits_and_probabilities_output(tmp_path):
    g = small_cnn(seed=3)
    g.nodes = g.nodes[:-1]
    g.outputs = ["logits"]
    g.meta["export_softmax"] = True
    m = build_onnx(g)
    assert [o.name for o in m.graph.output] == ["logits", "probabilities"]
    assert [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim][1:] == [4]
    x = np.random.default_rng(6).standard_normal((3, 9, 11, 3)).astype(np.float32)
    out = run_ort(m, {"input": x})
    want = np_forward(g, {"input": x})["logits"]
    assert rel_err(out["logits"], want) <= 1e-4
    e = np.exp(want - want.max(-1, keepdims=True))
    assert rel_err(out["probabilities"], e / e.sum(-1, keepdims=True)) <= 1e-4


def test_onnx_flatten_keeps_nhwc_order(tmp_path):
    g = flatten_net()
    x = np.random.default_rng(7).standard_normal((1, 5, 7, 3)).astype(np.float32)
    got = run_ort(build_onnx(g), {"x": x})["y"]
    assert rel_err(got, np_forward(g, {"x": x})["y"]) <= 1e-4


@pytest.mark.parametrize("opset,layout", [(13, "NHWC"), (14, "NCHW")])
def test_onnx_many_ops(opset, layout):
    g = many_ops_net()
    m = build_onnx(g, opset=opset, input_layout=layout)
    assert ("HardSwish" in {n.op_type for n in m.graph.node}) == (opset >= 14)
    x = np.random.default_rng(8).standard_normal((2, 7, 9, 3)).astype(np.float32)
    want = np_forward(g, {"x": x})
    got = run_ort(m, {"x": x.transpose(0, 3, 1, 2) if layout == "NCHW" else x})
    for t in g.outputs:
        assert got[t].shape == want[t].shape
        assert rel_err(got[t], want[t]) <= 1e-4, t


def test_onnx_matches_run_forward():
    """The same graphs through the project's own numpy backend (skips while an op has no numpy implementation)."""
    from transfercl_cli import ops
    from transfercl_cli.backends import NumpyBackend
    from transfercl_cli.executor import run_forward

    rng = np.random.default_rng(9)
    lrn = Graph([Node("lrn", "lrn", ["x"], ["y"], {"size": 3, "alpha": 1e-2, "beta": 0.75, "bias": 1.0})],
                {"x": (4, 5, 7)}, ["y"])
    for g in (small_cnn(), flatten_net(), many_ops_net(), lrn):
        missing = sorted({n.op for n in g.nodes} - set(ops.supported("numpy")))
        if missing:
            pytest.skip(f"numpy reference ops not available yet: {missing}")
        name, shape = next(iter(g.inputs.items()))
        x = rng.standard_normal((2,) + tuple(shape)).astype(np.float32)
        want = run_forward(g, NumpyBackend(), {name: x})
        got = run_ort(build_onnx(g), {name: x})
        for t in g.outputs:
            assert rel_err(got[t], want[t]) <= 1e-4, (g.name, t)


def test_onnx_bad_arguments(tmp_path):
    with pytest.raises(TclError, match="opset"):
        build_onnx(small_cnn(), opset=9)
    g = small_cnn()
    g.nodes[2].op = "no_such_op"
    with pytest.raises(TclError, match="no_such_op"):
        export_onnx(g, str(tmp_path / "x.onnx"))
    assert not os.path.exists(tmp_path / "x.onnx")


# ---------------------------------------------------------------------------------------------------------------
# int8


def test_quantize_int8_error_bound_and_onnx(tmp_path):
    g = small_cnn(seed=11)
    qg, qw = quantize_int8(g)
    assert set(qw) == {"conv1/weight", "conv_dw_1/weight", "conv_pw_1/weight", "head/weight"}
    for key, q in qw.items():
        layer = key.split("/")[0]
        w = g.node(layer).params["weight"]
        assert q.q.dtype == np.int8 and q.q.shape == w.shape and q.scale.shape == (w.shape[-1],)
        assert np.all(np.abs(q.q.reshape(-1, w.shape[-1])).max(axis=0) == 127)
        err = np.abs(qg.node(layer).params["weight"].astype(np.float64) - w).reshape(-1, w.shape[-1]).max(axis=0)
        assert np.all(err <= q.scale * 0.5 * (1 + 1e-5)), key
        assert np.all(err > 0)  # the weights really changed
        assert qg.node(layer).params["weight"].dtype == np.float32
    assert np.array_equal(qg.node("conv1").params["bias"], g.node("conv1").params["bias"])
    assert np.array_equal(g.node("conv1").params["weight"], small_cnn(seed=11).node("conv1").params["weight"])
    # ONNX with int8 initializers + DequantizeLinear equals the fake-quantized graph.
    p = str(tmp_path / "q.onnx")
    export_onnx(qg, p, int8=qw)
    m = onnx.load(p)
    assert sum(n.op_type == "DequantizeLinear" for n in m.graph.node) == 4
    assert {i.name: i.data_type for i in m.graph.initializer}["conv1.weight_int8"] == onnx.TensorProto.INT8
    x = np.random.default_rng(12).standard_normal((2, 9, 11, 3)).astype(np.float32)
    want = np_forward(qg, {"input": x})["probs"]
    assert rel_err(run_ort(p, {"input": x}, basic=True)["probs"], want) <= 1e-4
    # At its default level onnxruntime fuses DequantizeLinear+Gemm into MatMulNBits, which also rounds the
    # activations to int8 (measured 1.6e-3 here): the file is exact, the runtime trades precision for speed.
    assert rel_err(run_ort(p, {"input": x})["probs"], want) <= 1e-2


# ---------------------------------------------------------------------------------------------------------------
# h5 and npz


def test_h5_keras_layout_and_reimport(tmp_path):
    g = small_cnn()
    p = str(tmp_path / "w.h5")
    export_h5(g, p)
    with h5py.File(p, "r") as f:
        assert list(f.attrs["layer_names"]) == g.names()
        assert f.attrs["backend"] == "tensorflow" and "keras_version" in f.attrs
        assert list(f["conv1"].attrs["weight_names"]) == ["conv1/kernel", "conv1/bias"]
        assert f["conv1/conv1/kernel"].shape == (3, 3, 3, 5)
        assert list(f["conv_dw_1"].attrs["weight_names"]) == ["conv_dw_1/kernel"]  # Keras 3's name
        assert f["conv_dw_1/conv_dw_1/kernel"].shape == (3, 3, 5, 2)
        assert list(f["conv1_bn"].attrs["weight_names"]) == [
            "conv1_bn/gamma", "conv1_bn/beta", "conv1_bn/moving_mean", "conv1_bn/moving_variance"]
        assert f["head/head/kernel"].shape == (17, 4)
        assert len(f["gap"].attrs["weight_names"]) == 0
        # Depthwise output channel c*mult + m is Keras's [..., c, m].
        dk = f["conv_dw_1/conv_dw_1/kernel"][...]
        assert np.array_equal(dk[:, :, 3, 1], g.node("conv_dw_1").params["weight"][:, :, 0, 7])
    back = read_h5_weights(p)
    assert set(back) == set(g.params())
    for k, v in g.params().items():
        assert np.array_equal(back[k], v), k


def test_npz_round_trip_and_sidecar(tmp_path):
    g = small_cnn()
    p = str(tmp_path / "m.npz")
    export_npz(g, p, {"classes": g.meta["classes"], "preprocessing": g.meta["preprocessing"]})
    with np.load(p, allow_pickle=False) as z:
        assert set(z.files) == set(g.params())
        for k, v in g.params().items():
            assert z[k].dtype == np.float32 and np.array_equal(z[k], v)
    side = json.load(open(p + ".json"))
    assert side["classes"] == ["a", "b", "c", "d"] and side["preprocessing"]["offset"] == -1.0
    assert [n["name"] for n in side["nodes"]] == g.names()
    # int8: int8 arrays and scales instead of the float weights.
    qg, qw = quantize_int8(g)
    p8 = str(tmp_path / "q.npz")
    export_npz(g, p8, None, int8=qw)
    with np.load(p8, allow_pickle=False) as z:
        assert z["conv1/weight:int8"].dtype == np.int8 and "conv1/weight" not in z.files
        assert np.array_equal(z["conv_pw_1/weight:scale"], qw["conv_pw_1/weight"].scale)
        int8_bytes = sum(z[k].nbytes for k in z.files if k.endswith(":int8"))
    assert int8_bytes * 4 == sum(v.nbytes for k, v in g.params().items() if k.endswith("/weight"))
    back = load_npz_params(p8)
    for k, v in qg.params().items():
        assert np.array_equal(back[k], v), k
    assert json.load(open(p8 + ".json"))["classes"] == ["a", "b", "c", "d"]


# ---------------------------------------------------------------------------------------------------------------
# overwrite refusal and atomic writes


WRITERS = {
    "onnx": lambda g, p, **kw: export_onnx(g, p, **kw),
    "h5": lambda g, p, **kw: export_h5(g, p, **kw),
    "npz": lambda g, p, **kw: export_npz(g, p, None, **kw),
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_refuses_to_overwrite_without_force(tmp_path, fmt):
    g = small_cnn()
    p = str(tmp_path / f"out.{fmt}")
    with open(p, "wb") as f:
        f.write(b"precious")
    with pytest.raises(TclError) as ei:
        WRITERS[fmt](g, p)
    assert "--force" in str(ei.value) and p in str(ei.value)
    assert open(p, "rb").read() == b"precious"
    WRITERS[fmt](g, p, force=True)
    assert os.path.getsize(p) > 1000


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, fmt):
    import transfercl_cli.export as ex

    def boom(*a, **k):
        # Write something first, as a real crash midway would.
        for x in a:
            if hasattr(x, "write"):
                x.write(b"partial")
            elif isinstance(x, str) and os.path.exists(x):
                with open(x, "ab") as f:
                    f.write(b"partial")
        raise KeyboardInterrupt

    if fmt == "onnx":
        monkeypatch.setattr(onnx, "save_model", lambda m, path, *a, **k: boom(path))
    elif fmt == "npz":
        monkeypatch.setattr(np, "savez", boom)
    else:
        monkeypatch.setattr(ex, "keras_weights", boom)  # after the file was opened and the root written
    p = str(tmp_path / f"out.{fmt}")
    with pytest.raises(KeyboardInterrupt):
        WRITERS[fmt](small_cnn(), p)
    assert os.listdir(tmp_path) == []


def test_npz_sidecar_failure_leaves_nothing(tmp_path, monkeypatch):
    import transfercl_cli.export as ex

    def fail(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(ex, "write_json", fail)
    with pytest.raises(OSError):
        export_npz(small_cnn(), str(tmp_path / "m.npz"))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# the real MobileNet V1


def _chelsea():
    from PIL import Image

    img = Image.open(shared_path("images", "chelsea.png")).convert("RGB")
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.BILINEAR)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    return (np.asarray(img, np.float32) / 127.5 - 1.0)[None]


def _load_mobilenet():
    h5 = shared_path("models", "mobilenet_v1_1.0_224.h5")
    try:
        from transfercl_cli.importers import load_model

        return load_model(h5), h5
    except ImportError as e:  # the Keras importer is being written
        pytest.skip(f"importer not available yet: {e}")


def test_mobilenet_onnx_round_trip(tmp_path):
    ref = shared_path("models", "mobilenet_v1_1.0_224.onnx")
    g, _ = _load_mobilenet()
    x = _chelsea()
    p = str(tmp_path / "mobilenet.onnx")
    export_onnx(g, p)
    (name,) = g.inputs
    got = run_ort(p, {name: x})[g.outputs[0]]
    want = next(iter(run_ort(ref, {"input": x}).values()))
    assert got.shape == want.shape == (1, 1000)
    assert rel_err(got, want) <= 1e-4
    assert int(np.argmax(got)) == 281  # tabby cat


def test_read_h5_weights_of_keras_model():
    """A Keras 3 full-model file: depthwise kernels are found through model_config and come back HWIO-like."""
    w = read_h5_weights(shared_path("models", "mobilenet_v1_1.0_224.h5"))
    assert len(w) == 137
    assert w["conv_dw_1/weight"].shape == (3, 3, 1, 32) and w["conv1/weight"].shape == (3, 3, 3, 32)
    assert w["conv_preds/weight"].shape == (1, 1, 1024, 1000) and w["conv1_bn/var"].shape == (32,)
    assert sum(v.size for v in w.values()) == 4253864


def test_mobilenet_h5_matches_keras_file(tmp_path):
    g, h5 = _load_mobilenet()
    p = str(tmp_path / "mobilenet_weights.h5")
    export_h5(g, p)
    with h5py.File(h5, "r") as orig, h5py.File(p, "r") as ours:
        mw = orig["model_weights"]
        n = 0
        for layer in mw.attrs["layer_names"]:
            names = list(mw[layer].attrs["weight_names"])
            if not names:
                continue
            assert list(ours[layer].attrs["weight_names"]) == names, layer
            for wn in names:
                assert np.array_equal(ours[layer][wn][...], mw[layer][wn][...]), wn
                n += 1
        assert n == 137  # 27 convs + 27 BNs x 4 + conv_preds kernel and bias
    # Re-import through the Keras importer: our weights-only file plus the original model's JSON config.
    from transfercl_cli.importers import load_model

    cfg = str(tmp_path / "model.json")
    with h5py.File(h5, "r") as orig, open(cfg, "w") as f:
        mc = orig.attrs["model_config"]
        f.write(mc.decode() if isinstance(mc, bytes) else mc)
    g2 = load_model(p, config=cfg)
    assert set(g2.params()) == set(g.params())
    for k, v in g.params().items():
        assert np.array_equal(g2.params()[k], v), k
