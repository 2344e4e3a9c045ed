// Normalisation kernels: layer norm and group norm (with the resnet's fused SiLU), forward and
// backward, mirroring the CPU reference in src/ops/norm.rs (`LayerNormParams`, `GroupNormParams`:
// `cpu_forward`, `cpu_backward`).
//
// Precision: the CPU reference computes the statistics and every normalised value in f64 and
// rounds to f32 at the end; these kernels do the same (per-thread f64 accumulators, f64 warp/block
// reductions, xhat = (x − μ)·rstd in f64). The affine map y = xhat·w + b is f32 as on the CPU and is
// written with __fmul_rn/__fadd_rn so that nvcc cannot contract it into an FMA (bit-parity).
//
// Determinism: every reduction has a fixed shape (per-block partial sums written to a workspace,
// combined in a fixed order by a later kernel); no atomics, so results are bit-reproducible.
//
// Workspace layouts (f64, written and read by the Rust wrappers in src/backend/cuda/ops.rs):
//   group norm forward  : psum[BG·NC] | psq[BG·NC] | stats[2·BG] = (μ, rstd) per (batch, group)
//   group norm backward : p1[BG·NC] | p2[BG·NC] | stats[2·BG] = (mean dxhat, mean dxhat·xhat)
//   dweight/dbias       : part[RC][c][2] = (Σ dy·xhat, Σ dy) per row chunk and channel
// where BG = batch·groups, NC = chunks per group (the grid's blocks per group), RC = row chunks.
#include "common.cuh"

// Σ p[0..n) by one full warp in a fixed order (lane-strided, then a butterfly); every lane gets it.
static __device__ __forceinline__ double nrm_warp_sum_array(const double* p, int n) {
    double s = 0.0;
    for (int k = threadIdx.x & 31; k < n; k += 32) s += p[k];
    return warp_sum_d(s);
}

// Element i of a group norm's (batch, hw, c) tensor: its channel and its (batch, group) row of the
// statistics. i < batch·hw·c ≤ 2^31 − 1 (checked by the wrapper), so the divisions are 32-bit.
struct NrmGnIndex {
    unsigned ch, bg;
};
static __device__ __forceinline__ NrmGnIndex nrm_gn_index(long long i, int hw, int c, int groups) {
    const unsigned ui = (unsigned)i, cpg = (unsigned)(c / groups);
    const unsigned row = ui / (unsigned)c, ch = ui - row * (unsigned)c;
    return {ch, (row / (unsigned)hw) * (unsigned)groups + ch / cpg};
}

// The f32 affine output y = xhat·w + b with xhat = ((x − μ)·rstd) evaluated in f64 and rounded,
// exactly as the CPU's `((x as f64 − mu) * rs) as f32 * w + b`.
static __device__ __forceinline__ float nrm_affine(float x, double mu, double rs, float w, float b) {
    const float xh = (float)(((double)x - mu) * rs);
    return __fadd_rn(__fmul_rn(xh, w), b);
}

// The gradient at the affine output of a group norm: dout itself, or when the SiLU is fused,
// dout·silu'(y) with y recomputed from the saved f32 mean and rstd (ops/norm.rs `GroupNormParams::cpu_backward`:
// s = 1/(1+e^(−y)), dy = dout·s·(1 + y·(1 − s)), all f32).
static __device__ __forceinline__ float nrm_gn_dy(float dout, float x, float w, float b, float mean, float rstd,
                                                  int silu) {
    if (!silu) return dout;
    const float y = nrm_affine(x, (double)mean, (double)rstd, w, b);
    const float s = 1.0f / (1.0f + expf(-y));
    return __fmul_rn(__fmul_rn(dout, s), __fadd_rn(1.0f, __fmul_rn(y, __fsub_rn(1.0f, s))));
}

// Element i (channel ch) of a group norm backward in f64: dxhat = dy·w (dy through the SiLU when
// fused) and xhat = (x − μ)·rstd from the saved f32 statistics: what the reduction sums and the
// input-gradient update reads (ops/norm.rs `GroupNormParams::cpu_backward`).
struct NrmGnGrad {
    double dxh, xhat;
};
static __device__ __forceinline__ NrmGnGrad nrm_gn_grad(const float* dout, const float* inp, const float* weight,
                                                        const float* bias, size_t i, int ch, float m, float rs,
                                                        int silu) {
    const float x = inp[i], w = weight[ch];
    const float dy = nrm_gn_dy(dout[i], x, w, silu ? bias[ch] : 0.0f, m, rs, silu);
    return NrmGnGrad{(double)dy * (double)w, ((double)x - (double)m) * (double)rs};
}

// ---------------------------------------------------------------------------------------------
// Layer norm
// ---------------------------------------------------------------------------------------------

// layer_norm_forward: out = ((x − μ)·rstd)·w + b per row of `cols`, μ and the population variance
// in f64 by two passes, rstd = 1/√(var + eps); mean[row] = μ, rstd[row] = rstd (rounded to f32).
// Mirrors cpu/mod.rs `layer_norm_forward`.
// Launch: block 256 threads = 8 warps, one warp per row; grid ceil(rows/8) (capped; warps stride
// over rows).
template <typename T>
__device__ void ln_forward_t(T* out, float* mean, float* rstd, const T* inp, const float* weight, const float* bias, int rows, int cols, float eps) {
    const int lane = threadIdx.x & 31;
    const long long wpb = blockDim.x >> 5;
    for (long long row = blockIdx.x * wpb + (threadIdx.x >> 5); row < rows; row += (long long)gridDim.x * wpb) {
        const T* x = inp + row * cols;
        T* o = out + row * cols;
        double s = 0.0;
        for (int c = lane; c < cols; c += 32) s += (double)ld_act(x[c]);
        const double mu = warp_sum_d(s) / cols;
        double q = 0.0;
        for (int c = lane; c < cols; c += 32) {
            const double d = (double)ld_act(x[c]) - mu;
            q += d * d;
        }
        const double rs = 1.0 / sqrt(warp_sum_d(q) / cols + (double)eps);
        for (int c = lane; c < cols; c += 32) o[c] = st_act<T>(nrm_affine(ld_act(x[c]), mu, rs, weight[c], bias[c]));
        if (lane == 0) {
            mean[row] = (float)mu;
            rstd[row] = (float)rs;
        }
    }
}
extern "C" __global__ void ln_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                                      const float* bias, int rows, int cols, float eps) {
    ln_forward_t(out, mean, rstd, inp, weight, bias, rows, cols, eps);
}
extern "C" __global__ void ln_forward_bf16(__nv_bfloat16* out, float* mean, float* rstd, const __nv_bfloat16* inp, const float* weight, const float* bias, int rows, int cols, float eps) {
    ln_forward_t(out, mean, rstd, inp, weight, bias, rows, cols, eps);
}

// layer_norm_backward, the input part: with xhat = (x − μ)·rstd and g = dy·w (f64),
// dinp += (g − mean(g) − xhat·mean(g·xhat))·rstd from the saved f32 μ and rstd.
// Mirrors ops/norm.rs `LayerNormParams::cpu_backward` (first loop). Launch: as ln_forward (one warp per row).
extern "C" __global__ void ln_backward_dinp(float* dinp, const float* dout, const float* inp, const float* weight,
                                            const float* mean, const float* rstd, int rows, int cols) {
    const int lane = threadIdx.x & 31;
    const long long wpb = blockDim.x >> 5;
    for (long long row = blockIdx.x * wpb + (threadIdx.x >> 5); row < rows; row += (long long)gridDim.x * wpb) {
        const float* x = inp + row * cols;
        const float* dy = dout + row * cols;
        float* di = dinp + row * cols;
        const double mu = (double)mean[row], rs = (double)rstd[row];
        double m1 = 0.0, m2 = 0.0;
        for (int c = lane; c < cols; c += 32) {
            const double xhat = ((double)x[c] - mu) * rs;
            const double g = (double)dy[c] * (double)weight[c];
            m1 += g;
            m2 += g * xhat;
        }
        m1 = warp_sum_d(m1) / cols;
        m2 = warp_sum_d(m2) / cols;
        for (int c = lane; c < cols; c += 32) {
            const double xhat = ((double)x[c] - mu) * rs;
            const double g = (double)dy[c] * (double)weight[c];
            di[c] = di[c] + (float)((g - m1 - xhat * m2) * rs);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// dweight / dbias of both norms: column sums over rows
// ---------------------------------------------------------------------------------------------

#define NRM_DP_ROWS 8  // blockDim.y of nrm_dparams_partial

// Partial sums, per chunk of `rows_per_chunk` rows and per channel ch, of dy·xhat and dy (f64),
// where the statistics of element (r, ch) are mean/rstd[(r / hw)·groups + ch / (c / groups)] and dy
// is `nrm_gn_dy` (SiLU recomputed when `silu`). Group norm: rows = batch·hw. Layer norm: hw = 1,
// groups = 1 (statistics per row), silu = 0, `bias` unused (may be null).
// Mirrors the dweight/dbias loops of ops/norm.rs `cpu_backward` of both norms.
// Launch: block (32, 8): threadIdx.x picks the channel (coalesced), threadIdx.y strides the rows;
// grid (ceil(c/32), row chunks). Writes part[(chunk·c + ch)·2 + {0, 1}].
extern "C" __global__ void nrm_dparams_partial(double* part, const float* dout, const float* inp, const float* weight,
                                               const float* bias, const float* mean, const float* rstd, int rows,
                                               int hw, int c, int groups, int rows_per_chunk, int silu) {
    __shared__ double sw_s[NRM_DP_ROWS][33];
    __shared__ double sb_s[NRM_DP_ROWS][33];
    const int ch = blockIdx.x * 32 + threadIdx.x;
    const int r0 = blockIdx.y * rows_per_chunk;
    const int r1 = (int)min((long long)rows, (long long)r0 + rows_per_chunk);
    double sw = 0.0, sb = 0.0;
    if (ch < c) {
        const int g = ch / (c / groups);
        const float w = silu ? weight[ch] : 0.0f;
        const float b = silu ? bias[ch] : 0.0f;
        for (int r = r0 + threadIdx.y; r < r1; r += NRM_DP_ROWS) {
            const size_t i = (size_t)r * c + ch;
            const int st = (r / hw) * groups + g;
            const float m = mean[st], rs = rstd[st];
            const float x = inp[i];
            const float dy = nrm_gn_dy(dout[i], x, w, b, m, rs, silu);
            const double xhat = ((double)x - (double)m) * (double)rs;
            sw += (double)dy * xhat;
            sb += (double)dy;
        }
    }
    sw_s[threadIdx.y][threadIdx.x] = sw;
    sb_s[threadIdx.y][threadIdx.x] = sb;
    __syncthreads();
    if (threadIdx.y == 0 && ch < c) {
#pragma unroll
        for (int y = 1; y < NRM_DP_ROWS; y++) {
            sw += sw_s[y][threadIdx.x];
            sb += sb_s[y][threadIdx.x];
        }
        const size_t o = ((size_t)blockIdx.y * c + ch) * 2;
        part[o] = sw;
        part[o + 1] = sb;
    }
}

// dweight[ch] += Σ_chunks part[chunk][ch][0], dbias[ch] += Σ_chunks part[chunk][ch][1], summed in
// chunk order in f64 and rounded once (as the CPU's `*dw += sw as f32`).
// Launch: 1-D, one thread per channel (block 256, grid ceil(c/256)).
extern "C" __global__ void nrm_dparams_finalize(float* dweight, float* dbias, const double* part, int c, int chunks) {
    for (int ch = blockIdx.x * blockDim.x + threadIdx.x; ch < c; ch += gridDim.x * blockDim.x) {
        double sw = 0.0, sb = 0.0;
        for (int k = 0; k < chunks; k++) {
            const size_t o = ((size_t)k * c + ch) * 2;
            sw += part[o];
            sb += part[o + 1];
        }
        dweight[ch] = dweight[ch] + (float)sw;
        dbias[ch] = dbias[ch] + (float)sb;
    }
}

// ---------------------------------------------------------------------------------------------
// Group norm: channels-last (batch, hw, c), statistics per (batch, group) over hw × c/groups.
// Each (batch, group) is split into `nchunks` chunks of `rows_per_chunk` positions; block `blk`
// handles chunk blk % nchunks of group bg = blk / nchunks (grid = BG·nchunks blocks, 1-D).
// ---------------------------------------------------------------------------------------------

// The elements of one chunk: positions [p0, p1) of group g of batch b, channels g·cpg + [0, cpg).
struct NrmChunk {
    size_t base;  // element offset of (b, p0, g·cpg)
    int count;    // (p1 − p0)·cpg
};

static __device__ __forceinline__ NrmChunk nrm_chunk(int blk, int nchunks, int hw, int c, int groups,
                                                     int rows_per_chunk) {
    const int cpg = c / groups;
    const int bg = blk / nchunks, chunk = blk - bg * nchunks;
    const int b = bg / groups, g = bg - b * groups;
    const int p0 = chunk * rows_per_chunk;  // < hw by construction of nchunks
    const int p1 = (int)min((long long)hw, (long long)p0 + rows_per_chunk);
    return NrmChunk{((size_t)b * hw + p0) * c + (size_t)g * cpg, (p1 - p0) * cpg};
}

// group_norm_forward pass 1: psum[blk] = Σ x over the block's chunk (f64).
// Mirrors the first loop of cpu/mod.rs `group_norm_forward`. Launch: 1-D grid BG·nchunks, block 256.
template <typename T>
__device__ void gn_forward_sum_t(double* psum, const T* inp, int hw, int c, int groups, int nchunks, int rows_per_chunk) {
    __shared__ double scratch[32];
    const int cpg = c / groups;
    const NrmChunk ck = nrm_chunk(blockIdx.x, nchunks, hw, c, groups, rows_per_chunk);
    const T* x = inp + ck.base;
    double s = 0.0;
    for (int k = threadIdx.x; k < ck.count; k += blockDim.x) {
        const int p = k / cpg, j = k - p * cpg;
        s += (double)ld_act(x[(size_t)p * c + j]);
    }
    s = block_sum_d(s, scratch);
    if (threadIdx.x == 0) psum[blockIdx.x] = s;
}
extern "C" __global__ void gn_forward_sum(double* psum, const float* inp, int hw, int c, int groups, int nchunks,
                                          int rows_per_chunk) {
    gn_forward_sum_t(psum, inp, hw, c, groups, nchunks, rows_per_chunk);
}
extern "C" __global__ void gn_forward_sum_bf16(double* psum, const __nv_bfloat16* inp, int hw, int c, int groups, int nchunks, int rows_per_chunk) {
    gn_forward_sum_t(psum, inp, hw, c, groups, nchunks, rows_per_chunk);
}

// group_norm_forward pass 2: μ = Σ psum[bg·nchunks..] / (hw·cpg) (warp 0, fixed order: the same
// value gn_forward_finalize computes), then psq[blk] = Σ (x − μ)² over the chunk (f64).
// Mirrors the second loop of cpu/mod.rs `group_norm_forward`. Launch: as gn_forward_sum.
template <typename T>
__device__ void gn_forward_sqdev_t(double* psq, const double* psum, const T* inp, int hw, int c, int groups, int nchunks, int rows_per_chunk) {
    __shared__ double scratch[32];
    __shared__ double mu_s;
    const int cpg = c / groups;
    const int bg = blockIdx.x / nchunks;
    if (threadIdx.x < 32) {
        const double s = nrm_warp_sum_array(psum + (size_t)bg * nchunks, nchunks);
        if (threadIdx.x == 0) mu_s = s / ((double)hw * cpg);
    }
    __syncthreads();
    const double mu = mu_s;
    const NrmChunk ck = nrm_chunk(blockIdx.x, nchunks, hw, c, groups, rows_per_chunk);
    const T* x = inp + ck.base;
    double q = 0.0;
    for (int k = threadIdx.x; k < ck.count; k += blockDim.x) {
        const int p = k / cpg, j = k - p * cpg;
        const double d = (double)ld_act(x[(size_t)p * c + j]) - mu;
        q += d * d;
    }
    q = block_sum_d(q, scratch);
    if (threadIdx.x == 0) psq[blockIdx.x] = q;
}
extern "C" __global__ void gn_forward_sqdev(double* psq, const double* psum, const float* inp, int hw, int c,
                                            int groups, int nchunks, int rows_per_chunk) {
    gn_forward_sqdev_t(psq, psum, inp, hw, c, groups, nchunks, rows_per_chunk);
}
extern "C" __global__ void gn_forward_sqdev_bf16(double* psq, const double* psum, const __nv_bfloat16* inp, int hw, int c, int groups, int nchunks, int rows_per_chunk) {
    gn_forward_sqdev_t(psq, psum, inp, hw, c, groups, nchunks, rows_per_chunk);
}

// group_norm_forward pass 3: per (batch, group) μ = Σpsum / n, var = Σpsq / n (population),
// rstd = 1/√(var + eps) in f64; mean/rstd outputs get them rounded to f32, stats[2bg..] keeps the
// f64 values for the normalisation pass (the CPU normalises with the f64 statistics too).
// Launch: grid BG, block 32 (one warp per group).
extern "C" __global__ void gn_forward_finalize(float* mean, float* rstd, double* stats, const double* psum,
                                               const double* psq, int hw, int cpg, int nchunks, float eps) {
    const int bg = blockIdx.x;
    const double n = (double)hw * cpg;
    const double s = nrm_warp_sum_array(psum + (size_t)bg * nchunks, nchunks);
    const double q = nrm_warp_sum_array(psq + (size_t)bg * nchunks, nchunks);
    if (threadIdx.x == 0) {
        const double mu = s / n;
        const double rs = 1.0 / sqrt(q / n + (double)eps);
        mean[bg] = (float)mu;
        rstd[bg] = (float)rs;
        stats[2 * bg] = mu;
        stats[2 * bg + 1] = rs;
    }
}

// group_norm_forward pass 4: out = ((x − μ)·rstd)·w[ch] + b[ch], then SiLU y/(1 + e^(−y)) when
// `silu` (f32, as cpu/mod.rs `silu`). Launch: 1-D grid-stride over batch·hw·c (block 256).
template <typename T>
__device__ void gn_forward_apply_t(T* out, const T* inp, const float* weight, const float* bias, const double* stats, int batch, int hw, int c, int groups, int silu) {
    GRID_STRIDE(i, (long long)batch * hw * c) {
        const NrmGnIndex at = nrm_gn_index(i, hw, c, groups);
        const unsigned ch = at.ch, bg = at.bg;
        float y = nrm_affine(ld_act(inp[i]), stats[2 * bg], stats[2 * bg + 1], weight[ch], bias[ch]);
        if (silu) y = y / (1.0f + expf(-y));
        out[i] = st_act<T>(y);
    }
}
extern "C" __global__ void gn_forward_apply(float* out, const float* inp, const float* weight, const float* bias,
                                            const double* stats, int batch, int hw, int c, int groups, int silu) {
    gn_forward_apply_t(out, inp, weight, bias, stats, batch, hw, c, groups, silu);
}
extern "C" __global__ void gn_forward_apply_bf16(__nv_bfloat16* out, const __nv_bfloat16* inp, const float* weight, const float* bias, const double* stats, int batch, int hw, int c, int groups, int silu) {
    gn_forward_apply_t(out, inp, weight, bias, stats, batch, hw, c, groups, silu);
}

// ---- group norm forward, version 2 (issue 18: ROENTGEN_KERNELS=group_norm=2) -------------------
// What it changes: v1 reads x three times in four launches (Σx, Σ(x − μ)², the statistics, the
// normalisation). v2 takes the moments Σx and Σx² in one pass and lets every normalisation block
// combine its group's chunk moments itself, so x is read twice in two launches; when a group fits
// one chunk (nchunks = 1, ≤ 8192 elements: SD's 8×8 level at 512²) one launch does both and its
// second read of the chunk (≤ 32 KB) comes from L1/L2.
// Roofline: group norm is memory-bound (~10 flops per element). At SD's 64×64×320, batch 2
// (2.6 M elements, 10.5 MB f32): v1 moves 3 reads + 1 write = 42 MB, ≈ 12.5 µs at 3.35 TB/s (H100
// SXM) plus 4 launches; v2 moves 2 + 1 = 31 MB (21 MB when the re-read hits the 50 MB L2), ≈ 6–9 µs
// in two launches: expected 1.3–1.8× on the ~60 group norms of a U-Net call.
// Precision: var = Σx²/n − μ² in f64. For f32 data the cancellation costs log10(μ²/σ²) of f64's
// ~16 digits, so the statistics keep ≥ 8 correct digits unless |μ|/σ > 10⁴; the normalised values
// are then rounded to f32 as in v1 (they equal the CPU's to within an f32 ulp or two, not always
// bit for bit). Deterministic: fixed-order block and chunk sums, no atomics.

// Σx and Σx² over the block's chunk (f64), by every thread of the block (each gets both sums).
template <typename T>
static __device__ __forceinline__ void nrm_gn_moments(const T* x, int count, int cpg, int c, double* scratch,
                                                      double& s, double& q) {
    s = 0.0;
    q = 0.0;
    for (int k = threadIdx.x; k < count; k += blockDim.x) {
        const int p = k / cpg, j = k - p * cpg;
        const double v = (double)ld_act(x[(size_t)p * c + j]);
        s += v;
        q += v * v;
    }
    s = block_sum_d(s, scratch);
    q = block_sum_d(q, scratch);
}

// v2 pass 1, launched only when a group spans several chunks: psum[blk] = Σx, psq[blk] = Σx².
// Launch: 1-D grid BG·nchunks, block 256 (as gn_forward_sum).
template <typename T>
__device__ void gn_forward_moments_v2_t(double* psum, double* psq, const T* inp, int hw, int c, int groups, int nchunks, int rows_per_chunk) {
    __shared__ double scratch[32];
    const NrmChunk ck = nrm_chunk(blockIdx.x, nchunks, hw, c, groups, rows_per_chunk);
    double s, q;
    nrm_gn_moments(inp + ck.base, ck.count, c / groups, c, scratch, s, q);
    if (threadIdx.x == 0) {
        psum[blockIdx.x] = s;
        psq[blockIdx.x] = q;
    }
}
extern "C" __global__ void gn_forward_moments_v2(double* psum, double* psq, const float* inp, int hw, int c,
                                                 int groups, int nchunks, int rows_per_chunk) {
    gn_forward_moments_v2_t(psum, psq, inp, hw, c, groups, nchunks, rows_per_chunk);
}
extern "C" __global__ void gn_forward_moments_bf16_v2(double* psum, double* psq, const __nv_bfloat16* inp, int hw, int c, int groups, int nchunks, int rows_per_chunk) {
    gn_forward_moments_v2_t(psum, psq, inp, hw, c, groups, nchunks, rows_per_chunk);
}

// v2 pass 2: the group's μ and rstd (from this block's own moments when nchunks = 1, else from
// the chunks' in a fixed order), mean/rstd written by the group's first block, then the chunk
// normalised as gn_forward_apply does (+ SiLU). Launch: as gn_forward_moments_v2.
template <typename T>
__device__ void gn_forward_apply_v2_t(T* out, float* mean, float* rstd, const T* inp, const float* weight, const float* bias, const double* psum, const double* psq, int hw, int c, int groups, int nchunks, int rows_per_chunk, float eps, int silu) {
    __shared__ double scratch[32];
    __shared__ double stat[2];
    const int cpg = c / groups;
    const int bg = blockIdx.x / nchunks, g = bg % groups;
    const NrmChunk ck = nrm_chunk(blockIdx.x, nchunks, hw, c, groups, rows_per_chunk);
    const T* x = inp + ck.base;
    double s = 0.0, q = 0.0;
    if (nchunks == 1) {
        nrm_gn_moments(x, ck.count, cpg, c, scratch, s, q);
    } else if (threadIdx.x < 32) {
        s = nrm_warp_sum_array(psum + (size_t)bg * nchunks, nchunks);
        q = nrm_warp_sum_array(psq + (size_t)bg * nchunks, nchunks);
    }
    if (threadIdx.x == 0) {
        const double n = (double)hw * cpg;
        const double mu = s / n;
        const double rs = 1.0 / sqrt(fmax(q / n - mu * mu, 0.0) + (double)eps);
        stat[0] = mu;
        stat[1] = rs;
        if (blockIdx.x - bg * nchunks == 0) {
            mean[bg] = (float)mu;
            rstd[bg] = (float)rs;
        }
    }
    __syncthreads();
    const double mu = stat[0], rs = stat[1];
    const float* w = weight + g * cpg;
    const float* b = bias + g * cpg;
    T* y = out + ck.base;
    for (int k = threadIdx.x; k < ck.count; k += blockDim.x) {
        const int p = k / cpg, j = k - p * cpg;
        float v = nrm_affine(ld_act(x[(size_t)p * c + j]), mu, rs, w[j], b[j]);
        if (silu) v = v / (1.0f + expf(-v));
        y[(size_t)p * c + j] = st_act<T>(v);
    }
}
extern "C" __global__ void gn_forward_apply_v2(float* out, float* mean, float* rstd, const float* inp,
                                               const float* weight, const float* bias, const double* psum,
                                               const double* psq, int hw, int c, int groups, int nchunks,
                                               int rows_per_chunk, float eps, int silu) {
    gn_forward_apply_v2_t(out, mean, rstd, inp, weight, bias, psum, psq, hw, c, groups, nchunks, rows_per_chunk, eps, silu);
}
extern "C" __global__ void gn_forward_apply_bf16_v2(__nv_bfloat16* out, float* mean, float* rstd, const __nv_bfloat16* inp, const float* weight, const float* bias, const double* psum, const double* psq, int hw, int c, int groups, int nchunks, int rows_per_chunk, float eps, int silu) {
    gn_forward_apply_v2_t(out, mean, rstd, inp, weight, bias, psum, psq, hw, c, groups, nchunks, rows_per_chunk, eps, silu);
}

// group_norm_backward pass 1: over the block's chunk, with dy = nrm_gn_dy, dxhat = dy·w (f64) and
// xhat = (x − μ)·rstd from the saved f32 statistics: p1[blk] = Σ dxhat, p2[blk] = Σ dxhat·xhat.
// Mirrors the `stats` loop of ops/norm.rs `GroupNormParams::cpu_backward`. Launch: as gn_forward_sum.
extern "C" __global__ void gn_backward_reduce(double* p1, double* p2, const float* dout, const float* inp,
                                              const float* weight, const float* bias, const float* mean,
                                              const float* rstd, int hw, int c, int groups, int nchunks,
                                              int rows_per_chunk, int silu) {
    __shared__ double scratch[32];
    const int cpg = c / groups;
    const int bg = blockIdx.x / nchunks, g = bg % groups;
    const float m = mean[bg], rs = rstd[bg];
    const NrmChunk ck = nrm_chunk(blockIdx.x, nchunks, hw, c, groups, rows_per_chunk);
    double m1 = 0.0, m2 = 0.0;
    for (int k = threadIdx.x; k < ck.count; k += blockDim.x) {
        const int p = k / cpg, j = k - p * cpg;
        const int ch = g * cpg + j;
        const NrmGnGrad d = nrm_gn_grad(dout, inp, weight, bias, ck.base + (size_t)p * c + j, ch, m, rs, silu);
        m1 += d.dxh;
        m2 += d.dxh * d.xhat;
    }
    m1 = block_sum_d(m1, scratch);
    m2 = block_sum_d(m2, scratch);
    if (threadIdx.x == 0) {
        p1[blockIdx.x] = m1;
        p2[blockIdx.x] = m2;
    }
}

// group_norm_backward pass 2: stats[2bg] = Σp1 / n, stats[2bg + 1] = Σp2 / n (n = hw·cpg), f64.
// Launch: grid BG, block 32.
extern "C" __global__ void gn_backward_finalize(double* stats, const double* p1, const double* p2, int hw, int cpg,
                                                int nchunks) {
    const int bg = blockIdx.x;
    const double n = (double)hw * cpg;
    const double s1 = nrm_warp_sum_array(p1 + (size_t)bg * nchunks, nchunks);
    const double s2 = nrm_warp_sum_array(p2 + (size_t)bg * nchunks, nchunks);
    if (threadIdx.x == 0) {
        stats[2 * bg] = s1 / n;
        stats[2 * bg + 1] = s2 / n;
    }
}

// group_norm_backward pass 3: dinp += (dxhat − m1 − xhat·m2)·rstd (f64, rounded once), m1/m2 from
// stats. Mirrors the dinp loop of ops/norm.rs `GroupNormParams::cpu_backward`. Launch: 1-D grid-stride over
// batch·hw·c (block 256). (dweight/dbias: nrm_dparams_partial + nrm_dparams_finalize.)
extern "C" __global__ void gn_backward_dinp(float* dinp, const float* dout, const float* inp, const float* weight,
                                            const float* bias, const float* mean, const float* rstd,
                                            const double* stats, int batch, int hw, int c, int groups, int silu) {
    GRID_STRIDE(i, (long long)batch * hw * c) {
        const NrmGnIndex at = nrm_gn_index(i, hw, c, groups);
        const unsigned ch = at.ch, bg = at.bg;
        const float rs = rstd[bg];
        const NrmGnGrad d = nrm_gn_grad(dout, inp, weight, bias, (size_t)i, (int)ch, mean[bg], rs, silu);
        dinp[i] = dinp[i] + (float)((d.dxh - stats[2 * bg] - d.xhat * stats[2 * bg + 1]) * (double)rs);
    }
}

// ---- group_norm_backward version 2 (issue 18: ROENTGEN_KERNELS=group_norm_backward=2) ----------
// What it changes: v1's passes 2 and 3 (gn_backward_finalize: BG blocks of 32 threads; then
// gn_backward_dinp: a grid-stride pass whose every element divides by c and hw to find its channel
// and group) become one launch laid out as gn_backward_reduce: each block's warp 0 sums its
// group's partials in finalize's order (so m1 and m2 are v1's to the bit), then the block updates
// its own chunk, walked as the reduce walks it (one division by cpg per element, none by c or hw).
// Roofline: dinp's pass is memory-bound (read dout, x, dinp; write dinp: 16 B per element; SD's
// 64×64×320 map at batch 2 is 2.6 M elements, 42 MB: ≈13 µs at 3.35 TB/s); v1 adds a launch
// (≈3 µs on a graph-less stream) and integer division work that keeps the pass from its bandwidth
// at small channel counts. Expected: 1.1–1.4× on the pass, one launch fewer per norm backward (61
// group norms in SD's U-Net). Numerics: identical to v1 (the same f64 formula per element).
// Launch: as gn_backward_reduce (grid BG·nchunks, block 256).
extern "C" __global__ void gn_backward_dinp_v2(float* dinp, const double* p1, const double* p2, const float* dout,
                                               const float* inp, const float* weight, const float* bias,
                                               const float* mean, const float* rstd, int hw, int c, int groups,
                                               int nchunks, int rows_per_chunk, int silu) {
    __shared__ double st[2];
    const int cpg = c / groups;
    const int bg = blockIdx.x / nchunks, g = bg % groups;
    if (threadIdx.x < 32) {
        const double n = (double)hw * cpg;
        const double s1 = nrm_warp_sum_array(p1 + (size_t)bg * nchunks, nchunks);
        const double s2 = nrm_warp_sum_array(p2 + (size_t)bg * nchunks, nchunks);
        if (threadIdx.x == 0) {
            st[0] = s1 / n;
            st[1] = s2 / n;
        }
    }
    __syncthreads();
    const double m1 = st[0], m2 = st[1];
    const float m = mean[bg], rs = rstd[bg];
    const NrmChunk ck = nrm_chunk(blockIdx.x, nchunks, hw, c, groups, rows_per_chunk);
    for (int k = threadIdx.x; k < ck.count; k += blockDim.x) {
        const int p = k / cpg, j = k - p * cpg;
        const int ch = g * cpg + j;
        const size_t i = ck.base + (size_t)p * c + j;
        const NrmGnGrad d = nrm_gn_grad(dout, inp, weight, bias, i, ch, m, rs, silu);
        dinp[i] = dinp[i] + (float)((d.dxh - m1 - d.xhat * m2) * (double)rs);
    }
}

// batch_norm_forward (inference): out = inp·scale[ch] + shift[ch], then ReLU when relu, with the
// running statistics folded into (scale, shift) at load (ops/norm.rs `BatchNormParams::cpu_forward`:
// a multiply, then an add, rounded apart as on the CPU). Launch: 1-D grid-stride over rows·c.
extern "C" __global__ void bn_forward(float* out, const float* inp, const float* scale, const float* shift, int n,
                                      int c, int relu) {
    GRID_STRIDE(i, n) {
        const unsigned ch = (unsigned)i % (unsigned)c;
        const float y = __fadd_rn(__fmul_rn(inp[i], scale[ch]), shift[ch]);
        out[i] = relu ? fmaxf(y, 0.0f) : y;
    }
}

// ---------------------------------------------------------------------------------------------
// batch norm in training mode (ops/norm.rs `BatchNormTrainParams`): statistics and backward
// ---------------------------------------------------------------------------------------------

#define BN_ROWS 8  // blockDim.y of bn_train_partial

// Per chunk of `rows_per_chunk` rows and per channel ch, two f64 partial sums: mode 0 (statistics)
// Σx and Σx²; mode 1 (backward) Σg and Σg·x̂ with g = dout (0 where out ≤ 0 when relu) and
// x̂ = (x − mean)·rstd. Mirrors `BatchNormTrainParams::cpu_stats` / `cpu_backward` (whose chunks are
// 256 rows; these are the launcher's, so sums agree to rounding, not to the bit).
// Launch: block (32, 8): threadIdx.x picks the channel (coalesced), threadIdx.y strides the rows;
// grid (ceil(c/32), row chunks). Writes part[(chunk·c + ch)·2 + {0, 1}]. In mode 0, dout, out,
// mean and rstd are unused (may be null).
extern "C" __global__ void bn_train_partial(double* part, const float* inp, const float* dout, const float* out,
                                            const float* mean, const float* rstd, int rows, int c,
                                            int rows_per_chunk, int mode, int relu) {
    __shared__ double s0[BN_ROWS][33];
    __shared__ double s1[BN_ROWS][33];
    const int ch = blockIdx.x * 32 + threadIdx.x;
    const int r0 = blockIdx.y * rows_per_chunk;
    const int r1 = (int)min((long long)rows, (long long)r0 + rows_per_chunk);
    double a = 0.0, b = 0.0;
    if (ch < c) {
        const double m = mode ? (double)mean[ch] : 0.0, rs = mode ? (double)rstd[ch] : 0.0;
        for (int r = r0 + threadIdx.y; r < r1; r += BN_ROWS) {
            const size_t i = (size_t)r * c + ch;
            const double x = (double)inp[i];
            if (mode == 0) {
                a += x;
                b += x * x;
            } else {
                const double g = (relu && out[i] <= 0.0f) ? 0.0 : (double)dout[i];
                a += g;
                b += g * (x - m) * rs;
            }
        }
    }
    s0[threadIdx.y][threadIdx.x] = a;
    s1[threadIdx.y][threadIdx.x] = b;
    __syncthreads();
    if (threadIdx.y == 0 && ch < c) {
#pragma unroll
        for (int y = 1; y < BN_ROWS; y++) {
            a += s0[y][threadIdx.x];
            b += s1[y][threadIdx.x];
        }
        const size_t o = ((size_t)blockIdx.y * c + ch) * 2;
        part[o] = a;
        part[o + 1] = b;
    }
}

// batch_norm_stats, per channel from the chunks' Σx, Σx² (summed in chunk order): mean, biased var
// (clamped at 0), rstd = 1/√(var + ε) rounded once from f64; scale = weight·rstd and shift =
// bias − mean·scale in f32; running_mean/var ← (1 − m)·running + m·(mean, var·n/(n − 1)) in f64.
// Launch: 1-D, one thread per channel.
extern "C" __global__ void bn_train_stats(float* mean, float* rstd, float* scale, float* shift, float* running_mean,
                                          float* running_var, const double* part, const float* weight,
                                          const float* bias, int rows, int c, int chunks, float eps, float momentum) {
    for (int ch = blockIdx.x * blockDim.x + threadIdx.x; ch < c; ch += gridDim.x * blockDim.x) {
        double s = 0.0, s2 = 0.0;
        for (int k = 0; k < chunks; k++) {
            s += part[((size_t)k * c + ch) * 2];
            s2 += part[((size_t)k * c + ch) * 2 + 1];
        }
        const double n = (double)rows, m = (double)momentum;
        const double mu = s / n;
        const double var = fmax(s2 / n - mu * mu, 0.0);
        const float mf = (float)mu, rf = (float)(1.0 / sqrt(var + (double)eps));
        mean[ch] = mf;
        rstd[ch] = rf;
        const float sc = __fmul_rn(weight[ch], rf);
        scale[ch] = sc;
        shift[ch] = __fsub_rn(bias[ch], __fmul_rn(mf, sc));
        running_mean[ch] = (float)((1.0 - m) * (double)running_mean[ch] + m * mu);
        running_var[ch] = (float)((1.0 - m) * (double)running_var[ch] + m * var * n / (n - 1.0));
    }
}

// batch_norm_backward, per channel from the chunks' Σg, Σg·x̂: dweight += Σg·x̂, dbias += Σg (each
// rounded once), and coef[2ch] = Σg / n, coef[2ch + 1] = Σg·x̂ / n for bn_train_dinp. Launch: 1-D,
// one thread per channel.
extern "C" __global__ void bn_train_dparams(float* dweight, float* dbias, double* coef, const double* part, int rows,
                                            int c, int chunks) {
    for (int ch = blockIdx.x * blockDim.x + threadIdx.x; ch < c; ch += gridDim.x * blockDim.x) {
        double sg = 0.0, sgx = 0.0;
        for (int k = 0; k < chunks; k++) {
            sg += part[((size_t)k * c + ch) * 2];
            sgx += part[((size_t)k * c + ch) * 2 + 1];
        }
        dweight[ch] = dweight[ch] + (float)sgx;
        dbias[ch] = dbias[ch] + (float)sg;
        coef[2 * ch] = sg / (double)rows;
        coef[2 * ch + 1] = sgx / (double)rows;
    }
}

// batch_norm_backward's input gradient: dinp += weight·rstd·(g − coef0 − x̂·coef1) in f64, rounded
// once. Launch: 1-D grid-stride over rows·c.
extern "C" __global__ void bn_train_dinp(float* dinp, const float* dout, const float* inp, const float* out,
                                         const float* mean, const float* rstd, const float* weight,
                                         const double* coef, int n, int c, int relu) {
    GRID_STRIDE(i, n) {
        const unsigned ch = (unsigned)i % (unsigned)c;
        const double g = (relu && out[i] <= 0.0f) ? 0.0 : (double)dout[i];
        const double rs = (double)rstd[ch];
        const double xhat = ((double)inp[i] - (double)mean[ch]) * rs;
        const double v = (double)weight[ch] * rs * (g - coef[2 * ch] - xhat * coef[2 * ch + 1]);
        dinp[i] = (float)((double)dinp[i] + v);
    }
}
