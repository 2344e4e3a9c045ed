// Training noise on the device: the counter-based standard-normal stream of src/rng/philox.rs
// (`philox4x32_10`, `box_muller`, `philox_normals`), element for element, and the DDPM forward
// process that turns clean latents and that noise into the U-Net's input and the loss target
// (src/train/mod.rs `noisy_and_target`, the same f32 operations).
//
// Element i of stream (seed, stream) is element i % 4 of the Philox4x32-10 block with
// key = (seed_lo, seed_hi) and counter = (g_lo, g_hi, stream_lo, stream_hi), g = i / 4, through
// Box–Muller on the word pairs (w0, w1) and (w2, w3). Box–Muller runs in double precision with
// explicitly rounded products, so the only difference from the CPU can come from the platforms'
// double log/sin/cos (CUDA's within 1–2 ulp of double, glibc's within 1), which the rounding to f32
// absorbs but for a rare value (of the order of one in 10⁸) that lands one f32 ulp apart.
#include "common.cuh"

struct PhiloxWords {
    uint32_t w[4];
};

static __device__ __forceinline__ PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                            uint32_t k0, uint32_t k1) {
#pragma unroll
    for (int round = 0; round < 10; round++) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const unsigned long long p0 = 0xD2511F53ull * c0;
        const unsigned long long p1 = 0xCD9E8D57ull * c2;
        const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
        const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    PhiloxWords r;
    r.w[0] = c0;
    r.w[1] = c1;
    r.w[2] = c2;
    r.w[3] = c3;
    return r;
}

// (r cos θ, r sin θ) with u1 = (a + 1)·2⁻³², u2 = b·2⁻³², r = √(−2 ln u1), θ = 2π·u2.
static __device__ __forceinline__ void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
    const double two_pow_m32 = 2.3283064365386962890625e-10;  // 2⁻³², exact
    const double u1 = __dmul_rn((double)a + 1.0, two_pow_m32);
    const double u2 = __dmul_rn((double)b, two_pow_m32);
    const double r = __dsqrt_rn(__dmul_rn(-2.0, log(u1)));
    const double t = __dmul_rn(6.283185307179586, u2);  // 2π as Rust's 2.0 * PI (exact doubling)
    *z0 = (float)__dmul_rn(r, cos(t));
    *z1 = (float)__dmul_rn(r, sin(t));
}

// out[i] = element i of the stream, i < n. One thread per group of four elements.
// Launch: 1-D grid-stride over ⌈n / 4⌉ groups, block 256.
extern "C" __global__ void rand_philox_normal(float* out, int n, unsigned int seed_lo, unsigned int seed_hi,
                                              unsigned int stream_lo, unsigned int stream_hi) {
    const long long groups = ((long long)n + 3) / 4;
    GRID_STRIDE(g, groups) {
        const PhiloxWords w =
            philox4x32_10((uint32_t)g, (uint32_t)(g >> 32), stream_lo, stream_hi, seed_lo, seed_hi);
        float z[4];
        box_muller(w.w[0], w.w[1], &z[0], &z[1]);
        box_muller(w.w[2], w.w[3], &z[2], &z[3]);
        const long long base = 4 * g;
#pragma unroll
        for (int j = 0; j < 4; j++)
            if (base + j < n) out[base + j] = z[j];
    }
}

// DDPM add_noise in place, for one sample's n values: with x0 = x[i], e = noise[i],
//   x[i] ← √ᾱ·x0 + √(1−ᾱ)·e,   noise[i] ← e (epsilon) or √ᾱ·e − √(1−ᾱ)·x0 (v-prediction).
// Rounded as the CPU's f32 (no FMA). Launch: 1-D grid-stride, block 256.
extern "C" __global__ void rand_ddpm_add_noise(float* x, float* noise, int n, float sqrt_alpha,
                                               float sqrt_one_minus_alpha, int v_prediction) {
    GRID_STRIDE(i, n) {
        const float x0 = x[i], e = noise[i];
        x[i] = __fadd_rn(__fmul_rn(sqrt_alpha, x0), __fmul_rn(sqrt_one_minus_alpha, e));
        if (v_prediction) noise[i] = __fsub_rn(__fmul_rn(sqrt_alpha, e), __fmul_rn(sqrt_one_minus_alpha, x0));
    }
}
