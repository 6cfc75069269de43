// Per-channel kernels over an (M, C) view of a channels-last tensor: BatchNorm statistics, the per-channel affine
// apply (BatchNorm, per-channel `scale`), and the per-channel gradient sums.
//
// Reductions run in two passes without atomics: pass 1 gives each (channel, chunk of rows) work-item a partial
// result, pass 2 merges the chunks per channel. Statistics use a shift (the chunk's first value) and Chan's merge of
// (count, mean, M2), so a large mean does not cancel the variance in float32.

#include "vector_access.h"  // VLD4/8/16, VST4/8/16: see that file

// Pass 1 of the batch statistics: the work-item (channel block, chunk k) reads its rows with contiguous float8
// loads; part_mean/part_m2 are (nchunks, C).
#define STATS_CHUNK(T, LOAD, STORE)                                                                               \
    {                                                                                                             \
        const T shift = LOAD(x + (size_t)r0 * C + c);                                                             \
        T s1 = (T)(0.0f), s2 = (T)(0.0f);                                                                         \
        for (int r = r0; r < r1; ++r) {                                                                           \
            const T d = LOAD(x + (size_t)r * C + c) - shift;                                                      \
            s1 += d;                                                                                              \
            s2 += d * d;                                                                                          \
        }                                                                                                         \
        STORE(part_mean + (size_t)k * C + c, shift + s1 / n);                                                     \
        const T m2 = s2 - s1 * s1 / n;                                                                            \
        STORE(part_m2 + (size_t)k * C + c, m2 > (T)(0.0f) ? m2 : (T)(0.0f));                                      \
    }
// The fused activation of a BatchNorm (act: 0 none, 1 relu, 2 relu6) and its gradient mask, from the BN output
// v = x * a + b recomputed from the saved input (the BN output itself is never stored).
#define DEF_BN_ACT(T, SUF)                                                                                        \
inline T bn_act_##SUF(const T v, const int act) {                                                                \
    if (act == 1) return v > (T)(0.0f) ? v : (T)(0.0f);                                                           \
    if (act == 2) return v > (T)(6.0f) ? (T)(6.0f) : (v > (T)(0.0f) ? v : (T)(0.0f));                             \
    return v;                                                                                                     \
}                                                                                                                 \
inline T bn_mask_##SUF(const T g, const T v, const int act) {                                                    \
    if (act == 1) return v > (T)(0.0f) ? g : (T)(0.0f);                                                           \
    if (act == 2) return ((v > (T)(0.0f)) & (v < (T)(6.0f))) ? g : (T)(0.0f);                                     \
    return g;                                                                                                     \
}
DEF_BN_ACT(float8, v)
DEF_BN_ACT(float, s)
#define LD8(p) VLD8(p)
#define ST8(p, v) VST8(p, v)
#define LD1(p) (*(p))
#define ST1(p, v) (*(p) = (v))

// Wide body: a work-item covers CW channels (NW = CW / 8 float8) of each row. CPUs: CW = 32, so a row's channels
// are read in 128-byte runs (the 8-channel form below is for the channel tail and small C). GPUs: the host builds
// with -DCW=8 (one float8 per work-item): chan_gsum_partial's wide body then keeps 40 floats live per work-item
// instead of 160, which mobile GPUs (Mali) would spill to memory, and there are 4x more work-items.
#ifndef CW
#define CW 32
#endif
#define NW (CW / 8)
#define STATS_WIDE()                                                                                              \
    {                                                                                                             \
        float8 shift[NW], s1[NW], s2[NW];                                                                         \
        _Pragma("unroll") for (int j = 0; j < NW; ++j) {                                                          \
            shift[j] = LD8(x + (size_t)r0 * C + c0 + 8 * j);                                                      \
            s1[j] = s2[j] = (float8)(0.0f);                                                                       \
        }                                                                                                         \
        for (int r = r0; r < r1; ++r) {                                                                           \
            const __global float* xr = x + (size_t)r * C + c0;                                                    \
            _Pragma("unroll") for (int j = 0; j < NW; ++j) {                                                      \
                const float8 d = LD8(xr + 8 * j) - shift[j];                                                      \
                s1[j] += d;                                                                                       \
                s2[j] += d * d;                                                                                   \
            }                                                                                                     \
        }                                                                                                         \
        _Pragma("unroll") for (int j = 0; j < NW; ++j) {                                                          \
            ST8(part_mean + (size_t)k * C + c0 + 8 * j, shift[j] + s1[j] / n);                                    \
            const float8 m2 = s2[j] - s1[j] * s1[j] / n;                                                          \
            ST8(part_m2 + (size_t)k * C + c0 + 8 * j, m2 > (float8)(0.0f) ? m2 : (float8)(0.0f));                 \
        }                                                                                                         \
    }

// Grid (ceil(C / CW), nchunks).
__kernel void bn_stats_partial(__global const float* x, const int M, const int C, const int rows,
                               const int nchunks, __global float* part_mean, __global float* part_m2) {
    const int c0 = get_global_id(0) * CW;
    const int k = get_global_id(1);
    if (c0 >= C || k >= nchunks) return;  // padding of the work-group
    const int r0 = k * rows;
    const int r1 = min(r0 + rows, M);
    const float n = (float)(r1 - r0);
    if (c0 + CW <= C) {
        STATS_WIDE()
    } else {
        int c = c0;
        for (; c + 8 <= C; c += 8) STATS_CHUNK(float8, LD8, ST8)
        for (; c < C; ++c) STATS_CHUNK(float, LD1, ST1)
    }
}

// Pass 2: merge the chunks; write the batch mean and 1/sqrt(var + eps) (kept for the backward), the affine
// coefficients a = gamma * istd, b = beta - mean * a, and update the running statistics in place (Keras:
// new = momentum * old + (1 - momentum) * batch, with the unbiased batch variance).
__kernel void bn_stats_final(__global const float* part_mean, __global const float* part_m2, const int nchunks,
                             const int rows, const int M, const int C, const float eps, const float momentum,
                             __global const float* gamma, __global const float* beta, const int has_gamma,
                             const int has_beta, __global float* run_mean, __global float* run_var,
                             __global float* mean_out, __global float* istd_out, __global float* a_out,
                             __global float* b_out) {
    const int c = get_global_id(0);
    if (c >= C) return;
    float n = 0.0f, mean = 0.0f, m2 = 0.0f;
    for (int k = 0; k < nchunks; ++k) {
        const float nb = (float)(min(rows, M - k * rows));
        if (nb <= 0.0f) break;
        const float mb = part_mean[(size_t)k * C + c];
        const float delta = mb - mean;
        const float nn = n + nb;
        mean += delta * (nb / nn);
        m2 += part_m2[(size_t)k * C + c] + delta * delta * (n * nb / nn);
        n = nn;
    }
    const float var = m2 / (float)M;
    const float istd = 1.0f / sqrt(var + eps);
    const float a = (has_gamma ? gamma[c] : 1.0f) * istd;
    mean_out[c] = mean;
    istd_out[c] = istd;
    a_out[c] = a;
    b_out[c] = (has_beta ? beta[c] : 0.0f) - mean * a;
    const float unbiased = m2 / (float)max(M - 1, 1);
    run_mean[c] = momentum * run_mean[c] + (1.0f - momentum) * mean;
    run_var[c] = momentum * run_var[c] + (1.0f - momentum) * unbiased;
}

// Inference coefficients from the moving statistics.
__kernel void bn_infer_coeffs(__global const float* gamma, __global const float* beta, __global const float* mean,
                              __global const float* var, const int has_gamma, const int has_beta, const int C,
                              const float eps, __global float* istd_out, __global float* a_out,
                              __global float* b_out) {
    const int c = get_global_id(0);
    if (c >= C) return;
    const float istd = 1.0f / sqrt(var[c] + eps);
    const float a = (has_gamma ? gamma[c] : 1.0f) * istd;
    istd_out[c] = istd;
    a_out[c] = a;
    b_out[c] = (has_beta ? beta[c] : 0.0f) - mean[c] * a;
}

// The per-element maps below run with a work-item per CW channels x RB rows: fewer, longer work-items (PoCL runs a
// work-group's items in a loop; one float8 each was dominated by that overhead). Grid (ceil(C / CW), ceil(M / RB)).
#define RB 4
#define FOR_ROWS_AND_CHANNELS(BODY8, BODY1)                                                                       \
    const int c0 = get_global_id(0) * CW;                                                                         \
    const int m0 = get_global_id(1) * RB;                                                                         \
    if (m0 >= M || c0 >= C) return;                                                                               \
    const int m1 = min(m0 + RB, M);                                                                               \
    if (c0 + CW <= C) {                                                                                           \
        for (int m = m0; m < m1; ++m) {                                                                           \
            _Pragma("unroll") for (int j = 0; j < NW; ++j) {                                                      \
                const int c = c0 + 8 * j;                                                                         \
                const size_t o = (size_t)m * C + c;                                                               \
                BODY8                                                                                             \
            }                                                                                                     \
        }                                                                                                         \
    } else {                                                                                                      \
        for (int m = m0; m < m1; ++m) {                                                                           \
            int c = c0;                                                                                           \
            for (; c + 8 <= C; c += 8) {                                                                          \
                const size_t o = (size_t)m * C + c;                                                               \
                BODY8                                                                                             \
            }                                                                                                     \
            for (; c < C; ++c) {                                                                                  \
                const size_t o = (size_t)m * C + c;                                                               \
                BODY1                                                                                             \
            }                                                                                                     \
        }                                                                                                         \
    }

// y = act(x * a[c] + b[c]) over (M, C). has_b = 0 skips b (a per-channel multiply).
__kernel void chan_affine(__global const float* x, __global float* y, __global const float* a,
                          __global const float* b, const int has_b, const int M, const int C, const int act) {
    FOR_ROWS_AND_CHANNELS(
        {
            const float8 v = LD8(x + o) * LD8(a + c) + (has_b ? LD8(b + c) : (float8)(0.0f));
            ST8(y + o, bn_act_v(v, act));
        },
        { y[o] = bn_act_s(x[o] * a[c] + (has_b ? b[c] : 0.0f), act); })
}

// One input of a Concat that feeds a frozen BatchNorm (plan.fold_frozen fuses them: DenseNet normalises every
// Concat of its dense layers): y[m, off + c] = act(x[m, c] * a[off + c] + b[off + c]) over x's (M, Cx), y having
// Cy channels per row. The Concat's output is never stored. Grid (ceil(Cx / CW), ceil(M / RB)).
__kernel void chan_affine_slice(__global const float* x, __global float* y, __global const float* a,
                                __global const float* b, const int M, const int Cx, const int Cy, const int off,
                                const int act) {
    const int c0 = get_global_id(0) * CW;
    const int m0 = get_global_id(1) * RB;
    if (m0 >= M || c0 >= Cx) return;
    const int m1 = min(m0 + RB, M);
    a += off;
    b += off;
    for (int m = m0; m < m1; ++m) {
        const __global float* xr = x + (size_t)m * Cx;
        __global float* yr = y + (size_t)m * Cy + off;
        int c = c0;
        if (c0 + CW <= Cx) {
            _Pragma("unroll") for (int j = 0; j < NW; ++j, c += 8)
                ST8(yr + c, bn_act_v(LD8(xr + c) * LD8(a + c) + LD8(b + c), act));
        } else {
            for (; c + 8 <= Cx; c += 8) ST8(yr + c, bn_act_v(LD8(xr + c) * LD8(a + c) + LD8(b + c), act));
            for (; c < Cx; ++c) yr[c] = bn_act_s(xr[c] * a[c] + b[c], act);
        }
    }
}

// BatchNorm + activation + global average pool in one pass (a BatchNorm that trains, followed by the head's pool):
// y[n, c] = mean over the HW rows of image n of act(x * a[c] + b[c]); the (M, C) BN output never exists.
// Grid (ceil(C / CW), N).
__kernel void chan_affine_gap(__global const float* x, __global float* y, __global const float* a,
                              __global const float* b, const int HW, const int N, const int C, const int act) {
    const int c0 = get_global_id(0) * CW;
    const int n = get_global_id(1);
    if (c0 >= C || n >= N) return;
    const __global float* xn = x + (size_t)n * HW * C;
    const float inv = 1.0f / (float)HW;
    if (c0 + CW <= C) {
        float8 va[NW], vb[NW], acc[NW];
        _Pragma("unroll") for (int j = 0; j < NW; ++j) {
            va[j] = LD8(a + c0 + 8 * j);
            vb[j] = LD8(b + c0 + 8 * j);
            acc[j] = (float8)(0.0f);
        }
        for (int p = 0; p < HW; ++p)
            _Pragma("unroll") for (int j = 0; j < NW; ++j)
                acc[j] += bn_act_v(LD8(xn + (size_t)p * C + c0 + 8 * j) * va[j] + vb[j], act);
        _Pragma("unroll") for (int j = 0; j < NW; ++j) ST8(y + (size_t)n * C + c0 + 8 * j, acc[j] * inv);
    } else {
        for (int c = c0; c < C; ++c) {
            float acc = 0.0f;
            for (int p = 0; p < HW; ++p) acc += bn_act_s(xn[(size_t)p * C + c] * a[c] + b[c], act);
            y[(size_t)n * C + c] = acc * inv;
        }
    }
}

// The gradient g is (M, C) like x, or with a fused global average pool (N, C) for the N images of HW rows each:
// row r then reads g[r / ghw] scaled by gscale = 1 / HW (ghw = 1, gscale = 1 otherwise).
#define G_ROW(r) ((size_t)((r) / ghw) * C)

// Gradient sums, pass 1: per (channel block, chunk) sum of g and of g * (x - mean[c]) * istd[c] (centered = 0: of
// g * x, the gradient of a per-channel scale). With act, g is first masked by the activation's derivative at
// x * fa[c] + fb[c]. has_dx: the same pass also stores dx = k1[c] * (masked g), the input gradient of an affine map
// whose coefficients do not depend on the sums (a BatchNorm in inference mode), so g and x are read once, not twice.
// unit: fa = 1, fb = 0, k1 = 1 (not read): the mask of an activation read from its own output x, and dx the masked
// g, with sum_g its column sums (a convolution's folded-bias gradient, cl_elementwise.BNFold).
#define GSUM_CHUNK(T, SUF, LOAD, STORE)                                                                           \
    {                                                                                                             \
        const T mu = centered ? LOAD(mean + c) : (T)(0.0f);                                                       \
        const T va = !act ? (T)(0.0f) : unit ? (T)(1.0f) : LOAD(fa + c);                                        \
        const T vb = act && !unit ? LOAD(fb + c) : (T)(0.0f);                                                     \
        T sg = (T)(0.0f), sgx = (T)(0.0f);                                                                        \
        for (int r = r0; r < r1; ++r) {                                                                           \
            const size_t o = (size_t)r * C + c;                                                                   \
            const T xv = LOAD(x + o);                                                                             \
            const T v = xv * va + vb;                                                                             \
            const T gv = bn_mask_##SUF(LOAD(g + G_ROW(r) + c) * gscale, v, act);                                 \
            sg += gv;                                                                                             \
            sgx += gv * (xv - mu);                                                                                \
            if (has_dx) STORE(dx + o, unit ? gv : gv * LOAD(k1 + c));                                             \
        }                                                                                                         \
        STORE(part_g + (size_t)k * C + c, sg);                                                                    \
        STORE(part_gx + (size_t)k * C + c, centered ? sgx * LOAD(istd + c) : sgx);                                \
    }

#define GSUM_WIDE()                                                                                               \
    {                                                                                                             \
        float8 mu[NW], va[NW], vb[NW], vk[NW], sg[NW], sgx[NW];                                                   \
        _Pragma("unroll") for (int j = 0; j < NW; ++j) {                                                          \
            mu[j] = centered ? LD8(mean + c0 + 8 * j) : (float8)(0.0f);                                           \
            vk[j] = unit ? (float8)(1.0f) : has_dx ? LD8(k1 + c0 + 8 * j) : (float8)(0.0f);                       \
            va[j] = !act ? (float8)(0.0f) : unit ? (float8)(1.0f) : LD8(fa + c0 + 8 * j);                         \
            vb[j] = act && !unit ? LD8(fb + c0 + 8 * j) : (float8)(0.0f);                                         \
            sg[j] = sgx[j] = (float8)(0.0f);                                                                      \
        }                                                                                                         \
        for (int r = r0; r < r1; ++r) {                                                                           \
            const size_t o = (size_t)r * C + c0, og = G_ROW(r) + c0;                                              \
            _Pragma("unroll") for (int j = 0; j < NW; ++j) {                                                      \
                const float8 xv = LD8(x + o + 8 * j);                                                             \
                const float8 gv = bn_mask_v(LD8(g + og + 8 * j) * gscale, xv * va[j] + vb[j], act);              \
                sg[j] += gv;                                                                                      \
                sgx[j] += gv * (xv - mu[j]);                                                                      \
                if (has_dx) ST8(dx + o + 8 * j, gv * vk[j]);                                                      \
            }                                                                                                     \
        }                                                                                                         \
        _Pragma("unroll") for (int j = 0; j < NW; ++j) {                                                          \
            ST8(part_g + (size_t)k * C + c0 + 8 * j, sg[j]);                                                      \
            ST8(part_gx + (size_t)k * C + c0 + 8 * j, centered ? sgx[j] * LD8(istd + c0 + 8 * j) : sgx[j]);       \
        }                                                                                                         \
    }

// Grid (ceil(C / CW), nchunks).
__kernel void chan_gsum_partial(__global const float* x, __global const float* g, __global const float* mean,
                                __global const float* istd, const int centered, const int M, const int C,
                                const int rows, const int nchunks, __global float* part_g,
                                __global float* part_gx, __global const float* fa, __global const float* fb,
                                const int act, const int ghw, const float gscale, __global float* dx,
                                __global const float* k1, const int has_dx, const int unit) {
    const int c0 = get_global_id(0) * CW;
    const int k = get_global_id(1);
    if (c0 >= C || k >= nchunks) return;
    const int r0 = k * rows;
    const int r1 = min(r0 + rows, M);
    if (c0 + CW <= C) {
        GSUM_WIDE()
    } else {
        int c = c0;
        for (; c + 8 <= C; c += 8) GSUM_CHUNK(float8, v, LD8, ST8)
        for (; c < C; ++c) GSUM_CHUNK(float, s, LD1, ST1)
    }
}

// Pass 2: sum_g[c], sum_gx[c].
__kernel void chan_gsum_final(__global const float* part_g, __global const float* part_gx, const int nchunks,
                              const int C, __global float* sum_g, __global float* sum_gx) {
    const int c = get_global_id(0);
    if (c >= C) return;
    float sg = 0.0f, sgx = 0.0f;
    for (int k = 0; k < nchunks; ++k) {
        sg += part_g[(size_t)k * C + c];
        sgx += part_gx[(size_t)k * C + c];
    }
    sum_g[c] = sg;
    sum_gx[c] = sgx;
}

// The gamma gradient of an inference-mode BatchNorm folded into the convolution before it (cl_elementwise.BNFold):
// with u = conv(x, W) + bias the BN's input and dw, db the gradients of the folded weights W * a and bias, the sum of
// g * (u - mean[c]) is swdw[c] + (bias[c] - mean[c]) * db[c] (swdw = sum_k W[k, c] dw[k, c]), times istd[c].
__kernel void bn_fold_dgamma(__global const float* swdw, __global const float* db, __global const float* bias,
                             const int has_bias, __global const float* mean, __global const float* istd, const int C,
                             __global float* dgamma) {
    const int c = get_global_id(0);
    if (c >= C) return;
    dgamma[c] = istd[c] * (swdw[c] + ((has_bias ? bias[c] : 0.0f) - mean[c]) * db[c]);
}

// Training-mode input gradient as an affine map per channel: with xhat = (x - mean) * istd and k = gamma * istd,
// dx = k * (g - sum_g / M - xhat * sum_gxhat / M) = k1 * g + k2 * (x - mean) + k3 (centred: no cancellation when
// the mean is large).
__kernel void bn_bwd_coeffs(__global const float* sum_g, __global const float* sum_gxhat,
                            __global const float* gamma, const int has_gamma, __global const float* istd,
                            const int M, const int C, __global float* k1, __global float* k2, __global float* k3) {
    const int c = get_global_id(0);
    if (c >= C) return;
    const float invm = 1.0f / (float)M;
    const float k = (has_gamma ? gamma[c] : 1.0f) * istd[c];
    const float q = k * istd[c] * sum_gxhat[c] * invm;
    k1[c] = k;
    k2[c] = -q;
    k3[c] = -k * sum_g[c] * invm;
}

// dx = k1[c] * g + k2[c] * (x - mean[c]) + k3[c]. has_x = 0: dx = k1[c] * g (inference). With act, g is first
// masked by the activation's derivative at x * fa[c] + fb[c] (x is then read either way); g is addressed by G_ROW.
__kernel void chan_bwd_apply(__global const float* x, __global const float* g, __global float* dx,
                             __global const float* k1, __global const float* k2, __global const float* k3,
                             __global const float* mean, const int has_x, const int M, const int C,
                             __global const float* fa, __global const float* fb, const int act, const int ghw,
                             const float gscale) {
    FOR_ROWS_AND_CHANNELS(
        {
            float8 gv = LD8(g + G_ROW(m) + c) * gscale;
            if (act) gv = bn_mask_v(gv, LD8(x + o) * LD8(fa + c) + LD8(fb + c), act);
            ST8(dx + o, has_x ? gv * LD8(k1 + c) + (LD8(x + o) - LD8(mean + c)) * LD8(k2 + c) + LD8(k3 + c)
                              : gv * LD8(k1 + c));
        },
        {
            const float g1 = g[G_ROW(m) + c] * gscale;
            const float gv = act ? bn_mask_s(g1, x[o] * fa[c] + fb[c], act) : g1;
            dx[o] = has_x ? gv * k1[c] + (x[o] - mean[c]) * k2[c] + k3[c] : gv * k1[c];
        })
}
