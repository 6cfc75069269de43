// Tensor ops of issue 14 (float32, row-major, channels last): unary erf / gelu / sqrt / pow / reciprocal / neg,
// strided gathers and scatters (slice, its gradient, the broadcast gradient of reduce_mean / reduce_sum) and
// layer normalisation over the trailing D elements of each row. Semantics: transfercl_cli/ops/ref_tensor.py;
// host code: transfercl_cli/ops/cl_tensor.py. (sub / div run on the broadcasting kernels of elementwise.cl.)
//
// Vectors move through VLD8/VST8 (the block below): whole-buffer kernels start each work-item at a multiple of 8
// elements, row kernels at any float offset.

#include "vector_access.h"  // VLD4/8/16, VST4/8/16: see that file

// ---------------------------------------------------------------------------------------------------------------
// Unary ops, chosen by the runtime argument `op` (uniform per launch). UN_F is the forward, UN_DF the input
// gradient from the saved tensor s (x; y for sqrt and reciprocal; unused for neg). P is the float exponent of pow,
// IP the integer one of pown (pow with an integral exponent: exact for negative bases, as numpy).
// op: 0 erf, 1 gelu (erf), 2 gelu (tanh), 3 sqrt, 4 pow(x, P), 5 pown(x, IP), 6 reciprocal, 7 neg.
// PoCL emits pow / pown of a float8 as per-lane calls (about 40x slower than a multiply here): integral exponents
// up to POW_MUL in magnitude multiply by squaring instead (a few ulp, as pown), and non-integral ones go through
// exp(P log x), which PoCL vectorises (NaN for x < 0 as pow; 0 and inf at x = 0 as pow).
#define POW_MUL 16

#define DEF_POW(T, IT, SUF)                                                                                       \
inline T powi_##SUF(const T x, const int n) {                                                                      \
    if (n > POW_MUL || n < -POW_MUL) return pown(x, (IT)(n));                                                     \
    T r = (T)(1.0f), b = x;                                                                                       \
    for (int k = n < 0 ? -n : n; k; k >>= 1) {                                                                    \
        if (k & 1) r *= b;                                                                                        \
        b *= b;                                                                                                   \
    }                                                                                                             \
    return n < 0 ? (T)(1.0f) / r : r;                                                                             \
}                                                                                                                 \
inline T powf_##SUF(const T x, const float p) {                                                                   \
    return p == 0.5f ? sqrt(x) : exp(p * log(x));                                                                 \
}

DEF_POW(float8, int8, v)
DEF_POW(float, int, s)

#define GELU_C 0.7978845608028654f  /* sqrt(2 / pi) */
#define GELU_K 0.044715f
#define ERF_D 1.1283791670955126f   /* 2 / sqrt(pi) */
#define INV_SQRT2 0.7071067811865476f
#define INV_SQRT2PI 0.3989422804014327f

#define DEF_UNARY(T, IT, SUF)                                                                                     \
inline T un_f_##SUF(const T x, const int op, const float P, const int IP) {                                       \
    switch (op) {                                                                                                 \
    case 0: return erf(x);                                                                                        \
    case 1: return (T)(0.5f) * x * ((T)(1.0f) + erf(x * INV_SQRT2));                                              \
    case 2: return (T)(0.5f) * x * ((T)(1.0f) + tanh(GELU_C * (x + GELU_K * x * x * x)));                         \
    case 3: return sqrt(x);                                                                                       \
    case 4: return powf_##SUF(x, P);                                                                              \
    case 5: return powi_##SUF(x, IP);                                                                             \
    case 6: return (T)(1.0f) / x;                                                                                 \
    default: return -x;                                                                                           \
    }                                                                                                             \
}                                                                                                                 \
inline T un_df_##SUF(const T s, const T g, const int op, const float P, const int IP) {                           \
    switch (op) {                                                                                                 \
    case 0: return g * ERF_D * exp(-s * s);                                                                       \
    case 1: return g * ((T)(0.5f) * ((T)(1.0f) + erf(s * INV_SQRT2)) + s * INV_SQRT2PI * exp((T)(-0.5f) * s * s)); \
    case 2: {                                                                                                     \
        const T t = tanh(GELU_C * (s + GELU_K * s * s * s));                                                      \
        return g * ((T)(0.5f) * ((T)(1.0f) + t)                                                                   \
                    + (T)(0.5f) * s * ((T)(1.0f) - t * t) * GELU_C * ((T)(1.0f) + (3.0f * GELU_K) * s * s));      \
    }                                                                                                             \
    case 3: return g * (T)(0.5f) / s;                                                                             \
    case 4: return g * P * powf_##SUF(s, P - 1.0f);                                                               \
    case 5: return IP == 0 ? (T)(0.0f) : g * (float)IP * powi_##SUF(s, IP - 1);                                   \
    case 6: return -g * s * s;                                                                                    \
    default: return -g;                                                                                           \
    }                                                                                                             \
}

DEF_UNARY(float8, int8, v)
DEF_UNARY(float, int, s)

// y = f(x); one float8 per work-item, the last work-item finishes the scalar tail.
__kernel void unary_fwd(__global const float* x, __global float* y, const int n, const int op, const float P,
                        const int IP) {
    const int i = get_global_id(0) * 8;
    if (i + 8 <= n) {
        VST8(y + i, un_f_v(VLD8(x + i), op, P, IP));
    } else {
        for (int k = i; k < n; ++k) y[k] = un_f_s(x[k], op, P, IP);
    }
}

// dx = f'(s) * gy (s is never read for neg: the host passes g)
__kernel void unary_bwd(__global const float* s, __global const float* g, __global float* dx, const int n,
                        const int op, const float P, const int IP) {
    const int i = get_global_id(0) * 8;
    if (i + 8 <= n) {
        VST8(dx + i, un_df_v(VLD8(s + i), VLD8(g + i), op, P, IP));
    } else {
        for (int k = i; k < n; ++k) dx[k] = un_df_s(s[k], g[k], op, P, IP);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Strided copies. The contiguous side (the slice's output, the broadcast gradient) is viewed as rows of `inner`
// elements over up to 5 outer dims d1..d5 (d5 fastest); the strided side's element offset of (i1..i5, j) is
// base + i1 s1 + ... + i5 s5 + j s0 (strides may be negative or 0). A work-item copies SC_CHUNK elements of one
// row: the row index is unravelled once per chunk, not per element. scatter = 0: dst[row, j] = scale * src[off];
// scatter = 1: dst[off] = scale * src[row, j] (positions must be distinct: a slice). Grid (ceil(inner / SC_CHUNK),
// rows).
#define SC_CHUNK 16

__kernel void strided_copy(__global const float* src, __global float* dst, const int scatter, const int base,
                           const int inner, const int s0, const int rows,
                           const int d1, const int d2, const int d3, const int d4, const int d5,
                           const int s1, const int s2, const int s3, const int s4, const int s5, const float scale) {
    const int j0 = get_global_id(0) * SC_CHUNK;
    const int r = get_global_id(1);
    if (r >= rows || j0 >= inner) return;
    int t = r;
    const int i5 = t % d5; t /= d5;
    const int i4 = t % d4; t /= d4;
    const int i3 = t % d3; t /= d3;
    const int i2 = t % d2; t /= d2;
    const int i1 = t % d1;
    const int off = base + i1 * s1 + i2 * s2 + i3 * s3 + i4 * s4 + i5 * s5 + j0 * s0;
    const int lin = r * inner + j0;
    const int m = min(SC_CHUNK, inner - j0);
    if (!scatter) {
        __global float* d = dst + lin;
        if (m == SC_CHUNK && s0 == 1) {
            const __global float* p = src + off;
            VST8(d, scale * VLD8(p));
            VST8(d + 8, scale * VLD8(p + 8));
        } else if (m == SC_CHUNK && s0 == 0) {
            const float8 v = (float8)(scale * src[off]);
            VST8(d, v);
            VST8(d + 8, v);
        } else {
            for (int k = 0; k < m; ++k) d[k] = scale * src[off + k * s0];
        }
    } else {
        const __global float* p = src + lin;
        if (m == SC_CHUNK && s0 == 1) {
            __global float* d = dst + off;
            VST8(d, scale * VLD8(p));
            VST8(d + 8, scale * VLD8(p + 8));
        } else {
            for (int k = 0; k < m; ++k) dst[off + k * s0] = scale * p[k];
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Layer normalisation of x viewed as (rows, D): each row over its D elements, biased variance (two passes: the
// mean, then the squared deviations). gamma / beta hold D elements (flags: has_gamma, has_beta; the host passes
// another buffer for an absent one). One work-item per row; float8 partial sums along the row.

inline float row_sum(__global const float* p, const int D) {
    float8 s = (float8)(0.0f);
    int d = 0;
    for (; d + 8 <= D; d += 8) s += VLD8(p + d);
    float t = 0.0f;
    for (; d < D; ++d) t += p[d];
    return (s.s0 + s.s1 + s.s2 + s.s3) + (s.s4 + s.s5 + s.s6 + s.s7) + t;
}

// out[r] = scale * sum of row r of x viewed as (rows, D): reduce_sum / reduce_mean over trailing axes (the other
// patterns run on elementwise.cl's column sums). Grid (rows).
__kernel void row_reduce(__global const float* x, __global float* out, const int rows, const int D,
                         const float scale) {
    const int r = get_global_id(0);
    if (r >= rows) return;
    out[r] = scale * row_sum(x + (size_t)r * D, D);
}

__kernel void ln_fwd(__global const float* x, __global const float* gamma, __global const float* beta,
                     const int has_gamma, const int has_beta, __global float* y, __global float* mean,
                     __global float* istd, const int rows, const int D, const float eps) {
    const int r = get_global_id(0);
    if (r >= rows) return;
    const __global float* xr = x + (size_t)r * D;
    __global float* yr = y + (size_t)r * D;
    const float mu = row_sum(xr, D) / (float)D;
    float8 s = (float8)(0.0f);
    int d = 0;
    for (; d + 8 <= D; d += 8) {
        const float8 v = VLD8(xr + d) - mu;
        s += v * v;
    }
    float t = 0.0f;
    for (; d < D; ++d) {
        const float v = xr[d] - mu;
        t += v * v;
    }
    const float var = ((s.s0 + s.s1 + s.s2 + s.s3) + (s.s4 + s.s5 + s.s6 + s.s7) + t) / (float)D;
    const float is = 1.0f / sqrt(var + eps);
    mean[r] = mu;
    istd[r] = is;
    for (d = 0; d + 8 <= D; d += 8) {
        float8 v = (VLD8(xr + d) - mu) * is;
        if (has_gamma) v *= VLD8(gamma + d);
        if (has_beta) v += VLD8(beta + d);
        VST8(yr + d, v);
    }
    for (; d < D; ++d) {
        float v = (xr[d] - mu) * is;
        if (has_gamma) v *= gamma[d];
        if (has_beta) v += beta[d];
        yr[d] = v;
    }
}

// dx = istd * (gh - mean(gh) - xhat * mean(gh * xhat)), gh = g * gamma, xhat = (x - mean) * istd.
__kernel void ln_bwd(__global const float* x, __global const float* g, __global const float* gamma,
                     const int has_gamma, __global const float* mean, __global const float* istd,
                     __global float* dx, const int rows, const int D) {
    const int r = get_global_id(0);
    if (r >= rows) return;
    const size_t o = (size_t)r * D;
    const __global float* xr = x + o;
    const __global float* gr = g + o;
    __global float* dr = dx + o;
    const float mu = mean[r], is = istd[r];
    float8 s1 = (float8)(0.0f), s2 = (float8)(0.0f);
    int d = 0;
    for (; d + 8 <= D; d += 8) {
        float8 gh = VLD8(gr + d);
        if (has_gamma) gh *= VLD8(gamma + d);
        const float8 xh = (VLD8(xr + d) - mu) * is;
        s1 += gh;
        s2 += gh * xh;
    }
    float t1 = 0.0f, t2 = 0.0f;
    for (; d < D; ++d) {
        const float gh = has_gamma ? gr[d] * gamma[d] : gr[d];
        t1 += gh;
        t2 += gh * (xr[d] - mu) * is;
    }
    const float m1 = ((s1.s0 + s1.s1 + s1.s2 + s1.s3) + (s1.s4 + s1.s5 + s1.s6 + s1.s7) + t1) / (float)D;
    const float m2 = ((s2.s0 + s2.s1 + s2.s2 + s2.s3) + (s2.s4 + s2.s5 + s2.s6 + s2.s7) + t2) / (float)D;
    for (d = 0; d + 8 <= D; d += 8) {
        float8 gh = VLD8(gr + d);
        if (has_gamma) gh *= VLD8(gamma + d);
        const float8 xh = (VLD8(xr + d) - mu) * is;
        VST8(dr + d, is * (gh - m1 - xh * m2));
    }
    for (; d < D; ++d) {
        const float gh = has_gamma ? gr[d] * gamma[d] : gr[d];
        dr[d] = is * (gh - m1 - (xr[d] - mu) * is * m2);
    }
}

// Parameter gradients, pass 1: over the rows of chunk k, pg[k, c] = sum g and pgx[k, c] = sum g * xhat for the 8
// columns from c0. Grid (ceil(D / 8), nchunks). Pass 2 is elementwise.cl colsum_final over the chunks.
__kernel void ln_param_partial(__global const float* x, __global const float* g, __global const float* mean,
                               __global const float* istd, const int rows, const int D, const int chunk,
                               const int nchunks, __global float* pg, __global float* pgx) {
    const int c0 = get_global_id(0) * 8;
    const int k = get_global_id(1);
    if (c0 >= D || k >= nchunks) return;
    const int r0 = k * chunk, r1 = min(r0 + chunk, rows);
    __global float* og = pg + (size_t)k * D;
    __global float* ogx = pgx + (size_t)k * D;
    if (c0 + 8 <= D) {
        float8 a = (float8)(0.0f), b = (float8)(0.0f);
        for (int r = r0; r < r1; ++r) {
            const size_t o = (size_t)r * D + c0;
            const float8 gv = VLD8(g + o);
            a += gv;
            b += gv * ((VLD8(x + o) - mean[r]) * istd[r]);
        }
        VST8(og + c0, a);
        VST8(ogx + c0, b);
    } else {
        for (int c = c0; c < D; ++c) {
            float a = 0.0f, b = 0.0f;
            for (int r = r0; r < r1; ++r) {
                const size_t o = (size_t)r * D + c;
                a += g[o];
                b += g[o] * ((x[o] - mean[r]) * istd[r]);
            }
            og[c] = a;
            ogx[c] = b;
        }
    }
}
