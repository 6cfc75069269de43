"""GEMM (every variant, forced explicitly), the dense op, and the autotune cache."""
import json
import os

import numpy as np
import pytest

from tests.helpers import assert_close, make_node, run_node
from transfercl_cli.ops import cl_gemm

# (M, K, N): ones, odd sizes, sizes just past the register blocks (MR up to 14, NR up to 64), a long K.
SHAPES = [(1, 1, 1), (1, 7, 3), (5, 1, 17), (3, 17, 1), (17, 33, 5), (33, 64, 65), (70, 3, 129), (15, 1000, 33),
          (130, 257, 96)]


def _op(x, t):
    return x.T if t else x


def _ref(a, b, ta, tb, alpha=1.0, c0=None, bias=None, act=None):
    y = alpha * (_op(a.astype(np.float64), ta) @ _op(b.astype(np.float64), tb))
    if c0 is not None:
        y = y + c0
    if bias is not None:
        y = y + bias
    if act == "relu":
        y = np.maximum(y, 0)
    elif act == "relu6":
        y = np.clip(y, 0, 6)
    return y


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    """Calls without an explicit variant use the untimed default (the autotune has its own test)."""
    monkeypatch.setenv("TCL_NO_AUTOTUNE", "1")


@pytest.fixture(params=sorted(cl_gemm.VARIANTS))
def variant(request):
    return request.param


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_shapes_transposes(rt, variant, ta, tb):
    rng = np.random.default_rng(hash((variant, ta, tb)) % 2**32)
    for (M, K, N) in SHAPES:
        a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
        b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
        out = cl_gemm.gemm(rt, rt.to_device(a), rt.to_device(b), trans_a=ta, trans_b=tb, variant=variant)
        assert out.shape == (M, N)
        assert_close(out.get(), _ref(a, b, ta, tb), 1e-5, f"{variant} M,K,N={M},{K},{N} ta={ta} tb={tb}")
        out.release()


@pytest.mark.parametrize("act", [None, "relu", "relu6"])
def test_gemm_small_m_default_path(rt, act, monkeypatch):
    """M <= 8 rows without transposes (dense layers at small batch) take gemm_small_m on the CPU path: every row
    count up to 8 (its four programs), whole and partial 16-column blocks, with and without bias."""
    if cl_gemm._resolve(rt, None)["kind"] != "cpu":
        pytest.skip("the small-M kernel is the CPU path's")
    calls = []
    real = cl_gemm._gemm_small_m
    monkeypatch.setattr(cl_gemm, "_gemm_small_m", lambda *a: (calls.append(a[5]), real(*a)))
    rng = np.random.default_rng(3)
    for M in range(1, 9):
        for i, (K, N) in enumerate(((1, 5), (37, 16), (300, 45), (64, 1000))):
            a = rng.standard_normal((M, K)).astype(np.float32)
            b = rng.standard_normal((K, N)).astype(np.float32)
            bias = rng.standard_normal(N).astype(np.float32) if (M + i) % 2 else None
            out = cl_gemm.gemm(rt, rt.to_device(a), rt.to_device(b), act=act,
                               bias=None if bias is None else rt.to_device(bias))
            assert_close(out.get(), _ref(a, b, False, False, bias=bias, act=act), 1e-5, f"M,K,N={M},{K},{N}")
            out.release()
    assert len(calls) == 32
    # Nine rows, a transpose or accumulation go to the block kernel.
    x = rt.to_device(rng.standard_normal((9, 20)).astype(np.float32))
    w = rt.to_device(rng.standard_normal((20, 7)).astype(np.float32))
    cl_gemm.gemm(rt, x, w).release()
    assert len(calls) == 32


@pytest.mark.parametrize("act", [None, "relu", "relu6"])
def test_gemm_epilogue(rt, variant, act):
    """alpha, accumulate into out, bias and activation together; also with K split into chunks."""
    rng = np.random.default_rng(7)
    for (M, K, N), ta, tb in [((37, 45, 50), False, False), ((19, 300, 70), True, False), ((66, 20, 33), False, True)]:
        a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
        b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
        c0 = rng.standard_normal((M, N)).astype(np.float32) * 3
        bias = rng.standard_normal(N).astype(np.float32) * 3
        out = rt.to_device(c0)
        r = cl_gemm.gemm(rt, rt.to_device(a), rt.to_device(b), out, trans_a=ta, trans_b=tb, accumulate=True,
                         alpha=0.37, bias=rt.to_device(bias), act=act, variant=variant)
        assert r is out
        expect = _ref(a, b, ta, tb, 0.37, c0, bias, act)
        assert_close(out.get(), expect, 1e-5, f"{variant} epilogue {act}")
        if act == "relu6":  # the clamp must actually bite in this test
            assert (expect >= 6).any() and (expect <= 0).any()


@pytest.mark.parametrize("act", [None, "relu", "hard_swish"])
def test_gemm_residual(rt, variant, act):
    """A residual (a fused Add) added before the activation, after the bias: in the CPU kernels' epilogue (also after
    a K split, gemm_reduce), a separate pass on the others; the old contents of out play no part."""
    from transfercl_cli.ops.ref_conv import _act

    rng = np.random.default_rng(8)
    for (M, K, N), ta in [((37, 45, 50), False), ((19, 300, 70), True), ((5, 20, 33), False), ((66, 2000, 17), False)]:
        a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
        b = rng.standard_normal((K, N)).astype(np.float32)
        r0 = rng.standard_normal((M, N)).astype(np.float32) * 3
        bias = rng.standard_normal(N).astype(np.float32)
        out = rt.to_device(np.full((M, N), 1e6, np.float32))
        cl_gemm.gemm(rt, rt.to_device(a), rt.to_device(b), out, trans_a=ta, bias=rt.to_device(bias), act=act,
                     variant=variant, residual=rt.to_device(r0))
        expect = _act(_ref(a, b, ta, False, bias=bias) + r0, act)
        assert_close(out.get(), expect, 1e-5, f"{variant} residual {act} M,K,N={M},{K},{N}")
        if act == "relu":
            assert (expect <= 0).any()
    with pytest.raises(ValueError, match="residual"):
        cl_gemm.gemm(rt, rt.to_device(a), rt.to_device(b), out, accumulate=True, residual=rt.to_device(r0))
    with pytest.raises(ValueError, match="residual"):
        cl_gemm.gemm(rt, rt.to_device(a), rt.to_device(b), out, residual=rt.to_device(r0[:, :3]))


def test_gemm_leading_dims_and_errors(rt):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)  # NHWC activation -> (30, 7)
    w = rng.standard_normal((7, 4)).astype(np.float32)
    y = cl_gemm.gemm(rt, rt.to_device(x), rt.to_device(w))
    assert y.shape == (30, 4)
    assert_close(y.get(), x.reshape(30, 7) @ w, 1e-5, "NHWC as a matrix")
    dy = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    gw = cl_gemm.gemm(rt, rt.to_device(x), rt.to_device(dy), trans_a=True)  # dW = X^T dY over all pixels
    assert_close(gw.get(), x.reshape(30, 7).T @ dy.reshape(30, 4), 1e-5, "weight gradient over NHWC")
    with pytest.raises(ValueError):
        cl_gemm.gemm(rt, rt.to_device(x), rt.to_device(w.T.copy()))
    with pytest.raises(ValueError):
        cl_gemm.gemm(rt, rt.to_device(x), rt.to_device(w), act="gelu")


def test_gemm_split_k_and_packing_paths(rt):
    """The CPU variant's K-split (partials + reduce) and B in place vs packed give the same result."""
    rng = np.random.default_rng(11)
    for (M, K, N), ta in [((29, 517, 64), True), ((64, 1031, 35), True), ((1, 400, 128), True), ((23, 300, 70), False)]:
        a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
        b = rng.standard_normal((K, N)).astype(np.float32)
        c0 = rng.standard_normal((M, N)).astype(np.float32)
        bias = rng.standard_normal(N).astype(np.float32)
        expect = _ref(a, b, ta, False, 0.5, c0, bias, "relu")
        da, db, dbias = rt.to_device(a), rt.to_device(b), rt.to_device(bias)
        for cfg in cl_gemm.cpu_test_configs():
            out = rt.to_device(c0)
            cl_gemm.gemm(rt, da, db, out, trans_a=ta, alpha=0.5, accumulate=True, bias=dbias, act="relu", variant=cfg)
            assert_close(out.get(), expect, 1e-5, f"{cfg} M,K,N={M},{K},{N}")


def test_scratch_buffers_are_pooled(rt):
    """A repeated GEMM allocates nothing new: packed panels and partials go back to the pool."""
    rng = np.random.default_rng(5)
    a = rt.to_device(rng.standard_normal((300, 70)).astype(np.float32))
    b = rt.to_device(rng.standard_normal((300, 33)).astype(np.float32))
    out = rt.empty((70, 33))
    for _ in range(2):
        cl_gemm.gemm(rt, a, b, out, trans_a=True)
        cl_gemm.gemm(rt, b, a, None, trans_a=True).release()
    rt.finish()
    before = rt.allocated_bytes
    for _ in range(3):
        cl_gemm.gemm(rt, a, b, out, trans_a=True)
        cl_gemm.gemm(rt, b, a, None, trans_a=True).release()
    rt.finish()
    assert rt.allocated_bytes == before


def test_colsum(rt):
    rng = np.random.default_rng(2)
    for (M, N) in [(1, 1), (1, 17), (333, 5), (4099, 33), (20000, 3)]:
        g = rng.standard_normal((M, N)).astype(np.float32)
        expect = g.astype(np.float64).sum(0)
        assert_close(cl_gemm.colsum(rt, rt.to_device(g)).get(), expect, 1e-5, f"colsum {M}x{N}")
        out = rt.to_device(np.ones(N, np.float32))
        cl_gemm.colsum(rt, rt.to_device(g), out, accumulate=True)
        assert_close(out.get(), expect + 1, 1e-5, f"colsum accumulate {M}x{N}")


# ---------------------------------------------------------------------------------------------------------------
# dense


def _dense_ref(x, w, b, act, gy):
    x, w = x.astype(np.float64), w.astype(np.float64)
    y = x @ w + (b if b is not None else 0)
    if act == "relu":
        mask = y > 0
    elif act == "relu6":
        mask = (y > 0) & (y < 6)
    else:
        mask = np.ones_like(y, bool)
    yo = np.clip(y, 0, 6) if act == "relu6" else np.maximum(y, 0) if act == "relu" else y
    g = gy * mask
    return yo, g @ w.T, x.T @ g, g.sum(0)


@pytest.mark.parametrize("act", [None, "relu", "relu6"])
@pytest.mark.parametrize("n,cin,cout,bias", [(1, 3, 5, True), (7, 33, 17, True), (32, 64, 10, False)])
def test_dense_forward_backward(clbe, act, n, cin, cout, bias):
    rng = np.random.default_rng(n * 100 + cin)
    x = rng.standard_normal((n, cin)).astype(np.float32)
    params = {"weight": rng.standard_normal((cin, cout)).astype(np.float32)}
    if bias:
        params["bias"] = rng.standard_normal(cout).astype(np.float32)
    node = make_node("dense", 1, {"act": act}, params)
    gy = rng.standard_normal((n, cout))
    y, gxs, gps = run_node(clbe, node, [x], training=True, grad_out=gy.astype(np.float32))
    clbe.forget_params(node)
    yr, gxr, gwr, gbr = _dense_ref(x, params["weight"], params.get("bias"), act, gy)
    assert_close(y, yr, 1e-4, "dense forward")
    assert_close(gxs[0], gxr, 1e-3, "dense dx")
    assert_close(gps["weight"], gwr, 1e-3, "dense dW")
    if bias:
        assert_close(gps["bias"], gbr, 1e-3, "dense db")
    else:
        assert "bias" not in gps


def test_dense_matches_reference_backend(npbe, clbe):
    """Against the numpy reference op when the conv engineer's ref_conv provides dense."""
    from transfercl_cli import ops

    if ops.lookup("numpy", "dense") is None:
        pytest.skip("numpy reference dense not available yet")
    from tests.helpers import check_op

    rng = np.random.default_rng(4)
    node = make_node("dense", 1, {"act": None},
                     {"weight": rng.standard_normal((17, 5)), "bias": rng.standard_normal(5)})
    check_op(npbe, clbe, node, [rng.standard_normal((3, 17)).astype(np.float32)])


# ---------------------------------------------------------------------------------------------------------------
# tuning cache and autotune


def test_tuning_cache_round_trip(rt, tmp_path, monkeypatch):
    from transfercl_cli import tuning

    monkeypatch.setenv("TCL_CACHE_DIR", str(tmp_path))
    key = tuning.device_key(rt, "gemm", "abc123")
    assert tuning.get(rt, key) is None
    assert tuning.put(rt, key, {"variant": "cpu14x32", "gflops": 123.5})
    assert tuning.get(rt, key) == {"variant": "cpu14x32", "gflops": 123.5}
    assert tuning.get(rt, key + "x") is None
    files = list((tmp_path / "tuning").glob("*.json"))
    assert len(files) == 1
    files[0].write_text('{"key": "' + key[:5])  # truncated / corrupt: ignored, not an error
    assert tuning.get(rt, key) is None
    files[0].write_text(json.dumps([1, 2]))
    assert tuning.get(rt, key) is None
    assert tuning.put(rt, key, "gpu")
    assert tuning.get(rt, key) == "gpu"
    assert not [p for p in os.listdir(tmp_path / "tuning") if p.endswith(".tmp")]


def test_autotune_picks_and_caches(rt, tmp_path, monkeypatch):
    monkeypatch.setenv("TCL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TCL_NO_AUTOTUNE", raising=False)
    cl_gemm._TUNED.clear()
    calls = []
    win = cl_gemm._candidates(rt)[-1]  # not the untimed default, when there is a choice
    monkeypatch.setattr(cl_gemm, "_time_variant", lambda rt, name, *a: calls.append(name) or
                        (1.0 if name == win else 2.0))
    assert cl_gemm.tuned_variant(rt) == win
    assert win in calls and set(calls) <= set(cl_gemm.VARIANTS)
    cl_gemm._TUNED.clear()
    calls.clear()
    assert cl_gemm.tuned_variant(rt) == win  # from the cache file: no timing
    assert not calls
    cl_gemm._TUNED.clear()
    monkeypatch.setenv("TCL_NO_AUTOTUNE", "1")
    assert cl_gemm.tuned_variant(rt) == cl_gemm.default_variant(rt)
    cl_gemm._TUNED.clear()


@pytest.mark.parametrize("trans_a", [False, True])
def test_shape_tuner_tries_plans_then_keeps_one(rt, monkeypatch, trans_a):
    """The per-shape tuner alternates its plans over the first calls of a shape, then keeps the fastest; every plan
    gives bit-identical results (only the blocking changes, not the summation order) that match the reference."""
    if not rt.is_cpu:
        pytest.skip("the per-shape tuner belongs to the CPU variant")
    monkeypatch.delenv("TCL_NO_AUTOTUNE", raising=False)
    monkeypatch.setattr(cl_gemm, "SHAPE_TUNE_MIN_FLOP", 0)
    monkeypatch.setattr(cl_gemm, "SHAPE_TUNE_AFTER", 2)
    monkeypatch.setattr(cl_gemm, "_SHAPE_TUNERS", {})
    monkeypatch.setattr(cl_gemm, "_TUNED", {rt.info.id: cl_gemm.default_variant(rt)})
    record = cl_gemm._ShapeTuner.record
    # Measured times replaced by fixed ones: plan 1 is the fastest.
    monkeypatch.setattr(cl_gemm._ShapeTuner, "record", lambda self, i, s: record(self, i, 0.5 if i == 1 else 1.0))
    rng = np.random.default_rng(5)
    M, K, N = 300, 1100, 70  # K split into chunks and several row blocks: each variation changes something
    a = rng.standard_normal((K, M) if trans_a else (M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    da, db, out = rt.to_device(a), rt.to_device(b), rt.empty((M, N))
    cfg = cl_gemm._shape_variant(cl_gemm.VARIANTS[cl_gemm.default_variant(rt)], M, N, K, trans_a, False)
    results = []
    for i in range(16):
        cl_gemm.gemm(rt, da, db, out, trans_a=trans_a)
        results.append(out.get())
        if i < 2:  # the first calls of a shape run the default plan, untimed
            assert not any(cl_gemm.shape_tuning_state(rt, cfg, M, N, K, trans_a, False)[1])
    plans, times, best = cl_gemm.shape_tuning_state(rt, cfg, M, N, K, trans_a, False)
    assert len(plans) >= 3 and [len(t) for t in times] == [cl_gemm.SHAPE_TUNE_CALLS] * len(plans)
    assert best == 1
    assert len({p["kc"] for p in plans}) == 1 and len({tuple(sorted(p.items())) for p in plans}) == len(plans)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    assert_close(results[0], _ref(a, b, trans_a, False), 1e-5, "tuned gemm")


# ---------------------------------------------------------------------------------------------------------------
# Packed panels of a constant B (frozen weights, Backend.const_cache) and the block width by N.


@pytest.mark.parametrize("M", [1, 5, 49, 600])
def test_gemm_packed_panels_match_in_place(rt, M):
    """With b_packs, B's panels are packed on the first call and reused after; the sums are the same as reading B
    in place (bit for bit), for the small-M kernel (M <= 8), the in-place plans (M < 512) and the packing ones."""
    if cl_gemm._resolve(rt, None)["kind"] != "cpu":
        pytest.skip("panels are the CPU path's")
    rng = np.random.default_rng(M)
    for K, N in ((70, 37), (160, 96), (33, 16), (20, 5)):
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        bias = rng.standard_normal(N, dtype=np.float32)
        da, db, dbias = rt.to_device(a), rt.to_device(b), rt.to_device(bias)
        plain = cl_gemm.gemm(rt, da, db, bias=dbias, act="relu").get()
        packs = {}
        first = cl_gemm.gemm(rt, da, db, bias=dbias, act="relu", b_packs=packs).get()
        kept = dict(packs)
        again = cl_gemm.gemm(rt, da, db, bias=dbias, act="relu", b_packs=packs).get()
        np.testing.assert_array_equal(first, plain)
        np.testing.assert_array_equal(again, plain)
        assert_close(plain, _ref(a, b, False, False, bias=bias, act="relu"), 1e-5, f"M,K,N={M},{K},{N}")
        assert len(packs) == (0 if M <= cl_gemm.SMALL_M and N < 16 else 1)
        assert all(packs[k] is kept[k] for k in kept), "the second call packed again"


def test_gemm_block_width_follows_narrow_n():
    """Narrow outputs take the block width that computes the fewest columns, 16-wide blocks' counted 1.8 times
    (ties and N >= NARROW_N keep the default choice)."""
    tuned = cl_gemm.VARIANTS["cpu14x32"]
    width = lambda M, N: 16 * cl_gemm._shape_variant(tuned, M, N, 64, False, False)["NV"]  # noqa: E731
    assert width(12544, 16) == 16
    assert width(3136, 24) == 32 and width(196, 24) == 32
    assert width(3136, 144) == 48 and width(3136, 40) == 48
    assert width(3136, 80) == 32 and width(196, 80) == 32  # not 8 x 16 (80 columns, one FMA per broadcast)
    assert width(3136, 112) == 64 and width(196, 112) == 32
    assert width(3136, 64) == 64 and width(196, 64) == 32  # unchanged: the 6 x 64 rule for tall maps
    assert width(49, 960) == 32 and width(3136, 320) == 64
    assert cl_gemm._shape_variant(tuned, 3136, 16, 64, True, False) is tuned  # weight gradients keep theirs


def test_exp_activations_need_their_program(rt, monkeypatch):
    """Swish & co. are compiled only into programs built with EPI_EXP (cl_gemm.act_defines); a program without it
    that is handed such a code writes NaN, so a host path that forgot the define fails loudly in tests."""
    a = rt.to_device(np.ones((3, 4), np.float32))
    b = rt.to_device(np.ones((4, 5), np.float32))
    ok = cl_gemm.gemm(rt, a, b, act="swish", variant="naive").get()
    assert_close(ok, np.full((3, 5), 4 / (1 + np.exp(-4.0))), 1e-6, "swish with EPI_EXP")
    monkeypatch.setattr(cl_gemm, "act_defines", lambda code: {})
    assert np.isnan(cl_gemm.gemm(rt, a, b, act="swish", variant="naive").get()).all()


def test_denormal_operands_give_the_reference_result(rt):
    """Kernels are built with -cl-denorms-are-zero (a denormal operand costs x86 a microcode assist per FMA): values
    below FLT_MIN may be flushed, which changes results by less than FLT_MIN times the other operand."""
    from transfercl_cli.ops.cl_elementwise import act_forward

    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 96)).astype(np.float32)
    a[:, ::2] = np.float32(3e-39)  # half of A denormal, as after a saturated squeeze-excite gate
    b = rng.standard_normal((96, 48)).astype(np.float32)
    for v in ("cpu14x32", "cpu8x16", "gpu_direct", "naive"):
        y = rt.to_host(cl_gemm.gemm(rt, rt.to_device(a), rt.to_device(b), variant=v))
        assert_close(y, _ref(a, b, False, False), 1e-5, v)
    s = rt.to_host(act_forward(rt, "sigmoid", rt.to_device(np.array([-100.0, -90.0, 0.0], np.float32))))
    assert np.all(np.isfinite(s)) and np.all(s[:2] >= 0) and np.all(s[:2] < np.finfo(np.float32).tiny) and s[2] == 0.5
    assert all("-cl-denorms-are-zero" in opts for _name, opts in rt._programs)
