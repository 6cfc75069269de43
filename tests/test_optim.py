"""Optimizer steps and gradient helpers on both backends against an independent float64 numpy reference."""
import math

import numpy as np
import pytest

from tests.helpers import assert_close


def ref_sgd(w, grads, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    """Keras SGD written out step by step (L2 weight decay on the gradient)."""
    w = w.astype(np.float64).copy()
    v = np.zeros_like(w)
    for g in grads:
        g = g + weight_decay * w
        if momentum:
            v = momentum * v - lr * g
            w = w + (momentum * v - lr * g if nesterov else v)
        else:
            w = w - lr * g
    return w


def ref_adam(w, grads, lr, b1=0.9, b2=0.999, eps=1e-7, weight_decay=0.0, decoupled=False):
    """Adam with bias correction as in Keras (eps outside the correction); AdamW decays w by lr * wd first."""
    w = w.astype(np.float64).copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        if decoupled:
            w = w - lr * weight_decay * w
        else:
            g = g + weight_decay * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
    return w


SHAPES = [(37,), (5, 17), (3, 3, 2, 8)]
STEPS = 4


def _data(shape, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(STEPS)]
    return w, grads


def _run(be, fn, w, grads, **kw):
    p = be.asarray(w)
    state = {}
    for g in grads:
        gd = be.asarray(g)
        be.fn(fn)(be, p, gd, state, **kw)
        be.release(gd)
    out = be.to_host(p).astype(np.float64)
    return out, state


SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.1, weight_decay=0.01),
    dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.05),
]


@pytest.mark.parametrize("kw", SGD_CASES, ids=[str(k) for k in SGD_CASES])
def test_sgd(npbe, clbe, kw):
    for i, shape in enumerate(SHAPES):
        w, grads = _data(shape, i)
        want = ref_sgd(w, grads, **kw)
        assert np.max(np.abs(want - w)) > 1e-3  # the steps moved the weights
        for be in (npbe, clbe):
            got, state = _run(be, "sgd_step", w, grads, **kw)
            assert_close(got, want, 1e-6 if be.name == "numpy" else 1e-5, f"{be.name} sgd {kw}")
            assert ("momentum" in state) == bool(kw.get("momentum"))


ADAM_CASES = [
    dict(lr=0.01),
    dict(lr=0.003, beta1=0.8, beta2=0.99, eps=1e-5),
    dict(lr=0.01, weight_decay=0.1),
    dict(lr=0.01, weight_decay=0.1, decoupled=True),
]


@pytest.mark.parametrize("kw", ADAM_CASES, ids=[str(k) for k in ADAM_CASES])
def test_adam(npbe, clbe, kw):
    ref_kw = {("b1" if k == "beta1" else "b2" if k == "beta2" else k): v for k, v in kw.items()}
    for i, shape in enumerate(SHAPES):
        w, grads = _data(shape, 10 + i)
        want = ref_adam(w, grads, **ref_kw)
        for be in (npbe, clbe):
            got, state = _run(be, "adam_step", w, grads, **kw)
            assert_close(got, want, 1e-6 if be.name == "numpy" else 1e-5, f"{be.name} adam {kw}")
            assert state["t"] == STEPS and "m" in state and "v" in state


def test_adam_explicit_step(npbe, clbe):
    # step=t overrides the internal counter (e.g. after resuming): a first call at t=5 differs from t=1.
    w, grads = _data((9,), 3)
    for be in (npbe, clbe):
        p1, p5 = be.asarray(w), be.asarray(w)
        be.fn("adam_step")(be, p1, be.asarray(grads[0]), {}, lr=0.1, step=1)
        st = {}
        be.fn("adam_step")(be, p5, be.asarray(grads[0]), st, lr=0.1, step=5)
        assert st["t"] == 5
        a, b = be.to_host(p1), be.to_host(p5)
        # t=1: bias correction makes the update lr * sign(g) (up to eps).
        assert_close(w - a, 0.1 * np.sign(grads[0]), 1e-3, f"{be.name} adam t=1")
        assert not np.allclose(a, b)


def test_grad_norm_scale_add(npbe, clbe):
    rng = np.random.default_rng(7)
    arrs = [rng.standard_normal(s).astype(np.float32) for s in [(3,), (5, 17), (1000, 33), (8,)]]
    want = sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrs)
    for be in (npbe, clbe):
        ts = [be.asarray(a) for a in arrs]
        got = be.fn("grad_norm_sq")(be, ts)
        assert isinstance(got, float)
        assert abs(got - want) <= 1e-5 * want, (be.name, got, want)
        assert be.fn("grad_norm_sq")(be, []) == 0.0
        be.fn("scale_inplace")(be, ts[1], 0.25)
        assert_close(be.to_host(ts[1]), arrs[1] * 0.25, 1e-6, f"{be.name} scale_inplace")
        be.fn("add_inplace")(be, ts[2], be.asarray(arrs[2] * 2))
        assert_close(be.to_host(ts[2]), arrs[2].astype(np.float64) * 3, 1e-6, f"{be.name} add_inplace")
        with pytest.raises(ValueError):
            be.fn("add_inplace")(be, ts[0], ts[3])


def test_clipping_workflow(npbe, clbe):
    # Gradient accumulation over two micro-batches, clipping by global norm, one SGD step: both backends agree.
    rng = np.random.default_rng(11)
    w = rng.standard_normal((4, 7)).astype(np.float32)
    g1, g2 = (rng.standard_normal((4, 7)).astype(np.float32) for _ in range(2))
    g = g1.astype(np.float64) + g2
    norm = np.sqrt(np.sum(g ** 2))
    want = w - 0.1 * g * min(1.0, 1.0 / norm)
    for be in (npbe, clbe):
        p, acc = be.asarray(w), be.asarray(g1)
        be.fn("add_inplace")(be, acc, be.asarray(g2))
        n = math.sqrt(be.fn("grad_norm_sq")(be, [acc]))
        be.fn("scale_inplace")(be, acc, min(1.0, 1.0 / n))
        be.fn("sgd_step")(be, p, acc, {}, lr=0.1)
        assert_close(be.to_host(p), want, 1e-5, f"{be.name} clip workflow")
