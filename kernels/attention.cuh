// What the attention kernels share: kernels/attention.cu (versions 1: f32, bf16 and the
// materialised path; the backward) and kernels/attention_v2.cu (the forward's version 2) both
// include it. The semantics they implement are at the top of attention.cu.
#pragma once
#include "common.cuh"
#include <math_constants.h>

#define ATT_NEG_INF (-CUDART_INF_F)

// Whether key j of sequence b takes part (j < kv_len and not masked).
__device__ __forceinline__ bool att_key_ok(const unsigned* __restrict__ key_mask, int b, int kv_len, int j) {
    return j < kv_len && (key_mask == nullptr || key_mask[(size_t)b * kv_len + j] != 0u);
}

// ---- the bf16 tensor-core kernels ----
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (mma_bf16_16816 in common.cuh), fragment
// layouts from the PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"; with
// g = lane >> 2 (groupID) and t = lane & 3 (threadID_in_group), each .b32 register holding two bf16
// with the lower column/k index in the low 16 bits:
//   A (16×16, row-major, M×K):  a[0] = A[g  ][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]
//                               a[2] = A[g  ][2t+8, 2t+9] a[3] = A[g+8][2t+8, 2t+9]
//   B (16×8, K×N, "col"):       b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   C/D (16×8 f32):             c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// So the C fragments of two adjacent n8 tiles (columns 16kk..16kk+15) are, element for element, the
// A fragment of a k16 step over those columns: A[g][2t,2t+1] = C_{2kk}[0,1], A[g+8][2t,2t+1] =
// C_{2kk}[2,3], A[g][2t+8,2t+9] = C_{2kk+1}[0,1], A[g+8][2t+8,2t+9] = C_{2kk+1}[2,3]. That is how P
// (and dS) feed the second product without leaving registers (as FlashAttention-2).
typedef __nv_bfloat16 bf16;

// The A fragment of k-step kk from the C fragments c[2kk], c[2kk+1] of a 16 × (16·steps) product
// (see the layout note above), rounded to bf16.
__device__ __forceinline__ void ab_c_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
    a[0] = pack_bf16x2(c0[0], c0[1]);
    a[1] = pack_bf16x2(c0[2], c0[3]);
    a[2] = pack_bf16x2(c1[0], c1[1]);
    a[3] = pack_bf16x2(c1[2], c1[3]);
}

// The allowed-key bits of a forward key tile of 64 (bit c % 32 of okw[c / 32]: key j0 + c takes
// part), written by warps 0 and 1 (lane l of warp w tests key j0 + 32w + l; an OR over the warp).
// Two words instead of 64 flags: each lane of the softmax then reads 2 words, not 16 flags.
__device__ __forceinline__ void ab_key_bits(uint32_t* okw, const unsigned* __restrict__ key_mask, int b, int kv_len,
                                            int j0) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (warp < 2) {
        uint32_t bits = att_key_ok(key_mask, b, kv_len, j0 + 32 * warp + lane) ? 1u << lane : 0u;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) bits |= __shfl_xor_sync(0xffffffffu, bits, o);
        if (lane == 0) okw[warp] = bits;
    }
}

// One key tile's online-softmax step of the bf16 forward for a warp's 16 query rows, this lane's
// being i_lo = row g and i_hi = row g + 8: masks the scores sacc (raw q·k: 16 rows × 8·NT keys
// from j0; okw: the tile's allowed-key bits from ab_key_bits), updates the running maximum m and partial sum l (over this
// lane's columns; the quad's sum is taken at the end), rescales the output accumulators o, and
// leaves the probabilities in sacc for P·V. Element e of tile nt: row (e < 2 ? g : g + 8), key
// nt·8 + 2t + (e & 1).
// EXP2 false (versions 1 and 2, the same arithmetic in the same order): `scale` is the softmax's
//   scale; s = q·k · scale, m the maximum of s, p = __expf(s − m).
// EXP2 true (version 3, FlashAttention-2's form): `scale` is the softmax's scale · log2 e; m is the
//   maximum of q·k · scale (base-2 units) and p = 2^(q·k · scale − m), one FFMA and one ex2 per
//   score instead of two multiplies, a subtraction and the ex2 (__expf's own multiply by log2 e):
//   the same probabilities up to f32 rounding, so bf16-rounded P may differ from version 1's in
//   the last bit. `ab_store_rows<DT, true>` turns m back into natural units for the lse.
template <int NT, int DT, bool EXP2 = false>
__device__ __forceinline__ void ab_softmax_tile(float sacc[NT][4], float o[DT][4], float m[2], float l[2],
                                                const uint32_t* okw, int j0, int i_lo, int i_hi, int t,
                                                float scale, int causal) {
    static_assert(NT == 8, "a key tile of 64: the two words of ab_key_bits");
    const uint32_t ok_lo = okw[0], ok_hi = okw[1];
    float mx[2] = {ATT_NEG_INF, ATT_NEG_INF};
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int col = nt * 8 + 2 * t + (e & 1), i = (e < 2) ? i_lo : i_hi;
            const bool key_ok = (((nt < 4 ? ok_lo : ok_hi) >> (col & 31)) & 1u) != 0u;
            const bool allowed = key_ok && (!causal || j0 + col <= i);
            // EXP2: the product is formed again in the FFMA below; only the maximum needs it here
            // (scale > 0 and rounding is monotone: max(x)·scale = max(x·scale)).
            const float s = allowed ? (EXP2 ? sacc[nt][e] : sacc[nt][e] * scale) : ATT_NEG_INF;
            sacc[nt][e] = s;
            mx[e >> 1] = fmaxf(mx[e >> 1], s);
        }
    float mu[2], alpha[2];
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        // The quad (4 lanes, same g) holds the row's 8·NT columns.
        mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 1));
        mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 2));
        if (EXP2) mx[hh] *= scale;  // -inf stays -inf
        const float mnew = fmaxf(m[hh], mx[hh]);
        mu[hh] = mnew == ATT_NEG_INF ? 0.0f : mnew;  // no allowed key yet: avoid inf − inf
        alpha[hh] = EXP2 ? fast_exp2(m[hh] - mu[hh]) : __expf(m[hh] - mu[hh]);
        m[hh] = mnew;
        l[hh] *= alpha[hh];
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            // exp(-inf) = 0 for excluded keys (EXP2: -inf · scale − mu = -inf).
            const float p = EXP2 ? fast_exp2(fmaf(sacc[nt][e], scale, -mu[e >> 1])) : __expf(sacc[nt][e] - mu[e >> 1]);
            l[e >> 1] += p;
            sacc[nt][e] = p;
        }
#pragma unroll
    for (int dt = 0; dt < DT; dt++) {
        o[dt][0] *= alpha[0];
        o[dt][1] *= alpha[0];
        o[dt][2] *= alpha[1];
        o[dt][3] *= alpha[1];
    }
}

// The bf16 forward's end: the quad's sums of l, then out = o / l for this lane's two rows (those
// below q_len; the hd real columns) and lse = m + ln l (-inf for a row with no allowed key); with
// EXP2, m in base-2 units (see ab_softmax_tile): lse = m · ln 2 + ln l.
template <int DT, bool EXP2 = false>
__device__ __forceinline__ void ab_store_rows(float* __restrict__ out, float* __restrict__ lse, const float o[DT][4],
                                              const float m[2], float l[2], int b, int h, int i_lo, int i_hi,
                                              int q_len, int heads, int hd, int t) {
    const size_t w = (size_t)heads * hd;
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
    }
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int i = hh ? i_hi : i_lo;
        if (i < q_len) {
            const float inv = l[hh] > 0.0f ? 1.0f / l[hh] : 0.0f;
            float* orow = out + ((size_t)b * q_len + i) * w + (size_t)h * hd;
#pragma unroll
            for (int dt = 0; dt < DT; dt++) {
                const int d = dt * 8 + 2 * t;
                if (d < hd) orow[d] = o[dt][2 * hh] * inv;
                if (d + 1 < hd) orow[d + 1] = o[dt][2 * hh + 1] * inv;
            }
            const float mn = EXP2 ? m[hh] * 0.693147180559945309f : m[hh];
            if (t == 0) lse[((size_t)b * q_len + i) * heads + h] = l[hh] > 0.0f ? mn + logf(l[hh]) : ATT_NEG_INF;
        }
    }
}
