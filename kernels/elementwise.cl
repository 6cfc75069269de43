// Elementwise activations, broadcasting add/mul, reductions to a broadcast shape, copies/transposes, softmax,
// LRN and dropout (float32, row-major, channels last).
//
// Vectors move through VLD8/VST8 (the block below): whole-buffer kernels start each work-item at a multiple of 8
// elements, row kernels at any float offset.

#include "vector_access.h"  // VLD4/8/16, VST4/8/16: see that file

// ---------------------------------------------------------------------------------------------------------------
// Activations, chosen by the runtime argument `act` (uniform per launch; one program for all of them, which keeps
// the first build short). ACT_F is the forward, ACT_DF the input gradient from the saved tensor s (the input x, or
// the output y where the op saves it: see SAVES_Y in cl_elementwise.py); P0, P1 are attributes. The same code
// serves the float8 body and the scalar tail (T = float8 or float). Comparisons and ?: instead of
// fmax/fmin/clamp/select: PoCL emits those built-ins as function calls that spill the vector registers.
// act: 0 copy, 1 relu, 2 relu6, 3 clip(P0, P1), 4 leaky_relu(P0), 5 sigmoid, 6 tanh, 7 swish,
//      8 hard_sigmoid: clip(P0 x + P1, 0, 1), 9 hard_swish: x relu6(x + 3) / 6, 10 affine: P0 x + P1.
#define DEF_ACT(T, SUF)                                                                                           \
inline T act_f_##SUF(const T x, const int act, const float P0, const float P1) {                                  \
    switch (act) {                                                                                                \
    case 1: return x > (T)(0.0f) ? x : (T)(0.0f);                                                                 \
    case 2: return x > (T)(6.0f) ? (T)(6.0f) : (x > (T)(0.0f) ? x : (T)(0.0f));                                   \
    case 3: { const T lo = x > (T)(P0) ? x : (T)(P0); return lo < (T)(P1) ? lo : (T)(P1); }                       \
    case 4: return x > (T)(0.0f) ? x : x * P0;                                                                    \
    case 5: return (T)(1.0f) / ((T)(1.0f) + exp(-x));                                                             \
    case 6: return tanh(x);                                                                                       \
    case 7: return x / ((T)(1.0f) + exp(-x)); /* exp overflow gives x / inf = 0, the right limit */               \
    case 8: { const T t = x * P0 + P1, u = t > (T)(0.0f) ? t : (T)(0.0f); return u < (T)(1.0f) ? u : (T)(1.0f); } \
    case 9: {                                                                                                     \
        const T t = x + (T)(3.0f), u = t > (T)(0.0f) ? t : (T)(0.0f);                                             \
        return x * (u < (T)(6.0f) ? u : (T)(6.0f)) * (T)(1.0f / 6.0f);                                            \
    }                                                                                                             \
    case 10: return x * P0 + P1;                                                                                  \
    default: return x;                                                                                            \
    }                                                                                                             \
}                                                                                                                 \
inline T act_df_##SUF(const T s, const T g, const int act, const float P0, const float P1) {                      \
    switch (act) {                                                                                                \
    case 1: return s > (T)(0.0f) ? g : (T)(0.0f);                                                                 \
    case 2: return ((s > (T)(0.0f)) & (s < (T)(6.0f))) ? g : (T)(0.0f);                                           \
    case 3: return ((s > (T)(P0)) & (s < (T)(P1))) ? g : (T)(0.0f);                                               \
    case 4: return s > (T)(0.0f) ? g : g * P0;                                                                    \
    case 5: return g * s * ((T)(1.0f) - s);                                                                       \
    case 6: return g * ((T)(1.0f) - s * s);                                                                       \
    case 7: {                                                                                                     \
        const T sg = (T)(1.0f) / ((T)(1.0f) + exp(-s));                                                           \
        return g * (sg + s * sg * ((T)(1.0f) - sg));                                                              \
    }                                                                                                             \
    case 8: {                                                                                                     \
        const T t = s * P0 + P1;                                                                                  \
        return ((t > (T)(0.0f)) & (t < (T)(1.0f))) ? g * P0 : (T)(0.0f);                                          \
    }                                                                                                             \
    case 9: return s > (T)(3.0f) ? g : (s > (T)(-3.0f) ? g * (s * (T)(2.0f / 6.0f) + (T)(0.5f)) : (T)(0.0f));     \
    case 10: return g * P0;                                                                                       \
    default: return g;                                                                                            \
    }                                                                                                             \
}

DEF_ACT(float8, v)
DEF_ACT(float, s)

// y = act(x); one float8 per work-item, the last work-item finishes the scalar tail.
__kernel void act_fwd(__global const float* x, __global float* y, const int n, const int act, const float P0,
                      const float P1) {
    const int i = get_global_id(0) * 8;
    if (i + 8 <= n) {
        VST8(y + i, act_f_v(VLD8(x + i), act, P0, P1));
    } else {
        for (int k = i; k < n; ++k) y[k] = act_f_s(x[k], act, P0, P1);
    }
}

// dx = act'(s) * gy
__kernel void act_bwd(__global const float* s, __global const float* g, __global float* dx, const int n,
                      const int act, const float P0, const float P1) {
    const int i = get_global_id(0) * 8;
    if (i + 8 <= n) {
        VST8(dx + i, act_df_v(VLD8(s + i), VLD8(g + i), act, P0, P1));
    } else {
        for (int k = i; k < n; ++k) dx[k] = act_df_s(s[k], g[k], act, P0, P1);
    }
}

// act_bwd's relu (MODE 1) / relu6 (MODE 2) read from the activation's output y, CPU style (cl_elementwise.act_masked,
// the gradient of a convolution or Dense carrying the activation): a chunk of MASK_CHUNK elements per work-item in
// float16 vectors; act_bwd's 8 per work-item in 64-item groups ran MobileNetV2's and RegNetX-400MF's training steps
// 4-8% slower on PoCL, 2 cores. Global size (ceil(n / MASK_CHUNK)).
#ifndef MASK_CHUNK
#define MASK_CHUNK 4096  // the host passes its own value (cl_elementwise.MASK_CHUNK)
#endif
VEC512
__kernel void act_mask_rows(__global const float* restrict y, __global const float* restrict gy,
                            __global float* restrict out, const int n, const int mode)
{
    const int i0 = get_global_id(0) * MASK_CHUNK;
    const int i1 = min(n, i0 + MASK_CHUNK);
    int i = i0;
    const float16 hi = mode == 2 ? (float16)(6.0f) : (float16)(INFINITY);
    for (; i + 16 <= i1; i += 16) {
        const float16 v = VLD16(y + i);
        const int16 pass = isgreater(v, (float16)(0.0f)) & isless(v, hi);
        VST16(out + i, select((float16)(0.0f), VLD16(gy + i), pass));
    }
    for (; i < i1; i++) {
        const float v = y[i];
        out[i] = (v > 0.0f && (mode != 2 || v < 6.0f)) ? gy[i] : 0.0f;
    }
}

// Fake quantization (ONNX QuantizeLinear then DequantizeLinear, per tensor): y = clamp(rint(x / scale), lo, hi) *
// scale with lo, hi = qmin - zero_point, qmax - zero_point. rint rounds ties to even, as QuantizeLinear does. The
// backward is act_bwd's clip (the gradient passes inside [lo, hi] * scale).
__kernel void fake_quant_fwd(__global const float* x, __global float* y, const int n, const float scale,
                             const float lo, const float hi) {
    const int i = get_global_id(0) * 8;
    if (i + 8 <= n) {
        VST8(y + i, clamp(rint(VLD8(x + i) / scale), lo, hi) * scale);
    } else {
        for (int k = i; k < n; ++k) y[k] = clamp(rint(x[k] / scale), lo, hi) * scale;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Binary ops; op (runtime, uniform per launch): 0 add, 1 mul, 2 sub (a - b), 3 div (a / b), 4 b - a, 5 b / a
// (4 and 5: sub / div with the operands swapped, so that the broadcast one is always b).
#define BIN(a, b) (op == 0 ? (a) + (b) : op == 1 ? (a) * (b) : op == 2 ? (a) - (b) : op == 3 ? (a) / (b)          \
                   : op == 4 ? (b) - (a) : (b) / (a))

// Same shapes (out may alias a: the accumulation of a third input).
__kernel void bin_same(__global const float* a, __global const float* b, __global float* out, const int n,
                       const int op) {
    const int i = get_global_id(0) * 8;
    if (i + 8 <= n) {
        const float8 va = VLD8(a + i);
        const float8 vb = VLD8(b + i);
        VST8(out + i, BIN(va, vb));
    } else {
        for (int k = i; k < n; ++k) out[k] = BIN(a[k], b[k]);
    }
}

// a (B, M, C) op v (B, 1, C) (vb = C) or v (C,) (vb = 0): a per-channel vector against every row, per batch item
// ((N,H,W,C) + (C,), squeeze-excite (N,H,W,C) * (N,1,1,C)). Grid (ceil(C / 8), M, B).
__kernel void bin_row(__global const float* a, __global const float* v, __global float* out, const int M,
                      const int C, const int vb, const int op) {
    const int c0 = get_global_id(0) * 8;
    const int m = get_global_id(1);
    const int b = get_global_id(2);
    if (m >= M || c0 >= C) return;
    const size_t o = ((size_t)b * M + m) * C + c0;
    const __global float* vr = v + (size_t)b * vb;
    if (c0 + 8 <= C) {
        const float8 va = VLD8(a + o);
        const float8 vv = VLD8(vr + c0);
        VST8(out + o, BIN(va, vv));
    } else {
        for (int c = c0; c < C; ++c) out[o + c - c0] = BIN(a[o + c - c0], vr[c]);
    }
}

// bin_row, CPU style: a work-item takes rows r0 .. r0 + rpi of batch item b, each row's C channels 16, then 8, then 1
// at a time (the one-float8-per-work-item kernel above ran 1.3-5x slower on PoCL: squeeze-excite's scale).
// Grid (ceil(M / rpi), B).
VEC512
__kernel void bin_row_rows(__global const float* a, __global const float* v, __global float* out, const int M,
                           const int C, const int vb, const int op, const int rpi) {
    const int r0 = get_global_id(0) * rpi, b = get_global_id(1);
    const int r1 = min(M, r0 + rpi);
    const __global float* vr = v + (size_t)b * vb;
    for (int r = r0; r < r1; ++r) {
        const size_t o = ((size_t)b * M + r) * C;
        int c = 0;
        for (; c + 16 <= C; c += 16) VST16(out + o + c, BIN(VLD16(a + o + c), VLD16(vr + c)));
        for (; c + 8 <= C; c += 8) VST8(out + o + c, BIN(VLD8(a + o + c), VLD8(vr + c)));
        for (; c < C; ++c) out[o + c] = BIN(a[o + c], vr[c]);
    }
}

// Flat index I over dims d0..d5 -> coordinates i1..i5 and r (= i0).
#define UNRAVEL6(I)                                                                                               \
    int r = (I);                                                                                                  \
    const int i5 = r % d5; r /= d5;                                                                               \
    const int i4 = r % d4; r /= d4;                                                                               \
    const int i3 = r % d3; r /= d3;                                                                               \
    const int i2 = r % d2; r /= d2;                                                                               \
    const int i1 = r % d1; r /= d1;

// General broadcast over up to 6 (collapsed) dims d0..d5 of the output; sa*/sb* are the inputs' element strides
// (0 along broadcast dims). One output element per work-item.
__kernel void bin_bcast(__global const float* a, __global const float* b, __global float* out, const int n,
                        const int d1, const int d2, const int d3, const int d4, const int d5,
                        const int sa0, const int sa1, const int sa2, const int sa3, const int sa4, const int sa5,
                        const int sb0, const int sb1, const int sb2, const int sb3, const int sb4, const int sb5,
                        const int op) {
    const int i = get_global_id(0);
    if (i >= n) return;
    UNRAVEL6(i)
    const int i0 = r;
    const int oa = i0 * sa0 + i1 * sa1 + i2 * sa2 + i3 * sa3 + i4 * sa4 + i5 * sa5;
    const int ob = i0 * sb0 + i1 * sb1 + i2 * sb2 + i3 * sb3 + i4 * sb4 + i5 * sb5;
    out[i] = BIN(a[oa], b[ob]);
}

// ---------------------------------------------------------------------------------------------------------------
// Reductions of a gradient back to a broadcast input's shape.

// Column sums of x viewed as (B, M, C) -> (B, C) (the gradient of a (C,) or (N, 1, 1, C) operand), pass 1: the
// work-item (channel block of 8, chunk k, batch b) sums `rows` rows of its chunk; contiguous float8 loads per row.
// Grid (ceil(C / 8), nchunks, B); part is (B, nchunks, C).
__kernel void colsum_partial(__global const float* x, const int M, const int C, const int rows, const int nchunks,
                             __global float* part) {
    const int c0 = get_global_id(0) * 8;
    const int k = get_global_id(1);
    const int b = get_global_id(2);
    const int r0 = k * rows;
    if (c0 >= C || k >= nchunks) return;
    const int r1 = min(r0 + rows, M);
    const __global float* xb = x + (size_t)b * M * C;
    __global float* out = part + ((size_t)b * nchunks + k) * C;
    if (c0 + 8 <= C) {
        float8 s = (float8)(0.0f);
        for (int r = r0; r < r1; ++r) s += VLD8(xb + (size_t)r * C + c0);
        VST8(out + c0, s);
    } else {
        for (int c = c0; c < C; ++c) {
            float s = 0.0f;
            for (int r = r0; r < r1; ++r) s += xb[(size_t)r * C + c];
            out[c] = s;
        }
    }
}

// Pass 2: out[b, c] = sum over chunks. Grid (C, B).
__kernel void colsum_final(__global const float* part, const int nchunks, const int C, const int B,
                           __global float* out) {
    const int c = get_global_id(0);
    const int b = get_global_id(1);
    if (c >= C || b >= B) return;
    const __global float* p = part + (size_t)b * nchunks * C + c;
    float s = 0.0f;
    for (int k = 0; k < nchunks; ++k) s += p[(size_t)k * C];
    out[(size_t)b * C + c] = s;
}

// Any other pattern: one output element per work-item, summing the reduced sub-space. The kept dims k0..k2 and the
// reduced dims r0..r2 come with their strides in the (collapsed) input.
__kernel void reduce_generic(__global const float* x, __global float* out, const int n,
                             const int kd1, const int kd2, const int ks0, const int ks1, const int ks2,
                             const int rd0, const int rd1, const int rd2, const int rs0, const int rs1,
                             const int rs2) {
    const int o = get_global_id(0);
    if (o >= n) return;
    int t = o;
    const int k2 = t % kd2; t /= kd2;
    const int k1 = t % kd1; t /= kd1;
    const int base = t * ks0 + k1 * ks1 + k2 * ks2;
    float s = 0.0f;
    for (int a = 0; a < rd0; ++a)
        for (int b = 0; b < rd1; ++b) {
            const __global float* p = x + base + a * rs0 + b * rs1;
            for (int c = 0; c < rd2; ++c) s += p[c * rs2];
        }
    out[o] = s;
}

// ---------------------------------------------------------------------------------------------------------------
// Data movement.

// Copy `rows` rows of L floats between row-strided layouts (concat and its gradient). Grid (ceil(L / 8), rows).
__kernel void copy_rows(__global const float* src, const int src_stride, const int src_off,
                        __global float* dst, const int dst_stride, const int dst_off, const int L, const int rows) {
    const int j = get_global_id(0) * 8;
    const int r = get_global_id(1);
    if (r >= rows || j >= L) return;
    const __global float* s = src + (size_t)r * src_stride + src_off + j;
    __global float* d = dst + (size_t)r * dst_stride + dst_off + j;
    if (j + 8 <= L) {
        VST8(d, VLD8(s));
    } else {
        for (int k = 0; k < L - j; ++k) d[k] = s[k];
    }
}

// dst[i] = src[offset of i], i decomposed over the output dims d0..d5 with source strides s0..s5 (transpose).
__kernel void gather6(__global const float* src, __global float* dst, const int n,
                      const int d1, const int d2, const int d3, const int d4, const int d5,
                      const int s0, const int s1, const int s2, const int s3, const int s4, const int s5) {
    const int i = get_global_id(0);
    if (i >= n) return;
    UNRAVEL6(i)
    dst[i] = src[r * s0 + i1 * s1 + i2 * s2 + i3 * s3 + i4 * s4 + i5 * s5];
}

// ---------------------------------------------------------------------------------------------------------------
// Softmax over the middle axis of (outer, K, inner); one row per work-item, max-subtracted.
__kernel void softmax_fwd(__global const float* x, __global float* y, const int rows, const int K,
                          const int inner) {
    const int i = get_global_id(0);
    if (i >= rows) return;
    const size_t base = (size_t)(i / inner) * K * inner + (i % inner);
    const __global float* xp = x + base;
    __global float* yp = y + base;
    float m = -INFINITY;
    for (int k = 0; k < K; ++k) m = fmax(m, xp[(size_t)k * inner]);
    float s = 0.0f;
    for (int k = 0; k < K; ++k) {
        const float e = exp(xp[(size_t)k * inner] - m);
        yp[(size_t)k * inner] = e;
        s += e;
    }
    const float inv = 1.0f / s;
    for (int k = 0; k < K; ++k) yp[(size_t)k * inner] *= inv;
}

// dx = y * (gy - sum(gy * y))
__kernel void softmax_bwd(__global const float* y, __global const float* g, __global float* dx, const int rows,
                          const int K, const int inner) {
    const int i = get_global_id(0);
    if (i >= rows) return;
    const size_t base = (size_t)(i / inner) * K * inner + (i % inner);
    float d = 0.0f;
    for (int k = 0; k < K; ++k) d += g[base + (size_t)k * inner] * y[base + (size_t)k * inner];
    for (int k = 0; k < K; ++k) {
        const size_t o = base + (size_t)k * inner;
        dx[o] = y[o] * (g[o] - d);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// LRN across the last axis (ONNX): S_c = sum of x^2 over channels [c - lo, c - lo + size), d_c = bias + a_n * S_c,
// y_c = x_c * d_c^-beta (a_n = alpha / size). A work-item takes 8 channels of one row: away from the row's ends
// with float8 windows (PoCL vectorises exp/log of float8; scalar transcendentals cost about 100 ns each here),
// near them per channel. Powers as exp(p * log(d)), d >= bias > 0. Grid (ceil(C / 8), M).
inline float lrn_den(__global const float* xr, const int c, const int C, const int size, const int lo,
                     const float a_n, const float bias) {
    const int j0 = max(c - lo, 0), j1 = min(c - lo + size, C);
    float s = 0.0f;
    for (int j = j0; j < j1; ++j) s += xr[j] * xr[j];
    return bias + a_n * s;
}

inline float8 lrn_den8(__global const float* xr, const int c0, const int size, const int lo, const float a_n,
                       const float bias) {
    float8 s = (float8)(0.0f);
    for (int t = 0; t < size; ++t) {
        const float8 v = VLD8(xr + c0 - lo + t);
        s += v * v;
    }
    return (float8)(bias) + a_n * s;
}

// Whether the 8 channels from c0 have full windows both ways (forward window [c - lo, c + hi], backward
// [c - hi, c + lo]) inside the row.
inline int lrn_interior(const int c0, const int C, const int size, const int lo) {
    const int reach = max(lo, size - 1 - lo);
    return c0 - reach >= 0 && c0 + 8 + reach <= C;
}

__kernel void lrn_fwd(__global const float* x, __global float* y, const int M, const int C, const int size,
                      const int lo, const float a_n, const float beta, const float bias) {
    const int c0 = get_global_id(0) * 8;
    const int m = get_global_id(1);
    if (c0 >= C || m >= M) return;
    const __global float* xr = x + (size_t)m * C;
    __global float* yr = y + (size_t)m * C;
    if (lrn_interior(c0, C, size, lo)) {
        const float8 d = lrn_den8(xr, c0, size, lo, a_n, bias);
        VST8(yr + c0, VLD8(xr + c0) * exp(-beta * log(d)));
    } else {
        for (int c = c0; c < min(c0 + 8, C); ++c)
            yr[c] = xr[c] * exp(-beta * log(lrn_den(xr, c, C, size, lo, a_n, bias)));
    }
}

// Backward pass 1: w_c = gy_c * x_c * d_c^(-beta-1).
__kernel void lrn_bwd_w(__global const float* x, __global const float* g, __global float* w, const int M,
                        const int C, const int size, const int lo, const float a_n, const float beta,
                        const float bias) {
    const int c0 = get_global_id(0) * 8;
    const int m = get_global_id(1);
    if (c0 >= C || m >= M) return;
    const size_t row = (size_t)m * C;
    const __global float* xr = x + row;
    if (lrn_interior(c0, C, size, lo)) {
        const float8 d = lrn_den8(xr, c0, size, lo, a_n, bias);
        VST8(w + row + c0, VLD8(g + row + c0) * VLD8(xr + c0) * exp((-beta - 1.0f) * log(d)));
    } else {
        for (int c = c0; c < min(c0 + 8, C); ++c)
            w[row + c] = g[row + c] * xr[c] * exp((-beta - 1.0f) * log(lrn_den(xr, c, C, size, lo, a_n, bias)));
    }
}

// Pass 2: dx_j = gy_j * d_j^-beta - 2 * a_n * beta * x_j * sum of w_c over the channels c whose window holds j,
// c in [j - hi, j + lo] with hi = size - 1 - lo.
__kernel void lrn_bwd(__global const float* x, __global const float* g, __global const float* w,
                      __global float* dx, const int M, const int C, const int size, const int lo, const float a_n,
                      const float beta, const float bias) {
    const int c0 = get_global_id(0) * 8;
    const int m = get_global_id(1);
    if (c0 >= C || m >= M) return;
    const size_t row = (size_t)m * C;
    const __global float* xr = x + row;
    const __global float* wr = w + row;
    const int hi = size - 1 - lo;
    if (lrn_interior(c0, C, size, lo)) {
        float8 t = (float8)(0.0f);
        for (int k = 0; k < size; ++k) t += VLD8(wr + c0 - hi + k);
        const float8 d = lrn_den8(xr, c0, size, lo, a_n, bias);
        VST8(dx + row + c0, VLD8(g + row + c0) * exp(-beta * log(d)) - (2.0f * a_n * beta) * VLD8(xr + c0) * t);
    } else {
        for (int j = c0; j < min(c0 + 8, C); ++j) {
            const int k0 = max(j - hi, 0), k1 = min(j + lo, C - 1);
            float t = 0.0f;
            for (int k = k0; k <= k1; ++k) t += wr[k];
            const float d = lrn_den(xr, j, C, size, lo, a_n, bias);
            dx[row + j] = g[row + j] * exp(-beta * log(d)) - 2.0f * a_n * beta * xr[j] * t;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Dropout: keep element i when (hash(i ^ key) >> 8) >= thr, scale kept ones by 1 / (1 - rate). The hash is
// Wellons' lowbias32, mirrored bit for bit by the numpy reference, so both backends draw the same mask. The
// backward runs the same kernel on the gradient (the mask is recomputed, never stored).
inline uint8 lowbias32_8(uint8 h) {
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    return h;
}

inline uint lowbias32(uint h) {
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    return h;
}

__kernel void dropout(__global const float* x, __global float* y, const int n, const uint key, const uint thr,
                      const float scale) {
    const int i = get_global_id(0) * 8;
    if (i + 8 <= n) {
        const uint8 idx = (uint8)((uint)i) + (uint8)(0u, 1u, 2u, 3u, 4u, 5u, 6u, 7u);
        const uint8 h = lowbias32_8(idx ^ (uint8)(key));
        const float8 v = VLD8(x + i);
        VST8(y + i, select((float8)(0.0f), v * scale, as_int8((h >> 8) >= (uint8)(thr))));
    } else {
        for (int k = i; k < n; ++k) {
            const uint h = lowbias32((uint)k ^ key);
            y[k] = (h >> 8) >= thr ? x[k] * scale : 0.0f;
        }
    }
}

// Half-precision storage (precision: fp16): activations kept for the backward pass wait as IEEE half, converted with
// vstore_half/vload_half (core OpenCL 1.2: no cl_khr_fp16 needed, round to nearest even); arithmetic stays float.
__kernel void f32_to_f16(__global const float* x, __global half* h, const int n) {
    const int i = get_global_id(0) * 8;
    if (i + 8 <= n) {
        vstore_half8(VLD8(x + i), 0, h + i);
    } else {
        for (int k = i; k < n; ++k) vstore_half(x[k], k, h);
    }
}

__kernel void f16_to_f32(__global const half* h, __global float* x, const int n) {
    const int i = get_global_id(0) * 8;
    if (i + 8 <= n) {
        VST8(x + i, vload_half8(0, h + i));
    } else {
        for (int k = i; k < n; ++k) x[k] = vload_half(k, h);
    }
}
