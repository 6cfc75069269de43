// Optimizer updates and the small in-place helpers used around them. Every kernel works on a whole buffer: one
// float8 per work-item (buffers start aligned), the last work-item finishes the scalar tail.

#include "vector_access.h"  // VLD4/8/16, VST4/8/16: see that file

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
