//! Matrix products for the CPU backend: `matrixmultiply`'s single-threaded SGEMM micro-kernels,
//! parallelised here by splitting the rows of the output across rayon's threads (so the CPU backend
//! has one thread pool, and scales past matrixmultiply's own 4-thread limit).

use rayon::prelude::*;

/// A read-only matrix in row-major memory with arbitrary element strides (a transposed view is
/// row_stride 1, col_stride = rows of the original).
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

/// c (m × n, row-major, contiguous) = a (m × k) · b (k × n) + beta · c.
pub fn sgemm(m: usize, k: usize, n: usize, a: Mat, b: Mat, c: &mut [f32], beta: f32) {
    assert!(c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if m > 0 && k > 0 {
        let last_a = (m - 1) * a.row_stride + (k - 1) * a.col_stride;
        let last_b = (k - 1) * b.row_stride + (n - 1) * b.col_stride;
        assert!(last_a < a.data.len() && last_b < b.data.len(), "sgemm operand out of bounds");
    }
    // SAFETY: every index the kernel touches is within the slices (checked above); c is exclusive.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.data.as_ptr(),
            a.row_stride as isize,
            a.col_stride as isize,
            b.data.as_ptr(),
            b.row_stride as isize,
            b.col_stride as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// As `sgemm`, with the rows of c split across rayon's threads. Blocks are at least 32 rows so each
/// thread gets micro-kernel-sized work.
pub fn sgemm_par(m: usize, k: usize, n: usize, a: Mat, b: Mat, c: &mut [f32], beta: f32) {
    let threads = rayon::current_num_threads().max(1);
    let block = m.div_ceil(threads).max(32);
    if block >= m || n == 0 {
        return sgemm(m, k, n, a, b, c, beta);
    }
    c[..m * n].par_chunks_mut(block * n).enumerate().for_each(|(i, c)| {
        let r0 = i * block;
        let rows = c.len() / n;
        let a = Mat { data: &a.data[r0 * a.row_stride..], ..a };
        sgemm(rows, k, n, a, b, c, beta);
    });
}

/// The textbook triple loop, for tests and for the benchmark's baseline.
pub fn sgemm_naive(m: usize, k: usize, n: usize, a: Mat, b: Mat, c: &mut [f32], beta: f32) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for p in 0..k {
                acc += a.data[i * a.row_stride + p * a.col_stride] * b.data[p * b.row_stride + j * b.col_stride];
            }
            c[i * n + j] = acc + beta * c[i * n + j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::splitmix::SplitMix64;

    #[test]
    fn parallel_gemm_matches_triple_loop_with_transposed_operand() {
        let mut rng = SplitMix64::new(7);
        let (m, k, n) = (157, 63, 45);
        let a: Vec<f32> = (0..m * k).map(|_| rng.next_normal()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.next_normal()).collect(); // (n, k), used transposed
        let c0: Vec<f32> = (0..m * n).map(|_| rng.next_normal()).collect();
        let am = Mat { data: &a, row_stride: k, col_stride: 1 };
        let bm = Mat { data: &w, row_stride: 1, col_stride: k };
        let (mut c1, mut c2) = (c0.clone(), c0.clone());
        sgemm_par(m, k, n, am, bm, &mut c1, 0.5);
        sgemm_naive(m, k, n, am, bm, &mut c2, 0.5);
        let err = c1.iter().zip(&c2).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(err < 1e-4, "max |par - naive| = {err:e}");
    }
}
