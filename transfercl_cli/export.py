"""Exporters: a (fine-tuned) Graph to files that deployment tools load.

- `export_onnx`: the whole network as a standard ONNX model (NHWC float32 input, a Transpose to NCHW, standard ops).
- `export_h5`: Keras-layout legacy HDF5 *weights* (what `model.load_weights("x.h5")` reads in Keras 2 and 3).
- `export_npz`: a flat {"layer/param": array} archive (no pickle) plus a JSON sidecar with classes/preprocessing.
- `quantize_int8`: per-output-channel symmetric int8 weights for conv2d/dense (fake-quantized graph + int8 arrays).

Every writer goes through a temporary file renamed into place (fsutil.atomic_path): an interrupted export leaves
no partial file, and an existing output is only replaced with force=True (the CLI's --force).
"""
import json
import os
from collections import namedtuple

import numpy as np

from .errors import ModelError, TclError
from .fsutil import atomic_path, jsonable as _jsonable, write_json

# ---------------------------------------------------------------------------------------------------------------
# shared helpers


def _refuse_overwrite(paths, force):
    if force:
        return
    for p in paths:
        if os.path.exists(p):
            raise TclError(
                f"The output file '{p}' already exists, and tcl does not overwrite files unless asked to.",
                "Pass --force to replace it, or choose another output path.",
            )


def _meta_for_export(graph):
    """classes and preprocessing from graph.meta (the Keras importer names the latter 'preprocess')."""
    out = {}
    if "classes" in graph.meta:
        out["classes"] = graph.meta["classes"]
    pre = graph.meta.get("preprocessing", graph.meta.get("preprocess"))
    if pre is not None:
        out["preprocessing"] = pre
    return out


def _act_of(node):
    act = node.attrs.get("act")
    return None if act in (None, "", "linear", "none") else act


# ---------------------------------------------------------------------------------------------------------------
# int8 quantization

QuantizedWeight = namedtuple("QuantizedWeight", "q scale axis")
QuantizedWeight.__doc__ = """int8 weights `q` (same shape as the float weight) and float32 `scale` per output channel
along `axis` (the last axis: HWIO conv and (cin, cout) dense weights); the float weight is q * scale."""


def quantize_weight(w):
    """Symmetric per-output-channel (last axis) int8: scale = max|w| / 127 per channel; q = round(w / scale)."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).reshape(-1, w.shape[-1]).max(axis=0)
    # An all-zero channel would divide by zero; any scale represents it exactly (q = 0).
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return QuantizedWeight(q, scale, w.ndim - 1)


def dequantize(qw):
    return (qw.q.astype(np.float32) * qw.scale).astype(np.float32)


def quantize_int8(graph, ops=("conv2d", "dense"), skip=()):
    """Per-output-channel symmetric int8 quantization of conv2d/dense weights.

    Returns (qgraph, qweights): `qgraph` is a copy of `graph` whose quantized weights are replaced by their
    dequantized float32 values (q * scale), so it runs on every backend and shows the accuracy int8 would give;
    `qweights` is {"layer/weight": QuantizedWeight(q int8, scale float32 (cout,), axis)} for the writers
    (`export_npz(..., int8=qweights)` stores the int8 arrays and scales, `export_onnx(..., int8=qweights)` stores
    int8 initializers with DequantizeLinear nodes). Biases, BatchNorm and all other parameters stay float32.
    Per channel the rounding error is at most scale / 2.
    """
    qgraph = graph.copy()
    qweights = {}
    skip = set(skip)
    for n in qgraph.nodes:
        if n.op in ops and "weight" in n.params and n.name not in skip:
            qw = quantize_weight(n.params["weight"])
            qweights[f"{n.name}/weight"] = qw
            n.params["weight"] = dequantize(qw)
    qgraph.meta = dict(qgraph.meta)
    qgraph.meta["quantization"] = {"scheme": "int8 symmetric per-output-channel", "weights": sorted(qweights)}
    return qgraph, qweights


# ---------------------------------------------------------------------------------------------------------------
# npz


def export_npz(graph, path, sidecar_meta=None, *, int8=None, force=False):
    """Write every parameter as a flat "layer/param" -> float32 array archive (np.savez, no pickle) and a JSON
    sidecar at PATH + ".json" (e.g. model.npz.json).

    The sidecar holds `sidecar_meta` (classes, preprocessing; default: those of graph.meta), the layout
    conventions, the list of parameters, and the graph structure (nodes with op, inputs, outputs, attrs).
    With `int8` (the dict from quantize_int8), each quantized weight is stored as "layer/param:int8" (int8, same
    shape) and "layer/param:scale" (float32 per output channel, last axis) instead of the float array;
    `load_npz_params` gives the float values back (q * scale). Load with np.load(path, allow_pickle=False).
    """
    path = os.fspath(path)
    side = path + ".json"
    _refuse_overwrite([path, side], force)
    int8 = int8 or {}
    arrays = {}
    params_info = {}
    for key, v in graph.params().items():
        if key in int8:
            qw = int8[key]
            arrays[key + ":int8"] = np.ascontiguousarray(qw.q, dtype=np.int8)
            arrays[key + ":scale"] = np.ascontiguousarray(qw.scale, dtype=np.float32)
            params_info[key] = {"shape": list(v.shape), "dtype": "int8", "scale_axis": int(qw.axis)}
        else:
            arrays[key] = np.ascontiguousarray(v, dtype=np.float32)
            params_info[key] = {"shape": list(v.shape), "dtype": "float32"}
    if sidecar_meta is None:
        sidecar_meta = _meta_for_export(graph)
    sidecar = dict(_jsonable(sidecar_meta))
    sidecar.update({
        "format": "transfercl-npz",
        "format_version": 1,
        "model": graph.name,
        "layout": "activations NHWC; conv2d weight HWIO (kh, kw, cin/groups, cout); dense weight (cin, cout)",
        "inputs": {k: list(v) for k, v in graph.inputs.items()},
        "outputs": list(graph.outputs),
        "params": params_info,
        "quantization": ({"scheme": "int8 symmetric per-output-channel", "dequantize": "w = q * scale (last axis)"}
                         if int8 else None),
        "nodes": [
            {"name": n.name, "op": n.op, "inputs": list(n.inputs), "outputs": list(n.outputs),
             "attrs": _jsonable(n.attrs), "source": n.source}
            for n in graph.nodes
        ],
    })
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        # The sidecar is written before the archive is renamed into place: both or neither appear.
        write_json(side, sidecar)


def load_npz_params(path):
    """{"layer/param": float32 array} from an export_npz archive (int8 entries dequantized)."""
    out = {}
    with np.load(path, allow_pickle=False) as z:
        for k in z.files:
            if k.endswith(":scale"):
                continue
            if k.endswith(":int8"):
                base = k[: -len(":int8")]
                out[base] = (z[k].astype(np.float32) * z[base + ":scale"]).astype(np.float32)
            else:
                out[k] = z[k]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Keras-layout HDF5 weights

# The legacy-HDF5 attribute size limit Keras works around by splitting long name lists (layer_names0, ...).
_HDF5_OBJECT_HEADER_LIMIT = 64512


def _is_depthwise(node):
    if node.source == "DepthwiseConv2D":
        return True
    if node.source == "Conv2D":
        return False
    w = node.params.get("weight")
    g = int(node.attrs.get("groups", 1))
    return w is not None and g > 1 and w.shape[2] == 1


def keras_weights(node):
    """[(keras weight name, array)] in Keras's legacy order (trainable, then non-trainable) for one node."""
    p = node.params
    if node.op == "conv2d":
        w = p["weight"]
        if _is_depthwise(node):
            groups = int(node.attrs.get("groups", w.shape[3]))
            kh, kw, _, cout = w.shape
            # Ours (kh, kw, 1, cin*mult) with o = c*mult + m is Keras's (kh, kw, cin, mult) in row-major order.
            # Keras 3 names it "kernel" (Keras 2: "depthwise_kernel:0"); loaders go by position, not name.
            out = [("kernel", w.reshape(kh, kw, groups, cout // groups))]
        else:
            out = [("kernel", w)]
        if "bias" in p:
            out.append(("bias", p["bias"]))
        return out
    if node.op == "dense":
        out = [("kernel", p["weight"])]
        if "bias" in p:
            out.append(("bias", p["bias"]))
        return out
    if node.op == "batchnorm":
        return [(k, p[src]) for k, src in (("gamma", "gamma"), ("beta", "beta"), ("moving_mean", "mean"),
                                           ("moving_variance", "var")) if src in p]
    if node.op == "layer_norm":
        # Keras's LayerNormalization: gamma (scale=True), beta (center=True), shaped like the normalised dims.
        return [(k, p[k]) for k in ("gamma", "beta") if k in p]
    return []


# Graph parameters each op's Keras layer holds as weights (the rest go to "tcl_params").
_KERAS_HELD = {"conv2d": {"weight", "bias"}, "dense": {"weight", "bias"},
               "batchnorm": {"gamma", "beta", "mean", "var"}, "layer_norm": {"gamma", "beta"}}


def _layer_norm_shapes(graph):
    """{layer_norm node: normalised dims} so that gamma/beta are written in Keras's shape (tuple(input_shape[a] for
    a in axes)); {} when shapes cannot be inferred (the parameters are then written as they are)."""
    if not any(n.op == "layer_norm" for n in graph.nodes):
        return {}
    try:
        from .ops.ref_tensor import ln_axis
        from .ops.shapes import infer_shapes

        shapes = infer_shapes(graph)
        out = {}
        for n in graph.nodes:
            if n.op == "layer_norm":
                full = (None,) + tuple(shapes[n.inputs[0]])
                out[n.name] = tuple(int(d) for d in full[ln_axis(n, len(full)):])
        return out
    except Exception:  # a graph whose shapes do not infer: write the parameters unchanged
        return {}


def _keras_class(node):
    if node.op == "conv2d":
        return "DepthwiseConv2D" if _is_depthwise(node) else "Conv2D"
    return {"dense": "Dense", "batchnorm": "BatchNormalization",
            "layer_norm": "LayerNormalization"}.get(node.op, node.source or node.op)


def _h5_attr_list(group, name, items):
    """Keras's save_attributes_to_hdf5_group: a string list, split into name0, name1, ... past the header limit."""
    import h5py

    if not items:
        # Keras writes an empty list as an empty float64 array.
        group.attrs[name] = np.zeros((0,), np.float64)
        return
    data = np.array(items, dtype=object)
    dt = h5py.string_dtype("utf-8")
    nbytes = sum(len(s.encode("utf-8")) for s in items) + 16 * len(items)
    chunks = 1
    while nbytes / chunks > _HDF5_OBJECT_HEADER_LIMIT:
        chunks += 1
    if chunks == 1:
        group.attrs.create(name, data, dtype=dt)
    else:
        for i, part in enumerate(np.array_split(data, chunks)):
            group.attrs.create(f"{name}{i}", part, dtype=dt)


def _h5_read_list(group, name):
    def dec(v):
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)

    if name in group.attrs:
        return [dec(v) for v in group.attrs[name]]
    out, i = [], 0
    while f"{name}{i}" in group.attrs:
        out.extend(dec(v) for v in group.attrs[f"{name}{i}"])
        i += 1
    return out


def _h5_layer_name(name):
    # HDF5 would read '/' as nested groups; Keras layer names never contain it.
    return name.replace("/", "_")


def export_h5(graph, path, *, force=False):
    """Write the weights in the layout Keras `model.load_weights(path)` reads for legacy .h5 files.

    The layout mirrors what Keras 3 writes (`save_weights_to_hdf5_group`, as in the shared mobilenet .h5's
    `model_weights` group), at the file's root as Keras's weights-only files have it:
      root attrs: layer_names (every layer, graph order), backend "tensorflow", keras_version;
      one group per layer (the graph's node names, '/' replaced by '_'), attr weight_names
      (e.g. ["conv1/kernel"], empty for weightless layers), datasets at LAYER/LAYER/WEIGHT:
        Conv2D kernel (kh, kw, cin/groups, cout), bias; DepthwiseConv2D kernel (kh, kw, cin, mult), bias (Keras 3's
        name; Keras 2 called it depthwise_kernel);
        Dense kernel (cin, cout), bias; BatchNormalization gamma, beta, moving_mean, moving_variance;
        LayerNormalization gamma, beta (those it has), shaped like the normalised dims as Keras makes them.
    Keras 2 and 3 both load it by order (`model.load_weights(p)`) or by layer name (`by_name=True`) into a
    Keras model of the same architecture; no model_config is written (weights only). Parameters Keras layers do
    not hold as weights (e.g. per-channel Rescaling from `scale` nodes) go to a separate "tcl_params" group
    Keras ignores; each layer group also gets a class_name attribute (ignored by Keras). `read_h5_weights` reads the file back into graph parameter names.
    """
    import h5py

    path = os.fspath(path)
    _refuse_overwrite([path], force)
    names = []
    seen = set()
    for n in graph.nodes:
        ln = _h5_layer_name(n.name)
        if ln in seen:
            raise ModelError(f"Two layers are named '{n.name}'; Keras weight files need unique layer names.",
                             "Rename one of them before exporting to .h5.")
        seen.add(ln)
        names.append((ln, n))
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            _h5_attr_list(f, "layer_names", [ln for ln, _ in names])
            f.attrs["backend"] = "tensorflow"
            f.attrs["keras_version"] = str(graph.meta.get("keras_version") or "3.15.1")
            f.attrs["exporter"] = "transfercl"
            # Keras creates the groups sorted by name ("to avoid prefix issues").
            extra = {}
            norm = _layer_norm_shapes(graph)
            for ln, n in sorted(names, key=lambda t: t[0]):
                g = f.create_group(ln)
                ws = keras_weights(n)
                if n.name in norm:
                    ws = [(k, np.reshape(v, norm[n.name]) if np.size(v) == int(np.prod(norm[n.name])) else v)
                          for k, v in ws]
                # Which Keras layer this is (Keras ignores the attribute; read_h5_weights needs it to tell a
                # DepthwiseConv2D "kernel" (kh, kw, cin, mult) from a Conv2D one).
                g.attrs["class_name"] = _keras_class(n)
                _h5_attr_list(g, "weight_names", [f"{ln}/{k}" for k, _ in ws])
                for k, v in ws:
                    g.create_dataset(f"{ln}/{k}", data=np.asarray(v, dtype=np.float32))
                used = _KERAS_HELD.get(n.op, set())
                for k, v in n.params.items():
                    if k not in used:
                        extra[f"{ln}/{k}"] = v
            # Keras 3 writes this group for a Functional model's own (layer-less) weights: there are none.
            _h5_attr_list(f.create_group("top_level_model_weights"), "weight_names", [])
            if extra:
                g = f.create_group("tcl_params")
                for k, v in extra.items():
                    g.create_dataset(k, data=np.asarray(v, dtype=np.float32))


_H5_TO_CANONICAL = {"kernel": "weight", "depthwise_kernel": "weight", "bias": "bias", "gamma": "gamma",
                    "beta": "beta", "moving_mean": "mean", "moving_variance": "var"}


def read_h5_weights(path):
    """{"layer/param": float32 array} in graph parameter names from a Keras legacy .h5 (export_h5's weights-only
    files, Keras 2/3 weights files or full models): depthwise kernels (kh, kw, cin, mult) come back as
    (kh, kw, 1, cin*mult). Depthwise layers are known by the Keras 2 name "depthwise_kernel", the group's
    class_name attribute (export_h5) or the file's model_config."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        classes = {}
        if "model_config" in f.attrs:
            cfg = f.attrs["model_config"]
            cfg = json.loads(cfg.decode("utf-8") if isinstance(cfg, bytes) else cfg)
            for layer in (cfg.get("config") or {}).get("layers", []):
                classes[(layer.get("config") or {}).get("name", layer.get("name"))] = layer.get("class_name")
        root = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
        for ln in _h5_read_list(root, "layer_names"):
            if ln not in root:
                continue
            g = root[ln]
            cls = g.attrs.get("class_name", classes.get(ln))
            cls = cls.decode("utf-8") if isinstance(cls, bytes) else cls
            for wn in _h5_read_list(g, "weight_names"):
                v = np.asarray(g[wn], dtype=np.float32)
                short = wn.split("/")[-1].split(":")[0]
                if short == "depthwise_kernel" or (short == "kernel" and cls == "DepthwiseConv2D"):
                    kh, kw, cin, mult = v.shape
                    v = v.reshape(kh, kw, 1, cin * mult)
                out[f"{ln}/{_H5_TO_CANONICAL.get(short, short)}"] = v
        if "tcl_params" in root:
            root["tcl_params"].visititems(
                lambda name, obj: out.__setitem__(name, np.asarray(obj, np.float32))
                if isinstance(obj, h5py.Dataset) else None)
    return out


# ---------------------------------------------------------------------------------------------------------------
# ONNX

_NHWC_TO_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}
_MIN_OPSET = 13


def _norm_axis(ax, rank):
    a = int(ax)
    return a + rank if a < 0 else a


class _OnnxWriter:
    """Builds the ONNX graph op by op, tracking each tensor's layout.

    A 4-D tensor can exist in two forms: "nchw" (what Conv, pools, BatchNormalization and LRN want) and "plain"
    (our physical NHWC order, which flatten/reshape/transpose and graph outputs need). Each form is made on
    demand with a Transpose and cached, so the usual conv stack has exactly one Transpose after the input.
    """

    def __init__(self, graph, opset, int8, input_layout):
        from onnx import helper

        self.h = helper
        self.g = graph
        self.opset = opset
        self.int8 = int8 or {}
        self.nodes = []
        self.inits = []
        self.node_names = set()
        self.value_names = set()
        self.forms = {}  # our tensor -> {form: onnx name}
        self.rank = {}
        self.reserved = {}  # tensor -> form that must carry the bare tensor name (graph inputs/outputs)
        self.consts = {}
        self._shapes = None  # infer_shapes(graph), made when an op needs shapes
        self.claimed = set(graph.inputs) | {t for n in graph.nodes for t in n.outputs}
        for t in graph.outputs:
            self.reserved[t] = "plain"
        for t, shape in graph.inputs.items():
            r = len(shape) + 1
            self.rank[t] = r
            form = "nchw" if (input_layout == "NCHW" and r == 4) else "plain"
            self.reserved[t] = form
            self.forms[t] = {form: t}
            self.value_names.add(t)

    # naming ----------------------------------------------------------------------------------------------------
    def _unique(self, base, used):
        name, i = base, 1
        while name in used:
            name = f"{base}_{i}"
            i += 1
        used.add(name)
        return name

    def node(self, op, inputs, outputs, name, **attrs):
        self.nodes.append(self.h.make_node(op, inputs, outputs, name=self._unique(name, self.node_names), **attrs))

    def value(self, base):
        """A fresh ONNX value name that can never take one of our tensor names."""
        name, i = base, 1
        while name in self.value_names or name in self.claimed:
            name = f"{base}_{i}"
            i += 1
        self.value_names.add(name)
        return name

    def const(self, base, arr, dtype=None):
        from onnx import numpy_helper

        arr = np.asarray(arr, dtype=dtype)
        name = self.value(base)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def shared_const(self, key, arr, dtype):
        """A small constant (clip bounds, shapes) shared by every node that uses the same value."""
        k = (key, dtype, np.asarray(arr).tobytes(), np.asarray(arr).shape)
        if k not in self.consts:
            self.consts[k] = self.const(key, arr, dtype)
        return self.consts[k]

    # layouts ---------------------------------------------------------------------------------------------------
    def out_name(self, t, form):
        """The ONNX name for our tensor t in `form`: the bare name for the first form made (or the reserved form of
        a graph input/output), else "t__form"."""
        res = self.reserved.get(t)
        bare = (res == form) if res is not None else not self.forms.get(t)
        if bare and t not in self.value_names:
            self.value_names.add(t)
            return t
        return self.value(f"{t}__{form}")

    def set(self, t, form, name, rank):
        self.forms.setdefault(t, {})[form] = name
        self.rank[t] = rank

    def produce(self, t, form, rank):
        """Name for our tensor t written in `form` (registered)."""
        if rank != 4:
            form = "plain"
        name = self.out_name(t, form)
        self.set(t, form, name, rank)
        return name

    def get(self, t, form):
        forms = self.forms[t]
        if self.rank[t] != 4:
            form = "plain"
        if form in forms:
            return forms[form]
        src_form, src = next(iter(forms.items()))
        perm = [0, 3, 1, 2] if form == "nchw" else [0, 2, 3, 1]
        name = self.out_name(t, form)
        self.node("Transpose", [src], [name], f"{t}/to_{form}", perm=perm)
        forms[form] = name
        return name

    def any_form(self, t):
        """Prefer the NCHW form of a 4-D tensor (no transposes inside conv stacks)."""
        forms = self.forms[t]
        if "nchw" in forms:
            return "nchw", forms["nchw"]
        return "plain", forms["plain"]

    # ops -------------------------------------------------------------------------------------------------------
    def fused_act(self, node, src, t, form, rank):
        act = _act_of(node)
        if act is None:
            return
        out = self.produce(t, form, rank)
        if act == "relu":
            self.node("Relu", [src], [out], f"{node.name}/relu")
        elif act == "relu6":
            self.node("Clip", [src, self.clip_bound(0.0), self.clip_bound(6.0)], [out], f"{node.name}/relu6")
        else:
            raise ModelError(f"Layer '{node.name}' has a fused activation '{act}' tcl cannot export to ONNX.",
                             "Export to .npz instead, or report this model.")

    def clip_bound(self, v):
        return self.shared_const(f"clip_{v:g}", np.float32(v), np.float32)

    def weight(self, node, arr, base, transpose=None, qaxis=None):
        """A weight initializer, or int8 + DequantizeLinear when the weight was quantized."""
        key = f"{node.name}/weight"
        qw = self.int8.get(key) if base == "weight" else None
        if qw is None:
            a = np.asarray(arr, np.float32)
            if transpose is not None:
                a = a.transpose(transpose)
            return self.const(f"{node.name}.{base}", np.ascontiguousarray(a), np.float32)
        q = qw.q if transpose is None else qw.q.transpose(transpose)
        qn = self.const(f"{node.name}.weight_int8", np.ascontiguousarray(q), np.int8)
        sn = self.const(f"{node.name}.weight_scale", qw.scale, np.float32)
        zn = self.const(f"{node.name}.weight_zero_point", np.zeros(qw.scale.shape, np.int8), np.int8)
        out = self.value(f"{node.name}.weight")
        self.node("DequantizeLinear", [qn, sn, zn], [out], f"{node.name}/dequantize", axis=int(qaxis))
        return out

    def emit(self, n):
        op = n.op
        fn = getattr(self, f"op_{op}", None)
        if fn is None:
            raise ModelError(f"Layer '{n.name}' uses the op '{op}', which tcl cannot export to ONNX yet.",
                             "Export with --format npz or h5 instead.")
        try:
            fn(n)
        except ValueError as e:  # the attribute checks of ops/ref_tensor.py (shape inference reports most first)
            raise ModelError(f"Layer '{n.name}' ({op}) cannot be exported to ONNX: {e}.",
                             "The graph is inconsistent; re-import the model.") from None

    def _unary(self, n, onnx_op, extra_inputs=(), **attrs):
        form, x = self.any_form(n.inputs[0])
        r = self.rank[n.inputs[0]]
        self.node(onnx_op, [x, *extra_inputs], [self.produce(n.outputs[0], form, r)], n.name, **attrs)

    def op_relu(self, n):
        self._unary(n, "Relu")

    def op_relu6(self, n):
        self._unary(n, "Clip", (self.clip_bound(0.0), self.clip_bound(6.0)))

    def op_clip(self, n):
        lo = n.attrs.get("min")
        hi = n.attrs.get("max")
        ins = [self.clip_bound(float(lo)) if lo is not None else "",
               self.clip_bound(float(hi)) if hi is not None else ""]
        while ins and ins[-1] == "":
            ins.pop()
        self._unary(n, "Clip", ins)

    def op_sigmoid(self, n):
        self._unary(n, "Sigmoid")

    def op_tanh(self, n):
        self._unary(n, "Tanh")

    def op_leaky_relu(self, n):
        self._unary(n, "LeakyRelu", alpha=float(n.attrs.get("alpha", 0.01)))

    def op_hard_sigmoid(self, n):
        self._unary(n, "HardSigmoid", alpha=float(n.attrs.get("alpha", 0.2)), beta=float(n.attrs.get("beta", 0.5)))

    def op_identity(self, n):
        self._unary(n, "Identity")

    def op_dropout(self, n):
        # Identity at inference: an ONNX Dropout would only add a training-mode input for tools to mishandle.
        self._unary(n, "Identity")

    def op_swish(self, n):
        form, x = self.any_form(n.inputs[0])
        r = self.rank[n.inputs[0]]
        s = self.value(f"{n.name}/sigmoid")
        self.node("Sigmoid", [x], [s], f"{n.name}/sigmoid")
        self.node("Mul", [x, s], [self.produce(n.outputs[0], form, r)], n.name)

    def op_hard_swish(self, n):
        if self.opset >= 14:
            self._unary(n, "HardSwish")
            return
        form, x = self.any_form(n.inputs[0])
        r = self.rank[n.inputs[0]]
        s = self.value(f"{n.name}/hard_sigmoid")
        self.node("HardSigmoid", [x], [s], f"{n.name}/hard_sigmoid", alpha=1.0 / 6.0, beta=0.5)
        self.node("Mul", [x, s], [self.produce(n.outputs[0], form, r)], n.name)

    def _nary(self, n, binop, many=None):
        ranks = {self.rank[t] for t in n.inputs}
        form = "nchw" if ranks == {4} else "plain"
        xs = [self.get(t, form) for t in n.inputs]
        r = max(ranks)
        out = self.produce(n.outputs[0], form, r)
        if len(xs) == 1:
            self.node("Identity", xs, [out], n.name)
        elif len(xs) == 2 or many is None:
            acc = xs[0]
            for i, x in enumerate(xs[1:], 1):
                dst = out if i == len(xs) - 1 else self.value(f"{n.name}/partial{i}")
                self.node(binop, [acc, x], [dst], n.name if dst == out else f"{n.name}/partial{i}")
                acc = dst
        else:
            self.node(many, xs, [out], n.name)

    def op_add(self, n):
        self._nary(n, "Add", "Sum")

    def op_mul(self, n):
        self._nary(n, "Mul")

    def _channel_const(self, base, v, form, rank):
        """A per-channel (C,) vector broadcastable against the tensor in `form` (NCHW: (C, 1, 1))."""
        v = np.asarray(v, np.float32)
        if v.ndim == 1 and form == "nchw" and rank == 4:
            v = v.reshape(-1, 1, 1)
        return self.const(base, v, np.float32)

    def op_scale(self, n):
        form, x = self.any_form(n.inputs[0])
        r = self.rank[n.inputs[0]]
        s = n.params.get("scale", n.attrs.get("scale", 1.0))
        o = n.params.get("offset", n.attrs.get("offset", 0.0))
        out = self.produce(n.outputs[0], form, r)
        has_o = np.any(np.asarray(o) != 0)
        mid = self.value(f"{n.name}/mul") if has_o else out
        self.node("Mul", [x, self._channel_const(f"{n.name}.scale", s, form, r)], [mid],
                  f"{n.name}/mul" if has_o else n.name)
        if has_o:
            self.node("Add", [mid, self._channel_const(f"{n.name}.offset", o, form, r)], [out], n.name)

    def op_softmax(self, n):
        t = n.inputs[0]
        r = self.rank[t]
        axis = int(n.attrs.get("axis", -1)) % r
        if r == 4 and "nchw" in self.forms[t]:
            form, axis = "nchw", _NHWC_TO_NCHW_AXIS[axis]
        else:
            form = "plain"
        x = self.get(t, form)
        self.node("Softmax", [x], [self.produce(n.outputs[0], form, r)], n.name, axis=axis)

    def op_conv2d(self, n):
        x = self.get(n.inputs[0], "nchw")
        w = n.params["weight"]
        kh, kw = (int(v) for v in n.attrs.get("kernel", w.shape[:2]))
        ins = [x, self.weight(n, w, "weight", transpose=(3, 2, 0, 1), qaxis=0)]
        if "bias" in n.params:
            ins.append(self.const(f"{n.name}.bias", n.params["bias"], np.float32))
        pt, pl, pb, pr = (int(v) for v in n.attrs.get("pads", (0, 0, 0, 0)))
        out_t = n.outputs[0]
        y = self.value(f"{n.name}/conv") if _act_of(n) else self.produce(out_t, "nchw", 4)
        self.node("Conv", ins, [y], n.name, kernel_shape=[kh, kw],
                  strides=[int(v) for v in n.attrs.get("strides", (1, 1))],
                  dilations=[int(v) for v in n.attrs.get("dilations", (1, 1))],
                  pads=[pt, pl, pb, pr], group=int(n.attrs.get("groups", 1)))
        self.fused_act(n, y, out_t, "nchw", 4)

    def op_dense(self, n):
        t = n.inputs[0]
        r = self.rank[t]
        x = self.get(t, "plain")
        out_t = n.outputs[0]
        w = self.weight(n, n.params["weight"], "weight", qaxis=1)
        y = self.value(f"{n.name}/dense") if _act_of(n) else self.produce(out_t, "plain", r)
        if r == 2:
            ins = [x, w]
            if "bias" in n.params:
                ins.append(self.const(f"{n.name}.bias", n.params["bias"], np.float32))
            self.node("Gemm", ins, [y], n.name)
        elif "bias" in n.params:
            mm = self.value(f"{n.name}/matmul")
            self.node("MatMul", [x, w], [mm], f"{n.name}/matmul")
            self.node("Add", [mm, self.const(f"{n.name}.bias", n.params["bias"], np.float32)], [y], n.name)
        else:
            self.node("MatMul", [x, w], [y], n.name)
        self.fused_act(n, y, out_t, "plain", r)

    def op_batchnorm(self, n):
        if n.attrs.get("act") or n.attrs.get("pool"):
            self._batchnorm_unfused(n)
            return
        t = n.inputs[0]
        r = self.rank[t]
        p = n.params
        c = p["mean"].shape[0]
        gamma = p.get("gamma", np.ones(c, np.float32))
        beta = p.get("beta", np.zeros(c, np.float32))
        eps = float(n.attrs.get("eps", 1e-3))
        if r in (2, 4):
            x = self.get(t, "nchw")
            ins = [x] + [self.const(f"{n.name}.{k}", v, np.float32)
                         for k, v in (("gamma", gamma), ("beta", beta), ("mean", p["mean"]), ("var", p["var"]))]
            self.node("BatchNormalization", ins, [self.produce(n.outputs[0], "nchw", r)], n.name, epsilon=eps)
            return
        # Channels-last tensors of other ranks: the inference affine form over the last axis.
        sc = (np.asarray(gamma, np.float64) / np.sqrt(np.asarray(p["var"], np.float64) + eps))
        sh = np.asarray(beta, np.float64) - np.asarray(p["mean"], np.float64) * sc
        x = self.get(t, "plain")
        mid = self.value(f"{n.name}/mul")
        self.node("Mul", [x, self.const(f"{n.name}.scale", sc, np.float32)], [mid], f"{n.name}/mul")
        self.node("Add", [mid, self.const(f"{n.name}.shift", sh, np.float32)],
                  [self.produce(n.outputs[0], "plain", r)], n.name)

    def _batchnorm_unfused(self, n):
        """A BatchNorm that carries the ReLU/ReLU6 and the global average pool after it (plan.fold_frozen's form of
        a BatchNorm left standing, in int8 exports' folded graphs) is written as the nodes it stands for."""
        from .graph import Node

        act, pool = n.attrs.get("act"), n.attrs.get("pool")
        if act not in (None, "relu", "relu6") or pool not in (None, "global_avg"):
            raise ModelError(f"Layer '{n.name}' is a BatchNorm with a fused {act or pool!r} tcl cannot export to ONNX.",
                             "Export with --format npz instead.")
        bn_attrs = {k: v for k, v in n.attrs.items() if k not in ("act", "pool", "keepdims", "folded")}
        chain = [("batchnorm", n.name, bn_attrs, n.params)]
        if act:
            chain.append((act, f"{n.name}/{act}", {}, {}))
        if pool:
            chain.append(("global_avgpool", f"{n.name}/pool", {"keepdims": bool(n.attrs.get("keepdims"))}, {}))
        x = n.inputs[0]
        for i, (op, name, attrs, params) in enumerate(chain):
            y = n.outputs[0] if i == len(chain) - 1 else self.value(f"{n.name}/{op}_out")
            self.emit(Node(name, op, [x], [y], attrs, params))
            x = y

    def op_fake_quant(self, n):
        """QuantizeLinear + DequantizeLinear (per tensor), the QDQ form onnxruntime fuses into integer kernels."""
        from .ops.ref_elementwise import fake_quant_params

        try:
            scale, _, _ = fake_quant_params(n)
        except ValueError as e:
            raise ModelError(f"Layer '{n.name}' cannot be exported to ONNX: {e}.", "Re-export the run.") from None
        dt = np.uint8 if n.attrs.get("dtype", "uint8") == "uint8" else np.int8
        form, x = self.any_form(n.inputs[0])
        r = self.rank[n.inputs[0]]
        sn = self.const(f"{n.name}.scale", np.float32(scale), np.float32)
        zn = self.const(f"{n.name}.zero_point", dt(int(n.attrs.get("zero_point", 0))), dt)
        q = self.value(f"{n.name}/quantized")
        self.node("QuantizeLinear", [x, sn, zn], [q], f"{n.name}/quantize")
        self.node("DequantizeLinear", [q, sn, zn], [self.produce(n.outputs[0], form, r)], n.name)

    def _pool(self, n, onnx_op, **extra):
        x = self.get(n.inputs[0], "nchw")
        k = [int(v) for v in n.attrs["kernel"]]
        s = [int(v) for v in (n.attrs.get("strides") or k)]
        pads = [int(v) for v in n.attrs.get("pads", (0, 0, 0, 0))]
        self.node(onnx_op, [x], [self.produce(n.outputs[0], "nchw", 4)], n.name, kernel_shape=k, strides=s,
                  pads=pads, ceil_mode=int(bool(n.attrs.get("ceil_mode", False))), **extra)

    def op_maxpool(self, n):
        self._pool(n, "MaxPool")

    def op_avgpool(self, n):
        self._pool(n, "AveragePool", count_include_pad=int(bool(n.attrs.get("count_include_pad", True))))

    def op_global_avgpool(self, n):
        x = self.get(n.inputs[0], "nchw")
        if n.attrs.get("keepdims", False):
            self.node("GlobalAveragePool", [x], [self.produce(n.outputs[0], "nchw", 4)], n.name)
            return
        mid = self.value(f"{n.name}/pool")
        self.node("GlobalAveragePool", [x], [mid], n.name)
        self.node("Flatten", [mid], [self.produce(n.outputs[0], "plain", 2)], f"{n.name}/flatten", axis=1)

    def op_pad(self, n):
        x = self.get(n.inputs[0], "nchw")
        pt, pl, pb, pr = (int(v) for v in n.attrs.get("pads", (0, 0, 0, 0)))
        pads = self.shared_const("pads", np.array([0, 0, pt, pl, 0, 0, pb, pr], np.int64), np.int64)
        val = self.shared_const("pad_value", np.float32(n.attrs.get("value", 0.0)), np.float32)
        self.node("Pad", [x, pads, val], [self.produce(n.outputs[0], "nchw", 4)], n.name, mode="constant")

    def op_concat(self, n):
        ranks = {self.rank[t] for t in n.inputs}
        r = max(ranks)
        axis = int(n.attrs.get("axis", -1)) % r
        if ranks == {4}:
            form, axis = "nchw", _NHWC_TO_NCHW_AXIS[axis]
        else:
            form = "plain"
        xs = [self.get(t, form) for t in n.inputs]
        self.node("Concat", xs, [self.produce(n.outputs[0], form, r)], n.name, axis=axis)

    def op_flatten(self, n):
        # Our flatten is in NHWC physical order: the input goes back to NHWC first.
        x = self.get(n.inputs[0], "plain")
        self.node("Flatten", [x], [self.produce(n.outputs[0], "plain", 2)], n.name, axis=1)

    def op_reshape(self, n):
        x = self.get(n.inputs[0], "plain")
        shape = [int(v) for v in n.attrs["shape"]]
        s = self.shared_const("shape", np.array([0] + shape, np.int64), np.int64)
        self.node("Reshape", [x, s], [self.produce(n.outputs[0], "plain", len(shape) + 1)], n.name)

    def op_transpose(self, n):
        x = self.get(n.inputs[0], "plain")
        perm = [int(v) for v in n.attrs["perm"]]
        self.node("Transpose", [x], [self.produce(n.outputs[0], "plain", len(perm))], n.name, perm=perm)

    # --- the tensor ops: slice, layer_norm, gelu, erf, sqrt, pow, reciprocal, neg, sub, div, reductions -----------
    def shape_of(self, t):
        """Our tensor's full-rank shape (batch first, as None) from the graph's shape inference."""
        if self._shapes is None:
            from .ops.shapes import infer_shapes

            self._shapes = infer_shapes(self.g)
        return (None,) + tuple(int(v) for v in self._shapes[t])

    def axes_form(self, t, axes, keep_order=True):
        """(form, ONNX name, ONNX axes) for an op over the full-rank NHWC `axes` of t: the NCHW form when there is
        one (no transpose inside conv stacks; axes mapped, in the order given), else the plain form.
        keep_order=False (a reduction that drops axes): the NCHW form only when the remaining axes keep their NHWC
        order."""
        r = self.rank[t]
        if r == 4 and "nchw" in self.forms[t]:
            order = [0, 3, 1, 2]
            if keep_order or [a for a in order if a not in axes] == [a for a in range(4) if a not in axes]:
                return "nchw", self.forms[t]["nchw"], [_NHWC_TO_NCHW_AXIS[a] for a in axes]
        return "plain", self.get(t, "plain"), list(axes)

    def int64s(self, key, values):
        v = np.array([min(max(int(a), -2 ** 63), 2 ** 63 - 1) for a in values], dtype=np.int64)
        return self.shared_const(key, v, np.int64)

    def scalar(self, key, v):
        return self.shared_const(key, np.float32(v), np.float32)

    def op_slice(self, n):
        from .ops.ref_tensor import slice_plan

        t = n.inputs[0]
        shape = self.shape_of(t)
        # Python's slice semantics (ref_tensor.slice_plan) made explicit, so that ONNX's clamping rules (which differ
        # for out-of-range starts with negative steps) cannot give other elements.
        plan = slice_plan(n, (1,) + shape[1:])
        axes = sorted({_norm_axis(a, len(shape)) for a in n.attrs.get("axes", [])})
        form, x, onnx_axes = self.axes_form(t, axes)
        starts, ends, steps = [], [], []
        for a in axes:
            start, step, cnt = plan[a]
            if cnt == 0:
                start, stop, step = 0, 0, 1
            else:
                stop = start + step * cnt
                if stop < 0:
                    stop = -(shape[a] + 1)  # before index 0 (ONNX adds the size, then clamps to -1)
            starts.append(start)
            ends.append(stop)
            steps.append(step)
        out = self.produce(n.outputs[0], form, len(shape))
        if not axes:
            self.node("Identity", [x], [out], n.name)
            return
        self.node("Slice", [x, self.int64s("starts", starts), self.int64s("ends", ends),
                            self.int64s("axes", onnx_axes), self.int64s("steps", steps)], [out], n.name)

    def _reduce(self, onnx_op, x, axes, out, name, keepdims):
        """ReduceMean / ReduceSum over `axes`: an attribute until the opset that made it an input (ReduceSum 13,
        ReduceMean 18)."""
        as_input = self.opset >= (13 if onnx_op == "ReduceSum" else 18)
        if as_input:
            self.node(onnx_op, [x, self.int64s("axes", axes)], [out], name, keepdims=int(keepdims))
        else:
            self.node(onnx_op, [x], [out], name, axes=[int(a) for a in axes], keepdims=int(keepdims))

    def _reduce_op(self, n, onnx_op):
        from .ops.ref_tensor import reduce_axes, reduce_keepdims

        t = n.inputs[0]
        r = self.rank[t]
        axes = list(reduce_axes(n, r))
        keep = reduce_keepdims(n)
        form, x, onnx_axes = self.axes_form(t, axes, keep_order=keep)
        out = self.produce(n.outputs[0], form, r if keep else r - len(axes))
        self._reduce(onnx_op, x, onnx_axes, out, n.name, keep)

    def op_reduce_mean(self, n):
        self._reduce_op(n, "ReduceMean")

    def op_reduce_sum(self, n):
        self._reduce_op(n, "ReduceSum")

    def op_layer_norm(self, n):
        """ONNX LayerNormalization from opset 17 where the tensor's form has the normalised axes last; otherwise
        (opset 13..16, or the channel axis of an NCHW tensor) written out as torch.onnx writes it:
        ReduceMean, Sub, Mul, ReduceMean, Add eps, Sqrt, Div, Mul gamma, Add beta (tcl's importer fuses it back)."""
        from .ops.ref_tensor import ln_axis, ln_eps

        t = n.inputs[0]
        shape = self.shape_of(t)
        r = len(shape)
        ax = ln_axis(n, r)
        eps = ln_eps(n)
        axes = list(range(ax, r))
        norm = tuple(shape[ax:])

        def full(key):  # gamma / beta as a rank-r array (leading 1s) in NHWC order, or None
            if key not in n.params:
                return None
            return np.asarray(n.params[key], np.float32).reshape((1,) * ax + norm)

        gamma, beta = full("gamma"), full("beta")
        forms = self.forms[t]
        native = None
        if self.opset >= 17:
            if "plain" in forms or r != 4:
                native = "plain"
            elif ax == 1:  # (H, W, C) is (C, H, W): the trailing axes of the NCHW form too
                native = "nchw"
        if native is not None:
            x = self.get(t, native)
            a = ax if native == "plain" else 1

            def const(key, v, default):
                v = default if v is None else v
                if native == "nchw":
                    v = v.transpose(0, 3, 1, 2)
                return self.const(f"{n.name}.{key}", np.ascontiguousarray(v.reshape(v.shape[a:])), np.float32)

            ins = [x, const("gamma", gamma, np.ones((1,) * ax + norm, np.float32))]
            if beta is not None:
                ins.append(const("beta", beta, None))
            self.node("LayerNormalization", ins, [self.produce(n.outputs[0], native, r)], n.name, axis=a,
                      epsilon=eps)
            return
        form, x, onnx_axes = self.axes_form(t, axes)

        def const(key, v):
            if form == "nchw":
                v = v.transpose(0, 3, 1, 2)
            return self.const(f"{n.name}.{key}", np.ascontiguousarray(v.reshape(v.shape[1:])), np.float32)

        out = self.produce(n.outputs[0], form, r)
        v = lambda s: self.value(f"{n.name}/{s}")  # noqa: E731
        mean, cen, sq, var, ve, std = v("mean"), v("centred"), v("square"), v("var"), v("var_eps"), v("std")
        self._reduce("ReduceMean", x, onnx_axes, mean, f"{n.name}/ReduceMean", True)
        self.node("Sub", [x, mean], [cen], f"{n.name}/Sub")
        self.node("Mul", [cen, cen], [sq], f"{n.name}/Mul_square")
        self._reduce("ReduceMean", sq, onnx_axes, var, f"{n.name}/ReduceMean_1", True)
        self.node("Add", [var, self.scalar(f"{n.name}.epsilon", eps)], [ve], f"{n.name}/Add_eps")
        self.node("Sqrt", [ve], [std], f"{n.name}/Sqrt")
        steps = [("Mul", "gamma", gamma), ("Add", "beta", beta)]
        steps = [s for s in steps if s[2] is not None]
        dst = out if not steps else v("normalised")
        self.node("Div", [cen, std], [dst], n.name if not steps else f"{n.name}/Div")
        for i, (op, key, arr) in enumerate(steps):
            src, dst = dst, (out if i == len(steps) - 1 else v(key))
            self.node(op, [src, const(key, arr)], [dst], n.name if dst == out else f"{n.name}/{op}_{key}")

    def op_gelu(self, n):
        from .ops.ref_tensor import GELU_C, GELU_K, gelu_tanh

        tanh = gelu_tanh(n)
        if self.opset >= 20:
            self._unary(n, "Gelu", approximate="tanh" if tanh else "none")
            return
        form, x = self.any_form(n.inputs[0])
        r = self.rank[n.inputs[0]]
        v = lambda s: self.value(f"{n.name}/{s}")  # noqa: E731
        one = self.scalar("one", 1.0)
        if tanh:
            # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as torch.onnx writes gelu(approximate='tanh')
            xx, x3, kx3, s, u, phi = v("square"), v("cube"), v("kx3"), v("inner"), v("scaled"), v("tanh")
            self.node("Mul", [x, x], [xx], f"{n.name}/Mul_square")
            self.node("Mul", [xx, x], [x3], f"{n.name}/Mul_cube")
            self.node("Mul", [x3, self.scalar("gelu_k", GELU_K)], [kx3], f"{n.name}/Mul_k")
            self.node("Add", [x, kx3], [s], f"{n.name}/Add_inner")
            self.node("Mul", [s, self.scalar("gelu_c", GELU_C)], [u], f"{n.name}/Mul_c")
            self.node("Tanh", [u], [phi], f"{n.name}/Tanh")
        else:
            # 0.5 x (1 + erf(x / sqrt 2)), as torch.onnx writes gelu()
            q, phi = v("scaled"), v("erf")
            self.node("Div", [x, self.scalar("sqrt2", np.sqrt(2.0))], [q], f"{n.name}/Div")
            self.node("Erf", [q], [phi], f"{n.name}/Erf")
        a, xa = v("one_plus"), v("x_one_plus")
        self.node("Add", [phi, one], [a], f"{n.name}/Add")
        self.node("Mul", [x, a], [xa], f"{n.name}/Mul")
        self.node("Mul", [xa, self.scalar("half", 0.5)], [self.produce(n.outputs[0], form, r)], n.name)

    def op_erf(self, n):
        self._unary(n, "Erf")

    def op_sqrt(self, n):
        self._unary(n, "Sqrt")

    def op_reciprocal(self, n):
        self._unary(n, "Reciprocal")

    def op_neg(self, n):
        self._unary(n, "Neg")

    def op_pow(self, n):
        from .ops.ref_tensor import pow_exponent

        e = pow_exponent(n)
        self._unary(n, "Pow", (self.scalar(f"exponent_{e:g}", e),))

    def _two(self, n, binop):
        if len(n.inputs) != 2:
            raise ModelError(f"Layer '{n.name}': {n.op} takes exactly two inputs, got {len(n.inputs)}.",
                             "The graph is damaged; re-import the model.")
        self._nary(n, binop)

    def op_sub(self, n):
        self._two(n, "Sub")

    def op_div(self, n):
        self._two(n, "Div")

    def op_lrn(self, n):
        if self.rank[n.inputs[0]] != 4:
            raise ModelError(f"Layer '{n.name}': LRN of a {self.rank[n.inputs[0]]}-D tensor has no ONNX form.",
                             "Export with --format npz instead.")
        x = self.get(n.inputs[0], "nchw")
        a = n.attrs
        self.node("LRN", [x], [self.produce(n.outputs[0], "nchw", 4)], n.name, size=int(a.get("size", 5)),
                  alpha=float(a.get("alpha", 1e-4)), beta=float(a.get("beta", 0.75)), bias=float(a.get("bias", 1.0)))


def build_onnx(graph, *, opset=13, input_layout="NHWC", int8=None):
    """The onnx.ModelProto for `graph` (see export_onnx)."""
    import onnx
    from onnx import TensorProto, helper

    if input_layout not in ("NHWC", "NCHW"):
        raise TclError(f"Unknown input layout '{input_layout}'.", "Use NHWC (the default) or NCHW.")
    top = onnx.defs.onnx_opset_version()
    if not _MIN_OPSET <= int(opset) <= top:
        raise TclError(f"ONNX opset {opset} is not supported: tcl writes opsets {_MIN_OPSET} to {top}.",
                       f"Pass an opset between {_MIN_OPSET} and {top} (13 is the most widely supported).")
    opset = int(opset)
    nbytes = sum(v.nbytes for v in graph.params().values())
    if nbytes > 1_900_000_000:
        # protobuf's 2 GiB message limit; tcl does not write ONNX external-data files.
        raise TclError(f"The model's {nbytes / 1e9:.1f} GB of weights exceed what one ONNX file can hold (2 GB).",
                       "Export with --format npz or h5, or quantize to int8 first.")
    w = _OnnxWriter(graph, opset, int8, input_layout)
    for n in graph.nodes:
        w.emit(n)
    outputs = []
    for t in graph.outputs:
        outputs.append(w.get(t, "plain"))
    if graph.meta.get("export_softmax"):
        probs = w.value("probabilities")
        w.node("Softmax", [outputs[0]], [probs], "probabilities", axis=-1)
        outputs.append(probs)

    inputs = []
    for t, shape in graph.inputs.items():
        dims = ["N"] + [d if d is not None else f"{t}_d{i}" for i, d in enumerate(shape, 1)]
        if len(dims) == 4 and input_layout == "NCHW":
            dims = [dims[0], dims[3], dims[1], dims[2]]
        inputs.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, dims))
    out_vis = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    og = helper.make_graph(w.nodes, str(graph.name or "model"), inputs, out_vis, initializer=w.inits)
    model = helper.make_model(og, opset_imports=[helper.make_opsetid("", opset)], producer_name="transfercl")
    try:
        model.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    except Exception:  # older onnx without the helper: keep its default
        pass
    props = {"input_layout": input_layout}
    for k, v in _meta_for_export(graph).items():
        props[k] = json.dumps(_jsonable(v))
    if int8:
        static = any(n.op == "fake_quant" for n in graph.nodes)
        props["quantization"] = ("static int8 (QDQ): int8 per-output-channel weights, uint8 activations with a "
                                 "zero point" if static else
                                 "int8 symmetric per-output-channel weights (DequantizeLinear)")
    helper.set_model_props(model, props)
    _fill_output_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _fill_output_shapes(model):
    """Output shapes from ONNX shape inference (tools display them; the batch stays symbolic)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        known = {vi.name: vi for vi in inferred.graph.value_info}
        known.update({vi.name: vi for vi in inferred.graph.output})
        for vi in model.graph.output:
            k = known.get(vi.name)
            if k is not None and k.type.tensor_type.HasField("shape"):
                vi.type.CopyFrom(k.type)
    except Exception:  # shape inference is a nicety; the checker is the gate
        pass


def _source_onnx_prefix(graph):
    """When `graph` was imported from an ONNX file and fine-tuned, the original nodes that compute the frozen,
    untouched part: (original model, kept nodes, kept initializers, boundary tensor, suffix graph), else None.

    Which layers changed comes from graph.meta["trainable"] and ["new_layers"] (written by `tcl finetune`)."""
    src = graph.meta.get("source")
    if not src or not str(src).lower().endswith(".onnx") or not os.path.exists(src):
        return None
    if "trainable" not in graph.meta and "new_layers" not in graph.meta:
        return None
    import onnx

    from .plan import split_prefix

    changed = set(graph.meta.get("trainable") or []) | set(graph.meta.get("new_layers") or [])
    _, suffix, t, _reason = split_prefix(graph, changed)
    if t is None:
        return None
    model = onnx.load(src)
    producer = {o: n for n in model.graph.node for o in n.output}
    if t not in producer:
        return None
    need, stack = set(), [t]
    while stack:
        v = stack.pop()
        n = producer.get(v)
        if n is None or id(n) in need:
            continue
        need.add(id(n))
        stack.extend(i for i in n.input if i)
    kept = [n for n in model.graph.node if id(n) in need]
    used = {i for n in kept for i in n.input}
    inits = [i for i in model.graph.initializer if i.name in used]
    return model, kept, inits, t, suffix


def _source_perm(model, t, graph):
    """The permutation with tcl's tensor t == the source's ONNX tensor t .transpose(perm), as the ONNX importer
    lays it out; None when the importer does not hold t under that name (then the whole graph is written)."""
    import warnings

    try:
        from .importers.onnx_import import OnnxImporter

        imp = OnnxImporter(model, graph.meta.get("input_size"))
        with warnings.catch_warnings():  # its notes were shown when the model was loaded
            warnings.simplefilter("ignore")
            imp.run()
        tt = imp.tensors.get(t)
        if tt is None or tt.name != t:
            return None
        return tuple(int(p) for p in tt.perm)
    except Exception:  # the source no longer imports as it did: write everything from the IR
        return None


def build_onnx_keeping_source(graph, opset=13):
    """Like build_onnx, but the frozen part that fine-tuning did not touch is copied node for node from the original
    ONNX file (names, ops, initializers and input as they were); only the trainable and new layers are written
    from the IR. Returns None when that is not possible (the caller then writes the whole graph from the IR)."""
    found = _source_onnx_prefix(graph)
    if found is None:
        return None
    import onnx
    from onnx import helper

    model, kept, inits, t, suffix = found
    opset = max(int(opset), max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13))
    rank = len(suffix.inputs[t]) + 1
    # The boundary tensor is in the source's layout, which the importer chose per tensor: NCHW for the image tensors
    # ONNX convolutions use, but e.g. channels-last inside a ConvNeXt block (after its Transpose to NHWC).
    perm = _source_perm(model, t, graph)
    if perm is None or len(perm) != rank:
        return None
    w = _OnnxWriter(suffix, opset, None, "NHWC")
    w.rank[t] = rank
    # Only what the copied part uses is taken: the source's own output names (which the importer gave tcl's outputs)
    # stay free for the outputs written here.
    w.value_names |= {v for n in kept for v in list(n.input) + list(n.output)}
    w.value_names |= {i.name for i in inits} | {i.name for i in model.graph.input}
    w.node_names |= {n.name for n in kept}
    if rank == 4 and perm == (0, 2, 3, 1):
        w.forms[t], w.reserved[t] = {"nchw": t}, "nchw"
    elif perm == tuple(range(rank)):
        w.forms[t], w.reserved[t] = {"plain": t}, "plain"
    else:  # physical = source.transpose(perm)
        plain = w.value(f"{t}__plain")
        w.node("Transpose", [t], [plain], f"{t}/to_plain", perm=list(perm))
        w.forms[t] = {"plain": plain}
    for n in suffix.nodes:
        w.emit(n)
    outputs = [w.get(o, "plain") for o in suffix.outputs]
    used = {i for n in kept for i in n.input}
    inputs = [vi for vi in model.graph.input if vi.name in used and vi.name not in {i.name for i in inits}]
    out_vis = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs]
    og = helper.make_graph(list(kept) + w.nodes, str(graph.name or "model"), inputs, out_vis,
                           initializer=list(inits) + w.inits)
    out = helper.make_model(og, opset_imports=[helper.make_opsetid("", opset)], producer_name="transfercl")
    try:
        out.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    except Exception:
        pass
    props = {"input_layout": "source", "kept_from_source": json.dumps(
        {"file": os.path.basename(str(graph.meta.get("source"))), "nodes": len(kept), "boundary": t})}
    for k, v in _meta_for_export(graph).items():
        props[k] = json.dumps(_jsonable(v))
    helper.set_model_props(out, props)
    _fill_output_shapes(out)
    onnx.checker.check_model(out, full_check=True)
    return out


def export_onnx(graph, path, *, opset=13, input_layout="NHWC", int8=None, force=False, keep_source=True):
    """Write `graph` as a standard ONNX model.

    Input: the graph input as float32 [N, H, W, 3] (NHWC, our layout; input_layout="NCHW" gives [N, 3, H, W]
    instead), then one Transpose to NCHW and standard ops: Conv (HWIO weights -> OIHW, group, strides, dilations,
    pads [top, left, bottom, right]), BatchNormalization, Relu, Clip, ..., Gemm for dense. Fused conv/dense
    activations become separate Relu/Clip nodes ("LAYER/relu6"); our layer names are the ONNX node names.
    Flatten/Reshape/Transpose and the outputs get our NHWC physical order back (a Transpose first).
    Outputs: the graph outputs, plus a Softmax output "probabilities" when graph.meta["export_softmax"] is true.
    metadata_props: "classes" and "preprocessing" (JSON) from graph.meta, and "input_layout".
    int8: the dict from quantize_int8 -> those weights are stored as int8 initializers with per-channel scales and
    DequantizeLinear nodes (opset 13 per-axis), so the file is ~4x smaller and runs in onnxruntime as-is;
    without it, weights are float32 (a quantize_int8 graph then stores its dequantized float weights).
    Opsets 13 and up (HardSwish is a native op from 14, decomposed below). Checked with onnx.checker.
    Tensor ops: slice -> Slice with constant starts/ends/axes/steps (Python's slice semantics made explicit);
    reduce_mean/reduce_sum -> ReduceMean (axes an attribute below opset 18, an input from 18) / ReduceSum (axes
    input); layer_norm -> LayerNormalization from opset 17 where the normalised axes are the tensor's last ones in the
    layout it is held in, else written out as ReduceMean, Sub, Mul, ReduceMean, Add eps, Sqrt, Div, Mul gamma, Add
    beta (torch.onnx's spelling, which tcl's importer fuses back); gelu -> Gelu from opset 20, else
    x * (1 + erf(x / sqrt 2)) * 0.5 or the tanh form written out; erf, sqrt, pow (a constant exponent), reciprocal,
    neg, sub, div -> Erf, Sqrt, Pow, Reciprocal, Neg, Sub, Div. Ops with axes (slice, reductions, layer_norm, concat,
    softmax) work on a conv stack's NCHW tensor with their NHWC axes mapped, so they add no Transpose.
    keep_source: when the graph was imported from an ONNX file and fine-tuned (graph.meta "source", "trainable",
    "new_layers"), the untouched frozen part is copied from the original file node for node, with its original
    input (see build_onnx_keeping_source); not with int8 or input_layout="NCHW". The written part reads the boundary
    tensor in the layout the importer holds it in (NCHW image tensors, channels-last ones inside e.g. a ConvNeXt
    block); where that cannot be told, the whole graph is written from the IR.
    """
    import onnx

    path = os.fspath(path)
    _refuse_overwrite([path], force)
    model = None
    if keep_source and int8 is None and input_layout == "NHWC":
        model = build_onnx_keeping_source(graph, opset=opset)
    if model is None:
        model = build_onnx(graph, opset=opset, input_layout=input_layout, int8=int8)
    with atomic_path(path) as tmp:
        onnx.save_model(model, tmp)
    return model
