"""TFLite (LiteRT) import: float32 `.tflite` classifiers, as the TFLite converter writes them for Android apps, and
tcl's own `--format tflite` exports.

Reader. The flatbuffer is read with the `tflite` package (the TFLite schema's generated flatbuffers accessors):
`TfliteModel` gives the main subgraph's tensors (name, shape, shape_signature, type, constant data, quantization),
its operators (builtin op name, inputs, outputs, builtin options as a dict) and the model's metadata entries.
Constant data may live inside the flatbuffer or, for files over 2 GB, after it (Buffer.offset/size).

Layout. TFLite is NHWC like tcl, so tensors map one to one: no transposes. The first axis of every activation is
the batch (TFLite files usually fix it to 1; tcl runs any batch): ops that would mix it (a RESHAPE or a
FULLY_CONNECTED that merges it, CONCATENATION or MEAN over axis 0) are refused. Weights change layout: CONV_2D
filters are OHWI -> HWIO (kh, kw, cin/groups, cout), DEPTHWISE_CONV_2D filters (1, kh, kw, cin*M) -> (kh, kw, 1,
cin*M) with groups=cin (output channel c*M + m reads input channel c in both), FULLY_CONNECTED weights
(cout, cin) -> (cin, cout).

Converters: one small function per builtin operator, registered in `TFLITE` (a registry.Registry), each reading
the operator's builtin options through an `Options` view (registry.Tracked with the schema's defaults): a field set
to anything but its default that the converter neither reads nor declares irrelevant (`cfg.ignore`, with the
reason) is an error naming the layer, the field and its value. Fields at their schema default are the same as
absent (that is how the converter writes them), so a newer schema's new fields only matter when they are used.
Operator-level extras (custom options, intermediates, builtin_options_2, mutating variables) are refused too.

Names. A node is named after the tensor it writes: the part before the first ';' (the TFLite converter names a
fused op's output after all the ops it fused, the last first: "model/conv1_relu/Relu6;model/conv1_bn/...",
and tcl's export names folded layers the same way: "conv_pw_13_relu;conv_pw_13_bn;conv_pw_13"). A fused
activation on a conv or dense layer (RELU, RELU6) is that node's `act`; on other ops (ADD, CONCATENATION, pools)
and other activations it is a separate node carrying the tensor's name, the op itself being "NAME/OP".

Constants. Tensors with data are constants. int8/uint8 constants with quantization parameters (weight-only
and dynamic-range quantized models, tcl's --int8 export) are dequantized at import, per channel, with a TclNote;
float16 constants (float16-quantized models) become float32. DEQUANTIZE of a constant is folded. A model whose
activations are quantized (full-integer models: QUANTIZE ops, int8/uint8 computed tensors) is refused as a whole:
tcl trains float32 models. A constant operand of ADD/MUL/SUB/DIV becomes a `scale` node (scalar or per-channel);
MAXIMUM/MINIMUM with a scalar constant a `clip` node.

graph.meta: format 'tflite', input_size, input_layout 'NHWC', tflite_version, description, and from tcl's own
exports (metadata entry "transfercl", JSON) classes and preprocess.
"""
import json
import re
import warnings

import numpy as np

from ..errors import ModelError, TclNote
from ..export_tflite import OP_OPTIONS
from ..ops.shapes import same_pads
from . import GraphBuilder, unsupported_error
from .registry import Registry, Tracked

TFLITE = Registry("TFLite", fix="Run `tcl inspect MODEL` to list unsupported layers.")
METADATA_NAME = "transfercl"
TFLITE_MAGIC = b"TFL3"

# TensorType (schema.fbs) -> numpy dtype, for the types tcl reads.
DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 6: np.bool_, 7: np.int16,
          9: np.int8, 10: np.float64}
TYPE_NAMES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: "string", 6: "bool", 7: "int16",
              8: "complex64", 9: "int8", 10: "float64", 11: "complex128", 12: "uint64", 13: "resource",
              14: "variant", 15: "uint32", 16: "uint16", 17: "int4"}
QUANTIZED_TYPES = {3, 7, 9, 17}
# ActivationFunctionType -> (tcl act attribute of conv/dense, else the separate op and its attrs).
ACT = {0: None, 1: "relu", 2: "relu_n1_to_1", 3: "relu6", 4: "tanh", 5: "sign_bit"}


class Unsupported(Exception):
    def __init__(self, why):
        super().__init__(why)
        self.why = why


class Const:
    """A converter's result that is a constant (DEQUANTIZE of a constant), not a computed tensor."""

    def __init__(self, value):
        self.value = np.asarray(value)


def need_tflite():
    from ..export_tflite import need_tflite as need

    return need()


# --- the reader -------------------------------------------------------------------------------------------------------
def _snake(camel):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


_FIELDS = {}


def _fields(cls):
    """[(accessor, schema field name, is_vector)] of a generated table class, and their defaults (read from an
    empty table)."""
    if cls in _FIELDS:
        return _FIELDS[cls]
    import flatbuffers

    names = [k for k, v in vars(cls).items() if callable(v) and not k.startswith("_") and k != "Init"
             and not k.startswith("GetRootAs") and not k.endswith("BufferHasIdentifier")]
    vectors = {k for k in names if k + "Length" in names}
    aux = {k + s for k in vectors for s in ("Length", "IsNone", "AsNumpy")}
    fields = [(k, _snake(k), k in vectors) for k in names if k not in aux]
    b = flatbuffers.Builder(16)
    b.StartObject(0)
    b.Finish(b.EndObject())
    empty = cls()
    buf = b.Output()
    empty.Init(buf, flatbuffers.encode.Get(flatbuffers.packer.uoffset, buf, 0))
    defaults = {f: _value(empty, acc, vec) for acc, f, vec in fields}
    _FIELDS[cls] = (fields, defaults)
    return _FIELDS[cls]


def _value(obj, acc, vec):
    if vec:
        return [_plain(getattr(obj, acc)(j)) for j in range(getattr(obj, acc + "Length")())]
    return _plain(getattr(obj, acc)())


def _plain(v):
    if hasattr(v, "_tab"):
        return "<table>"
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


def _options_class(name):
    import importlib

    return getattr(importlib.import_module(f"tflite.{name}"), name)


def table_dict(obj):
    """{field: value} of a flatbuffers table's fields that differ from the schema default, and the defaults."""
    fields, defaults = _fields(type(obj))
    vals = {f: _value(obj, acc, vec) for acc, f, vec in fields}
    return {k: v for k, v in vals.items() if v != defaults[k]}, defaults


_MISSING = object()


class Options(Tracked):
    """A Tracked view of builtin options: only the non-default fields are keys (what must be understood);
    `opt(field)` reads a field, giving the schema default when it is absent."""

    def __init__(self, data, defaults, where=""):
        super().__init__(data, where)
        self.defaults = dict(defaults)

    def opt(self, key, absent=_MISSING):
        """`absent`: the value of a field that the installed schema (an older tflite package) does not have."""
        if key not in self.defaults and key not in self._data:
            if absent is not _MISSING:
                return absent
            raise KeyError(f"options have no field {key!r} (fields: {sorted(self.defaults)})")
        return self.get(key, self.defaults.get(key))


class TensorInfo:
    __slots__ = ("index", "name", "shape", "signature", "type", "data", "quant", "sparse", "variable")

    @property
    def type_name(self):
        return TYPE_NAMES.get(self.type, f"type {self.type}")

    @property
    def is_const(self):
        return self.data is not None


class OpInfo:
    __slots__ = ("index", "op", "version", "inputs", "outputs", "options", "defaults", "options_type", "extras",
                 "custom")


class TfliteModel:
    """The main subgraph of a .tflite file, read with the tflite package's accessors."""

    def __init__(self, data, path="<bytes>"):
        tflite = need_tflite()
        from tflite.BuiltinOperator import BuiltinOperator
        from tflite.BuiltinOptions import BuiltinOptions

        self.path = path
        self.data = data
        if len(data) < 8 or data[4:8] != TFLITE_MAGIC:
            raise ModelError(f"'{path}' is not a TFLite model (no 'TFL3' identifier).",
                             "The file may be damaged or not a .tflite file; convert the model again.")
        try:
            m = tflite.Model.GetRootAs(data, 0)
            self.version = int(m.Version())
            self.description = _plain(m.Description()) if m.Description() else ""
            if m.SubgraphsLength() < 1:
                raise ModelError(f"'{path}' holds no TFLite subgraph.", "The file may be damaged.")
            self.subgraphs = m.SubgraphsLength()
            codes = []
            for i in range(m.OperatorCodesLength()):
                oc = m.OperatorCodes(i)
                code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
                custom = oc.CustomCode()
                codes.append((code, int(oc.Version()), custom.decode("utf-8", "replace") if custom else None))
            op_names = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
            opt_names = {v: k for k, v in vars(BuiltinOptions).items() if not k.startswith("_")}
            self._m = m
            sg = m.Subgraphs(0)
            self.tensors = [self._tensor(sg.Tensors(i), i) for i in range(sg.TensorsLength())]
            self.inputs = [int(v) for v in sg.InputsAsNumpy()] if sg.InputsLength() else []
            self.outputs = [int(v) for v in sg.OutputsAsNumpy()] if sg.OutputsLength() else []
            self.ops = []
            for i in range(sg.OperatorsLength()):
                o = sg.Operators(i)
                info = OpInfo()
                info.index = i
                code, info.version, info.custom = codes[o.OpcodeIndex()]
                info.op = "CUSTOM" if info.custom else op_names.get(code, f"BUILTIN_{code}")
                info.inputs = [int(v) for v in o.InputsAsNumpy()] if o.InputsLength() else []
                info.outputs = [int(v) for v in o.OutputsAsNumpy()] if o.OutputsLength() else []
                info.options_type = opt_names.get(int(o.BuiltinOptionsType()), f"options type {o.BuiltinOptionsType()}")
                info.options, info.defaults = {}, {}
                expected = OP_OPTIONS.get(info.op)
                if o.BuiltinOptionsType() != 0:
                    tab = o.BuiltinOptions()
                    obj = _options_class(info.options_type)()
                    obj.Init(tab.Bytes, tab.Pos)
                    info.options, info.defaults = table_dict(obj)
                elif expected is not None:
                    # No options table: every field has its schema default.
                    info.options_type = expected
                    info.defaults = _fields(_options_class(expected))[1]
                extras = {}
                if o.CustomOptionsLength():
                    extras["custom_options"] = f"<{o.CustomOptionsLength()} bytes>"
                if o.MutatingVariableInputsLength():
                    extras["mutating_variable_inputs"] = list(o.MutatingVariableInputsAsNumpy())
                if o.IntermediatesLength():
                    extras["intermediates"] = list(o.IntermediatesAsNumpy())
                if hasattr(o, "BuiltinOptions2Type") and o.BuiltinOptions2Type():
                    extras["builtin_options_2"] = int(o.BuiltinOptions2Type())
                if hasattr(o, "LargeCustomOptionsSize") and o.LargeCustomOptionsSize():
                    extras["large_custom_options"] = int(o.LargeCustomOptionsSize())
                info.extras = extras
                self.ops.append(info)
            self.metadata = {}
            for i in range(m.MetadataLength()):
                md = m.Metadata(i)
                name = md.Name().decode("utf-8", "replace") if md.Name() else ""
                self.metadata[name] = self._buffer_bytes(int(md.Buffer()))
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged flatbuffer raises anything from IndexError to struct.error
            raise ModelError(f"'{path}' is not a readable TFLite model ({type(e).__name__}: {e}).",
                             "The file may be damaged or truncated; convert the model again.") from None

    def _buffer(self, idx):
        """The bytes of buffer `idx` as a writable uint8 array (a copy: the weights become trainable parameters)."""
        m = self._m
        if idx <= 0 or idx >= m.BuffersLength():
            return np.zeros(0, np.uint8)
        buf = m.Buffers(idx)
        off = int(buf.Offset()) if hasattr(buf, "Offset") else 0
        if off > 1:  # data after the flatbuffer (models over 2 GB)
            size = int(buf.Size())
            if off + size > len(self.data):
                raise ModelError(f"'{self.path}': a weight buffer lies past the end of the file.",
                                 "The file is truncated; copy or convert it again.")
            return np.frombuffer(self.data, np.uint8, size, off).copy()
        if buf.DataLength() == 0:
            return np.zeros(0, np.uint8)
        return buf.DataAsNumpy().copy()

    def _buffer_bytes(self, idx):
        return self._buffer(idx).tobytes()

    def _tensor(self, t, i):
        info = TensorInfo()
        info.index = i
        info.name = t.Name().decode("utf-8", "replace") if t.Name() else ""
        info.shape = [int(v) for v in t.ShapeAsNumpy()] if t.ShapeLength() else []
        info.signature = [int(v) for v in t.ShapeSignatureAsNumpy()] if t.ShapeSignatureLength() else None
        info.type = int(t.Type())
        info.sparse = t.Sparsity() is not None
        info.variable = bool(t.IsVariable())
        raw = self._buffer(int(t.Buffer()))
        info.data = None
        if raw.size:
            dt = DTYPES.get(info.type)
            if dt is None:
                info.data = raw.tobytes()  # kept as bytes: refused where it is used
            else:
                dt = np.dtype(dt).newbyteorder("<")
                if raw.size % dt.itemsize:
                    raise ModelError(f"'{self.path}': tensor '{info.name}' has {raw.size} bytes, not a whole number "
                                     f"of {dt.name} values.", "The file may be damaged.")
                arr = raw.view(dt)
                n = int(np.prod(info.shape)) if info.shape else 1
                if arr.size != n and not info.sparse:
                    raise ModelError(f"'{self.path}': tensor '{info.name}' has {arr.size} values for its shape "
                                     f"{info.shape}.", "The file may be damaged.")
                info.data = arr.reshape(info.shape) if not info.sparse else arr
        q = t.Quantization()
        info.quant = None
        if q is not None and (q.ScaleLength() or q.ZeroPointLength() or q.DetailsType()):
            info.quant = {"scale": q.ScaleAsNumpy().astype(np.float64) if q.ScaleLength() else np.zeros(0),
                          "zero_point": q.ZeroPointAsNumpy().astype(np.int64) if q.ZeroPointLength() else np.zeros(0, np.int64),
                          "axis": int(q.QuantizedDimension()), "details": int(q.DetailsType())}
        return info


def clean_name(tensor_name, index):
    """A node name from a tensor name: the part before the first ';' (fused ops list every source op, last
    first), else 'tensor_INDEX'."""
    name = (tensor_name or "").split(";")[0].strip()
    return name or f"tensor_{index}"


# --- the importer -----------------------------------------------------------------------------------------------------
class TfliteImporter:
    """The conversion state the converters work with."""

    def __init__(self, model, input_size=None):
        self.m = model
        self.input_size = input_size
        self.b = GraphBuilder()
        self.vals = {}  # TFLite tensor index -> our tensor name
        self.consts = {}  # TFLite tensor index -> numpy array (float32 weights dequantized)
        self.dequantized = []
        self.problems = []
        self.failed = set()
        self.produced = {o for op in model.ops for o in op.outputs}

    # tensors ---------------------------------------------------------------------------------------------------
    def tensor(self, i):
        return self.m.tensors[i]

    def is_const(self, i):
        return i in self.consts or (i >= 0 and self.m.tensors[i].is_const)

    def const(self, i):
        """The constant value of tensor i (float weights dequantized), or None when it is computed."""
        if i < 0:
            return None
        if i in self.consts:
            return self.consts[i]
        t = self.m.tensors[i]
        if not t.is_const:
            return None
        if isinstance(t.data, bytes):
            raise Unsupported(f"the constant '{t.name}' is of type {t.type_name}, which tcl cannot read")
        if t.sparse:
            raise Unsupported(f"the constant '{t.name}' is stored sparse, which tcl cannot read")
        v = t.data
        if t.type in QUANTIZED_TYPES:
            v = self._dequantize(t)
        elif t.type == 1:
            v = v.astype(np.float32)
        self.consts[i] = v
        return v

    def _dequantize(self, t):
        q = t.quant
        if q is None or not q["scale"].size:
            raise Unsupported(f"the {t.type_name} constant '{t.name}' has no quantization scale")
        if q["details"]:
            raise Unsupported(f"the constant '{t.name}' uses custom quantization")
        scale, zp = q["scale"], q["zero_point"]
        if not zp.size:
            zp = np.zeros_like(scale, np.int64)
        v = t.data.astype(np.float64)
        if scale.size > 1:
            ax = q["axis"]
            if scale.size != v.shape[ax] or zp.size not in (1, scale.size):
                raise Unsupported(f"the constant '{t.name}' has {scale.size} scales for axis {ax} of shape "
                                  f"{list(v.shape)}")
            shape = [1] * v.ndim
            shape[ax] = -1
            scale = scale.reshape(shape)
            zp = zp.reshape(shape) if zp.size > 1 else zp
        out = ((v - zp) * scale).astype(np.float32)
        self.dequantized.append(t.name)
        return out

    def x(self, op, k=0):
        """Our tensor name of computed input k."""
        i = op.inputs[k]
        if i < 0 or i not in self.vals:
            if self.is_const(i):
                raise Unsupported(f"input {k} is a constant where tcl needs a computed tensor")
            raise Unsupported(f"input {k} is missing")
        return self.vals[i]

    def shape(self, name):
        return tuple(self.b.shapes[name])

    def emit(self, op, name, inputs, attrs=None, params=None, source="", out=None):
        return self.b.add(op, name, inputs, attrs, params, source, out=out or name)

    def op_name(self, op, name):
        """The name of an op whose fused activation is a node of its own (that node takes `name`): the op's own
        part of a TF-converter tensor name ("model/add/Relu6;model/add" -> "model/add"), else "NAME/OP"."""
        parts = [p.strip() for p in self.m.tensors[op.outputs[0]].name.split(";")]
        if len(parts) > 1 and parts[1]:
            return parts[1]
        return f"{name}/{op.op.lower()}"

    def act_after(self, y, code, name, source):
        """A fused activation code of a non-conv op as its own node (named `name`), or y as it is."""
        act = ACT.get(int(code), f"activation {code}")
        if act is None:
            return y
        if act in ("relu", "relu6", "tanh"):
            return self.emit(act, name, [y], source=f"{source}/activation")
        if act == "relu_n1_to_1":
            return self.emit("clip", name, [y], {"min": -1.0, "max": 1.0}, source=f"{source}/activation")
        raise Unsupported(f"the fused activation {act} is not supported")

    # pre-pass ----------------------------------------------------------------------------------------------------
    def precheck(self):
        m = self.m
        computed = set(m.inputs) | self.produced
        quantized = sorted({m.tensors[i].name for i in computed if m.tensors[i].type in QUANTIZED_TYPES})
        qops = [op for op in m.ops if op.op == "QUANTIZE"]
        if quantized or qops:
            names = ", ".join(f"'{n}'" for n in quantized[:3]) + (" ..." if len(quantized) > 3 else "")
            raise ModelError(
                f"'{m.path}' is a quantized TFLite model: its activations are integers"
                + (f" ({names})" if names else "") + ", and tcl fine-tunes float32 models (weight-only and "
                "dynamic-range quantized weights are dequantized, quantized activations are not).",
                "Convert the float model to TFLite again without full-integer quantization (no "
                "`representative_dataset`), or give tcl the Keras .h5 or ONNX model.")
        problems = []
        for op in m.ops:
            name = clean_name(m.tensors[op.outputs[0]].name, op.outputs[0]) if op.outputs else f"op_{op.index}"
            if op.op == "CUSTOM":
                problems.append((name, f"CUSTOM {op.custom}", "custom op"))
            elif op.op not in TFLITE:
                problems.append((name, op.op, ""))
            elif op.extras:
                k, v = next(iter(op.extras.items()))
                problems.append((name, op.op, f"operator field {k}={v} is not supported"))
        for i, t in enumerate(m.tensors):
            if t.variable:
                problems.append((t.name, "variable tensor", "stateful models are not supported"))
        if m.subgraphs > 1 and problems:
            problems.append(("(model)", f"{m.subgraphs} subgraphs", "only the main subgraph is read"))
        if problems:
            raise unsupported_error(problems, "TFLite")

    # the conversion --------------------------------------------------------------------------------------------
    def run(self):
        self.precheck()
        self._inputs()
        for op in self.m.ops:
            self.process(op)
        if self.problems:
            raise unsupported_error(self.problems, "TFLite")
        return self._finish()

    def process(self, op):
        outs = [o for o in op.outputs if o >= 0]
        name = clean_name(self.m.tensors[outs[0]].name, outs[0]) if outs else f"op_{op.index}"
        if any(i in self.failed for i in op.inputs if i >= 0):
            self.failed.update(outs)
            return
        try:
            for i in outs:
                t = self.m.tensors[i]
                if t.type != 0:
                    raise Unsupported(f"its output '{t.name}' is of type {t.type_name}; tcl computes float32")
            expected = OP_OPTIONS.get(op.op)
            if expected is not None and op.options_type != expected:
                raise Unsupported(f"its builtin options are {op.options_type}, not {expected}")
            cfg = Options(op.options, op.defaults, where=name)
            res = TFLITE.convert(op.op, name, cfg, self, op, name)
            for o, r in zip(op.outputs, res):
                if o < 0 or r is None:
                    continue
                if isinstance(r, Const):
                    self.consts[o] = r.value
                else:
                    self.vals[o] = r
        except Unsupported as e:
            self.problems.append((name, op.op, e.why))
            self.failed.update(outs)
        except ModelError as e:
            self.problems.append((name, op.op, TFLITE.problem(name, op.op, e)))
            self.failed.update(outs)

    def _inputs(self):
        if not self.m.inputs:
            raise ModelError(f"'{self.m.path}': the TFLite model has no inputs.", "Check the model file.")
        for i in self.m.inputs:
            t = self.m.tensors[i]
            if t.type != 0:
                raise ModelError(f"Model input '{t.name}' is of type {t.type_name}, not float32.",
                                 "tcl runs image models with float32 inputs; convert the float model to TFLite.")
            shape = list(t.shape)
            sig = list(t.signature) if t.signature and len(t.signature) == len(shape) else list(shape)
            if not shape:
                raise ModelError(f"Model input '{t.name}' has no shape.", "Convert the model with a fixed input shape.")
            dims = [None if s < 0 else d for d, s in zip(shape, sig)]
            if len(dims) == 4 and (dims[1] is None or dims[2] is None):
                if self.input_size is None:
                    raise ModelError(f"Model input '{t.name}' accepts any image size, so tcl needs one.",
                                     "Set `input.size` in the recipe (e.g. `size: 224`), pass `--input-size H W` on "
                                     "the command line, or input_size=(H, W) in Python.")
                dims[1], dims[2] = self.input_size
            if any(d is None or d <= 0 for d in dims[1:]):
                raise ModelError(f"Model input '{t.name}' has unknown dimensions {sig}.",
                                 "Convert the model with a fixed input shape.")
            self.vals[i] = self.b.add_input(clean_name(t.name, i), dims[1:])

    def _finish(self):
        outs = []
        for o in self.m.outputs:
            if o in self.consts or (o not in self.vals and self.m.tensors[o].is_const):
                raise ModelError(f"The model output '{self.m.tensors[o].name}' is a constant.", "Cut the model before it.")
            if o not in self.vals:
                raise ModelError(f"The model output '{self.m.tensors[o].name}' is never computed.",
                                 "The file may be damaged.")
            y = self.vals[o]
            if y in self.b.inputs or y in outs:
                y = self.emit("identity", f"{y}/out", [y], source="output")
            outs.append(y)
        first = next(iter(self.b.inputs.values()))
        meta = {"format": "tflite", "input_layout": "NHWC", "tflite_version": self.m.version,
                "description": self.m.description or None}
        if len(first) == 3:
            meta["input_size"] = (int(first[0]), int(first[1]))
        if self.dequantized:
            note = (f"{len(self.dequantized)} int8/uint8 weight tensor(s) were dequantized to float32 at import "
                    "(tcl computes in float32; outputs can differ slightly from the quantized runtime's)")
            meta["notes"] = [note]
            meta["dequantized"] = list(self.dequantized)
            warnings.warn(f"'{self.m.path}': {note}.", TclNote, stacklevel=4)
        return self.b.graph(outs, name="model", meta=meta)


# --- converters -------------------------------------------------------------------------------------------------------
# Each takes (cx: TfliteImporter, op: OpInfo, name: node name, cfg: Options) and returns one entry per output:
# our tensor name, a Const, or None.

def _norm_axis(ax, rank):
    a = int(ax) + rank if int(ax) < 0 else int(ax)
    if not 0 <= a < rank:
        raise Unsupported(f"axis {ax} is out of range for a rank-{rank} tensor")
    return a


def _int_const(cx, op, k, what):
    v = cx.const(op.inputs[k]) if len(op.inputs) > k else None
    if v is None:
        raise Unsupported(f"the {what} must be a constant")
    return [int(a) for a in np.asarray(v).reshape(-1)]


def _padding(cx, cfg, x, kernel, strides, dil):
    mode = int(cfg.opt("padding"))
    if mode == 1:  # VALID
        return (0, 0, 0, 0)
    if mode != 0:
        raise Unsupported(f"padding mode {mode} is not SAME or VALID")
    h, w = cx.shape(x)[:2]
    (pt, pb), (pl, pr) = (same_pads(h, kernel[0], strides[0], dil[0]), same_pads(w, kernel[1], strides[1], dil[1]))
    return (pt, pl, pb, pr)


def _fused_act(cfg):
    """(activation name or None, the same when a conv/dense node carries it as `act`: RELU and RELU6; other fused
    activations become a node after it)."""
    code = int(cfg.opt("fused_activation_function"))
    act = ACT.get(code, f"activation {code}")
    return act, (act if act in ("relu", "relu6") else None)


def _conv_like(cx, op, name, cfg, depthwise):
    x = cx.x(op, 0)
    if len(cx.shape(x)) != 3:
        raise Unsupported(f"expects a 4-D NHWC input, got shape {('N',) + cx.shape(x)}")
    w = cx.const(op.inputs[1])
    if w is None:
        raise Unsupported("the filter must be a constant")
    if w.ndim != 4:
        raise Unsupported(f"the filter has shape {list(w.shape)}, not 4-D")
    cin = cx.shape(x)[2]
    strides = (int(cfg.opt("stride_h")), int(cfg.opt("stride_w")))
    dil = (int(cfg.opt("dilation_h_factor")), int(cfg.opt("dilation_w_factor")))
    if min(strides) < 1 or min(dil) < 1:
        raise Unsupported(f"strides {strides} and dilations {dil} must be at least 1")
    if depthwise:
        one, kh, kw, cout = w.shape
        m = int(cfg.opt("depth_multiplier"))
        if one != 1 or cout % cin or (m not in (0, cout // cin)):
            raise Unsupported(f"the depthwise filter {list(w.shape)} with depth_multiplier {m} does not fit "
                              f"{cin} input channels")
        weight = np.transpose(w, (1, 2, 0, 3))  # (1, kh, kw, cin*M) -> (kh, kw, 1, cin*M)
        groups = cin
    else:
        cout, kh, kw, cin_g = w.shape
        if cin % cin_g:
            raise Unsupported(f"the filter {list(w.shape)} does not fit {cin} input channels")
        groups = cin // cin_g
        weight = np.transpose(w, (1, 2, 3, 0))  # OHWI -> HWIO
    # quantized_bias_type only chooses the integer type of a quantized kernel's bias; tcl's weights are float.
    cfg.ignore("quantized_bias_type")
    params = {"weight": weight}
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        b = cx.const(op.inputs[2])
        if b is None:
            raise Unsupported("the bias must be a constant")
        params["bias"] = np.asarray(b, np.float32).reshape(-1)
    pads = _padding(cx, cfg, x, (kh, kw), strides, dil)
    act, fused = _fused_act(cfg)
    own = name if act is None or fused else cx.op_name(op, name)
    y = cx.emit("conv2d", own, [x], {"kernel": (kh, kw), "strides": strides, "dilations": dil, "pads": pads,
                                     "groups": groups, "act": fused}, params, source=op.op)
    if act is not None and not fused:
        y = cx.act_after(y, cfg.opt("fused_activation_function"), name, op.op)
    return [y]


@TFLITE.register("CONV_2D")
def conv_2d(cx, op, name, *, cfg):
    return _conv_like(cx, op, name, cfg, depthwise=False)


@TFLITE.register("DEPTHWISE_CONV_2D")
def depthwise_conv_2d(cx, op, name, *, cfg):
    return _conv_like(cx, op, name, cfg, depthwise=True)


@TFLITE.register("FULLY_CONNECTED")
def fully_connected(cx, op, name, *, cfg):
    x = cx.x(op, 0)
    w = cx.const(op.inputs[1])
    if w is None or w.ndim != 2:
        raise Unsupported("the weights must be a 2-D constant")
    if int(cfg.opt("weights_format")) != 0:
        raise Unsupported(f"weights_format {cfg.opt('weights_format')} (shuffled int8 weights) is not supported")
    # asymmetric_quantize_inputs: how a hybrid (int8-weight) kernel quantizes its float input at run time; tcl
    # computes in float32 with the dequantized weights. quantized_bias_type: a quantized kernel's bias type.
    cfg.ignore("asymmetric_quantize_inputs", "quantized_bias_type")
    keep = bool(cfg.opt("keep_num_dims"))
    cout, cin = (int(v) for v in w.shape)
    params = {"weight": np.ascontiguousarray(w.T)}
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        b = cx.const(op.inputs[2])
        if b is None:
            raise Unsupported("the bias must be a constant")
        params["bias"] = np.asarray(b, np.float32).reshape(-1)
    act, fused = _fused_act(cfg)
    own = name if act is None or fused else cx.op_name(op, name)
    xs = cx.shape(x)
    if len(xs) > 1 and keep:
        if xs[-1] != cin:
            raise Unsupported(f"weights {list(w.shape)} do not fit an input of shape {('N',) + xs}")
        attrs = {"kernel": (1, 1), "strides": (1, 1), "dilations": (1, 1), "pads": (0, 0, 0, 0), "groups": 1,
                 "act": fused}
        cp = {"weight": params["weight"].reshape(1, 1, cin, cout), **({"bias": params["bias"]} if "bias" in params else {})}
        if len(xs) == 3:
            y = cx.emit("conv2d", own, [x], attrs, cp, source=op.op)
        elif len(xs) == 2:
            r = cx.emit("reshape", f"{name}/to_2d", [x], {"shape": (xs[0], 1, cin)}, source=op.op)
            c = cx.emit("conv2d", f"{own}/conv", [r], attrs, cp, source=op.op)
            y = cx.emit("reshape", own, [c], {"shape": (xs[0], cout)}, source=op.op)
        else:
            raise Unsupported(f"inputs of rank {len(xs) + 1} are not supported")
    else:
        total = int(np.prod(xs))
        if total != cin:
            raise Unsupported(f"weights {list(w.shape)} on an input of shape {('N',) + xs} would fold the input "
                              "into the batch axis")
        if len(xs) != 1:
            x = cx.emit("reshape", f"{name}/flatten", [x], {"shape": (cin,)}, source=op.op)
        y = cx.emit("dense", own, [x], {"act": fused}, params, source=op.op)
    if act is not None and not fused:
        y = cx.act_after(y, cfg.opt("fused_activation_function"), name, op.op)
    return [y]


def _pool(cx, op, name, cfg, kind):
    x = cx.x(op, 0)
    if len(cx.shape(x)) != 3:
        raise Unsupported(f"expects a 4-D NHWC input, got shape {('N',) + cx.shape(x)}")
    k = (int(cfg.opt("filter_height")), int(cfg.opt("filter_width")))
    s = (int(cfg.opt("stride_h")), int(cfg.opt("stride_w")))
    if min(k) < 1 or min(s) < 1:
        raise Unsupported(f"window {k} and strides {s} must be at least 1")
    pads = _padding(cx, cfg, x, k, s, (1, 1))
    attrs = {"kernel": k, "strides": s, "pads": pads, "ceil_mode": False}
    if kind == "avgpool":
        attrs["count_include_pad"] = False  # TFLite's SAME average counts only the real elements
    code = int(cfg.opt("fused_activation_function"))
    own = name if code == 0 else cx.op_name(op, name)
    y = cx.emit(kind, own, [x], attrs, source=op.op)
    return [cx.act_after(y, code, name, op.op)]


@TFLITE.register("MAX_POOL_2D")
def max_pool_2d(cx, op, name, *, cfg):
    return _pool(cx, op, name, cfg, "maxpool")


@TFLITE.register("AVERAGE_POOL_2D")
def average_pool_2d(cx, op, name, *, cfg):
    return _pool(cx, op, name, cfg, "avgpool")


def _reduce(cx, op, name, cfg, kind):
    x = cx.x(op, 0)
    r = len(cx.shape(x)) + 1
    axes = sorted({_norm_axis(a, r) for a in _int_const(cx, op, 1, "axes")})
    if 0 in axes:
        raise Unsupported("reducing over the batch axis is not supported")
    keep = bool(cfg.opt("keep_dims"))
    if kind == "reduce_mean" and r == 4 and axes == [1, 2]:
        return [cx.emit("global_avgpool", name, [x], {"keepdims": keep}, source=op.op)]
    return [cx.emit(kind, name, [x], {"axes": axes, "keepdims": keep}, source=op.op)]


@TFLITE.register("MEAN")
def mean(cx, op, name, *, cfg):
    return _reduce(cx, op, name, cfg, "reduce_mean")


@TFLITE.register("SUM")
def sum_(cx, op, name, *, cfg):
    return _reduce(cx, op, name, cfg, "reduce_sum")


@TFLITE.register("PAD", "PADV2")
def pad(cx, op, name, *, cfg):
    x = cx.x(op, 0)
    p = cx.const(op.inputs[1])
    if p is None:
        raise Unsupported("the paddings must be a constant")
    p = np.asarray(p).reshape(-1, 2).astype(int)
    if len(cx.shape(x)) != 3 or p.shape[0] != 4:
        raise Unsupported("only padding of 4-D NHWC tensors is supported")
    if p[0].any() or p[3].any() or (p < 0).any():
        raise Unsupported(f"padding of the batch or channel axis (or negative padding) is not supported: "
                          f"{p.tolist()}")
    value = 0.0
    if op.op == "PADV2" and len(op.inputs) > 2 and op.inputs[2] >= 0:
        v = cx.const(op.inputs[2])
        if v is None or np.asarray(v).size != 1:
            raise Unsupported("the pad value must be a scalar constant")
        value = float(np.asarray(v).reshape(-1)[0])
    return [cx.emit("pad", name, [x], {"pads": (int(p[1, 0]), int(p[2, 0]), int(p[1, 1]), int(p[2, 1])),
                                        "value": value}, source=op.op)]


def _target(cx, x, shape):
    """A TFLite target shape (with batch) as tcl's reshape shape (without it)."""
    shape = [int(v) for v in shape]
    if not shape:
        raise Unsupported("reshaping to a scalar is not supported")
    rest = shape[1:]
    if shape[0] not in (-1, 1) or (shape[0] == -1 and -1 in rest):
        raise Unsupported(f"the target shape {shape} does not keep the batch axis first")
    total = int(np.prod(cx.shape(x)))
    known = int(np.prod([v for v in rest if v != -1])) if rest else 1
    if (-1 not in rest and known != total) or (-1 in rest and (known == 0 or total % known)):
        raise Unsupported(f"the target shape {shape} does not keep the batch axis first "
                          f"(input shape {('N',) + cx.shape(x)})")
    return tuple(rest)


@TFLITE.register("RESHAPE")
def reshape(cx, op, name, *, cfg):
    x = cx.x(op, 0)
    new = cfg.opt("new_shape")
    if len(op.inputs) > 1 and op.inputs[1] >= 0:
        shape = _int_const(cx, op, 1, "target shape")
    elif new:
        shape = list(new)
    else:
        raise Unsupported("the target shape is missing")
    return [cx.emit("reshape", name, [x], {"shape": _target(cx, x, shape)}, source=op.op)]


@TFLITE.register("SQUEEZE")
def squeeze(cx, op, name, *, cfg):
    x = cx.x(op, 0)
    xs = (1,) + cx.shape(x)
    dims = cfg.opt("squeeze_dims")
    axes = sorted({_norm_axis(a, len(xs)) for a in dims}) if dims else [i for i in range(1, len(xs)) if xs[i] == 1]
    if 0 in axes or any(xs[a] != 1 for a in axes):
        raise Unsupported(f"squeeze_dims {list(dims)} squeeze the batch axis or a dimension that is not 1")
    return [cx.emit("reshape", name, [x], {"shape": tuple(d for i, d in enumerate(xs) if i and i not in axes)},
                    source=op.op)]


@TFLITE.register("SOFTMAX")
def softmax(cx, op, name, *, cfg):
    x = cx.x(op, 0)
    beta = float(cfg.opt("beta"))
    if beta != 1.0:
        x = cx.emit("scale", f"{name}/beta", [x], {"scale": beta, "offset": 0.0}, source=op.op)
    return [cx.emit("softmax", name, [x], {"axis": -1}, source=op.op)]


@TFLITE.register("CONCATENATION")
def concatenation(cx, op, name, *, cfg):
    xs = [cx.x(op, k) for k in range(len(op.inputs))]
    r = len(cx.shape(xs[0])) + 1
    axis = _norm_axis(cfg.opt("axis"), r)
    if axis == 0:
        raise Unsupported("concatenation along the batch axis is not supported")
    code = int(cfg.opt("fused_activation_function"))
    y = cx.emit("concat", name if code == 0 else cx.op_name(op, name), xs, {"axis": axis}, source=op.op)
    return [cx.act_after(y, code, name, op.op)]


def _unary(op_kind, attrs=None):
    def conv(cx, op, name, *, cfg):
        return [cx.emit(op_kind, name, [cx.x(op, 0)], dict(attrs or {}), source=op.op)]

    return conv


for _op, _kind, _attrs in (("RELU", "relu", None), ("RELU6", "relu6", None), ("LOGISTIC", "sigmoid", None),
                           ("TANH", "tanh", None), ("HARD_SWISH", "hard_swish", None), ("SQRT", "sqrt", None),
                           ("RELU_N1_TO_1", "clip", {"min": -1.0, "max": 1.0}),
                           ("RELU_0_TO_1", "clip", {"min": 0.0, "max": 1.0}),
                           ("NEG", "scale", {"scale": -1.0, "offset": 0.0}),
                           ("SQUARE", "pow", {"exponent": 2.0})):
    TFLITE.register(_op)(_unary(_kind, _attrs))


@TFLITE.register("LEAKY_RELU")
def leaky_relu(cx, op, name, *, cfg):
    return [cx.emit("leaky_relu", name, [cx.x(op, 0)], {"alpha": float(cfg.opt("alpha"))}, source=op.op)]


@TFLITE.register("GELU")
def gelu(cx, op, name, *, cfg):
    approx = "tanh" if cfg.opt("approximate") else "none"
    return [cx.emit("gelu", name, [cx.x(op, 0)], {"approximate": approx}, source=op.op)]


@TFLITE.register("RSQRT")
def rsqrt(cx, op, name, *, cfg):
    s = cx.emit("sqrt", f"{name}/sqrt", [cx.x(op, 0)], source=op.op)
    return [cx.emit("reciprocal", name, [s], source=op.op)]


@TFLITE.register("POW")
def pow_(cx, op, name, *, cfg):
    e = cx.const(op.inputs[1])
    if e is None or np.asarray(e).size == 0 or np.any(np.asarray(e) != np.asarray(e).reshape(-1)[0]):
        raise Unsupported("only one constant exponent for the whole tensor is supported")
    return [cx.emit("pow", name, [cx.x(op, 0)], {"exponent": float(np.asarray(e).reshape(-1)[0])}, source=op.op)]


@TFLITE.register("MAXIMUM", "MINIMUM")
def maximum_minimum(cx, op, name, *, cfg):
    ins = op.inputs[:2]
    consts = [i for i in ins if cx.is_const(i)]
    if len(consts) != 1:
        raise Unsupported("only the maximum/minimum of a tensor and a scalar constant is supported")
    c = np.asarray(cx.const(consts[0]))
    if c.size != 1:
        raise Unsupported(f"the constant has shape {list(c.shape)}; only scalars are supported")
    x = cx.vals.get(ins[0] if ins[1] == consts[0] else ins[1])
    if x is None:
        raise Unsupported("the tensor input is missing")
    v = float(c.reshape(-1)[0])
    attrs = {"min": v, "max": float("inf")} if op.op == "MAXIMUM" else {"min": float("-inf"), "max": v}
    return [cx.emit("clip", name, [x], attrs, source=op.op)]


@TFLITE.register("TRANSPOSE")
def transpose(cx, op, name, *, cfg):
    x = cx.x(op, 0)
    perm = _int_const(cx, op, 1, "permutation")
    r = len(cx.shape(x)) + 1
    perm = [_norm_axis(p, r) for p in perm]
    if sorted(perm) != list(range(r)) or perm[0] != 0:
        raise Unsupported(f"permutation {perm} moves the batch axis or is not a permutation")
    return [cx.emit("transpose", name, [x], {"perm": tuple(perm)}, source=op.op)]


@TFLITE.register("STRIDED_SLICE")
def strided_slice(cx, op, name, *, cfg):
    x = cx.x(op, 0)
    shape = (1,) + cx.shape(x)
    r = len(shape)
    begin = _int_const(cx, op, 1, "begin")
    end = _int_const(cx, op, 2, "end")
    strides = _int_const(cx, op, 3, "strides") if len(op.inputs) > 3 and op.inputs[3] >= 0 else [1] * len(begin)
    for k in ("ellipsis_mask", "new_axis_mask", "shrink_axis_mask"):
        if int(cfg.opt(k)):
            raise Unsupported(f"{k}={cfg.opt(k)} is not supported")
    if cfg.opt("offset", absent=False):  # (StridedSliceOptions.offset is new in TF 2.15's schema)
        raise Unsupported("offset=true (end relative to begin) is not supported")
    bm, em = int(cfg.opt("begin_mask")), int(cfg.opt("end_mask"))
    if not len(begin) == len(end) == len(strides) == r:
        raise Unsupported(f"begin {begin}, end {end} and strides {strides} do not cover the {r} axes")
    axes, starts, ends, steps = [], [], [], []
    for i in range(r):
        st = strides[i]
        if st == 0:
            raise Unsupported("a slice step of 0")
        b = None if bm >> i & 1 else begin[i]
        e = None if em >> i & 1 else end[i]
        start, stop, step = slice(b, e, st).indices(shape[i])
        n = len(range(start, stop, step))
        if i == 0:
            if (start, n, step) != (0, 1, 1):
                raise Unsupported("slicing the batch axis is not supported")
            continue
        if (start, n, step) == (0, shape[i], 1):
            continue
        axes.append(i)
        starts.append(start)
        ends.append(stop if stop >= 0 else -(shape[i] + 1))
        steps.append(step)
    if not axes:
        return [cx.emit("identity", name, [x], source=op.op)]
    return [cx.emit("slice", name, [x], {"axes": axes, "starts": starts, "ends": ends, "steps": steps},
                    source=op.op)]


@TFLITE.register("LOCAL_RESPONSE_NORMALIZATION")
def local_response_normalization(cx, op, name, *, cfg):
    x = cx.x(op, 0)
    size = 2 * int(cfg.opt("radius")) + 1
    return [cx.emit("lrn", name, [x], {"size": size, "alpha": float(cfg.opt("alpha")) * size,
                                       "beta": float(cfg.opt("beta")), "bias": float(cfg.opt("bias"))}, source=op.op)]


@TFLITE.register("DEQUANTIZE")
def dequantize(cx, op, name, *, cfg):
    v = cx.const(op.inputs[0])
    if v is None:
        raise Unsupported("dequantizing a computed tensor (quantized activations) is not supported")
    return [Const(np.asarray(v, np.float32))]


@TFLITE.register("ADD", "MUL", "SUB", "DIV")
def arithmetic(cx, op, name, *, cfg):
    # pot_scale_int16 (ADD, SUB) only selects the int16-quantized kernel's scaling; tcl's tensors are float32.
    cfg.ignore("pot_scale_int16")
    kind = op.op.lower()
    code = int(cfg.opt("fused_activation_function"))
    own = name if code == 0 else cx.op_name(op, name)
    a, b = op.inputs[:2]
    ca, cb = cx.is_const(a), cx.is_const(b)
    if ca and cb:
        raise Unsupported("both operands are constants")
    if ca or cb:
        x = cx.x(op, 1 if ca else 0)
        y = _with_const(cx, x, np.asarray(cx.const(a if ca else b), np.float64), kind, ca, own, op.op)
    else:
        y = cx.emit(kind, own, [cx.x(op, 0), cx.x(op, 1)], source=op.op)
    return [cx.act_after(y, code, name, op.op)]


def _with_const(cx, x, c, kind, const_first, name, source):
    """x (op) c or c (op) x as a `scale` node: scalar attributes, or per-channel parameters for a constant that
    varies along the last axis only (the graph has no other constant tensors)."""
    xs = (1,) + cx.shape(x)
    if c.ndim > len(xs):
        raise Unsupported(f"a constant of shape {list(c.shape)} has more axes than the tensor {list(xs)}")
    full = c.reshape((1,) * (len(xs) - c.ndim) + c.shape)
    try:
        out = tuple(np.broadcast_shapes(xs, full.shape))
    except ValueError:
        raise Unsupported(f"a constant of shape {list(c.shape)} does not broadcast to {list(xs)}") from None
    if out != xs:
        raise Unsupported(f"a constant of shape {list(c.shape)} broadcasts the tensor {list(xs)} up")
    if full.size != 1 and any(d != 1 for d in full.shape[:-1]):
        raise Unsupported(f"a constant of shape {list(c.shape)} varies along more than the channel axis (tcl's graph "
                          "has no constant tensors)")
    vec = full.reshape(-1)
    src = x
    if kind == "add":
        s, o = np.ones_like(vec), vec
    elif kind == "mul":
        s, o = vec, np.zeros_like(vec)
    elif kind == "sub":
        s, o = (-np.ones_like(vec), vec) if const_first else (np.ones_like(vec), -vec)
    elif const_first:  # c / x
        if np.all(vec == 1):
            return cx.emit("reciprocal", name, [x], source=source)
        src = cx.emit("reciprocal", f"{name}/reciprocal", [x], source=source)
        s, o = vec, np.zeros_like(vec)
    else:
        if np.any(vec == 0):
            raise Unsupported("division by a constant zero")
        s, o = 1.0 / vec, np.zeros_like(vec)
    if vec.size == 1:
        return cx.emit("scale", name, [src], {"scale": float(s[0]), "offset": float(o[0])}, source=source)
    return cx.emit("scale", name, [src], {"scale": 1.0, "offset": 0.0},
                   {"scale": s.astype(np.float32), "offset": o.astype(np.float32)}, source=source)


def supported_ops():
    return sorted(TFLITE.table)


# --- entry points -----------------------------------------------------------------------------------------------------
def _meta_from_metadata(model, g):
    """Class names and preprocessing that `tcl export-weights --format tflite` stores in the "transfercl"
    metadata entry; other producers' entries are left alone."""
    raw = model.metadata.get(METADATA_NAME)
    if raw is None:
        return
    try:
        d = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        d = None
    if not isinstance(d, dict):
        warnings.warn(f"'{model.path}': its '{METADATA_NAME}' metadata does not parse; ignored.", TclNote,
                      stacklevel=4)
        return
    classes = d.get("classes")
    if isinstance(classes, list) and all(isinstance(c, str) for c in classes):
        g.meta["classes"] = classes
    pre = d.get("preprocessing")
    if isinstance(pre, dict):
        g.meta["preprocess"] = pre
    if d.get("quantization"):
        g.meta["quantization"] = d["quantization"]


def convert_model(data, path="<bytes>", input_size=None):
    """The bytes of a .tflite file to a Graph."""
    model = TfliteModel(data, path)
    g = TfliteImporter(model, input_size).run()
    _meta_from_metadata(model, g)
    return g


def load_tflite(path, input_size=None, **_opts):
    need_tflite()
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ModelError(f"Cannot read the model file '{path}' ({e.strerror}).",
                         "Check the path and the file's permissions.") from None
    return convert_model(data, path, input_size=input_size)


def is_tflite(head):
    """Whether the first bytes of a file are a TFLite flatbuffer's (the 'TFL3' file identifier at offset 4)."""
    return len(head) >= 8 and head[4:8] == TFLITE_MAGIC


__all__ = ["load_tflite", "convert_model", "supported_ops", "TFLITE", "TfliteModel", "is_tflite"]
