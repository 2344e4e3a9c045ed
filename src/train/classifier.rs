//! `roentgen train-classifier`: a DenseNet trained from scratch on labelled images, the paper's
//! Table 5 (issue 16). The paper fixes AdamW (lr 1e-3, weight decay 1e-5), a cyclic learning rate,
//! early stopping when the validation AUROC has not improved for 15 epochs, and keeping the model
//! with the best validation AUROC; everything it leaves open is an option with a recorded default
//! ([`ClassifierOptions`]).
//!
//! Each epoch: the training rows in a seeded order, in batches (masked BCE over the known labels,
//! gradients, one AdamW step at the cyclic rate); then the validation rows in eval mode (running
//! statistics), their loss and each label's AUROC, macro-averaged over the labels that have both
//! classes. The output folder holds:
//! - `best.safetensors`: the best epoch's state dict under torchvision's names (parameters, running
//!   statistics, `num_batches_tracked`), with metadata naming the labels, the architecture and the
//!   preprocessing, so `eval classify` and PyTorch load it;
//! - `last.safetensors` and `state.json`: the latest epoch's weights, AdamW moments and progress,
//!   for `--resume`;
//! - `log.jsonl`: one line per epoch.
//!
//! Every file is written to a temporary name and renamed into place; nothing in the folder is
//! overwritten by a run that did not start from it (`--resume`).

use super::densenet::{flat, ClassifierPools};
use super::schedule::cyclic_triangular;
use crate::backend::Backend;
use crate::choice::value_name;
use crate::eval::auroc::class_auroc;
use crate::eval::densenet::{paper_preprocess, DenseNetConfig, Square};
use crate::eval::features::load_image;
use crate::eval::labels::{named_targets, LabelPolicy};
use crate::io::manifest::read_manifest_rows;
use crate::io::safetensors::{write_raw_atomic_with_metadata, RawTensor};
use crate::nn::{Cx, Fmap};
use crate::ops::optim::AdamWParams;
use crate::rng::splitmix::SplitMix64;
use crate::tensor::{Arena, Tensor};
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The network's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// DenseNet-121 (growth 32, blocks 6-12-24-16, 64 initial features): the paper's.
    Densenet121,
    /// A small DenseNet (growth 12, blocks 2-2-2, 16 initial features) for quick runs and tests.
    Small,
}

impl Arch {
    pub fn config(self) -> DenseNetConfig {
        match self {
            Arch::Densenet121 => DenseNetConfig::densenet121(),
            Arch::Small => DenseNetConfig {
                growth_rate: 12,
                block_config: vec![2, 2, 2],
                num_init_features: 16,
                bn_size: 2,
                in_channels: 1,
            },
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Densenet121 => "densenet121",
            Arch::Small => "small",
        }
    }
}

/// Everything a run is set up with (written to state.json; the paper's values where it gives them).
#[derive(Clone, Debug)]
pub struct ClassifierOptions {
    pub manifest: PathBuf,
    /// Validation rows from another manifest; else `val_fraction` of the training manifest.
    pub val_manifest: Option<PathBuf>,
    pub val_fraction: f64,
    pub labels: Vec<String>,
    pub policy: LabelPolicy,
    pub arch: Arch,
    /// Input side (the paper's preprocessing to this size; 224 is XRV's).
    pub resolution: usize,
    pub square: Square,
    pub batch: usize,
    pub max_epochs: usize,
    pub patience: usize,
    /// The cyclic rate's peak (the paper's 1e-3) and floor.
    pub lr: f64,
    pub lr_base: f64,
    /// Optimizer steps from floor to peak (torch's `step_size_up`); 0: two epochs' worth.
    pub cycle_steps: usize,
    pub weight_decay: f64,
    pub seed: u64,
    pub output: PathBuf,
    pub resume: bool,
}

impl ClassifierOptions {
    fn to_json(&self) -> Value {
        json!({
            "manifest": self.manifest.display().to_string(),
            "val_manifest": self.val_manifest.as_ref().map(|p| p.display().to_string()),
            "val_fraction": self.val_fraction, "labels": self.labels,
            "label_policy": value_name(self.policy), "arch": self.arch.name(),
            "resolution": self.resolution, "square": value_name(self.square),
            "batch": self.batch, "max_epochs": self.max_epochs, "patience": self.patience, "lr": self.lr,
            "lr_base": self.lr_base, "cycle_steps": self.cycle_steps, "weight_decay": self.weight_decay,
            "seed": self.seed, "augmentation": "none", "optimizer": "AdamW (betas 0.9, 0.999, eps 1e-8)",
            "schedule": "CyclicLR triangular",
        })
    }
}

/// One labelled image.
#[derive(Clone, Debug)]
struct Row {
    image: PathBuf,
    targets: Vec<Option<bool>>,
}

fn read_rows(manifest: &Path, labels: &[String], policy: LabelPolicy) -> Result<Vec<Row>> {
    read_manifest_rows(manifest, None)?
        .into_iter()
        .map(|r| {
            let at = || format!("{}:{}", manifest.display(), r.line);
            let Some(l) = &r.labels else {
                bail!("{}: no labels for image {} (each row needs a \"labels\" object)", at(), r.image.display())
            };
            Ok(Row { image: r.image.clone(), targets: named_targets(l, labels, policy).with_context(at)? })
        })
        .collect()
}

/// The rows' images, preprocessed (in parallel), as one (batch, side, side, 1) block.
fn load_batch(rows: &[&Row], o: &ClassifierOptions) -> Result<Vec<f32>> {
    let images: Vec<Vec<f32>> = rows
        .par_iter()
        .map(|r| {
            let img = load_image(&r.image)?;
            Ok(paper_preprocess(&img.pixels, img.height, img.width, img.channels, o.square, o.resolution).data)
        })
        .collect::<Result<_>>()?;
    Ok(images.concat())
}

/// Validation: (mean masked BCE, per-label AUROC, macro AUROC over labels with both classes).
fn validate(
    pools: &ClassifierPools,
    b: &dyn Backend,
    arena: &mut Arena,
    rows: &[Row],
    o: &ClassifierOptions,
) -> Result<(f64, Vec<Option<f64>>, Option<f64>)> {
    let outputs = o.labels.len();
    let (mut scores, mut loss_sum, mut batches) = (vec![Vec::new(); outputs], 0.0, 0);
    for chunk in rows.chunks(o.batch) {
        let refs: Vec<&Row> = chunk.iter().collect();
        let pixels = load_batch(&refs, o)?;
        let mark = arena.mark();
        let logits = {
            let mut cx = Cx::new(b, arena);
            let x = Fmap::alloc(cx.arena, chunk.len(), o.resolution, o.resolution, 1)?;
            b.upload(&x.t, &pixels)?;
            let l = pools.net.forward_eval(&mut cx, &x)?;
            b.download(&l)?
        };
        arena.release_all_to(mark);
        let targets: Vec<Option<bool>> = chunk.iter().flat_map(|r| r.targets.iter().copied()).collect();
        if targets.iter().any(Option::is_some) {
            loss_sum += crate::train::bce::masked_bce_with_logits(&logits, &targets)?.0 as f64;
            batches += 1;
        }
        for (k, s) in scores.iter_mut().enumerate() {
            s.extend(logits.chunks(outputs).map(|row| row[k]));
        }
    }
    let mut aurocs = Vec::with_capacity(outputs);
    for (k, s) in scores.iter().enumerate() {
        let t: Vec<Option<bool>> = rows.iter().map(|r| r.targets[k]).collect();
        aurocs.push(class_auroc(s, &t)?.auroc);
    }
    let known: Vec<f64> = aurocs.iter().flatten().copied().collect();
    let macro_auroc = (!known.is_empty()).then(|| known.iter().sum::<f64>() / known.len() as f64);
    Ok((loss_sum / batches.max(1) as f64, aurocs, macro_auroc))
}

/// The state dict of the network as safetensors tensors (torchvision's names; every norm's
/// `num_batches_tracked` as the number of training steps taken).
fn state_dict(pools: &ClassifierPools, b: &dyn Backend, steps: usize) -> Result<Vec<RawTensor>> {
    let mut out = Vec::new();
    for l in [&pools.params, &pools.buffers] {
        for (name, shape, v) in pools.download(b, l)? {
            out.push((name, shape, Dtype::F32, bytemuck::cast_slice(&v).to_vec()));
        }
    }
    for e in pools.buffers.entries() {
        if let Some(norm) = e.name.strip_suffix(".running_mean") {
            out.push((
                format!("{norm}.num_batches_tracked"),
                vec![],
                Dtype::I64,
                (steps as i64).to_le_bytes().to_vec(),
            ));
        }
    }
    Ok(out)
}

/// What `state.json` records between epochs.
#[derive(Clone, Debug)]
struct Progress {
    epoch: usize,
    step: usize,
    best: Option<f64>,
    best_epoch: usize,
    stale: usize,
}

/// The summary of a run.
#[derive(Clone, Debug)]
pub struct ClassifierRun {
    pub epochs: usize,
    pub best_epoch: usize,
    pub best_auroc: Option<f64>,
    pub stopped_early: bool,
    pub train_rows: usize,
    pub val_rows: usize,
}

pub fn train_classifier(b: &mut dyn Backend, o: &ClassifierOptions) -> Result<ClassifierRun> {
    ensure!(!o.labels.is_empty(), "no labels to train on");
    ensure!(o.batch >= 1 && o.resolution >= 32, "batch must be ≥ 1 and resolution ≥ 32");
    let mut train = read_rows(&o.manifest, &o.labels, o.policy)?;
    let val = match &o.val_manifest {
        Some(m) => read_rows(m, &o.labels, o.policy)?,
        None => {
            ensure!(o.val_fraction > 0.0 && o.val_fraction < 1.0, "the validation fraction must lie in (0, 1)");
            let mut rng = SplitMix64::new(o.seed ^ 0x5A11);
            shuffle(&mut train, &mut rng);
            let n_val = ((train.len() as f64 * o.val_fraction).round() as usize).max(1);
            ensure!(train.len() > n_val, "{} rows: too few to hold out {n_val} for validation", train.len());
            train.split_off(train.len() - n_val)
        }
    };
    for (k, name) in o.labels.iter().enumerate() {
        let (p, n) = val.iter().fold((0, 0), |(p, n), r| match r.targets[k] {
            Some(true) => (p + 1, n),
            Some(false) => (p, n + 1),
            None => (p, n),
        });
        if p == 0 || n == 0 {
            crate::diag::warn(format!(
                "label {name:?}: the validation rows hold {p} positive and {n} negative; it takes no part in the validation AUROC"
            ));
        }
    }
    let outputs = o.labels.len();
    let config = o.arch.config();
    let pools = ClassifierPools::allocate(b, &config, outputs)?;
    let n_params = pools.params.total();
    let (m_pool, v_pool) = (b.alloc(n_params, "classifier.adam_m")?, b.alloc(n_params, "classifier.adam_v")?);
    let (m, v) = (flat(m_pool, n_params), flat(v_pool, n_params));
    let (params, grads) = (flat(pools.params.pool(), n_params), flat(pools.grad_table.pool(), n_params));
    std::fs::create_dir_all(&o.output)
        .with_context(|| format!("{}: cannot create the output folder", o.output.display()))?;
    let state_path = o.output.join("state.json");
    let mut progress = if o.resume {
        resume(b, &pools, [&m, &v], o)?
    } else {
        if state_path.exists() || o.output.join("best.safetensors").exists() {
            bail!(
                "{} already holds a run (state.json / best.safetensors): pass --resume to continue it, or choose another --output",
                o.output.display()
            );
        }
        pools.init_torchvision(b, o.seed)?;
        b.zero(&m)?;
        b.zero(&v)?;
        Progress { epoch: 0, step: 0, best: None, best_epoch: 0, stale: 0 }
    };
    let steps_per_epoch = train.len().div_ceil(o.batch);
    let cycle = if o.cycle_steps == 0 { 2 * steps_per_epoch } else { o.cycle_steps };
    let mut arena = pools.training_arena(b, o.batch, o.resolution, o.resolution)?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(o.output.join("log.jsonl"))
        .with_context(|| format!("{}: cannot write log.jsonl", o.output.display()))?;
    let mut stopped_early = false;
    while progress.epoch < o.max_epochs {
        if progress.stale >= o.patience {
            stopped_early = true;
            break;
        }
        let t0 = std::time::Instant::now();
        let epoch = progress.epoch + 1;
        let mut order: Vec<&Row> = train.iter().collect();
        shuffle(&mut order, &mut SplitMix64::new(o.seed.wrapping_add(epoch as u64)));
        let bar = crate::diag::progress_bar(steps_per_epoch as u64, "steps", format!("epoch {epoch}"));
        let (mut loss_sum, mut lr) = (0.0, 0.0);
        for batch in order.chunks(o.batch) {
            let pixels = load_batch(batch, o)?;
            let targets: Vec<Option<bool>> = batch.iter().flat_map(|r| r.targets.iter().copied()).collect();
            pools.zero_grads(b)?;
            let shape = [batch.len(), o.resolution, o.resolution];
            let (_, loss) = if targets.iter().any(Option::is_some) {
                pools.forward_backward(b, &mut arena, shape, &pixels, &targets)?
            } else {
                (Vec::new(), 0.0) // a batch with no known label teaches nothing
            };
            ensure!(loss.is_finite(), "epoch {epoch}, step {}: the loss is not finite ({loss})", progress.step + 1);
            lr = cyclic_triangular(progress.step, o.lr_base, o.lr, cycle);
            progress.step += 1;
            let p = AdamWParams {
                n: n_params,
                lr: lr as f32,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: o.weight_decay as f32,
                step: progress.step,
            };
            b.adamw_step(&p, &params, &grads, &m, &v)?;
            loss_sum += loss as f64;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let train_loss = loss_sum / steps_per_epoch as f64;
        let (val_loss, aurocs, macro_auroc) = validate(&pools, b, &mut arena, &val, o)?;
        progress.epoch = epoch;
        let improved = macro_auroc.is_some_and(|a| progress.best.is_none_or(|best| a > best));
        if improved {
            progress.best = macro_auroc;
            progress.best_epoch = epoch;
            progress.stale = 0;
            save_weights(b, &pools, &o.output.join("best.safetensors"), progress.step, o, epoch, macro_auroc)?;
        } else {
            progress.stale += 1;
        }
        save_state(b, &pools, [&m, &v], &progress, o)?;
        let per_label: BTreeMap<&str, Option<f64>> =
            o.labels.iter().map(String::as_str).zip(aurocs.iter().copied()).collect();
        let line = json!({"epoch": epoch, "step": progress.step, "train_loss": train_loss, "val_loss": val_loss,
            "val_auroc": macro_auroc, "val_auroc_per_label": per_label, "lr_last": lr, "best": improved,
            "seconds": t0.elapsed().as_secs_f64()});
        writeln!(log, "{line}").and_then(|_| log.flush()).context("log.jsonl: cannot append")?;
        crate::diag::progress(format!(
            "epoch {epoch}: train loss {train_loss:.4}, validation loss {val_loss:.4}, AUROC {}{}",
            macro_auroc.map_or("—".to_string(), |a| format!("{a:.4}")),
            if improved { " (best so far, saved)" } else { "" }
        ));
    }
    if !stopped_early && progress.stale >= o.patience {
        stopped_early = true;
    }
    Ok(ClassifierRun {
        epochs: progress.epoch,
        best_epoch: progress.best_epoch,
        best_auroc: progress.best,
        stopped_early,
        train_rows: train.len(),
        val_rows: val.len(),
    })
}

fn shuffle<T>(v: &mut [T], rng: &mut SplitMix64) {
    for i in (1..v.len()).rev() {
        v.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
}

/// The metadata a checkpoint carries for `eval classify` and for people.
fn metadata(o: &ClassifierOptions, epoch: usize, auroc: Option<f64>) -> std::collections::HashMap<String, String> {
    let c = o.arch.config();
    [
        ("format", "roentgen densenet classifier".to_string()),
        ("labels", serde_json::to_string(&o.labels).expect("strings serialise")),
        ("arch", o.arch.name().to_string()),
        ("growth_rate", c.growth_rate.to_string()),
        ("block_config", serde_json::to_string(&c.block_config).expect("numbers serialise")),
        ("num_init_features", c.num_init_features.to_string()),
        ("bn_size", c.bn_size.to_string()),
        ("resolution", o.resolution.to_string()),
        ("square", value_name(o.square)),
        ("epoch", epoch.to_string()),
        ("val_auroc", auroc.map_or("none".into(), |a| a.to_string())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn save_weights(
    b: &dyn Backend,
    pools: &ClassifierPools,
    path: &Path,
    steps: usize,
    o: &ClassifierOptions,
    epoch: usize,
    auroc: Option<f64>,
) -> Result<()> {
    write_raw_atomic_with_metadata(path, &state_dict(pools, b, steps)?, Some(metadata(o, epoch, auroc)))?;
    Ok(())
}

fn save_state(
    b: &dyn Backend,
    pools: &ClassifierPools,
    [m, v]: [&Tensor; 2],
    p: &Progress,
    o: &ClassifierOptions,
) -> Result<()> {
    let mut tensors = state_dict(pools, b, p.step)?;
    for (name, t) in [("adam.m", m), ("adam.v", v)] {
        tensors.push((name.to_string(), vec![t.numel()], Dtype::F32, bytemuck::cast_slice(&b.download(t)?).to_vec()));
    }
    write_raw_atomic_with_metadata(&o.output.join("last.safetensors"), &tensors, Some(metadata(o, p.epoch, p.best)))?;
    let state = json!({"epoch": p.epoch, "step": p.step, "best_auroc": p.best, "best_epoch": p.best_epoch,
        "stale_epochs": p.stale, "options": o.to_json()});
    crate::io::files::write_bytes_atomic(&o.output.join("state.json"), serde_json::to_string_pretty(&state)?.as_bytes())
}

fn resume(b: &dyn Backend, pools: &ClassifierPools, [m, v]: [&Tensor; 2], o: &ClassifierOptions) -> Result<Progress> {
    let state_path = o.output.join("state.json");
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("--resume: {} cannot be read (no run to continue there)", state_path.display()))?;
    let s: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", state_path.display()))?;
    let before = &s["options"];
    let now = o.to_json();
    for key in ["labels", "arch", "resolution", "batch", "square", "label_policy"] {
        if before[key] != now[key] {
            bail!("--resume: {key} was {} in this run and is {} now; it cannot change mid-run", before[key], now[key]);
        }
    }
    let file = crate::io::safetensors::SafetensorsFile::open(&o.output.join("last.safetensors"))?;
    let src = crate::eval::tensors::FileSource::new(&file)?;
    let w = crate::eval::tensors::Weights { src: &src, network: "the classifier's last.safetensors" };
    pools.load_with(b, |name, shape| w.get(name, shape))?;
    b.upload(m, &w.get("adam.m", &[m.numel()])?)?;
    b.upload(v, &w.get("adam.v", &[v.numel()])?)?;
    let num = |k: &str| s[k].as_u64().map(|x| x as usize).with_context(|| format!("{}: no {k}", state_path.display()));
    let p = Progress {
        epoch: num("epoch")?,
        step: num("step")?,
        best: s["best_auroc"].as_f64(),
        best_epoch: num("best_epoch")?,
        stale: num("stale_epochs")?,
    };
    crate::diag::progress(format!("resuming after epoch {} (step {})", p.epoch, p.step));
    Ok(p)
}
