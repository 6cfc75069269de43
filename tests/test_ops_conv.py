"""conv2d, dense, pooling, global average pooling and pad: the float64 reference against a direct loop and finite
differences, and the OpenCL kernels against the reference (forward and all gradients)."""
import numpy as np
import pytest

from tests.helpers import check_op, check_reference_grads, make_node, run_node


@pytest.fixture(autouse=True)
def _no_gemm_autotune(monkeypatch):
    # The GEMM's one-off autotuning (cl_gemm) is not under test here and would dominate a cold run of this file.
    monkeypatch.setenv("TCL_NO_AUTOTUNE", "1")


def conv_node(cin, cout, k=(3, 3), s=(1, 1), d=(1, 1), pads=(1, 1, 1, 1), groups=1, bias=True, act=None, seed=0):
    rng = np.random.default_rng(seed)
    kh, kw = k
    params = {"weight": rng.standard_normal((kh, kw, cin // groups, cout)) / np.sqrt(kh * kw * cin / groups)}
    if bias:
        params["bias"] = rng.standard_normal(cout) * 0.5
    return make_node("conv2d", attrs=dict(kernel=k, strides=s, dilations=d, pads=pads, groups=groups, act=act),
                     params=params)


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def naive_conv(x, w, b, s, d, pads, groups):
    """Direct loop over every output element (the definition)."""
    N, H, W, C = x.shape
    kh, kw, cg, cout = w.shape
    pt, pl, pb, pr = pads
    OH = (H + pt + pb - d[0] * (kh - 1) - 1) // s[0] + 1
    OW = (W + pl + pr - d[1] * (kw - 1) - 1) // s[1] + 1
    cog = cout // groups
    y = np.zeros((N, OH, OW, cout))
    for n in range(N):
        for oh in range(OH):
            for ow in range(OW):
                for o in range(cout):
                    g = o // cog
                    acc = 0.0 if b is None else float(b[o])
                    for i in range(kh):
                        for j in range(kw):
                            ih, iw = oh * s[0] - pt + i * d[0], ow * s[1] - pl + j * d[1]
                            if 0 <= ih < H and 0 <= iw < W:
                                for c in range(cg):
                                    acc += float(x[n, ih, iw, g * cg + c]) * float(w[i, j, c, o])
                    y[n, oh, ow, o] = acc
    return y


# (N, H, W, Cin, Cout, kernel, strides, dilations, pads, groups, bias, act)
CONV_CASES = [
    (1, 5, 7, 3, 5, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1, True, None),         # batch 1, odd sizes
    (2, 11, 9, 3, 64, (7, 7), (2, 2), (1, 1), (3, 3, 3, 3), 1, True, "relu"),     # ResNet stem: direct, 4 x 16
    (2, 7, 9, 5, 17, (3, 3), (2, 2), (1, 1), (0, 0, 1, 1), 1, True, "relu6"),     # TF-SAME stride 2
    (2, 8, 7, 3, 4, (3, 2), (1, 2), (2, 1), (2, 0, 1, 1), 1, False, None),        # dilation 2, asymmetric
    (1, 6, 5, 6, 4, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 2, True, "relu"),        # groups 2
    (2, 4, 5, 17, 33, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 1, True, None),       # pointwise GEMM path
    (1, 5, 5, 1, 3, (1, 1), (2, 2), (1, 1), (0, 0, 0, 0), 1, False, None),        # 1x1 stride 2, 1 channel
    (2, 7, 7, 17, 17, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 17, True, "relu6"),   # depthwise, 16 + 1 channels
    (1, 9, 6, 33, 33, (3, 3), (2, 2), (1, 1), (0, 0, 1, 1), 33, False, None),     # depthwise stride 2 TF-SAME
    (2, 5, 7, 3, 6, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 3, True, None),         # depth multiplier 2
    (1, 9, 8, 5, 5, (3, 3), (2, 1), (2, 2), (2, 1, 2, 3), 5, True, "relu"),       # depthwise dilated asym
    (1, 6, 6, 20, 20, (5, 5), (1, 1), (1, 1), (2, 2, 2, 2), 20, True, None),      # 5x5 depthwise, 16+4
    (2, 7, 9, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 2, True, "relu"),     # grouped direct, 16 per group
    (1, 9, 8, 64, 64, (3, 3), (2, 2), (1, 1), (0, 0, 1, 1), 2, False, "relu6"),   # grouped, 2 x 16, stride 2
    (2, 6, 7, 24, 16, (3, 3), (1, 1), (2, 2), (2, 1, 2, 3), 4, True, None),       # grouped, 4 per group, dilated
    (1, 5, 6, 18, 24, (5, 5), (1, 1), (1, 1), (2, 2, 2, 2), 3, True, None),       # grouped 5x5, 8 per group
    # stride 1 with channels per group that fill a vector: the input gradient runs as a flipped direct conv
    (2, 6, 7, 8, 12, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1, True, "relu"),      # 8 -> 12, pads 1
    (1, 7, 5, 16, 20, (3, 3), (1, 1), (1, 1), (0, 0, 2, 1), 1, False, None),      # asymmetric pads
    (2, 6, 6, 16, 3, (5, 5), (1, 1), (1, 1), (2, 2, 2, 2), 1, True, None),        # 5x5, 3 outputs (dx: CIN 3)
    (1, 5, 8, 24, 16, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 2, True, None),       # grouped, 12 in per group
    (2, 7, 6, 20, 8, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), 1, True, None),        # im2col/col2im rows, 16 + 4
]


def _conv_case(case, seed=0):
    N, H, W, cin, cout, k, s, d, pads, groups, bias, act = case
    node = conv_node(cin, cout, k, s, d, pads, groups, bias, act, seed=seed)
    x = rand((N, H, W, cin), seed + 1)
    return node, x


def test_reference_conv_matches_naive_loop(npbe):
    for case in (CONV_CASES[1], CONV_CASES[2], CONV_CASES[3], CONV_CASES[8]):
        node, x = _conv_case(case)
        node.attrs["act"] = None
        npbe.forget_params()  # parameters are cached by node name
        y, _, _ = run_node(npbe, node, [x])
        b = node.params.get("bias")
        ref = naive_conv(x, node.params["weight"], b, node.attrs["strides"], node.attrs["dilations"],
                         node.attrs["pads"], node.attrs["groups"])
        np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}k{c[5][0]}s{c[6][0]}"
                                                              f"d{c[7][0]}g{c[9]}")
def test_conv2d_opencl(npbe, clbe, case):
    node, x = _conv_case(case)
    if node.attrs["act"] == "relu6":
        x = x * 6  # outputs on both sides of 0 and of 6: both edges of the relu6 mask are exercised
        y = run_node(npbe, node, [x])[0]
        assert (y == 6).mean() > 0.02 and (y == 0).mean() > 0.1
    check_op(npbe, clbe, node, [x])


@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[9] < c[3] or c[9] == 1],
                         ids=lambda c: f"{c[3]}-{c[4]}k{c[5][0]}s{c[6][0]}g{c[9]}")
def test_conv2d_opencl_im2col_forward(npbe, clbe, case, monkeypatch):
    """The im2col + GEMM forward (still the path for channels per group that fill no vector) when the direct
    KxK kernel is off, on the same cases; and the cases meant for the direct kernel do take it."""
    from transfercl_cli.ops import cl_conv

    node, x = _conv_case(case)
    geom_groups, cout = case[9], case[4]
    kxk = case[5] != (1, 1) and case[3] > cl_conv.DIRECT_MAX_CIN
    if kxk and cout // geom_groups % 4 == 0:
        assert cl_conv.use_group_direct(clbe.rt, geom_groups, cout)
    monkeypatch.setattr(cl_conv, "GROUP_DIRECT", False)
    check_op(npbe, clbe, node, [x], backward=False)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[6] == (1, 1) and c[7] == (1, 1) and c[5] != (1, 1)],
                         ids=lambda c: f"{c[3]}-{c[4]}k{c[5][0]}g{c[9]}")
def test_conv2d_flipped_dx_matches_im2col(npbe, clbe, case, monkeypatch):
    """The stride-1 input gradient as a direct convolution of gy with flipped weights (where a direct kernel fits),
    against the reference, and the im2col + col2im path it replaces on the same case."""
    from transfercl_cli.ops import cl_conv

    node, x = _conv_case(case)
    N, H, W, C, Cout = case[:5]
    geom = (case[5][0], case[5][1], 1, 1, 1, 1, *case[8])
    # Below the minimum map, groups 1 keep im2col; grouped convolutions take the flipped kernel on any map.
    small = cl_conv.flipped_dx_ok(clbe.rt, geom, case[9], C, Cout, cl_conv.FLIPPED_DX_MIN_PIXELS - 1)
    assert small == (case[9] > 1 and cl_conv.use_group_direct(clbe.rt, case[9], C))
    monkeypatch.setattr(cl_conv, "FLIPPED_DX_MIN_PIXELS", 0)  # these test maps are small
    if C > cl_conv.DIRECT_MAX_CIN and (C // case[9]) % 4 == 0:
        assert cl_conv.flipped_dx_ok(clbe.rt, geom, case[9], C, Cout, H * W)
    check_op(npbe, clbe, node, [x])
    monkeypatch.setattr(cl_conv, "FLIPPED_DX", False)
    check_op(npbe, clbe, node, [x])


STRIDED_CASES = [  # grouped, strided: the input gradient runs as phases of direct convolutions (_strided_dx)
    (2, 9, 8, 32, 32, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), 2, True, "relu"),    # RegNetX's, odd height
    (1, 8, 7, 48, 48, (3, 3), (2, 2), (1, 1), (0, 0, 1, 1), 3, False, None),     # TF-SAME pads, 3 groups
    (2, 7, 9, 32, 64, (5, 5), (2, 3), (1, 1), (2, 2, 2, 2), 2, True, None),      # 5x5, strides 2 and 3
    (1, 6, 6, 32, 32, (2, 2), (2, 2), (1, 1), (0, 0, 0, 0), 2, False, None),     # one tap per phase
    (1, 5, 5, 32, 32, (3, 3), (3, 3), (1, 1), (1, 1, 1, 1), 2, True, None),      # stride = kernel, pads 1
    CONV_CASES[13],                                                              # 2 x 16, TF-SAME stride 2
    (2, 9, 8, 32, 16, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), 1, True, "relu"),    # groups 1, 32 channels
    CONV_CASES[20],                                                              # groups 1, 16 + 4 channels
]


@pytest.mark.parametrize("case", STRIDED_CASES, ids=lambda c: f"{c[3]}-{c[4]}k{c[5][0]}s{c[6][0]}{c[6][1]}g{c[9]}")
def test_conv2d_strided_dx_matches_im2col(npbe, clbe, case, monkeypatch):
    """The strided input gradient as one direct convolution per phase, written into its pixels of dx, against the
    reference, and the im2col + col2im path it replaces on the same case."""
    from transfercl_cli.ops import cl_conv

    monkeypatch.setattr(cl_conv, "PORTABLE", False)
    node, x = _conv_case(case, seed=3)
    N, H, W, C, Cout = case[:5]
    geom = (case[5][0], case[5][1], case[6][0], case[6][1], 1, 1, *case[8])
    assert cl_conv.strided_dx_ok(clbe.rt, geom, case[9], C, H, W)
    check_op(npbe, clbe, node, [x])
    monkeypatch.setattr(cl_conv, "STRIDED_DX", False)
    check_op(npbe, clbe, node, [x])


def test_phase_taps_cover_every_tap_once():
    """Each kernel tap reaches exactly one phase, and phase a's taps map dx row a + s*m to gy row m + d0 + t."""
    from transfercl_cli.ops.cl_conv import _phase_taps

    for k, s, pad in [(3, 2, 1), (3, 2, 0), (5, 3, 2), (2, 2, 0), (3, 3, 1), (7, 2, 3)]:
        seen = []
        for a in range(s):
            first, taps, d0 = _phase_taps(k, s, pad, a)
            for t in range(taps):
                i = first - s * t
                seen.append(i)
                for m in range(4):  # forward: input row oh*s - pad + i feeds output row oh
                    assert (m + d0 + t) * s - pad + i == a + s * m
        assert sorted(seen) == list(range(k))


@pytest.mark.parametrize("portable", [False, True], ids=["rows", "elements"])
@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[12], CONV_CASES[14], CONV_CASES[-1]],
                         ids=lambda c: f"{c[3]}-{c[4]}k{c[5][0]}s{c[6][0]}g{c[9]}")
def test_conv2d_im2col_styles(npbe, clbe, case, portable, monkeypatch):
    """im2col and col2im (the weight gradient and the strided input gradient of every KxK convolution) in both
    styles: a matrix row per work-item, 16 channels at a time (CPUs; channels per group 5, 32, 6 and 16 + 4) and an
    element per work-item (GPUs)."""
    from transfercl_cli.ops import cl_conv

    monkeypatch.setattr(cl_conv, "PORTABLE", portable)
    monkeypatch.setattr(cl_conv, "STRIDED_DX", False)  # (the strided dx of [-1] would take its phases)
    node, x = _conv_case(case, seed=5)
    check_op(npbe, clbe, node, [x])


WGRAD_CASES = [
    (2, 6, 7, 5, 16, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1, True, None),        # MR 1, NV 1
    (2, 7, 6, 6, 32, (3, 3), (2, 2), (1, 1), (0, 0, 1, 1), 1, False, None),       # MR 6, NV 2, TF-SAME stride 2
    (1, 8, 9, 8, 32, (3, 2), (1, 2), (2, 1), (2, 0, 1, 1), 1, True, None),        # dilated, asymmetric
    (2, 5, 7, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 2, True, None),       # groups 2, 16 per group
    (3, 8, 8, 2, 16, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1, True, None),        # several row chunks
    (2, 9, 9, 3, 16, (1, 1), (2, 2), (1, 1), (0, 0, 0, 0), 1, True, None),        # 1x1 stride 2 (ResNet shortcut)
]


@pytest.mark.parametrize("case", WGRAD_CASES, ids=lambda c: f"{c[3]}-{c[4]}k{c[5][0]}s{c[6][0]}g{c[9]}")
@pytest.mark.parametrize("pixels", [128, 1])
def test_conv2d_direct_wgrad(npbe, clbe, case, pixels, monkeypatch):
    """The weight gradient without an im2col matrix (conv_wgrad_rows: CPU style, output channels per group a
    multiple of 16) against the reference, with many rows per register round and with one; the im2col path it
    replaces on the same case."""
    from transfercl_cli.ops import cl_conv

    monkeypatch.setattr(cl_conv, "PORTABLE", False)
    monkeypatch.setattr(cl_conv, "WGRAD_PIXELS", pixels)
    node, x = _conv_case(case, seed=7)
    N, H, W, C, Cout = case[:5]
    assert cl_conv.direct_wgrad_ok(clbe.rt, case[9], C // case[9], Cout // case[9])
    check_op(npbe, clbe, node, [x])
    monkeypatch.setattr(cl_conv, "DIRECT_WGRAD", False)
    check_op(npbe, clbe, node, [x])


def test_direct_wgrad_chunks(rt):
    """Row chunks: whole rows, several where partial sums stay small next to gy (ResNet-18's 56x56x64 at batch 16,
    the several-chunks case above), one where they would not (7x7x512: dW is 6x the size of gy)."""
    from transfercl_cli.ops import cl_conv

    for nrows, dw_size, ncob, gy_size, several in [(24, 18 * 16, 1, 3 * 8 * 8 * 16, True),
                                                   (16 * 56, 576 * 64, 2, 16 * 56 * 56 * 64, True),
                                                   (16 * 7, 4608 * 512, 16, 16 * 7 * 7 * 512, False)]:
        n, per = cl_conv.wgrad_chunks(rt, nrows, dw_size, ncob, gy_size)
        assert n * per >= nrows > (n - 1) * per
        assert (n > 1) == several and n * dw_size <= max(gy_size // 2, dw_size)


def test_im2col_forward_choice(npbe, clbe, monkeypatch):
    """On CPUs the forward takes im2col + GEMM where it measured faster than the direct kernel (strides > 1 on 64+
    channels, 256+ input channels, 7x1 kernels) and the direct kernel elsewhere; both give the reference's result."""
    from transfercl_cli.ops import cl_conv

    monkeypatch.setattr(cl_conv, "PORTABLE", False)
    rt = clbe.rt
    g3 = lambda s, k=(3, 3): (*k, s, s, 1, 1)  # noqa: E731  (kernel, strides, dilations)
    assert cl_conv.im2col_forward_faster(rt, g3(2), 1, 64) and not cl_conv.im2col_forward_faster(rt, g3(2), 1, 32)
    assert cl_conv.im2col_forward_faster(rt, g3(1), 1, 256) and not cl_conv.im2col_forward_faster(rt, g3(1), 1, 128)
    assert cl_conv.im2col_forward_faster(rt, g3(1, (7, 1)), 1, 160)
    assert not cl_conv.im2col_forward_faster(rt, g3(1, (1, 7)), 1, 160)
    assert not cl_conv.im2col_forward_faster(rt, g3(2), 2, 256)  # grouped: direct
    monkeypatch.setattr(cl_conv, "PORTABLE", True)
    assert not cl_conv.im2col_forward_faster(rt, g3(1), 1, 256)  # GPU style: unchanged
    monkeypatch.setattr(cl_conv, "PORTABLE", False)
    for case in [(1, 4, 5, 256, 16, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1, True, "relu"),
                 (2, 7, 6, 64, 16, (3, 3), (2, 2), (1, 1), (0, 0, 1, 1), 1, False, None),
                 (1, 9, 5, 20, 16, (7, 1), (1, 1), (1, 1), (3, 0, 3, 0), 1, True, None)]:
        node, x = _conv_case(case, seed=9)
        check_op(npbe, clbe, node, [x], backward=False)


def test_conv2d_opencl_chunked(npbe, clbe, monkeypatch):
    """A scratch bound smaller than one batch: the im2col path runs image chunks (forward, dW accumulation)."""
    from transfercl_cli.ops import cl_conv

    # One image's im2col matrix is 5*5*27 floats (groups 1) or 5*5*18 (groups 2): chunks of 1 and 2 images of 3.
    monkeypatch.setattr(cl_conv, "COL_BYTES", 3700)
    for case, per in [((3, 5, 5, 3, 4, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1, True, "relu"), 1),
                      ((3, 5, 5, 4, 6, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 2, True, None), 2)]:
        node, x = _conv_case(case, seed=3)
        K = 9 * case[3] // case[9]
        assert cl_conv._chunk_images(clbe.rt, 3, 5, 5, K) == per
        check_op(npbe, clbe, node, [x * 1.5])


def test_depthwise_portable_variant(npbe, clbe, monkeypatch):
    """The GPU-style depthwise kernels (float4 + scalar tail, driver-chosen work-groups) on PoCL too."""
    from transfercl_cli.ops import cl_conv

    monkeypatch.setattr(cl_conv, "PORTABLE", True)
    for case in (CONV_CASES[6], CONV_CASES[7]):
        node, x = _conv_case(case, seed=4)
        check_op(npbe, clbe, node, [x * 1.5])


def test_depthwise_blocks_per_item(npbe, clbe, monkeypatch):
    """CPU style with work-items that sweep several channel blocks (2 per item over 3 blocks: one item has a
    partial group) and dW partial sums over a few row chunks."""
    from transfercl_cli.ops import cl_conv

    monkeypatch.setattr(cl_conv, "PORTABLE", False)
    monkeypatch.setattr(cl_conv, "_bpi", lambda rt, nb, others: min(nb, 2))
    monkeypatch.setattr(cl_conv, "DW_CHUNKS", 3)
    for case in [(2, 6, 7, 53, 53, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 53, True, "relu6"),
                 (1, 7, 6, 53, 53, (3, 3), (2, 2), (1, 1), (0, 0, 1, 1), 53, False, None)]:
        node, x = _conv_case(case, seed=6)
        check_op(npbe, clbe, node, [x * 6])


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[2], CONV_CASES[3], CONV_CASES[6], CONV_CASES[8],
                                  CONV_CASES[9]], ids=lambda c: f"g{c[9]}s{c[6][0]}d{c[7][0]}")
def test_conv2d_reference_grads(npbe, case):
    N, H, W, cin, cout, k, s, d, pads, groups, bias, act = case
    # Small versions of the cases (finite differences are one forward per element).
    node = conv_node(cin, cout, k, s, d, pads, groups, bias, act, seed=2)
    x = rand((1, min(H, 6), min(W, 6), cin), 5) * 1.5
    check_reference_grads(npbe, node, [x])


def test_dense(npbe, clbe):
    rng = np.random.default_rng(0)
    for cin, cout, bias, act in [(5, 3, True, None), (17, 33, False, "relu"), (8, 4, True, "relu6")]:
        params = {"weight": rng.standard_normal((cin, cout))}
        if bias:
            params["bias"] = rng.standard_normal(cout)
        node = make_node("dense", attrs={"act": act}, params=params)
        x = rand((3, cin), 7) * 2
        check_reference_grads(npbe, node, [x])
        check_op(npbe, clbe, node, [x])


# (op, attrs, input shape)
POOL_CASES = [
    ("maxpool", dict(kernel=(2, 2), strides=(2, 2), pads=(0, 0, 0, 0)), (1, 6, 6, 3)),
    ("maxpool", dict(kernel=(3, 3), strides=(2, 2), pads=(0, 0, 1, 1)), (2, 7, 8, 5)),
    ("maxpool", dict(kernel=(3, 2), strides=(2, 1), pads=(1, 0, 1, 1), ceil_mode=True), (1, 8, 5, 17)),
    ("maxpool", dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), ceil_mode=True), (2, 6, 6, 1)),
    ("avgpool", dict(kernel=(2, 2), strides=(2, 2), pads=(0, 0, 0, 0), count_include_pad=True), (1, 6, 6, 3)),
    ("avgpool", dict(kernel=(3, 3), strides=(2, 2), pads=(0, 0, 1, 1), count_include_pad=False), (2, 7, 8, 5)),
    ("avgpool", dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 0, 1), count_include_pad=True), (2, 7, 8, 5)),
    ("avgpool", dict(kernel=(3, 2), strides=(2, 1), pads=(1, 0, 1, 1), count_include_pad=True, ceil_mode=True),
     (1, 8, 5, 17)),
    ("avgpool", dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), count_include_pad=False, ceil_mode=True),
     (2, 6, 6, 1)),
    # 70 channels: whole 32-channel chunks of the CPU-style kernels and a partial one
    ("maxpool", dict(kernel=(3, 3), strides=(2, 2), pads=(0, 0, 0, 0), ceil_mode=True), (2, 9, 9, 70)),
    ("avgpool", dict(kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), count_include_pad=False), (1, 5, 6, 70)),
    ("global_avgpool", dict(keepdims=True), (2, 5, 3, 17)),
    ("global_avgpool", dict(keepdims=False), (1, 7, 7, 3)),
    ("global_avgpool", dict(keepdims=False), (3, 7, 7, 150)),  # whole 64-channel chunks and a partial one
    ("pad", dict(pads=(0, 0, 1, 1), value=0.0), (2, 5, 7, 3)),
    ("pad", dict(pads=(2, 1, 0, 3), value=-1.5), (1, 4, 3, 17)),
]


def _pool_id(c):
    return f"{c[0]}-{'x'.join(map(str, c[2]))}-" + "-".join(f"{k}{v}" for k, v in c[1].items() if k != "kernel")


@pytest.mark.parametrize("case", POOL_CASES, ids=_pool_id)
def test_pool_opencl(npbe, clbe, case):
    op, attrs, shape = case
    node = make_node(op, attrs=attrs)
    check_op(npbe, clbe, node, [rand(shape, 11)])


@pytest.mark.parametrize("case", POOL_CASES, ids=_pool_id)
def test_pool_reference_grads(npbe, case):
    op, attrs, shape = case
    node = make_node(op, attrs=attrs)
    check_reference_grads(npbe, node, [rand(shape, 12)])


def test_pool_portable_variants(npbe, clbe, monkeypatch):
    """The GPU-style kernels of the ops that have a CPU-style one too (global average pool, pad, average pooling's
    backward) on PoCL."""
    from transfercl_cli.ops import cl_conv

    monkeypatch.setattr(cl_conv, "PORTABLE", True)
    for op, attrs, shape in POOL_CASES:
        if op in ("global_avgpool", "pad", "avgpool"):
            check_op(npbe, clbe, make_node(op, attrs=attrs), [rand(shape, 13)])


@pytest.mark.parametrize("shape", [(1, 9, 7, 40), (2, 5, 5, 150), (1, 3, 1, 17)])
def test_global_avgpool_pixel_segments(npbe, clbe, shape, monkeypatch):
    """Too few (chunk, image) work-items: the CPU-style pool splits the pixels into segments and sums their partial
    rows with a second launch (segments of 4 pixels here; uneven last segments, 16-channel and single tails)."""
    from transfercl_cli.ops import cl_conv

    monkeypatch.setattr(cl_conv, "GAP_MIN_SEGMENT", 4)
    monkeypatch.setattr(cl_conv, "GAP_ITEMS_PER_CU", 64)
    N, H, W, C = shape
    assert cl_conv.gap_segments(clbe.rt, N, H * W, C) == max(1, min(-(-64 * clbe.rt.device.max_compute_units // (
        N * -(-C // cl_conv.GAP_CW))), H * W // 4))
    check_op(npbe, clbe, make_node("global_avgpool", attrs={"keepdims": False}), [rand(shape, 14)])


@pytest.mark.parametrize("case", [c for c in POOL_CASES if c[0] == "maxpool"], ids=_pool_id)
def test_maxpool_training_forward_keeps_indices(npbe, clbe, case):
    """A training forward finds the argmax with the maximum, so the backward does not read x again: its output has
    the inference forward's bits (a NaN and ties included) and its gradient matches the reference."""
    op, attrs, shape = case
    node = make_node(op, attrs=attrs)
    x = np.round(rand(shape, 21) * 2) / 2  # ties
    check_op(npbe, clbe, node, [x], training=True)
    x[0, 1, 1, 0] = np.nan
    y_train = run_node(clbe, node, [x], training=True)[0]
    y_infer = run_node(clbe, node, [x], training=False)[0]
    assert np.array_equal(y_train, y_infer, equal_nan=True)


def test_maxpool_ties(npbe, clbe):
    """Equal values in a window: the gradient goes to the first maximum in window order on both backends."""
    x = np.random.default_rng(3).integers(0, 3, (2, 7, 6, 5)).astype(np.float32)
    for pads, ceil in [((0, 0, 0, 0), False), ((1, 1, 1, 1), True)]:
        node = make_node("maxpool", attrs=dict(kernel=(3, 3), strides=(2, 1), pads=pads, ceil_mode=ceil))
        check_op(npbe, clbe, node, [x])


def test_pool_shapes(npbe):
    """Output sizes: floor, ceil with the last-window rule, and the avgpool divisors at the borders."""
    x = np.ones((1, 6, 6, 1), np.float32)
    node = make_node("maxpool", attrs=dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), ceil_mode=True))
    # ceil((6 + 2 - 3) / 2) + 1 = 4; the 4th window starts at row 3*2 - 1 = 5, inside the input: kept
    assert run_node(npbe, node, [x])[0].shape == (1, 4, 4, 1)
    # ceil((5 + 2 - 2) / 3) + 1 = 3, but the 3rd window would start at row 2*3 - 1 = 5, in the bottom padding: dropped
    node = make_node("maxpool", attrs=dict(kernel=(2, 2), strides=(3, 3), pads=(1, 1, 1, 1), ceil_mode=True))
    assert run_node(npbe, node, [np.ones((1, 5, 5, 1), np.float32)])[0].shape == (1, 2, 2, 1)
    node = make_node("maxpool", attrs=dict(kernel=(2, 2), strides=(2, 2), pads=(0, 0, 0, 0), ceil_mode=True))
    assert run_node(npbe, node, [np.ones((1, 5, 5, 1), np.float32)])[0].shape == (1, 3, 3, 1)
    node = make_node("maxpool", attrs=dict(kernel=(2, 2), strides=(2, 2), pads=(0, 0, 0, 0)))
    assert run_node(npbe, node, [np.ones((1, 5, 5, 1), np.float32)])[0].shape == (1, 2, 2, 1)
    # Excluding padding, an average of ones is exactly one everywhere; including it, the corners see 4 of 9.
    node = make_node("avgpool", attrs=dict(kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), count_include_pad=False))
    np.testing.assert_allclose(run_node(npbe, node, [x])[0], 1.0)
    node = make_node("avgpool", attrs=dict(kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), count_include_pad=True))
    y = run_node(npbe, node, [x])[0]
    assert abs(y[0, 0, 0, 0] - 4 / 9) < 1e-12 and abs(y[0, 2, 2, 0] - 1) < 1e-12


def test_direct_conv_few_input_channels(npbe, clbe):
    """conv1-like: 3 input channels, 32 outputs, stride 2 TF-SAME, bias and relu6 -> the direct NHWC kernel."""
    from transfercl_cli.ops import cl_conv

    case = (2, 9, 11, 3, 32, (3, 3), (2, 2), (1, 1), (0, 0, 1, 1), 1, True, "relu6")
    assert case[3] <= cl_conv.DIRECT_MAX_CIN
    node, x = _conv_case(case, seed=8)
    check_op(npbe, clbe, node, [x * 6])


def test_conv_im2col_for_few_channels_when_direct_is_off(npbe, clbe, monkeypatch):
    from transfercl_cli.ops import cl_conv

    monkeypatch.setattr(cl_conv, "DIRECT_MAX_CIN", 0)
    node, x = _conv_case((2, 9, 11, 3, 32, (3, 3), (2, 2), (1, 1), (0, 0, 1, 1), 1, True, "relu6"), seed=8)
    check_op(npbe, clbe, node, [x * 6])


def test_depthwise_merged_work_items(npbe, clbe, monkeypatch):
    """Small work-items that take several pixel chunks and rows (the spreading rule forced on)."""
    from transfercl_cli.ops import cl_conv

    monkeypatch.setattr(cl_conv, "PORTABLE", False)
    monkeypatch.setattr(cl_conv, "DW_ITEMS_MIN", 1)
    monkeypatch.setattr(cl_conv, "DW_SMALL_ITEM", 10**9)
    for case in (CONV_CASES[6], CONV_CASES[7], (2, 6, 7, 53, 53, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 53, True,
                                                 "relu6")):
        node, x = _conv_case(case, seed=9)
        check_op(npbe, clbe, node, [x * 6])


ENGINE_ACTS = ("swish", "sigmoid", "hard_swish", "hard_sigmoid")


@pytest.mark.parametrize("act", ENGINE_ACTS)
def test_engine_activations_fused_into_every_forward_path(npbe, clbe, act, monkeypatch):
    """Swish, sigmoid, hard-swish and hard-sigmoid in the epilogue of each convolution path (depthwise, direct,
    grouped, pointwise GEMM, im2col GEMM, CPU and portable kernels) and of dense (small-M and block GEMMs) match
    the float64 reference; values from -8 to 8 cover the saturating parts."""
    from transfercl_cli.ops import cl_conv

    cases = [((1, 6, 7, 8), dict(cin=8, cout=8, groups=8)),          # depthwise
             ((2, 5, 6, 5), dict(cin=5, cout=17)),                     # direct 3x3
             ((1, 5, 5, 8), dict(cin=8, cout=16, groups=2)),           # grouped
             ((2, 4, 5, 24), dict(cin=24, cout=40, k=(1, 1), pads=(0, 0, 0, 0))),  # pointwise: the GEMM
             ((1, 6, 6, 300), dict(cin=300, cout=20))]                 # 300 input channels: im2col + GEMM
    for portable in (False, True):
        monkeypatch.setattr(cl_conv, "PORTABLE", portable)
        for shape, kw in cases:
            node = conv_node(act=act, **kw)
            check_op(npbe, clbe, node, [rand(shape, 21) * 4], backward=False)
    for rows in (3, 20):
        node = make_node("dense", attrs={"act": act}, params={"weight": rand((30, 37), 22), "bias": rand(37, 23)})
        check_op(npbe, clbe, node, [rand((rows, 30), 24) * 2], backward=False)


def test_residual_fused_into_every_forward_path(npbe, clbe, monkeypatch):
    """A fused residual Add (attrs 'residual', the node's last input) before the activation on each convolution path:
    depthwise, direct, grouped, pointwise GEMM, im2col GEMM (one chunk or several: the separate pass), Winograd, CPU
    and portable kernels, against the float64 reference; no backward through it; a residual of another shape is an
    error, never a broadcast. (Few calls: this file runs on Oclgrind too.)"""
    from transfercl_cli.ops import cl_conv, cl_winograd

    cases = [((1, 6, 7, 8), dict(cin=8, cout=8, groups=8), "relu"),          # depthwise
             ((2, 5, 6, 3), dict(cin=3, cout=17), None),                       # direct 3x3
             ((1, 5, 5, 8), dict(cin=8, cout=16, groups=2), "swish"),          # grouped
             ((2, 4, 5, 24), dict(cin=24, cout=40, k=(1, 1), pads=(0, 0, 0, 0)), "relu"),  # pointwise: the GEMM
             ((2, 5, 6, 8), dict(cin=8, cout=21, s=(2, 2)), "swish"),          # im2col + GEMM (21: no vector)
             ((1, 5, 6, 16), dict(cin=16, cout=24), "relu")]                   # Winograd where forced
    monkeypatch.setattr(cl_winograd, "WINOGRAD", True)
    for portable in (False, True):
        monkeypatch.setattr(cl_conv, "PORTABLE", portable)
        for shape, kw, act in cases:
            node = conv_node(act=act, **kw)
            node.inputs, node.attrs["residual"] = ["x0", "x1"], True
            x = rand(shape, 31) * 2
            y_shape = run_node(npbe, conv_node(**kw), [x])[0].shape
            check_op(npbe, clbe, node, [x, rand(y_shape, 32) * 2], backward=False)
        with monkeypatch.context() as m:  # im2col one image at a time: the GEMM cannot take the residual
            m.setattr(cl_conv, "_chunk_images", lambda rt, N, OH, OW, K: 1)
            node = conv_node(act="relu", cin=8, cout=21, s=(2, 2))
            node.inputs, node.attrs["residual"] = ["x0", "x1"], True
            check_op(npbe, clbe, node, [rand((2, 5, 6, 8), 35), rand((2, 3, 3, 21), 36) * 2], backward=False)
    node = conv_node(4, 4)
    node.inputs, node.attrs["residual"] = ["x0", "x1"], True
    with pytest.raises(ValueError, match="fused residual has shape"):
        run_node(clbe, node, [rand((1, 4, 4, 4), 33), rand((1, 1, 1, 4), 34)])
    with pytest.raises(ValueError, match="no backward"):
        run_node(clbe, node, [rand((1, 4, 4, 4), 33), rand((1, 4, 4, 4), 34)], grad_out=np.ones((1, 4, 4, 4)))


def test_engine_activation_has_no_fused_gradient(clbe):
    """A backward through a fused swish is refused (the plan never asks for one): a clear error, not a gradient
    computed as if it were a ReLU."""
    node = conv_node(4, 4, act="swish")
    with pytest.raises(ValueError, match="no gradient"):
        run_node(clbe, node, [rand((1, 4, 4, 4), 25)], grad_out=np.ones((1, 4, 4, 4)))
    dense = make_node("dense", attrs={"act": "sigmoid"}, params={"weight": rand((4, 3), 26)})
    with pytest.raises(ValueError, match="no gradient"):
        run_node(clbe, dense, [rand((2, 4), 27)], grad_out=np.ones((2, 3)))
