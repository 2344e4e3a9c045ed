//! `roentgen bench allreduce`: the gradient sum of one optimizer step over the job's ranks, checked
//! and timed (issue 17). With N ranks under `mpirun` it measures what data-parallel training adds
//! per step; on one GPU it checks that NCCL loads and reduces on our pointers and stream.
//!
//! Each rank fills the buffer with (i mod 13 + 1) · (rank + 1), so after one sum every element is
//! (i mod 13 + 1) · N(N + 1)/2: small integers, exact in f32, checked element by element. The
//! bandwidths follow nccl-tests: algorithm bandwidth = bytes / time, bus bandwidth = algorithm
//! bandwidth · 2(N − 1)/N (what a ring all-reduce moves over each link).

use crate::backend::Backend;
use crate::dist::Dist;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug, Serialize)]
pub struct AllreduceReport {
    pub backend: String,
    pub ranks: usize,
    pub elements: usize,
    pub bytes: usize,
    /// "device (NCCL)", "host (MPI Allreduce in 16 MiB chunks)" or "none (one rank)".
    pub path: String,
    pub iters: usize,
    pub times_ms: Vec<f64>,
    pub median_ms: f64,
    pub min_ms: f64,
    pub alg_bandwidth_gbps: f64,
    pub bus_bandwidth_gbps: f64,
}

impl AllreduceReport {
    pub fn render(&self) -> String {
        format!(
            "allreduce of {} f32 ({:.1} MiB) over {} rank(s) on {}, {}: checked exact; median {:.3} ms (min {:.3}) over {} \
             iterations, algorithm bandwidth {:.2} GB/s, bus bandwidth {:.2} GB/s",
            self.elements,
            self.bytes as f64 / 1048576.0,
            self.ranks,
            self.backend,
            self.path,
            self.median_ms,
            self.min_ms,
            self.iters,
            self.alg_bandwidth_gbps,
            self.bus_bandwidth_gbps
        )
    }
}

/// One reduction of `t` as training does it, forcing the device collective even on one rank (to
/// check it). Returns whether the device reduced.
fn reduce(b: &dyn Backend, dist: &Dist, t: &Tensor) -> Result<bool> {
    if b.sum_over_ranks(t, dist)? {
        return Ok(true);
    }
    dist.sum_tensor_through_host(b, t)?;
    Ok(false)
}

pub fn run(b: &mut dyn Backend, dist: &Dist, elements: usize, warmup: usize, iters: usize) -> Result<AllreduceReport> {
    if elements == 0 || elements > 1 << 34 {
        bail!("$elements {elements}: must be between 1 and 2^34");
    }
    if iters == 0 || iters > 10_000 {
        bail!("$iters must be between 1 and 10000");
    }
    let ranks = dist.size();
    let pool = b.alloc(elements, "allreduce bench")?;
    let t = Tensor::new(pool, 0, [elements].into());
    let pattern = |i: usize| (i % 13 + 1) as f32;
    let mine: Vec<f32> = (0..elements).map(|i| pattern(i) * (dist.rank() + 1) as f32).collect();
    b.upload(&t, &mine)?;
    let on_device = reduce(b, dist, &t)?;
    let got = b.download(&t)?;
    let s = (ranks * (ranks + 1) / 2) as f32;
    if let Some(i) = (0..elements).find(|&i| got[i] != pattern(i) * s) {
        bail!("allreduce: element {i} is {} after the sum, expected {}", got[i], pattern(i) * s);
    }
    let mut times = Vec::with_capacity(iters);
    for k in 0..warmup + iters {
        b.upload(&t, &mine)?;
        b.synchronize()?;
        dist.barrier();
        let t0 = Instant::now();
        reduce(b, dist, &t)?;
        b.synchronize()?;
        if k >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    b.free(pool)?;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median_ms = sorted[sorted.len() / 2];
    ensure!(median_ms.is_finite());
    let bytes = elements * 4;
    let alg = bytes as f64 / (median_ms.max(1e-6) * 1e-3) / 1e9;
    let path = if on_device {
        "device (NCCL)"
    } else if ranks > 1 {
        "host (MPI Allreduce in 16 MiB chunks)"
    } else {
        "none (one rank)"
    };
    Ok(AllreduceReport {
        backend: b.name(),
        ranks,
        elements,
        bytes,
        path: path.into(),
        iters,
        times_ms: times,
        median_ms,
        min_ms: sorted[0],
        alg_bandwidth_gbps: alg,
        bus_bandwidth_gbps: alg * 2.0 * (ranks as f64 - 1.0) / ranks as f64,
    })
}
