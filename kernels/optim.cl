// Optimizer updates and the small in-place helpers used around them. Every kernel works on a whole buffer: one
// float8 per work-item (buffers start aligned), the last work-item finishes the scalar tail.

// --- Vector access (this block is the same in every kernel file; tests/test_kernel_source.py checks it) ---
// Loads and stores of float4/8/16 at any float offset go through vloadN / vstoreN, OpenCL C's portable form (a
// pointer cast to a vector type would need the vector's full alignment). PoCL compiles those built-ins as calls
// that spill the vector registers, and its vload16 / vstore16 break where the CPU model it compiles for lacks
// AVX-512 (AMD Zen 4 under LLVM 14), so the host builds for PoCL with -DTCL_POCL=1 and each access is then written
// element by element, which LLVM merges into one vector load or store (plain OpenCL C as well).
#if defined(TCL_POCL) && TCL_POCL
#define VLD4(p) ((float4)((p)[0], (p)[1], (p)[2], (p)[3]))
#define VLD8(p) ((float8)(VLD4(p), VLD4((p) + 4)))
#define VLD16(p) ((float16)(VLD8(p), VLD8((p) + 8)))
#define VST4(p, v)                                                                                              \
    do {                                                                                                        \
        const float4 v4_ = (v);                                                                                 \
        (p)[0] = v4_.s0; (p)[1] = v4_.s1; (p)[2] = v4_.s2; (p)[3] = v4_.s3;                                     \
    } while (0)
#define VST8(p, v) do { const float8 v8_ = (v); VST4(p, v8_.lo); VST4((p) + 4, v8_.hi); } while (0)
#define VST16(p, v) do { const float16 v16_ = (v); VST8(p, v16_.lo); VST8((p) + 8, v16_.hi); } while (0)
#else
#define VLD4(p) vload4(0, p)
#define VLD8(p) vload8(0, p)
#define VLD16(p) vload16(0, p)
#define VST4(p, v) vstore4(v, 0, p)
#define VST8(p, v) vstore8(v, 0, p)
#define VST16(p, v) vstore16(v, 0, p)
#endif
// --- end of vector access ---

// SGD (Keras convention). g = grad + wd * w; without momentum w -= lr * g; with it
//   v = mom * v - lr * g;  w += v  (nesterov: w += mom * v - lr * g).
#define SGD_BODY(T)                                      \
    T g = gv + wd * wv;                                  \
    if (use_mom) {                                       \
        const T v = mom * vv - lr * g;                   \
        vv = v;                                          \
        wv += nesterov ? mom * v - lr * g : v;           \
    } else {                                             \
        wv -= lr * g;                                    \
    }

__kernel void sgd(__global float* w, __global const float* grad, __global float* vel, const int n, const float lr,
                  const float mom, const float wd, const int use_mom, const int nesterov) {
    const int i = get_global_id(0) * 8;
    if (i + 8 <= n) {
        float8 wv = VLD8(w + i);
        const float8 gv = VLD8(grad + i);
        float8 vv = use_mom ? VLD8(vel + i) : (float8)(0.0f);
        SGD_BODY(float8)
        VST8(w + i, wv);
        if (use_mom) VST8(vel + i, vv);
    } else {
        for (int k = i; k < n; ++k) {
            float wv = w[k];
            const float gv = grad[k];
            float vv = use_mom ? vel[k] : 0.0f;
            SGD_BODY(float)
            w[k] = wv;
            if (use_mom) vel[k] = vv;
        }
    }
}

// Adam (Keras form: alpha = lr * sqrt(1 - b2^t) / (1 - b1^t) from the host, eps added to sqrt(v)).
// l2: coupled weight decay (added to the gradient); decay = lr * wd for decoupled AdamW (w -= decay * w first).
#define ADAM_BODY(T)                                     \
    wv -= decay * wv;                                    \
    const T g = gv + l2 * wv0;                           \
    mv = b1 * mv + (1.0f - b1) * g;                      \
    vv = b2 * vv + (1.0f - b2) * g * g;                  \
    wv -= alpha * mv / (sqrt(vv) + eps);

__kernel void adam(__global float* w, __global const float* grad, __global float* m, __global float* v,
                   const int n, const float alpha, const float b1, const float b2, const float eps, const float l2,
                   const float decay) {
    const int i = get_global_id(0) * 8;
    if (i + 8 <= n) {
        const float8 wv0 = VLD8(w + i);
        float8 wv = wv0;
        const float8 gv = VLD8(grad + i);
        float8 mv = VLD8(m + i);
        float8 vv = VLD8(v + i);
        ADAM_BODY(float8)
        VST8(w + i, wv);
        VST8(m + i, mv);
        VST8(v + i, vv);
    } else {
        for (int k = i; k < n; ++k) {
            const float wv0 = w[k];
            float wv = wv0;
            const float gv = grad[k];
            float mv = m[k], vv = v[k];
            ADAM_BODY(float)
            w[k] = wv;
            m[k] = mv;
            v[k] = vv;
        }
    }
}

// x *= f
__kernel void scale_inplace(__global float* x, const int n, const float f) {
    const int i = get_global_id(0) * 8;
    if (i + 8 <= n) {
        VST8(x + i, VLD8(x + i) * f);
    } else {
        for (int k = i; k < n; ++k) x[k] *= f;
    }
}

// dst += src
__kernel void add_inplace(__global float* dst, __global const float* src, const int n) {
    const int i = get_global_id(0) * 8;
    if (i + 8 <= n) {
        VST8(dst + i, VLD8(dst + i) + VLD8(src + i));
    } else {
        for (int k = i; k < n; ++k) dst[k] += src[k];
    }
}

// Sum of squares, pass 1: work-item p sums elements [p * chunk, (p + 1) * chunk) (chunk a multiple of 8) into
// out[off + p]; the host adds the partials of all tensors after one read.
__kernel void sumsq_partial(__global const float* x, const int n, const int chunk, const int parts,
                            __global float* out, const int off) {
    const int p = get_global_id(0);
    if (p >= parts) return;
    const int i0 = p * chunk;
    const int i1 = min(i0 + chunk, n);
    float8 acc = (float8)(0.0f);
    int i = i0;
    for (; i + 8 <= i1; i += 8) {
        const float8 v = VLD8(x + i);
        acc += v * v;
    }
    float s = 0.0f;
    for (; i < i1; ++i) s += x[i] * x[i];
    const float4 h = acc.lo + acc.hi;
    out[off + p] = s + (h.x + h.y) + (h.z + h.w);
}
