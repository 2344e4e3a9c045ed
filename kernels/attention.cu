// Fused multi-head attention, forward and backward, flash-attention style: an online softmax over
// key tiles, so the q_len × kv_len score matrix never exists in global memory.
//
// Mirrors the CPU reference in src/ops/attention.rs: `AttentionParams::cpu_forward` (forward) and
// `cpu_backward` (backward), one kernel family for both `attention_*` and `masked_attention_*`:
//   q (batch, q_len, heads·hd), k and v (batch, kv_len, heads·hd), out like q, all token-major;
//   lse (batch, q_len, heads) = m + ln Σ_j exp(s_ij − m) with s_ij = scale · q_i·k_j (scale inside,
//   natural log), over the allowed keys only;
//   key j is allowed for query i of sequence b when (key_mask == nullptr || key_mask[b·kv_len + j]
//   != 0) and (!causal || j <= i); excluded keys are skipped (probability exactly 0).
// Backward (accumulating, +=): P_ij = exp(s_ij − lse_i), dP_ij = dO_i·v_j, D_i = dO_i·O_i,
//   dS_ij = P_ij (dP_ij − D_i) · scale; dq_i += Σ_j dS_ij k_j; dk_j += Σ_i dS_ij q_i; dv_j += Σ_i P_ij dO_i.
//
// Backward design (both paths): three launches, no atomics, deterministic.
//   1. attention_bwd_delta: D = rowsum(dO ∘ O) per (row, head) into a workspace (f32, from the f32
//      tensors in both paths).
//   2. attention_bwd_dq_*: one block per (query tile, batch·head), iterating over key tiles; it is the
//      only writer of its dq rows (plain +=).
//   3. attention_bwd_dkdv_*: one block per (key tile, batch·head), iterating over query tiles; the only
//      writer of its dk/dv rows (plain +=).
// The dq kernel recomputes S and dP that the dk/dv kernel also computes (7 matrix products instead of
// FlashAttention-2's 5), the price of never needing atomicAdd: results are bitwise reproducible.
//
// Two paths, chosen by the host (`use_bf16()`):
//   *_f32        SIMT, exact f32 (expf/logf, fmaf), the parity path (≤ 1e-4 vs the CPU). Any hd ≤ 160.
//   *_bf16_d<H>  tensor cores (mma.sync m16n8k16 bf16 → f32): operands rounded to bf16 when staged in
//                shared memory, f32 accumulators and f32 softmax statistics. H = hd rounded up to a
//                multiple of 16 (the k-step of the QKᵀ product); columns hd..H are zero-filled.
// Head dims above 160 (the VAE's one head of 512) take a materialised path instead: the score
// matrix in a workspace, the products through cuBLAS, and the row kernels attention_wide_* at the
// end of this file (see there and src/backend/cuda/attention.rs).
#include "attention.cuh"

// ============================================================================================
// D_i = dO_i · O_i (the backward's row correction), one warp per (row, head).
// delta (rows, heads) with rows = batch·q_len; dout and out (rows, heads·hd).
// Launch: grid ceil(rows·heads / 8), block 256 (8 warps). Mirrors `d` in ops/attention.rs `cpu_backward`.
// ============================================================================================
extern "C" __global__ void __launch_bounds__(256)
attention_bwd_delta(float* __restrict__ delta, const float* __restrict__ dout, const float* __restrict__ out,
                    int rows, int heads, int hd) {
    const int item = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (item >= rows * heads) return;  // whole warp leaves together
    const int row = item / heads, h = item - row * heads;
    const size_t base = (size_t)row * heads * hd + (size_t)h * hd;
    float s = 0.0f;
    for (int d = lane; d < hd; d += 32) s = fmaf(dout[base + d], out[base + d], s);
    s = warp_sum(s);
    if (lane == 0) delta[item] = s;
}

// ============================================================================================
// f32 SIMT path
// ============================================================================================
// A block is 4 warps; each warp owns AF_ROWS rows (queries in forward/dq, keys in dk/dv) and sweeps
// the other side in tiles of 32, one per lane: lane j computes the scores of "its" key (or query)
// against the warp's rows, then the products are accumulated with lanes over head-dim columns
// (d = lane + 32c, c < AF_MAXC), the tile's probabilities broadcast by __shfl_sync.
#define AF_WARPS 4
#define AF_ROWS 4
#define AF_BLOCKROWS (AF_WARPS * AF_ROWS)  // 16 rows per block
#define AF_TILE 32                         // keys (or queries) per inner tile: one per lane
#define AF_MAXC 5                          // hd ≤ 160 = 5 × 32 columns per lane
#define AF_THREADS (AF_WARPS * 32)

// Stages rows [r0, r0 + R) of a token-major (row stride w) f32 matrix's hd columns into smem rows
// of `stride` floats; rows ≥ nrows are zero-filled.
__device__ __forceinline__ void af_stage(float* __restrict__ dst, int stride, const float* __restrict__ src, size_t w,
                                         int r0, int R, int nrows, int hd) {
    for (int idx = threadIdx.x; idx < R * hd; idx += blockDim.x) {
        const int r = idx / hd, d = idx - r * hd, row = r0 + r;
        dst[r * stride + d] = row < nrows ? src[(size_t)row * w + d] : 0.0f;
    }
}

// out, lse = attention(q, k, v) (see the top of the file), exact f32.
// Launch: grid (ceil(q_len/16), batch·heads), block 128, dynamic smem
//   (16·hd + 32·(hd+1) + 32·hd)·4 bytes: Q rows [16][hd], K tile [32][hd+1] (odd stride: lane j
//   reads row j conflict-free), V tile [32][hd].
// Mirrors ops/attention.rs `cpu_forward` (max-subtracted softmax, out = Σ p v / Σ p, lse = m + ln Σ p).
extern "C" __global__ void __launch_bounds__(AF_THREADS)
attention_fwd_f32(float* __restrict__ out, float* __restrict__ lse, const float* __restrict__ q,
                  const float* __restrict__ k, const float* __restrict__ v, const unsigned* __restrict__ key_mask,
                  int q_len, int kv_len, int heads, int hd, float scale, int causal) {
    extern __shared__ float att_smem_f32[];
    const int ks = hd + 1;
    float* sq = att_smem_f32;            // [16][hd]
    float* sk = sq + AF_BLOCKROWS * hd;  // [32][hd+1]
    float* sv = sk + AF_TILE * ks;       // [32][hd]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int b = blockIdx.y / heads, h = blockIdx.y - b * heads;
    const int q0 = blockIdx.x * AF_BLOCKROWS;
    const size_t w = (size_t)heads * hd;
    const float* qb = q + (size_t)b * q_len * w + (size_t)h * hd;
    const float* kb = k + (size_t)b * kv_len * w + (size_t)h * hd;
    const float* vb = v + (size_t)b * kv_len * w + (size_t)h * hd;

    af_stage(sq, hd, qb, w, q0, AF_BLOCKROWS, q_len, hd);
    const float* qrow = sq + warp * AF_ROWS * hd;

    float m[AF_ROWS], l[AF_ROWS], acc[AF_ROWS][AF_MAXC];
#pragma unroll
    for (int r = 0; r < AF_ROWS; r++) {
        m[r] = ATT_NEG_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < AF_MAXC; c++) acc[r][c] = 0.0f;
    }
    // Causal: keys after the tile's last query are excluded for every row of the tile.
    const int kv_end = causal ? min(kv_len, q0 + AF_BLOCKROWS) : kv_len;
    for (int j0 = 0; j0 < kv_end; j0 += AF_TILE) {
        __syncthreads();  // Q staged (first tile); the previous K/V tile fully consumed
        af_stage(sk, ks, kb, w, j0, AF_TILE, kv_len, hd);
        af_stage(sv, hd, vb, w, j0, AF_TILE, kv_len, hd);
        __syncthreads();
        const int j = j0 + lane;
        const bool key_ok = att_key_ok(key_mask, b, kv_len, j);
        float s[AF_ROWS];
#pragma unroll
        for (int r = 0; r < AF_ROWS; r++) s[r] = 0.0f;
        const float* krow = sk + lane * ks;
        for (int d = 0; d < hd; d++) {
            const float kd = krow[d];
#pragma unroll
            for (int r = 0; r < AF_ROWS; r++) s[r] = fmaf(qrow[r * hd + d], kd, s[r]);
        }
        float p[AF_ROWS];
#pragma unroll
        for (int r = 0; r < AF_ROWS; r++) {
            const int i = q0 + warp * AF_ROWS + r;
            const bool ok = key_ok && (!causal || j <= i);
            const float sc = ok ? s[r] * scale : ATT_NEG_INF;
            const float mnew = fmaxf(m[r], warp_max(sc));
            // A row with no allowed key yet keeps m = -inf: subtract 0 instead (avoids inf − inf).
            const float mu = mnew == ATT_NEG_INF ? 0.0f : mnew;
            p[r] = ok ? expf(sc - mu) : 0.0f;
            const float alpha = expf(m[r] - mu);  // 0 while m = -inf (l and acc are 0 then)
            l[r] = l[r] * alpha + warp_sum(p[r]);
            m[r] = mnew;
#pragma unroll
            for (int c = 0; c < AF_MAXC; c++) acc[r][c] *= alpha;
        }
        const int nj = min(AF_TILE, kv_len - j0);
        for (int jj = 0; jj < nj; jj++) {
            float pj[AF_ROWS];
#pragma unroll
            for (int r = 0; r < AF_ROWS; r++) pj[r] = __shfl_sync(0xffffffffu, p[r], jj);
            const float* vrow = sv + jj * hd;
#pragma unroll
            for (int c = 0; c < AF_MAXC; c++) {
                const int d = lane + 32 * c;
                if (d < hd) {
                    const float vd = vrow[d];
#pragma unroll
                    for (int r = 0; r < AF_ROWS; r++) acc[r][c] = fmaf(pj[r], vd, acc[r][c]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < AF_ROWS; r++) {
        const int i = q0 + warp * AF_ROWS + r;
        if (i < q_len) {
            // l > 0 always holds for valid input (the host checks every sequence keeps a key).
            const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
            float* orow = out + ((size_t)b * q_len + i) * w + (size_t)h * hd;
#pragma unroll
            for (int c = 0; c < AF_MAXC; c++) {
                const int d = lane + 32 * c;
                if (d < hd) orow[d] = acc[r][c] * inv;
            }
            if (lane == 0) lse[((size_t)b * q_len + i) * heads + h] = l[r] > 0.0f ? m[r] + logf(l[r]) : ATT_NEG_INF;
        }
    }
}

// dq += Σ_j dS_ij k_j (the backward's query side), exact f32.
// Launch: grid (ceil(q_len/16), batch·heads), block 128, dynamic smem
//   (2·16·hd + 2·32·(hd+1))·4 bytes: Q and dO rows [16][hd], K and V tiles [32][hd+1].
// delta: D (batch·q_len, heads) from attention_bwd_delta. Mirrors ops/attention.rs `cpu_backward` (dqi).
extern "C" __global__ void __launch_bounds__(AF_THREADS)
attention_bwd_dq_f32(float* __restrict__ dq, const float* __restrict__ dout, const float* __restrict__ q,
                     const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ lse,
                     const float* __restrict__ delta, const unsigned* __restrict__ key_mask, int q_len, int kv_len,
                     int heads, int hd, float scale, int causal) {
    extern __shared__ float att_smem_f32[];
    const int ks = hd + 1;
    float* sq = att_smem_f32;             // [16][hd]
    float* sdo = sq + AF_BLOCKROWS * hd;  // [16][hd]
    float* sk = sdo + AF_BLOCKROWS * hd;  // [32][hd+1]
    float* sv = sk + AF_TILE * ks;        // [32][hd+1]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int b = blockIdx.y / heads, h = blockIdx.y - b * heads;
    const int q0 = blockIdx.x * AF_BLOCKROWS;
    const size_t w = (size_t)heads * hd;
    const size_t qoff = (size_t)b * q_len * w + (size_t)h * hd;
    const float* kb = k + (size_t)b * kv_len * w + (size_t)h * hd;
    const float* vb = v + (size_t)b * kv_len * w + (size_t)h * hd;

    af_stage(sq, hd, q + qoff, w, q0, AF_BLOCKROWS, q_len, hd);
    af_stage(sdo, hd, dout + qoff, w, q0, AF_BLOCKROWS, q_len, hd);
    const float* qrow = sq + warp * AF_ROWS * hd;
    const float* dorow = sdo + warp * AF_ROWS * hd;

    float lse_r[AF_ROWS], d_r[AF_ROWS], acc[AF_ROWS][AF_MAXC];
#pragma unroll
    for (int r = 0; r < AF_ROWS; r++) {
        const int i = q0 + warp * AF_ROWS + r;
        const size_t sidx = ((size_t)b * q_len + i) * heads + h;
        lse_r[r] = i < q_len ? lse[sidx] : 0.0f;
        d_r[r] = i < q_len ? delta[sidx] : 0.0f;
#pragma unroll
        for (int c = 0; c < AF_MAXC; c++) acc[r][c] = 0.0f;
    }
    const int kv_end = causal ? min(kv_len, q0 + AF_BLOCKROWS) : kv_len;
    for (int j0 = 0; j0 < kv_end; j0 += AF_TILE) {
        __syncthreads();
        af_stage(sk, ks, kb, w, j0, AF_TILE, kv_len, hd);
        af_stage(sv, ks, vb, w, j0, AF_TILE, kv_len, hd);
        __syncthreads();
        const int j = j0 + lane;
        const bool key_ok = att_key_ok(key_mask, b, kv_len, j);
        float s[AF_ROWS], dp[AF_ROWS];
#pragma unroll
        for (int r = 0; r < AF_ROWS; r++) s[r] = dp[r] = 0.0f;
        const float* krow = sk + lane * ks;
        const float* vrow = sv + lane * ks;
        for (int d = 0; d < hd; d++) {
            const float kd = krow[d], vd = vrow[d];
#pragma unroll
            for (int r = 0; r < AF_ROWS; r++) {
                s[r] = fmaf(qrow[r * hd + d], kd, s[r]);
                dp[r] = fmaf(dorow[r * hd + d], vd, dp[r]);
            }
        }
        float ds[AF_ROWS];
#pragma unroll
        for (int r = 0; r < AF_ROWS; r++) {
            const int i = q0 + warp * AF_ROWS + r;
            const bool ok = key_ok && i < q_len && (!causal || j <= i);
            const float p = ok ? expf(s[r] * scale - lse_r[r]) : 0.0f;
            ds[r] = ok ? p * (dp[r] - d_r[r]) * scale : 0.0f;
        }
        const int nj = min(AF_TILE, kv_len - j0);
        for (int jj = 0; jj < nj; jj++) {
            float dsj[AF_ROWS];
#pragma unroll
            for (int r = 0; r < AF_ROWS; r++) dsj[r] = __shfl_sync(0xffffffffu, ds[r], jj);
            const float* kr = sk + jj * ks;
#pragma unroll
            for (int c = 0; c < AF_MAXC; c++) {
                const int d = lane + 32 * c;
                if (d < hd) {
                    const float kd = kr[d];
#pragma unroll
                    for (int r = 0; r < AF_ROWS; r++) acc[r][c] = fmaf(dsj[r], kd, acc[r][c]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < AF_ROWS; r++) {
        const int i = q0 + warp * AF_ROWS + r;
        if (i < q_len) {
            float* g = dq + ((size_t)b * q_len + i) * w + (size_t)h * hd;
#pragma unroll
            for (int c = 0; c < AF_MAXC; c++) {
                const int d = lane + 32 * c;
                if (d < hd) g[d] += acc[r][c];  // this block is the only writer of these elements
            }
        }
    }
}

// dk += Σ_i dS_ij q_i, dv += Σ_i P_ij dO_i (the backward's key side), exact f32. Each warp owns 4
// keys; lanes take the queries of a 32-query tile. Masked keys get no gradient.
// Launch: grid (ceil(kv_len/16), batch·heads), block 128, dynamic smem
//   (2·16·hd + 2·32·(hd+1))·4 bytes: K and V rows [16][hd], Q and dO tiles [32][hd+1].
// Mirrors ops/attention.rs `cpu_backward` (dkj, dvj).
extern "C" __global__ void __launch_bounds__(AF_THREADS)
attention_bwd_dkdv_f32(float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ dout,
                       const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                       const float* __restrict__ lse, const float* __restrict__ delta,
                       const unsigned* __restrict__ key_mask, int q_len, int kv_len, int heads, int hd, float scale,
                       int causal) {
    extern __shared__ float att_smem_f32[];
    const int qs = hd + 1;
    float* sk = att_smem_f32;             // [16][hd]
    float* sv = sk + AF_BLOCKROWS * hd;   // [16][hd]
    float* sq = sv + AF_BLOCKROWS * hd;   // [32][hd+1]
    float* sdo = sq + AF_TILE * qs;       // [32][hd+1]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int b = blockIdx.y / heads, h = blockIdx.y - b * heads;
    const int k0 = blockIdx.x * AF_BLOCKROWS;
    const size_t w = (size_t)heads * hd;
    const size_t koff = (size_t)b * kv_len * w + (size_t)h * hd;
    const size_t qoff = (size_t)b * q_len * w + (size_t)h * hd;

    af_stage(sk, hd, k + koff, w, k0, AF_BLOCKROWS, kv_len, hd);
    af_stage(sv, hd, v + koff, w, k0, AF_BLOCKROWS, kv_len, hd);
    const float* krow = sk + warp * AF_ROWS * hd;
    const float* vrow = sv + warp * AF_ROWS * hd;

    bool key_ok[AF_ROWS];
    float dk_acc[AF_ROWS][AF_MAXC], dv_acc[AF_ROWS][AF_MAXC];
#pragma unroll
    for (int r = 0; r < AF_ROWS; r++) {
        key_ok[r] = att_key_ok(key_mask, b, kv_len, k0 + warp * AF_ROWS + r);
#pragma unroll
        for (int c = 0; c < AF_MAXC; c++) dk_acc[r][c] = dv_acc[r][c] = 0.0f;
    }
    // Causal: queries before the block's first key attend to none of its keys.
    const int q_begin = causal ? k0 : 0;
    for (int i0 = q_begin; i0 < q_len; i0 += AF_TILE) {
        __syncthreads();
        af_stage(sq, qs, q + qoff, w, i0, AF_TILE, q_len, hd);
        af_stage(sdo, qs, dout + qoff, w, i0, AF_TILE, q_len, hd);
        __syncthreads();
        const int i = i0 + lane;
        const bool q_ok = i < q_len;
        const size_t sidx = ((size_t)b * q_len + i) * heads + h;
        const float lse_i = q_ok ? lse[sidx] : 0.0f;
        const float d_i = q_ok ? delta[sidx] : 0.0f;
        float s[AF_ROWS], dp[AF_ROWS];
#pragma unroll
        for (int r = 0; r < AF_ROWS; r++) s[r] = dp[r] = 0.0f;
        const float* qi = sq + lane * qs;
        const float* doi = sdo + lane * qs;
        for (int d = 0; d < hd; d++) {
            const float qd = qi[d], dod = doi[d];
#pragma unroll
            for (int r = 0; r < AF_ROWS; r++) {
                s[r] = fmaf(qd, krow[r * hd + d], s[r]);
                dp[r] = fmaf(dod, vrow[r * hd + d], dp[r]);
            }
        }
        float p[AF_ROWS], ds[AF_ROWS];
#pragma unroll
        for (int r = 0; r < AF_ROWS; r++) {
            const int j = k0 + warp * AF_ROWS + r;
            const bool ok = q_ok && key_ok[r] && (!causal || j <= i);
            p[r] = ok ? expf(s[r] * scale - lse_i) : 0.0f;
            ds[r] = ok ? p[r] * (dp[r] - d_i) * scale : 0.0f;
        }
        const int ni = min(AF_TILE, q_len - i0);
        for (int ii = 0; ii < ni; ii++) {
            float pi[AF_ROWS], dsi[AF_ROWS];
#pragma unroll
            for (int r = 0; r < AF_ROWS; r++) {
                pi[r] = __shfl_sync(0xffffffffu, p[r], ii);
                dsi[r] = __shfl_sync(0xffffffffu, ds[r], ii);
            }
            const float* qr = sq + ii * qs;
            const float* dor = sdo + ii * qs;
#pragma unroll
            for (int c = 0; c < AF_MAXC; c++) {
                const int d = lane + 32 * c;
                if (d < hd) {
                    const float qd = qr[d], dod = dor[d];
#pragma unroll
                    for (int r = 0; r < AF_ROWS; r++) {
                        dv_acc[r][c] = fmaf(pi[r], dod, dv_acc[r][c]);
                        dk_acc[r][c] = fmaf(dsi[r], qd, dk_acc[r][c]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < AF_ROWS; r++) {
        const int j = k0 + warp * AF_ROWS + r;
        if (j < kv_len && key_ok[r]) {
            const size_t off = ((size_t)b * kv_len + j) * w + (size_t)h * hd;
#pragma unroll
            for (int c = 0; c < AF_MAXC; c++) {
                const int d = lane + 32 * c;
                if (d < hd) {  // this block is the only writer of these elements
                    dk[off + d] += dk_acc[r][c];
                    dv[off + d] += dv_acc[r][c];
                }
            }
        }
    }
}

// ============================================================================================
// bf16 tensor-core path
// ============================================================================================
// Fragment layouts, the C → A register reuse and the forward's online-softmax step: attention.cuh.
//
// Shared-memory tiles are bf16, row stride H + 8 elements (H/2 + 4 words ≡ 4 mod 8 words), so the 8
// groups of a fragment load hit distinct 4-bank groups: conflict-free 32-bit loads, and the
// "transposed" loads below (two 16-bit loads from rows 2t, 2t+1) conflict-free too.
// Each warp owns 16 rows (queries in forward/dq, keys in dk/dv); a block is 4 warps = 64 rows.

#define AB_THREADS 128
#define AB_ROWS 64  // rows per block: 4 warps × 16

__device__ __forceinline__ uint32_t ab_ld32(const bf16* p) { return *reinterpret_cast<const uint32_t*>(p); }
// B operand from a row-major [k][n] tile: the two bf16 at rows k and k+1 of column n (p points at
// [k][n], stride = row stride), packed with row k low.
__device__ __forceinline__ uint32_t ab_ld_pair_t(const bf16* p, int stride) {
    const uint32_t lo = *reinterpret_cast<const unsigned short*>(p);
    const uint32_t hi = *reinterpret_cast<const unsigned short*>(p + stride);
    return lo | (hi << 16);
}

// Stages rows [r0, r0 + R) of a token-major f32 matrix (row stride w; hd real columns) as bf16 into
// dst [R][H + 8], zero-filling rows ≥ nrows and columns hd..H-1. Pairs of columns per thread.
template <int R, int H>
__device__ __forceinline__ void ab_stage(bf16* __restrict__ dst, const float* __restrict__ src, size_t w, int r0,
                                         int nrows, int hd) {
    constexpr int PAIRS = H / 2, S = H + 8;
    for (int idx = threadIdx.x; idx < R * PAIRS; idx += blockDim.x) {
        const int r = idx / PAIRS, d = (idx - r * PAIRS) * 2, row = r0 + r;
        float x0 = 0.0f, x1 = 0.0f;
        if (row < nrows) {
            const float* p = src + (size_t)row * w;
            if (d < hd) x0 = p[d];
            if (d + 1 < hd) x1 = p[d + 1];
        }
        *reinterpret_cast<uint32_t*>(dst + r * S + d) = pack_bf16x2(x0, x1);
    }
}

// Stages rows [j0, j0 + R) of V transposed: dst [H][R + 8] with dst[d][jj] = v[j0 + jj][d] (zero
// beyond kv_len and hd), so the P·V B fragments (pairs along the key axis) are 32-bit loads.
template <int R, int H>
__device__ __forceinline__ void ab_stage_t(bf16* __restrict__ dst, const float* __restrict__ src, size_t w, int j0,
                                           int nrows, int hd) {
    constexpr int S = R + 8;
    for (int idx = threadIdx.x; idx < (R / 2) * H; idx += blockDim.x) {
        const int jp = idx / H, d = idx - jp * H, j = j0 + 2 * jp;
        const float x0 = (j < nrows && d < hd) ? src[(size_t)j * w + d] : 0.0f;
        const float x1 = (j + 1 < nrows && d < hd) ? src[(size_t)(j + 1) * w + d] : 0.0f;
        *reinterpret_cast<uint32_t*>(dst + d * S + 2 * jp) = pack_bf16x2(x0, x1);
    }
}

// A fragment of rows [row0, row0 + 16), columns [col0, col0 + 16) of a bf16 tile with row stride S.
__device__ __forceinline__ void ab_frag_a(uint32_t a[4], const bf16* tile, int S, int row0, int col0, int g, int t) {
    const bf16* p = tile + (row0 + g) * S + col0 + 2 * t;
    a[0] = ab_ld32(p);              // A[g  ][2t, 2t+1]
    a[1] = ab_ld32(p + 8 * S);      // A[g+8][2t, 2t+1]
    a[2] = ab_ld32(p + 8);          // A[g  ][2t+8, 2t+9]
    a[3] = ab_ld32(p + 8 * S + 8);  // A[g+8][2t+8, 2t+9]
}
// B fragment (k16 × n8) where B[kk][n] = tile[n0 + n][k0 + kk] (the tile holds Bᵀ row-major, e.g.
// K rows for S = Q·Kᵀ): b[0] = B[2t, 2t+1][g] = tile[n0+g][k0+2t, +1], b[1] = rows 2t+8, 2t+9.
__device__ __forceinline__ void ab_frag_b_nk(uint32_t bb[2], const bf16* tile, int S, int n0, int k0, int g, int t) {
    const bf16* p = tile + (n0 + g) * S + k0 + 2 * t;
    bb[0] = ab_ld32(p);
    bb[1] = ab_ld32(p + 8);
}
// B fragment (k16 × n8) where B[kk][n] = tile[k0 + kk][n0 + n] (the tile holds B row-major, e.g. K
// rows for dQ = dS·K): two 16-bit loads per register, rows 2t and 2t+1 (then 2t+8, 2t+9), column g.
__device__ __forceinline__ void ab_frag_b_kn(uint32_t bb[2], const bf16* tile, int S, int k0, int n0, int g, int t) {
    const bf16* p = tile + (k0 + 2 * t) * S + n0 + g;
    bb[0] = ab_ld_pair_t(p, S);
    bb[1] = ab_ld_pair_t(p + 8 * S, S);
}

// ---- forward ----
// Shared memory (bytes), mirrored by the host (attention.rs, `bf16_fwd_smem`):
//   (64·(H+8) [Q] + 64·(H+8) [K tile] + H·(64+8) [Vᵀ tile]) · 2 + 2 · 4 [allowed-key bits].
#define AB_FWD_BN 64
template <int H>
__device__ __forceinline__ void attn_fwd_bf16(float* __restrict__ out, float* __restrict__ lse,
                                              const float* __restrict__ q, const float* __restrict__ k,
                                              const float* __restrict__ v, const unsigned* __restrict__ key_mask,
                                              int q_len, int kv_len, int heads, int hd, float scale, int causal) {
    constexpr int BM = AB_ROWS, BN = AB_FWD_BN, S = H + 8, VS = BN + 8, NT = BN / 8, DT = H / 8, KC = H / 16;
    extern __shared__ __align__(16) unsigned char att_smem_bf16[];
    bf16* sQ = reinterpret_cast<bf16*>(att_smem_bf16);  // [BM][S]
    bf16* sK = sQ + BM * S;                              // [BN][S]
    bf16* sVt = sK + BN * S;                             // [H][VS]
    uint32_t* sOk = reinterpret_cast<uint32_t*>(sVt + H * VS);  // [2] allowed-key bits (ab_key_bits)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int b = blockIdx.y / heads, h = blockIdx.y - b * heads;
    const int q0 = blockIdx.x * BM;
    const size_t w = (size_t)heads * hd;
    const float* kb = k + (size_t)b * kv_len * w + (size_t)h * hd;
    const float* vb = v + (size_t)b * kv_len * w + (size_t)h * hd;
    ab_stage<BM, H>(sQ, q + (size_t)b * q_len * w + (size_t)h * hd, w, q0, q_len, hd);

    const int i_lo = q0 + warp * 16 + g, i_hi = i_lo + 8;  // this lane's two query rows
    float o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m[2] = {ATT_NEG_INF, ATT_NEG_INF};
    float l[2] = {0.0f, 0.0f};  // partial over this lane's columns; the quad's sum at the end

    const int kv_end = causal ? min(kv_len, q0 + BM) : kv_len;
    for (int j0 = 0; j0 < kv_end; j0 += BN) {
        __syncthreads();  // Q staged (first tile); previous K/V tile consumed
        ab_stage<BN, H>(sK, kb, w, j0, kv_len, hd);
        ab_stage_t<BN, H>(sVt, vb, w, j0, kv_len, hd);
        ab_key_bits(sOk, key_mask, b, kv_len, j0);
        __syncthreads();

        // S = Q·Kᵀ for the warp's 16 rows × BN keys.
        float sacc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) sacc[nt][0] = sacc[nt][1] = sacc[nt][2] = sacc[nt][3] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < KC; kc++) {
            uint32_t a[4];
            ab_frag_a(a, sQ, S, warp * 16, kc * 16, g, t);
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                uint32_t bb[2];
                ab_frag_b_nk(bb, sK, S, nt * 8, kc * 16, g, t);
                mma_bf16_16816(sacc[nt], a, bb, sacc[nt]);
            }
        }
        ab_softmax_tile<NT, DT>(sacc, o, m, l, sOk, j0, i_lo, i_hi, t, scale, causal);
        // O += P·V: P from registers (C → A), V from the transposed tile (B[key][d] = sVt[d][key]).
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            uint32_t a[4];
            ab_c_to_a(a, sacc[2 * kk], sacc[2 * kk + 1]);
#pragma unroll
            for (int dt = 0; dt < DT; dt++) {
                uint32_t bb[2];
                ab_frag_b_nk(bb, sVt, VS, dt * 8, kk * 16, g, t);
                mma_bf16_16816(o[dt], a, bb, o[dt]);
            }
        }
    }
    ab_store_rows<DT>(out, lse, o, m, l, b, h, i_lo, i_hi, q_len, heads, hd, t);
}

// ---- backward, query side: dq += dS·K ----
// Shared memory (bytes), mirrored by the host (`bf16_dq_smem`):
//   (2·64·(H+8) [Q, dO] + 2·BN·(H+8) [K, V tiles]) · 2 + BN · 4 [key flags].
template <int H>
struct AbDq {
    static constexpr int BN = H <= 64 ? 64 : 32;  // keeps sacc + dpacc + dqacc within registers
};
template <int H>
__device__ __forceinline__ void attn_bwd_dq_bf16(float* __restrict__ dq, const float* __restrict__ dout,
                                                 const float* __restrict__ q, const float* __restrict__ k,
                                                 const float* __restrict__ v, const float* __restrict__ lse,
                                                 const float* __restrict__ delta,
                                                 const unsigned* __restrict__ key_mask, int q_len, int kv_len,
                                                 int heads, int hd, float scale, int causal) {
    constexpr int BM = AB_ROWS, BN = AbDq<H>::BN, S = H + 8, NT = BN / 8, DT = H / 8, KC = H / 16;
    extern __shared__ __align__(16) unsigned char att_smem_bf16[];
    bf16* sQ = reinterpret_cast<bf16*>(att_smem_bf16);  // [BM][S]
    bf16* sdO = sQ + BM * S;                             // [BM][S]
    bf16* sK = sdO + BM * S;                             // [BN][S]
    bf16* sV = sK + BN * S;                              // [BN][S]
    int* sOk = reinterpret_cast<int*>(sV + BN * S);      // [BN]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int b = blockIdx.y / heads, h = blockIdx.y - b * heads;
    const int q0 = blockIdx.x * BM;
    const size_t w = (size_t)heads * hd;
    const size_t qoff = (size_t)b * q_len * w + (size_t)h * hd;
    const float* kb = k + (size_t)b * kv_len * w + (size_t)h * hd;
    const float* vb = v + (size_t)b * kv_len * w + (size_t)h * hd;
    ab_stage<BM, H>(sQ, q + qoff, w, q0, q_len, hd);
    ab_stage<BM, H>(sdO, dout + qoff, w, q0, q_len, hd);

    const int i_lo = q0 + warp * 16 + g, i_hi = i_lo + 8;
    float lse_r[2], d_r[2];
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int i = hh ? i_hi : i_lo;
        const size_t sidx = ((size_t)b * q_len + i) * heads + h;
        lse_r[hh] = i < q_len ? lse[sidx] : 0.0f;
        d_r[hh] = i < q_len ? delta[sidx] : 0.0f;
    }
    float dqacc[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; dt++) dqacc[dt][0] = dqacc[dt][1] = dqacc[dt][2] = dqacc[dt][3] = 0.0f;

    const int kv_end = causal ? min(kv_len, q0 + BM) : kv_len;
    for (int j0 = 0; j0 < kv_end; j0 += BN) {
        __syncthreads();
        ab_stage<BN, H>(sK, kb, w, j0, kv_len, hd);
        ab_stage<BN, H>(sV, vb, w, j0, kv_len, hd);
        for (int jj = threadIdx.x; jj < BN; jj += blockDim.x) sOk[jj] = att_key_ok(key_mask, b, kv_len, j0 + jj);
        __syncthreads();

        // S = Q·Kᵀ and dP = dO·Vᵀ for the warp's 16 queries × BN keys.
        float sacc[NT][4], dpacc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) sacc[nt][e] = dpacc[nt][e] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < KC; kc++) {
            uint32_t aq[4], ado[4];
            ab_frag_a(aq, sQ, S, warp * 16, kc * 16, g, t);
            ab_frag_a(ado, sdO, S, warp * 16, kc * 16, g, t);
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                uint32_t bb[2];
                ab_frag_b_nk(bb, sK, S, nt * 8, kc * 16, g, t);
                mma_bf16_16816(sacc[nt], aq, bb, sacc[nt]);
                ab_frag_b_nk(bb, sV, S, nt * 8, kc * 16, g, t);
                mma_bf16_16816(dpacc[nt], ado, bb, dpacc[nt]);
            }
        }
        // dS = P ∘ (dP − D) · scale, P = exp(scale·S − lse); excluded entries 0. Stored over sacc.
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int col = nt * 8 + 2 * t + (e & 1), i = (e < 2) ? i_lo : i_hi;
                const bool ok = sOk[col] && i < q_len && (!causal || j0 + col <= i);
                const float p = ok ? __expf(sacc[nt][e] * scale - lse_r[e >> 1]) : 0.0f;
                sacc[nt][e] = ok ? p * (dpacc[nt][e] - d_r[e >> 1]) * scale : 0.0f;
            }
        // dQ += dS·K: dS from registers (C → A), B[key][d] = sK[key][d] (pairs along the key axis).
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            uint32_t a[4];
            ab_c_to_a(a, sacc[2 * kk], sacc[2 * kk + 1]);
#pragma unroll
            for (int dt = 0; dt < DT; dt++) {
                uint32_t bb[2];
                ab_frag_b_kn(bb, sK, S, kk * 16, dt * 8, g, t);
                mma_bf16_16816(dqacc[dt], a, bb, dqacc[dt]);
            }
        }
    }
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int i = hh ? i_hi : i_lo;
        if (i < q_len) {
            float* row = dq + ((size_t)b * q_len + i) * w + (size_t)h * hd;
#pragma unroll
            for (int dt = 0; dt < DT; dt++) {
                const int d = dt * 8 + 2 * t;  // this block is the only writer of these elements
                if (d < hd) row[d] += dqacc[dt][2 * hh];
                if (d + 1 < hd) row[d + 1] += dqacc[dt][2 * hh + 1];
            }
        }
    }
}

// ---- backward, key side: dk += dSᵀ·Q, dv += Pᵀ·dO ----
// Each warp owns 16 keys and computes Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (16 keys × BMQ queries) per query tile.
// Shared memory (bytes), mirrored by the host (`bf16_dkdv_smem`):
//   (2·64·(H+8) [K, V] + 2·BMQ·(H+8) [Q, dO tiles]) · 2 + 2 · BMQ · 4 [lse, D].
template <int H>
struct AbDkdv {
    // dk and dv accumulators take H floats per lane; the query tile shrinks as H grows.
    static constexpr int BMQ = H <= 64 ? 64 : (H <= 128 ? 32 : 16);
};
template <int H>
__device__ __forceinline__ void attn_bwd_dkdv_bf16(float* __restrict__ dk, float* __restrict__ dv,
                                                   const float* __restrict__ dout, const float* __restrict__ q,
                                                   const float* __restrict__ k, const float* __restrict__ v,
                                                   const float* __restrict__ lse, const float* __restrict__ delta,
                                                   const unsigned* __restrict__ key_mask, int q_len, int kv_len,
                                                   int heads, int hd, float scale, int causal) {
    constexpr int BK = AB_ROWS, BMQ = AbDkdv<H>::BMQ, S = H + 8, NT = BMQ / 8, DT = H / 8, KC = H / 16;
    extern __shared__ __align__(16) unsigned char att_smem_bf16[];
    bf16* sK = reinterpret_cast<bf16*>(att_smem_bf16);  // [BK][S]
    bf16* sV = sK + BK * S;                              // [BK][S]
    bf16* sQ = sV + BK * S;                              // [BMQ][S]
    bf16* sdO = sQ + BMQ * S;                            // [BMQ][S]
    float* sLse = reinterpret_cast<float*>(sdO + BMQ * S);  // [BMQ]
    float* sD = sLse + BMQ;                                 // [BMQ]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int b = blockIdx.y / heads, h = blockIdx.y - b * heads;
    const int k0 = blockIdx.x * BK;
    const size_t w = (size_t)heads * hd;
    const size_t koff = (size_t)b * kv_len * w + (size_t)h * hd;
    const size_t qoff = (size_t)b * q_len * w + (size_t)h * hd;
    ab_stage<BK, H>(sK, k + koff, w, k0, kv_len, hd);
    ab_stage<BK, H>(sV, v + koff, w, k0, kv_len, hd);

    const int j_lo = k0 + warp * 16 + g, j_hi = j_lo + 8;  // this lane's two key rows
    const bool kok[2] = {att_key_ok(key_mask, b, kv_len, j_lo), att_key_ok(key_mask, b, kv_len, j_hi)};
    float dkacc[DT][4], dvacc[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; dt++)
#pragma unroll
        for (int e = 0; e < 4; e++) dkacc[dt][e] = dvacc[dt][e] = 0.0f;

    const int q_begin = causal ? k0 : 0;  // earlier queries attend to none of these keys
    for (int i0 = q_begin; i0 < q_len; i0 += BMQ) {
        __syncthreads();
        ab_stage<BMQ, H>(sQ, q + qoff, w, i0, q_len, hd);
        ab_stage<BMQ, H>(sdO, dout + qoff, w, i0, q_len, hd);
        for (int ii = threadIdx.x; ii < BMQ; ii += blockDim.x) {
            const int i = i0 + ii;
            const size_t sidx = ((size_t)b * q_len + i) * heads + h;
            sLse[ii] = i < q_len ? lse[sidx] : 0.0f;
            sD[ii] = i < q_len ? delta[sidx] : 0.0f;
        }
        __syncthreads();

        // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ: 16 keys × BMQ queries.
        float sacc[NT][4], dpacc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) sacc[nt][e] = dpacc[nt][e] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < KC; kc++) {
            uint32_t ak[4], av[4];
            ab_frag_a(ak, sK, S, warp * 16, kc * 16, g, t);
            ab_frag_a(av, sV, S, warp * 16, kc * 16, g, t);
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                uint32_t bb[2];
                ab_frag_b_nk(bb, sQ, S, nt * 8, kc * 16, g, t);
                mma_bf16_16816(sacc[nt], ak, bb, sacc[nt]);
                ab_frag_b_nk(bb, sdO, S, nt * 8, kc * 16, g, t);
                mma_bf16_16816(dpacc[nt], av, bb, dpacc[nt]);
            }
        }
        // Pᵀ (over sacc) and dSᵀ (over dpacc). Element e of tile nt: key row (e < 2 ? g : g+8),
        // query column nt·8 + 2t + (e&1).
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int col = nt * 8 + 2 * t + (e & 1), i = i0 + col, j = (e < 2) ? j_lo : j_hi;
                const bool ok = kok[e >> 1] && i < q_len && (!causal || j <= i);
                const float p = ok ? __expf(sacc[nt][e] * scale - sLse[col]) : 0.0f;
                dpacc[nt][e] = ok ? p * (dpacc[nt][e] - sD[col]) * scale : 0.0f;
                sacc[nt][e] = p;
            }
        // dV += Pᵀ·dO and dK += dSᵀ·Q: A from registers (C → A, k = queries), B[query][d] from the
        // row-major dO / Q tiles (pairs along the query axis).
#pragma unroll
        for (int kk = 0; kk < BMQ / 16; kk++) {
            uint32_t ap[4], ads[4];
            ab_c_to_a(ap, sacc[2 * kk], sacc[2 * kk + 1]);
            ab_c_to_a(ads, dpacc[2 * kk], dpacc[2 * kk + 1]);
#pragma unroll
            for (int dt = 0; dt < DT; dt++) {
                uint32_t bb[2];
                ab_frag_b_kn(bb, sdO, S, kk * 16, dt * 8, g, t);
                mma_bf16_16816(dvacc[dt], ap, bb, dvacc[dt]);
                ab_frag_b_kn(bb, sQ, S, kk * 16, dt * 8, g, t);
                mma_bf16_16816(dkacc[dt], ads, bb, dkacc[dt]);
            }
        }
    }
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int j = hh ? j_hi : j_lo;
        if (j < kv_len && kok[hh]) {
            const size_t off = ((size_t)b * kv_len + j) * w + (size_t)h * hd;
#pragma unroll
            for (int dt = 0; dt < DT; dt++) {
                const int d = dt * 8 + 2 * t;  // this block is the only writer of these elements
                if (d < hd) {
                    dk[off + d] += dkacc[dt][2 * hh];
                    dv[off + d] += dvacc[dt][2 * hh];
                }
                if (d + 1 < hd) {
                    dk[off + d + 1] += dkacc[dt][2 * hh + 1];
                    dv[off + d + 1] += dvacc[dt][2 * hh + 1];
                }
            }
        }
    }
}

// The bf16 entry points, one per head-dim bucket H (hd rounded up to 16; the host picks the bucket).
// Launch (all): block 128 (4 warps × 16 rows).
//   attention_fwd_bf16_d<H>:     grid (ceil(q_len/64), batch·heads)   — out, lse (as attention_fwd_f32)
//   attention_bwd_dq_bf16_d<H>:  grid (ceil(q_len/64), batch·heads)   — dq += (as attention_bwd_dq_f32)
//   attention_bwd_dkdv_bf16_d<H>: grid (ceil(kv_len/64), batch·heads) — dk, dv += (as attention_bwd_dkdv_f32)
#define AB_INSTANTIATE(H)                                                                                          \
    extern "C" __global__ void __launch_bounds__(AB_THREADS, 1) attention_fwd_bf16_d##H(                              \
        float* __restrict__ out, float* __restrict__ lse, const float* __restrict__ q, const float* __restrict__ k, \
        const float* __restrict__ v, const unsigned* __restrict__ key_mask, int q_len, int kv_len, int heads,      \
        int hd, float scale, int causal) {                                                                         \
        attn_fwd_bf16<H>(out, lse, q, k, v, key_mask, q_len, kv_len, heads, hd, scale, causal);                    \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(AB_THREADS, 1) attention_bwd_dq_bf16_d##H(                           \
        float* __restrict__ dq, const float* __restrict__ dout, const float* __restrict__ q,                       \
        const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ lse,                   \
        const float* __restrict__ delta, const unsigned* __restrict__ key_mask, int q_len, int kv_len, int heads,  \
        int hd, float scale, int causal) {                                                                         \
        attn_bwd_dq_bf16<H>(dq, dout, q, k, v, lse, delta, key_mask, q_len, kv_len, heads, hd, scale, causal);     \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(AB_THREADS, 1) attention_bwd_dkdv_bf16_d##H(                         \
        float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ dout,                            \
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,                     \
        const float* __restrict__ lse, const float* __restrict__ delta, const unsigned* __restrict__ key_mask,     \
        int q_len, int kv_len, int heads, int hd, float scale, int causal) {                                       \
        attn_bwd_dkdv_bf16<H>(dk, dv, dout, q, k, v, lse, delta, key_mask, q_len, kv_len, heads, hd, scale,       \
                              causal);                                                                             \
    }

// Buckets (mirrored by the host's BF16_BUCKETS): every multiple of 16 up to 160, so SD's 40/80/160
// and CLIP's 64 waste at most 8 padded columns.
AB_INSTANTIATE(16)
AB_INSTANTIATE(32)
AB_INSTANTIATE(48)
AB_INSTANTIATE(64)
AB_INSTANTIATE(80)
AB_INSTANTIATE(96)
AB_INSTANTIATE(112)
AB_INSTANTIATE(128)
AB_INSTANTIATE(144)
AB_INSTANTIATE(160)

// ============================================================================================
// Materialised path for head dims the flash kernels do not hold (hd > 160: the VAE's mid-block
// attention has one head of 512). Per (batch, head) pair the host computes S = Q·Kᵀ (raw scores, no
// scale) with cuBLAS into a workspace, these kernels turn S into P (forward) or P and dS (backward)
// in place, and cuBLAS does the remaining products (O = P·V; dV += Pᵀ·dO, dQ += dS·K, dK += dSᵀ·Q).
// The workspace holds a chunk of rows of the flattened (pair, query) row space: workspace row r is
// global row R = row0 + r, R = (b·heads + h)·q_len + i, its kv_len scores contiguous. Masking and
// the log-sum-exp follow the flash kernels exactly (att_key_ok, causal j ≤ i, lse = m + ln Σ p,
// -inf for a row with no allowed key).
// ============================================================================================
#define AW_THREADS 256

// Row softmax of the scaled scores, in place: s (nrows, kv_len) holds q_i·k_j (unscaled) on entry
// and P_ij = exp(scale·s_ij − m_i) / Σ_j' exp(scale·s_ij' − m_i) over the allowed keys on exit (0 for
// excluded keys); lse (batch, q_len, heads) gets m_i + ln Σ_j exp(scale·s_ij − m_i), as
// ops/attention.rs `cpu_forward` (max first, then the sum of exp(s − max)).
// Launch: grid (nrows), block 256, no dynamic smem; row0: the chunk's first global row.
extern "C" __global__ void __launch_bounds__(AW_THREADS)
attention_wide_softmax(float* __restrict__ s, float* __restrict__ lse, const unsigned* __restrict__ key_mask,
                       int row0, int q_len, int kv_len, int heads, float scale, int causal) {
    __shared__ float aw_red[32];
    const int R = row0 + (int)blockIdx.x;
    const int pair = R / q_len, i = R - pair * q_len;
    const int b = pair / heads, h = pair - b * heads;
    float* row = s + (size_t)blockIdx.x * kv_len;
    const int j_end = causal ? min(kv_len, i + 1) : kv_len;
    float m = ATT_NEG_INF;
    for (int j = threadIdx.x; j < j_end; j += blockDim.x)
        if (att_key_ok(key_mask, b, kv_len, j)) m = fmaxf(m, row[j] * scale);
    m = block_reduce<RedMax>(m, aw_red, ATT_NEG_INF);
    float l = 0.0f;
    if (m != ATT_NEG_INF)
        for (int j = threadIdx.x; j < j_end; j += blockDim.x)
            if (att_key_ok(key_mask, b, kv_len, j)) l += expf(row[j] * scale - m);
    l = block_sum(l, aw_red);
    // l ≥ 1 whenever a key is allowed (the max term is exp(0)); 0 only for a row without keys.
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int j = threadIdx.x; j < kv_len; j += blockDim.x) {
        const bool ok = j < j_end && att_key_ok(key_mask, b, kv_len, j);
        row[j] = ok ? expf(row[j] * scale - m) * inv : 0.0f;
    }
    if (threadIdx.x == 0) lse[((size_t)b * q_len + i) * heads + h] = l > 0.0f ? m + logf(l) : ATT_NEG_INF;
}

// The backward's elementwise step, in place: p (nrows, kv_len) holds q_i·k_j (unscaled) on entry and
// P_ij = exp(scale·s_ij − lse_i) on exit; ds holds dP_ij = dO_i·v_j on entry and
// dS_ij = P_ij (dP_ij − D_i) · scale on exit (both 0 for excluded keys), D from attention_bwd_delta.
// As attention_bwd_dq_f32 / ops/attention.rs `cpu_backward`.
// Launch: grid (nrows), block 256, no dynamic smem.
extern "C" __global__ void __launch_bounds__(AW_THREADS)
attention_wide_bwd_ds(float* __restrict__ p, float* __restrict__ ds, const float* __restrict__ lse,
                      const float* __restrict__ delta, const unsigned* __restrict__ key_mask, int row0, int q_len,
                      int kv_len, int heads, float scale, int causal) {
    const int R = row0 + (int)blockIdx.x;
    const int pair = R / q_len, i = R - pair * q_len;
    const int b = pair / heads, h = pair - b * heads;
    const size_t sidx = ((size_t)b * q_len + i) * heads + h;
    const float lse_i = lse[sidx], d_i = delta[sidx];
    float* prow = p + (size_t)blockIdx.x * kv_len;
    float* dsrow = ds + (size_t)blockIdx.x * kv_len;
    for (int j = threadIdx.x; j < kv_len; j += blockDim.x) {
        const bool ok = (!causal || j <= i) && att_key_ok(key_mask, b, kv_len, j);
        const float pj = ok ? expf(prow[j] * scale - lse_i) : 0.0f;
        dsrow[j] = ok ? pj * (dsrow[j] - d_i) * scale : 0.0f;
        prow[j] = pj;
    }
}
