"""The zoo's model builders and references (the half of bench/zoo.py that needs PyTorch / Keras).

    python bench/zoo_build.py build NAME OUT_FILE          # random-weight model -> OUT_FILE (.onnx or .h5)
    python bench/zoo_build.py ref NAME MODEL_FILE X.npy OUT.npz   # the reference logits for the NHWC batch X
    python bench/zoo_build.py diverge NAME MODEL_FILE X.npy TCL.npz TOL  # first Keras layer tcl departs from

bench/zoo.py runs these as subprocesses (so that tcl's own process never imports torch or keras) and caches what they
write; see its docstring for the environment. Keras runs with KERAS_BACKEND=torch, except NASNetMobile, which
keras.applications refuses to build on torch: JAX.

Every model has random weights (fixed seeds). BatchNorm gamma/beta are random; the moving mean/variance are measured on
8 photos of sample_data/dogs-cats in training mode (so activations keep the scale of a trained network instead of
growing layer after layer, as they do with made-up statistics: Inception v3's logits reached 4e13) and then
perturbed (mean + U(-0.2, 0.2) std, var x U(0.7, 1.4)), so that BN folding in tcl is exercised with non-trivial
statistics. ConvNeXt's LayerNorm affine and layer-scale factors are random too (torchvision initialises the latter to
1e-6, which would leave the blocks almost unused).
"""
import os
import sys

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "torch")

SEED = 0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the zoo: name -> spec ----------------------------------------------------------------------------------------
# torchvision: (constructor name, kwargs, input size). Each is exported twice, ONNX opsets 13 and 17.
TORCHVISION = {
    "alexnet": ("alexnet", {}, 224),
    "vgg11": ("vgg11", {}, 224),
    "googlenet": ("googlenet", {"init_weights": True}, 224),
    "inception_v3": ("inception_v3", {"init_weights": True}, 299),
    "resnet18": ("resnet18", {}, 224),
    "resnet50": ("resnet50", {}, 224),
    "squeezenet1_1": ("squeezenet1_1", {}, 224),
    "shufflenet_v2_x1_0": ("shufflenet_v2_x1_0", {}, 224),
    "mobilenet_v2": ("mobilenet_v2", {}, 224),
    "mobilenet_v3_small": ("mobilenet_v3_small", {}, 224),
    "mobilenet_v3_large": ("mobilenet_v3_large", {}, 224),
    "efficientnet_b0": ("efficientnet_b0", {}, 224),
    "densenet121": ("densenet121", {}, 224),
    "regnet_x_400mf": ("regnet_x_400mf", {}, 224),
    "mnasnet1_0": ("mnasnet1_0", {}, 224),
    "convnext_tiny": ("convnext_tiny", {}, 224),
}
OPSETS = (13, 17)

# Keras: (builder key, input size, preprocessing family). Preprocessing families (the same array goes to both sides):
#   tf     x / 127.5 - 1                      (MobileNet, MobileNetV2, Xception, NASNet)
#   torch  (x / 255 - mean) / std             (Keras DenseNet, torchvision)
#   caffe  BGR, x - [103.939, 116.779, 123.68] (Keras ResNet50)
#   raw    pixels 0..255: the model rescales itself (EfficientNet, MobileNetV3, the tutorial's Rescaling layer)
KERAS = {
    "k_mobilenet": (224, "tf"),
    "k_mobilenetv2": (224, "tf"),
    "k_mobilenetv3small": (224, "raw"),
    "k_mobilenetv3large": (224, "raw"),
    "k_xception": (299, "tf"),
    "k_nasnetmobile": (224, "tf", "jax"),  # keras.applications refuses NASNet on the torch backend
    "k_resnet50": (224, "caffe"),
    "k_efficientnetb0": (224, "raw"),
    "k_densenet121": (224, "torch"),
    "k_nested_functional": (224, "tf"),
    "k_nested_sequential": (224, "tf"),
    "k_tf_tutorial": (160, "raw"),
}


def zoo():
    """Every row of the table: name -> dict(name, family, base, fmt, opset, size, pre, ext)."""
    out = {}
    for base, (_, _, size) in TORCHVISION.items():
        for op in OPSETS:
            name = f"{base}-onnx{op}"
            out[name] = dict(name=name, family="torchvision", base=base, fmt=f"ONNX opset {op} (torch.onnx)",
                             opset=op, size=size, pre="torch", ext=".onnx")
    for base, (size, pre, *backend) in KERAS.items():
        kb = backend[0] if backend else "torch"
        out[base] = dict(name=base, family="keras", base=base,
                         fmt="Keras 3 .h5 (legacy save)" + (f", {kb} backend" if kb != "torch" else ""),
                         opset=None, size=size, pre=pre, ext=".h5", keras_backend=kb)
    return out


# --- torchvision ----------------------------------------------------------------------------------------------------
def calibration_images(size, pre, n=8):
    """n real photos (sample_data/dogs-cats, stretched to size) in a preprocessing family's range, NHWC float32."""
    from PIL import Image

    root = os.path.join(ROOT, "sample_data", "dogs-cats")
    files = [os.path.join(root, c, f"{c}_{i:04d}.png") for i in range(120, 120 + n // 2) for c in ("cat", "dog")]
    x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR), np.float32)
                  for f in files])
    if pre == "torch":
        return (x / 255.0 - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
    if pre == "tf":
        return x / 127.5 - 1.0
    if pre == "caffe":
        return x[..., ::-1] - np.float32([103.939, 116.779, 123.68])
    return x


def _bn_ranges(rng, c):
    """gamma, beta, and the factors that perturb calibrated statistics: mean + shift * std, var * factor."""
    return (rng.uniform(0.5, 1.5, c), rng.uniform(-0.2, 0.2, c), rng.uniform(-0.2, 0.2, c), rng.uniform(0.7, 1.4, c))


def _randomise_torch(model, torch, x):
    """Random gamma/beta (and LayerNorm affine, ConvNeXt layer scale), then BatchNorm statistics measured on the
    calibration batch x in training mode (so activations keep a trained network's scale instead of growing layer
    after layer), then perturbed: mean + U(-0.2, 0.2) * std, var * U(0.7, 1.4)."""
    rng = np.random.default_rng(SEED + 1)

    def t(a, like):
        return torch.as_tensor(np.asarray(a, np.float32)).reshape(like.shape)

    bns, perturb = [], {}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                gamma, beta, shift, factor = _bn_ranges(rng, m.num_features)
                if m.affine:
                    m.weight.copy_(t(gamma, m.weight))
                    m.bias.copy_(t(beta, m.bias))
                perturb[m] = (shift, factor)
                bns.append((m, m.momentum))
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one batch gives its own statistics
            elif isinstance(m, torch.nn.LayerNorm):  # also torchvision's LayerNorm2d
                if m.weight is not None:
                    m.weight.copy_(t(rng.uniform(0.5, 1.5, m.weight.numel()), m.weight))
                if m.bias is not None:
                    m.bias.copy_(t(rng.uniform(-0.2, 0.2, m.bias.numel()), m.bias))
            if isinstance(getattr(m, "layer_scale", None), torch.nn.Parameter):  # ConvNeXt CNBlock, init 1e-6
                m.layer_scale.copy_(t(rng.uniform(0.1, 1.0, m.layer_scale.numel()), m.layer_scale))
        model.train()
        model(torch.as_tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
        model.eval()
        for m, mom in bns:
            shift, factor = perturb[m]
            std = m.running_var.sqrt()
            m.running_mean.add_(t(shift, std) * std)
            m.running_var.mul_(t(factor, std))
            m.momentum = mom


def build_torchvision(spec, out):
    import torch
    import torchvision

    torch.manual_seed(SEED)
    ctor, kwargs, size = TORCHVISION[spec["base"]]
    model = getattr(torchvision.models, ctor)(weights=None, **kwargs).eval()
    _randomise_torch(model, torch, calibration_images(size, "torch"))
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        torch.onnx.export(model, (x,), out, opset_version=spec["opset"], dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})


# --- Keras ----------------------------------------------------------------------------------------------------------
def _walk(layer):
    yield layer
    for sub in getattr(layer, "layers", []) or []:
        yield from _walk(sub)


def _randomise_keras(model, x):
    """As _randomise_torch: random gamma/beta, moving statistics measured on x (training mode, momentum 0; nested
    models first, on U(-1, 1) input of their own shape, then the whole model, which overwrites what it reaches),
    then perturbed."""
    import keras

    rng = np.random.default_rng(SEED + 1)
    bns = [l for l in _walk(model) if isinstance(l, keras.layers.BatchNormalization)]
    saved = [(l, l.trainable) for l in _walk(model)]
    for l in _walk(model):
        l.trainable = True  # a frozen BatchNorm ignores training=True in Keras 3
    moms = {}
    for l in bns:
        w = {v.path.split("/")[-1]: v for v in l.weights}
        gamma, beta, _, _ = _bn_ranges(rng, int(w["moving_mean"].shape[0]))
        if "gamma" in w:
            w["gamma"].assign(gamma.astype(np.float32))
        if "beta" in w:
            w["beta"].assign(beta.astype(np.float32))
        moms[l] = l.momentum
        l.momentum = 0.0
    for sub in [l for l in _walk(model) if isinstance(l, keras.Model) and l is not model]:
        if any(isinstance(l, keras.layers.BatchNormalization) for l in _walk(sub)):
            shape = (len(x),) + tuple(int(d) for d in sub.inputs[0].shape[1:])
            sub(np.random.default_rng(SEED + 2).uniform(-1, 1, shape).astype(np.float32), training=True)
    model(x, training=True)
    for l in bns:
        l.momentum = moms[l]
        w = {v.path.split("/")[-1]: v for v in l.weights}
        _, _, shift, factor = _bn_ranges(rng, int(w["moving_mean"].shape[0]))
        var = np.asarray(w["moving_variance"].numpy(), np.float64)
        w["moving_mean"].assign((np.asarray(w["moving_mean"].numpy()) + shift * np.sqrt(var)).astype(np.float32))
        w["moving_variance"].assign((var * factor).astype(np.float32))
    for l, tr in saved:
        l.trainable = tr


def _mobilenetv2_base(keras, size):
    return keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=False, weights=None)


def make_keras(spec):
    """The Keras model of a spec, with its initial (random) weights."""
    import keras

    keras.utils.set_random_seed(SEED)
    A = keras.applications
    name, size = spec["base"], spec["size"]
    shape = (size, size, 3)
    top = dict(weights=None, input_shape=shape, classifier_activation=None)
    if name == "k_mobilenet":
        m = A.MobileNet(**top)
    elif name == "k_mobilenetv2":
        m = A.MobileNetV2(**top)
    elif name == "k_mobilenetv3small":
        m = A.MobileNetV3Small(**top)
    elif name == "k_mobilenetv3large":
        m = A.MobileNetV3Large(**top)
    elif name == "k_xception":
        m = A.Xception(**top)
    elif name == "k_nasnetmobile":
        m = A.NASNetMobile(**top)
    elif name == "k_resnet50":
        m = A.ResNet50(**top)
    elif name == "k_efficientnetb0":
        m = A.EfficientNetB0(**top)
    elif name == "k_densenet121":
        m = A.DenseNet121(**top)
    elif name == "k_nested_functional":
        base = _mobilenetv2_base(keras, size)
        inp = keras.Input(shape)
        x = base(inp)
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        x = keras.layers.Dropout(0.2, name="drop")(x)
        m = keras.Model(inp, keras.layers.Dense(10, name="classifier")(x), name="nested_functional")
    elif name == "k_nested_sequential":
        m = keras.Sequential([keras.Input(shape), _mobilenetv2_base(keras, size),
                              keras.layers.GlobalAveragePooling2D(name="pool"),
                              keras.layers.Dense(5, name="classifier")], name="nested_sequential")
    elif name == "k_tf_tutorial":
        # https://www.tensorflow.org/tutorials/images/transfer_learning, with Rescaling for preprocess_input
        # (the tutorial's own alternative) and the augmentation Sequential the tutorial defines.
        augment = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.2)],
                                   name="data_augmentation")
        base = _mobilenetv2_base(keras, size)
        base.trainable = False
        inp = keras.Input(shape)
        x = augment(inp)
        x = keras.layers.Rescaling(1.0 / 127.5, offset=-1, name="rescaling")(x)
        x = base(x, training=False)
        x = keras.layers.GlobalAveragePooling2D(name="global_average_pooling2d")(x)
        x = keras.layers.Dropout(0.2, name="dropout")(x)
        m = keras.Model(inp, keras.layers.Dense(1, name="dense")(x), name="tf_tutorial")
    else:
        raise SystemExit(f"unknown Keras model {name}")
    return m


def build_keras(spec, out):
    m = make_keras(spec)
    _randomise_keras(m, calibration_images(spec["size"], spec["pre"]))
    m.save(out)  # a .h5 name: Keras 3 writes the legacy HDF5 format


# --- references -----------------------------------------------------------------------------------------------------
def reference(spec, path, x):
    """(logits of the NHWC float32 batch x, note): onnxruntime (2 threads, NCHW input), or Keras model.predict on
    the model keras.saving.load_model reads back from the file; when Keras cannot read its own file, the model is
    built again from code and takes the file's weights (load_weights), and the note says why."""
    if spec["family"] == "torchvision":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return sess.run(None, {name: np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0], ""
    import keras

    note = ""
    try:
        m = keras.saving.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - Keras' own reader failing is worth a note, not a lost row
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        note = (f"keras.saving.load_model cannot read the .h5 back ({type(e).__name__}: {first[:300]}); the "
                "reference is the model built from code with the file's weights (load_weights)")
        m = make_keras(spec)
        m.load_weights(path)
    return np.asarray(m.predict(x, batch_size=len(x), verbose=0)), note


def _keras_model_from(spec, path):
    import keras

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception:  # noqa: BLE001 - see reference()
        m = make_keras(spec)
        m.load_weights(path)
        return m


def keras_layer_values(model, x):
    """{layer path: output array} for every layer of a Keras model, nested models included (their layers as
    'inner/LAYER' as well as 'LAYER'), in topological order."""
    import keras

    out = {}

    def visit(m, xin, prefix):
        ops = getattr(m, "operations", None) or m.layers  # Keras 3: also `x + 3.0` (an Operation, not a Layer)
        layers = [l for l in ops if not isinstance(l, keras.layers.InputLayer)]
        # a nested model's input value is the output of the layer feeding it: probe the inputs too
        probes, keys = [], []
        for l in layers:
            probes.append(l.output)
            keys.append(("out", l))
            if isinstance(l, keras.Model):
                probes.append(l.input)
                keys.append(("in", l))
        probe = keras.Model(m.inputs, probes)
        vals = probe.predict(xin, batch_size=len(xin), verbose=0)
        vals = vals if isinstance(vals, list) else [vals]
        inner_in = {}
        for (kind, l), v in zip(keys, vals):
            if kind == "in":
                inner_in[l.name] = np.asarray(v)
        for (kind, l), v in zip(keys, vals):
            if kind != "out":
                continue
            if isinstance(l, keras.Model):
                visit(l, inner_in[l.name], prefix + l.name + "/")
            out[prefix + l.name] = np.asarray(v)

    visit(model, x, "")
    return out


def keras_divergence(spec, path, x, tcl_npz, tol):
    """The first Keras layer (topological order) whose output tcl's same-named node departs from."""
    with np.load(tcl_npz) as f:
        tcl = {k: f[k] for k in f.files}
    order = [k for k in tcl if not k.startswith("__")]
    vals = keras_layer_values(_keras_model_from(spec, path), x)
    compared = 0
    for key, ref in vals.items():
        short = key.split("/")[-1]
        cands = [n for n in order if n in (key, short) or n.startswith((key + "/", short + "/"))]
        cands = [n for n in cands if n.split("/")[0] in (key.split("/")[0], short) or n == key]
        if not cands:
            continue
        got = tcl[cands[-1]]
        if got.shape != ref.shape:
            if got.size == ref.size:
                got = got.reshape(ref.shape)
            else:
                return f"Keras layer '{key}': tcl node '{cands[-1]}' has shape {got.shape[1:]}, Keras {ref.shape[1:]}"
        compared += 1
        e = float(np.abs(got.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))
        if not np.isfinite(e) or e > tol:
            return (f"first departure at Keras layer '{key}' (tcl node '{cands[-1]}'): rel err {e:.2e} "
                    f"({compared - 1} layers before it agree)")
    return f"no Keras layer output departs ({compared} compared)"


def main(argv):
    cmd, name = argv[0], argv[1]
    spec = zoo()[name]
    if spec.get("keras_backend"):
        os.environ["KERAS_BACKEND"] = spec["keras_backend"]  # before the first import of keras
    if cmd == "build":
        out = argv[2]
        tmp = out + ".part" + spec["ext"]
        (build_torchvision if spec["family"] == "torchvision" else build_keras)(spec, tmp)
        os.replace(tmp, out)
    elif cmd == "ref":
        path, xin, out = argv[2:5]
        y, note = reference(spec, path, np.load(xin))
        tmp = out + ".part.npz"
        np.savez(tmp, y=y, note=np.array(note))
        os.replace(tmp, out)
    elif cmd == "diverge":
        path, xin, tcl_npz, tol = argv[2:6]
        print(keras_divergence(spec, path, np.load(xin), tcl_npz, float(tol)))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
