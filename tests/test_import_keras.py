"""Keras import (importers/keras_h5.py): .h5 files built with h5py in the exact layout Keras writes (no Keras
needed), each checked against an independent float64 numpy computation of the same layers, and the importer's
promise: it never drops a config key or a call argument it does not understand."""
import json
import math
import os
import warnings

import numpy as np
import pytest

from transfercl_cli.backends import NumpyBackend
from transfercl_cli.errors import ModelError, TclNote
from transfercl_cli.executor import run_forward
from transfercl_cli.importers import load_model
from transfercl_cli.importers.keras_h5 import KERAS
from transfercl_cli.ops.shapes import infer_shapes

h5py = pytest.importorskip("h5py")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_H5 = os.path.join(ROOT, "sample_data", "models", "mobilenet_v1_1.0_224.h5")
RNG = np.random.default_rng(14)
TOL = 1e-4  # relative to the largest output


# --- Keras's layout ---------------------------------------------------------------------------------------------------
DTYPE = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"}, "registered_name": None}


def kt(src, node=0, index=0):
    """A Keras 3 call argument naming a tensor (as `serialize_node` writes it)."""
    return {"class_name": "__keras_tensor__", "config": {"shape": None, "dtype": "float32",
                                                         "keras_history": [src, node, index]}}


def knp(arr):
    """A Keras 3 numpy constant in a call (serialize_keras_object of an np.ndarray)."""
    a = np.asarray(arr, np.float32)
    return {"class_name": "__numpy__", "config": {"value": a.tolist(), "dtype": "float32"}}


def layer(cls, name, inputs=None, args=None, kwargs=None, **cfg):
    """A Keras 3 layer as the legacy .h5 saver writes it (see the shipped MobileNet's model_config): `inputs` are
    layer names (one: called on that tensor; several: called on the list), or give the call's `args` directly."""
    config = {"name": name, "trainable": True, "dtype": DTYPE}
    config.update(cfg)
    if args is None and inputs is not None:
        args = [kt(inputs[0])] if len(inputs) == 1 else [[kt(i) for i in inputs]]
    nodes = [] if args is None else [{"args": args, "kwargs": dict(kwargs or {})}]
    return {"class_name": cls, "config": config, "name": name, "inbound_nodes": nodes}


def op(cls, name, args, kwargs=None, **cfg):
    """A Keras 3 operation (x + 3.0 saves keras.ops.numpy Add): config {"name"}, the operands as call args."""
    return {"class_name": cls, "config": dict(cfg, name=name), "name": name,
            "inbound_nodes": [{"args": args, "kwargs": dict(kwargs or {})}]}


def tf_op(function, name, first, kwargs):
    """A Keras 2 TFOpLambda layer: one inbound entry [layer, 0, 0, kwargs] (or a _CONSTANT_VALUE first argument)."""
    entry = ["_CONSTANT_VALUE", -1, first, kwargs] if not isinstance(first, str) else [first, 0, 0, kwargs]
    return {"class_name": "TFOpLambda", "config": {"name": name, "trainable": True, "dtype": "float32",
                                                   "function": function}, "name": name, "inbound_nodes": [entry]}


def inp(name="inp", shape=(6, 6, 3)):
    return {"class_name": "InputLayer", "config": {"batch_shape": [None, *shape], "dtype": "float32", "sparse": False,
                                                   "ragged": False, "name": name, "optional": False},
            "name": name, "inbound_nodes": []}


def functional(layers, inputs=("inp",), outputs=("out",), name="model"):
    return {"class_name": "Functional", "config": {
        "name": name, "trainable": True, "layers": list(layers),
        "input_layers": [[i, 0, 0] for i in inputs] if len(inputs) > 1 else [inputs[0], 0, 0],
        "output_layers": [[o, 0, 0] for o in outputs] if len(outputs) > 1 else [outputs[0], 0, 0]}}


def write_h5(path, config, weights=None, keras_version="3.15.1"):
    """weights: {top-level layer name: [(weight name, array)]}, written as Keras' legacy HDF5 saver does."""
    weights = weights or {}
    names = [l["name"] for l in config["config"]["layers"]]
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config)
        f.attrs["keras_version"] = keras_version
        f.attrs["backend"] = "tensorflow"
        root = f.create_group("model_weights")
        root.attrs["layer_names"] = [n.encode() for n in names]
        root.attrs["backend"] = "tensorflow"
        root.attrs["keras_version"] = keras_version
        for lname in names:
            g = root.create_group(lname)
            ws = weights.get(lname, [])
            g.attrs["weight_names"] = [f"{lname}/{n}".encode() for n, _ in ws]
            for n, a in ws:
                g.create_dataset(f"{lname}/{n}", data=np.asarray(a, np.float32))
    return path


def w(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def forward(g, x):
    be = NumpyBackend()  # float64
    out = run_forward(g, be, {next(iter(g.inputs)): x})
    return out[g.outputs[0]]


def check(g, x, ref):
    got = np.asarray(forward(g, x), np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{got.shape} != {ref.shape}"
    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
    assert err <= TOL, f"relative error {err:.3g}"


# Independent numpy versions of the Keras layers (NHWC, float64).
def np_conv(x, k, s=(1, 1), depthwise=False):
    """'valid' convolution; k (kh, kw, cin, cout) or depthwise (kh, kw, c, mult)."""
    kh, kw = k.shape[:2]
    n, h, wd, c = x.shape
    oh, ow = (h - kh) // s[0] + 1, (wd - kw) // s[1] + 1
    out = 0
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + s[0] * (oh - 1) + 1:s[0], j:j + s[1] * (ow - 1) + 1:s[1], :]
            if depthwise:
                out = out + (patch[..., :, None] * k[i, j].astype(np.float64)).reshape(n, oh, ow, -1)
            else:
                out = out + patch @ k[i, j].astype(np.float64)
    return out


_erf = np.vectorize(math.erf)


def np_gelu(v, approximate=False):
    if approximate:
        return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))
    return 0.5 * v * (1 + _erf(v / math.sqrt(2)))


def img(n=2, shape=(6, 6, 3)):
    return RNG.standard_normal((n, *shape))


# --- scalar and constant operands ----------------------------------------------------------------------------------
def hard_sigmoid_model():
    """Keras 3 MobileNetV3's hard_sigmoid, `ReLU(6.0)(x + 3.0) * (1.0 / 6.0)`, inside hard_swish's Multiply layer."""
    W = {"conv": w(1, 1, 3, 4), "head": w(4, 5), "head_b": w(5, scale=0.1)}
    layers = [
        inp(),
        layer("Conv2D", "conv", ["inp"], filters=4, kernel_size=[1, 1], strides=[1, 1], padding="valid",
              data_format="channels_last", dilation_rate=[1, 1], groups=1, activation="linear", use_bias=False),
        op("Add", "add", [kt("conv"), 3.0]),
        layer("ReLU", "re_lu", ["add"], max_value=6.0, negative_slope=0.0, threshold=0.0),
        op("Multiply", "multiply", [kt("re_lu"), 1.0 / 6.0]),
        layer("Multiply", "hard_swish", ["conv", "multiply"]),
        layer("GlobalAveragePooling2D", "gap", ["hard_swish"], data_format="channels_last", keepdims=False),
        layer("Dense", "out", ["gap"], units=5, activation="linear", use_bias=True, quantization_config=None),
    ]
    weights = {"conv": [("kernel", W["conv"])], "out": [("kernel", W["head"]), ("bias", W["head_b"])]}

    def ref(x):
        c = np_conv(x, W["conv"])
        hs = c * np.clip(c + 3.0, 0, 6) / 6.0
        return hs.mean(axis=(1, 2)) @ W["head"] + W["head_b"]

    return functional(layers, name="MobileNetV3Small"), weights, ref


def test_keras3_hard_sigmoid_scalar_call_args(tmp_path):
    """The MobileNetV3 regression: the scalars 3.0 and 1/6 are call arguments; dropping them gave wrong logits."""
    config, weights, ref = hard_sigmoid_model()
    g = load_model(write_h5(tmp_path / "m.h5", config, weights))
    add, mul = g.node("add"), g.node("multiply")
    assert (add.op, add.attrs, add.source) == ("scale", {"scale": 1.0, "offset": 3.0}, "Add")
    assert mul.op == "scale" and mul.attrs == {"scale": pytest.approx(1 / 6), "offset": 0.0}
    assert g.node("hard_swish").op == "mul" and len(g.node("hard_swish").inputs) == 2
    x = img()
    check(g, x, ref(x))


@pytest.mark.parametrize("case", ["c+x", "x+c", "c*x", "x*c", "x-c", "c-x", "x/c", "c/x", "x+v", "v*x", "x-v",
                                  "x/v", "-x", "Add(x,x)+c"])
def test_keras3_arithmetic_with_constants(tmp_path, case):
    """Scalars and per-channel constants on either side of Keras 3 Add/Subtract/Multiply/TrueDivide/Negative."""
    c, v = 2.5, np.asarray([0.5, -1.25, 2.0])
    t, cv = kt("inp"), knp(v)
    cls, args, fn = {
        "c+x": ("Add", [c, t], lambda x: c + x), "x+c": ("Add", [t, c], lambda x: x + c),
        "c*x": ("Multiply", [c, t], lambda x: c * x), "x*c": ("Multiply", [t, c], lambda x: x * c),
        "x-c": ("Subtract", [t, c], lambda x: x - c), "c-x": ("Subtract", [c, t], lambda x: c - x),
        "x/c": ("TrueDivide", [t, c], lambda x: x / c), "c/x": ("TrueDivide", [c, t], lambda x: c / x),
        "x+v": ("Add", [t, cv], lambda x: x + v), "v*x": ("Multiply", [cv, t], lambda x: v * x),
        "x-v": ("Subtract", [t, cv], lambda x: x - v), "x/v": ("Divide", [t, cv], lambda x: x / v),
        "-x": ("Negative", [t], lambda x: -x), "Add(x,x)+c": ("Add", [[t, t, c]], lambda x: x + x + c),
    }[case]
    config = functional([inp(), op(cls, "out", args)])
    g = load_model(write_h5(tmp_path / "m.h5", config))
    assert g.node("out").op == "scale"
    x = img() + (4.0 if "/x" in case else 0.0)  # keep away from 0 for c / x
    check(g, x, fn(x))


def test_keras_subtract_layer_and_tensor_ops(tmp_path):
    """layers.Subtract()([a, b]) and ops on two tensors (x / y, x * y) become the tensor ops."""
    layers = [inp(), layer("ReLU", "r", ["inp"]), layer("Subtract", "sub", ["inp", "r"]),
              op("TrueDivide", "div", [kt("sub"), kt("r")]), op("Add", "shift", [kt("r"), 1.0]),
              op("TrueDivide", "out", [kt("sub"), kt("shift")])]
    g = load_model(write_h5(tmp_path / "m.h5", functional(layers)))
    assert g.node("sub").op == "sub" and g.node("out").op == "div"
    x = img()
    r = np.maximum(x, 0)
    check(g, x, (x - r) / (r + 1.0))


def test_keras_constant_that_is_not_per_channel_is_an_error(tmp_path):
    config = functional([inp(), op("Add", "out", [kt("inp"), knp(np.ones((6, 6, 3)))])])
    with pytest.raises(ModelError, match=r"'out' \(Add\).*varies along more than the last axis"):
        load_model(write_h5(tmp_path / "m.h5", config))
    config = functional([inp(), op("Add", "out", [kt("inp"), "three"])])
    with pytest.raises(ModelError, match=r"'out' \(Add\) has the operand 'three'"):
        load_model(write_h5(tmp_path / "m.h5", config))


def test_keras2_tfoplambda_scalars(tmp_path):
    """tf.keras 2 MobileNetV3: TFOpLambda tf.__operators__.add {"y": 3.0} and tf.math.multiply {"y": 1/6}; a constant
    first argument (3.0 - x) is a _CONSTANT_VALUE entry with the tensor in the kwargs."""
    layers = [
        {"class_name": "InputLayer", "config": {"batch_input_shape": [None, 5, 5, 3], "dtype": "float32",
                                                "sparse": False, "ragged": False, "name": "inp"},
         "name": "inp", "inbound_nodes": []},
        tf_op("__operators__.add", "tf.__operators__.add", "inp", {"y": 3.0, "name": None}),
        {"class_name": "ReLU", "config": {"name": "re_lu", "trainable": True, "dtype": "float32", "max_value": 6.0,
                                          "negative_slope": 0.0, "threshold": 0.0},
         "name": "re_lu", "inbound_nodes": [[["tf.__operators__.add", 0, 0, {}]]]},
        tf_op("math.multiply", "tf.math.multiply", "re_lu", {"y": 0.16666666666666666, "name": None}),
        tf_op("math.subtract", "tf.math.subtract", 3.0, {"y": ["tf.math.multiply", 0, 0], "name": None}),
        tf_op("math.truediv", "out", "tf.math.subtract", {"y": 2.0, "name": None}),
    ]
    config = functional(layers)
    g = load_model(write_h5(tmp_path / "m.h5", config, keras_version="2.13.1"))
    x = img(shape=(5, 5, 3)) * 3
    check(g, x, (3.0 - np.clip(x + 3.0, 0, 6) / 6.0) / 2.0)
    bad = functional(layers[:1] + [tf_op("image.resize", "out", "inp", {"size": [3, 3], "name": None})])
    with pytest.raises(ModelError, match=r"'out' \(TFOpLambda\).*image.resize"):
        load_model(write_h5(tmp_path / "bad.h5", bad, keras_version="2.13.1"))


# --- new layers ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cropping", [[[1, 0], [1, 0]], [[1, 2], [0, 3]], [2, 1], 1])
def test_keras_cropping2d(tmp_path, cropping):
    """NASNetMobile's Cropping2D(((1, 0), (1, 0))) and the other forms Keras accepts."""
    config = functional([inp(shape=(7, 8, 3)), layer("Cropping2D", "out", ["inp"], cropping=cropping,
                                                     data_format="channels_last")])
    g = load_model(write_h5(tmp_path / "m.h5", config))
    n = g.node("out")
    assert n.op == "slice" and n.attrs["axes"] == [1, 2] and n.attrs["steps"] == [1, 1]
    (t, b), (l, r) = ((cropping, cropping), (cropping, cropping)) if isinstance(cropping, int) else (
        cropping if isinstance(cropping[0], list) else ((cropping[0],) * 2, (cropping[1],) * 2))
    x = img(shape=(7, 8, 3))
    check(g, x, x[:, t:7 - b, l:8 - r, :])


@pytest.mark.parametrize("axis,center,scale", [(-1, True, True), ([3], True, False), ([1, 2, 3], False, True),
                                               ([2, 3], True, True)])
def test_keras_layer_normalization(tmp_path, axis, center, scale):
    shape = (4, 5, 6)
    axes = [a % 4 for a in (axis if isinstance(axis, list) else [axis])]
    pshape = tuple(shape[a - 1] for a in axes)
    gamma, beta = 1 + w(*pshape, scale=0.3), w(*pshape, scale=0.3)
    ws = ([("gamma", gamma)] if scale else []) + ([("beta", beta)] if center else [])
    config = functional([inp(shape=shape), layer("LayerNormalization", "out", ["inp"], axis=axis, epsilon=1e-3,
                                                 center=center, scale=scale, rms_scaling=False)])
    g = load_model(write_h5(tmp_path / "m.h5", config, {"out": ws}))
    n = g.node("out")
    assert n.op == "layer_norm" and n.attrs == {"axis": axes[0], "epsilon": 1e-3}
    assert sorted(n.params) == sorted(k for k, _ in ws)
    x = img(shape=shape) * 2 + 1
    ax = tuple(axes)
    mu, var = x.mean(axis=ax, keepdims=True), x.var(axis=ax, keepdims=True)
    y = (x - mu) / np.sqrt(var + 1e-3) * (gamma if scale else 1.0) + (beta if center else 0.0)
    check(g, x, y)


def test_keras_layer_normalization_refusals(tmp_path):
    for axis, why in (([1, 3], "trailing range"), (0, "does not fit")):
        config = functional([inp(shape=(4, 5, 6)), layer("LayerNormalization", "out", ["inp"], axis=axis,
                                                         epsilon=1e-3, center=False, scale=False)])
        with pytest.raises(ModelError, match=why):
            load_model(write_h5(tmp_path / "m.h5", config))
    config = functional([inp(shape=(4, 5, 6)), layer("LayerNormalization", "out", ["inp"], axis=-1, epsilon=1e-3,
                                                     center=False, scale=False, rms_scaling=True)])
    with pytest.raises(ModelError, match="rms_scaling"):
        load_model(write_h5(tmp_path / "m.h5", config))


GELU_FN = {"module": "keras.activations", "class_name": "function", "config": "gelu", "registered_name": "function"}


def test_keras_gelu(tmp_path):
    """Activation('gelu') and activation='gelu' on a Dense (string or serialized function): Keras's gelu is the
    exact (erf) form; keras.ops.gelu defaults to the tanh form."""
    k1, b1, k2 = w(6, 5), w(5, scale=0.1), w(5, 4)
    layers = [inp(shape=(6,)), layer("Dense", "d1", ["inp"], units=5, activation="gelu", use_bias=True,
                                     quantization_config=None),
              layer("Activation", "act", ["d1"], activation="gelu"),
              layer("Dense", "d2", ["act"], units=4, activation=GELU_FN, use_bias=False, quantization_config=None),
              op("Gelu", "out", [kt("d2")], approximate=True)]
    g = load_model(write_h5(tmp_path / "m.h5", functional(layers), {"d1": [("kernel", k1), ("bias", b1)],
                                                                     "d2": [("kernel", k2)]}))
    assert [g.node(n).attrs["approximate"] for n in ("d1/gelu", "act", "d2/gelu", "out")] == [
        "none", "none", "none", "tanh"]
    x = RNG.standard_normal((3, 6)) * 2
    y = np_gelu(np_gelu(np_gelu(x @ k1 + b1)) @ k2)
    check(g, x, np_gelu(y, approximate=True))


def augmentation_model():
    """The TensorFlow transfer-learning tutorial in Keras 3: Sequential augmentation (RandomFlip, RandomRotation)
    right after the input, mobilenet_v2.preprocess_input (x / 127.5 - 1, saved as TrueDivide and Subtract
    operations), the base model called with training=False, then pooling, dropout and a one-logit head."""
    W = {"stem": w(3, 3, 3, 4), "bn_g": 1 + w(4, scale=0.2), "bn_b": w(4, scale=0.1), "bn_m": w(4, scale=0.1),
         "bn_v": 1 + np.abs(w(4, scale=0.2)), "head": w(4, 1), "head_b": w(1, scale=0.1)}
    aug = {"class_name": "Sequential", "config": {
        "name": "data_augmentation", "trainable": True, "dtype": DTYPE, "layers": [
            inp("aug_in", (8, 8, 3)),
            layer("RandomFlip", "random_flip", seed=None, mode="horizontal", data_format="channels_last"),
            layer("RandomRotation", "random_rotation", factor=[-0.2, 0.2], data_format="channels_last",
                  fill_mode="reflect", fill_value=0.0, interpolation="bilinear", seed=None)],
        "build_input_shape": [None, 8, 8, 3]}, "name": "data_augmentation",
        "inbound_nodes": [{"args": [kt("inp")], "kwargs": {}}]}
    base = {"class_name": "Functional", "config": {
        "name": "mobilenetv2_1.00_8", "trainable": False, "layers": [
            inp("input_1", (8, 8, 3)),
            layer("Conv2D", "Conv1", ["input_1"], filters=4, kernel_size=[3, 3], strides=[2, 2], padding="valid",
                  data_format="channels_last", dilation_rate=[1, 1], groups=1, activation="linear", use_bias=False),
            layer("BatchNormalization", "bn_Conv1", ["Conv1"], kwargs={"mask": None}, axis=-1, momentum=0.999,
                  epsilon=1e-3, center=True, scale=True, synchronized=False),
            layer("ReLU", "out_relu", ["bn_Conv1"], max_value=6.0, negative_slope=0.0, threshold=0.0)],
        "input_layers": [["input_1", 0, 0]], "output_layers": [["out_relu", 0, 0]]},
        "name": "mobilenetv2_1.00_8", "inbound_nodes": [{"args": [kt("subtract")], "kwargs": {"training": False}}]}
    layers = [inp(shape=(8, 8, 3)), aug,
              op("TrueDivide", "true_divide", [kt("data_augmentation"), 127.5]),
              op("Subtract", "subtract", [kt("true_divide"), 1.0]), base,
              layer("GlobalAveragePooling2D", "gap", ["mobilenetv2_1.00_8"], data_format="channels_last",
                    keepdims=False),
              layer("Dropout", "dropout", ["gap"], kwargs={"training": None}, rate=0.2, seed=None, noise_shape=None),
              layer("Dense", "out", ["dropout"], units=1, activation="linear", use_bias=True, quantization_config=None)]
    # The base model's weights live in its own top-level group in the legacy layout, named LAYER/VARIABLE.
    weights = {"mobilenetv2_1.00_8": [("Conv1/kernel", W["stem"]), ("bn_Conv1/gamma", W["bn_g"]),
                                      ("bn_Conv1/beta", W["bn_b"]), ("bn_Conv1/moving_mean", W["bn_m"]),
                                      ("bn_Conv1/moving_variance", W["bn_v"])],
               "out": [("kernel", W["head"]), ("bias", W["head_b"])]}

    def ref(x):
        v = x / 127.5 - 1.0
        c = np_conv(v, W["stem"], (2, 2))
        c = (c - W["bn_m"]) / np.sqrt(W["bn_v"] + 1e-3) * W["bn_g"] + W["bn_b"]
        return np.clip(c, 0, 6).mean(axis=(1, 2)) @ W["head"] + W["head_b"]

    return functional(layers, name="tutorial"), weights, ref


def write_nested(path, config, weights):
    """write_h5 for nested models: the top-level groups are the outer model's layers, nested weights named
    'LAYER/VARIABLE' inside the nested model's group."""
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config)
        f.attrs["keras_version"] = "3.15.1"
        root = f.create_group("model_weights")
        names = [l["name"] for l in config["config"]["layers"]]
        root.attrs["layer_names"] = [n.encode() for n in names]
        for lname in names:
            g = root.create_group(lname)
            ws = weights.get(lname, [])
            full = [n if "/" in n else f"{lname}/{n}" for n, _ in ws]
            g.attrs["weight_names"] = [n.encode() for n in full]
            for n, (_, a) in zip(full, ws):
                g.create_dataset(n, data=a)
    return path


def test_keras_tutorial_augmentation_layout(tmp_path):
    config, weights, ref = augmentation_model()
    g = load_model(write_nested(tmp_path / "m.h5", config, weights))
    assert g.node("random_flip").op == "identity" and g.node("random_rotation").op == "identity"
    assert g.meta["notes"] == ["RandomFlip 'random_flip': identity at inference (random augmentation; tcl trains "
                               "with the recipe's)", "RandomRotation 'random_rotation': identity at inference "
                               "(random augmentation; tcl trains with the recipe's)"]
    # preprocess_input after the augmentation is the model's own input scaling.
    pre = g.meta["preprocess"]
    assert pre["in_model"] and pre["scale"] == pytest.approx(1 / 127.5) and pre["offset"] == pytest.approx(-1.0)
    x = RNG.uniform(0, 255, (2, 8, 8, 3))
    check(g, x, ref(x))


def test_inspect_prints_notes(tmp_path):
    from transfercl_cli.inspect_model import inspect_model

    config, weights, _ref = augmentation_model()
    text = inspect_model(str(write_nested(tmp_path / "m.h5", config, weights)))["text"]
    assert "note: RandomFlip 'random_flip': identity at inference" in text
    assert "note: RandomRotation 'random_rotation': identity at inference" in text


@pytest.mark.parametrize("cls,extra", [
    ("RandomZoom", dict(height_factor=0.2, width_factor=None, fill_mode="reflect", interpolation="bilinear",
                        seed=None, fill_value=0.0, data_format="channels_last")),
    ("RandomTranslation", dict(height_factor=0.1, width_factor=0.1, fill_mode="reflect", interpolation="bilinear",
                               seed=None, fill_value=0.0, data_format="channels_last")),
    ("RandomContrast", dict(factor=[0.2, 0.2], value_range=[0, 255], seed=None)),
    ("RandomBrightness", dict(factor=[-0.2, 0.2], value_range=[0, 255], seed=None)),
    ("RandomCrop", dict(height=6, width=6, seed=None, data_format="channels_last")),
    ("Resizing", dict(height=6, width=6, interpolation="bilinear", crop_to_aspect_ratio=False,
                      pad_to_aspect_ratio=False, fill_mode="constant", fill_value=0.0, antialias=False,
                      data_format="channels_last")),
    ("CenterCrop", dict(height=6, width=6, data_format="channels_last")),
])
def test_keras_identity_at_inference(tmp_path, cls, extra):
    config = functional([inp(), layer(cls, "out", ["inp"], **extra)])
    g = load_model(write_h5(tmp_path / "m.h5", config))
    assert g.node("out").op == "identity" and g.meta["notes"][0].startswith(f"{cls} 'out': identity")
    x = img()
    check(g, x, x)


def test_keras_crop_and_resize_to_another_size(tmp_path):
    """CenterCrop to a smaller size is a slice; RandomCrop and Resizing to another size are refused (Keras resizes,
    or passes the image through, at inference, depending on its version)."""
    config = functional([inp(shape=(7, 8, 3)), layer("CenterCrop", "out", ["inp"], height=4, width=5,
                                                     data_format="channels_last")])
    g = load_model(write_h5(tmp_path / "m.h5", config))
    x = img(shape=(7, 8, 3))
    check(g, x, x[:, 1:5, 1:6, :])
    for cls, extra in (("RandomCrop", dict(height=4, width=4, seed=None, data_format="channels_last")),
                       ("Resizing", dict(height=3, width=3, interpolation="bilinear", crop_to_aspect_ratio=False,
                                         data_format="channels_last"))):
        config = functional([inp(), layer(cls, "out", ["inp"], **extra)])
        with pytest.raises(ModelError, match=rf"'out' \({cls}\) makes \dx\d images from its 6x6 input"):
            load_model(write_h5(tmp_path / "m.h5", config))


def test_keras_training_true_call_is_refused(tmp_path):
    config = functional([inp(), layer("RandomFlip", "out", ["inp"], kwargs={"training": True}, mode="horizontal",
                                      seed=None)])
    with pytest.raises(ModelError, match=r"'out' \(RandomFlip\) is called with training=True"):
        load_model(write_h5(tmp_path / "m.h5", config))


# --- any input size ---------------------------------------------------------------------------------------------------
def test_keras_any_size_input_takes_the_usual_size(tmp_path):
    """Keras MobileNetV3 built with input_shape=None: 224x224 with a note, unless input_size is given."""
    layers = [inp(shape=(None, None, 3)), layer("GlobalAveragePooling2D", "out", ["inp"], keepdims=True,
                                                  data_format="channels_last")]
    path = write_h5(tmp_path / "any.h5", functional(layers, name="MobileNetV3Small"))
    with pytest.warns(TclNote, match=r"'MobileNetV3Small' accepts any image size; tcl builds it for 224x224"):
        g = load_model(path)
    assert g.inputs == {"inp": (224, 224, 3)} and g.meta["input_size"] == (224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TclNote)
        g = load_model(path, input_size=(5, 7))
    assert g.inputs == {"inp": (5, 7, 3)} and infer_shapes(g)[g.outputs[0]] == (1, 1, 3)
    path = write_h5(tmp_path / "b3.h5", functional(layers, name="efficientnetb3"))
    with pytest.warns(TclNote, match="300x300"):
        assert load_model(path).inputs == {"inp": (300, 300, 3)}


# --- the importer never drops what it does not understand -----------------------------------------------------------
def test_keras_unknown_config_key_is_an_error(tmp_path):
    config, weights, _ref = hard_sigmoid_model()
    config["config"]["layers"][1]["config"]["sparsity_mode"] = "2:4"
    with pytest.raises(ModelError, match=r"Keras layer 'conv' \(Conv2D\) has the setting sparsity_mode='2:4'"):
        load_model(write_h5(tmp_path / "m.h5", config, weights))


def test_keras_unknown_call_argument_is_an_error(tmp_path):
    config, weights, _ref = hard_sigmoid_model()
    config["config"]["layers"][3]["inbound_nodes"][0]["kwargs"]["clip_value"] = 4.0  # the ReLU
    with pytest.raises(ModelError, match=r"'re_lu' \(ReLU\) is called with the argument clip_value=4.0"):
        load_model(write_h5(tmp_path / "m.h5", config, weights))
    config, weights, _ref = hard_sigmoid_model()
    config["config"]["layers"][2]["inbound_nodes"][0]["args"].append(1.0)  # Add(x, 3.0, 1.0)
    with pytest.raises(ModelError, match=r"'add' \(Add\) is called with 3 positional operands, expected 2"):
        load_model(write_h5(tmp_path / "m.h5", config, weights))


def test_keras_quantized_dtype_is_refused(tmp_path):
    config, weights, _ref = hard_sigmoid_model()
    config["config"]["layers"][1]["config"]["dtype"] = {
        "module": "keras", "class_name": "QuantizedDTypePolicy",
        "config": {"name": "int8_from_float32", "source_name": "float32"}, "registered_name": None}
    with pytest.raises(ModelError, match=r"'conv' \(Conv2D\) has the dtype policy"):
        load_model(write_h5(tmp_path / "m.h5", config, weights))


CONV = dict(kernel_size=[3, 3], strides=[1, 1], padding="same", data_format="channels_last", dilation_rate=[1, 1],
            activation="relu", use_bias=True)
AUG = dict(seed=None, data_format="channels_last")


def samples():
    """One small valid use of every registered Keras class: cls -> (layers, weights); the layer under test is 't'
    (for InputLayer: the input 't' itself). Input (N, 6, 6, 3), or (N, 6) where the layer needs a flat input."""
    flat = inp(shape=(6,))
    s = {
        "InputLayer": ([inp("t"), layer("ReLU", "out", ["t"])], {}),
        "Conv2D": ([layer("Conv2D", "t", ["inp"], filters=2, groups=1, **CONV)],
                   {"t": [("kernel", w(3, 3, 3, 2)), ("bias", w(2))]}),
        "DepthwiseConv2D": ([layer("DepthwiseConv2D", "t", ["inp"], depth_multiplier=2, **CONV)],
                            {"t": [("kernel", w(3, 3, 3, 2)), ("bias", w(6))]}),
        "SeparableConv2D": ([layer("SeparableConv2D", "t", ["inp"], filters=2, depth_multiplier=1, **CONV)],
                            {"t": [("depthwise_kernel", w(3, 3, 3, 1)), ("pointwise_kernel", w(1, 1, 3, 2)),
                                   ("bias", w(2))]}),
        "Dense": ([flat, layer("Dense", "t", ["inp"], units=2, activation="linear", use_bias=True,
                               quantization_config=None)], {"t": [("kernel", w(6, 2)), ("bias", w(2))]}),
        "BatchNormalization": ([layer("BatchNormalization", "t", ["inp"], axis=-1, momentum=0.99, epsilon=1e-3,
                                      center=True, scale=True, synchronized=False, renorm=False,
                                      renorm_clipping=None, renorm_momentum=0.99)],
                               {"t": [("gamma", w(3)), ("beta", w(3)), ("moving_mean", w(3)),
                                      ("moving_variance", 1 + np.abs(w(3)))]}),
        "LayerNormalization": ([layer("LayerNormalization", "t", ["inp"], axis=-1, epsilon=1e-3, center=True,
                                      scale=True, rms_scaling=False)], {"t": [("gamma", w(3)), ("beta", w(3))]}),
        "ReLU": ([layer("ReLU", "t", ["inp"], max_value=6.0, negative_slope=0.0, threshold=0.0)], {}),
        "LeakyReLU": ([layer("LeakyReLU", "t", ["inp"], negative_slope=0.1)], {}),
        "Softmax": ([layer("Softmax", "t", ["inp"], axis=-1)], {}),
        "Activation": ([layer("Activation", "t", ["inp"], activation="gelu")], {}),
        "Gelu": ([op("Gelu", "t", [kt("inp")], approximate=False)], {}),
        "ZeroPadding2D": ([layer("ZeroPadding2D", "t", ["inp"], padding=[[0, 1], [0, 1]],
                                 data_format="channels_last")], {}),
        "Cropping2D": ([layer("Cropping2D", "t", ["inp"], cropping=[[1, 0], [1, 0]], data_format="channels_last")],
                       {}),
        "MaxPooling2D": ([layer("MaxPooling2D", "t", ["inp"], pool_size=[2, 2], padding="valid", strides=[2, 2],
                                data_format="channels_last")], {}),
        "AveragePooling2D": ([layer("AveragePooling2D", "t", ["inp"], pool_size=[2, 2], padding="same",
                                    strides=[2, 2], data_format="channels_last")], {}),
        "GlobalAveragePooling2D": ([layer("GlobalAveragePooling2D", "t", ["inp"], data_format="channels_last",
                                          keepdims=False)], {}),
        "Dropout": ([layer("Dropout", "t", ["inp"], rate=0.2, seed=None, noise_shape=None)], {}),
        "Flatten": ([layer("Flatten", "t", ["inp"], data_format="channels_last")], {}),
        "Reshape": ([layer("Reshape", "t", ["inp"], target_shape=[36, 3])], {}),
        "Identity": ([layer("Identity", "t", ["inp"])], {}),
        "Add": ([layer("Add", "t", ["inp", "inp"])], {}),
        "Subtract": ([layer("Subtract", "t", ["inp", "inp"])], {}),
        "Multiply": ([layer("Multiply", "t", ["inp", "inp"])], {}),
        "TrueDivide": ([op("TrueDivide", "t", [kt("inp"), 127.5])], {}),
        "Divide": ([op("Divide", "t", [kt("inp"), 2.0])], {}),
        "Negative": ([op("Negative", "t", [kt("inp")])], {}),
        "TFOpLambda": ([tf_op("math.multiply", "t", "inp", {"y": 2.0, "name": None})], {}),
        "Concatenate": ([layer("Concatenate", "t", ["inp", "inp"], axis=-1)], {}),
        "Rescaling": ([layer("Rescaling", "t", ["inp"], scale=1 / 127.5, offset=-1.0)], {}),
        "Normalization": ([layer("Normalization", "t", ["inp"], axis=-1, invert=False, mean=[0.1, 0.2, 0.3],
                                 variance=[1.0, 2.0, 3.0])], {}),
        "RandomFlip": ([layer("RandomFlip", "t", ["inp"], mode="horizontal_and_vertical", **AUG)], {}),
        "RandomRotation": ([layer("RandomRotation", "t", ["inp"], factor=[-0.1, 0.1], fill_mode="reflect",
                                  fill_value=0.0, interpolation="bilinear", **AUG)], {}),
        "RandomZoom": ([layer("RandomZoom", "t", ["inp"], height_factor=0.1, width_factor=None,
                              fill_mode="reflect", fill_value=0.0, interpolation="bilinear", **AUG)], {}),
        "RandomTranslation": ([layer("RandomTranslation", "t", ["inp"], height_factor=0.1, width_factor=0.1,
                                     fill_mode="reflect", fill_value=0.0, interpolation="bilinear", **AUG)], {}),
        "RandomContrast": ([layer("RandomContrast", "t", ["inp"], factor=[0.1, 0.1], value_range=[0, 255],
                                  seed=None)], {}),
        "RandomBrightness": ([layer("RandomBrightness", "t", ["inp"], factor=[-0.1, 0.1], value_range=[0, 255],
                                    seed=None)], {}),
        "RandomCrop": ([layer("RandomCrop", "t", ["inp"], height=6, width=6, **AUG)], {}),
        "Resizing": ([layer("Resizing", "t", ["inp"], height=6, width=6, interpolation="bilinear",
                            crop_to_aspect_ratio=False, data_format="channels_last")], {}),
        "CenterCrop": ([layer("CenterCrop", "t", ["inp"], height=4, width=4, data_format="channels_last")], {}),
    }
    # Aliases: the same converter under another class name.
    for alias, cls in (("Convolution2D", "Conv2D"), ("SeparableConvolution2D", "SeparableConv2D"),
                       ("MaxPool2D", "MaxPooling2D"), ("AvgPool2D", "AveragePooling2D"),
                       ("GlobalAvgPool2D", "GlobalAveragePooling2D")):
        layers, ws = s[cls]
        s[alias] = ([dict(l, class_name=alias) if l["name"] == "t" else l for l in layers], ws)
    out = {}
    for cls, (layers, ws) in s.items():
        if layers[0]["class_name"] != "InputLayer":
            layers = [inp()] + layers
        names = [l["name"] for l in layers]
        outs = "out" if "out" in names else "t"
        out[cls] = (functional(layers, inputs=(layers[0]["name"],), outputs=(outs,)), ws)
    return out


SAMPLES = samples()


def test_every_registered_converter_has_a_sample():
    """A new converter needs a sample here, so the two tests below cover it too."""
    assert set(SAMPLES) == set(KERAS.table)


def _target(config):
    return next(l for l in config["config"]["layers"] if l["name"] == "t")


@pytest.mark.parametrize("cls", sorted(SAMPLES))
def test_every_converter_refuses_an_unknown_setting(tmp_path, cls):
    config, ws = SAMPLES[cls]
    load_model(write_h5(tmp_path / "ok.h5", config, ws))  # the sample itself imports
    bad = json.loads(json.dumps(config))
    _target(bad)["config"]["surprise_setting"] = 17
    with pytest.raises(ModelError, match=rf"Keras layer 't' \({cls}\) has the setting surprise_setting=17"):
        load_model(write_h5(tmp_path / "bad.h5", bad, ws))


@pytest.mark.parametrize("cls", sorted(set(SAMPLES) - {"InputLayer"}))
def test_every_converter_refuses_an_unknown_call_argument(tmp_path, cls):
    bad, ws = SAMPLES[cls]
    bad = json.loads(json.dumps(bad))
    call = _target(bad)["inbound_nodes"][0]
    if isinstance(call, dict):  # Keras 3
        call["kwargs"]["surprise_arg"] = 17
    else:  # Keras 2: [layer, node, tensor, kwargs]
        call[3]["surprise_arg"] = 17
    with pytest.raises(ModelError, match=rf"'t' \({cls}\) is called with the argument surprise_arg=17"):
        load_model(write_h5(tmp_path / "bad.h5", bad, ws))


def test_shipped_mobilenet_imports_with_every_key_understood():
    """The real Keras 3.15 MobileNet V1 file: every config key and call argument is read or known irrelevant."""
    if not os.path.exists(SHIPPED_H5):
        pytest.skip("sample_data/models/mobilenet_v1_1.0_224.h5 is not in this checkout")
    with h5py.File(SHIPPED_H5, "r") as f:
        cfg = json.loads(f.attrs["model_config"])
    classes = {l["class_name"] for l in cfg["config"]["layers"]}
    assert classes <= set(KERAS.table), classes - set(KERAS.table)
    g = load_model(SHIPPED_H5)
    assert len(g.nodes) == len(cfg["config"]["layers"]) - 1 + sum(
        1 for l in cfg["config"]["layers"] if l["config"].get("activation") not in (None, "linear")
        and l["class_name"] != "Activation")
    assert g.num_params() == 4253864 and "notes" not in g.meta


def test_keras_unsupported_layers_listed_together(tmp_path):
    layers = [inp(shape=(8, 8, 3)),
              layer("Conv2DTranspose", "up", ["inp"], filters=3, kernel_size=[2, 2]),
              layer("ReLU", "thr", ["up"], max_value=None, negative_slope=0.0, threshold=0.5),
              layer("Conv2D", "selu_conv", ["thr"], filters=3, kernel_size=[1, 1], activation="selu"),
              layer("UpSampling2D", "ups", ["selu_conv"], size=[2, 2]),
              tf_op("image.resize", "out", "ups", {"size": [3, 3]})]
    with pytest.raises(ModelError) as ei:
        load_model(write_h5(tmp_path / "bad.h5", functional(layers)))
    msg = str(ei.value)
    for name, typ in (("up", "Conv2DTranspose"), ("thr", "ReLU"), ("selu_conv", "Conv2D"), ("ups", "UpSampling2D"),
                      ("out", "TFOpLambda")):
        assert f"'{name}' ({typ})" in msg
    assert "threshold" in msg and "selu" in msg and "image.resize" in msg


def test_keras2_sequential_first_layer_input_shape_and_uint8_input(tmp_path):
    """tf.keras 2 Sequential without an InputLayer: the first layer's batch_input_shape builds the input. A uint8
    InputLayer is fed float32 pixels, with a note."""
    k, b = w(3, 3, 3, 2), w(2, scale=0.1)
    config = {"class_name": "Sequential", "config": {"name": "seq", "layers": [
        {"class_name": "Conv2D", "config": {"name": "c", "trainable": True, "dtype": "float32",
                                            "batch_input_shape": [None, 5, 5, 3], "filters": 2, "kernel_size": [3, 3],
                                            "strides": [1, 1], "padding": "valid", "data_format": "channels_last",
                                            "dilation_rate": [1, 1], "groups": 1, "activation": "relu",
                                            "use_bias": True}},
        {"class_name": "Flatten", "config": {"name": "out", "trainable": True, "dtype": "float32",
                                             "data_format": "channels_last"}}]}}
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.attrs["model_config"] = json.dumps(config)
        f.attrs["keras_version"] = "2.13.1"
        g = f.create_group("model_weights")
        g.attrs["layer_names"] = [b"c", b"out"]
        for lname, ws in (("c", [("kernel:0", k), ("bias:0", b)]), ("out", [])):
            grp = g.create_group(lname)
            grp.attrs["weight_names"] = [f"{lname}/{n}".encode() for n, _ in ws]
            for n, a in ws:
                grp.create_dataset(f"{lname}/{n}", data=a)
    g = load_model(tmp_path / "s.h5")
    x = img(shape=(5, 5, 3))
    check(g, x, np.maximum(np_conv(x, k) + b, 0).reshape(2, -1))
    u8 = inp(shape=(6, 6, 3))
    u8["config"]["dtype"] = "uint8"
    g = load_model(write_h5(tmp_path / "u8.h5", functional([u8, layer("ReLU", "out", ["inp"])])))
    assert g.meta["notes"] == ["InputLayer 'inp': declared uint8; tcl feeds float32 pixels"]
