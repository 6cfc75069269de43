"""OpenCL (backend "opencl") of the tensor ops of issue 14, forward and backward: slice, layer_norm, erf / gelu /
sqrt / pow / reciprocal / neg, sub / div, reduce_mean / reduce_sum. Semantics: ref_tensor.py, which these match
(tests/test_ops_tensor.py).

Kernels: kernels/tensor.cl (unary ops, strided gathers / scatters, layer normalisation, row sums); sub / div run
on the broadcasting binary kernels of elementwise.cl (`binary`), reductions other than over trailing axes on
`reduce_to` (the gradient reductions of add / mul). Outputs never alias inputs (see cl_elementwise.py).
"""
import numpy as np

from . import register
from .cl_elementwise import _groups8, _size, act_forward, binary, chunking, collapse, reduce_to, run
from .ref_elementwise import Saved
from .ref_tensor import (gelu_tanh, ln_axis, ln_eps, pow_exponent, reduce_axes, reduce_keepdims, reduce_shape,
                         slice_plan)

B = "opencl"
TS = "tensor"
EW = "elementwise"
SC_CHUNK = 16  # elements per work-item of tensor.cl strided_copy

i32 = np.int32
f32 = np.float32


def _negate(rt, t):
    """t = -t in place."""
    return act_forward(rt, "affine", t, out=t, p0=-1.0, p1=0.0)


# ---------------------------------------------------------------------------------------------------------------
# Strided copies (slice, its gradient, broadcast gradients)


def _strided(rt, src, dst, rows_dims, strides, base=0, scatter=False, scale=1.0):
    """tensor.cl strided_copy: the contiguous side has dims `rows_dims` (collapsed, innermost last), the strided side
    the element strides `strides` (same length) from `base`. scatter: dst[strided] = src[contiguous]."""
    dims, st = list(rows_dims), list(strides)
    if not dims:
        dims, st = [1], [0]
    if len(dims) > 6:
        raise ValueError(f"a strided copy over {len(dims)} non-mergeable axes (at most 6 are supported)")
    inner, s0 = int(dims[-1]), int(st[-1])
    outer = [1] * (6 - len(dims)) + [int(d) for d in dims[:-1]]
    ost = [0] * (6 - len(dims)) + [int(s) for s in st[:-1]]
    rows = _size(outer)
    if inner * rows == 0:
        return dst
    run(rt, TS, "strided_copy", (-(-inner // SC_CHUNK), rows), src, dst, i32(bool(scatter)), i32(base), i32(inner),
        i32(s0), i32(rows), *[i32(v) for v in outer], *[i32(v) for v in ost], f32(scale))
    return dst


def _merge(dims, strides):
    """Drop unit dims and merge adjacent dims whose strided offsets continue each other."""
    md, ms = [], []
    for d, s in zip(dims, strides):
        if d == 1:
            continue
        if md and ms[-1] == s * d:
            md[-1] *= d
            ms[-1] = s
        else:
            md.append(int(d))
            ms.append(int(s))
    return md, ms


def _slice_layout(shape, plan):
    """(base offset, output dims, source strides) of a slice plan over a row-major `shape`, merged."""
    st, acc = [0] * len(shape), 1
    for k in reversed(range(len(shape))):
        st[k] = acc
        acc *= int(shape[k])
    base = sum(start * s for (start, _, _), s in zip(plan, st))
    dims, strides = _merge([n for _, _, n in plan], [step * s for (_, step, _), s in zip(plan, st)])
    return base, dims, strides


@register(B, "slice")
def slice_fwd(be, node, xs, training):
    rt = be.rt
    x = xs[0]
    plan = slice_plan(node, tuple(x.shape))
    y = rt.empty(tuple(n for _, _, n in plan))
    if y.size:
        base, dims, strides = _slice_layout(x.shape, plan)
        _strided(rt, x, y, dims, strides, base)
    return [y], Saved(be, shape=tuple(x.shape), plan=plan)


@register(B, "slice", "backward")
def slice_bwd(be, node, saved, gys, need):
    if not need.inputs[0]:
        return [None], {}
    rt = be.rt
    g = gys[0]
    gx = rt.zeros(saved["shape"])
    if g.size:
        base, dims, strides = _slice_layout(saved["shape"], saved["plan"])
        _strided(rt, g, gx, dims, strides, base, scatter=True)
    return [gx], {}


# ---------------------------------------------------------------------------------------------------------------
# layer_norm


def _ln_layout(node, x):
    ax = ln_axis(node, x.ndim)
    D = _size(x.shape[ax:])
    return x.size // max(D, 1), D


def _ln_params(be, node):
    g = be.param(node, "gamma") if be.has_param(node, "gamma") else None
    b = be.param(node, "beta") if be.has_param(node, "beta") else None
    return g, b


@register(B, "layer_norm")
def layer_norm_fwd(be, node, xs, training):
    rt = be.rt
    x = xs[0]
    rows, D = _ln_layout(node, x)
    gamma, beta = _ln_params(be, node)
    y = rt.empty(x.shape)
    mean, istd = rt.empty((rows,)), rt.empty((rows,))
    if x.size:
        run(rt, TS, "ln_fwd", (rows,), x, gamma if gamma is not None else x, beta if beta is not None else x,
            i32(gamma is not None), i32(beta is not None), y, mean, istd, i32(rows), i32(D), f32(ln_eps(node)))
    return [y], Saved(be, temps=[mean, istd], x=x, mean=mean, istd=istd)


@register(B, "layer_norm", "backward")
def layer_norm_bwd(be, node, saved, gys, need):
    rt = be.rt
    x, mean, istd, g = saved["x"], saved["mean"], saved["istd"], gys[0]
    rows, D = _ln_layout(node, x)
    gamma, beta = _ln_params(be, node)
    gx = None
    if need.inputs[0]:
        gx = rt.empty(x.shape)
        if x.size:
            run(rt, TS, "ln_bwd", (rows,), x, g, gamma if gamma is not None else x, i32(gamma is not None), mean,
                istd, gx, i32(rows), i32(D))
    gp = {}
    if need.params and (gamma is not None or beta is not None):
        sg, sgx = rt.empty(beta.shape if beta is not None else (D,)), rt.empty(
            gamma.shape if gamma is not None else (D,))
        if x.size:
            nch, chunk = chunking(rows, D)
            pg, pgx = (sg, sgx) if nch == 1 else (rt.empty((nch, D)), rt.empty((nch, D)))
            run(rt, TS, "ln_param_partial", (-(-D // 8), nch), x, g, mean, istd, i32(rows), i32(D), i32(chunk),
                i32(nch), pg, pgx)
            if nch > 1:
                run(rt, EW, "colsum_final", (D, 1), pg, i32(nch), i32(D), i32(1), sg)
                run(rt, EW, "colsum_final", (D, 1), pgx, i32(nch), i32(D), i32(1), sgx)
                pg.release()
                pgx.release()
        else:
            rt.fill(sg, 0.0)
            rt.fill(sgx, 0.0)
        for key, v in (("gamma", sgx), ("beta", sg)):
            if be.has_param(node, key):
                gp[key] = v
            else:
                v.release()
    saved.release()
    return [gx], gp


# ---------------------------------------------------------------------------------------------------------------
# Unary ops


def _unary_args(node, op):
    """(kernel op code, P, IP) for tensor.cl unary_fwd / unary_bwd."""
    if op == "erf":
        return 0, 0.0, 0
    if op == "gelu":
        return (2 if gelu_tanh(node) else 1), 0.0, 0
    if op == "sqrt":
        return 3, 0.0, 0
    if op == "pow":
        e = pow_exponent(node)
        if e == int(e) and abs(e) < 2 ** 31 - 1:
            return 5, e, int(e)
        return 4, e, 0
    if op == "reciprocal":
        return 6, 0.0, 0
    return 7, 0.0, 0  # neg


UNARY_SAVES = {"erf": "x", "gelu": "x", "sqrt": "y", "pow": "x", "reciprocal": "y", "neg": None}


def _make_unary(op, keep):
    @register(B, op)
    def fwd(be, node, xs, training):
        rt = be.rt
        x = xs[0]
        code, p, ip = _unary_args(node, op)
        y = rt.empty(x.shape)
        n = x.size
        if n:
            run(rt, TS, "unary_fwd", _groups8(n), x, y, i32(n), i32(code), f32(p), i32(ip))
        return [y], Saved(be, s=None if keep is None else (x if keep == "x" else y))

    @register(B, op, "backward")
    def bwd(be, node, saved, gys, need):
        gx = None
        if need.inputs[0]:
            rt = be.rt
            g = gys[0]
            code, p, ip = _unary_args(node, op)
            s = saved["s"] if keep is not None else g
            gx = rt.empty(g.shape)
            n = g.size
            if n:
                run(rt, TS, "unary_bwd", _groups8(n), s, g, gx, i32(n), i32(code), f32(p), i32(ip))
        saved.release()
        return [gx], {}

    return fwd, bwd


for _op, _keep in UNARY_SAVES.items():
    _make_unary(_op, _keep)


# ---------------------------------------------------------------------------------------------------------------
# sub / div


def _two(node, xs):
    if len(xs) != 2:
        raise ValueError(f"{node.op if node is not None else 'op'} takes exactly two inputs, got {len(xs)}")
    return xs


def _to_shape(rt, t, shape):
    """t summed down to `shape` (t released when a new tensor replaces it)."""
    if tuple(t.shape) == tuple(shape):
        return t
    r = reduce_to(rt, t, shape)
    t.release()
    return r


@register(B, "sub")
def sub_fwd(be, node, xs, training):
    a, b = _two(node, xs)
    return [binary(be.rt, "sub", a, b)], Saved(be, shapes=[tuple(a.shape), tuple(b.shape)])


@register(B, "sub", "backward")
def sub_bwd(be, node, saved, gys, need):
    rt = be.rt
    g = gys[0]
    sa, sb = saved["shapes"]
    ga = reduce_to(rt, g, sa) if need.inputs[0] else None
    gb = _negate(rt, reduce_to(rt, g, sb)) if need.inputs[1] else None
    return [ga, gb], {}


@register(B, "div")
def div_fwd(be, node, xs, training):
    a, b = _two(node, xs)
    y = binary(be.rt, "div", a, b)
    return [y], Saved(be, shape_a=tuple(a.shape), b=b, y=y)


@register(B, "div", "backward")
def div_bwd(be, node, saved, gys, need):
    rt = be.rt
    g, b, y = gys[0], saved["b"], saved["y"]
    ga = gb = None
    if need.inputs[0]:  # g / b
        ga = _to_shape(rt, binary(rt, "div", g, b), saved["shape_a"])
    if need.inputs[1]:  # -sum(g * y / b)
        t = binary(rt, "mul", g, y)
        binary(rt, "div", t, b, out=t)
        gb = _negate(rt, _to_shape(rt, t, b.shape))
    return [ga, gb], {}


# ---------------------------------------------------------------------------------------------------------------
# reduce_mean / reduce_sum


def _count(shape, axes):
    return max(_size([shape[a] for a in axes]), 1)


def _make_reduce(op):
    mean = op == "reduce_mean"

    @register(B, op)
    def fwd(be, node, xs, training):
        rt = be.rt
        x = xs[0]
        axes = reduce_axes(node, x.ndim)
        kshape = reduce_shape(x.shape, axes, True)
        scale = 1.0 / _count(x.shape, axes) if mean else 1.0
        dims, flags, _ = collapse(x.shape, [kshape])
        if x.size and len(dims) == 2 and [f[0] for f in flags] == [False, True]:  # trailing axes: one work-item per row
            y = rt.empty(kshape)
            run(rt, TS, "row_reduce", (dims[0],), x, y, i32(dims[0]), i32(dims[1]), f32(scale))
        else:
            y = reduce_to(rt, x, kshape)
            if scale != 1.0 and y.size:
                act_forward(rt, "affine", y, out=y, p0=scale, p1=0.0)
        out_shape = reduce_shape(x.shape, axes, reduce_keepdims(node))
        if tuple(out_shape) != tuple(kshape):
            y.shape = tuple(out_shape)  # y is this op's own fresh tensor: relabel, do not copy
        return [y], Saved(be, shape=tuple(x.shape), axes=axes)

    @register(B, op, "backward")
    def bwd(be, node, saved, gys, need):
        if not need.inputs[0]:
            return [None], {}
        rt = be.rt
        shape, axes = saved["shape"], saved["axes"]
        g = gys[0]
        gx = rt.empty(shape)
        if gx.size:
            dims, _, (st,) = collapse(shape, [reduce_shape(shape, axes, True)])
            _strided(rt, g, gx, dims, st, scale=1.0 / _count(shape, axes) if mean else 1.0)
        return [gx], {}

    return fwd, bwd


_make_reduce("reduce_mean")
_make_reduce("reduce_sum")
