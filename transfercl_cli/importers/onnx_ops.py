"""One converter per ONNX op type, registered in `ONNX` (see registry.py).

    @ONNX.register("Erf")
    def erf(cx, node, name, *, cfg):   # cx: the OnnxImporter; node: the NodeProto; cfg: Tracked attributes
        ...
        return [T(...)]                 # one entry per node output: a T, a Const, or None (output unused)

Every attribute of the node must be read through `cfg` (or declared irrelevant with `cfg.ignore`, with the reason in
a comment): Registry.convert turns any attribute left unread into an error naming the node, the attribute and its
value. Legacy attributes of old opsets (`consumed_inputs`, `broadcast`/`axis` of opset < 7 arithmetic, `is_test`,
`spatial`) are read like the others. Raise `Unsupported(reason)` for what tcl cannot run; the importer collects
those and reports them all together.
"""
import numpy as np

from ..ops.shapes import same_pads
from .onnx_common import (FLOAT_TYPES, P4, Const, T, Unsupported, const_on_axes, drop_axes, inv as _inv, norm_axis,
                          perm_moving_last, scalar, text)
from .registry import Registry

ONNX = Registry("ONNX", fix="Run `tcl inspect MODEL` to list unsupported layers.")


def _legacy(cfg):
    # consumed_inputs (opset < 6) only told old runtimes which inputs they could overwrite in place: no math.
    cfg.ignore("consumed_inputs")


def unary(cx, node, name, op, attrs=None, source=None):
    t = cx.get(node.input[0])
    y = cx.emit(op, name, [t.name], attrs or {}, source=source or node.op_type, out=node.output[0])
    return [T(y, t.shape, t.perm)]


# --- activations ------------------------------------------------------------------------------------------------------
@ONNX.register("Relu")
def relu(cx, node, name, *, cfg):
    _legacy(cfg)
    return unary(cx, node, name, "relu")


@ONNX.register("Sigmoid")
def sigmoid(cx, node, name, *, cfg):
    _legacy(cfg)
    return unary(cx, node, name, "sigmoid")


@ONNX.register("Tanh")
def tanh(cx, node, name, *, cfg):
    _legacy(cfg)
    return unary(cx, node, name, "tanh")


@ONNX.register("HardSwish")
def hard_swish(cx, node, name, *, cfg):
    return unary(cx, node, name, "hard_swish")


@ONNX.register("Erf")
def erf(cx, node, name, *, cfg):
    return unary(cx, node, name, "erf")


@ONNX.register("Sqrt")
def sqrt(cx, node, name, *, cfg):
    _legacy(cfg)
    return unary(cx, node, name, "sqrt")


@ONNX.register("Reciprocal")
def reciprocal(cx, node, name, *, cfg):
    _legacy(cfg)
    return unary(cx, node, name, "reciprocal")


@ONNX.register("Gelu")
def gelu(cx, node, name, *, cfg):
    approx = text(cfg.get("approximate", b"none"))
    if approx not in ("none", "tanh"):
        raise Unsupported(f"approximate={approx!r} is not a GELU form tcl knows")
    return unary(cx, node, name, "gelu", {"approximate": approx})


@ONNX.register("LeakyRelu")
def leaky_relu(cx, node, name, *, cfg):
    _legacy(cfg)
    return unary(cx, node, name, "leaky_relu", {"alpha": float(cfg.get("alpha", 0.01))})


@ONNX.register("PRelu")
def prelu(cx, node, name, *, cfg):
    _legacy(cfg)
    slope = cx.const(node.input[1])
    if slope is None or np.asarray(slope).size != 1:
        raise Unsupported("only a single constant slope is supported")
    return unary(cx, node, name, "leaky_relu", {"alpha": float(np.asarray(slope).reshape(-1)[0])})


@ONNX.register("HardSigmoid")
def hard_sigmoid(cx, node, name, *, cfg):
    _legacy(cfg)
    return unary(cx, node, name, "hard_sigmoid",
                 {"alpha": float(cfg.get("alpha", 0.2)), "beta": float(cfg.get("beta", 0.5))})


@ONNX.register("Clip")
def clip(cx, node, name, *, cfg):
    _legacy(cfg)
    if cx.opset < 11:
        lo, hi = cfg.get("min", -np.inf), cfg.get("max", np.inf)
    else:
        lo = cx.const_input(node, 1, "min", optional=True)
        hi = cx.const_input(node, 2, "max", optional=True)
        lo = -np.inf if lo is None else lo
        hi = np.inf if hi is None else hi
    lo, hi = scalar(lo, "min"), scalar(hi, "max")
    if lo == 0.0 and hi == 6.0:
        return unary(cx, node, name, "relu6")
    if lo == 0.0 and hi == np.inf:
        return unary(cx, node, name, "relu")
    return unary(cx, node, name, "clip", {"min": lo, "max": hi})


@ONNX.register("Softmax")
def softmax(cx, node, name, *, cfg):
    t = cx.get(node.input[0])
    axis = int(cfg.get("axis", -1 if cx.opset >= 13 else 1))
    axis = norm_axis(axis, t.rank)
    if axis == 0:
        raise Unsupported("softmax over the batch axis")
    if cx.opset >= 13 or axis == t.rank - 1:
        ph = t.phys_axis(axis)
        y = cx.emit("softmax", name, [t.name], {"axis": -1 if ph == t.rank - 1 else ph}, source="Softmax",
                    out=node.output[0])
        return [T(y, t.shape, t.perm)]
    # Opset < 13 with axis < last: softmax over the flattened trailing axes, in source order.
    flat = (t.shape[:axis] + (int(np.prod(t.shape[axis:])),))
    f = cx.reshape_to(t, flat, f"{name}/flatten", "Softmax")
    s = cx.emit("softmax", name, [f.name], {"axis": -1}, source="Softmax")
    return [cx.reshape_to(T(s, flat, f.perm), t.shape, f"{name}/unflatten", "Softmax")]


# --- QDQ quantization (issue 16) ---------------------------------------------------------------------------------------
# A QuantizeLinear on a computed tensor followed by DequantizeLinear(s) with the same scale and zero point is the
# rounding of int8/uint8 arithmetic in float: tcl's `fake_quant` node. (Weights stored as int8 + DequantizeLinear
# are constants and fold at import.) The integer tensor between the two has no float meaning of its own, so a
# QuantizeLinear read by anything but such a DequantizeLinear is refused.
_QDTYPES = {np.dtype(np.uint8): "uint8", np.dtype(np.int8): "int8"}
_ONNX_QDTYPES = {2: "uint8", 3: "int8"}  # TensorProto.UINT8, INT8


def _qparams(cx, node, cfg):
    """(scale, zero_point, dtype) of a per-tensor QuantizeLinear/DequantizeLinear."""
    # axis only selects the axis of a per-axis scale; a per-tensor scale (the only kind read here) ignores it.
    cfg.ignore("axis")
    if int(cfg.get("block_size", 0) or 0):
        raise Unsupported("blocked quantization (block_size) of a computed tensor is not supported")
    scale = np.asarray(cx.const_input(node, 1, "scale"))
    zp = cx.const_input(node, 2, "zero point", optional=True)
    if scale.size != 1:
        raise Unsupported("per-axis quantization of a computed tensor is not supported (only one scale per tensor)")
    zp = np.zeros((), np.uint8) if zp is None else np.asarray(zp)
    if zp.size != 1 or zp.dtype not in _QDTYPES:
        raise Unsupported(f"only uint8 and int8 quantization is supported (zero point {zp.dtype}, size {zp.size})")
    out_dtype = int(cfg.get("output_dtype", 0) or 0)
    if out_dtype and _ONNX_QDTYPES.get(out_dtype) != _QDTYPES[zp.dtype]:
        raise Unsupported(f"output_dtype {out_dtype} is not the zero point's type ({zp.dtype})")
    s = float(scale.reshape(-1)[0])
    if not s > 0 or not np.isfinite(s):
        raise Unsupported(f"the scale {s} is not a positive number")
    return s, int(zp.reshape(-1)[0]), _QDTYPES[zp.dtype]


@ONNX.register("QuantizeLinear")
def quantize_linear(cx, node, name, *, cfg):
    # saturate (opset 19) only changes conversions to float8 types, which _qparams refuses.
    cfg.ignore("saturate")
    params = _qparams(cx, node, cfg)
    q = node.output[0]
    if q in cx.graph_outputs:
        raise Unsupported("its integer output is a graph output (tcl's tensors are float)")
    for c in cx.consumers.get(q, []):
        if c.op_type != "DequantizeLinear" or c.input[0] != q:
            raise Unsupported(f"its integer output is read by {c.op_type} '{cx.node_name(c)}', not by a "
                              "DequantizeLinear (tcl computes in float: it reads QuantizeLinear + DequantizeLinear pairs)")
    t = cx.get(node.input[0])
    scale, zp, dtype = params
    y = cx.emit("fake_quant", name, [t.name], {"scale": scale, "zero_point": zp, "dtype": dtype},
                source="QuantizeLinear", out=q)
    cx.quantized[q] = params
    return [T(y, t.shape, t.perm)]


@ONNX.register("DequantizeLinear")
def dequantize_linear(cx, node, name, *, cfg):
    # (A DequantizeLinear of constants, such as int8 weights, folds at import and never reaches this converter.)
    params = _qparams(cx, node, cfg)
    src = node.input[0]
    if src not in cx.quantized:
        raise Unsupported("it dequantizes a computed integer tensor that no QuantizeLinear made")
    if cx.quantized[src] != params:
        raise Unsupported(f"its scale and zero point {params[:2]} differ from those of the QuantizeLinear before it "
                          f"{cx.quantized[src][:2]}")
    return [cx.get(src)]


# --- pass-through -----------------------------------------------------------------------------------------------------
@ONNX.register("Identity")
def identity(cx, node, name, *, cfg):
    return [cx.get(node.input[0])]


@ONNX.register("Cast")
def cast(cx, node, name, *, cfg):
    # saturate only changes casts to float8 types, which are refused here anyway.
    cfg.ignore("saturate")
    if cfg.get("to") not in FLOAT_TYPES:
        raise Unsupported("only casts to float are supported on computed tensors")
    return [cx.get(node.input[0])]


@ONNX.register("CastLike")
def cast_like(cx, node, name, *, cfg):
    # saturate only changes casts to float8 types; tcl's computed tensors are float32.
    cfg.ignore("saturate")
    c = cx.const(node.input[0])
    if c is not None:  # a constant cast to the (float) type of a computed tensor: still a constant
        return [Const(np.asarray(c, np.float32))]
    return [cx.get(node.input[0])]


@ONNX.register("Dropout")
def dropout(cx, node, name, *, cfg):
    # seed only fixes the training-time mask; is_test (opset < 7) selects inference, which tcl's dropout is.
    cfg.ignore("seed", "is_test")
    _legacy(cfg)
    if len(node.output) > 1 and cx.used(node.output[1]):
        raise Unsupported("the mask output is not supported")
    rate = cfg.get("ratio", 0.5)
    if len(node.input) > 1 and node.input[1]:
        rate = cx.const(node.input[1]) if cx.const(node.input[1]) is not None else 0.5
    t = cx.get(node.input[0])
    y = cx.emit("dropout", name, [t.name], {"rate": float(np.asarray(rate).reshape(-1)[0]), "seed": None},
                source="Dropout", out=node.output[0])
    return [T(y, t.shape, t.perm)]


# --- convolution, normalisation, pooling ------------------------------------------------------------------------------
def _pads(cfg, hw, kernel, strides, dil=(1, 1)):
    ap = text(cfg.get("auto_pad", b"NOTSET"))
    p = cfg.get("pads")
    if ap in ("SAME_UPPER", "SAME_LOWER"):
        up = ap == "SAME_UPPER"
        (pt, pb), (pl, pr) = (same_pads(hw[0], kernel[0], strides[0], dil[0], up),
                              same_pads(hw[1], kernel[1], strides[1], dil[1], up))
        return (pt, pl, pb, pr)
    if ap == "VALID":
        return (0, 0, 0, 0)
    if ap != "NOTSET":
        raise Unsupported(f"auto_pad={ap!r} is not an ONNX padding mode")
    p = tuple(int(v) for v in (p if p is not None else (0, 0, 0, 0)))
    return (p[0], p[1], p[2], p[3])


@ONNX.register("Conv")
def conv(cx, node, name, *, cfg):
    t = cx.get(node.input[0])
    w = cx.const(node.input[1])
    if w is None:
        raise Unsupported("the weights must be constant")
    if w.ndim != 4 or t.rank != 4:
        raise Unsupported(f"only 2-D convolutions are supported (weight {w.shape})")
    bias = cx.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2] and bias is None:
        raise Unsupported("the bias must be constant")
    groups = int(cfg.get("group", 1))
    cout, cin_g, kh, kw = w.shape
    ks = cfg.get("kernel_shape")
    if ks is not None and tuple(int(v) for v in ks) != (kh, kw):
        raise Unsupported(f"kernel_shape {list(ks)} does not match the weight {w.shape}")
    if cin_g * groups != t.shape[1]:
        raise Unsupported(f"weight {w.shape} with group={groups} does not fit {t.shape[1]} input channels")
    strides = tuple(int(v) for v in cfg.get("strides", (1, 1)))
    dil = tuple(int(v) for v in cfg.get("dilations", (1, 1)))
    pads = _pads(cfg, t.shape[2:], (kh, kw), strides, dil)
    x = cx.nhwc(t)
    params = {"weight": np.transpose(w, (2, 3, 1, 0)).astype(np.float32)}  # OIHW -> HWIO
    if bias is not None:
        params["bias"] = np.asarray(bias, np.float32).reshape(-1)
    y = cx.emit("conv2d", name, [x], {"kernel": (kh, kw), "strides": strides, "dilations": dil, "pads": pads,
                                      "groups": groups, "act": None}, params, source="Conv", out=node.output[0])
    shp = cx.b.shapes[y]
    return [T(y, (t.shape[0], shp[2], shp[0], shp[1]), P4)]


@ONNX.register("BatchNormalization")
def batchnorm(cx, node, name, *, cfg):
    _legacy(cfg)
    # is_test (opset < 7) picked inference, which this is (the training outputs are refused below).
    cfg.ignore("is_test")
    if int(cfg.get("training_mode", 0)):
        raise Unsupported("training_mode=1 (batch statistics) is not supported")
    if int(cfg.get("spatial", 1)) != 1:
        raise Unsupported("spatial=0 (per-pixel statistics) is not supported")
    t = cx.get(node.input[0])
    vals = [cx.const(i) for i in node.input[1:5]]
    if any(v is None for v in vals):
        raise Unsupported("scale, bias, mean and var must be constants")
    if len(node.output) > 1 and any(cx.used(o) for o in node.output[1:]):
        raise Unsupported("training-mode outputs are not supported")
    if t.rank == 4:
        x = cx.nhwc(t)
        perm = P4
    elif t.rank == 2:
        x = cx.to_perm(t, (0, 1))
        perm = (0, 1)
    else:
        raise Unsupported(f"inputs of rank {t.rank} are not supported")
    params = dict(zip(("gamma", "beta", "mean", "var"), [np.asarray(v, np.float32).reshape(-1) for v in vals]))
    y = cx.emit("batchnorm", name, [x], {"eps": float(cfg.get("epsilon", 1e-5)),
                                         "momentum": float(cfg.get("momentum", 0.9))}, params,
                source="BatchNormalization", out=node.output[0])
    return [T(y, t.shape, perm)]


def _pool(cx, node, name, cfg, op):
    t = cx.get(node.input[0])
    if t.rank != 4:
        raise Unsupported("only 2-D pooling is supported")
    k = tuple(int(v) for v in cfg["kernel_shape"])
    s = tuple(int(v) for v in cfg.get("strides", (1, 1)))
    if any(int(d) != 1 for d in cfg.get("dilations", (1, 1))):
        raise Unsupported("dilated pooling is not supported")
    pads = _pads(cfg, t.shape[2:], k, s)
    attrs = {"kernel": k, "strides": s, "pads": pads, "ceil_mode": bool(cfg.get("ceil_mode", 0))}
    if op == "avgpool":
        attrs["count_include_pad"] = bool(cfg.get("count_include_pad", 0))
    x = cx.nhwc(t)
    y = cx.emit(op, name, [x], attrs, source=node.op_type, out=node.output[0])
    h, w, c = cx.b.shapes[y]
    return [T(y, (t.shape[0], c, h, w), P4)]


@ONNX.register("MaxPool")
def maxpool(cx, node, name, *, cfg):
    # storage_order only lays out the Indices output, which is refused (precheck).
    cfg.ignore("storage_order")
    return _pool(cx, node, name, cfg, "maxpool")


@ONNX.register("AveragePool")
def avgpool(cx, node, name, *, cfg):
    return _pool(cx, node, name, cfg, "avgpool")


@ONNX.register("GlobalAveragePool")
def global_avgpool(cx, node, name, *, cfg):
    t = cx.get(node.input[0])
    x = cx.nhwc(t)
    y = cx.emit("global_avgpool", name, [x], {"keepdims": True}, source=node.op_type, out=node.output[0])
    return [T(y, (t.shape[0], t.shape[1], 1, 1), P4)]


@ONNX.register("LRN")
def lrn(cx, node, name, *, cfg):
    t = cx.get(node.input[0])
    x = cx.nhwc(t)
    y = cx.emit("lrn", name, [x], {"size": int(cfg["size"]), "alpha": float(cfg.get("alpha", 1e-4)),
                                   "beta": float(cfg.get("beta", 0.75)), "bias": float(cfg.get("bias", 1.0))},
                source="LRN", out=node.output[0])
    return [T(y, t.shape, P4)]


def emit_layer_norm(cx, t, axes, eps, gamma, beta, name, source, out):
    """y = layer_norm over the logical `axes` of t (gamma, beta: constants varying along those axes only, or
    None): the axes become the trailing physical axes (one transpose when they are not already)."""
    axes = sorted(set(axes))
    if 0 in axes:
        raise Unsupported("normalising over the batch axis is not supported")
    want = perm_moving_last(t.perm, axes)
    norm = tuple(t.shape[p] for p in want[t.rank - len(axes):])
    g = const_on_axes(gamma, t, axes, "the scale") if gamma is not None else np.ones(norm)
    b = const_on_axes(beta, t, axes, "the bias") if beta is not None else np.zeros(norm)
    x = cx.to_perm(t, want)
    y = cx.emit("layer_norm", name, [x], {"axis": t.rank - len(axes), "epsilon": float(eps)},
                {"gamma": g, "beta": b}, source=source, out=out)
    return T(y, t.shape, want)


@ONNX.register("LayerNormalization")
def layer_normalization(cx, node, name, *, cfg):
    t = cx.get(node.input[0])
    axis = norm_axis(cfg.get("axis", -1), t.rank)
    eps = float(cfg.get("epsilon", 1e-5))
    # stash_type is the precision of the mean / variance: tcl computes them in float32 (float64 on the reference
    # backend) whatever it says, as onnxruntime does for float inputs.
    stash = int(cfg.get("stash_type", 1))
    if stash not in FLOAT_TYPES:
        raise Unsupported(f"stash_type={stash} is not a float type")
    if axis == 0:
        raise Unsupported("normalising over the batch axis (axis 0) is not supported")
    gamma = cx.const_input(node, 1, "scale")
    beta = cx.const_input(node, 2, "bias", optional=True)
    axes = list(range(axis, t.rank))
    y = emit_layer_norm(cx, t, axes, eps, gamma, beta, name, "LayerNormalization", node.output[0])
    res = [y]
    want_mean = len(node.output) > 1 and cx.used(node.output[1])
    want_istd = len(node.output) > 2 and cx.used(node.output[2])
    if want_mean or want_istd:
        # The statistics outputs, computed with the elementwise ops: mean and 1 / sqrt(var + eps).
        x = cx.to_perm(t, y.perm)
        ph = [t.rank - len(axes) + i for i in range(len(axes))]
        red = {"axes": ph, "keepdims": True}
        shape = tuple(1 if i in axes else d for i, d in enumerate(t.shape))
        mean = cx.emit("reduce_mean", f"{name}/mean", [x], red, source="LayerNormalization",
                       out=node.output[1] if want_mean else None)
        res.append(T(mean, shape, y.perm) if want_mean else None)
        if want_istd:
            d = cx.emit("sub", f"{name}/centre", [x, mean], source="LayerNormalization")
            sq = cx.emit("pow", f"{name}/square", [d], {"exponent": 2.0}, source="LayerNormalization")
            var = cx.emit("reduce_mean", f"{name}/var", [sq], red, source="LayerNormalization")
            ve = cx.emit("scale", f"{name}/var_eps", [var], {"scale": 1.0, "offset": eps}, source="LayerNormalization")
            sd = cx.emit("sqrt", f"{name}/std", [ve], source="LayerNormalization")
            istd = cx.emit("reciprocal", f"{name}/inv_std", [sd], source="LayerNormalization", out=node.output[2])
            res.append(T(istd, shape, y.perm))
    return res


# --- reductions -------------------------------------------------------------------------------------------------------
def _reduce_axes(cx, node, cfg, axes_input_from):
    """The node's logical axes (sorted, non-negative) or None for 'all axes'; reads axes, keepdims and
    noop_with_empty_axes. Returns (axes or None, keepdims, noop)."""
    if cx.opset >= axes_input_from:
        axes = cx.const_input(node, 1, "axes", optional=True)
        noop = bool(cfg.get("noop_with_empty_axes", 0))
    else:
        axes = cfg.get("axes")
        noop = False
    keep = bool(cfg.get("keepdims", 1))
    if axes is not None:
        axes = [int(v) for v in np.asarray(axes).reshape(-1)]
        if not axes:
            axes = None
    return axes, keep, noop


def _reduce(cx, node, name, cfg, op, axes_input_from):
    t = cx.get(node.input[0])
    axes, keep, noop = _reduce_axes(cx, node, cfg, axes_input_from)
    if axes is None:
        if noop:
            return [t]
        axes = list(range(t.rank))
    axes = sorted({norm_axis(a, t.rank) for a in axes})
    if 0 in axes:
        raise Unsupported(f"{node.op_type} over the batch axis (axes {axes}) is not supported")
    if op == "reduce_mean" and t.rank == 4 and sorted(t.phys_axis(a) for a in axes) == [1, 2]:
        # The mean over the spatial axes of a tensor held NHWC: the (faster) global average pool.
        y = cx.emit("global_avgpool", name, [t.name], {"keepdims": keep}, source=node.op_type,
                    out=node.output[0])
    else:
        ph = sorted(t.phys_axis(a) for a in axes)
        y = cx.emit(op, name, [t.name], {"axes": ph, "keepdims": keep}, source=node.op_type, out=node.output[0])
    if keep:
        return [T(y, tuple(1 if i in axes else d for i, d in enumerate(t.shape)), t.perm)]
    return [T(y, tuple(d for i, d in enumerate(t.shape) if i not in axes), drop_axes(t.perm, axes))]


@ONNX.register("ReduceMean")
def reduce_mean(cx, node, name, *, cfg):
    return _reduce(cx, node, name, cfg, "reduce_mean", 18)


@ONNX.register("ReduceSum")
def reduce_sum(cx, node, name, *, cfg):
    return _reduce(cx, node, name, cfg, "reduce_sum", 13)


# --- shape ops --------------------------------------------------------------------------------------------------------
@ONNX.register("Shape")
def shape(cx, node, name, *, cfg):
    t = cx.get(node.input[0])
    shp = np.asarray(t.shape, np.int64)
    s, e = cfg.get("start", 0), cfg.get("end", None)
    return [Const(shp[s:e])]


@ONNX.register("Size")
def size(cx, node, name, *, cfg):
    t = cx.get(node.input[0])
    return [Const(np.asarray(int(np.prod(t.shape)), np.int64))]


@ONNX.register("Flatten")
def flatten(cx, node, name, *, cfg):
    t = cx.get(node.input[0])
    axis = int(cfg.get("axis", 1))
    axis = axis + t.rank if axis < 0 else axis
    if axis == 0 or int(np.prod(t.shape[1:axis])) != 1:
        raise Unsupported(f"flattening with axis={axis} merges the batch axis")
    out = (t.shape[0], int(np.prod(t.shape[axis:])))
    return [cx.reshape_to(t, out, name, "Flatten", op="flatten")]


def _reshape_target(t, shape, allowzero=False):
    shape = [int(v) for v in shape]
    asked = list(shape)
    shape = [t.shape[i] if v == 0 and not allowzero and i < t.rank else v for i, v in enumerate(shape)]
    if not shape:
        raise Unsupported("reshaping to a scalar")
    per = int(np.prod(t.shape[1:]))
    if shape[0] == -1:
        rest = shape[1:]
        if -1 in rest:
            raise Unsupported(f"target shape {shape} has two unknown sizes")
        shape[0] = t.shape[0]
        if int(np.prod(rest)) != per:
            raise Unsupported(f"reshaping {t.shape} to {asked} merges the batch axis with others")
    elif shape[0] != t.shape[0]:
        raise Unsupported(f"reshaping {t.shape} to {shape} changes the batch axis")
    rest = shape[1:]
    if -1 in rest:
        known = int(np.prod([v for v in rest if v != -1]))
        if known == 0 or per % known:
            raise Unsupported(f"cannot reshape {t.shape} to {shape}")
        rest[rest.index(-1)] = per // known
    if int(np.prod(rest)) != per:
        raise Unsupported(f"cannot reshape {t.shape} to {shape}")
    return (t.shape[0],) + tuple(rest)


@ONNX.register("Reshape")
def reshape(cx, node, name, *, cfg):
    _legacy(cfg)
    t = cx.get(node.input[0])
    if cx.opset < 5:
        shape = cfg["shape"]
    else:
        shape = cx.const_input(node, 1, "target shape")
    out = _reshape_target(t, np.asarray(shape).reshape(-1), bool(cfg.get("allowzero", 0)))
    return [cx.reshape_to(t, out, name, "Reshape")]


def _axes(cx, node, cfg):
    axes = cfg.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = cx.const_input(node, 1, "axes")
    return None if axes is None else [int(v) for v in np.asarray(axes).reshape(-1)]


@ONNX.register("Squeeze")
def squeeze(cx, node, name, *, cfg):
    t = cx.get(node.input[0])
    axes = _axes(cx, node, cfg)
    if axes is None:
        axes = [i for i in range(1, t.rank) if t.shape[i] == 1]
    axes = [v + t.rank if v < 0 else v for v in axes]
    if 0 in axes:
        raise Unsupported("squeezing the batch axis")
    out = tuple(d for i, d in enumerate(t.shape) if i not in axes)
    return [cx.reshape_to(t, out, name, "Squeeze")]


@ONNX.register("Unsqueeze")
def unsqueeze(cx, node, name, *, cfg):
    t = cx.get(node.input[0])
    axes = _axes(cx, node, cfg)
    if axes is None:
        raise Unsupported("the axes are missing")
    r = t.rank + len(axes)
    axes = sorted(v + r if v < 0 else v for v in axes)
    if 0 in axes:
        raise Unsupported("unsqueezing before the batch axis")
    out = list(t.shape)
    for ax in axes:
        out.insert(ax, 1)
    return [cx.reshape_to(t, tuple(out), name, "Unsqueeze")]


@ONNX.register("Transpose")
def transpose(cx, node, name, *, cfg):
    t = cx.get(node.input[0])
    q = tuple(int(v) for v in cfg.get("perm", tuple(reversed(range(t.rank)))))
    if sorted(q) != list(range(t.rank)):
        raise Unsupported(f"perm {list(q)} is not a permutation of the {t.rank} axes")
    if q[0] != 0:
        raise Unsupported(f"permutation {list(q)} moves the batch axis")
    qinv = _inv(q)
    # Pure relabelling: the physical array stays as it is.
    return [T(t.name, tuple(t.shape[i] for i in q), tuple(qinv[p] for p in t.perm))]


@ONNX.register("Concat")
def concat(cx, node, name, *, cfg):
    ts = [cx.get(i) for i in node.input if i]
    r = ts[0].rank
    axis = norm_axis(cfg["axis"], r)
    if axis == 0:
        raise Unsupported("concatenation along the batch axis")
    perm = ts[0].perm
    if r == 4 and any(t.perm == P4 for t in ts):
        perm = P4
    xs = [cx.to_perm(t, perm) for t in ts]
    ph = _inv(perm)[axis]
    y = cx.emit("concat", name, xs, {"axis": ph}, source="Concat", out=node.output[0])
    shape = list(ts[0].shape)
    shape[axis] = sum(t.shape[axis] for t in ts)
    return [T(y, shape, perm)]


def emit_slice(cx, t, spec, name, source, out):
    """Slice `t` by {logical axis: (start, end, step)} (ONNX / Python semantics): one `slice` node over the physical
    axes, or `t` itself when nothing is cut."""
    axes, starts, ends, steps = [], [], [], []
    shape = list(t.shape)
    for a in sorted(spec):
        s, e, st = (int(v) for v in spec[a])
        if st == 0:
            raise Unsupported("a slice step of 0")
        dim = t.shape[a]
        start, stop, step = slice(s, e, st).indices(dim)
        n = len(range(start, stop, step))
        if a == 0:
            # The whole batch, whatever its size: start 0 (or before), end past any batch, step 1.
            if st == 1 and (s == 0 or s <= -2 ** 31) and e >= 2 ** 31 - 1:
                continue
            raise Unsupported("slicing the batch axis is not supported")
        if (start, n, step) == (0, dim, 1):
            continue
        axes.append(t.phys_axis(a))
        starts.append(start)
        ends.append(stop if stop >= 0 else -(dim + 1))  # "before index 0" (negative steps), Python's way
        steps.append(step)
        shape[a] = n
    if not axes:
        return t
    y = cx.emit("slice", name, [t.name], {"axes": axes, "starts": starts, "ends": ends, "steps": steps},
                source=source, out=out)
    return T(y, shape, t.perm)


@ONNX.register("Slice")
def slice_(cx, node, name, *, cfg):
    t = cx.get(node.input[0])
    if cx.opset < 10:
        starts, ends, axes, steps = cfg["starts"], cfg["ends"], cfg.get("axes"), None
    else:
        starts = cx.const_input(node, 1, "starts")
        ends = cx.const_input(node, 2, "ends")
        axes = cx.const_input(node, 3, "axes", optional=True)
        steps = cx.const_input(node, 4, "steps", optional=True)
    starts = [int(v) for v in np.asarray(starts).reshape(-1)]
    ends = [int(v) for v in np.asarray(ends).reshape(-1)]
    axes = list(range(len(starts))) if axes is None else [int(v) for v in np.asarray(axes).reshape(-1)]
    steps = [1] * len(starts) if steps is None else [int(v) for v in np.asarray(steps).reshape(-1)]
    if not (len(starts) == len(ends) == len(axes) == len(steps)):
        raise Unsupported(f"starts {starts}, ends {ends}, axes {axes} and steps {steps} differ in length")
    spec = {}
    for a, s, e, st in zip(axes, starts, ends, steps):
        a = norm_axis(a, t.rank)
        if a in spec:
            raise Unsupported(f"axis {a} is sliced twice")
        spec[a] = (s, e, st)
    return [emit_slice(cx, t, spec, name, "Slice", node.output[0])]


@ONNX.register("Split")
def split(cx, node, name, *, cfg):
    t = cx.get(node.input[0])
    axis = norm_axis(cfg.get("axis", 0), t.rank)
    if axis == 0:
        raise Unsupported("splitting the batch axis is not supported")
    dim = t.shape[axis]
    n = len(node.output)
    sizes = cfg.get("split") if cx.opset < 13 else cx.const_input(node, 1, "split", optional=True)
    num = cfg.get("num_outputs") if cx.opset >= 18 else None
    if sizes is not None:
        sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
        if num is not None:
            raise Unsupported("both split and num_outputs are given")
    elif num is not None:
        if int(num) != n:
            raise Unsupported(f"num_outputs={num} but the node has {n} outputs")
        chunk = -(-dim // n)
        sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
    else:
        if dim % n:
            raise Unsupported(f"axis {axis} of size {dim} does not split into {n} equal parts")
        sizes = [dim // n] * n
    if len(sizes) != n or sum(sizes) != dim or min(sizes) < 0:
        raise Unsupported(f"split sizes {sizes} do not cut axis {axis} of size {dim} into {n} outputs")
    res, start = [], 0
    for k, (o, sz) in enumerate(zip(node.output, sizes)):
        if cx.used(o):
            res.append(emit_slice(cx, t, {axis: (start, start + sz, 1)}, f"{name}/{k}", "Split", o))
        else:
            res.append(None)
        start += sz
    return res


@ONNX.register("Pad")
def pad(cx, node, name, *, cfg):
    t = cx.get(node.input[0])
    mode = text(cfg.get("mode", b"constant"))
    if mode != "constant":
        raise Unsupported(f"pad mode {mode} is not supported")
    if cx.opset < 11:
        pads, value = cfg.get("pads"), cfg.get("value", 0.0)
        if pads is None:
            pads = cfg.get("paddings")
    else:
        pads = cx.const_input(node, 1, "pads")
        value = cx.const_input(node, 2, "pad value", optional=True)
        value = 0.0 if value is None else value
        if len(node.input) > 3 and node.input[3]:
            axes = [int(v) % t.rank for v in cx.const_input(node, 3, "axes")]
            full = [0] * (2 * t.rank)
            pads = [int(v) for v in pads]
            for j, ax in enumerate(axes):
                full[ax], full[ax + t.rank] = pads[j], pads[j + len(axes)]
            pads = full
    pads = [int(v) for v in np.asarray(pads).reshape(-1)]
    value = float(np.asarray(value).reshape(-1)[0]) if np.asarray(value).size else 0.0
    r = t.rank
    if r != 4 or any(p < 0 for p in pads):
        raise Unsupported("only non-negative padding of 4-D tensors is supported")
    begin, end = pads[:r], pads[r:]
    # The pad op pads physical axes 1 and 2 (H, W of NHWC).
    for perm in (t.perm, P4):
        pb = [begin[perm[i]] for i in range(4)]
        pe = [end[perm[i]] for i in range(4)]
        if pb[0] == pe[0] == pb[3] == pe[3] == 0:
            x = cx.to_perm(t, perm)
            y = cx.emit("pad", name, [x], {"pads": (pb[1], pb[2], pe[1], pe[2]), "value": value}, source="Pad",
                        out=node.output[0])
            shape = tuple(d + begin[i] + end[i] for i, d in enumerate(t.shape))
            return [T(y, shape, perm)]
    raise Unsupported(f"padding of the batch or channel axis is not supported (pads {pads})")


# --- matrix products --------------------------------------------------------------------------------------------------
@ONNX.register("Gemm")
def gemm(cx, node, name, *, cfg):
    # broadcast (opset < 7) let C broadcast, which it always does here (a per-output bias).
    cfg.ignore("broadcast")
    if int(cfg.get("transA", 0)):
        raise Unsupported("transA=1 is not supported")
    t = cx.get(node.input[0])
    w = cx.const(node.input[1])
    if w is None:
        raise Unsupported("B must be a constant (weights)")
    if t.rank != 2:
        raise Unsupported(f"A must be 2-D, got {t.shape}")
    w = np.asarray(w, np.float32)
    if cfg.get("transB", 0):
        w = w.T
    alpha, beta = float(cfg.get("alpha", 1.0)), float(cfg.get("beta", 1.0))
    if alpha != 1.0:
        w = w * np.float32(alpha)
    params = {"weight": np.ascontiguousarray(w)}
    if len(node.input) > 2 and node.input[2]:
        c = cx.const(node.input[2])
        if c is None:
            raise Unsupported("C must be a constant (bias)")
        c = np.asarray(c, np.float64) * beta
        if c.size not in (1, w.shape[1]) or (c.ndim == 2 and c.shape[0] != 1):
            raise Unsupported(f"bias C of shape {c.shape} is not per-output")
        params["bias"] = np.broadcast_to(c.reshape(-1), (w.shape[1],)).astype(np.float32)
    x = cx.to_perm(t, (0, 1))
    y = cx.emit("dense", name, [x], {"act": None}, params, source="Gemm", out=node.output[0])
    return [T(y, (t.shape[0], w.shape[1]))]


@ONNX.register("MatMul")
def matmul(cx, node, name, *, cfg):
    """(N, ..., K) x constant (K, M): a dense layer on 2-D inputs, a 1x1 convolution over the last axis otherwise
    (torch's Linear on a channels-last tensor, as in ConvNeXt)."""
    t = cx.get(node.input[0])
    w = cx.const(node.input[1])
    if w is None or np.asarray(w).ndim != 2 or not 2 <= t.rank <= 4:
        raise Unsupported("only (N, [..,] K) x constant (K, M) matrix products are supported")
    w = np.asarray(w, np.float32)
    k, m = w.shape
    if t.shape[-1] != k:
        raise Unsupported(f"cannot multiply {t.shape} by a ({k}, {m}) matrix")
    if t.rank == 2:
        x = cx.to_perm(t, (0, 1))
        y = cx.emit("dense", name, [x], {"act": None}, {"weight": w}, source="MatMul", out=node.output[0])
        return [T(y, (t.shape[0], m))]
    want = perm_moving_last(t.perm, [t.rank - 1])
    x = cx.to_perm(t, want)
    phys = tuple(t.shape[p] for p in want)
    conv_in = x
    if t.rank == 3:
        conv_in = cx.emit("reshape", f"{name}/to_2d", [x], {"shape": (phys[1], 1, k)}, source="MatMul")
    attrs = {"kernel": (1, 1), "strides": (1, 1), "dilations": (1, 1), "pads": (0, 0, 0, 0), "groups": 1,
             "act": None}
    params = {"weight": w.reshape(1, 1, k, m)}
    out_shape = t.shape[:-1] + (m,)
    if t.rank == 4:
        y = cx.emit("conv2d", name, [conv_in], attrs, params, source="MatMul", out=node.output[0])
    else:
        c = cx.emit("conv2d", name, [conv_in], attrs, params, source="MatMul")
        y = cx.emit("reshape", f"{name}/from_2d", [c], {"shape": (phys[1], m)}, source="MatMul",
                    out=node.output[0])
    return [T(y, out_shape, want)]


# --- elementwise arithmetic -------------------------------------------------------------------------------------------
def _legacy_broadcast(cx, node, cfg):
    """Opset < 7 arithmetic: broadcast=1 lets B (the second input) broadcast, aligned at `axis` (default: the
    trailing axes, as numpy). Returns the axis or None."""
    _legacy(cfg)
    if cx.opset >= 7:
        return None
    bc = int(cfg.get("broadcast", 0))
    axis = cfg.get("axis")
    return int(axis) if bc and axis is not None else None


def _align_legacy(c, rank, axis):
    """A constant B of an opset < 7 broadcast aligned at `axis`: padded with trailing 1s."""
    c = np.asarray(c)
    axis = axis + rank if axis < 0 else axis
    return c.reshape(c.shape + (1,) * (rank - axis - c.ndim))


@ONNX.register("Add", "Sum", "Mul", "Sub", "Div")
def arithmetic(cx, node, name, *, cfg):
    kind = {"Add": "add", "Sum": "add", "Mul": "mul", "Sub": "sub", "Div": "div"}[node.op_type]
    if node.op_type == "Sum":
        _legacy(cfg)
        return binary(cx, node, name, kind)
    return binary(cx, node, name, kind, _legacy_broadcast(cx, node, cfg))


def binary(cx, node, name, kind, legacy_axis=None):
    ins = [i for i in node.input if i]
    consts = [i for i in ins if cx.is_const(i)]
    tens = [cx.get(i) for i in ins if not cx.is_const(i)]
    if not tens:
        raise Unsupported("no computed input")
    if consts:
        if len(tens) != 1 or len(ins) != 2:
            raise Unsupported("mixing several computed tensors with constants is not supported")
        c = cx.const(consts[0])
        if legacy_axis is not None and consts[0] == ins[1]:
            c = _align_legacy(c, tens[0].rank, legacy_axis)
        return [with_const(cx, node, name, tens[0], c, kind, const_first=ins[0] == consts[0])]
    if legacy_axis is not None:
        raise Unsupported("opset < 7 broadcasting of a computed tensor along an axis is not supported")
    if kind in ("sub", "div") and len(tens) != 2:
        raise Unsupported(f"{node.op_type} takes two inputs")
    # Fold x * sigmoid(x) into swish (and x * hard_sigmoid(x) into hard_swish).
    if kind == "mul" and len(tens) == 2:
        fused = _swish(cx, node, name, tens)
        if fused is not None:
            return [fused]
    r = max(t.rank for t in tens)
    if any(t.rank != r for t in tens):
        raise Unsupported(f"inputs of different ranks {[t.shape for t in tens]}")
    perm = tens[0].perm
    if r == 4 and any(t.perm == P4 for t in tens):
        perm = P4
    xs = [cx.to_perm(t, perm) for t in tens]
    try:
        shape = tuple(int(v) for v in np.broadcast_shapes(*[t.shape for t in tens]))
    except ValueError:
        raise Unsupported(f"inputs of shapes {[t.shape for t in tens]} do not broadcast") from None
    if shape[0] != tens[0].shape[0]:
        raise Unsupported("broadcasting along the batch axis")
    y = cx.emit(kind, name, xs, source=node.op_type, out=node.output[0])
    return T(y, shape, perm),


def _swish(cx, node, name, tens):
    for s, x in ((tens[0], tens[1]), (tens[1], tens[0])):
        n = cx.producer(s.name)
        if (n is not None and n.op in ("sigmoid", "hard_sigmoid") and n.inputs[0] == x.name and s.perm == x.perm
                and len(cx.readers(s.name)) == 1 and s.name not in cx.graph_outputs):
            if n.op == "hard_sigmoid" and not (abs(n.attrs["alpha"] - 1 / 6) < 1e-6 and n.attrs["beta"] == 0.5):
                continue
            cx.b.nodes.remove(n)
            op = "swish" if n.op == "sigmoid" else "hard_swish"
            y = cx.emit(op, name, [x.name], source=node.op_type, out=node.output[0])
            return T(y, x.shape, x.perm)
    return None


def _fuse_bias(cx, t, o):
    """Add(bias) after a MatMul / Gemm without bias: the bias joins that node. True when done."""
    prod = cx.producer(t.name)
    if prod is None or len(cx.readers(t.name)) != 1 or t.name in cx.graph_outputs:
        return False
    target = prod
    if prod.op == "reshape" and prod.source == "MatMul":  # the rank-3 MatMul: conv2d then reshape back
        target = cx.producer(prod.inputs[0])
        if target is None or sum(prod.inputs[0] in n.inputs for n in cx.b.nodes) != 1:
            return False
    if not ((target.op == "dense") or (target.op == "conv2d" and target.source == "MatMul")):
        return False
    if "bias" in target.params:
        return False
    cout = target.params["weight"].shape[-1]
    if o.size not in (1, cout):
        return False
    target.params["bias"] = np.broadcast_to(o, (cout,)).astype(np.float32)
    return True


def with_const(cx, node, name, t, c, kind, const_first):
    """t (op) c or c (op) t for a constant c: a scale node (scalar, or per-channel parameters along the physical
    last axis), a bias joined to the MatMul before, or reciprocal + scale for c / t."""
    c = np.asarray(c, np.float64)
    if c.ndim > t.rank:
        raise Unsupported(f"a constant of shape {c.shape} broadcasts the tensor {t.shape} up")
    full = c.reshape((1,) * (t.rank - c.ndim) + c.shape)
    try:
        out_shape = tuple(int(v) for v in np.broadcast_shapes(t.shape, full.shape))
    except ValueError:
        raise Unsupported(f"a constant of shape {c.shape} does not broadcast to the tensor {t.shape}") from None
    if out_shape != t.shape:
        raise Unsupported(f"a constant of shape {c.shape} broadcasts the tensor {t.shape} up")
    phys = np.transpose(full, t.perm)
    if phys.size != 1 and any(d != 1 for d in phys.shape[:-1]):
        raise Unsupported(f"a constant of shape {c.shape} varies along more than the channel axis (tcl's graph "
                          "has no constant tensors)")
    vec = phys.reshape(-1)
    src = t.name
    if kind == "add":
        s, o = np.ones_like(vec), vec
    elif kind == "mul":
        s, o = vec, np.zeros_like(vec)
    elif kind == "sub":
        s, o = (-np.ones_like(vec), vec) if const_first else (np.ones_like(vec), -vec)
    elif const_first:  # c / t = c * (1 / t)
        if np.all(vec == 1):
            y = cx.emit("reciprocal", name, [t.name], source=node.op_type, out=node.output[0])
            return T(y, t.shape, t.perm)
        src = cx.emit("reciprocal", f"{name}/reciprocal", [t.name], source=node.op_type)
        s, o = vec, np.zeros_like(vec)
    else:
        s, o = 1.0 / vec, np.zeros_like(vec)
    # MatMul + Add(bias) -> one dense (or 1x1 conv) node with a bias. Its output takes the Add's name: that tensor
    # now holds what the Add computed (export.py copies source nodes up to a tensor by its ONNX name).
    if kind == "add" and _fuse_bias(cx, t, o):
        new = node.output[0]
        if new and new not in cx.b.shapes:
            cx.b.rename_tensor(t.name, new)
            for k, v in list(cx.tensors.items()):
                if v.name == t.name:
                    cx.tensors[k] = T(new, v.shape, v.perm)
            return T(new, t.shape, t.perm)
        return t
    if vec.size == 1:
        attrs, params = {"scale": float(s[0]), "offset": float(o[0])}, {}
    else:
        attrs = {"scale": 1.0, "offset": 0.0}
        params = {"scale": s.astype(np.float32), "offset": o.astype(np.float32)}
    y = cx.emit("scale", name, [src], attrs, params, source=node.op_type, out=node.output[0])
    return T(y, t.shape, t.perm)


@ONNX.register("Neg")
def neg(cx, node, name, *, cfg):
    _legacy(cfg)
    t = cx.get(node.input[0])
    y = cx.emit("scale", name, [t.name], {"scale": -1.0, "offset": 0.0}, source="Neg", out=node.output[0])
    return [T(y, t.shape, t.perm)]


@ONNX.register("Pow")
def pow_(cx, node, name, *, cfg):
    _legacy_broadcast(cx, node, cfg)
    if cx.is_const(node.input[0]):
        raise Unsupported("a constant raised to a computed power is not supported")
    t = cx.get(node.input[0])
    e = cx.const(node.input[1])
    if e is None:
        raise Unsupported("the exponent must be a constant")
    e = np.asarray(e, np.float64)
    if e.size == 0 or np.any(e != e.reshape(-1)[0]):
        raise Unsupported(f"only one exponent for the whole tensor is supported (got shape {e.shape})")
    full = e.reshape((1,) * max(t.rank - e.ndim, 0) + e.shape)
    if full.ndim > t.rank or tuple(np.broadcast_shapes(t.shape, full.shape)) != t.shape:
        raise Unsupported(f"an exponent of shape {e.shape} broadcasts the tensor {t.shape} up")
    exp = float(e.reshape(-1)[0])
    if exp == 1.0:
        return [t]
    y = cx.emit("pow", name, [t.name], {"exponent": exp}, source="Pow", out=node.output[0])
    return [T(y, t.shape, t.perm)]
