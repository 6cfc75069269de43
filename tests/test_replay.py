"""Recorded inference passes (transfercl_cli/replay.py): a replay gives exactly the op-by-op result, follows new
inputs and parameters, keeps its buffers to itself, and is refused where a pass does what a replay would skip."""
import numpy as np

from transfercl_cli.executor import Executor
from transfercl_cli.plan import fold_frozen
from transfercl_cli.runtime import DeviceArray

from .helpers import assert_close, tiny_mobilenet
from .test_executor import residual_graph


def engine_graph(rng):
    return fold_frozen(tiny_mobilenet(rng, size=11), set(), engine=True)


def op_by_op(be, g):
    ex = Executor(g, be)
    ex._replayer = None
    return ex


def run(be, ex, x):
    y = ex.forward({"input": x})["probs"]
    h = be.to_host(y)
    be.release(y)
    return h


def images(rng, n=2, size=11):
    return rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def test_replay_gives_the_op_by_op_result_for_every_input(clbe, npbe):
    rng = np.random.default_rng(0)
    g = engine_graph(rng)
    ex, ref = Executor(g, clbe), op_by_op(clbe, g)
    for i in range(5):
        x = images(rng)
        y = run(clbe, ex, x)
        assert (i >= 1) == bool(ex._replayer.replays), ex._replayer.last_refusal  # recorded at the second call
        np.testing.assert_array_equal(y, run(clbe, ref, x))  # the same kernels in the same order: bit for bit
        assert_close(y, run(npbe, Executor(g, npbe), x.astype(np.float64)), 1e-4, f"call {i}")


def test_replay_of_a_residual_graph_with_device_inputs_leaves_the_input_alone(clbe):
    rng = np.random.default_rng(1)
    g = residual_graph(rng)
    ex, ref = Executor(g, clbe), op_by_op(clbe, g)
    for _ in range(4):
        x = rng.uniform(-1, 1, (3, 5, 7, 3)).astype(np.float32)
        xd = clbe.asarray(x)
        y = ex.forward({"x": xd})["logits"]
        assert isinstance(y, DeviceArray) and y.buf is not xd.buf
        np.testing.assert_array_equal(clbe.to_host(y), clbe.to_host(ref.forward({"x": x})["logits"]))
        np.testing.assert_array_equal(clbe.to_host(xd), x)
        clbe.release(y)
        clbe.release(xd)
    assert ex._replayer.replays


def test_outputs_of_a_replay_survive_the_next_call(clbe):
    rng = np.random.default_rng(2)
    g = engine_graph(rng)
    ex = Executor(g, clbe)
    xs = [images(rng) for _ in range(4)]
    outs = [ex.forward({"input": x})["probs"] for x in xs]
    assert ex._replayer.replays
    ref = op_by_op(clbe, g)
    for x, y in zip(xs, outs):
        np.testing.assert_array_equal(clbe.to_host(y), run(clbe, ref, x))
        clbe.release(y)


def test_replay_follows_replaced_and_reloaded_parameters(clbe):
    rng = np.random.default_rng(3)
    g = engine_graph(rng)
    ex, ref = Executor(g, clbe), op_by_op(clbe, g)
    x = images(rng)
    for _ in range(3):
        before = run(clbe, ex, x)
    assert ex._replayer.replays
    dense = next(n for n in g.nodes if n.op == "dense")
    dense.params["weight"] = rng.normal(0, 1.0, dense.params["weight"].shape).astype(np.float32)  # new host array
    after = run(clbe, ex, x)
    assert not np.allclose(after, before)
    np.testing.assert_array_equal(after, run(clbe, ref, x))
    for _ in range(2):
        run(clbe, ex, x)  # recorded again
    assert ex._replayer.replays
    dense.params["weight"] *= 0.5  # in place on the host: the device copy is stale until forget_params
    clbe.forget_params(dense)
    np.testing.assert_array_equal(run(clbe, ex, x), run(clbe, ref, x))
    assert not ex._replayer.replays  # dropped: the buffer it read went back to the pool


def test_reserved_buffers_are_never_handed_out(clbe):
    rng = np.random.default_rng(4)
    g = engine_graph(rng)
    ex = Executor(g, clbe)
    x = images(rng)
    for _ in range(3):
        run(clbe, ex, x)
    (rp,) = ex._replayer.replays.values()
    mine = {id(b) for b, _cap in rp.reserved}
    assert mine and not mine & clbe.rt.pool_ids()
    sizes = sorted({cap for _b, cap in rp.reserved})
    taken = [clbe.rt.empty((cap // 4,)) for cap in sizes for _ in range(4)]
    assert not {id(t.buf) for t in taken} & mine
    for t in taken:
        t.release()
    ex.close()
    assert mine <= clbe.rt.pool_ids() and not ex._replayer.replays
    for _ in range(3):
        run(clbe, ex, x)
    (rp,) = ex._replayer.replays.values()
    mine = {id(b) for b, _cap in rp.reserved}
    del ex, rp  # dropping the executor gives them back too (no reference cycle keeps it)
    assert mine <= clbe.rt.pool_ids()


def test_a_pass_that_reads_back_is_not_recorded(clbe, monkeypatch):
    from transfercl_cli.ops import cl_elementwise  # noqa: F401  (registers relu6)

    rng = np.random.default_rng(5)
    g = residual_graph(rng)
    ex = Executor(g, clbe)
    fwd = ex._fwd["relu6"]

    def peeking(be, node, xs, training):
        be.to_host(xs[0])  # a host read: a replay would skip it
        return fwd(be, node, xs, training)

    ex._fwd["relu6"] = peeking
    x = rng.uniform(-1, 1, (2, 5, 7, 3)).astype(np.float32)
    ys = [clbe.to_host(ex.forward({"x": x})["logits"]) for _ in range(3)]
    assert not ex._replayer.replays and "reads device data back" in ex._replayer.last_refusal
    np.testing.assert_array_equal(ys[0], ys[2])


def test_two_batch_sizes_get_two_recordings_and_a_third_runs_op_by_op(clbe):
    rng = np.random.default_rng(6)
    g = engine_graph(rng)
    ex, ref = Executor(g, clbe), op_by_op(clbe, g)
    for n in (4, 4, 1, 1, 3, 3, 3, 4, 1):
        x = images(rng, n)
        np.testing.assert_array_equal(run(clbe, ex, x), run(clbe, ref, x))
    assert sorted(k[0][0][1][0] for k in ex._replayer.replays) == [1, 4]


def test_per_node_times_and_training_passes_run_op_by_op(clbe):
    rng = np.random.default_rng(7)
    g = residual_graph(rng)
    ex = Executor(g, clbe, {"fc"})
    x = rng.uniform(-1, 1, (2, 5, 7, 3)).astype(np.float32)
    for _ in range(3):
        ex.forward({"x": x})
    assert ex._replayer.replays
    times = {}
    with ex.per_node_times(times):
        ex.forward({"x": x})
    assert {name for name, kind in times} == {n.name for n in g.nodes}
    out = ex.forward({"x": x}, training=True)["logits"]  # keeps its state for backward: never a replay
    grads = ex.backward({"logits": clbe.asarray(np.ones((2, 3), np.float32))})
    assert set(grads) == {("fc", "weight"), ("fc", "bias")}
    clbe.release(out)


def test_tcl_replay_0_turns_replays_off(clbe, monkeypatch):
    monkeypatch.setenv("TCL_REPLAY", "0")
    assert Executor(residual_graph(np.random.default_rng(8)), clbe)._replayer is None
