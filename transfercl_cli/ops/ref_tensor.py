"""Numpy reference (backend "numpy") of the tensor ops of issue 14, forward and backward: slice, layer_norm, the
unary ops erf / gelu / sqrt / pow / reciprocal / neg, the broadcasting binaries sub / div, and reduce_mean /
reduce_sum. Float64 on the test backend; the OpenCL versions (cl_tensor.py, kernels/tensor.cl) are checked against
these, and these against finite differences (tests/test_ops_tensor.py).

Semantics shared with the OpenCL side (axes count in the full rank, 0 = batch, negative from the end; an axis 0 is
refused by shape inference, tcl never slices or reduces over the batch):
- slice: attrs axes, starts, ends, steps (steps optional, default 1): Python / ONNX slicing per axis, negative
  indices from the end, out-of-range starts/ends clamped, negative steps walk backwards (`slice_plan`).
- layer_norm: attrs axis (default -1), epsilon (default 1e-5); normalises over axes axis..last (ONNX
  LayerNormalization) with the biased variance: y = (x - mean) / sqrt(var + epsilon) * gamma + beta. Params gamma
  and beta have the normalised dims' shape (or the same size, leading 1s allowed); both optional (1 and 0).
- gelu: attr approximate "none" (0.5 x (1 + erf(x / sqrt 2))) or "tanh" (0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715
  x^3)))). pow: attr exponent (a float constant), y = x ** exponent as numpy (NaN for a negative base and a
  non-integer exponent); its derivative exponent * x ** (exponent - 1), 0 for exponent 0.
- sub / div: exactly two inputs, numpy broadcasting; a - b, a / b.
- reduce_mean / reduce_sum: attrs axes (default: every axis but the batch), keepdims (default True, as ONNX).
"""
import numpy as np

from . import register
from .ref_elementwise import Saved, _attr, _out, unbroadcast

B = "numpy"

GELU_C = float(np.sqrt(2.0 / np.pi))
GELU_K = 0.044715


# ---------------------------------------------------------------------------------------------------------------
# Attribute helpers shared with cl_tensor.py and shapes.py (full-rank shapes, batch first)


def norm_axis(ax, rank):
    """A full-rank axis (negative from the end) as 0..rank-1; ValueError when out of range."""
    a = int(ax)
    a = a + rank if a < 0 else a
    if not 0 <= a < rank:
        raise ValueError(f"axis {ax} is out of range for a rank-{rank} tensor")
    return a


def slice_plan(node, shape):
    """Per axis of the full-rank `shape`: (start, step, length) of the selected elements (Python slice semantics);
    unsliced axes get (0, 1, size). ValueError for axis 0, repeated axes, a step of 0 or lists of unequal length."""
    rank = len(shape)
    axes = [int(a) for a in _attr(node, "axes", [])]
    starts = [int(v) for v in _attr(node, "starts", [])]
    ends = [int(v) for v in _attr(node, "ends", [])]
    steps = [int(v) for v in _attr(node, "steps", [1] * len(axes))]
    if not (len(axes) == len(starts) == len(ends) == len(steps)):
        raise ValueError(f"axes {axes}, starts {starts}, ends {ends} and steps {steps} differ in length")
    plan = [(0, 1, int(s)) for s in shape]
    seen = set()
    for ax, st, en, sp in zip(axes, starts, ends, steps):
        a = norm_axis(ax, rank)
        if a == 0:
            raise ValueError("cannot slice the batch axis (0)")
        if a in seen:
            raise ValueError(f"axis {ax} is sliced twice")
        if sp == 0:
            raise ValueError("a slice step cannot be 0")
        seen.add(a)
        start, stop, step = slice(st, en, sp).indices(int(shape[a]))
        plan[a] = (start, step, len(range(start, stop, step)))
    return plan


def slice_index(plan):
    """The numpy index (tuple of slices) of a plan."""
    idx = []
    for start, step, n in plan:
        if n == 0:
            idx.append(slice(0, 0))
        else:
            stop = start + step * n
            idx.append(slice(start, stop if stop >= 0 else None, step))
    return tuple(idx)


def ln_axis(node, rank):
    return norm_axis(_attr(node, "axis", -1), rank)


def ln_eps(node):
    return float(_attr(node, "epsilon", 1e-5))


def reduce_axes(node, rank):
    """Sorted full-rank axes of a reduce_* node (default: every axis but the batch); ValueError for axis 0."""
    axes = _attr(node, "axes", None)
    if axes is None or (not np.isscalar(axes) and len(axes) == 0):
        return tuple(range(1, rank))
    axes = [axes] if np.isscalar(axes) else list(axes)
    out = sorted({norm_axis(a, rank) for a in axes})
    if len(out) != len(axes):
        raise ValueError(f"axes {axes} repeat an axis")
    if 0 in out:
        raise ValueError("cannot reduce over the batch axis (0)")
    return tuple(out)


def reduce_keepdims(node):
    return bool(_attr(node, "keepdims", True))


def reduce_shape(shape, axes, keepdims):
    if keepdims:
        return tuple(1 if i in axes else int(s) for i, s in enumerate(shape))
    return tuple(int(s) for i, s in enumerate(shape) if i not in axes)


def pow_exponent(node):
    return float(_attr(node, "exponent", 1.0))


def gelu_tanh(node):
    a = _attr(node, "approximate", "none")
    a = a.decode() if isinstance(a, bytes) else str(a)
    if a not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', not {a!r}")
    return a == "tanh"


# ---------------------------------------------------------------------------------------------------------------
# slice


@register(B, "slice")
def slice_fwd(be, node, xs, training):
    x = xs[0]
    plan = slice_plan(node, x.shape)
    return [np.ascontiguousarray(x[slice_index(plan)])], Saved(be, shape=x.shape, plan=plan)


@register(B, "slice", "backward")
def slice_bwd(be, node, saved, gys, need):
    if not need.inputs[0]:
        return [None], {}
    g = gys[0]
    gx = np.zeros(saved["shape"], dtype=g.dtype)
    gx[slice_index(saved["plan"])] = g
    return [gx], {}


# ---------------------------------------------------------------------------------------------------------------
# layer_norm


def ln_param(be, node, key, norm_shape, dtype):
    """gamma / beta reshaped to the normalised dims, or None when the node has no such parameter."""
    if not be.has_param(node, key):
        return None
    return np.asarray(be.param(node, key), dtype=dtype).reshape(norm_shape)


@register(B, "layer_norm")
def layer_norm_fwd(be, node, xs, training):
    x = xs[0]
    ax = ln_axis(node, x.ndim)
    axes = tuple(range(ax, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    istd = 1.0 / np.sqrt(var + ln_eps(node))
    y = (x - mean) * istd
    gamma = ln_param(be, node, "gamma", x.shape[ax:], x.dtype)
    beta = ln_param(be, node, "beta", x.shape[ax:], x.dtype)
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return [_out(y, x.dtype)], Saved(be, x=x, mean=mean, istd=istd)


@register(B, "layer_norm", "backward")
def layer_norm_bwd(be, node, saved, gys, need):
    x, mean, istd, g = saved["x"], saved["mean"], saved["istd"], gys[0]
    ax = ln_axis(node, x.ndim)
    axes = tuple(range(ax, x.ndim))
    lead = tuple(range(ax))
    xhat = (x - mean) * istd
    gamma = ln_param(be, node, "gamma", x.shape[ax:], x.dtype)
    gx = None
    if need.inputs[0]:
        gh = g * gamma if gamma is not None else g
        gx = _out(istd * (gh - gh.mean(axis=axes, keepdims=True)
                          - xhat * (gh * xhat).mean(axis=axes, keepdims=True)), x.dtype)
    gp = {}
    if need.params:
        for key, v in (("gamma", g * xhat), ("beta", g)):
            if be.has_param(node, key):
                p = be.param(node, key)
                gp[key] = _out(v.sum(axis=lead).reshape(np.shape(p)), x.dtype)
    saved.release()
    return [gx], gp


# ---------------------------------------------------------------------------------------------------------------
# Unary ops: forward f(node, x), derivative df(node, s, g) from the saved tensor s (x, or y), what is saved


def _erf(x):
    # numpy has no erf; math.erf is exact to float64 rounding.
    import math

    x = np.asarray(x, dtype=np.float64)
    return np.vectorize(math.erf, otypes=[np.float64])(x) if x.size else x.copy()


def _gelu(n, x):
    if gelu_tanh(n):
        return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + GELU_K * x ** 3)))
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))


def _gelu_grad(n, x, g):
    if gelu_tanh(n):
        t = np.tanh(GELU_C * (x + GELU_K * x ** 3))
        return g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_K * x * x))
    return g * (0.5 * (1.0 + _erf(x / np.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi))


def _pow(n, x):
    return np.power(x, pow_exponent(n))


def _pow_grad(n, x, g):
    e = pow_exponent(n)
    if e == 0.0:
        return np.zeros_like(g)
    return g * e * np.power(x, e - 1.0)


UNARY = {
    # op: (forward(node, x), grad(node, saved, gy), saves "x", "y" or None)
    "erf": (lambda n, x: _erf(x), lambda n, s, g: g * (2.0 / np.sqrt(np.pi)) * np.exp(-s * s), "x"),
    "gelu": (_gelu, _gelu_grad, "x"),
    "sqrt": (lambda n, x: np.sqrt(x), lambda n, s, g: g * 0.5 / s, "y"),
    "pow": (_pow, _pow_grad, "x"),
    "reciprocal": (lambda n, x: 1.0 / x, lambda n, s, g: -g * s * s, "y"),
    "neg": (lambda n, x: -x, lambda n, s, g: -g, None),
}


def _make_unary(op, f, df, keep):
    @register(B, op)
    def fwd(be, node, xs, training):
        x = xs[0]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            y = _out(f(node, x), x.dtype)
        return [y], Saved(be, s=None if keep is None else (x if keep == "x" else y))

    @register(B, op, "backward")
    def bwd(be, node, saved, gys, need):
        gx = None
        if need.inputs[0]:
            g = gys[0]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                gx = _out(df(node, saved["s"], g), g.dtype)
        saved.release()
        return [gx], {}

    return fwd, bwd


for _op, (_f, _df, _keep) in UNARY.items():
    _make_unary(_op, _f, _df, _keep)


# ---------------------------------------------------------------------------------------------------------------
# sub / div (two inputs, numpy broadcasting)


def _two(node, xs):
    if len(xs) != 2:
        raise ValueError(f"{node.op if node is not None else 'op'} takes exactly two inputs, got {len(xs)}")
    return xs


@register(B, "sub")
def sub_fwd(be, node, xs, training):
    a, b = _two(node, xs)
    return [_out(a - b, a.dtype)], Saved(be, shapes=[a.shape, b.shape])


@register(B, "sub", "backward")
def sub_bwd(be, node, saved, gys, need):
    g = gys[0]
    sa, sb = saved["shapes"]
    ga = np.array(unbroadcast(g, sa), dtype=g.dtype) if need.inputs[0] else None
    gb = np.array(-unbroadcast(g, sb), dtype=g.dtype) if need.inputs[1] else None
    return [ga, gb], {}


@register(B, "div")
def div_fwd(be, node, xs, training):
    a, b = _two(node, xs)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = _out(a / b, a.dtype)
    return [y], Saved(be, shape_a=a.shape, b=b, y=y)


@register(B, "div", "backward")
def div_bwd(be, node, saved, gys, need):
    g, b, y = gys[0], saved["b"], saved["y"]
    with np.errstate(divide="ignore", invalid="ignore"):
        ga = np.array(unbroadcast(g / b, saved["shape_a"]), dtype=g.dtype) if need.inputs[0] else None
        gb = np.array(unbroadcast(-g * y / b, b.shape), dtype=g.dtype) if need.inputs[1] else None
    return [ga, gb], {}


# ---------------------------------------------------------------------------------------------------------------
# reduce_mean / reduce_sum


def _make_reduce(op):
    mean = op == "reduce_mean"

    @register(B, op)
    def fwd(be, node, xs, training):
        x = xs[0]
        axes = reduce_axes(node, x.ndim)
        y = x.mean(axis=axes) if mean else x.sum(axis=axes)
        y = y.reshape(reduce_shape(x.shape, axes, reduce_keepdims(node)))
        return [_out(y, x.dtype)], Saved(be, shape=x.shape, axes=axes)

    @register(B, op, "backward")
    def bwd(be, node, saved, gys, need):
        if not need.inputs[0]:
            return [None], {}
        shape, axes = saved["shape"], saved["axes"]
        g = gys[0].reshape(reduce_shape(shape, axes, True))
        if mean:
            g = g / max(int(np.prod([shape[a] for a in axes])), 1)
        return [np.array(np.broadcast_to(g, shape), dtype=gys[0].dtype)], {}

    return fwd, bwd


_make_reduce("reduce_mean")
_make_reduce("reduce_sum")
