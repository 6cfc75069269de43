"""Keras HDF5 import: full-model .h5 files (the `model_config` JSON attribute plus the `model_weights` group) as
written by Keras 2 / tf.keras and Keras 3, weights-only .h5 files plus the model's JSON config (legacy layout, or
the Keras 3 `.weights.h5` layout), and Keras 3 `.keras` zips.

Nested models (a Functional base inside a Functional or Sequential classifier) are flattened into one graph; inner
layers keep their own names (prefixed with the nested model's name only when two layers would share a name).
Each Keras layer becomes one node named like the layer, with Node.source = the Keras class name, except:
  - Conv2D/DepthwiseConv2D/SeparableConv2D/Dense with an `activation`: the activation is a separate node named
    'LAYER/ACTIVATION' (source 'CLASS/activation');
  - SeparableConv2D: 'LAYER/depthwise' (grouped conv2d) then 'LAYER/pointwise' (1x1 conv2d with the bias).
"""
import io
import json
import re
import zipfile

import numpy as np

from ..errors import ModelError
from ..ops.shapes import same_pads
from . import GraphBuilder, need_h5py, unsupported_error

MODEL_CLASSES = {"Functional", "Model", "Sequential"}
SUPPORTED = {
    "InputLayer", "Conv2D", "Convolution2D", "DepthwiseConv2D", "SeparableConv2D", "SeparableConvolution2D",
    "BatchNormalization", "ReLU", "LeakyReLU", "Softmax", "Activation", "ZeroPadding2D", "MaxPooling2D",
    "MaxPool2D", "AveragePooling2D", "AvgPool2D", "GlobalAveragePooling2D", "GlobalAvgPool2D", "Dropout", "Flatten",
    "Reshape", "Dense", "Add", "Concatenate", "Multiply", "Rescaling", "Normalization",
}
ACTIVATIONS = {"linear", "relu", "relu6", "sigmoid", "tanh", "softmax", "swish", "silu", "hard_sigmoid",
               "hard_swish", "hard_silu", "leaky_relu"}


# --- configuration helpers -----------------------------------------------------------------------------------------
def _act_name(a):
    """The activation's name from a Keras config value (a string, or a serialized function/layer dict)."""
    if a is None:
        return "linear"
    if isinstance(a, str):
        return a.split(">")[-1].lower()
    if isinstance(a, dict):
        c = a.get("config")
        if isinstance(c, str):
            return c.lower()
        if isinstance(c, dict) and isinstance(c.get("name"), str) and a.get("class_name") in ("function", None):
            return c["name"].lower()
        return str(a.get("class_name", "?")).lower()
    return str(a).lower()


def _pair(v):
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[1] if len(v) > 1 else v[0]))
    return (int(v), int(v))


def _layer_class(layer):
    return layer.get("class_name", "?")


def _model_layers(cfg):
    c = cfg.get("config", cfg)
    if isinstance(c, list):  # very old Sequential configs are a bare list of layers
        return c
    return c.get("layers", [])


def _model_kind(cfg):
    cls = cfg.get("class_name")
    if cls in MODEL_CLASSES:
        return "Sequential" if cls == "Sequential" else "Functional"
    c = cfg.get("config", cfg)
    return "Functional" if isinstance(c, dict) and "input_layers" in c else "Sequential"


def _layer_problem(layer, keras_major):
    """Why a (non-model) layer cannot be imported, or None."""
    cls = _layer_class(layer)
    c = layer.get("config", {})
    if cls not in SUPPORTED:
        return ""
    if c.get("data_format", "channels_last") != "channels_last":
        return "data_format channels_first is not supported (tcl works channels-last)"
    if cls in ("Conv2D", "Convolution2D", "DepthwiseConv2D", "SeparableConv2D", "SeparableConvolution2D", "Dense",
               "Activation"):
        a = _act_name(c.get("activation"))
        if a not in ACTIVATIONS:
            return f"activation '{a}' is not supported"
        if c.get("padding", "valid") not in ("valid", "same"):
            return f"padding '{c.get('padding')}' is not supported"
    if cls in ("MaxPooling2D", "MaxPool2D", "AveragePooling2D", "AvgPool2D") and c.get("padding", "valid") not in (
            "valid", "same"):
        return f"padding '{c.get('padding')}' is not supported"
    if cls == "ReLU":
        mv, ns, th = c.get("max_value"), float(c.get("negative_slope") or 0.0), float(c.get("threshold") or 0.0)
        if th != 0.0:
            return "ReLU with a threshold is not supported"
        if ns != 0.0 and mv is not None:
            return "ReLU with both negative_slope and max_value is not supported"
    if cls == "BatchNormalization":
        ax = c.get("axis", -1)
        ax = ax[0] if isinstance(ax, list) and len(ax) == 1 else ax
        if ax not in (-1, 3):
            return f"BatchNormalization over axis {ax} is not supported (only the channels axis -1)"
    if cls == "Normalization":
        ax = c.get("axis", -1)
        ax = ax[0] if isinstance(ax, list) and len(ax) == 1 else ax
        if ax not in (-1, 3):
            return f"Normalization over axis {ax} is not supported (only the channels axis -1)"
    return None


def _refs_from_args(obj, out):
    """Keras 3 call args: collect keras_history refs of every __keras_tensor__ in order."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            h = obj["config"]["keras_history"]
            out.append((h[0], int(h[1]), int(h[2])))
        else:
            for v in obj.values():
                _refs_from_args(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _refs_from_args(v, out)
    return out


def _call_refs(call):
    """Input tensor refs (layer, node_index, tensor_index) of one call from a layer's `inbound_nodes`."""
    if isinstance(call, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        return _refs_from_args(call.get("args", []), [])
    refs = []  # Keras 2: [[name, node_index, tensor_index, kwargs], ...]
    for r in call:
        if isinstance(r, (list, tuple)) and len(r) >= 3 and isinstance(r[0], str):
            refs.append((r[0], int(r[1]), int(r[2])))
    return refs


def _norm_io_refs(v):
    if not v:
        return []
    if isinstance(v[0], str):  # a single ref ["name", 0, 0]
        v = [v]
    return [(r[0], int(r[1]), int(r[2])) for r in v]


# --- weights --------------------------------------------------------------------------------------------------------
class WeightStore:
    """Weights of a Keras HDF5 file in the legacy layout (per-layer groups with `weight_names`) or the Keras 3
    `.weights.h5` layout (layers/NAME/vars/0..)."""

    def __init__(self, root):
        self.v3 = None
        self.groups = {}  # top-level group name -> [arrays] in weight_names order
        self.by_name = {}  # (layer name, variable) -> [(top group, array)]
        if root is None:
            return
        if "model_weights" in root:
            g = root["model_weights"]
        else:
            g = root
        for key in ("layers", "_layer_checkpoint_dependencies"):
            if key in g and "layer_names" not in g.attrs:
                self.v3 = g
                self.v3_key = key
                return
        for top in g:
            grp = g[top]
            if not hasattr(grp, "attrs") or "weight_names" not in grp.attrs:
                continue
            names = [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in grp.attrs["weight_names"]]
            arrays = []
            for n in names:
                if n not in grp:
                    raise ModelError(f"The weights of layer '{top}' are incomplete (no dataset '{n}').",
                                     "The .h5 file may be damaged; save the model again.")
                a = np.asarray(grp[n][()], dtype=np.float32)
                arrays.append(a)
                comps = [c for c in re.sub(r":\d+$", "", n).split("/") if c]
                if len(comps) >= 2:
                    self.by_name.setdefault((comps[-2], comps[-1]), []).append((top, a))
            self.groups[top] = arrays

    def empty(self):
        return self.v3 is None and not self.groups

    def get(self, scope, lname, spec):
        """Arrays for the variables in `spec` (list of (names, required)) of layer `lname` inside nested `scope`."""
        if self.v3 is not None:
            arrays = self._v3_vars(scope, lname)
        elif not scope and lname in self.groups:
            arrays = self.groups[lname]
        else:
            arrays = None
        if arrays is not None:
            if len(arrays) < sum(1 for _n, req in spec if req):
                raise ModelError(f"Layer '{lname}' has {len(arrays)} weight arrays in the file, expected "
                                 f"{len(spec)}.", "The config and the weights do not belong together.")
            return {names[0]: a for (names, _req), a in zip(spec, arrays)}
        # Nested models (legacy layout): match by the weight's name 'LAYER/VARIABLE'.
        out = {}
        for names, req in spec:
            hits = []
            for v in names:
                hits = self.by_name.get((lname, v), [])
                if scope:
                    hits = [h for h in hits if h[0] == scope[0]] or hits
                if hits:
                    break
            if not hits:
                if req:
                    raise ModelError(f"No weights named '{lname}/{names[0]}' in the file.",
                                     "The config and the weights do not belong together.")
                continue
            out[names[0]] = hits[0][1]
        return out

    def _v3_vars(self, scope, lname):
        g = self.v3
        try:
            for s in list(scope) + [lname]:
                g = g[self.v3_key][s]
            vs = g["vars"]
        except KeyError:
            return []
        return [np.asarray(vs[str(i)][()], dtype=np.float32) for i in range(len(vs))]


def _weight_spec(cls, c):
    """[(variable names, required)] in Keras' creation order."""
    bias = [(("bias",), True)] if c.get("use_bias", True) else []
    if cls in ("Conv2D", "Convolution2D", "Dense"):
        return [(("kernel",), True)] + bias
    if cls == "DepthwiseConv2D":
        return [(("depthwise_kernel", "kernel"), True)] + bias
    if cls in ("SeparableConv2D", "SeparableConvolution2D"):
        return [(("depthwise_kernel",), True), (("pointwise_kernel",), True)] + bias
    if cls == "BatchNormalization":
        spec = []
        if c.get("scale", True):
            spec.append((("gamma",), True))
        if c.get("center", True):
            spec.append((("beta",), True))
        return spec + [(("moving_mean",), True), (("moving_variance",), True)]
    if cls == "Normalization" and c.get("mean") is None:
        return [(("mean",), True), (("variance",), True), (("count",), False)]
    return []


# --- conversion -----------------------------------------------------------------------------------------------------
class _Ctx:
    def __init__(self, b, weights, keras_major, input_size):
        self.b = b
        self.w = weights
        self.major = keras_major
        self.input_size = input_size
        self.preproc_nodes = []

    def node_name(self, scope, lname):
        if lname in self.b._names and scope:
            return "/".join(list(scope) + [lname])
        return lname


def _act_node(ctx, x, act, name, source):
    b = ctx.b
    if act in ("linear", None):
        return x
    if act in ("relu", "relu6", "sigmoid", "tanh", "hard_swish"):
        return b.add(act, name, [x], source=source)
    if act in ("swish", "silu"):
        return b.add("swish", name, [x], source=source)
    if act == "hard_silu":
        return b.add("hard_swish", name, [x], source=source)
    if act == "softmax":
        return b.add("softmax", name, [x], {"axis": -1}, source=source)
    if act == "hard_sigmoid":
        # Keras 3: relu6(x + 3) / 6; Keras 2: clip(0.2 x + 0.5, 0, 1).
        alpha = 1.0 / 6.0 if ctx.major >= 3 else 0.2
        return b.add("hard_sigmoid", name, [x], {"alpha": alpha, "beta": 0.5}, source=source)
    if act == "leaky_relu":
        return b.add("leaky_relu", name, [x], {"alpha": 0.2}, source=source)
    raise ModelError(f"Layer '{name}': activation '{act}' is not supported.", "Replace it before exporting.")


def _spatial_pads(ctx, x, padding, kernel, strides, dilations=(1, 1)):
    if padding == "valid":
        return (0, 0, 0, 0)
    h, w = ctx.b.shapes[x][:2]
    pt, pb = same_pads(h, kernel[0], strides[0], dilations[0])
    pl, pr = same_pads(w, kernel[1], strides[1], dilations[1])
    return (pt, pl, pb, pr)


def _convert_layer(ctx, layer, ins, scope):
    """Add the nodes of one Keras layer; returns its output tensor(s)."""
    b = ctx.b
    cls = _layer_class(layer)
    c = layer.get("config", {})
    lname = c.get("name") or layer.get("name")
    name = ctx.node_name(scope, lname)
    x = ins[0] if ins else None
    if cls not in ("Add", "Multiply", "Concatenate") and len(ins) != 1:
        raise ModelError(f"Layer '{lname}' ({cls}) is called with {len(ins)} inputs, expected 1.",
                         "The model config may be damaged.")
    wts = {}
    spec = _weight_spec(cls, c)
    if spec:
        wts = ctx.w.get(scope, lname, spec)
    act = _act_name(c.get("activation"))
    if cls in ("Conv2D", "Convolution2D"):
        k = wts["kernel"]
        kernel, strides, dil = _pair(c.get("kernel_size", k.shape[:2])), _pair(c.get("strides", 1)), _pair(
            c.get("dilation_rate", 1))
        groups = int(c.get("groups", 1) or 1)
        pads = _spatial_pads(ctx, x, c.get("padding", "valid"), kernel, strides, dil)
        params = {"weight": k}
        if "bias" in wts:
            params["bias"] = wts["bias"]
        y = b.add("conv2d", name, [x], {"kernel": kernel, "strides": strides, "dilations": dil, "pads": pads,
                                        "groups": groups, "act": None}, params, source=cls)
        return [_act_node(ctx, y, act, f"{name}/{act}", f"{cls}/activation")]
    if cls == "DepthwiseConv2D":
        k = wts["depthwise_kernel"]
        kh, kw, cin, mult = k.shape
        kernel, strides, dil = _pair(c.get("kernel_size", (kh, kw))), _pair(c.get("strides", 1)), _pair(
            c.get("dilation_rate", 1))
        pads = _spatial_pads(ctx, x, c.get("padding", "valid"), kernel, strides, dil)
        # (kh, kw, cin, mult) -> (kh, kw, 1, cin*mult): output channel c*mult + m, as Keras orders them.
        params = {"weight": k.reshape(kh, kw, 1, cin * mult)}
        if "bias" in wts:
            params["bias"] = wts["bias"]
        y = b.add("conv2d", name, [x], {"kernel": kernel, "strides": strides, "dilations": dil, "pads": pads,
                                        "groups": int(cin), "act": None}, params, source=cls)
        return [_act_node(ctx, y, act, f"{name}/{act}", f"{cls}/activation")]
    if cls in ("SeparableConv2D", "SeparableConvolution2D"):
        dk, pk = wts["depthwise_kernel"], wts["pointwise_kernel"]
        kh, kw, cin, mult = dk.shape
        kernel, strides, dil = _pair(c.get("kernel_size", (kh, kw))), _pair(c.get("strides", 1)), _pair(
            c.get("dilation_rate", 1))
        pads = _spatial_pads(ctx, x, c.get("padding", "valid"), kernel, strides, dil)
        y = b.add("conv2d", f"{name}/depthwise", [x], {"kernel": kernel, "strides": strides, "dilations": dil,
                                                      "pads": pads, "groups": int(cin), "act": None},
                  {"weight": dk.reshape(kh, kw, 1, cin * mult)}, source=f"{cls}/depthwise")
        params = {"weight": pk}
        if "bias" in wts:
            params["bias"] = wts["bias"]
        y = b.add("conv2d", f"{name}/pointwise", [y], {"kernel": (1, 1), "strides": (1, 1), "dilations": (1, 1),
                                                      "pads": (0, 0, 0, 0), "groups": 1, "act": None}, params,
                  source=f"{cls}/pointwise")
        return [_act_node(ctx, y, act, f"{name}/{act}", f"{cls}/activation")]
    if cls == "Dense":
        if len(b.shapes[x]) != 1:
            raise ModelError(f"Layer '{lname}' (Dense) is applied to a tensor of shape {('N',) + b.shapes[x]}; "
                             "tcl supports Dense only on flat (N, features) inputs.",
                             "Add a Flatten or GlobalAveragePooling2D layer before it.")
        params = {"weight": wts["kernel"]}
        if "bias" in wts:
            params["bias"] = wts["bias"]
        y = b.add("dense", name, [x], {"act": None}, params, source=cls)
        return [_act_node(ctx, y, act, f"{name}/{act}", f"{cls}/activation")]
    if cls == "BatchNormalization":
        ch = wts["moving_mean"].shape[0]
        params = {"gamma": wts.get("gamma", np.ones(ch, np.float32)), "beta": wts.get("beta", np.zeros(ch, np.float32)),
                  "mean": wts["moving_mean"], "var": wts["moving_variance"]}
        return [b.add("batchnorm", name, [x], {"eps": float(c.get("epsilon", 1e-3)),
                                               "momentum": float(c.get("momentum", 0.99))}, params, source=cls)]
    if cls == "ReLU":
        mv = c.get("max_value")
        ns = float(c.get("negative_slope") or 0.0)
        if ns != 0.0:
            return [b.add("leaky_relu", name, [x], {"alpha": ns}, source=cls)]
        if mv is None:
            return [b.add("relu", name, [x], source=cls)]
        if float(mv) == 6.0:
            return [b.add("relu6", name, [x], source=cls)]
        return [b.add("clip", name, [x], {"min": 0.0, "max": float(mv)}, source=cls)]
    if cls == "LeakyReLU":
        alpha = c.get("negative_slope", c.get("alpha", 0.3 if ctx.major < 3 else 0.2))
        return [b.add("leaky_relu", name, [x], {"alpha": float(alpha)}, source=cls)]
    if cls == "Softmax":
        ax = c.get("axis", -1)
        ax = ax[0] if isinstance(ax, list) else ax
        return [b.add("softmax", name, [x], {"axis": int(ax)}, source=cls)]
    if cls == "Activation":
        if act == "linear":
            return [b.add("identity", name, [x], source=cls)]
        return [_act_node(ctx, x, act, name, cls)]
    if cls == "ZeroPadding2D":
        p = c.get("padding", 1)
        if isinstance(p, int):
            pads = (p, p, p, p)
        elif isinstance(p[0], (list, tuple)):
            pads = (int(p[0][0]), int(p[1][0]), int(p[0][1]), int(p[1][1]))
        else:
            pads = (int(p[0]), int(p[1]), int(p[0]), int(p[1]))
        return [b.add("pad", name, [x], {"pads": pads, "value": 0.0}, source=cls)]
    if cls in ("MaxPooling2D", "MaxPool2D", "AveragePooling2D", "AvgPool2D"):
        kernel = _pair(c.get("pool_size", 2))
        strides = _pair(c.get("strides") or kernel)
        pads = _spatial_pads(ctx, x, c.get("padding", "valid"), kernel, strides)
        if cls.startswith("Max"):
            return [b.add("maxpool", name, [x], {"kernel": kernel, "strides": strides, "pads": pads,
                                                 "ceil_mode": False}, source=cls)]
        # Keras/TF 'same' average pooling divides by the number of real (unpadded) pixels.
        return [b.add("avgpool", name, [x], {"kernel": kernel, "strides": strides, "pads": pads,
                                             "count_include_pad": False, "ceil_mode": False}, source=cls)]
    if cls in ("GlobalAveragePooling2D", "GlobalAvgPool2D"):
        return [b.add("global_avgpool", name, [x], {"keepdims": bool(c.get("keepdims", False))}, source=cls)]
    if cls == "Dropout":
        return [b.add("dropout", name, [x], {"rate": float(c.get("rate", 0.0)), "seed": c.get("seed")}, source=cls)]
    if cls == "Flatten":
        return [b.add("flatten", name, [x], source=cls)]
    if cls == "Reshape":
        return [b.add("reshape", name, [x], {"shape": tuple(int(v) for v in c["target_shape"])}, source=cls)]
    if cls in ("Add", "Multiply"):
        return [b.add("add" if cls == "Add" else "mul", name, list(ins), source=cls)]
    if cls == "Concatenate":
        ax = int(c.get("axis", -1))
        rank = len(b.shapes[x]) + 1
        return [b.add("concat", name, list(ins), {"axis": ax + rank if ax < 0 else ax}, source=cls)]
    if cls == "Rescaling":
        s, o = c.get("scale", 1.0), c.get("offset", 0.0)
        y = b.add("scale", name, [x], *_scale_params(s, o, b.shapes[x]), source=cls)
        ctx.preproc_nodes.append(b.nodes[-1])
        return [y]
    if cls == "Normalization":
        mean = c.get("mean") if c.get("mean") is not None else wts["mean"]
        var = c.get("variance") if c.get("variance") is not None else wts["variance"]
        mean = np.asarray(mean, np.float64).reshape(-1)
        std = np.maximum(np.sqrt(np.asarray(var, np.float64).reshape(-1)), 1e-7)
        if c.get("invert", False):
            s, o = std, mean
        else:
            s, o = 1.0 / std, -mean / std
        y = b.add("scale", name, [x], *_scale_params(s, o, b.shapes[x]), source=cls)
        ctx.preproc_nodes.append(b.nodes[-1])
        return [y]
    raise ModelError(f"Layer '{lname}' ({cls}) is not supported.", "Replace it before exporting.")


def _scale_params(s, o, shape):
    """(attrs, params) of a scale node: scalars as attrs, per-channel vectors as params (with identity attrs)."""
    s = np.asarray(s, np.float64).reshape(-1)
    o = np.asarray(o, np.float64).reshape(-1)
    if s.size == 1 and o.size == 1:
        return {"scale": float(s[0]), "offset": float(o[0])}, {}
    ch = shape[-1]
    if s.size not in (1, ch) or o.size not in (1, ch):
        raise ModelError(f"Per-channel scale/offset of length {max(s.size, o.size)} does not match {ch} channels.",
                         "Check the model's preprocessing layers.")
    return {"scale": 1.0, "offset": 0.0}, {"scale": np.broadcast_to(s, (ch,)).astype(np.float32),
                                           "offset": np.broadcast_to(o, (ch,)).astype(np.float32)}


def _input_shape_of(ctx, layer_cfg, fallback=None):
    c = layer_cfg.get("config", {})
    shp = c.get("batch_shape") or c.get("batch_input_shape") or fallback
    if shp is None and isinstance(layer_cfg.get("build_config"), dict):
        shp = layer_cfg["build_config"].get("input_shape")
    if shp is None:
        raise ModelError(f"The model config does not say the input shape (layer '{c.get('name')}').",
                         "Save the model after building it (call it on data or give Input(shape=...)).")
    shp = list(shp)[1:]
    if len(shp) == 3 and (shp[0] is None or shp[1] is None):
        if ctx.input_size is None:
            raise ModelError("The model accepts any image size, so tcl needs one.",
                             "Set `input.size` in the recipe (e.g. `size: 224`), pass `--input-size H W` on the "
                             "command line, or input_size=(H, W) in Python.")
        shp[0], shp[1] = ctx.input_size
    if any(v is None for v in shp):
        raise ModelError(f"The model's input shape {['N'] + shp} has unknown dimensions.",
                         "Re-save the model with a fixed input shape.")
    return tuple(int(v) for v in shp)


def _expand(ctx, cfg, feed, scope):
    """Add the nodes of a (possibly nested) model; feed = tensors for its inputs (None at the top level)."""
    kind = _model_kind(cfg)
    layers = _model_layers(cfg)
    b = ctx.b
    if kind == "Sequential":
        x = feed[0] if feed else None
        top_cfg = cfg.get("config", cfg) if isinstance(cfg.get("config", cfg), dict) else {}
        for layer in layers:
            cls = _layer_class(layer)
            if cls == "InputLayer":
                if x is None:
                    x = b.add_input(layer["config"]["name"], _input_shape_of(ctx, layer))
                continue
            if cls in MODEL_CLASSES:
                lname = layer.get("config", {}).get("name") or layer.get("name")
                x = _expand(ctx, layer, None if x is None else [x], scope + [lname])[0]
                continue
            if x is None:
                fb = top_cfg.get("build_input_shape")
                x = b.add_input("input", _input_shape_of(ctx, layer, fb))
            x = _convert_layer(ctx, layer, [x], scope)[0]
        if x is None:
            raise ModelError("The Sequential model has no layers.", "Check the model file.")
        return [x]
    c = cfg.get("config", cfg)
    tmap = {}
    for i, (lname, ni, ti) in enumerate(_norm_io_refs(c.get("input_layers"))):
        if feed is not None:
            tmap[(lname, ni, ti)] = feed[i]
        else:
            lay = next((l for l in layers if (l.get("config", {}).get("name") or l.get("name")) == lname), None)
            if lay is None:
                raise ModelError(f"The model config names an input layer '{lname}' it does not define.",
                                 "The model config may be damaged.")
            tmap[(lname, ni, ti)] = b.add_input(lname, _input_shape_of(ctx, lay))
    pending = [l for l in layers if _layer_class(l) != "InputLayer"]
    while pending:
        rest = []
        for layer in pending:
            lname = layer.get("name") or layer.get("config", {}).get("name")
            calls = layer.get("inbound_nodes") or []
            refs = [_call_refs(call) for call in calls]
            if any(r not in tmap for rr in refs for r in rr):
                rest.append(layer)
                continue
            if len(calls) > 1 and _weight_spec(_layer_class(layer), layer.get("config", {})):
                raise ModelError(f"Layer '{lname}' is shared (called {len(calls)} times); tcl does not support "
                                 "shared layers with weights.", "Use separate layers.")
            for k, rr in enumerate(refs):
                ins = [tmap[r] for r in rr]
                if _layer_class(layer) in MODEL_CLASSES:
                    outs = _expand(ctx, layer, ins, scope + [lname])
                else:
                    outs = _convert_layer(ctx, layer, ins, scope)
                for i, o in enumerate(outs):
                    tmap[(lname, k, i)] = o
        if len(rest) == len(pending):
            names = [l.get("name") or l.get("config", {}).get("name") for l in rest]
            raise ModelError(f"The model config has layers whose inputs are never computed: {names}.",
                             "The model config may be damaged.")
        pending = rest
    outs = []
    for r in _norm_io_refs(c.get("output_layers")):
        if r not in tmap:
            raise ModelError(f"The model's output {r[0]} is never computed.", "The model config may be damaged.")
        outs.append(tmap[r])
    return outs


def _collect_problems(cfg, keras_major, scope=(), out=None):
    out = [] if out is None else out
    for layer in _model_layers(cfg):
        cls = _layer_class(layer)
        lname = layer.get("config", {}).get("name") or layer.get("name")
        if cls in MODEL_CLASSES:
            _collect_problems(layer, keras_major, scope + (lname,), out)
            continue
        why = _layer_problem(layer, keras_major)
        if why is not None:
            out.append(("/".join(scope + (lname,)), cls, why))
    return out


def _read_json(path):
    try:
        with open(path, "r", encoding="utf8") as f:
            return json.load(f)
    except OSError as e:
        raise ModelError(f"Cannot read the Keras config '{path}' ({e.strerror}).", "Check the path.") from None
    except ValueError as e:
        raise ModelError(f"The Keras config '{path}' is not valid JSON ({e}).",
                         "Pass the file written by `model.to_json()`.") from None


def _attr_str(v):
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.decode("utf8")
    return str(v)


def load_keras(path, config=None, input_size=None, zipped=False, **_opts):
    h5py = need_h5py()
    keras_version = None
    if zipped:
        try:
            with zipfile.ZipFile(path) as zf:
                cfg = json.loads(zf.read("config.json"))
                try:
                    keras_version = json.loads(zf.read("metadata.json")).get("keras_version")
                except KeyError:
                    pass
                wbytes = zf.read("model.weights.h5")
        except (zipfile.BadZipFile, KeyError, ValueError) as e:
            raise ModelError(f"'{path}' is not a readable Keras .keras archive ({e}).",
                             "Save the model again, or as .h5 (`model.save('model.h5')`).") from None
        if config is not None:
            cfg = _read_json(config)
        f = h5py.File(io.BytesIO(wbytes), "r")
    else:
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise ModelError(f"'{path}' is not a readable HDF5 file ({e}).",
                             "The file may be damaged or truncated; download or save it again.") from None
    with f:
        if not zipped:
            if config is not None:
                cfg = _read_json(config)
            else:
                mc = _attr_str(f.attrs.get("model_config"))
                if mc is None:
                    raise ModelError(f"'{path}' holds only weights, no model config.",
                                     "Pass the model's JSON config too: load_model(weights, config='model.json') "
                                     "(CLI: --config), written by `open('model.json','w').write(model.to_json())`.")
                try:
                    cfg = json.loads(mc)
                except ValueError as e:
                    raise ModelError(f"The model config inside '{path}' is not valid JSON ({e}).",
                                     "The file may be damaged; save it again.") from None
            keras_version = (_attr_str(f.attrs.get("keras_version")) or _attr_str(cfg.get("keras_version"))
                             or (_attr_str(f["model_weights"].attrs.get("keras_version"))
                                 if "model_weights" in f else None))
        if not isinstance(cfg, dict):
            cfg = {"class_name": "Sequential", "config": {"layers": cfg}}
        if "class_name" not in cfg and "config" not in cfg and "layers" not in cfg:
            raise ModelError("The Keras config does not describe a model (no class_name/config/layers).",
                             "Pass the JSON written by `model.to_json()`.")
        try:
            major = int(str(keras_version or "3").split(".")[0])
        except ValueError:
            major = 3
        if _model_kind(cfg) == "Functional" and cfg.get("class_name") not in MODEL_CLASSES | {None}:
            raise ModelError(f"The Keras model class '{cfg.get('class_name')}' is a subclassed model without a "
                             "layer graph.", "Rebuild it as a Functional or Sequential model and save that.")
        problems = _collect_problems(cfg, major)
        if problems:
            raise unsupported_error(problems, "Keras")
        weights = WeightStore(f)
        if weights.empty() and any(_weight_spec(_layer_class(l), l.get("config", {}))
                                   for l in _model_layers(cfg)):
            raise ModelError(f"'{path}' contains no weights.", "Save the model with its weights.")
        ctx = _Ctx(GraphBuilder(), weights, major, input_size)
        outs = _expand(ctx, cfg, None, [])
    b = ctx.b
    name = (cfg.get("config") or {}).get("name", "model") if isinstance(cfg.get("config"), dict) else "model"
    meta = {"format": "keras_h5", "keras_version": keras_version, "input_layout": "NHWC"}
    first = next(iter(b.inputs.values()))
    if len(first) == 3:
        meta["input_size"] = (int(first[0]), int(first[1]))
    pre = _preprocess(b, ctx)
    if pre is not None:
        meta["preprocess"] = pre
    g = b.graph(outs, name=name, meta=meta)
    return g


def _preprocess(b, ctx):
    """Compose the Rescaling/Normalization layers right after the input into one y = x * scale + offset."""
    if len(b.inputs) != 1 or not ctx.preproc_nodes:
        return None
    t = next(iter(b.inputs))
    shape = b.inputs[t]
    s, o = np.float64(1.0), np.float64(0.0)
    found = False
    consumers = {}
    for n in b.nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n)
    while True:
        cs = consumers.get(t, [])
        if len(cs) != 1 or cs[0].op != "scale" or cs[0] not in ctx.preproc_nodes:
            break
        n = cs[0]
        # A parameter overrides the attribute of the same name (see _scale_params).
        ns = np.asarray(n.params["scale"] if "scale" in n.params else n.attrs.get("scale", 1.0), np.float64)
        no = np.asarray(n.params["offset"] if "offset" in n.params else n.attrs.get("offset", 0.0), np.float64)
        s, o = s * ns, o * ns + no
        found = True
        t = n.outputs[0]
    if not found:
        return None

    def simple(v):
        v = np.asarray(v, np.float64).reshape(-1)
        return float(v[0]) if v.size == 1 or np.all(v == v[0]) else [float(a) for a in v]

    size = (int(shape[0]), int(shape[1])) if len(shape) == 3 else None
    return {"size": size, "scale": simple(s), "offset": simple(o), "in_model": True}


__all__ = ["load_keras", "WeightStore"]
