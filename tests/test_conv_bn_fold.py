"""A trainable convolution carrying the trainable inference-mode BatchNorm after it (attr bn, plan.fold_frozen): the
OpenCL op folds the BN into its weights each pass and derives the BN's gradients from the folded ones; the float64
reference runs the convolution and the BatchNorm one after the other."""
import numpy as np
import pytest

from tests.helpers import assert_close, check_op, make_node, numeric_grad, run_node, tiny_mobilenet


@pytest.fixture(autouse=True)
def _no_gemm_autotune(monkeypatch):
    monkeypatch.setenv("TCL_NO_AUTOTUNE", "1")  # the GEMM's one-off autotuning is not under test here


def bn_node(C, rng, affine=True, mean_scale=0.5):
    params = {"mean": rng.standard_normal(C) * mean_scale, "var": rng.uniform(0.5, 2.0, C)}
    if affine:
        params.update(gamma=rng.uniform(0.5, 1.5, C), beta=rng.standard_normal(C))
    return make_node("batchnorm", attrs={"eps": 1e-3, "momentum": 0.99, "bn_mode": "inference"}, params=params,
                     name="n_bn")


def fused_node(cin, cout, k, s, pads, groups, bias, act, rng, affine=True, mean_scale=0.5):
    kh, kw = k
    params = {"weight": rng.standard_normal((kh, kw, cin // groups, cout)) / np.sqrt(kh * kw * cin / groups)}
    if bias:
        params["bias"] = rng.standard_normal(cout) * 0.5
    bn = bn_node(cout, rng, affine, mean_scale)
    return make_node("conv2d", attrs=dict(kernel=k, strides=s, dilations=(1, 1), pads=pads, groups=groups, act=act,
                                          bn=bn), params=params), bn


# (N, H, W, Cin, Cout, kernel, strides, pads, groups, bias, act, BN affine)
CASES = [
    (2, 6, 5, 8, 24, (1, 1), (1, 1), (0, 0, 0, 0), 1, False, "relu6", True),     # pointwise (MobileNet)
    (2, 7, 6, 5, 17, (3, 3), (1, 1), (1, 1, 1, 1), 1, True, "relu", True),       # 3x3 with a bias
    (2, 9, 8, 6, 10, (3, 3), (2, 2), (0, 0, 1, 1), 1, False, None, True),        # TF-SAME stride 2, no activation
    (2, 6, 6, 8, 8, (3, 3), (1, 1), (1, 1, 1, 1), 2, False, "relu", False),      # groups 2, BN without gamma/beta
    (2, 8, 7, 16, 16, (3, 3), (1, 1), (1, 1, 1, 1), 16, False, "relu6", True),   # depthwise
    (2, 9, 9, 24, 24, (3, 3), (2, 2), (0, 0, 1, 1), 24, False, "relu6", True),   # depthwise stride 2
    (1, 7, 7, 20, 20, (5, 5), (1, 1), (2, 2, 2, 2), 20, True, "relu", True),     # depthwise 5x5, a bias
    (2, 11, 9, 3, 16, (7, 7), (2, 2), (3, 3, 3, 3), 1, False, "relu", True),     # stem on RGB (direct kernels)
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[5][0]}x{c[5][1]}s{c[6][0]}g{c[8]}-{c[10]}" for c in CASES])
def test_fused_conv_batchnorm_matches_the_reference(npbe, clbe, case):
    """Forward, input gradient and the gradients of weight, bias, gamma and beta (keys (BN name, param))."""
    N, H, W, cin, cout, k, s, pads, groups, bias, act, affine = case
    rng = np.random.default_rng(cout)
    node, bn = fused_node(cin, cout, k, s, pads, groups, bias, act, rng, affine)
    x = rng.standard_normal((N, H, W, cin)).astype(np.float32)
    try:
        y = check_op(npbe, clbe, node, [x], training=True)
        _, _, gps = run_node(clbe, node, [x], True, grad_out=rng.standard_normal(y.shape).astype(np.float32))
    finally:
        npbe.forget_params()
        clbe.forget_params()
    want = {"weight"} | ({"bias"} if bias else set()) | ({(bn.name, "gamma"), (bn.name, "beta")} if affine else set())
    assert set(gps) == want


def test_reference_gradients_against_finite_differences(npbe):
    """The reference's gradients of the fused node (conv then BN then ReLU6), every parameter of both layers."""
    rng = np.random.default_rng(4)
    node, bn = fused_node(3, 4, (3, 3), (1, 1), (1, 1, 1, 1), 1, True, "relu6", rng)
    x = rng.standard_normal((1, 4, 4, 3)) * 0.5
    y = run_node(npbe, node, [x], True)[0]
    w = rng.standard_normal(y.shape)
    _, gxs, gps = run_node(npbe, node, [x], True, grad_out=w)

    def loss():
        npbe.forget_params()
        return float(np.sum(run_node(npbe, node, [x], True)[0] * w))

    def at(params, key):
        def f(p):
            old = params[key]
            params[key] = p
            try:
                return loss()
            finally:
                params[key] = old
        return f

    assert_close(gxs[0], numeric_grad(lambda xi: float(np.sum(run_node(npbe, node, [xi], True)[0] * w)), x), 1e-5,
                 "d/dx")
    for owner, params in ((node.name, node.params), (bn.name, bn.params)):
        for key in ("weight", "bias") if owner == node.name else ("gamma", "beta"):
            got = gps[key if owner == node.name else (owner, key)]
            assert_close(got, numeric_grad(at(params, key), params[key].astype(np.float64)), 1e-5, f"d/d{key}")
    npbe.forget_params()


def test_gamma_gradient_with_a_large_mean(npbe, clbe):
    """gamma's gradient comes from sum_k W dW + (bias - mean) db, not from the stored BN input: with BN means far
    from the spread of the convolution's output it must still match the reference."""
    rng = np.random.default_rng(7)
    node, bn = fused_node(16, 32, (1, 1), (1, 1), (0, 0, 0, 0), 1, True, "relu", rng, mean_scale=30.0)
    node.params["bias"] = bn.params["mean"] + rng.standard_normal(32)  # outputs near the means, as in a trained net
    x = rng.standard_normal((4, 6, 6, 16)).astype(np.float32)
    try:
        check_op(npbe, clbe, node, [x], training=True)
    finally:
        npbe.forget_params()
        clbe.forget_params()


def _inference_bns(g):
    for n in g.nodes:
        if n.op == "batchnorm":
            n.attrs["bn_mode"] = "inference"
    return g


def test_plan_fuses_only_trainable_inference_mode_batchnorms():
    from transfercl_cli.plan import fold_frozen

    g = _inference_bns(tiny_mobilenet())
    trainable = {n.name for n in g.nodes if n.params}
    f = fold_frozen(g, trainable, engine=True)
    convs = [n for n in f.nodes if n.op == "conv2d"]
    assert convs and all(n.attrs["bn"] is g.node(n.name + "_bn") for n in convs)
    assert not any(n.op == "batchnorm" for n in f.nodes)
    assert convs[0].attrs["act"] == "relu6" and convs[0].attrs["folded"] == ["conv1_bn", "conv1_relu"]
    assert f.node("conv1_bn").params is g.node("conv1_bn").params  # found through the convolution, shared
    assert {n.name for n in f.param_nodes()} == {n.name for n in g.nodes if n.params}
    # not for export graphs, not in batch mode, not for a frozen BatchNorm
    assert not any(n.attrs.get("bn") for n in fold_frozen(g, trainable).nodes)
    g.node("conv_pw_1_bn").attrs["bn_mode"] = "batch"
    f = fold_frozen(g, trainable - {"conv_dw_2_bn"}, engine=True)
    assert "conv_pw_1_bn" in f.names() and "bn" not in f.node("conv_pw_1").attrs
    assert "conv_dw_2_bn" in f.names() and "bn" not in f.node("conv_dw_2").attrs
    assert f.node("conv_pw_2").attrs["bn"].name == "conv_pw_2_bn"


def test_training_step_matches_the_unfused_graph(clbe):
    """Every parameter gradient of one training step (BatchNorms included) equals the unfused graph's."""
    from transfercl_cli.executor import Executor
    from transfercl_cli.plan import fold_frozen

    g = _inference_bns(tiny_mobilenet(size=17))
    trainable = {n.name for n in g.nodes if n.params}
    x = np.random.default_rng(3).uniform(-1, 1, (3, 17, 17, 3)).astype(np.float32)
    res = []
    for engine in (True, False):
        f = fold_frozen(g, trainable, engine=engine)
        assert any(n.attrs.get("bn") for n in f.nodes) == engine
        ex = Executor(f, clbe, trainable)
        out = ex.forward({"input": x}, training=True)[f.outputs[0]]
        logits = clbe.to_host(out)
        r = np.random.default_rng(5).standard_normal(logits.shape).astype(np.float32)  # (probs: ones give ~0)
        grads = ex.backward({f.outputs[0]: clbe.asarray(r)})
        res.append((logits, {k: clbe.to_host(v) for k, v in grads.items()}))
        for v in grads.values():
            clbe.release(v)
        clbe.forget_params()
    (l1, g1), (l2, g2) = res
    assert_close(l1, l2, 1e-5, "logits")
    assert set(g1) == set(g2) and ("conv_pw_1_bn", "gamma") in g1
    for k in g2:
        assert_close(g1[k], g2[k], 1e-4, f"{k}")


def test_real_mobilenet_gradients_match_the_float64_reference(clbe, npbe):
    """ImageNet MobileNet V1 (the Keras .h5), every layer trainable, BatchNorms in inference mode: the OpenCL step on
    the fused graph (27 convolutions carrying their BatchNorm) against the float64 reference on the unfused one. A
    ReLU6 mask can flip where a pre-activation is within float32 rounding of 0 or 6 (one element once moved a layer's
    largest gradient by 2%), so most parameters, not all, are held to 1e-3: a wrong BN gradient fails 27 of 83."""
    from tests.conftest import shared_path
    from transfercl_cli.executor import Executor
    from transfercl_cli.importers import load_model
    from transfercl_cli.plan import fold_frozen
    from tests.helpers import rel_err

    g = _inference_bns(load_model(shared_path("models", "mobilenet_v1_1.0_224.h5")))
    trainable = {n.name for n in g.nodes if n.params}
    x = np.random.default_rng(0).uniform(-1, 1, (2, 128, 128, 3))
    grads = {}
    for be, engine in ((clbe, True), (npbe, False)):
        f = fold_frozen(g, trainable, engine=engine)
        assert sum(1 for n in f.nodes if n.attrs.get("bn")) == (27 if engine else 0)
        ex = Executor(f, be, trainable)
        out = ex.forward({next(iter(f.inputs)): x.astype(np.float32 if engine else np.float64)}, training=True)
        y = np.asarray(be.to_host(out[f.outputs[0]]), np.float64)
        r = np.random.default_rng(1).standard_normal(y.shape)
        got = ex.backward({f.outputs[0]: be.asarray(r.astype(np.float32) if engine else r)})
        grads[engine] = {k: np.asarray(be.to_host(v), np.float64) for k, v in got.items()}
        be.forget_params()
    assert set(grads[True]) == set(grads[False]) and len(grads[True]) == 83
    errs = {k: rel_err(grads[True][k], grads[False][k]) for k in grads[False]}
    good = sorted(k for k, e in errs.items() if e < 1e-3)
    assert len(good) >= 0.9 * len(errs), sorted(errs.items(), key=lambda kv: -kv[1])[:10]
    assert np.median(list(errs.values())) < 1e-4
