"""The executor's backward pass through a residual graph (fan-out, Add, Concat): OpenCL matches the float64
reference executor, and the reference matches finite differences."""
import numpy as np

from transfercl_cli.executor import Executor, tensors_in
from transfercl_cli.graph import Graph, Node

from .helpers import assert_close, numeric_grad


def residual_graph(rng):
    def conv(name, x, k, cin, cout, groups=1):
        w = rng.normal(0, 0.4, (k, k, cin // groups, cout)).astype(np.float32)
        return Node(name, "conv2d", [x], [name], {"kernel": (k, k), "strides": (1, 1), "dilations": (1, 1),
                                                  "pads": (k // 2,) * 4, "groups": groups},
                    {"weight": w, "bias": rng.normal(0, 0.1, cout).astype(np.float32)})

    def no_bias(n):
        del n.params["bias"]
        return n

    nodes = [
        conv("stem", "x", 3, 3, 6),
        Node("stem_relu", "relu6", ["stem"], ["stem_relu"]),
        no_bias(conv("dw", "stem_relu", 3, 6, 6, groups=6)),  # a bias before training-mode BN has zero gradient
        Node("bn", "batchnorm", ["dw"], ["bn"], {"eps": 1e-3, "momentum": 0.9},
             {"gamma": rng.uniform(0.5, 1.5, 6).astype(np.float32), "beta": rng.normal(0, 0.1, 6).astype(np.float32),
              "mean": np.zeros(6, np.float32), "var": np.ones(6, np.float32)}),
        Node("res", "add", ["bn", "stem_relu"], ["res"]),  # stem_relu fans out: its gradients must add up
        conv("pw", "res", 1, 6, 5),
        Node("cat", "concat", ["pw", "res"], ["cat"], {"axis": 3}),
        Node("gap", "global_avgpool", ["cat"], ["gap"], {"keepdims": False}),
        Node("fc", "dense", ["gap"], ["logits"], {}, {"weight": rng.normal(0, 0.5, (11, 3)).astype(np.float32),
                                                       "bias": np.zeros(3, np.float32)}),
    ]
    return Graph(nodes, {"x": (5, 7, 3)}, ["logits"])


def grads_of(be, g, x, w, trainable):
    ex = Executor(g, be, trainable)
    out = ex.forward({"x": x}, training=True)["logits"]
    y = be.to_host(out).astype(np.float64)
    pg = ex.backward({"logits": be.asarray(w)})
    return y, {k: be.to_host(v).astype(np.float64) for k, v in pg.items()}


def test_residual_backward_matches_reference_and_finite_differences(npbe, clbe):
    rng = np.random.default_rng(0)
    g = residual_graph(rng)
    x = rng.uniform(-1, 1, (2, 5, 7, 3)).astype(np.float32)
    w = rng.standard_normal((2, 3))
    trainable = {"stem", "dw", "bn", "pw", "fc"}
    y_ref, g_ref = grads_of(npbe, g, x, w, trainable)
    y_cl, g_cl = grads_of(clbe, g, x, w.astype(np.float32), trainable)
    assert_close(y_cl, y_ref, 1e-4, "forward")
    assert set(g_cl) == set(g_ref) == {("stem", "weight"), ("stem", "bias"), ("dw", "weight"),
                                       ("bn", "gamma"), ("bn", "beta"), ("pw", "weight"), ("pw", "bias"),
                                       ("fc", "weight"), ("fc", "bias")}
    for k in g_ref:
        assert_close(g_cl[k], g_ref[k], 1e-3, f"d/d{k}")
    # The reference executor's stem gradient (which flows through both branches) against finite differences.
    node = g.node("stem")
    orig = node.params["bias"].copy()

    def loss(b):
        node.params["bias"] = b
        npbe.forget_params()
        ex = Executor(g, npbe, trainable)
        out = ex.forward({"x": x}, training=True)["logits"]
        ex.end_step()
        return float(np.sum(npbe.to_host(out) * w))

    ng = numeric_grad(loss, orig.astype(np.float64))
    node.params["bias"] = orig
    npbe.forget_params()
    assert_close(g_ref[("stem", "bias")], ng, 1e-5, "reference d/dstem.bias")


def test_frozen_prefix_keeps_nothing_for_backward(clbe):
    rng = np.random.default_rng(1)
    g = residual_graph(rng)
    ex = Executor(g, clbe, {"fc"})
    assert [n.name for n in ex.grad_nodes] == ["fc"]
    x = rng.uniform(-1, 1, (1, 5, 7, 3)).astype(np.float32)
    out = ex.forward({"x": x}, training=True)["logits"]
    grads = ex.backward({"logits": clbe.asarray(np.ones((1, 3), np.float32))})
    assert set(grads) == {("fc", "weight"), ("fc", "bias")}
    clbe.release(out)


def test_training_step_allocates_nothing_after_warmup(clbe):
    """The buffer pool serves every temporary of a repeated training step: no new device memory after step 1."""
    from transfercl_cli.train import Optimizer

    rng = np.random.default_rng(2)
    g = residual_graph(rng)
    trainable = {"stem", "dw", "bn", "pw", "fc"}
    ex = Executor(g, clbe, trainable)
    opt = Optimizer(clbe, {"optimizer": "adam", "momentum": 0.9, "weight_decay": 1e-4})
    x = rng.uniform(-1, 1, (4, 5, 7, 3)).astype(np.float32)
    labels = clbe.asarray(np.array([0, 1, 2, 1], np.int32))
    sizes = []
    for step in range(4):
        out = ex.forward({"x": x}, training=True)["logits"]
        loss, gl = clbe.fn("softmax_xent")(clbe, out, labels)
        clbe.release(out)
        grads = ex.backward({"logits": gl})
        clbe.release(gl)
        opt.step({k: clbe.param(g.node(k[0]), k[1]) for k in grads}, grads, 0.01)
        for v in grads.values():
            clbe.release(v)
        clbe.finish()
        sizes.append(clbe.rt.allocated_bytes)
    assert sizes[1] == sizes[2] == sizes[3], sizes


def test_training_forward_keeps_only_what_backward_reads(clbe):
    # conv -> bn -> relu6 -> conv: the BN output is read by nothing in the backward (ReLU6 keeps its own output,
    # which the next conv keeps too), so it goes back to the pool in the forward pass; the conv outputs and the
    # ReLU6 output stay until their backward has run, and nothing is left once backward ends.
    rng = np.random.default_rng(2)

    def conv(name, x, cin, cout):
        return Node(name, "conv2d", [x], [name], {"kernel": (1, 1), "strides": (1, 1), "dilations": (1, 1),
                                                  "pads": (0, 0, 0, 0), "groups": 1},
                    {"weight": rng.normal(0, 0.5, (1, 1, cin, cout)).astype(np.float32)})

    nodes = [conv("c1", "x", 3, 8),
             Node("bn", "batchnorm", ["c1"], ["bn"], {"eps": 1e-3, "momentum": 0.9},
                  {"gamma": np.ones(8, np.float32), "beta": np.zeros(8, np.float32),
                   "mean": np.zeros(8, np.float32), "var": np.ones(8, np.float32)}),
             Node("relu", "relu6", ["bn"], ["relu"]),
             conv("c2", "relu", 8, 4)]
    g = Graph(nodes, {"x": (5, 5, 3)}, ["c2"])
    ex = Executor(g, clbe, {"c1", "bn", "c2"})
    x = rng.uniform(-1, 1, (2, 5, 5, 3)).astype(np.float32)
    ex.forward({"x": x}, training=True)
    kept = sorted(tuple(v.shape) for v in ex._live.values())
    # The uploaded input (c1's weight gradient reads it), c1's output (the BN input) and the ReLU6 output.
    assert kept == [(2, 5, 5, 3), (2, 5, 5, 8), (2, 5, 5, 8)], kept
    pinned_by = {n: [id(v) for v in tensors_in(ex._saved[n]) if id(v) in ex._live] for n in ("bn", "relu", "c2")}
    assert len(pinned_by["bn"]) == 1 and pinned_by["relu"] == pinned_by["c2"] and pinned_by["bn"] != pinned_by["relu"]
    ex.backward({"c2": clbe.asarray(np.ones((2, 5, 5, 4), np.float32))})
    assert ex._live is None and ex._saved is None


def test_half_saved_activations_give_close_gradients_in_half_the_memory(clbe):
    # precision: fp16 stores what the backward pass will read as half precision between the passes.
    rng = np.random.default_rng(4)
    g = residual_graph(rng)
    x = rng.uniform(-1, 1, (2, 5, 7, 3)).astype(np.float32)
    w = rng.standard_normal((2, 3)).astype(np.float32)
    trainable = {"stem", "dw", "bn", "pw", "fc"}
    res = {}
    for half in (False, True):
        clbe.forget_params()
        ex = Executor(g, clbe, trainable, half_saved=half)
        out = ex.forward({"x": x}, training=True)["logits"]
        kept = list(ex._live.values())
        assert kept and all(v.half == half for v in kept)
        kept_bytes = sum(v.capacity for v in kept)  # the buffers really held (the pool may round up by 1/4)
        y = clbe.to_host(out)
        pg = ex.backward({"logits": clbe.asarray(w)})
        assert ex._live is None
        res[half] = (y, {k: clbe.to_host(v) for k, v in pg.items()}, kept_bytes)
    np.testing.assert_array_equal(res[True][0], res[False][0])  # the forward itself is untouched
    assert res[True][2] <= 0.65 * res[False][2] + 64
    for k, ref in res[False][1].items():
        assert_close(res[True][1][k], ref, 1e-2, f"d/d{k} with half-precision saved activations")
    assert any(not np.array_equal(res[True][1][k], ref) for k, ref in res[False][1].items())  # rounding happened


def test_per_node_times_times_every_node_and_changes_no_result(clbe):
    """The benchmarks' layer timing (Executor.per_node_times): one entry per node and pass, same outputs, and the
    executor's own functions are back afterwards."""
    rng = np.random.default_rng(3)
    g = residual_graph(rng)
    ex = Executor(g, clbe, {"fc"})
    x = rng.uniform(-1, 1, (2, 5, 7, 3)).astype(np.float32)
    plain = clbe.to_host(ex.forward({"x": x})["logits"])
    before = dict(ex._fwd)
    times = {}
    with ex.per_node_times(times):
        out = ex.forward({"x": x}, training=True)["logits"]
        ex.backward({"logits": clbe.asarray(np.ones((2, 3), np.float32))})
    np.testing.assert_array_equal(clbe.to_host(out), plain)
    assert {k for k in times if k[1] == "fwd"} == {(n.name, "fwd") for n in g.nodes}
    assert (("fc", "bwd") in times) and all(v >= 0 for v in times.values())
    assert ex._fwd == before


def test_const_cache_follows_the_weights(clbe):
    """Packed copies of a frozen weight: kept while the weight cannot change, never for a node an Executor trains,
    rebuilt after the device copy is replaced, and none for a parameter above the size limit."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((20, 24)).astype(np.float32)
    g = Graph([Node("fc", "dense", ["x"], ["y"], {}, {"weight": w})], {"x": (20,)}, ["y"])
    x = rng.standard_normal((3, 20)).astype(np.float32)
    node = g.node("fc")
    be = type(clbe)(clbe.rt)  # its own backend: the shared one has seen other tests' trainable "fc" layers
    ex = Executor(g, be)
    y0 = be.to_host(ex.forward({"x": x})["y"])
    assert_close(y0, x.astype(np.float64) @ w, 1e-5, "frozen dense")
    from transfercl_cli.ops import cl_gemm

    packs = be.const_cache(node, "weight")
    assert packs is not None
    if cl_gemm._resolve(be.rt, None)["kind"] == "cpu":  # the CPU GEMM path packs panels; the GPU kernels read B
        assert packs, "a frozen dense weight keeps its packed panels"
    assert be.const_cache(node, "weight") is packs
    # A new host array (weights loaded from elsewhere): a fresh upload and an empty cache.
    node.params["weight"] = w2 = (w * 2).astype(np.float32)
    assert be.const_cache(node, "weight") is not packs
    assert_close(be.to_host(ex.forward({"x": x})["y"]), x.astype(np.float64) @ w2, 1e-5, "new weights")
    # Once an Executor trains the node, its weight changes in place: no cache, and forward sees every update.
    Executor(g, be, trainable={"fc"})
    assert be.const_cache(node, "weight") is None
    be.rt.to_device(-w2, out=be.param(node, "weight"))
    assert_close(be.to_host(ex.forward({"x": x})["y"]), -(x.astype(np.float64) @ w2), 1e-5, "updated in place")
    big = Node("big", "dense", ["x"], ["z"], {}, {"weight": w})
    be.CONST_CACHE_MAX_BYTES = w.nbytes - 1
    assert be.const_cache(big, "weight") is None
