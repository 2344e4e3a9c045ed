// The bias parts of linear layers (the matrix products themselves go through cuBLAS).
#include "common.cuh"

// out[r, j] = bias[j] for r < rows, j < cols: the GEMM then adds inp·Wᵀ with beta = 1.
// Launch: 1-D, one thread per element (256 per block).
// The bias stays f32 beside bf16 activations (rounded once, as it is stored).
template <typename T>
__device__ void linear_bias_fill_t(T* out, const float* bias, int rows, int cols) {
    const size_t n = (size_t)rows * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = st_act<T>(bias[i % cols]);
}
extern "C" __global__ void linear_bias_fill(float* out, const float* bias, int rows, int cols) {
    linear_bias_fill_t(out, bias, rows, cols);
}
extern "C" __global__ void linear_bias_fill_bf16(__nv_bfloat16* out, const float* bias, int rows, int cols) {
    linear_bias_fill_t(out, bias, rows, cols);
}

// dbias[j] += Σ_r dout[r, j] (linear_backward's bias part, as the CPU reference).
// Launch: grid ceil(cols/32), block (32, 8): threadIdx.x picks the column, threadIdx.y strides rows;
// the eight partial sums are combined in shared memory in a fixed order (deterministic).
extern "C" __global__ void linear_bias_grad(float* dbias, const float* dout, int rows, int cols) {
    __shared__ float part[8][33];
    const int j = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (j < cols)
        for (int r = threadIdx.y; r < rows; r += 8) s += dout[(size_t)r * cols + j];
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && j < cols) {
        float t = 0.0f;
#pragma unroll
        for (int y = 0; y < 8; y++) t += part[y][threadIdx.x];
        dbias[j] += t;
    }
}
