"""Numpy reference (float64 on the test backend) for convolution, dense and the spatial ops, forward and backward.

Layout NHWC, conv weights HWIO (kh, kw, cin // groups, cout). Output channel o belongs to group o // (cout // groups)
and reads input channels [g * cin_g, (g + 1) * cin_g); for depthwise with a multiplier that makes o = c * mult + m
(Keras's DepthwiseConv2D order). The OpenCL implementations in cl_conv.py are checked against these.

Geometry shared with the OpenCL side (`conv_out_size`, `pool_out_size`):
- conv: OH = (H + top + bottom - dh * (kh - 1) - 1) // sh + 1.
- pooling: floor or ceil division; with ceil_mode the last window must start inside the input or the top/left
  padding (PyTorch's rule), and a window never extends its average divisor past the bottom/right padding.
"""
import numpy as np

from . import register


# ---------------------------------------------------------------------------------------------------------------
# geometry (also used by cl_conv.py)


def conv_geometry(node, x_shape):
    """(kh, kw, sh, sw, dh, dw, pt, pl, pb, pr, OH, OW) of a conv2d node for an NHWC input shape."""
    a = node.attrs
    kh, kw = (int(v) for v in a.get("kernel", node.params["weight"].shape[:2]))
    sh, sw = (int(v) for v in a.get("strides", (1, 1)))
    dh, dw = (int(v) for v in a.get("dilations", (1, 1)))
    pt, pl, pb, pr = (int(v) for v in a.get("pads", (0, 0, 0, 0)))
    _, H, W, _ = x_shape
    OH = conv_out_size(H, kh, sh, dh, pt, pb)
    OW = conv_out_size(W, kw, sw, dw, pl, pr)
    if OH <= 0 or OW <= 0:
        raise ValueError(f"conv2d {node.name}: input {H}x{W} is smaller than the kernel window")
    return kh, kw, sh, sw, dh, dw, pt, pl, pb, pr, OH, OW


def conv_out_size(n, k, s, d, p0, p1):
    return (n + p0 + p1 - d * (k - 1) - 1) // s + 1


def pool_out_size(n, k, s, p0, p1, ceil_mode):
    span = n + p0 + p1 - k
    if ceil_mode:
        out = -(-span // s) + 1
        # The last window must start inside the input or the leading padding.
        if (out - 1) * s >= n + p0:
            out -= 1
    else:
        out = span // s + 1
    return out


def pool_geometry(node, x_shape):
    """(kh, kw, sh, sw, pt, pl, pb, pr, OH, OW) of a maxpool/avgpool node."""
    a = node.attrs
    kh, kw = (int(v) for v in a["kernel"])
    sh, sw = (int(v) for v in a.get("strides") or (kh, kw))
    pt, pl, pb, pr = (int(v) for v in a.get("pads", (0, 0, 0, 0)))
    ceil_mode = bool(a.get("ceil_mode", False))
    _, H, W, _ = x_shape
    OH = pool_out_size(H, kh, sh, pt, pb, ceil_mode)
    OW = pool_out_size(W, kw, sw, pl, pr, ceil_mode)
    if OH <= 0 or OW <= 0:
        raise ValueError(f"{node.op} {node.name}: input {H}x{W} is smaller than the pooling window")
    return kh, kw, sh, sw, pt, pl, pb, pr, OH, OW


def _act(y, act):
    """A fused activation (plan.fold_frozen; kernels/fused_act.h)."""
    if act in (None, "", "linear", "none"):
        return y
    if act == "relu":
        return np.maximum(y, 0)
    if act == "relu6":
        return np.clip(y, 0, 6)
    if act in ("swish", "sigmoid"):
        with np.errstate(over="ignore"):  # exp(-y) = inf for very negative y gives the right limit, 0
            s = 1 / (1 + np.exp(-y))
        return y * s if act == "swish" else s
    if act == "hard_swish":
        return y * np.clip(y + 3, 0, 6) / 6
    if act == "hard_sigmoid":  # PyTorch's (alpha 1/6, beta 1/2): the only one the plan fuses
        return np.clip(y + 3, 0, 6) / 6
    raise ValueError(f"unsupported fused activation {act!r}")


def _act_mask(gy, y, act):
    """The gradient through a fused activation, from its output (relu: y > 0; relu6: 0 < y < 6)."""
    if act in (None, "", "linear", "none"):
        return gy
    if act == "relu":
        return gy * (y > 0)
    if act == "relu6":
        return gy * ((y > 0) & (y < 6))
    raise ValueError(f"unsupported fused activation {act!r}")


def _windows(xp, kh, kw, sh, sw, dh, dw, OH, OW):
    """Yield (i, j, view) with view[n, oh, ow, c] = xp[n, oh*sh + i*dh, ow*sw + j*dw, c] (no copies)."""
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp[:, i * dh: i * dh + sh * (OH - 1) + 1: sh, j * dw: j * dw + sw * (OW - 1) + 1: sw, :]


def _pad4(x, pt, pl, pb, pr, value=0.0):
    """Pad H and W (negative pads crop)."""
    if min(pt, pl, pb, pr) < 0:
        H, W = x.shape[1], x.shape[2]
        x = x[:, max(-pt, 0): H - max(-pb, 0), max(-pl, 0): W - max(-pr, 0), :]
        pt, pl, pb, pr = max(pt, 0), max(pl, 0), max(pb, 0), max(pr, 0)
    if pt == pl == pb == pr == 0:
        return x
    return np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=value)


# ---------------------------------------------------------------------------------------------------------------
# conv2d


def conv2d_forward(x, w, b, kernel_geom, groups, act=None):
    """Direct reference convolution: NHWC x, HWIO w. Accumulates one kernel tap at a time (bounded memory)."""
    kh, kw, sh, sw, dh, dw, pt, pl, pb, pr, OH, OW = kernel_geom
    N, H, W, C = x.shape
    cout = w.shape[3]
    G = int(groups)
    cg, cog = C // G, cout // G
    xp = _pad4(x, pt, pl, pb, pr)
    dt = np.result_type(x.dtype, w.dtype)
    y = np.zeros((N, OH, OW, cout), dt)
    if G == 1:
        y2 = y.reshape(-1, cout)
        for i, j, v in _windows(xp, kh, kw, sh, sw, dh, dw, OH, OW):
            y2 += v.reshape(-1, C) @ w[i, j]
    elif cg == 1:
        # depthwise (with multiplier cog): y[..., c*cog + m] += x[..., c] * w[i, j, 0, c*cog + m]
        y5 = y.reshape(N, OH, OW, G, cog)
        for i, j, v in _windows(xp, kh, kw, sh, sw, dh, dw, OH, OW):
            y5 += v[..., :, None] * w[i, j, 0].reshape(G, cog)
    else:
        yg = y.reshape(-1, G, cog).transpose(1, 0, 2)  # (G, M, cog) view
        for i, j, v in _windows(xp, kh, kw, sh, sw, dh, dw, OH, OW):
            xs = v.reshape(-1, G, cg).transpose(1, 0, 2)  # (G, M, cg)
            wg = w[i, j].reshape(cg, G, cog).transpose(1, 0, 2)  # (G, cg, cog)
            yg += np.matmul(xs, wg)
    if b is not None:
        y += b
    return _act(y, act)


def conv2d_backward(x, w, gy, kernel_geom, groups, need_x=True, need_w=True):
    """(dx, dw, db) of a convolution (no activation: mask gy first)."""
    kh, kw, sh, sw, dh, dw, pt, pl, pb, pr, OH, OW = kernel_geom
    N, H, W, C = x.shape
    cout = w.shape[3]
    G = int(groups)
    cg, cog = C // G, cout // G
    # Work on the non-negatively padded input; crop back at the end.
    ppt, ppl, ppb, ppr = max(pt, 0), max(pl, 0), max(pb, 0), max(pr, 0)
    xp = _pad4(x, pt, pl, pb, pr)
    dxp = np.zeros(xp.shape, gy.dtype) if need_x else None
    dW = np.zeros(w.shape, gy.dtype) if need_w else None
    db = gy.sum(axis=(0, 1, 2)) if need_w else None
    M = N * OH * OW
    g2 = gy.reshape(M, cout)
    dxv = _windows(dxp, kh, kw, sh, sw, dh, dw, OH, OW) if need_x else None
    for i, j, v in _windows(xp, kh, kw, sh, sw, dh, dw, OH, OW):
        dv = next(dxv)[2] if need_x else None
        if G == 1:
            if need_w:
                dW[i, j] = v.reshape(M, C).T @ g2
            if need_x:
                dv += (g2 @ w[i, j].T).reshape(dv.shape)
        elif cg == 1:
            gg = gy.reshape(N, OH, OW, G, cog)
            wij = w[i, j, 0].reshape(G, cog)
            if need_w:
                dW[i, j, 0] = np.einsum("nhwg,nhwgm->gm", v, gg).reshape(cout)
            if need_x:
                dv += np.einsum("nhwgm,gm->nhwg", gg, wij)
        else:
            xs = v.reshape(M, G, cg).transpose(1, 0, 2)  # (G, M, cg)
            gg = g2.reshape(M, G, cog).transpose(1, 0, 2)  # (G, M, cog)
            wg = w[i, j].reshape(cg, G, cog).transpose(1, 0, 2)  # (G, cg, cog)
            if need_w:
                dW[i, j] = np.matmul(xs.transpose(0, 2, 1), gg).transpose(1, 0, 2).reshape(cg, cout)
            if need_x:
                dv += np.matmul(gg, wg.transpose(0, 2, 1)).transpose(1, 0, 2).reshape(dv.shape)
    dx = None
    if need_x:
        Hp, Wp = dxp.shape[1], dxp.shape[2]
        dx_in = dxp[:, ppt: Hp - ppb, ppl: Wp - ppr, :]
        if min(pt, pl, pb, pr) < 0:
            # Cropped rows/columns of x get no gradient.
            dx = np.zeros(x.shape, gy.dtype)
            H0, W0 = max(-pt, 0), max(-pl, 0)
            dx[:, H0: H0 + dx_in.shape[1], W0: W0 + dx_in.shape[2], :] = dx_in
        else:
            dx = np.ascontiguousarray(dx_in)
    return dx, dW, db


def residual_input(node, xs, y_shape):
    """The residual tensor a conv node adds before its activation (attrs 'residual': plan.fold_frozen fused the Add
    after a frozen convolution into it; the tensor is the node's last input), or None. Its shape must be the output's:
    the plan fuses only such Adds, and a broadcast here would be a silently different sum."""
    if not node.attrs.get("residual"):
        return None
    r = xs[-1]
    if tuple(r.shape) != tuple(y_shape):
        raise ValueError(f"conv2d {node.name}: the fused residual has shape {tuple(r.shape)}, the output "
                         f"{tuple(y_shape)}")
    return r


def no_residual_backward(node):
    if node.attrs.get("residual"):
        raise ValueError(f"conv2d {node.name}: a fused residual Add has no backward pass (plan.fold_frozen fuses it "
                         "only where no gradient flows)")


def _conv_then_bn(node):
    """A convolution carrying a trainable inference-mode BatchNorm (attr bn, plan.fold_frozen) as the two nodes it
    stands for: the reference runs them one after the other (the OpenCL backend folds the BN into the weights)."""
    from ..graph import Node

    bn = node.attrs["bn"]
    mid = f"{node.name}:bn_input"
    attrs = {k: v for k, v in node.attrs.items() if k not in ("bn", "act")}
    conv = Node(node.name, "conv2d", list(node.inputs), [mid], attrs, node.params, node.source)
    norm = Node(bn.name, "batchnorm", [mid], list(node.outputs), dict(bn.attrs, act=node.attrs.get("act")),
                bn.params, bn.source)
    return conv, norm


@register("numpy", "conv2d")
def conv2d_fwd(be, node, xs, training):
    if node.attrs.get("bn"):
        from .ref_elementwise import batchnorm_fwd

        conv, norm = _conv_then_bn(node)
        (u,), conv_saved = conv2d_fwd(be, conv, xs, training)
        (y,), bn_saved = batchnorm_fwd(be, norm, [u], False)  # inference mode: the moving statistics
        return [y], {"conv": conv_saved, "bn": bn_saved}
    x = xs[0]
    w = be.param(node, "weight")
    b = be.param(node, "bias") if be.has_param(node, "bias") else None
    geom = conv_geometry(node, x.shape)
    act = node.attrs.get("act")
    y = conv2d_forward(x, w, b, geom, node.attrs.get("groups", 1), None if node.attrs.get("residual") else act)
    r = residual_input(node, xs, y.shape)
    if r is not None:
        y = _act(y + r, act)
    return [y.astype(x.dtype, copy=False)], (x, y)


@register("numpy", "conv2d", "backward")
def conv2d_bwd(be, node, saved, gys, need):
    no_residual_backward(node)
    if node.attrs.get("bn"):
        from . import Need
        from .ref_elementwise import batchnorm_bwd

        conv, norm = _conv_then_bn(node)
        (gu,), bn_grads = batchnorm_bwd(be, norm, saved["bn"], gys, Need([True], need.params))
        dxs, grads = conv2d_bwd(be, conv, saved["conv"], [gu], need)
        return dxs, {**grads, **{(norm.name, k): v for k, v in bn_grads.items()}}
    x, y = saved
    w = be.param(node, "weight")
    gy = _act_mask(gys[0], y, node.attrs.get("act"))
    geom = conv_geometry(node, x.shape)
    dx, dW, db = conv2d_backward(x, w, gy, geom, node.attrs.get("groups", 1), need.inputs[0], need.params)
    grads = {}
    if need.params:
        grads["weight"] = dW
        if be.has_param(node, "bias"):
            grads["bias"] = db
    return [dx], grads


# ---------------------------------------------------------------------------------------------------------------
# dense


@register("numpy", "dense")
def dense_fwd(be, node, xs, training):
    x = xs[0]
    w = be.param(node, "weight")
    y = x.reshape(x.shape[0], -1) @ w
    if be.has_param(node, "bias"):
        y = y + be.param(node, "bias")
    y = _act(y, node.attrs.get("act"))
    return [y], (x, y)


@register("numpy", "dense", "backward")
def dense_bwd(be, node, saved, gys, need):
    x, y = saved
    w = be.param(node, "weight")
    gy = _act_mask(gys[0], y, node.attrs.get("act"))
    x2 = x.reshape(x.shape[0], -1)
    dx = (gy @ w.T).reshape(x.shape) if need.inputs[0] else None
    grads = {}
    if need.params:
        grads["weight"] = x2.T @ gy
        if be.has_param(node, "bias"):
            grads["bias"] = gy.sum(axis=0)
    return [dx], grads


# ---------------------------------------------------------------------------------------------------------------
# pooling


def _pool_pad(x, geom, value):
    """x padded with `value` on all sides so that every (ceil-mode) window lies inside."""
    kh, kw, sh, sw, pt, pl, pb, pr, OH, OW = geom
    N, H, W, C = x.shape
    eb = max((OH - 1) * sh + kh - (H + pt), 0)
    er = max((OW - 1) * sw + kw - (W + pl), 0)
    return np.pad(x, ((0, 0), (pt, eb), (pl, er), (0, 0)), constant_values=value), eb, er


def _avg_divisor(x_shape, geom, count_include_pad, dtype):
    """(1, OH, OW, 1) window divisors: padded area up to the bottom/right pads, or only real elements."""
    kh, kw, sh, sw, pt, pl, pb, pr, OH, OW = geom
    _, H, W, _ = x_shape
    oh = np.arange(OH) * sh - pt
    ow = np.arange(OW) * sw - pl
    if count_include_pad:
        ch = np.minimum(oh + kh, H + pb) - oh
        cw = np.minimum(ow + kw, W + pr) - ow
    else:
        ch = np.minimum(oh + kh, H) - np.maximum(oh, 0)
        cw = np.minimum(ow + kw, W) - np.maximum(ow, 0)
    d = np.maximum(ch, 1)[:, None] * np.maximum(cw, 1)[None, :]
    return d.astype(dtype)[None, :, :, None]


@register("numpy", "maxpool")
def maxpool_fwd(be, node, xs, training):
    x = xs[0]
    geom = pool_geometry(node, x.shape)
    kh, kw, sh, sw, pt, pl, pb, pr, OH, OW = geom
    xp, _, _ = _pool_pad(x, geom, -np.inf)
    y = None
    for _, _, v in _windows(xp, kh, kw, sh, sw, 1, 1, OH, OW):
        y = v.copy() if y is None else np.maximum(y, v)
    return [y], (x,)


@register("numpy", "maxpool", "backward")
def maxpool_bwd(be, node, saved, gys, need):
    (x,) = saved
    geom = pool_geometry(node, x.shape)
    kh, kw, sh, sw, pt, pl, pb, pr, OH, OW = geom
    xp, eb, er = _pool_pad(x, geom, -np.inf)
    # The gradient goes to the first maximum in window order (row-major over the window), as in the kernels.
    stack = np.stack([v for _, _, v in _windows(xp, kh, kw, sh, sw, 1, 1, OH, OW)], axis=-1)
    am = np.argmax(stack, axis=-1)
    dxp = np.zeros(xp.shape, gys[0].dtype)
    for t, (_, _, dv) in enumerate(_windows(dxp, kh, kw, sh, sw, 1, 1, OH, OW)):
        dv += gys[0] * (am == t)
    H, W = x.shape[1], x.shape[2]
    return [np.ascontiguousarray(dxp[:, pt: pt + H, pl: pl + W, :])], {}


@register("numpy", "avgpool")
def avgpool_fwd(be, node, xs, training):
    x = xs[0]
    geom = pool_geometry(node, x.shape)
    kh, kw, sh, sw, pt, pl, pb, pr, OH, OW = geom
    xp, _, _ = _pool_pad(x, geom, 0.0)
    y = np.zeros((x.shape[0], OH, OW, x.shape[3]), x.dtype)
    for _, _, v in _windows(xp, kh, kw, sh, sw, 1, 1, OH, OW):
        y += v
    y /= _avg_divisor(x.shape, geom, node.attrs.get("count_include_pad", True), x.dtype)
    return [y], (x.shape,)


@register("numpy", "avgpool", "backward")
def avgpool_bwd(be, node, saved, gys, need):
    (shape,) = saved
    geom = pool_geometry(node, shape)
    kh, kw, sh, sw, pt, pl, pb, pr, OH, OW = geom
    gy = gys[0]
    g = gy / _avg_divisor(shape, geom, node.attrs.get("count_include_pad", True), gy.dtype)
    N, H, W, C = shape
    eb = max((OH - 1) * sh + kh - (H + pt), 0)
    er = max((OW - 1) * sw + kw - (W + pl), 0)
    dxp = np.zeros((N, pt + H + eb, pl + W + er, C), gy.dtype)
    for _, _, dv in _windows(dxp, kh, kw, sh, sw, 1, 1, OH, OW):
        dv += g
    return [np.ascontiguousarray(dxp[:, pt: pt + H, pl: pl + W, :])], {}


@register("numpy", "global_avgpool")
def global_avgpool_fwd(be, node, xs, training):
    x = xs[0]
    y = x.mean(axis=(1, 2), keepdims=bool(node.attrs.get("keepdims", False)))
    return [y], (x.shape,)


@register("numpy", "global_avgpool", "backward")
def global_avgpool_bwd(be, node, saved, gys, need):
    (shape,) = saved
    N, H, W, C = shape
    g = gys[0].reshape(N, 1, 1, C) / float(H * W)
    return [np.ascontiguousarray(np.broadcast_to(g, shape))], {}


# ---------------------------------------------------------------------------------------------------------------
# pad


@register("numpy", "pad")
def pad_fwd(be, node, xs, training):
    x = xs[0]
    pt, pl, pb, pr = (int(v) for v in node.attrs.get("pads", (0, 0, 0, 0)))
    y = _pad4(x, pt, pl, pb, pr, float(node.attrs.get("value", 0.0)))
    return [np.array(y, dtype=x.dtype)], (x.shape,)


@register("numpy", "pad", "backward")
def pad_bwd(be, node, saved, gys, need):
    (shape,) = saved
    pt, pl, pb, pr = (int(v) for v in node.attrs.get("pads", (0, 0, 0, 0)))
    N, H, W, C = shape
    gy = gys[0]
    OH, OW = gy.shape[1], gy.shape[2]
    dx = np.zeros(shape, gy.dtype)
    # dx[h, w] = gy[h + pt, w + pl] where that lies inside gy
    h0, h1 = max(0, -pt), min(H, OH - pt)
    w0, w1 = max(0, -pl), min(W, OW - pl)
    if h1 > h0 and w1 > w0:
        dx[:, h0:h1, w0:w1, :] = gy[:, h0 + pt: h1 + pt, w0 + pl: w1 + pl, :]
    return [dx], {}
