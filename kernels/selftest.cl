// A minimal kernel used by `tcl doctor` and the tests to prove that kernels build and run on a device.
__kernel void saxpy(const int n, const float a, __global const float *x, __global float *y) {
    const int i = get_global_id(0);
    if (i < n) y[i] = a * x[i] + y[i];
}
