//! Vectorisable math for the CPU kernels' hot loops. libm's `expf` is a call per element (about
//! 15 cycles); the softmax of SD's 4,096-token self-attention takes 268 million of them per layer,
//! which made the exponentials, not the matrix products, the cost of a 512² U-Net step. Here the
//! exponential is branch-free arithmetic the compiler vectorises, compiled once per instruction
//! set (AVX-512, AVX2 + FMA, baseline) and picked at run time with the GEMM's kernel.

use super::gemm::Isa;

/// e^x for x ≤ 88, within 2 ulp of the exact value (Cephes' expf: x = n·ln 2 + r with |r| ≤ ln 2 / 2,
/// e^r by its degree-7 Taylor-like minimax polynomial, 2^n into the exponent bits); 0 below −87.3
/// (so e^−∞ = 0, as the softmax's excluded keys need).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split so n · LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer in the low bits
    let xc = x.clamp(-87.336_55, 88.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r
        + 0.5;
    let er = p * r * r + r + 1.0;
    // n sits in t's low mantissa bits (t = 1.5 · 2^23 + n); 2^n is (n + 127) << 23.
    let two_n = f32::from_bits(((t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    if x < -87.336_55 {
        0.0
    } else {
        er * two_n
    }
}

/// s[j] = e^(s[j] · scale − shift) for every j; returns their sum.
pub fn exp_scaled_sum(s: &mut [f32], scale: f32, shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match Isa::detected() {
        // SAFETY: the CPU has the features (detected at run time).
        Isa::Avx512 => return unsafe { exp_scaled_sum_avx512(s, scale, shift) },
        Isa::Avx2 => return unsafe { exp_scaled_sum_avx2(s, scale, shift) },
        Isa::Portable => {}
    }
    exp_scaled_sum_body(s, scale, shift)
}

/// max over j of s[j] · scale, in one read-only pass: max_j fl(s_j · scale) is fl(max_j s_j · scale)
/// for scale ≥ 0, and the min's for scale < 0, because rounding is monotonic; so the scores need
/// not be scaled in place before `exp_scaled_sum`, which scales them as it reads them. NaNs are
/// passed over, as `f32::max` does.
pub fn scaled_max(s: &[f32], scale: f32) -> f32 {
    let largest = scale >= 0.0;
    #[cfg(target_arch = "x86_64")]
    match Isa::detected() {
        // SAFETY: the CPU has the features (detected at run time).
        Isa::Avx512 => return unsafe { extreme_avx512(s, largest) } * scale,
        Isa::Avx2 => return unsafe { extreme_avx2(s, largest) } * scale,
        Isa::Portable => {}
    }
    extreme_body(s, largest) * scale
}

/// The largest (or smallest) value of s, by `EXTREME_LANES` running values: four vectors of 16, so
/// that the compare-selects (a 2-cycle latency each) do not wait on one another.
#[inline(always)]
fn extreme_body(s: &[f32], largest: bool) -> f32 {
    // `if b > a` compiles to one vmaxps (f32::max's NaN rule costs a compare and a blend more).
    let pick = |a: f32, b: f32| if (largest && b > a) || (!largest && b < a) { b } else { a };
    let init = if largest { f32::NEG_INFINITY } else { f32::INFINITY };
    let mut lanes = [init; EXTREME_LANES];
    let mut chunks = s.chunks_exact(EXTREME_LANES);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = pick(*m, x);
        }
    }
    let lanes = lanes.iter().fold(init, |a, &b| pick(a, b));
    chunks.remainder().iter().fold(lanes, |a, &b| pick(a, b))
}

const EXTREME_LANES: usize = 64;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn extreme_avx512(s: &[f32], largest: bool) -> f32 {
    extreme_body(s, largest)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn extreme_avx2(s: &[f32], largest: bool) -> f32 {
    extreme_body(s, largest)
}

/// One pixel's GroupNorm output: for each group g (stats[g] = (mean, 1/std) in f64) and each of
/// its channels, y = ((x − mean) · rstd as f32) · w + b, then SiLU when `silu`. By group, so the
/// inner loop runs over contiguous channels with one (mean, rstd) and vectorises.
pub fn group_norm_row(o: &mut [f32], x: &[f32], stats: &[(f64, f64)], wb: [&[f32]; 2], silu: bool) {
    #[cfg(target_arch = "x86_64")]
    match Isa::detected() {
        // SAFETY: the CPU has the features (detected at run time).
        Isa::Avx512 => return unsafe { group_norm_row_avx512(o, x, stats, wb, silu) },
        Isa::Avx2 => return unsafe { group_norm_row_avx2(o, x, stats, wb, silu) },
        Isa::Portable => {}
    }
    group_norm_row_body(o, x, stats, wb, silu)
}

#[inline(always)]
fn group_norm_row_body(o: &mut [f32], x: &[f32], stats: &[(f64, f64)], [w, b]: [&[f32]; 2], silu: bool) {
    let cpg = x.len() / stats.len();
    let groups = o.chunks_mut(cpg).zip(x.chunks(cpg)).zip(w.chunks(cpg).zip(b.chunks(cpg)));
    for (((o, x), (w, b)), &(mu, rs)) in groups.zip(stats) {
        for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
            let y = ((x as f64 - mu) * rs) as f32 * w + b;
            *o = if silu { crate::ops::silu(y) } else { y };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn group_norm_row_avx512(o: &mut [f32], x: &[f32], stats: &[(f64, f64)], wb: [&[f32]; 2], silu: bool) {
    group_norm_row_body(o, x, stats, wb, silu)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn group_norm_row_avx2(o: &mut [f32], x: &[f32], stats: &[(f64, f64)], wb: [&[f32]; 2], silu: bool) {
    group_norm_row_body(o, x, stats, wb, silu)
}

/// acc[j] += Σ over the rows of x (rows × acc.len(), row-major) of x[r][j], or of
/// (x[r][j] − centre[j])² when `centre` is given: per-channel sums in f64 for the normalisations'
/// statistics. Row by row over contiguous channels, so it vectorises (f32 → f64 conversions, 8 lanes
/// in AVX-512) and reads the activation once, in order.
pub fn add_column_sums(acc: &mut [f64], x: &[f32], centre: Option<&[f64]>) {
    #[cfg(target_arch = "x86_64")]
    match Isa::detected() {
        // SAFETY: the CPU has the features (detected at run time).
        Isa::Avx512 => return unsafe { add_column_sums_avx512(acc, x, centre) },
        Isa::Avx2 => return unsafe { add_column_sums_avx2(acc, x, centre) },
        Isa::Portable => {}
    }
    add_column_sums_body(acc, x, centre)
}

#[inline(always)]
fn add_column_sums_body(acc: &mut [f64], x: &[f32], centre: Option<&[f64]>) {
    let c = acc.len();
    for row in x.chunks_exact(c) {
        match centre {
            None => acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v as f64),
            Some(m) => acc.iter_mut().zip(row).zip(m).for_each(|((a, &v), &m)| {
                let d = v as f64 - m;
                *a += d * d
            }),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_column_sums_avx512(acc: &mut [f64], x: &[f32], centre: Option<&[f64]>) {
    add_column_sums_body(acc, x, centre)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_column_sums_avx2(acc: &mut [f64], x: &[f32], centre: Option<&[f64]>) {
    add_column_sums_body(acc, x, centre)
}

/// Partial sums per lane: a sum the compiler may vectorise (a single running sum must stay in
/// order, which forbids it).
const LANES: usize = 16;

#[inline(always)]
fn exp_scaled_sum_body(s: &mut [f32], scale: f32, shift: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = s.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (acc, x) in lanes.iter_mut().zip(c.iter_mut()) {
            *x = exp(*x * scale - shift);
            *acc += *x;
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp(*x * scale - shift);
        sum += *x;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_scaled_sum_avx512(s: &mut [f32], scale: f32, shift: f32) -> f32 {
    exp_scaled_sum_body(s, scale, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_scaled_sum_avx2(s: &mut [f32], scale: f32, shift: f32) -> f32 {
    exp_scaled_sum_body(s, scale, shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against f64's exp over the softmax's range and beyond, by relative error in ulps (2^−23);
    /// e^−∞ and anything below the smallest normal is 0.
    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let err = ((exp(x) as f64 - want) / want).abs() / f32::EPSILON as f64;
            worst = worst.max(err);
            x += 0.000_37;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    /// The read-only maximum equals the maximum of the scaled values, for either sign of scale.
    #[test]
    fn scaled_max_is_the_max_of_the_scaled_values() {
        let base: Vec<f32> = (0..1003).map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 20.0).collect();
        for scale in [0.158f32, 1.0 / 40f32.sqrt(), -0.37] {
            let want = base.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b * scale));
            assert_eq!(scaled_max(&base, scale), want, "scale {scale}");
        }
    }

    /// Every instruction-set variant gives the scalar function's values and their sum.
    #[test]
    fn exp_scaled_sum_matches_the_scalar_function() {
        let base: Vec<f32> = (0..1003).map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 20.0).collect();
        let scale = 0.158;
        let shift = base.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b * scale));
        let mut s = base.clone();
        let sum = exp_scaled_sum(&mut s, scale, shift);
        let want: Vec<f32> = base.iter().map(|&x| exp(x * scale - shift)).collect();
        assert_eq!(s, want);
        let want_sum: f64 = want.iter().map(|&x| x as f64).sum();
        assert!((sum as f64 - want_sum).abs() < 1e-5 * want_sum, "{sum} vs {want_sum}");
    }
}
