"""Numpy reference (backend "numpy") for every op except convolution, dense and pooling; forward and backward.

Float64 on the test backend (the backend's dtype otherwise). The OpenCL versions in cl_elementwise.py are checked
against these, and these against finite differences (tests/test_ops_elementwise.py). Also the loss functions
`softmax_xent` and `softmax_xent_forward` (kind "fn").

Semantics shared with the OpenCL side:
- Activations: relu6 / clip / hard_sigmoid pass the gradient strictly inside their linear range; hard_swish's
  derivative is 0 below -3, 1 above 3 and (2x + 3) / 6 between.
- lrn: ONNX, over the last axis: S_c = sum of x^2 over channels [c - (size-1)//2, c + ceil((size-1)/2)],
  y = x / (bias + alpha / size * S)^beta.
- dropout: the mask is a hash of (seed, step, element index) (`dropout_key`, `dropout_keep`), identical bit for bit
  on both backends, so one (seed, step) gives one mask. `step` is `be.step` when the training loop sets it (then a
  resumed run draws the same masks), else a per-node counter on the backend that each dropout backward advances (a
  new mask every training step).
- batchnorm training: batch statistics over all axes but the last; running statistics updated in place on the
  backend's parameter tensors, new = momentum * old + (1 - momentum) * batch with the unbiased batch variance.
"""
import zlib

import numpy as np

from . import register

B = "numpy"


class Saved(dict):
    """What a forward keeps for its backward. `release()` frees only the temporaries listed in `temps` (never the
    op's inputs or outputs, which the executor owns); backwards call it when done, the executor when unused."""

    def __init__(self, be, temps=(), **kw):
        super().__init__(**kw)
        self.be = be
        self.temps = [t for t in temps if t is not None]

    def release(self):
        for t in self.temps:
            self.be.release(t)
        self.temps = []


def _attr(node, key, default):
    if node is None:
        return default
    v = node.attrs.get(key, default)
    return default if v is None else v


def _out(x, dtype):
    return np.asarray(x, dtype=dtype)


def unbroadcast(g, shape):
    """Sum a gradient of the broadcast output shape back to an input's shape."""
    shape = tuple(shape)
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(lead))) if lead > 0 else g
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# Pointwise activations: forward f(x) and derivative from the saved tensor (x, or y for sigmoid/tanh).


def _sigmoid(x):
    # Stable for large |x|: no exp overflow.
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _clip_bounds(node):
    lo = _attr(node, "min", -np.inf)
    hi = _attr(node, "max", np.inf)
    return float(lo), float(hi)


def _hs_params(node):
    return float(_attr(node, "alpha", 0.2)), float(_attr(node, "beta", 0.5))


ACTS = {
    # op: (forward(node, x), grad(node, saved, gy), saves "x" or "y")
    "relu": (lambda n, x: np.maximum(x, 0), lambda n, s, g: g * (s > 0), "x"),
    "relu6": (lambda n, x: np.clip(x, 0, 6), lambda n, s, g: g * ((s > 0) & (s < 6)), "x"),
    "clip": (lambda n, x: np.minimum(np.maximum(x, _clip_bounds(n)[0]), _clip_bounds(n)[1]),
             lambda n, s, g: g * ((s > _clip_bounds(n)[0]) & (s < _clip_bounds(n)[1])), "x"),
    "leaky_relu": (lambda n, x: np.where(x > 0, x, x * float(_attr(n, "alpha", 0.3))),
                   lambda n, s, g: np.where(s > 0, g, g * float(_attr(n, "alpha", 0.3))), "x"),
    "sigmoid": (lambda n, x: _sigmoid(x), lambda n, s, g: g * s * (1 - s), "y"),
    "tanh": (lambda n, x: np.tanh(x), lambda n, s, g: g * (1 - s * s), "y"),
    "swish": (lambda n, x: x * _sigmoid(x),
              lambda n, s, g: g * (_sigmoid(s) * (1 + s * (1 - _sigmoid(s)))), "x"),
    "hard_sigmoid": (lambda n, x: np.clip(_hs_params(n)[0] * x + _hs_params(n)[1], 0, 1),
                     lambda n, s, g: g * _hs_params(n)[0]
                     * ((_hs_params(n)[0] * s + _hs_params(n)[1] > 0) & (_hs_params(n)[0] * s + _hs_params(n)[1] < 1)),
                     "x"),
    "hard_swish": (lambda n, x: x * np.clip(x + 3, 0, 6) / 6,
                   lambda n, s, g: g * np.where(s > 3, 1.0, np.where(s > -3, (2 * s + 3) / 6, 0.0)), "x"),
}


def _make_act(op, f, df, keep):
    @register(B, op)
    def fwd(be, node, xs, training):
        x = xs[0]
        y = _out(f(node, x), x.dtype)
        return [y], Saved(be, s=x if keep == "x" else y)

    @register(B, op, "backward")
    def bwd(be, node, saved, gys, need):
        s = saved["s"]
        gx = _out(df(node, s, gys[0]), s.dtype) if need.inputs[0] else None
        saved.release()
        return [gx], {}

    return fwd, bwd


for _op, (_f, _df, _keep) in ACTS.items():
    _make_act(_op, _f, _df, _keep)


# ---------------------------------------------------------------------------------------------------------------
# fake_quant: ONNX QuantizeLinear then DequantizeLinear, per tensor (the activations of an int8 QDQ export).

QUANT_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}


def fake_quant_params(node):
    """(scale, lo, hi): y = clamp(rint(x / scale), lo, hi) * scale with lo/hi = qmin/qmax - zero_point (rint(a) + zp
    = rint(a + zp) for an integer zero point, so this is QuantizeLinear's rounding, ties to even)."""
    dtype = node.attrs.get("dtype", "uint8")
    if dtype not in QUANT_RANGES:
        raise ValueError(f"fake_quant dtype {dtype!r} is not uint8 or int8")
    scale, zp = float(node.attrs["scale"]), int(node.attrs.get("zero_point", 0))
    if not scale > 0 or not np.isfinite(scale):
        raise ValueError(f"fake_quant scale {scale!r} is not a positive number")
    qmin, qmax = QUANT_RANGES[dtype]
    if not qmin <= zp <= qmax:
        raise ValueError(f"fake_quant zero point {zp} is outside the {dtype} range")
    return scale, float(qmin - zp), float(qmax - zp)


@register(B, "fake_quant")
def fake_quant_fwd(be, node, xs, training):
    scale, lo, hi = fake_quant_params(node)
    x = xs[0]
    # float32 arithmetic, as QuantizeLinear in onnxruntime and the OpenCL kernel compute it.
    q = np.clip(np.rint(np.asarray(x, np.float32) / np.float32(scale)), lo, hi)
    return [_out(q * scale, x.dtype)], Saved(be, s=x)


@register(B, "fake_quant", "backward")
def fake_quant_bwd(be, node, saved, gys, need):
    scale, lo, hi = fake_quant_params(node)
    s = saved["s"]
    gx = _out(gys[0] * ((s > lo * scale) & (s < hi * scale)), s.dtype) if need.inputs[0] else None
    saved.release()
    return [gx], {}


# ---------------------------------------------------------------------------------------------------------------
# add / mul (two or more inputs, numpy broadcasting)


@register(B, "add")
def add_fwd(be, node, xs, training):
    y = xs[0]
    for x in xs[1:]:
        y = y + x
    return [_out(y, xs[0].dtype)], Saved(be, shapes=[x.shape for x in xs])


@register(B, "add", "backward")
def add_bwd(be, node, saved, gys, need):
    g = gys[0]
    gxs = [unbroadcast(g, s).copy() if n else None for s, n in zip(saved["shapes"], need.inputs)]
    return gxs, {}


@register(B, "mul")
def mul_fwd(be, node, xs, training):
    y = xs[0]
    for x in xs[1:]:
        y = y * x
    return [_out(y, xs[0].dtype)], Saved(be, xs=list(xs))


@register(B, "mul", "backward")
def mul_bwd(be, node, saved, gys, need):
    xs = saved["xs"]
    g = gys[0]
    gxs = []
    for i, x in enumerate(xs):
        if not need.inputs[i]:
            gxs.append(None)
            continue
        p = g
        for j, o in enumerate(xs):
            if j != i:
                p = p * o
        gxs.append(np.array(unbroadcast(p, x.shape), dtype=x.dtype))
    return gxs, {}


# ---------------------------------------------------------------------------------------------------------------
# scale: y = x * scale + offset (scalar attributes, or per-channel parameters `scale`, `offset`)


def scale_operand(be, node, key, default):
    """(value, is_param): the parameter when the node has it, else the attribute (scalar or per-channel list)."""
    if be.has_param(node, key):
        return be.param(node, key), True
    v = np.asarray(_attr(node, key, default), dtype=np.float64)
    return (float(v) if v.size == 1 else v), False


@register(B, "scale")
def scale_fwd(be, node, xs, training):
    x = xs[0]
    s, _ = scale_operand(be, node, "scale", 1.0)
    o, _ = scale_operand(be, node, "offset", 0.0)
    return [_out(x * s + o, x.dtype)], Saved(be, x=x)


@register(B, "scale", "backward")
def scale_bwd(be, node, saved, gys, need):
    x, g = saved["x"], gys[0]
    s, _ = scale_operand(be, node, "scale", 1.0)
    gx = _out(g * s, x.dtype) if need.inputs[0] else None
    gp = {}
    if need.params:
        if be.has_param(node, "scale"):
            p = be.param(node, "scale")
            gp["scale"] = _out(unbroadcast(g * x, p.shape), p.dtype)
        if be.has_param(node, "offset"):
            p = be.param(node, "offset")
            gp["offset"] = _out(unbroadcast(g, p.shape), p.dtype)
    return [gx], gp


# ---------------------------------------------------------------------------------------------------------------
# softmax


def _axis(node, ndim, default=-1):
    ax = int(_attr(node, "axis", default))
    return ax + ndim if ax < 0 else ax


@register(B, "softmax")
def softmax_fwd(be, node, xs, training):
    x = xs[0]
    ax = _axis(node, x.ndim)
    e = np.exp(x - np.max(x, axis=ax, keepdims=True))
    y = _out(e / np.sum(e, axis=ax, keepdims=True), x.dtype)
    return [y], Saved(be, y=y)


@register(B, "softmax", "backward")
def softmax_bwd(be, node, saved, gys, need):
    y, g = saved["y"], gys[0]
    if not need.inputs[0]:
        return [None], {}
    ax = _axis(node, y.ndim)
    return [_out(y * (g - np.sum(g * y, axis=ax, keepdims=True)), y.dtype)], {}


# ---------------------------------------------------------------------------------------------------------------
# Data movement: concat, flatten, reshape, transpose, identity


@register(B, "concat")
def concat_fwd(be, node, xs, training):
    ax = _axis(node, xs[0].ndim)
    return [np.concatenate(xs, axis=ax)], Saved(be, sizes=[x.shape[ax] for x in xs], ax=ax)


@register(B, "concat", "backward")
def concat_bwd(be, node, saved, gys, need):
    g, ax = gys[0], saved["ax"]
    cuts = np.cumsum(saved["sizes"])[:-1]
    parts = np.split(g, cuts, axis=ax)
    return [p.copy() if n else None for p, n in zip(parts, need.inputs)], {}


def reshape_target(node, x_shape):
    """The full output shape (batch first) of flatten / reshape for an input shape."""
    n = x_shape[0]
    if node.op == "flatten":
        return (n, int(np.prod(x_shape[1:])) if len(x_shape) > 1 else 1)
    shape = [int(v) for v in node.attrs["shape"]]
    # ONNX: 0 copies the input's dimension at that position.
    shape = [x_shape[i + 1] if v == 0 and i + 1 < len(x_shape) else v for i, v in enumerate(shape)]
    total = int(np.prod(x_shape[1:]))
    if -1 in shape:
        known = int(np.prod([v for v in shape if v != -1]))
        shape[shape.index(-1)] = total // max(known, 1)
    if int(np.prod(shape)) != total:
        raise ValueError(f"reshape {node.name}: cannot reshape {tuple(x_shape)} to (N, {tuple(shape)})")
    return (n,) + tuple(shape)


def _make_reshape(op):
    @register(B, op)
    def fwd(be, node, xs, training):
        x = xs[0]
        return [x.reshape(reshape_target(node, x.shape)).copy()], Saved(be, shape=x.shape)

    @register(B, op, "backward")
    def bwd(be, node, saved, gys, need):
        return [gys[0].reshape(saved["shape"]).copy() if need.inputs[0] else None], {}


_make_reshape("flatten")
_make_reshape("reshape")


@register(B, "identity")
def identity_fwd(be, node, xs, training):
    return [xs[0].copy()], Saved(be)


@register(B, "identity", "backward")
def identity_bwd(be, node, saved, gys, need):
    return [gys[0].copy() if need.inputs[0] else None], {}


@register(B, "transpose")
def transpose_fwd(be, node, xs, training):
    perm = [int(p) for p in node.attrs["perm"]]
    return [np.ascontiguousarray(np.transpose(xs[0], perm))], Saved(be, perm=perm)


@register(B, "transpose", "backward")
def transpose_bwd(be, node, saved, gys, need):
    if not need.inputs[0]:
        return [None], {}
    inv = np.argsort(saved["perm"])
    return [np.ascontiguousarray(np.transpose(gys[0], inv))], {}


# ---------------------------------------------------------------------------------------------------------------
# LRN across the last axis (ONNX)


def lrn_params(node):
    size = int(_attr(node, "size", 5))
    return size, float(_attr(node, "alpha", 1e-4)), float(_attr(node, "beta", 0.75)), float(_attr(node, "bias", 1.0))


def _window_sum(v, size, before):
    """sum over t in [0, size) of v[..., c - before + t] (zero outside), along the last axis."""
    C = v.shape[-1]
    pad = [(0, 0)] * (v.ndim - 1) + [(before, size - 1 - before)]
    vp = np.pad(v, pad)
    out = np.zeros_like(v)
    for t in range(size):
        out += vp[..., t:t + C]
    return out


@register(B, "lrn")
def lrn_fwd(be, node, xs, training):
    x = xs[0]
    size, alpha, beta, bias = lrn_params(node)
    lo = (size - 1) // 2
    d = bias + alpha / size * _window_sum(x * x, size, lo)
    return [_out(x * d ** -beta, x.dtype)], Saved(be, x=x)


@register(B, "lrn", "backward")
def lrn_bwd(be, node, saved, gys, need):
    if not need.inputs[0]:
        return [None], {}
    x, g = saved["x"], gys[0]
    size, alpha, beta, bias = lrn_params(node)
    lo = (size - 1) // 2
    hi = size - 1 - lo
    d = bias + alpha / size * _window_sum(x * x, size, lo)
    w = g * x * d ** (-beta - 1)
    # Channel j lies in the window of channels c in [j - hi, j + lo].
    t = _window_sum(w, size, hi)
    return [_out(g * d ** -beta - 2 * alpha / size * beta * x * t, x.dtype)], {}


# ---------------------------------------------------------------------------------------------------------------
# dropout


def _lowbias32(h):
    """Wellons' lowbias32 on a uint32 array (wrapping multiplies, as in OpenCL)."""
    h = np.asarray(h, dtype=np.uint32)
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0x846CA68B)
    h = h ^ (h >> np.uint32(16))
    return h


def dropout_seed(node):
    s = _attr(node, "seed", None)
    return int(s) if s is not None else zlib.crc32(node.name.encode())


def dropout_step(be, node):
    s = getattr(be, "step", None)
    if s is not None:
        return int(s)
    return getattr(be, "_dropout_steps", {}).get(node.name, 0)


def dropout_advance(be, node):
    """After a backward: the next training step of this node draws a new mask (unless `be.step` drives it)."""
    if getattr(be, "step", None) is None:
        d = getattr(be, "_dropout_steps", None)
        if d is None:
            d = {}
            be._dropout_steps = d
        d[node.name] = d.get(node.name, 0) + 1


def _lowbias32_int(h):
    h &= 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def dropout_key(seed, step):
    """32-bit key of a (seed, step) pair."""
    k = _lowbias32_int((int(seed) & 0xFFFFFFFF) ^ 0x9E3779B9)
    return _lowbias32_int(k ^ ((int(step) * 0x85EBCA6B) & 0xFFFFFFFF))


def dropout_threshold(rate):
    """Keep an element when its 24-bit hash is >= this threshold (P(drop) = rate)."""
    return int(min(max(round(float(rate) * (1 << 24)), 0), 1 << 24))


def dropout_keep(n, key, thr):
    """Boolean keep-mask of n elements (flat), the same function as kernels/elementwise.cl `dropout`."""
    h = _lowbias32(np.arange(n, dtype=np.uint32) ^ np.uint32(key))
    return (h >> np.uint32(8)) >= np.uint32(thr)


def dropout_plan(be, node, training):
    """(key, thr, scale) when the op drops anything, else None (inference, rate 0)."""
    rate = float(_attr(node, "rate", 0.0))
    if not training or rate <= 0.0:
        return None
    if rate >= 1.0:
        return dropout_key(dropout_seed(node), dropout_step(be, node)), 1 << 24, 0.0
    return dropout_key(dropout_seed(node), dropout_step(be, node)), dropout_threshold(rate), 1.0 / (1.0 - rate)


@register(B, "dropout")
def dropout_fwd(be, node, xs, training):
    x = xs[0]
    plan = dropout_plan(be, node, training)
    if plan is None:
        return [x.copy()], Saved(be, plan=None)
    key, thr, scale = plan
    keep = dropout_keep(x.size, key, thr).reshape(x.shape)
    return [_out(np.where(keep, x * scale, 0.0), x.dtype)], Saved(be, plan=plan)


@register(B, "dropout", "backward")
def dropout_bwd(be, node, saved, gys, need):
    g = gys[0]
    plan = saved["plan"]
    if plan is not None:
        dropout_advance(be, node)
    if not need.inputs[0]:
        return [None], {}
    if plan is None:
        return [g.copy()], {}
    key, thr, scale = plan
    keep = dropout_keep(g.size, key, thr).reshape(g.shape)
    return [_out(np.where(keep, g * scale, 0.0), g.dtype)], {}


# ---------------------------------------------------------------------------------------------------------------
# batchnorm


def bn_eps(node):
    return float(_attr(node, "eps", 1e-3))


def bn_momentum(node):
    return float(_attr(node, "momentum", 0.99))


@register(B, "batchnorm")
def batchnorm_fwd(be, node, xs, training):
    if node.attrs.get("concat"):  # over the channel Concat of its inputs (plan.fold_frozen; frozen, inference only)
        if training:
            raise ValueError(f"{node.name}: a BatchNorm fused with the Concat before it runs in inference mode only")
        xs = [np.concatenate([np.asarray(x) for x in xs], axis=-1)]
    x = xs[0]
    C = x.shape[-1]
    eps = bn_eps(node)
    gamma = be.param(node, "gamma") if be.has_param(node, "gamma") else np.ones(C, x.dtype)
    beta = be.param(node, "beta") if be.has_param(node, "beta") else np.zeros(C, x.dtype)
    rm, rv = be.param(node, "mean"), be.param(node, "var")
    if training:
        axes = tuple(range(x.ndim - 1))
        M = x.size // C
        mean = x.mean(axis=axes)
        var = ((x - mean) ** 2).mean(axis=axes)
        mom = bn_momentum(node)
        rm[...] = mom * rm + (1 - mom) * mean
        rv[...] = mom * rv + (1 - mom) * var * (M / max(M - 1, 1))
    else:
        mean, var = np.asarray(rm), np.asarray(rv)
    istd = 1.0 / np.sqrt(var + eps)
    y = (x - mean) * (gamma * istd) + beta
    act = node.attrs.get("act")  # a ReLU/ReLU6 fused by plan.fold_frozen
    out = ACTS[act][0](node, y) if act else y
    if node.attrs.get("pool"):  # and the global average pool after it (plan.fold_frozen)
        out = out.mean(axis=tuple(range(1, x.ndim - 1)), keepdims=bool(node.attrs.get("keepdims")))
    return [_out(out, x.dtype)], Saved(be, x=x, y=y, mean=mean, istd=istd, training=bool(training))


@register(B, "batchnorm", "backward")
def batchnorm_bwd(be, node, saved, gys, need):
    x, g = saved["x"], gys[0]
    mean, istd, training = saved["mean"], saved["istd"], saved["training"]
    C = x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    M = x.size // C
    gamma = be.param(node, "gamma") if be.has_param(node, "gamma") else np.ones(C, x.dtype)
    if node.attrs.get("pool"):  # the pooled gradient spreads evenly over each image's pixels
        hw = x.size // (x.shape[0] * C)
        g = np.broadcast_to(g.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (C,)) / hw, x.shape)
    act = node.attrs.get("act")
    if act:
        g = ACTS[act][1](node, saved["y"], g)
    xhat = (x - mean) * istd
    sg = g.sum(axis=axes)
    sgx = (g * xhat).sum(axis=axes)
    gx = None
    if need.inputs[0]:
        if training:
            gx = gamma * istd * (g - sg / M - xhat * sgx / M)
        else:
            gx = g * (gamma * istd)
        gx = _out(gx, x.dtype)
    gp = {}
    if need.params:
        if be.has_param(node, "gamma"):
            gp["gamma"] = _out(sgx, x.dtype)
        if be.has_param(node, "beta"):
            gp["beta"] = _out(sg, x.dtype)
    saved.release()
    return [gx], gp


# ---------------------------------------------------------------------------------------------------------------
# Loss (kind "fn")


def xent_targets(labels, K, label_smoothing):
    q = np.full((labels.shape[0], K), float(label_smoothing) / K)
    q[np.arange(labels.shape[0]), labels] += 1.0 - float(label_smoothing)
    return q


def check_labels(labels, K):
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= K):
        raise ValueError(f"labels must lie in [0, {K}); got values from {labels.min()} to {labels.max()}")
    return labels


def _xent_core(z, labels, label_smoothing):
    z = np.asarray(z, dtype=np.float64)
    K = z.shape[1]
    zs = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(zs).sum(axis=1))
    p = np.exp(zs - lse[:, None])
    q = xent_targets(labels, K, label_smoothing)
    loss = lse - (q * zs).sum(axis=1)
    return loss, p, q


@register(B, "softmax_xent", "fn")
def softmax_xent(be, logits, labels, label_smoothing=0.0, class_weights=None):
    """(weighted mean loss as a float, d loss / d logits in the logits' shape (N, K)); loss = sum_i w_{y_i} l_i /
    sum_i w_{y_i}. Targets (1 - label_smoothing) * onehot + label_smoothing / K, as Keras."""
    shape = np.shape(logits)
    z = np.asarray(logits).reshape(-1, shape[-1])
    labels = check_labels(be.to_host(labels), z.shape[1])
    loss, p, q = _xent_core(z, labels, label_smoothing)
    if class_weights is None:
        w = np.ones(len(labels))
    else:
        w = np.asarray(be.to_host(class_weights), dtype=np.float64).reshape(-1)[labels]
    wsum = float(w.sum())
    if wsum == 0.0:
        return 0.0, np.zeros(shape, z.dtype)
    grad = (w / wsum)[:, None] * (p - q)
    return float((w * loss).sum() / wsum), grad.astype(z.dtype).reshape(shape)


@register(B, "softmax_xent_forward", "fn")
def softmax_xent_forward(be, logits, labels=None, label_smoothing=0.0, class_weights=None):
    """(per-sample unweighted losses as a float64 numpy array (N,) or None without labels, probabilities in the
    logits' shape (N, K)). class_weights is accepted for symmetry and not applied to per-sample losses."""
    shape = np.shape(logits)
    z = np.asarray(logits).reshape(-1, shape[-1])
    if labels is None:
        zs = z - z.max(axis=1, keepdims=True)
        e = np.exp(zs)
        return None, (e / e.sum(axis=1, keepdims=True)).astype(z.dtype).reshape(shape)
    labels = check_labels(be.to_host(labels), z.shape[1])
    loss, p, _ = _xent_core(z, labels, label_smoothing)
    return loss, p.astype(z.dtype).reshape(shape)
