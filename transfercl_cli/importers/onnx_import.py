"""ONNX import (opset 9+): torch.onnx exports, tf2onnx exports and the classic model-zoo graphs.

Layout. ONNX image tensors are NCHW; our graph is NHWC. Every ONNX tensor is tracked with its logical (ONNX) shape
and a permutation `perm`: the physical array we compute is `logical.transpose(perm)`. Spatial ops want
perm == (0, 2, 3, 1) (NHWC physical); ops that depend on the element order (Flatten, Reshape, Softmax over several
axes, MatMul/Gemm) get whatever layout makes them correct, and explicit `transpose` nodes are inserted only where
a tensor must change physical order. ONNX Transpose nodes cost nothing: they only relabel the perm. So a tf2onnx
model (NHWC input, then Transpose to NCHW) becomes NHWC end to end with no transposes; a torch model's NCHW input
becomes an NHWC graph input (graph.meta['input_layout'] = 'NCHW'), and a Flatten of a 4-D tensor gets a transpose to
the source's NCHW order first so that the flattened features line up with the source's Gemm weights. Ops with axes
(Slice, Split, LayerNormalization, reductions, Concat, Softmax) get the physical axes of the logical ones.

Constants: initializers, Constant nodes and every node whose inputs are all constant (Shape of a tensor included:
all shapes are static here) are folded at import. Weights become node parameters (conv OIHW -> HWIO). A constant
operand of an elementwise op becomes a `scale` node (scalar or per-channel) or a parameter of the op; the graph has
no constant tensors, so a constant of any other shape is a clear error. MatMul of an (N, ..., K) tensor by a
constant (K, M) is a dense layer (2-D) or a 1x1 convolution over the last axis (torch's Linear on a channels-last
tensor, as in ConvNeXt).

Converters: one small function per ONNX op type in onnx_ops.py (registry `ONNX`), each reading the node's attributes
through a `Tracked` view: an attribute no converter reads (or explicitly ignores, with the reason) is an error naming
the node, the attribute and its value, never silently dropped. Constant folding evaluates nodes it does not know (or
attributes it does not read) with onnx's reference implementation.

Fusions (onnx_fuse.py): LayerNorm written out as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div(/Mul/Add) becomes one
`layer_norm` node, GELU written out with Erf (or Tanh) one `gelu` node, torch.onnx's flatten + gather spelling of a
view a reshape, when every constant matches; otherwise the ops are converted one by one. A MatMul/Gemm followed by
Add(bias) becomes one node with a bias (named by the Add's output), x * Sigmoid(x) a swish.

graph.meta: input_layout 'NCHW' when (any) source input was NCHW (the graph input is its NHWC transpose), else
'NHWC'; input_layouts per input; output_layout {name: 'NHWC'} for 4-D outputs returned NHWC where the source
had NCHW (transpose (0, 3, 1, 2) to get the source's tensor); other outputs keep the source's layout.

Node names: the ONNX node name, else its first output's name (made unique); a fused node takes the ONNX nodes'
common name prefix (the source module, e.g. '/features/features.1/features.1.0/block/block.2'), else the last one's
name. Tensor names are the ONNX tensor names (export.py relies on it to copy frozen nodes from the source file).
Unsupported ops are reported all at once in one ModelError before any conversion.
"""
import numpy as np

from ..errors import ModelError
from . import GraphBuilder, need_onnx, unsupported_error
from .onnx_common import FLOAT_TYPES, P4, Const, T, Unsupported, attrs as _attrs, ident as _ident, inv as _inv
from .onnx_fuse import find_fusions
from .onnx_ops import ONNX
from .registry import Tracked

# Ops that never produce data from nothing: never folded, even with constant inputs.
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                    "Bernoulli"}
# Ops only ever folded (their inputs are always constant in a static-shape graph).
FOLD_ONLY = {"Constant", "ConstantOfShape"}
# Ops whose output is a constant although an input is computed (shapes are static; CastLike only reads the dtype).
SHAPE_OPS = {"Shape", "Size"}

# Integer-arithmetic ops (onnxruntime's "QOperator" quantized format): tcl computes in float, and reads quantized
# models in the QDQ format instead (QuantizeLinear/DequantizeLinear pairs around float ops, as tcl exports them).
_QOPERATOR = ("an integer-arithmetic op (a model quantized in onnxruntime's QOperator format); tcl reads quantized "
              "models in the QDQ format (QuantizeLinear + DequantizeLinear around float ops): quantize the float "
              "model with quantize_static(..., quant_format=QuantFormat.QDQ), or import the float model")
INTEGER_OPS = {op: _QOPERATOR for op in ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                                         "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
                                         "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QGemm",
                                         "DynamicQuantizeLinear", "QLinearSoftmax")}

# Kept for callers that list what the importer understands.
SUPPORTED = set(ONNX.table) | FOLD_ONLY


def supported_ops():
    return sorted(set(ONNX.table) | FOLD_ONLY)


# --- constant folding -------------------------------------------------------------------------------------------------
def _fold(node, vals, opset):
    """Evaluate a node whose inputs are all constant; returns the list of outputs. The fast paths read the
    attributes through a Tracked view; any attribute they leave unread sends the node to onnx's reference
    implementation, which knows every attribute."""
    cfg = Tracked(_attrs(node))
    try:
        out = _fold_fast(node.op_type, vals, cfg, opset)
    except (KeyError, ValueError, TypeError, IndexError):
        out = None
    if out is not None and not cfg.unread():
        return out
    return _fold_reference(node, vals, opset)


def _fold_fast(op, vals, a, opset):
    from onnx import helper, numpy_helper

    x = vals[0] if vals else None
    if op == "Constant":
        if "value" in a:
            return [numpy_helper.to_array(a["value"])]
        for k, dt in (("value_float", np.float32), ("value_int", np.int64), ("value_floats", np.float32),
                      ("value_ints", np.int64)):
            if k in a:
                return [np.asarray(a[k], dtype=dt)]
        return None
    if op == "ConstantOfShape":
        v = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
        return [np.full(tuple(int(d) for d in x), v.reshape(-1)[0], dtype=v.dtype)]
    if op == "Identity":
        return [x]
    if op == "Cast":
        if a.get("saturate", 1) != 1:
            return None
        return [x.astype(helper.tensor_dtype_to_np_dtype(a["to"]))]
    if op in ("Unsqueeze", "Squeeze"):
        axes = a.get("axes", vals[1].tolist() if len(vals) > 1 and vals[1] is not None else None)
        if op == "Squeeze":
            if axes is None:
                return [np.squeeze(x)]
            return [np.squeeze(x, axis=tuple(int(v) + x.ndim if v < 0 else int(v) for v in axes))]
        out = x
        r = x.ndim + len(axes)
        for ax in sorted(int(v) + r if v < 0 else int(v) for v in axes):
            out = np.expand_dims(out, ax)
        return [out]
    if op == "Concat":
        return [np.concatenate([np.asarray(v) for v in vals], axis=a["axis"])]
    if op == "Gather":
        return [np.take(x, vals[1], axis=a.get("axis", 0))]
    if op == "Reshape" and opset >= 5:
        shape = [int(v) for v in vals[1]]
        shape = [x.shape[i] if v == 0 and not a.get("allowzero", 0) else v for i, v in enumerate(shape)]
        return [x.reshape(shape)]
    if op == "Transpose":
        return [np.transpose(x, a.get("perm"))]
    if op in ("Add", "Sub", "Mul", "Div") and opset >= 7:
        f = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
        if op == "Div" and np.issubdtype(np.asarray(x).dtype, np.integer):
            return [np.trunc(np.true_divide(x, vals[1])).astype(np.asarray(x).dtype)]
        return [f(x, vals[1]).astype(np.result_type(x, vals[1]))]
    if op == "Sum" and opset >= 8:
        out = vals[0]
        for v in vals[1:]:
            out = out + v
        return [out]
    if op == "Neg":
        return [-x]
    if op == "Sqrt":
        return [np.sqrt(x)]
    if op == "Reciprocal":
        return [(1.0 / x).astype(x.dtype)]
    if op == "DequantizeLinear" and opset >= 10:
        # (x - zero_point) * scale, per tensor or along `axis` (opset 13+): tcl's own int8 exports store their
        # weights this way, and onnx's reference implementation lacks the opset-13 form in some versions.
        scale = np.asarray(vals[1], np.float32)
        zp = np.asarray(vals[2]) if len(vals) > 2 and vals[2] is not None else np.zeros_like(scale, dtype=x.dtype)
        ax = a.get("axis", 1) if opset >= 13 else 1
        if scale.ndim == 1 and scale.size > 1:
            ax = ax + x.ndim if ax < 0 else ax
            shape = [1] * x.ndim
            shape[ax] = scale.size
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        if a.get("block_size", 0):
            return None  # blocked quantization (opset 21): the reference implementation knows it
        return [((x.astype(np.int32) - zp.astype(np.int32)).astype(np.float32) * scale).astype(np.float32)]
    if op == "Flatten":
        ax = a.get("axis", 1)
        ax = ax + x.ndim if ax < 0 else ax
        return [x.reshape(int(np.prod(x.shape[:ax])), -1)]
    if op == "Slice" and opset >= 10:
        starts, ends = vals[1], vals[2]
        axes = vals[3] if len(vals) > 3 and vals[3] is not None else range(len(starts))
        steps = vals[4] if len(vals) > 4 and vals[4] is not None else [1] * len(starts)
        sl = [slice(None)] * x.ndim
        for s, e, ax, st in zip(starts, ends, axes, steps):
            sl[int(ax)] = slice(int(s), int(e), int(st))
        return [x[tuple(sl)]]
    return None


def _fold_reference(node, vals, opset):
    """The onnx reference implementation of that one node."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    ins = [f"i{i}" if v is not None else "" for i, v in enumerate(vals)]
    n2 = helper.make_node(node.op_type, ins, [f"o{i}" for i in range(len(node.output))], domain=node.domain)
    n2.attribute.extend(node.attribute)
    g = helper.make_graph([n2], "fold", [helper.make_tensor_value_info(i, 0, None) for i in ins if i],
                          [helper.make_tensor_value_info(f"o{i}", 0, None) for i in range(len(node.output))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    try:
        res = ReferenceEvaluator(m).run(None, {i: np.asarray(v) for i, v in zip(ins, vals) if i})
    except Exception as e:  # the reference evaluator raises anything from TypeError to RuntimeError
        raise Unsupported(f"cannot evaluate this constant node ({type(e).__name__}: {str(e)[:200]})") from None
    return list(res)


# --- the importer -----------------------------------------------------------------------------------------------------
class OnnxImporter:
    """The conversion state that converters (onnx_ops.py) and fusions (onnx_fuse.py) work with."""

    def __init__(self, model, input_size=None):
        self.model = model
        self.g = model.graph
        self.opset = 13
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                self.opset = int(o.version)
        self.input_size = input_size
        self.b = GraphBuilder()
        self.consts = {}  # ONNX tensor name -> numpy array
        self.tensors = {}  # ONNX tensor name -> T
        self.problems = []
        self.quantized = {}  # ONNX name of a QuantizeLinear's output -> (scale, zero_point, dtype)
        self.batch = 1
        self._conv_cache = {}
        self.input_layout = "NHWC"
        self.input_layouts = {}
        self.consumers = {}
        for n in self.g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.graph_outputs = {o.name for o in self.g.output}
        self.static_const = set()
        self.failed = set()

    # names -----------------------------------------------------------------------------------------------------------
    @staticmethod
    def node_name(node):
        return node.name or (node.output[0] if node.output else node.op_type)

    def used(self, onnx_name):
        """Whether an ONNX tensor is read by any node or is a graph output."""
        return bool(onnx_name) and (onnx_name in self.consumers or onnx_name in self.graph_outputs)

    # pre-pass: find every unsupported node before doing any work ------------------------------------------------
    def precheck(self):
        """{node index: (name, type, reason)} of the nodes tcl cannot convert on their own; sets static_const (the
        tensors that are constant before any conversion)."""
        const = {i.name for i in self.g.initializer}
        problems = {}
        for k, n in enumerate(self.g.node):
            ins = [i for i in n.input if i]
            if n.domain not in ("", "ai.onnx"):
                problems[k] = (self.node_name(n), f"{n.domain}.{n.op_type}", "custom-domain op")
                continue
            if n.op_type in NONDETERMINISTIC:
                problems[k] = (self.node_name(n), n.op_type, "random op")
                continue
            is_const = (n.op_type in FOLD_ONLY or (ins and all(i in const for i in ins)) or n.op_type in SHAPE_OPS
                        or (n.op_type == "CastLike" and ins and ins[0] in const))
            if is_const:
                const.update(o for o in n.output if o)
                continue
            if n.op_type not in ONNX:
                problems[k] = (self.node_name(n), n.op_type, INTEGER_OPS.get(n.op_type, ""))
                continue
            why = self._attr_problem(n, _attrs(n))
            if why:
                problems[k] = (self.node_name(n), n.op_type, why)
        self.static_const = const
        return problems

    @staticmethod
    def _attr_problem(n, a):
        op = n.op_type
        if op in ("Conv", "MaxPool", "AveragePool") and "kernel_shape" in a and len(a["kernel_shape"]) != 2:
            return f"{len(a['kernel_shape'])}-D windows are not supported (only 2-D)"
        if op in ("MaxPool", "AveragePool") and any(d != 1 for d in a.get("dilations", [1, 1])):
            return "dilated pooling is not supported"
        if op == "MaxPool" and len(n.output) > 1 and n.output[1]:
            return "the Indices output is not supported"
        if op == "Pad" and (a.get("mode", b"constant") not in (b"constant", "constant")):
            return f"pad mode {a['mode'].decode() if isinstance(a['mode'], bytes) else a['mode']} is not supported"
        if op == "Gemm" and a.get("transA", 0):
            return "transA=1 is not supported"
        return None

    # constants ----------------------------------------------------------------------------------------------------
    def const(self, name):
        return self.consts.get(name) if name else None

    def is_const(self, name):
        return name in self.consts

    def const_input(self, node, i, what, optional=False):
        """Input i of `node` as a numpy constant; None when it is absent and optional."""
        name = node.input[i] if len(node.input) > i else ""
        if not name:
            if optional:
                return None
            raise Unsupported(f"the {what} input is missing")
        if name not in self.consts:
            raise Unsupported(f"the {what} must be a constant")
        return self.consts[name]

    # layout helpers ------------------------------------------------------------------------------------------------
    def emit(self, op, name, inputs, attrs=None, params=None, source="", out=None):
        return self.b.add(op, name, inputs, attrs, params, source, out=out)

    def producer(self, our_name):
        return next((n for n in reversed(self.b.nodes) if our_name in n.outputs), None)

    def to_perm(self, t, want):
        """Our tensor name holding `t` physically as logical.transpose(want)."""
        want = tuple(want)
        if t.perm == want:
            return t.name
        key = (t.name, want)
        if key in self._conv_cache:
            return self._conv_cache[key]
        # out_phys = in_phys.transpose(r) with perm[r[i]] = want[i].
        inv = _inv(t.perm)
        r = tuple(inv[w] for w in want)
        phys = t.phys
        out_phys = tuple(phys[i] for i in r)
        tag = "nhwc" if want == P4 else ("nchw" if want == _ident(4) else "perm" + "".join(map(str, want)))
        nonunit = [i for i in r if phys[i] != 1]
        if nonunit == sorted(nonunit):
            # Only size-1 axes move: the same element order, a free reshape.
            name = self.emit("reshape", f"{t.name}/to_{tag}", [t.name], {"shape": out_phys[1:]}, source="layout")
        else:
            name = self.emit("transpose", f"{t.name}/to_{tag}", [t.name], {"perm": r}, source="layout")
        self._conv_cache[key] = name
        return name

    def nhwc(self, t, node=None):
        if t.rank != 4:
            raise Unsupported(f"expects a 4-D (N, C, H, W) input, got shape {t.shape}")
        return self.to_perm(t, P4)

    def get(self, name, node=None):
        if name in self.tensors:
            return self.tensors[name]
        if name in self.consts:
            raise Unsupported(f"input '{name}' is a constant where tcl needs a computed tensor")
        raise Unsupported(f"input '{name}' is never computed")

    def reshape_to(self, t, out_shape, name, source, op="reshape"):
        """Reshape a tensor to a logical shape: on the physical array as it is when its layout allows, else after
        one transpose that puts each merged/split group of axes side by side in source order."""
        out_shape = tuple(int(v) for v in out_shape)
        if out_shape[0] != t.shape[0]:
            raise Unsupported(f"reshaping {t.shape} to {out_shape} changes the batch axis")
        plan = _reshape_plan(t.shape, t.perm, out_shape)
        if plan is None:
            raise Unsupported(f"cannot reshape {t.shape} to {out_shape}")
        want, perm_out = plan
        src = self.to_perm(t, want)
        phys_out = tuple(out_shape[i] for i in perm_out)
        if tuple(self.b.shapes[src]) == phys_out[1:]:
            return T(src, out_shape, perm_out)
        if len(phys_out) == 2 and op == "flatten":
            y = self.emit("flatten", name, [src], source=source)
        else:
            y = self.emit("reshape", name, [src], {"shape": phys_out[1:]}, source=source)
        return T(y, out_shape, perm_out)

    def readers(self, our_name):
        """The ONNX nodes reading the tensor we hold as `our_name` (under any ONNX name)."""
        onnx_names = [k for k, t in self.tensors.items() if t.name == our_name]
        return [c for k in onnx_names for c in self.consumers.get(k, [])]

    def is_output(self, our_name):
        return any(t.name == our_name for k, t in self.tensors.items() if k in self.graph_outputs)

    # the conversion -------------------------------------------------------------------------------------------------
    def run(self):
        from onnx import numpy_helper

        problems = self.precheck()
        nodes = list(self.g.node)
        fusions = find_fusions(self, nodes)
        # A node that only runs as part of a fusion is fine here; should the fusion's values not match, the
        # conversion reports it like any other.
        fused = {i for f in fusions.values() for i in f.members}
        problems = [p for k, p in sorted(problems.items()) if k not in fused]
        if problems:
            raise unsupported_error(problems, "ONNX")
        for init in self.g.initializer:
            self.consts[init.name] = numpy_helper.to_array(init)
        self._inputs()
        deferred = {i for f in fusions.values() for i in f.members if i != f.end}
        for i, node in enumerate(nodes):
            if i in deferred:
                continue  # part of a fusion: converted at its last node (fused, or one by one)
            f = fusions.get(i)
            if f is not None:
                if self._try_fusion(f):
                    continue
                for j in f.members:
                    self.process(nodes[j])
                continue
            self.process(node)
        if self.problems:
            raise unsupported_error(self.problems, "ONNX")
        return self._finish()

    def _try_fusion(self, f):
        """Emit a fusion; False (and nothing emitted) when its values do not match or it cannot run fused."""
        if any(i in self.failed for i in f.inputs()):
            return False
        mark = len(self.b.nodes)
        try:
            res = f.emit(self)
        except (Unsupported, ModelError):
            res = None
        if res is None:
            gone = {t for n in self.b.nodes[mark:] for t in n.outputs}
            del self.b.nodes[mark:]
            self._conv_cache = {k: v for k, v in self._conv_cache.items() if v not in gone}
            return False
        for o, t in res.items():
            self.tensors[o] = t
        return True

    def process(self, node):
        """Convert (or fold) one ONNX node, recording its outputs or its problem."""
        outs = [o for o in node.output if o]
        ins = list(node.input)
        if any(i in self.failed for i in ins if i):
            self.failed.update(outs)  # already reported upstream
            return
        name = self.node_name(node)
        try:
            real = [i for i in ins if i]
            if node.op_type in FOLD_ONLY or (real and all(i in self.consts for i in real)):
                vals = [self.consts[i] if i else None for i in ins]
                while vals and vals[-1] is None:
                    vals.pop()
                res = _fold(node, vals, self.opset)
                for o, v in zip(node.output, res):
                    if o:
                        self.consts[o] = np.asarray(v)
                return
            if node.op_type not in ONNX:
                raise Unsupported("not supported")
            res = ONNX.convert(node.op_type, name, Tracked(_attrs(node), where=name), self, node, name)
            for o, t in zip(node.output, res):
                if not o or t is None:
                    continue
                if isinstance(t, Const):
                    self.consts[o] = t.value
                else:
                    self.tensors[o] = t
        except Unsupported as e:
            self.problems.append((name, node.op_type, e.why))
            self.failed.update(outs)
        except ModelError as e:
            self.problems.append((name, node.op_type, ONNX.problem(name, node.op_type, e)))
            self.failed.update(outs)

    def _inputs(self):
        inits = {i.name for i in self.g.initializer}
        real = [i for i in self.g.input if i.name not in inits]
        if not real:
            raise ModelError("The ONNX model has no inputs.", "Check the model file.")
        for vi in real:
            tt = vi.type.tensor_type
            if tt.elem_type not in FLOAT_TYPES[:3]:  # float, float16, double
                raise ModelError(f"Model input '{vi.name}' is not a float tensor (ONNX type {tt.elem_type}).",
                                 "tcl runs image models with float inputs.")
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
            if not dims:
                raise ModelError(f"Model input '{vi.name}' has no shape.", "Export the model with a fixed input shape.")
            if dims[0] is not None:
                self.batch = int(dims[0])
            dims[0] = self.batch
            nhwc = False
            if len(dims) == 4:
                nhwc = self._input_is_nhwc(vi.name, dims)
                hw = (1, 2) if nhwc else (2, 3)
                if dims[hw[0]] is None or dims[hw[1]] is None:
                    if self.input_size is None:
                        raise ModelError(f"Model input '{vi.name}' accepts any image size, so tcl needs one.",
                                         "Set `input.size` in the recipe (e.g. `size: 224`), pass "
                                         "`--input-size H W` on the command line, or input_size=(H, W) in Python.")
                    dims[hw[0]], dims[hw[1]] = self.input_size
                if any(d is None for d in dims):
                    raise ModelError(f"Model input '{vi.name}' has unknown dimensions {dims}.",
                                     "Export the model with a fixed input shape.")
                self.input_layouts[vi.name] = "NHWC" if nhwc else "NCHW"
                if nhwc:
                    name = self.b.add_input(vi.name, dims[1:])
                    self.tensors[vi.name] = T(name, dims, _ident(4))
                else:
                    self.input_layout = "NCHW"
                    name = self.b.add_input(vi.name, (dims[2], dims[3], dims[1]))
                    self.tensors[vi.name] = T(name, dims, P4)
            else:
                if any(d is None for d in dims):
                    raise ModelError(f"Model input '{vi.name}' has unknown dimensions {dims}.",
                                     "Export the model with a fixed input shape.")
                name = self.b.add_input(vi.name, dims[1:])
                self.tensors[vi.name] = T(name, dims)

    def _input_is_nhwc(self, name, dims):
        """tf2onnx feeds an NHWC input (maybe through elementwise preprocessing) into Transpose(0,3,1,2); a
        NCHW input reaches Conv/pooling/BatchNorm directly. Without either sign, guess from the shape."""
        votes = set()
        seen, todo = set(), [name]
        passthrough = {"Add", "Sub", "Mul", "Div", "Cast", "Identity", "Relu", "Clip", "Neg", "Sigmoid", "Tanh",
                       "LeakyRelu", "Dropout"}
        while todo:
            t = todo.pop()
            for c in self.consumers.get(t, []):
                if id(c) in seen:
                    continue
                seen.add(id(c))
                if c.op_type == "Transpose":
                    votes.add("NHWC" if list(_attrs(c).get("perm", [])) == [0, 3, 1, 2] else "other")
                elif c.op_type in ("Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "BatchNormalization",
                                   "LRN", "Pad"):
                    votes.add("NCHW")
                elif c.op_type in passthrough:
                    todo.extend(o for o in c.output if o)
        if votes == {"NHWC"}:
            return True
        if votes:
            return False
        return dims[3] in (1, 3) and dims[1] is not None and dims[1] > 4

    def _finish(self):
        outs = []
        out_layouts = {}
        for o in self.g.output:
            if o.name in self.consts:
                raise ModelError(f"The model output '{o.name}' is a constant.", "Cut the model before it.")
            t = self.tensors.get(o.name)
            if t is None:
                raise ModelError(f"The model output '{o.name}' is never computed.", "The model file may be damaged.")
            want = P4 if (t.rank == 4 and self.input_layout == "NCHW") else _ident(t.rank)
            if want == P4:
                out_layouts[o.name] = "NHWC"  # the source's NCHW tensor, returned NHWC
            name = self.to_perm(t, want)
            if name != o.name:
                if name in self.b.inputs or name in outs:
                    name = self.emit("identity", o.name + "/out", [name], source="output")
                if o.name in self.b.shapes:  # an intermediate tensor holds the name: move it aside
                    self.b.rename_tensor(o.name, self.b.unique_tensor(o.name + "/pre"))
                self.b.rename_tensor(name, o.name)
                name = o.name
            outs.append(name)
        _merge_scales(self.b, set(outs))
        meta = {"format": "onnx", "opset": self.opset, "producer": self.model.producer_name or None,
                "input_layout": self.input_layout, "input_layouts": dict(self.input_layouts)}
        if out_layouts:
            meta["output_layout"] = out_layouts
        first = next(iter(self.b.inputs.values()))
        if len(first) == 3:
            meta["input_size"] = (int(first[0]), int(first[1]))
        return self.b.graph(outs, name=self.g.name or "model", meta=meta)


# --- reshapes on the physical array -----------------------------------------------------------------------------------
def _reshape_groups(shape_in, shape_out):
    """Split a reshape into groups (in axes, out axes) of consecutive axes with equal element counts; None when the
    counts do not match. Size-1 axes join a neighbouring group."""
    groups = []
    i = j = 0
    ni, no = len(shape_in), len(shape_out)
    while i < ni or j < no:
        gi, go = [], []
        pi = po = 1
        if i < ni:
            gi.append(i)
            pi *= shape_in[i]
            i += 1
        if j < no:
            go.append(j)
            po *= shape_out[j]
            j += 1
        while pi != po:
            if pi < po and i < ni:
                gi.append(i)
                pi *= shape_in[i]
                i += 1
            elif po < pi and j < no:
                go.append(j)
                po *= shape_out[j]
                j += 1
            else:
                return None
        while i < ni and shape_in[i] == 1 and (j >= no or shape_out[j] != 1):
            gi.append(i)
            i += 1
        while j < no and shape_out[j] == 1 and (i >= ni or shape_in[i] != 1):
            go.append(j)
            j += 1
        groups.append((gi, go))
    return groups


def _reshape_plan(shape_in, perm_in, shape_out):
    """(perm to hold the input in, perm of the output) for a reshape done on the physical array, or None.

    A reshape merges/splits groups of consecutive logical axes. It can run on the physical array when, among the
    physical axes of size > 1, each group's axes sit side by side and in logical order; the output then keeps the
    groups in their physical order. Otherwise the input is first transposed to such an order."""
    gs = _reshape_groups(shape_in[1:], shape_out[1:])
    if gs is None:
        return None
    gs = [([0], [0])] + [([a + 1 for a in gi], [b + 1 for b in go]) for gi, go in gs]
    owner = {a: k for k, (gi, _go) in enumerate(gs) for a in gi}

    def key(inv, gi):
        nz = [inv[a] for a in gi if shape_in[a] != 1]
        if nz:
            return min(nz)
        return min(inv[a] for a in gi) if gi else len(shape_in)

    def valid(perm):
        seq = [a for a in perm if shape_in[a] != 1]
        seen, prev, last = set(), None, -1
        for a in seq:
            k = owner[a]
            if k != prev:
                if k in seen:
                    return False
                seen.add(k)
            elif a < last:
                return False
            prev, last = k, a
        return True

    inv = _inv(perm_in)
    if valid(perm_in):
        want = tuple(perm_in)
    else:
        order = sorted(gs, key=lambda g: key(inv, g[0]))
        want = tuple(a for gi, _go in order for a in gi)
    inv = _inv(want)
    order = sorted(gs, key=lambda g: key(inv, g[0]))
    return want, tuple(b for _gi, go in order for b in go)


def _merge_scales(b, keep):
    """Fuse chains scale -> scale (tf2onnx's BatchNorm as Mul then Add) into one scale node."""
    readers = {}
    for n in b.nodes:
        for t in n.inputs:
            readers.setdefault(t, []).append(n)
    changed = True
    while changed:
        changed = False
        for n in list(b.nodes):
            if n.op != "scale" or n.outputs[0] in keep:
                continue
            rs = readers.get(n.outputs[0], [])
            if len(rs) != 1 or rs[0].op != "scale":
                continue
            m = rs[0]
            s1, o1 = _scale_vec(n)
            s2, o2 = _scale_vec(m)
            s, o = s1 * s2, o1 * s2 + o2
            if s.size == 1:
                n.attrs, n.params = {"scale": float(s.reshape(-1)[0]), "offset": float(o.reshape(-1)[0])}, {}
            else:
                ch = max(s.size, o.size)
                n.attrs = {"scale": 1.0, "offset": 0.0}
                n.params = {"scale": np.broadcast_to(s, (ch,)).astype(np.float32),
                            "offset": np.broadcast_to(o, (ch,)).astype(np.float32)}
            n.outputs = list(m.outputs)
            b.nodes.remove(m)
            readers = {}
            for k in b.nodes:
                for t in k.inputs:
                    readers.setdefault(t, []).append(k)
            changed = True
            break


def _scale_vec(n):
    """(scale, offset) vectors of a scale node: a parameter overrides the attribute of the same name."""
    s = np.asarray(n.params["scale"] if "scale" in n.params else [n.attrs.get("scale", 1.0)], np.float64)
    o = np.asarray(n.params["offset"] if "offset" in n.params else [n.attrs.get("offset", 0.0)], np.float64)
    return s.reshape(-1), o.reshape(-1)


def load_onnx(path, input_size=None, **_opts):
    onnx = need_onnx()
    try:
        model = onnx.load(path)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise ModelError(f"'{path}' is not a readable ONNX model ({type(e).__name__}: {e}).",
                         "The file may be damaged or not an ONNX file; export it again.") from None
    if not model.graph.node:
        raise ModelError(f"'{path}' holds no ONNX graph.", "The file may be damaged or not an ONNX file.")
    g = convert_model(model, input_size=input_size)
    _meta_from_onnx_props(model, g, path)
    return g


def _meta_from_onnx_props(m, g, path):
    """Class names and preprocessing that `tcl export-weights --format onnx` stores in metadata_props, so an
    exported model predicts and evaluates with its own labels and input scaling. Other producers' keys are left
    alone; a tcl key that does not parse is ignored with a note (the model itself is intact)."""
    import json
    import warnings

    from ..errors import TclNote

    props = {p.key: p.value for p in m.metadata_props}
    for key, meta_key, ok in (("classes", "classes", lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v)),
                              ("preprocessing", "preprocess", lambda v: isinstance(v, dict))):
        if key not in props or meta_key in g.meta:
            continue
        try:
            v = json.loads(props[key])
        except ValueError:
            v = None
        if ok(v):
            g.meta[meta_key] = v
        elif m.producer_name == "transfercl":
            warnings.warn(f"'{path}': its metadata '{key}' does not parse; ignored.", TclNote, stacklevel=3)


def convert_model(model, input_size=None):
    """An in-memory onnx.ModelProto to a Graph."""
    return OnnxImporter(model, input_size).run()


__all__ = ["load_onnx", "convert_model", "supported_ops", "ONNX"]
