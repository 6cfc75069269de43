// Activations fused into the epilogue of a convolution or GEMM (plan.fold_frozen; codes: cl_conv/cl_gemm _ACT):
//   0 none, 1 relu, 2 relu6, 3 swish x * sigmoid(x), 4 sigmoid, 5 hard_swish x * relu6(x + 3) / 6,
//   6 hard_sigmoid relu6(x + 3) / 6 (PyTorch's Hardsigmoid: alpha 1/6, beta 1/2).
// Only 1 and 2 train through the fused op (their derivative is read from the output: cl_gemm.act_masked); the plan
// fuses 3..6 only where no gradient flows. T: float or a float vector type; `act` is uniform per launch, so the
// branches cost nothing next to the arithmetic they follow. Comparisons and ?: rather than fmax/fmin: PoCL emits
// those built-ins as calls that spill vector registers. exp(-x) overflowing to inf gives the right limits (0).
#if defined(EPI_EXP) && EPI_EXP
#define FUSED_ACT_MORE(T, v, act)                                                                               \
        if ((act) == 3) v = v / ((T)(1.0f) + exp(-v));                                                          \
        if ((act) == 4) v = (T)(1.0f) / ((T)(1.0f) + exp(-v));                                                  \
        if ((act) >= 5) {                                                                                       \
            T t_ = v + (T)(3.0f);                                                                               \
            t_ = t_ > (T)(0.0f) ? t_ : (T)(0.0f);                                                               \
            t_ = (t_ < (T)(6.0f) ? t_ : (T)(6.0f)) * (T)(1.0f / 6.0f);                                          \
            v = (act) == 5 ? v * t_ : t_;                                                                       \
        }
#else
// Codes 3..6 are compiled in only with EPI_EXP (cl_gemm.act_defines): their code in every unrolled store of a GEMM
// tile cost the plain GEMM 2-4%. A program built without them gives NaN for such a code, never an output that
// silently lacks its activation.
#define FUSED_ACT_MORE(T, v, act) if ((act) >= 3) v = (T)(NAN);
#endif
#define FUSED_ACT(T, v, act)                                                                                    \
    do {                                                                                                        \
        if ((act) == 1 || (act) == 2) v = v > (T)(0.0f) ? v : (T)(0.0f);                                        \
        if ((act) == 2) v = v < (T)(6.0f) ? v : (T)(6.0f);                                                      \
        FUSED_ACT_MORE(T, v, act)                                                                               \
    } while (0)
