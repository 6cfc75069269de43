"""TFLite (LiteRT) in and out: tcl graphs written as .tflite and run by the LiteRT interpreter (ai-edge-litert), the
importer checked against LiteRT on hand-written TF-converter-style files (made here with the flatbuffers builder:
no TensorFlow), the real MobileNet V1 through LiteRT on the golden image, int8 weights, and a fine-tune that starts
from a .tflite file and exports one."""
import json
import os
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from transfercl_cli.backends import NumpyBackend
from transfercl_cli.errors import ModelError, TclError, TclNote
from transfercl_cli.executor import run_forward
from transfercl_cli.graph import Graph, Node

pytest.importorskip("tflite")
from transfercl_cli.export import quantize_int8  # noqa: E402
from transfercl_cli.export_tflite import TfliteFile, build_tflite, export_tflite  # noqa: E402
from transfercl_cli.importers import load_model  # noqa: E402
from transfercl_cli.importers.tflite_import import TfliteModel, convert_model, supported_ops  # noqa: E402

from .helpers import tiny_mobilenet  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "sample_data")


def interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            pytest.skip("no LiteRT interpreter (pip install ai-edge-litert)")
    return Interpreter


def run_lite(data, x):
    """Outputs of a .tflite model (bytes) on input x (any batch), in subgraph output order, and their names."""
    it = interpreter_class()(model_content=bytes(data))
    d = it.get_input_details()[0]
    if tuple(d["shape"]) != x.shape:
        it.resize_tensor_input(d["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(d["index"], np.ascontiguousarray(x, np.float32))
    it.invoke()
    outs = it.get_output_details()
    return [it.get_tensor(o["index"]).copy() for o in outs], [o["name"] for o in outs]


def forward(g, x):
    out = run_forward(g, NumpyBackend(), {next(iter(g.inputs)): x})
    return [np.asarray(out[t], np.float64) for t in g.outputs]


def rel(a, e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
    return float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-12))


def N(name, op, ins, attrs=None, params=None, out=None):
    return Node(name, op, list(ins), [out or name], dict(attrs or {}),
                {k: np.asarray(v, np.float32) for k, v in (params or {}).items()})


RNG = np.random.default_rng(20)


def W(*shape, s=0.3):
    return RNG.normal(0, s, shape).astype(np.float32)


def conv(name, x, k, cin, cout, stride=1, pads=(0, 0, 0, 0), groups=1, dil=1, act=None, bias=True):
    p = {"weight": W(k, k, cin // groups, cout)}
    if bias:
        p["bias"] = W(cout, s=0.1)
    return N(name, "conv2d", [x], {"kernel": (k, k), "strides": (stride, stride), "dilations": (dil, dil),
                                   "pads": pads, "groups": groups, "act": act}, p)


def bn(name, x, c, gamma=None):
    return N(name, "batchnorm", [x], {"eps": 1e-3, "momentum": 0.99},
             {"gamma": RNG.uniform(0.5, 1.5, c) if gamma is None else gamma, "beta": W(c, s=0.1),
              "mean": W(c, s=0.1), "var": RNG.uniform(0.5, 1.5, c)})


def op_graphs():
    """Small graphs that together use every op the TFLite writer knows, in the ways it writes them differently."""
    gs = {}
    gs["conv_padding"] = Graph([
        conv("same", "x", 3, 3, 4, pads=(1, 1, 1, 1)),                     # SAME
        conv("same_s2", "same", 3, 4, 4, stride=2, pads=(1, 1, 1, 1)),     # SAME, stride 2 (9x11 -> 5x6)
        conv("explicit", "same_s2", 3, 4, 6, pads=(2, 0, 1, 3), act="relu"),  # PAD + VALID
        conv("dilated", "explicit", 3, 6, 6, pads=(2, 2, 2, 2), dil=2, bias=False),
        conv("depthwise_m2", "dilated", 3, 6, 12, pads=(1, 1, 1, 1), groups=6, act="relu6"),
        conv("valid", "depthwise_m2", 2, 12, 5, stride=2),
    ], {"x": (9, 11, 3)}, ["valid"])
    gs["folding_and_bn"] = Graph([
        conv("c1", "x", 3, 3, 8, stride=2, pads=(0, 0, 1, 1), bias=False),  # asymmetric TF SAME on 8x10
        bn("c1_bn", "c1", 8, gamma=np.linspace(-1.0, 1.5, 8)),           # folded, a negative gamma
        N("c1_relu", "relu6", ["c1_bn"]),
        N("pad", "pad", ["c1_relu"], {"pads": (1, 1, 1, 1), "value": 0.0}),
        conv("c2", "pad", 3, 8, 8, groups=8),                             # the zero pad folds into the conv
        N("r", "relu", ["c2"]),
        bn("head_bn", "r", 8),                                            # a standalone BN: MUL + ADD
        N("head_relu", "relu", ["head_bn"]),                              # ... fused into the ADD
        N("gap", "global_avgpool", ["head_relu"], {"keepdims": False}),   # ... and a MEAN
        N("fc", "dense", ["gap"], {"act": "relu"}, {"weight": W(8, 6), "bias": W(6)}),
        N("fc2", "dense", ["fc"], {}, {"weight": W(6, 3)}),
        N("probs", "softmax", ["fc2"], {"axis": -1}),
    ], {"x": (8, 10, 3)}, ["probs", "fc2"])
    gs["activations"] = Graph([
        conv("c", "x", 1, 3, 6),
        N("sig", "sigmoid", ["c"]), N("tanh", "tanh", ["sig"]), N("hs", "hard_swish", ["c"]),
        N("sw", "swish", ["hs"]), N("lr", "leaky_relu", ["sw"], {"alpha": 0.2}),
        N("cl", "clip", ["lr"], {"min": -0.5, "max": 0.7}), N("c6", "clip", ["c"], {"min": 0.0, "max": 6.0}),
        N("c11", "clip", ["c"], {"min": -1.0, "max": 1.0}), N("chi", "clip", ["c"], {"min": None, "max": 0.5}),
        N("hsig", "hard_sigmoid", ["c"], {"alpha": 0.3, "beta": 0.4}),
        N("g1", "gelu", ["c"], {"approximate": "none"}), N("g2", "gelu", ["c"], {"approximate": "tanh"}),
        N("relu", "relu", ["c"]), N("r6", "relu6", ["c"]),
        N("sum", "add", ["tanh", "cl", "c6", "c11", "chi", "hsig", "g1", "g2", "relu", "r6"]),
    ], {"x": (5, 7, 3)}, ["sum"])
    gs["arithmetic"] = Graph([
        conv("c", "x", 1, 3, 4),
        N("pos", "sigmoid", ["c"]),
        N("sc", "scale", ["c"], {"scale": 1.0, "offset": 0.0}, {"scale": [0.5, -1, 2, 3], "offset": [0, 1, -1, 0.25]}),
        N("sc1", "scale", ["sc"], {"scale": 2.0, "offset": -0.5}),
        N("mul", "mul", ["sc1", "pos"]), N("sub", "sub", ["mul", "c"]), N("div", "div", ["sub", "pos"]),
        N("rec", "reciprocal", ["pos"]), N("sq", "sqrt", ["pos"]), N("neg", "neg", ["sq"]),
        N("p2", "pow", ["c"], {"exponent": 2.0}), N("p3", "pow", ["c"], {"exponent": 3.0}),
        N("gap", "global_avgpool", ["c"], {"keepdims": True}),
        N("bc", "add", ["div", "gap"]),                                   # (H, W, C) + (1, 1, C): broadcast
        N("all", "add", ["bc", "rec", "neg", "p2", "p3"]),
    ], {"x": (4, 6, 3)}, ["all"])
    gs["pool_pad_concat"] = Graph([
        conv("c", "x", 1, 3, 4),
        N("mp_same", "maxpool", ["c"], {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)}),
        N("mp_ceil", "maxpool", ["c"], {"kernel": (2, 2), "strides": (2, 2), "pads": (0, 0, 0, 0), "ceil_mode": True}),
        N("mp_valid", "maxpool", ["c"], {"kernel": (3, 3), "strides": (2, 2), "pads": (0, 0, 0, 0)}),
        N("mp_valid_pad", "pad", ["mp_valid"], {"pads": (1, 1, 0, 0), "value": 0.5}),
        N("ap_excl", "avgpool", ["c"], {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1),
                                         "count_include_pad": False}),
        N("ap_incl", "avgpool", ["c"], {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1),
                                         "count_include_pad": True}),
        N("cat", "concat", ["mp_same", "mp_ceil", "mp_valid_pad", "ap_excl", "ap_incl"], {"axis": 3}),
        N("ap_valid", "avgpool", ["cat"], {"kernel": (2, 2), "strides": (1, 1), "pads": (0, 0, 0, 0)}),
        N("z", "pad", ["ap_valid"], {"pads": (0, 1, 2, 0), "value": 0.0}),
    ], {"x": (9, 11, 3)}, ["z"])
    gs["tensor_ops"] = Graph([
        conv("c", "x", 1, 3, 6),
        N("t", "transpose", ["c"], {"perm": (0, 2, 1, 3)}),
        N("sl", "slice", ["t"], {"axes": [1, 3], "starts": [1, 0], "ends": [8, 4], "steps": [2, 1]}),
        N("rev", "slice", ["sl"], {"axes": [2], "starts": [-1], "ends": [-100], "steps": [-2]}),
        N("ln", "layer_norm", ["rev"], {"axis": 3, "epsilon": 1e-5}, {"gamma": W(4) + 1, "beta": W(4)}),
        N("lrn", "lrn", ["ln"], {"size": 3, "alpha": 0.3, "beta": 0.75, "bias": 1.5}),
        N("m1", "reduce_mean", ["lrn"], {"axes": [3], "keepdims": False}),
        N("s2", "reduce_sum", ["m1"], {"axes": [2], "keepdims": True}),
        N("id", "identity", ["s2"]), N("dr", "dropout", ["id"], {"rate": 0.5, "seed": None}),
        N("fl", "flatten", ["dr"]),
        N("rs", "reshape", ["fl"], {"shape": (2, -1)}),
        N("gm", "reduce_mean", ["c"], {"axes": [1, 2], "keepdims": True}),
        N("gm_fl", "reshape", ["gm"], {"shape": (6,)}),
    ], {"x": (5, 9, 3)}, ["rs", "gm_fl"])
    return gs


@pytest.mark.parametrize("case", sorted(op_graphs()))
def test_every_exported_op_runs_in_litert_and_reimports(case):
    g = op_graphs()[case]
    x = np.random.default_rng(3).standard_normal((2,) + tuple(g.inputs["x"])).astype(np.float32)
    want = forward(g, x)
    data = build_tflite(g)
    got, names = run_lite(data, x)
    assert len(got) == len(want)
    for a, e in zip(got, want):
        assert rel(a, e) <= 1e-4, (case, rel(a, e))
    # Read back: the same function, nodes named after the layers that wrote each tensor.
    g2 = convert_model(data)
    for a, e in zip(forward(g2, x), want):
        assert rel(a, e) <= 1e-5, case
    assert [n.split(";")[0] for n in names] == g2.outputs
    assert g2.meta["format"] == "tflite" and g2.meta["input_size"] == tuple(g.inputs["x"][:2])


def test_tiny_mobilenet_round_trip_names_metadata_and_any_batch(tmp_path):
    g = tiny_mobilenet(size=16)
    g.meta["classes"] = ["a", "b", "c", "d"]
    p = tmp_path / "m.tflite"
    data = export_tflite(g, p)
    x = np.random.default_rng(4).standard_normal((3, 16, 16, 3)).astype(np.float32)
    (got,), (name,) = run_lite(data, x)
    assert name == "predictions" and rel(got, forward(g, x)[0]) <= 1e-4
    m = TfliteModel(data)
    assert [t.name for t in m.tensors if "conv_pw_2" in t.name][-1] == "conv_pw_2_relu;conv_pw_2_bn;conv_pw_2"
    meta = json.loads(m.metadata["transfercl"])
    assert meta["classes"] == ["a", "b", "c", "d"] and meta["preprocessing"]["scale"] == pytest.approx(1 / 127.5)
    assert [o.op for o in m.ops] == ["CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D",
                                     "MEAN", "FULLY_CONNECTED", "SOFTMAX"]
    g2 = load_model(p)  # by suffix; and by content under another name
    os.rename(p, tmp_path / "m.bin")
    assert load_model(tmp_path / "m.bin").names() == g2.names()
    assert g2.names() == ["conv1_relu", "conv_dw_1_relu", "conv_pw_1_relu", "conv_dw_2_relu", "conv_pw_2_relu",
                          "global_average_pooling2d", "predictions_dense", "predictions"]
    assert g2.node("conv_dw_2_relu").attrs["groups"] == 16 and g2.node("conv1_relu").attrs["act"] == "relu6"
    assert g2.meta["classes"] == ["a", "b", "c", "d"] and g2.meta["preprocess"]["offset"] == -1.0
    assert rel(forward(g2, x)[0], forward(g, x)[0]) <= 1e-5
    with pytest.raises(TclError, match="already exists"):
        export_tflite(g, tmp_path / "m.bin")


def test_export_refuses_what_tflite_cannot_express():
    g = Graph([conv("grouped", "x", 3, 4, 4, pads=(1, 1, 1, 1), groups=2)], {"x": (5, 5, 4)}, ["grouped"])
    with pytest.raises(ModelError, match="grouped convolution"):
        build_tflite(g)
    g = Graph([N("e", "erf", ["x"])], {"x": (5, 5, 4)}, ["e"])
    with pytest.raises(ModelError, match="'erf'.*--format onnx"):
        build_tflite(g)
    g = Graph([N("s", "softmax", ["x"], {"axis": 1})], {"x": (5, 5, 4)}, ["s"])
    with pytest.raises(ModelError, match="last axis"):
        build_tflite(g)


def test_int8_weights_are_weight_only_and_exact(tmp_path):
    """int8 constants + per-channel scales + DEQUANTIZE: LiteRT gives the fake-quantized graph's outputs (the
    accuracy export_run measures), also through BatchNorms folded with negative gammas."""
    g = op_graphs()["folding_and_bn"]
    # Folded as tcl runs it: one conv per Conv+BN+ReLU (the pad inside the second), the standalone BN's MUL and
    # ADD (with the ReLU), the pool it carries.
    assert convert_model(build_tflite(g)).names() == ["c1_relu", "r", "head_bn/mul", "head_bn", "head_relu", "gap",
                                                      "fc", "fc2", "probs"]
    qg, qw = quantize_int8(g, skip=["fc2"])
    data = build_tflite(g, int8=qw)
    x = np.random.default_rng(5).standard_normal((4, 8, 10, 3)).astype(np.float32)
    got, _ = run_lite(data, x)
    want = forward(qg, x)
    for a, e in zip(got, want):
        assert rel(a, e) <= 1e-4
    m = TfliteModel(data)
    int8 = [t for t in m.tensors if t.type_name == "int8"]
    assert sorted(t.name for t in int8) == ["c1/weight_int8", "c2/weight_int8", "fc/weight_int8"]
    assert all(t.quant["scale"].size == t.data.shape[t.quant["axis"]] and (t.quant["scale"] > 0).all() for t in int8)
    assert [o.op for o in m.ops].count("DEQUANTIZE") == 3
    assert "weight-only" in json.loads(m.metadata["transfercl"])["quantization"]
    with pytest.warns(TclNote, match="3 int8/uint8 weight tensor"):
        g2 = convert_model(data)
    assert rel(forward(g2, x)[0], want[0]) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# import of files as the TFLite converter writes them (made here with the flatbuffers builder)


def tf_style_model(filter_mode="float32"):
    """A TF-converter-like float model, batch 1, with TF's fused names, SAME padding, fused activations on ADD,
    a depth multiplier, MEAN, a 4-D FULLY_CONNECTED input, a batch-1 RESHAPE and SOFTMAX with beta.
    filter_mode: 'float32', 'float16' (fp16 constant + DEQUANTIZE) or 'hybrid' (an int8 per-channel filter read
    by CONV_2D directly: dynamic-range quantization)."""
    rng = np.random.default_rng(7)
    f = TfliteFile()

    def act(name, shape):
        return f.tensor(name, shape)

    x = f.tensor("serving_default_input:0", [1, 8, 8, 3], signature=[-1, 8, 8, 3])
    w1 = rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32)
    if filter_mode == "float16":
        h = f.const("model/conv1/Conv2D_fp16", w1.astype(np.float16))
        wt = f.tensor("model/conv1/Conv2D", [8, 3, 3, 3])
        f.op("DEQUANTIZE", [h], [wt])
    elif filter_mode == "hybrid":
        scale = np.abs(w1).reshape(8, -1).max(1) / 127
        q = np.clip(np.rint(w1 / scale[:, None, None, None]), -127, 127).astype(np.int8)
        wt = f.const("model/conv1/Conv2D", q, quant={"scale": scale.tolist(), "zero_point": [0] * 8,
                                                   "quantized_dimension": 0})
    else:
        wt = f.const("model/conv1/Conv2D", w1)
    c1 = act("model/conv1_relu/Relu6;model/conv1_bn/FusedBatchNormV3;model/conv1/Conv2D", [1, 4, 4, 8])
    f.op("CONV_2D", [x, wt, f.const("model/conv1_bn/bias", rng.normal(0, 0.1, 8).astype(np.float32))], [c1],
         {"padding": 0, "stride_w": 2, "stride_h": 2, "fused_activation_function": 3})
    dw = act("model/dw_relu/Relu;model/dw/depthwise", [1, 4, 4, 16])
    f.op("DEPTHWISE_CONV_2D", [c1, f.const("model/dw/kernel", rng.normal(0, 0.4, (1, 3, 3, 16)).astype(np.float32)),
                               f.const("model/dw/bias", rng.normal(0, 0.1, 16).astype(np.float32))], [dw],
         {"padding": 0, "stride_w": 1, "stride_h": 1, "depth_multiplier": 2, "fused_activation_function": 1})
    mul = act("model/mul", [1, 4, 4, 16])
    f.op("MUL", [dw, f.const("model/mul/y", rng.uniform(0.5, 2, 16).astype(np.float32))], [mul], {})
    add = act("model/add/Relu6;model/add", [1, 4, 4, 16])
    f.op("ADD", [mul, f.const("model/add/y", np.array([-0.25], np.float32))], [add],
         {"fused_activation_function": 3, "pot_scale_int16": False})
    hs = act("model/hs", [1, 4, 4, 16])
    f.op("HARD_SWISH", [add], [hs])
    ap = act("model/avg", [1, 4, 4, 16])
    f.op("AVERAGE_POOL_2D", [hs], [ap], {"padding": 0, "stride_w": 1, "stride_h": 1, "filter_width": 3,
                                          "filter_height": 3})
    mp = act("model/max", [1, 2, 2, 16])
    f.op("MAX_POOL_2D", [ap], [mp], {"padding": 1, "stride_w": 2, "stride_h": 2, "filter_width": 2,
                                      "filter_height": 2})
    pd = act("model/pad", [1, 3, 3, 16])
    f.op("PAD", [mp, f.const("model/pad/paddings", np.array([[0, 0], [1, 0], [0, 1], [0, 0]], np.int32))], [pd])
    sg = act("model/sigmoid", [1, 3, 3, 16])
    f.op("LOGISTIC", [pd], [sg])
    cat = act("model/concat", [1, 3, 3, 32])
    f.op("CONCATENATION", [pd, sg], [cat], {"axis": -1})
    sub = act("model/sub", [1, 3, 3, 32])
    f.op("SUB", [f.const("model/sub/x", rng.normal(0, 1, (1, 1, 1, 32)).astype(np.float32)), cat], [sub], {})
    mean = act("model/gap", [1, 1, 1, 32])
    f.op("MEAN", [sub, f.const("model/gap/axes", np.array([1, 2], np.int32))], [mean], {"keep_dims": True})
    fc = act("model/fc/MatMul;model/fc/BiasAdd", [1, 5])
    f.op("FULLY_CONNECTED", [mean, f.const("model/fc/kernel", rng.normal(0, 0.3, (5, 32)).astype(np.float32)),
                             f.const("model/fc/bias", rng.normal(0, 0.1, 5).astype(np.float32))], [fc],
         {"fused_activation_function": 0})
    rs = act("model/reshape", [1, 5])
    f.op("RESHAPE", [fc, f.const("model/reshape/shape", np.array([1, 5], np.int32))], [rs], {"new_shape": [1, 5]})
    out = act("StatefulPartitionedCall:0", [1, 5])
    f.op("SOFTMAX", [rs], [out], {"beta": 0.5})
    return f.finish([x], [out])


def test_import_tf_converter_style_model_matches_litert():
    data = tf_style_model()
    x = np.random.default_rng(8).standard_normal((3, 8, 8, 3)).astype(np.float32)
    g = convert_model(data)
    assert g.names() == ["model/conv1_relu/Relu6", "model/dw_relu/Relu", "model/mul", "model/add", "model/add/Relu6",
                         "model/hs", "model/avg", "model/max", "model/pad", "model/sigmoid", "model/concat",
                         "model/sub", "model/gap", "model/fc/MatMul/flatten", "model/fc/MatMul", "model/reshape",
                         "StatefulPartitionedCall:0/beta", "StatefulPartitionedCall:0"]
    assert g.node("model/dw_relu/Relu").attrs["groups"] == 8 and g.node("model/add/Relu6").op == "relu6"
    assert g.node("model/gap").op == "global_avgpool" and g.inputs == {"serving_default_input:0": (8, 8, 3)}
    got = forward(g, x)[0]
    for i in range(3):  # the file is batch 1 (its RESHAPE says [1, 5]); tcl runs any batch
        (want,), _ = run_lite(data, x[i:i + 1])
        assert rel(got[i:i + 1], want) <= 1e-5
    # Cut points and inspect work on the names.
    from transfercl_cli.plan import cut_after

    assert cut_after(g, "model/gap").outputs == ["model/gap"]


def test_float16_and_dynamic_range_weights():
    x = np.random.default_rng(9).standard_normal((1, 8, 8, 3)).astype(np.float32)
    fp16 = tf_style_model("float16")
    (want,), _ = run_lite(fp16, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TclNote)  # float16 weights are no loss worth a note
        assert rel(forward(convert_model(fp16), x)[0], want) <= 1e-5
    hybrid = tf_style_model("hybrid")
    with pytest.warns(TclNote, match="1 int8/uint8 weight tensor.*dequantized"):
        g = convert_model(hybrid)
    assert "dequantized" in g.meta["notes"][0]
    # LiteRT's hybrid kernel also quantizes the input on the fly: close, not equal.
    (lite,), _ = run_lite(hybrid, x)
    assert rel(forward(g, x)[0], lite) <= 0.05


def test_refusals_name_the_layer_and_the_cause(tmp_path, monkeypatch):
    # Every op tcl cannot run, all at once, by name.
    f = TfliteFile()
    x = f.tensor("in", [1, 4, 4, 3])
    a = f.tensor("model/argmax", [1, 4, 4])
    f.op("ARG_MAX", [x, f.const("dim", np.array([3], np.int32))], [a])
    b = f.tensor("model/floor", [1, 4, 4, 3])
    f.op("FLOOR", [x], [b])
    with pytest.raises(ModelError, match=r"2 layer\(s\)(?s:.*)'model/argmax' \(ARG_MAX\)(?s:.*)'model/floor'"):
        convert_model(f.finish([x], [a, b]))
    # Full-integer models: refused as a whole, with the fix.
    f = TfliteFile()
    x = f.tensor("in", [1, 4, 4, 3])
    q = f.tensor("in_int8", [1, 4, 4, 3], dtype="int8", quant={"scale": [0.1], "zero_point": [0]})
    f.op("QUANTIZE", [x], [q])
    y = f.tensor("out", [1, 4, 4, 3])
    f.op("DEQUANTIZE", [q], [y])
    with pytest.raises(ModelError, match="quantized TFLite model.*'in_int8'.*representative_dataset"):
        convert_model(f.finish([x], [y]))
    # An options field tcl does not understand (as a newer schema could add) is an error, never dropped.
    from transfercl_cli.importers import tflite_import as ti

    real = ti.table_dict

    def with_future_field(obj):
        vals, defaults = real(obj)
        if type(obj).__name__ == "Conv2DOptions":
            vals = dict(vals, future_field=3)
        return vals, defaults

    monkeypatch.setattr(ti, "table_dict", with_future_field)
    with pytest.raises(ModelError, match=r"'model/conv1_relu/Relu6' \(CONV_2D\): has the setting future_field=3"):
        convert_model(tf_style_model())
    monkeypatch.setattr(ti, "table_dict", real)
    # A dynamic input size needs one; a damaged file is one clear error.
    f = TfliteFile()
    x = f.tensor("in", [1, 1, 1, 3], signature=[-1, -1, -1, 3])
    y = f.tensor("out", [1, 1, 1, 3])
    f.op("RELU", [x], [y])
    dyn = f.finish([x], [y])
    with pytest.raises(ModelError, match="any image size"):
        convert_model(dyn)
    assert convert_model(dyn, input_size=(6, 5)).inputs == {"in": (6, 5, 3)}
    p = tmp_path / "bad.tflite"
    p.write_bytes(dyn[:40])
    with pytest.raises(ModelError, match="not a readable TFLite model|not a TFLite model"):
        load_model(p)
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MUL", "SUB", "AVERAGE_POOL_2D",
            "MAX_POOL_2D", "MEAN", "PAD", "RESHAPE", "SOFTMAX", "CONCATENATION", "HARD_SWISH", "LOGISTIC", "RELU",
            "RELU6"} <= set(supported_ops())


# ---------------------------------------------------------------------------------------------------------------
# the real MobileNet V1


def _chelsea():
    from PIL import Image

    img = Image.open(os.path.join(SAMPLE, "images", "chelsea.png")).convert("RGB")
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.BILINEAR)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    return (np.asarray(img, np.float32) / 127.5 - 1.0)[None]


def test_real_mobilenet_through_litert(tmp_path):
    pytest.importorskip("h5py")
    g = load_model(os.path.join(SAMPLE, "models", "mobilenet_v1_1.0_224.h5"))
    x = _chelsea()
    want = forward(g, x)[0]
    data = export_tflite(g, tmp_path / "mobilenet.tflite")
    (got,), _ = run_lite(data, x)
    assert got.shape == (1, 1000) and int(np.argmax(got)) == int(np.argmax(want)) == 281  # tabby cat
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    g2 = load_model(tmp_path / "mobilenet.tflite")
    assert "conv_pw_13_relu" in g2.names() and len([n for n in g2.nodes if n.op == "conv2d"]) == 28
    assert int(np.argmax(forward(g2, x)[0])) == 281
    qg, qw = quantize_int8(g)
    d8 = build_tflite(g, int8=qw)
    (got8,), _ = run_lite(d8, x)
    assert len(d8) < 0.3 * len(data) and int(np.argmax(got8)) == 281
    assert np.abs(got8 - forward(qg, x)[0]).max() <= 1e-4 * np.abs(want).max()


# ---------------------------------------------------------------------------------------------------------------
# fine-tuning from a .tflite file, and `tcl export-weights --format tflite`


def test_finetune_from_tflite_and_export_tflite(tmp_path, rt, monkeypatch):
    from transfercl_cli.api import export_weights, finetune, load_recipe
    from transfercl_cli.cli import main
    from transfercl_cli.evaluate import Predictor

    from .test_train import make_subset

    monkeypatch.setenv("TCL_FEATURE_CACHE", str(tmp_path / "featcache"))
    src = tiny_mobilenet(size=16)
    export_tflite(src, tmp_path / "tiny.tflite")
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "tiny.tflite")])
    assert res.exit_code == 0 and "conv_pw_2_relu" in res.output, res.output
    data = make_subset(str(tmp_path / "data"), 10)
    rec = load_recipe({"model": "tiny.tflite", "cut_after": "conv_pw_2_relu", "freeze": "all",
                       "unfreeze": ["conv_pw_2_relu"], "data": {"root": data, "test": 0.3}, "input": {"size": 16},
                       "train": {"epochs": 2, "batch_size": 8, "lr": 0.01}, "device": "cpu",
                       "output": str(tmp_path / "run")}, base_dir=str(tmp_path))
    out = finetune(rec)
    run = out["run_dir"]
    res = CliRunner().invoke(main, ["export-weights", run, "--format", "tflite"])
    assert res.exit_code == 0, res.output
    path = os.path.join(run, "export", "model.tflite")
    from transfercl_cli.runfile import load_run_model

    graph = load_run_model(run, "best")
    x = np.random.default_rng(10).standard_normal((4, 16, 16, 3)).astype(np.float32)
    with open(path, "rb") as fh:
        data_t = fh.read()
    (got,), _ = run_lite(data_t, x)
    want = forward(graph, x)[0]
    assert got.shape == (4, 2) and np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    meta = json.loads(TfliteModel(data_t).metadata["transfercl"])
    assert meta["classes"] == ["cat", "dog"] and meta["preprocessing"]["size"] == [16, 16]
    # The export is a model for tcl again, with its class names.
    img = os.path.join(data, "cat", sorted(os.listdir(os.path.join(data, "cat")))[0])
    res = CliRunner().invoke(main, ["predict", path, img, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)[0]["top"][0]["label"] in ("cat", "dog"), res.output
    # --int8: the accuracy report of the other formats, and LiteRT gives the int8 graph's outputs.
    r8 = export_weights(run, "tflite", int8=True, device="cpu")
    assert os.path.exists(r8["int8"]["report"]) and r8["path"].endswith("model_int8.tflite")
    with open(r8["path"], "rb") as fh:
        d8 = fh.read()
    qg, _ = quantize_int8(graph, skip=r8["int8"]["kept_float"])
    (got8,), _ = run_lite(d8, x)
    assert np.abs(got8 - forward(qg, x)[0]).max() <= 1e-4 * np.abs(want).max()
    assert Predictor(convert_model(d8), "numpy").probs(x).shape == (4, 2)
