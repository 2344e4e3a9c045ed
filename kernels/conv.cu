// 2-D convolution, forward and backward, as implicit GEMMs (no im2col buffer).
//
// Mirrors the CPU reference in src/ops/conv.rs (`Conv2dParams::cpu_forward`, `cpu_backward`):
// activations NHWC, weight (c_out, c_in, k, k) as PyTorch, pad [top, bottom, left, right], any stride.
//
// Two GEMM families, each in an exact f32 SIMT version and a bf16 tensor-core version
// (mma.sync.m16n8k16, operands rounded to bf16 when staged in shared memory, f32 accumulation):
//
//  * conv2d_igemm_*  "gather rows" GEMM  D[m, n] (=|+=) Σ_{tap, c} S[pix(m, tap), c] · Wt[n, tap, c]
//    Forward:   m = output pixel, n = c_out, S = input, Wt = weight permuted to (c_out, k·k, c_in).
//    Data grad: m = input pixel of one stride phase (iy ≡ py, ix ≡ px mod stride), n = c_in,
//               S = dout, Wt = weight permuted to (k·k, c_in, c_out); only the taps that reach that
//               phase are visited (for stride 1: all taps, one phase).
//    The reduction is walked tap by tap, 16 or 32 channels at a time, so every operand load reads
//    consecutive channels of one pixel (contiguous in NHWC, and in the permuted weight).
//  * conv2d_wgrad_*  dW[co, ci, tap] += Σ_p dout[p, co] · inp[pix(p, tap), ci]: one tap per block
//    row, the pixel sum split across grid.z, partial sums added with atomicAdd (so the weight
//    gradient's f32 summation order, and its last bits, vary from run to run).
// plus conv2d_weight_permute* (the weight layouts above; bf16 for the tensor-core kernels) and
// conv2d_bias_grad (column sums of dout).
#include "conv_igemm.cuh"

using namespace conv_detail;

// ---- weight layouts ---------------------------------------------------------------------------

// The destination of weight element i (see conv2d_weight_permute); -1 past the end.
__device__ __forceinline__ long long permuted_index(int total, int c_in, int taps, int s_co, int s_ci, int s_t) {
    const int i = blockIdx.x * 256 + threadIdx.x;
    if (i >= total) return -1;
    const int t = i % taps;
    const int r = i / taps;
    const int ci = r % c_in;
    const int co = r / c_in;
    return (long long)co * s_co + (long long)ci * s_ci + (long long)t * s_t;
}

/// out[co·s_co + ci·s_ci + t·s_t] = w[(co·c_in + ci)·taps + t] for the `total` = c_out·c_in·taps
/// elements of a PyTorch conv weight (c_out, c_in, kh, kw), taps = kh·kw. The forward uses
/// (c_out, taps, c_in) (s_co = taps·c_in, s_ci = 1, s_t = c_in), the data gradient (taps, c_in, c_out)
/// (s_co = 1, s_ci = c_out, s_t = c_in·c_out): the layouts conv2d_igemm_* reads channel-contiguously.
/// Launch: grid (⌈total/256⌉), block (256).
extern "C" __global__ void __launch_bounds__(256)
    conv2d_weight_permute(float* __restrict__ out, const float* __restrict__ w, int total, int c_in, int taps,
                          int s_co, int s_ci, int s_t) {
    const long long o = permuted_index(total, c_in, taps, s_co, s_ci, s_t);
    if (o >= 0) out[o] = w[blockIdx.x * 256 + threadIdx.x];
}

/// As conv2d_weight_permute, writing bf16 (what conv2d_igemm_bf16 reads): from the f32 weight,
/// rounded to nearest even, or from the backend's bf16 copy of a parameter pool.
extern "C" __global__ void __launch_bounds__(256)
    conv2d_weight_permute_bf16(__nv_bfloat16* __restrict__ out, const float* __restrict__ w, int total, int c_in,
                               int taps, int s_co, int s_ci, int s_t) {
    const long long o = permuted_index(total, c_in, taps, s_co, s_ci, s_t);
    if (o >= 0) out[o] = f2bf(w[blockIdx.x * 256 + threadIdx.x]);
}
extern "C" __global__ void __launch_bounds__(256)
    conv2d_weight_permute_bf16_copy(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ w, int total,
                                    int c_in, int taps, int s_co, int s_ci, int s_t) {
    const long long o = permuted_index(total, c_in, taps, s_co, s_ci, s_t);
    if (o >= 0) out[o] = w[blockIdx.x * 256 + threadIdx.x];
}

// ---- gather-rows implicit GEMM: forward and data gradient ---------------------------------------
//
// Parameters (both precisions):
//   dst    (batch, DH, DW, N); row m = (b, qy, qx) of a (batch, RH, RW) grid (M rows) goes to pixel
//          (qy·os + dy0, qx·os + dx0); overwritten (accumulate = 0) or added to (accumulate = 1),
//          after the epilogue of put_out: + bias[n], + batch_bias[b][n], + residual (laid out as
//          dst), each when non-null.
//   src    (batch, SH, SW, C); row m's source pixel for tap (jy, jx), jy < nty, jx < ntx, is
//          (qy·ss + sy0 + jy·tys, qx·ss + sx0 + jx·txs); pixels outside the image read as zero.
//   wt     element (n, tap, c) at n·bs_n + tap·bs_t + c, tap = tap0 + jy·tapys + jx·tapxs.
//   D[m, n] = Σ_{jy, jx, c < C} src[pix(m, jy, jx), c] · wt[n, tap(jy, jx), c].
// The forward: M = batch·oh·ow, RH×RW = DH×DW = oh×ow, os = 1, N = c_out, SH×SW×C = h×w×c_in,
// ss = stride, sy0 = −pt, sx0 = −pl, tys = txs = 1, nty = ntx = k, tap = ky·k + kx,
// wt (c_out, k·k, c_in). The data gradient of stride phase (py, px): RH×RW = the pixels iy ≡ py,
// ix ≡ px, DH×DW = h×w, os = stride, (dy0, dx0) = (py, px), N = c_in, SH×SW×C = oh×ow×c_out, ss = 1,
// jy walks ky = ky0 + jy·stride with ky0 = (py + pt) mod stride, oy = qy + (py + pt − ky0)/stride − jy
// (sy0 = (py + pt − ky0)/stride, tys = −1), wt (k·k, c_in, c_out). See conv.rs.

/// f32 SIMT version. Launch: grid (⌈M/64⌉, ⌈N/64⌉), block (256), no dynamic shared memory.
/// Thread (ty, tx) = (tid / 16, tid % 16) computes rows ty·4.., columns tx·4.. of the 64×64 tile.
extern "C" __global__ void __launch_bounds__(256)
    conv2d_igemm_f32(float* __restrict__ dst, const float* __restrict__ src, const float* __restrict__ wt,
                     const float* __restrict__ bias, const float* __restrict__ batch_bias,
                     const float* __restrict__ residual, int M, int RH, int RW, int N, int C, int SH, int SW, int ss,
                     int sy0, int sx0, int tys, int txs, int nty, int ntx, int tap0, int tapys, int tapxs, int bs_n,
                     int bs_t, int DH, int DW, int os, int dy0, int dx0, int accumulate) {
    // Tiles stored k-major: As[k][m], Bs[k][n] (the compute loop reads 4 consecutive m / n).
    __shared__ __align__(16) float As[F_BK][F_BM + F_PAD];
    __shared__ __align__(16) float Bs[F_BK][F_BN + F_PAD];
    const int tid = threadIdx.x;
    const int m0 = blockIdx.x * F_BM, n0 = blockIdx.y * F_BN;

    // Loader: thread loads channels lk..lk+3 of A row lrow and of B row (output column) lrow.
    const int lrow = tid >> 2, lk = (tid & 3) * 4;
    const RowGeo ag = row_geo(m0 + lrow, M, RH, RW, SH, ss, sy0, sx0);
    const int bn = n0 + lrow;
    const bool a_vec = (C % 4 == 0) && aligned16(src);
    const bool b_vec = (C % 4 == 0) && (bs_n % 4 == 0) && (bs_t % 4 == 0) && aligned16(wt);
    const int ktiles = nty * ntx * CEIL_DIV(C, F_BK);

    KPos kp = {0, 0, 0};
    float4 ra = make_float4(0.f, 0.f, 0.f, 0.f), rb = ra;
    auto load = [&]() {
        const int c = kp.c0 + lk;
        const long long so = src_offset(ag, kp.jy * tys, kp.jx * txs, SH, SW, C);
        ra = load4(so >= 0 ? src + so + c : src, so >= 0 ? C - c : 0, a_vec);
        const int tap = tap0 + kp.jy * tapys + kp.jx * tapxs;
        rb = load4(bn < N ? wt + (size_t)bn * bs_n + (size_t)tap * bs_t + c : wt, bn < N ? C - c : 0, b_vec);
        kpos_next(kp, F_BK, C, ntx);
    };

    const int tx = tid & 15, ty = tid >> 4;
    float acc[4][4] = {};

    if (ktiles > 0) load();
    for (int kt = 0; kt < ktiles; ++kt) {
        As[lk + 0][lrow] = ra.x;
        As[lk + 1][lrow] = ra.y;
        As[lk + 2][lrow] = ra.z;
        As[lk + 3][lrow] = ra.w;
        Bs[lk + 0][lrow] = rb.x;
        Bs[lk + 1][lrow] = rb.y;
        Bs[lk + 2][lrow] = rb.z;
        Bs[lk + 3][lrow] = rb.w;
        __syncthreads();
        if (kt + 1 < ktiles) load();  // the next tile's global loads overlap this tile's math
        f_tile_fma(acc, As, Bs, ty, tx);
        __syncthreads();
    }

    f_tile_store(acc, m0 + ty * 4, n0 + tx * 4, M, N, [&](int m, int n, float v) {
        put_out(dst, v, bias, batch_bias, residual, m, n, RH, RW, DH, DW, os, dy0, dx0, N, accumulate);
    });
}


// The bf16 tensor-core GEMM of one 128×64 block tile (rows m0.., columns n0..) over reduction tiles
// [kt_begin, kt_end), each H_BK channels of one tap, in order; each result element goes to
// store(m, n, v). As/Bs: the block's shared tiles. Shared by conv2d_igemm_bf16 (all tiles) and
// conv2d_igemm_bf16_splitk (a range per grid.z).
template <class Store>
__device__ __forceinline__ void igemm_bf16_tiles(uint32_t (*As)[H_LDW], uint32_t (*Bs)[H_LDW], int m0, int n0,
                                                 const float* __restrict__ src, const __nv_bfloat16* __restrict__ wt,
                                                 int M, int RH, int RW, int N, int C, int SH, int SW, int ss, int sy0,
                                                 int sx0, int tys, int txs, int ntx, int tap0, int tapys, int tapxs,
                                                 int bs_n, int bs_t, int kt_begin, int kt_end, Store store) {
    IgemmBf16Loader ld(m0, n0, src, wt, M, RH, RW, N, C, SH, SW, ss, sy0, sx0, tys, txs, ntx, tap0, tapys, tapxs,
                       bs_n, bs_t, kt_begin);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int wm0 = (warp & 3) * 32, wn0 = (warp >> 2) * 32;
    float acc[2][4][4] = {};

    if (kt_begin < kt_end) ld.load();
    for (int kt = kt_begin; kt < kt_end; ++kt) {
        ld.store(As, Bs);
        __syncthreads();
        if (kt + 1 < kt_end) ld.load();  // the next tile's global loads overlap this tile's math
#pragma unroll
        for (int ks = 0; ks < H_BK / 16; ++ks) warp_mma_32x32(acc, As, Bs, wm0, wn0, ks * 8, g, t);
        __syncthreads();
    }

    warp_tile_32x32_store(acc, m0 + wm0, n0 + wn0, M, N, g, t, store);
}

/// bf16 tensor-core version (same parameters and result, operands rounded to bf16; the weight
/// arrives in bf16, from conv2d_weight_permute_bf16*).
/// Launch: grid (⌈M/128⌉, ⌈N/64⌉), block (256), no dynamic shared memory (15 KiB static).
/// Warp w computes rows (w % 4)·32.., columns (w / 4)·32.. of the 128×64 tile.
extern "C" __global__ void __launch_bounds__(256)
    conv2d_igemm_bf16(float* __restrict__ dst, const float* __restrict__ src, const __nv_bfloat16* __restrict__ wt,
                      const float* __restrict__ bias, const float* __restrict__ batch_bias,
                     const float* __restrict__ residual, int M, int RH, int RW, int N, int C, int SH, int SW, int ss,
                      int sy0, int sx0, int tys, int txs, int nty, int ntx, int tap0, int tapys, int tapxs, int bs_n,
                      int bs_t, int DH, int DW, int os, int dy0, int dx0, int accumulate) {
    __shared__ __align__(16) uint32_t As[H_BM][H_LDW];  // As[m][k-pair]
    __shared__ __align__(16) uint32_t Bs[H_BN][H_LDW];  // Bs[n][k-pair]
    igemm_bf16_tiles(As, Bs, blockIdx.x * H_BM, blockIdx.y * H_BN, src, wt, M, RH, RW, N, C, SH, SW, ss, sy0, sx0, tys,
                     txs, ntx, tap0, tapys, tapxs, bs_n, bs_t, 0, nty * ntx * CEIL_DIV(C, H_BK),
                     [&](int m, int n, float v) {
                         put_out(dst, v, bias, batch_bias, residual, m, n, RH, RW, DH, DW, os, dy0, dx0, N, accumulate);
                     });
}

// ---- split-K, version 2 of the conv family (issue 18: ROENTGEN_KERNELS=conv=2) -------------------
// What it changes: where fewer than 2 × SM-count blocks of 128×64 would launch (SD's 16×16 and 8×8
// U-Net levels at 512²: batch 2 × 8×8 × 1280 channels is 1 × 20 = 20 blocks on 132 SMs), the
// reduction (taps × channels) is split over grid.z: block z computes tiles
// [z·kt_per_split, (z+1)·kt_per_split) into its own slice of a f32 workspace, and
// conv2d_splitk_reduce adds the slices in z order (deterministic, no atomics), then the bias, the
// store and the accumulate flag as the one-pass kernel does.
// Roofline: the 8×8×1280 → 1280 3×3 conv at batch 2 is 2·128·1280·11520 = 3.8 GFLOP; on 20 of 132
// SMs it cannot exceed 15% of the tensor cores (~0.1 ms at the ~25% issue-bound rate of v1's inner
// loop). Split 14 ways it fills 280 blocks (all SMs, two waves) for an extra 2 × 14·128·1280·4 B =
// 18 MB of workspace traffic (~6 µs at 3.35 TB/s): expected 3–5× on those layers, ≈1–2 ms of the
// step. Numerics: the same products, summed per split then across splits (f32): a different
// rounding order, within the autotune gate.

/// part[z][m][n] = Σ over block z's reduction tiles (row-major M×N slices, no bias).
/// Launch: grid (⌈M/128⌉, ⌈N/64⌉, splits), block (256).
extern "C" __global__ void __launch_bounds__(256)
    conv2d_igemm_bf16_splitk(float* __restrict__ part, const float* __restrict__ src,
                             const __nv_bfloat16* __restrict__ wt, int M, int RH, int RW, int N, int C, int SH, int SW,
                             int ss, int sy0, int sx0, int tys, int txs, int nty, int ntx, int tap0, int tapys,
                             int tapxs, int bs_n, int bs_t, int kt_per_split) {
    __shared__ __align__(16) uint32_t As[H_BM][H_LDW];
    __shared__ __align__(16) uint32_t Bs[H_BN][H_LDW];
    const int ktiles = nty * ntx * CEIL_DIV(C, H_BK);
    const int kt_begin = min(ktiles, (int)blockIdx.z * kt_per_split);
    const int kt_end = min(ktiles, kt_begin + kt_per_split);
    float* out = part + (size_t)blockIdx.z * M * N;
    igemm_bf16_tiles(As, Bs, blockIdx.x * H_BM, blockIdx.y * H_BN, src, wt, M, RH, RW, N, C, SH, SW, ss, sy0, sx0, tys,
                     txs, ntx, tap0, tapys, tapxs, bs_n, bs_t, kt_begin, kt_end,
                     [&](int m, int n, float v) { out[(size_t)m * N + n] = v; });
}

/// dst row m (as conv2d_igemm_*) = Σ_z part[z][m] (z in order), then put_out's epilogue (bias,
/// batch bias, residual), stored or accumulated.
/// Launch: 1-D grid-stride over M·N, block 256.
extern "C" __global__ void conv2d_splitk_reduce(float* __restrict__ dst, const float* __restrict__ part,
                                                const float* __restrict__ bias,
                                                const float* __restrict__ batch_bias,
                                                const float* __restrict__ residual, int splits, int M, int RH, int RW,
                                                int N, int DH, int DW, int os, int dy0, int dx0, int accumulate) {
    GRID_STRIDE(i, (long long)M * N) {
        const int m = (int)(i / N), n = (int)(i - (long long)m * N);
        float s = 0.f;
        for (int z = 0; z < splits; ++z) s += part[(size_t)z * M * N + i];
        put_out(dst, s, bias, batch_bias, residual, m, n, RH, RW, DH, DW, os, dy0, dx0, N, accumulate);
    }
}

// ---- ldmatrix operands and two shared stages: version 3 of the conv family -----------------------
// What it changes (on top of version 2's split-K choice, which it keeps):
//  * fragments by ldmatrix.x4: per warp and 16-deep step, 2 instructions for A's two m16 tiles and
//    2 for B's four n8 tiles, instead of 16 scalar LDS.32 with their address arithmetic (v1's
//    warp_mma_32x32). The tiles keep v1's layout: rows of H_LDW = 20 words (80 bytes) put the 8
//    row addresses of each 8×8 matrix on 8 distinct 4-bank groups (0, 20, 8, 28, 16, 4, 24, 12 mod
//    32 words): conflict-free, and every row address 16-byte aligned as ldmatrix requires;
//  * two shared stages (30 KiB static): tile kt+1's registers go to the other stage while tile kt's
//    mmas run, so one __syncthreads per tile instead of two.
// Roofline: v1's inner loop issues ≈16 LDS + 8 HMMA + ≈20 integer instructions per warp per
// 16-deep step (issue-bound near a quarter of the tensor-core peak by the issue's reading); v3
// issues 4 LDSM + 8 HMMA + ≈6: expected ≈1.5–2× on the large convolutions (64×64 and 32×32
// latents), where the grid already fills the device. 30 KiB of shared memory and ≈96 registers
// still allow two blocks per SM.
// Numerics: the same products in the same order as v1 (and as v2 where it splits): bit for bit
// the same results, which the emulated cases check.

// As igemm_bf16_tiles, with two stages As[2], Bs[2] and ldmatrix fragments.
template <class Store>
__device__ __forceinline__ void igemm_bf16_tiles_v3(uint32_t (*As)[H_BM][H_LDW], uint32_t (*Bs)[H_BN][H_LDW], int m0,
                                                    int n0, const float* __restrict__ src,
                                                    const __nv_bfloat16* __restrict__ wt, int M, int RH, int RW, int N,
                                                    int C, int SH, int SW, int ss, int sy0, int sx0, int tys, int txs,
                                                    int ntx, int tap0, int tapys, int tapxs, int bs_n, int bs_t,
                                                    int kt_begin, int kt_end, Store store) {
    IgemmBf16Loader ld(m0, n0, src, wt, M, RH, RW, N, C, SH, SW, ss, sy0, sx0, tys, txs, ntx, tap0, tapys, tapxs,
                       bs_n, bs_t, kt_begin);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int wm0 = (warp & 3) * 32, wn0 = (warp >> 2) * 32;
    float acc[2][4][4] = {};

    if (kt_begin < kt_end) {
        ld.load();
        ld.store(As[0], Bs[0]);
    }
    __syncthreads();
    for (int kt = kt_begin; kt < kt_end; ++kt) {
        const int s = (kt - kt_begin) & 1;
        const bool more = kt + 1 < kt_end;
        if (more) ld.load();  // global loads of tile kt+1 in flight during tile kt's mmas
#pragma unroll
        for (int ks = 0; ks < H_BK / 16; ++ks) warp_mma_32x32_ldsm(acc, As[s], Bs[s], wm0, wn0, ks * 8, lane);
        // Stage s^1 was last read in iteration kt−1, before its closing barrier: free to refill.
        if (more) ld.store(As[s ^ 1], Bs[s ^ 1]);
        __syncthreads();
    }

    warp_tile_32x32_store(acc, m0 + wm0, n0 + wn0, M, N, g, t, store);
}

/// Version 3 of conv2d_igemm_bf16 (same parameters, launch and result).
extern "C" __global__ void __launch_bounds__(256)
    conv2d_igemm_bf16_v3(float* __restrict__ dst, const float* __restrict__ src, const __nv_bfloat16* __restrict__ wt,
                         const float* __restrict__ bias, const float* __restrict__ batch_bias,
                     const float* __restrict__ residual, int M, int RH, int RW, int N, int C, int SH, int SW, int ss,
                         int sy0, int sx0, int tys, int txs, int nty, int ntx, int tap0, int tapys, int tapxs, int bs_n,
                         int bs_t, int DH, int DW, int os, int dy0, int dx0, int accumulate) {
    __shared__ __align__(16) uint32_t As[2][H_BM][H_LDW];
    __shared__ __align__(16) uint32_t Bs[2][H_BN][H_LDW];
    igemm_bf16_tiles_v3(As, Bs, blockIdx.x * H_BM, blockIdx.y * H_BN, src, wt, M, RH, RW, N, C, SH, SW, ss, sy0, sx0,
                        tys, txs, ntx, tap0, tapys, tapxs, bs_n, bs_t, 0, nty * ntx * CEIL_DIV(C, H_BK),
                        [&](int m, int n, float v) {
                            put_out(dst, v, bias, batch_bias, residual, m, n, RH, RW, DH, DW, os, dy0, dx0, N, accumulate);
                        });
}

/// Version 3 of conv2d_igemm_bf16_splitk (same parameters, launch and result).
extern "C" __global__ void __launch_bounds__(256)
    conv2d_igemm_bf16_splitk_v3(float* __restrict__ part, const float* __restrict__ src,
                                const __nv_bfloat16* __restrict__ wt, int M, int RH, int RW, int N, int C, int SH,
                                int SW, int ss, int sy0, int sx0, int tys, int txs, int nty, int ntx, int tap0,
                                int tapys, int tapxs, int bs_n, int bs_t, int kt_per_split) {
    __shared__ __align__(16) uint32_t As[2][H_BM][H_LDW];
    __shared__ __align__(16) uint32_t Bs[2][H_BN][H_LDW];
    const int ktiles = nty * ntx * CEIL_DIV(C, H_BK);
    const int kt_begin = min(ktiles, (int)blockIdx.z * kt_per_split);
    const int kt_end = min(ktiles, kt_begin + kt_per_split);
    float* out = part + (size_t)blockIdx.z * M * N;
    igemm_bf16_tiles_v3(As, Bs, blockIdx.x * H_BM, blockIdx.y * H_BN, src, wt, M, RH, RW, N, C, SH, SW, ss, sy0, sx0,
                        tys, txs, ntx, tap0, tapys, tapxs, bs_n, bs_t, kt_begin, kt_end,
                        [&](int m, int n, float v) { out[(size_t)m * N + n] = v; });
}

// ---- weight gradient ----------------------------------------------------------------------------
//
// dw[(co·c_in + ci)·k² + tap] += Σ_{p in this block's pixel range} dout[p, co] · inp[pix(p, tap), ci],
// p over the batch·oh·ow output pixels, pix(p, tap) the input pixel (oy·stride − pt + ky,
// ox·stride − pl + kx) (zero in the padding), tap = ky·k + kx: the GEMM dW_tap = doutᵀ · patches_tap
// of ops/conv.rs `Conv2dParams::cpu_backward`. Block (x, y, z): output channels x·BM.., tap y / ⌈c_in/BN⌉, input channels
// (y mod ⌈c_in/BN⌉)·BN.., pixels [z·chunk, min(P, (z+1)·chunk)) (chunk a multiple of the tile
// depth). Blocks of different z add into the same dw elements with atomicAdd.

// What block (x, y, z) of a weight-gradient launch computes (see above) for BM×BN tiles.
struct WgradTile {
    int co0, ci0, tap, p_begin, p_end;
};
template <int BM, int BN>
__device__ __forceinline__ WgradTile wgrad_tile(int c_in, int k, int P, int chunk) {
    const int ci_tiles = CEIL_DIV(c_in, BN), p_begin = blockIdx.z * chunk;
    return {(int)blockIdx.x * BM, (int)(blockIdx.y % ci_tiles) * BN, (int)blockIdx.y / ci_tiles, p_begin,
            min(P, p_begin + chunk)};
}

/// f32 SIMT version. Launch: grid (⌈c_out/64⌉, ⌈c_in/64⌉·k², splits), block (256).
extern "C" __global__ void __launch_bounds__(256)
    conv2d_wgrad_f32(float* __restrict__ dw, const float* __restrict__ dout, const float* __restrict__ x, int P,
                     int oh, int ow, int h, int w, int c_in, int c_out, int k, int stride, int pt, int pl, int chunk) {
    __shared__ __align__(16) float As[F_BK][F_BM + F_PAD];  // As[p][co]
    __shared__ __align__(16) float Bs[F_BK][F_BN + F_PAD];  // Bs[p][ci]
    const int tid = threadIdx.x;
    const WgradTile tile = wgrad_tile<F_BM, F_BN>(c_in, k, P, chunk);
    const int co0 = tile.co0, ci0 = tile.ci0, tap = tile.tap, ky = tap / k, kx = tap % k;
    const int p_begin = tile.p_begin, p_end = tile.p_end;

    // Loader: thread loads channels lc..lc+3 of pixel p_tile + lp (16 threads per pixel row).
    const int lp = tid >> 4, lc = (tid & 15) * 4;
    const bool a_vec = (c_out % 4 == 0) && aligned16(dout);
    const bool b_vec = (c_in % 4 == 0) && aligned16(x);
    float4 ra = make_float4(0.f, 0.f, 0.f, 0.f), rb = ra;
    auto load = [&](int pb) {
        const int p = pb + lp;
        const bool ok = p < p_end;
        const int co = co0 + lc, ci = ci0 + lc;
        ra = load4(ok ? dout + (size_t)p * c_out + co : dout, ok ? c_out - co : 0, a_vec);
        long long xo = -1;
        if (ok) xo = tap_offset(pix_of(p, oh, ow), ky, kx, stride, pt, pl, h, w, c_in);
        rb = load4(xo >= 0 ? x + xo + ci : x, xo >= 0 ? c_in - ci : 0, b_vec);
    };

    const int tx = tid & 15, ty = tid >> 4;  // rows (co) ty·4.., columns (ci) tx·4..
    float acc[4][4] = {};

    if (p_begin < p_end) load(p_begin);
    for (int pb = p_begin; pb < p_end; pb += F_BK) {
        *reinterpret_cast<float4*>(&As[lp][lc]) = ra;
        *reinterpret_cast<float4*>(&Bs[lp][lc]) = rb;
        __syncthreads();
        if (pb + F_BK < p_end) load(pb + F_BK);
        f_tile_fma(acc, As, Bs, ty, tx);
        __syncthreads();
    }
    if (p_begin >= p_end) return;

    const int taps = k * k;
    // Rows are output channels, columns input channels of dW_tap.
    f_tile_store(acc, co0 + ty * 4, ci0 + tx * 4, c_out, c_in, [&](int co, int ci, float v) {
        atomicAdd(dw + ((size_t)co * c_in + ci) * taps + tap, v);  // split-pixel partial sums
    });
}

/// bf16 tensor-core version (same parameters and result, operands rounded to bf16; the weight
/// arrives in bf16, from conv2d_weight_permute_bf16*).
/// Launch: grid (⌈c_out/128⌉, ⌈c_in/64⌉·k², splits), block (256); warp w computes output channels
/// (w % 4)·32.., input channels (w / 4)·32.. of the 128×64 tile; the reduction tile is 32 pixels.
/// Loader unit u: channel quad q = (u & 1) + 2·(u >> 5), pixel pair pp = (u >> 1) & 15, i.e. pixels
/// 2pp, 2pp+1 of the tile, 4 channels each; the two pixels' values go to one bf16x2 word per channel
/// (word pp of row channel): a warp's stores hit 32 distinct banks, its loads read 16 pixels × 32 B.
extern "C" __global__ void __launch_bounds__(256)
    conv2d_wgrad_bf16(float* __restrict__ dw, const float* __restrict__ dout, const float* __restrict__ x, int P,
                      int oh, int ow, int h, int w, int c_in, int c_out, int k, int stride, int pt, int pl,
                      int chunk) {
    __shared__ __align__(16) uint32_t As[H_BM][H_LDW];  // As[co][pixel pair]
    __shared__ __align__(16) uint32_t Bs[H_BN][H_LDW];  // Bs[ci][pixel pair]
    const int tid = threadIdx.x;
    const WgradTile tile = wgrad_tile<H_BM, H_BN>(c_in, k, P, chunk);
    const int co0 = tile.co0, ci0 = tile.ci0, tap = tile.tap, ky = tap / k, kx = tap % k;
    const int p_begin = tile.p_begin, p_end = tile.p_end;

    // A units tid and tid + 256 (quads 0..31 of 128 channels), B unit tid (quads 0..15 of 64).
    const int pp = (tid >> 1) & 15;
    const int qa0 = (tid & 1) + 2 * (tid >> 5);  // quad of unit tid; unit tid + 256 has quad qa0 + 16
    const bool a_vec = (c_out % 4 == 0) && aligned16(dout);
    const bool b_vec = (c_in % 4 == 0) && aligned16(x);
    // Pixel 2pp of the current load tile, tracked incrementally (step H_BK pixels per tile).
    Pix q0 = pix_of(p_begin + 2 * pp, oh, ow);
    const int step_y = H_BK / ow, step_x = H_BK % ow, one_y = 1 / ow, one_x = 1 % ow;

    float4 ra[2][2], rb[2];  // [unit][pixel], [pixel]
    auto load = [&](int pb) {
        Pix q = q0;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int p = pb + 2 * pp + e;
            const bool ok = p < p_end;
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int co = co0 + 4 * (qa0 + 16 * u);
                ra[u][e] = load4(ok ? dout + (size_t)p * c_out + co : dout, ok ? c_out - co : 0, a_vec);
            }
            const int ci = ci0 + 4 * qa0;
            long long xo = -1;
            if (ok) xo = tap_offset(q, ky, kx, stride, pt, pl, h, w, c_in);
            rb[e] = load4(xo >= 0 ? x + xo + ci : x, xo >= 0 ? c_in - ci : 0, b_vec);
            if (e == 0) pix_advance(q, one_y, one_x, oh, ow);  // pixel 2pp + 1
        }
        pix_advance(q0, step_y, step_x, oh, ow);  // pixel 2pp of the next tile
    };

    const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int wm0 = (warp & 3) * 32, wn0 = (warp >> 2) * 32;
    float acc[2][4][4] = {};

    if (p_begin < p_end) load(p_begin);
    for (int pb = p_begin; pb < p_end; pb += H_BK) {
        // Channel c of a quad gets the word (pixel 2pp, pixel 2pp+1) at k-pair pp.
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const int row = 4 * (qa0 + 16 * u);
            As[row + 0][pp] = pack_bf16x2(ra[u][0].x, ra[u][1].x);
            As[row + 1][pp] = pack_bf16x2(ra[u][0].y, ra[u][1].y);
            As[row + 2][pp] = pack_bf16x2(ra[u][0].z, ra[u][1].z);
            As[row + 3][pp] = pack_bf16x2(ra[u][0].w, ra[u][1].w);
        }
        {
            const int row = 4 * qa0;
            Bs[row + 0][pp] = pack_bf16x2(rb[0].x, rb[1].x);
            Bs[row + 1][pp] = pack_bf16x2(rb[0].y, rb[1].y);
            Bs[row + 2][pp] = pack_bf16x2(rb[0].z, rb[1].z);
            Bs[row + 3][pp] = pack_bf16x2(rb[0].w, rb[1].w);
        }
        __syncthreads();
        if (pb + H_BK < p_end) load(pb + H_BK);
#pragma unroll
        for (int ks = 0; ks < H_BK / 16; ++ks) warp_mma_32x32(acc, As, Bs, wm0, wn0, ks * 8, g, t);
        __syncthreads();
    }
    if (p_begin >= p_end) return;

    const int taps = k * k;
    // Rows are output channels, columns input channels of dW_tap.
    warp_tile_32x32_store(acc, co0 + wm0, ci0 + wn0, c_out, c_in, g, t, [&](int co, int ci, float v) {
        atomicAdd(dw + ((size_t)co * c_in + ci) * taps + tap, v);  // split-pixel partial sums
    });
}

// ---- bias gradient ------------------------------------------------------------------------------

/// db[c] += Σ_r dout[r, c] over rows [y·chunk, min(rows, (y+1)·chunk)) for block (x, y), c in
/// x·32..x·32+31: the column sums of ops/linear.rs `column_sums_into`. Launch: grid (⌈n/32⌉, splits),
/// block (256) = 8 row lanes × 32 columns; blocks of different y add with atomicAdd.
extern "C" __global__ void __launch_bounds__(256)
    conv2d_bias_grad(float* __restrict__ db, const float* __restrict__ dout, int rows, int n, int chunk) {
    __shared__ float part[8][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const int c = blockIdx.x * 32 + tx;
    const int r0 = blockIdx.y * chunk, r1 = min(rows, r0 + chunk);
    float s = 0.f;
    if (c < n)
        for (int r = r0 + ty; r < r1; r += 8) s += dout[(size_t)r * n + c];
    part[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && c < n) {
#pragma unroll
        for (int i = 1; i < 8; ++i) s += part[i][tx];
        atomicAdd(db + c, s);
    }
}

// im2col_forward: out (rows, c·kh·kw), row = (b, oy, ox), column (ci·kh + ky)·kw + kx = the input
// at (oy·stride − pt + ky, ox·stride − pl + kx, ci), zero outside (ops/conv.rs `Im2colParams`; the
// inference-only path of Inception's rectangular kernels). Launch: 1-D grid-stride over rows·c·kh·kw.
extern "C" __global__ void conv2d_im2col(float* __restrict__ out, const float* __restrict__ inp, int h, int w, int c,
                                         int oh, int ow, int kh, int kw, int stride, int pt, int pl, int n) {
    const unsigned patch = (unsigned)c * kh * kw;
    GRID_STRIDE(i, n) {
        const unsigned ui = (unsigned)i;
        const unsigned row = ui / patch, col = ui - row * patch;
        const unsigned ci = col / (unsigned)(kh * kw), tap = col - ci * (unsigned)(kh * kw);
        const unsigned ky = tap / (unsigned)kw, kx = tap - ky * (unsigned)kw;
        const unsigned t = row / (unsigned)ow, ox = row - t * (unsigned)ow;
        const unsigned b = t / (unsigned)oh, oy = t - b * (unsigned)oh;
        const int iy = (int)(oy * stride + ky) - pt, ix = (int)(ox * stride + kx) - pl;
        out[i] = (iy >= 0 && iy < h && ix >= 0 && ix < w) ? inp[(((size_t)b * h + iy) * w + ix) * c + ci] : 0.0f;
    }
}
