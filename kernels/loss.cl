// Fused softmax cross-entropy over (N, K) logits with integer labels, label smoothing and class weights.
// Targets q = (1 - ls) * onehot(y) + ls / K (Keras). With z' = z - max(z) and lse = log(sum exp z'):
//   l = lse - (ls / K) * sum(z') - (1 - ls) * z'_y,   dl/dz = softmax(z) - q.
// One row per work-item (rows are independent; K is looped).

// Training: grad[i] = w_i * inv_wsum * (p - q) with w_i = class weight of the label (1 without weights);
// row_loss[i] = w_i * l_i and row_w[i] = w_i, summed on the host for the weighted mean.
__kernel void softmax_xent(__global const float* z, __global const int* labels, __global const float* cw,
                           const int has_cw, const int N, const int K, const float ls, const float inv_wsum,
                           __global float* grad, __global float* row_loss, __global float* row_w) {
    const int i = get_global_id(0);
    if (i >= N) return;
    const __global float* zr = z + (size_t)i * K;
    __global float* gr = grad + (size_t)i * K;
    const int y = labels[i];
    float m = -INFINITY;
    for (int k = 0; k < K; ++k) m = fmax(m, zr[k]);
    float s = 0.0f, sz = 0.0f;
    for (int k = 0; k < K; ++k) {
        const float d = zr[k] - m;
        s += exp(d);
        sz += d;
    }
    const float lse = log(s);
    const float w = has_cw ? cw[y] : 1.0f;
    const float off = ls / (float)K;
    row_loss[i] = w * (lse - off * sz - (1.0f - ls) * (zr[y] - m));
    row_w[i] = w;
    const float f = w * inv_wsum;
    const float inv_s = 1.0f / s;
    for (int k = 0; k < K; ++k) {
        const float q = off + (k == y ? 1.0f - ls : 0.0f);
        gr[k] = f * (exp(zr[k] - m) * inv_s - q);
    }
}

// Evaluation: probabilities, and per-sample (unweighted) losses when has_labels.
__kernel void softmax_xent_fwd(__global const float* z, __global const int* labels, const int has_labels,
                               const int N, const int K, const float ls, __global float* probs,
                               __global float* row_loss) {
    const int i = get_global_id(0);
    if (i >= N) return;
    const __global float* zr = z + (size_t)i * K;
    __global float* pr = probs + (size_t)i * K;
    float m = -INFINITY;
    for (int k = 0; k < K; ++k) m = fmax(m, zr[k]);
    float s = 0.0f, sz = 0.0f;
    for (int k = 0; k < K; ++k) {
        const float d = zr[k] - m;
        const float e = exp(d);
        pr[k] = e;
        s += e;
        sz += d;
    }
    const float inv_s = 1.0f / s;
    for (int k = 0; k < K; ++k) pr[k] *= inv_s;
    if (has_labels) {
        const int y = labels[i];
        row_loss[i] = log(s) - (ls / (float)K) * sz - (1.0f - ls) * (zr[y] - m);
    }
}
