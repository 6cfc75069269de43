"""Optimizer steps and gradient helpers (kind "fn") for both backends; everything updates tensors in place.

    sgd_step(be, param, grad, state, lr, momentum=0.0, nesterov=False, weight_decay=0.0)
        Keras SGD: g = grad + weight_decay * param (L2); without momentum param -= lr * g; with it
        v = momentum * v - lr * g and param += v (nesterov: param += momentum * v - lr * g). state["momentum"].
    adam_step(be, param, grad, state, lr, beta1=0.9, beta2=0.999, eps=1e-7, weight_decay=0.0, decoupled=False,
              step=None)
        Keras Adam: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
        param -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps). weight_decay is L2 (added to g), or with
        decoupled=True AdamW: param -= lr * weight_decay * param first. t = step (1-based) or, when None, a counter
        in state["t"]. state["m"], state["v"].
    grad_norm_sq(be, grads) -> float        sum of squares of all tensors, None entries skipped (gradient clipping)
    scale_inplace(be, t, factor)            t *= factor
    add_inplace(be, dst, src)               dst += src (gradient accumulation)

State tensors are backend tensors created (zero) on first use. On OpenCL nothing leaves the device except the
grad_norm_sq result (one read of per-chunk partial sums).
"""
import math

import numpy as np

from . import register

i32 = np.int32
f32 = np.float32


def _state(be, state, key, like):
    t = state.get(key)
    if t is None:
        t = be.zeros(tuple(like.shape))
        state[key] = t
    return t


def _adam_t(state, step):
    t = int(step) if step is not None else int(state.get("t", 0)) + 1
    state["t"] = t
    return t


def _adam_alpha(lr, beta1, beta2, t):
    return lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)


def _check(param, grad):
    if tuple(param.shape) != tuple(grad.shape):
        raise ValueError(f"gradient shape {tuple(grad.shape)} does not match parameter shape {tuple(param.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# numpy


@register("numpy", "sgd_step", "fn")
def sgd_step_np(be, param, grad, state, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    _check(param, grad)
    g = grad + weight_decay * param if weight_decay else grad
    if momentum:
        v = _state(be, state, "momentum", param)
        v *= momentum
        v -= lr * g
        param += momentum * v - lr * g if nesterov else v
    else:
        param -= lr * g
    return param


@register("numpy", "adam_step", "fn")
def adam_step_np(be, param, grad, state, lr, beta1=0.9, beta2=0.999, eps=1e-7, weight_decay=0.0, decoupled=False,
                 step=None):
    _check(param, grad)
    t = _adam_t(state, step)
    m = _state(be, state, "m", param)
    v = _state(be, state, "v", param)
    g = grad
    if weight_decay and not decoupled:
        g = grad + weight_decay * param
    if weight_decay and decoupled:
        param -= lr * weight_decay * param
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * g * g
    param -= _adam_alpha(lr, beta1, beta2, t) * m / (np.sqrt(v) + eps)
    return param


@register("numpy", "grad_norm_sq", "fn")
def grad_norm_sq_np(be, grads):
    return float(sum(float(np.sum(np.square(np.asarray(g, dtype=np.float64)))) for g in grads if g is not None))


@register("numpy", "scale_inplace", "fn")
def scale_inplace_np(be, t, factor):
    t *= factor
    return t


@register("numpy", "add_inplace", "fn")
def add_inplace_np(be, dst, src):
    _check(dst, src)
    dst += src
    return dst


# ---------------------------------------------------------------------------------------------------------------
# OpenCL (kernels/optim.cl)


def _g8(n):
    return (max(1, -(-int(n) // 8)),)


def run(rt, file, name, gsize, *args):
    from .cl_elementwise import run as _run  # fixed work-group sizes (see there)

    return _run(rt, file, name, gsize, *args)


@register("opencl", "sgd_step", "fn")
def sgd_step_cl(be, param, grad, state, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    _check(param, grad)
    rt = be.rt
    n = param.size
    vel = _state(be, state, "momentum", param) if momentum else param  # unused buffer slot without momentum
    if n:
        run(rt, "optim", "sgd", _g8(n), param, grad, vel, i32(n), f32(lr), f32(momentum),
                  f32(weight_decay), i32(bool(momentum)), i32(bool(nesterov)))
    return param


@register("opencl", "adam_step", "fn")
def adam_step_cl(be, param, grad, state, lr, beta1=0.9, beta2=0.999, eps=1e-7, weight_decay=0.0, decoupled=False,
                 step=None):
    _check(param, grad)
    rt = be.rt
    t = _adam_t(state, step)
    m = _state(be, state, "m", param)
    v = _state(be, state, "v", param)
    n = param.size
    l2 = 0.0 if decoupled else weight_decay
    decay = lr * weight_decay if decoupled else 0.0
    if n:
        run(rt, "optim", "adam", _g8(n), param, grad, m, v, i32(n),
                  f32(_adam_alpha(lr, beta1, beta2, t)), f32(beta1), f32(beta2), f32(eps), f32(l2), f32(decay))
    return param


@register("opencl", "grad_norm_sq", "fn")
def grad_norm_sq_cl(be, grads):
    rt = be.rt
    grads = [g for g in grads if g is not None and g.size]
    if not grads:
        return 0.0
    plans = []
    total = 0
    for g in grads:
        n = g.size
        parts = max(1, min(256, -(-n // 4096)))
        chunk = -(-(-(-n // parts)) // 8) * 8  # a multiple of 8 keeps every chunk's float8 loads aligned
        parts = -(-n // chunk)
        plans.append((g, n, chunk, parts, total))
        total += parts
    out = rt.empty((total,))
    for g, n, chunk, parts, off in plans:
        run(rt, "optim", "sumsq_partial", (parts,), g, i32(n), i32(chunk), i32(parts), out, i32(off))
    res = float(np.sum(rt.to_host(out).astype(np.float64)))
    out.release()
    return res


@register("opencl", "scale_inplace", "fn")
def scale_inplace_cl(be, t, factor):
    n = t.size
    if n:
        run(be.rt, "optim", "scale_inplace", _g8(n), t, i32(n), f32(factor))
    return t


@register("opencl", "add_inplace", "fn")
def add_inplace_cl(be, dst, src):
    _check(dst, src)
    n = dst.size
    if n:
        run(be.rt, "optim", "add_inplace", _g8(n), dst, src, i32(n))
    return dst
