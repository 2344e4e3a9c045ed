//! `roentgen train-classifier`: its arguments and what it prints (the training is
//! `roentgen::train::classifier`).

use anyhow::{bail, Result};
use clap::Args;
use roentgen::eval::densenet::Square;
use roentgen::eval::labels::{is_phantom, LabelPolicy, PHANTOM_FINDINGS, TABLE5_LABELS};
use roentgen::io::manifest::read_manifest_rows;
use roentgen::train::classifier::{train_classifier, Arch, ClassifierOptions};
use std::path::PathBuf;

pub const TRAIN_CLASSIFIER_HELP: &str = "\
The paper's Table 5 classifier: AdamW (lr 1e-3, weight decay 1e-5), a cyclic learning rate
(torch's CyclicLR, triangular, from --lr-base to --lr over --cycle-steps steps and back), masked
BCE over the known labels, early stopping when the validation AUROC (macro over the labels with
both classes) has not improved for --patience epochs, the best epoch kept. What the paper leaves
open is an option: resolution, batch, validation split, cycle length; no augmentation (a flip
would swap the sides the labels name).

Input: the images' preprocessing is eval classify's (longer side to 512, a 512 square, XRV's
levels, --resolution); labels come from each manifest row's \"labels\" (CheXpert columns under
--label-policy, or a phantom's findings).

Output folder: best.safetensors (the best epoch's state dict under torchvision's names, with
num_batches_tracked and metadata naming the labels and architecture; PyTorch loads it into
torchvision.models.DenseNet with conv0 for one channel), last.safetensors and state.json (for
--resume), log.jsonl (one line per epoch: losses, AUROC per label, learning rate, seconds).
";

#[derive(Args, Debug)]
pub struct TrainClassifierArgs {
    /// Training rows: a manifest (JSONL or CSV) of images with "labels" (as `prepare mimic` and
    /// `phantom` write).
    #[arg(long)]
    pub manifest: PathBuf,
    /// Validation rows from another manifest (default: --val-fraction of --manifest, held out by
    /// a seeded draw).
    #[arg(long)]
    pub val_manifest: Option<PathBuf>,
    /// Share of --manifest held out for validation when there is no --val-manifest.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// The labels to learn, comma-separated (default: the paper's six CheXpert findings for
    /// CheXpert rows, the five phantom findings for phantom rows).
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// How CheXpert values become targets (as eval classify).
    #[arg(long, value_enum, default_value_t = LabelPolicy::Xrv)]
    pub label_policy: LabelPolicy,
    /// densenet121 (the paper's) or small (growth 12, blocks 2-2-2: quick runs).
    #[arg(long, value_enum, default_value_t = Arch::Densenet121)]
    pub arch: Arch,
    /// Input side in pixels.
    #[arg(long, default_value_t = 224)]
    pub resolution: usize,
    /// How a non-square image becomes square (as eval classify).
    #[arg(long, value_enum, default_value_t = Square::Pad)]
    pub square: Square,
    /// Images per optimizer step.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// At most this many epochs.
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    /// Stop after this many epochs without a better validation AUROC (the paper's 15).
    #[arg(long, default_value_t = 15)]
    pub patience: usize,
    /// The cyclic learning rate's peak (the paper's AdamW rate).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// The cyclic learning rate's floor.
    #[arg(long, default_value_t = 1e-4)]
    pub lr_base: f64,
    /// Optimizer steps from floor to peak (0: two epochs' worth).
    #[arg(long, default_value_t = 0)]
    pub cycle_steps: usize,
    /// AdamW's decoupled weight decay (the paper's 1e-5).
    #[arg(long, default_value_t = 1e-5)]
    pub weight_decay: f64,
    /// Seed of the initialisation, the validation split and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder (created; a folder holding a run needs --resume).
    #[arg(long)]
    pub output: PathBuf,
    /// Continue the run in --output from its last epoch.
    #[arg(long)]
    pub resume: bool,
    /// Print the run's summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(g: &super::Global, a: TrainClassifierArgs) -> Result<()> {
    let labels = if a.labels.is_empty() {
        let rows = read_manifest_rows(&a.manifest, None)?;
        match rows.iter().find_map(|r| r.labels.as_ref()) {
            Some(l) if is_phantom(l) => PHANTOM_FINDINGS.map(String::from).to_vec(),
            Some(_) => TABLE5_LABELS.map(String::from).to_vec(),
            None => bail!("{}: no row has \"labels\"", a.manifest.display()),
        }
    } else {
        a.labels.iter().map(|l| l.trim().to_string()).collect()
    };
    let o = ClassifierOptions {
        manifest: a.manifest,
        val_manifest: a.val_manifest,
        val_fraction: a.val_fraction,
        labels,
        policy: a.label_policy,
        arch: a.arch,
        resolution: a.resolution,
        square: a.square,
        batch: a.batch,
        max_epochs: a.epochs,
        patience: a.patience,
        lr: a.lr,
        lr_base: a.lr_base,
        cycle_steps: a.cycle_steps,
        weight_decay: a.weight_decay,
        seed: a.seed,
        output: a.output,
        resume: a.resume,
    };
    let mut b = super::open_backend(g)?;
    let r = train_classifier(b.as_mut(), &o)?;
    let best = r.best_auroc.map_or("none".to_string(), |x| format!("{x:.4}"));
    if a.json {
        let v = serde_json::json!({"epochs": r.epochs, "best_epoch": r.best_epoch, "best_val_auroc": r.best_auroc,
            "stopped_early": r.stopped_early, "train_rows": r.train_rows, "val_rows": r.val_rows,
            "labels": o.labels, "output": o.output.display().to_string()});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{} epochs ({}), best validation AUROC {best} at epoch {}; {} training and {} validation images; labels {}; {}",
            r.epochs,
            if r.stopped_early { "stopped early" } else { "epoch limit" },
            r.best_epoch,
            r.train_rows,
            r.val_rows,
            o.labels.join(", "),
            o.output.join("best.safetensors").display()
        );
    }
    Ok(())
}
