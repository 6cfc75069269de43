import numpy as np
import pytest

from transfercl_cli.backends import NumpyBackend
from transfercl_cli.errors import RecipeError
from transfercl_cli.executor import run_forward
from transfercl_cli.plan import add_head, build_plan, cut_after, fold_frozen, resolve_freeze, split_prefix
from transfercl_cli.recipe import recipe_from_dict

from .conftest import shared_path
from .helpers import assert_close, tiny_mobilenet


def test_cut_after_drops_the_classifier():
    g = cut_after(tiny_mobilenet(), "conv_pw_2_relu")
    assert g.names()[-1] == "conv_pw_2_relu" and "predictions" not in g.names()
    with pytest.raises(RecipeError, match="Did you mean 'conv_pw_2_relu'"):
        cut_after(tiny_mobilenet(), "conv_pw_2_reluu")


def test_head_names_and_shapes():
    g = cut_after(tiny_mobilenet(), "conv_pw_2_relu")
    new = add_head(g, [{"global_avg_pool": None}, {"dropout": 0.2}, {"dense": "auto"}], 3)
    assert new == ["head_global_avg_pool", "head_dropout", "head_dense"]
    assert g.node("head_dense").params["weight"].shape == (24, 3)
    g2 = cut_after(tiny_mobilenet(), "conv_pw_2_relu")
    new2 = add_head(g2, [{"dense": 5}, {"relu": None}, {"dense": "auto"}], 2)
    assert new2[0] == "head_dense_flatten" and "head_dense_1" in new2  # dense on 3x3x24 flattens first


def names_trainable(freeze, unfreeze=()):
    g = cut_after(tiny_mobilenet(), "conv_pw_2_relu")
    new = add_head(g, [{"global_avg_pool": None}, {"dense": "auto"}], 2)
    return resolve_freeze(g, freeze, list(unfreeze), new)


def test_freeze_resolution():
    assert names_trainable("all") == {"head_dense"}
    assert names_trainable("all", ["conv_pw_2*"]) == {"conv_pw_2", "conv_pw_2_bn", "head_dense"}
    assert "conv1" in names_trainable("none")
    assert names_trainable({"until": "conv_dw_2_relu"}) == {"conv_pw_2", "conv_pw_2_bn", "head_dense"}
    assert names_trainable(["conv1*", "conv_dw_*", "conv_pw_1*"]) == {"conv_pw_2", "conv_pw_2_bn", "head_dense"}


@pytest.mark.parametrize("freeze,unfreeze,needle", [
    (["conv_pw_9*"], [], "freeze"), ("all", ["conv_pw_3"], "unfreeze"), ({"until": "conv_pw_22"}, [], "freeze.until"),
])
def test_freeze_errors_name_key_and_closest(freeze, unfreeze, needle):
    with pytest.raises(RecipeError) as e:
        names_trainable(freeze, unfreeze)
    assert needle in str(e.value) and "Did you mean" in str(e.value)


def test_folding_keeps_outputs():
    g = tiny_mobilenet()
    x = np.random.default_rng(3).uniform(-1, 1, (2, 9, 9, 3)).astype(np.float32)
    ref = run_forward(g, NumpyBackend(), {"input": x})["probs"]
    folded = fold_frozen(g, set())
    assert len(folded.nodes) < len(g.nodes)
    assert folded.node("conv1").attrs["act"] == "relu6" and folded.node("conv1").attrs["folded"] == ["conv1_bn", "conv1_relu"]
    # Folded weights are stored as float32, so agreement is at float32 precision.
    assert_close(run_forward(folded, NumpyBackend(), {"input": x})["probs"], ref, 1e-6, "folded graph")
    # Trainable nodes are shared, not copied, and not folded.
    f2 = fold_frozen(g, {"conv_pw_2", "conv_pw_2_bn"})
    assert f2.node("conv_pw_2") is g.node("conv_pw_2") and "conv_pw_2_bn" in f2.names()


def test_prefix_split_reproduces_the_full_graph():
    g = tiny_mobilenet()
    trainable = {"conv_pw_2", "conv_pw_2_bn", "predictions_dense"}
    eg = fold_frozen(g, trainable)
    prefix, suffix, t, reason = split_prefix(eg, trainable)
    assert reason is None and t == "conv_dw_2_relu"
    x = np.random.default_rng(4).uniform(-1, 1, (2, 9, 9, 3)).astype(np.float32)
    full = run_forward(eg, NumpyBackend(), {"input": x})["probs"]
    feat = run_forward(prefix, NumpyBackend(), {"input": x})[t]
    assert_close(run_forward(suffix, NumpyBackend(), {t: feat})["probs"], full, 1e-12, "prefix+suffix")
    _, _, _, reason = split_prefix(eg, {"conv1"})
    assert "first layer" in reason


def test_plan_on_real_mobilenet_names(tmp_path):
    from transfercl_cli.importers import load_model

    g = load_model(shared_path("models", "mobilenet_v1_1.0_224.h5"))
    r = recipe_from_dict({"model": "m.h5", "data": {"root": "d"}, "cut_after": "conv_pw_13_relu",
                          "freeze": "all", "unfreeze": ["conv_pw_13*"]})
    plan = build_plan(g, r, ["cat", "dog"])
    assert plan.trainable == {"conv_pw_13", "conv_pw_13_bn", "head_dense"}
    assert set(plan.cut) == {"global_average_pooling2d", "dropout", "conv_preds", "reshape_2", "predictions"}
    assert plan.use_cache and plan.cache_tensor == plan.exec_graph.node("conv_dw_13").outputs[0]
    assert plan.suffix.inputs[plan.cache_tensor] == (7, 7, 1024)
    r2 = recipe_from_dict({"model": "m.h5", "data": {"root": "d"}, "cut_after": "conv_pw_13_relu",
                           "freeze": {"until": "conv_pw_12_relu"}, "augment": {"hflip": True}})
    p2 = build_plan(g, r2, ["a", "b", "c"])
    assert {"conv_dw_13", "conv_dw_13_bn", "conv_pw_13", "conv_pw_13_bn", "head_dense"} == p2.trainable
    assert not p2.use_cache and "augmentation" in p2.cache_reason


def test_zero_pad_folds_into_the_next_frozen_conv():
    from transfercl_cli.graph import Graph, Node

    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.3, (3, 3, 1, 4)).astype(np.float32)
    nodes = [Node("conv_pad_2", "pad", ["x"], ["p"], {"pads": (0, 0, 1, 1), "value": 0.0}),
             Node("conv_dw_2", "conv2d", ["p"], ["y"], {"kernel": (3, 3), "strides": (2, 2), "dilations": (1, 1),
                                                        "pads": (0, 0, 0, 0), "groups": 4}, {"weight": w}),
             Node("conv_dw_2_relu", "relu6", ["y"], ["z"])]
    g = Graph(nodes, {"x": (7, 8, 4)}, ["z"])
    x = rng.uniform(-2, 2, (2, 7, 8, 4)).astype(np.float32)
    ref = run_forward(g, NumpyBackend(), {"x": x})["z"]
    f = fold_frozen(g, set())
    assert f.names() == ["conv_dw_2"] and f.node("conv_dw_2").attrs["pads"] == (0, 0, 1, 1)
    assert f.node("conv_dw_2").attrs["folded"] == ["conv_pad_2", "conv_dw_2_relu"]
    assert_close(run_forward(f, NumpyBackend(), {"x": x})["z"], ref, 1e-12, "pad folded")
    # A trainable conv absorbs its Pad too (no padded copy kept for the backward), sharing its parameter dict;
    # forward and gradients are unchanged.
    from transfercl_cli.executor import Executor

    ft = fold_frozen(g, {"conv_dw_2"})
    assert "conv_pad_2" not in ft.names() and ft.node("conv_dw_2").params is g.node("conv_dw_2").params
    gy = rng.normal(0, 1, ref.shape)
    res = []
    for gr in (g, ft):
        ex = Executor(gr, NumpyBackend(), {"conv_dw_2"})
        y = ex.forward({"x": x}, training=True)["z"]
        res.append((y, ex.backward({"z": gy})[("conv_dw_2", "weight")]))
    assert_close(res[1][0], res[0][0], 1e-12, "trainable pad folded: forward")
    assert_close(res[1][1], res[0][1], 1e-12, "trainable pad folded: weight gradient")


def test_trainable_batchnorm_carries_the_next_activation():
    g = tiny_mobilenet()
    f = fold_frozen(g, {"conv_pw_2", "conv_pw_2_bn"})
    bn = f.node("conv_pw_2_bn")
    # ... and the head's global average pool after it (tiny_mobilenet: conv_pw_2 is the last block)
    assert bn.attrs["act"] == "relu6" and bn.attrs["folded"] == ["conv_pw_2_relu", "global_average_pooling2d"]
    assert bn.attrs["pool"] == "global_avg" and bn.outputs == g.node("global_average_pooling2d").outputs
    assert "conv_pw_2_relu" not in f.names() and bn.params is g.node("conv_pw_2_bn").params
    x = np.random.default_rng(6).uniform(-1, 1, (2, 9, 9, 3)).astype(np.float32)
    assert_close(run_forward(f, NumpyBackend(), {"input": x})["probs"],
                 run_forward(g, NumpyBackend(), {"input": x})["probs"], 1e-6, "BN with its activation")


def test_trainable_batchnorm_pool_fusion_rules():
    """A BN followed directly by the pool takes it too; an activation read twice stops the fusion after it; a
    BatchNorm whose output is a graph output keeps it."""
    from transfercl_cli.graph import Graph, Node

    rng = np.random.default_rng(2)
    C = 5
    bnp = lambda: {"gamma": rng.uniform(1, 2, C), "beta": rng.normal(0, 1, C), "mean": rng.normal(0, 1, C),  # noqa: E731
                   "var": rng.uniform(1, 2, C)}
    attrs = {"eps": 1e-3, "momentum": 0.99}
    g = Graph([Node("bn", "batchnorm", ["x"], ["b"], dict(attrs), bnp()),
               Node("gap", "global_avgpool", ["b"], ["y"], {"keepdims": True})], {"x": (3, 4, C)}, ["y"])
    f = fold_frozen(g, {"bn"})
    assert [n.name for n in f.nodes] == ["bn"] and f.node("bn").attrs["keepdims"] and "act" not in f.node("bn").attrs
    x = rng.normal(0, 2, (2, 3, 4, C))
    assert_close(run_forward(f, NumpyBackend(), {"x": x})["y"], run_forward(g, NumpyBackend(), {"x": x})["y"],
                 1e-12, "BN + pool")
    g2 = Graph([Node("bn", "batchnorm", ["x"], ["b"], dict(attrs), bnp()), Node("r", "relu", ["b"], ["r"]),
                Node("gap", "global_avgpool", ["r"], ["p"], {}), Node("gap2", "global_avgpool", ["r"], ["q"], {})],
               {"x": (3, 4, C)}, ["p", "q"])
    f2 = fold_frozen(g2, {"bn"})
    assert f2.node("bn").attrs["folded"] == ["r"] and "pool" not in f2.node("bn").attrs
    g3 = Graph([Node("bn", "batchnorm", ["x"], ["b"], dict(attrs), bnp()),
                Node("gap", "global_avgpool", ["b"], ["y"], {})], {"x": (3, 4, C)}, ["b", "y"])
    assert "pool" not in fold_frozen(g3, {"bn"}).node("bn").attrs


@pytest.mark.parametrize("freeze,precision", [({"freeze": "none"}, "fp32"), ({"freeze": "none"}, "fp16"),
                                              ({"freeze": "all", "unfreeze": ["conv_pw_2*"]}, "fp32")])
def test_memory_estimate_follows_the_buffer_pool(rt, freeze, precision):
    # The estimate replays what the executor keeps through the pool's reuse rule: it must cover what a real
    # training step makes the pool hold, without being far above it.
    from transfercl_cli.backends import CLBackend
    from transfercl_cli.executor import Executor
    from transfercl_cli.plan import estimate_memory
    from transfercl_cli.runtime import Runtime

    g = tiny_mobilenet(size=33)
    r = recipe_from_dict(dict({"model": "m.h5", "data": {"root": "d"}, "train": {"cache": "off"},
                               "cut_after": "conv_pw_2_relu", "precision": precision}, **freeze))
    plan = build_plan(g, r, ["a", "b", "c"])
    batch = 6
    est = estimate_memory(plan, batch)
    be = CLBackend(Runtime(rt.info))  # a pool of its own
    ex = Executor(plan.exec_graph, be, plan.trainable, half_saved=precision == "fp16")
    x = np.random.default_rng(1).uniform(-1, 1, (batch, 33, 33, 3)).astype(np.float32)
    y = plan.exec_graph.outputs[0]
    # plan.held_tensors (which the estimate uses) names what the executor really keeps for the backward.
    from transfercl_cli.executor import grad_region
    from transfercl_cli.ops.shapes import infer_shapes
    from transfercl_cli.plan import held_tensors

    shapes = infer_shapes(plan.exec_graph)
    held = {t for n in grad_region(plan.exec_graph, plan.trainable)[0] for t in held_tensors(n)} - {y}
    ex.forward({"input": x}, training=True)
    assert sorted(tuple(v.shape[1:]) for v in ex._live.values()) == sorted(shapes[t] for t in held)
    ex.end_step()
    for _ in range(2):
        out = ex.forward({"input": x}, training=True)[y]
        for v in ex.backward({y: be.asarray(np.ones(tuple(out.shape), np.float32))}).values():
            be.release(v)
    be.finish()
    params = sum(v.capacity for _, v in be._params.values())
    packed = sum(t.capacity for _, d in be._derived.values() for t in d.values())  # frozen weights' GEMM panels
    assert packed <= est["packed_weights"]
    measured = be.rt.allocated_bytes - params - packed
    assert measured <= est["activations"] <= 2 * measured, (measured, est)


def test_engine_activations_fuse_only_where_no_gradient_flows():
    """fold_frozen(engine=True) fuses swish / sigmoid / hard-swish / PyTorch's hard-sigmoid into a frozen conv or
    dense outside the gradient region; exports (engine=False) and layers a gradient passes keep them apart; an
    ONNX-default hard-sigmoid (alpha 0.2) is never fused."""
    from transfercl_cli.graph import Graph, Node

    rng = np.random.default_rng(6)

    def conv(name, x, cin, cout):
        return Node(name, "conv2d", [x], [name], {"kernel": (1, 1), "strides": (1, 1), "dilations": (1, 1),
                                                   "pads": (0, 0, 0, 0), "groups": 1},
                    {"weight": rng.normal(0, 0.5, (1, 1, cin, cout)).astype(np.float32)})

    nodes = [conv("c1", "x", 3, 4), Node("a1", "swish", ["c1"], ["a1"]),
             conv("c2", "a1", 4, 4), Node("a2", "hard_sigmoid", ["c2"], ["a2"], {"alpha": 1 / 6, "beta": 0.5}),
             conv("c3", "a2", 4, 4), Node("a3", "hard_sigmoid", ["c3"], ["a3"], {"alpha": 0.2, "beta": 0.5}),
             conv("c4", "a3", 4, 4), Node("a4", "hard_swish", ["c4"], ["a4"]),
             conv("c5", "a4", 4, 2), Node("a5", "sigmoid", ["c5"], ["y"])]
    g = Graph(nodes, {"x": (3, 3, 3)}, ["y"])
    x = rng.uniform(-3, 3, (2, 3, 3, 3)).astype(np.float32)
    ref = run_forward(g, NumpyBackend(), {"x": x})["y"]
    acts = lambda f: {n.name: n.attrs.get("act") for n in f.nodes if n.op == "conv2d"}  # noqa: E731
    assert set(acts(fold_frozen(g, set())).values()) == {None}
    eng = fold_frozen(g, set(), engine=True)
    assert acts(eng) == {"c1": "swish", "c2": "hard_sigmoid", "c3": None, "c4": "hard_swish", "c5": "sigmoid"}
    assert_close(run_forward(eng, NumpyBackend(), {"x": x})["y"], ref, 1e-6, "engine-fused graph")
    # c3 trains: the gradient flows through c3..c5 (their activations stay), c1 and c2 are before it.
    part = fold_frozen(g, {"c3"}, engine=True)
    assert acts(part) == {"c1": "swish", "c2": "hard_sigmoid", "c3": None, "c4": None, "c5": None}


def test_residual_add_fuses_into_the_frozen_conv_before_it(clbe):
    """fold_frozen(engine=True) moves a residual Add (and the ReLU after it) into the epilogue of a frozen conv whose
    only reader it is: the node takes the Add's place, so a residual computed after the conv (a downsample branch)
    exists when it runs; an Add of two conv outputs absorbs one of them; a broadcast Add, a layer the gradient
    passes and exports stay apart. Outputs match the unfused graph on the numpy and OpenCL backends."""
    from transfercl_cli.executor import Executor
    from transfercl_cli.graph import Graph, Node
    from transfercl_cli.plan import fused_label

    rng = np.random.default_rng(11)

    def conv(name, x, cin=4, cout=4):
        return Node(name, "conv2d", [x], [name], {"kernel": (3, 3), "strides": (1, 1), "dilations": (1, 1),
                                                   "pads": (1, 1, 1, 1), "groups": 1},
                    {"weight": rng.normal(0, 0.4, (3, 3, cin, cout)).astype(np.float32),
                     "bias": rng.normal(0, 0.5, cout).astype(np.float32)})

    nodes = [conv("c0", "x", 3, 4), Node("r0", "relu", ["c0"], ["r0"]),
             conv("c1", "r0"), Node("add1", "add", ["c1", "r0"], ["add1"]), Node("r1", "relu", ["add1"], ["r1"]),
             conv("c2", "r1"), conv("d2", "r1"), Node("add2", "add", ["d2", "c2"], ["add2"]),
             Node("gap", "global_avgpool", ["add2"], ["gap"], {"keepdims": True}),
             conv("c3", "add2"), Node("add3", "add", ["c3", "gap"], ["add3"]),
             conv("c4", "add3"), Node("add4", "add", ["c4", "add3"], ["y"])]
    g = Graph(nodes, {"x": (5, 6, 3)}, ["y"])
    x = rng.uniform(-2, 2, (2, 5, 6, 3)).astype(np.float32)
    ref = run_forward(g, NumpyBackend(), {"x": x})["y"]
    labels = lambda f: {n.name: fused_label(n) for n in f.nodes if n.op == "conv2d"}  # noqa: E731
    assert "residual" not in str([n.attrs for n in fold_frozen(g, set()).nodes])
    eng = fold_frozen(g, set(), engine=True)
    assert labels(eng) == {"c0": "conv2d+relu", "c1": "conv2d+add+relu", "c2": "conv2d+add", "d2": "conv2d",
                           "c3": "conv2d", "c4": "conv2d+add"}
    order = [n.name for n in eng.nodes]
    assert order.index("c2") > order.index("d2") and "add2" not in order and "add3" in order
    assert eng.node("c2").inputs[-1] == "d2" and eng.node("c2").outputs == ["add2"]
    assert_close(run_forward(eng, NumpyBackend(), {"x": x})["y"], ref, 1e-6, "residual-fused graph (numpy)")
    y_cl = clbe.to_host(Executor(eng, clbe).forward({"x": x})["y"])
    assert_close(y_cl, ref, 1e-4, "residual-fused graph (OpenCL)")
    # c3 trains: its gradient passes add3 and c4 (kept apart); c1 and c2 lie before it.
    part = fold_frozen(g, {"c3"}, engine=True)
    assert labels(part) == {"c0": "conv2d+relu", "c1": "conv2d+add+relu", "c2": "conv2d+add", "d2": "conv2d",
                            "c3": "conv2d", "c4": "conv2d"}
    # c0 trains: every Add is on the gradient's path.
    assert not any(n.attrs.get("residual") for n in fold_frozen(g, {"c0"}, engine=True).nodes)


def test_concat_fuses_into_the_frozen_batchnorm_after_it(clbe):
    """fold_frozen(engine=True) gives a frozen BatchNorm (and its ReLU) the inputs of the channel Concat that only it
    reads (DenseNet's dense layers), so each input is normalised into its slice of the output; a Concat read twice,
    along another axis, before a trainable BatchNorm or before a BatchNorm whose global pool it would otherwise
    carry (that pool stays apart), and exports stay apart. Outputs match the unfused graph on both backends."""
    from transfercl_cli.executor import Executor
    from transfercl_cli.graph import Graph, Node
    from transfercl_cli.plan import fused_label

    rng = np.random.default_rng(12)

    def bn(name, x, c):
        return Node(name, "batchnorm", [x], [name], {"eps": 1e-3},
                    {"gamma": rng.uniform(0.5, 2, c).astype(np.float32), "beta": rng.normal(0, 1, c).astype(np.float32),
                     "mean": rng.normal(0, 1, c).astype(np.float32), "var": rng.uniform(0.5, 2, c).astype(np.float32)})

    conv = Node("c0", "conv2d", ["x"], ["c0"], {"kernel": (1, 1), "strides": (1, 1), "dilations": (1, 1),
                                                "pads": (0, 0, 0, 0), "groups": 1},
                {"weight": rng.normal(0, 0.5, (1, 1, 3, 13)).astype(np.float32)})
    nodes = [conv, Node("cat1", "concat", ["x", "c0"], ["cat1"], {"axis": -1}), bn("bn1", "cat1", 16),
             Node("r1", "relu", ["bn1"], ["r1"]),
             Node("cat2", "concat", ["x", "r1", "c0"], ["cat2"], {"axis": -1}), bn("bn2", "cat2", 32),  # no act
             Node("cat3", "concat", ["bn2", "bn2"], ["cat3"], {"axis": 1}),  # along the rows: stays
             Node("cat4", "concat", ["c0", "x"], ["cat4"], {"axis": -1}), bn("bn4", "cat4", 16),
             Node("r4", "relu", ["bn4"], ["r4"]), Node("gap", "global_avgpool", ["r4"], ["y"], {"keepdims": True})]
    g = Graph(nodes, {"x": (5, 6, 3)}, ["y", "cat3"])
    x = rng.uniform(-2, 2, (2, 5, 6, 3)).astype(np.float32)
    ref = run_forward(g, NumpyBackend(), {"x": x})
    assert "concat" not in str([n.attrs for n in fold_frozen(g, set()).nodes])  # exports keep the Concat
    eng = fold_frozen(g, set(), engine=True)
    labels = {n.name: fused_label(n) for n in eng.nodes}
    assert labels["bn1"] == "concat+batchnorm+relu" and labels["bn2"] == "concat+batchnorm"
    assert labels["bn4"] == "concat+batchnorm+relu" and labels["gap"] == "global_avgpool"  # (the pool stays apart)
    assert "cat1" not in labels and "cat2" not in labels and "cat4" not in labels and labels["cat3"] == "concat"
    assert eng.node("bn2").inputs == ["x", "r1", "c0"] and eng.node("bn1").outputs == ["r1"]
    def on_opencl():
        return {k: clbe.to_host(v) for k, v in Executor(eng, clbe).forward({"x": x}).items()}

    for name, run in [("numpy", lambda: run_forward(eng, NumpyBackend(), {"x": x})), ("OpenCL", on_opencl)]:
        got = run()
        for k in ("y", "cat3"):
            assert_close(got[k], ref[k], 1e-5, f"concat-fused graph ({name}) {k}")
    # bn2 trains: its Concat stays (and so does the gradient's path through it); cat1's gradient reaches c0 when
    # c0 trains, so nothing is fused before it.
    assert "cat2" in fold_frozen(g, {"bn2"}, engine=True).names()
    assert not any(n.attrs.get("concat") for n in fold_frozen(g, {"c0"}, engine=True).nodes)


def test_relu_fuses_into_the_trainable_conv_before_it(clbe):
    """fold_frozen(engine=True) gives a trainable convolution or Dense the ReLU/ReLU6 (or Clip 0..6) that only it
    reads; its backward masks the gradient by its output. Outputs and every parameter gradient match the unfused
    graph on both backends; a ReLU whose input has another reader stays apart, and exports keep the ReLUs."""
    from transfercl_cli.executor import Executor
    from transfercl_cli.graph import Graph, Node
    from transfercl_cli.plan import fused_label

    rng = np.random.default_rng(13)

    def conv(name, x, cin, cout, groups=1):
        return Node(name, "conv2d", [x], [name], {"kernel": (3, 3), "strides": (1, 1), "dilations": (1, 1),
                                                   "pads": (1, 1, 1, 1), "groups": groups},
                    {"weight": rng.normal(0, 0.4, (3, 3, cin // groups, cout)).astype(np.float32),
                     "bias": rng.normal(0, 0.3, cout).astype(np.float32)})

    nodes = [conv("c0", "x", 3, 8), Node("r0", "relu", ["c0"], ["r0"]),
             conv("c1", "r0", 8, 8, groups=8), Node("r1", "clip", ["c1"], ["r1"], {"min": 0, "max": 6}),
             conv("c2", "r1", 8, 4), Node("r2", "relu", ["c2"], ["r2"]), Node("a2", "add", ["r2", "c2"], ["a2"]),
             Node("gap", "global_avgpool", ["a2"], ["gap"], {"keepdims": False}),
             Node("d", "dense", ["gap"], ["d"], {}, {"weight": rng.normal(0, 0.5, (4, 5)).astype(np.float32),
                                                     "bias": rng.normal(0, 0.1, 5).astype(np.float32)}),
             Node("rd", "relu", ["d"], ["y"])]
    g = Graph(nodes, {"x": (6, 5, 3)}, ["y"])
    x = rng.uniform(-2, 2, (2, 6, 5, 3)).astype(np.float32)
    gy = rng.standard_normal((2, 5)).astype(np.float32)
    trainable = {"c0", "c1", "c2", "d"}
    eng = fold_frozen(g, trainable, engine=True)
    labels = {n.name: fused_label(n) for n in eng.nodes}
    assert labels == {"c0": "conv2d+relu", "c1": "conv2d+relu6", "c2": "conv2d", "r2": "relu", "a2": "add",
                      "gap": "global_avgpool", "d": "dense+relu"}  # c2's output has two readers
    assert eng.node("c1").params is g.node("c1").params  # updates through the fused node reach `graph`
    assert [n.op for n in fold_frozen(g, trainable).nodes].count("relu") == 3  # exports keep them

    def run(graph, be):
        ex = Executor(graph, be, trainable)
        y = be.to_host(ex.forward({"x": x}, training=True)["y"])
        grads = {k: be.to_host(v) for k, v in ex.backward({"y": be.asarray(gy)}).items()}
        return y, grads

    y_ref, g_ref = run(g, NumpyBackend())
    for name, graph, be in [("fused numpy", eng, NumpyBackend()), ("fused OpenCL", eng, clbe),
                            ("unfused OpenCL", g, clbe)]:
        y, grads = run(graph, be)
        assert_close(y, y_ref, 1e-5, f"{name} forward")
        assert set(grads) == set(g_ref)
        for k in g_ref:
            assert_close(grads[k], g_ref[k], 1e-4, f"{name} d/d{k}")
