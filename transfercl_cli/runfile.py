"""A run directory's model: the graph structure as JSON (model.json) and its weights as .npz (no pickle).

A run directory can itself be the `model` of a new recipe (continue fine-tuning) or of `tcl evaluate/predict`.
"""
import json
import os

import numpy as np

from .errors import ModelError
from .fsutil import jsonable as _jsonable, load_npz, save_npz, write_json
from .graph import Graph, Node

MODEL_JSON = "model.json"
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


def load_run_model(run_dir, which="best"):
    path = os.path.join(run_dir, MODEL_JSON)
    if not os.path.exists(path):
        raise ModelError(f"'{run_dir}' is a folder but not a tcl run directory (no {MODEL_JSON}).",
                         "Pass the run directory `tcl finetune` wrote (its `output`), or a .h5/.onnx model file.")
    with open(path) as f:
        spec = json.load(f)
    wname = WEIGHTS.get(which, which)
    wpath = os.path.join(run_dir, wname)
    if not os.path.exists(wpath):
        wpath = os.path.join(run_dir, WEIGHTS["final"])
    if not os.path.exists(wpath):
        raise ModelError(f"The run directory '{run_dir}' has no weights ({wname}).",
                         "The run may have stopped before its first epoch ended; run `tcl finetune --resume`.")
    params = load_npz(wpath)
    nodes = []
    for nd in spec["nodes"]:
        ps = {}
        for k, shape in nd["params"].items():
            key = f"{nd['name']}/{k}"
            if key not in params:
                raise ModelError(f"The weights file {wpath} lacks '{key}'.", "The run directory is damaged; "
                                 "re-run `tcl finetune`.")
            ps[k] = params[key].astype(np.float32).reshape(shape)
        attrs = {k: tuple(v) if isinstance(v, list) and k in ("kernel", "strides", "dilations", "pads", "perm", "shape")
                 else v for k, v in nd["attrs"].items()}
        nodes.append(Node(nd["name"], nd["op"], nd["inputs"], nd["outputs"], attrs, ps, nd.get("source", "")))
    g = Graph(nodes, {k: tuple(v) for k, v in spec["inputs"].items()}, spec["outputs"], spec.get("name", "model"),
              spec.get("meta", {}))
    g.meta["run_dir"] = os.path.abspath(run_dir)
    return g


def load_any_model(path, **opts):
    """A model from a .h5/.onnx file or a tcl run directory."""
    if not os.path.exists(path):
        raise ModelError(f"The model '{path}' does not exist.",
                         "Check the path (recipe paths are relative to the recipe file).")
    if os.path.isdir(path):
        return load_run_model(path, opts.get("weights") or "best")
    from .importers import load_model

    return load_model(path, config=opts.get("config"), input_size=opts.get("input_size"))
