//! Autotuning the kernel versions (issue 18; versions.rs): `roentgen bench --autotune` runs a model
//! once on the device while recording every call of a versioned kernel family with its shape; then,
//! shape by shape, it runs every version on the same seeded inputs, keeps only the versions whose
//! outputs agree with version 1's there (the correctness gate), times them (events on the stream
//! around `iters` calls), and keeps the fastest. The table goes to the kernel cache, one table per
//! device, which every CUDA backend reads when it starts: `sample` and `train` then run the tuned
//! version of each shape they meet (versions.rs says what overrides it). On the emulated device
//! the mechanics and the gate run; its times mean nothing.

use super::conv::IgemmShape;
use super::versions::KernelFamily;
use super::CudaBackend;
use crate::backend::{AttentionOps, Backend, NormOps};
use crate::ops::attention::{AttentionForward, AttentionParams};
use crate::ops::norm::{GroupNormBackward, GroupNormParams, NormForward};
use crate::rng::splitmix::SplitMix64;
use crate::tensor::{PoolId, Tensor};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::PathBuf;

/// One call of a versioned kernel family, with the shape that keys its tuned version.
#[derive(Clone, Copy, Debug)]
pub enum TunableOp {
    GroupNorm(GroupNormParams),
    GroupNormBackward(GroupNormParams),
    Conv(IgemmShape),
    /// The bf16 attention forward (no key mask: a mask changes which keys count, not the work).
    Attention(AttentionParams),
}

impl TunableOp {
    pub fn family(&self) -> KernelFamily {
        match self {
            TunableOp::GroupNorm(_) => KernelFamily::GroupNorm,
            TunableOp::GroupNormBackward(_) => KernelFamily::GroupNormBackward,
            TunableOp::Conv(_) => KernelFamily::Conv,
            TunableOp::Attention(_) => KernelFamily::Attention,
        }
    }

    /// The shape, as the table keys it.
    pub fn key(&self) -> String {
        match self {
            TunableOp::GroupNorm(p) | TunableOp::GroupNormBackward(p) => p.shape_key(),
            TunableOp::Conv(s) => s.key(),
            TunableOp::Attention(p) => {
                let causal = if p.causal { " causal" } else { "" };
                format!("b{} q{} kv{} h{} d{}{causal}", p.batch, p.q_len, p.kv_len, p.heads, p.head_dim)
            }
        }
    }

    /// Bytes a call must move at least (inputs read once, outputs written once), for GB/s.
    fn min_bytes(&self) -> usize {
        match self {
            TunableOp::GroupNorm(p) => 4 * (2 * p.elements() + 2 * p.channels),
            // dout and x read twice (reduce, update), dinp read and written.
            TunableOp::GroupNormBackward(p) => 4 * (6 * p.elements() + 4 * p.channels),
            TunableOp::Conv(s) => {
                let (src, wt, dst) = s.extents();
                4 * (src + dst) + 2 * wt
            }
            // q, k, v read; out and lse written.
            TunableOp::Attention(p) => {
                let w = p.heads * p.head_dim;
                4 * (2 * p.batch * p.q_len * w + 2 * p.batch * p.kv_len * w + p.batch * p.q_len * p.heads)
            }
        }
    }

    /// The arithmetic of a call, for TFLOP/s (None for the memory-bound families): a convolution's
    /// 2·M·N·K; attention's four products per score (Q·Kᵀ and P·V, 2·d each), halved when causal
    /// (the keys past the diagonal are skipped tile by tile, FlashAttention's convention).
    fn flops(&self) -> Option<f64> {
        match self {
            TunableOp::GroupNorm(_) | TunableOp::GroupNormBackward(_) => None,
            TunableOp::Conv(s) => Some(s.flops() as f64),
            TunableOp::Attention(p) => {
                let dense = 4.0 * (p.batch * p.heads * p.q_len * p.kv_len * p.head_dim) as f64;
                Some(if p.causal { dense / 2.0 } else { dense })
            }
        }
    }
}

/// One version at one shape, as measured.
#[derive(Clone, Debug, Serialize)]
pub struct TuneRow {
    pub family: &'static str,
    pub shape: String,
    pub version: u32,
    /// Mean time of one call (events on the stream around `iters` calls).
    pub ms: f64,
    /// `min_bytes` / time: the bandwidth a single pass over the data would need.
    pub gb_per_s: f64,
    /// [`TunableOp::flops`] / time, for the compute-bound families (conv, attention).
    pub tflop_per_s: Option<f64>,
    /// Largest |output − version 1's output| over the largest |version 1 output|, the worst of the
    /// op's outputs (0 for v1).
    pub rel_err: f64,
    /// Passed the gate (rel_err ≤ [`gate`]: [`GATE`] but for a version that rounds differently).
    pub correct: bool,
    /// The fastest correct version at this shape.
    pub chosen: bool,
}

/// Most relative difference from version 1 a version may show and be kept: f32 rounding in
/// another order, nothing more (the versions compute the same function).
pub const GATE: f64 = 1e-5;

/// The gate of attention's version 3, whose probabilities are version 1's up to f32 rounding
/// before they are rounded to bf16 for P·V: a last-bit flip of some of them (2⁻⁸ relative each),
/// nothing more. Measured on the emulated device: at most 1.6e-4 of the output's scale over the
/// agree case's 12 shapes; a wrong scale (log2 e left out) shows 5e-1. Well
/// inside the bf16 path's own distance from the f32 reference (relative L2 2e-2).
pub const BF16_PROBABILITY_GATE: f64 = 2e-3;

/// max |got − want| / max |want| (0 when both are empty): the distance the gate measures, per output.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs() as f64)).max(1e-30);
    got.iter().zip(want).map(|(a, b)| (a - b).abs() as f64).fold(0f64, f64::max) / scale
}

/// The gate of `version` of `family`.
pub fn gate(family: KernelFamily, version: u32) -> f64 {
    match (family, version) {
        (KernelFamily::Attention, 3) => BF16_PROBABILITY_GATE,
        _ => GATE,
    }
}

/// Runs `f` on `gpu`, returning one call per shape of every versioned kernel it made.
pub fn record(gpu: &mut CudaBackend, f: &mut dyn FnMut(&mut dyn Backend) -> Result<()>) -> Result<Vec<TunableOp>> {
    *gpu.tunable_seen.borrow_mut() = Some(Vec::new());
    let r = f(gpu);
    let seen = gpu.tunable_seen.borrow_mut().take().unwrap_or_default();
    r.map(|_| seen)
}

/// Seeded standard-normal values (the inputs every version of a shape sees).
fn normals(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.next_normal() as f32).collect()
}

/// Times every version of every op at its shape (`iters` calls each after one warm-up) and marks
/// the fastest correct one. The backend's version choice is restored afterwards.
pub fn tune(gpu: &mut CudaBackend, ops: &[TunableOp], iters: usize) -> Result<Vec<TuneRow>> {
    let saved = gpu.kernel_choice();
    let r = tune_all(gpu, ops, iters.max(1));
    *gpu.kernel_choice.borrow_mut() = saved;
    r
}

/// An op's buffers on the device, with seeded contents: `inputs` are uploaded again before every
/// run (an accumulating op adds to its output), `outputs` compared between versions.
#[derive(Default)]
struct Prepared {
    pools: Vec<PoolId>,
    inputs: Vec<(Tensor, Vec<f32>)>,
    outputs: Vec<Tensor>,
}

/// Allocates and fills `op`'s buffers into `p` (whose pools the caller frees, also after an error).
fn prepare(gpu: &mut CudaBackend, op: &TunableOp, p: &mut Prepared) -> Result<()> {
    let alloc = |gpu: &mut CudaBackend, p: &mut Prepared, len: usize| -> Result<Tensor> {
        let pool = gpu.alloc(len.max(1), "autotune")?;
        p.pools.push(pool);
        Ok(Tensor::new(pool, 0, [len].into()))
    };
    match op {
        TunableOp::GroupNorm(g) => {
            let (n, bg, c) = (g.elements(), g.batch * g.groups, g.channels);
            for len in [n, bg, bg] {
                let t = alloc(gpu, p, len)?;
                p.outputs.push(t);
            }
            for (i, len) in [n, c, c].into_iter().enumerate() {
                let t = alloc(gpu, p, len)?;
                p.inputs.push((t, normals(len, 0xA070 + i as u64)));
            }
        }
        TunableOp::GroupNormBackward(g) => {
            let (n, bg, c) = (g.elements(), g.batch * g.groups, g.channels);
            // Outputs (accumulated into: uploaded before every run): dinp, dweight, dbias.
            for (i, len) in [n, c, c].into_iter().enumerate() {
                let t = alloc(gpu, p, len)?;
                p.outputs.push(t);
                p.inputs.push((t, normals(len, 0xB070 + i as u64)));
            }
            // dout, inp, weight, bias, mean, and an rstd of plausible size (positive).
            for (i, len) in [n, n, c, c, bg].into_iter().enumerate() {
                let t = alloc(gpu, p, len)?;
                p.inputs.push((t, normals(len, 0xB080 + i as u64)));
            }
            let rstd = alloc(gpu, p, bg)?;
            p.inputs.push((rstd, normals(bg, 0xB090).iter().map(|v| 0.5 + v.abs()).collect()));
        }
        TunableOp::Conv(s) => {
            let (src, wt, dst) = s.extents();
            let d = alloc(gpu, p, dst)?;
            p.outputs.push(d);
            p.inputs.push((d, normals(dst, 0xC0)));
            let x = alloc(gpu, p, src)?;
            p.inputs.push((x, normals(src, 0xC1)));
            // The bf16 path reads a bf16 weight: pairs of bf16 values in f32-sized words.
            let w: Vec<f32> = if gpu.use_bf16() {
                let v = normals(wt + 1, 0xC2);
                v.chunks(2)
                    .map(|p| {
                        let bf = |x: f32| (half::bf16::from_f32(x * 0.05).to_bits()) as u32;
                        f32::from_bits(bf(p[0]) | (bf(*p.get(1).unwrap_or(&0.0)) << 16))
                    })
                    .collect()
            } else {
                normals(wt, 0xC2).iter().map(|x| x * 0.05).collect()
            };
            let wt_t = alloc(gpu, p, w.len())?;
            p.inputs.push((wt_t, w));
        }
        TunableOp::Attention(a) => {
            let w = a.heads * a.head_dim;
            for len in [a.batch * a.q_len * w, a.batch * a.q_len * a.heads] {
                let t = alloc(gpu, p, len)?;
                p.outputs.push(t);
            }
            for (i, len) in
                [a.batch * a.q_len * w, a.batch * a.kv_len * w, a.batch * a.kv_len * w].into_iter().enumerate()
            {
                let t = alloc(gpu, p, len)?;
                p.inputs.push((t, normals(len, 0xA770 + i as u64)));
            }
        }
    }
    Ok(())
}

/// One run of `op` on its prepared buffers.
fn run_once(gpu: &CudaBackend, op: &TunableOp, p: &Prepared) -> Result<()> {
    let at = |t: &Tensor| gpu.dptr(t);
    match op {
        TunableOp::GroupNorm(g) => {
            let (o, i) = (&p.outputs, &p.inputs);
            let fwd =
                NormForward { out: &o[0], mean: &o[1], rstd: &o[2], inp: &i[0].0, weight: &i[1].0, bias: &i[2].0 };
            gpu.group_norm_forward(g, &fwd)
        }
        TunableOp::GroupNormBackward(g) => {
            let (o, i) = (&p.outputs, &p.inputs);
            let bwd = GroupNormBackward {
                dinp: &o[0],
                dweight: &o[1],
                dbias: &o[2],
                dout: &i[3].0,
                inp: &i[4].0,
                weight: &i[5].0,
                bias: &i[6].0,
                mean: &i[7].0,
                rstd: &i[8].0,
            };
            gpu.group_norm_backward(g, &bwd)
        }
        TunableOp::Conv(s) => gpu.conv_igemm_replay(s, at(&p.outputs[0]), at(&p.inputs[1].0), at(&p.inputs[2].0)),
        TunableOp::Attention(a) => {
            let (o, i) = (&p.outputs, &p.inputs);
            let fwd = AttentionForward { out: &o[0], lse: &o[1], q: &i[0].0, k: &i[1].0, v: &i[2].0, key_mask: None };
            gpu.attention_forward(a, &fwd)
        }
    }
}

fn tune_all(gpu: &mut CudaBackend, ops: &[TunableOp], iters: usize) -> Result<Vec<TuneRow>> {
    let mut rows = Vec::new();
    for op in ops {
        let mut p = Prepared::default();
        let prepared = prepare(gpu, op, &mut p);
        let measure = |gpu: &mut CudaBackend, p: &Prepared| -> Result<Vec<TuneRow>> {
            let mut found: Vec<TuneRow> = Vec::new();
            let mut reference: Option<Vec<Vec<f32>>> = None;
            for &(v, _) in op.family().versions() {
                gpu.kernel_choice.borrow_mut().set(op.family(), v)?;
                for (t, values) in &p.inputs {
                    gpu.upload(t, values)?;
                }
                run_once(gpu, op, p)?;
                let got = p.outputs.iter().map(|t| gpu.download(t)).collect::<Result<Vec<Vec<f32>>>>()?;
                let want = reference.get_or_insert_with(|| got.clone());
                // Per output (attention's out and lse, group norm's out, mean and rstd), each against
                // its own scale: a small output's error is not hidden behind a large one's values.
                let err = got.iter().zip(want.iter()).map(|(g, w)| rel_err(g, w)).fold(0f64, f64::max);
                let correct = got.iter().flatten().all(|x| x.is_finite()) && err <= gate(op.family(), v);
                // Timed by events on the stream: the kernels' own time, as the profile measures it.
                let gpu_ref: &CudaBackend = gpu;
                let ms = gpu_ref.device_ms(|| (0..iters).try_for_each(|_| run_once(gpu_ref, op, p)))? / iters as f64;
                found.push(TuneRow {
                    family: op.family().name(),
                    shape: op.key(),
                    version: v,
                    ms,
                    gb_per_s: op.min_bytes() as f64 / (ms * 1e-3) / 1e9,
                    tflop_per_s: op.flops().map(|f| f / (ms * 1e-3) / 1e12),
                    rel_err: err,
                    correct,
                    chosen: false,
                });
            }
            let best = found
                .iter()
                .enumerate()
                .filter(|(_, r)| r.correct)
                .min_by(|a, b| a.1.ms.total_cmp(&b.1.ms))
                .map(|(i, _)| i);
            if let Some(i) = best {
                found[i].chosen = true;
            }
            Ok(found)
        };
        let found = match &prepared {
            Ok(()) => measure(gpu, &p),
            Err(_) => Ok(Vec::new()),
        };
        for &pool in &p.pools {
            gpu.free(pool)?;
        }
        prepared.with_context(|| format!("autotune {} {}: allocating its buffers", op.family().name(), op.key()))?;
        rows.extend(found.with_context(|| format!("autotune {} {}", op.family().name(), op.key()))?);
    }
    Ok(rows)
}

/// The kernel cache file: $ROENTGEN_KERNEL_CACHE, else $XDG_CACHE_HOME/roentgen/kernel-versions.json,
/// else ~/.cache/roentgen/kernel-versions.json.
pub fn cache_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ROENTGEN_KERNEL_CACHE") {
        return Some(PathBuf::from(p));
    }
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(x) if !x.is_empty() => PathBuf::from(x),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(base.join("roentgen").join("kernel-versions.json"))
}

/// The key of this device's table in the cache: its name and compute capability.
fn device_key(gpu: &CudaBackend) -> String {
    let (major, minor) = gpu.cc;
    format!("{} (sm_{major}{minor})", gpu.gpu)
}

/// Writes the chosen version of every shape in `rows` to this device's table in the cache (other
/// devices' tables are kept), through a temporary file renamed into place. Returns the path.
pub fn save_cache(gpu: &CudaBackend, rows: &[TuneRow]) -> Result<PathBuf> {
    let path = cache_path().context("no cache folder: set ROENTGEN_KERNEL_CACHE or HOME")?;
    let mut all: serde_json::Value = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({})),
        Err(_) => serde_json::json!({}),
    };
    let entries: Vec<serde_json::Value> = rows
        .iter()
        .filter(|r| r.chosen)
        .map(|r| {
            let times: serde_json::Map<String, serde_json::Value> = rows
                .iter()
                .filter(|o| o.family == r.family && o.shape == r.shape)
                .map(|o| (o.version.to_string(), serde_json::json!(o.ms)))
                .collect();
            serde_json::json!({"family": r.family, "shape": r.shape, "version": r.version, "times_ms": times})
        })
        .collect();
    if !all.is_object() {
        all = serde_json::json!({});
    }
    all["devices"][device_key(gpu)] = serde_json::json!({
        "written_by": format!("roentgen {}", env!("CARGO_PKG_VERSION")),
        "entries": entries,
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the folder", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&all)?)
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(path)
}

/// Takes this device's table from the cache into the backend's choice. A missing cache is
/// nothing; an unreadable one is said once and ignored (version 1 runs).
pub(super) fn load_cache(gpu: &CudaBackend) {
    let Some(path) = cache_path() else { return };
    let Ok(text) = std::fs::read_to_string(&path) else { return };
    let parsed: Result<serde_json::Value, _> = serde_json::from_str(&text);
    let Ok(all) = parsed else {
        crate::diag::warn(format!(
            "{}: not JSON; the kernel cache is ignored (rerun `roentgen bench --autotune`)",
            path.display()
        ));
        return;
    };
    let Some(entries) = all["devices"][device_key(gpu)]["entries"].as_array() else { return };
    let mut choice = gpu.kernel_choice.borrow_mut();
    for e in entries {
        let family = e["family"].as_str().and_then(KernelFamily::from_name);
        if let (Some(f), Some(shape), Some(v)) = (family, e["shape"].as_str(), e["version"].as_u64()) {
            choice.set_tuned(f, shape, v as u32);
        }
    }
}

/// The table as text: per shape, every version's time, bandwidth and (conv, attention) TFLOP/s, the
/// gate, the choice.
pub fn render(rows: &[TuneRow]) -> String {
    let mut s = format!(
        "{:<12} {:<28} {:>3} {:>10} {:>9} {:>8} {:>9}  {}\n",
        "family", "shape", "v", "ms", "GB/s", "TFLOP/s", "rel err", ""
    );
    for r in rows {
        let mark = match (r.correct, r.chosen) {
            (_, true) => "chosen",
            (false, _) => "WRONG: not kept",
            _ => "",
        };
        let tflops = r.tflop_per_s.map_or_else(|| "-".to_string(), |t| format!("{t:.1}"));
        s.push_str(&format!(
            "{:<12} {:<28} {:>3} {:>10.4} {:>9.1} {:>8} {:>9.1e}  {mark}\n",
            r.family, r.shape, r.version, r.ms, r.gb_per_s, tflops, r.rel_err
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention's arithmetic counts its two products (halved when causal); the table prints
    /// TFLOP/s where there is arithmetic to count and "-" for group norm.
    #[test]
    fn attention_flops_and_the_table() {
        let p =
            AttentionParams { batch: 2, q_len: 4096, kv_len: 4096, heads: 8, head_dim: 40, scale: 0.1, causal: false };
        // SD's 64×64 self-attention: 4 · 2 · 8 · 4096² · 40 = 42.9 GFLOP.
        assert_eq!(TunableOp::Attention(p).flops(), Some(42_949_672_960.0));
        assert_eq!(TunableOp::Attention(AttentionParams { causal: true, ..p }).flops(), Some(21_474_836_480.0));
        let row = |family, shape: &str, tflop_per_s| TuneRow {
            family,
            shape: shape.into(),
            version: 2,
            ms: 0.25,
            gb_per_s: 100.0,
            tflop_per_s,
            rel_err: 0.0,
            correct: true,
            chosen: true,
        };
        let text = render(&[
            row("attention", "b2 q4096 kv4096 h8 d40", Some(171.8)),
            row("group_norm", "2x4096x320/32", None),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("TFLOP/s"), "{text}");
        assert!(lines[1].contains(" 171.8 ") && lines[1].ends_with("chosen"), "{text}");
        assert!(lines[2].contains(" - "), "{text}");
    }
}
