"""Static int8 (issue 16): activation calibration, fake_quant placement, the QDQ ONNX export (onnxruntime runs the
same network, and fuses integer kernels), its import back into tcl, and the importer's refusals of what it cannot
read as QDQ."""
import numpy as np
import pytest

from tests.helpers import tiny_mobilenet
from transfercl_cli import int8_static as st
from transfercl_cli.evaluate import Predictor
from transfercl_cli.export import export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402


def _images(n=24, size=9, seed=3):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _ort(path, x, optimize=False):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def folded():
    g = st.fold_for_int8(tiny_mobilenet(np.random.default_rng(5)))
    return g, st.calibrate(g, _images(), "cpu")  # a Calibration


def test_qparams_hold_zero_and_the_range():
    for lo, hi in ((0.0, 6.0), (-1.0, 1.0), (-0.3, 2.7), (0.5, 2.0), (-4.0, -1.0), (0.0, 0.0)):
        scale, zp = st.qparams(lo, hi)
        assert 0 <= zp <= 255 and scale > 0
        assert (0 - zp) * scale <= min(lo, 0) + scale / 2 and (255 - zp) * scale >= max(hi, 0) - scale / 2
    assert st.qparams(0.0, 6.0) == (pytest.approx(6.0 / 255), 0)  # a ReLU6 output keeps all 256 levels
    with pytest.raises(Exception, match="not finite"):
        st.qparams(0.0, np.inf)


def test_calibration_ranges_are_the_inputs_percentiles(folded):
    g, calib = folded
    ranges = calib.ranges
    layers = {n.name: n for n in g.nodes}
    assert set(ranges) == {layers[n].inputs[0] for n in st.quantizable(g)}
    assert "input" in ranges  # conv1 reads the image itself
    # The same percentiles of the same tensors, from the numpy backend, batch by batch.
    from transfercl_cli.backends import make_backend
    from transfercl_cli.executor import Executor

    x = _images()
    be = make_backend("numpy")
    ex = Executor(g, be)
    for t, (lo, hi) in ranges.items():
        vals = [np.asarray(ex.forward({"input": x[i:i + 8]}, outputs=[t])[t]) for i in range(0, len(x), 8)]
        per = [np.percentile(v.reshape(-1), [0.01, 99.99]) for v in vals]
        assert lo == pytest.approx(np.mean([p[0] for p in per]), rel=1e-4, abs=1e-5), t
        assert hi == pytest.approx(np.mean([p[1] for p in per]), rel=1e-4, abs=1e-5), t
        allv = np.concatenate([v.reshape(-1, v.shape[-1]) for v in vals])
        np.testing.assert_allclose(calib.means[t], allv.mean(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["dense", "depthwise", "grouped"])
def test_bias_correction_cancels_the_mean_shift(kind):
    """With the correction, the int8 layer's output has the float layer's mean on inputs of those channel means
    (exact for a dense layer and for a convolution over a constant image without padding)."""
    from transfercl_cli.export import dequantize, quantize_weight
    from transfercl_cli.graph import Node

    rng = np.random.default_rng(4)
    if kind == "dense":
        w = rng.normal(0, 1, (12, 5)).astype(np.float32)
        node = Node("fc", "dense", ["x"], ["y"], {}, {"weight": w})
    else:
        cin, groups, cout = (6, 6, 12) if kind == "depthwise" else (6, 2, 4)
        w = rng.normal(0, 3, (3, 3, cin // groups, cout)).astype(np.float32)
        node = Node("c", "conv2d", ["x"], ["y"], {"groups": groups}, {"weight": w})
    wq = dequantize(quantize_weight(w))
    m = rng.uniform(0, 6, w.shape[-2] if kind == "dense" else cin)
    db = st.bias_correction(node, w, wq, m)
    if kind == "dense":
        x = rng.normal(0, 1, (50, 12))
        x = x - x.mean(0) + m
        np.testing.assert_allclose((x @ wq).mean(0) + db, (x @ w).mean(0), rtol=1e-9, atol=1e-9)
        return
    groups = node.attrs["groups"]
    cg, og = cin // groups, cout // groups

    def conv_on_constant(wt):  # a constant image: each output is sum over taps and its group's channels of w * m
        return np.array([(wt[:, :, :, o].sum((0, 1)) * m[(o // og) * cg:(o // og + 1) * cg]).sum()
                         for o in range(cout)])
    np.testing.assert_allclose(conv_on_constant(wq.astype(np.float64)) + db, conv_on_constant(w.astype(np.float64)),
                               rtol=1e-9, atol=1e-9)
    assert np.abs(db).max() > 0


def test_static_int8_places_one_fake_quant_per_quantized_input(folded):
    g, calib = folded
    layers = st.quantizable(g)
    qg, qw = st.static_int8(g, calib, skip=[layers[1]])
    fq = {n.outputs[0]: n for n in qg.nodes if n.op == "fake_quant"}
    assert len(fq) == len(layers) - 1 and set(qw) == {f"{n}/weight" for n in layers if n != layers[1]}
    for n in qg.nodes:
        if n.name in layers:
            assert (n.inputs[0] in fq) == (n.name != layers[1]), n.name
    # Bias correction changed the quantized layers' biases; the layer kept float is the float layer.
    assert not np.array_equal(qg.node(layers[0]).params["bias"], g.node(layers[0]).params["bias"])
    for k, v in g.node(layers[1]).params.items():
        assert np.array_equal(qg.node(layers[1]).params[k], v)
    # The float graph is untouched, and tcl runs the int8 one on both backends alike.
    assert not any(n.op == "fake_quant" for n in g.nodes)
    x = _images(4, seed=9)
    a, b = Predictor(qg, "cpu").probs(x), Predictor(qg, "numpy").probs(x)
    assert np.max(np.abs(a - b)) < 1e-4


def test_qdq_onnx_export_runs_in_onnxruntime_and_comes_back(folded, tmp_path):
    """onnxruntime computing the QuantizeLinear/DequantizeLinear nodes as written gives tcl's int8 network; with its
    optimisations it fuses them into integer kernels and stays close; tcl imports the file as the same network."""
    from transfercl_cli.importers import load_model

    g, calib = folded
    qg, qw = st.static_int8(g, calib)
    p = tmp_path / "q.onnx"
    export_onnx(qg, str(p), int8=qw)
    m = onnx.load(str(p))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("QuantizeLinear") == len(st.quantizable(g))
    assert "static int8" in {q.key: q.value for q in m.metadata_props}["quantization"]
    x = _images(6, seed=11)
    want = Predictor(qg, "cpu").probs(x)  # the graph ends in softmax: probabilities
    got = _ort(p, x)
    assert np.max(np.abs(got - want)) <= 1e-4
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert "QLinearConv" in fused, fused
    fast = _ort(p, x, optimize=True)
    assert np.max(np.abs(fast - want)) <= 0.05
    back = load_model(str(p))
    assert sum(n.op == "fake_quant" for n in back.nodes) == len(st.quantizable(g))
    assert np.max(np.abs(Predictor(back, "cpu").probs(x) - Predictor(qg, "cpu").probs(x))) < 1e-4


def _residual(rng):
    """conv a (1x1, relu) -> conv b (3x3) -> add(b, a) -> relu -> conv c (1x1, relu) -> global pool -> dense."""
    from transfercl_cli.graph import Graph, Node

    def conv(name, x, y, k, cin, cout, act=None):
        p = k // 2
        return Node(name, "conv2d", [x], [y], {"kernel": (k, k), "strides": (1, 1), "dilations": (1, 1),
                                               "pads": (p, p, p, p), "groups": 1, "act": act},
                    {"weight": rng.normal(0, 0.5, (k, k, cin, cout)).astype(np.float32),
                     "bias": rng.normal(0, 0.1, cout).astype(np.float32)})
    nodes = [conv("a", "input", "ya", 1, 3, 8, "relu"), conv("b", "ya", "yb", 3, 8, 8),
             Node("res", "add", ["yb", "ya"], ["s"]), Node("res_relu", "relu", ["s"], ["r"]),
             conv("c", "r", "yc", 1, 8, 16, "relu"), Node("pool", "global_avgpool", ["yc"], ["p"], {"keepdims": False}),
             Node("fc", "dense", ["p"], ["logits"], {}, {"weight": rng.normal(0, 0.5, (16, 3)).astype(np.float32)})]
    return Graph(nodes, {"input": (9, 9, 3)}, ["logits"], "residual")


def test_residual_add_of_int8_tensors_is_quantized_and_fused(tmp_path):
    g = st.fold_for_int8(_residual(np.random.default_rng(6)))
    x = _images(16, seed=4)
    calib = st.calibrate(g, x, "cpu")
    assert {"ya", "yb"} <= set(calib.ranges)
    qg, qw = st.static_int8(g, calib)
    fq = {n.inputs[0]: n.outputs[0] for n in qg.nodes if n.op == "fake_quant"}
    assert qg.node("res").inputs == [fq["yb"], fq["ya"]] and qg.node("c").inputs[0] == fq["r"]
    # With conv b float, the Add's inputs stay as they are (a float layer's output is not rounded for it).
    qg2, _ = st.static_int8(g, calib, skip=["b"])
    assert qg2.node("res").inputs == ["yb", "ya"]
    p = tmp_path / "res.onnx"
    export_onnx(qg, str(p), int8=qw)
    from transfercl_cli.backends import make_backend
    from transfercl_cli.executor import run_forward

    want = run_forward(qg, make_backend("cpu"), {"input": x})["logits"]
    got = _ort(p, x)
    assert np.max(np.abs(got - want)) <= 1e-4 * max(1.0, np.max(np.abs(want)))
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert fused.count("QLinearConv") >= 2 and "QLinearAdd" in fused, fused


def test_standing_batchnorm_with_fused_relu_and_pool_exports_unfused(tmp_path):
    """fold_frozen's BatchNorm that carries its ReLU and the global pool after it is written as the three ops (the
    ONNX writer used to write the BatchNorm alone)."""
    from transfercl_cli.graph import Graph, Node
    from transfercl_cli.plan import fold_frozen

    rng = np.random.default_rng(2)
    c = 6
    bn = {"gamma": rng.uniform(0.5, 1.5, c), "beta": rng.normal(0, 1, c), "mean": rng.normal(0, 1, c),
          "var": rng.uniform(0.5, 1.5, c)}
    g = Graph([Node("bn", "batchnorm", ["input"], ["b"], {"eps": 1e-3, "momentum": 0.99},
                    {k: v.astype(np.float32) for k, v in bn.items()}),
               Node("relu", "relu", ["b"], ["r"]),
               Node("pool", "global_avgpool", ["r"], ["p"], {"keepdims": False}),
               Node("fc", "dense", ["p"], ["logits"], {}, {"weight": rng.normal(0, 1, (c, 3)).astype(np.float32)})],
              {"input": (5, 5, c)}, ["logits"], "bn_pool")
    f = fold_frozen(g, set())
    assert f.node("bn").attrs.get("act") == "relu" and f.node("bn").attrs.get("pool") == "global_avg"
    p = tmp_path / "bn.onnx"
    export_onnx(f, str(p), keep_source=False)
    x = rng.normal(0, 1, (2, 5, 5, c)).astype(np.float32)
    ref = np.maximum((x - bn["mean"]) / np.sqrt(bn["var"] + 1e-3) * bn["gamma"] + bn["beta"], 0).mean((1, 2))
    np.testing.assert_allclose(_ort(p, x), ref @ g.node("fc").params["weight"], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# the importer: what it reads as QDQ and what it refuses


def _model(nodes, inits, out="y"):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "m", [x], [y], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _qdq_consts(scale=0.02, zp=128, zp_type=np.uint8, name=""):
    return [onnx.numpy_helper.from_array(np.asarray(scale, np.float32), f"s{name}"),
            onnx.numpy_helper.from_array(np.asarray(zp, zp_type), f"z{name}")]


def _import(model, tmp_path):
    from transfercl_cli.importers import load_model

    p = tmp_path / "m.onnx"
    onnx.save(model, str(p))
    return load_model(str(p))


def test_import_reads_a_qdq_pair_as_fake_quant(tmp_path):
    m = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
                helper.make_node("Relu", ["d"], ["y"])], _qdq_consts())
    g = _import(m, tmp_path)
    fq = [n for n in g.nodes if n.op == "fake_quant"]
    assert len(fq) == 1 and fq[0].attrs == {"scale": pytest.approx(0.02), "zero_point": 128, "dtype": "uint8"}
    x = np.random.default_rng(0).normal(0, 2, (1, 3, 4, 4)).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    from transfercl_cli.executor import run_forward
    from transfercl_cli.backends import make_backend

    be = make_backend("cpu")
    got = run_forward(g, be, {next(iter(g.inputs)): x.transpose(0, 2, 3, 1)})[g.outputs[0]]
    np.testing.assert_allclose(got.reshape(1, 4, 4, 3).transpose(0, 3, 1, 2), want, atol=1e-6)


@pytest.mark.parametrize("case,match", [
    ("integer_consumer", "not by a DequantizeLinear"),
    ("other_scale", "differ from those of the QuantizeLinear"),
    ("per_axis", "per-axis quantization"),
    ("int16", "only uint8 and int8"),
    ("qlinearconv", "QOperator"),
])
def test_import_refuses_what_is_not_a_qdq_pair(tmp_path, case, match):
    from transfercl_cli.errors import TclError

    c = _qdq_consts()
    if case == "integer_consumer":  # a Cast of the integer tensor would be the raw levels, not the values
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT)]
    elif case == "other_scale":
        c += _qdq_consts(0.5, 128, name="2")
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s2", "z2"], ["y"])]
    elif case == "per_axis":
        c = _qdq_consts(np.array([0.1, 0.2, 0.3]), np.array([0, 0, 0]))
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1)]
    elif case == "int16":
        c = _qdq_consts(0.1, 0, np.int16)
        m = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                    helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], c)
        m.opset_import[0].version = 21
        nodes = None
    else:
        w = onnx.numpy_helper.from_array(np.ones((2, 3, 1, 1), np.int8), "w")
        c += [w] + _qdq_consts(0.1, 0, np.int8, name="w") + _qdq_consts(0.1, 0, name="y")
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("QLinearConv", ["q", "s", "z", "w", "sw", "zw", "sy", "zy"], ["qy"]),
                 helper.make_node("DequantizeLinear", ["qy", "sy", "zy"], ["y"])]
    if nodes is not None:
        m = _model(nodes, c)
    with pytest.raises(TclError, match=match):
        _import(m, tmp_path)
