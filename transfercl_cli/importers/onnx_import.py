"""ONNX import (opset 9+): torch.onnx exports, tf2onnx exports and the classic model-zoo graphs.

Layout. ONNX image tensors are NCHW; our graph is NHWC. Every ONNX tensor is tracked with its logical (ONNX) shape
and a permutation `perm`: the physical array we compute is `logical.transpose(perm)`. Spatial ops want
perm == (0, 2, 3, 1) (NHWC physical); ops that depend on the element order (Flatten, Reshape, Softmax over several
axes, MatMul/Gemm) get whatever layout makes them correct, and explicit `transpose` nodes are inserted only where
a tensor must change physical order. ONNX Transpose nodes cost nothing: they only relabel the perm. So a tf2onnx
model (NHWC input, then Transpose to NCHW) becomes NHWC end to end with no transposes; a torch model's NCHW input
becomes an NHWC graph input (graph.meta['input_layout'] = 'NCHW'), and a Flatten of a 4-D tensor gets a transpose to
the source's NCHW order first so that the flattened features line up with the source's Gemm weights.

Constants: initializers, Constant nodes and every node whose inputs are all constant (Shape of a tensor included:
all shapes are static here) are folded at import. Weights become node parameters (conv OIHW -> HWIO).

graph.meta: input_layout 'NCHW' when (any) source input was NCHW (the graph input is its NHWC transpose), else
'NHWC'; input_layouts per input; output_layout {name: 'NHWC'} for 4-D outputs returned NHWC where the source
had NCHW (transpose (0, 3, 1, 2) to get the source's tensor); other outputs keep the source's layout.

Node names: the ONNX node name, else its first output's name (made unique). Unsupported ops are reported all at
once in one ModelError before any conversion.
"""
import numpy as np

from ..errors import ModelError
from ..ops.shapes import same_pads
from . import GraphBuilder, need_onnx, unsupported_error

P4 = (0, 2, 3, 1)  # perm of an NHWC-physical tensor with NCHW logical shape

# Ops converted to graph nodes (or folded / relabelled); everything else must be constant-foldable.
SUPPORTED = {
    "Conv", "BatchNormalization", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
    "Softmax", "Clip", "Add", "Sum", "Mul", "Sub", "Div", "Neg", "MaxPool", "AveragePool", "GlobalAveragePool",
    "ReduceMean", "LRN", "Dropout", "Identity", "Cast", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose",
    "Concat", "Gemm", "MatMul", "Pad", "Shape", "Size", "Constant", "ConstantOfShape",
}
# Ops that never produce data from nothing: fine to fold when all inputs are constant.
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                    "Bernoulli"}


def _attrs(node):
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _inv(p):
    inv = [0] * len(p)
    for i, v in enumerate(p):
        inv[v] = i
    return tuple(inv)


def _ident(r):
    return tuple(range(r))


class T:
    """An ONNX tensor as we hold it: our tensor name, logical (ONNX) shape with batch, physical perm."""

    __slots__ = ("name", "shape", "perm")

    def __init__(self, name, shape, perm=None):
        self.name = name
        self.shape = tuple(int(v) for v in shape)
        self.perm = tuple(perm) if perm is not None else _ident(len(self.shape))

    @property
    def rank(self):
        return len(self.shape)

    @property
    def phys(self):
        return tuple(self.shape[i] for i in self.perm)


class _Unsupported(Exception):
    def __init__(self, why):
        super().__init__(why)
        self.why = why


# --- constant folding -------------------------------------------------------------------------------------------------
def _fold(node, vals, attrs, opset):
    """Evaluate a node whose inputs are all constant; returns the list of outputs."""
    op = node.op_type
    from onnx import numpy_helper

    x = vals[0] if vals else None
    if op == "Constant":
        if "value" in attrs:
            return [numpy_helper.to_array(attrs["value"])]
        for k, dt in (("value_float", np.float32), ("value_int", np.int64), ("value_floats", np.float32),
                      ("value_ints", np.int64)):
            if k in attrs:
                return [np.asarray(attrs[k], dtype=dt)]
        raise _Unsupported("Constant without a supported value attribute")
    if op == "ConstantOfShape":
        v = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
        return [np.full(tuple(int(d) for d in x), v.reshape(-1)[0], dtype=v.dtype)]
    if op == "Identity":
        return [x]
    if op == "Cast":
        from onnx import helper

        return [x.astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))]
    if op == "Unsqueeze":
        axes = attrs.get("axes", vals[1].tolist() if len(vals) > 1 else None)
        out = x
        r = x.ndim + len(axes)
        for a in sorted(a + r if a < 0 else a for a in axes):
            out = np.expand_dims(out, a)
        return [out]
    if op == "Squeeze":
        axes = attrs.get("axes", vals[1].tolist() if len(vals) > 1 else None)
        if axes is None:
            return [np.squeeze(x)]
        return [np.squeeze(x, axis=tuple(a + x.ndim if a < 0 else a for a in axes))]
    if op == "Concat":
        return [np.concatenate([np.asarray(v) for v in vals], axis=attrs["axis"])]
    if op == "Gather":
        return [np.take(x, vals[1], axis=attrs.get("axis", 0))]
    if op == "Reshape":
        shape = [int(v) for v in vals[1]]
        shape = [x.shape[i] if v == 0 and not attrs.get("allowzero", 0) else v for i, v in enumerate(shape)]
        return [x.reshape(shape)]
    if op == "Transpose":
        return [np.transpose(x, attrs.get("perm"))]
    if op in ("Add", "Sub", "Mul", "Div"):
        f = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
        if op == "Div" and np.issubdtype(np.asarray(x).dtype, np.integer):
            return [np.floor_divide(x, vals[1]).astype(np.asarray(x).dtype)]
        return [f(x, vals[1]).astype(np.result_type(x, vals[1]))]
    if op == "Sum":
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
    if op == "Flatten":
        ax = attrs.get("axis", 1)
        return [x.reshape(int(np.prod(x.shape[:ax])), -1)]
    if op == "Slice" and opset >= 10:
        starts, ends = vals[1], vals[2]
        axes = vals[3] if len(vals) > 3 and vals[3] is not None else range(len(starts))
        steps = vals[4] if len(vals) > 4 and vals[4] is not None else [1] * len(starts)
        sl = [slice(None)] * x.ndim
        for s, e, a, st in zip(starts, ends, axes, steps):
            sl[int(a)] = slice(int(s), int(e), int(st))
        return [x[tuple(sl)]]
    # Anything else: the onnx reference implementation of that one node.
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    ins = [f"i{i}" for i in range(len(vals))]
    n2 = helper.make_node(op, ins, [f"o{i}" for i in range(len(node.output))], domain=node.domain)
    n2.attribute.extend(node.attribute)
    g = helper.make_graph([n2], "fold", [helper.make_tensor_value_info(i, 0, None) for i in ins],
                          [helper.make_tensor_value_info(f"o{i}", 0, None) for i in range(len(node.output))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    res = ReferenceEvaluator(m).run(None, {i: np.asarray(v) for i, v in zip(ins, vals)})
    return list(res)


# --- the converter ----------------------------------------------------------------------------------------------------
class _Converter:
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

    # names -----------------------------------------------------------------------------------------------------------
    @staticmethod
    def node_name(node):
        return node.name or (node.output[0] if node.output else node.op_type)

    # pre-pass: find every unsupported node before doing any work ------------------------------------------------
    def precheck(self):
        const = {i.name for i in self.g.initializer}
        problems = []
        for n in self.g.node:
            ins = [i for i in n.input if i]
            if n.domain not in ("", "ai.onnx"):
                problems.append((self.node_name(n), f"{n.domain}.{n.op_type}", "custom-domain op"))
                continue
            if n.op_type in NONDETERMINISTIC:
                problems.append((self.node_name(n), n.op_type, "random op"))
                continue
            is_const = n.op_type == "Constant" or (ins and all(i in const for i in ins)) or n.op_type in (
                "Shape", "Size")
            if is_const:
                const.update(o for o in n.output if o)
                continue
            if n.op_type not in SUPPORTED:
                problems.append((self.node_name(n), n.op_type, ""))
                continue
            why = self._attr_problem(n, _attrs(n))
            if why:
                problems.append((self.node_name(n), n.op_type, why))
        if problems:
            raise unsupported_error(problems, "ONNX")

    def _attr_problem(self, n, a):
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
        return self.consts.get(name)

    def is_const(self, name):
        return name in self.consts

    # layout helpers ------------------------------------------------------------------------------------------------
    def emit(self, op, name, inputs, attrs=None, params=None, source="", out=None):
        return self.b.add(op, name, inputs, attrs, params, source, out=out)

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

    def nhwc(self, t, node):
        if t.rank != 4:
            raise _Unsupported(f"expects a 4-D (N, C, H, W) input, got shape {t.shape}")
        return self.to_perm(t, P4)

    def get(self, name, node):
        if name in self.tensors:
            return self.tensors[name]
        if name in self.consts:
            raise _Unsupported(f"input '{name}' is a constant where tcl needs a computed tensor")
        raise _Unsupported(f"input '{name}' is never computed")

    def reshape_to(self, t, out_shape, name, source, op="reshape"):
        """Reshape a tensor to a logical shape: on the physical array as it is when its layout allows, else after
        one transpose that puts each merged/split group of axes side by side in source order."""
        out_shape = tuple(int(v) for v in out_shape)
        if out_shape[0] != t.shape[0]:
            raise _Unsupported(f"reshaping {t.shape} to {out_shape} changes the batch axis")
        plan = _reshape_plan(t.shape, t.perm, out_shape)
        if plan is None:
            raise _Unsupported(f"cannot reshape {t.shape} to {out_shape}")
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

    # the conversion -------------------------------------------------------------------------------------------------
    def run(self):
        from onnx import numpy_helper

        self.precheck()
        for init in self.g.initializer:
            self.consts[init.name] = numpy_helper.to_array(init)
        self._inputs()
        failed = set()
        for node in self.g.node:
            outs = [o for o in node.output if o]
            ins = [i for i in node.input]
            a = _attrs(node)
            if any(i in failed for i in ins):
                failed.update(outs)  # already reported upstream
                continue
            try:
                if node.op_type == "Constant" or (
                        any(i for i in ins) and all((not i) or i in self.consts for i in ins)):
                    vals = [self.consts[i] if i else None for i in ins]
                    while vals and vals[-1] is None:
                        vals.pop()
                    res = _fold(node, vals, a, self.opset)
                    for o, v in zip(node.output, res):
                        if o:
                            self.consts[o] = np.asarray(v)
                    continue
                if node.op_type in ("Shape", "Size"):
                    t = self.get(ins[0], node)
                    shp = np.asarray(t.shape, np.int64)
                    if node.op_type == "Size":
                        self.consts[outs[0]] = np.asarray(int(np.prod(shp)), np.int64)
                    else:
                        s, e = a.get("start", 0), a.get("end", None)
                        self.consts[outs[0]] = shp[s:e]
                    continue
                res = self.convert(node, a)
                for o, t in zip(node.output, res):
                    if o and t is not None:
                        self.tensors[o] = t
            except _Unsupported as e:
                self.problems.append((self.node_name(node), node.op_type, e.why))
                failed.update(outs)
            except ModelError as e:
                self.problems.append((self.node_name(node), node.op_type, e.message))
                failed.update(outs)
        if self.problems:
            raise unsupported_error(self.problems, "ONNX")
        return self._finish()

    def _inputs(self):
        inits = {i.name for i in self.g.initializer}
        real = [i for i in self.g.input if i.name not in inits]
        if not real:
            raise ModelError("The ONNX model has no inputs.", "Check the model file.")
        for vi in real:
            tt = vi.type.tensor_type
            if tt.elem_type not in (1, 10, 11):  # float, float16, double
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

    # per-op conversion ------------------------------------------------------------------------------------------
    def convert(self, node, a):
        op = node.op_type
        name = self.node_name(node)
        ins = list(node.input)
        fn = getattr(self, "op_" + op, None)
        if fn is None:
            raise _Unsupported("not supported")
        return fn(node, name, ins, a)

    def _unary(self, node, name, ins, op, attrs=None):
        t = self.get(ins[0], node)
        y = self.emit(op, name, [t.name], attrs or {}, source=node.op_type, out=node.output[0])
        return [T(y, t.shape, t.perm)]

    def op_Relu(self, node, name, ins, a):
        return self._unary(node, name, ins, "relu")

    def op_Sigmoid(self, node, name, ins, a):
        return self._unary(node, name, ins, "sigmoid")

    def op_Tanh(self, node, name, ins, a):
        return self._unary(node, name, ins, "tanh")

    def op_HardSwish(self, node, name, ins, a):
        return self._unary(node, name, ins, "hard_swish")

    def op_LeakyRelu(self, node, name, ins, a):
        return self._unary(node, name, ins, "leaky_relu", {"alpha": float(a.get("alpha", 0.01))})

    def op_PRelu(self, node, name, ins, a):
        slope = self.const(ins[1])
        if slope is None or np.asarray(slope).size != 1:
            raise _Unsupported("only a single constant slope is supported")
        return self._unary(node, name, ins, "leaky_relu", {"alpha": float(np.asarray(slope).reshape(-1)[0])})

    def op_HardSigmoid(self, node, name, ins, a):
        return self._unary(node, name, ins, "hard_sigmoid",
                           {"alpha": float(a.get("alpha", 0.2)), "beta": float(a.get("beta", 0.5))})

    def op_Clip(self, node, name, ins, a):
        if self.opset < 11:
            lo, hi = a.get("min", -np.inf), a.get("max", np.inf)
        else:
            lo = self.const(ins[1]) if len(ins) > 1 and ins[1] else -np.inf
            hi = self.const(ins[2]) if len(ins) > 2 and ins[2] else np.inf
            if lo is None or hi is None:
                raise _Unsupported("min/max must be constants")
        lo, hi = float(np.asarray(lo).reshape(-1)[0]), float(np.asarray(hi).reshape(-1)[0])
        if lo == 0.0 and hi == 6.0:
            return self._unary(node, name, ins, "relu6")
        if lo == 0.0 and hi == np.inf:
            return self._unary(node, name, ins, "relu")
        return self._unary(node, name, ins, "clip", {"min": lo, "max": hi})

    def op_Identity(self, node, name, ins, a):
        return [self.get(ins[0], node)]

    def op_Cast(self, node, name, ins, a):
        if a.get("to") not in (1, 10, 11):
            raise _Unsupported("only casts to float are supported on computed tensors")
        return [self.get(ins[0], node)]

    def op_Dropout(self, node, name, ins, a):
        if len(node.output) > 1 and node.output[1] and node.output[1] in self.consumers:
            raise _Unsupported("the mask output is not supported")
        rate = a.get("ratio", 0.5)
        if len(ins) > 1 and ins[1]:
            rate = self.const(ins[1]) if self.const(ins[1]) is not None else 0.5
        t = self.get(ins[0], node)
        y = self.emit("dropout", name, [t.name], {"rate": float(np.asarray(rate).reshape(-1)[0]), "seed": None},
                      source="Dropout", out=node.output[0])
        return [T(y, t.shape, t.perm)]

    def op_Softmax(self, node, name, ins, a):
        t = self.get(ins[0], node)
        axis = a.get("axis", -1 if self.opset >= 13 else 1)
        axis = axis + t.rank if axis < 0 else axis
        if axis == 0:
            raise _Unsupported("softmax over the batch axis")
        if self.opset >= 13 or axis == t.rank - 1:
            ph = _inv(t.perm)[axis]
            y = self.emit("softmax", name, [t.name], {"axis": -1 if ph == t.rank - 1 else ph}, source="Softmax",
                          out=node.output[0])
            return [T(y, t.shape, t.perm)]
        # Opset < 13 with axis < last: softmax over the flattened trailing axes, in source order.
        flat = (t.shape[:axis] + (int(np.prod(t.shape[axis:])),))
        f = self.reshape_to(t, flat, f"{name}/flatten", "Softmax")
        s = self.emit("softmax", name, [f.name], {"axis": -1}, source="Softmax")
        back = self.reshape_to(T(s, flat, f.perm), t.shape, f"{name}/unflatten", "Softmax")
        return [back]

    def op_Conv(self, node, name, ins, a):
        t = self.get(ins[0], node)
        w = self.const(ins[1])
        if w is None:
            raise _Unsupported("the weights must be constant")
        if w.ndim != 4 or t.rank != 4:
            raise _Unsupported(f"only 2-D convolutions are supported (weight {w.shape})")
        bias = self.const(ins[2]) if len(ins) > 2 and ins[2] else None
        if len(ins) > 2 and ins[2] and bias is None:
            raise _Unsupported("the bias must be constant")
        groups = int(a.get("group", 1))
        cout, cin_g, kh, kw = w.shape
        if cin_g * groups != t.shape[1]:
            raise _Unsupported(f"weight {w.shape} with group={groups} does not fit {t.shape[1]} input channels")
        strides = tuple(a.get("strides", (1, 1)))
        dil = tuple(a.get("dilations", (1, 1)))
        pads = self._pads(a, t.shape[2:], (kh, kw), strides, dil)
        x = self.nhwc(t, node)
        params = {"weight": np.transpose(w, (2, 3, 1, 0)).astype(np.float32)}  # OIHW -> HWIO
        if bias is not None:
            params["bias"] = np.asarray(bias, np.float32).reshape(-1)
        y = self.emit("conv2d", name, [x], {"kernel": (kh, kw), "strides": strides, "dilations": dil, "pads": pads,
                                            "groups": groups, "act": None}, params, source="Conv",
                      out=node.output[0])
        shp = self.b.shapes[y]
        return [T(y, (t.shape[0], shp[2], shp[0], shp[1]), P4)]

    def _pads(self, a, hw, kernel, strides, dil=(1, 1)):
        ap = a.get("auto_pad", b"NOTSET")
        ap = ap.decode() if isinstance(ap, bytes) else ap
        if ap in ("SAME_UPPER", "SAME_LOWER"):
            up = ap == "SAME_UPPER"
            (pt, pb), (pl, pr) = (same_pads(hw[0], kernel[0], strides[0], dil[0], up),
                                  same_pads(hw[1], kernel[1], strides[1], dil[1], up))
            return (pt, pl, pb, pr)
        if ap == "VALID":
            return (0, 0, 0, 0)
        p = tuple(int(v) for v in a.get("pads", (0, 0, 0, 0)))
        return (p[0], p[1], p[2], p[3])

    def op_BatchNormalization(self, node, name, ins, a):
        t = self.get(ins[0], node)
        vals = [self.const(i) for i in ins[1:5]]
        if any(v is None for v in vals):
            raise _Unsupported("scale, bias, mean and var must be constants")
        if len(node.output) > 1 and any(o and o in self.consumers for o in node.output[1:]):
            raise _Unsupported("training-mode outputs are not supported")
        if t.rank == 4:
            x = self.nhwc(t, node)
            perm = P4
        elif t.rank == 2:
            x = self.to_perm(t, (0, 1))
            perm = (0, 1)
        else:
            raise _Unsupported(f"inputs of rank {t.rank} are not supported")
        params = dict(zip(("gamma", "beta", "mean", "var"), [np.asarray(v, np.float32).reshape(-1) for v in vals]))
        y = self.emit("batchnorm", name, [x], {"eps": float(a.get("epsilon", 1e-5)),
                                               "momentum": float(a.get("momentum", 0.9))}, params,
                      source="BatchNormalization", out=node.output[0])
        return [T(y, t.shape, perm)]

    def _pool(self, node, name, ins, a, op):
        t = self.get(ins[0], node)
        if t.rank != 4:
            raise _Unsupported("only 2-D pooling is supported")
        k = tuple(int(v) for v in a["kernel_shape"])
        s = tuple(int(v) for v in a.get("strides", (1, 1)))
        pads = self._pads(a, t.shape[2:], k, s)
        attrs = {"kernel": k, "strides": s, "pads": pads, "ceil_mode": bool(a.get("ceil_mode", 0))}
        if op == "avgpool":
            attrs["count_include_pad"] = bool(a.get("count_include_pad", 0))
        x = self.nhwc(t, node)
        y = self.emit(op, name, [x], attrs, source=node.op_type, out=node.output[0])
        h, w, c = self.b.shapes[y]
        return [T(y, (t.shape[0], c, h, w), P4)]

    def op_MaxPool(self, node, name, ins, a):
        return self._pool(node, name, ins, a, "maxpool")

    def op_AveragePool(self, node, name, ins, a):
        return self._pool(node, name, ins, a, "avgpool")

    def op_GlobalAveragePool(self, node, name, ins, a):
        t = self.get(ins[0], node)
        x = self.nhwc(t, node)
        y = self.emit("global_avgpool", name, [x], {"keepdims": True}, source=node.op_type, out=node.output[0])
        return [T(y, (t.shape[0], t.shape[1], 1, 1), P4)]

    def op_ReduceMean(self, node, name, ins, a):
        t = self.get(ins[0], node)
        axes = a.get("axes")
        if axes is None and len(ins) > 1 and ins[1]:
            axes = self.const(ins[1])
        if axes is None or t.rank != 4:
            raise _Unsupported("only the mean over the two spatial axes of a 4-D tensor is supported")
        axes = sorted(int(v) + 4 if int(v) < 0 else int(v) for v in np.asarray(axes).reshape(-1))
        keep = bool(a.get("keepdims", 1))
        inv = _inv(t.perm)
        if sorted(inv[ax] for ax in axes) == [1, 2]:
            x = t.name  # already spatial-first physically
            perm_in = t.perm
        elif axes == [2, 3]:
            x, perm_in = self.nhwc(t, node), P4
        else:
            raise _Unsupported(f"mean over axes {axes} is not supported (only the spatial axes)")
        y = self.emit("global_avgpool", name, [x], {"keepdims": keep}, source=node.op_type, out=node.output[0])
        out_shape = tuple(1 if i in axes else d for i, d in enumerate(t.shape))
        if keep:
            return [T(y, out_shape, perm_in)]
        return [T(y, tuple(d for i, d in enumerate(t.shape) if i not in axes))]

    def op_LRN(self, node, name, ins, a):
        t = self.get(ins[0], node)
        x = self.nhwc(t, node)
        y = self.emit("lrn", name, [x], {"size": int(a["size"]), "alpha": float(a.get("alpha", 1e-4)),
                                         "beta": float(a.get("beta", 0.75)), "bias": float(a.get("bias", 1.0))},
                      source="LRN", out=node.output[0])
        return [T(y, t.shape, P4)]

    def op_Pad(self, node, name, ins, a):
        t = self.get(ins[0], node)
        if self.opset < 11:
            pads, value = a.get("pads") or a.get("paddings"), a.get("value", 0.0)
        else:
            pads = self.const(ins[1]) if len(ins) > 1 and ins[1] else None
            if pads is None:
                raise _Unsupported("the pads must be constant")
            value = self.const(ins[2]) if len(ins) > 2 and ins[2] else 0.0
            if value is None:
                raise _Unsupported("the pad value must be constant")
            if len(ins) > 3 and ins[3]:
                axes = [int(v) % t.rank for v in self.const(ins[3])]
                full = [0] * (2 * t.rank)
                pads = [int(v) for v in pads]
                for j, ax in enumerate(axes):
                    full[ax], full[ax + t.rank] = pads[j], pads[j + len(axes)]
                pads = full
        pads = [int(v) for v in np.asarray(pads).reshape(-1)]
        value = float(np.asarray(value).reshape(-1)[0]) if np.asarray(value).size else 0.0
        r = t.rank
        if r != 4 or any(p < 0 for p in pads):
            raise _Unsupported("only non-negative padding of 4-D tensors is supported")
        begin, end = pads[:r], pads[r:]
        # The pad op pads physical axes 1 and 2 (H, W of NHWC).
        for perm in (t.perm, P4):
            pb = [begin[perm[i]] for i in range(4)]
            pe = [end[perm[i]] for i in range(4)]
            if pb[0] == pe[0] == pb[3] == pe[3] == 0:
                x = self.to_perm(t, perm)
                y = self.emit("pad", name, [x], {"pads": (pb[1], pb[2], pe[1], pe[2]), "value": value}, source="Pad",
                              out=node.output[0])
                shape = tuple(d + begin[i] + end[i] for i, d in enumerate(t.shape))
                return [T(y, shape, perm)]
        raise _Unsupported(f"padding of the batch or channel axis is not supported (pads {pads})")

    def op_Flatten(self, node, name, ins, a):
        t = self.get(ins[0], node)
        axis = int(a.get("axis", 1))
        axis = axis + t.rank if axis < 0 else axis
        if axis == 0 or int(np.prod(t.shape[1:axis])) != 1:
            raise _Unsupported(f"flattening with axis={axis} merges the batch axis")
        out = (t.shape[0], int(np.prod(t.shape[axis:])))
        return [self.reshape_to(t, out, name, "Flatten", op="flatten")]

    def _reshape_target(self, t, shape, allowzero=False):
        shape = [int(v) for v in shape]
        shape = [t.shape[i] if v == 0 and not allowzero and i < t.rank else v for i, v in enumerate(shape)]
        if not shape:
            raise _Unsupported("reshaping to a scalar")
        per = int(np.prod(t.shape[1:]))
        if shape[0] == -1:
            rest = shape[1:]
            if -1 in rest:
                raise _Unsupported(f"target shape {shape} has two unknown sizes")
            shape[0] = t.shape[0]
            if int(np.prod(rest)) != per:
                raise _Unsupported(f"cannot reshape {t.shape} to {shape}")
        elif shape[0] != t.shape[0]:
            raise _Unsupported(f"reshaping {t.shape} to {shape} changes the batch axis")
        rest = shape[1:]
        if -1 in rest:
            known = int(np.prod([v for v in rest if v != -1]))
            if known == 0 or per % known:
                raise _Unsupported(f"cannot reshape {t.shape} to {shape}")
            rest[rest.index(-1)] = per // known
        if int(np.prod(rest)) != per:
            raise _Unsupported(f"cannot reshape {t.shape} to {shape}")
        return (t.shape[0],) + tuple(rest)

    def op_Reshape(self, node, name, ins, a):
        t = self.get(ins[0], node)
        if self.opset < 5:
            shape = a["shape"]
        else:
            shape = self.const(ins[1])
            if shape is None:
                raise _Unsupported("the target shape must be constant")
        out = self._reshape_target(t, np.asarray(shape).reshape(-1), bool(a.get("allowzero", 0)))
        return [self.reshape_to(t, out, name, "Reshape")]

    def _axes(self, a, ins):
        axes = a.get("axes")
        if axes is None and len(ins) > 1 and ins[1]:
            axes = self.const(ins[1])
            if axes is None:
                raise _Unsupported("the axes must be constant")
        return None if axes is None else [int(v) for v in np.asarray(axes).reshape(-1)]

    def op_Squeeze(self, node, name, ins, a):
        t = self.get(ins[0], node)
        axes = self._axes(a, ins)
        if axes is None:
            axes = [i for i in range(1, t.rank) if t.shape[i] == 1]
        axes = [v + t.rank if v < 0 else v for v in axes]
        if 0 in axes:
            raise _Unsupported("squeezing the batch axis")
        out = tuple(d for i, d in enumerate(t.shape) if i not in axes)
        return [self.reshape_to(t, out, name, "Squeeze")]

    def op_Unsqueeze(self, node, name, ins, a):
        t = self.get(ins[0], node)
        axes = self._axes(a, ins)
        r = t.rank + len(axes)
        axes = sorted(v + r if v < 0 else v for v in axes)
        if 0 in axes:
            raise _Unsupported("unsqueezing before the batch axis")
        out = list(t.shape)
        for ax in axes:
            out.insert(ax, 1)
        return [self.reshape_to(t, tuple(out), name, "Unsqueeze")]

    def op_Transpose(self, node, name, ins, a):
        t = self.get(ins[0], node)
        q = tuple(a.get("perm", tuple(reversed(range(t.rank)))))
        if q[0] != 0:
            raise _Unsupported(f"permutation {list(q)} moves the batch axis")
        qinv = _inv(q)
        # Pure relabelling: the physical array stays as it is.
        return [T(t.name, tuple(t.shape[i] for i in q), tuple(qinv[p] for p in t.perm))]

    def op_Concat(self, node, name, ins, a):
        ts = [self.get(i, node) for i in ins if i]
        r = ts[0].rank
        axis = int(a["axis"])
        axis = axis + r if axis < 0 else axis
        if axis == 0:
            raise _Unsupported("concatenation along the batch axis")
        perm = ts[0].perm
        if r == 4 and any(t.perm == P4 for t in ts):
            perm = P4
        xs = [self.to_perm(t, perm) for t in ts]
        ph = _inv(perm)[axis]
        y = self.emit("concat", name, xs, {"axis": ph}, source="Concat", out=node.output[0])
        shape = list(ts[0].shape)
        shape[axis] = sum(t.shape[axis] for t in ts)
        return [T(y, shape, perm)]

    def op_Gemm(self, node, name, ins, a):
        t = self.get(ins[0], node)
        w = self.const(ins[1])
        if w is None:
            raise _Unsupported("B must be a constant (weights)")
        if t.rank != 2:
            raise _Unsupported(f"A must be 2-D, got {t.shape}")
        w = np.asarray(w, np.float32)
        if a.get("transB", 0):
            w = w.T
        if float(a.get("alpha", 1.0)) != 1.0:
            w = w * np.float32(a.get("alpha", 1.0))
        params = {"weight": np.ascontiguousarray(w)}
        if len(ins) > 2 and ins[2]:
            c = self.const(ins[2])
            if c is None:
                raise _Unsupported("C must be a constant (bias)")
            c = np.asarray(c, np.float64) * float(a.get("beta", 1.0))
            if c.size not in (1, w.shape[1]) or (c.ndim == 2 and c.shape[0] != 1):
                raise _Unsupported(f"bias C of shape {c.shape} is not per-output")
            params["bias"] = np.broadcast_to(c.reshape(-1), (w.shape[1],)).astype(np.float32)
        x = self.to_perm(t, (0, 1))
        y = self.emit("dense", name, [x], {"act": None}, params, source="Gemm", out=node.output[0])
        return [T(y, (t.shape[0], w.shape[1]))]

    def op_MatMul(self, node, name, ins, a):
        t = self.get(ins[0], node)
        w = self.const(ins[1])
        if w is None or np.asarray(w).ndim != 2 or t.rank != 2:
            raise _Unsupported("only (N, K) x constant (K, M) matrix products are supported")
        x = self.to_perm(t, (0, 1))
        y = self.emit("dense", name, [x], {"act": None}, {"weight": np.asarray(w, np.float32)}, source="MatMul",
                      out=node.output[0])
        return [T(y, (t.shape[0], w.shape[1]))]

    # elementwise arithmetic ---------------------------------------------------------------------------------
    def op_Add(self, node, name, ins, a):
        return self._binary(node, name, ins, "add")

    def op_Sum(self, node, name, ins, a):
        return self._binary(node, name, ins, "add")

    def op_Mul(self, node, name, ins, a):
        return self._binary(node, name, ins, "mul")

    def op_Sub(self, node, name, ins, a):
        return self._binary(node, name, ins, "sub")

    def op_Div(self, node, name, ins, a):
        return self._binary(node, name, ins, "div")

    def op_Neg(self, node, name, ins, a):
        t = self.get(ins[0], node)
        y = self.emit("scale", name, [t.name], {"scale": -1.0, "offset": 0.0}, source="Neg", out=node.output[0])
        return [T(y, t.shape, t.perm)]

    def _binary(self, node, name, ins, kind):
        ins = [i for i in ins if i]
        consts = [i for i in ins if i in self.consts]
        tens = [self.get(i, node) for i in ins if i not in self.consts]
        if not tens:
            raise _Unsupported("no computed input")
        if consts:
            if len(tens) != 1 or len(ins) != 2:
                raise _Unsupported("mixing several computed tensors with constants is not supported")
            return [self._with_const(node, name, tens[0], self.consts[consts[0]], kind,
                                     const_first=ins[0] in self.consts)]
        if kind == "div":
            raise _Unsupported("division of two computed tensors is not supported")
        # Fold x * sigmoid(x) into swish (and x * hard_sigmoid(x) into hard_swish).
        if kind == "mul" and len(tens) == 2:
            fused = self._swish(node, name, tens)
            if fused is not None:
                return [fused]
        r = max(t.rank for t in tens)
        if any(t.rank != r for t in tens):
            raise _Unsupported(f"inputs of different ranks {[t.shape for t in tens]}")
        perm = tens[0].perm
        if r == 4 and any(t.perm == P4 for t in tens):
            perm = P4
        xs = [self.to_perm(t, perm) for t in tens]
        shape = tuple(int(v) for v in np.broadcast_shapes(*[t.shape for t in tens]))
        if kind == "sub":
            neg = self.emit("scale", f"{name}/neg", [xs[1]], {"scale": -1.0, "offset": 0.0}, source="Sub")
            y = self.emit("add", name, [xs[0], neg], source="Sub", out=node.output[0])
        else:
            y = self.emit(kind, name, xs, source=node.op_type, out=node.output[0])
        return T(y, shape, perm),

    def _swish(self, node, name, tens):
        prod = {n.outputs[0]: n for n in self.b.nodes}
        for s, x in ((tens[0], tens[1]), (tens[1], tens[0])):
            n = prod.get(s.name)
            if (n is not None and n.op in ("sigmoid", "hard_sigmoid") and n.inputs[0] == x.name and s.perm == x.perm
                    and len(self._readers(s.name)) == 1 and s.name not in self.graph_outputs):
                if n.op == "hard_sigmoid" and not (abs(n.attrs["alpha"] - 1 / 6) < 1e-6 and n.attrs["beta"] == 0.5):
                    continue
                self.b.nodes.remove(n)
                op = "swish" if n.op == "sigmoid" else "hard_swish"
                y = self.emit(op, name, [x.name], source=node.op_type, out=node.output[0])
                return T(y, x.shape, x.perm)
        return None

    def _readers(self, our_name):
        onnx_names = [k for k, t in self.tensors.items() if t.name == our_name]
        return [c for k in onnx_names for c in self.consumers.get(k, [])]

    def _with_const(self, node, name, t, c, kind, const_first):
        c = np.asarray(c, np.float64)
        if c.ndim > t.rank:
            raise _Unsupported(f"a constant of shape {c.shape} broadcasts the tensor {t.shape} up")
        full = c.reshape((1,) * (t.rank - c.ndim) + c.shape)
        out_shape = tuple(int(v) for v in np.broadcast_shapes(t.shape, full.shape))
        if out_shape != t.shape:
            raise _Unsupported(f"a constant of shape {c.shape} broadcasts the tensor {t.shape} up")
        phys = np.transpose(full, t.perm)
        if phys.size != 1 and any(d != 1 for d in phys.shape[:-1]):
            raise _Unsupported(f"a constant of shape {c.shape} varies along more than the channel axis")
        vec = phys.reshape(-1)
        if kind == "add":
            s, o = np.ones_like(vec), vec
        elif kind == "mul":
            s, o = vec, np.zeros_like(vec)
        elif kind == "sub":
            s, o = (-np.ones_like(vec), vec) if const_first else (np.ones_like(vec), -vec)
        else:  # div
            if const_first:
                raise _Unsupported("dividing a constant by a tensor is not supported")
            s, o = 1.0 / vec, np.zeros_like(vec)
        # MatMul + Add(bias) -> one dense node with a bias.
        prod = next((n for n in self.b.nodes if n.outputs[0] == t.name), None)
        if (kind == "add" and prod is not None and prod.op == "dense" and "bias" not in prod.params
                and len(self._readers(t.name)) == 1 and t.name not in self.graph_outputs):
            prod.params["bias"] = np.broadcast_to(o, (prod.params["weight"].shape[1],)).astype(np.float32)
            return t
        if vec.size == 1:
            attrs, params = {"scale": float(s[0]), "offset": float(o[0])}, {}
        else:
            attrs = {"scale": 1.0, "offset": 0.0}
            params = {"scale": s.astype(np.float32), "offset": o.astype(np.float32)}
        y = self.emit("scale", name, [t.name], attrs, params, source=node.op_type, out=node.output[0])
        return T(y, t.shape, t.perm)


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
    return convert_model(model, input_size=input_size)


def convert_model(model, input_size=None):
    """An in-memory onnx.ModelProto to a Graph."""
    return _Converter(model, input_size).run()


__all__ = ["load_onnx", "convert_model"]
