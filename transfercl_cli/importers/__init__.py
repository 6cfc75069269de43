"""Model import: Keras HDF5 (.h5) and ONNX files into the one internal `Graph` (see graph.py).

    from transfercl_cli.importers import load_model
    g = load_model("mobilenet.h5")                      # Keras full model (Keras 2 / tf.keras or Keras 3)
    g = load_model("weights.h5", config="model.json")   # weights-only .h5 plus the model's JSON config
    g = load_model("model.keras")                       # Keras 3 zip (config.json + model.weights.h5)
    g = load_model("resnet.onnx")                       # ONNX, opset 9+
    g = load_model("dyn.onnx", input_size=(224, 224))   # fixes unknown spatial sizes of the input
    g = load_model("mobilenet.tflite")                  # TFLite / LiteRT flatbuffer (float32; int8 weights dequantized)

The format is chosen by the file suffix, else by the file's first bytes. Every failure is a `ModelError` naming the
cause and the fix: a missing or damaged file, a missing optional dependency (h5py for Keras, onnx for ONNX, tflite
for TFLite), or layers tcl cannot run (all of them listed in one message, before any conversion work).

graph.meta always holds: format ('keras_h5' | 'onnx' | 'tflite'), source (path), input_size (H, W) for image inputs,
input_layout ('NHWC', or 'NCHW' when the source model took NCHW input: the graph itself always takes NHWC).
Keras adds keras_version and, when the model starts with Rescaling/Normalization layers, preprocess =
{"size": (H, W), "scale": s, "offset": o, "in_model": True}: the model applies y = x * s + o itself, so callers feed
raw pixels in the range those layers expect.
"""
import os

import numpy as np

from ..errors import ModelError
from ..graph import Graph, Node

H5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
TFLITE_MAGIC = b"TFL3"  # the flatbuffer file identifier, at offset 4


def need_h5py():
    try:
        import h5py
    except ImportError:
        raise ModelError("Reading Keras .h5 models needs the h5py package, which is not installed.",
                         "Install it with `pip install h5py`, run by the Python that runs tcl (in a clone set up by "
                         "`make`: `.venv/bin/pip install h5py`, or `.venv/bin/pip install -e '.[h5]'`).") from None
    return h5py


def need_onnx():
    try:
        import onnx
    except ImportError:
        raise ModelError("Reading ONNX models needs the onnx package, which is not installed.",
                         "Install it with `pip install onnx`, run by the Python that runs tcl (in a clone set up by "
                         "`make`: `.venv/bin/pip install onnx`, or `.venv/bin/pip install -e '.[onnx]'`).") from None
    return onnx


def unsupported_error(items, fmt):
    """One ModelError listing every unsupported layer: items are (name, type, reason or '')."""
    lines = [f"  - '{name}' ({typ})" + (f": {why}" if why else "") for name, typ, why in items]
    head = f"The {fmt} model uses {len(items)} layer(s) tcl cannot run:"
    return ModelError(head + "\n" + "\n".join(lines) + "\n",
                      "Convert or replace these layers (e.g. export the model again with supported ops), or cut "
                      "the model before them.")


def _sniff(path):
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelError(f"Cannot read the model file '{path}' ({e.strerror}).",
                         "Check the path and the file's permissions.") from None
    if head.startswith(H5_MAGIC):
        return "h5"
    if head.startswith(ZIP_MAGIC):
        return "keras"
    if head[4:8] == TFLITE_MAGIC:
        return "tflite"
    return None


def _npz_not_a_model(path):
    """An .npz holds only weights: the model is the run directory around it (model.json + weights)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(os.path.join(folder, "model.json")):
        fix = (f"Pass the run directory that holds it, '{folder}' (tcl reads model.json and the weights from it), "
               "or a Keras .h5 or ONNX model file.")
    else:
        fix = ("Pass the tcl run directory the weights came from (the folder with model.json and weights.npz or "
               "best.npz), or a Keras .h5 or ONNX model file (`tcl export-weights --format onnx` writes one).")
    return ModelError(f"'{path}' is an .npz weights archive, not a model: it holds arrays but not the layers they "
                      "belong to.", fix)


def _is_npz(path):
    """A zip of .npy arrays only (numpy's .npz), whatever its name says."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def load_model(path, config=None, input_size=None, **opts):
    """Read a model file into a Graph (NHWC, canonical ops). See the module docstring for the options."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelError(f"The model file '{path}' does not exist.", "Check the path (a .h5 or .onnx file).")
    if os.path.isdir(path):
        raise ModelError(f"'{path}' is a folder, not a model file (TensorFlow SavedModel folders are not supported).",
                         "Save the model as Keras .h5 (`model.save('model.h5')`) or convert it to ONNX (tf2onnx).")
    if input_size is not None:
        try:
            hw = tuple(int(v) for v in input_size)
        except (TypeError, ValueError):
            hw = ()
        if len(hw) != 2 or min(hw) <= 0:
            raise ModelError(f"The input size must be a positive height and width in pixels, got {input_size!r}.",
                             "Set `input.size` in the recipe (e.g. `size: 224` or `[224, 224]`), pass "
                             "`--input-size 224 224` on the command line, or input_size=(224, 224) in Python.")
        input_size = hw
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        raise _npz_not_a_model(path)
    kind = {".h5": "h5", ".hdf5": "h5", ".keras": "keras", ".onnx": "onnx", ".tflite": "tflite",
            ".lite": "tflite"}.get(ext)
    sniffed = _sniff(path)
    if kind is None or (kind in ("onnx", "tflite") and sniffed in ("h5", "keras", "tflite")):
        kind = sniffed or "onnx"
    if kind == "keras" and _is_npz(path):
        raise _npz_not_a_model(path)
    if kind in ("onnx", "tflite") and config is not None:
        raise ModelError(f"The `config` option is for Keras weights-only .h5 files, not {kind.upper()} models.",
                         "Drop the config argument.")
    if kind in ("h5", "keras"):
        from .keras_h5 import load_keras

        g = load_keras(path, config=config, input_size=input_size, zipped=(kind == "keras"), **opts)
    elif kind == "tflite":
        from .tflite_import import load_tflite

        g = load_tflite(path, input_size=input_size, **opts)
    else:
        from .onnx_import import load_onnx

        g = load_onnx(path, input_size=input_size, **opts)
    g.meta.setdefault("source", os.path.abspath(path))
    return g


class GraphBuilder:
    """Collects nodes with unique names, tracks tensor shapes (without batch) as nodes are added."""

    def __init__(self):
        self.nodes = []
        self.inputs = {}
        self.shapes = {}
        self._names = set()
        self._tensors = set()

    @staticmethod
    def _unique(name, taken):
        """name, or name_1, name_2, ... : the first not in `taken` (which then holds it)."""
        got, i = name, 0
        while got in taken:
            i += 1
            got = f"{name}_{i}"
        taken.add(got)
        return got

    def unique_name(self, name):
        return self._unique(str(name) or "node", self._names)

    def unique_tensor(self, name):
        return self._unique(str(name) or "t", self._tensors)

    def add_input(self, name, shape):
        name = self.unique_tensor(name)
        self.inputs[name] = tuple(int(v) for v in shape)
        self.shapes[name] = self.inputs[name]
        return name

    def add(self, op, name, inputs, attrs=None, params=None, source="", out=None):
        """Append a node; returns its output tensor name (`out`, else the node's name, made unique)."""
        from ..ops.shapes import infer_node

        name = self.unique_name(name)
        t = self.unique_tensor(out or name)
        params = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in (params or {}).items()}
        node = Node(name=name, op=op, inputs=list(inputs), outputs=[t], attrs=dict(attrs or {}), params=params,
                    source=source)
        outs = infer_node(node, [self.shapes[i] for i in node.inputs])
        self.shapes[t] = tuple(int(v) for v in outs[0])
        self.nodes.append(node)
        return t

    def rename_tensor(self, old, new):
        for n in self.nodes:
            n.inputs = [new if t == old else t for t in n.inputs]
            n.outputs = [new if t == old else t for t in n.outputs]
        if old in self.inputs:
            self.inputs = {(new if k == old else k): v for k, v in self.inputs.items()}
        self.shapes[new] = self.shapes.pop(old)
        self._tensors.discard(old)
        self._tensors.add(new)

    def graph(self, outputs, name="model", meta=None):
        g = Graph(nodes=self.nodes, inputs=dict(self.inputs), outputs=list(outputs), name=name, meta=dict(meta or {}))
        try:
            g.topo_check()
        except ValueError as e:
            raise ModelError(f"The imported graph is inconsistent ({e}).", "The model file may be damaged.") from None
        return g


__all__ = ["load_model", "GraphBuilder", "need_h5py", "need_onnx", "unsupported_error"]
