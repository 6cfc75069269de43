"""A run directory's model: the graph structure as JSON (model.json) and its weights as .npz (no pickle).

A run directory can itself be the `model` of a new recipe (continue fine-tuning) or of `tcl evaluate/predict`.
"""
import os

import numpy as np

from .errors import DamagedFile, ModelError
from .fsutil import jsonable as _jsonable, load_json, load_npz, save_npz, write_json
from .graph import Graph, Node
from .runstate import weights_file

MODEL_JSON = "model.json"
FROZEN = "frozen.npz"
WEIGHTS = {"final": "weights.npz", "best": "best.npz"}


def graph_to_json(graph):
    return {
        "format": "transfercl-graph", "version": 1, "name": graph.name,
        "inputs": {k: list(v) for k, v in graph.inputs.items()}, "outputs": list(graph.outputs),
        "meta": _jsonable(graph.meta),
        "nodes": [{"name": n.name, "op": n.op, "inputs": n.inputs, "outputs": n.outputs, "attrs": _jsonable(n.attrs),
                   "source": n.source, "params": {k: list(v.shape) for k, v in n.params.items()}}
                  for n in graph.nodes],
    }


def save_run_model(graph, run_dir, weights_name="weights.npz"):
    write_json(os.path.join(run_dir, MODEL_JSON), graph_to_json(graph))
    save_npz(os.path.join(run_dir, weights_name), graph.params())


_DAMAGED_FIX = ("Restore the run directory from a copy, or re-create it with `tcl finetune` (`--force` to replace "
                "the damaged run).")


def _spec_error(path, cause):
    return DamagedFile(f"The run model file '{path}' is damaged or not a file tcl wrote ({cause}).", _DAMAGED_FIX)


def _check_spec(spec, path):
    """model.json has the structure graph_to_json writes (else DamagedFile naming the file and what is wrong)."""
    if not isinstance(spec, dict):
        raise _spec_error(path, f"it holds a JSON {type(spec).__name__}, not an object")
    if spec.get("format", "transfercl-graph") != "transfercl-graph":
        raise _spec_error(path, f"its format is {spec.get('format')!r}, not 'transfercl-graph'")
    for key, typ in (("nodes", list), ("inputs", dict), ("outputs", list)):
        if key not in spec:
            raise _spec_error(path, f"the key '{key}' is missing")
        if not isinstance(spec[key], typ):
            raise _spec_error(path, f"'{key}' is a {type(spec[key]).__name__}, not a {typ.__name__}")
    if not spec["nodes"] or not spec["inputs"] or not spec["outputs"]:
        raise _spec_error(path, "it lists no layers, inputs or outputs")
    for name, shape in spec["inputs"].items():
        if not (isinstance(shape, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in shape)):
            raise _spec_error(path, f"the input '{name}' has the shape {shape!r}, not a list of whole numbers")
    if not all(isinstance(t, str) for t in spec["outputs"]):
        raise _spec_error(path, "'outputs' must be a list of tensor names")
    meta = spec.get("meta", {})
    if not isinstance(meta, dict):
        raise _spec_error(path, "'meta' is not an object")
    classes = meta.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise _spec_error(path, f"'meta.classes' is {classes!r:.60}, not a list of class names")
    if meta.get("preprocess") is not None and not isinstance(meta["preprocess"], dict):
        raise _spec_error(path, f"'meta.preprocess' is {meta['preprocess']!r:.60}, not an object")
    for i, nd in enumerate(spec["nodes"]):
        if not isinstance(nd, dict):
            raise _spec_error(path, f"layer #{i} is a {type(nd).__name__}, not an object")
        label = f"layer #{i} ({nd['name']!r})" if isinstance(nd.get("name"), str) else f"layer #{i}"
        for key, typ in (("name", str), ("op", str), ("inputs", list), ("outputs", list), ("attrs", dict),
                         ("params", dict)):
            if key not in nd:
                raise _spec_error(path, f"{label} has no '{key}'")
            if not isinstance(nd[key], typ):
                raise _spec_error(path, f"{label}: '{key}' is a {type(nd[key]).__name__}, not a {typ.__name__}")
        if not nd["outputs"] or not all(isinstance(t, str) for t in nd["inputs"] + nd["outputs"]):
            raise _spec_error(path, f"{label}: 'inputs'/'outputs' must be lists of tensor names")
        for k, shape in nd["params"].items():
            if not (isinstance(shape, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                    for v in shape)):
                raise _spec_error(path, f"{label}: the parameter '{k}' has the shape {shape!r}")


def load_run_model(run_dir, which="best"):
    path = os.path.join(run_dir, MODEL_JSON)
    if not os.path.exists(path):
        raise ModelError(f"'{run_dir}' is a folder but not a tcl run directory (no {MODEL_JSON}).",
                         "Pass the run directory `tcl finetune` wrote (its `output`), or a .h5/.onnx model file.")
    spec = load_json(path, what="run model file", fix=_DAMAGED_FIX)
    _check_spec(spec, path)
    wname = WEIGHTS.get(which, which)
    # An unfinished run gives its last finished epoch (with a note), or is refused when no epoch finished.
    wpath = weights_file(run_dir, which)
    if not os.path.exists(wpath):
        raise ModelError(f"The run directory '{run_dir}' has no weights ({wname}).",
                         "The run may have stopped before its first epoch ended; run `tcl finetune --resume`.")
    params = load_npz(wpath, what="weights file", fix=_DAMAGED_FIX)
    frozen = os.path.join(run_dir, FROZEN)
    if os.path.exists(frozen):  # a run stores its frozen layers once; each weights file holds the trained ones
        params = dict(load_npz(frozen, what="frozen weights file", fix=_DAMAGED_FIX), **params)
    g = _graph_from_spec(spec, params, path, wpath)
    g.meta["run_dir"] = os.path.abspath(run_dir)
    return g


def _graph_from_spec(spec, params, path, wpath):
    """The Graph a checked model.json-style spec describes, with its parameters from `params` (`layer/param`)."""
    nodes = []
    for nd in spec["nodes"]:
        ps = {}
        for k, shape in nd["params"].items():
            key = f"{nd['name']}/{k}"
            if key not in params:
                raise DamagedFile(f"The weights file '{wpath}' lacks '{key}', which {MODEL_JSON} lists.",
                                  _DAMAGED_FIX)
            a = params[key]
            if a.dtype.kind not in "fiub" or a.size != int(np.prod(shape)):
                raise DamagedFile(f"The weights file '{wpath}' holds '{key}' as {a.dtype} {tuple(a.shape)}, but "
                                  f"{MODEL_JSON} says a float array of shape {tuple(shape)}.", _DAMAGED_FIX)
            ps[k] = a.astype(np.float32).reshape(shape)
        attrs = {k: tuple(v) if isinstance(v, list) and k in ("kernel", "strides", "dilations", "pads", "perm", "shape")
                 else v for k, v in nd["attrs"].items()}
        nodes.append(Node(nd["name"], nd["op"], nd["inputs"], nd["outputs"], attrs, ps, nd.get("source", "")))
    g = Graph(nodes, {k: tuple(v) for k, v in spec["inputs"].items()}, spec["outputs"], spec.get("name", "model"),
              spec.get("meta", {}))
    _check_graph(g, path)
    return g


def load_npz_export(path):
    """A model exported by `tcl export-weights --format npz` (PATH and its PATH.json sidecar, int8 or float)."""
    from .export import load_npz_params

    side_path = path + ".json"
    side = load_json(side_path, "npz export sidecar", "Export the model again (`tcl export-weights RUN --format npz`).")
    if not isinstance(side, dict) or side.get("format") != "transfercl-npz" or not isinstance(side.get("params"), dict):
        raise DamagedFile(f"'{side_path}' is not the sidecar of a tcl npz export.",
                          "Export the model again (`tcl export-weights RUN --format npz`).")
    spec = {"name": side.get("model", "model"), "inputs": side.get("inputs"), "outputs": side.get("outputs"),
            "meta": {k: v for k, v in (("classes", side.get("classes")), ("preprocess", side.get("preprocessing")))
                     if v is not None},
            "nodes": [dict(nd, params={k.split("/", 1)[1]: info.get("shape") for k, info in side["params"].items()
                                       if isinstance(info, dict) and k.split("/", 1)[0] == nd.get("name")})
                      for nd in side.get("nodes") or [] if isinstance(nd, dict)]}
    _check_spec(spec, side_path)
    try:
        params = load_npz_params(path)
    except Exception as e:  # noqa: BLE001 - numpy raises many types for a damaged archive
        raise DamagedFile(f"The npz export '{path}' is damaged or not a file tcl wrote ({type(e).__name__}: {e}).",
                          "Export the model again (`tcl export-weights RUN --format npz`).") from None
    return _graph_from_spec(spec, params, side_path, path)


def _check_graph(g, path):
    """The layers fit together (every tensor written before it is read, shapes and attributes consistent)."""
    from .ops.shapes import infer_shapes

    try:
        g.topo_check()
        infer_shapes(g)
    except ModelError as e:
        raise _spec_error(path, e.message.rstrip(".")) from None
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise _spec_error(path, f"its layers do not fit together: {type(e).__name__}: {e}") from None
    if g.meta.get("preprocess"):
        from .session import resolve_preprocess

        try:
            resolve_preprocess({}, g)
        except (ValueError, TypeError, KeyError) as e:
            raise _spec_error(path, f"its preprocessing 'meta.preprocess' is unusable: {e}") from None


def load_any_model(path, **opts):
    """A model from a .h5/.onnx file or a tcl run directory."""
    if not os.path.exists(path):
        raise ModelError(f"The model '{path}' does not exist.",
                         "Check the path (recipe paths are relative to the recipe file).")
    if os.path.isdir(path):
        return load_run_model(path, opts.get("weights") or "best")
    if path.lower().endswith(".npz") and os.path.exists(path + ".json"):
        return load_npz_export(path)
    from .importers import load_model

    return load_model(path, config=opts.get("config"), input_size=opts.get("input_size"))
