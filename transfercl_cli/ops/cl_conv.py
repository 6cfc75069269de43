"""OpenCL convolution and spatial ops (NHWC activations, HWIO weights), forward and backward.

Strategy (kernels/conv.cl, kernels/pool.cl):
- 1x1, stride 1, no padding, groups 1: the NHWC tensor is an (N*H*W, Cin) matrix: one GEMM (cl_gemm.gemm) with the
  bias and activation fused; dW = X^T dY, dX = dY W^T.
- depthwise (groups == Cin, any multiplier): a dedicated NHWC kernel, VW channels per vector (float16 on CPUs,
  float4 elsewhere, then float4 and scalar variants for the remaining channels), PIX output pixels per work-item
  and, on CPUs, several channel blocks per work-item; bias and activation fused. Backward: dX by a gather kernel,
  dW and db as per-row-chunk partial sums then a column reduction (deterministic, no atomics).
- groups 1 with at most DIRECT_MAX_CIN input channels (conv1 on RGB), forward: a direct NHWC kernel (no im2col
  matrix), bias and activation fused; its backward takes the im2col path below.
- k x k (any strides, dilations, groups; not depthwise) whose output channels per group fill a vector (4 or more),
  forward: the direct kernel conv_group_fwd, NBV vectors of output channels of one group for PIX pixels per
  work-item, the input row segment in registers per input channel; no im2col matrix, no per-group copies.
- 3x3, stride 1, dilation 1, groups 1 on CPUs, forward, where cl_winograd.use_winograd says (enough work, and its
  transformed weights cost less to stream than the im2col GEMM's arithmetic): Winograd
  F(4x4, 3x3), 4x fewer multiplies (ops/cl_winograd.py); a frozen weight's transform is kept (Backend.const_cache).
- k x k, stride 1, dilation 1, backward dX: the forward of dY with the weights flipped in space and input/output
  channels swapped per group (conv_weight_flip), padded by k - 1 - pad, through the direct kernels above, where
  one of them fits the flipped shape (FLIPPED_DX), or through Winograd where it takes the flipped shape.
- k x k, stride s > 1, dilation 1, backward dX on CPUs (grouped, or fewer than 128 channels): s*s phases, each a
  stride-1 direct convolution of dY with the taps that reach it, written straight into its pixels of dX
  (STRIDED_DX, _strided_dx).
- k x k weight gradients on CPUs with output channels per group a multiple of 16: kernels/conv_wgrad.cl, no im2col
  matrix (DIRECT_WGRAD; partial sums per chunk of rows, then a column sum).
- everything else (and dW of all the above on GPUs; on CPUs the forward too where im2col_forward_faster says so):
  im2col per group into an (images*OH*OW, kh*kw*Cin/g) matrix, then GEMM; the images are processed in chunks that
  bound the scratch matrix. dX: GEMM dY W^T into the same scratch, then a col2im gather kernel. On CPUs both move a
  whole matrix row (pixel) per work-item, 16 channels at a time (im2col_rows, col2im_rows).
- max/average pooling forward and backward on CPUs: 32 channels per work-item (pool.cl *_rows).
- padding and global average pooling backward on CPUs: one work-item per row (float16 copies; the element-per-item
  kernels cost PoCL ~7x); pooling and the rest: gather kernels, one work-item per element; maxpool backward
  recomputes each window's argmax (first maximum in window order, as the reference) in a scratch (int32, or
  float indices on CPUs).

Fused activations are an inference epilogue; the backward still masks the incoming gradient by the output.
"""
import numpy as np

from ..runtime import DeviceArray
from . import cl_gemm, cl_winograd, register
from .ref_conv import conv_geometry, no_residual_backward, pool_geometry, residual_input
from .ref_elementwise import Saved
from .cl_elementwise import BNFold, chan_gsum, colsum
from .shapes import global_pool_shape

i32 = np.int32
_ACT = dict(cl_gemm._ACT, **{"": 0, "none": 0})  # fused activations (kernels/fused_act.h)

# Vector registers the dW partial kernel may plan for (of AVX-512's 32).
BUDGET_DW = 30

# None: depthwise kernels in the CPU style (float16, single work-items) on CPU devices and the portable style
# (float4, the driver's work-group size) elsewhere; True/False forces one (tests run both on PoCL).
PORTABLE = None

# CPU style: work-items per compute unit the depthwise kernels keep (more channel blocks per work-item above that),
# and the row chunks of the dW partial sums.
DW_ITEMS_PER_CU = 32
DW_CHUNKS = 128
DW_CHUNKS_MIN_PER_CU = 4  # ...but at least this many per compute unit where partial sums would outweigh gy
# ... and, for work-items smaller than DW_SMALL_ITEM (channel blocks x pixels), the fewest work-items per compute
# unit before pixel chunks and rows are merged into one work-item.
DW_ITEMS_MIN = 64
DW_SMALL_ITEM = 32

# Convolutions (groups 1, not pointwise) with at most this many input channels run the direct kernel forward
# (conv1 on RGB images) instead of im2col + GEMM.
DIRECT_MAX_CIN = 4
# Stride-1 convolutions compute their input gradient as a direct forward convolution of gy with flipped weights
# (conv_backward); False: im2col + GEMM + col2im, as every other convolution (tests compare the two).
FLIPPED_DX = True
# Strided convolutions (grouped, or groups 1 with few channels) compute their input gradient as SH*SW phases of
# direct convolutions of gy (strided_dx_ok); False: im2col + GEMM + col2im per group (tests compare the two).
STRIDED_DX = True
STRIDED_DX_MAX_CIN = 128  # ...for groups 1: below this many input channels
# ...for inputs of at least this many pixels: on smaller maps with many channels (ResNet's 7x7x512) im2col + GEMM
# was faster (batch 16: 25 ms against 29-33 ms; 14x14x256: 33 against 22 ms; 56x56x64: 83 against 15 ms).
FLIPPED_DX_MIN_PIXELS = 100
# KxK weight gradients (not pointwise, not depthwise) on CPUs with 16k output channels per group: the direct kernel
# conv_wgrad_rows (no im2col matrix) with about WGRAD_ITEMS_PER_CU work-items per compute unit; False: im2col + GEMM.
DIRECT_WGRAD = True
WGRAD_ITEMS_PER_CU = 16
# ... and about this many output pixels (whole rows) per round of its running sums through registers.
WGRAD_PIXELS = 128
# KxK convolutions (grouped or not, not depthwise) whose output channels per group fill a vector run the direct
# kernel conv_group_fwd forward instead of im2col + a GEMM per group. PoCL, 2 cores, batch 8, 3x3: 4.8-13.7x faster
# on RegNetX-400MF's grouped shapes (16 channels per group), 1.0-2.2x on ResNet-18's (56x56x64 .. 7x7x512).
GROUP_DIRECT = True
# Convolutions with at least this many input channels run forward as im2col + GEMM on CPUs (im2col_forward_faster).
IM2COL_MIN_CIN = 256
# Channels per work-item of the CPU-style global average pool (four float16 registers).
GAP_CW = 64
# Channels per work-item of the CPU-style max/average pooling forward (pool.cl *_fwd_rows; a multiple of 16).
POOL_CW = 32

# Scratch bound for the im2col matrix of one chunk of images.
COL_BYTES = 64 << 20


def _cdiv(a, b):
    return -(-a // b)


def _view(arr, shape):
    """A non-owning view of the first prod(shape) elements of arr's buffer."""
    shape = tuple(int(s) for s in shape)
    assert int(np.prod(shape)) <= arr.size
    return DeviceArray(arr.rt, arr.buf, shape, arr.dtype, pooled=False)


def _act_code(act):
    if act not in _ACT:
        raise ValueError(f"unsupported fused activation {act!r}")
    return _ACT[act]


def _masked_grad(rt, gy, y, act):
    """(gradient, temporary or None): gy masked by the fused activation's derivative (from its output)."""
    _act_code(act)
    g = cl_gemm.act_masked(rt, gy, y, act if act not in ("", "none") else None, "conv2d")
    return g, (g if g is not gy else None)


def _masked_grad_and_sum(rt, gy, y, act):
    """(gradient, its per-channel sum): gy masked by relu/relu6 read from the output y, and summed over all axes but
    the last in the same pass (cl_elementwise.chan_gsum): a convolution carrying a BatchNorm needs both."""
    g = rt.empty(y.shape)
    s, s_gy = chan_gsum(rt, y, gy, dx=g, unit_act=act)
    s_gy.release()
    return g, s


def _copy2d(rt, src, sld, sr0, sc0, dst, dld, dr0, dc0, rows, cols):
    rt.launch(rt.kernel("conv", "copy2d"), (cols, rows), None, src, i32(sld), i32(sr0), i32(sc0),
              dst, i32(dld), i32(dr0), i32(dc0), i32(rows), i32(cols))


# ---------------------------------------------------------------------------------------------------------------
# depthwise


def _compute_units(rt):
    return max(1, int(getattr(rt.info, "compute_units", 1) or 1))


def _cpu_style(rt):
    return rt.is_cpu if PORTABLE is None else not PORTABLE


def _dw_blocks(rt, nch, mult):
    """(vector width, first channel, number of blocks) launches covering nch channels."""
    widths = ([16, 4, 1] if _cpu_style(rt) else [4, 1]) if mult == 1 else [1]
    out, c = [], 0
    for vw in widths:
        nb = (nch - c) // vw
        if nb:
            out.append((vw, c, nb))
            c += nb * vw
    return out


def _pix(n, most=8):
    """Pixels per work-item along a row of n, from a few sizes (each is a separate build): a work-item costs about
    PIX + 2 (its row segment is longer than PIX by the kernel width), so minimise blocks * (PIX + 2)."""
    cands = [p for p in (8, 7, 6, 4, 3, 2, 1) if p <= most] or [1]
    return min(cands, key=lambda p: (_cdiv(n, p) * (p + 2), -p))


def _pix_dw(geom, n):
    """Pixels per work-item of the dW partial kernel: its KH*KW + 1 accumulators, PIX gradient vectors and the
    input row segment should fit in the 32 vector registers of AVX-512 (with room for addresses and temporaries)."""
    kh, kw, sh, sw, dh, dw = geom[:6]
    p = 8
    while p > 1 and kh * kw + 1 + p + (p - 1) * sw + (kw - 1) * dw + 1 > BUDGET_DW:
        p -= 1
    return _pix(n, p)


def _dw_local(rt, ndim):
    """Work-group size of the depthwise kernels: single work-items on CPUs (PoCL's work-group loops around a
    kernel that already works on float16 vectors spill its registers), the driver's choice elsewhere."""
    return (1,) * ndim if _cpu_style(rt) else None


def _bpi(rt, nb, others):
    """Channel blocks per work-item: on CPUs a work-item sweeps several blocks of the same pixels (contiguous
    reads, fewer work-groups to schedule) while DW_ITEMS_PER_CU work-items per compute unit remain; one block per
    work-item elsewhere. `others`: the work-items along the other dimensions."""
    if not _cpu_style(rt):
        return 1
    cu = _compute_units(rt)
    return max(1, min(nb, (nb * others) // (DW_ITEMS_PER_CU * cu)))


def _spread(rt, items, nchunks, nrows, per_item):
    """(ppi, rpi): pixel chunks and rows per work-item. On CPUs PoCL pays per work-group (single work-items
    here), so a small work-item (`per_item` = channel blocks x pixels below DW_SMALL_ITEM) takes whole rows, then
    several rows, while about DW_ITEMS_MIN per compute unit remain (`items`: the work-items along the channel
    dimension). Larger work-items stay as they are: merging those was measured 1.7x slower (N=32, 14x14x512)."""
    if not _cpu_style(rt) or per_item >= DW_SMALL_ITEM:
        return 1, 1
    cu = _compute_units(rt)
    want = DW_ITEMS_MIN * cu
    ppi = 1
    while ppi < nchunks and items * _cdiv(nchunks, ppi * 2) * nrows >= want:
        ppi *= 2
    ppi = min(ppi, nchunks)
    rpi = 1
    while rpi < nrows and items * _cdiv(nchunks, ppi) * _cdiv(nrows, rpi * 2) >= want:
        rpi *= 2
    return ppi, min(rpi, nrows)


def _dw_defines(rt, geom, mult, vw, pix):
    kh, kw, sh, sw, dh, dw = geom[:6]
    return {"DEPTHWISE": 1, "KH": kh, "KW": kw, "SH": sh, "SW": sw, "DH": dh, "DW": dw, "MULT": mult, "VW": vw,
            "PIX": pix, "MINVEC": int(bool(rt.is_pocl))}


def depthwise_forward(rt, x, w, b, geom, act, y):
    N, H, W, C = x.shape
    Cout = w.shape[3]
    mult = Cout // C
    pt, pl, OH, OW = geom[6], geom[7], geom[10], geom[11]
    pix = _pix(OW)
    for vw, c0, nb in _dw_blocks(rt, Cout, mult):
        defs = dict(_dw_defines(rt, geom, mult, vw, pix), **cl_gemm.act_defines(_act_code(act)))
        k = rt.kernel("conv", "dw_fwd", defs)
        nch = _cdiv(OW, pix)
        bpi = _bpi(rt, nb, nch * N * OH)
        ppi, rpi = _spread(rt, _cdiv(nb, bpi), nch, N * OH, bpi * pix)
        rt.launch(k, (_cdiv(nb, bpi), _cdiv(nch, ppi), _cdiv(N * OH, rpi)), _dw_local(rt, 3), x, w,
                  b if b is not None else w, y, i32(H), i32(W), i32(C), i32(OH), i32(OW), i32(pt), i32(pl), i32(c0),
                  i32(nb), i32(b is not None), i32(_act_code(act)), i32(bpi), i32(ppi), i32(rpi), i32(N * OH))
    return y


def depthwise_backward(rt, x, w, gy, geom, need_x, need_w, has_bias):
    N, H, W, C = x.shape
    Cout = w.shape[3]
    mult = Cout // C
    kh, kw = geom[0], geom[1]
    pt, pl, OH, OW = geom[6], geom[7], geom[10], geom[11]
    dx = dW = db = None
    if need_x:
        dx = rt.empty(x.shape)
        pix = _pix(W)
        for vw, c0, nb in _dw_blocks(rt, C, mult):
            k = rt.kernel("conv", "dw_bwd_dx", _dw_defines(rt, geom, mult, vw, pix))
            nch = _cdiv(W, pix)
            bpi = _bpi(rt, nb, nch * N * H)
            ppi, rpi = _spread(rt, _cdiv(nb, bpi), nch, N * H, bpi * pix)
            rt.launch(k, (_cdiv(nb, bpi), _cdiv(nch, ppi), _cdiv(N * H, rpi)), _dw_local(rt, 3), gy, w, dx,
                      i32(H), i32(W), i32(C), i32(OH), i32(OW), i32(pt), i32(pl), i32(c0), i32(nb), i32(bpi),
                      i32(ppi), i32(rpi), i32(N * H))
    if need_w:
        T = kh * kw
        blocks = _dw_blocks(rt, Cout, mult)
        Q = N * OH
        if _cpu_style(rt):
            # DW_CHUNKS row chunks balance the threads; each work-item walks its rows across many channel blocks
            # (_bpi) in memory order. Fewer where the partial sums would outweigh gy: 112 chunks of MobileNetV3's
            # 7x7x576 5x5 at batch 16 wrote 6.7 MB of partials for 1.8 MB of gy (dW 0.9-1.6 ms alone; 0.7-1.0 now).
            cu = _compute_units(rt)
            R = max(1, min(Q, DW_CHUNKS, max(DW_CHUNKS_MIN_PER_CU * cu, gy.size // (2 * (T + 1) * Cout))))
        else:
            R = max(1, min(Q, _cdiv(8192, sum(nb for _, _, nb in blocks))))
        rows_per = _cdiv(Q, R)
        R = _cdiv(Q, rows_per)
        part = rt.empty((R, (T + 1) * Cout))
        pixw = _pix_dw(geom, OW)
        kname = "dw_bwd_dw_rows" if _cpu_style(rt) else "dw_bwd_dw_partial"
        for vw, c0, nb in blocks:
            k = rt.kernel("conv", kname, _dw_defines(rt, geom, mult, vw, pixw))
            bpi = _bpi(rt, nb, R)
            rt.launch(k, (_cdiv(nb, bpi), R), _dw_local(rt, 2), x, gy, part, i32(N), i32(H), i32(W), i32(C), i32(OH),
                      i32(OW), i32(pt), i32(pl), i32(c0), i32(nb), i32(rows_per), i32(bpi))
        dW = rt.empty(w.shape)
        db = rt.empty((Cout,))
        rt.launch(rt.kernel("conv", "colsum_split"), ((T + 1) * Cout,), None, part, i32(R), i32((T + 1) * Cout),
                  dW, i32(T * Cout), db)
        part.release()
        if not has_bias:
            db.release()
            db = None
    return dx, dW, db


# ---------------------------------------------------------------------------------------------------------------
# general convolution: im2col + GEMM



def _is_pointwise(geom, groups):
    kh, kw, sh, sw, dh, dw, pt, pl, pb, pr = geom[:10]
    return groups == 1 and kh == kw == sh == sw == 1 and pt == pl == pb == pr == 0


def _scratch_bytes(rt):
    """The most one convolution's scratch (an im2col chunk, the direct weight gradient's partial sums) may take."""
    return min(COL_BYTES, int(getattr(rt.info, "max_alloc", COL_BYTES)) // 2)


def _chunk_images(rt, N, OH, OW, K):
    per = max(OH * OW * K * 4, 1)
    return max(1, min(N, _scratch_bytes(rt) // per))


def _launch_im2col(rt, name, rows, elems, src, dst, x_shape, geom, Cg, c0, n0):
    """im2col / col2im (kernels/conv.cl, IM2COL_GEOMETRY arguments; x_shape: the image side's shape): on CPUs the
    *_rows kernel over `rows` (a matrix row per work-item, 16 channels at a time), elsewhere the element kernel
    over `elems`."""
    N, H, W, C = x_shape
    pt, pl, OH, OW = geom[6], geom[7], geom[10], geom[11]
    if _cpu_style(rt):
        name, gsize, lsize = name + "_rows", rows, (1,) * len(rows)
    else:
        gsize, lsize = elems, None
    rt.launch(rt.kernel("conv", name), gsize, lsize, src, dst,
              i32(H), i32(W), i32(C), i32(OH), i32(OW), i32(pt), i32(pl), i32(Cg), i32(c0), i32(n0),
              *[i32(v) for v in geom[:6]])


def _im2col(rt, x, col, geom, Cg, c0, n0, nimg):
    OH, OW = geom[10], geom[11]
    _launch_im2col(rt, "im2col", (OW, nimg * OH), (geom[0] * geom[1] * Cg, OW, nimg * OH), x, col, x.shape, geom,
                   Cg, c0, n0)


def _col2im(rt, dcol, dx, geom, Cg, c0, n0, nimg):
    H, W = dx.shape[1], dx.shape[2]
    _launch_im2col(rt, "col2im", (W, nimg * H), (Cg, W, nimg * H), dcol, dx, dx.shape, geom, Cg, c0, n0)


def _direct_defines(rt, geom, pix, **extra):
    kh, kw, sh, sw, dh, dw = geom[:6]
    return dict({"DIRECT": 1, "KH": kh, "KW": kw, "SH": sh, "SW": sw, "DH": dh, "DW": dw, "PIX": pix,
                 "MINVEC": int(bool(rt.is_pocl))}, **extra)


def _launch_direct(rt, k, x, w, b, y, geom, pix, nb, shape_args, block_args, act, extra=()):
    """Launch a direct kernel (conv_direct_fwd / conv_group_fwd) over nb channel blocks: the work split of the
    depthwise kernels (blocks, pixel chunks and rows per work-item), then the arguments both kernels share
    (`extra`: conv_group_fwd's phase arguments)."""
    N, OH, OW = x.shape[0], geom[10], geom[11]
    nch = _cdiv(OW, pix)
    bpi = _bpi(rt, nb, nch * N * OH)
    ppi, rpi = _spread(rt, _cdiv(nb, bpi), nch, N * OH, bpi * pix)
    rt.launch(k, (_cdiv(nb, bpi), _cdiv(nch, ppi), _cdiv(N * OH, rpi)), _dw_local(rt, 3), x, w,
              b if b is not None else w, y, *[i32(v) for v in shape_args], *[i32(v) for v in block_args],
              i32(nb), i32(b is not None), i32(_act_code(act)), i32(bpi), i32(ppi), i32(rpi), i32(N * OH),
              *[i32(v) for v in extra])


def _direct_forward(rt, x, w, b, geom, act, y):
    """Direct convolution (groups 1, few input channels): no im2col matrix."""
    N, H, W, C = x.shape
    Cout = w.shape[3]
    pt, pl, OH, OW = geom[6], geom[7], geom[10], geom[11]
    for vw, c0, nb in _dw_blocks(rt, Cout, 1):
        nbv, pix = 1, _pix(OW)
        if _cpu_style(rt) and vw == 16:
            # Float16 vectors that share the input row segment: four of them over 4 pixels (64 output channels, the
            # 7x7 stem of ResNet and DenseNet, VGG's and SqueezeNet's first 3x3) ran 1.6-2.5x faster than two over
            # 8 pixels (ResNet's stem at batch 1: 1.76 -> 0.72 ms); both hold 16 accumulators.
            nbv = 4 if nb % 4 == 0 else 2 if nb % 2 == 0 else 1
            if nbv == 4:
                pix = _pix(OW, 4)
        k = rt.kernel("conv", "conv_direct_fwd", _direct_defines(rt, geom, pix, CIN=C, VW=vw, NBV=nbv,
                                                                 **cl_gemm.act_defines(_act_code(act))))
        _launch_direct(rt, k, x, w, b, y, geom, pix, nb // nbv, (H, W, OH, OW, Cout, pt, pl), (c0,), act)
    return y


def _group_blocks(rt, cog):
    """(VW, NBV) of the direct grouped kernel: the widest vector dividing the channels per group (a block must not
    straddle groups), two vectors per step on CPUs when they also divide it; None when no width > 1 fits."""
    for vw in ((16, 8, 4) if _cpu_style(rt) else (4,)):
        if cog % vw == 0:
            return vw, 2 if _cpu_style(rt) and cog % (2 * vw) == 0 else 1
    return None


def use_group_direct(rt, groups, cout):
    """Whether conv_forward takes the direct kernel: output channels per group fill a vector (depthwise, pointwise
    and few-input-channel convolutions have their own kernels); GROUP_DIRECT = False turns it off (tests compare
    the two paths)."""
    return GROUP_DIRECT and _group_blocks(rt, cout // groups) is not None


def im2col_forward_faster(rt, geom, groups, cin):
    """Where im2col + GEMM beat the direct kernel forward (CPU style, groups 1, measured on PoCL, 2 cores, batch 1
    and 8, since im2col moves 16 channels at a time): strides > 1 on 64+ channels (ResNet's 56x56x64 -> 128: 0.89
    against 1.39 ms at batch 1), 256+ input channels at any map size (ResNet's 14x14x256 and 7x7x512, VGG's
    56x56x256 .. 14x14x512: 1.2-1.8x; with 128 channels the two are even) and tall kernels one column wide
    (Inception's 7x1: 1.4x), where the direct kernel's input row segment is reused by few taps. Grouped
    convolutions stay direct (one GEMM per group is a poor micro-kernel operand)."""
    kh, kw, sh, sw = geom[:4]
    if groups != 1 or not _cpu_style(rt):
        return False
    return (max(sh, sw) > 1 and cin >= 64) or cin >= IM2COL_MIN_CIN or (kw == 1 < kh)


def _group_direct_forward(rt, x, w, b, geom, groups, act, y, phase=None):
    """Direct grouped convolution (no im2col matrix, no per-group copies): see conv_group_fwd in kernels/conv.cl.
    phase: (sh, sw, a, b) to write output pixel (oh, ow) to y's pixel (a + sh*oh, b + sw*ow) (_strided_dx)."""
    N, H, W, C = x.shape
    kh, kw, cg, Cout = w.shape
    cog = Cout // groups
    pt, pl, OH, OW = geom[6], geom[7], geom[10], geom[11]
    vw, nbv = _group_blocks(rt, cog)
    pix = _pix(OW, 8 if geom[3] == 1 else 4)  # stride 2 doubles the row segment each pixel chunk keeps in registers
    extra, ph = (), {}
    if phase is not None:
        ph = {"PHASE": 1, "PSH": phase[0], "PSW": phase[1]}
        extra = (y.shape[1], y.shape[2], phase[2], phase[3])
    k = rt.kernel("conv", "conv_group_fwd", _direct_defines(rt, geom, pix, VW=vw, NBV=nbv, **ph,
                                                            **cl_gemm.act_defines(_act_code(act))))
    _launch_direct(rt, k, x, w, b, y, geom, pix, Cout // (vw * nbv), (H, W, C, OH, OW, Cout, pt, pl), (cg, cog), act,
                   extra)
    return y


def conv_forward(rt, x, w, b, geom, groups, act, y, w_packs=None, residual=None):
    """General convolution into y (N, OH, OW, Cout). w_packs: the GEMM's cache of packed panels for a weight that
    does not change (Backend.const_cache), used where the convolution is one GEMM on the whole weight. residual: a
    tensor of y's shape added before the activation (a fused residual Add): in the GEMM's or Winograd's epilogue,
    a separate pass after the direct kernels."""
    from .cl_gemm import add_residual, gemm

    N, H, W, C = x.shape
    kh, kw, cg, Cout = w.shape
    G = groups
    cog = Cout // G
    OH, OW = geom[10], geom[11]
    if _is_pointwise(geom, G):
        gemm(rt, x.reshape(N * H * W, C), w.reshape(C, Cout), y.reshape(N * H * W, Cout), bias=b, act=act,
             b_packs=w_packs, residual=residual)
        return y
    few_cin = G == 1 and C <= DIRECT_MAX_CIN
    if not few_cin and cl_winograd.use_winograd(rt, geom, G, N, C, Cout):
        return cl_winograd.winograd_forward(rt, x, w, b, geom, act, y, w_packs, residual)
    grouped = not few_cin and use_group_direct(rt, G, Cout) and not im2col_forward_faster(rt, geom, G, C)
    K = kh * kw * cg
    P = OH * OW
    nimg = _chunk_images(rt, N, OH, OW, K)
    direct = G == 1 and nimg == N  # the GEMM writes y itself
    if residual is not None and (few_cin or grouped or not direct):  # no epilogue to add it in
        conv_forward(rt, x, w, b, geom, groups, None, y, w_packs)
        return add_residual(rt, y, residual, act)
    if few_cin:
        return _direct_forward(rt, x, w, b, geom, act, y)
    if grouped:
        return _group_direct_forward(rt, x, w, b, geom, G, act, y)
    col = rt.empty((nimg * P, K))
    yt = None if direct else rt.empty((nimg * P, cog))
    w2 = w.reshape(kh * kw * cg, Cout)
    wg, bg = w2, b
    if G > 1:
        # One group's weights (and bias) at a time; the in-order queue lets the next group reuse the buffers.
        wg = rt.empty((K, cog))
        bg = rt.empty((cog,)) if b is not None else None
    for g in range(G):
        if G > 1:
            _copy2d(rt, w2, Cout, 0, g * cog, wg, cog, 0, 0, K, cog)
            if b is not None:
                _copy2d(rt, b, Cout, 0, g * cog, bg, cog, 0, 0, 1, cog)
        for n0 in range(0, N, nimg):
            nb = min(nimg, N - n0)
            _im2col(rt, x, col, geom, cg, g * cg, n0, nb)
            if direct:
                gemm(rt, col, wg, y.reshape(N * P, Cout), bias=bg, act=act, b_packs=w_packs,
                     residual=None if residual is None else residual.reshape(N * P, Cout))
            else:
                ytv = _view(yt, (nb * P, cog))
                gemm(rt, _view(col, (nb * P, K)), wg, ytv, bias=bg, act=act, b_packs=w_packs if G == 1 else None)
                _copy2d(rt, ytv, cog, 0, 0, y, Cout, n0 * P, g * cog, nb * P, cog)
    for t in (col, yt) + ((wg, bg) if G > 1 else ()):
        if t is not None:
            t.release()
    return y


def _flipped_geometry(geom, H, W):
    kh, kw, pt, pl, pb, pr = geom[0], geom[1], *geom[6:10]
    return (kh, kw, 1, 1, 1, 1, kh - 1 - pt, kw - 1 - pl, kh - 1 - pb, kw - 1 - pr, H, W)


def flipped_dx_ok(rt, geom, groups, C, Cout, pixels, N=0, W=0):
    """Whether the input gradient of this convolution (its input: `pixels` = H * W, N images) runs as a direct
    forward convolution of gy (stride 1, dilation 1, pads within the kernel, a map of at least FLIPPED_DX_MIN_PIXELS,
    one the Winograd path takes or a grouped convolution, and a direct kernel for the flipped shape):
    FLIPPED_DX = False turns it off (tests compare the two paths)."""
    kh, kw, sh, sw, dh, dw, pt, pl, pb, pr = geom[:10]
    if not FLIPPED_DX or (sh, sw, dh, dw) != (1, 1, 1, 1) or max(pt, pb) > kh - 1 or max(pl, pr) > kw - 1:
        return False
    # (Grouped convolutions take it on any map: their im2col path runs a GEMM, an im2col and a col2im per group,
    # RegNetX's 7x7x400 in 25 groups at batch 16: 1.7 ms against the flipped kernel's ~0.8.)
    if pixels < FLIPPED_DX_MIN_PIXELS and groups == 1 and not (
            N and cl_winograd.use_winograd(rt, _flipped_geometry(geom, pixels // W, W), groups, N, Cout, C)):
        return False
    return use_group_direct(rt, groups, C) or (groups == 1 and Cout <= DIRECT_MAX_CIN)


def _flipped_dx(rt, w, gy, geom, groups, dx):
    """dx of a stride-1 convolution: gy convolved with the weights flipped in space and with input and output
    channels swapped within each group (conv_weight_flip), padded by kernel - 1 - pad, through the direct forward
    kernels or the Winograd path (conv_forward chooses): no im2col / col2im matrix."""
    kh, kw, cg, Cout = w.shape
    H, W = dx.shape[1], dx.shape[2]
    wt = _gradient_weights(rt, w, groups, (kh - 1, kh, 1), (kw - 1, kw, 1))
    conv_forward(rt, gy, wt, None, _flipped_geometry(geom, H, W), groups, None, dx)
    wt.release()
    return dx


def _gradient_weights(rt, w, groups, rows, cols):
    """The weights of dx as a forward convolution of gy (kernels/conv.cl conv_weight_flip): taps (first, count,
    step) along rows and columns, input and output channels swapped within each group."""
    kh, kw, cg, Cout = w.shape
    wt = rt.empty((rows[1], cols[1], Cout // groups, cg * groups))
    rt.launch(rt.kernel("conv", "conv_weight_flip"), (_cdiv(cg, 16), _cdiv(Cout // groups, 16),
                                                      rows[1] * cols[1] * groups), (1, 1, 1), w, wt,
              i32(kw), i32(cg), i32(Cout), i32(groups), *[i32(v) for v in rows + cols])
    return wt


def strided_dx_ok(rt, geom, groups, C, H, W):
    """Whether a strided convolution's input gradient runs as SH*SW phases of direct convolutions (_strided_dx):
    CPU style, dilation 1, every phase non-empty (kernel and map at least the stride), a direct kernel for dx's
    channels per group, and grouped or fewer than STRIDED_DX_MAX_CIN input channels. Measured on PoCL, 2 cores,
    batch 16, 3x3 stride 2, dx alone: RegNetX-400MF's 112x112x32 in 2 groups 20.0 -> 4.1 ms, 56x56x64 in 4 groups
    4.6 -> 1.7; groups 1: 112x112x32 -> 64 16.4 -> 6.8, 56x56x64 -> 128 9.1 -> 5.3, 56x56x96 9.6 -> 6.2, but
    28x28x128 -> 256 5.5 -> 8.1 and 14x14x256 5.1 -> 6.2 (im2col + GEMM keeps those). STRIDED_DX = False turns it
    off (tests compare the two paths)."""
    kh, kw, sh, sw, dh, dw = geom[:6]
    if not STRIDED_DX or (sh, sw) == (1, 1) or (dh, dw) != (1, 1) or kh < sh or kw < sw or H < sh or W < sw:
        return False
    return _cpu_style(rt) and use_group_direct(rt, groups, C) and (groups > 1 or C < STRIDED_DX_MAX_CIN)


def _phase_taps(k, s, pad, a):
    """(first tap, taps, d0) of phase a along one axis: dx rows a, a + s, a + 2s, ... (row a + s*m) take gy row
    m + d0 + t through kernel tap first - s*t, t < taps."""
    taps = [i for i in range(k) if (a + pad - i) % s == 0]
    first = max(taps)
    return first, len(taps), (a + pad - first) // s


def _strided_dx(rt, w, gy, geom, groups, dx):
    """dx of a strided convolution: dx[a + sh*m, b + sw*q] for each phase (a, b) is a stride-1 convolution of gy
    with the taps that reach that phase (every sh-th row, every sw-th column of the kernel, flipped, input and
    output channels swapped), written straight into its pixels of dx: no im2col / col2im matrix, no copies."""
    kh, kw, sh, sw = geom[:4]
    pt, pl = geom[6], geom[7]
    H, W = dx.shape[1], dx.shape[2]
    for a in range(sh):
        fr, T, d0r = _phase_taps(kh, sh, pt, a)
        for b in range(sw):
            fc, U, d0c = _phase_taps(kw, sw, pl, b)
            wp = _gradient_weights(rt, w, groups, (fr, T, sh), (fc, U, sw))
            pgeom = (T, U, 1, 1, 1, 1, -d0r, -d0c, 0, 0, _cdiv(H - a, sh), _cdiv(W - b, sw))
            _group_direct_forward(rt, gy, wp, None, pgeom, groups, None, dx, phase=(sh, sw, a, b))
            wp.release()
    return dx


def _wgrad_blocks(cg, cog):
    """(MR, NV) of conv_wgrad_rows: NV float16 vectors of output channels that divide the channels per group (16 or
    32 at a time), MR input channels dividing theirs (16 accumulators); None when no vector fits."""
    nv = 2 if cog % 32 == 0 else 1 if cog % 16 == 0 else 0
    if not nv:
        return None
    return next(mr for mr in ((8, 6, 4, 3, 2, 1) if nv == 2 else (16, 8, 4, 2, 1)) if cg % mr == 0), nv


def direct_wgrad_ok(rt, groups, cg, cog):
    """Whether the weight gradient runs as conv_wgrad_rows (CPU style, output channels per group a multiple of 16);
    DIRECT_WGRAD = False turns it off (tests compare the two paths)."""
    return DIRECT_WGRAD and _cpu_style(rt) and _wgrad_blocks(cg, cog) is not None


def wgrad_chunks(rt, nrows, dw_size, ncob, gy_size):
    """(chunks, rows per chunk) of conv_wgrad_rows over nrows output rows: about WGRAD_ITEMS_PER_CU work-items per
    compute unit, but partial sums (dw_size each, written and summed again) of at most half the size of gy in all
    (ResNet's 7x7x512 and 14x14x256 at batch 16: one or two chunks), and within the scratch bound."""
    cap = max(1, _scratch_bytes(rt) // (dw_size * 4))
    cap = min(cap, max(1, gy_size // (2 * dw_size)))
    nchunks = max(1, min(nrows, cap, _cdiv(WGRAD_ITEMS_PER_CU * rt.info.compute_units, ncob)))
    rows_per = _cdiv(nrows, nchunks)
    return _cdiv(nrows, rows_per), rows_per


def _direct_wgrad(rt, x, gy, geom, groups, dW):
    """dW of a KxK convolution without an im2col matrix: kernels/conv_wgrad.cl. Chunks of output rows give the
    work-items (a column sum adds their partial dW when there are several)."""
    N, H, W, C = x.shape
    kh, kw, cg, Cout = dW.shape
    cog = Cout // groups
    OH, OW = geom[10], geom[11]
    mr, nv = _wgrad_blocks(cg, cog)
    ncob = Cout // (16 * nv)
    nrows = N * OH
    K = kh * kw * cg
    nchunks, rows_per = wgrad_chunks(rt, nrows, K * Cout, ncob, gy.size)
    part = dW if nchunks == 1 else rt.empty((nchunks, K * Cout))
    d = {"KH": kh, "KW": kw, "SH": geom[2], "SW": geom[3], "DH": geom[4], "DW": geom[5], "MR": mr, "NV": nv}
    rb = _cdiv(WGRAD_PIXELS, OW)  # rows per register round (see the kernel)
    rt.launch(rt.kernel("conv_wgrad", "conv_wgrad_rows", d), (ncob, nchunks), (1, 1), x, gy, part,
              *[i32(v) for v in (H, W, C, OH, OW, Cout, geom[6], geom[7], cg, cog, nrows, rows_per, rb)])
    if nchunks > 1:
        colsum(rt, part, 1, nchunks, K * Cout, dW.reshape(K * Cout))
        part.release()
    return dW


def conv_backward(rt, x, w, gy, geom, groups, need_x, need_w, has_bias):
    """(dx, dW, db) of a general convolution; gy already masked by the activation."""
    from .cl_gemm import gemm

    N, H, W, C = x.shape
    kh, kw, cg, Cout = w.shape
    G = groups
    cog = Cout // G
    OH, OW = geom[10], geom[11]
    P = OH * OW
    gy2 = gy.reshape(N * P, Cout)
    dx = rt.empty(x.shape) if need_x else None
    dW = rt.empty(w.shape) if need_w else None
    db = None
    if need_w and has_bias:
        db = colsum(rt, gy2, 1, N * P, Cout, rt.empty((Cout,)))  # 8 channels per work-item
    if _is_pointwise(geom, G):
        if need_x:
            gemm(rt, gy2, w.reshape(C, Cout), dx.reshape(N * H * W, C), trans_b=True)
        if need_w:
            gemm(rt, x.reshape(N * H * W, C), gy2, dW.reshape(C, Cout), trans_a=True)
        return dx, dW, db
    if need_x and strided_dx_ok(rt, geom, G, C, H, W):
        _strided_dx(rt, w, gy, geom, G, dx)
        need_x = False
    if need_x and flipped_dx_ok(rt, geom, G, C, Cout, H * W, N, W):
        _flipped_dx(rt, w, gy, geom, G, dx)
        need_x = False
    if need_w and direct_wgrad_ok(rt, G, cg, cog):
        _direct_wgrad(rt, x, gy, geom, G, dW)
        need_w = False
    if not (need_x or need_w):
        return dx, dW, db
    K = kh * kw * cg
    nimg = _chunk_images(rt, N, OH, OW, K)
    whole = nimg == N
    col = rt.empty((nimg * P, K))
    w2 = w.reshape(K, Cout)
    dW2 = dW.reshape(K, Cout) if need_w else None
    tmp = []
    gyt = None
    if not (G == 1 and whole):
        gyt = rt.empty((nimg * P, cog))
        tmp.append(gyt)
    wg, dWg = w2, dW2
    if G > 1:
        wg = rt.empty((K, cog))
        tmp.append(wg)
        if need_w:
            dWg = rt.empty((K, cog))
            tmp.append(dWg)
    for g in range(G):
        if G > 1:
            _copy2d(rt, w2, Cout, 0, g * cog, wg, cog, 0, 0, K, cog)
        for ci, n0 in enumerate(range(0, N, nimg)):
            nb = min(nimg, N - n0)
            M = nb * P
            colv = _view(col, (M, K))
            if gyt is None:
                gyg = gy2
            else:
                gyg = _view(gyt, (M, cog))
                _copy2d(rt, gy2, Cout, n0 * P, g * cog, gyg, cog, 0, 0, M, cog)
            if need_w:
                _im2col(rt, x, col, geom, cg, g * cg, n0, nb)
                gemm(rt, colv, gyg, dWg, trans_a=True, accumulate=ci > 0)
            if need_x:
                # dcol reuses the im2col scratch: the in-order queue runs the dW GEMM first.
                gemm(rt, gyg, wg, colv, trans_b=True)
                _col2im(rt, col, dx, geom, cg, g * cg, n0, nb)
        if G > 1 and need_w:
            _copy2d(rt, dWg, cog, 0, 0, dW2, Cout, 0, g * cog, K, cog)
    col.release()
    for t in tmp:
        t.release()
    return dx, dW, db


# ---------------------------------------------------------------------------------------------------------------
# conv2d op


def _is_depthwise(x_shape, w_shape, groups):
    C = x_shape[3]
    return groups > 1 and groups == C and w_shape[2] == 1


@register("opencl", "conv2d")
def conv2d_fwd(be, node, xs, training):
    rt = be.rt
    x = xs[0]
    w = be.param(node, "weight")
    b = be.param(node, "bias") if be.has_param(node, "bias") else None
    fold = BNFold(be, node, w, b) if node.attrs.get("bn") else None  # it carries a trainable BatchNorm
    if fold is not None:
        w, b = fold.w, fold.b
    G = int(node.attrs.get("groups", 1))
    geom = conv_geometry(node, x.shape)
    if min(geom[6:10]) < 0:
        raise ValueError(f"conv2d {node.name}: negative pads are not supported")
    N = x.shape[0]
    y = rt.empty((N, geom[10], geom[11], w.shape[3]))
    act = node.attrs.get("act")
    res = residual_input(node, xs, y.shape)
    if _is_depthwise(x.shape, w.shape, G):
        depthwise_forward(rt, x, w, b, geom, None if res is not None else act, y)
        if res is not None:
            cl_gemm.add_residual(rt, y, res, act)
    else:
        # (folded weights change every pass: no GEMM panels derived from the parameter for them)
        conv_forward(rt, x, w, b, geom, G, act, y, None if fold else be.const_cache(node, "weight"), res)
    # The output is kept only when a fused activation's gradient needs it (the executor frees what no context holds).
    keep_y = y if cl_gemm.DIFFERENTIABLE_ACTS.get(act or None, 0) else None
    if fold is None:
        return [y], (x, keep_y)
    if not training:
        fold.release()  # the in-order queue has run the convolution before a later command reuses them
        return [y], None
    return [y], Saved(be, temps=fold.temps, x=x, y=keep_y, fold=fold)


@register("opencl", "conv2d", "backward")
def conv2d_bwd(be, node, saved, gys, need):
    no_residual_backward(node)
    rt = be.rt
    fold = saved["fold"] if isinstance(saved, Saved) else None
    x, y = (saved["x"], saved["y"]) if fold is not None else saved
    w = be.param(node, "weight") if fold is None else fold.w  # dx goes through the weights the forward used
    G = int(node.attrs.get("groups", 1))
    geom = conv_geometry(node, x.shape)
    act = node.attrs.get("act")
    db = None  # the folded bias's gradient, when the masking pass sums it
    if fold is not None and need.params and act in ("relu", "relu6"):
        gy, db = _masked_grad_and_sum(rt, gys[0], y, act)
        tmp = gy
    else:
        gy, tmp = _masked_grad(rt, gys[0], y, act)
    # the folded bias always has a gradient, summed below unless the masking pass did
    want_db = db is None and (fold is not None or be.has_param(node, "bias"))
    need_x = bool(need.inputs[0])
    if _is_depthwise(x.shape, w.shape, G):
        dx, dW, db_conv = depthwise_backward(rt, x, w, gy, geom, need_x, need.params, want_db)
    else:
        dx, dW, db_conv = conv_backward(rt, x, w, gy, geom, G, need_x, need.params, want_db)
    db = db_conv if db is None else db
    if tmp is not None:
        tmp.release()
    grads = {}
    if fold is not None:
        if need.params:
            grads = fold.grads(be, node, dW, db)
        saved.release()
    elif need.params:
        grads["weight"] = dW
        if want_db:
            grads["bias"] = db
    return [dx], grads


# ---------------------------------------------------------------------------------------------------------------
# pooling


def _pool_args(x_shape, geom):
    N, H, W, C = x_shape
    kh, kw, sh, sw, pt, pl, pb, pr, OH, OW = geom
    return [i32(v) for v in (H, W, C, OH, OW, kh, kw, sh, sw, pt, pl)]


def _float_argmax(rt, x_shape):
    """Whether max pooling's backward takes the CPU-style kernels, whose argmax indices ih*W + iw are floats
    (exact below 2^24)."""
    return _cpu_style(rt) and x_shape[1] * x_shape[2] < 1 << 24


@register("opencl", "maxpool")
def maxpool_fwd(be, node, xs, training):
    rt = be.rt
    x = xs[0]
    geom = pool_geometry(node, x.shape)
    N, C, OH, OW = x.shape[0], x.shape[3], geom[8], geom[9]
    y = rt.empty((N, OH, OW, C))
    if training and _float_argmax(rt, x.shape):
        # The backward's argmax indices, found with the maximum: the backward does not read x again (SqueezeNet's
        # 111x111x64 pool at batch 16: a second pass over x took longer than the forward itself).
        idx = rt.empty((N, OH, OW, C))
        rt.launch(rt.kernel("pool", "maxpool_fwd_argmax_rows", {"POOL_CW": POOL_CW}), (-(-C // POOL_CW), OW, N * OH),
                  (1, 1, 1), x, idx, y, *_pool_args(x.shape, geom))
        return [y], Saved(be, temps=[idx], shape=x.shape, idx=idx)
    if _cpu_style(rt):
        rt.launch(rt.kernel("pool", "maxpool_fwd_rows", {"POOL_CW": POOL_CW}), (-(-C // POOL_CW), OW, N * OH),
                  (1, 1, 1), x, y, *_pool_args(x.shape, geom))
    else:
        rt.launch(rt.kernel("pool", "maxpool_fwd"), (C, OW, N * OH), None, x, y, *_pool_args(x.shape, geom))
    return [y], Saved(be, x=x, shape=x.shape)


@register("opencl", "maxpool", "backward")
def maxpool_bwd(be, node, saved, gys, need):
    rt = be.rt
    shape = saved["shape"]
    geom = pool_geometry(node, shape)
    N, H, W, C = shape
    OH, OW = geom[8], geom[9]
    args = _pool_args(shape, geom)
    dx = rt.empty(shape)
    idx = saved.get("idx")  # float indices from a CPU-style training forward
    if idx is not None or _float_argmax(rt, shape):
        d = {"POOL_CW": POOL_CW}
        if idx is None:
            idx = rt.empty((N, OH, OW, C))
            saved.temps.append(idx)
            rt.launch(rt.kernel("pool", "maxpool_argmax_rows", d), (-(-C // POOL_CW), OW, N * OH), (1, 1, 1),
                      saved["x"], idx, *args)
        rt.launch(rt.kernel("pool", "maxpool_bwd_rows", d), (-(-C // POOL_CW), W, N * H), (1, 1, 1), gys[0], idx,
                  dx, *args)
    else:
        idx = rt.empty((N, OH, OW, C), np.int32)
        saved.temps.append(idx)
        rt.launch(rt.kernel("pool", "maxpool_argmax"), (C, OW, N * OH), None, saved["x"], idx, *args)
        rt.launch(rt.kernel("pool", "maxpool_bwd"), (C, W, N * H), None, gys[0], idx, dx, *args)
    saved.release()
    return [dx], {}


@register("opencl", "avgpool")
def avgpool_fwd(be, node, xs, training):
    rt = be.rt
    x = xs[0]
    geom = pool_geometry(node, x.shape)
    N, C, OH, OW = x.shape[0], x.shape[3], geom[8], geom[9]
    y = rt.empty((N, OH, OW, C))
    inc = int(bool(node.attrs.get("count_include_pad", True)))
    args = (x, y, *_pool_args(x.shape, geom), i32(geom[6]), i32(geom[7]), i32(inc))
    if _cpu_style(rt):
        rt.launch(rt.kernel("pool", "avgpool_fwd_rows", {"POOL_CW": POOL_CW}), (-(-C // POOL_CW), OW, N * OH),
                  (1, 1, 1), *args)
    else:
        rt.launch(rt.kernel("pool", "avgpool_fwd"), (C, OW, N * OH), None, *args)
    return [y], (x.shape,)


@register("opencl", "avgpool", "backward")
def avgpool_bwd(be, node, saved, gys, need):
    rt = be.rt
    (shape,) = saved
    geom = pool_geometry(node, shape)
    N, H, W, C = shape
    dx = rt.empty(shape)
    inc = int(bool(node.attrs.get("count_include_pad", True)))
    args = (gys[0], dx, *_pool_args(shape, geom), i32(geom[6]), i32(geom[7]), i32(inc))
    if _cpu_style(rt):
        rt.launch(rt.kernel("pool", "avgpool_bwd_rows", {"POOL_CW": POOL_CW}), (-(-C // POOL_CW), W, N * H),
                  (1, 1, 1), *args)
    else:
        rt.launch(rt.kernel("pool", "avgpool_bwd"), (C, W, N * H), None, *args)
    return [dx], {}


GAP_ITEMS_PER_CU = 4  # work-items per compute unit the CPU-style pool aims for before it splits the pixels
GAP_MIN_SEGMENT = 64  # pixels per segment at least (each partial row costs a write and a read)


def gap_segments(rt, N, HW, C):
    """Pixel segments per image for global_avgpool_fwd_rows: 1 unless too few (chunk, image) work-items would
    leave cores idle (batch 1 on a 112 x 112 x 32 map: one work-item, ~3x slower than the map split in 4)."""
    items = N * -(-C // GAP_CW)
    want = GAP_ITEMS_PER_CU * int(getattr(rt.device, "max_compute_units", 1) or 1)
    return max(1, min(-(-want // items), HW // GAP_MIN_SEGMENT))


def _global_avgpool_rows(rt, x, y):
    N, H, W, C = x.shape
    HW = H * W
    k = rt.kernel("pool", "global_avgpool_fwd_rows", {"GAP_CW": GAP_CW})
    nchunk = -(-C // GAP_CW)
    S = gap_segments(rt, N, HW, C)
    if S == 1:
        rt.launch(k, (nchunk, N, 1), (1, 1, 1), x, y, i32(HW), i32(C), i32(HW), np.float32(1.0 / HW))
        return
    seg = -(-HW // S)
    S = -(-HW // seg)
    part = rt.empty((N, S, C))
    rt.launch(k, (nchunk, N, S), (1, 1, 1), x, part, i32(HW), i32(C), i32(seg), np.float32(1.0 / HW))
    rt.launch(k, (nchunk, N, 1), (1, 1, 1), part, y, i32(S), i32(C), i32(S), np.float32(1.0))
    part.release()


@register("opencl", "global_avgpool")
def global_avgpool_fwd(be, node, xs, training):
    rt = be.rt
    x = xs[0]
    N, H, W, C = x.shape
    y = rt.empty(global_pool_shape(x.shape, node.attrs.get("keepdims", False)))
    if _cpu_style(rt):
        _global_avgpool_rows(rt, x, y)
    else:
        rt.launch(rt.kernel("pool", "global_avgpool_fwd"), (C, N), None, x, y, i32(H * W), i32(C))
    return [y], (x.shape,)


@register("opencl", "global_avgpool", "backward")
def global_avgpool_bwd(be, node, saved, gys, need):
    rt = be.rt
    (shape,) = saved
    N, H, W, C = shape
    dx = rt.empty(shape)
    if _cpu_style(rt):
        rt.launch(rt.kernel("pool", "global_avgpool_bwd_rows"), (N * H * W,), (1,), gys[0], dx, i32(H * W), i32(C),
                  i32(N * H * W))
        return [dx], {}
    rt.launch(rt.kernel("pool", "global_avgpool_bwd"), (C, H * W, N), None, gys[0], dx, i32(H * W), i32(C))
    return [dx], {}


# ---------------------------------------------------------------------------------------------------------------
# pad


def _pad_shift(rt, src, dst, pt, pl, value):
    N, H, W, C = src.shape
    OH, OW = dst.shape[1], dst.shape[2]
    if _cpu_style(rt):
        # One work-item per output row (contiguous vector copies); the element-per-item kernel costs PoCL ~10x.
        rt.launch(rt.kernel("pool", "pad_rows"), (N * OH,), (1,), src, dst, i32(H), i32(W), i32(C), i32(OH),
                  i32(OW), i32(pt), i32(pl), np.float32(value), i32(N * OH))
        return
    rt.launch(rt.kernel("pool", "pad_shift"), (C, OW, N * OH), None, src, dst, i32(H), i32(W), i32(C), i32(OH),
              i32(OW), i32(pt), i32(pl), np.float32(value))


@register("opencl", "pad")
def pad_fwd(be, node, xs, training):
    rt = be.rt
    x = xs[0]
    pt, pl, pb, pr = (int(v) for v in node.attrs.get("pads", (0, 0, 0, 0)))
    N, H, W, C = x.shape
    y = rt.empty((N, H + pt + pb, W + pl + pr, C))
    _pad_shift(rt, x, y, pt, pl, float(node.attrs.get("value", 0.0)))
    return [y], (x.shape,)


@register("opencl", "pad", "backward")
def pad_bwd(be, node, saved, gys, need):
    rt = be.rt
    (shape,) = saved
    pt, pl, _, _ = (int(v) for v in node.attrs.get("pads", (0, 0, 0, 0)))
    dx = rt.empty(shape)
    _pad_shift(rt, gys[0], dx, -pt, -pl, 0.0)
    return [dx], {}
