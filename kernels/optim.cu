// Training kernels: the MSE loss, the sum of squares (gradient-norm clipping) and the AdamW step
// (f32 master weights and moments, and the bf16 copy of the weights when the backend keeps one),
// mirroring src/ops/optim.rs (`Reduction::cpu_mse`, `Reduction::cpu_sum_squares`, `AdamWParams::cpu_step`).
//
// The reductions are deterministic two-pass f64 sums: pass 1 writes one f64 partial per block to a
// workspace (grid-stride, block 256), pass 2 (opt_sum_finalize, one block) adds the partials in a
// fixed order and writes the f32 result. No atomics.
#include "common.cuh"


// mse_loss pass 1: with d = pred − target (f32), dpred = 2·d / n (written, not accumulated: f32,
// (2·d)/n as the CPU) and partial[blockIdx.x] = Σ d² over the block's elements in f64.
// Launch: 1-D grid-stride, block 256, grid = the number of partials.
extern "C" __global__ void opt_mse_partial(float* dpred, double* partial, const float* pred, const float* target,
                                           int n) {
    __shared__ double scratch[32];
    const float n_f = (float)n;
    double s = 0.0;
    GRID_STRIDE(i, n) {
        const float d = pred[i] - target[i];
        s += (double)d * (double)d;
        dpred[i] = (2.0f * d) / n_f;
    }
    s = block_sum_d(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// sum_squares pass 1: partial[blockIdx.x] = Σ x² over the block's elements, in f64.
// Launch: 1-D grid-stride, block 256, grid = the number of partials.
extern "C" __global__ void opt_sum_squares_partial(double* partial, const float* x, int n) {
    __shared__ double scratch[32];
    double s = 0.0;
    GRID_STRIDE(i, n) {
        const double v = (double)x[i];
        s += v * v;
    }
    s = block_sum_d(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// Pass 2 of both: out[0] = Σ partial[0..parts) (f64, fixed order), divided by n when `mean`
// (the loss: (Σ / n) as f32, NaN for n = 0 as on the CPU), rounded to f32.
// Launch: one block of 256 threads.
extern "C" __global__ void opt_sum_finalize(float* out, const double* partial, int parts, int n, int mean) {
    __shared__ double scratch[32];
    double s = 0.0;
    for (int k = threadIdx.x; k < parts; k += blockDim.x) s += partial[k];
    s = block_sum_d(s, scratch);
    if (threadIdx.x == 0) out[0] = (float)(mean ? s / (double)n : s);
}

// adamw_step (torch.optim.AdamW, single-tensor path; ops/optim.rs `AdamWParams::cpu_step`), per element in f32 in
// the CPU's operation order, with explicit round-to-nearest intrinsics so that nvcc cannot fuse
// into FMAs (bit-identical to the CPU):
//   p ← p·decay;  m ← m + (g − m)·(1 − β1);  v ← v·β2 + g·g·(1 − β2);
//   p ← p − step_size·m / (√v / bc2_sqrt + eps).
// The scalars decay = 1 − lr·wd, step_size = lr / (1 − β1^t), bc2_sqrt = √(1 − β2^t) are computed
// in f64 and rounded to f32 on the host, as the CPU does. When `copy` is not null it is the
// backend's bf16 copy of the parameters (element i beside param[i]) and receives the updated
// value rounded to nearest even, in the same pass. Launch: 1-D grid-stride, block 256.
extern "C" __global__ void opt_adamw(float* param, __nv_bfloat16* copy, const float* grad, float* m, float* v, int n,
                                     float decay, float beta2, float one_minus_beta1, float one_minus_beta2,
                                     float bc2_sqrt, float step_size, float eps) {
    GRID_STRIDE(i, n) {
        const float g = grad[i];
        float p = __fmul_rn(param[i], decay);
        float mm = m[i];
        mm = __fadd_rn(mm, __fmul_rn(__fsub_rn(g, mm), one_minus_beta1));
        float vv = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(g, g), one_minus_beta2));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vv), bc2_sqrt), eps);
        p = __fsub_rn(p, __fdiv_rn(__fmul_rn(step_size, mm), denom));
        param[i] = p;
        if (copy) copy[i] = f2bf(p);
        m[i] = mm;
        v[i] = vv;
    }
}
