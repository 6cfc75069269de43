"""Static shape inference and multiply-add counts for the canonical ops of graph.py.

Shapes here never include the batch axis: an NHWC activation of a batch is (H, W, C), a dense input (C,).
`infer_shapes(graph)` gives every tensor's shape (graph inputs included); `infer_node` is the per-node rule the
importers use while they build a graph; `macs` counts multiply-adds for `tcl inspect` and the planner.
"""
import numpy as np

from ..errors import ModelError
from . import ref_tensor as _rt

# Ops whose output has the shape of their (first) input.
SAME_SHAPE = {
    "batchnorm", "relu", "relu6", "sigmoid", "tanh", "swish", "hard_swish", "clip", "leaky_relu",
    "hard_sigmoid", "softmax", "scale", "lrn", "dropout", "identity",
    "layer_norm", "erf", "gelu", "sqrt", "pow", "reciprocal", "neg", "fake_quant",
}
# Ops that only move data (no arithmetic).
NO_MACS = {"flatten", "reshape", "transpose", "dropout", "identity", "concat", "pad", "slice"}
# Reductions: one multiply-add per input element.
REDUCE_OPS = {"reduce_mean", "reduce_sum"}


def pool_out(size, k, s, pb, pe, d=1, ceil_mode=False):
    """Output length of a convolution/pooling window along one axis (ONNX/PyTorch rules, ceil_mode included)."""
    eff = (k - 1) * d + 1
    span = size + pb + pe - eff
    if span < 0:
        return 0
    if ceil_mode:
        out = -(-span // s) + 1
        # The last window must start inside the input or the leading padding (PyTorch/ONNX rule).
        if (out - 1) * s >= size + pb:
            out -= 1
        return out
    return span // s + 1


def same_pads(size, k, s, d=1, upper=True):
    """TF/Keras 'same' (ONNX SAME_UPPER) padding along one axis: (before, after); the extra pixel goes after."""
    eff = (k - 1) * d + 1
    out = -(-size // s)
    total = max((out - 1) * s + eff - size, 0)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def _bad(node, msg):
    return ModelError(f"Layer '{node.name}' ({node.source or node.op}): {msg}.",
                      "The model file may be inconsistent; check it loads in its original framework.")


def _need_rank(node, shape, rank):
    if len(shape) != rank:
        raise _bad(node, f"expects an input of rank {rank + 1} (with batch), got shape {('N',) + tuple(shape)}")


def broadcast(shapes, node=None):
    """Broadcast of shapes without batch (missing leading axes count as 1, i.e. they sit right after the batch)."""
    try:
        return tuple(int(v) for v in np.broadcast_shapes(*[tuple(s) for s in shapes]))
    except ValueError:
        raise _bad(node, f"inputs of shapes {[tuple(s) for s in shapes]} do not broadcast") from None


def resolve_reshape(total, shape, node=None):
    """A reshape target (without batch, may hold one -1) for a tensor of `total` elements per sample."""
    shape = [int(v) for v in shape]
    if shape.count(-1) > 1:
        raise _bad(node, f"reshape target {shape} has more than one -1")
    known = int(np.prod([v for v in shape if v != -1])) if shape else 1
    if -1 in shape:
        if known == 0 or total % known:
            raise _bad(node, f"cannot reshape {total} elements per sample to {shape}")
        shape[shape.index(-1)] = total // known
    elif known != total:
        raise _bad(node, f"cannot reshape {total} elements per sample to {shape}")
    return tuple(shape)


def global_pool_shape(shape, keepdims):
    """(N, H, W, C) -> (N, 1, 1, C) with keepdims, else (N, C): the output of a global average pool (the op, or a
    BatchNorm that carries it)."""
    return (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],) if keepdims else (shape[0], shape[-1])


def infer_node(node, in_shapes):
    """Output shapes (list, without batch) of one node given its input shapes."""
    op, a = node.op, node.attrs
    x = tuple(in_shapes[0]) if in_shapes else ()
    if op == "batchnorm" and a.get("concat") and x:  # over the channel Concat of its inputs (plan.fold_frozen)
        if any(tuple(s[:-1]) != x[:-1] for s in in_shapes):
            raise _bad(node, f"concatenates inputs of shapes {[tuple(s) for s in in_shapes]} along the channels")
        x = x[:-1] + (sum(int(s[-1]) for s in in_shapes),)
    if op in SAME_SHAPE:
        if op == "batchnorm" and "gamma" in node.params and x and node.params["gamma"].shape[-1] != x[-1]:
            raise _bad(node, f"has {node.params['gamma'].shape[-1]} channels but its input has {x[-1]}")
        if op == "scale":
            for k in ("scale", "offset"):
                p = node.params.get(k)
                if p is not None and p.size > 1 and (not x or p.shape[-1] != x[-1]):
                    raise _bad(node, f"per-channel {k} of length {p.shape[-1]} does not match input shape {x}")
        if op in TENSOR_CHECKS:
            TENSOR_CHECKS[op](node, x)
        if not (op == "batchnorm" and a.get("pool")):
            return [x]
    if op == "conv2d":
        _need_rank(node, x, 3)
        h, w, c = x
        kh, kw = a["kernel"]
        sh, sw = a.get("strides", (1, 1))
        dh, dw = a.get("dilations", (1, 1))
        pt, pl, pb, pr = a.get("pads", (0, 0, 0, 0))
        g = int(a.get("groups", 1))
        wt = node.params["weight"]
        if wt.shape[:2] != (kh, kw) or wt.shape[2] * g != c:
            raise _bad(node, f"weight {wt.shape} with groups={g} does not fit an input with {c} channels")
        return [(pool_out(h, kh, sh, pt, pb, dh), pool_out(w, kw, sw, pl, pr, dw), int(wt.shape[3]))]
    if op == "dense":
        _need_rank(node, x, 1)
        wt = node.params["weight"]
        if wt.shape[0] != x[0]:
            raise _bad(node, f"weight {wt.shape} does not fit an input with {x[0]} features")
        return [(int(wt.shape[1]),)]
    if op in ("add", "mul"):
        return [broadcast(in_shapes, node)]
    if op in ("sub", "div"):
        if len(in_shapes) != 2:
            raise _bad(node, f"takes exactly two inputs, got {len(in_shapes)}")
        return [broadcast(in_shapes, node)]
    if op == "slice":
        try:
            plan = _rt.slice_plan(node, (1,) + x)
        except (ValueError, TypeError) as e:
            raise _bad(node, f"cannot slice an input of shape {('N',) + x}: {e}") from None
        return [tuple(n for _, _, n in plan[1:])]
    if op in REDUCE_OPS:
        try:
            axes = _rt.reduce_axes(node, len(x) + 1)
        except (ValueError, TypeError) as e:
            raise _bad(node, f"cannot reduce an input of shape {('N',) + x}: {e}") from None
        return [_rt.reduce_shape((1,) + x, axes, _rt.reduce_keepdims(node))[1:]]
    if op == "concat":
        axis = int(a.get("axis", -1))
        rank = len(x) + 1
        ax = axis + rank if axis < 0 else axis
        if not 1 <= ax < rank:
            raise _bad(node, f"cannot concatenate along axis {axis} of rank-{rank} tensors")
        out = list(x)
        out[ax - 1] = 0
        for s in in_shapes:
            if len(s) != len(x) or any(s[i] != x[i] for i in range(len(x)) if i != ax - 1):
                raise _bad(node, f"inputs of shapes {[tuple(s) for s in in_shapes]} do not concatenate on axis {ax}")
            out[ax - 1] += s[ax - 1]
        return [tuple(out)]
    if op == "pad":
        _need_rank(node, x, 3)
        t, l, b, r = a["pads"]
        return [(x[0] + t + b, x[1] + l + r, x[2])]
    if op in ("maxpool", "avgpool"):
        _need_rank(node, x, 3)
        kh, kw = a["kernel"]
        sh, sw = a.get("strides", (kh, kw))
        pt, pl, pb, pr = a.get("pads", (0, 0, 0, 0))
        cm = bool(a.get("ceil_mode", False))
        return [(pool_out(x[0], kh, sh, pt, pb, 1, cm), pool_out(x[1], kw, sw, pl, pr, 1, cm), x[2])]
    if op == "global_avgpool" or (op == "batchnorm" and a.get("pool")):  # (a BN that carries the pool after it)
        _need_rank(node, x, 3)
        return [global_pool_shape((None,) + x, a.get("keepdims", False))[1:]]
    if op == "flatten":
        return [(int(np.prod(x)) if x else 1,)]
    if op == "reshape":
        return [resolve_reshape(int(np.prod(x)) if x else 1, a["shape"], node)]
    if op == "transpose":
        perm = list(a["perm"])
        if sorted(perm) != list(range(len(x) + 1)) or perm[0] != 0:
            raise _bad(node, f"permutation {perm} does not fit a rank-{len(x) + 1} input (the batch axis stays first)")
        full = (None,) + tuple(x)
        return [tuple(full[p] for p in perm[1:])]
    raise ModelError(f"Layer '{node.name}' uses the op '{op}', which tcl does not know.",
                     "Run `tcl inspect MODEL` to list unsupported layers.")


def _check_layer_norm(node, x):
    try:
        ax = _rt.ln_axis(node, len(x) + 1)
        float(_rt.ln_eps(node))
    except (ValueError, TypeError) as e:
        raise _bad(node, f"cannot normalise an input of shape {('N',) + x}: {e}") from None
    if ax == 0:
        raise _bad(node, "cannot normalise over the batch axis (axis 0)")
    norm = tuple(x[ax - 1:])
    for k in ("gamma", "beta"):
        p = node.params.get(k)
        if p is None:
            continue
        ps = tuple(int(v) for v in np.shape(p))
        while ps and ps[0] == 1 and len(ps) > len(norm):
            ps = ps[1:]
        if (1,) * (len(norm) - len(ps)) + ps != norm:
            raise _bad(node, f"{k} of shape {tuple(np.shape(p))} does not match the normalised dims {norm}")


def _check_gelu(node, x):
    try:
        _rt.gelu_tanh(node)
    except ValueError as e:
        raise _bad(node, str(e)) from None


def _check_pow(node, x):
    try:
        e = _rt.pow_exponent(node)
    except (ValueError, TypeError):
        raise _bad(node, f"the exponent must be a number, not {node.attrs.get('exponent')!r}") from None
    if not np.isfinite(e):
        raise _bad(node, f"the exponent must be finite, not {e}")


TENSOR_CHECKS = {"layer_norm": _check_layer_norm, "gelu": _check_gelu, "pow": _check_pow}


def infer_shapes(graph):
    """{tensor name: shape without batch} for every tensor of the graph (inputs included)."""
    shapes = {k: tuple(int(v) for v in s) for k, s in graph.inputs.items()}
    for n in graph.nodes:
        try:
            ins = [shapes[t] for t in n.inputs]
        except KeyError as e:
            raise ModelError(f"Layer '{n.name}' reads the tensor {e.args[0]} before anything writes it.",
                             "The model file may be damaged.") from None
        outs = infer_node(n, ins)
        for t, s in zip(n.outputs, outs):
            shapes[t] = tuple(int(v) for v in s)
    return shapes


def macs(node, in_shapes, out_shape):
    """Multiply-adds per sample of one node (shapes without batch).

    conv2d/dense count their true multiply-adds; pooling counts one per window element; other arithmetic ops
    count one per output element (global_avgpool: per input element); pure data movement counts 0."""
    op = node.op
    out_n = int(np.prod(out_shape)) if out_shape is not None else 0
    if op == "conv2d":
        kh, kw = node.attrs["kernel"]
        cin_g = node.params["weight"].shape[2]
        return out_n * kh * kw * int(cin_g)
    if op == "dense":
        return int(np.prod(node.params["weight"].shape))
    if op in ("maxpool", "avgpool"):
        kh, kw = node.attrs["kernel"]
        return out_n * kh * kw
    if op == "global_avgpool" or op == "batchnorm":
        return int(np.prod(in_shapes[0])) if len(in_shapes) == 1 else sum(int(np.prod(s)) for s in in_shapes)
    if op in NO_MACS:
        return 0
    if op in REDUCE_OPS:
        return int(np.prod(in_shapes[0]))
    if op in ("add", "mul"):
        return out_n * max(len(in_shapes) - 1, 1)
    if op == "lrn":
        return out_n * int(node.attrs.get("size", 5))
    return out_n


def total_macs(graph, shapes=None):
    shapes = shapes or infer_shapes(graph)
    return sum(macs(n, [shapes[t] for t in n.inputs], shapes[n.outputs[0]]) for n in graph.nodes)


__all__ = ["infer_shapes", "infer_node", "macs", "total_macs", "pool_out", "same_pads", "resolve_reshape",
           "broadcast"]
