"""Static int8 (issue 16): activations calibrated on training images, so a QDQ ONNX export runs onnxruntime's integer
kernels (QLinearConv, QGemm) instead of float ones with int8-stored weights.

The network is first folded the way it runs (frozen Conv+BatchNorm into the conv's weights and bias, ReLU/ReLU6 into
its epilogue, zero pads into its padding): that is the weight int8 stores, and it puts each conv right after the
activation of the layer before, so one QuantizeLinear/DequantizeLinear pair on a conv's input is also the quantized
output onnxruntime's fusion needs from the conv before it. Every conv2d/dense layer that goes int8 gets
per-output-channel int8 weights (export.quantize_int8) and a `fake_quant` node on its input: uint8 with a zero point
(asymmetric; exactly 0 for a non-negative tensor, so ReLU outputs keep all 256 levels), scale and zero point from the
calibration ranges; so do the inputs of a residual Add whose inputs all come from int8 layers (through ReLUs and
other such Adds), which lets onnxruntime fuse the conv before it and the Add itself. tcl runs that graph itself, so
the accuracy it reports is the int8 network's, not a guess; the ONNX writer turns each fake_quant into
QuantizeLinear + DequantizeLinear.
"""
import numpy as np

from .errors import TclError

PERCENTILE = 99.99  # of each calibration batch's values: a few outliers must not stretch the step of all the rest
SAMPLE = 1 << 20  # values per tensor and batch that the percentile looks at (a random subset of larger tensors)


def fold_for_int8(graph):
    """The graph as it runs at inference (plan.fold_frozen with nothing trainable), on its own copy of the weights."""
    from .plan import fold_frozen

    return fold_frozen(graph.copy(), set())


def quantizable(graph):
    """Names of the conv2d/dense nodes whose weights and input int8 can hold."""
    return [n.name for n in graph.nodes if n.op in ("conv2d", "dense") and "weight" in n.params]


class Calibration:
    """What the calibration images say about each quantizable layer's (and residual Add's) input tensor: `ranges`
    {tensor: (lo, hi)}, the mean over batches of each batch's 0.01th and 99.99th percentile; `means` {tensor:
    per-channel mean (last axis)}, for bias correction."""

    def __init__(self, ranges, means):
        self.ranges, self.means = ranges, means


def calibrate(graph, x, device=None, batch=8, progress=None):
    """The Calibration of `graph`'s quantizable layers' inputs over the images `x`."""
    from .backends import make_backend
    from .executor import Executor

    if not len(x):
        raise TclError("No calibration image to measure the activation ranges on.",
                       "Check the run's training split (data.root in recipe.resolved.yaml).")
    layers = {n.name: n for n in graph.nodes}
    targets = sorted({layers[name].inputs[0] for name in quantizable(graph)}
                     | {t for n in graph.nodes if n.op == "add" for t in n.inputs})
    be = make_backend(device)
    ex = Executor(graph, be)
    feed = next(iter(graph.inputs))
    rng = np.random.default_rng(0)
    lows, highs = {t: [] for t in targets}, {t: [] for t in targets}
    sums, counts = {t: 0.0 for t in targets}, {t: 0 for t in targets}
    for i in range(0, len(x), batch):
        out = ex.forward({feed: x[i:i + batch]}, outputs=targets)
        for t in targets:
            a = be.to_host(out[t])
            be.release(out[t])
            v = a.reshape(-1)
            rows = a.reshape(-1, a.shape[-1])
            sums[t] = sums[t] + rows.sum(0, dtype=np.float64)
            counts[t] += len(rows)
            if v.size > SAMPLE:
                v = v[rng.integers(0, v.size, SAMPLE)]
            lo, hi = np.percentile(v, [100.0 - PERCENTILE, PERCENTILE])
            lows[t].append(float(lo))
            highs[t].append(float(hi))
        if progress:
            progress("activation ranges", min(i + batch, len(x)), len(x))
    return Calibration({t: (float(np.mean(lows[t])), float(np.mean(highs[t]))) for t in targets},
                       {t: sums[t] / counts[t] for t in targets})


def qparams(lo, hi):
    """(scale, zero_point) of uint8 with a zero point over [lo, hi] widened to hold 0 (zero padding, ReLU's zeros
    stay exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise TclError(f"An activation range is not finite ({lo}, {hi}): the network gives inf or NaN on the "
                       "calibration images.", "Check the model with `tcl evaluate` before exporting it as int8.")
    if hi - lo < 1e-12:
        return 1.0, 0
    scale = (hi - lo) / 255.0
    return float(np.float32(scale)), int(np.clip(np.rint(-lo / scale), 0, 255))


def bias_correction(node, w, wq, mean_in):
    """The bias change that cancels the mean shift int8 rounding gives a layer's output: -sum (wq - w) * E[x] over
    each output's inputs (E[x] per input channel over the calibration images; zero padding ignored). A depthwise
    3x3 has 9 weights per output, whose rounding errors do not average out, and a folded BatchNorm scales the output
    up: this mean shift is most of what quantizing MobileNet's conv_dw_1 costs."""
    dw = wq.astype(np.float64) - w.astype(np.float64)
    m = np.asarray(mean_in, np.float64)
    if node.op == "dense":
        return -(m @ dw)
    groups = int(node.attrs.get("groups", 1))
    kh, kw, cg, cout = dw.shape
    per_in = dw.sum((0, 1))  # (cg, cout): the kernel's taps all see the channel's mean
    out_group = np.arange(cout) // (cout // groups)
    m_in = m.reshape(groups, cg)[out_group]  # (cout, cg): the input channels each output reads
    return -np.einsum("io,oi->o", per_in, m_in)


def static_int8(graph, calib, skip=(), correct_bias=True):
    """(qgraph, qweights) for a folded graph (fold_for_int8) and its Calibration: every quantizable layer not in
    `skip` gets int8 weights (with bias correction unless told otherwise) and a fake_quant on its input; qweights
    as export.quantize_int8 gives them (for the writers)."""
    from .export import quantize_int8
    from .graph import Graph, Node

    qg, qweights = quantize_int8(graph, skip=skip)
    ranges = calib.ranges

    def is_int8(n):  # exactly the layers quantize_int8 quantized
        return f"{n.name}/weight" in qweights

    if correct_bias:
        for n in qg.nodes:
            if is_int8(n):
                w = graph.node(n.name).params["weight"]
                db = bias_correction(n, w, n.params["weight"], calib.means[n.inputs[0]])
                b = n.params.get("bias")
                n.params["bias"] = ((np.zeros(db.shape) if b is None else b.astype(np.float64)) + db).astype(
                    np.float32)
    names = {n.name for n in qg.nodes} | set(qg.inputs) | {t for n in qg.nodes for t in n.outputs}

    def fresh(base):
        name, i = base, 1
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.add(name)
        return name

    quantized = {}  # tensor -> its fake-quantized copy (one per tensor, whichever int8 layers read it)
    int8_out = set()  # tensors made by int8 layers, or by residual Adds of such tensors
    nodes = []

    def quant(t, reader):
        if t not in quantized:
            scale, zp = qparams(*ranges[t])
            quantized[t] = fresh(f"{t}_quantized")
            nodes.append(Node(fresh(f"{reader}_input_quant"), "fake_quant", [t], [quantized[t]],
                              {"scale": scale, "zero_point": zp, "dtype": "uint8"}, {}, "QuantizeLinear"))
        return quantized[t]

    for n in qg.nodes:
        if is_int8(n):
            n = Node(n.name, n.op, [quant(n.inputs[0], n.name)] + list(n.inputs[1:]), list(n.outputs),
                     dict(n.attrs), n.params, n.source)
            int8_out.update(n.outputs)
        elif n.op == "add" and all(t in int8_out for t in n.inputs):
            # A residual Add of int8 tensors (MobileNetV2, ResNet): quantizing its inputs gives the conv before it
            # the quantized output onnxruntime needs to fuse it (QLinearConv), and the Add its integer form.
            n = Node(n.name, n.op, [quant(t, n.name) for t in n.inputs], list(n.outputs), dict(n.attrs), n.params,
                     n.source)
            int8_out.update(n.outputs)
        elif n.op in ("relu", "relu6") and n.inputs[0] in int8_out:  # ResNet's ReLU after its Add
            int8_out.update(n.outputs)
        nodes.append(n)
    out = Graph(nodes, dict(qg.inputs), list(qg.outputs), qg.name, dict(qg.meta))
    out.topo_check()
    out.meta["quantization"] = {"scheme": "static int8: per-output-channel int8 weights, uint8 activations with a "
                                          "zero point (QDQ) on int8 layers' inputs and on residual Adds of int8 "
                                          "tensors",
                                "weights": sorted(qweights), "activations": sorted(quantized)}
    return out, qweights
