"""`tcl export-weights`: a run directory's weights as ONNX, TFLite, Keras-layout HDF5 or npz (optionally int8)."""
import os

from .errors import TclError
from .fsutil import write_json


INT8_THRESHOLD_POINTS = 0.25
CALIBRATION_IMAGES = 512


def export_run(run_dir, fmt, output=None, int8=False, force=False, weights="best", device=None,
               int8_threshold=INT8_THRESHOLD_POINTS, progress=None, int8_activations=None):
    """`progress(stage, done, total)`, optional: called as the --int8 passes advance (stages 'calibration images',
    'activation ranges' (static int8), 'int8 sensitivity' (layers), 'test accuracy' (fp32 and int8)), for a
    progress bar. `int8_activations` (ONNX only; default on there): static int8, activations calibrated and
    quantized too (QDQ), so onnxruntime runs integer kernels; off: int8 weights only."""
    from . import export as ex
    from .runfile import load_run_model

    if not os.path.isdir(run_dir):
        raise TclError(f"'{run_dir}' is not a run directory.", "Pass the `output` folder of a `tcl finetune` run.")
    if int8 and fmt == "h5":
        # Keras's HDF5 layout has no int8 weights: writing the dequantized floats would look like an int8 export
        # and be none (the same size, float32 weights).
        raise TclError("--int8 is not available with --format h5: Keras HDF5 weights are float32 only, so the file "
                       "would hold float weights that merely went through int8 rounding.",
                       "Use --format onnx --int8 (int8 initializers with DequantizeLinear) or --format npz --int8 "
                       "(int8 arrays and scales), or export h5 without --int8.")
    if int8_activations and not (int8 and fmt == "onnx"):
        raise TclError("--int8-activations needs --int8 and --format onnx: only the ONNX export stores quantized "
                       "activations (QuantizeLinear/DequantizeLinear).",
                       "Add --int8 --format onnx, or leave --int8-activations out.")
    static = bool(int8 and fmt == "onnx" and int8_activations is not False)
    graph = load_run_model(run_dir, weights)
    path = output or os.path.join(run_dir, "export", f"model{'_int8' if int8 else ''}.{fmt}")
    if os.path.exists(path) and not force:
        raise TclError(f"'{path}' already exists.", "Pass --force to overwrite it, or choose another file with -o.")
    qweights = None
    result = {"path": path}
    g_out = graph
    if int8 and fmt == "tflite":
        from .export_tflite import build_tflite

        build_tflite(graph)  # an op TFLite cannot express fails now, before the minutes of int8 passes
    if int8:
        from .evaluate import _model_preprocess, run_items

        items = run_items(run_dir, "train")[:CALIBRATION_IMAGES]
        x, y = _decode(items, _model_preprocess(graph), progress)
        if static:
            from . import int8_static as st

            g_q = st.fold_for_int8(graph)
            calib = st.calibrate(g_q, x, device, progress=progress)

            def quantize(kept):
                return st.static_int8(g_q, calib, skip=kept)
        else:
            g_q = graph

            def quantize(kept):
                return ex.quantize_int8(graph, skip=kept)
        sens = int8_sensitivity(g_q, x, y, quantize, device, int8_threshold, progress=progress)
        qgraph, qweights = quantize(sens["kept_float"])
        g_out = qgraph if static else graph
        result["int8"] = _int8_accuracy(run_dir, graph, qgraph, device, path, sens, progress=progress,
                                        static=static)
    meta = {"classes": graph.meta.get("classes"), "preprocess": graph.meta.get("preprocess")}
    if fmt == "onnx":
        ex.export_onnx(g_out, path, int8=qweights, force=force)
        if static:
            result["int8"].update(_onnxruntime_check(run_dir, graph, qgraph, device, path, result["int8"]["report"]))
    elif fmt == "tflite":
        from .export_tflite import export_tflite

        export_tflite(g_out, path, int8=qweights, force=force)
    elif fmt == "h5":
        ex.export_h5(g_out, path, force=force)
    else:
        ex.export_npz(g_out, path, meta, int8=qweights, force=force)
    return result


def int8_sensitivity(graph, x, y, quantize, device, threshold, progress=None):
    """Which conv/dense layers of `graph` to keep float, measured on the calibration images `x` (the training split,
    at most CALIBRATION_IMAGES) with labels `y`; `quantize(kept_float)` gives (int8 graph, int8 weights). First what
    quantizing each layer alone costs: accuracy points against the float model, and
    the mean KL divergence of its probabilities from the float ones (finer: most layers flip no prediction). Layers
    above `threshold` points stay float (a depthwise conv whose BatchNorm scales a channel up can lose points though
    its own weight error is under 1%). Then the rest together: costs that are each below the threshold add up, so
    while the whole int8 model still costs more than `threshold`, the most sensitive quantized layer goes back to
    float."""
    from .evaluate import Predictor
    from .int8_static import quantizable

    progress = progress or (lambda stage, done, total: None)
    p_f = _probs(Predictor(graph, device), x)
    acc_f = _acc(p_f, y)
    candidates = quantizable(graph)

    def measure(kept_float):
        qg, _ = quantize(kept_float)
        p_q = _probs(Predictor(qg, device), x)
        return round(100.0 * (acc_f - _acc(p_q, y)), 3), _kl(p_f, p_q)

    costs, kl = {}, {}
    progress("int8 sensitivity", 0, len(candidates))
    for i, name in enumerate(candidates):
        costs[name], kl[name] = measure([c for c in candidates if c != name])
        progress("int8 sensitivity", i + 1, len(candidates))
    kept = [n for n in candidates if costs[n] > threshold]
    order = sorted((n for n in candidates if n not in kept), key=lambda n: (costs[n], kl[n]), reverse=True)
    combined, _ = measure(kept)
    steps = [{"kept_float": list(kept), "cost_points": combined}]
    while combined > threshold and order:
        kept.append(order.pop(0))
        combined, _ = measure(kept)
        steps.append({"kept_float": list(kept), "cost_points": combined})
    return {"calibration_images": int(len(y)), "calibration_accuracy_fp32": acc_f, "threshold_points": threshold,
            "cost_points": costs, "kl_divergence": {k: round(v, 6) for k, v in kl.items()},
            "combined_cost_points": combined, "combined_steps": steps,
            "kept_float": [n for n in candidates if n in kept]}


def _probs(predictor, x, batch=32):
    import numpy as np

    return np.concatenate([predictor.probs(x[i:i + batch]) for i in range(0, len(x), batch)])


def _acc(p, y):
    import numpy as np

    return float(np.mean(np.argmax(p, 1) == y))


def _kl(p, q):
    import numpy as np

    p, q = np.clip(p, 1e-12, 1.0), np.clip(q, 1e-12, 1.0)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def _decode(items, pre, progress=None):
    import numpy as np

    from .data import ImageLoader

    xs, ys = [], []
    done = 0
    for xb, yb, _ in ImageLoader(items, batch_size=32, preprocess=pre, on_bad_image=lambda p, r: None):
        xs.append(xb)
        ys.append(yb)
        done += len(yb)
        if progress:
            progress("calibration images", done, len(items))
    if not xs:
        raise TclError("No readable calibration image in the run's training split.",
                       "Check the run's data folder (data.root in recipe.resolved.yaml).")
    return np.concatenate(xs), np.concatenate(ys)


def _int8_accuracy(run_dir, graph, qgraph, device, path, sens, progress=None, static=False):
    """Test-split accuracy with float32 and with int8 weights (and activations when `static`), written next to the
    export with the sensitivity."""
    from .evaluate import evaluate_graph_on_run

    progress = progress or (lambda stage, done, total: None)
    progress("test accuracy", 0, 2)
    acc32 = evaluate_graph_on_run(run_dir, graph, device)
    progress("test accuracy", 1, 2)
    acc8 = evaluate_graph_on_run(run_dir, qgraph, device)
    progress("test accuracy", 2, 2)
    rep = {"accuracy_fp32": acc32, "accuracy_int8": acc8, "accuracy_change": acc8 - acc32,
           "scheme": ("static int8 (QDQ): int8 symmetric per-output-channel weights, uint8 activations with a "
                      "zero point, calibrated on the training split" if static else
                      "int8 symmetric per-output-channel weights"),
           "activations": "uint8" if static else "float32",
           "kept_float": sens["kept_float"], "sensitivity": sens, "report": path + ".int8.json"}
    write_json(rep["report"], rep)
    return rep


def _onnxruntime_check(run_dir, graph, qgraph, device, path, report):
    """When onnxruntime is installed: the written QDQ file's test accuracy in onnxruntime itself, how often its top-1
    agrees with tcl's int8 network `qgraph`, and which integer kernels onnxruntime fused (QLinearConv, ...); added
    to the report. Without onnxruntime: only a note (tcl's own accuracy of the same int8 network stands)."""
    import json
    import tempfile

    import numpy as np

    from .evaluate import Predictor, _model_preprocess, run_eval_items

    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        return {"onnxruntime": "not installed: accuracy measured by tcl only"}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # its warning that an optimised model is machine-specific: this one is only read
    with tempfile.TemporaryDirectory() as tmp:  # onnxruntime's optimised graph, to see which kernels it fused
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        fused = {}
        for n in onnx.load(opts.optimized_model_filepath).graph.node:
            if n.op_type.startswith("QLinear") or n.op_type in ("QGemm", "MatMulInteger", "ConvInteger"):
                fused[n.op_type] = fused.get(n.op_type, 0) + 1
    x, y = _decode(run_eval_items(run_dir), _model_preprocess(graph))  # the images _int8_accuracy measured
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i:i + 32]})[0] for i in range(0, len(x), 32)])
    ours = _probs(Predictor(qgraph, device), x)
    out = {"accuracy_int8_onnxruntime": _acc(logits, y),
           "onnxruntime_top1_agreement": float(np.mean(np.argmax(logits, 1) == np.argmax(ours, 1))),
           "onnxruntime_integer_ops": fused, "onnxruntime_version": ort.__version__}
    with open(report) as f:
        rep = json.load(f)
    rep.update(out)
    write_json(report, rep)
    return out
