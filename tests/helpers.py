"""One comparison helper used everywhere: run the same node through the float64 numpy reference and through the
OpenCL backend, compare forward outputs and gradients; check reference gradients by finite differences."""
import numpy as np

from transfercl_cli.graph import Node
from transfercl_cli.ops import Need


def rel_err(actual, expected):
    """max |a - e| / max(max |e|, 1e-6): relative to the largest magnitude of the expected tensor."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    return float(np.max(np.abs(a - e)) / max(float(np.max(np.abs(e))) if e.size else 0.0, 1e-6)) if e.size else 0.0


def assert_close(actual, expected, tol, what=""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def make_node(op, n_inputs=1, attrs=None, params=None, name="n"):
    return Node(name=name, op=op, inputs=[f"x{i}" for i in range(n_inputs)], outputs=["y"],
                attrs=dict(attrs or {}), params={k: np.asarray(v, np.float32) for k, v in (params or {}).items()})


def run_node(be, node, inputs, training=False, grad_out=None, need_params=True, seed=None):
    """Forward (and backward when grad_out is given) of one node; returns host arrays."""
    xs = [be.asarray(x) for x in inputs]
    fwd = be.forward_fn(node.op)
    ys, saved = fwd(be, node, xs, training)
    y = be.to_host(ys[0]).astype(np.float64)
    if grad_out is None:
        return y, None, None
    bwd = be.backward_fn(node.op)
    gxs, gps = bwd(be, node, saved, [be.asarray(grad_out)], Need([True] * len(inputs), need_params and bool(node.params)))
    gxs = [None if g is None else be.to_host(g).astype(np.float64) for g in gxs]
    gps = {k: be.to_host(v).astype(np.float64) for k, v in (gps or {}).items()}
    return y, gxs, gps


def numeric_grad(f, x, eps=1e-6):
    """Central differences of scalar f at x (float64)."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f(x)
        x[i] = old - eps
        fm = f(x)
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def check_reference_grads(npbe, node, inputs, tol=1e-5, training=False, rng=None, max_points=None):
    """Finite-difference check of the numpy reference backward for inputs and parameters.

    The loss is sum(y * w) with fixed random w."""
    rng = rng or np.random.default_rng(0)
    y, _, _ = run_node(npbe, node, inputs, training)
    w = rng.standard_normal(y.shape)
    _, gxs, gps = run_node(npbe, node, inputs, training, grad_out=w)

    def loss_inputs(i):
        def f(xi):
            xs = list(inputs)
            xs[i] = xi
            npbe.forget_params()
            return float(np.sum(run_node(npbe, node, xs, training)[0] * w))
        return f

    for i, x in enumerate(inputs):
        if gxs[i] is None:
            continue
        ng = numeric_grad(loss_inputs(i), x)
        assert_close(gxs[i], ng, tol, f"{node.op} reference d/dinput{i}")
    for k in list(node.params):
        if k not in gps:
            continue
        orig = node.params[k].copy()

        def f(p, k=k):
            node.params[k] = p
            npbe.forget_params()
            return float(np.sum(run_node(npbe, node, inputs, training)[0] * w))

        ng = numeric_grad(f, orig.astype(np.float64))
        node.params[k] = orig
        npbe.forget_params()
        assert_close(gps[k], ng, tol, f"{node.op} reference d/d{k}")


def check_op(npbe, clbe, node, inputs, training=False, fwd_tol=1e-4, grad_tol=1e-3, backward=True, rng=None):
    """The OpenCL op matches the float64 reference: forward, and input and parameter gradients."""
    rng = rng or np.random.default_rng(1)
    y_ref, _, _ = run_node(npbe, node, inputs, training)
    if not backward:
        y_cl, _, _ = run_node(clbe, node, inputs, training)
        clbe.forget_params(node)
        assert_close(y_cl, y_ref, fwd_tol, f"{node.op} forward")
        return y_cl
    g = rng.standard_normal(y_ref.shape)
    y_ref, gx_ref, gp_ref = run_node(npbe, node, inputs, training, grad_out=g)
    npbe.forget_params(node)
    y_cl, gx_cl, gp_cl = run_node(clbe, node, inputs, training, grad_out=g.astype(np.float32))
    clbe.forget_params(node)
    assert_close(y_cl, y_ref, fwd_tol, f"{node.op} forward")
    for i, (a, e) in enumerate(zip(gx_cl, gx_ref)):
        if e is not None:
            assert a is not None, f"{node.op}: OpenCL gave no gradient for input {i}"
            assert_close(a, e, grad_tol, f"{node.op} d/dinput{i}")
    for k, e in gp_ref.items():
        assert k in gp_cl, f"{node.op}: OpenCL gave no gradient for {k}"
        assert_close(gp_cl[k], e, grad_tol, f"{node.op} d/d{k}")
    return y_cl


def tiny_mobilenet(rng=None, size=9, classes=4):
    """A small MobileNet-V1-shaped graph with Keras-style names (conv1, conv1_bn, conv1_relu, conv_dw_1, ...,
    conv_pw_2_relu, global_average_pooling2d, predictions) and random weights, for plan/train tests."""
    from transfercl_cli.graph import Graph, Node

    rng = rng or np.random.default_rng(0)
    nodes = []
    t = "input"

    def bn(name, c, x):
        nodes.append(Node(name, "batchnorm", [x], [name], {"eps": 1e-3, "momentum": 0.99},
                          {"gamma": rng.uniform(0.5, 1.5, c).astype(np.float32),
                           "beta": rng.normal(0, 0.1, c).astype(np.float32),
                           "mean": rng.normal(0, 0.1, c).astype(np.float32),
                           "var": rng.uniform(0.5, 1.5, c).astype(np.float32)}, "BatchNormalization"))
        return name

    def act(name, x):
        nodes.append(Node(name, "relu6", [x], [name], {}, {}, "ReLU"))
        return name

    def conv(name, x, k, cin, cout, stride=1, groups=1, pads=None):
        pads = pads or ((0, 0, 1, 1) if stride == 2 else (k // 2,) * 4)
        w = rng.normal(0, np.sqrt(2.0 / (k * k * cin / groups)), (k, k, cin // groups, cout)).astype(np.float32)
        nodes.append(Node(name, "conv2d", [x], [name], {"kernel": (k, k), "strides": (stride, stride),
                                                          "dilations": (1, 1), "pads": pads, "groups": groups},
                          {"weight": w}, "DepthwiseConv2D" if groups > 1 else "Conv2D"))
        return name

    t = act("conv1_relu", bn("conv1_bn", 8, conv("conv1", t, 3, 3, 8, stride=2)))
    t = act("conv_dw_1_relu", bn("conv_dw_1_bn", 8, conv("conv_dw_1", t, 3, 8, 8, groups=8)))
    t = act("conv_pw_1_relu", bn("conv_pw_1_bn", 16, conv("conv_pw_1", t, 1, 8, 16)))
    t = act("conv_dw_2_relu", bn("conv_dw_2_bn", 16, conv("conv_dw_2", t, 3, 16, 16, stride=2, groups=16)))
    t = act("conv_pw_2_relu", bn("conv_pw_2_bn", 24, conv("conv_pw_2", t, 1, 16, 24)))
    nodes.append(Node("global_average_pooling2d", "global_avgpool", [t], ["gap"], {"keepdims": False}))
    nodes.append(Node("predictions_dense", "dense", ["gap"], ["logits"], {},
                      {"weight": rng.normal(0, 0.2, (24, classes)).astype(np.float32),
                       "bias": np.zeros(classes, np.float32)}, "Dense"))
    nodes.append(Node("predictions", "softmax", ["logits"], ["probs"], {"axis": -1}))
    return Graph(nodes, {"input": (size, size, 3)}, ["probs"], "tiny_mobilenet",
                 {"preprocess": {"size": [size, size], "scale": 1 / 127.5, "offset": -1.0}})
