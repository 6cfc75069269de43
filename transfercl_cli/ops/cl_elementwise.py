"""OpenCL (backend "opencl") for every op except convolution, dense and pooling; forward and backward, plus the
loss functions `softmax_xent` / `softmax_xent_forward` (kind "fn"). Semantics: see ref_elementwise.py, which these
match (tests/test_ops_elementwise.py).

Kernels: kernels/elementwise.cl (activations, add/mul, reductions, copies, softmax, LRN, dropout),
kernels/batchnorm.cl (per-channel statistics and affine maps), kernels/loss.cl.

Outputs never alias inputs: the executor releases each tensor to the buffer pool on its own, so a view (free
reshape) of a pooled input would be handed out again while still in use. flatten / reshape / identity copy.
"""
import numpy as np

from . import register
from .ref_elementwise import (Saved, check_labels, fake_quant_params, dropout_advance, dropout_plan, lrn_params, bn_eps, bn_momentum,
                              reshape_target, _attr)
from .shapes import global_pool_shape

B = "opencl"
EW = "elementwise"
BN = "batchnorm"

i32 = np.int32
f32 = np.float32

ACT_CODES = {"copy": 0, "relu": 1, "relu6": 2, "clip": 3, "leaky_relu": 4, "sigmoid": 5, "tanh": 6, "swish": 7,
             "hard_sigmoid": 8, "hard_swish": 9, "affine": 10}
# Activations whose backward reads the output instead of the input: sigmoid and tanh need it; for the piecewise
# linear ones the derivative's test (x > 0, 0 < x < 6, lo < x < hi) gives the same answer on y, and keeping y
# (which the next layer keeps anyway) lets the executor free the input in the forward pass.
SAVES_Y = {"sigmoid", "tanh", "relu", "relu6", "clip"}


def saves_output(op, p0):
    return op in SAVES_Y or (op == "leaky_relu" and p0 > 0)


def _groups8(n):
    return (max(1, -(-int(n) // 8)),)


def _size(shape):
    return int(np.prod(shape, dtype=np.int64))


# ---------------------------------------------------------------------------------------------------------------
# Launch helpers (also used by other modules: copies, broadcast arithmetic, per-channel sums)


def act_params(node, op):
    """The (P0, P1) runtime attributes of an activation kernel."""
    if op == "clip":
        lo = _attr(node, "min", None)
        hi = _attr(node, "max", None)
        return (-np.inf if lo is None else float(lo)), (np.inf if hi is None else float(hi))
    if op == "leaky_relu":
        return float(_attr(node, "alpha", 0.3)), 0.0
    if op == "hard_sigmoid":
        return float(_attr(node, "alpha", 0.2)), float(_attr(node, "beta", 0.5))
    return 0.0, 0.0


def act_forward(rt, op, x, out=None, p0=0.0, p1=0.0):
    """out = act(x) elementwise (op a key of ACT_CODES)."""
    out = out if out is not None else rt.empty(x.shape)
    n = x.size
    if n:
        run(rt, EW, "act_fwd", _groups8(n), x, out, i32(n), i32(ACT_CODES[op]), f32(p0), f32(p1))
    return out


def act_backward(rt, op, s, g, out=None, p0=0.0, p1=0.0):
    out = out if out is not None else rt.empty(g.shape)
    n = g.size
    if n:
        run(rt, EW, "act_bwd", _groups8(n), s, g, out, i32(n), i32(ACT_CODES[op]), f32(p0), f32(p1))
    return out


MASK_CHUNK = 4096  # elements per work-item of act_mask_rows


def act_masked(rt, y, g, op):
    """g through relu or relu6 read from its output y (relu passes where y > 0, relu6 where 0 < y < 6): the gradient
    of a convolution or Dense that carries the activation. CPU style act_mask_rows, else act_bwd (the same bits)."""
    if not getattr(rt, "is_cpu", False):
        return act_backward(rt, op, y, g)
    out = rt.empty(g.shape)
    if g.size:
        k = rt.kernel(EW, "act_mask_rows", {"MASK_CHUNK": MASK_CHUNK})
        rt.launch(k, (-(-g.size // MASK_CHUNK),), (1,), y, g, out, i32(g.size), i32(ACT_CODES[op]))
    return out


def copy(rt, x, shape=None):
    """A fresh pooled copy of x (optionally with another shape of the same size)."""
    out = rt.empty(x.shape if shape is None else shape)
    return rt.copy(x, out)


def collapse(out_shape, in_shapes):
    """Merge adjacent output axes along which every input is either broadcast (size 1) or full in both.

    Returns (dims, flags, strides): collapsed output dims, per dim a tuple of 'input is broadcast' flags, and per
    input its element strides over the collapsed dims (0 where broadcast)."""
    r = len(out_shape)
    ins = [(1,) * (r - len(s)) + tuple(s) for s in in_shapes]
    dims, flags = [], []
    for i, d in enumerate(out_shape):
        if d == 1:
            continue
        f = tuple(s[i] == 1 for s in ins)
        if dims and flags[-1] == f:
            dims[-1] *= d
        else:
            dims.append(int(d))
            flags.append(f)
    if not dims:
        return [1], [tuple(False for _ in ins)], [[0] for _ in ins]
    strides = []
    for j in range(len(ins)):
        st = [0] * len(dims)
        acc = 1
        for k in reversed(range(len(dims))):
            if not flags[k][j]:
                st[k] = acc
                acc *= dims[k]
        strides.append(st)
    return dims, flags, strides


def _pad6(v, fill):
    if len(v) > 6:
        raise ValueError(f"broadcast/transpose over {len(v)} non-mergeable axes (at most 6 are supported)")
    return [fill] * (6 - len(v)) + list(v)


_LSIZE = {}


def local_size(rt, kernel, ndim, wide=True):
    """A fixed work-group size per kernel and rank: PoCL compiles a kernel once per work-group size, so sizes that
    followed the shapes (or were left to the driver) would recompile for every new shape. Kernels bounds-check."""
    key = (id(kernel), ndim, wide)
    ls = _LSIZE.get(key)
    if ls is None:
        if ndim == 1:
            ls = (rt.local_size(64, kernel),)
        else:
            a = rt.local_size(8 if wide else 1, kernel)
            ls = (a, max(1, rt.local_size(64, kernel) // a)) + (1,) * (ndim - 2)
        _LSIZE[key] = ls
    return ls


def run(rt, file, name, gsize, *args):
    """Queue kernels/FILE.cl:NAME over gsize (rounded up to whole work-groups; a first axis shorter than 8, e.g.
    the channel blocks of a few channels, gets work-groups that extend along the second axis instead)."""
    k = rt.kernel(file, name, {"CW": bn_cw(rt)} if file == BN else None)
    return rt.launch(k, gsize, local_size(rt, k, len(gsize), len(gsize) == 1 or gsize[0] >= 8), *args)


# Op codes of the binary kernels (elementwise.cl BIN); sub / div with swapped operands use the reversed codes.
BIN_CODES = {"add": 0, "mul": 1, "sub": 2, "div": 3}
BIN_SWAPPED = {"add": 0, "mul": 1, "sub": 4, "div": 5}


def binary(rt, op, a, b, out=None):
    """out = a op b (op: add, mul, sub, div) with numpy broadcasting; out may be a itself when a already has the
    result's shape."""
    shape = tuple(int(v) for v in np.broadcast_shapes(a.shape, b.shape))
    code = i32(BIN_CODES[op])
    if tuple(a.shape) != shape and tuple(b.shape) == shape and out is None:
        a, b = b, a  # keep the full operand first (sub / div then compute b op a)
        code = i32(BIN_SWAPPED[op])
    out = out if out is not None else rt.empty(shape)
    n = _size(shape)
    if not n:
        return out
    if tuple(a.shape) == shape and tuple(b.shape) == shape:
        run(rt, EW, "bin_same", _groups8(n), a, b, out, i32(n), code)
        return out
    dims, flags, (sa, sb) = collapse(shape, [a.shape, b.shape])
    bpat = [f[1] for f in flags]
    if not any(f[0] for f in flags) and bpat in ([True], [True, False], [False, True], [False, True, False]):
        # b is one vector per batch item broadcast over rows: (B, M, C) op (B, 1, C), B and C possibly 1.
        d = list(dims)
        if bpat[0]:
            d = [1] + d
        if bpat[-1]:
            d = d + [1]
        B_, M_, C_ = d
        vb = 0 if B_ == 1 else C_
        if row_style(rt):
            rpi = row_chunk(rt, B_, M_)
            rt.launch(rt.kernel(EW, "bin_row_rows"), (-(-M_ // rpi), B_), (1, 1), a, b, out, i32(M_), i32(C_),
                      i32(vb), code, i32(rpi))
        else:
            run(rt, EW, "bin_row", (-(-C_ // 8), M_, B_), a, b, out, i32(M_), i32(C_), i32(vb), code)
    else:
        d = _pad6(dims, 1)
        run(rt, EW, "bin_bcast", (n,), a, b, out, i32(n), *[i32(v) for v in d[1:]],
            *[i32(v) for v in _pad6(sa, 0)], *[i32(v) for v in _pad6(sb, 0)], code)
    return out


ROWS_PORTABLE = None  # None: row kernels (a work-item per chunk of rows) on CPUs only; True/False force (tests)
ROW_ITEMS_PER_CU = 16  # work-items per compute unit the row kernels aim for (PoCL pays per work-group)


def row_style(rt):
    return getattr(rt, "is_cpu", False) if ROWS_PORTABLE is None else not ROWS_PORTABLE


def row_chunk(rt, B, M):
    """Rows per work-item of a row kernel over B x M rows: about ROW_ITEMS_PER_CU work-items per compute unit."""
    want = ROW_ITEMS_PER_CU * int(getattr(rt.device, "max_compute_units", 1) or 1)
    return max(1, -(-int(B) * int(M) // want))


def chunking(M, C):
    """(nchunks, rows per chunk) for the two-pass column reductions over (M, C): about 4096 work-items of 8 channels
    each (enough for a GPU; a CPU just runs them in turn), at least 32 rows per chunk."""
    M = max(int(M), 1)
    blocks = -(-max(int(C), 1) // 8)
    nch = max(1, min(-(-M // 32), max(1, 4096 // blocks)))
    rows = -(-M // nch)
    return -(-M // rows), rows


def colsum(rt, x, B, M, C, out=None):
    """out[b, c] = sum over m of x viewed as (B, M, C); two passes, no atomics."""
    out = out if out is not None else rt.empty((B, C))
    nch, rows = chunking(M, C)
    part = out if nch == 1 else rt.empty((B, nch, C))
    run(rt, EW, "colsum_partial", (-(-C // 8), nch, B), x, i32(M), i32(C), i32(rows), i32(nch), part)
    if nch > 1:
        run(rt, EW, "colsum_final", (C, B), part, i32(nch), i32(C), i32(B), out)
        part.release()
    return out


def reduce_to(rt, g, shape):
    """Sum g (the broadcast result's shape) back to `shape` (an input's shape); a new tensor."""
    shape = tuple(int(v) for v in shape)
    if tuple(g.shape) == shape:
        return copy(rt, g)
    out = rt.empty(shape)
    if g.size == 0 or out.size == 0:
        if out.size:
            rt.fill(out, 0.0)
        return out
    dims, flags, _ = collapse(g.shape, [shape])
    red = [f[0] for f in flags]
    if red in ([True], [True, False], [False, True], [False, True, False]):
        d = list(dims)
        if red[0]:
            d = [1] + d
        if red[-1]:
            d = d + [1]
        return colsum(rt, g, d[0], d[1], d[2], out)
    gst = [0] * len(dims)
    acc = 1
    for k in reversed(range(len(dims))):
        gst[k] = acc
        acc *= dims[k]
    kd = [d for d, r in zip(dims, red) if not r]
    ks = [s for s, r in zip(gst, red) if not r]
    rd = [d for d, r in zip(dims, red) if r]
    rs = [s for s, r in zip(gst, red) if r]
    if len(kd) > 3 or len(rd) > 3:
        raise ValueError(f"cannot reduce a gradient of shape {g.shape} to {shape}")
    kd, ks = [1] * (3 - len(kd)) + kd, [0] * (3 - len(ks)) + ks
    rd, rs = [1] * (3 - len(rd)) + rd, [0] * (3 - len(rs)) + rs
    n = out.size
    run(rt, EW, "reduce_generic", (n,), g, out, i32(n), i32(kd[1]), i32(kd[2]), *[i32(v) for v in ks],
        *[i32(v) for v in rd], *[i32(v) for v in rs])
    return out


def transpose(rt, x, perm):
    """A new tensor x.transpose(perm)."""
    shape = tuple(x.shape)
    oshape = tuple(shape[p] for p in perm)
    keep = [a for a in range(len(shape)) if shape[a] != 1]
    pos = {a: i for i, a in enumerate(keep)}
    q = [pos[a] for a in perm if shape[a] != 1]
    groups = []
    for a in q:  # runs of input axes that stay adjacent move as one axis
        if groups and groups[-1][-1] + 1 == a:
            groups[-1].append(a)
        else:
            groups.append([a])
    if len(groups) <= 1:
        return copy(rt, x, oshape)
    size = {g[0]: _size([shape[keep[i]] for i in g]) for g in groups}
    stride, acc = {}, 1
    for g in sorted(groups, key=lambda g: g[0], reverse=True):
        stride[g[0]] = acc
        acc *= size[g[0]]
    dims = _pad6([size[g[0]] for g in groups], 1)
    st = _pad6([stride[g[0]] for g in groups], 0)
    out = rt.empty(oshape)
    n = out.size
    run(rt, EW, "gather6", (n,), x, out, i32(n), *[i32(v) for v in dims[1:]], *[i32(v) for v in st])
    return out


BN_CW, BN_RB = 32, 4  # channels (CW) and rows (RB) per work-item of the per-channel kernels in batchnorm.cl
# GPUs: 8 channels (one float8) per work-item: the wide gradient sums keep 40 floats live instead of 160, which
# mobile GPUs (Mali: 64 or fewer registers per thread) would spill to memory. BN_PORTABLE None: by device type
# (CPUs take BN_CW); True/False forces one (tests run both).
BN_CW_PORTABLE = 8
BN_PORTABLE = None


def bn_cw(rt):
    """Channels per work-item of the batchnorm.cl kernels on this device (their CW build option)."""
    portable = (not getattr(rt, "is_cpu", False)) if BN_PORTABLE is None else BN_PORTABLE
    return BN_CW_PORTABLE if portable else BN_CW
# Activations a BatchNorm can carry in its epilogue (plan.fold_frozen fuses a following ReLU/ReLU6).
BN_ACT = {None: 0, "relu": 1, "relu6": 2}


def chan_affine(rt, x, a, b=None, out=None, act=None):
    """out = act(x * a[c] (+ b[c])) over the last axis."""
    out = out if out is not None else rt.empty(x.shape)
    C = x.shape[-1] if x.ndim else 1
    M = x.size // max(C, 1)
    if x.size:
        run(rt, BN, "chan_affine", (-(-C // bn_cw(rt)), -(-M // BN_RB)), x, out, a, b if b is not None else a,
            i32(b is not None), i32(M), i32(C), i32(BN_ACT[act]))
    return out


def chan_gsum(rt, x, g, mean=None, istd=None, fused=None, ghw=1, dx=None, k1=None, unit_act=None):
    """(sum_g[c], sum_gx[c]) over all axes but the last: sum(g) and sum(g * (x - mean) * istd) (mean/istd None:
    sum(g * x)). fused = (a, b, act): g is first masked by act'(x * a + b), the fused activation's derivative.
    ghw > 1: g is the gradient of a fused global average pool over groups of ghw rows of x (one row per group).
    dx (x's shape) and k1 (C,): the same pass also writes dx = k1[c] * (masked g). unit_act ('relu'/'relu6', with
    dx and without fused and k1): g masked by that activation's derivative read from x, its output, into dx."""
    C = x.shape[-1]
    M = x.size // C
    nch, rows = chunking(M, C)
    sg, sgx = rt.empty((C,)), rt.empty((C,))
    pg, pgx = (sg, sgx) if nch == 1 else (rt.empty((nch, C)), rt.empty((nch, C)))
    centered = mean is not None
    fa, fb, act = fused or (g, g, unit_act)
    run(rt, BN, "chan_gsum_partial", (-(-C // bn_cw(rt)), nch), x, g, mean if centered else g, istd if centered else g,
        i32(centered), i32(M), i32(C), i32(rows), i32(nch), pg, pgx, fa, fb, i32(BN_ACT[act]), i32(ghw),
        f32(1.0 / ghw), g if dx is None else dx, g if k1 is None else k1, i32(dx is not None),
        i32(unit_act is not None))
    if nch > 1:
        run(rt, BN, "chan_gsum_final", (C,), pg, pgx, i32(nch), i32(C), sg, sgx)
        pg.release()
        pgx.release()
    return sg, sgx


# ---------------------------------------------------------------------------------------------------------------
# Activations


def _make_act(op):
    @register(B, op)
    def fwd(be, node, xs, training):
        x = xs[0]
        p0, p1 = act_params(node, op)
        y = act_forward(be.rt, op, x, None, p0, p1)
        return [y], Saved(be, s=y if saves_output(op, p0) else x)

    @register(B, op, "backward")
    def bwd(be, node, saved, gys, need):
        gx = None
        if need.inputs[0]:
            p0, p1 = act_params(node, op)
            gx = act_backward(be.rt, op, saved["s"], gys[0], None, p0, p1)
        saved.release()
        return [gx], {}


for _op in ("relu", "relu6", "clip", "leaky_relu", "sigmoid", "tanh", "swish", "hard_sigmoid", "hard_swish"):
    _make_act(_op)


@register(B, "fake_quant")
def fake_quant_fwd(be, node, xs, training):
    scale, lo, hi = fake_quant_params(node)
    x = xs[0]
    y = be.rt.empty(x.shape)
    if x.size:
        run(be.rt, EW, "fake_quant_fwd", _groups8(x.size), x, y, i32(x.size), f32(scale), f32(lo), f32(hi))
    return [y], Saved(be, s=x)


@register(B, "fake_quant", "backward")
def fake_quant_bwd(be, node, saved, gys, need):
    gx = None
    if need.inputs[0]:
        scale, lo, hi = fake_quant_params(node)
        gx = act_backward(be.rt, "clip", saved["s"], gys[0], None, lo * scale, hi * scale)
    saved.release()
    return [gx], {}


# ---------------------------------------------------------------------------------------------------------------
# add / mul


def _nary(rt, op, xs):
    if len(xs) == 1:
        return copy(rt, xs[0])
    final = tuple(int(v) for v in np.broadcast_shapes(*[tuple(x.shape) for x in xs]))
    acc = binary(rt, op, xs[0], xs[1])
    for x in xs[2:]:
        if tuple(np.broadcast_shapes(acc.shape, x.shape)) == tuple(acc.shape):
            binary(rt, op, acc, x, out=acc)  # in place: acc already has the result's shape
        else:
            nxt = binary(rt, op, acc, x)
            acc.release()
            acc = nxt
    assert tuple(acc.shape) == final
    return acc


@register(B, "add")
def add_fwd(be, node, xs, training):
    return [_nary(be.rt, "add", xs)], Saved(be, shapes=[tuple(x.shape) for x in xs])


@register(B, "add", "backward")
def add_bwd(be, node, saved, gys, need):
    g = gys[0]
    return [reduce_to(be.rt, g, s) if n else None for s, n in zip(saved["shapes"], need.inputs)], {}


@register(B, "mul")
def mul_fwd(be, node, xs, training):
    return [_nary(be.rt, "mul", xs)], Saved(be, xs=list(xs))


@register(B, "mul", "backward")
def mul_bwd(be, node, saved, gys, need):
    rt = be.rt
    xs, g = saved["xs"], gys[0]
    gxs = []
    for i, x in enumerate(xs):
        if not need.inputs[i]:
            gxs.append(None)
            continue
        p = None
        for j, o in enumerate(xs):
            if j == i:
                continue
            nxt = binary(rt, "mul", g if p is None else p, o)
            if p is not None:
                p.release()
            p = nxt
        if p is None:
            p = copy(rt, g)
        if tuple(p.shape) != tuple(x.shape):
            r = reduce_to(rt, p, x.shape)
            p.release()
            p = r
        gxs.append(p)
    return gxs, {}


# ---------------------------------------------------------------------------------------------------------------
# scale


def _scale_vec(be, node, key, default, C):
    """(device (C,) vector, is_temporary) or (python float, False) for a scalar attribute."""
    rt = be.rt
    if be.has_param(node, key):
        p = be.param(node, key)
        if p.size == C:
            return p, False
        return rt.to_device(np.broadcast_to(be.to_host(p).reshape(-1), (C,)).astype(np.float32)), True
    v = np.asarray(_attr(node, key, default), dtype=np.float32)
    if v.size == 1:
        return float(v.reshape(-1)[0]), False
    return rt.to_device(np.broadcast_to(v.reshape(-1), (C,)).astype(np.float32)), True


def _scale_operands(be, node, C):
    s, ts = _scale_vec(be, node, "scale", 1.0, C)
    o, to = _scale_vec(be, node, "offset", 0.0, C)
    temps = [t for t, tmp in ((s, ts), (o, to)) if tmp]
    return s, o, temps


def _as_vec(rt, v, C, temps):
    if isinstance(v, float):
        t = rt.fill(rt.empty((C,)), v)
        temps.append(t)
        return t
    return v


@register(B, "scale")
def scale_fwd(be, node, xs, training):
    rt = be.rt
    x = xs[0]
    C = x.shape[-1]
    s, o, temps = _scale_operands(be, node, C)
    if isinstance(s, float) and isinstance(o, float):
        y = act_forward(rt, "affine", x, None, s, o)
    else:
        y = chan_affine(rt, x, _as_vec(rt, s, C, temps), _as_vec(rt, o, C, temps))
    for t in temps:
        t.release()
    return [y], Saved(be, x=x)


@register(B, "scale", "backward")
def scale_bwd(be, node, saved, gys, need):
    rt = be.rt
    x, g = saved["x"], gys[0]
    C = x.shape[-1]
    gx = None
    gp = {}
    if need.inputs[0]:
        s, _, temps = _scale_operands(be, node, C)
        gx = act_backward(rt, "affine", g, g, None, s, 0.0) if isinstance(s, float) else chan_affine(rt, g, s)
        for t in temps:
            t.release()
    if need.params and (be.has_param(node, "scale") or be.has_param(node, "offset")):
        sg, sgx = chan_gsum(rt, x, g)
        for key, v in (("scale", sgx), ("offset", sg)):
            if be.has_param(node, key):
                p = be.param(node, key)
                if tuple(p.shape) == (C,):
                    gp[key] = v
                else:  # a (1,)-shaped or otherwise shaped parameter: reduce / reshape into a pooled array
                    gp[key] = reduce_to(rt, v, p.shape) if p.size != C else copy(rt, v, p.shape)
                    v.release()
            else:
                v.release()
    return [gx], gp


# ---------------------------------------------------------------------------------------------------------------
# softmax


def _axis_split(shape, axis):
    ax = axis + len(shape) if axis < 0 else axis
    return _size(shape[:ax]), int(shape[ax]), _size(shape[ax + 1:])


@register(B, "softmax")
def softmax_fwd(be, node, xs, training):
    rt = be.rt
    x = xs[0]
    outer, K, inner = _axis_split(x.shape, int(_attr(node, "axis", -1)))
    y = rt.empty(x.shape)
    rows = outer * inner
    if x.size:
        run(rt, EW, "softmax_fwd", (rows,), x, y, i32(rows), i32(K), i32(inner))
    return [y], Saved(be, y=y)


@register(B, "softmax", "backward")
def softmax_bwd(be, node, saved, gys, need):
    if not need.inputs[0]:
        return [None], {}
    rt = be.rt
    y, g = saved["y"], gys[0]
    outer, K, inner = _axis_split(y.shape, int(_attr(node, "axis", -1)))
    gx = rt.empty(y.shape)
    rows = outer * inner
    if y.size:
        run(rt, EW, "softmax_bwd", (rows,), y, g, gx, i32(rows), i32(K), i32(inner))
    return [gx], {}


# ---------------------------------------------------------------------------------------------------------------
# Data movement


def _copy_rows(rt, src, src_stride, src_off, dst, dst_stride, dst_off, L, rows):
    if L and rows:
        run(rt, EW, "copy_rows", (-(-L // 8), rows), src, i32(src_stride), i32(src_off), dst,
            i32(dst_stride), i32(dst_off), i32(L), i32(rows))


@register(B, "concat")
def concat_fwd(be, node, xs, training):
    rt = be.rt
    nd = xs[0].ndim
    ax = int(_attr(node, "axis", -1))
    ax = ax + nd if ax < 0 else ax
    shape = list(xs[0].shape)
    shape[ax] = sum(int(x.shape[ax]) for x in xs)
    y = rt.empty(shape)
    outer, inner = _size(shape[:ax]), _size(shape[ax + 1:])
    Lout = shape[ax] * inner
    off = 0
    for x in xs:
        L = int(x.shape[ax]) * inner
        _copy_rows(rt, x, L, 0, y, Lout, off, L, outer)
        off += L
    return [y], Saved(be, shapes=[tuple(x.shape) for x in xs], ax=ax)


@register(B, "concat", "backward")
def concat_bwd(be, node, saved, gys, need):
    rt = be.rt
    g, ax = gys[0], saved["ax"]
    outer, inner = _size(g.shape[:ax]), _size(g.shape[ax + 1:])
    Lout = int(g.shape[ax]) * inner
    off = 0
    gxs = []
    for s, n in zip(saved["shapes"], need.inputs):
        L = int(s[ax]) * inner
        if n:
            gx = rt.empty(s)
            _copy_rows(rt, g, Lout, off, gx, L, 0, L, outer)
            gxs.append(gx)
        else:
            gxs.append(None)
        off += L
    return gxs, {}


def _make_reshape(op):
    @register(B, op)
    def fwd(be, node, xs, training):
        x = xs[0]
        return [copy(be.rt, x, reshape_target(node, tuple(x.shape)))], Saved(be, shape=tuple(x.shape))

    @register(B, op, "backward")
    def bwd(be, node, saved, gys, need):
        return [copy(be.rt, gys[0], saved["shape"]) if need.inputs[0] else None], {}


_make_reshape("flatten")
_make_reshape("reshape")


@register(B, "identity")
def identity_fwd(be, node, xs, training):
    return [copy(be.rt, xs[0])], Saved(be)


@register(B, "identity", "backward")
def identity_bwd(be, node, saved, gys, need):
    return [copy(be.rt, gys[0]) if need.inputs[0] else None], {}


@register(B, "transpose")
def transpose_fwd(be, node, xs, training):
    perm = [int(p) for p in node.attrs["perm"]]
    return [transpose(be.rt, xs[0], perm)], Saved(be, perm=perm)


@register(B, "transpose", "backward")
def transpose_bwd(be, node, saved, gys, need):
    if not need.inputs[0]:
        return [None], {}
    inv = [int(v) for v in np.argsort(saved["perm"])]
    return [transpose(be.rt, gys[0], inv)], {}


# ---------------------------------------------------------------------------------------------------------------
# LRN


def _lrn_args(node):
    size, alpha, beta, bias = lrn_params(node)
    return i32(size), i32((size - 1) // 2), f32(alpha / size), f32(beta), f32(bias)


@register(B, "lrn")
def lrn_fwd(be, node, xs, training):
    rt = be.rt
    x = xs[0]
    C = x.shape[-1]
    M = x.size // C
    y = rt.empty(x.shape)
    if x.size:
        run(rt, EW, "lrn_fwd", (-(-C // 8), M), x, y, i32(M), i32(C), *_lrn_args(node))
    return [y], Saved(be, x=x)


@register(B, "lrn", "backward")
def lrn_bwd(be, node, saved, gys, need):
    if not need.inputs[0]:
        return [None], {}
    rt = be.rt
    x, g = saved["x"], gys[0]
    C = x.shape[-1]
    M = x.size // C
    gx = rt.empty(x.shape)
    if x.size:
        w = rt.empty(x.shape)
        args = _lrn_args(node)
        run(rt, EW, "lrn_bwd_w", (-(-C // 8), M), x, g, w, i32(M), i32(C), *args)
        run(rt, EW, "lrn_bwd", (-(-C // 8), M), x, g, w, gx, i32(M), i32(C), *args)
        w.release()
    return [gx], {}


# ---------------------------------------------------------------------------------------------------------------
# dropout (mask recomputed from (key, index) in the backward: nothing stored)


def _dropout(rt, x, plan):
    key, thr, scale = plan
    y = rt.empty(x.shape)
    n = x.size
    if n:
        run(rt, EW, "dropout", _groups8(n), x, y, i32(n), np.uint32(key), np.uint32(thr),
            f32(scale))
    return y


@register(B, "dropout")
def dropout_fwd(be, node, xs, training):
    plan = dropout_plan(be, node, training)
    y = copy(be.rt, xs[0]) if plan is None else _dropout(be.rt, xs[0], plan)
    return [y], Saved(be, plan=plan)


@register(B, "dropout", "backward")
def dropout_bwd(be, node, saved, gys, need):
    plan = saved["plan"]
    if plan is not None:
        dropout_advance(be, node)
    if not need.inputs[0]:
        return [None], {}
    return [copy(be.rt, gys[0]) if plan is None else _dropout(be.rt, gys[0], plan)], {}


# ---------------------------------------------------------------------------------------------------------------
# batchnorm


def _bn_gb(be, node):
    g = be.param(node, "gamma") if be.has_param(node, "gamma") else None
    b = be.param(node, "beta") if be.has_param(node, "beta") else None
    return g, b


@register(B, "batchnorm")
def batchnorm_fwd(be, node, xs, training):
    """BatchNorm, with the ReLU/ReLU6 that plan.fold_frozen fused into it (attr act): the BN output is never stored;
    the backward recomputes the activation's mask from the saved input and the affine coefficients. With attr pool
    (a following global average pool, also fused) the output is the per-image channel mean of that."""
    rt = be.rt
    if node.attrs.get("concat"):
        return _concat_batchnorm_fwd(be, node, xs, training)
    x = xs[0]
    C = x.shape[-1]
    M = x.size // C
    act = node.attrs.get("act")
    gamma, beta = _bn_gb(be, node)
    rm, rv = be.param(node, "mean"), be.param(node, "var")
    istd, a, b = rt.empty((C,)), rt.empty((C,)), rt.empty((C,))
    eps = bn_eps(node)
    if training:
        nch, rows = chunking(M, C)
        pm, pv = rt.empty((nch, C)), rt.empty((nch, C))
        run(rt, BN, "bn_stats_partial", (-(-C // bn_cw(rt)), nch), x, i32(M), i32(C), i32(rows), i32(nch), pm, pv)
        mean = rt.empty((C,))
        run(rt, BN, "bn_stats_final", (C,), pm, pv, i32(nch), i32(rows), i32(M), i32(C), f32(eps),
            f32(bn_momentum(node)), gamma if gamma is not None else rm, beta if beta is not None else rm,
            i32(gamma is not None), i32(beta is not None), rm, rv, mean, istd, a, b)
        pm.release()
        pv.release()
    else:
        run(rt, BN, "bn_infer_coeffs", (C,), gamma if gamma is not None else rm,
            beta if beta is not None else rm, rm, rv, i32(gamma is not None), i32(beta is not None), i32(C),
            f32(eps), istd, a, b)
        mean = rm
    if node.attrs.get("pool"):
        N = x.shape[0]
        y = rt.empty(global_pool_shape(x.shape, node.attrs.get("keepdims", False)))
        if x.size:
            run(rt, BN, "chan_affine_gap", (-(-C // bn_cw(rt)), N), x, y, a, b, i32(M // max(N, 1)), i32(N), i32(C),
                i32(BN_ACT[act]))
    else:
        y = chan_affine(rt, x, a, b, act=act)
    fused = (a, b, act) if act else None
    if not act:
        a.release()
        b.release()
    temps = [istd] + ([mean] if training else []) + ([a, b] if act else [])
    return [y], Saved(be, temps=temps, x=x, mean=mean, istd=istd, training=bool(training), fused=fused)


def _concat_batchnorm_fwd(be, node, xs, training):
    """A frozen BatchNorm (+ ReLU/ReLU6) over the channel Concat of its inputs (attr concat, plan.fold_frozen):
    each input is normalised straight into its slice of the output, so the Concat's output is never written and
    read back (DenseNet: every dense layer normalises the Concat of all the feature maps before it)."""
    if training:
        raise ValueError(f"{node.name}: a BatchNorm fused with the Concat before it runs in inference mode only "
                         "(plan.fold_frozen fuses it only where it is frozen and no gradient flows)")
    rt = be.rt
    C = sum(int(x.shape[-1]) for x in xs)
    M = int(np.prod(xs[0].shape[:-1]))  # rows (pixels), whatever an input's channel count (0 included)
    gamma, beta = _bn_gb(be, node)
    rm, rv = be.param(node, "mean"), be.param(node, "var")
    istd, a, b = rt.empty((C,)), rt.empty((C,)), rt.empty((C,))
    run(rt, BN, "bn_infer_coeffs", (C,), gamma if gamma is not None else rm,
        beta if beta is not None else rm, rm, rv, i32(gamma is not None), i32(beta is not None), i32(C),
        f32(bn_eps(node)), istd, a, b)
    y = rt.empty(tuple(xs[0].shape[:-1]) + (C,))
    act = i32(BN_ACT[node.attrs.get("act")])
    off = 0
    for x in xs:
        Cx = int(x.shape[-1])
        if x.size:
            run(rt, BN, "chan_affine_slice", (-(-Cx // bn_cw(rt)), -(-M // BN_RB)), x, y, a, b, i32(M), i32(Cx),
                i32(C), i32(off), act)
        off += Cx
    for t in (istd, a, b):
        t.release()  # the in-order queue runs the launches above before a later command reuses them
    return [y], Saved(be)


class BNFold:
    """A trainable inference-mode BatchNorm folded into the trainable convolution before it (attr bn,
    plan.fold_frozen), from the current parameters: w = W * a, b = bias * a + beta - mean * a per output channel,
    a = gamma * istd, istd = 1 / sqrt(var + eps). The convolution runs with (w, b) and writes the BN's output."""

    def __init__(self, be, conv, weight, bias):
        rt = self.rt = be.rt
        self.bn = bn = conv.attrs["bn"]
        C = int(weight.shape[-1])
        gamma, beta = _bn_gb(be, bn)
        rm, rv = be.param(bn, "mean"), be.param(bn, "var")
        if tuple(rm.shape) != (C,):
            raise ValueError(f"conv2d {conv.name}: the BatchNorm {bn.name} it carries has {rm.size} channels, the "
                             f"convolution {C}")
        self.istd, self.a, shift = rt.empty((C,)), rt.empty((C,)), rt.empty((C,))
        run(rt, BN, "bn_infer_coeffs", (C,), gamma if gamma is not None else rm, beta if beta is not None else rm,
            rm, rv, i32(gamma is not None), i32(beta is not None), i32(C), f32(bn_eps(bn)), self.istd, self.a, shift)
        self.w = chan_affine(rt, weight, self.a)
        self.b = shift if bias is None else chan_affine(rt, bias, self.a, shift)
        if bias is not None:
            shift.release()  # the in-order queue has run its reader before a later command reuses it

    @property
    def temps(self):
        return [self.w, self.b, self.a, self.istd]

    def release(self):
        for t in self.temps:
            t.release()

    def grads(self, be, conv, dw, db):
        """{param key or (BN name, key): gradient} from the gradients dw, db of the folded weights and bias (db:
        the sum of the masked output gradient). The BN's input u = conv(x, W) + bias is not stored:
        sum(g * (u - mean)) = sum_k W[k, c] dw[k, c] + (bias[c] - mean[c]) db[c] gives gamma's, without dividing by
        gamma. dw and db are consumed (dw becomes the weight's gradient)."""
        rt, bn = self.rt, self.bn
        C = int(dw.shape[-1])
        out = {}
        has_bias = be.has_param(conv, "bias")
        bias = be.param(conv, "bias") if has_bias else None
        if be.has_param(bn, "gamma"):
            s_dw, s_wdw = chan_gsum(rt, be.param(conv, "weight"), dw)
            s_dw.release()
            dgamma = rt.empty((C,))
            run(rt, BN, "bn_fold_dgamma", (C,), s_wdw, db, bias if has_bias else db, i32(has_bias),
                be.param(bn, "mean"), self.istd, i32(C), dgamma)
            s_wdw.release()
            out[(bn.name, "gamma")] = dgamma
        out["weight"] = chan_affine(rt, dw, self.a, out=dw)
        if has_bias:
            out["bias"] = chan_affine(rt, db, self.a)
        if be.has_param(bn, "beta"):
            out[(bn.name, "beta")] = db
        else:
            db.release()
        return out


@register(B, "batchnorm", "backward")
def batchnorm_bwd(be, node, saved, gys, need):
    rt = be.rt
    x, g = saved["x"], gys[0]
    mean, istd, training, fused = saved["mean"], saved["istd"], saved["training"], saved["fused"]
    C = x.shape[-1]
    M = x.size // C
    gamma, beta = _bn_gb(be, node)
    want_p = need.params and (gamma is not None or beta is not None)
    fa, fb, act = fused or (g, g, None)
    ghw = M // max(x.shape[0], 1) if node.attrs.get("pool") else 1  # g is (N, C): one row per image of ghw rows
    gx = rt.empty(x.shape) if need.inputs[0] else None
    gp = {}
    sg = sgx = None
    # Inference mode: gx = gamma * istd * (masked g) needs no sums, so the pass that sums for the parameters writes it
    one_pass = want_p and gx is not None and not training
    k = None  # gamma * istd (one row of C), the inference-mode input gradient's factor
    if gx is not None and not training:
        k = chan_affine(rt, gamma, istd) if gamma is not None else istd
    if want_p or (gx is not None and training):
        sg, sgx = chan_gsum(rt, x, g, mean, istd, fused, ghw, *((gx, k) if one_pass else ()))
    if gx is not None and not one_pass:
        if training:
            k1, k2, k3 = rt.empty((C,)), rt.empty((C,)), rt.empty((C,))
            run(rt, BN, "bn_bwd_coeffs", (C,), sg, sgx, gamma if gamma is not None else istd,
                i32(gamma is not None), istd, i32(M), i32(C), k1, k2, k3)
            run(rt, BN, "chan_bwd_apply", (-(-C // bn_cw(rt)), -(-M // BN_RB)), x, g, gx, k1, k2, k3, mean, i32(1),
                i32(M), i32(C), fa, fb, i32(BN_ACT[act]), i32(ghw), f32(1.0 / ghw))
            for t in (k1, k2, k3):
                t.release()
        else:
            run(rt, BN, "chan_bwd_apply", (-(-C // bn_cw(rt)), -(-M // BN_RB)), x, g, gx, k, k, k, k, i32(0), i32(M),
                i32(C), fa, fb, i32(BN_ACT[act]), i32(ghw), f32(1.0 / ghw))
    if k is not None and k is not istd:
        k.release()  # the in-order queue has run its readers by a later reuse
    if want_p:
        if gamma is not None:
            gp["gamma"] = sgx
            sgx = None
        if beta is not None:
            gp["beta"] = sg
            sg = None
    for t in (sg, sgx):
        if t is not None:
            t.release()
    saved.release()
    return [gx], gp


# ---------------------------------------------------------------------------------------------------------------
# Loss (kind "fn")


def _host_or_none(be, t):
    from ..runtime import DeviceArray

    if t is None or isinstance(t, DeviceArray):
        return None
    return np.asarray(t)


@register(B, "softmax_xent", "fn")
def softmax_xent(be, logits, labels, label_smoothing=0.0, class_weights=None):
    """(weighted mean loss as a float, gradient device tensor of the logits' shape (N, K)); loss = sum_i w_{y_i} l_i /
    sum_i w_{y_i}. Labels and class weights may be host arrays or device tensors."""
    rt = be.rt
    K = int(logits.shape[-1])
    N = logits.size // max(K, 1)
    temps = []
    lab_host = _host_or_none(be, labels)
    cw_host = None if class_weights is None else _host_or_none(be, class_weights)
    if lab_host is not None:
        lab_host = check_labels(lab_host, K)
        lab_dev = rt.to_device(lab_host.astype(np.int32))
        temps.append(lab_dev)
    else:
        lab_dev = labels
    if class_weights is None:
        cw_dev = None
    elif cw_host is not None:
        cw_dev = rt.to_device(np.asarray(cw_host, np.float32).reshape(-1))
        temps.append(cw_dev)
    else:
        cw_dev = class_weights
    # The weight sum is known up front when labels (and weights) are on the host: one kernel, no rescale pass.
    wsum = None
    if lab_host is not None and (class_weights is None or cw_host is not None):
        wsum = float(len(lab_host)) if class_weights is None else float(
            np.asarray(cw_host, np.float64).reshape(-1)[lab_host].sum())
    grad = rt.empty(logits.shape)
    row_loss, row_w = rt.empty((N,)), rt.empty((N,))
    inv = 1.0 / wsum if wsum else 1.0
    if N:
        run(rt, "loss", "softmax_xent", (N,), logits, lab_dev, cw_dev if cw_dev is not None else logits,
            i32(cw_dev is not None), i32(N), i32(K), f32(label_smoothing), f32(inv), grad, row_loss, row_w)
    losses = rt.to_host(row_loss).astype(np.float64)
    if wsum is None:
        wsum = float(rt.to_host(row_w).astype(np.float64).sum())
        if wsum:
            _scale(rt, grad, 1.0 / wsum)
    if not wsum:
        rt.fill(grad, 0.0)
        loss = 0.0
    else:
        loss = float(losses.sum() / wsum)
    for t in temps + [row_loss, row_w]:
        t.release()
    return loss, grad


def _scale(rt, t, f):
    n = t.size
    if n:
        run(rt, "optim", "scale_inplace", _groups8(n), t, i32(n), f32(f))


@register(B, "softmax_xent_forward", "fn")
def softmax_xent_forward(be, logits, labels=None, label_smoothing=0.0, class_weights=None):
    """(per-sample unweighted losses, float64 numpy (N,), or None without labels; probabilities device tensor of the
    logits' shape (N, K))."""
    rt = be.rt
    K = int(logits.shape[-1])
    N = logits.size // max(K, 1)
    temps = []
    lab_dev = None
    if labels is not None:
        lab_host = _host_or_none(be, labels)
        if lab_host is not None:
            lab_dev = rt.to_device(check_labels(lab_host, K).astype(np.int32))
            temps.append(lab_dev)
        else:
            lab_dev = labels
    probs = rt.empty(logits.shape)
    row_loss = rt.empty((N,))
    if N:
        run(rt, "loss", "softmax_xent_fwd", (N,), logits,
            lab_dev if lab_dev is not None else row_loss, i32(lab_dev is not None), i32(N), i32(K),
            f32(label_smoothing), probs, row_loss)
    losses = rt.to_host(row_loss).astype(np.float64) if lab_dev is not None else None
    for t in temps + [row_loss]:
        t.release()
    return losses, probs
