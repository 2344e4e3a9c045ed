//! `roentgen eval classify`, the paper's Table 3: a pretrained chest X-ray classifier
//! (TorchXRayVision's DenseNet-121 `densenet121-res224-all`, with its classifier head) scores real or
//! generated images, and each finding's AUROC against the labels of the reports says how much of
//! the finding the images show.
//!
//! The chain, each link tested against its reference (tests/classify.rs):
//! - images and their labels from a manifest (`labels` of `prepare mimic` or `phantom` rows) or a
//!   folder of PNGs with a `labels` text chunk (`roentgen phantom` writes one);
//! - labels to XRV's 18 targets (`labels::row_targets`, XRV's policy by default);
//! - the paper's preprocessing (`densenet::paper_preprocess`) and the classifier's scores: sigmoid
//!   and XRV's `op_norm` with the model's operating points (a monotone map per class, so it changes
//!   no AUROC; it makes the scores those torchxrayvision prints);
//! - per-class AUROC (sklearn's, ties one half) with n_pos/n_neg, a bootstrap interval over images,
//!   and the paper's filtered average over Atelectasis, Cardiomegaly, Edema, Effusion and
//!   Pneumothorax (the classes whose AUROC on the real test set was above 0.75), with its own
//!   interval from the same draws.

use super::auroc::{bootstrap_interval, class_auroc, ClassAuroc, ClassColumn};
use super::densenet::{op_norm_score, paper_preprocess, DenseNet, Square, INPUT_SIZE, OP_THRESHS_ALL};
use super::features::{load_image, Image};
use super::labels::{row_targets, LabelPolicy, XRV_PATHOLOGIES};
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

/// One image and its targets, one per XRV output.
#[derive(Clone, Debug)]
pub struct LabelledImage {
    pub path: PathBuf,
    pub targets: [Option<bool>; 18],
}

/// The rows of a manifest, each with its `labels` turned into targets under `policy`. A row
/// without labels, or with labels that do not read, is an error naming the manifest's line.
pub fn items_from_manifest(manifest: &Path, base: Option<&Path>, policy: LabelPolicy) -> Result<Vec<LabelledImage>> {
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
            let targets = row_targets(labels, policy).with_context(at)?;
            Ok(LabelledImage { path: row.image, targets })
        })
        .collect()
}

/// The PNGs of a folder, each with the targets of its `labels` text chunk (JSON, as `roentgen
/// phantom` writes it). An image without one is an error naming it.
pub fn items_from_folder(dir: &Path, policy: LabelPolicy) -> Result<Vec<LabelledImage>> {
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
            let targets = row_targets(&labels, policy).with_context(|| path.display().to_string())?;
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

/// The classifier's scores of each image (18 per image, XRV's order), and the images whose level
/// range looks wrong for XRV's normalisation.
pub fn score_images(net: &mut DenseNet, paths: &[PathBuf], square: Square) -> Result<(Vec<Vec<f32>>, Vec<PathBuf>)> {
    let bar = crate::diag::progress_bar(paths.len() as u64, "images", "classifying");
    let (mut scores, mut low) = (Vec::with_capacity(paths.len()), Vec::new());
    for chunk in paths.chunks(CLASSIFY_BATCH) {
        let loaded = chunk
            .par_iter()
            .map(|p| {
                let img = load_image(p)?;
                let x = paper_preprocess(&img.pixels, img.height, img.width, img.channels, square, INPUT_SIZE);
                Ok((x, low_range(&img)))
            })
            .collect::<Result<Vec<_>>>()?;
        low.extend(chunk.iter().zip(&loaded).filter(|(_, (_, l))| *l).map(|(p, _)| p.clone()));
        let inputs: Vec<_> = loaded.into_iter().map(|(x, _)| x).collect();
        let features = net.forward(&inputs).with_context(|| format!("classifying {} images", chunk.len()))?;
        for (p, logits) in chunk.iter().zip(net.logits(&features)?) {
            if logits.len() != OP_THRESHS_ALL.len() {
                bail!(
                    "the classifier has {} outputs; eval classify reads TorchXRayVision's 18 (densenet121-res224-all)",
                    logits.len()
                );
            }
            if logits.iter().any(|v| !v.is_finite()) {
                bail!("{}: the classifier's logits are not finite", p.display());
            }
            scores.push(logits.iter().zip(OP_THRESHS_ALL).map(|(&l, t)| op_norm_score(l, t)).collect());
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok((scores, low))
}

/// One class's line of the report.
#[derive(Clone, Debug)]
pub struct ClassLine {
    pub name: &'static str,
    pub auroc: ClassAuroc,
    pub interval: Option<(f64, f64)>,
}

/// The filtered average: the mean AUROC over those of [`FILTERED_CLASSES`] that have one.
#[derive(Clone, Debug)]
pub struct FilteredAverage {
    pub classes: Vec<&'static str>,
    /// Filtered classes without an AUROC (no labels, or one class only), left out of the mean.
    pub missing: Vec<&'static str>,
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
}

/// Per-class AUROCs of `scores` (one row of 18 per image) against `targets`, with intervals.
pub fn report(scores: &[Vec<f32>], targets: &[[Option<bool>; 18]], boot: BootstrapOptions) -> Result<ClassifyReport> {
    if scores.len() != targets.len() {
        bail!("{} images scored but {} labelled", scores.len(), targets.len());
    }
    let columns: Vec<(Vec<f32>, Vec<Option<bool>>)> = (0..XRV_PATHOLOGIES.len())
        .map(|k| (scores.iter().map(|s| s[k]).collect(), targets.iter().map(|t| t[k]).collect()))
        .collect();
    let column = |k: usize| -> ClassColumn { (&columns[k].0, &columns[k].1) };
    let mut classes = Vec::with_capacity(XRV_PATHOLOGIES.len());
    for (k, name) in XRV_PATHOLOGIES.iter().enumerate() {
        let auroc = class_auroc(&columns[k].0, &columns[k].1)?;
        let interval = match auroc.auroc {
            Some(_) => bootstrap_interval(&[column(k)], boot.resamples, boot.level, boot.seed)?,
            None => None,
        };
        classes.push(ClassLine { name, auroc, interval });
    }
    let (mut used, mut missing) = (Vec::new(), Vec::new());
    for name in FILTERED_CLASSES {
        let k = XRV_PATHOLOGIES.iter().position(|p| *p == name).expect("filtered classes are XRV outputs");
        match classes[k].auroc.auroc {
            Some(_) => used.push(k),
            None => missing.push(name),
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
        FilteredAverage { classes: used.iter().map(|&k| XRV_PATHOLOGIES[k]).collect(), missing, mean, interval };
    Ok(ClassifyReport { images: scores.len(), classes, filtered, bootstrap: boot })
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
            "filtered_average": {"auroc": f.mean, "interval": interval_json(f.interval), "classes": f.classes,
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
                None if p + n == 0 => unlabelled.push(c.name),
                None => one_class.push(format!("{} ({p} positive, {n} negative)", c.name)),
            }
        }
        let f = &self.filtered;
        match f.mean {
            Some(m) => {
                out += &format!("filtered average ({}): {m:.4} {}\n", f.classes.join(", "), ci(f.interval));
                if !f.missing.is_empty() {
                    out += &format!("  (without {}: no AUROC)\n", f.missing.join(", "));
                }
            }
            None => out += "filtered average: none of its classes has an AUROC\n",
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
