// Winograd F(4x4, 3x3) convolution (transfercl_cli/ops/cl_winograd.py): 3x3, stride 1, dilation 1, groups 1, NHWC
// activations and HWIO weights. An output tile of 4x4 pixels comes from a 6x6 input tile with 36 multiplies per
// input/output channel pair instead of 144 (Lavin & Gray 2015, points 0, +-1, +-2, infinity):
//   Y = A^T [ sum_c (G g_c G^T) .* (B^T d_c B) ] A
// The channel sums are 36 independent GEMMs, one per point xi = 6*i + j of the 6x6 transformed tile:
//   M[xi] (tiles x K) = V[xi] (tiles x C) @ U[xi] (C x K)
// which the CPU GEMM (gemm.cl gemm_cpu, grid dimension 2 = xi) runs with U already in its packed-panel layout.
// Three kernels around it, each a gather over NHWC rows of VW channels (16 on CPUs when the channels allow):
//   wino_weight  U panels from the 3x3 weights, once per weight (a frozen one is kept, Backend.const_cache);
//   wino_input   V[xi][t][c] = (B^T d B)[xi] for tile t, zero outside the image (the padding);
//   wino_output  y = (A^T M A) + bias [+ res, a fused residual Add], then the fused activation, written where the
//                tile lies inside the output.
// The transforms use only adds and multiplies by small powers of two (and 1/4, 1/6, 1/12, 1/24 for the weights).
#include "vector_access.h"  // VLD4/8/16, VST4/8/16: see that file
#include "fused_act.h"  // FUSED_ACT: the epilogue activations

#include "vec_width.h"  // vec, LD, ST, ZERO_UNLESS, KATTR for VW channels

// B^T (6x6) applied to e0..e5 (one line of a 6x6 input tile), results into o0..o5.
#define BT6(T, e, o)                                                                                            \
    do {                                                                                                        \
        const T d1_ = e[1], d2_ = e[2], d3_ = e[3], d4_ = e[4];                                                 \
        o[0] = 4.0f * e[0] - 5.0f * d2_ + d4_;                                                                  \
        o[1] = d3_ + d4_ - 4.0f * (d1_ + d2_);                                                                  \
        o[2] = 4.0f * (d1_ - d2_) + d4_ - d3_;                                                                  \
        o[3] = 2.0f * (d3_ - d1_) + d4_ - d2_;                                                                  \
        o[4] = 2.0f * (d1_ - d3_) + d4_ - d2_;                                                                  \
        o[5] = 4.0f * d1_ - 5.0f * d3_ + e[5];                                                                  \
    } while (0)

// A^T (4x6) applied to m0..m5 (one line of a transformed 6x6 tile), results into o0..o3.
#define AT4(m, o)                                                                                               \
    do {                                                                                                        \
        const vec p12_ = m[1] + m[2], n12_ = m[1] - m[2], p34_ = m[3] + m[4], n34_ = m[3] - m[4];               \
        o[0] = m[0] + p12_ + p34_;                                                                              \
        o[1] = n12_ + 2.0f * n34_;                                                                              \
        o[2] = p12_ + 4.0f * p34_;                                                                              \
        o[3] = n12_ + 8.0f * n34_ + m[5];                                                                       \
    } while (0)

// G (6x3) applied to g0..g2 (one line of a 3x3 kernel), results into o0..o5.
#define G6(g, o)                                                                                                \
    do {                                                                                                        \
        o[0] = 0.25f * g[0];                                                                                    \
        o[1] = (g[0] + g[1] + g[2]) * (-1.0f / 6.0f);                                                           \
        o[2] = (g[0] - g[1] + g[2]) * (-1.0f / 6.0f);                                                           \
        o[3] = g[0] * (1.0f / 24.0f) + g[1] * (1.0f / 12.0f) + g[2] * (1.0f / 6.0f);                            \
        o[4] = g[0] * (1.0f / 24.0f) - g[1] * (1.0f / 12.0f) + g[2] * (1.0f / 6.0f);                            \
        o[5] = g[2];                                                                                            \
    } while (0)

// U panels: u[((xi * nbj + jb) * C + c) * NR + jj] = (G g G^T)[xi] of input channel c, output channel jb*NR + jj
// (zero for the padding columns past K), the layout gemm_cpu reads packed B panels in. Work-item (VW columns, c):
// VW divides K and NR, so a vector is all real columns or all padding.
KATTR
__kernel void wino_weight(const int C, const int K, const int NR, const int nbj, __global const float* restrict w,
                          __global float* restrict u) {
    const int j = get_global_id(0) * VW, c = get_global_id(1);
    if (j >= nbj * NR || c >= C) return;
    vec g[3][3];
    _Pragma("unroll") for (int a = 0; a < 3; ++a)
        _Pragma("unroll") for (int b = 0; b < 3; ++b)
            g[a][b] = j < K ? LD(w + ((size_t)(a * 3 + b) * C + c) * K + j) : (vec)(0.0f);
    vec t[6][3];  // G g
    _Pragma("unroll") for (int b = 0; b < 3; ++b) {
        vec col[3] = {g[0][b], g[1][b], g[2][b]}, o[6];
        G6(col, o);
        _Pragma("unroll") for (int i = 0; i < 6; ++i) t[i][b] = o[i];
    }
    const int jb = j / NR, jj = j - jb * NR;
    _Pragma("unroll") for (int i = 0; i < 6; ++i) {  // (G g) G^T, row i
        vec o[6];
        G6(t[i], o);
        _Pragma("unroll") for (int k = 0; k < 6; ++k) ST(u + ((size_t)((6 * i + k) * nbj + jb) * C + c) * NR + jj, o[k]);
    }
}

// V[xi][t][c..c+VW) for the tiles t of images [n0, n0 + T / (TH*TW)): tile t = (n*TH + th)*TW + tw covers output
// rows 4*th.. and columns 4*tw.., i.e. input rows 4*th - pt .. + 5 (zero outside the image, read through a clamped
// address and a bit mask: no branch around the loads). Work-item (channel block, tile).
KATTR
__kernel void wino_input(const int H, const int W, const int C, const int TH, const int TW, const int pt,
                         const int pl, const int n0, const int T, __global const float* restrict x,
                         __global float* restrict v) {
    const int c = get_global_id(0) * VW, t = get_global_id(1);
    if (c >= C || t >= T) return;
    const int tw = t % TW, r = t / TW, th = r % TH, n = n0 + r / TH;
    const int ih0 = 4 * th - pt, iw0 = 4 * tw - pl;
    vec d[6][6];  // the tile with B applied to each row
    for (int a = 0; a < 6; ++a) {
        const int ih = ih0 + a;
        const int rin = ih >= 0 && ih < H;
        const __global float* xr = x + ((size_t)n * H + (rin ? ih : 0)) * W * C + c;
        vec e[6];
        _Pragma("unroll") for (int b = 0; b < 6; ++b) {
            const int iw = iw0 + b;
            const int ok = rin && iw >= 0 && iw < W;
            e[b] = ZERO_UNLESS(ok, LD(xr + (size_t)(iw < 0 ? 0 : (iw < W ? iw : W - 1)) * C));
        }
        BT6(vec, e, d[a]);
    }
    _Pragma("unroll") for (int j = 0; j < 6; ++j) {
        vec col[6], o[6];
        _Pragma("unroll") for (int a = 0; a < 6; ++a) col[a] = d[a][j];
        BT6(vec, col, o);
        _Pragma("unroll") for (int i = 0; i < 6; ++i) ST(v + ((size_t)(6 * i + j) * T + t) * C + c, o[i]);
    }
}

// y[n][4*th + i][4*tw + j][k..k+VW) = (A^T M A)[i][j] + bias, then the activation, for the pixels inside the
// output. Work-item (channel block, tile).
KATTR
__kernel void wino_output(const int OH, const int OW, const int K, const int TH, const int TW, const int n0,
                          const int T, __global const float* restrict m, __global const float* restrict bias,
                          const int has_bias, const int act, __global float* restrict y,
                          __global const float* restrict res, const int has_res) {
    const int k = get_global_id(0) * VW, t = get_global_id(1);
    if (k >= K || t >= T) return;
    const int tw = t % TW, r = t / TW, th = r % TH, n = n0 + r / TH;
    vec s[6][4];  // A^T applied to each row of the transformed tile
    for (int a = 0; a < 6; ++a) {
        vec e[6];
        _Pragma("unroll") for (int b = 0; b < 6; ++b) e[b] = LD(m + ((size_t)(6 * a + b) * T + t) * K + k);
        AT4(e, s[a]);
    }
    const vec bv = has_bias ? LD(bias + k) : (vec)(0.0f);
    const int oh0 = 4 * th, ow0 = 4 * tw;
    _Pragma("unroll") for (int j = 0; j < 4; ++j) {
        vec col[6], o[4];
        _Pragma("unroll") for (int a = 0; a < 6; ++a) col[a] = s[a][j];
        AT4(col, o);
        const int ow = ow0 + j;
        _Pragma("unroll") for (int i = 0; i < 4; ++i) {
            const int oh = oh0 + i;
            if (oh < OH && ow < OW) {
                const size_t at = (((size_t)n * OH + oh) * OW + ow) * K + k;
                vec z = o[i] + bv;
                if (has_res) z += LD(res + at);
                FUSED_ACT(vec, z, act);
                ST(y + at, z);
            }
        }
    }
}
