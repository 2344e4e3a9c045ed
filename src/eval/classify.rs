//! `roentgen eval classify`, the paper's Table 3: a pretrained chest X-ray classifier
//! (TorchXRayVision's DenseNet-121 `densenet121-res224-all`, with its classifier head) scores real or
//! generated images, and each finding's AUROC against the labels of the reports says how much of
//! the finding the images show.
//!
//! The chain, each link tested against its reference (tests/classify.rs):
//! - images and their labels from a manifest (`labels` of `prepare mimic` or `phantom` rows) or a
//!   folder of PNGs with a `labels` text chunk (`roentgen phantom` writes one);
//! - labels to XRV's 18 targets (`labels::row_targets`, XRV's policy by default), or, for a
//!   classifier `train-classifier` wrote, to its own labels (`labels::named_targets`);
//! - the paper's preprocessing (`densenet::paper_preprocess`) and the classifier's scores: sigmoid
//!   and XRV's `op_norm` with the model's operating points (a monotone map per class, so it changes
//!   no AUROC; it makes the scores those torchxrayvision prints);
//! - per-class AUROC (sklearn's, ties one half) with n_pos/n_neg, a bootstrap interval over images,
//!   and the paper's filtered average over Atelectasis, Cardiomegaly, Edema, Effusion and
//!   Pneumothorax (the classes whose AUROC on the real test set was above 0.75), with its own
//!   interval from the same draws.

use super::auroc::{bootstrap_interval, class_auroc, ClassAuroc, ClassColumn};
use super::densenet::{op_norm_score, paper_preprocess, DenseNet, DenseNetConfig, Square, INPUT_SIZE, OP_THRESHS_ALL};
use super::features::{load_image, Image};
use super::labels::{named_targets, row_targets, LabelPolicy, XRV_PATHOLOGIES};
use crate::io::images::png_files;
use crate::io::manifest::read_manifest_rows;
use crate::tools::phantom::eval::png_text;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The classes of the paper's filtered average (Table 3: baseline AUROC above 0.75), by XRV name.
pub const FILTERED_CLASSES: [&str; 5] = ["Atelectasis", "Cardiomegaly", "Edema", "Effusion", "Pneumothorax"];

/// Images per classifier call (decoded and preprocessed in parallel, then run together).
const CLASSIFY_BATCH: usize = 16;

/// Which classifier scores the images: what its outputs are called, how a logit becomes a score,
/// and which outputs the report's average takes.
#[derive(Clone, Debug)]
pub struct ClassifierKind {
    pub names: Vec<String>,
    /// XRV's operating points (`op_norm`) for the public model; None: the sigmoid.
    pub op_threshs: Option<Vec<f32>>,
    /// The outputs averaged (the paper's filtered five for XRV; all for a trained classifier).
    pub averaged: Vec<String>,
    /// The input side of the network.
    pub size: usize,
}

impl ClassifierKind {
    /// TorchXRayVision's densenet121-res224-all.
    pub fn xrv() -> ClassifierKind {
        ClassifierKind {
            names: XRV_PATHOLOGIES.map(String::from).to_vec(),
            op_threshs: Some(OP_THRESHS_ALL.to_vec()),
            averaged: FILTERED_CLASSES.map(String::from).to_vec(),
            size: INPUT_SIZE,
        }
    }

    /// A classifier trained by `train-classifier` on `labels` at `size`.
    pub fn trained(labels: Vec<String>, size: usize) -> ClassifierKind {
        ClassifierKind { averaged: labels.clone(), names: labels, op_threshs: None, size }
    }

    fn is_xrv(&self) -> bool {
        self.op_threshs.is_some()
    }

    /// One row's targets for this classifier's outputs.
    pub fn targets(&self, labels: &Value, policy: LabelPolicy) -> Result<Vec<Option<bool>>> {
        if self.is_xrv() {
            Ok(row_targets(labels, policy)?.to_vec())
        } else {
            named_targets(labels, &self.names, policy)
        }
    }
}

/// What a weights file's metadata says of its classifier: for a `train-classifier` checkpoint
/// (metadata "format" = "roentgen densenet classifier"), its labels, architecture, input side and
/// square; None for any other file (TorchXRayVision's state dict has no metadata).
pub fn trained_classifier(
    meta: &std::collections::HashMap<String, String>,
) -> Result<Option<(ClassifierKind, DenseNetConfig, Square)>> {
    if meta.get("format").map(String::as_str) != Some("roentgen densenet classifier") {
        return Ok(None);
    }
    let field = |k: &str| meta.get(k).with_context(|| format!("the classifier's metadata has no {k:?}"));
    let number =
        |k: &str| -> Result<usize> { field(k)?.parse().with_context(|| format!("metadata {k:?} is not a number")) };
    let labels: Vec<String> =
        serde_json::from_str(field("labels")?).context("metadata \"labels\" is not a JSON list")?;
    let config = DenseNetConfig {
        growth_rate: number("growth_rate")?,
        block_config: serde_json::from_str(field("block_config")?)
            .context("metadata \"block_config\" is not a JSON list")?,
        num_init_features: number("num_init_features")?,
        bn_size: number("bn_size")?,
        in_channels: 1,
    };
    let square = match field("square")?.as_str() {
        "pad" => Square::Pad,
        "crop" => Square::Crop,
        other => bail!("metadata \"square\" is {other:?}: expected pad or crop"),
    };
    Ok(Some((ClassifierKind::trained(labels, number("resolution")?), config, square)))
}

/// One image and its targets, one per classifier output.
#[derive(Clone, Debug)]
pub struct LabelledImage {
    pub path: PathBuf,
    pub targets: Vec<Option<bool>>,
}

/// The rows of a manifest, each with its `labels` turned into targets under `policy`. A row
/// without labels, or with labels that do not read, is an error naming the manifest's line.
pub fn items_from_manifest(
    manifest: &Path,
    base: Option<&Path>,
    kind: &ClassifierKind,
    policy: LabelPolicy,
) -> Result<Vec<LabelledImage>> {
    read_manifest_rows(manifest, base)?
        .into_iter()
        .map(|row| {
            let at = || format!("{}:{}", manifest.display(), row.line);
            let Some(labels) = &row.labels else {
                bail!(
                    "{}: no labels for image {} (each row needs a \"labels\" object, as `prepare mimic` and `phantom` write)",
                    at(),
                    row.image.display()
                )
            };
            let targets = kind.targets(labels, policy).with_context(at)?;
            Ok(LabelledImage { path: row.image, targets })
        })
        .collect()
}

/// The PNGs of a folder, each with the targets of its `labels` text chunk (JSON, as `roentgen
/// phantom` writes it). An image without one is an error naming it.
pub fn items_from_folder(dir: &Path, kind: &ClassifierKind, policy: LabelPolicy) -> Result<Vec<LabelledImage>> {
    png_files(dir, "`roentgen phantom` (PNGs with a \"labels\" text chunk)")?
        .into_par_iter()
        .map(|path| {
            let text = png_text(&path, "labels")?.with_context(|| {
                format!(
                    "{}: no \"labels\" text chunk; give --manifest with a \"labels\" object per row instead",
                    path.display()
                )
            })?;
            let labels: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: the \"labels\" text chunk is not JSON", path.display()))?;
            let targets = kind.targets(&labels, policy).with_context(|| path.display().to_string())?;
            Ok(LabelledImage { path, targets })
        })
        .collect()
}

/// An image whose 8-bit levels span less than this, or whose brightest level is below it, is
/// reported: XRV's input expects the full 0–255 range (`normalize(img, 255)`), and a 12-bit
/// radiograph stored in a 16-bit PNG reads as levels 0–16 here.
const LOW_RANGE: u8 = 32;

fn low_range(img: &Image) -> bool {
    let (lo, hi) = img.pixels.iter().fold((255u8, 0u8), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    hi < LOW_RANGE || hi - lo < LOW_RANGE
}

/// The classifier's scores of each image (one per output, in `kind`'s order), and the images whose
/// level range looks wrong for XRV's normalisation.
pub fn score_images(
    net: &mut DenseNet,
    kind: &ClassifierKind,
    paths: &[PathBuf],
    square: Square,
) -> Result<(Vec<Vec<f32>>, Vec<PathBuf>)> {
    let bar = crate::diag::progress_bar(paths.len() as u64, "images", "classifying");
    let (mut scores, mut low) = (Vec::with_capacity(paths.len()), Vec::new());
    for chunk in paths.chunks(CLASSIFY_BATCH) {
        let loaded = chunk
            .par_iter()
            .map(|p| {
                let img = load_image(p)?;
                let x = paper_preprocess(&img.pixels, img.height, img.width, img.channels, square, kind.size);
                Ok((x, low_range(&img)))
            })
            .collect::<Result<Vec<_>>>()?;
        low.extend(chunk.iter().zip(&loaded).filter(|(_, (_, l))| *l).map(|(p, _)| p.clone()));
        let inputs: Vec<_> = loaded.into_iter().map(|(x, _)| x).collect();
        let features = net.forward(&inputs).with_context(|| format!("classifying {} images", chunk.len()))?;
        for (p, logits) in chunk.iter().zip(net.logits(&features)?) {
            if logits.len() != kind.names.len() {
                bail!(
                    "the classifier has {} outputs, but {} were expected ({})",
                    logits.len(),
                    kind.names.len(),
                    if kind.is_xrv() {
                        "TorchXRayVision's densenet121-res224-all"
                    } else {
                        "the labels its metadata names"
                    }
                );
            }
            if logits.iter().any(|v| !v.is_finite()) {
                bail!("{}: the classifier's logits are not finite", p.display());
            }
            scores.push(match &kind.op_threshs {
                Some(t) => logits.iter().zip(t).map(|(&l, &t)| op_norm_score(l, t)).collect(),
                None => logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
            });
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok((scores, low))
}

/// One class's line of the report.
#[derive(Clone, Debug)]
pub struct ClassLine {
    pub name: String,
    pub auroc: ClassAuroc,
    pub interval: Option<(f64, f64)>,
}

/// The average: the mean AUROC over the averaged classes that have one (XRV: the paper's
/// filtered five, [`FILTERED_CLASSES`]).
#[derive(Clone, Debug)]
pub struct FilteredAverage {
    pub classes: Vec<String>,
    /// Averaged classes without an AUROC (no labels, or one class only), left out of the mean.
    pub missing: Vec<String>,
    pub mean: Option<f64>,
    pub interval: Option<(f64, f64)>,
}

/// How the intervals are drawn.
#[derive(Clone, Copy, Debug)]
pub struct BootstrapOptions {
    pub resamples: usize,
    pub level: f64,
    pub seed: u64,
}

/// The report: every class in XRV's order, and the filtered average.
#[derive(Clone, Debug)]
pub struct ClassifyReport {
    pub images: usize,
    pub classes: Vec<ClassLine>,
    pub filtered: FilteredAverage,
    pub bootstrap: BootstrapOptions,
    /// Whether the average is XRV's filtered one (else over a trained classifier's labels).
    pub xrv: bool,
}

/// Per-class AUROCs of `scores` (one row per image, in `kind`'s order) against `targets`, with
/// intervals, and the average over `kind.averaged`.
pub fn report(
    kind: &ClassifierKind,
    scores: &[Vec<f32>],
    targets: &[Vec<Option<bool>>],
    boot: BootstrapOptions,
) -> Result<ClassifyReport> {
    if scores.len() != targets.len() {
        bail!("{} images scored but {} labelled", scores.len(), targets.len());
    }
    let columns: Vec<(Vec<f32>, Vec<Option<bool>>)> = (0..kind.names.len())
        .map(|k| (scores.iter().map(|s| s[k]).collect(), targets.iter().map(|t| t[k]).collect()))
        .collect();
    let column = |k: usize| -> ClassColumn { (&columns[k].0, &columns[k].1) };
    let mut classes = Vec::with_capacity(kind.names.len());
    for (k, name) in kind.names.iter().enumerate() {
        let auroc = class_auroc(&columns[k].0, &columns[k].1)?;
        let interval = match auroc.auroc {
            Some(_) => bootstrap_interval(&[column(k)], boot.resamples, boot.level, boot.seed)?,
            None => None,
        };
        classes.push(ClassLine { name: name.clone(), auroc, interval });
    }
    let (mut used, mut missing) = (Vec::new(), Vec::new());
    for name in &kind.averaged {
        let k = kind.names.iter().position(|p| p == name).expect("averaged classes are outputs");
        match classes[k].auroc.auroc {
            Some(_) => used.push(k),
            None => missing.push(name.clone()),
        }
    }
    let mean = (!used.is_empty()).then(|| {
        used.iter().map(|&k| classes[k].auroc.auroc.expect("used classes have one")).sum::<f64>() / used.len() as f64
    });
    let interval = if used.is_empty() {
        None
    } else {
        let cols: Vec<ClassColumn> = used.iter().map(|&k| column(k)).collect();
        bootstrap_interval(&cols, boot.resamples, boot.level, boot.seed)?
    };
    let filtered =
        FilteredAverage { classes: used.iter().map(|&k| kind.names[k].clone()).collect(), missing, mean, interval };
    Ok(ClassifyReport { images: scores.len(), classes, filtered, bootstrap: boot, xrv: kind.is_xrv() })
}

fn interval_json(i: Option<(f64, f64)>) -> Value {
    i.map_or(Value::Null, |(lo, hi)| json!([lo, hi]))
}

impl ClassifyReport {
    pub fn to_json(&self) -> Value {
        let classes: Vec<Value> = self
            .classes
            .iter()
            .map(|c| {
                json!({"class": c.name, "auroc": c.auroc.auroc, "n_pos": c.auroc.n_pos, "n_neg": c.auroc.n_neg,
                    "interval": interval_json(c.interval)})
            })
            .collect();
        let f = &self.filtered;
        json!({
            "images": self.images,
            "classes": classes,
            (if self.xrv { "filtered_average" } else { "average" }): {"auroc": f.mean, "interval": interval_json(f.interval), "classes": f.classes,
                "missing": f.missing},
            "bootstrap": {"resamples": self.bootstrap.resamples, "level": self.bootstrap.level, "seed": self.bootstrap.seed},
        })
    }

    /// The table: classes with an AUROC, then one line for those skipped and why.
    pub fn render_table(&self) -> String {
        let pct = (self.bootstrap.level * 100.0).round();
        let mut out = format!("{:<28} {:>6} {:>6}  {:>6}  {pct}% interval\n", "class", "n_pos", "n_neg", "AUROC");
        let ci = |i: Option<(f64, f64)>| i.map_or("—".to_string(), |(lo, hi)| format!("[{lo:.4}, {hi:.4}]"));
        let (mut unlabelled, mut one_class) = (Vec::new(), Vec::new());
        for c in &self.classes {
            let (p, n) = (c.auroc.n_pos, c.auroc.n_neg);
            match c.auroc.auroc {
                Some(a) => out += &format!("{:<28} {p:>6} {n:>6}  {a:>6.4}  {}\n", c.name, ci(c.interval)),
                None if p + n == 0 => unlabelled.push(c.name.as_str()),
                None => one_class.push(format!("{} ({p} positive, {n} negative)", c.name)),
            }
        }
        let label = if self.xrv { "filtered average" } else { "average" };
        let f = &self.filtered;
        match f.mean {
            Some(m) => {
                out += &format!("{label} ({}): {m:.4} {}\n", f.classes.join(", "), ci(f.interval));
                if !f.missing.is_empty() {
                    out += &format!("  (without {}: no AUROC)\n", f.missing.join(", "));
                }
            }
            None => out += &format!("{label}: none of its classes has an AUROC\n"),
        }
        if !one_class.is_empty() {
            out += &format!("skipped, one class of label only: {}\n", one_class.join(", "));
        }
        if !unlabelled.is_empty() {
            out += &format!("skipped, no labels: {}\n", unlabelled.join(", "));
        }
        out
    }
}
