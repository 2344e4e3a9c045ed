//! torch-compatible CPU random numbers (mt19937 + torch's normal sampling), so `--seed S` draws
//! the same initial latents as `torch.randn(shape, generator=torch.Generator().manual_seed(S))`.
//!
//! What is reproduced, bit for bit (ATen, torch 2.15):
//! - `at::mt19937` seeded as `CPUGeneratorImpl::set_current_seed` does: the state is seeded from the
//!   low 32 bits of the seed only (`state[0] = seed & 0xffffffff`), so seeds `s` and `s + 2^32` give
//!   the same numbers, exactly as in torch.
//! - `random()` is one 32-bit draw; `random64()` is two draws, the first in the high word.
//! - `torch.randn` of a contiguous float32 tensor (ATen's `normal_kernel`):
//!   - `numel >= 16`: `normal_fill`: every element first gets a uniform float `(random() & 2^24-1) / 2^24`;
//!     then Box–Muller on each block of 16 pairs element `j` (radius, from `1 - u`) with `j + 8`
//!     (angle); if `numel % 16 != 0`, the last 16 elements are refilled with 16 fresh uniforms and
//!     transformed again (so they overlap the last full block).
//!   - `numel < 16`: the serial `at::normal_distribution<double>`: two 53-bit uniforms from
//!     `random64()` (`u1` for the angle, `u2` for the radius via `log1p(-u2)`), returns `r·cos θ` and
//!     caches `r·sin θ` *in the generator* (as a double); the next serial draw consumes that cache
//!     first, even across `randn` calls. `normal_fill` neither reads nor clears the cache.
//!
//! The Box–Muller arithmetic of `normal_fill` depends on the CPU capability ATen dispatches to, so
//! there are two variants (see [`NormalVariant`]).

/// Which `NormalFill16` of ATen's `normal_fill` to reproduce.
///
/// Measured with torch 2.15.0 on an x86-64 AVX-512 machine (`ATEN_CPU_CAPABILITY=default|avx2|avx512`):
/// the `avx2` and `avx512` kernels give identical bits (both use avx_mathfun's `log256_ps` /
/// `sincos256_ps`), and that is what torch uses by default on any x86-64 CPU with AVX2. Only the
/// `default` capability (forced, or an x86-64 CPU without AVX2) uses the scalar libm path, which is
/// presumably also what aarch64 builds run (they have no vectorised `NormalFill16`; not checked). [`NormalVariant::native`] picks the one torch would use on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NormalVariant {
    /// ATen's scalar `NormalFill16` (DEFAULT capability): `std::log`, `std::cos`, `std::sin` on
    /// float (glibc `logf`/`cosf`/`sinf`, which Rust's `f32::ln`/`cos`/`sin` also call on Linux),
    /// θ computed in double and rounded to float, `std::fma` for `· std + mean`.
    #[default]
    Default,
    /// ATen's AVX2 (and AVX-512) `NormalFill16`: avx_mathfun's cephes polynomials, re-implemented
    /// here lane by lane in f32, with the multiply-adds that GCC fuses when it builds torch (the
    /// header's separate `_mm256_mul_ps`/`_mm256_add_ps` are contracted to FMAs under `-mfma`;
    /// without that, about 1% of values differ by an ulp).
    Avx2,
}

impl NormalVariant {
    /// The variant torch itself uses on this host when `ATEN_CPU_CAPABILITY` is not set: AVX2 on
    /// x86-64 CPUs that have AVX2 (AVX-512 ones included), the scalar path otherwise.
    pub fn native() -> NormalVariant {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return NormalVariant::Avx2;
            }
        }
        NormalVariant::Default
    }
}

impl std::str::FromStr for NormalVariant {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<NormalVariant> {
        match s.to_ascii_lowercase().as_str() {
            "default" | "scalar" => Ok(NormalVariant::Default),
            "avx2" | "avx512" => Ok(NormalVariant::Avx2),
            "native" => Ok(NormalVariant::native()),
            _ => anyhow::bail!("unknown torch randn variant {s:?} (expected default, avx2, avx512 or native)"),
        }
    }
}

const MT_N: usize = 624;
const MT_M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UMASK: u32 = 0x8000_0000;
const LMASK: u32 = 0x7fff_ffff;

/// `at::mt19937` (the Cokus/Bellew variant of MT19937 that ATen uses; same stream as std::mt19937).
#[derive(Clone)]
struct Mt19937 {
    state: [u32; MT_N],
    left: usize,
    next: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Mt19937 {
        let mut state = [0u32; MT_N];
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..MT_N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(j as u32);
        }
        Mt19937 { state, left: 1, next: 0 }
    }

    fn twist(u: u32, v: u32) -> u32 {
        (((u & UMASK) | (v & LMASK)) >> 1) ^ if v & 1 != 0 { MATRIX_A } else { 0 }
    }

    fn next_state(&mut self) {
        let s = &mut self.state;
        self.left = MT_N;
        self.next = 0;
        for p in 0..MT_N - MT_M {
            s[p] = s[p + MT_M] ^ Self::twist(s[p], s[p + 1]);
        }
        for p in MT_N - MT_M..MT_N - 1 {
            s[p] = s[p + MT_M - MT_N] ^ Self::twist(s[p], s[p + 1]);
        }
        s[MT_N - 1] = s[MT_M - 1] ^ Self::twist(s[MT_N - 1], s[0]);
    }

    fn next_u32(&mut self) -> u32 {
        self.left -= 1;
        if self.left == 0 {
            self.next_state();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// A `torch.Generator()` (CPU) after `manual_seed(seed)`.
#[derive(Clone)]
pub struct TorchGenerator {
    engine: Mt19937,
    /// `CPUGeneratorImpl::next_double_normal_sample_`: the second Box–Muller value of the serial path.
    next_double_normal: Option<f64>,
    variant: NormalVariant,
    seed: u64,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator").field("seed", &self.seed).field("variant", &self.variant).finish()
    }
}

impl TorchGenerator {
    /// `torch.Generator().manual_seed(seed)`, with the scalar ([`NormalVariant::Default`]) kernel.
    pub fn new(seed: u64) -> TorchGenerator {
        TorchGenerator::with_variant(seed, NormalVariant::Default)
    }

    /// As [`TorchGenerator::new`], reproducing the given `normal_fill` variant.
    pub fn with_variant(seed: u64, variant: NormalVariant) -> TorchGenerator {
        TorchGenerator { engine: Mt19937::new(seed), next_double_normal: None, variant, seed }
    }

    /// The seed given to `manual_seed` (all 64 bits, as `initial_seed()` reports it).
    pub fn initial_seed(&self) -> u64 {
        self.seed
    }

    pub fn variant(&self) -> NormalVariant {
        self.variant
    }

    pub fn set_variant(&mut self, variant: NormalVariant) {
        self.variant = variant;
    }

    /// `CPUGeneratorImpl::random()`: one 32-bit draw.
    pub fn random(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// `CPUGeneratorImpl::random64()`: two 32-bit draws, the first one in the high half.
    pub fn random64(&mut self) -> u64 {
        let hi = self.engine.next_u32() as u64;
        let lo = self.engine.next_u32() as u64;
        (hi << 32) | lo
    }

    /// `at::uniform_real_distribution<float>(0, 1)`: 24 random bits.
    fn uniform_f32(&mut self) -> f32 {
        (self.random() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// `at::uniform_real_distribution<double>(0, 1)`: 53 random bits.
    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `at::normal_distribution<double>(0, 1)` (the serial path), with the generator's cache.
    fn normal_f64(&mut self) -> f64 {
        if let Some(z) = self.next_double_normal.take() {
            return z * 1.0 + 0.0;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos() * 1.0 + 0.0
    }

    /// Exactly `torch.randn(shape, generator=self)` for a float32 tensor of `n` elements (any shape
    /// with that numel, contiguous), advancing the generator as torch does.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        self.randn_into(&mut out);
        out
    }

    /// [`TorchGenerator::randn`] into a caller's buffer (numel = `out.len()`).
    pub fn randn_into(&mut self, out: &mut [f32]) {
        let n = out.len();
        if n < 16 {
            for x in out.iter_mut() {
                *x = self.normal_f64() as f32;
            }
            return;
        }
        for x in out.iter_mut() {
            *x = self.uniform_f32();
        }
        let fill: fn(&mut [f32]) = match self.variant {
            NormalVariant::Default => normal_fill_16_scalar,
            NormalVariant::Avx2 => normal_fill_16_avx2,
        };
        for block in out.chunks_exact_mut(16) {
            fill(block);
        }
        if n % 16 != 0 {
            let tail = &mut out[n - 16..];
            for x in tail.iter_mut() {
                *x = self.uniform_f32();
            }
            fill(tail);
        }
    }
}

/// ATen's scalar `NormalFill16<float>` with mean 0 and std 1.
fn normal_fill_16_scalar(data: &mut [f32]) {
    const TWO_PI: f64 = 2.0 * std::f64::consts::PI;
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        // `2.0f * c10::pi<double> * u2` is evaluated in double, then stored into a float.
        let theta = (TWO_PI * u2 as f64) as f32;
        data[j] = (radius * theta.cos()).mul_add(1.0, 0.0);
        data[j + 8] = (radius * theta.sin()).mul_add(1.0, 0.0);
    }
}

/// ATen's AVX2 `NormalFill16<float>` with mean 0 and std 1, one lane at a time.
fn normal_fill_16_avx2(data: &mut [f32]) {
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * log256(u1)).sqrt();
        let theta = two_pi * u2;
        let (s, c) = sincos256(theta);
        data[j] = (radius * c).mul_add(1.0, 0.0);
        data[j + 8] = (radius * s).mul_add(1.0, 0.0);
    }
}

/// One lane of avx_mathfun's `log256_ps` (cephes logf), operation by operation.
///
/// The header writes separate `_mm256_mul_ps` / `_mm256_add_ps`, but GCC implements those
/// intrinsics as plain vector `*` and `+`, and torch's AVX2 kernels are built with `-mfma` under
/// GCC's default `-ffp-contract=fast`: every multiply whose only use is an add or subtract becomes
/// one fused multiply-add (where both operands of an add are products, the product computed first
/// in statement order is the fused one). Without these fusions 37 of 4096 values differ from torch
/// (by 1 ulp); with them, all match. `f32::mul_add` is a correctly rounded fma, as `vfmadd` is.
// The constants are avx_mathfun's, digit for digit (they round to the same f32 values).
#[allow(clippy::excessive_precision, clippy::approx_constant)]
fn log256(x_in: f32) -> f32 {
    const SQRTHF: f32 = 0.707106781186547524;
    const P: [f32; 9] = [
        7.0376836292E-2,
        -1.1514610310E-1,
        1.1676998740E-1,
        -1.2420140846E-1,
        1.4249322787E-1,
        -1.6668057665E-1,
        2.0000714765E-1,
        -2.4999993993E-1,
        3.3333331174E-1,
    ];
    const Q1: f32 = -2.12194440e-4;
    const Q2: f32 = 0.693359375;
    let invalid = x_in <= 0.0;
    let x = x_in.max(f32::from_bits(0x0080_0000));
    let imm0 = (x.to_bits() >> 23) as i32 - 0x7f;
    let mut x = f32::from_bits((x.to_bits() & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = imm0 as f32 + 1.0;
    let mask = x < SQRTHF;
    let tmp = if mask { x } else { 0.0 };
    x -= 1.0;
    e -= if mask { 1.0 } else { 0.0 };
    x += tmp;
    let z = x * x;
    let mut y = P[0];
    for &p in &P[1..] {
        y = y.mul_add(x, p);
    }
    y *= x;
    y = y.mul_add(z, e * Q1);
    y = (-z).mul_add(0.5, y);
    x += y;
    x = e.mul_add(Q2, x);
    if invalid {
        f32::NAN
    } else {
        x
    }
}

/// One lane of avx_mathfun's `sincos256_ps` (cephes sinf/cosf), operation by operation, with GCC's
/// fused multiply-adds as in [`log256`]; returns (sin, cos).
#[allow(clippy::excessive_precision, clippy::approx_constant)]
fn sincos256(x_in: f32) -> (f32, f32) {
    const FOPI: f32 = 1.27323954473516;
    const DP1: f32 = -0.78515625;
    const DP2: f32 = -2.4187564849853515625e-4;
    const DP3: f32 = -3.77489497744594108e-8;
    const SINCOF: [f32; 3] = [-1.9515295891E-4, 8.3321608736E-3, -1.6666654611E-1];
    const COSCOF: [f32; 3] = [2.443315711809948E-005, -1.388731625493765E-003, 4.166664568298827E-002];
    let sign_in = x_in.to_bits() & 0x8000_0000;
    let mut x = x_in.abs();
    let y = x * FOPI;
    // _mm256_cvttps_epi32: truncation (out-of-range lanes give 0x80000000, as `as` would not).
    let mut j = if y.is_finite() && y.abs() < 2_147_483_648.0 { y as i32 } else { i32::MIN };
    j = j.wrapping_add(1) & !1;
    let y = j as f32;
    let swap_sign_sin = ((j & 4) as u32) << 29;
    let poly_mask = (j & 2) == 0;
    x = y.mul_add(DP1, x);
    x = y.mul_add(DP2, x);
    x = y.mul_add(DP3, x);
    let sign_cos = ((!(j.wrapping_sub(2)) & 4) as u32) << 29;
    let sign_sin = sign_in ^ swap_sign_sin;
    let z = x * x;
    let mut yc = COSCOF[0].mul_add(z, COSCOF[1]);
    yc = yc.mul_add(z, COSCOF[2]);
    yc *= z;
    yc = yc.mul_add(z, -(z * 0.5));
    yc += 1.0;
    let mut ys = SINCOF[0].mul_add(z, SINCOF[1]);
    ys = ys.mul_add(z, SINCOF[2]);
    ys *= z;
    ys = ys.mul_add(x, x);
    // The header selects with and/andnot masks and adds/subtracts the masked-out (+0.0) halves;
    // done the same way so even the sign of a zero result matches.
    let ysin2 = if poly_mask { ys } else { 0.0 };
    let ysin1 = if poly_mask { 0.0 } else { yc };
    let ys = ys - ysin2;
    let yc = yc - ysin1;
    let ysin = ysin1 + ysin2;
    let ycos = yc + ys;
    let s = f32::from_bits(ysin.to_bits() ^ sign_sin);
    let c = f32::from_bits(ycos.to_bits() ^ sign_cos);
    (s, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_reference_stream() {
        // std::mt19937 with the default seed 5489: the 10000th output is 4123659995 (C++ standard).
        let mut g = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10000 {
            last = g.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn seed_uses_low_32_bits() {
        let a = TorchGenerator::new(5).randn(40);
        let b = TorchGenerator::new((1u64 << 32) + 5).randn(40);
        assert_eq!(a, b);
    }
}
