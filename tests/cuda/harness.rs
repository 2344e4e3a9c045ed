//! The harness of the CUDA parity suite: random inputs, placement in pools, comparison against the
//! CPU backend, and the runner that prints each case's outcome and the closing line.

use super::common::*;
use anyhow::{ensure, Result};
use roentgen::backend::cpu::CpuBackend;
use roentgen::backend::cuda::CudaBackend;
use roentgen::backend::Backend;
use roentgen::ops::attention::{AttentionBackward, AttentionForward, AttentionParams};
use roentgen::ops::conv::{Conv2dBackward, Conv2dForward, Conv2dParams};
use roentgen::ops::elementwise::{EmbeddingParams, UpsampleParams};
use roentgen::ops::linear::{LinearBackward, LinearForward, LinearGroupBackward, LinearGroupForward, LinearParams};
use roentgen::ops::norm::{GroupNormBackward, GroupNormParams, LayerNormBackward, LayerNormParams, NormForward};
use roentgen::ops::optim::AdamWParams;
use roentgen::ops::random::AddNoiseParams;
use roentgen::tensor::Tensor;

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Standard normal values (Box–Muller), never constant.
    pub fn normal(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u = self.uniform().max(1e-7);
                let v = self.uniform();
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect()
    }
    pub fn scaled(&mut self, n: usize, s: f32) -> Vec<f32> {
        self.normal(n).into_iter().map(|x| x * s).collect()
    }
}

/// Uploads `inputs` into one new pool of `b` and returns their tensors.
pub fn place(b: &mut dyn Backend, inputs: &[Vec<f32>]) -> Result<Vec<Tensor>> {
    place_skewed(b, inputs, 0)
}

/// As [`place`], with `skew` unused elements before every tensor: with an odd skew each tensor lies
/// at an odd element offset of its pool, 4-byte aligned only, so the kernels' vector-load fast
/// paths must notice and fall back.
pub fn place_skewed(b: &mut dyn Backend, inputs: &[Vec<f32>], skew: usize) -> Result<Vec<Tensor>> {
    let total: usize = inputs.iter().map(|v| skew + v.len().max(1)).sum();
    let pool = b.alloc(total, "test")?;
    let mut off = 0;
    let mut ts = Vec::new();
    for v in inputs {
        off += skew;
        let t = Tensor::new(pool, off, [v.len().max(1)].into());
        if !v.is_empty() {
            b.upload(&t, v)?;
        }
        off += v.len().max(1);
        ts.push(t);
    }
    Ok(ts)
}

pub type Op<'a> = &'a dyn Fn(&dyn Backend, &[Tensor]) -> Result<()>;

/// Runs `op` on the CPU and on `gpu` with the same inputs and compares the tensors listed in
/// `outs` (indices into `inputs`; outputs start random, so accumulation is tested too).
pub fn compare(gpu: &mut CudaBackend, bf16: bool, inputs: &[Vec<f32>], outs: &[usize], op: Op) -> Result<String> {
    compare_skewed(gpu, bf16, inputs, outs, op, 0)
}

/// As [`compare`], with the tensors placed by [`place_skewed`] on both backends.
pub fn compare_skewed(
    gpu: &mut CudaBackend,
    bf16: bool,
    inputs: &[Vec<f32>],
    outs: &[usize],
    op: Op,
    skew: usize,
) -> Result<String> {
    let mut cpu = CpuBackend::new();
    let tc = place_skewed(&mut cpu, inputs, skew)?;
    op(&cpu, &tc)?;
    let tg = place_skewed(gpu, inputs, skew)?;
    op(gpu, &tg)?;
    gpu.synchronize()?;
    let mut report = Vec::new();
    for &i in outs {
        let want = cpu.download(&tc[i])?;
        let got = gpu.download(&tg[i])?;
        ensure!(got.iter().all(|x| x.is_finite()), "output {i}: non-finite values from CUDA");
        if bf16 {
            let num: f64 = got.iter().zip(&want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().max(1e-30);
            let rel = (num / den).sqrt();
            ensure!(rel <= 2e-2, "output {i}: relative L2 error {rel:.3e} > 2e-2");
            report.push(format!("out{i} relL2 {rel:.1e}"));
        } else {
            let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
            let (mut err, mut at) = (0f32, 0);
            for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                if (a - b).abs() > err {
                    err = (a - b).abs();
                    at = k;
                }
            }
            ensure!(
                err <= F32_PARITY * scale,
                "output {i}: max error {err:.3e} at {at} (cuda {}, cpu {}) > {:.1e}",
                got[at],
                want[at],
                F32_PARITY * scale
            );
            report.push(format!("out{i} max {err:.1e}"));
        }
    }
    Ok(report.join(", "))
}

/// Runs the cases one by one and counts them. A case is *filtered out* when its name lacks the
/// command line's filter (the caller asked for fewer), *skipped* when it could not run here (no
/// device, ROENTGEN_CUDA_SKIP_E2E) — a skip is never a pass, and ROENTGEN_REQUIRE_CUDA=1 turns any
/// skip into a failure of the run (CI and the GPU check set it).
pub struct Runner {
    pub filter: Option<String>,
    /// `--list`: print the names of the cases that would run, run none.
    pub list: bool,
    /// `--shard I/N`: of the cases the filter keeps, this process runs those whose index is I
    /// mod N (tests/cuda.rs starts the other shards as processes of their own).
    pub shard: Shard,
    /// Cases the filter kept so far (the index that picks a case's shard).
    kept: usize,
    /// Set while the cases that follow cannot run here: the reason they are skipped.
    pub skip_reason: Option<String>,
    pub passed: usize,
    pub failed: Vec<String>,
    pub skipped: usize,
    pub filtered_out: usize,
    /// Cases left to the other shards.
    pub other_shards: usize,
}

/// One of `count` interleaved parts of the suite: case i (counted over the cases the filter
/// keeps) belongs to part i mod count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// "I/N" with I < N.
    pub fn parse(s: &str) -> Result<Shard> {
        let (i, n) = s.split_once('/').ok_or_else(|| anyhow::anyhow!("--shard {s:?}: expected I/N"))?;
        let (index, count): (usize, usize) = (i.trim().parse()?, n.trim().parse()?);
        ensure!(index < count, "--shard {s:?}: the index must be below the count");
        Ok(Shard { index, count })
    }
}

impl Runner {
    pub fn new(filter: Option<String>, list: bool, shard: Shard) -> Runner {
        Runner {
            filter,
            list,
            shard,
            kept: 0,
            skip_reason: None,
            passed: 0,
            failed: Vec::new(),
            skipped: 0,
            filtered_out: 0,
            other_shards: 0,
        }
    }

    pub fn case(&mut self, name: &str, f: impl FnOnce() -> Result<String>) {
        if self.filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            self.filtered_out += 1;
            return;
        }
        self.kept += 1;
        if (self.kept - 1) % self.shard.count != self.shard.index {
            self.other_shards += 1;
            return;
        }
        if self.list {
            println!("{name}");
            return;
        }
        if let Some(why) = &self.skip_reason {
            println!("test {name} ... SKIPPED: {why}");
            self.skipped += 1;
            return;
        }
        let start = std::time::Instant::now();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(Ok(msg)) => {
                println!("test {name} ... ok ({msg}) [{:.1} s]", start.elapsed().as_secs_f64());
                self.passed += 1;
            }
            Ok(Err(e)) => {
                println!("test {name} ... FAILED: {e:#}");
                self.failed.push(name.to_string());
            }
            Err(_) => {
                println!("test {name} ... FAILED (panicked)");
                self.failed.push(name.to_string());
            }
        }
    }

    /// Adds what another shard's process reported (its [`Runner::shard_report`] lines, read back
    /// by `merge_report`).
    pub fn merge(&mut self, other: &ShardReport) {
        self.passed += other.passed;
        self.skipped += other.skipped;
        self.failed.extend(other.failed.iter().cloned());
        self.other_shards = self.other_shards.saturating_sub(other.passed + other.skipped + other.failed.len());
    }

    /// The machine-readable lines a shard's process ends with, for the process that started it.
    pub fn shard_report(&self) -> String {
        let mut s = format!("{SHARD_REPORT} {} {}\n", self.passed, self.skipped);
        for f in &self.failed {
            s += &format!("{SHARD_FAILED} {f}\n");
        }
        s
    }

    /// Prints the closing line (and the failures) and returns whether the run failed: a failed
    /// case, or a skipped one when `required` (ROENTGEN_REQUIRE_CUDA).
    pub fn finish(&self, device: &str, required: bool) -> bool {
        let bad = !self.failed.is_empty() || (required && self.skipped > 0);
        let shard = if self.shard.count > 1 && self.other_shards > 0 {
            format!("; shard {}/{}, {} cases left to the others", self.shard.index, self.shard.count, self.other_shards)
        } else {
            String::new()
        };
        println!(
            "test result: {}. {} passed; {} failed; {} skipped; {} filtered out (device: {device}{shard})",
            if bad { "FAILED" } else { "ok" },
            self.passed,
            self.failed.len(),
            self.skipped,
            self.filtered_out
        );
        if !self.failed.is_empty() {
            println!("failures:\n  {}", self.failed.join("\n  "));
        }
        if required && self.skipped > 0 {
            println!("ROENTGEN_REQUIRE_CUDA is set and {} cases were skipped", self.skipped);
        }
        bad
    }
}

/// The first word of a shard's summary line (passed, skipped) and of each of its failures' lines.
pub const SHARD_REPORT: &str = "@shard-report";
pub const SHARD_FAILED: &str = "@shard-failed";

/// What a shard's process reported; `None` from `parse` when its output has no summary line (it
/// died before the end).
#[derive(Debug, Default, PartialEq)]
pub struct ShardReport {
    pub passed: usize,
    pub skipped: usize,
    pub failed: Vec<String>,
}

impl ShardReport {
    pub fn parse(output: &str) -> Option<ShardReport> {
        let mut r: Option<ShardReport> = None;
        let mut failed = Vec::new();
        for line in output.lines() {
            if let Some(rest) = line.strip_prefix(SHARD_REPORT) {
                let n: Vec<usize> = rest.split_whitespace().filter_map(|w| w.parse().ok()).collect();
                if let [passed, skipped] = n[..] {
                    r = Some(ShardReport { passed, skipped, failed: Vec::new() });
                }
            } else if let Some(name) = line.strip_prefix(SHARD_FAILED) {
                failed.push(name.trim().to_string());
            }
        }
        r.map(|r| ShardReport { failed, ..r })
    }
}

/// A group norm of (batch, hw, channels) in `groups` groups, ε 1e-5 (the models' value).
pub fn group_norm(batch: usize, hw: usize, channels: usize, groups: usize, silu: bool) -> GroupNormParams {
    GroupNormParams { batch, hw, channels, groups, eps: 1e-5, silu }
}

/// `group_norm_forward` on tensors in the order out, mean, rstd, inp, weight, bias.
pub fn group_norm_forward(b: &dyn Backend, p: GroupNormParams, t: &[Tensor]) -> Result<()> {
    b.group_norm_forward(
        &p,
        &NormForward { out: &t[0], mean: &t[1], rstd: &t[2], inp: &t[3], weight: &t[4], bias: &t[5] },
    )
}

/// `group_norm_backward` on tensors in the order dinp, dweight, dbias, dout, inp, weight, bias,
/// mean, rstd.
pub fn group_norm_backward(b: &dyn Backend, p: GroupNormParams, t: &[Tensor]) -> Result<()> {
    let [dinp, dweight, dbias, dout, inp, weight, bias, mean, rstd] = &t[..9] else { unreachable!() };
    b.group_norm_backward(&p, &GroupNormBackward { dinp, dweight, dbias, dout, inp, weight, bias, mean, rstd })
}

/// `layer_norm_forward` of (rows, cols), ε 1e-5, on tensors in the order out, mean, rstd, inp,
/// weight, bias.
pub fn layer_norm_forward(b: &dyn Backend, rows: usize, cols: usize, t: &[Tensor]) -> Result<()> {
    let p = LayerNormParams { rows, cols, eps: 1e-5 };
    b.layer_norm_forward(
        &p,
        &NormForward { out: &t[0], mean: &t[1], rstd: &t[2], inp: &t[3], weight: &t[4], bias: &t[5] },
    )
}

/// `layer_norm_backward` of (rows, cols) on tensors in the order dinp, dweight, dbias, dout, inp,
/// weight, mean, rstd.
pub fn layer_norm_backward(b: &dyn Backend, rows: usize, cols: usize, t: &[Tensor]) -> Result<()> {
    let [dinp, dweight, dbias, dout, inp, weight, mean, rstd] = &t[..8] else { unreachable!() };
    let p = LayerNormParams { rows, cols, eps: 1e-5 };
    b.layer_norm_backward(&p, &LayerNormBackward { dinp, dweight, dbias, dout, inp, weight, mean, rstd })
}

/// A convolution of (batch, h, w, c_in, c_out, kernel, stride, pad), as the cases list them.
pub fn conv2d(shape: (usize, usize, usize, usize, usize, usize, usize, [usize; 4])) -> Conv2dParams {
    let (batch, h, w, c_in, c_out, kernel, stride, pad) = shape;
    Conv2dParams { batch, h, w, c_in, c_out, kernel, stride, pad }
}

/// Random inputs of a convolution's forward case (out, inp, weight scaled by 1/√fan-in, bias) and
/// of its backward case (dinp, dweight, dbias, dout, inp, weight), drawn in that order.
pub fn conv2d_inputs(rng: &mut Rng, p: &Conv2dParams) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let (inp, out, wt) = (p.batch * p.h * p.w * p.c_in, p.out_rows() * p.c_out, p.c_out * p.patch_len());
    let scale = (p.patch_len() as f32).powf(-0.5);
    let fwd = vec![rng.normal(out), rng.normal(inp), rng.scaled(wt, scale), rng.normal(p.c_out)];
    let bwd = vec![
        rng.normal(inp),
        rng.normal(wt),
        rng.normal(p.c_out),
        rng.normal(out),
        rng.normal(inp),
        rng.scaled(wt, scale),
    ];
    (fwd, bwd)
}

/// `conv2d_forward` on tensors in the order out, inp, weight[, bias[, batch bias, residual]].
pub fn conv2d_forward(b: &dyn Backend, p: Conv2dParams, t: &[Tensor]) -> Result<()> {
    let fused =
        Conv2dForward { batch_bias: t.get(4), residual: t.get(5), ..Conv2dForward::new(&t[0], &t[1], &t[2], t.get(3)) };
    b.conv2d_forward(&p, &fused)
}

/// `conv2d_backward` on tensors in the order dinp, dweight, dbias, dout, inp, weight; without
/// `dinp_and_dbias` only the weight gradient is asked for.
pub fn conv2d_backward(b: &dyn Backend, p: Conv2dParams, t: &[Tensor], dinp_and_dbias: bool) -> Result<()> {
    let [dinp, dweight, dbias, dout, inp, weight] = &t[..6] else { unreachable!() };
    let (dinp, dbias) = if dinp_and_dbias { (Some(dinp), Some(dbias)) } else { (None, None) };
    b.conv2d_backward(&p, &Conv2dBackward { dinp, dweight, dbias, dout, inp, weight })
}

/// An attention of (batch, q_len, kv_len, heads, head_dim, scale, causal), as the cases list them.
pub fn attn(d: (usize, usize, usize, usize, usize, f32, bool)) -> AttentionParams {
    let (batch, q_len, kv_len, heads, head_dim, scale, causal) = d;
    AttentionParams { batch, q_len, kv_len, heads, head_dim, scale, causal }
}

/// `attention_forward` on out, lse, q, k, v.
pub fn attention_forward(
    b: &dyn Backend,
    p: AttentionParams,
    [out, lse, q, k, v]: [&Tensor; 5],
    key_mask: Option<&[u32]>,
) -> Result<()> {
    b.attention_forward(&p, &AttentionForward { out, lse, q, k, v, key_mask })
}

/// `attention_backward` on dq, dk, dv, dout, q, k, v, out, lse.
pub fn attention_backward(
    b: &dyn Backend,
    p: AttentionParams,
    [dq, dk, dv, dout, q, k, v, out, lse]: [&Tensor; 9],
    key_mask: Option<&[u32]>,
) -> Result<()> {
    let forward = AttentionForward { out, lse, q, k, v, key_mask };
    b.attention_backward(&p, &AttentionBackward { dq, dk, dv, dout, forward })
}

/// A resize of (batch, in_h, in_w, out_h, out_w, channels), as the cases list them.
pub fn upsample(d: (usize, usize, usize, usize, usize, usize)) -> UpsampleParams {
    let (batch, in_h, in_w, out_h, out_w, channels) = d;
    UpsampleParams { batch, in_h, in_w, out_h, out_w, channels }
}

/// An embedding of `batch` sequences of `seq` tokens of `dim` values.
pub fn embedding(batch: usize, seq: usize, dim: usize) -> EmbeddingParams {
    EmbeddingParams { batch, seq, dim }
}

/// An AdamW step over `n` values at `lr`, step `step`, with torch's default betas and eps and a
/// weight decay of 1e-2.
pub fn adamw(n: usize, lr: f32, step: usize) -> AdamWParams {
    AdamWParams { n, lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2, step }
}

/// `linear_forward` of (rows, in, out) on out, inp, weight[, bias].
pub fn linear_forward(b: &dyn Backend, (rows, i, o): (usize, usize, usize), t: &[Tensor]) -> Result<()> {
    let p = LinearParams { rows, in_features: i, out_features: o };
    b.linear_forward(&p, &LinearForward { out: &t[0], inp: &t[1], weight: &t[2], bias: t.get(3), residual: None })
}

/// `linear_forward` of (rows, in, out) on out, inp, weight, bias (used if `bias`), residual.
pub fn linear_forward_residual(b: &dyn Backend, dims: (usize, usize, usize), t: &[Tensor], bias: bool) -> Result<()> {
    let (rows, i, o) = dims;
    let p = LinearParams { rows, in_features: i, out_features: o };
    let bias = bias.then_some(&t[3]);
    b.linear_forward(&p, &LinearForward { out: &t[0], inp: &t[1], weight: &t[2], bias, residual: Some(&t[4]) })
}

/// `linear_group_forward` of `group` layers of (rows, in, out) on out, inp, weight.
pub fn linear_group_forward(b: &dyn Backend, dims: (usize, usize, usize), group: usize, t: &[Tensor]) -> Result<()> {
    let (rows, i, o) = dims;
    let p = LinearParams { rows, in_features: i, out_features: o };
    b.linear_group_forward(&p, group, &LinearGroupForward { out: &t[0], inp: &t[1], weight: &t[2] })
}

/// `linear_group_backward` of `group` layers of (rows, in, out) on dinp, dweight, dout, inp, weight.
pub fn linear_group_backward(b: &dyn Backend, dims: (usize, usize, usize), group: usize, t: &[Tensor]) -> Result<()> {
    let (rows, i, o) = dims;
    let p = LinearParams { rows, in_features: i, out_features: o };
    let [dinp, dweight, dout, inp, weight] = &t[..5] else { unreachable!() };
    b.linear_group_backward(&p, group, &LinearGroupBackward { dinp: Some(dinp), dweight, dout, inp, weight })
}

/// `linear_backward` of (rows, in, out) on dinp, dweight, dbias, dout, inp, weight.
pub fn linear_backward(b: &dyn Backend, (rows, i, o): (usize, usize, usize), t: &[Tensor]) -> Result<()> {
    let p = LinearParams { rows, in_features: i, out_features: o };
    let [dinp, dweight, dbias, dout, inp, weight] = &t[..6] else { unreachable!() };
    b.linear_backward(&p, &LinearBackward { dinp: Some(dinp), dweight, dbias: Some(dbias), dout, inp, weight })
}

/// DDPM's forward process over `n` values with the given coefficients.
pub fn add_noise(n: usize, sqrt_alpha: f32, sqrt_one_minus_alpha: f32, v_prediction: bool) -> AddNoiseParams {
    AddNoiseParams { n, sqrt_alpha, sqrt_one_minus_alpha, v_prediction }
}
