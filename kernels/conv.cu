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
#include "common.cuh"

namespace conv_detail {

// ---- shared helpers ---------------------------------------------------------------------------

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// p[0..3], of which only the first `n` are read (n ≤ 0: nothing is read, zeros returned); one
// 16-byte load when all four are valid and `vec` says p is 16-byte aligned.
__device__ __forceinline__ float4 load4(const float* p, int n, bool vec) {
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (n >= 4 && vec) {
        v = __ldg(reinterpret_cast<const float4*>(p));
    } else {
        if (n > 0) v.x = __ldg(p);
        if (n > 1) v.y = __ldg(p + 1);
        if (n > 2) v.z = __ldg(p + 2);
        if (n > 3) v.w = __ldg(p + 3);
    }
    return v;
}

// Geometry of one row m of a conv2d_igemm GEMM: m = (b, qy, qx) over a (batch, RH, RW) grid, and the
// source pixel of reduction tap (jy, jx) is (y + jy·tys, x + jx·txs) of image b, where
// y = qy·ss + sy0, x = qx·ss + sx0. rb = b·SH, or -1 for rows past M (always read as zero).
struct RowGeo {
    int rb, y, x;
};

__device__ __forceinline__ RowGeo row_geo(int m, int M, int RH, int RW, int SH, int ss, int sy0, int sx0) {
    RowGeo g;
    if (m >= M) {
        g.rb = -1;
        g.y = 0;
        g.x = 0;
        return g;
    }
    const int b = m / (RH * RW);
    const int r = m - b * (RH * RW);
    const int qy = r / RW;
    const int qx = r - qy * RW;
    g.rb = b * SH;
    g.y = qy * ss + sy0;
    g.x = qx * ss + sx0;
    return g;
}

// Element offset of channel 0 of the source pixel at (g.y + dy, g.x + dx), or -1 when that pixel is
// in the padding (or the row is past M).
__device__ __forceinline__ long long src_offset(const RowGeo& g, int dy, int dx, int SH, int SW, int C) {
    const int y = g.y + dy, x = g.x + dx;
    if (g.rb < 0 || y < 0 || y >= SH || x < 0 || x >= SW) return -1;
    return ((long long)(g.rb + y) * SW + x) * C;
}

// Element offset of channel 0 of row m's destination pixel: m = (b, qy, qx) over (batch, RH, RW),
// written at pixel (qy·os + dy0, qx·os + dx0) of a (batch, DH, DW, N) tensor. m < M.
__device__ __forceinline__ long long dst_offset(int m, int RH, int RW, int DH, int DW, int os, int dy0, int dx0, int N) {
    const int b = m / (RH * RW);
    const int r = m - b * (RH * RW);
    const int qy = r / RW;
    const int qx = r - qy * RW;
    return ((long long)(b * DH + qy * os + dy0) * DW + (qx * os + dx0)) * N;
}

// Position of the next reduction tile of conv2d_igemm: tap (jy, jx) of (nty, ntx), channels c0.. .
struct KPos {
    int jy, jx, c0;
};

__device__ __forceinline__ void kpos_next(KPos& k, int BK, int C, int ntx) {
    k.c0 += BK;
    if (k.c0 >= C) {
        k.c0 = 0;
        if (++k.jx == ntx) {
            k.jx = 0;
            ++k.jy;
        }
    }
}

// An output pixel p = (b, y, x) of the (batch, oh, ow) grid, walked forward without divisions.
struct Pix {
    int b, y, x;
};

__device__ __forceinline__ Pix pix_of(int p, int oh, int ow) {
    Pix q;
    q.b = p / (oh * ow);
    const int r = p - q.b * (oh * ow);
    q.y = r / ow;
    q.x = r - q.y * ow;
    return q;
}

// Advances q by dy·ow + dx pixels (0 ≤ dx < ow, dy ≥ 0).
__device__ __forceinline__ void pix_advance(Pix& q, int dy, int dx, int oh, int ow) {
    q.x += dx;
    q.y += dy;
    if (q.x >= ow) {
        q.x -= ow;
        q.y += 1;
    }
    while (q.y >= oh) {
        q.y -= oh;
        q.b += 1;
    }
}

// Element offset of channel 0 of the input pixel read by output pixel q through tap (ky, kx), or
// -1 in the padding. Forward geometry: iy = oy·stride − pt + ky.
__device__ __forceinline__ long long tap_offset(const Pix& q, int ky, int kx, int stride, int pt, int pl, int h, int w,
                                                int c) {
    const int iy = q.y * stride - pt + ky, ix = q.x * stride - pl + kx;
    if (iy < 0 || iy >= h || ix < 0 || ix >= w) return -1;
    return ((long long)(q.b * h + iy) * w + ix) * c;
}

// Stores v into dst: overwrite, or add to what is there (the backward ops accumulate).
__device__ __forceinline__ void put(float* p, float v, int accumulate) {
    if (accumulate)
        *p += v;
    else
        *p = v;
}

// Element (m, n) of a conv2d_igemm result into dst: v + bias[n], then + batch_bias[image of m][n]
// (the time embedding a U-Net resnet adds after its first convolution), then + the residual at
// the same element (the shortcut a resnet adds after its second), each when given (non-null;
// the data gradient passes none). That is the order of the separate layers this replaces, so
// fused and unfused results agree to the bit. Stored, or added with `accumulate`.
__device__ __forceinline__ void put_out(float* __restrict__ dst, float v, const float* __restrict__ bias,
                                        const float* __restrict__ batch_bias, const float* __restrict__ residual,
                                        int m, int n, int RH, int RW, int DH, int DW, int os, int dy0, int dx0, int N,
                                        int accumulate) {
    const long long o = dst_offset(m, RH, RW, DH, DW, os, dy0, dx0, N) + n;
    v = v + (bias ? bias[n] : 0.f);
    if (batch_bias) v += batch_bias[(size_t)(m / (RH * RW)) * N + n];
    if (residual) v += residual[o];
    put(dst + o, v, accumulate);
}

// Tile shapes.
// f32 SIMT: 64×64 block tile, 16-deep reduction tile, 256 threads, 4×4 outputs per thread.
constexpr int F_BM = 64, F_BN = 64, F_BK = 16, F_PAD = 4;

// Hands each element of a thread's 4×4 register tile inside (rows, cols) to store(row, col, v):
// acc[i][j] is the element (row0 + i, col0 + j).
template <class Store>
__device__ __forceinline__ void f_tile_store(const float acc[4][4], int row0, int col0, int rows, int cols,
                                             Store store) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (row0 + i >= rows) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (col0 + j < cols) store(row0 + i, col0 + j, acc[i][j]);
    }
}

// One staged K slice of the fp32 tiles into a thread's 4×4 register tile:
// acc[i][j] += Σ_k As[k][ty·4 + i] · Bs[k][tx·4 + j], k < F_BK, in k order (fmaf, as both callers did).
static __device__ __forceinline__ void f_tile_fma(float acc[4][4], const float (*As)[F_BM + F_PAD],
                                                  const float (*Bs)[F_BN + F_PAD], int ty, int tx) {
#pragma unroll
    for (int k = 0; k < F_BK; ++k) {
        const float4 a = *reinterpret_cast<const float4*>(&As[k][ty * 4]);
        const float4 b = *reinterpret_cast<const float4*>(&Bs[k][tx * 4]);
        const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
}
// bf16 mma: 128×64 block tile, 32-deep reduction tile, 256 threads = 8 warps as 4 (M) × 2 (N), each
// warp 32×32 = 2 (m16) × 4 (n8) mma tiles. Shared tiles hold bf16 pairs as 32-bit words, row-major
// with the reduction index k contiguous: word kw of a row holds k = 2kw (low half) and 2kw+1 (high
// half). Rows are H_LDW = 20 words (16 data + 4 padding): fragment loads at word g·20 + t (g < 8,
// t < 4) fall in 32 distinct banks.
constexpr int H_BM = 128, H_BN = 64, H_BK = 32, H_LDW = H_BK / 2 + 4;

// One m16n8k16 step of a warp's 32×32 tile from shared tiles As (rows m) and Bs (rows n), reduction
// words kw0..kw0+7 (k = 2·kw0 .. 2·kw0+15). Fragment layouts (PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type", .bf16), g = lane >> 2, t = lane & 3:
//   A (16×16, row-major) a[0] = A[g][2t, 2t+1]    a[1] = A[g+8][2t, 2t+1]
//                        a[2] = A[g][2t+8, 2t+9]  a[3] = A[g+8][2t+8, 2t+9]
//   B (16×8, "col": stored per column n, k contiguous)
//                        b[0] = B[2t, 2t+1][g]    b[1] = B[2t+8, 2t+9][g]
//   C/D (16×8 f32)       c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// (the lower k of each pair in the register's low half, which is the word layout of the tiles).
__device__ __forceinline__ void warp_mma_32x32(float acc[2][4][4], const uint32_t (*As)[H_LDW],
                                               const uint32_t (*Bs)[H_LDW], int wm0, int wn0, int kw0, int g,
                                               int t) {
    uint32_t af[2][4], bfr[4][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = wm0 + i * 16 + g;
        af[i][0] = As[r][kw0 + t];
        af[i][1] = As[r + 8][kw0 + t];
        af[i][2] = As[r][kw0 + t + 4];
        af[i][3] = As[r + 8][kw0 + t + 4];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int c = wn0 + j * 8 + g;
        bfr[j][0] = Bs[c][kw0 + t];
        bfr[j][1] = Bs[c][kw0 + t + 4];
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_bf16_16816(acc[i][j], af[i], bfr[j], acc[i][j]);
}

// Hands each element of a warp's 32×32 accumulator tile inside (rows, cols) to store(row, col, v):
// acc[i][j][2h + e] is the element (row0 + i·16 + g + 8h, col0 + j·8 + 2t + e).
template <class Store>
__device__ __forceinline__ void warp_tile_32x32_store(const float acc[2][4][4], int row0, int col0, int rows,
                                                      int cols, int g, int t, Store store) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = row0 + i * 16 + g + 8 * h;
            if (r >= rows) continue;
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = col0 + j * 8 + 2 * t + e;
                    if (c < cols) store(r, c, acc[i][j][2 * h + e]);
                }
        }
}

// Four consecutive-k values as bf16 into a tile row at k = 4·kq .. 4·kq+3 (words 2kq, 2kq+1).
__device__ __forceinline__ void store_bf16x4(uint32_t (*S)[H_LDW], int row, int kq, float4 v) {
    *reinterpret_cast<uint2*>(&S[row][2 * kq]) = make_uint2(pack_bf16x2(v.x, v.y), pack_bf16x2(v.z, v.w));
}
// The same for four values already in bf16 (two bf16x2 words, the first value in the low half).
__device__ __forceinline__ void store_bf16x4_packed(uint32_t (*S)[H_LDW], int row, int kq, uint2 v) {
    *reinterpret_cast<uint2*>(&S[row][2 * kq]) = v;
}

__device__ __forceinline__ bool aligned8(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 7u) == 0;
}

// bf16 p[0..3] as two bf16x2 words, of which only the first `n` values are read (zeros past
// them); one 8-byte load when all four are valid and `vec` says p is 8-byte aligned.
__device__ __forceinline__ uint2 load4_bf16(const __nv_bfloat16* p, int n, bool vec) {
    if (n >= 4 && vec) return __ldg(reinterpret_cast<const uint2*>(p));
    const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
    uint32_t h0 = 0, h1 = 0, h2 = 0, h3 = 0;
    if (n > 0) h0 = __ldg(q);
    if (n > 1) h1 = __ldg(q + 1);
    if (n > 2) h2 = __ldg(q + 2);
    if (n > 3) h3 = __ldg(q + 3);
    return make_uint2(h0 | (h1 << 16), h2 | (h3 << 16));
}

}  // namespace conv_detail

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

// The global → register → shared staging of the bf16 GEMM's reduction tiles, shared by every
// version: thread tid loads k-quad lq (channels 4·lq..4·lq+3 of the tile) of A rows lrow + 32r
// (r < 4) and of B rows lrow + 32r (r < 2); 8 consecutive threads cover one row's 32 channels.
// `load` reads tile `kp` into registers (A rounded to bf16 only at `store`) and steps kp on;
// `store` writes the registers into a stage's shared tiles.
struct IgemmBf16Loader {
    const float* __restrict__ src;
    const __nv_bfloat16* __restrict__ wt;
    int SH, SW, C, N, n0, tys, txs, ntx, tap0, tapys, tapxs, bs_n, bs_t;
    int lrow, lq;
    bool a_vec, b_vec;
    RowGeo ag[4];
    KPos kp;
    float4 ra[4];
    uint2 rb[2];

    __device__ __forceinline__ IgemmBf16Loader(int m0, int n0_, const float* __restrict__ src_,
                                               const __nv_bfloat16* __restrict__ wt_, int M, int RH, int RW, int N_,
                                               int C_, int SH_, int SW_, int ss, int sy0, int sx0, int tys_, int txs_,
                                               int ntx_, int tap0_, int tapys_, int tapxs_, int bs_n_, int bs_t_,
                                               int kt_begin)
        : src(src_), wt(wt_), SH(SH_), SW(SW_), C(C_), N(N_), n0(n0_), tys(tys_), txs(txs_), ntx(ntx_), tap0(tap0_),
          tapys(tapys_), tapxs(tapxs_), bs_n(bs_n_), bs_t(bs_t_) {
        const int tid = threadIdx.x;
        lrow = tid >> 3;
        lq = tid & 7;
#pragma unroll
        for (int r = 0; r < 4; ++r) ag[r] = row_geo(m0 + lrow + 32 * r, M, RH, RW, SH, ss, sy0, sx0);
        a_vec = (C % 4 == 0) && aligned16(src);
        b_vec = (C % 4 == 0) && (bs_n % 4 == 0) && (bs_t % 4 == 0) && aligned8(wt);
        // Tile kt is (tap kt / ctiles, channels (kt mod ctiles)·H_BK..): start at kt_begin.
        const int ctiles = CEIL_DIV(C, H_BK), tap_begin = kt_begin / ctiles;
        kp = KPos{tap_begin / ntx, tap_begin % ntx, (kt_begin - tap_begin * ctiles) * H_BK};
    }

    __device__ __forceinline__ void load() {
        const int c = kp.c0 + 4 * lq;
        const int dy = kp.jy * tys, dx = kp.jx * txs;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const long long so = src_offset(ag[r], dy, dx, SH, SW, C);
            ra[r] = load4(so >= 0 ? src + so + c : src, so >= 0 ? C - c : 0, a_vec);
        }
        const size_t wtap = (size_t)(tap0 + kp.jy * tapys + kp.jx * tapxs) * bs_t + c;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int n = n0 + lrow + 32 * r;
            rb[r] = load4_bf16(n < N ? wt + (size_t)n * bs_n + wtap : wt, n < N ? C - c : 0, b_vec);
        }
        kpos_next(kp, H_BK, C, ntx);
    }

    __device__ __forceinline__ void store(uint32_t (*As)[H_LDW], uint32_t (*Bs)[H_LDW]) const {
#pragma unroll
        for (int r = 0; r < 4; ++r) store_bf16x4(As, lrow + 32 * r, lq, ra[r]);
#pragma unroll
        for (int r = 0; r < 2; ++r) store_bf16x4_packed(Bs, lrow + 32 * r, lq, rb[r]);
    }
};

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

// One m16n8k16 step of a warp's 32×32 tile as warp_mma_32x32, the fragments by ldmatrix. Matrix q
// = lane / 8 of each .x4 takes its row address from lanes 8q..8q+7: for A, (rows +8·(q&1), words
// +4·(q>>1)) gives a[0..3] in the PTX order; for B, (rows n +8·(q>>1), words +4·(q&1)) gives
// b[0..1] of the n8 tile j and then of tile j+1.
__device__ __forceinline__ void warp_mma_32x32_ldsm(float acc[2][4][4], const uint32_t (*As)[H_LDW],
                                                    const uint32_t (*Bs)[H_LDW], int wm0, int wn0, int kw0,
                                                    int lane) {
    uint32_t af[2][4], bfr[4][2];
    const int r8 = lane & 7, q = lane >> 3;
#pragma unroll
    for (int i = 0; i < 2; ++i) ldmatrix_x4(af[i], &As[wm0 + i * 16 + r8 + 8 * (q & 1)][kw0 + 4 * (q >> 1)]);
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
        uint32_t r[4];
        ldmatrix_x4(r, &Bs[wn0 + jj * 16 + r8 + 8 * (q >> 1)][kw0 + 4 * (q & 1)]);
        bfr[2 * jj][0] = r[0];
        bfr[2 * jj][1] = r[1];
        bfr[2 * jj + 1][0] = r[2];
        bfr[2 * jj + 1][1] = r[3];
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_bf16_16816(acc[i][j], af[i], bfr[j], acc[i][j]);
}

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
