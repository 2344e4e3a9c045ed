//! Philox4x32-10 for training noise: the counter-based generator the backends share
//! (`Backend::randn`); kernels/random.cu draws the same values.

/// Philox4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3",
/// SC 2011): a counter-based generator, 128-bit counter and 64-bit key to four u32. Any element
/// of a stream is computed on its own, so a GPU thread and this reference draw the same values.
/// kernels/random.cu is the same function.
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    let (mut c, mut k) = (ctr, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = M0 * c[0] as u64;
        let p1 = M1 * c[2] as u64;
        let (hi0, lo0, hi1, lo1) = ((p0 >> 32) as u32, p0 as u32, (p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// Standard normals from two u32 by Box–Muller in f64, rounded to f32: u1 = (a + 1)·2⁻³² ∈ (0, 1],
/// u2 = b·2⁻³², r = √(−2 ln u1), θ = 2π·u2 → (r cos θ, r sin θ). kernels/random.cu computes the
/// same in double precision (no fused operations), so both backends agree to the last bit but for
/// rare values (~1 in 10⁸) where the platforms' double log/sin/cos round differently by an f32 ulp.
pub fn box_muller(a: u32, b: u32) -> (f32, f32) {
    let u1 = (a as f64 + 1.0) * (1.0 / 4294967296.0);
    let u2 = b as f64 * (1.0 / 4294967296.0);
    let r = (-2.0 * u1.ln()).sqrt();
    let t = 2.0 * std::f64::consts::PI * u2;
    ((r * t.cos()) as f32, (r * t.sin()) as f32)
}

/// Element `i` of the standard-normal stream (`seed`, `stream`): Philox with key = seed's two
/// halves (low first) and counter = [g_lo, g_hi, stream_lo, stream_hi] for the group g = i / 4,
/// whose four words give elements 4g .. 4g + 3 by Box–Muller on (w0, w1) and (w2, w3).
pub fn philox_normals(out: &mut [f32], seed: u64, stream: u64) {
    let key = [seed as u32, (seed >> 32) as u32];
    for (g, chunk) in out.chunks_mut(4).enumerate() {
        let g = g as u64;
        let w = philox4x32_10([g as u32, (g >> 32) as u32, stream as u32, (stream >> 32) as u32], key);
        let (z0, z1) = box_muller(w[0], w[1]);
        let (z2, z3) = box_muller(w[2], w[3]);
        for (o, z) in chunk.iter_mut().zip([z0, z1, z2, z3]) {
            *o = z;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's kat_vectors (the three philox4x32 10-round lines): counter, key, expected.
    #[test]
    fn philox_matches_random123_known_answers() {
        let kats: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            ([0; 4], [0; 2], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
            ([u32::MAX; 4], [u32::MAX; 2], [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (ctr, key, want) in kats {
            assert_eq!(philox4x32_10(ctr, key), want, "counter {ctr:08x?} key {key:08x?}");
        }
    }

    #[test]
    fn philox_normals_have_unit_moments_and_streams_differ() {
        let n = 200_001; // not a multiple of 4: the last group is partial
        let mut a = vec![0f32; n];
        philox_normals(&mut a, 42, 7);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let tail = a.iter().filter(|x| x.abs() > 3.0).count() as f64 / n as f64; // 0.27 % for N(0, 1)
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02 && (0.0017..0.0037).contains(&tail));
        // A prefix is the same whatever the length; another stream or seed gives other values.
        let mut b = vec![0f32; 10];
        philox_normals(&mut b, 42, 7);
        assert_eq!(&a[..10], &b[..]);
        for (seed, stream) in [(42, 8), (43, 7), (42 + (1 << 32), 7), (42, 7 + (1 << 32))] {
            philox_normals(&mut b, seed, stream);
            assert!(a[..10].iter().zip(&b).all(|(x, y)| x != y), "seed {seed} stream {stream} repeats (42, 7)");
        }
    }
}
