"""Winograd F(4x4, 3x3) forward convolution on CPU devices (kernels/winograd.cl).

A 3x3, stride-1 convolution computes each 4x4 output tile from a 6x6 input tile with 36 multiplies per channel pair
instead of 144: the input tiles and the weights are transformed (B^T d B, G g G^T), multiplied point by point and
summed over the input channels - 36 GEMMs of tiles x Cin x Cout, run as one batched launch of the CPU GEMM - and
transformed back (A^T M A) with the bias and the fused activation. 4x fewer multiply-adds in the GEMMs, for the
cost of the transforms (about 2.25x the input and output written and read once more).

Used forward only (inference, and the frozen layers of a fine-tune; a trainable layer's forward too, its weight
transformed again each call), where it was faster than the direct and im2col paths (use_winograd). Its rounding
differs from a direct sum: the transforms multiply by up to 8 and 1/24, so errors grow to a few times a direct
convolution's (tests/test_winograd.py bounds them against the float64 reference).
"""
import numpy as np

from . import cl_gemm

i32 = np.int32

# False: never (tests compare the paths); None: where use_winograd says; True: wherever the shape allows.
WINOGRAD = None
# Scratch bound for one chunk of images' transformed input and output (36 points x tiles x channels each).
SCRATCH_BYTES = 64 << 20
# Where use_winograd takes it (PoCL, 2 cores, 3x3 shapes of ResNet, VGG, DenseNet, Inception and SqueezeNet at
# batch 1, 2 and 8, against the direct and im2col paths): at least MIN_FLOP multiply-adds x 2 in the direct sum
# (1.4-3.5x faster from ~100 MFLOP up, 0.8-1.7x around 50, slower below ~30), at least MIN_TILES 4x4 tiles, and
# where its 36 transformed weight matrices (4x the bytes of the 3x3 weight) cost less to stream than the im2col GEMM
# costs to compute. In a network a layer's weights come from memory each pass: ResNet's 7x7x512 convolution at
# batch 1 (4 tiles, 37.7 MB of transformed weights) took 2.3 ms by Winograd in the network (0.94 ms with its weights
# hot in cache, alone) and 0.9 ms as one im2col GEMM (9.4 MB of weights).
MIN_FLOP = 40e6
MIN_TILES = 8
# A GEMM's multiply-adds x 2 per byte streamed from memory at the same time cost (here ~300 GFLOP/s against
# ~18 GB/s, bench/bench_gemm.py and a streaming read): the cost model of _cost.
FLOP_PER_BYTE = 16.0


def _cdiv(a, b):
    return -(-a // b)


def shape_ok(rt, geom, groups, C, Cout):
    """Whether the Winograd kernels compute this convolution: 3x3, stride 1, dilation 1, groups 1, CPU style."""
    from .cl_conv import _cpu_style

    kh, kw, sh, sw, dh, dw = geom[:6]
    return (groups == 1 and kh == kw == 3 and sh == sw == dh == dw == 1 and _cpu_style(rt)
            and cl_gemm.batched_config(rt, 1, Cout, C) is not None)


def use_winograd(rt, geom, groups, N, C, Cout):
    """Whether conv_forward takes the Winograd path (WINOGRAD overrides)."""
    if WINOGRAD is False or not shape_ok(rt, geom, groups, C, Cout):
        return False
    if WINOGRAD:
        return True
    OH, OW = geom[10], geom[11]
    tiles = N * _cdiv(OH, 4) * _cdiv(OW, 4)
    flop = 2.0 * N * OH * OW * 9 * C * Cout
    if flop < MIN_FLOP or tiles < MIN_TILES:
        return False
    wino = _cost(2.0 * 36 * _cdiv(tiles, 8) * 8 * C * Cout, 36 * C * Cout * 4)  # tiles padded to a row block
    return wino < _cost(flop, 9 * C * Cout * 4)


def _cost(flop, weight_bytes):
    """A GEMM's time in bytes-streamed units: its arithmetic or its weight stream, whichever is longer."""
    return max(weight_bytes, flop / FLOP_PER_BYTE)


def _vw(n):
    """Channels per work-item of the transforms: the widest vector dividing the channel count."""
    return next(v for v in (16, 8, 4, 1) if n % v == 0)


def _weights(rt, w, C, Cout, NR, packs):
    """The U panels of weight w (3, 3, C, Cout) for block width NR: from packs (a frozen weight's cache) when there,
    else transformed now (and kept in packs when given)."""
    key = ("winograd", NR)
    if packs is not None and key in packs:
        return packs[key], False
    nbj = _cdiv(Cout, NR)
    u = rt.empty((36 * nbj * C * NR,))
    vw = _vw(Cout)
    k = rt.kernel("winograd", "wino_weight", {"VW": vw, "MINVEC": int(bool(rt.is_pocl))})
    rt.launch(k, (nbj * NR // vw, C), (1, 1), i32(C), i32(Cout), i32(NR), i32(nbj), w, u)
    if packs is not None:
        packs[key] = u
        return u, False
    return u, True


def winograd_forward(rt, x, w, b, geom, act, y, w_packs=None, residual=None):
    """y (N, OH, OW, Cout) = conv3x3(x, w) + b [+ residual], then act, by F(4x4, 3x3); images in chunks that bound
    the scratch."""
    from .cl_conv import _act_code

    N, H, W, C = x.shape
    Cout = w.shape[3]
    pt, pl, OH, OW = geom[6], geom[7], geom[10], geom[11]
    TH, TW = _cdiv(OH, 4), _cdiv(OW, 4)
    nimg = max(1, min(N, SCRATCH_BYTES // (36 * TH * TW * (C + Cout) * 4)))
    cfg = cl_gemm.batched_config(rt, nimg * TH * TW, Cout, C)
    u, own_u = _weights(rt, w, C, Cout, 16 * int(cfg["NV"]), w_packs)
    v = rt.empty((36 * nimg * TH * TW * C,))
    m = rt.empty((36 * nimg * TH * TW * Cout,))
    code = _act_code(act)
    vin, vout = _vw(C), _vw(Cout)
    minvec = {"MINVEC": int(bool(rt.is_pocl))}
    k_in = rt.kernel("winograd", "wino_input", dict(minvec, VW=vin))
    k_out = rt.kernel("winograd", "wino_output", dict(minvec, VW=vout, **cl_gemm.act_defines(code)))
    for n0 in range(0, N, nimg):
        T = min(nimg, N - n0) * TH * TW
        rt.launch(k_in, (C // vin, T), (1, 1), i32(H), i32(W), i32(C), i32(TH), i32(TW), i32(pt), i32(pl), i32(n0),
                  i32(T), x, v)
        cl_gemm.gemm_batched_panels(rt, cfg, v, u, m, 36, T, Cout, C)
        rt.launch(k_out, (Cout // vout, T), (1, 1), i32(OH), i32(OW), i32(Cout), i32(TH), i32(TW), i32(n0), i32(T),
                  m, b if b is not None else m, i32(b is not None), i32(code), y,
                  residual if residual is not None else m, i32(residual is not None))
    for t in (v, m) + ((u,) if own_u else ()):
        t.release()  # the in-order queue runs the launches above before a later command reuses the buffers
    return y
