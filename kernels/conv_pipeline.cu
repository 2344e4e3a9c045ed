// The bf16 implicit-GEMM convolution with a cp.async pipeline: versions 4, 5 and 6 of the conv
// family (ROENTGEN_KERNELS=conv=4|5|6), the same GEMM with 2, 3 and 4 pipeline stages.
//
// What it changes, on top of version 3 (ldmatrix fragments, version 2's split-K choice, both kept):
//  * operands fetched by cp.async, STAGES − 1 reduction tiles ahead of the one the tensor cores
//    are on, instead of one tile ahead through registers: the weight (bf16, permuted so that a
//    tile row's 32 channels are 64 contiguous bytes) straight into its shared tile; the activations
//    (f32: the pools hold f32) as they are into an f32 staging ring, from which each thread rounds
//    the 16 values it copied itself into the bf16 tile the mmas read (no barrier between its wait
//    and that conversion: cp.async.wait_group makes a thread's own copies visible to it).
//  * no operand passes through registers between the global load and the shared store, so the
//    loads of several tiles are in flight at once without holding 24 registers per tile.
// Shared memory (dynamic): STAGES × (16 KiB f32 activations + 5 KiB bf16 weights) + 2 × 10 KiB
// bf16 activation tiles = 62 / 83 / 104 KiB for 2 / 3 / 4 stages: two blocks per SM on an H100
// (228 KiB) at every stage count, one on an A100 at 4 stages (164 KiB).
// Roofline (H100 SXM, estimates): a 128×64×32 tile is 0.52 MFLOP, ≈125 cycles of an SM's tensor
// cores (989 TFLOP/s / 132 SMs / 1.75 GHz ≈ 4.3 kFLOP per cycle), while an L2 round trip under
// load is ≈600 cycles. Version 3 issues tile kt+1's loads when tile kt's mmas start, so with two
// blocks per SM it still waits out most of each round trip; with S stages, S − 1 tiles are in
// flight, ≈(S − 1) × 250 cycles of cover at two blocks per SM. What the stages approach, and cannot
// pass, is the L2 → SM traffic: 20 KiB per tile (16 KiB of it f32 activations) = 25.6 FLOP/B,
// ≈140 TFLOP/s at ≈5.5 TB/s of L2 bandwidth; bf16 activations (42 FLOP/B) or 128×128 tiles (43)
// raise that cap next. Expected ≈1.3–2× over version 3 on the 64×64 and 32×32 latents; the
// autotune picks the stage count per shape, and only a GPU can say which.
// Falls back, per operand, to synchronous loads where cp.async cannot serve it (activation
// channels not a multiple of 4 or a misaligned base; weight channels, strides or base not
// 16-byte multiples): a first-layer conv with 3 or 4 input channels, or an odd tensor offset.
// Numerics: the same bf16 roundings, products and order as versions 1–3: bit for bit the same
// results (the emulated cases check it against version 3, at every stage count).
#include "conv_igemm.cuh"

using namespace conv_detail;

// The pipeline kernels' dynamic shared memory: a conv_pipeline::Smem<STAGES>.
extern __shared__ __align__(16) unsigned char conv_smem[];

namespace conv_pipeline {

// The activation staging tile: 128 rows of the tile's 32 f32 channels (128 bytes a row; a
// quarter-warp's 16-byte chunks cover one row: no bank conflicts in the copy or the read-back).
using AStage = float[H_BM][H_BK];
using BTile = uint32_t[H_BN][H_LDW];
using ATile = uint32_t[H_BM][H_LDW];

template <int STAGES>
struct Smem {
    AStage a32[STAGES];
    BTile b[STAGES];
    ATile a[2];
};

// The host's launch sizes (conv.rs `pipeline_smem`, whose test pins the same numbers).
static_assert(sizeof(Smem<2>) == 63488 && sizeof(Smem<3>) == 84992 && sizeof(Smem<4>) == 106496,
              "conv.rs pipeline_smem");

// Issues the copies of one reduction tile `kp` into stage (a32, b), then steps kp on. Thread tid
// copies channels 4·lq.. of A rows lrow + 32r (r < 4) (IgemmWalk's) and channels 8·bq.. of B row
// brow (brow = tid / 4, bq = tid % 4).
struct PipeLoader : IgemmWalk {
    int brow, bq;
    bool a_async, b_async;

    template <class... Args>
    __device__ __forceinline__ PipeLoader(Args... args) : IgemmWalk(args...) {
        brow = threadIdx.x >> 2;
        bq = threadIdx.x & 3;
        a_async = (C % 4 == 0) && aligned16(src);
        b_async = (C % 8 == 0) && (bs_n % 8 == 0) && (bs_t % 8 == 0) && aligned16(wt);
    }

    __device__ __forceinline__ void issue(AStage& a32, BTile& b) {
        const int dy = kp.jy * tys, dx = kp.jx * txs;
        {
            const int c = kp.c0 + 4 * lq;
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                float* dst = &a32[lrow + 32 * r][4 * lq];
                const long long so = src_offset(ag[r], dy, dx, SH, SW, C);
                const int n = so >= 0 ? min(4, C - c) : 0;  // ≤ 0 past the channels: zeros
                if (a_async) {
                    cp_async_16(dst, n > 0 ? src + so + c : src, 4 * max(n, 0));
                } else {
                    *reinterpret_cast<float4*>(dst) = load4(n > 0 ? src + so + c : src, n, false);
                }
            }
        }
        {
            const int c = kp.c0 + 8 * bq, n = n0 + brow;
            const int valid = n < N ? min(8, C - c) : 0;
            const __nv_bfloat16* p = valid > 0 ? wt + (size_t)n * bs_n +
                                                     (size_t)(tap0 + kp.jy * tapys + kp.jx * tapxs) * bs_t + c
                                               : wt;
            uint32_t* dst = &b[brow][4 * bq];
            if (b_async) {
                cp_async_16(dst, p, 2 * max(valid, 0));
            } else {
                const uint2 lo = load4_bf16(p, valid, false), hi = load4_bf16(p + 4, valid - 4, false);
                *reinterpret_cast<uint4*>(dst) = make_uint4(lo.x, lo.y, hi.x, hi.y);
            }
        }
        kpos_next(kp, H_BK, C, ntx);
    }

    // This thread's own chunks of a staged tile, rounded to bf16 into the mma tile (as
    // IgemmBf16Loader::store rounds its registers).
    __device__ __forceinline__ void convert(const AStage& a32, ATile& a) const {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const float4 v = *reinterpret_cast<const float4*>(&a32[lrow + 32 * r][4 * lq]);
            store_bf16x4(a, lrow + 32 * r, lq, v);
        }
    }
};

// The bf16 GEMM of one 128×64 block tile over reduction tiles [kt_begin, kt_end) as
// igemm_bf16_tiles_v3, the operands through a STAGES-deep cp.async ring.
// Schedule (j = kt − kt_begin): tiles 0 .. STAGES−2 are issued up front, one commit group each;
// iteration j issues tile j + STAGES − 1 into the stage tile j − 1 used (its activations were
// converted in iteration j − 2, its weights read in iteration j − 1, both before iteration j − 1's
// closing barrier), runs tile j's mmas, then waits for tile j + 1 (wait_group STAGES − 2: every
// group but the newest STAGES − 2 retired) and converts its activations into the other bf16 tile
// (last read in iteration j − 1). The closing barrier publishes that tile and every thread's copies
// of tile j + 1's weights. A commit is made even when no tile is left to issue, so that the group
// count, and with it the wait's meaning, stays uniform.
template <int STAGES, class Store>
__device__ __forceinline__ void pipeline_tiles(Smem<STAGES>& sm, int m0, int n0, const float* __restrict__ src,
                                               const __nv_bfloat16* __restrict__ wt, int M, int RH, int RW, int N,
                                               int C, int SH, int SW, int ss, int sy0, int sx0, int tys, int txs,
                                               int ntx, int tap0, int tapys, int tapxs, int bs_n, int bs_t,
                                               int kt_begin, int kt_end, Store store) {
    static_assert(STAGES >= 2, "a pipeline of at least two stages");
    PipeLoader ld(m0, n0, src, wt, M, RH, RW, N, C, SH, SW, ss, sy0, sx0, tys, txs, ntx, tap0, tapys, tapxs, bs_n,
                  bs_t, kt_begin);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int wm0 = (warp & 3) * 32, wn0 = (warp >> 2) * 32;
    const int tiles = max(0, kt_end - kt_begin);
    float acc[2][4][4] = {};

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < tiles) ld.issue(sm.a32[s], sm.b[s]);
        cp_async_commit();
    }
    if (tiles > 0) {
        cp_async_wait<STAGES - 2>();
        ld.convert(sm.a32[0], sm.a[0]);
    }
    __syncthreads();
    for (int j = 0; j < tiles; ++j) {
        const int ahead = j + STAGES - 1;
        if (ahead < tiles) ld.issue(sm.a32[ahead % STAGES], sm.b[ahead % STAGES]);
        cp_async_commit();
#pragma unroll
        for (int ks = 0; ks < H_BK / 16; ++ks)
            warp_mma_32x32_ldsm(acc, sm.a[j & 1], sm.b[j % STAGES], wm0, wn0, ks * 8, lane);
        if (j + 1 < tiles) {
            cp_async_wait<STAGES - 2>();
            ld.convert(sm.a32[(j + 1) % STAGES], sm.a[(j + 1) & 1]);
        }
        __syncthreads();
    }
    cp_async_wait<0>();  // only empty groups remain; a thread may not exit with groups pending

    warp_tile_32x32_store(acc, m0 + wm0, n0 + wn0, M, N, g, t, store);
}

// One-pass launch (see conv2d_igemm_bf16): the whole reduction, then put_out's epilogue.
template <int STAGES>
__device__ __forceinline__ void igemm(float* __restrict__ dst, const float* __restrict__ src,
                                      const __nv_bfloat16* __restrict__ wt, const float* __restrict__ bias,
                                      const float* __restrict__ batch_bias, const float* __restrict__ residual, int M,
                                      int RH, int RW, int N, int C, int SH, int SW, int ss, int sy0, int sx0, int tys,
                                      int txs, int nty, int ntx, int tap0, int tapys, int tapxs, int bs_n, int bs_t,
                                      int DH, int DW, int os, int dy0, int dx0, int accumulate) {
    Smem<STAGES>& sm = *reinterpret_cast<Smem<STAGES>*>(conv_smem);
    pipeline_tiles<STAGES>(sm, blockIdx.x * H_BM, blockIdx.y * H_BN, src, wt, M, RH, RW, N, C, SH, SW, ss, sy0, sx0,
                           tys, txs, ntx, tap0, tapys, tapxs, bs_n, bs_t, 0, nty * ntx * CEIL_DIV(C, H_BK),
                           [&](int m, int n, float v) {
                               put_out(dst, v, bias, batch_bias, residual, m, n, RH, RW, DH, DW, os, dy0, dx0, N,
                                       accumulate);
                           });
}

// Split-K launch (see conv2d_igemm_bf16_splitk): grid.z's range of tiles into its slice of part.
template <int STAGES>
__device__ __forceinline__ void igemm_splitk(float* __restrict__ part, const float* __restrict__ src,
                                             const __nv_bfloat16* __restrict__ wt, int M, int RH, int RW, int N, int C,
                                             int SH, int SW, int ss, int sy0, int sx0, int tys, int txs, int nty,
                                             int ntx, int tap0, int tapys, int tapxs, int bs_n, int bs_t,
                                             int kt_per_split) {
    Smem<STAGES>& sm = *reinterpret_cast<Smem<STAGES>*>(conv_smem);
    const int ktiles = nty * ntx * CEIL_DIV(C, H_BK);
    const int kt_begin = min(ktiles, (int)blockIdx.z * kt_per_split);
    const int kt_end = min(ktiles, kt_begin + kt_per_split);
    float* out = part + (size_t)blockIdx.z * M * N;
    pipeline_tiles<STAGES>(sm, blockIdx.x * H_BM, blockIdx.y * H_BN, src, wt, M, RH, RW, N, C, SH, SW, ss, sy0, sx0,
                           tys, txs, ntx, tap0, tapys, tapxs, bs_n, bs_t, kt_begin, kt_end,
                           [&](int m, int n, float v) { out[(size_t)m * N + n] = v; });
}

}  // namespace conv_pipeline

// The entry points: version V runs the pipeline with V − 2 stages and needs
// sizeof(conv_pipeline::Smem<V − 2>) bytes of dynamic shared memory. Each takes the parameters of
// its version-1 twin (conv2d_igemm_bf16, conv2d_igemm_bf16_splitk), written out because
// build/kernel_params.rs reads them from the signature to type the launch.
/// Version 4 of conv2d_igemm_bf16: 2 pipeline stages (same parameters and result).
extern "C" __global__ void __launch_bounds__(256)
    conv2d_igemm_bf16_v4(float* __restrict__ dst, const float* __restrict__ src, const __nv_bfloat16* __restrict__ wt,
                         const float* __restrict__ bias, const float* __restrict__ batch_bias,
                         const float* __restrict__ residual, int M, int RH, int RW, int N, int C, int SH, int SW, int ss,
                         int sy0, int sx0, int tys, int txs, int nty, int ntx, int tap0, int tapys, int tapxs, int bs_n,
                         int bs_t, int DH, int DW, int os, int dy0, int dx0, int accumulate) {
    conv_pipeline::igemm<2>(dst, src, wt, bias, batch_bias, residual, M, RH, RW, N, C, SH, SW, ss, sy0, sx0, tys, txs,
                            nty, ntx, tap0, tapys, tapxs, bs_n, bs_t, DH, DW, os, dy0, dx0, accumulate);
}
/// Version 4 of conv2d_igemm_bf16_splitk: 2 pipeline stages (same parameters and result).
extern "C" __global__ void __launch_bounds__(256)
    conv2d_igemm_bf16_splitk_v4(float* __restrict__ part, const float* __restrict__ src,
                                const __nv_bfloat16* __restrict__ wt, int M, int RH, int RW, int N, int C, int SH,
                                int SW, int ss, int sy0, int sx0, int tys, int txs, int nty, int ntx, int tap0,
                                int tapys, int tapxs, int bs_n, int bs_t, int kt_per_split) {
    conv_pipeline::igemm_splitk<2>(part, src, wt, M, RH, RW, N, C, SH, SW, ss, sy0, sx0, tys, txs, nty, ntx, tap0,
                                   tapys, tapxs, bs_n, bs_t, kt_per_split);
}

/// Version 5 of conv2d_igemm_bf16: 3 pipeline stages (same parameters and result).
extern "C" __global__ void __launch_bounds__(256)
    conv2d_igemm_bf16_v5(float* __restrict__ dst, const float* __restrict__ src, const __nv_bfloat16* __restrict__ wt,
                         const float* __restrict__ bias, const float* __restrict__ batch_bias,
                         const float* __restrict__ residual, int M, int RH, int RW, int N, int C, int SH, int SW, int ss,
                         int sy0, int sx0, int tys, int txs, int nty, int ntx, int tap0, int tapys, int tapxs, int bs_n,
                         int bs_t, int DH, int DW, int os, int dy0, int dx0, int accumulate) {
    conv_pipeline::igemm<3>(dst, src, wt, bias, batch_bias, residual, M, RH, RW, N, C, SH, SW, ss, sy0, sx0, tys, txs,
                            nty, ntx, tap0, tapys, tapxs, bs_n, bs_t, DH, DW, os, dy0, dx0, accumulate);
}
/// Version 5 of conv2d_igemm_bf16_splitk: 3 pipeline stages (same parameters and result).
extern "C" __global__ void __launch_bounds__(256)
    conv2d_igemm_bf16_splitk_v5(float* __restrict__ part, const float* __restrict__ src,
                                const __nv_bfloat16* __restrict__ wt, int M, int RH, int RW, int N, int C, int SH,
                                int SW, int ss, int sy0, int sx0, int tys, int txs, int nty, int ntx, int tap0,
                                int tapys, int tapxs, int bs_n, int bs_t, int kt_per_split) {
    conv_pipeline::igemm_splitk<3>(part, src, wt, M, RH, RW, N, C, SH, SW, ss, sy0, sx0, tys, txs, nty, ntx, tap0,
                                   tapys, tapxs, bs_n, bs_t, kt_per_split);
}

/// Version 6 of conv2d_igemm_bf16: 4 pipeline stages (same parameters and result).
extern "C" __global__ void __launch_bounds__(256)
    conv2d_igemm_bf16_v6(float* __restrict__ dst, const float* __restrict__ src, const __nv_bfloat16* __restrict__ wt,
                         const float* __restrict__ bias, const float* __restrict__ batch_bias,
                         const float* __restrict__ residual, int M, int RH, int RW, int N, int C, int SH, int SW, int ss,
                         int sy0, int sx0, int tys, int txs, int nty, int ntx, int tap0, int tapys, int tapxs, int bs_n,
                         int bs_t, int DH, int DW, int os, int dy0, int dx0, int accumulate) {
    conv_pipeline::igemm<4>(dst, src, wt, bias, batch_bias, residual, M, RH, RW, N, C, SH, SW, ss, sy0, sx0, tys, txs,
                            nty, ntx, tap0, tapys, tapxs, bs_n, bs_t, DH, DW, os, dy0, dx0, accumulate);
}
/// Version 6 of conv2d_igemm_bf16_splitk: 4 pipeline stages (same parameters and result).
extern "C" __global__ void __launch_bounds__(256)
    conv2d_igemm_bf16_splitk_v6(float* __restrict__ part, const float* __restrict__ src,
                                const __nv_bfloat16* __restrict__ wt, int M, int RH, int RW, int N, int C, int SH,
                                int SW, int ss, int sy0, int sx0, int tys, int txs, int nty, int ntx, int tap0,
                                int tapys, int tapxs, int bs_n, int bs_t, int kt_per_split) {
    conv_pipeline::igemm_splitk<4>(part, src, wt, M, RH, RW, N, C, SH, SW, ss, sy0, sx0, tys, txs, nty, ntx, tap0,
                                   tapys, tapxs, bs_n, bs_t, kt_per_split);
}
