//! The GEMM's micro-kernels: each computes one MR × NR tile of C over a block of k, from packed
//! panels (or, `kernel_avx512_rows`, from A's rows in place), with the accumulators in registers.

/// The portable micro-kernel: plain arrays the compiler may vectorise.
///
/// # Safety
/// a holds kc × 4 values, b kc × 16, c a 4 × 16 tile at row stride rs_c.
pub(super) unsafe fn kernel_portable(kc: usize, a: *const f32, b: *const f32, c: *mut f32, rs_c: usize, beta: f32) {
    const MR: usize = 4;
    const NR: usize = 16;
    let mut acc = [[0f32; NR]; MR];
    for p in 0..kc {
        let (ap, bp) = (a.add(p * MR), b.add(p * NR));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = *ap.add(i);
            for (j, x) in row.iter_mut().enumerate() {
                *x += ai * *bp.add(j);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, x) in row.iter().enumerate() {
            let dst = c.add(i * rs_c + j);
            *dst = if beta == 0.0 { *x } else { x + beta * *dst };
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// 12 × 16·H (H = 2: the full 12 × 32 tile; H = 1: a panel's first 16 columns, for an edge
    /// panel of at most 16, so that n = 40 costs 48 columns of work, not 64). Per k, H zmm loads
    /// of B and 12 broadcasts of A feed 12·H FMAs (H = 2: two FMA pipes busy for 12 cycles
    /// against 14 loads).
    ///
    /// # Safety
    /// The CPU has AVX-512F; a holds kc × 12 values, b kc × 32 (panels keep their NR = 32 stride
    /// at either width), c a 12 × 16·H tile at row stride rs_c.
    #[target_feature(enable = "avx512f")]
    pub(in crate::backend::cpu::gemm) unsafe fn kernel_avx512<const H: usize>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        rs_c: usize,
        beta: f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); H]; 12];
        for p in 0..kc {
            let ap = a.add(p * 12);
            rank1_avx512(&mut acc, |i| *ap.add(i), b.add(p * 32));
        }
        store_avx512(&acc, c, rs_c, beta);
    }

    /// As `kernel_avx512`, with A read in place, piece by piece: for each piece (rows, len), row
    /// i's next len values from `rows[i]` on (see `RowRuns`), against B's next len rows. One call
    /// covers a whole KC block, so C is loaded and stored once per block, not once per piece.
    ///
    /// # Safety
    /// The CPU has AVX-512F; each piece's rows hold len values, b (Σ len) × 32, c a 12 × 16·H
    /// tile at row stride rs_c.
    #[target_feature(enable = "avx512f")]
    pub(in crate::backend::cpu::gemm) unsafe fn kernel_avx512_rows<const H: usize>(
        pieces: &[([*const f32; 12], usize)],
        mut b: *const f32,
        c: *mut f32,
        rs_c: usize,
        beta: f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); H]; 12];
        for (a, len) in pieces {
            for p in 0..*len {
                rank1_avx512(&mut acc, |i| *a[i].add(p), b);
                b = b.add(32);
            }
        }
        store_avx512(&acc, c, rs_c, beta);
    }

    /// acc += a · b for one k: row i's value a(i) broadcast against B's 16·H values at b.
    #[inline(always)]
    unsafe fn rank1_avx512<const H: usize>(acc: &mut [[__m512; H]; 12], a: impl Fn(usize) -> f32, b: *const f32) {
        let bv: [__m512; H] = std::array::from_fn(|h| _mm512_loadu_ps(b.add(16 * h)));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(a(i));
            for (x, &bh) in row.iter_mut().zip(&bv) {
                *x = _mm512_fmadd_ps(ai, bh, *x);
            }
        }
    }

    /// C tile = acc + beta · C tile (beta 0 never reads C).
    #[inline(always)]
    unsafe fn store_avx512<const H: usize>(acc: &[[__m512; H]; 12], c: *mut f32, rs_c: usize, beta: f32) {
        let vbeta = _mm512_set1_ps(beta);
        for (i, row) in acc.iter().enumerate() {
            for (h, &x) in row.iter().enumerate() {
                let dst = c.add(i * rs_c + h * 16);
                let v = if beta == 0.0 { x } else { _mm512_fmadd_ps(vbeta, _mm512_loadu_ps(dst), x) };
                _mm512_storeu_ps(dst, v);
            }
        }
    }

    /// 6 × 16: per k, two ymm loads of B and 6 broadcasts of A feed 12 FMAs.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; a holds kc × 6 values, b kc × 16, c a 6 × 16 tile at row
    /// stride rs_c.
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::backend::cpu::gemm) unsafe fn kernel_avx2(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        rs_c: usize,
        beta: f32,
    ) {
        const MR: usize = 6;
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for p in 0..kc {
            let (b0, b1) = (_mm256_loadu_ps(b.add(p * 16)), _mm256_loadu_ps(b.add(p * 16 + 8)));
            let ap = a.add(p * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm256_set1_ps(*ap.add(i));
                row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
            }
        }
        let vbeta = _mm256_set1_ps(beta);
        for (i, row) in acc.iter().enumerate() {
            for (h, &x) in row.iter().enumerate() {
                let dst = c.add(i * rs_c + h * 8);
                let v = if beta == 0.0 { x } else { _mm256_fmadd_ps(vbeta, _mm256_loadu_ps(dst), x) };
                _mm256_storeu_ps(dst, v);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::kernel_avx512_rows;

/// Never called: AVX-512 is detected only on x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn kernel_avx512_rows<const H: usize>(
    _: &[([*const f32; 12], usize)],
    _: *const f32,
    _: *mut f32,
    _: usize,
    _: f32,
) {
    unreachable!("the AVX-512 kernel on a CPU without it")
}
