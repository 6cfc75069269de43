// GEMM for tcl: C[M,N] = [C +] alpha * op(A) @ op(B) [+ bias[N]], then act.
// Operands are addressed by strides so transposes cost nothing: A(i,k) = a[i*sai + k*sak], B(k,j) = b[k*sbk + j*sbj].

#include "vector_access.h"  // VLD4/8/16, VST4/8/16: see that file
#include "fused_act.h"  // FUSED_ACT: the epilogue activations

// act: fused_act.h's codes (runtime argument: applied once per output element, off the hot loop).
inline float gemm_epilogue(float v, int act) {
    FUSED_ACT(float, v, act);
    return v;
}

// Reference-quality kernel: one work-item per output element. Correct for every shape and stride; slow.
__kernel void gemm_naive(const int M, const int N, const int K,
                         __global const float* a, const int sai, const int sak,
                         __global const float* b, const int sbk, const int sbj,
                         __global float* c, const float alpha, const int accumulate,
                         __global const float* bias, const int has_bias, const int act) {
    const int j = get_global_id(0);
    const int i = get_global_id(1);
    if (i >= M || j >= N) return;
    const __global float* ap = a + (size_t)i * sai;
    const __global float* bp = b + (size_t)j * sbj;
    float s = 0.0f;
    for (int k = 0; k < K; ++k) s += ap[(size_t)k * sak] * bp[(size_t)k * sbk];
    float v = alpha * s;
    const size_t o = (size_t)i * N + j;
    if (accumulate) v += c[o];
    if (has_bias) v += bias[j];
    c[o] = gemm_epilogue(v, act);
}

// Column sums (db = sum over rows of G (M, N)): work-item (j, p) sums column j over rows [p*rows, (p+1)*rows) into
// part[p][j]; with one chunk it writes the result (with accumulate), else colsum_parts adds the chunks up.
__kernel void colsum(const int M, const int N, const int rows, __global const float* restrict g,
                     __global float* restrict part, const int accumulate) {
    const int j = get_global_id(0), p = get_global_id(1);
    if (j >= N) return;
    const int i1 = min(M, (p + 1) * rows);
    float s = 0.0f;
    for (int i = p * rows; i < i1; ++i) s += g[(size_t)i * N + j];
    part[(size_t)p * N + j] = (accumulate && get_global_size(1) == 1) ? part[j] + s : s;
}

__kernel void colsum_parts(const int N, const int nparts, __global const float* restrict part,
                           __global float* restrict out, const int accumulate) {
    const int j = get_global_id(0);
    if (j >= N) return;
    float s = 0.0f;
    for (int p = 0; p < nparts; ++p) s += part[(size_t)p * N + j];
    out[j] = accumulate ? out[j] + s : s;
}

#ifndef GEMM_GPU_ONLY
// ---------------------------------------------------------------------------------------------------------------
// CPU variant (PoCL and other CPU OpenCL): one work-item computes an MR x NR (NR = NV*16) block of C in float16
// registers. Measured on PoCL (docs/pocl-performance.md): the built-ins vload/vstore/fma() become calls that spill
// the accumulators, so operands move through VLD16/VST16 (element-wise on PoCL, see the top of the file) and a*b+c
// is left to LLVM to fuse. No local memory or barriers: the CPU caches do the tiling.
//   A row block ib starts at a + ib*a_bs; within it A(i0+r, k) = a[r*ars + k*aks]: a row-major A in place
//   (ars = lda, aks = 1), a transposed one (1, lda) or the packed panels ap[ib][k][MR] of gemm_pack_a (1, MR).
//   Its scalars become broadcast operands of the FMAs. Rows past M are clamped to M-1 (computed, never stored).
//   B column blocks [0, nb_direct) are read in place from a row-major b; the others from packed panels
//   bp[jb - nb_direct][K][NR] (transposed B, the zero-padded edge block, or wherever packing is faster).
//   With K split across work-items (grid dim 1, `raw`), each split writes its MR x NR partial blocks contiguously
//   to w[(tile * nsplit + s)] and gemm_reduce sums them and applies the epilogue.
#ifndef MR
#define MR 8
#endif
#ifndef NV
#define NV 2
#endif
#define NR (NV * 16)

// The micro-kernel: acc[MR][NV] += A(rows, k) * B(k, NR columns) for k in [KB, KE).
#define GEMM_LOOP(ROW, KB, KE)                                                                                  \
    for (int k = (KB); k < (KE); ++k) {                                                                         \
        float16 bv[NV];                                                                                         \
        _Pragma("unroll") for (int v = 0; v < NV; ++v) bv[v] = VLD16(bk + 16 * v);                              \
        bk += bstride;                                                                                          \
        _Pragma("unroll") for (int r = 0; r < MR; ++r) {                                                        \
            const float av = ap[ROW(r)];                                                                        \
            _Pragma("unroll") for (int v = 0; v < NV; ++v) acc[r][v] = av * bv[v] + acc[r][v];                 \
        }                                                                                                       \
        ap += aks;                                                                                              \
    }

#define ROW_UNIT(r) (r)
#define ROW_FULL(r) ((r) * ars)
#define ROW_EDGE(r) (((r) < rlast ? (r) : rlast) * ars)

// C block at (i0, j0) = epilogue(acc): vector stores inside C, scalar ones on the right edge. accumulate 1 adds C's
// old value, 2 the same element of `res` (a residual tensor of C's shape: the Add after a frozen convolution, fused
// so that the convolution's output is never written and read back); then the bias and the activation.
#define STORE_TILE()                                                                                            \
    {                                                                                                           \
        __global float* cb = c + (size_t)i0 * N + j0;                                                           \
        const __global float* rb = (accumulate == 2 ? res : (const __global float*)c) + (size_t)i0 * N + j0;    \
        const int nrow = min(MR, M - i0);                                                                       \
        if (j0 + NR <= N) {                                                                                     \
            _Pragma("unroll") for (int r = 0; r < MR; ++r) {                                                    \
                if (r < nrow) {                                                                                 \
                    __global float* cr = cb + (size_t)r * N;                                                    \
                    const __global float* rr = rb + (size_t)r * N;                                              \
                    _Pragma("unroll") for (int v = 0; v < NV; ++v) {                                            \
                        float16 x = alpha * acc[r][v];                                                          \
                        if (accumulate) x += VLD16(rr + 16 * v);                                                \
                        if (has_bias) x += VLD16(bias + j0 + 16 * v);                                           \
                        FUSED_ACT(float16, x, act);                                                             \
                        VST16(cr + 16 * v, x);                                                                  \
                    }                                                                                           \
                }                                                                                               \
            }                                                                                                   \
        } else {                                                                                                \
            const int ncol = N - j0;                                                                            \
            for (int r = 0; r < nrow; ++r) {                                                                    \
                float t[NR];                                                                                    \
                _Pragma("unroll") for (int v = 0; v < NV; ++v) VST16(t + 16 * v, acc[r][v]);                    \
                __global float* cr = cb + (size_t)r * N;                                                        \
                const __global float* rr = rb + (size_t)r * N;                                                  \
                for (int j = 0; j < ncol; ++j) {                                                                \
                    float x = alpha * t[j];                                                                     \
                    if (accumulate) x += rr[j];                                                                 \
                    if (has_bias) x += bias[j0 + j];                                                            \
                    cr[j] = gemm_epilogue(x, act);                                                              \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
    }

// Work-item g computes the C block rows [ib0*MR, (ib0+gsz)*MR) x columns [j0, j0+NR) for K range [k0, k1) of
// split s, like BLIS inside one work-item: for each KB-deep chunk of k, the B chunk (KB x NR, L1-sized) is reused
// by the gsz register blocks one after another, whose running sums wait in a private scratch block between
// chunks (L1/L2). Column blocks vary fastest across work-items, so neighbours share the A rows (L2).
// Grid dimension 2 runs independent GEMMs of one shape side by side (a_zs, bp_zs, c_zs, sc_zs: the distances between
// their A, packed B, C and scratch; B read in place is shared by all of them).
VEC512
__kernel void gemm_cpu(const int M, const int N, const int K, const int kc, const int kb_len,
                       __global const float* restrict a, const int ars, const int aks, const long a_bs,
                       __global const float* restrict b, const int ldb, const int nb_direct,
                       __global const float* restrict bp,
                       __global float* restrict c, const float alpha, const int accumulate,
                       __global const float* restrict res,
                       __global const float* restrict bias, const int has_bias, const int act, const int raw,
                       const int gi, __global float* restrict scratch, const long a_zs, const long bp_zs,
                       const long c_zs, const long sc_zs) {
    const int z = get_global_id(2);  // batched GEMMs (Winograd): operand z lies z * (its stride) further on
    a += z * a_zs;
    bp += z * bp_zs;
    c += z * c_zs;
    scratch += z * sc_zs;
    const int nbi = (M + MR - 1) / MR, nbj = (N + NR - 1) / NR;
    const int ngrp = (nbi + gi - 1) / gi;
    const int g = get_global_id(0), s = get_global_id(1);
    if (g >= ngrp * nbj) return;
    const int grp = g / nbj, jb = g - grp * nbj;
    const int ib0 = grp * gi, gsz = min(gi, nbi - ib0);
    const int j0 = jb * NR;
    const int k0 = s * kc;
    const int k1 = min(K, k0 + kc);
    const __global float* bbase;
    int bstride;
    if (jb < nb_direct) {
        bbase = b + j0;
        bstride = ldb;
    } else {
        bbase = bp + (size_t)(jb - nb_direct) * K * NR;
        bstride = NR;
    }
    __global float* sc = scratch + ((size_t)s * ngrp * nbj + g) * gi * (MR * NR);
    for (int kb = k0; kb < k1; kb += kb_len) {
        const int ke = min(k1, kb + kb_len);
        for (int t = 0; t < gsz; ++t) {
            const int ib = ib0 + t, i0 = ib * MR;
            float16 acc[MR][NV];
            if (kb == k0) {
                _Pragma("unroll") for (int r = 0; r < MR; ++r)
                    _Pragma("unroll") for (int v = 0; v < NV; ++v) acc[r][v] = (float16)(0.0f);
            } else {
                _Pragma("unroll") for (int r = 0; r < MR; ++r)
                    _Pragma("unroll") for (int v = 0; v < NV; ++v) acc[r][v] = VLD16(sc + ((t * MR + r) * NV + v) * 16);
            }
            const __global float* ap = a + (size_t)ib * a_bs + (size_t)kb * aks;
            const __global float* bk = bbase + (size_t)kb * bstride;
            const int rlast = M - 1 - i0;
            if (rlast >= MR - 1 && ars == 1) {  // k-major A (transposed or packed): constant offsets
                GEMM_LOOP(ROW_UNIT, kb, ke)
            } else if (rlast >= MR - 1) {
                GEMM_LOOP(ROW_FULL, kb, ke)
            } else {
                GEMM_LOOP(ROW_EDGE, kb, ke)
            }
            if (ke < k1) {
                _Pragma("unroll") for (int r = 0; r < MR; ++r)
                    _Pragma("unroll") for (int v = 0; v < NV; ++v) VST16(sc + ((t * MR + r) * NV + v) * 16, acc[r][v]);
            } else if (raw) {  // K-split partial: a contiguous, padded MR x NR block per (tile, split)
                __global float* wp = c + ((size_t)(ib * nbj + jb) * get_global_size(1) + s) * (MR * NR);
                _Pragma("unroll") for (int r = 0; r < MR; ++r)
                    _Pragma("unroll") for (int v = 0; v < NV; ++v) VST16(wp + (r * NV + v) * 16, acc[r][v]);
            } else {
                STORE_TILE()
            }
        }
    }
}

// Sum of the K-split partial blocks, then the epilogue. One work-item per MR x NR block of C; the nsplit partial
// blocks of a tile lie one after another (sequential reads).
VEC512
__kernel void gemm_reduce(const int M, const int N, const int nsplit, __global const float* restrict w,
                          __global float* restrict c, const float alpha, const int accumulate,
                          __global const float* restrict res,
                          __global const float* restrict bias, const int has_bias, const int act) {
    const int jb = get_global_id(0), ib = get_global_id(1);
    const int nbj = (N + NR - 1) / NR;
    const int i0 = ib * MR, j0 = jb * NR;
    if (i0 >= M || j0 >= N) return;
    const __global float* wp = w + (size_t)(ib * nbj + jb) * nsplit * (MR * NR);
    float16 acc[MR][NV];
    _Pragma("unroll") for (int r = 0; r < MR; ++r)
        _Pragma("unroll") for (int v = 0; v < NV; ++v) acc[r][v] = VLD16(wp + (r * NV + v) * 16);
    for (int s = 1; s < nsplit; ++s) {
        wp += MR * NR;
        _Pragma("unroll") for (int r = 0; r < MR; ++r)
            _Pragma("unroll") for (int v = 0; v < NV; ++v) acc[r][v] += VLD16(wp + (r * NV + v) * 16);
    }
    STORE_TILE()
}

// Panel packing: out[p][k][w] = X(p*W + w, k) for k < K, zero for lanes past `lanes`, where X(l, k) =
// src[l*sl + k*sk]. A is packed with W = MR (lanes = rows of op(A)), B with W = NR (lanes = columns of op(B)).
// Work-item (p, chunk of PK values of k); p varies fastest so neighbouring items read neighbouring addresses.
#define PK 256
// 16 x 16 transpose of float16 rows R[0..15] in registers: four rounds of interleaving row i with row i+8
// (perfect shuffles); LLVM turns the swizzles into vector permutes.
#define ZIP_LO(a, b) (float16)((a).s0, (b).s0, (a).s1, (b).s1, (a).s2, (b).s2, (a).s3, (b).s3,                  \
                               (a).s4, (b).s4, (a).s5, (b).s5, (a).s6, (b).s6, (a).s7, (b).s7)
#define ZIP_HI(a, b) (float16)((a).s8, (b).s8, (a).s9, (b).s9, (a).sa, (b).sa, (a).sb, (b).sb,                  \
                               (a).sc, (b).sc, (a).sd, (b).sd, (a).se, (b).se, (a).sf, (b).sf)
#define TRANSPOSE16(R)                                                                                          \
    _Pragma("unroll") for (int round = 0; round < 4; ++round) {                                                 \
        float16 T[16];                                                                                          \
        _Pragma("unroll") for (int i = 0; i < 8; ++i) {                                                         \
            T[2 * i] = ZIP_LO(R[i], R[i + 8]);                                                                  \
            T[2 * i + 1] = ZIP_HI(R[i], R[i + 8]);                                                              \
        }                                                                                                       \
        _Pragma("unroll") for (int i = 0; i < 16; ++i) R[i] = T[i];                                             \
    }
#define PACK_BODY(W)                                                                                            \
    const int p = get_global_id(0), k0 = get_global_id(1) * PK;                                                 \
    if (k0 >= K) return;                                                                                        \
    const int nk = min(PK, K - k0);                                                                             \
    const int l0 = p * (W);                                                                                     \
    const int nl = min((W), lanes - l0);                                                                        \
    __global float* o = out + ((size_t)p * K + k0) * (W);                                                       \
    const __global float* x = src + (size_t)l0 * sl + (size_t)k0 * sk;                                          \
    if (sl == 1 && nl == (W)) { /* lanes contiguous: copy W floats per k */                                    \
        for (int kk = 0; kk < nk; ++kk) {                                                                       \
            const __global float* xr = x + (size_t)kk * sk;                                                     \
            _Pragma("unroll") for (int w = 0; w < (W); ++w) o[kk * (W) + w] = xr[w];                            \
        }                                                                                                       \
    } else if (sk == 1) { /* k contiguous: 16 x 16 pieces transposed through registers */                      \
        int kk = 0;                                                                                             \
        for (; kk + 16 <= nk; kk += 16) {                                                                       \
            for (int w0 = 0; w0 < (W); w0 += 16) {                                                              \
                float16 R[16];                                                                                  \
                _Pragma("unroll") for (int w = 0; w < 16; ++w) {                                                \
                    const int l = min(w0 + w, nl - 1);                                                          \
                    const float16 v = VLD16(x + (size_t)l * sl + kk);                                           \
                    R[w] = w0 + w < nl ? v : (float16)(0.0f);                                                   \
                }                                                                                               \
                TRANSPOSE16(R)                                                                                  \
                const int wn = min(16, (W) - w0);                                                               \
                _Pragma("unroll") for (int q = 0; q < 16; ++q) {                                                \
                    __global float* od = o + (kk + q) * (W) + w0;                                               \
                    if (wn == 16) {                                                                             \
                        VST16(od, R[q]);                                                                        \
                    } else { /* fewer than 16 lanes left: pieces of 8, 4, then single values */                \
                        float ot[16];                                                                           \
                        VST16(ot, R[q]);                                                                        \
                        int w = 0;                                                                              \
                        if (wn - w >= 8) { VST8(od + w, VLD8(ot + w)); w += 8; }                                \
                        if (wn - w >= 4) { VST4(od + w, VLD4(ot + w)); w += 4; }                                \
                        for (; w < wn; ++w) od[w] = ot[w];                                                      \
                    }                                                                                           \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
        for (; kk < nk; ++kk)                                                                                   \
            for (int w = 0; w < (W); ++w) o[kk * (W) + w] = w < nl ? x[(size_t)w * sl + kk] : 0.0f;            \
    } else {                                                                                                    \
        for (int kk = 0; kk < nk; ++kk)                                                                         \
            for (int w = 0; w < (W); ++w) o[kk * (W) + w] = w < nl ? x[(size_t)w * sl + (size_t)kk * sk] : 0.0f; \
    }

// The same panels when lanes are contiguous in memory (X(l, k) = src[l + k*sk]: a transposed A, a row-major B):
// work-item (16 panels, 16 values of k) reads 16 row pieces and deals them out to the panels (few pages per item).
#define PACK_ROWS_BODY(W)                                                                                       \
    const int k0 = get_global_id(1) * 16, p0 = get_global_id(0) * 16;                                           \
    const int np = (lanes + (W) - 1) / (W);                                                                     \
    if (k0 >= K || p0 >= np) return;                                                                            \
    const int nk = min(16, K - k0), p1 = min(np, p0 + 16);                                                      \
    for (int kk = 0; kk < nk; ++kk) {                                                                           \
        const __global float* xr = src + (size_t)(k0 + kk) * sk;                                                \
        for (int p = p0; p < p1; ++p) {                                                                         \
            __global float* o = out + ((size_t)p * K + k0 + kk) * (W);                                          \
            const int l0 = p * (W);                                                                             \
            if (l0 + (W) <= lanes) {                                                                            \
                _Pragma("unroll") for (int w = 0; w < (W); ++w) o[w] = xr[l0 + w];                              \
            } else {                                                                                            \
                for (int w = 0; w < (W); ++w) o[w] = l0 + w < lanes ? xr[l0 + w] : 0.0f;                        \
            }                                                                                                   \
        }                                                                                                       \
    }

VEC512
__kernel void gemm_pack_a_rows(const int lanes, const int K, __global const float* restrict src, const int sk,
                               __global float* restrict out) {
    PACK_ROWS_BODY(MR)
}

VEC512
__kernel void gemm_pack_b_rows(const int lanes, const int K, __global const float* restrict src, const int sk,
                               __global float* restrict out, const int jb0) {
    src += (size_t)jb0 * NR;
    PACK_ROWS_BODY(NR)
}

VEC512
__kernel void gemm_pack_a(const int lanes, const int K, __global const float* restrict src, const int sl,
                          const int sk, __global float* restrict out) {
    PACK_BODY(MR)
}

// B panels from column block jb0 on (the blocks before it are read in place).
VEC512
__kernel void gemm_pack_b(const int lanes, const int K, __global const float* restrict src, const int sl,
                          const int sk, __global float* restrict out, const int jb0) {
    src += (size_t)jb0 * NR * sl;
    PACK_BODY(NR)
}

// Small-M forward GEMM (dense layers and 1x1 convolutions of 1x1 maps at batch <= 8: classifiers, squeeze-excite):
// C[M,N] = A[M,K] @ B[K,N] [+ bias] then act, A and B row-major in place. The block kernel above computes MR rows
// whatever M is (8x the multiply-adds at batch 1); here a work-item computes 16 columns of all M <= SM rows,
// streaming B's rows once. Global size ceil(N / 16); the last, partial block goes column by column.
// With `packed`, whole blocks read B from bp, 16-column panels of K x 16 floats one after another (gemm_pack_b_rows
// with NR = 16: a frozen weight packed once): one contiguous stream per work-item instead of K rows N floats apart.
#ifndef SM
#define SM 8
#endif
VEC512
__kernel void gemm_small_m(const int M, const int N, const int K, __global const float* restrict a,
                           __global const float* restrict b, __global float* restrict c,
                           __global const float* restrict bias, const int has_bias, const int act,
                           __global const float* restrict bp, const int packed) {
    const int j0 = get_global_id(0) * 16;
    if (j0 >= N) return;
    if (j0 + 16 <= N) {
        float16 acc[SM];
        _Pragma("unroll") for (int r = 0; r < SM; ++r) acc[r] = (float16)(0.0f);
        const __global float* bk = packed ? bp + (size_t)get_global_id(0) * K * 16 : b + j0;
        const int bstep = packed ? 16 : N;
        for (int k = 0; k < K; ++k, bk += bstep) {
            const float16 bv = VLD16(bk);
            _Pragma("unroll") for (int r = 0; r < SM; ++r) acc[r] = a[(size_t)min(r, M - 1) * K + k] * bv + acc[r];
        }
        const float16 bb = has_bias ? VLD16(bias + j0) : (float16)(0.0f);
        _Pragma("unroll") for (int r = 0; r < SM; ++r) {
            if (r < M) {
                float16 v = acc[r] + bb;
                FUSED_ACT(float16, v, act);
                VST16(c + (size_t)r * N + j0, v);
            }
        }
        return;
    }
    for (int j = j0; j < N; ++j)
        for (int r = 0; r < M; ++r) {
            float s = 0.0f;
            for (int k = 0; k < K; ++k) s = a[(size_t)r * K + k] * b[(size_t)k * N + j] + s;
            c[(size_t)r * N + j] = gemm_epilogue(s + (has_bias ? bias[j] : 0.0f), act);
        }
}
#endif  // GEMM_GPU_ONLY

// ---------------------------------------------------------------------------------------------------------------
// GPU variant (portable, for real GPUs): a work-group of LS x LS items computes a TS x TS block of C (TS = LS*WPT),
// staging TK-deep slices of A and B in local memory; each item keeps WPT x WPT outputs in registers. Operands are
// read through strides (transposes cost nothing) with the loop order picked so neighbouring items read
// neighbouring addresses. Out-of-range elements load as 0, so any M, N, K is exact.
#ifndef WPT
#define WPT 4
#endif
#ifndef LS
#define LS 16
#endif
#ifndef TK
#define TK 16
#endif
#define TS (LS * WPT)

__kernel void gemm_gpu(const int M, const int N, const int K,
                       __global const float* restrict a, const int sai, const int sak,
                       __global const float* restrict b, const int sbk, const int sbj,
                       __global float* restrict c, const float alpha, const int accumulate,
                       __global const float* restrict bias, const int has_bias, const int act) {
    __local float As[TK][TS + 1];
    __local float Bs[TK][TS + 1];
    const int tx = get_local_id(0), ty = get_local_id(1);
    const int bj = get_group_id(0) * TS, bi = get_group_id(1) * TS;
    const int tid = ty * LS + tx;
    float acc[WPT][WPT];
    for (int wi = 0; wi < WPT; ++wi)
        for (int wj = 0; wj < WPT; ++wj) acc[wi][wj] = 0.0f;
    for (int kt = 0; kt < K; kt += TK) {
        for (int e = tid; e < TS * TK; e += LS * LS) {
            int ii, kk;
            if (sak == 1) { kk = e % TK; ii = e / TK; } else { ii = e % TS; kk = e / TS; }
            const int gi = bi + ii, gk = kt + kk;
            As[kk][ii] = (gi < M && gk < K) ? a[(size_t)gi * sai + (size_t)gk * sak] : 0.0f;
            int jj;
            if (sbj == 1) { jj = e % TS; kk = e / TS; } else { kk = e % TK; jj = e / TK; }
            const int gj = bj + jj, gk2 = kt + kk;
            Bs[kk][jj] = (gj < N && gk2 < K) ? b[(size_t)gk2 * sbk + (size_t)gj * sbj] : 0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int kk = 0; kk < TK; ++kk) {
            float ar[WPT], br[WPT];
            for (int w = 0; w < WPT; ++w) {
                ar[w] = As[kk][ty + w * LS];
                br[w] = Bs[kk][tx + w * LS];
            }
            for (int wi = 0; wi < WPT; ++wi)
                for (int wj = 0; wj < WPT; ++wj) acc[wi][wj] += ar[wi] * br[wj];
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    for (int wi = 0; wi < WPT; ++wi) {
        const int i = bi + ty + wi * LS;
        if (i >= M) continue;
        for (int wj = 0; wj < WPT; ++wj) {
            const int j = bj + tx + wj * LS;
            if (j >= N) continue;
            const size_t o = (size_t)i * N + j;
            float x = alpha * acc[wi][wj];
            if (accumulate) x += c[o];
            if (has_bias) x += bias[j];
            c[o] = gemm_epilogue(x, act);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// GPU variant without local memory, for mobile GPUs: Mali emulates __local in global memory, so the tiles staged
// by gemm_gpu cost extra copies and barriers there, and its register file is small. A work-item computes RM rows
// x 4 columns of C in RM float4 registers: each k step loads one float4 of B (VLD4 where B's row is contiguous,
// else four scalars) and RM scalars of A; the GPU's caches serve the reuse between neighbouring work-items.
// Rows past M are clamped to M-1 (computed, never stored); columns past N load as 0. Global size
// (ceil(N / 4), ceil(M / RM)), any work-group size.
#ifndef RM
#define RM 4
#endif
__kernel void gemm_gpu_direct(const int M, const int N, const int K,
                              __global const float* restrict a, const int sai, const int sak,
                              __global const float* restrict b, const int sbk, const int sbj,
                              __global float* restrict c, const float alpha, const int accumulate,
                              __global const float* restrict bias, const int has_bias, const int act) {
    const int j0 = get_global_id(0) * 4, i0 = get_global_id(1) * RM;
    if (i0 >= M || j0 >= N) return;
    const int nc = min(4, N - j0);
    const int rows = min(RM, M - i0);
    size_t ar[RM];
    for (int r = 0; r < RM; ++r) ar[r] = (size_t)(i0 + min(r, rows - 1)) * sai;
    float4 acc[RM];
    for (int r = 0; r < RM; ++r) acc[r] = (float4)(0.0f);
    const __global float* bp = b + (size_t)j0 * sbj;
    const int bvec = sbj == 1 && nc == 4;
    for (int k = 0; k < K; ++k, bp += sbk) {
        float4 bv;
        if (bvec) {
            bv = VLD4(bp);
        } else {
            bv.s0 = bp[0];
            bv.s1 = nc > 1 ? bp[sbj] : 0.0f;
            bv.s2 = nc > 2 ? bp[2 * sbj] : 0.0f;
            bv.s3 = nc > 3 ? bp[3 * sbj] : 0.0f;
        }
        const size_t ak = (size_t)k * sak;
        for (int r = 0; r < RM; ++r) acc[r] += a[ar[r] + ak] * bv;
    }
    for (int r = 0; r < rows; ++r) {
        __global float* cr = c + (size_t)(i0 + r) * N + j0;
        float t[4];
        VST4(t, acc[r]);
        for (int j = 0; j < nc; ++j) {
            float x = alpha * t[j];
            if (accumulate) x += cr[j];
            if (has_bias) x += bias[j0 + j];
            cr[j] = gemm_epilogue(x, act);
        }
    }
}
