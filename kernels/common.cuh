// Shared helpers of roentgen's CUDA kernels (compiled into one module by build.rs).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

// A 1-D grid-stride loop over [0, n) with a 64-bit index (the kernels whose launch is "1-D
// grid-stride": any grid covers every element).
#define GRID_STRIDE(i, n)                                                                \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)gridDim.x * blockDim.x)

// Reductions over the 32 lanes of a warp and over a block, for a sum or a max, in f32 or f64.
struct RedSum {
    template <typename T>
    __device__ static T op(T a, T b) { return a + b; }
};
struct RedMax {
    __device__ static float op(float a, float b) { return fmaxf(a, b); }
};

// Butterfly over the warp; every lane gets the result.
template <typename Op, typename T>
__device__ __forceinline__ T warp_reduce(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = Op::op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) { return warp_reduce<RedSum>(v); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce<RedMax>(v); }
__device__ __forceinline__ double warp_sum_d(double v) { return warp_reduce<RedSum>(v); }

// Over a block of at most 1024 threads (blockDim.x a multiple of 32); every thread gets the result.
// `scratch` needs 32 elements of shared memory; `identity` fills the lanes past the block's warps.
// The call contains __syncthreads and must be reached by every thread of the block.
template <typename Op, typename T>
__device__ __forceinline__ T block_reduce(T v, T* scratch, T identity) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_reduce<Op>(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : identity;
    return warp_reduce<Op>(v);
}
__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce<RedSum>(v, scratch, 0.0f); }
__device__ __forceinline__ double block_sum_d(double v, double* scratch) {
    return block_reduce<RedSum>(v, scratch, 0.0);
}

// f32 ↔ bf16 (round to nearest even, as PyTorch's .to(torch.bfloat16)).
__device__ __forceinline__ __nv_bfloat16 f2bf(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ float bf2f(__nv_bfloat16 x) { return __bfloat162float(x); }

// Activations in memory are f32 or bf16 (issue 18: bf16 activations halve the bytes every
// memory-bound kernel moves); kernels templated on the activation type T load them as f32 with
// `ld_act`, compute in f32, and store with `st_act<T>` (bf16: round to nearest even, once).
// Such a kernel's entry points are `NAME` (f32) and `NAME_bf16`, with the same parameters.
__device__ __forceinline__ float ld_act(float x) { return x; }
__device__ __forceinline__ float ld_act(__nv_bfloat16 x) { return bf2f(x); }
template <typename T>
__device__ __forceinline__ T st_act(float x);
template <>
__device__ __forceinline__ float st_act<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 st_act<__nv_bfloat16>(float x) { return f2bf(x); }
// Two floats packed as a bf16x2 register (lo in the low half), the operand form of mma.sync.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// 2^x by the special-function unit (ex2.approx.ftz.f32: ≤ 2 ulp, denormal results flushed to 0),
// the instruction __expf itself uses after multiplying by log2 e; emulated by exp2f.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef ROENTGEN_EMU
    return exp2f(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
#endif
}

// ---- asynchronous copies and matrix loads (sm_80+), each with its emulation (kernels/emu/emu.h) ----
// cp.async.cg: 16 bytes global → shared without passing through registers; the copy completes at a
// later cp_async_wait. `src_bytes` < 16 zero-fills the rest (0: nothing read, all zeros: a padding
// row). Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes = 16) {
#ifdef ROENTGEN_EMU
    ::emu::cp_async(smem, gmem, 16, src_bytes);
#else
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
#endif
}
// Closes the group of this thread's copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef ROENTGEN_EMU
    ::emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most `Pending` of this thread's newest committed groups are in flight. Other
// threads' copies need a __syncthreads after their wait before this thread reads them.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef ROENTGEN_EMU
    ::emu::cp_async_wait(Pending);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
#endif
}
// ldmatrix .x4: four 8×8 b16 matrices; lane l gives the address of row l%8 of matrix l/8 (16
// bytes, aligned) and receives in r[i] row l/4, columns 2(l%4), 2(l%4)+1 of matrix i — the A
// fragment of mma.m16n8k16 for a row-major 16×16 tile when the matrices are its four 8×8 quarters.
// With Trans (.x4.trans), matrix i transposed: rows 2(l%4), 2(l%4)+1 of column l/4, the B
// fragments of two n8 tiles from a row-major k×n tile (see ldmatrix_x2).
template <bool Trans = false>
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row) {
#ifdef ROENTGEN_EMU
    emu_ldmatrix(r, 4, Trans, row);
#else
    const unsigned s = (unsigned)__cvta_generic_to_shared(row);
    if constexpr (Trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(s));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(s));
#endif
}
// ldmatrix .x2 (Trans: .x2.trans): two 8×8 matrices, lanes 0–15 giving the row addresses. From an
// n×k tile stored k-contiguous (a weight row per output channel), not transposed; from a row-major
// k×n tile (rows k), transposed: either way the B fragment of mma.m16n8k16 (b[0] = k 0–7, b[1] =
// k 8–15).
template <bool Trans>
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* row) {
#ifdef ROENTGEN_EMU
    emu_ldmatrix(r, 2, Trans, row);
#else
    const unsigned s = (unsigned)__cvta_generic_to_shared(row);
    if constexpr (Trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
#endif
}

// D = A·B + C for one m16n8k16 tile: bf16 operands, f32 accumulators (PTX ISA, "Matrix Fragments
// for mma.m16n8k16"): a[4] and b[2] are bf16x2 registers, c/d four floats per lane.
__device__ __forceinline__ void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
#ifdef ROENTGEN_EMU  // the CPU emulation of the kernels (tests/kernel_emu/emu.h) emulates the instruction
    emu_mma_bf16_16816(d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

// D = A·B + C for one m16n8k8 tile (half the k of the above): a[0] = A[g][2t, 2t+1], a[1] =
// A[g+8][2t, 2t+1] (the first two registers of the k16 layout), b = B[2t, 2t+1][g]. A k-tail of 8
// (head dim 40 = 2·16 + 8) takes one of these instead of a k16 step over zero padding.
__device__ __forceinline__ void mma_bf16_1688(float d[4], const uint32_t a[2], uint32_t b, const float c[4]) {
#ifdef ROENTGEN_EMU  // the k16 instruction with the upper half of k zero: the same sum
    const uint32_t a4[4] = {a[0], a[1], 0u, 0u}, b2[2] = {b, 0u};
    emu_mma_bf16_16816(d, a4, b2, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(b), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}
