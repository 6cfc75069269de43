// Weight gradient of a KxK convolution (NHWC x and gy, HWIO dW), CPU style, without an im2col matrix
// (transfercl_cli/ops/cl_conv.py _direct_wgrad):
//   dW[i, j, c, co] = sum over n, oh, ow of x[n, oh*SH - pt + i*DH, ow*SW - pl + j*DW, g*CG + c] * gy[n, oh, ow, co]
// with g = co / COG (groups), terms outside the image left out.
//
// im2col + GEMM writes and reads a (pixels, KH*KW*CG) matrix and the GEMM packs it again (ResNet-18's 56x56x64 3x3
// at batch 16: 115 MB twice, two thirds of the weight gradient's time). Here a work-item owns one block of NR = 16*NV
// output channels and a chunk of output rows (n, oh); rb rows at a time, for every tap (i, j) and block of MR input
// channels it adds those rows' products to MR x NR running sums: they live in registers along the rows (each gy
// vector used MR times, each x value NV times) and in the work-item's slice of `part` between row groups - the rb
// gy rows and the input rows they read stay in L1/L2 across all taps and channel blocks, the slice (KH*KW*CG x NR)
// in L2; rb * OW is about a hundred pixels, so small maps (7x7) still run long register loops.
// part[chunk, (i*KW + j)*CG + c, co]: one slice per chunk of rows, summed by the host (a column sum) when there are
// several chunks, or dW itself for one.
// Compile-time: KH, KW, SH, SW, DH, DW, MR (divides CG), NV (NR divides COG). Global size (Cout / NR, nchunks).

#include "vector_access.h"  // VLD4/8/16, VST4/8/16: see that file

// The host always defines these; the defaults let the file build on its own (tcl doctor, the Oclgrind cases).
#ifndef KH
#define KH 1
#define KW 1
#define SH 1
#define SW 1
#define DH 1
#define DW 1
#endif
#ifndef MR
#define MR 1
#endif
#ifndef NV
#define NV 1
#endif
#define NR (16 * NV)

VEC512
__kernel void conv_wgrad_rows(const __global float* restrict x, const __global float* restrict gy,
                              __global float* restrict part, int H, int W, int C, int OH, int OW, int Cout,
                              int pt, int pl, int CG, int COG, int nrows, int rows_per, int rb)
{
    const int co0 = get_global_id(0) * NR, chunk = get_global_id(1);
    const int r0 = chunk * rows_per, r1 = min(nrows, r0 + rows_per);
    const int K = KH * KW * CG;
    const int ci0 = (co0 / COG) * CG;
    __global float* slice = part + (size_t)chunk * K * Cout + co0;
    for (int k = 0; k < K; k++)
        _Pragma("unroll") for (int v = 0; v < NV; v++) VST16(slice + (size_t)k * Cout + 16 * v, (float16)(0.0f));
    for (int rg = r0; rg < r1; rg += rb) {
        const int re = min(r1, rg + rb);
        for (int i = 0; i < KH; i++)
            for (int j = 0; j < KW; j++) {
                // Output columns whose tap j lands inside the row: 0 <= ow*SW - pl + j*DW < W.
                const int off = j * DW - pl;
                const int ow0 = off >= 0 ? 0 : (-off + SW - 1) / SW;
                const int ow1 = min(OW, W - off > 0 ? (W - off + SW - 1) / SW : 0);
                if (ow1 <= ow0) continue;
                for (int cb = 0; cb < CG; cb += MR) {
                    __global float* sp = slice + (size_t)((i * KW + j) * CG + cb) * Cout;
                    float16 acc[MR][NV];
                    _Pragma("unroll") for (int m = 0; m < MR; m++)
                        _Pragma("unroll") for (int v = 0; v < NV; v++) acc[m][v] = VLD16(sp + (size_t)m * Cout + 16 * v);
                    for (int noh = rg; noh < re; noh++) {
                        const int n = noh / OH, oh = noh - n * OH;
                        const int ih = oh * SH - pt + i * DH;
                        if (ih < 0 || ih >= H) continue;
                        const __global float* xp = x + ((size_t)(n * H + ih) * W + ow0 * SW + off) * C + ci0 + cb;
                        const __global float* gp = gy + ((size_t)noh * OW + ow0) * Cout + co0;
                        for (int ow = ow0; ow < ow1; ow++, xp += SW * C, gp += Cout) {
                            float16 g[NV];
                            _Pragma("unroll") for (int v = 0; v < NV; v++) g[v] = VLD16(gp + 16 * v);
                            _Pragma("unroll") for (int m = 0; m < MR; m++) {
                                const float a = xp[m];
                                _Pragma("unroll") for (int v = 0; v < NV; v++) acc[m][v] += a * g[v];
                            }
                        }
                    }
                    _Pragma("unroll") for (int m = 0; m < MR; m++)
                        _Pragma("unroll") for (int v = 0; v < NV; v++) VST16(sp + (size_t)m * Cout + 16 * v, acc[m][v]);
                }
            }
    }
}
