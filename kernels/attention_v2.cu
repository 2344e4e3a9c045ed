// The bf16 attention forward, versions 2 and 3 (ROENTGEN_KERNELS=attention=2|3). Version 2:
// version 1's products and softmax (attention.cu `attn_fwd_bf16`, whose semantics are at the top of
// attention.cu), fed differently. Version 3: version 2 with FlashAttention-2's exp2 softmax.
//
// What it changes, for head-dim buckets H ≤ 96 (past them version 1 runs: see the smem note):
//  * 128 query rows per block (8 warps of 16) instead of 64: each K/V tile brought to shared memory
//    serves twice the queries, halving the L2 → SM traffic of K and V per query.
//  * Q straight from global memory into registers, as bf16 A fragments, once: version 1 stages Q
//    in shared memory and reloads its fragments for every key tile (KC·4 shared loads per tile).
//  * K and V fetched by cp.async one tile ahead (a double buffer) into an f32 staging ring (the
//    pools hold f32), from which each thread rounds the chunks it copied itself into the bf16 tiles
//    (no barrier between its wait and that conversion), the bf16 tiles double-buffered too: one
//    barrier per key tile instead of two, and the next tile's loads in flight during this one's
//    products. Version 1 loads synchronously between two barriers.
//  * V kept row-major and its B fragments read with ldmatrix.trans; K's with ldmatrix: one
//    instruction per two mmas instead of two 32-bit loads per mma, and no transposed staging of V
//    (version 1's Vᵀ tile is written with a 4-way bank conflict).
//  * no padding waste at head dim 40 (bucket 48) or any hd ≤ H − 8: the last k-step of Q·Kᵀ is an
//    m16n8k8 over the real columns and the last 8 columns of P·V are not computed (1/6 of the
//    mmas at hd 40).
// Kept from version 1, so that the results are bit for bit version 1's (the emulated cases check
// it): the key tile of 64, the bf16 roundings, each accumulator's products in the same order, and
// the softmax step itself (attention.cuh `ab_softmax_tile`).
//
// Version 3 (EXP2): the scale and log2 e folded into one FFMA per score before the ex2, the
// maximum taken over the raw scores (ab_softmax_tile<…, true>): two f32 operations fewer per score
// (≈25 % of the softmax's FMA-pipe work at hd 40, where the softmax bounds the kernel: see below),
// expected ≈1.1–1.2× over version 2 there. Its probabilities equal version 1's up to f32 rounding,
// so their bf16 roundings may differ in the last bit: it is gated against version 1 by the bf16
// tolerance (versions.rs `gate`), not by bits.
//
// Roofline (H100 SXM, estimates): SD's 64×64 self-attention (4096 × 4096, hd 40, 8 heads, batch 2)
// is 43 GFLOP of mma, ≈45 µs at the dense bf16 peak, but each of its 268 M scores also costs one
// MUFU ex2 (16/clk/SM: ≈73 µs at 132 SMs × 1.75 GHz) and ≈8 f32 instructions of the softmax
// (128/clk/SM: ≈73 µs): at hd 40 attention is bound by the softmax, not the tensor cores. Version 1 adds to that ≈40 % of extra issue slots (shared loads of Q and of 32-bit B
// fragments, the transposed staging, padded mmas) and stalls on every tile's synchronous load; at
// ≈100 TFLOP/s useful by reading its SASS. Version 2 removes most of those issue slots and hides
// the loads: expected ≈1.4–1.8× at hd 40 and 80, the autotune to confirm.
//
// Shared memory (dynamic; mirrored by the host's `bf16_fwd_v2_smem`, attention.rs), in order:
//   bf16 tiles [2 buffers][K, V][64][H + 8]   (row stride (H + 8)·2 bytes, an odd number of 16-byte
//                                              units: ldmatrix's 8 rows hit distinct bank groups)
//   key bits   [2 buffers][2] u32             (ab_key_bits)
//   f32 staging [2 stages][K, V][64][hd4]     (hd4 = hd rounded up to 4; only with cp.async)
// 68 KiB at hd 40 (two blocks per SM on an A100, up to three on an H100), 148 KiB at hd 96,
// the largest bucket that fits an A100's 163 KiB per block; larger buckets run version 1.
// cp.async needs hd a multiple of 4 and K, V 16-byte aligned; otherwise the tiles are loaded
// synchronously (the staging is not used), with the same values.
#include "attention.cuh"

extern __shared__ __align__(16) unsigned char att_smem_bf16[];

namespace attn_v2 {

constexpr int WARPS = 8, THREADS = WARPS * 32, BM = WARPS * 16, BN = 64;

// This thread's 16-byte chunks of a key tile's K and V rows: chunk c of 2·BN·C4 (C4 = hd4 / 4 per
// row) is tensor c / (BN·C4) (0 K, 1 V), row (c / C4) % BN, columns 4·(c % C4) .. + 3. The copy and
// the conversion walk the same chunks, so a thread converts only what it copied itself.
struct Chunk {
    int tensor, row, col;
};
__device__ __forceinline__ Chunk chunk_at(int c, int c4) {
    const int per_tensor = BN * c4, tensor = c >= per_tensor ? 1 : 0, rc = c - tensor * per_tensor;
    const int row = rc / c4;
    return {tensor, row, 4 * (rc - row * c4)};
}

// Four values rounded to bf16 into a tile row at column col (8 bytes, aligned: col % 4 == 0).
__device__ __forceinline__ void store4(bf16* dst, float x0, float x1, float x2, float x3) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(pack_bf16x2(x0, x1), pack_bf16x2(x2, x3));
}

template <int D, bool EXP2>
__device__ __forceinline__ void forward(float* __restrict__ out, float* __restrict__ lse, const float* __restrict__ q,
                                        const float* __restrict__ k, const float* __restrict__ v,
                                        const unsigned* __restrict__ key_mask, int q_len, int kv_len, int heads, int hd,
                                        float scale, int causal) {
    // D: hd rounded up to 8. KC full k16 steps of Q·Kᵀ, then a k8 step when D is not a multiple of
    // 16; DT n8 column tiles of P·V, none of them all padding.
    constexpr int H = (D + 15) / 16 * 16, S = H + 8, NT = BN / 8, DT = D / 8, KC = D / 16;
    constexpr bool TAIL8 = D % 16 != 0;
    static_assert(D % 8 == 0 && (S / 8) % 2 == 1, "the tile row stride must be an odd number of 16-byte units");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int b = blockIdx.y / heads, h = blockIdx.y - b * heads;
    const int q0 = blockIdx.x * BM;
    const size_t w = (size_t)heads * hd;
    const float* kb = k + (size_t)b * kv_len * w + (size_t)h * hd;
    const float* vb = v + (size_t)b * kv_len * w + (size_t)h * hd;
    const int hd4 = (hd + 3) & ~3, c4 = hd4 / 4, chunks = 2 * BN * c4;
    // cp.async copies 16-byte chunks: whole rows of 4-float groups from 16-byte aligned bases.
    const float scale_exp = EXP2 ? scale * 1.44269504088896341f : scale;  // see ab_softmax_tile
    const bool async = (hd & 3) == 0 && (reinterpret_cast<uintptr_t>(k) & 15) == 0 &&
                       (reinterpret_cast<uintptr_t>(v) & 15) == 0;

    bf16* tiles = reinterpret_cast<bf16*>(att_smem_bf16);         // [2][2][BN][S]
    uint32_t* ok_bits = reinterpret_cast<uint32_t*>(tiles + 2 * 2 * BN * S);  // [2][2]
    float* staging = reinterpret_cast<float*>(ok_bits + 2 * 2);                // [2][2][BN][hd4]
    auto tile = [&](int buf, int tensor) { return tiles + (buf * 2 + tensor) * BN * S; };
    auto stage = [&](int slot, int tensor) { return staging + (slot * 2 + tensor) * BN * hd4; };

    // Columns hd4.. of every tile row are never converted into: zero them once (Q·Kᵀ and P·V read
    // up to column D − 1).
    for (int idx = threadIdx.x; idx < 4 * BN * (S - hd4); idx += THREADS) {
        const int r = idx / (S - hd4), c = hd4 + idx - r * (S - hd4);
        tiles[r * S + c] = __float2bfloat16_rn(0.0f);
    }

    // Q's A fragments, straight from global memory (row-major, as ab_frag_a reads a staged tile:
    // register r holds row g + 8·(r & 1), columns kc·16 + 2t + 8·(r >> 1) and + 1; zero past q_len
    // and hd).
    const int i_lo = q0 + warp * 16 + g, i_hi = i_lo + 8;
    uint32_t qa[KC + TAIL8][4];
    {
        const float* qb = q + (size_t)b * q_len * w + (size_t)h * hd;
#pragma unroll
        for (int kc = 0; kc < KC + TAIL8; kc++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int i = (r & 1) ? i_hi : i_lo, d = kc * 16 + 2 * t + 8 * (r >> 1);
                const float* row = qb + (size_t)i * w;
                const float x0 = (i < q_len && d < hd) ? row[d] : 0.0f;
                const float x1 = (i < q_len && d + 1 < hd) ? row[d + 1] : 0.0f;
                qa[kc][r] = pack_bf16x2(x0, x1);
            }
    }

    float o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m[2] = {ATT_NEG_INF, ATT_NEG_INF};
    float l[2] = {0.0f, 0.0f};

    const int kv_end = causal ? min(kv_len, q0 + BM) : kv_len;
    const int ntiles = (kv_end + BN - 1) / BN;
    // Tile j's chunks into staging slot j & 1 (rows past kv_len zero-filled: src-size 0).
    auto copy_tile = [&](int j) {
#pragma unroll 1
        for (int c = threadIdx.x; c < chunks; c += THREADS) {
            const Chunk ch = chunk_at(c, c4);
            const int row = j * BN + ch.row;
            const float* src = (ch.tensor ? vb : kb) + (size_t)min(row, kv_len - 1) * w + ch.col;
            cp_async_16(stage(j & 1, ch.tensor) + ch.row * hd4 + ch.col, src, row < kv_len ? 16 : 0);
        }
    };
    if (async && ntiles > 0) copy_tile(0);
    cp_async_commit();

    for (int j = 0; j < ntiles; j++) {
        const int buf = j & 1, j0 = j * BN;
        if (async) {
            if (j + 1 < ntiles) copy_tile(j + 1);
            cp_async_commit();
            cp_async_wait<1>();  // this thread's copies of tile j have landed
        }
        // Tile j into bf16 buffer buf: from this thread's staged chunks, or read synchronously.
        // (Not unrolled: the products' registers are live here, and unrolled copies would spill.)
#pragma unroll 1
        for (int c = threadIdx.x; c < chunks; c += THREADS) {
            const Chunk ch = chunk_at(c, c4);
            bf16* dst = tile(buf, ch.tensor) + ch.row * S + ch.col;
            if (async) {
                const float4 x = *reinterpret_cast<const float4*>(stage(buf, ch.tensor) + ch.row * hd4 + ch.col);
                store4(dst, x.x, x.y, x.z, x.w);
            } else {
                const int row = j0 + ch.row;
                const float* src = (ch.tensor ? vb : kb) + (size_t)row * w;
                float x[4];
#pragma unroll
                for (int e = 0; e < 4; e++) x[e] = (row < kv_len && ch.col + e < hd) ? src[ch.col + e] : 0.0f;
                store4(dst, x[0], x[1], x[2], x[3]);
            }
        }
        uint32_t* ok = ok_bits + buf * 2;
        ab_key_bits(ok, key_mask, b, kv_len, j0);
        // Tile j complete for every warp; and every warp is past tile j − 1's products, so the
        // next iteration may overwrite buffer buf ^ 1 (tile j − 1's) and its staging slot.
        __syncthreads();

        const bf16* sK = tile(buf, 0);
        const bf16* sV = tile(buf, 1);
        const int l8 = lane & 7, mat = lane >> 3;  // ldmatrix: this lane addresses row l8 of matrix mat
        // S = Q·Kᵀ: B[kk][n] = K[n][kk], K row-major [key][d], so ldmatrix (not transposed) of the
        // 8×8 blocks (keys n0.., columns k0..) gives b[0] (k0 = kc·16) and b[1] (k0 = kc·16 + 8).
        float sacc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) sacc[nt][0] = sacc[nt][1] = sacc[nt][2] = sacc[nt][3] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < KC; kc++) {
            // Matrices: 0 keys 16·np.., cols k0; 1 the same keys, cols k0 + 8; 2 and 3 keys + 8.
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                uint32_t bb[4];
                ldmatrix_x4(bb, sK + (np * 16 + (mat >> 1) * 8 + l8) * S + kc * 16 + (mat & 1) * 8);
                mma_bf16_16816(sacc[2 * np], qa[kc], bb, sacc[2 * np]);
                mma_bf16_16816(sacc[2 * np + 1], qa[kc], bb + 2, sacc[2 * np + 1]);
            }
        }
        if constexpr (TAIL8) {
            // The k8 tail: matrix mat = keys 32·n4 + 8·mat.., columns 16·KC.. (b of 4 n8 tiles).
#pragma unroll
            for (int n4 = 0; n4 < NT / 4; n4++) {
                uint32_t bb[4];
                ldmatrix_x4(bb, sK + (n4 * 32 + mat * 8 + l8) * S + KC * 16);
#pragma unroll
                for (int i = 0; i < 4; i++) mma_bf16_1688(sacc[n4 * 4 + i], qa[KC], bb[i], sacc[n4 * 4 + i]);
            }
        }
        ab_softmax_tile<NT, DT, EXP2>(sacc, o, m, l, ok, j0, i_lo, i_hi, t, scale_exp, causal);
        // O += P·V: P from registers (C → A); B[key][d] = V[key][d], V row-major, so ldmatrix.trans
        // of the 8×8 blocks (keys 16·kk.., columns d0..) gives b[0] (keys + 0) and b[1] (keys + 8).
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            uint32_t a[4];
            ab_c_to_a(a, sacc[2 * kk], sacc[2 * kk + 1]);
            // Matrices: 0 keys 16·kk.., cols 16·dp; 1 keys + 8, the same cols; 2 and 3 cols + 8.
#pragma unroll
            for (int dp = 0; dp < (DT + 1) / 2; dp++) {
                const bf16* p = sV + (kk * 16 + (mat & 1) * 8 + l8) * S + dp * 16 + (mat >> 1) * 8;
                if (2 * dp + 1 < DT) {
                    uint32_t bb[4];
                    ldmatrix_x4<true>(bb, p);
                    mma_bf16_16816(o[2 * dp], a, bb, o[2 * dp]);
                    mma_bf16_16816(o[2 * dp + 1], a, bb + 2, o[2 * dp + 1]);
                } else {
                    uint32_t bb[2];
                    ldmatrix_x2<true>(bb, p);  // an odd DT's last tile; lanes 0–15: matrices 0 and 1
                    mma_bf16_16816(o[2 * dp], a, bb, o[2 * dp]);
                }
            }
        }
    }
    cp_async_wait<0>();  // nothing is left in flight (the last group committed is empty)
    ab_store_rows<DT, EXP2>(out, lse, o, m, l, b, h, i_lo, i_hi, q_len, heads, hd, t);
}

}  // namespace attn_v2

// attention_fwd_bf16_v2_d<D>: as attention_fwd_bf16_d<H> (the same parameters and outputs), at
// D = head_dim rounded up to 8 (the host's `v2_bucket`; the macro's H is that D: build.rs reads
// the `_d##H` suffix).
// Launch: grid (ceil(q_len/128), batch·heads), block 256, dynamic smem `bf16_fwd_v2_smem`.
#define AB2_INSTANTIATE(H, MIN_BLOCKS)                                                                             \
    extern "C" __global__ void __launch_bounds__(attn_v2::THREADS, MIN_BLOCKS) attention_fwd_bf16_v2_d##H(        \
        float* __restrict__ out, float* __restrict__ lse, const float* __restrict__ q, const float* __restrict__ k, \
        const float* __restrict__ v, const unsigned* __restrict__ key_mask, int q_len, int kv_len, int heads,      \
        int hd, float scale, int causal) {                                                                         \
        attn_v2::forward<H, false>(out, lse, q, k, v, key_mask, q_len, kv_len, heads, hd, scale, causal);          \
    }
// attention_fwd_bf16_v3_d<D>: version 3, the same launch.
#define AB3_INSTANTIATE(H, MIN_BLOCKS)                                                                             \
    extern "C" __global__ void __launch_bounds__(attn_v2::THREADS, MIN_BLOCKS) attention_fwd_bf16_v3_d##H(        \
        float* __restrict__ out, float* __restrict__ lse, const float* __restrict__ q, const float* __restrict__ k, \
        const float* __restrict__ v, const unsigned* __restrict__ key_mask, int q_len, int kv_len, int heads,      \
        int hd, float scale, int causal) {                                                                         \
        attn_v2::forward<H, true>(out, lse, q, k, v, key_mask, q_len, kv_len, heads, hd, scale, causal);           \
    }
#define AB23_INSTANTIATE(H, MIN_BLOCKS) AB2_INSTANTIATE(H, MIN_BLOCKS) AB3_INSTANTIATE(H, MIN_BLOCKS)

// Buckets (mirrored by the host's V2_MAX_BUCKET): every multiple of 8 from 8 to 96. Up to 40 two
// blocks per SM (≤ 128 registers, no spills); from 48 one (≤ 255: at 128 they would spill).
AB23_INSTANTIATE(8, 2)
AB23_INSTANTIATE(16, 2)
AB23_INSTANTIATE(24, 2)
AB23_INSTANTIATE(32, 2)
AB23_INSTANTIATE(40, 2)
AB23_INSTANTIATE(48, 1)
AB23_INSTANTIATE(56, 1)
AB23_INSTANTIATE(64, 1)
AB23_INSTANTIATE(72, 1)
AB23_INSTANTIATE(80, 1)
AB23_INSTANTIATE(88, 1)
AB23_INSTANTIATE(96, 1)
