"""TFLite (LiteRT) export: a (fine-tuned) Graph as one .tflite flatbuffer that the LiteRT interpreter runs, on
Android (`org.tensorflow.lite.Interpreter`), iOS, microcontrollers or `ai_edge_litert.interpreter.Interpreter`.

    from transfercl_cli.export_tflite import export_tflite
    export_tflite(graph, "model.tflite")                  # float32
    export_tflite(graph, "model_int8.tflite", int8=qw)    # qw from export.quantize_int8: int8 weights

The file is written with the `flatbuffers` builder and the TFLite schema's generated builders from the `tflite`
package (`pip install 'transfercl[tflite]'`). `TfliteFile` is the low-level writer (tensors, constant buffers,
operator codes, operators, metadata); `_TfliteWriter` maps each canonical op of graph.py to TFLite builtin ops, one
method per op (`op_conv2d`, ...), as the ONNX writer in export.py does. The importer (importers/tflite_import.py)
reads everything written here back.

What the file holds:
- One subgraph. Input: the graph input, float32 NHWC [1, H, W, C] with shape_signature [-1, H, W, C] (any batch:
  `resizeInput` / `resize_tensor_input`). Outputs: the graph outputs (logits for a fine-tuned head), plus a
  softmax "probabilities" when graph.meta["export_softmax"]. A SignatureDef "serving_default" names both.
- Inference form: frozen Conv+BatchNorm(+ReLU/ReLU6) are folded into one CONV_2D / DEPTHWISE_CONV_2D with a fused
  activation (plan.fold_frozen, as tcl's own inference does and as the TFLite converter does); a zero Pad before
  a convolution becomes its padding (SAME when it is TF's SAME, else an explicit PAD op).
- Tensor names: the tcl layer that writes the tensor; a folded chain is named TF-converter style, the last layer
  first: "conv_pw_13_relu;conv_pw_13_bn;conv_pw_13". The importer names the node by the first part.
- Metadata entry "transfercl": JSON {"classes", "preprocessing", "input_layout": "NHWC", "quantization",
  "producer"}; the model description is "transfercl".
- int8: conv and dense weights as int8 constants with per-output-channel scales (symmetric, zero point 0),
  dequantized by a DEQUANTIZE op into the float32 weight the float op reads: weight-only quantization, so the
  activations stay float32 and the outputs are exactly those of quantize_int8's fake-quantized graph (the accuracy
  export_run measured). LiteRT dequantizes constant weights once, at allocation.
"""
import json
import os

import numpy as np

from .errors import ModelError, TclError
from .fsutil import atomic_path, jsonable as _jsonable

PRODUCER = "transfercl"
METADATA_NAME = "transfercl"

# TFLite TensorType values (schema.fbs).
TENSOR_TYPES = {"float32": 0, "float16": 1, "int32": 2, "uint8": 3, "int64": 4, "bool": 6, "int16": 7, "int8": 9}
# Builtin operator -> the options table it takes (schema.fbs `BuiltinOptions` union member); ops absent here have
# none.
OP_OPTIONS = {
    "CONV_2D": "Conv2DOptions", "DEPTHWISE_CONV_2D": "DepthwiseConv2DOptions",
    "FULLY_CONNECTED": "FullyConnectedOptions", "ADD": "AddOptions", "MUL": "MulOptions", "SUB": "SubOptions",
    "DIV": "DivOptions", "AVERAGE_POOL_2D": "Pool2DOptions", "MAX_POOL_2D": "Pool2DOptions",
    "MEAN": "ReducerOptions", "SUM": "ReducerOptions", "PAD": "PadOptions", "PADV2": "PadV2Options",
    "RESHAPE": "ReshapeOptions", "SQUEEZE": "SqueezeOptions", "SOFTMAX": "SoftmaxOptions",
    "CONCATENATION": "ConcatenationOptions", "HARD_SWISH": "HardSwishOptions", "LEAKY_RELU": "LeakyReluOptions",
    "MAXIMUM": "MaximumMinimumOptions", "MINIMUM": "MaximumMinimumOptions", "TRANSPOSE": "TransposeOptions",
    "STRIDED_SLICE": "StridedSliceOptions", "GELU": "GeluOptions", "NEG": "NegOptions", "POW": "PowOptions",
    "SQUARE": "SquareOptions", "LOCAL_RESPONSE_NORMALIZATION": "LocalResponseNormalizationOptions",
    "DEQUANTIZE": "DequantizeOptions", "QUANTIZE": "QuantizeOptions",
}
ACTIVATIONS = {None: 0, "relu": 1, "relu_n1_to_1": 2, "relu6": 3, "tanh": 4}
SAME, VALID = 0, 1


def need_tflite():
    """The `tflite` package (generated accessors and builders of the TFLite schema) and `flatbuffers`."""
    import importlib

    try:
        importlib.import_module("flatbuffers")
        tflite = importlib.import_module("tflite")
    except ImportError:
        raise ModelError("Reading and writing TFLite (.tflite) models needs the tflite and flatbuffers packages, "
                         "which are not installed.",
                         "Install them with `pip install tflite flatbuffers`, run by the Python that runs tcl (in a "
                         "clone set up by `make`: `.venv/bin/pip install -e '.[tflite]'`).") from None
    return tflite


def _camel(snake):
    return "".join(p[:1].upper() + p[1:] for p in snake.split("_"))


def _schema_module(name):
    import importlib

    need_tflite()
    return importlib.import_module(f"tflite.{name}")


def builtin_code(opname):
    from tflite.BuiltinOperator import BuiltinOperator

    return int(getattr(BuiltinOperator, opname))


class TfliteFile:
    """A TFLite model being written: add tensors, constants and operators, then `finish()` gives the bytes.

        f = TfliteFile()
        x = f.tensor("input", [1, 8, 8, 3], signature=[-1, 8, 8, 3])
        w = f.const("conv/filter", np.zeros((4, 3, 3, 3), np.float32))
        b = f.const("conv/bias", np.zeros(4, np.float32))
        y = f.tensor("conv", [1, 8, 8, 4])
        f.op("CONV_2D", [x, w, b], [y], {"padding": 0, "stride_w": 1, "stride_h": 1})
        data = f.finish([x], [y], metadata={"transfercl": b"{}"})

    Options are {schema field name: value}; vector fields take lists. Buffer data is 16-byte aligned (what the
    TFLite converter writes; SIMD kernels read weights in place from a memory-mapped file)."""

    def __init__(self):
        need_tflite()
        self.tensors = []  # dicts
        self.buffers = [b""]  # buffer 0: the empty sentinel every non-constant tensor points to
        self.opcodes = []  # (builtin code, version)
        self._opcode_index = {}
        self.ops = []
        self.names = set()

    def _unique(self, name):
        base, i = str(name) or "t", 0
        got = base
        while got in self.names:
            i += 1
            got = f"{base}_{i}"
        self.names.add(got)
        return got

    def tensor(self, name, shape, dtype="float32", signature=None, buffer=0, quant=None):
        """A new tensor; returns its index. quant: {"scale": [...], "zero_point": [...], "quantized_dimension": d}."""
        self.tensors.append({"name": self._unique(name), "shape": [int(v) for v in shape], "dtype": dtype,
                             "signature": None if signature is None else [int(v) for v in signature],
                             "buffer": int(buffer), "quant": quant})
        return len(self.tensors) - 1

    def const(self, name, arr, dtype=None, quant=None):
        arr = np.ascontiguousarray(np.asarray(arr, dtype=dtype))
        dt = str(arr.dtype)
        if dt not in TENSOR_TYPES:
            raise TclError(f"TFLite export: the constant '{name}' has the dtype {dt}, which tcl does not write.",
                           "Report this model.")
        self.buffers.append(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        return self.tensor(name, arr.shape, dt, buffer=len(self.buffers) - 1, quant=quant)

    def op(self, opname, inputs, outputs, options=None, version=1):
        code = builtin_code(opname)
        key = (code, int(version))
        if key not in self._opcode_index:
            self._opcode_index[key] = len(self.opcodes)
            self.opcodes.append(key)
        opt_name = OP_OPTIONS.get(opname)
        if options and opt_name is None:
            raise TclError(f"TFLite export: {opname} takes no options (got {options}).", "This is a bug in tcl.")
        self.ops.append({"opcode": self._opcode_index[key], "inputs": [int(i) for i in inputs],
                         "outputs": [int(o) for o in outputs], "opt_name": opt_name, "options": dict(options or {})})

    # --- serialisation ----------------------------------------------------------------------------------------
    @staticmethod
    def _bytes(b, data, align=16):
        b.StartVector(1, len(data), align)
        b.head = b.head - len(data)
        b.Bytes[b.head:b.head + len(data)] = data
        return b.EndVector()

    @staticmethod
    def _ivec(b, start, values, kind="Int32"):
        start(b, len(values))
        for v in reversed(list(values)):
            getattr(b, f"Prepend{kind}")(int(v))
        return b.EndVector()

    @staticmethod
    def _fvec(b, start, values):
        start(b, len(values))
        for v in reversed(list(values)):
            b.PrependFloat32(float(v))
        return b.EndVector()

    def _options(self, b, opt_name, options):
        mod = _schema_module(opt_name)
        vectors = {}
        for k, v in options.items():
            start = getattr(mod, f"{opt_name}Start{_camel(k)}Vector", None)
            if start is not None:
                vectors[k] = self._ivec(b, start, v)
        getattr(mod, f"{opt_name}Start")(b)
        for k, v in options.items():
            add = getattr(mod, f"{opt_name}Add{_camel(k)}", None)
            if add is None:
                raise TclError(f"TFLite export: {opt_name} has no field '{k}'.", "This is a bug in tcl.")
            if k in vectors:
                add(b, vectors[k])
            elif isinstance(v, (bool, np.bool_)):
                add(b, bool(v))
            elif isinstance(v, float):
                add(b, float(v))
            else:
                add(b, int(v))
        return getattr(mod, f"{opt_name}End")(b)

    def _quant(self, b, q):
        Q = _schema_module("QuantizationParameters")

        sc = self._fvec(b, Q.QuantizationParametersStartScaleVector, q["scale"])
        zp = self._ivec(b, Q.QuantizationParametersStartZeroPointVector, q["zero_point"], "Int64")
        Q.QuantizationParametersStart(b)
        Q.QuantizationParametersAddScale(b, sc)
        Q.QuantizationParametersAddZeroPoint(b, zp)
        Q.QuantizationParametersAddQuantizedDimension(b, int(q.get("quantized_dimension", 0)))
        return Q.QuantizationParametersEnd(b)

    def finish(self, inputs, outputs, metadata=None, description=PRODUCER, signature="serving_default"):
        """The .tflite bytes. metadata: {name: bytes} (Model.metadata entries, each with its own buffer)."""
        import flatbuffers
        from tflite.BuiltinOptions import BuiltinOptions

        # (tflite/__init__ rebinds tflite.Buffer & co. to the classes: the modules hold the builder functions.)
        B, MD, M, O, OC, SD, SG, T, TM = (_schema_module(m) for m in (
            "Buffer", "Metadata", "Model", "Operator", "OperatorCode", "SignatureDef", "SubGraph", "Tensor",
            "TensorMap"))

        buffers = list(self.buffers)
        meta_entries = []
        for name, data in (metadata or {}).items():
            buffers.append(bytes(data))
            meta_entries.append((name, len(buffers) - 1))
        size = sum(len(d) for d in buffers) + 1024 * (len(self.tensors) + len(self.ops) + 16)
        if size > 2_000_000_000:
            raise TclError(f"The model's {size / 1e9:.1f} GB exceed what one TFLite flatbuffer can hold (2 GB).",
                           "Export with --int8 (4x smaller weights), or with --format npz.")
        b = flatbuffers.Builder(size)

        buf_offs = []
        for data in buffers:
            d = self._bytes(b, data) if data else None
            B.BufferStart(b)
            if d is not None:
                B.BufferAddData(b, d)
            buf_offs.append(B.BufferEnd(b))

        t_offs = []
        for t in self.tensors:
            name = b.CreateString(t["name"])
            shape = self._ivec(b, T.TensorStartShapeVector, t["shape"])
            sig = self._ivec(b, T.TensorStartShapeSignatureVector, t["signature"]) if t["signature"] else None
            q = self._quant(b, t["quant"]) if t["quant"] else None
            T.TensorStart(b)
            T.TensorAddShape(b, shape)
            T.TensorAddType(b, TENSOR_TYPES[t["dtype"]])
            T.TensorAddBuffer(b, t["buffer"])
            T.TensorAddName(b, name)
            if q is not None:
                T.TensorAddQuantization(b, q)
            if sig is not None:
                T.TensorAddShapeSignature(b, sig)
            t_offs.append(T.TensorEnd(b))

        op_offs = []
        for o in self.ops:
            ins = self._ivec(b, O.OperatorStartInputsVector, o["inputs"])
            outs = self._ivec(b, O.OperatorStartOutputsVector, o["outputs"])
            opt = self._options(b, o["opt_name"], o["options"]) if o["opt_name"] else None
            O.OperatorStart(b)
            O.OperatorAddOpcodeIndex(b, o["opcode"])
            O.OperatorAddInputs(b, ins)
            O.OperatorAddOutputs(b, outs)
            if opt is not None:
                O.OperatorAddBuiltinOptionsType(b, int(getattr(BuiltinOptions, o["opt_name"])))
                O.OperatorAddBuiltinOptions(b, opt)
            op_offs.append(O.OperatorEnd(b))

        def vec_of(start, offs):
            start(b, len(offs))
            for off in reversed(offs):
                b.PrependUOffsetTRelative(off)
            return b.EndVector()

        sg_name = b.CreateString("main")
        tensors = vec_of(SG.SubGraphStartTensorsVector, t_offs)
        sg_in = self._ivec(b, SG.SubGraphStartInputsVector, inputs)
        sg_out = self._ivec(b, SG.SubGraphStartOutputsVector, outputs)
        ops = vec_of(SG.SubGraphStartOperatorsVector, op_offs)
        SG.SubGraphStart(b)
        SG.SubGraphAddTensors(b, tensors)
        SG.SubGraphAddInputs(b, sg_in)
        SG.SubGraphAddOutputs(b, sg_out)
        SG.SubGraphAddOperators(b, ops)
        SG.SubGraphAddName(b, sg_name)
        sg = SG.SubGraphEnd(b)

        oc_offs = []
        for code, version in self.opcodes:
            OC.OperatorCodeStart(b)
            OC.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
            OC.OperatorCodeAddBuiltinCode(b, code)
            OC.OperatorCodeAddVersion(b, version)
            oc_offs.append(OC.OperatorCodeEnd(b))

        md_offs = []
        for name, idx in meta_entries:
            n = b.CreateString(name)
            MD.MetadataStart(b)
            MD.MetadataAddName(b, n)
            MD.MetadataAddBuffer(b, idx)
            md_offs.append(MD.MetadataEnd(b))

        sigs = []
        if signature:
            def tmaps(idxs):
                offs = []
                for i in idxs:
                    n = b.CreateString(self.tensors[i]["name"])
                    TM.TensorMapStart(b)
                    TM.TensorMapAddName(b, n)
                    TM.TensorMapAddTensorIndex(b, int(i))
                    offs.append(TM.TensorMapEnd(b))
                return offs

            si = vec_of(SD.SignatureDefStartInputsVector, tmaps(inputs))
            so = vec_of(SD.SignatureDefStartOutputsVector, tmaps(outputs))
            key = b.CreateString(signature)
            SD.SignatureDefStart(b)
            SD.SignatureDefAddInputs(b, si)
            SD.SignatureDefAddOutputs(b, so)
            SD.SignatureDefAddSignatureKey(b, key)
            SD.SignatureDefAddSubgraphIndex(b, 0)
            sigs.append(SD.SignatureDefEnd(b))

        opcodes = vec_of(M.ModelStartOperatorCodesVector, oc_offs)
        subgraphs = vec_of(M.ModelStartSubgraphsVector, [sg])
        bufs = vec_of(M.ModelStartBuffersVector, buf_offs)
        mds = vec_of(M.ModelStartMetadataVector, md_offs) if md_offs else None
        sdefs = vec_of(M.ModelStartSignatureDefsVector, sigs) if sigs else None
        desc = b.CreateString(description)
        M.ModelStart(b)
        M.ModelAddVersion(b, 3)
        M.ModelAddOperatorCodes(b, opcodes)
        M.ModelAddSubgraphs(b, subgraphs)
        M.ModelAddDescription(b, desc)
        M.ModelAddBuffers(b, bufs)
        if mds is not None:
            M.ModelAddMetadata(b, mds)
        if sdefs is not None:
            M.ModelAddSignatureDefs(b, sdefs)
        b.Finish(M.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())


# ---------------------------------------------------------------------------------------------------------------
# graph -> TFLite ops


def _same_pads(size, k, s, d):
    from .ops.shapes import same_pads

    return same_pads(int(size), int(k), int(s), int(d), upper=True)


class _TfliteWriter:
    """Writes one graph (already in inference form, see build_tflite) op by op into a TfliteFile.

    `self.t` maps each tcl tensor to its TFLite tensor index; an op method writes its node's output under the
    node's (chain) name and intermediate tensors as "LAYER/what"."""

    def __init__(self, graph, source, int8):
        from .ops.shapes import infer_shapes

        self.g = graph
        self.src = {n.name: n for n in source.nodes}
        self.int8 = int8 or {}
        self.f = TfliteFile()
        self.t = {}
        self.shapes = infer_shapes(graph)
        self._shared = {}
        for name, shape in graph.inputs.items():
            shape = [int(v) for v in shape]
            self.t[name] = self.f.tensor(name, [1] + shape, signature=[-1] + shape)

    # tensors ---------------------------------------------------------------------------------------------------
    def act_tensor(self, name, shape):
        shape = [int(v) for v in shape]
        return self.f.tensor(name, [1] + shape, signature=[-1] + shape)

    def chain_name(self, n):
        """The name of the tensor a node writes: its own, or for a folded chain the last layer first (TF style)."""
        members = [n.name] + [m for m in n.attrs.get("folded", []) if self.src.get(m) is None
                              or self.src[m].op != "pad"]
        return ";".join(reversed(members))

    def out(self, n):
        idx = self.act_tensor(self.chain_name(n), self.shapes[n.outputs[0]])
        self.t[n.outputs[0]] = idx
        return idx

    def mid(self, n, what, shape):
        return self.act_tensor(f"{n.name}/{what}", shape)

    def const(self, name, arr, dtype=np.float32):
        return self.f.const(name, arr, dtype)

    def shared(self, key, arr, dtype):
        """A small constant (axes, shapes, paddings, scalars) shared by every op that uses the same value."""
        arr = np.asarray(arr, dtype)
        k = (str(arr.dtype), arr.shape, arr.tobytes())
        if k not in self._shared:
            self._shared[k] = self.f.const(key, arr)
        return self._shared[k]

    def scalar(self, v):
        return self.shared(f"const_{float(v):g}", np.array([v], np.float32), np.float32)

    def ints(self, key, values):
        return self.shared(key, np.array(values, np.int32), np.int32)

    def op(self, opname, inputs, outputs, options=None, version=1):
        self.f.op(opname, inputs, outputs, options, version)

    def emit(self, n):
        fn = getattr(self, f"op_{n.op}", None)
        if fn is None:
            raise ModelError(f"Layer '{n.name}' uses the op '{n.op}', which TFLite has no builtin op for (or tcl cannot "
                             "export to TFLite yet).",
                             "Export with --format onnx or npz instead, or cut the model before this layer.")
        fn(n)

    @staticmethod
    def fused_code(n, act):
        if act in (None, "", "linear", "none"):
            return 0
        if act not in ("relu", "relu6"):
            raise ModelError(f"Layer '{n.name}' has a fused activation '{act}' tcl cannot export to TFLite.",
                             "Export with --format onnx or npz instead, or report this model.")
        return ACTIVATIONS[act]

    # weights ---------------------------------------------------------------------------------------------------
    def _fold_scale(self, n):
        """The per-output-channel factor fold_frozen multiplied this conv's weight by (its folded BatchNorm's
        gamma / sqrt(var + eps)), or None."""
        for m in n.attrs.get("folded", []):
            bn = self.src.get(m)
            if bn is not None and bn.op == "batchnorm":
                p = bn.params
                return p["gamma"].astype(np.float64) / np.sqrt(p["var"].astype(np.float64) + float(bn.attrs["eps"]))
        return None

    def weight(self, n, w, perm, qdim):
        """The float weight tensor a conv/dense reads: a float32 constant, or (int8) an int8 constant with
        per-channel scales and a DEQUANTIZE op. `w` is the tcl-layout weight, `perm` its TFLite transpose."""
        qw = self.int8.get(f"{n.name}/weight")
        fw = np.ascontiguousarray(np.transpose(w, perm), np.float32)
        if qw is None:
            return self.const(f"{n.name}/weight", fw)
        q = qw.q.astype(np.int8)
        scale = qw.scale.astype(np.float64)
        s = self._fold_scale(n)
        if s is not None:
            scale = scale * s
        # TFLite scales are positive: a channel whose BatchNorm flipped its sign keeps |scale| and negated
        # (symmetric, so still in [-127, 127]) integers; a channel scaled to zero is all zeros.
        neg = scale < 0
        zero = scale == 0
        q = np.where(neg, -q, q).astype(np.int8)
        q = np.where(zero, 0, q).astype(np.int8)
        scale = np.where(zero, 1.0, np.abs(scale)).astype(np.float32)
        q = np.ascontiguousarray(np.transpose(q, perm))
        qt = self.f.const(f"{n.name}/weight_int8", q, np.int8,
                          quant={"scale": scale.tolist(), "zero_point": [0] * len(scale), "quantized_dimension": qdim})
        out = self.f.tensor(f"{n.name}/weight", q.shape)
        self.op("DEQUANTIZE", [qt], [out], version=5)
        return out

    def bias(self, n, cout):
        b = n.params.get("bias")
        return self.const(f"{n.name}/bias", np.zeros(cout, np.float32) if b is None else b)

    # padding ---------------------------------------------------------------------------------------------------
    def spatial(self, n, x, in_shape, kernel, strides, dilations, pads, pad_value=0.0):
        """(input tensor, TFLite padding) for explicit pads (top, left, bottom, right): VALID, TF's SAME, or an
        explicit PAD (PADV2 with `pad_value`) before a VALID window."""
        pt, pl, pb, pr = (int(v) for v in pads)
        if (pt, pl, pb, pr) == (0, 0, 0, 0):
            return x, VALID
        h, w = int(in_shape[0]), int(in_shape[1])
        if ((pt, pb) == _same_pads(h, kernel[0], strides[0], dilations[0])
                and (pl, pr) == _same_pads(w, kernel[1], strides[1], dilations[1])):
            return x, SAME
        return self.pad_tensor(n, x, in_shape, (pt, pl, pb, pr), pad_value), VALID

    def pad_tensor(self, n, x, in_shape, pads, value=0.0, out=None):
        pt, pl, pb, pr = pads
        h, w, c = (int(v) for v in in_shape)
        paddings = self.ints(f"{n.name}/paddings", [[0, 0], [pt, pb], [pl, pr], [0, 0]])
        y = out if out is not None else self.mid(n, "pad", (h + pt + pb, w + pl + pr, c))
        if value == 0.0:
            self.op("PAD", [x, paddings], [y], {})
        else:
            self.op("PADV2", [x, paddings, self.scalar(value)], [y], {})
        return y

    # ops -------------------------------------------------------------------------------------------------------
    def op_conv2d(self, n):
        a = n.attrs
        w = n.params["weight"]
        kh, kw, cin_g, cout = (int(v) for v in w.shape)
        groups = int(a.get("groups", 1))
        cin = cin_g * groups
        sh, sw = (int(v) for v in a.get("strides", (1, 1)))
        dh, dw = (int(v) for v in a.get("dilations", (1, 1)))
        in_shape = self.shapes[n.inputs[0]]
        x, padding = self.spatial(n, self.t[n.inputs[0]], in_shape, (kh, kw), (sh, sw), (dh, dw),
                                  a.get("pads", (0, 0, 0, 0)))
        opts = {"padding": padding, "stride_w": sw, "stride_h": sh, "dilation_w_factor": dw,
                "dilation_h_factor": dh, "fused_activation_function": self.fused_code(n, a.get("act"))}
        if groups > 1 and groups == cin and cin_g == 1:
            # HWIO (kh, kw, 1, cin*M) -> TFLite depthwise (1, kh, kw, cin*M): output channel c*M + m reads input c
            # in both.
            wt = self.weight(n, w, (2, 0, 1, 3), 3)
            opts["depth_multiplier"] = cout // cin
            version = 2 if (dh, dw) != (1, 1) else 1
            self.op("DEPTHWISE_CONV_2D", [x, wt, self.bias(n, cout)], [self.out(n)], opts, version)
            return
        if groups > 1:
            raise ModelError(f"Layer '{n.name}' is a grouped convolution (groups={groups}), which the TFLite "
                             "runtimes on phones do not all run.",
                             "Export with --format onnx instead, or report this model.")
        wt = self.weight(n, w, (3, 0, 1, 2), 0)  # HWIO -> OHWI
        self.op("CONV_2D", [x, wt, self.bias(n, cout)], [self.out(n)], opts)

    def op_dense(self, n):
        w = n.params["weight"]
        wt = self.weight(n, w, (1, 0), 0)  # (cin, cout) -> (cout, cin)
        opts = {"fused_activation_function": self.fused_code(n, n.attrs.get("act")), "keep_num_dims": False}
        self.op("FULLY_CONNECTED", [self.t[n.inputs[0]], wt, self.bias(n, int(w.shape[1]))], [self.out(n)], opts)

    def op_batchnorm(self, n):
        p = n.params
        eps = float(n.attrs.get("eps", 1e-3))
        c = p["mean"].shape[0]
        gamma = p.get("gamma", np.ones(c, np.float32)).astype(np.float64)
        beta = p.get("beta", np.zeros(c, np.float32)).astype(np.float64)
        s = gamma / np.sqrt(p["var"].astype(np.float64) + eps)
        sh = beta - p["mean"].astype(np.float64) * s
        x = self.t[n.inputs[0]]
        in_shape = self.shapes[n.inputs[0]]
        pool = n.attrs.get("pool")
        m = self.mid(n, "mul", in_shape)
        self.op("MUL", [x, self.const(f"{n.name}/scale", s)], [m], {"fused_activation_function": 0})
        if pool:
            # A BatchNorm that carries its activation and the global pool after it (fold_frozen): the ADD output
            # is named after the BN (and activation), the MEAN output after the pool.
            folded = n.attrs.get("folded", [])
            pool_name = next((f for f in folded if self.src.get(f) is not None
                              and self.src[f].op == "global_avgpool"), f"{n.name}/pool")
            y = self.act_tensor(";".join(reversed([n.name] + [f for f in folded if f != pool_name])), in_shape)
        else:
            y = self.out(n)
        self.op("ADD", [m, self.const(f"{n.name}/shift", sh)], [y],
                {"fused_activation_function": self.fused_code(n, n.attrs.get("act"))})
        if pool:
            keep = bool(n.attrs.get("keepdims", False))
            out = self.act_tensor(pool_name, self.shapes[n.outputs[0]])
            self.t[n.outputs[0]] = out
            self.op("MEAN", [y, self.ints("axes_1_2", [1, 2])], [out], {"keep_dims": keep})

    def _unary(self, n, opname, options=None, extra=()):
        self.op(opname, [self.t[n.inputs[0]], *extra], [self.out(n)], options)

    def op_relu(self, n):
        self._unary(n, "RELU")

    def op_relu6(self, n):
        self._unary(n, "RELU6")

    def op_sigmoid(self, n):
        self._unary(n, "LOGISTIC")

    def op_tanh(self, n):
        self._unary(n, "TANH")

    def op_hard_swish(self, n):
        self._unary(n, "HARD_SWISH", {})

    def op_sqrt(self, n):
        self._unary(n, "SQRT")

    def op_neg(self, n):
        self._unary(n, "NEG", {})

    def op_leaky_relu(self, n):
        self._unary(n, "LEAKY_RELU", {"alpha": float(n.attrs.get("alpha", 0.01))})

    def op_gelu(self, n):
        self._unary(n, "GELU", {"approximate": str(n.attrs.get("approximate", "none")) == "tanh"})

    def op_swish(self, n):
        x = self.t[n.inputs[0]]
        s = self.mid(n, "sigmoid", self.shapes[n.inputs[0]])
        self.op("LOGISTIC", [x], [s])
        self.op("MUL", [x, s], [self.out(n)], {"fused_activation_function": 0})

    def _clip(self, n, x, lo, hi, shape):
        lo = -np.inf if lo is None else float(lo)
        hi = np.inf if hi is None else float(hi)
        simple = {(0.0, 6.0): "RELU6", (0.0, np.inf): "RELU", (-1.0, 1.0): "RELU_N1_TO_1"}.get((lo, hi))
        if simple:
            self.op(simple, [x], [self.out(n)])
            return
        if lo > -np.inf and hi < np.inf:
            m = self.mid(n, "max", shape)
            self.op("MAXIMUM", [x, self.scalar(lo)], [m], {})
            self.op("MINIMUM", [m, self.scalar(hi)], [self.out(n)], {})
        elif lo > -np.inf:
            self.op("MAXIMUM", [x, self.scalar(lo)], [self.out(n)], {})
        elif hi < np.inf:
            self.op("MINIMUM", [x, self.scalar(hi)], [self.out(n)], {})
        else:
            self.op("RESHAPE", [x, self.ints("shape", [-1] + list(shape))], [self.out(n)],
                    {"new_shape": [-1] + list(shape)})

    def op_clip(self, n):
        self._clip(n, self.t[n.inputs[0]], n.attrs.get("min"), n.attrs.get("max"), self.shapes[n.inputs[0]])

    def op_hard_sigmoid(self, n):
        shape = self.shapes[n.inputs[0]]
        m = self.mid(n, "mul", shape)
        self.op("MUL", [self.t[n.inputs[0]], self.scalar(n.attrs.get("alpha", 0.2))], [m],
                {"fused_activation_function": 0})
        a = self.mid(n, "add", shape)
        self.op("ADD", [m, self.scalar(n.attrs.get("beta", 0.5))], [a], {"fused_activation_function": 0})
        self._clip(n, a, 0.0, 1.0, shape)

    def op_softmax(self, n):
        r = len(self.shapes[n.inputs[0]]) + 1
        axis = int(n.attrs.get("axis", -1))
        if axis % r != r - 1:
            raise ModelError(f"Layer '{n.name}': TFLite's SOFTMAX works on the last axis only (this one uses "
                             f"axis {axis}).", "Export with --format onnx instead.")
        self._unary(n, "SOFTMAX", {"beta": 1.0})

    def aligned(self, n, t, rank, i):
        """Tensor t as a tensor of `rank` dims without batch: tcl broadcasts missing leading axes right after
        the batch, numpy (TFLite) before it, so lower-rank operands get their 1s explicitly."""
        shape = list(self.shapes[t])
        if len(shape) == rank:
            return self.t[t]
        full = [1] * (rank - len(shape)) + shape
        y = self.mid(n, f"operand{i}", full)
        self.op("RESHAPE", [self.t[t], self.ints("shape", [-1] + full)], [y], {"new_shape": [-1] + full})
        return y

    def _nary(self, n, opname):
        r = max(len(self.shapes[t]) for t in n.inputs)
        xs = [self.aligned(n, t, r, i) for i, t in enumerate(n.inputs)]
        if len(xs) == 1:
            self.op("RESHAPE", [xs[0], self.ints("shape", [-1] + list(self.shapes[n.outputs[0]]))], [self.out(n)],
                    {"new_shape": [-1] + list(self.shapes[n.outputs[0]])})
            return
        acc = xs[0]
        opts = {"fused_activation_function": 0}
        for i, x in enumerate(xs[1:], 1):
            if i == len(xs) - 1:
                dst = self.out(n)
            else:
                dst = self.mid(n, f"partial{i}", self.shapes[n.outputs[0]])
            self.op(opname, [acc, x], [dst], opts)
            acc = dst

    def op_add(self, n):
        self._nary(n, "ADD")

    def op_mul(self, n):
        self._nary(n, "MUL")

    def op_sub(self, n):
        self._nary(n, "SUB")

    def op_div(self, n):
        self._nary(n, "DIV")

    def op_scale(self, n):
        x = self.t[n.inputs[0]]
        shape = self.shapes[n.inputs[0]]
        s = np.asarray(n.params["scale"] if "scale" in n.params else [n.attrs.get("scale", 1.0)], np.float32)
        o = np.asarray(n.params["offset"] if "offset" in n.params else [n.attrs.get("offset", 0.0)], np.float32)
        s, o = s.reshape(-1), o.reshape(-1)
        has_s, has_o = bool(np.any(s != 1)), bool(np.any(o != 0))
        if has_s:
            y = self.mid(n, "mul", shape) if has_o else self.out(n)
            self.op("MUL", [x, self.const(f"{n.name}/scale", s)], [y], {"fused_activation_function": 0})
            x = y
        if has_o or not has_s:
            self.op("ADD", [x, self.const(f"{n.name}/offset", o)], [self.out(n)], {"fused_activation_function": 0})

    def op_reciprocal(self, n):
        self.op("DIV", [self.scalar(1.0), self.t[n.inputs[0]]], [self.out(n)], {"fused_activation_function": 0})

    def op_pow(self, n):
        e = float(n.attrs.get("exponent", 1.0))
        if e == 2.0:
            self._unary(n, "SQUARE", {})
        else:
            self._unary(n, "POW", {}, extra=(self.scalar(e),))

    def op_concat(self, n):
        r = len(self.shapes[n.inputs[0]]) + 1
        axis = int(n.attrs.get("axis", -1)) % r
        self.op("CONCATENATION", [self.t[t] for t in n.inputs], [self.out(n)],
                {"axis": axis, "fused_activation_function": 0})

    def op_pad(self, n):
        self.pad_tensor(n, self.t[n.inputs[0]], self.shapes[n.inputs[0]], n.attrs["pads"],
                        float(n.attrs.get("value", 0.0)), out=self.out(n))

    def _pool(self, n, opname):
        from .ops.shapes import pool_out

        a = n.attrs
        kh, kw = (int(v) for v in a["kernel"])
        sh, sw = (int(v) for v in (a.get("strides") or (kh, kw)))
        pt, pl, pb, pr = (int(v) for v in a.get("pads", (0, 0, 0, 0)))
        h, w, c = self.shapes[n.inputs[0]]
        oh, ow, _ = self.shapes[n.outputs[0]]
        # Windows past the bottom/right padding (ceil_mode) count as more padding.
        eb = max((oh - 1) * sh + kh - (h + pt + pb), 0)
        er = max((ow - 1) * sw + kw - (w + pl + pr), 0)
        pads = (pt, pl, pb + eb, pr + er)
        x = self.t[n.inputs[0]]
        if opname == "MAX_POOL_2D":
            x, padding = self.spatial(n, x, (h, w, c), (kh, kw), (sh, sw), (1, 1), pads, -np.inf)
        elif pads == (0, 0, 0, 0):
            padding = VALID
        elif (not a.get("count_include_pad", True) and eb == er == 0
              and (pt, pb) == _same_pads(h, kh, sh, 1) and (pl, pr) == _same_pads(w, kw, sw, 1)):
            padding = SAME  # TFLite's SAME average excludes the padding from each window's count
        elif a.get("count_include_pad", True) and eb == er == 0:
            x, padding = self.pad_tensor(n, x, (h, w, c), pads), VALID
        else:
            raise ModelError(f"Layer '{n.name}': an average pool with this padding ({pads}, count_include_pad="
                             f"{bool(a.get('count_include_pad', True))}) has no TFLite form.",
                             "Export with --format onnx instead.")
        assert pool_out(h, kh, sh, pads[0], pads[2]) == oh
        self.op(opname, [x], [self.out(n)], {"padding": padding, "stride_w": sw, "stride_h": sh,
                                             "filter_width": kw, "filter_height": kh, "fused_activation_function": 0})

    def op_maxpool(self, n):
        self._pool(n, "MAX_POOL_2D")

    def op_avgpool(self, n):
        self._pool(n, "AVERAGE_POOL_2D")

    def op_global_avgpool(self, n):
        self.op("MEAN", [self.t[n.inputs[0]], self.ints("axes_1_2", [1, 2])], [self.out(n)],
                {"keep_dims": bool(n.attrs.get("keepdims", False))})

    def _reduce(self, n, opname):
        from .ops import ref_tensor as rt

        r = len(self.shapes[n.inputs[0]]) + 1
        axes = list(rt.reduce_axes(n, r))
        self.op(opname, [self.t[n.inputs[0]], self.ints("axes_" + "_".join(map(str, axes)), axes)], [self.out(n)],
                {"keep_dims": bool(rt.reduce_keepdims(n))})

    def op_reduce_mean(self, n):
        self._reduce(n, "MEAN")

    def op_reduce_sum(self, n):
        self._reduce(n, "SUM")

    def _reshape(self, n):
        shape = [-1] + [int(v) for v in self.shapes[n.outputs[0]]]
        self._unary(n, "RESHAPE", {"new_shape": shape}, extra=(self.ints("shape", shape),))

    def op_flatten(self, n):
        self._reshape(n)

    def op_reshape(self, n):
        self._reshape(n)

    def op_transpose(self, n):
        perm = [int(v) for v in n.attrs["perm"]]
        self._unary(n, "TRANSPOSE", {}, extra=(self.ints("perm", perm),))

    def op_identity(self, n):
        # No op: the next layer reads the input tensor (a graph output gets a RESHAPE to its own shape).
        if n.outputs[0] in self.g.outputs:
            self._reshape(n)
        else:
            self.t[n.outputs[0]] = self.t[n.inputs[0]]

    op_dropout = op_identity

    def op_slice(self, n):
        from .ops import ref_tensor as rt

        shape = (1,) + tuple(self.shapes[n.inputs[0]])
        plan = rt.slice_plan(n, shape)
        begin, end, strides = [0], [0], [1]
        begin_mask = end_mask = 1  # the batch axis: whole
        for i, (start, step, count) in enumerate(plan[1:], 1):
            if count == 0:
                raise ModelError(f"Layer '{n.name}': an empty slice has no TFLite form.", "Cut the model before it.")
            stop = start + step * count
            begin.append(start)
            strides.append(step)
            if stop < 0:
                end.append(0)
                end_mask |= 1 << i
            else:
                end.append(stop)
        self._unary(n, "STRIDED_SLICE", {"begin_mask": begin_mask, "end_mask": end_mask},
                    extra=(self.ints(f"{n.name}/begin", begin), self.ints(f"{n.name}/end", end),
                           self.ints(f"{n.name}/strides", strides)))

    def op_layer_norm(self, n):
        from .ops import ref_tensor as rt

        shape = self.shapes[n.inputs[0]]
        r = len(shape) + 1
        ax = rt.ln_axis(n, r)
        axes = list(range(ax, r))
        red = tuple(1 if i + 1 in axes else d for i, d in enumerate(shape))
        x = self.t[n.inputs[0]]
        ax_t = self.ints("axes_" + "_".join(map(str, axes)), axes)
        mean = self.mid(n, "mean", red)
        self.op("MEAN", [x, ax_t], [mean], {"keep_dims": True})
        d = self.mid(n, "centred", shape)
        self.op("SUB", [x, mean], [d], {"fused_activation_function": 0})
        sq = self.mid(n, "square", shape)
        self.op("MUL", [d, d], [sq], {"fused_activation_function": 0})
        var = self.mid(n, "var", red)
        self.op("MEAN", [sq, ax_t], [var], {"keep_dims": True})
        ve = self.mid(n, "var_eps", red)
        self.op("ADD", [var, self.scalar(float(rt.ln_eps(n)))], [ve], {"fused_activation_function": 0})
        inv = self.mid(n, "inv_std", red)
        self.op("RSQRT", [ve], [inv])
        y = self.mid(n, "normed", shape)
        self.op("MUL", [d, inv], [y], {"fused_activation_function": 0})
        g = n.params.get("gamma")
        b = n.params.get("beta")
        if g is not None:
            yg = self.mid(n, "gamma", shape) if b is not None else self.out(n)
            self.op("MUL", [y, self.const(f"{n.name}/gamma", g)], [yg], {"fused_activation_function": 0})
            y = yg
        if b is not None:
            self.op("ADD", [y, self.const(f"{n.name}/beta", b)], [self.out(n)], {"fused_activation_function": 0})
        elif g is None:
            self.op("RESHAPE", [y, self.ints("shape", [-1] + list(shape))], [self.out(n)],
                    {"new_shape": [-1] + list(shape)})

    def op_lrn(self, n):
        from .ops.ref_elementwise import lrn_params

        size, alpha, beta, bias = lrn_params(n)
        if size % 2 != 1 or len(self.shapes[n.inputs[0]]) != 3:
            raise ModelError(f"Layer '{n.name}': TFLite's LOCAL_RESPONSE_NORMALIZATION takes an odd window over the "
                             f"channels of a 4-D tensor (this one: size {size}).", "Export with --format onnx instead.")
        self._unary(n, "LOCAL_RESPONSE_NORMALIZATION",
                    {"radius": (size - 1) // 2, "bias": bias, "alpha": alpha / size, "beta": beta})


def inference_graph(graph):
    """The graph as it is exported: frozen Conv+BN(+act) and zero Pads folded, as tcl runs inference."""
    from .plan import fold_frozen

    return fold_frozen(graph, set())


def build_tflite(graph, *, int8=None):
    """The .tflite bytes for `graph` (see the module docstring). int8: the dict from export.quantize_int8."""
    from . import __version__
    from .export import _meta_for_export

    if len(graph.inputs) != 1:
        raise TclError(f"TFLite export writes models with one input; this graph has {len(graph.inputs)}.",
                       "Export with --format onnx instead.")
    for name, shape in graph.inputs.items():
        if any(v is None for v in shape):
            raise TclError(f"The input '{name}' has an unknown size {shape}.", "Import the model with input_size.")
    w = _TfliteWriter(inference_graph(graph), graph, int8)
    for n in w.g.nodes:
        w.emit(n)
    outputs = []
    for t in graph.outputs:
        if t in graph.inputs:
            raise TclError(f"The graph output '{t}' is its input.", "Export a model with layers.")
        outputs.append(w.t[t])
    if graph.meta.get("export_softmax"):
        probs = w.act_tensor("probabilities", w.shapes[graph.outputs[0]])
        w.op("SOFTMAX", [outputs[0]], [probs], {"beta": 1.0})
        outputs.append(probs)
    meta = {"producer": PRODUCER, "producer_version": __version__, "input_layout": "NHWC"}
    meta.update(_meta_for_export(graph))
    if int8:
        meta["quantization"] = ("int8 symmetric per-output-channel weights (weight-only: DEQUANTIZE to float32; "
                                "float32 activations)")
        meta["int8_weights"] = sorted(int8)
    data = json.dumps(_jsonable(meta)).encode()
    return w.f.finish([w.t[t] for t in graph.inputs], outputs, metadata={METADATA_NAME: data})


def export_tflite(graph, path, *, int8=None, force=False):
    """Write `graph` as a .tflite file (atomically; an existing file only with force=True). Returns the bytes."""
    from .export import _refuse_overwrite

    path = os.fspath(path)
    _refuse_overwrite([path], force)
    data = build_tflite(graph, int8=int8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return data


__all__ = ["TfliteFile", "build_tflite", "export_tflite", "inference_graph", "need_tflite", "METADATA_NAME"]
