// Convolution kernels, NHWC activations and HWIO weights (see transfercl_cli/ops/cl_conv.py).
//
// Three sections, so that each build compiles only what it needs:
// - with -DDEPTHWISE=1: the depthwise kernels, specialised at compile time on the geometry (KH, KW, SH, SW, DH, DW),
//   the depth multiplier MULT, the channel vector width VW and the pixels per work-item PIX (loops unroll and the
//   accumulators stay in registers). VW channels per work-item (16 on CPUs, 4 elsewhere; the host runs narrower
//   variants, down to VW = 1, on the remaining channels and for multipliers > 1). Vectors move through VLDn/VSTn
//   (vloadN/vstoreN; element-wise on PoCL, where the built-ins become calls that spill: see the block below).
//   MINVEC=1 (PoCL only) keeps float16 in single 512-bit registers.
// - with -DDIRECT=1: a direct convolution for few input channels (CIN, conv1 on RGB), compiled like the depthwise
//   kernels (geometry, VW, PIX, NBV vectors of output channels per step).
// - without either: the generic helpers (im2col, col2im, column sums, strided copies) with all
//   geometry as runtime arguments: one build per process serves every convolution.

#include "vector_access.h"  // VLD4/8/16, VST4/8/16: see that file
#include "fused_act.h"  // FUSED_ACT: the epilogue activations

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
// relu / the cap of relu6 as comparisons and selects: on PoCL fmax/fmin of vectors are function calls, and every
// call spills all live vector registers (they are caller-saved) - it halved the depthwise kernel's speed.

// Shared by the depthwise and direct sections: vector width VW, output pixels per chunk PIX, input row span.
#if (defined(DEPTHWISE) && DEPTHWISE) || (defined(DIRECT) && DIRECT)
#include "vec_width.h"  // vec, LD, ST, ZERO_UNLESS, KATTR for VW channels
#ifndef PIX
#define PIX 1
#endif
#ifndef MULT
#define MULT 1
#endif

#define SPAN ((PIX - 1) * SW + (KW - 1) * DW + 1)
// xs[0..SPAN) = the input row segment from column iw0 (row pointer xr, channel stride Cin), zero outside the image.
// Every vector is loaded from a column clamped into the row, then zeroed outside it with a bit mask: no branch or
// select around a load (PoCL compiled those into branches around its element-wise loads: the depthwise forward
// ran ~10% slower than with the old pointer casts; with the mask it is on par), never out of bounds, exact zeros.
#define CLAMP_COL(i, n) ((i) < 0 ? 0 : ((i) < (n) ? (i) : (n) - 1))
#define LOAD_SPAN(xs, xr, iw0)                                                                                  \
    vec xs[SPAN];                                                                                               \
    _Pragma("unroll") for (int q_ = 0; q_ < SPAN; q_++) {                                                       \
        const int iw_ = (iw0) + q_;                                                                             \
        const vec v_ = LD((xr) + (size_t)CLAMP_COL(iw_, W) * Cin);                                              \
        xs[q_] = ZERO_UNLESS(iw_ >= 0 && iw_ < W, v_);                                                          \
    }
#endif

#if defined(DEPTHWISE) && DEPTHWISE


// y[n, oh, ow, c*MULT + m] = act(sum_ij x[n, oh*SH - pt + i*DH, ow*SW - pl + j*DW, c] * w[i, j, 0, c*MULT + m] + b)
// act: fused_act.h's codes; has_bias 0/1 (runtime: uniform branches cost nothing next to the taps).
// Work-item: bpi blocks of VW output channels from co0 (VW > 1 needs MULT == 1), one after the other, for ppi
// chunks of PIX output pixels of rpi rows (CPUs: few, long work-items; PoCL pays per work-group).
// Global size: (ceil(blocks / bpi), ceil(OW / (PIX * ppi)), ceil(N * OH / rpi)); nrows = N * OH.
// Each input row segment the PIX pixels need (SPAN vectors) is loaded once into registers, zero outside the
// image, then every tap is a register multiply-add: no bounds checks in the arithmetic.
__kernel KATTR void dw_fwd(const __global float* restrict x, const __global float* restrict w,
                           const __global float* restrict b, __global float* restrict y,
                           int H, int W, int Cin, int OH, int OW, int pt, int pl, int co0, int nblocks,
                           int has_bias, int act, int bpi, int ppi, int rpi, int nrows)
{
    const int cb0 = get_global_id(0) * bpi, cb1 = min(cb0 + bpi, nblocks);
    const int ow_b = get_global_id(1) * PIX * ppi, ow_e = min(OW, ow_b + PIX * ppi);
    const int r0 = get_global_id(2) * rpi, r1 = min(nrows, r0 + rpi);
    const int Cout = Cin * MULT;
    for (int noh = r0; noh < r1; noh++)
    for (int owb = ow_b; owb < ow_e; owb += PIX)
    for (int cb = cb0; cb < cb1; cb++) {
        const int n = noh / OH, oh = noh - n * OH;
        const int co = co0 + cb * VW;
        const int ci = co / MULT;
        vec acc[PIX];
        const vec bv = has_bias ? LD(b + co) : (vec)0.0f;
        _Pragma("unroll") for (int p = 0; p < PIX; p++) acc[p] = bv;
        const int iw0 = owb * SW - pl;
        _Pragma("unroll") for (int i = 0; i < KH; i++) {
            const int ih = oh * SH - pt + i * DH;
            if (ih < 0 || ih >= H) continue;
            const __global float* xr = x + ((size_t)(n * H + ih) * W) * Cin + ci;
            LOAD_SPAN(xs, xr, iw0)
            _Pragma("unroll") for (int j = 0; j < KW; j++) {
                const vec wv = LD(w + (i * KW + j) * Cout + co);
                _Pragma("unroll") for (int p = 0; p < PIX; p++) acc[p] = xs[p * SW + j * DW] * wv + acc[p];
            }
        }
        __global float* yr = y + ((size_t)noh * OW + owb) * Cout + co;
        _Pragma("unroll") for (int p = 0; p < PIX; p++) {
            vec v = acc[p];
            FUSED_ACT(vec, v, act);
            if (owb + p < OW) ST(yr + (size_t)p * Cout, v);
        }
    }
}

// dx[n, ih, iw, c] = sum_m sum_ij gy[n, oh, ow, c*MULT + m] * w[i, j, 0, c*MULT + m]
//   where ih = oh*SH - pt + i*DH, iw = ow*SW - pl + j*DW  (a gather: no atomics).
// Work-item: bpi blocks of VW input channels from ci0, ppi chunks of PIX input pixels, rpi rows (as dw_fwd).
// Global size: (ceil(blocks / bpi), ceil(W / (PIX * ppi)), ceil(N * H / rpi)); nrows = N * H.
// With SW == 1 the gy row segment is loaded once into registers (GSPAN vectors, zero outside); other strides
// test each (pixel, tap) pair.
#define GSPAN (PIX + (KW - 1) * DW)
__kernel KATTR void dw_bwd_dx(const __global float* restrict gy, const __global float* restrict w,
                              __global float* restrict dx,
                              int H, int W, int Cin, int OH, int OW, int pt, int pl, int ci0, int nblocks,
                              int bpi, int ppi, int rpi, int nrows)
{
    const int cb0 = get_global_id(0) * bpi, cb1 = min(cb0 + bpi, nblocks);
    const int iw_b = get_global_id(1) * PIX * ppi, iw_e = min(W, iw_b + PIX * ppi);
    const int r0 = get_global_id(2) * rpi, r1 = min(nrows, r0 + rpi);
    const int Cout = Cin * MULT;
    for (int nh = r0; nh < r1; nh++)
    for (int iwb = iw_b; iwb < iw_e; iwb += PIX)
    for (int cb = cb0; cb < cb1; cb++) {
        const int n = nh / H, ih = nh - n * H;
        const int ci = ci0 + cb * VW;
        vec acc[PIX];
        _Pragma("unroll") for (int p = 0; p < PIX; p++) acc[p] = (vec)0.0f;
        _Pragma("unroll") for (int i = 0; i < KH; i++) {
            const int th = ih + pt - i * DH;
            if (th < 0 || th % SH) continue;
            const int oh = th / SH;
            if (oh >= OH) continue;
            const __global float* gr = gy + ((size_t)(n * OH + oh) * OW) * Cout;
            _Pragma("unroll") for (int m = 0; m < MULT; m++) {
                const int co = ci * MULT + m;
    #if SW == 1
                // gs[q] = gy[ow0 + q], ow0 = iwb + pl - (KW - 1) * DW; pixel p, tap j reads q = p + (KW - 1 - j) * DW
                const int ow0 = iwb + pl - (KW - 1) * DW;
                vec gs[GSPAN];
                _Pragma("unroll") for (int q = 0; q < GSPAN; q++) {
                    const int ow = ow0 + q;
                    const vec v = LD(gr + (size_t)CLAMP_COL(ow, OW) * Cout + co);
                    gs[q] = ZERO_UNLESS(ow >= 0 && ow < OW, v);
                }
                _Pragma("unroll") for (int j = 0; j < KW; j++) {
                    const vec wv = LD(w + (i * KW + j) * Cout + co);
                    _Pragma("unroll") for (int p = 0; p < PIX; p++)
                        acc[p] = gs[p + (KW - 1 - j) * DW] * wv + acc[p];
                }
    #else
                _Pragma("unroll") for (int j = 0; j < KW; j++) {
                    const vec wv = LD(w + (i * KW + j) * Cout + co);
                    _Pragma("unroll") for (int p = 0; p < PIX; p++) {
                        const int tw = iwb + p + pl - j * DW;
                        if (tw >= 0 && tw % SW == 0 && tw / SW < OW)
                            acc[p] = LD(gr + (size_t)(tw / SW) * Cout + co) * wv + acc[p];
                    }
                }
    #endif
            }
        }
        __global float* dr = dx + ((size_t)nh * W + iwb) * Cin + ci;
        _Pragma("unroll") for (int p = 0; p < PIX; p++)
            if (iwb + p < W) ST(dr + (size_t)p * Cin, acc[p]);
    }
}

// Partial sums for dW and db over a chunk of output rows (no atomics; colsum_split adds the chunks):
//   part[r, t, co] = sum over rows q in chunk r, ow: gy[q, ow, co] * x[n, oh*SH - pt + i*DH, ow*SW - pl + j*DW, ci]
//   part[r, KH*KW, co] = sum gy[q, ow, co]            (t = i*KW + j, q = n*OH + oh, ci = co / MULT)
// Work-item: bpi blocks of VW output channels from co0 (one after the other), one chunk; each row is walked PIX
// output pixels at a time with the gy vectors and the input row segments in registers.
// Global size: (ceil(blocks / bpi), R).
__kernel KATTR void dw_bwd_dw_partial(const __global float* restrict x, const __global float* restrict gy,
                                      __global float* restrict part,
                                      int N, int H, int W, int Cin, int OH, int OW, int pt, int pl,
                                      int co0, int nblocks, int rows_per, int bpi)
{
    const int cb0 = get_global_id(0) * bpi, cb1 = min(cb0 + bpi, nblocks);
    const int r = get_global_id(1);
    const int Cout = Cin * MULT;
    for (int cb = cb0; cb < cb1; cb++) {
        const int co = co0 + cb * VW;
        const int ci = co / MULT;
        const int q0 = r * rows_per;
        const int q1 = min(q0 + rows_per, N * OH);
        vec acc[KH * KW];
        vec accb = (vec)0.0f;
        _Pragma("unroll") for (int t = 0; t < KH * KW; t++) acc[t] = (vec)0.0f;
        for (int q = q0; q < q1; q++) {
            const int n = q / OH, oh = q - n * OH;
            const __global float* gr = gy + (size_t)q * OW * Cout + co;
            for (int owb = 0; owb < OW; owb += PIX) {
                vec g[PIX];
                _Pragma("unroll") for (int p = 0; p < PIX; p++) {
                    const vec v = LD(gr + (size_t)CLAMP_COL(owb + p, OW) * Cout);
                    g[p] = ZERO_UNLESS(owb + p < OW, v);
                    accb += g[p];
                }
                const int iw0 = owb * SW - pl;
                _Pragma("unroll") for (int i = 0; i < KH; i++) {
                    const int ih = oh * SH - pt + i * DH;
                    if (ih < 0 || ih >= H) continue;
                    const __global float* xr = x + ((size_t)(n * H + ih) * W) * Cin + ci;
                    LOAD_SPAN(xs, xr, iw0)
                    _Pragma("unroll") for (int j = 0; j < KW; j++)
                        _Pragma("unroll") for (int p = 0; p < PIX; p++)
                            acc[i * KW + j] = xs[p * SW + j * DW] * g[p] + acc[i * KW + j];
                }
            }
        }
        __global float* pr = part + (size_t)r * (KH * KW + 1) * Cout + co;
        _Pragma("unroll") for (int t = 0; t < KH * KW; t++) ST(pr + (size_t)t * Cout, acc[t]);
        ST(pr + (size_t)(KH * KW) * Cout, accb);
    }
}

// The same partial sums, CPU style: rows outermost, then PIX-pixel steps, then the bpi channel blocks, so that a
// work-item reads each pixel's channels contiguously (the hardware prefetcher follows; a block-outer walk strides
// through memory C floats at a time). The accumulators live in the work-item's own slice of `part` (read-modify-
// write, cache-resident), zeroed first. Global size: (ceil(blocks / bpi), R).
__kernel KATTR void dw_bwd_dw_rows(const __global float* restrict x, const __global float* restrict gy,
                                   __global float* restrict part,
                                   int N, int H, int W, int Cin, int OH, int OW, int pt, int pl,
                                   int co0, int nblocks, int rows_per, int bpi)
{
    const int cb0 = get_global_id(0) * bpi, cb1 = min(cb0 + bpi, nblocks);
    const int r = get_global_id(1);
    const int Cout = Cin * MULT;
    const int q0 = r * rows_per;
    const int q1 = min(q0 + rows_per, N * OH);
    __global float* pr = part + (size_t)r * (KH * KW + 1) * Cout + co0;
    for (int cb = cb0; cb < cb1; cb++)
        _Pragma("unroll") for (int t = 0; t <= KH * KW; t++) ST(pr + (size_t)t * Cout + cb * VW, (vec)0.0f);
    for (int q = q0; q < q1; q++) {
        const int n = q / OH, oh = q - n * OH;
        for (int owb = 0; owb < OW; owb += PIX) {
            const int iw0 = owb * SW - pl;
            for (int cb = cb0; cb < cb1; cb++) {
                const int co = co0 + cb * VW;
                const int ci = co / MULT;
                __global float* pc = pr + cb * VW;
                const __global float* gr = gy + ((size_t)q * OW + owb) * Cout + co;
                vec g[PIX];
                vec accb = LD(pc + (size_t)(KH * KW) * Cout);
                _Pragma("unroll") for (int p = 0; p < PIX; p++) {
                    const vec v = LD(gr + (size_t)(CLAMP_COL(owb + p, OW) - owb) * Cout);
                    g[p] = ZERO_UNLESS(owb + p < OW, v);
                    accb += g[p];
                }
                ST(pc + (size_t)(KH * KW) * Cout, accb);
                _Pragma("unroll") for (int i = 0; i < KH; i++) {
                    const int ih = oh * SH - pt + i * DH;
                    if (ih < 0 || ih >= H) continue;
                    const __global float* xr = x + ((size_t)(n * H + ih) * W) * Cin + ci;
                    LOAD_SPAN(xs, xr, iw0)
                    _Pragma("unroll") for (int j = 0; j < KW; j++) {
                        vec a = LD(pc + (size_t)(i * KW + j) * Cout);
                        _Pragma("unroll") for (int p = 0; p < PIX; p++) a = xs[p * SW + j * DW] * g[p] + a;
                        ST(pc + (size_t)(i * KW + j) * Cout, a);
                    }
                }
            }
        }
    }
}

#elif defined(DIRECT) && DIRECT

// Direct convolution for few input channels (MobileNet's conv1: 3x3 stride 2 on RGB), groups 1: an im2col matrix
// with K = KH*KW*CIN (27) columns is a poor GEMM operand and costs a full write and read of that matrix.
// Compile-time geometry as the depthwise kernels; CIN input channels, VW output channels per vector.
// y[n, oh, ow, co] = act(sum_{i,j,c} x[n, oh*SH - pt + i*DH, ow*SW - pl + j*DW, c] * w[i, j, c, co] + b[co])
// Work-item: bpi blocks of VW output channels from co0, ppi chunks of PIX output pixels, rpi rows; the input row
// segment the PIX pixels need is loaded once per row of taps (zero outside the image).
// Global size: (ceil(blocks / bpi), ceil(OW / (PIX * ppi)), ceil(N * OH / rpi)); nrows = N * OH.
#ifndef NBV
#define NBV 1
#endif
// The direct kernels' accumulators acc[NBV][PIX] (NBV vectors of VW output channels from co, PIX pixels): set to
// the bias, and stored through the fused activation to y at row noh (n * OH + oh), pixels owb.. (those < OW).
#define INIT_ACC(acc, co)                                                                                       \
    _Pragma("unroll") for (int u_ = 0; u_ < NBV; u_++) {                                                        \
        const vec bv_ = has_bias ? LD(b + (co) + u_ * VW) : (vec)0.0f;                                          \
        _Pragma("unroll") for (int p_ = 0; p_ < PIX; p_++) acc[u_][p_] = bv_;                                   \
    }
// The direct kernels' work-item loop: blocks cb of this item (bpi of nblocks), pixel chunks owb (ppi of PIX
// pixels), rows noh (rpi of nrows).
#define FOR_EACH_BLOCK                                                                                          \
    const int cb0 = get_global_id(0) * bpi, cb1 = min(cb0 + bpi, nblocks);                                      \
    const int ow_b = get_global_id(1) * PIX * ppi, ow_e = min(OW, ow_b + PIX * ppi);                            \
    const int r0 = get_global_id(2) * rpi, r1 = min(nrows, r0 + rpi);                                           \
    for (int noh = r0; noh < r1; noh++)                                                                         \
    for (int owb = ow_b; owb < ow_e; owb += PIX)                                                                \
    for (int cb = cb0; cb < cb1; cb++)
#if defined(PHASE) && PHASE
// One phase of a strided convolution's input gradient (cl_conv._strided_dx): output pixel (oh, ow) of this launch
// is pixel (ya + PSH*oh, yb + PSW*ow) of y, a YH x YW map.
#define PHASE_ARGS , int YH, int YW, int ya, int yb
#define YPIX(n, oh, ow) (((size_t)(n) * YH + ya + PSH * (oh)) * YW + yb + PSW * (ow))
#else
#define PHASE_ARGS
#define YPIX(n, oh, ow) (((size_t)(n) * OH + (oh)) * OW + (ow))
#endif
#define STORE_ACC(acc, co, n, oh, owb)                                                                          \
    _Pragma("unroll") for (int p_ = 0; p_ < PIX; p_++)                                                          \
        _Pragma("unroll") for (int u_ = 0; u_ < NBV; u_++) {                                                    \
            vec v_ = acc[u_][p_];                                                                               \
            FUSED_ACT(vec, v_, act);                                                                            \
            if ((owb) + p_ < OW) ST(y + YPIX(n, oh, (owb) + p_) * Cout + (co) + u_ * VW, v_);                   \
        }
#ifdef CIN  // conv_direct_fwd's build; conv_group_fwd's has no CIN
__kernel KATTR void conv_direct_fwd(const __global float* restrict x, const __global float* restrict w,
                                    const __global float* restrict b, __global float* restrict y,
                                    int H, int W, int OH, int OW, int Cout, int pt, int pl, int co0, int nblocks,
                                    int has_bias, int act, int bpi, int ppi, int rpi, int nrows)
{
    // A "block" here is NBV vectors of VW channels (they share the input row segment).
    FOR_EACH_BLOCK {
        const int n = noh / OH, oh = noh - n * OH;
        const int co = co0 + cb * (VW * NBV);
        vec acc[NBV][PIX];
        INIT_ACC(acc, co);
        const int iw0 = owb * SW - pl;
        _Pragma("unroll") for (int i = 0; i < KH; i++) {
            const int ih = oh * SH - pt + i * DH;
            if (ih < 0 || ih >= H) continue;
            const __global float* xr = x + (size_t)(n * H + ih) * W * CIN;
            float xs[SPAN * CIN];
            _Pragma("unroll") for (int q = 0; q < SPAN; q++) {
                const int iw = iw0 + q;
                const bool in = iw >= 0 && iw < W;
                _Pragma("unroll") for (int c = 0; c < CIN; c++) xs[q * CIN + c] = in ? xr[iw * CIN + c] : 0.0f;
            }
            _Pragma("unroll") for (int j = 0; j < KW; j++)
                _Pragma("unroll") for (int c = 0; c < CIN; c++)
                    _Pragma("unroll") for (int u = 0; u < NBV; u++) {
                        const vec wv = LD(w + ((i * KW + j) * CIN + c) * Cout + co + u * VW);
                        _Pragma("unroll") for (int p = 0; p < PIX; p++)
                            acc[u][p] = xs[(p * SW + j * DW) * CIN + c] * wv + acc[u][p];
                    }
        }
        STORE_ACC(acc, co, n, oh, owb);
    }
}

#endif  // CIN

#ifndef CIN
// Direct grouped (or plain) KxK convolution without an im2col matrix: RegNet/ResNeXt groups, where one group's
// GEMM is a poor micro-kernel operand (16-32 output channels) and im2col costs a full write and read of KH*KW copies
// of the input. Compile-time geometry as above; Cin (the tensor's channels), cg (input channels per group) and cog
// (output channels per group, a multiple of VW * NBV so a block never straddles groups) are runtime arguments.
// y[n, oh, ow, co] = act(sum_{i,j,c<cg} x[n, oh*SH - pt + i*DH, ow*SW - pl + j*DW, g*cg + c] * w[i, j, c, co] + b[co])
// with g = co / cog. Work-item: bpi blocks of NBV*VW output channels, ppi chunks of PIX pixels, rpi rows (as
// conv_direct_fwd). Per input channel the PIX pixels' row segment (SPAN scalars, zero outside the image through a
// bit mask on a clamped column) is loaded once per kernel row and broadcast into KW*NBV*PIX vector FMAs.
// Global size: (ceil(blocks / bpi), ceil(OW / (PIX * ppi)), ceil(N * OH / rpi)); nrows = N * OH.
__kernel KATTR void conv_group_fwd(const __global float* restrict x, const __global float* restrict w,
                                   const __global float* restrict b, __global float* restrict y,
                                   int H, int W, int Cin, int OH, int OW, int Cout, int pt, int pl, int cg, int cog,
                                   int nblocks, int has_bias, int act, int bpi, int ppi, int rpi, int nrows
                                   PHASE_ARGS)
{
    FOR_EACH_BLOCK {
        const int n = noh / OH, oh = noh - n * OH;
        const int co = cb * (VW * NBV);
        const int ci0 = (co / cog) * cg;
        vec acc[NBV][PIX];
        INIT_ACC(acc, co);
        const int iw0 = owb * SW - pl;
        int cofs[SPAN], keep[SPAN];
        _Pragma("unroll") for (int q = 0; q < SPAN; q++) {
            const int iw = iw0 + q;
            cofs[q] = CLAMP_COL(iw, W) * Cin + ci0;
            keep[q] = -(int)(iw >= 0 && iw < W);
        }
        _Pragma("unroll") for (int i = 0; i < KH; i++) {
            const int ih = oh * SH - pt + i * DH;
            if (ih < 0 || ih >= H) continue;
            const __global float* xr = x + (size_t)(n * H + ih) * W * Cin;
            const __global float* wr = w + (size_t)i * KW * cg * Cout + co;
            for (int c = 0; c < cg; c++) {
                float xs[SPAN];
                _Pragma("unroll") for (int q = 0; q < SPAN; q++) xs[q] = as_float(as_int(xr[cofs[q] + c]) & keep[q]);
                _Pragma("unroll") for (int j = 0; j < KW; j++)
                    _Pragma("unroll") for (int u = 0; u < NBV; u++) {
                        const vec wv = LD(wr + ((size_t)j * cg + c) * Cout + u * VW);
                        _Pragma("unroll") for (int p = 0; p < PIX; p++)
                            acc[u][p] = xs[p * SW + j * DW] * wv + acc[u][p];
                    }
            }
        }
        STORE_ACC(acc, co, n, oh, owb);
    }
}

#endif  // !CIN

#else  // generic helpers

// colsum_split: column c of the (rows, ncols) matrix summed; c < split goes to out1[c], else out2[c - split]
// (dW and db of the depthwise partials in one launch). Global size (ncols).
__kernel void colsum_split(const __global float* restrict a, int rows, int ncols,
                           __global float* restrict out1, int split, __global float* restrict out2)
{
    const int c = get_global_id(0);
    if (c >= ncols) return;
    float s = 0.0f;
    for (int q = 0; q < rows; q++) s += a[(size_t)q * ncols + c];
    if (c < split) out1[c] = s;
    else out2[c - split] = s;
}

// The geometry arguments of im2col / col2im and their CPU-style variants (cl_conv._im2col / _col2im).
#define IM2COL_GEOMETRY                                                                                         \
    int H, int W, int C, int OH, int OW, int pt, int pl, int Cg, int c0, int n0, int KH, int KW, int SH, int SW, \
        int DH, int DW
// im2col for one group and a chunk of images [n0, n0 + nimg):
//   col[(n - n0)*OH*OW + oh*OW + ow, (i*KW + j)*Cg + c] = x[n, oh*SH - pt + i*DH, ow*SW - pl + j*DW, c0 + c] or 0
// Global size (KH*KW*Cg, OW, nimg*OH).
__kernel void im2col(const __global float* restrict x, __global float* restrict col,
                     IM2COL_GEOMETRY)
{
    const int k = get_global_id(0);
    const int K = KH * KW * Cg;
    if (k >= K) return;
    const int ow = get_global_id(1);
    const int qoh = get_global_id(2);  // (n - n0) * OH + oh
    const int nl = qoh / OH, oh = qoh - nl * OH;
    const int t = k / Cg, c = k - t * Cg;
    const int i = t / KW, j = t - i * KW;
    const int ih = oh * SH - pt + i * DH, iw = ow * SW - pl + j * DW;
    float v = 0.0f;
    if (ih >= 0 && ih < H && iw >= 0 && iw < W) v = x[((size_t)((n0 + nl) * H + ih) * W + iw) * C + c0 + c];
    col[((size_t)qoh * OW + ow) * K + k] = v;
}

// col2im (gather, no atomics) for one group and a chunk of images:
//   dx[n, h, w, c0 + c] = sum_ij dcol[(n - n0)*OH*OW + oh*OW + ow, (i*KW + j)*Cg + c]
//   over (i, j) with h = oh*SH - pt + i*DH, w = ow*SW - pl + j*DW inside the output. Global size (Cg, W, nimg*H).
__kernel void col2im(const __global float* restrict dcol, __global float* restrict dx,
                     IM2COL_GEOMETRY)
{
    const int c = get_global_id(0);
    if (c >= Cg) return;
    const int w = get_global_id(1);
    const int qh = get_global_id(2);  // (n - n0) * H + h
    const int nl = qh / H, h = qh - nl * H;
    const int K = KH * KW * Cg;
    float s = 0.0f;
    for (int i = 0; i < KH; i++) {
        const int th = h + pt - i * DH;
        if (th < 0 || th % SH) continue;
        const int oh = th / SH;
        if (oh >= OH) continue;
        for (int j = 0; j < KW; j++) {
            const int tw = w + pl - j * DW;
            if (tw < 0 || tw % SW) continue;
            const int ow = tw / SW;
            if (ow >= OW) continue;
            s += dcol[((size_t)(nl * OH + oh) * OW + ow) * K + (i * KW + j) * Cg + c];
        }
    }
    dx[((size_t)(n0 * H + qh) * W + w) * C + c0 + c] = s;
}

// im2col and col2im, CPU style: one work-item per matrix row (im2col: an output pixel; col2im: an input pixel), its
// channels moved 16 at a time through float16 registers (the element-per-work-item kernels above cost PoCL ~7x:
// ResNet-18's 16x56x56x64 3x3 im2col 80 ms, twice its dW GEMM). Same arguments and results as im2col / col2im.
// d[0, n) = s[0, n) (s != 0) or zeros, 16 floats at a time.
inline void copy_or_zero(__global float* restrict d, const __global float* restrict s, int n)
{
    int c = 0;
    if (s) {
        for (; c + 16 <= n; c += 16) VST16(d + c, VLD16(s + c));
        for (; c < n; c++) d[c] = s[c];
    } else {
        for (; c + 16 <= n; c += 16) VST16(d + c, (float16)(0.0f));
        for (; c < n; c++) d[c] = 0.0f;
    }
}

// col row of output pixel (ow, qoh = (n - n0)*OH + oh): KH*KW segments of Cg channels, each the input pixel's
// channels c0.. or zeros outside the image. Where those are all the channels (Cg == C) and the taps of a kernel row
// are adjacent pixels (DW == 1), the row's in-image taps are one contiguous run of x (conv1 on RGB: 21 floats
// instead of 7 runs of 3). Global size (OW, nimg*OH).
VEC512
__kernel void im2col_rows(const __global float* restrict x, __global float* restrict col,
                          IM2COL_GEOMETRY)
{
    const int ow = get_global_id(0), qoh = get_global_id(1);
    const int nl = qoh / OH, oh = qoh - nl * OH;
    const int iw0 = ow * SW - pl;
    const int whole = Cg == C && DW == 1;
    const int j0 = whole ? clamp(-iw0, 0, KW) : 0, j1 = whole ? clamp(W - iw0, j0, KW) : 0;
    __global float* d = col + ((size_t)qoh * OW + ow) * (KH * KW * Cg);
    for (int i = 0; i < KH; i++, d += KW * Cg) {
        const int ih = oh * SH - pt + i * DH;
        const __global float* xr = ih >= 0 && ih < H ? x + (size_t)((n0 + nl) * H + ih) * W * C + c0 : 0;
        if (whole) {
            copy_or_zero(d, 0, j0 * C);
            copy_or_zero(d + j0 * C, xr ? xr + (iw0 + j0) * C : 0, (j1 - j0) * C);
            copy_or_zero(d + j1 * C, 0, (KW - j1) * C);
            continue;
        }
        for (int j = 0; j < KW; j++) {
            const int iw = iw0 + j * DW;
            copy_or_zero(d + j * Cg, xr && iw >= 0 && iw < W ? xr + iw * C : 0, Cg);
        }
    }
}

// dx pixel (w, qh = (n - n0)*H + h), channels c0..c0+Cg: the sum over the taps whose window covers it, in the
// reference's (i, j) order, 16 channels at a time (then one at a time for the last Cg % 16). Global size (W, nimg*H).
// COL2IM_TAPS(p, c): p = the dcol element of channel c of each covering tap, in turn.
#define COL2IM_TAPS(p, c)                                                                                       \
    for (int i = 0; i < KH; i++) {                                                                              \
        const int th = h + pt - i * DH, oh = th / SH;                                                           \
        if (th < 0 || th % SH || oh >= OH) continue;                                                            \
        for (int j = 0; j < KW; j++) {                                                                          \
            const int tw = w + pl - j * DW, ow = tw / SW;                                                       \
            if (tw < 0 || tw % SW || ow >= OW) continue;                                                        \
            const __global float* p = dcol + ((size_t)(nl * OH + oh) * OW + ow) * K + (i * KW + j) * Cg + (c);
#define COL2IM_TAPS_END }}
VEC512
__kernel void col2im_rows(const __global float* restrict dcol, __global float* restrict dx,
                          IM2COL_GEOMETRY)
{
    const int w = get_global_id(0), qh = get_global_id(1);
    const int nl = qh / H, h = qh - nl * H;
    const int K = KH * KW * Cg;
    __global float* d = dx + ((size_t)(n0 * H + qh) * W + w) * C + c0;
    int c = 0;
    for (; c + 16 <= Cg; c += 16) {
        float16 s = (float16)(0.0f);
        COL2IM_TAPS(p, c) s += VLD16(p); COL2IM_TAPS_END
        VST16(d + c, s);
    }
    for (; c < Cg; c++) {
        float s = 0.0f;
        COL2IM_TAPS(p, c) s += *p; COL2IM_TAPS_END
        d[c] = s;
    }
}

// Strided 2-D copy of a (rows, cols) block: dst[(dr0 + r)*dld + dc0 + c] = src[(sr0 + r)*sld + sc0 + c].
// Global size (cols, rows).
__kernel void copy2d(const __global float* restrict src, int sld, int sr0, int sc0,
                     __global float* restrict dst, int dld, int dr0, int dc0, int rows, int cols)
{
    const int c = get_global_id(0);
    const int r = get_global_id(1);
    if (c >= cols || r >= rows) return;
    dst[(size_t)(dr0 + r) * dld + dc0 + c] = src[(size_t)(sr0 + r) * sld + sc0 + c];
}

// The weights of a convolution's input gradient as a forward convolution of gy: wt[t][u][i][c] =
// w[FR - SI*t][FC - SJ*u][j][g*COG + i] for output channel c = g*CG + j (HWIO, groups G, CG input and COG output
// channels per group), T x U taps: a transpose per tap and group. Stride 1: all taps flipped in space (FR = KH-1,
// T = KH, SI = 1, and so for columns); stride s: the taps of one phase, every s-th from FR down
// (cl_conv._strided_dx). A work-item moves a 16 x 16 tile (its 16 source rows stay in L1, so reads and writes both
// go along rows; one element per work-item read w with a stride of COUT floats and took longer than the
// convolution). Global size (ceil(CG / 16), ceil(COG / 16), T*U*G).
__kernel void conv_weight_flip(const __global float* restrict w, __global float* restrict wt, int KW, int CG,
                               int COUT, int G, int FR, int T, int SI, int FC, int U, int SJ)
{
    const int j0 = get_global_id(0) * 16, i0 = get_global_id(1) * 16, t = get_global_id(2);
    const int COG = COUT / G, C = CG * G;
    if (j0 >= CG || i0 >= COG || t >= T * U * G) return;
    const int g = t % G, tap = t / G;
    const int th = tap / U, tw = tap - th * U;
    const int src = (FR - SI * th) * KW + (FC - SJ * tw);
    const int i1 = min(i0 + 16, COG), j1 = min(j0 + 16, CG);
    for (int i = i0; i < i1; i++)
        for (int j = j0; j < j1; j++)
            wt[((size_t)tap * COG + i) * C + g * CG + j] = w[((size_t)src * CG + j) * COUT + g * COG + i];
}

#endif  // DEPTHWISE
