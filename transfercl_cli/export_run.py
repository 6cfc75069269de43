"""`tcl export-weights`: a run directory's weights as ONNX, Keras-layout HDF5 or npz (optionally int8)."""
import os

from .errors import TclError
from .fsutil import write_json


def export_run(run_dir, fmt, output=None, int8=False, force=False, weights="best", device=None):
    from . import export as ex
    from .runfile import load_run_model

    if not os.path.isdir(run_dir):
        raise TclError(f"'{run_dir}' is not a run directory.", "Pass the `output` folder of a `tcl finetune` run.")
    graph = load_run_model(run_dir, weights)
    path = output or os.path.join(run_dir, "export", f"model{'_int8' if int8 else ''}.{fmt}")
    if os.path.exists(path) and not force:
        raise TclError(f"'{path}' already exists.", "Pass --force to overwrite it, or choose another file with -o.")
    qweights = None
    result = {"path": path}
    g_out = graph
    if int8:
        qgraph, qweights = ex.quantize_int8(graph)
        result["int8"] = _int8_accuracy(run_dir, graph, qgraph, device, path)
        g_out = qgraph if fmt == "h5" else graph
    meta = {"classes": graph.meta.get("classes"), "preprocess": graph.meta.get("preprocess")}
    if fmt == "onnx":
        ex.export_onnx(g_out, path, int8=qweights, force=force)
    elif fmt == "h5":
        ex.export_h5(g_out, path, force=force)
    else:
        ex.export_npz(g_out, path, meta, int8=qweights, force=force)
    return result


def _int8_accuracy(run_dir, graph, qgraph, device, path):
    """Test-split accuracy with float32 and with int8 weights, written next to the export."""
    from .evaluate import evaluate_graph_on_run

    acc32 = evaluate_graph_on_run(run_dir, graph, device)
    acc8 = evaluate_graph_on_run(run_dir, qgraph, device)
    rep = {"accuracy_fp32": acc32, "accuracy_int8": acc8, "accuracy_change": acc8 - acc32,
           "scheme": "int8 symmetric per-output-channel weights", "report": path + ".int8.json"}
    write_json(rep["report"], rep)
    return rep
