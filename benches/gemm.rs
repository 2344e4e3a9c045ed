//! CPU GEMM: our row-parallel matrixmultiply SGEMM against the naive triple loop, at the shapes of
//! the CLIP text encoder's linear layers (rows = 2 prompts × 77 tokens). Throughput is in FLOP
//! (2·M·N·K per product), so criterion's "elem/s" reads as FLOP/s.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use roentgen::backend::cpu::gemm::{sgemm_naive, sgemm_par, Mat};
use roentgen::rng::splitmix::SplitMix64;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("sgemm");
    g.sample_size(10);
    // (name, M, K, N): CLIP-L attention projections, MLP up and down
    for (name, m, k, n) in [
        ("qkvo_154x768x768", 154, 768, 768),
        ("fc1_154x768x3072", 154, 768, 3072),
        ("fc2_154x3072x768", 154, 3072, 768),
        ("square_512", 512, 512, 512),
    ] {
        let mut rng = SplitMix64::new(1);
        let a: Vec<f32> = (0..m * k).map(|_| rng.next_normal()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.next_normal()).collect();
        let mut out = vec![0f32; m * n];
        let am = Mat { data: &a, row_stride: k, col_stride: 1 };
        let wm = Mat { data: &w, row_stride: 1, col_stride: k }; // Linear weight (N, K) read transposed
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        g.bench_with_input(BenchmarkId::new("matrixmultiply_par", name), &(), |b, _| {
            b.iter(|| sgemm_par(m, k, n, am, wm, black_box(&mut out), 0.0))
        });
        g.bench_with_input(BenchmarkId::new("naive", name), &(), |b, _| {
            b.iter(|| sgemm_naive(m, k, n, am, wm, black_box(&mut out), 0.0))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
