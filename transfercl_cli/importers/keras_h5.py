"""Keras HDF5 import: full-model .h5 files (the `model_config` JSON attribute plus the `model_weights` group) as
written by Keras 2 / tf.keras and Keras 3, weights-only .h5 files plus the model's JSON config (legacy layout, or
the Keras 3 `.weights.h5` layout), and Keras 3 `.keras` zips.

The importer never drops what it does not understand. Each Keras layer class has one small converter registered in
`KERAS` (a registry.Registry); it reads the layer's config through a Tracked view, and a config key that it neither
reads nor declares irrelevant (`cfg.ignore(...)`, with the reason next to it, or the registry's IRRELEVANT keys:
names, `trainable`, initializers, regularizers, constraints) is an error naming the layer, the key and its value.
Each call of a layer (one entry of its `inbound_nodes`: Keras 3 `{"args": [...], "kwargs": {...}}`, Keras 2
`[[layer, node, tensor, kwargs], ...]`) is consumed the same way: tensors are inputs, numbers and constant arrays are
operands (Keras 3 saves `x + 3.0` as an `Add` operation called with the args [x, 3.0]; Keras 2 as a TFOpLambda with
kwargs {"y": 3.0}), `training` (None or False) and `mask` (None) are accepted, and anything else is an error naming
the layer and the argument. The layer's `dtype` must be a float policy (quantized layers are refused).

Nested models (a Functional base inside a Functional or Sequential classifier) are flattened into one graph; inner
layers keep their own names (prefixed with the nested model's name only when two layers would share a name).
Each Keras layer becomes one node named like the layer, with Node.source = the Keras class name, except:
  - Conv2D/DepthwiseConv2D/SeparableConv2D/Dense with an `activation`: the activation is a separate node named
    'LAYER/ACTIVATION' (source 'CLASS/activation');
  - SeparableConv2D: 'LAYER/depthwise' (grouped conv2d) then 'LAYER/pointwise' (1x1 conv2d with the bias);
  - arithmetic with constants: `x + c`, `x * c`, `x - c`, `c - x`, `x / c` are one `scale` node (scalar attributes,
    or per-channel params for a constant that varies along the last axis only; the graph has no other constant
    tensors, so any other constant is an error); `c / x` is 'LAYER/reciprocal' then the scale node; a merge layer
    with several tensors and a constant is 'LAYER/tensors' (add/mul) then the scale node;
  - layers that are the identity at inference (RandomFlip, RandomRotation, RandomZoom, RandomContrast,
    RandomTranslation, RandomBrightness; RandomCrop, Resizing and CenterCrop to the size they already get; Identity)
    become `identity` nodes, each with one line in graph.meta['notes'] (`tcl inspect` prints them).
A model built for any image size (Keras MobileNetV3 with input_shape=None) gets the family's usual size (224 unless
USUAL_SIZES says otherwise) with a TclNote, unless input_size is given.
"""
import io
import json
import re
import warnings
import zipfile
from collections import namedtuple

import numpy as np

from ..errors import ModelError, TclNote
from ..ops.shapes import same_pads
from . import GraphBuilder, need_h5py, unsupported_error
from .registry import Registry, Tracked

MODEL_CLASSES = {"Functional", "Model", "Sequential"}
ACTIVATIONS = {"linear", "relu", "relu6", "sigmoid", "tanh", "softmax", "swish", "silu", "hard_sigmoid",
               "hard_swish", "hard_silu", "leaky_relu", "gelu"}
# Config keys that never change what a layer computes at inference, for every layer class.
IRRELEVANT = (
    # The layer's name names the node (the importer reads it before the converter runs); `trainable` is the
    # recipe's business (what to freeze), not the forward math.
    {"name", "trainable"}
    # How each weight was initialised, regularised and constrained while training: the file's weights are what count.
    | {f"{w}_{k}" for w in ("kernel", "bias", "depthwise", "pointwise", "beta", "gamma", "moving_mean",
                            "moving_variance") for k in ("initializer", "regularizer", "constraint")}
    # A loss term added in training only.
    | {"activity_regularizer"}
    # The input shape given to a Sequential model's first layer (Keras 2): the importer builds the input from it.
    | {"batch_input_shape"}
)
KERAS = Registry("Keras", irrelevant=IRRELEVANT)
# dtype policies that compute in floating point (tcl computes in float32); quantized policies are refused.
FLOAT_DTYPES = {"float16", "float32", "float64", "bfloat16", "mixed_float16", "mixed_bfloat16"}
INT_DTYPES = {"uint8", "int8", "uint16", "int16", "int32", "int64"}
# Usual input sizes of Keras application families built without a fixed size (model name prefix -> size).
USUAL_SIZES = [
    ("efficientnetv2-b1", 240), ("efficientnetv2-b2", 260), ("efficientnetv2-b3", 300), ("efficientnetv2-s", 384),
    ("efficientnetv2-m", 480), ("efficientnetv2-l", 480), ("efficientnetb1", 240), ("efficientnetb2", 260),
    ("efficientnetb3", 300), ("efficientnetb4", 380), ("efficientnetb5", 456), ("efficientnetb6", 528),
    ("efficientnetb7", 600), ("nasnet_large", 331), ("inception", 299), ("xception", 299),
]
DEFAULT_SIZE = 224
# Keras 2 TFOpLambda functions (`x + 3.0`, `tf.math.multiply(x, y)`, ...): (graph op kind, takes a second operand y).
TF_FUNCTIONS = {
    "__operators__.add": ("add", True), "math.add": ("add", True), "math.subtract": ("sub", True),
    "math.multiply": ("mul", True), "math.truediv": ("div", True), "math.divide": ("div", True),
    "math.negative": ("neg", False), "nn.relu": ("relu", False), "nn.relu6": ("relu6", False),
    "math.sigmoid": ("sigmoid", False), "nn.sigmoid": ("sigmoid", False), "math.tanh": ("tanh", False),
    "nn.tanh": ("tanh", False),
}


# --- configuration helpers -----------------------------------------------------------------------------------------
def _act_name(a):
    """The activation's name from a Keras config value: a string ('relu'), or a serialized built-in function
    (Keras 3: {"module": "keras.activations", "class_name": "function", "config": "relu"}). Anything else (a layer
    object, a lambda, a custom function) gives a name that is not in ACTIVATIONS, so it is refused, never guessed."""
    if a is None:
        return "linear"
    if isinstance(a, str):
        pkg, _, fn = a.rpartition(">")
        return fn.lower() if pkg in ("", "keras", "keras.activations") else a
    if isinstance(a, dict):
        c = a.get("config")
        if a.get("class_name") == "function" and isinstance(c, str) and str(a.get("module", "keras")).startswith(
                "keras"):
            return c.lower()
        return f"{a.get('class_name', '?')} object"
    return repr(a)


def _pair(v):
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[1] if len(v) > 1 else v[0]))
    return (int(v), int(v))


def _pads2d(v):
    """ZeroPadding2D / Cropping2D amounts as ((top, bottom), (left, right)) from an int, (h, w) or ((t, b), (l, r))."""
    if isinstance(v, (int, float)):
        return (int(v), int(v)), (int(v), int(v))
    if isinstance(v[0], (list, tuple)):
        return (int(v[0][0]), int(v[0][1])), (int(v[1][0]), int(v[1][1]))
    return (int(v[0]), int(v[0])), (int(v[1]), int(v[1]))


def _layer_class(layer):
    return layer.get("class_name", "?")


def _layer_name(layer):
    c = layer.get("config")
    return (c.get("name") if isinstance(c, dict) else None) or layer.get("name")


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


def _layer_problem(layer):
    """Why a (non-model) layer cannot be imported ('' for an unknown class), or None: the pre-pass that lists every
    unsupported layer of a model in one message. The converters check the same things again when they run."""
    cls = _layer_class(layer)
    c = layer.get("config") or {}
    if cls not in KERAS:
        return ""
    if not isinstance(c, dict):
        return "the layer config is not a JSON object"
    if c.get("data_format") not in (None, "channels_last"):
        return "data_format channels_first is not supported (tcl works channels-last)"
    if "activation" in c and _act_name(c["activation"]) not in ACTIVATIONS:
        return f"activation '{_act_name(c['activation'])}' is not supported"
    if isinstance(c.get("padding"), str) and c["padding"] not in ("valid", "same"):
        return f"padding '{c['padding']}' is not supported"
    if cls == "ReLU":
        if float(c.get("threshold") or 0.0) != 0.0:
            return "ReLU with a threshold is not supported"
        if float(c.get("negative_slope") or 0.0) != 0.0 and c.get("max_value") is not None:
            return "ReLU with both negative_slope and max_value is not supported"
    if cls == "TFOpLambda" and c.get("function") not in TF_FUNCTIONS:
        return f"the TensorFlow function '{c.get('function')}' is not supported"
    return None


# --- calls: the arguments of one entry of a layer's inbound_nodes --------------------------------------------------
_Ref = namedtuple("_Ref", "layer node tensor")  # a tensor in the config: (layer name, node index, tensor index)


class _T(str):
    """A graph tensor among a call's arguments (a plain str there is a constant, which no converter accepts)."""


def _k3_value(v):
    """A Keras 3 call argument: __keras_tensor__ -> _Ref, __numpy__ / __tensor__ -> float64 array, else as is."""
    if isinstance(v, dict):
        cn = v.get("class_name")
        if cn == "__keras_tensor__":
            h = v["config"]["keras_history"]
            return _Ref(h[0], int(h[1]), int(h[2]))
        if cn in ("__numpy__", "__tensor__"):
            val = (v.get("config") or {}).get("value")
            try:
                return np.asarray(val, np.float64)
            except (TypeError, ValueError):
                return v
        if cn is not None:
            return v  # another serialized object: no converter accepts it, so it is an error naming it
        return {k: _k3_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_k3_value(x) for x in v]
    return v


def _is_k2_entry(v):
    return (isinstance(v, (list, tuple)) and len(v) in (3, 4) and isinstance(v[0], str)
            and (v[0] == "_CONSTANT_VALUE" or (isinstance(v[1], int) and isinstance(v[2], int))))


def _k2_value(v, known):
    """A Keras 2 keyword argument: a [layer, node, tensor] list naming a layer of the model is a tensor."""
    if (isinstance(v, list) and len(v) == 3 and isinstance(v[0], str) and v[0] in known
            and isinstance(v[1], int) and isinstance(v[2], int)):
        return _Ref(v[0], v[1], v[2])
    if isinstance(v, list):
        return [_k2_value(x, known) for x in v]
    if isinstance(v, dict):
        return {k: _k2_value(x, known) for k, x in v.items()}
    return v


def _parse_call(call, known, lname):
    """(args, kwargs) of one call, tensors as _Ref."""
    if isinstance(call, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        extra = set(call) - {"args", "kwargs"}
        if extra:
            raise ModelError(f"Keras layer '{lname}' has a call with the entries {sorted(extra)}, which tcl's "
                             "importer does not understand.", "The model config may be damaged.")
        args = _k3_value(list(call.get("args") or []))
        kwargs = {k: _k3_value(v) for k, v in (call.get("kwargs") or {}).items()}
        return args, kwargs
    # Keras 2: the tensors of the first argument, each [layer, node, tensor, kwargs] (the same kwargs on each), or
    # one such entry (TFOpLambda); a constant first argument is ["_CONSTANT_VALUE", -1, value, kwargs].
    entries = [call] if _is_k2_entry(call) else list(call)
    vals, kwargs = [], None
    for e in entries:
        if not _is_k2_entry(e):
            raise ModelError(f"Keras layer '{lname}' has an input entry {e!r:.80} that tcl cannot read.",
                             "The model config may be damaged.")
        kw = dict(e[3]) if len(e) > 3 and e[3] else {}
        if kwargs is not None and kw != kwargs:
            raise ModelError(f"Keras layer '{lname}' has inputs with different call arguments ({kwargs} and {kw}).",
                             "The model config may be damaged.")
        kwargs = kw
        if e[0] == "_CONSTANT_VALUE":
            vals.append(_k3_value(e[2]) if isinstance(e[2], dict) else e[2])
        else:
            vals.append(_Ref(e[0], int(e[1]), int(e[2])))
    if not vals:
        return [], {}
    args = [vals[0] if len(vals) == 1 else vals]
    return args, {k: _k2_value(v, known) for k, v in (kwargs or {}).items()}


def _refs_in(obj, out):
    if isinstance(obj, _Ref):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _refs_in(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _refs_in(v, out)
    return out


def _resolve(obj, tmap):
    if isinstance(obj, _Ref):
        return _T(tmap[tuple(obj)])
    if isinstance(obj, dict):
        return {k: _resolve(v, tmap) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v, tmap) for v in obj]
    return obj


def _show(v):
    if isinstance(v, _T):
        return "a tensor"
    if isinstance(v, np.ndarray):
        return f"{v.tolist()!r:.60}" if v.size <= 8 else f"a constant of shape {v.shape}"
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _operand(v):
    """A tensor (_T) or a constant as a float64 array; None when `v` is neither."""
    if isinstance(v, _T):
        return v
    if isinstance(v, np.ndarray):
        return v.astype(np.float64)
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return np.asarray(float(v), np.float64)
    if isinstance(v, list) and v:
        try:
            a = np.asarray(v, np.float64)
        except (TypeError, ValueError):
            return None
        return a if a.dtype == np.float64 else None
    return None


class _Call:
    """One call of a Keras layer: its positional arguments (tensors as _T, constants) and keyword arguments, every one
    of which its converter must consume (`finish` refuses the rest)."""

    def __init__(self, cls, lname, name, scope, args, kwargs):
        self.cls, self.lname, self.name, self.scope = cls, lname, name, list(scope)
        self.args = list(args)
        self.kwargs = Tracked(kwargs, where=lname)
        self._used = set()

    def bad(self, msg, fix="The model config may be damaged."):
        return ModelError(f"Keras layer '{self.lname}' ({self.cls}) {msg}", fix)

    def x(self):
        """The layer's one input tensor (its only positional argument)."""
        if len(self.args) != 1:
            raise self.bad(f"is called with {len(self.args)} positional arguments, expected one input tensor.")
        self._used.add(0)
        v = self.args[0]
        if isinstance(v, list) and len(v) == 1:
            v = v[0]
        if not isinstance(v, _T):
            raise self.bad(f"is called on {_show(v)}, not on one tensor; tcl's importer does not understand that.",
                           "Report the layer and the model so support can be added.")
        return v

    def inputs(self):
        """The input tensors of a layer that takes a list (Concatenate, a nested model)."""
        if len(self.args) != 1:
            raise self.bad(f"is called with {len(self.args)} positional arguments, expected one (a list of tensors).")
        self._used.add(0)
        v = self.args[0]
        vs = v if isinstance(v, list) else [v]
        for t in vs:
            if not isinstance(t, _T):
                raise self.bad(f"has the input {_show(t)}, where tcl needs a tensor.",
                               "Report the layer and the model so support can be added.")
        return vs

    def operands(self, arity):
        """Operands of an arithmetic layer: the list a merge layer takes (Add()([a, b])), or the positional arguments
        of a Keras 3 operation, exactly `arity` of them (x + 3.0 saves Add with the args [x, 3.0]); tensors as _T,
        constants as float64."""
        self._used.update(range(len(self.args)))
        if len(self.args) == 1 and isinstance(self.args[0], list) and any(isinstance(a, _T) for a in self.args[0]):
            vs = self.args[0]
        else:
            vs = self.args
            if len(vs) != arity:
                raise self.bad(f"is called with {len(vs)} positional operands, expected {arity}.",
                               "The model config may be damaged.")
        return [self._operand(v) for v in vs]

    def operand(self, i):
        if i >= len(self.args):
            raise self.bad(f"is called with {len(self.args)} positional arguments, expected at least {i + 1}.")
        self._used.add(i)
        return self._operand(self.args[i])

    def kw_operand(self, key):
        if key not in self.kwargs.raw():
            raise self.bad(f"is called without the argument '{key}'.")
        return self._operand(self.kwargs[key])

    def _operand(self, v):
        o = _operand(v)
        if o is None:
            raise self.bad(f"has the operand {_show(v)}, which tcl's importer does not understand; importing it "
                           "anyway could give wrong outputs.",
                           "Report the layer and the model so support can be added.")
        return o

    def check_standard_kwargs(self):
        """`training` and `mask`, which any layer may be called with: only their inference values are accepted."""
        kw = self.kwargs
        if "training" in kw.raw() and kw["training"] not in (None, False):
            raise self.bad(f"is called with training={kw.raw()['training']!r}: it runs in training mode even at "
                           "inference (random augmentation, Monte Carlo dropout, batch statistics), which tcl does "
                           "not import.", "Rebuild the model without training=True in that call and save it again.")
        if "mask" in kw.raw() and kw["mask"] is not None:
            raise self.bad(f"is called with a mask ({_show(kw.raw()['mask'])}), which tcl's importer does not "
                           "support.", "Rebuild the model without masking and save it again.")

    def finish(self):
        left = [i for i in range(len(self.args)) if i not in self._used]
        if left:
            raise self.bad(f"is called with the extra positional argument {_show(self.args[left[0]])}, which tcl's "
                           "importer does not understand; importing it anyway could give wrong outputs.",
                           "Report the layer and the model so support can be added.")
        left = self.kwargs.unread()
        if left:
            k = left[0]
            more = f" (and {', '.join(left[1:])})" if len(left) > 1 else ""
            raise self.bad(f"is called with the argument {k}={_show(self.kwargs.raw()[k])}{more}, which tcl's "
                           "importer does not understand; importing it anyway could give wrong outputs.",
                           "Report the layer and the argument so support can be added.")


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
    """[(variable names, required)] in Keras' creation order. `c` is the raw config or its Tracked view (a converter
    passes the view, so the keys read here count as read)."""
    bias = [(("bias",), True)] if c.get("use_bias", True) else []
    if cls in ("Conv2D", "Convolution2D", "Dense"):
        return [(("kernel",), True)] + bias
    if cls == "DepthwiseConv2D":
        return [(("depthwise_kernel", "kernel"), True)] + bias
    if cls in ("SeparableConv2D", "SeparableConvolution2D"):
        return [(("depthwise_kernel",), True), (("pointwise_kernel",), True)] + bias
    if cls in ("BatchNormalization", "LayerNormalization"):
        spec = []
        if c.get("scale", True):
            spec.append((("gamma",), True))
        if c.get("center", True):
            spec.append((("beta",), True))
        if cls == "LayerNormalization":
            return spec
        return spec + [(("moving_mean",), True), (("moving_variance",), True)]
    if cls == "Normalization" and c.get("mean") is None:
        return [(("mean",), True), (("variance",), True), (("count",), False)]
    return []


# --- conversion -----------------------------------------------------------------------------------------------------
class _Ctx:
    def __init__(self, b, weights, keras_major, input_size, model_name="model"):
        self.b = b
        self.w = weights
        self.major = keras_major
        self.input_size = input_size
        self.model_name = model_name
        self.preproc_nodes = []  # scale nodes that may be the model's own input preprocessing
        self.passthrough = set()  # identity nodes of augmentation layers (transparent for that preprocessing)
        self.notes = []  # graph.meta['notes']
        self.build_shapes = {}  # input layer name -> its build_config input shape (when the config has none)

    def node_name(self, scope, lname):
        if lname in self.b._names and scope:
            return "/".join(list(scope) + [lname])
        return lname

    def weights(self, L, spec):
        return self.w.get(L.scope, L.lname, spec)


def _check_dtype(L, cfg):
    """The layer's dtype policy: float policies compute what tcl computes (in float32); quantized ones do not."""
    if "dtype" not in cfg.raw():
        return
    d = cfg["dtype"]
    if d is None:
        return
    cls, name = None, d
    if isinstance(d, dict):
        cls, name = d.get("class_name"), (d.get("config") or {}).get("name")
    if name in FLOAT_DTYPES and "Quantized" not in str(cls or ""):
        return
    if L.cls == "InputLayer" and name in INT_DTYPES:
        return
    raise L.bad(f"has the dtype policy {_show(d)}, which tcl's importer does not support (tcl computes in float32 "
                "from float weights; quantized layers store their weights differently).",
                "Save the float model (before quantizing) and import that.")


def _convert(ctx, layer, scope, args, kwargs):
    """Add the nodes of one call of a Keras layer; returns its output tensor(s)."""
    cls = _layer_class(layer)
    raw = layer.get("config", {})
    if not isinstance(raw, dict):
        raise ModelError(f"Keras layer '{layer.get('name')}' ({cls}) has a config that is not a JSON object.",
                         "The model config may be damaged.")
    lname = _layer_name(layer)
    L = _Call(cls, lname, ctx.node_name(scope, lname), scope, args, kwargs)
    L.check_standard_kwargs()
    cfg = Tracked(raw, where=lname)
    _check_dtype(L, cfg)
    outs = KERAS.convert(cls, lname, cfg, ctx, L)
    L.finish()
    return outs


def _channels_last(L, cfg):
    df = cfg.get("data_format")
    if df not in (None, "channels_last"):
        raise L.bad(f"uses data_format '{df}'; tcl works channels-last.",
                    "Rebuild the model with data_format='channels_last' (the Keras default) and save it again.")


def _padding(L, cfg):
    p = cfg.get("padding", "valid")
    if p not in ("valid", "same"):
        raise L.bad(f"uses padding '{p}', which tcl does not support.", "Use 'valid' or 'same' padding.")
    return p


def _no_lora(L, cfg):
    if cfg.get("lora_rank"):
        cfg.ignore("lora_alpha")
        raise L.bad(f"has a LoRA adapter (lora_rank={cfg['lora_rank']}), which tcl's importer does not support.",
                    "Merge the adapter into the kernel (or disable LoRA) and save the model again.")


def _rank_axis(L, ax, rank, what="axis"):
    """A Keras axis (int, or a one-element list) as a full-rank axis 1..rank-1 (0 = batch is refused)."""
    if isinstance(ax, (list, tuple)):
        if len(ax) != 1:
            raise L.bad(f"works over the axes {list(ax)}; tcl supports one axis here.", "Use a single axis.")
        ax = ax[0]
    a = int(ax) + rank if int(ax) < 0 else int(ax)
    if not 1 <= a < rank:
        raise L.bad(f"has {what}={ax}, which does not fit its rank-{rank} input (with batch).",
                    "The model config may be damaged.")
    return a


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
    if act == "gelu":  # keras.activations.gelu(x, approximate=False): the activation string takes no arguments
        return b.add("gelu", name, [x], {"approximate": "none"}, source=source)
    if act == "hard_sigmoid":
        # Keras 3: relu6(x + 3) / 6; Keras 2: clip(0.2 x + 0.5, 0, 1).
        alpha = 1.0 / 6.0 if ctx.major >= 3 else 0.2
        return b.add("hard_sigmoid", name, [x], {"alpha": alpha, "beta": 0.5}, source=source)
    if act == "leaky_relu":
        return b.add("leaky_relu", name, [x], {"alpha": 0.2}, source=source)
    raise ModelError(f"Layer '{name}': activation '{act}' is not supported.", "Replace it before exporting.")


def _activation(ctx, L, cfg, y):
    """The `activation` of a Conv/Dense layer as a separate node 'LAYER/ACTIVATION' after `y`."""
    act = _act_name(cfg.get("activation"))
    if act not in ACTIVATIONS:
        raise L.bad(f"uses the activation '{act}', which tcl does not support.", "Replace it before exporting.")
    return _act_node(ctx, y, act, f"{L.name}/{act}", f"{L.cls}/activation")


def _spatial_pads(ctx, x, padding, kernel, strides, dilations=(1, 1)):
    if padding == "valid":
        return (0, 0, 0, 0)
    h, w = ctx.b.shapes[x][:2]
    pt, pb = same_pads(h, kernel[0], strides[0], dilations[0])
    pl, pr = same_pads(w, kernel[1], strides[1], dilations[1])
    return (pt, pl, pb, pr)


def _image(L, ctx, x):
    shp = ctx.b.shapes[x]
    if len(shp) != 3:
        raise L.bad(f"needs an image input (N, H, W, C), got shape {('N',) + tuple(shp)}.",
                    "The model config may be damaged.")
    return shp


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


def _per_channel(L, c, shape):
    """A constant operand of a tensor of `shape` (without batch) as a scalar or a (C,) vector: numpy broadcasting
    against (N,) + shape, which it must not enlarge; a constant that varies along any axis but the last is refused
    (the graph has no constant tensors, only the per-channel params of `scale`)."""
    c = np.asarray(c, np.float64)
    rank = len(shape) + 1
    if c.ndim > rank:
        raise L.bad(f"has a constant operand of shape {c.shape}, of higher rank than its tensor "
                    f"{('N',) + tuple(shape)}.", "The model config may be damaged.")
    full = c.reshape((1,) * (rank - c.ndim) + c.shape)
    try:
        out = np.broadcast_shapes((1,) + tuple(shape), full.shape)
    except ValueError:
        out = None
    if out != (1,) + tuple(shape):
        raise L.bad(f"has a constant operand of shape {c.shape} that does not broadcast to its tensor "
                    f"{('N',) + tuple(shape)}.", "The model config may be damaged.")
    if any(d != 1 for d in full.shape[:-1]):
        raise L.bad(f"has a constant operand of shape {c.shape} that varies along more than the last axis; tcl's "
                    "graph holds constants only as scalars or per-channel vectors.",
                    "Cut the model before this layer (cut_after), or report the model so support can be added.")
    return full.reshape(-1)


def _const_scale(ctx, L, x, scale, offset, name=None):
    """y = x * scale + offset for constant operands (scalars or per-channel) as one scale node."""
    shape = ctx.b.shapes[x]
    s, o = _per_channel(L, scale, shape), _per_channel(L, offset, shape)
    attrs, params = _scale_params(s, o, shape)
    y = ctx.b.add("scale", name or L.name, [x], attrs, params, source=L.cls)
    ctx.preproc_nodes.append(ctx.b.nodes[-1])
    return y


def _arith(ctx, L, kind, ops):
    """`kind` (add | sub | mul | div | neg) over operands (tensors _T, constants float64 arrays), in their order."""
    b = ctx.b
    tens = [o for o in ops if isinstance(o, _T)]
    if not tens:
        raise L.bad("has only constant operands; tcl needs a computed tensor.", "The model config may be damaged.")
    if kind == "neg":
        if len(ops) != 1:
            raise L.bad(f"takes one operand, got {len(ops)}.")
        return _const_scale(ctx, L, ops[0], -1.0, 0.0)
    if kind in ("sub", "div"):
        if len(ops) != 2:
            raise L.bad(f"takes two operands, got {len(ops)}.")
        a, c = ops
        if isinstance(a, _T) and isinstance(c, _T):
            return b.add(kind, L.name, [a, c], source=L.cls)
        with np.errstate(divide="ignore"):
            if isinstance(a, _T):  # x - c, x / c
                return _const_scale(ctx, L, a, 1.0, -c) if kind == "sub" else _const_scale(ctx, L, a, 1.0 / c, 0.0)
            if kind == "sub":  # c - x
                return _const_scale(ctx, L, c, -1.0, a)
        r = b.add("reciprocal", f"{L.name}/reciprocal", [c], source=L.cls)  # c / x
        return _const_scale(ctx, L, r, a, 0.0)
    consts = [o for o in ops if not isinstance(o, _T)]
    if not consts:
        if len(tens) < 2:
            raise L.bad(f"has {len(tens)} input; it needs at least two.")
        return b.add(kind, L.name, tens, source=L.cls)
    x = tens[0] if len(tens) == 1 else b.add(kind, f"{L.name}/tensors", tens, source=L.cls)
    c = consts[0]
    for k in consts[1:]:
        c = c + k if kind == "add" else c * k
    return _const_scale(ctx, L, x, 1.0, c) if kind == "add" else _const_scale(ctx, L, x, c, 0.0)


def _identity(ctx, L, x, why):
    y = ctx.b.add("identity", L.name, [x], source=L.cls)
    ctx.passthrough.add(y)
    ctx.notes.append(f"{L.cls} '{L.lname}': {why}")
    return [y]


# --- converters: one per Keras layer class --------------------------------------------------------------------------
# Each takes (ctx, L, cfg=Tracked config) and returns the list of output tensors; Registry.convert then refuses every
# config key the converter did not read or ignore, and _convert every call argument it did not consume.
@KERAS.register("InputLayer")
def input_layer(ctx, L, *, cfg):
    shp = cfg.get("batch_shape")
    if shp is None:
        shp = cfg.get("batch_input_shape")
    for k in ("sparse", "ragged"):
        if cfg.get(k):
            raise L.bad(f"is a {k} input, which tcl does not support.", "Use a dense image input.")
    cfg.ignore("optional")  # whether the input may be None: tcl always feeds it
    dt = cfg.raw().get("dtype")
    if isinstance(dt, str) and dt in INT_DTYPES:
        ctx.notes.append(f"InputLayer '{L.lname}': declared {dt}; tcl feeds float32 pixels")
    return [ctx.b.add_input(L.lname, _input_shape(ctx, shp, L.lname, ctx.build_shapes.get(L.lname)))]


@KERAS.register("Conv2D", "Convolution2D")
def conv2d(ctx, L, *, cfg):
    _channels_last(L, cfg)
    _no_lora(L, cfg)
    x = L.x()
    _image(L, ctx, x)
    wts = ctx.weights(L, _weight_spec(L.cls, cfg))
    k = wts["kernel"]
    if k.ndim != 4 or int(cfg.get("filters", k.shape[-1])) != k.shape[-1]:
        raise L.bad(f"has a kernel of shape {k.shape} for {cfg.get('filters')} filters.",
                    "The config and the weights do not belong together.")
    kernel, strides, dil = _pair(cfg.get("kernel_size", k.shape[:2])), _pair(cfg.get("strides", 1)), _pair(
        cfg.get("dilation_rate", 1))
    if kernel != tuple(k.shape[:2]):
        raise L.bad(f"has kernel_size {kernel} but a kernel of shape {k.shape}.",
                    "The config and the weights do not belong together.")
    groups = int(cfg.get("groups", 1) or 1)
    pads = _spatial_pads(ctx, x, _padding(L, cfg), kernel, strides, dil)
    params = {"weight": k}
    if "bias" in wts:
        params["bias"] = wts["bias"]
    y = ctx.b.add("conv2d", L.name, [x], {"kernel": kernel, "strides": strides, "dilations": dil, "pads": pads,
                                          "groups": groups, "act": None}, params, source=L.cls)
    return [_activation(ctx, L, cfg, y)]


def _no_groups(L, cfg):
    # Keras 2 depthwise/separable configs inherit Conv's `groups` (always 1, unused by those layers).
    g = int(cfg.get("groups", 1) or 1)
    if g != 1:
        raise L.bad(f"has groups={g}, which tcl's importer does not understand here.",
                    "The model config may be damaged.")


@KERAS.register("DepthwiseConv2D")
def depthwise_conv2d(ctx, L, *, cfg):
    _channels_last(L, cfg)
    _no_groups(L, cfg)
    x = L.x()
    _image(L, ctx, x)
    wts = ctx.weights(L, _weight_spec(L.cls, cfg))
    k = wts["depthwise_kernel"]
    kh, kw, cin, mult = k.shape
    if int(cfg.get("depth_multiplier", mult)) != mult:
        raise L.bad(f"has depth_multiplier {cfg['depth_multiplier']} but a kernel of shape {k.shape}.",
                    "The config and the weights do not belong together.")
    kernel, strides, dil = _pair(cfg.get("kernel_size", (kh, kw))), _pair(cfg.get("strides", 1)), _pair(
        cfg.get("dilation_rate", 1))
    pads = _spatial_pads(ctx, x, _padding(L, cfg), kernel, strides, dil)
    # (kh, kw, cin, mult) -> (kh, kw, 1, cin*mult): output channel c*mult + m, as Keras orders them.
    params = {"weight": k.reshape(kh, kw, 1, cin * mult)}
    if "bias" in wts:
        params["bias"] = wts["bias"]
    y = ctx.b.add("conv2d", L.name, [x], {"kernel": kernel, "strides": strides, "dilations": dil, "pads": pads,
                                          "groups": int(cin), "act": None}, params, source=L.cls)
    return [_activation(ctx, L, cfg, y)]


@KERAS.register("SeparableConv2D", "SeparableConvolution2D")
def separable_conv2d(ctx, L, *, cfg):
    _channels_last(L, cfg)
    _no_groups(L, cfg)
    x = L.x()
    _image(L, ctx, x)
    wts = ctx.weights(L, _weight_spec(L.cls, cfg))
    dk, pk = wts["depthwise_kernel"], wts["pointwise_kernel"]
    kh, kw, cin, mult = dk.shape
    if int(cfg.get("depth_multiplier", mult)) != mult or int(cfg.get("filters", pk.shape[-1])) != pk.shape[-1]:
        raise L.bad(f"has kernels of shapes {dk.shape} and {pk.shape} that do not match its config.",
                    "The config and the weights do not belong together.")
    kernel, strides, dil = _pair(cfg.get("kernel_size", (kh, kw))), _pair(cfg.get("strides", 1)), _pair(
        cfg.get("dilation_rate", 1))
    pads = _spatial_pads(ctx, x, _padding(L, cfg), kernel, strides, dil)
    b = ctx.b
    y = b.add("conv2d", f"{L.name}/depthwise", [x], {"kernel": kernel, "strides": strides, "dilations": dil,
                                                    "pads": pads, "groups": int(cin), "act": None},
              {"weight": dk.reshape(kh, kw, 1, cin * mult)}, source=f"{L.cls}/depthwise")
    params = {"weight": pk}
    if "bias" in wts:
        params["bias"] = wts["bias"]
    y = b.add("conv2d", f"{L.name}/pointwise", [y], {"kernel": (1, 1), "strides": (1, 1), "dilations": (1, 1),
                                                    "pads": (0, 0, 0, 0), "groups": 1, "act": None}, params,
              source=f"{L.cls}/pointwise")
    return [_activation(ctx, L, cfg, y)]


@KERAS.register("Dense")
def dense(ctx, L, *, cfg):
    _no_lora(L, cfg)
    if cfg.get("quantization_config") is not None:
        raise L.bad("is quantized, which tcl's importer does not support.",
                    "Save the float model (before quantizing) and import that.")
    x = L.x()
    if len(ctx.b.shapes[x]) != 1:
        raise ModelError(f"Layer '{L.lname}' (Dense) is applied to a tensor of shape {('N',) + ctx.b.shapes[x]}; "
                         "tcl supports Dense only on flat (N, features) inputs.",
                         "Add a Flatten or GlobalAveragePooling2D layer before it.")
    wts = ctx.weights(L, _weight_spec(L.cls, cfg))
    k = wts["kernel"]
    if k.ndim != 2 or int(cfg.get("units", k.shape[-1])) != k.shape[-1]:
        raise L.bad(f"has a kernel of shape {k.shape} for {cfg.get('units')} units.",
                    "The config and the weights do not belong together.")
    params = {"weight": k}
    if "bias" in wts:
        params["bias"] = wts["bias"]
    y = ctx.b.add("dense", L.name, [x], {"act": None}, params, source=L.cls)
    return [_activation(ctx, L, cfg, y)]


@KERAS.register("BatchNormalization")
def batch_normalization(ctx, L, *, cfg):
    x = L.x()
    rank = len(ctx.b.shapes[x]) + 1
    ax = _rank_axis(L, cfg.get("axis", -1), rank)
    if ax != rank - 1:
        raise L.bad(f"normalises over axis {cfg.raw().get('axis')}; tcl supports only the channels axis -1.",
                    "Rebuild the model channels-last.")
    if cfg.get("renorm", False):
        raise L.bad("uses batch renormalization (renorm=True), which tcl's importer does not support.",
                    "Rebuild the layer without renorm and save the model again.")
    # Training-only settings: renormalization's clipping/momentum (renorm is off), cross-replica statistics,
    # virtual batches and the fused kernel choice; at inference BatchNormalization uses its moving statistics.
    cfg.ignore("renorm_clipping", "renorm_momentum", "synchronized", "virtual_batch_size", "fused")
    wts = ctx.weights(L, _weight_spec(L.cls, cfg))
    ch = wts["moving_mean"].shape[0]
    params = {"gamma": wts.get("gamma", np.ones(ch, np.float32)), "beta": wts.get("beta", np.zeros(ch, np.float32)),
              "mean": wts["moving_mean"], "var": wts["moving_variance"]}
    return [ctx.b.add("batchnorm", L.name, [x], {"eps": float(cfg.get("epsilon", 1e-3)),
                                                 "momentum": float(cfg.get("momentum", 0.99))}, params,
                      source=L.cls)]


@KERAS.register("LayerNormalization")
def layer_normalization(ctx, L, *, cfg):
    x = L.x()
    shape = ctx.b.shapes[x]
    rank = len(shape) + 1
    raw_ax = cfg.get("axis", -1)
    axes = sorted({_rank_axis(L, a, rank) for a in (raw_ax if isinstance(raw_ax, (list, tuple)) else [raw_ax])})
    if not axes or axes != list(range(axes[0], rank)):
        raise L.bad(f"normalises over the axes {raw_ax}; tcl supports a trailing range of axes (e.g. -1, or "
                    "[1, 2, 3] for an image).", "Cut the model before this layer, or report it.")
    if cfg.get("rms_scaling", False):
        raise L.bad("uses rms_scaling=True, which tcl's importer does not support.",
                    "Cut the model before this layer, or report it.")
    norm = tuple(shape[axes[0] - 1:])
    wts = ctx.weights(L, _weight_spec(L.cls, cfg))
    params = {}
    for k in ("gamma", "beta"):
        if k in wts:
            if wts[k].size != int(np.prod(norm)):
                raise L.bad(f"has a {k} of shape {wts[k].shape} for normalised dims {norm}.",
                            "The config and the weights do not belong together.")
            params[k] = wts[k].reshape(norm)
    return [ctx.b.add("layer_norm", L.name, [x], {"axis": axes[0], "epsilon": float(cfg.get("epsilon", 1e-3))},
                      params, source=L.cls)]


@KERAS.register("ReLU")
def relu(ctx, L, *, cfg):
    x = L.x()
    mv = cfg.get("max_value")
    ns = float(cfg.get("negative_slope") or 0.0)
    th = float(cfg.get("threshold") or 0.0)
    if th != 0.0:
        raise L.bad(f"has threshold={th}, which tcl does not support.", "Replace it before exporting.")
    b = ctx.b
    if ns != 0.0:
        if mv is not None:
            raise L.bad("has both negative_slope and max_value, which tcl does not support.",
                        "Replace it before exporting.")
        return [b.add("leaky_relu", L.name, [x], {"alpha": ns}, source=L.cls)]
    if mv is None:
        return [b.add("relu", L.name, [x], source=L.cls)]
    if float(mv) == 6.0:
        return [b.add("relu6", L.name, [x], source=L.cls)]
    return [b.add("clip", L.name, [x], {"min": 0.0, "max": float(mv)}, source=L.cls)]


@KERAS.register("LeakyReLU")
def leaky_relu(ctx, L, *, cfg):
    x = L.x()
    if "negative_slope" in cfg.raw():  # Keras 3
        alpha = cfg["negative_slope"]
    else:  # Keras 2
        alpha = cfg.get("alpha", 0.3 if ctx.major < 3 else 0.2)
    return [ctx.b.add("leaky_relu", L.name, [x], {"alpha": float(alpha)}, source=L.cls)]


@KERAS.register("Softmax")
def softmax(ctx, L, *, cfg):
    x = L.x()
    ax = _rank_axis(L, cfg.get("axis", -1), len(ctx.b.shapes[x]) + 1)
    return [ctx.b.add("softmax", L.name, [x], {"axis": ax}, source=L.cls)]


@KERAS.register("Activation")
def activation(ctx, L, *, cfg):
    x = L.x()
    act = _act_name(cfg.get("activation"))
    if act not in ACTIVATIONS:
        raise L.bad(f"uses the activation '{act}', which tcl does not support.", "Replace it before exporting.")
    if act == "linear":
        return [ctx.b.add("identity", L.name, [x], source=L.cls)]
    return [_act_node(ctx, x, act, L.name, L.cls)]


@KERAS.register("Gelu")
def gelu_op(ctx, L, *, cfg):
    """keras.ops.gelu(x, approximate=True) in a functional model (a Keras 3 operation; its default is the tanh form,
    unlike the 'gelu' activation string)."""
    x = L.x()
    approx = cfg.get("approximate", True)
    return [ctx.b.add("gelu", L.name, [x], {"approximate": "tanh" if approx else "none"}, source=L.cls)]


@KERAS.register("ZeroPadding2D")
def zero_padding2d(ctx, L, *, cfg):
    _channels_last(L, cfg)
    x = L.x()
    _image(L, ctx, x)
    (t, bo), (le, r) = _pads2d(cfg.get("padding", 1))
    return [ctx.b.add("pad", L.name, [x], {"pads": (t, le, bo, r), "value": 0.0}, source=L.cls)]


@KERAS.register("Cropping2D")
def cropping2d(ctx, L, *, cfg):
    _channels_last(L, cfg)
    x = L.x()
    h, w, _c = _image(L, ctx, x)
    (t, bo), (le, r) = _pads2d(cfg.get("cropping", 0))
    if min(t, bo, le, r) < 0 or t + bo >= h or le + r >= w:
        raise L.bad(f"crops {((t, bo), (le, r))} from a {h}x{w} image, which leaves nothing.",
                    "The model config may be damaged.")
    return [ctx.b.add("slice", L.name, [x], {"axes": [1, 2], "starts": [t, le], "ends": [h - bo, w - r],
                                             "steps": [1, 1]}, source=L.cls)]


@KERAS.register("MaxPooling2D", "MaxPool2D", "AveragePooling2D", "AvgPool2D")
def pooling2d(ctx, L, *, cfg):
    _channels_last(L, cfg)
    x = L.x()
    _image(L, ctx, x)
    kernel = _pair(cfg.get("pool_size", 2))
    strides = _pair(cfg.get("strides") or kernel)
    pads = _spatial_pads(ctx, x, _padding(L, cfg), kernel, strides)
    if L.cls.startswith("Max"):
        return [ctx.b.add("maxpool", L.name, [x], {"kernel": kernel, "strides": strides, "pads": pads,
                                                   "ceil_mode": False}, source=L.cls)]
    # Keras/TF 'same' average pooling divides by the number of real (unpadded) pixels.
    return [ctx.b.add("avgpool", L.name, [x], {"kernel": kernel, "strides": strides, "pads": pads,
                                               "count_include_pad": False, "ceil_mode": False}, source=L.cls)]


@KERAS.register("GlobalAveragePooling2D", "GlobalAvgPool2D")
def global_average_pooling2d(ctx, L, *, cfg):
    _channels_last(L, cfg)
    x = L.x()
    _image(L, ctx, x)
    return [ctx.b.add("global_avgpool", L.name, [x], {"keepdims": bool(cfg.get("keepdims", False))}, source=L.cls)]


@KERAS.register("Dropout")
def dropout(ctx, L, *, cfg):
    x = L.x()
    # noise_shape shapes the random mask in training only (tcl's dropout drops elementwise when fine-tuning);
    # at inference Dropout is the identity whatever it is.
    cfg.ignore("noise_shape")
    return [ctx.b.add("dropout", L.name, [x], {"rate": float(cfg.get("rate", 0.0)), "seed": cfg.get("seed")},
                      source=L.cls)]


@KERAS.register("Flatten")
def flatten(ctx, L, *, cfg):
    _channels_last(L, cfg)  # channels_first would flatten in (C, H, W) order
    return [ctx.b.add("flatten", L.name, [L.x()], source=L.cls)]


@KERAS.register("Reshape")
def reshape(ctx, L, *, cfg):
    x = L.x()
    return [ctx.b.add("reshape", L.name, [x], {"shape": tuple(int(v) for v in cfg["target_shape"])}, source=L.cls)]


@KERAS.register("Identity")
def identity(ctx, L, *, cfg):
    return [ctx.b.add("identity", L.name, [L.x()], source=L.cls)]


# Keras merge layers (Add()([a, b])) and Keras 3 operations (x + 3.0, 3.0 - x, x / 127.5: class names Add,
# Subtract, Multiply, TrueDivide, Divide, Negative with the operands as positional args) share one converter.
ARITH = {"Add": "add", "Subtract": "sub", "Multiply": "mul", "TrueDivide": "div", "Divide": "div", "Negative": "neg"}


@KERAS.register(*ARITH)
def arithmetic(ctx, L, *, cfg):
    kind = ARITH[L.cls]
    return [_arith(ctx, L, kind, L.operands(1 if kind == "neg" else 2))]


@KERAS.register("TFOpLambda")
def tf_op_lambda(ctx, L, *, cfg):
    """Keras 2 op layers: `x + 3.0` saves TFOpLambda(function='__operators__.add') called with x and kwargs
    {"y": 3.0, "name": null}."""
    fn = cfg["function"]
    if fn not in TF_FUNCTIONS:
        raise L.bad(f"calls the TensorFlow function '{fn}', which tcl does not support.",
                    "Cut the model before this layer, or rebuild it with Keras layers.")
    kind, binary = TF_FUNCTIONS[fn]
    L.kwargs.ignore("name")  # the TensorFlow op's name: no effect on the math
    x = L.operand(0)
    if binary:
        return [_arith(ctx, L, kind, [x, L.kw_operand("y")])]
    if not isinstance(x, _T):
        raise L.bad("is applied to a constant; tcl needs a computed tensor.", "The model config may be damaged.")
    if kind == "neg":
        return [_arith(ctx, L, "neg", [x])]
    return [ctx.b.add(kind, L.name, [x], source=L.cls)]


@KERAS.register("Concatenate")
def concatenate(ctx, L, *, cfg):
    ins = L.inputs()
    ax = _rank_axis(L, cfg.get("axis", -1), len(ctx.b.shapes[ins[0]]) + 1)
    return [ctx.b.add("concat", L.name, ins, {"axis": ax}, source=L.cls)]


@KERAS.register("Rescaling")
def rescaling(ctx, L, *, cfg):
    x = L.x()
    s, o = _operand(_k3_value(cfg.get("scale", 1.0))), _operand(_k3_value(cfg.get("offset", 0.0)))
    if s is None or o is None:
        raise L.bad(f"has scale={_show(cfg.raw().get('scale'))}, offset={_show(cfg.raw().get('offset'))}, which "
                    "tcl's importer does not understand.", "The model config may be damaged.")
    return [_const_scale(ctx, L, x, s, o)]


@KERAS.register("Normalization")
def normalization(ctx, L, *, cfg):
    x = L.x()
    ax = _rank_axis(L, cfg.get("axis", -1), len(ctx.b.shapes[x]) + 1)
    if ax != len(ctx.b.shapes[x]):
        raise L.bad(f"normalises over axis {cfg.raw().get('axis')}; tcl supports only the channels axis -1.",
                    "Rebuild the model channels-last.")
    wts = ctx.weights(L, _weight_spec(L.cls, cfg))
    mean = cfg.get("mean") if cfg.get("mean") is not None else wts["mean"]
    var = cfg.get("variance") if cfg.get("variance") is not None else wts["variance"]
    mean = np.asarray(mean, np.float64).reshape(-1)
    std = np.maximum(np.sqrt(np.asarray(var, np.float64).reshape(-1)), 1e-7)
    if cfg.get("invert", False):
        s, o = std, mean
    else:
        s, o = 1.0 / std, -mean / std
    return [_const_scale(ctx, L, x, s, o)]


# Random augmentation: Keras applies it only when training (a call with training=True is refused by _Call), and
# tcl fine-tunes with the recipe's own augmentation, so these layers are the identity; their parameters (and
# `data_format`, `bounding_box_format`, `value_range`) do not change what the model computes at inference.
AUGMENT = {
    "RandomFlip": ("mode",),
    "RandomRotation": ("factor", "fill_mode", "fill_value", "interpolation", "value_range"),
    "RandomZoom": ("height_factor", "width_factor", "fill_mode", "fill_value", "interpolation"),
    "RandomTranslation": ("height_factor", "width_factor", "fill_mode", "fill_value", "interpolation"),
    "RandomContrast": ("factor", "value_range"),
    "RandomBrightness": ("factor", "value_range"),
}


@KERAS.register(*AUGMENT)
def random_augmentation(ctx, L, *, cfg):
    cfg.ignore(*AUGMENT[L.cls], "seed", "data_format", "bounding_box_format")
    return _identity(ctx, L, L.x(), "identity at inference (random augmentation; tcl trains with the recipe's)")


def _same_size(ctx, L, cfg, x, how=""):
    _channels_last(L, cfg)
    h, w, _c = _image(L, ctx, x)
    th, tw = int(cfg["height"]), int(cfg["width"])
    if (th, tw) != (h, w):
        raise L.bad(f"makes {th}x{tw} images from its {h}x{w} input{how}, which tcl's importer does not reproduce.",
                    f"Remove the layer and let the data pipeline size the images (recipe `input.size: [{th}, {tw}]`), "
                    f"or, if the model accepts any image size, import it with input_size=({th}, {tw}).")
    return _identity(ctx, L, x, f"identity (it gets {h}x{w} images, the size it makes)")


@KERAS.register("Resizing")
def resizing(ctx, L, *, cfg):
    # How it would resize (interpolation, aspect-ratio cropping or padding, antialiasing): nothing at the same size.
    cfg.ignore("interpolation", "crop_to_aspect_ratio", "pad_to_aspect_ratio", "fill_mode", "fill_value",
               "antialias")
    return _same_size(ctx, L, cfg, L.x())


@KERAS.register("RandomCrop")
def random_crop(ctx, L, *, cfg):
    # At inference Keras does not crop at random: depending on its version it resizes (center-crop to the aspect
    # ratio, then bilinear) or passes the image through; only the same-size case is the identity in every version.
    cfg.ignore("seed", "bounding_box_format")
    return _same_size(ctx, L, cfg, L.x(), " (at inference Keras resizes it, or passes it through uncropped, "
                                          "depending on the Keras version)")


@KERAS.register("CenterCrop")
def center_crop(ctx, L, *, cfg):
    _channels_last(L, cfg)
    x = L.x()
    h, w, _c = _image(L, ctx, x)
    th, tw = int(cfg["height"]), int(cfg["width"])
    cfg.ignore("bounding_box_format")  # boxes are not images
    if (th, tw) == (h, w):
        return _identity(ctx, L, x, f"identity (it gets {h}x{w} images, the size it makes)")
    if th > h or tw > w:  # Keras resizes up then
        raise L.bad(f"enlarges its {h}x{w} input to {th}x{tw}, which tcl's importer does not reproduce.",
                    f"Build the model for at least {th}x{tw} input (input_size=({th}, {tw})).")
    t, le = (h - th) // 2, (w - tw) // 2
    return [ctx.b.add("slice", L.name, [x], {"axes": [1, 2], "starts": [t, le], "ends": [t + th, le + tw],
                                             "steps": [1, 1]}, source=L.cls)]


# --- model structure -------------------------------------------------------------------------------------------------
def _usual_size(name):
    n = str(name or "").lower()
    for prefix, size in USUAL_SIZES:
        if n.startswith(prefix):
            return size
    return DEFAULT_SIZE


def _input_shape(ctx, shp, lname, build_shape=None):
    """The input's shape without batch from a batch_shape (None dims: input_size, else the family's usual size)."""
    if shp is None:
        shp = build_shape
    if shp is None:
        raise ModelError(f"The model config does not say the input shape (layer '{lname}').",
                         "Save the model after building it (call it on data or give Input(shape=...)).")
    shp = list(shp)[1:]
    if len(shp) == 3 and (shp[0] is None or shp[1] is None):
        if ctx.input_size is not None:
            shp[0], shp[1] = ctx.input_size
        else:
            size = _usual_size(ctx.model_name)
            shp[0] = size if shp[0] is None else shp[0]
            shp[1] = size if shp[1] is None else shp[1]
            warnings.warn(f"The model '{ctx.model_name}' accepts any image size; tcl builds it for "
                          f"{shp[0]}x{shp[1]}, the usual size for it. Give another with `input.size` in the recipe, "
                          "`--input-size H W` or input_size=(H, W).", TclNote, stacklevel=2)
    if any(v is None for v in shp):
        raise ModelError(f"The model's input shape {['N'] + shp} has unknown dimensions.",
                         "Re-save the model with a fixed input shape.")
    return tuple(int(v) for v in shp)


def _call_model(ctx, layer, scope, args, kwargs):
    """One call of a nested model inside a Functional one: its inputs, and `training`/`mask` as for any layer."""
    lname = _layer_name(layer)
    L = _Call(_layer_class(layer), lname, lname, scope, args, kwargs)
    L.check_standard_kwargs()
    ins = L.inputs()
    L.finish()
    return _expand(ctx, layer, ins, scope + [lname])


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
                    x = _convert(ctx, layer, scope, [], {})[0]
                continue
            if cls in MODEL_CLASSES:
                x = _expand(ctx, layer, None if x is None else [x], scope + [_layer_name(layer)])[0]
                continue
            if x is None:
                c = layer.get("config") or {}
                shp = c.get("batch_shape") or c.get("batch_input_shape") or top_cfg.get("build_input_shape")
                bc = layer.get("build_config")
                x = b.add_input("input", _input_shape(ctx, shp, _layer_name(layer),
                                                      bc.get("input_shape") if isinstance(bc, dict) else None))
            x = _convert(ctx, layer, scope, [_T(x)], {})[0]
        if x is None:
            raise ModelError("The Sequential model has no layers.", "Check the model file.")
        return [x]
    c = cfg.get("config", cfg)
    known = {_layer_name(l) for l in layers}
    tmap = {}
    for i, (lname, ni, ti) in enumerate(_norm_io_refs(c.get("input_layers"))):
        if feed is not None:
            tmap[(lname, ni, ti)] = feed[i]
        else:
            lay = next((l for l in layers if _layer_name(l) == lname), None)
            if lay is None:
                raise ModelError(f"The model config names an input layer '{lname}' it does not define.",
                                 "The model config may be damaged.")
            bc = lay.get("build_config")
            ctx.build_shapes[lname] = bc.get("input_shape") if isinstance(bc, dict) else None
            tmap[(lname, ni, ti)] = _convert(ctx, lay, scope, [], {})[0]
    pending = [l for l in layers if _layer_class(l) != "InputLayer"]
    while pending:
        rest = []
        for layer in pending:
            lname = _layer_name(layer)
            calls = [_parse_call(call, known, lname) for call in (layer.get("inbound_nodes") or [])]
            if any(tuple(r) not in tmap for call in calls for r in _refs_in(call, [])):
                rest.append(layer)
                continue
            if len(calls) > 1 and _weight_spec(_layer_class(layer), layer.get("config") or {}):
                raise ModelError(f"Layer '{lname}' is shared (called {len(calls)} times); tcl does not support "
                                 "shared layers with weights.", "Use separate layers.")
            for k, (args, kwargs) in enumerate(calls):
                args, kwargs = _resolve(args, tmap), _resolve(kwargs, tmap)
                if _layer_class(layer) in MODEL_CLASSES:
                    outs = _call_model(ctx, layer, scope, args, kwargs)
                else:
                    outs = _convert(ctx, layer, scope, args, kwargs)
                for i, o in enumerate(outs):
                    tmap[(lname, k, i)] = o
        if len(rest) == len(pending):
            names = [_layer_name(l) for l in rest]
            raise ModelError(f"The model config has layers whose inputs are never computed: {names}.",
                             "The model config may be damaged.")
        pending = rest
    outs = []
    for r in _norm_io_refs(c.get("output_layers")):
        if r not in tmap:
            raise ModelError(f"The model's output {r[0]} is never computed.", "The model config may be damaged.")
        outs.append(tmap[r])
    return outs


def _norm_io_refs(v):
    if not v:
        return []
    if isinstance(v[0], str):  # a single ref ["name", 0, 0]
        v = [v]
    return [(r[0], int(r[1]), int(r[2])) for r in v]


def _collect_problems(cfg, scope=(), out=None):
    out = [] if out is None else out
    for layer in _model_layers(cfg):
        cls = _layer_class(layer)
        lname = _layer_name(layer)
        if cls in MODEL_CLASSES:
            _collect_problems(layer, scope + (lname,), out)
            continue
        why = _layer_problem(layer)
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
        problems = _collect_problems(cfg)
        if problems:
            raise unsupported_error(problems, "Keras")
        weights = WeightStore(f)
        if weights.empty() and any(_weight_spec(_layer_class(l), l.get("config", {}))
                                   for l in _model_layers(cfg)):
            raise ModelError(f"'{path}' contains no weights.", "Save the model with its weights.")
        name = (cfg.get("config") or {}).get("name", "model") if isinstance(cfg.get("config"), dict) else "model"
        ctx = _Ctx(GraphBuilder(), weights, major, input_size, name)
        outs = _expand(ctx, cfg, None, [])
    b = ctx.b
    meta = {"format": "keras_h5", "keras_version": keras_version, "input_layout": "NHWC"}
    first = next(iter(b.inputs.values()))
    if len(first) == 3:
        meta["input_size"] = (int(first[0]), int(first[1]))
    pre = _preprocess(b, ctx)
    if pre is not None:
        meta["preprocess"] = pre
    if ctx.notes:
        meta["notes"] = list(ctx.notes)
    g = b.graph(outs, name=name, meta=meta)
    return g


def _preprocess(b, ctx):
    """Compose the Rescaling/Normalization layers (and arithmetic with constants, as Keras' preprocess_input saves it)
    right after the input, past augmentation layers, into one y = x * scale + offset."""
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
        if len(cs) == 1 and cs[0].op == "identity" and cs[0].outputs[0] in ctx.passthrough:
            t = cs[0].outputs[0]  # augmentation before the preprocessing (the TensorFlow tutorial's layout)
            continue
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


__all__ = ["load_keras", "WeightStore", "KERAS"]
