// Elementwise and data-movement kernels: activations (forward/backward), add, per-sample bias rows,
// channel concatenation, GEGLU, nearest-neighbour resize, token + position embeddings, zero,
// accumulate, scale and lerp. Each mirrors the CPU reference in src/ops/elementwise.rs named in its
// comment; forward kernels overwrite, backward kernels
// accumulate (+=) as the `Backend` trait says.
//
// Every 1-D kernel is grid-stride over n elements (block 256, grid capped by the wrapper); the
// wrappers check n ≤ 2^31 − 1, so element indices fit in 32 bits (divisions are done in unsigned
// 32-bit arithmetic), while pointer offsets built from products use size_t.
//
// Precision: the activations are evaluated in f32. Where the CPU evaluates in f64 (erf GELU, tanh
// GELU) the f32 forms below are chosen to avoid cancellation so that they agree with the f64
// reference to a few ulps everywhere: 1 + erf(z) = erfc(−z), and 0.5·(1 + tanh u) = 1/(1 + e^(−2u)),
// 1 − tanh² u = 1/cosh² u. No reduction here uses atomics: results are deterministic, and the
// backward gathers (embedding, resize) add in the CPU's order, so they are bit-identical to it.
#include "common.cuh"

#define EW_SQRT1_2 0.70710678118654752440f       // 1/√2
#define EW_INV_SQRT_2PI 0.39894228040143267794f  // 1/√(2π)
#define EW_SQRT_2_OVER_PI 0.79788456080286535588f  // √(2/π)
#define EW_GELU_A 0.044715f

// Activation codes (the Rust wrapper's `act_code`): 0 QuickGelu, 1 Gelu, 2 GeluTanh, 3 Silu.

// Exact GELU x·Φ(x) = 0.5·x·(1 + erf(x/√2)) = 0.5·x·erfc(−x/√2) (cpu/mod.rs `gelu`).
static __device__ __forceinline__ float ew_gelu(float x) { return 0.5f * x * erfcf(-x * EW_SQRT1_2); }

// d/dx of the exact GELU: Φ(x) + x·φ(x) (ops/elementwise.rs `Pointwise::cpu_activation_backward`, Gelu).
static __device__ __forceinline__ float ew_gelu_grad(float x) {
    const float cdf = 0.5f * erfcf(-x * EW_SQRT1_2);
    const float pdf = expf(-0.5f * x * x) * EW_INV_SQRT_2PI;
    return cdf + x * pdf;
}

static __device__ __forceinline__ float ew_act(float x, int act) {
    switch (act) {
        case 0: return x / (1.0f + expf(-1.702f * x));  // QuickGelu: x·σ(1.702x)
        case 1: return ew_gelu(x);
        case 2: {  // GeluTanh: 0.5·x·(1 + tanh u), u = √(2/π)(x + 0.044715x³), as x·σ(2u)
            const float u = EW_SQRT_2_OVER_PI * x * (1.0f + EW_GELU_A * x * x);
            return x / (1.0f + expf(-2.0f * u));
        }
        default: return x / (1.0f + expf(-x));  // Silu: x·σ(x)
    }
}

static __device__ __forceinline__ float ew_act_grad(float x, int act) {
    switch (act) {
        case 0: {  // QuickGelu: s + 1.702·x·s·(1 − s)
            const float s = 1.0f / (1.0f + expf(-1.702f * x));
            return s + x * 1.702f * s * (1.0f - s);
        }
        case 1: return ew_gelu_grad(x);
        case 2: {  // GeluTanh: 0.5(1 + t) + 0.5·x·(1 − t²)·√(2/π)·(1 + 3·0.044715x²), t = tanh u
            const float u = EW_SQRT_2_OVER_PI * x * (1.0f + EW_GELU_A * x * x);
            const float half_1pt = 1.0f / (1.0f + expf(-2.0f * u));  // 0.5(1 + t)
            const float ch = coshf(u);
            const float sech2 = 1.0f / (ch * ch);  // 1 − t² (0 once cosh² overflows)
            if (sech2 == 0.0f) return half_1pt;     // |x| so large that x² may be inf: avoid 0·inf
            return half_1pt + 0.5f * x * sech2 * EW_SQRT_2_OVER_PI * (1.0f + 3.0f * EW_GELU_A * x * x);
        }
        default: {  // Silu: s·(1 + x·(1 − s))
            const float s = 1.0f / (1.0f + expf(-x));
            return s * (1.0f + x * (1.0f - s));
        }
    }
}


// activation_forward: out = act(inp) (cpu/mod.rs `activation_forward`). Launch: 1-D grid-stride.
template <typename T>
__device__ void ew_activation_fwd_t(T* out, const T* inp, int n, int act) {
    GRID_STRIDE(i, n) out[i] = st_act<T>(ew_act(ld_act(inp[i]), act));
}
extern "C" __global__ void ew_activation_fwd(float* out, const float* inp, int n, int act) {
    ew_activation_fwd_t(out, inp, n, act);
}
extern "C" __global__ void ew_activation_fwd_bf16(__nv_bfloat16* out, const __nv_bfloat16* inp, int n, int act) {
    ew_activation_fwd_t(out, inp, n, act);
}

// activation_backward: dinp += dout·act'(inp) (ops/elementwise.rs `Pointwise::cpu_activation_backward`). Launch: 1-D grid-stride.
extern "C" __global__ void ew_activation_bwd(float* dinp, const float* dout, const float* inp, int n, int act) {
    GRID_STRIDE(i, n) dinp[i] = dinp[i] + __fmul_rn(dout[i], ew_act_grad(inp[i], act));  // no FMA: the CPU rounds g·d(x) first
}

// add_forward: out = a + b (cpu/mod.rs `add_forward`). Launch: 1-D grid-stride.
template <typename T>
__device__ void ew_add_t(T* out, const T* a, const T* b, int n) {
    GRID_STRIDE(i, n) out[i] = st_act<T>(ld_act(a[i]) + ld_act(b[i]));
}
extern "C" __global__ void ew_add(float* out, const float* a, const float* b, int n) { ew_add_t(out, a, b, n); }
extern "C" __global__ void ew_add_bf16(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* b, int n) {
    ew_add_t(out, a, b, n);
}

// add_bias_rows_forward: out[b, r, ch] = inp[b, r, ch] + bias[b, ch], inp/out (batch, rows, c)
// (cpu/mod.rs `add_bias_rows_forward`); the bias (the time embedding's projection) is f32 also
// beside bf16 activations. Launch: 1-D grid-stride over batch·rows·c.
template <typename T>
__device__ void ew_add_bias_rows_t(T* out, const T* inp, const float* bias, int batch, int rows, int c) {
    const unsigned per_sample = (unsigned)rows * (unsigned)c;
    GRID_STRIDE(i, (long long)batch * rows * c) {
        const unsigned ui = (unsigned)i;
        const unsigned b = ui / per_sample, ch = ui % (unsigned)c;
        out[i] = st_act<T>(ld_act(inp[i]) + bias[(size_t)b * c + ch]);
    }
}
extern "C" __global__ void ew_add_bias_rows(float* out, const float* inp, const float* bias, int batch, int rows,
                                            int c) {
    ew_add_bias_rows_t(out, inp, bias, batch, rows, c);
}
extern "C" __global__ void ew_add_bias_rows_bf16(__nv_bfloat16* out, const __nv_bfloat16* inp, const float* bias,
                                                 int batch, int rows, int c) {
    ew_add_bias_rows_t(out, inp, bias, batch, rows, c);
}

#define EW_BR_ROWS 8  // blockDim.y of ew_bias_rows_bwd_partial

// add_bias_rows_backward, pass 1: part[b][chunk][ch] = Σ_{r in chunk} dout[b, r, ch] in f64.
// Launch: block (32, 8) (threadIdx.x = channel, coalesced; threadIdx.y strides rows), grid
// (ceil(c/32), chunks, batch); chunk k covers rows [k·rows_per_chunk, (k+1)·rows_per_chunk).
extern "C" __global__ void ew_bias_rows_bwd_partial(double* part, const float* dout, int rows, int c,
                                                    int rows_per_chunk) {
    __shared__ double s_part[EW_BR_ROWS][33];
    const int ch = blockIdx.x * 32 + threadIdx.x;
    const int b = blockIdx.z;
    const int r0 = blockIdx.y * rows_per_chunk;
    const int r1 = (int)min((long long)rows, (long long)r0 + rows_per_chunk);
    double s = 0.0;
    if (ch < c)
        for (int r = r0 + threadIdx.y; r < r1; r += EW_BR_ROWS) s += (double)dout[((size_t)b * rows + r) * c + ch];
    s_part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && ch < c) {
#pragma unroll
        for (int y = 1; y < EW_BR_ROWS; y++) s += s_part[y][threadIdx.x];
        part[((size_t)b * gridDim.y + blockIdx.y) * c + ch] = s;
    }
}

// add_bias_rows_backward, pass 2: dbias[b, ch] += Σ_chunks part[b][chunk][ch], summed in chunk
// order in f64 and rounded once (cpu/mod.rs `add_bias_rows_backward`). Launch: 1-D grid-stride
// over batch·c.
extern "C" __global__ void ew_bias_rows_bwd_finalize(float* dbias, const double* part, int batch, int c, int chunks) {
    GRID_STRIDE(i, (long long)batch * c) {
        const unsigned ui = (unsigned)i;
        const unsigned b = ui / (unsigned)c, ch = ui - b * (unsigned)c;
        double s = 0.0;
        for (int k = 0; k < chunks; k++) s += part[((size_t)b * chunks + k) * c + ch];
        dbias[i] = dbias[i] + (float)s;
    }
}

// concat_channels_forward: out (rows, ca + cb) = [a (rows, ca) | b (rows, cb)]
// (cpu/mod.rs `concat_channels_forward`). Launch: 1-D grid-stride over rows·(ca + cb).
template <typename T>
__device__ void ew_concat_fwd_t(T* out, const T* a, const T* b, int rows, int ca, int cb) {
    const unsigned cw = (unsigned)(ca + cb);
    GRID_STRIDE(i, (long long)rows * (ca + cb)) {
        const unsigned ui = (unsigned)i;
        const unsigned r = ui / cw, j = ui - r * cw;
        out[i] = j < (unsigned)ca ? a[(size_t)r * ca + j] : b[(size_t)r * cb + (j - ca)];
    }
}
extern "C" __global__ void ew_concat_fwd(float* out, const float* a, const float* b, int rows, int ca, int cb) {
    ew_concat_fwd_t(out, a, b, rows, ca, cb);
}
extern "C" __global__ void ew_concat_fwd_bf16(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* b,
                                              int rows, int ca, int cb) {
    ew_concat_fwd_t(out, a, b, rows, ca, cb);
}

// concat_channels_backward: da += dout[:, :ca], db += dout[:, ca:] (cpu/mod.rs
// `concat_channels_backward`). Each da/db element has exactly one source: no races.
// Launch: 1-D grid-stride over rows·(ca + cb).
extern "C" __global__ void ew_concat_bwd(float* da, float* db, const float* dout, int rows, int ca, int cb) {
    const unsigned cw = (unsigned)(ca + cb);
    GRID_STRIDE(i, (long long)rows * (ca + cb)) {
        const unsigned ui = (unsigned)i;
        const unsigned r = ui / cw, j = ui - r * cw;
        if (j < (unsigned)ca) {
            const size_t o = (size_t)r * ca + j;
            da[o] = da[o] + dout[i];
        } else {
            const size_t o = (size_t)r * cb + (j - ca);
            db[o] = db[o] + dout[i];
        }
    }
}

// geglu_forward: inp (rows, 2·inner) = [x | gate] → out (rows, inner) = x·gelu(gate), exact erf
// GELU (cpu/mod.rs `geglu_forward`). Launch: 1-D grid-stride over rows·inner.
template <typename T>
__device__ void ew_geglu_fwd_t(T* out, const T* inp, int rows, int inner) {
    GRID_STRIDE(i, (long long)rows * inner) {
        const unsigned ui = (unsigned)i;
        const unsigned r = ui / (unsigned)inner, j = ui - r * (unsigned)inner;
        const T* x = inp + (size_t)r * 2 * inner;
        out[i] = st_act<T>(ld_act(x[j]) * ew_gelu(ld_act(x[inner + j])));
    }
}
extern "C" __global__ void ew_geglu_fwd(float* out, const float* inp, int rows, int inner) {
    ew_geglu_fwd_t(out, inp, rows, inner);
}
extern "C" __global__ void ew_geglu_fwd_bf16(__nv_bfloat16* out, const __nv_bfloat16* inp, int rows, int inner) {
    ew_geglu_fwd_t(out, inp, rows, inner);
}

// geglu_backward: dx += dout·gelu(gate), dgate += dout·x·gelu'(gate) (ops/elementwise.rs `GegluParams::cpu_backward`).
// Launch: 1-D grid-stride over rows·inner.
extern "C" __global__ void ew_geglu_bwd(float* dinp, const float* dout, const float* inp, int rows, int inner) {
    GRID_STRIDE(i, (long long)rows * inner) {
        const unsigned ui = (unsigned)i;
        const unsigned r = ui / (unsigned)inner, j = ui - r * (unsigned)inner;
        const size_t base = (size_t)r * 2 * inner;
        const float x = inp[base + j], gate = inp[base + inner + j], g = dout[i];
        dinp[base + j] = dinp[base + j] + __fmul_rn(g, ew_gelu(gate));
        dinp[base + inner + j] = dinp[base + inner + j] + __fmul_rn(g * x, ew_gelu_grad(gate));
    }
}

// PyTorch's nearest source index: min(floor(o·scale), in − 1) with scale = in/out in f32 (computed
// by the wrapper as `in as f32 / out as f32`, as the CPU does). Non-decreasing in o.
static __device__ __forceinline__ int ew_src(int o, float scale, int in) {
    return min((int)floorf((float)o * scale), in - 1);
}

// The first output index o in [0, out] whose source is ≥ v (out when none): a guess from v/scale,
// corrected by a step or two (ew_src is monotonic, so the outputs copying input v are exactly
// [first(v), first(v + 1))).
static __device__ __forceinline__ int ew_first_src_at_least(int v, float scale, int in, int out) {
    int g = (int)fminf((float)v / scale, (float)out);
    g = max(0, min(g, out));
    while (g > 0 && ew_src(g - 1, scale, in) >= v) --g;
    while (g < out && ew_src(g, scale, in) < v) ++g;
    return g;
}

// Element i of an NHWC (batch, h, w, c) tensor as (b, y, x, ch); i < 2^31 − 1 (checked by the
// wrapper), so the divisions are 32-bit.
struct EwNhwc {
    unsigned b, y, x, ch;
};
static __device__ __forceinline__ EwNhwc ew_nhwc(long long i, int h, int w, int c) {
    const unsigned ui = (unsigned)i;
    const unsigned pix = ui / (unsigned)c, ch = ui - pix * (unsigned)c;
    const unsigned t = pix / (unsigned)w, x = pix - t * (unsigned)w;
    const unsigned b = t / (unsigned)h, y = t - b * (unsigned)h;
    return {b, y, x, ch};
}

// upsample_nearest_forward: out (batch, oh, ow, c)[b, y, x] = inp (batch, ih, iw, c)[b, src(y),
// src(x)] (cpu/mod.rs `upsample_nearest_forward`). Launch: 1-D grid-stride over batch·oh·ow·c.
template <typename T>
__device__ void ew_upsample_fwd_t(T* out, const T* inp, int batch, int ih, int iw, int oh, int ow, int c, float sy,
                                  float sx) {
    GRID_STRIDE(i, (long long)batch * oh * ow * c) {
        const EwNhwc at = ew_nhwc(i, oh, ow, c);
        const unsigned b = at.b, oy = at.y, ox = at.x, ch = at.ch;
        const int iy = ew_src(oy, sy, ih), ix = ew_src(ox, sx, iw);
        out[i] = inp[(((size_t)b * ih + iy) * iw + ix) * c + ch];
    }
}
extern "C" __global__ void ew_upsample_fwd(float* out, const float* inp, int batch, int ih, int iw, int oh, int ow,
                                           int c, float sy, float sx) {
    ew_upsample_fwd_t(out, inp, batch, ih, iw, oh, ow, c, sy, sx);
}
extern "C" __global__ void ew_upsample_fwd_bf16(__nv_bfloat16* out, const __nv_bfloat16* inp, int batch, int ih,
                                                int iw, int oh, int ow, int c, float sy, float sx) {
    ew_upsample_fwd_t(out, inp, batch, ih, iw, oh, ow, c, sy, sx);
}

// upsample_nearest_backward: each input element gathers the gradients of its copies,
// dinp[b, iy, ix, ch] += Σ dout[b, oy, ox, ch] over src(oy) = iy, src(ox) = ix, added in (oy, ox)
// row-major order like ops/elementwise.rs `UpsampleParams::cpu_backward` (bit-identical; no atomics).
// Launch: 1-D grid-stride over batch·ih·iw·c.
extern "C" __global__ void ew_upsample_bwd(float* dinp, const float* dout, int batch, int ih, int iw, int oh, int ow,
                                           int c, float sy, float sx) {
    GRID_STRIDE(i, (long long)batch * ih * iw * c) {
        const EwNhwc at = ew_nhwc(i, ih, iw, c);
        const unsigned b = at.b, iy = at.y, ix = at.x, ch = at.ch;
        const int oy0 = ew_first_src_at_least(iy, sy, ih, oh), oy1 = ew_first_src_at_least(iy + 1, sy, ih, oh);
        const int ox0 = ew_first_src_at_least(ix, sx, iw, ow), ox1 = ew_first_src_at_least(ix + 1, sx, iw, ow);
        float acc = dinp[i];
        for (int oy = oy0; oy < oy1; oy++)
            for (int ox = ox0; ox < ox1; ox++) acc += dout[(((size_t)b * oh + oy) * ow + ox) * c + ch];
        dinp[i] = acc;
    }
}

// embedding_forward: out[b, t, :] = wte[ids[b·seq + t], :] + wpe[t, :] (cpu/mod.rs
// `embedding_forward`); ids are device u32, checked against the vocabulary by the wrapper.
// Launch: 1-D grid-stride over batch·seq·dim.
extern "C" __global__ void ew_embedding_fwd(float* out, const unsigned* ids, const float* wte, const float* wpe,
                                            int batch, int seq, int dim) {
    GRID_STRIDE(i, (long long)batch * seq * dim) {
        const unsigned ui = (unsigned)i;
        const unsigned row = ui / (unsigned)dim, d = ui - row * (unsigned)dim;
        const unsigned t = row % (unsigned)seq;
        out[i] = wte[(size_t)ids[row] * dim + d] + wpe[(size_t)t * dim + d];
    }
}

// embedding_backward without atomics: the wrapper groups the rows by token id on the host
// (uniq[u] the distinct ids, the rows of uniq[u] are order[starts[u] .. starts[u+1]], ascending).
// Work item j < n_unique: dwte[uniq[j], d] += Σ those rows of dout; j = n_unique + t:
// dwpe[t, d] += Σ_b dout[b·seq + t, d]. Each destination row has one writer and adds in row
// order, the CPU's serial order (cpu/mod.rs `embedding_backward`): bit-identical.
// Launch: block 128 over d (grid.x = ceil(dim/128), grid-stride), grid.y over the n_unique + seq
// work items (grid-stride when more than grid.y).
extern "C" __global__ void ew_embedding_bwd(float* dwte, float* dwpe, const float* dout, const unsigned* uniq,
                                            const unsigned* starts, const unsigned* order, int n_unique, int batch,
                                            int seq, int dim) {
    for (int j = blockIdx.y; j < n_unique + seq; j += gridDim.y) {
        for (int d = blockIdx.x * blockDim.x + threadIdx.x; d < dim; d += gridDim.x * blockDim.x) {
            if (j < n_unique) {
                float* dst = dwte + (size_t)uniq[j] * dim + d;
                float acc = *dst;
                for (unsigned k = starts[j]; k < starts[j + 1]; k++) acc += dout[(size_t)order[k] * dim + d];
                *dst = acc;
            } else {
                const int t = j - n_unique;
                float* dst = dwpe + (size_t)t * dim + d;
                float acc = *dst;
                for (int b = 0; b < batch; b++) acc += dout[((size_t)b * seq + t) * dim + d];
                *dst = acc;
            }
        }
    }
}

// zero: t = 0. Launch: 1-D grid-stride.
template <typename T>
__device__ void ew_zero_t(T* t, int n) {
    GRID_STRIDE(i, n) t[i] = st_act<T>(0.0f);
}
extern "C" __global__ void ew_zero(float* t, int n) { ew_zero_t(t, n); }
extern "C" __global__ void ew_zero_bf16(__nv_bfloat16* t, int n) { ew_zero_t(t, n); }

// accumulate: dst += src (cpu/mod.rs `accumulate`). Launch: 1-D grid-stride.
template <typename T>
__device__ void ew_accumulate_t(T* dst, const T* src, int n) {
    GRID_STRIDE(i, n) dst[i] = st_act<T>(ld_act(dst[i]) + ld_act(src[i]));
}
extern "C" __global__ void ew_accumulate(float* dst, const float* src, int n) { ew_accumulate_t(dst, src, n); }
extern "C" __global__ void ew_accumulate_bf16(__nv_bfloat16* dst, const __nv_bfloat16* src, int n) {
    ew_accumulate_t(dst, src, n);
}

// scale: t *= s (cpu/mod.rs `scale`). Launch: 1-D grid-stride.
extern "C" __global__ void ew_scale(float* t, float s, int n) {
    GRID_STRIDE(i, n) t[i] = t[i] * s;
}

// lerp: dst −= w·(dst − src), the CPU's exact operation order with no FMA contraction
// (cpu/mod.rs `lerp`; bit-identical, so an EMA matches the CPU run). Launch: 1-D grid-stride.
extern "C" __global__ void ew_lerp(float* dst, const float* src, int n, float w) {
    GRID_STRIDE(i, n) {
        const float d = dst[i];
        dst[i] = __fsub_rn(d, __fmul_rn(w, __fsub_rn(d, src[i])));
    }
}

// out[i] = bf16(in[i]) (round to nearest even): refreshes the backend's bf16 copy of a parameter
// pool after the f32 weights were written. Launch: 1-D grid-stride, block 256.
extern "C" __global__ void ew_to_bf16(__nv_bfloat16* out, const float* in, int n) {
    GRID_STRIDE(i, n)
        out[i] = f2bf(in[i]);
}

// out[i] = in[i] widened (exact): the bf16 bridge (src/backend/cuda/bridge.rs) hands a bf16
// activation to an operation that reads f32. Launch: 1-D grid-stride, block 256.
extern "C" __global__ void ew_widen_bf16(float* out, const __nv_bfloat16* in, int n) {
    GRID_STRIDE(i, n) out[i] = bf2f(in[i]);
}

// diffusers' get_timestep_embedding in f32, as src/backend/cpu `timestep_embedding`: out (batch,
// dim), element (b, j): with half = dim/2 and i = j mod half, arg = t[b]·exp(log_period·i /
// (half − freq_shift)), log_period = −ln 10000 rounded to f32 on the host; sin for the first half and
// cos for the second (swapped with flip), 0 past 2·half (odd dim). Launch: 1-D grid-stride, block 256.
template <typename T>
__device__ void ew_timestep_embedding_t(T* out, const float* t, int batch, int dim, int flip, float freq_shift, float log_period) {
    const int half = dim / 2;
    const long long n = (long long)batch * dim;
    GRID_STRIDE(k, n) {
        const int b = (int)(k / dim), j = (int)(k % dim);
        if (j >= 2 * half) {
            out[k] = st_act<T>(0.0f);
            continue;
        }
        const bool first = j < half;
        const int i = first ? j : j - half;
        const float exponent = __fdiv_rn(__fmul_rn(log_period, (float)i), __fsub_rn((float)half, freq_shift));
        const float arg = __fmul_rn(t[b], expf(exponent));
        out[k] = st_act<T>((first == (flip != 0)) ? cosf(arg) : sinf(arg));
    }
}
extern "C" __global__ void ew_timestep_embedding(float* out, const float* t, int batch, int dim, int flip,
                                                 float freq_shift, float log_period) {
    ew_timestep_embedding_t(out, t, batch, dim, flip, freq_shift, log_period);
}
extern "C" __global__ void ew_timestep_embedding_bf16(__nv_bfloat16* out, const float* t, int batch, int dim, int flip, float freq_shift, float log_period) {
    ew_timestep_embedding_t(out, t, batch, dim, flip, freq_shift, log_period);
}
