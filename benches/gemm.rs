//! CPU GEMM: our packed SGEMM (`sgemm_par`, the kernel `Isa::detected()` picks) against the
//! `matrixmultiply` crate split by rows over rayon (what the backend used before) and the naive
//! triple loop, at the shapes of CLIP's linear layers (rows = 2 prompts × 77 tokens) and of the
//! U-Net's 3×3 convolutions as im2col products (rows = pixels, K = 9 · C_in). Throughput is in
//! FLOP (2·M·N·K per product), so criterion's "elem/s" reads as FLOP/s.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rayon::prelude::*;
use roentgen::backend::cpu::gemm::{sgemm_naive, sgemm_par, Isa, Mat};
use roentgen::rng::splitmix::SplitMix64;
use std::hint::black_box;

/// The previous backend: matrixmultiply's single-threaded SGEMM on row blocks, one per thread.
fn matrixmultiply_rows(m: usize, k: usize, n: usize, a: Mat, b: Mat, c: &mut [f32]) {
    let block = m.div_ceil(rayon::current_num_threads()).max(32);
    c[..m * n].par_chunks_mut(block * n).enumerate().for_each(|(i, c)| {
        let rows = c.len() / n;
        let a0 = &a.data[i * block * a.row_stride..];
        // SAFETY: the strides describe in-bounds rows × k and k × n views (the bench builds them).
        unsafe {
            matrixmultiply::sgemm(
                rows,
                k,
                n,
                1.0,
                a0.as_ptr(),
                a.row_stride as isize,
                a.col_stride as isize,
                b.data.as_ptr(),
                b.row_stride as isize,
                b.col_stride as isize,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            )
        }
    });
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group(format!("sgemm_{}", Isa::detected().name()));
    g.sample_size(10);
    // (name, M, K, N, weight stored transposed): CLIP-L attention projections, MLP up and down;
    // U-Net conv 320→320 on a 32 × 32 latent and 1280→1280 on 8 × 8
    for (name, m, k, n, transposed) in [
        ("qkvo_154x768x768", 154, 768, 768, true),
        ("fc1_154x768x3072", 154, 768, 3072, true),
        ("fc2_154x3072x768", 154, 3072, 768, true),
        ("conv320_1024x2880x320", 1024, 2880, 320, false),
        ("conv1280_64x11520x1280", 64, 11520, 1280, false),
        ("square_512", 512, 512, 512, false),
    ] {
        let mut rng = SplitMix64::new(1);
        let a: Vec<f32> = (0..m * k).map(|_| rng.next_normal()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.next_normal()).collect();
        let mut out = vec![0f32; m * n];
        let am = Mat { data: &a, row_stride: k, col_stride: 1 };
        let wm = if transposed {
            Mat { data: &w, row_stride: 1, col_stride: k } // Linear weight (N, K) read transposed
        } else {
            Mat { data: &w, row_stride: n, col_stride: 1 }
        };
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        g.bench_with_input(BenchmarkId::new("ours_par", name), &(), |b, _| {
            b.iter(|| sgemm_par(m, k, n, am, wm, black_box(&mut out), 0.0))
        });
        g.bench_with_input(BenchmarkId::new("matrixmultiply_rows", name), &(), |b, _| {
            b.iter(|| matrixmultiply_rows(m, k, n, am, wm, black_box(&mut out)))
        });
        if m * n * k <= 154 * 768 * 768 {
            g.bench_with_input(BenchmarkId::new("naive", name), &(), |b, _| {
                b.iter(|| sgemm_naive(m, k, n, am, wm, black_box(&mut out), 0.0))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
