// Pooling and padding on NHWC tensors (see transfercl_cli/ops/cl_conv.py). One work-item per output (forward) or
// per input element (backward, a gather over the windows that cover it: no atomics); channels are the fastest
// global dimension so neighbouring work-items touch neighbouring addresses.
// Window of output (oh, ow): rows oh*sh - pt ... + kh - 1, columns ow*sw - pl ... + kw - 1.

#include "vector_access.h"  // VLD4/8/16, VST4/8/16: see that file

// First output row/column whose window covers input index h (windows of size k, stride s, leading pad p).
inline int first_cover(int h, int k, int s, int p)
{
    const int t = h + p - k + 1;
    return t <= 0 ? 0 : (t + s - 1) / s;
}

// Window divisor of average pooling: the padded window clipped to the bottom/right pads (count_include_pad), or
// the number of real elements.
inline float avg_div(int oh, int ow, int H, int W, int kh, int kw, int sh, int sw, int pt, int pl, int pb, int pr,
                     int include_pad)
{
    const int hs = oh * sh - pt, ws = ow * sw - pl;
    int ch, cw;
    if (include_pad) {
        ch = min(hs + kh, H + pb) - hs;
        cw = min(ws + kw, W + pr) - ws;
    } else {
        ch = min(hs + kh, H) - max(hs, 0);
        cw = min(ws + kw, W) - max(ws, 0);
    }
    return (float)(max(ch, 1) * max(cw, 1));
}

// The work-item of output (n, oh, ow, c) and its window's first input row hs and column ws (may be negative).
#define POOL_OUTPUT_ITEM()                                                                                      \
    const int c = get_global_id(0);                                                                             \
    if (c >= C) return;                                                                                         \
    const int ow = get_global_id(1);                                                                            \
    const int noh = get_global_id(2);                                                                           \
    const int n = noh / OH, oh = noh - n * OH;                                                                  \
    const int hs = oh * sh - pt, ws = ow * sw - pl;

// Global size (C, OW, N*OH).
__kernel void maxpool_fwd(const __global float* restrict x, __global float* restrict y,
                          int H, int W, int C, int OH, int OW, int kh, int kw, int sh, int sw, int pt, int pl)
{
    POOL_OUTPUT_ITEM()
    float m = -INFINITY;
    for (int ih = max(hs, 0); ih < min(hs + kh, H); ih++)
        for (int iw = max(ws, 0); iw < min(ws + kw, W); iw++)
            m = fmax(m, x[((size_t)(n * H + ih) * W + iw) * C + c]);
    y[((size_t)noh * OW + ow) * C + c] = m;
}

// Index ih*W + iw of the first maximum of each window in row-major window order (-1 for an empty window).
__kernel void maxpool_argmax(const __global float* restrict x, __global int* restrict idx,
                             int H, int W, int C, int OH, int OW, int kh, int kw, int sh, int sw, int pt, int pl)
{
    POOL_OUTPUT_ITEM()
    float m = -INFINITY;
    int best = -1;
    for (int ih = max(hs, 0); ih < min(hs + kh, H); ih++)
        for (int iw = max(ws, 0); iw < min(ws + kw, W); iw++) {
            const float v = x[((size_t)(n * H + ih) * W + iw) * C + c];
            if (v > m || best < 0) {
                m = v;
                best = ih * W + iw;
            }
        }
    idx[((size_t)noh * OW + ow) * C + c] = best;
}

// dx[n, h, w, c] = sum of gy over the windows whose argmax is (h, w). Global size (C, W, N*H).
__kernel void maxpool_bwd(const __global float* restrict gy, const __global int* restrict idx,
                          __global float* restrict dx,
                          int H, int W, int C, int OH, int OW, int kh, int kw, int sh, int sw, int pt, int pl)
{
    const int c = get_global_id(0);
    if (c >= C) return;
    const int w = get_global_id(1);
    const int nh = get_global_id(2);
    const int n = nh / H, h = nh - n * H;
    const int me = h * W + w;
    float s = 0.0f;
    const int oh1 = min(OH - 1, (h + pt) / sh), ow1 = min(OW - 1, (w + pl) / sw);
    for (int oh = first_cover(h, kh, sh, pt); oh <= oh1; oh++)
        for (int ow = first_cover(w, kw, sw, pl); ow <= ow1; ow++) {
            const size_t o = ((size_t)(n * OH + oh) * OW + ow) * C + c;
            if (idx[o] == me) s += gy[o];
        }
    dx[((size_t)nh * W + w) * C + c] = s;
}

// Global size (C, OW, N*OH).
__kernel void avgpool_fwd(const __global float* restrict x, __global float* restrict y,
                          int H, int W, int C, int OH, int OW, int kh, int kw, int sh, int sw, int pt, int pl,
                          int pb, int pr, int include_pad)
{
    POOL_OUTPUT_ITEM()
    float s = 0.0f;
    for (int ih = max(hs, 0); ih < min(hs + kh, H); ih++)
        for (int iw = max(ws, 0); iw < min(ws + kw, W); iw++)
            s += x[((size_t)(n * H + ih) * W + iw) * C + c];
    y[((size_t)noh * OW + ow) * C + c] = s / avg_div(oh, ow, H, W, kh, kw, sh, sw, pt, pl, pb, pr, include_pad);
}

// Global size (C, W, N*H).
__kernel void avgpool_bwd(const __global float* restrict gy, __global float* restrict dx,
                          int H, int W, int C, int OH, int OW, int kh, int kw, int sh, int sw, int pt, int pl,
                          int pb, int pr, int include_pad)
{
    const int c = get_global_id(0);
    if (c >= C) return;
    const int w = get_global_id(1);
    const int nh = get_global_id(2);
    const int n = nh / H, h = nh - n * H;
    float s = 0.0f;
    const int oh1 = min(OH - 1, (h + pt) / sh), ow1 = min(OW - 1, (w + pl) / sw);
    for (int oh = first_cover(h, kh, sh, pt); oh <= oh1; oh++)
        for (int ow = first_cover(w, kw, sw, pl); ow <= ow1; ow++)
            s += gy[((size_t)(n * OH + oh) * OW + ow) * C + c] /
                 avg_div(oh, ow, H, W, kh, kw, sh, sw, pt, pl, pb, pr, include_pad);
    dx[((size_t)nh * W + w) * C + c] = s;
}

// y[n, c] = mean over H*W of x[n, :, :, c]. Global size (C, N).
__kernel void global_avgpool_fwd(const __global float* restrict x, __global float* restrict y, int HW, int C)
{
    const int c = get_global_id(0);
    if (c >= C) return;
    const int n = get_global_id(1);
    const __global float* xp = x + (size_t)n * HW * C + c;
    float s = 0.0f;
    for (int i = 0; i < HW; i++) s += xp[(size_t)i * C];
    y[(size_t)n * C + c] = s / (float)HW;
}

// dx[n, p, c] = gy[n, c] / HW. Global size (C, HW, N).
__kernel void global_avgpool_bwd(const __global float* restrict gy, __global float* restrict dx, int HW, int C)
{
    const int c = get_global_id(0);
    if (c >= C) return;
    const int p = get_global_id(1);
    const int n = get_global_id(2);
    dx[((size_t)n * HW + p) * C + c] = gy[(size_t)n * C + c] / (float)HW;
}

// Constant padding (negative pads crop): y[n, oh, ow, c] = x[n, oh - pt, ow - pl, c] or value.
// The same kernel gives the backward (dx = gy shifted by -pt, -pl, value 0). Global size (C, OW, N*OH).
__kernel void pad_shift(const __global float* restrict x, __global float* restrict y,
                        int H, int W, int C, int OH, int OW, int pt, int pl, float value)
{
    const int c = get_global_id(0);
    if (c >= C) return;
    const int ow = get_global_id(1);
    const int noh = get_global_id(2);
    const int n = noh / OH, oh = noh - n * OH;
    const int ih = oh - pt, iw = ow - pl;
    float v = value;
    if (ih >= 0 && ih < H && iw >= 0 && iw < W) v = x[((size_t)(n * H + ih) * W + iw) * C + c];
    y[((size_t)noh * OW + ow) * C + c] = v;
}

// The same padding, one work-item per output row (n, oh): a row is a left fill, one contiguous copy and a right
// fill of OW*C floats, moved 16 at a time through float16 registers (VLD16/VST16: element-wise on PoCL, where
// vloadN and vstoreN become calls, see the top of the file). Global size (N*OH).
VEC512
__kernel void pad_rows(const __global float* restrict x, __global float* restrict y,
                       int H, int W, int C, int OH, int OW, int pt, int pl, float value, int nrows)
{
    const int noh = get_global_id(0);
    if (noh >= nrows) return;
    const int n = noh / OH, oh = noh - n * OH;
    const int ih = oh - pt;
    __global float* yr = y + (size_t)noh * OW * C;
    int ow0 = max(0, pl), ow1 = min(OW, W + pl);
    if (ih < 0 || ih >= H || ow1 <= ow0) { ow0 = 0; ow1 = 0; }
    const float16 vv = (float16)(value);
    // left fill [0, ow0*C), copy [ow0*C, ow1*C), right fill [ow1*C, OW*C)
    const int e0 = ow0 * C, e1 = ow1 * C, e2 = OW * C;
    int i = 0;
    for (; i + 16 <= e0; i += 16) VST16(yr + i, vv);
    for (; i < e0; i++) yr[i] = value;
    if (e1 > e0) {
        const __global float* xr = x + ((size_t)(n * H + ih) * W + (ow0 - pl)) * C - e0;
        for (; i + 16 <= e1; i += 16) VST16(yr + i, VLD16(xr + i));
        for (; i < e1; i++) yr[i] = xr[i];
    }
    for (; i + 16 <= e2; i += 16) VST16(yr + i, vv);
    for (; i < e2; i++) yr[i] = value;
}

// Max / average pooling forward, CPU style: work-item (chunk, ow, n*oh) computes POOL_CW channels of one output
// pixel in float16 registers, reading each window pixel's channels as whole cache lines (the per-channel kernels
// above run one work-item per element and reached ~0.5 GFLOP/s on SqueezeNet's max pools on PoCL). Global size
// (ceil(C / POOL_CW), OW, N*OH); the last, partial chunk goes channel by channel.
#ifndef POOL_CW
#define POOL_CW 32  // a multiple of 16; the host passes its own value (cl_conv.POOL_CW)
#endif
#define POOL_ROWS_ITEM()                                                                                        \
    const int c0 = get_global_id(0) * POOL_CW;                                                                  \
    if (c0 >= C) return;                                                                                        \
    const int ow = get_global_id(1);                                                                            \
    const int noh = get_global_id(2);                                                                           \
    const int n = noh / OH, oh = noh - n * OH;                                                                  \
    const int hs = oh * sh - pt, ws = ow * sw - pl;                                                             \
    const int h0 = max(hs, 0), h1 = min(hs + kh, H), w0 = max(ws, 0), w1 = min(ws + kw, W);                     \
    const __global float* xn = x + (size_t)n * H * W * C + c0;                                                  \
    __global float* yp = y + ((size_t)noh * OW + ow) * C + c0;

VEC512
__kernel void maxpool_fwd_rows(const __global float* restrict x, __global float* restrict y,
                               int H, int W, int C, int OH, int OW, int kh, int kw, int sh, int sw, int pt, int pl)
{
    POOL_ROWS_ITEM()
    if (c0 + POOL_CW <= C) {
        float16 m[POOL_CW / 16];
        _Pragma("unroll") for (int v = 0; v < POOL_CW / 16; v++) m[v] = (float16)(-INFINITY);
        for (int ih = h0; ih < h1; ih++)
            for (int iw = w0; iw < w1; iw++) {
                const __global float* xp = xn + ((size_t)ih * W + iw) * C;
                _Pragma("unroll") for (int v = 0; v < POOL_CW / 16; v++) m[v] = fmax(m[v], VLD16(xp + 16 * v));
            }
        _Pragma("unroll") for (int v = 0; v < POOL_CW / 16; v++) VST16(yp + 16 * v, m[v]);
        return;
    }
    for (int c = 0; c < C - c0; c++) {
        float m = -INFINITY;
        for (int ih = h0; ih < h1; ih++)
            for (int iw = w0; iw < w1; iw++) m = fmax(m, xn[((size_t)ih * W + iw) * C + c]);
        yp[c] = m;
    }
}

// Max pooling backward, CPU style, in two passes like maxpool_argmax / maxpool_bwd above but POOL_CW channels per
// work-item in float16 registers. The argmax index ih*W + iw is stored as a float (exact below 2^24; the host
// takes the int32 kernels beyond), so it moves through the same vector loads as the data.
// First maximum in window order, as maxpool_argmax; -1 for an empty window. Global size (ceil(C/POOL_CW), OW, N*OH).
// `y` receives the indices (the name POOL_ROWS_ITEM addresses). maxpool_fwd_argmax_rows also stores the maximum
// as maxpool_fwd_rows does (fmax: the same bits) to ymax: a training forward then saves the indices, and the
// backward does not read x again.
#define MAXPOOL_ARGMAX_BODY(STORE_MAX)                                                                          \
    POOL_ROWS_ITEM()                                                                                            \
    if (c0 + POOL_CW <= C) {                                                                                    \
        float16 m[POOL_CW / 16], best[POOL_CW / 16], mx[POOL_CW / 16];                                          \
        _Pragma("unroll") for (int v = 0; v < POOL_CW / 16; v++) {                                              \
            m[v] = mx[v] = (float16)(-INFINITY);                                                                \
            best[v] = (float16)(-1.0f);                                                                         \
        }                                                                                                       \
        for (int ih = h0; ih < h1; ih++)                                                                        \
            for (int iw = w0; iw < w1; iw++) {                                                                  \
                const __global float* xp = xn + ((size_t)ih * W + iw) * C;                                      \
                const float16 me = (float16)((float)(ih * W + iw));                                             \
                _Pragma("unroll") for (int v = 0; v < POOL_CW / 16; v++) {                                      \
                    const float16 t = VLD16(xp + 16 * v);                                                       \
                    const int16 take = isgreater(t, m[v]) | isless(best[v], (float16)(0.0f));                   \
                    m[v] = select(m[v], t, take);                                                               \
                    best[v] = select(best[v], me, take);                                                        \
                    if (STORE_MAX) mx[v] = fmax(mx[v], t);                                                      \
                }                                                                                               \
            }                                                                                                   \
        _Pragma("unroll") for (int v = 0; v < POOL_CW / 16; v++) {                                              \
            VST16(yp + 16 * v, best[v]);                                                                        \
            if (STORE_MAX) VST16(ymax + (yp - y) + 16 * v, mx[v]);                                              \
        }                                                                                                       \
        return;                                                                                                 \
    }                                                                                                           \
    for (int c = 0; c < C - c0; c++) {                                                                          \
        float m = -INFINITY, best = -1.0f, mx = -INFINITY;                                                      \
        for (int ih = h0; ih < h1; ih++)                                                                        \
            for (int iw = w0; iw < w1; iw++) {                                                                  \
                const float t = xn[((size_t)ih * W + iw) * C + c];                                              \
                if (t > m || best < 0.0f) {                                                                     \
                    m = t;                                                                                      \
                    best = (float)(ih * W + iw);                                                                \
                }                                                                                               \
                if (STORE_MAX) mx = fmax(mx, t);                                                                \
            }                                                                                                   \
        yp[c] = best;                                                                                           \
        if (STORE_MAX) ymax[(yp - y) + c] = mx;                                                                 \
    }

VEC512
__kernel void maxpool_argmax_rows(const __global float* restrict x, __global float* restrict y,
                                  int H, int W, int C, int OH, int OW, int kh, int kw, int sh, int sw, int pt, int pl)
{
    __global float* ymax = y;  // (not written: STORE_MAX is 0)
    MAXPOOL_ARGMAX_BODY(0)
}

VEC512
__kernel void maxpool_fwd_argmax_rows(const __global float* restrict x, __global float* restrict y,
                                      __global float* restrict ymax, int H, int W, int C, int OH, int OW, int kh,
                                      int kw, int sh, int sw, int pt, int pl)
{
    MAXPOOL_ARGMAX_BODY(1)
}

// dx[n, h, w, c] = sum of gy over the windows whose (float) argmax is (h, w); POOL_CW channels per work-item.
// Global size (ceil(C/POOL_CW), W, N*H).
VEC512
__kernel void maxpool_bwd_rows(const __global float* restrict gy, const __global float* restrict idx,
                               __global float* restrict dx,
                               int H, int W, int C, int OH, int OW, int kh, int kw, int sh, int sw, int pt, int pl)
{
    const int c0 = get_global_id(0) * POOL_CW;
    if (c0 >= C) return;
    const int w = get_global_id(1);
    const int nh = get_global_id(2);
    const int n = nh / H, h = nh - n * H;
    const float mef = (float)(h * W + w);
    const int oh0 = first_cover(h, kh, sh, pt), oh1 = min(OH - 1, (h + pt) / sh);
    const int ow0 = first_cover(w, kw, sw, pl), ow1 = min(OW - 1, (w + pl) / sw);
    __global float* dp = dx + ((size_t)nh * W + w) * C + c0;
    if (c0 + POOL_CW <= C) {
        float16 s[POOL_CW / 16];
        _Pragma("unroll") for (int v = 0; v < POOL_CW / 16; v++) s[v] = (float16)(0.0f);
        for (int oh = oh0; oh <= oh1; oh++)
            for (int ow = ow0; ow <= ow1; ow++) {
                const size_t o = ((size_t)(n * OH + oh) * OW + ow) * C + c0;
                _Pragma("unroll") for (int v = 0; v < POOL_CW / 16; v++) {
                    const int16 mine = isequal(VLD16(idx + o + 16 * v), (float16)(mef));
                    s[v] += select((float16)(0.0f), VLD16(gy + o + 16 * v), mine);
                }
            }
        _Pragma("unroll") for (int v = 0; v < POOL_CW / 16; v++) VST16(dp + 16 * v, s[v]);
        return;
    }
    for (int c = 0; c < C - c0; c++) {
        float t = 0.0f;
        for (int oh = oh0; oh <= oh1; oh++)
            for (int ow = ow0; ow <= ow1; ow++) {
                const size_t o = ((size_t)(n * OH + oh) * OW + ow) * C + c0 + c;
                if (idx[o] == mef) t += gy[o];
            }
        dp[c] = t;
    }
}

VEC512
__kernel void avgpool_fwd_rows(const __global float* restrict x, __global float* restrict y,
                               int H, int W, int C, int OH, int OW, int kh, int kw, int sh, int sw, int pt, int pl,
                               int pb, int pr, int include_pad)
{
    POOL_ROWS_ITEM()
    const float inv = 1.0f / avg_div(oh, ow, H, W, kh, kw, sh, sw, pt, pl, pb, pr, include_pad);
    if (c0 + POOL_CW <= C) {
        float16 s[POOL_CW / 16];
        _Pragma("unroll") for (int v = 0; v < POOL_CW / 16; v++) s[v] = (float16)(0.0f);
        for (int ih = h0; ih < h1; ih++)
            for (int iw = w0; iw < w1; iw++) {
                const __global float* xp = xn + ((size_t)ih * W + iw) * C;
                _Pragma("unroll") for (int v = 0; v < POOL_CW / 16; v++) s[v] += VLD16(xp + 16 * v);
            }
        _Pragma("unroll") for (int v = 0; v < POOL_CW / 16; v++) VST16(yp + 16 * v, s[v] * inv);
        return;
    }
    for (int c = 0; c < C - c0; c++) {
        float t = 0.0f;
        for (int ih = h0; ih < h1; ih++)
            for (int iw = w0; iw < w1; iw++) t += xn[((size_t)ih * W + iw) * C + c];
        yp[c] = t * inv;
    }
}

// Average pooling backward, CPU style: work-item (chunk, w, n*h) sums POOL_CW channels of the gradients of the
// windows that cover input pixel (h, w), each divided by its window's divisor, in float16 registers (the
// per-element avgpool_bwd above took 28% of Inception v3's training step on PoCL). Global size
// (ceil(C / POOL_CW), W, N*H); the last, partial chunk goes channel by channel.
VEC512
__kernel void avgpool_bwd_rows(const __global float* restrict gy, __global float* restrict dx,
                               int H, int W, int C, int OH, int OW, int kh, int kw, int sh, int sw, int pt, int pl,
                               int pb, int pr, int include_pad)
{
    const int c0 = get_global_id(0) * POOL_CW;
    if (c0 >= C) return;
    const int w = get_global_id(1);
    const int nh = get_global_id(2);
    const int n = nh / H, h = nh - n * H;
    const int oh0 = first_cover(h, kh, sh, pt), oh1 = min(OH - 1, (h + pt) / sh);
    const int ow0 = first_cover(w, kw, sw, pl), ow1 = min(OW - 1, (w + pl) / sw);
    __global float* dp = dx + ((size_t)nh * W + w) * C + c0;
    if (c0 + POOL_CW <= C) {
        float16 s[POOL_CW / 16];
        _Pragma("unroll") for (int v = 0; v < POOL_CW / 16; v++) s[v] = (float16)(0.0f);
        for (int oh = oh0; oh <= oh1; oh++)
            for (int ow = ow0; ow <= ow1; ow++) {
                const float inv = 1.0f / avg_div(oh, ow, H, W, kh, kw, sh, sw, pt, pl, pb, pr, include_pad);
                const __global float* g = gy + ((size_t)(n * OH + oh) * OW + ow) * C + c0;
                _Pragma("unroll") for (int v = 0; v < POOL_CW / 16; v++) s[v] += VLD16(g + 16 * v) * inv;
            }
        _Pragma("unroll") for (int v = 0; v < POOL_CW / 16; v++) VST16(dp + 16 * v, s[v]);
        return;
    }
    for (int c = 0; c < C - c0; c++) {
        float t = 0.0f;
        for (int oh = oh0; oh <= oh1; oh++)
            for (int ow = ow0; ow <= ow1; ow++)
                t += gy[((size_t)(n * OH + oh) * OW + ow) * C + c0 + c] /
                     avg_div(oh, ow, H, W, kh, kw, sh, sw, pt, pl, pb, pr, include_pad);
        dp[c] = t;
    }
}

// Global average pooling forward, CPU style: work-item (chunk, n, segment) sums GAP_CW channels of image n over
// `seg` of its HW pixels in float16 registers, so each pixel row is read as whole cache lines (the per-channel kernel
// above strides by C between loads and ran at ~3 GB/s on PoCL), and writes the sum times `scale` to row
// n * S + segment of y (S = the global size's third dimension). One segment (S = 1, scale 1 / HW) is the whole
// pool; with S > 1 (a large map at batch 1: one work-item would do it all) the host sums the S partial rows with a
// second launch (HW = seg = S, scale 1). Channels past the last whole chunk go 16 at a time, then one by one.
#ifndef GAP_CW
#define GAP_CW 64  // a multiple of 16; the host passes its own value (cl_conv.GAP_CW)
#endif
VEC512
__kernel void global_avgpool_fwd_rows(const __global float* restrict x, __global float* restrict y, int HW, int C,
                                      int seg, float scale)
{
    const int c0 = get_global_id(0) * GAP_CW;
    if (c0 >= C) return;
    const int n = get_global_id(1), sg = get_global_id(2);
    const int p0 = sg * seg, np = min(HW, p0 + seg) - p0;
    const __global float* xp = x + ((size_t)n * HW + p0) * C + c0;
    __global float* yp = y + ((size_t)n * get_global_size(2) + sg) * C + c0;
    if (c0 + GAP_CW <= C) {
        float16 acc[GAP_CW / 16];
        _Pragma("unroll") for (int v = 0; v < GAP_CW / 16; v++) acc[v] = (float16)(0.0f);
        for (int i = 0; i < np; i++, xp += C)
            _Pragma("unroll") for (int v = 0; v < GAP_CW / 16; v++) acc[v] += VLD16(xp + 16 * v);
        _Pragma("unroll") for (int v = 0; v < GAP_CW / 16; v++) VST16(yp + 16 * v, acc[v] * scale);
        return;
    }
    int c = 0;
    for (; c + 16 <= C - c0; c += 16) {  // the last, partial chunk
        float16 t = (float16)(0.0f);
        for (int i = 0; i < np; i++) t += VLD16(xp + (size_t)i * C + c);
        VST16(yp + c, t * scale);
    }
    for (; c < C - c0; c++) {
        float t = 0.0f;
        for (int i = 0; i < np; i++) t += xp[(size_t)i * C + c];
        yp[c] = t * scale;
    }
}

// Global average pooling backward, one work-item per pixel row (n, p): dx[n, p, :] = gy[n, :] / HW, 16 channels at
// a time (CPU style, as pad_rows). Global size (N*HW).
VEC512
__kernel void global_avgpool_bwd_rows(const __global float* restrict gy, __global float* restrict dx, int HW, int C,
                                      int nrows)
{
    const int q = get_global_id(0);
    if (q >= nrows) return;
    const int n = q / HW;
    const float s = 1.0f / (float)HW;
    const __global float* g = gy + (size_t)n * C;
    __global float* d = dx + (size_t)q * C;
    int c = 0;
    for (; c + 16 <= C; c += 16) VST16(d + c, VLD16(g + c) * s);
    for (; c < C; c++) d[c] = g[c] * s;
}
