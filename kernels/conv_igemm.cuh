// The implicit-GEMM convolution's shared parts (kernels/conv.cu's versions 1–3 and
// kernels/conv_pipeline.cu's versions 4–6 include it): geometry of the gather-rows GEMM, operand
// loads, the bf16 tile layout and its warp-level mma steps, the epilogue. See conv.cu's header for
// the GEMMs themselves.
#pragma once
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

// The position of reduction tile kt of a BK-deep walk: tap kt / ⌈C/BK⌉, channels (kt mod ⌈C/BK⌉)·BK.. .
__device__ __forceinline__ KPos kpos_at(int kt, int BK, int C, int ntx) {
    const int ctiles = CEIL_DIV(C, BK), tap = kt / ctiles;
    return KPos{tap / ntx, tap % ntx, (kt - tap * ctiles) * BK};
}

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


// A block's walk over its reduction tiles, as every bf16 loader sees it: the operands and their
// geometry, this thread's A rows lrow + 32r (r < 4) and channel quad lq (lrow = tid / 8,
// lq = tid % 8: 8 consecutive threads cover one row's 32 channels), their source geometry, and
// the position kp of the next tile to load (from kt_begin).
struct IgemmWalk {
    const float* __restrict__ src;
    const __nv_bfloat16* __restrict__ wt;
    int SH, SW, C, N, n0, tys, txs, ntx, tap0, tapys, tapxs, bs_n, bs_t;
    int lrow, lq;
    RowGeo ag[4];
    KPos kp;

    __device__ __forceinline__ IgemmWalk(int m0, int n0_, const float* __restrict__ src_,
                                         const __nv_bfloat16* __restrict__ wt_, int M, int RH, int RW, int N_, int C_,
                                         int SH_, int SW_, int ss, int sy0, int sx0, int tys_, int txs_, int ntx_,
                                         int tap0_, int tapys_, int tapxs_, int bs_n_, int bs_t_, int kt_begin)
        : src(src_), wt(wt_), SH(SH_), SW(SW_), C(C_), N(N_), n0(n0_), tys(tys_), txs(txs_), ntx(ntx_), tap0(tap0_),
          tapys(tapys_), tapxs(tapxs_), bs_n(bs_n_), bs_t(bs_t_), lrow(threadIdx.x >> 3), lq(threadIdx.x & 7),
          kp(kpos_at(kt_begin, H_BK, C_, ntx_)) {
#pragma unroll
        for (int r = 0; r < 4; ++r) ag[r] = row_geo(m0 + lrow + 32 * r, M, RH, RW, SH, ss, sy0, sx0);
    }
};

// The global → register → shared staging of the bf16 GEMM's reduction tiles, shared by versions
// 1–3: thread tid loads k-quad lq (channels 4·lq..4·lq+3 of the tile) of A rows lrow + 32r
// (r < 4) and of B rows lrow + 32r (r < 2). `load` reads tile `kp` into registers (A rounded to
// bf16 only at `store`) and steps kp on; `store` writes the registers into a stage's shared tiles.
struct IgemmBf16Loader : IgemmWalk {
    bool a_vec, b_vec;
    float4 ra[4];
    uint2 rb[2];

    template <class... Args>
    __device__ __forceinline__ IgemmBf16Loader(Args... args) : IgemmWalk(args...) {
        a_vec = (C % 4 == 0) && aligned16(src);
        b_vec = (C % 4 == 0) && (bs_n % 4 == 0) && (bs_t % 4 == 0) && aligned8(wt);
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

}  // namespace conv_detail
