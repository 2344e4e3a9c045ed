//! `roentgen eval`: MS-SSIM diversity, FID with three feature networks, the phantom findings
//! measure and the classifier's AUROC — their arguments and what they print.

use super::tools::{load_text_encoder, EncoderWeights};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use roentgen::choice::value_name;
use roentgen::eval::classify;
use roentgen::eval::clip_vision::PixelNorm;
use roentgen::eval::densenet::{self, DenseNet, DenseNetConfig, Square};
use roentgen::eval::features::{list_images, FeatureKind, FeatureNet};
use roentgen::eval::fid::{cache_key, folder_features, FolderFeatures};
use roentgen::eval::frechet::{frechet_distance, stats};
use roentgen::eval::labels::LabelPolicy;
use roentgen::eval::msssim::{
    evaluate as ms_ssim_report, groups_from_folder, groups_from_manifest, WIN_SIGMA, WIN_SIZE,
};
use roentgen::eval::tensors::{Weights, WeightsFile};
use roentgen::eval::text_knn::{self, Pooling};
use roentgen::io::manifest::{read_manifest_rows, Example};
use roentgen::text::bpe::ClipTokenizer;
use roentgen::tools::phantom::eval::{evaluate as phantom_report, items_from_folder, items_from_manifest, EvalOptions};
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Intra-prompt diversity: mean MS-SSIM over all image pairs sharing a prompt (paper, Figure 3).
    MsSsim(MsSsimArgs),
    /// Fréchet distance between the feature distributions of two image folders (InceptionV3,
    /// TorchXRayVision DenseNet-121 or CLIP features; paper, Table 1). The network runs on
    /// --device; on cuda, --precision f32 gives the features that match PyTorch's (bf16 is faster
    /// and approximate).
    #[command(after_long_help = roentgen::eval::fid::weights_help())]
    Fid(FidArgs),
    /// How often generated phantoms show the finding (and side) their prompt asked for, measured
    /// with the phantom's own geometry, next to the same measure on real phantoms (issue 7).
    Phantom(EvalPhantomArgs),
    /// Per-finding AUROC of a pretrained classifier (TorchXRayVision's DenseNet-121,
    /// densenet121-res224-all) on labelled images, real or generated, with bootstrap intervals
    /// and the paper's filtered average (paper, Table 3).
    #[command(after_long_help = classify_help())]
    Classify(ClassifyArgs),
    /// How well a text encoder's embeddings group reports by finding: Precision@k of cosine
    /// nearest neighbours per finding, macro-averaged (the paper's CheXpert@10, Table 6).
    #[command(after_long_help = TEXT_KNN_HELP)]
    TextKnn(TextKnnArgs),
    /// Retrieval precision (the paper's Table 4): each query image's k most similar candidate
    /// images (by an image encoder's features) or reports (by CLIP's joint image–text
    /// embeddings, --reports); Precision@k of the same finding.
    #[command(after_long_help = roentgen::eval::fid::weights_help())]
    Retrieval(RetrievalArgs),
}

const TEXT_KNN_HELP: &str = "\
The score (the paper cites CheXpert@10 from Chambon et al. 2022 without defining it; this is the
definition implemented): each report's k nearest other reports by cosine similarity of their
embeddings; for each finding, over the reports that have it, the fraction of their neighbours that
have it too; the macro average over findings with at least two reports. A report's findings are
its CheXpert labels equal to 1, or a phantom's classes (effusion-right, ...) and their findings
(effusion, ...): findings with a side get their own average. The chance column is the finding's
share of the other reports, what random neighbours would score.

Rows with the same text and findings are counted once (a MIMIC-CXR manifest lists each report once
per image); --keep-duplicates keeps them.

Baselines: --random-init (the same architecture, PyTorch's default initialisation: an encoder that
learned nothing) and --tfidf (scikit-learn's TfidfVectorizer with its defaults; no model).
";

fn classify_help() -> String {
    format!("{CLASSIFY_HELP}{}", roentgen::io::published::help("xrv"))
}

const CLASSIFY_HELP: &str = "\
Preprocessing (the paper's): the longer side to 512 (Pillow bilinear; smaller images are enlarged),
a 512×512 square (--square), then TorchXRayVision's own: levels to [-1024, 1024], one channel (the
mean of R, G, B), 224×224 (skimage's resize). Scores are the classifier's sigmoid outputs through
XRV's op_norm with the model's operating points (as torchxrayvision prints them; AUROC is the same
either way).

Labels: a manifest row's \"labels\" object, or a PNG's \"labels\" text chunk. Two kinds are read:
  CheXpert names → 1 / 0 / -1 (blank: left out), as `prepare mimic` writes them. \"Pleural Effusion\"
    is XRV's Effusion; No Finding, Pleural Other and Support Devices have no XRV output; XRV's
    NIH-only outputs (Infiltration, Emphysema, Fibrosis, Pleural_Thickening, Nodule, Mass, Hernia)
    have no label. --label-policy xrv (the default) is TorchXRayVision's own: a No Finding study is
    negative for every finding, -1 is missing.
  a phantom's labels (`roentgen phantom`): Cardiomegaly, Effusion, Pneumothorax and Consolidation,
    each known in every image.
A class whose known labels hold one class only has no AUROC and is listed as skipped.

Weights: TorchXRayVision's densenet121-res224-all with its classifier head, as published (the
whole pickled DenseNet, read without Python and without running anything in it; its SHA-256 is
compared with the published one, a mismatch warns), or a safetensors copy (`roentgen convert`),
or a `train-classifier` checkpoint. The public file:
";

pub fn run(g: &super::Global, cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::MsSsim(a) => ms_ssim(a),
        EvalCommand::Fid(a) => fid(g, a),
        EvalCommand::Phantom(a) => phantom(a),
        EvalCommand::Classify(a) => classify(g, a),
        EvalCommand::TextKnn(a) => text_knn(g, a),
        EvalCommand::Retrieval(a) => retrieval(g, a),
    }
}

/// The images an evaluation reads, each with its prompt: a folder of PNGs or a manifest.
#[derive(Args, Debug, Clone)]
pub struct ImageSetArgs {
    /// Folder of PNGs with their prompt in the "prompt" text chunk (from `roentgen sample` or
    /// `roentgen phantom`; for classify, their labels in the "labels" chunk, as `phantom` writes).
    /// With --manifest, the folder that relative image paths resolve against.
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Manifest of (image, text) rows: JSONL {"image": path, "text": prompt} lines or a CSV with
    /// image and text columns (as `prepare` and `phantom` write and `train` reads); relative paths
    /// resolve against --images, else the manifest's folder. PNG or JPEG images. For classify,
    /// each row also needs its "labels" object (as `prepare mimic` and `phantom` write).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
}

impl ImageSetArgs {
    /// The set through `from_manifest(manifest, base)` or `from_folder(images)`.
    fn read<T>(
        &self,
        from_manifest: impl Fn(&Path, Option<&Path>) -> Result<T>,
        from_folder: impl Fn(&Path) -> Result<T>,
    ) -> Result<T> {
        match (&self.manifest, &self.images) {
            (Some(m), base) => from_manifest(m, base.as_deref()),
            (None, Some(dir)) => from_folder(dir),
            (None, None) => {
                bail!("give --images DIR (PNGs from `roentgen sample` or `roentgen phantom`) or --manifest FILE")
            }
        }
    }
}

#[derive(Args, Debug)]
pub struct MsSsimArgs {
    #[command(flatten)]
    pub set: ImageSetArgs,
    /// CLIP tokenizer for the token-length bins (a tokenizer or pipeline folder). Default: the
    /// Stable Diffusion v1 tokenizer built into roentgen (the files of weights/sd-v1-4-config/tokenizer).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Width of the token-length bins (the paper's Figure 3 uses 10).
    #[arg(long, default_value_t = 10)]
    pub bin_width: usize,
    /// Print one JSON object (overall, bins, and per prompt) instead of the table.
    #[arg(long)]
    pub json: bool,
}

fn ms_ssim(a: MsSsimArgs) -> Result<()> {
    let groups = a.set.read(groups_from_manifest, groups_from_folder)?;
    // A default path relative to the checkout would fail from any other folder: the SD v1
    // tokenizer is built into the binary instead.
    let tok = match &a.tokenizer {
        Some(t) => ClipTokenizer::from_dir(t)
            .with_context(|| format!("--tokenizer {}: loading the tokenizer for the token-length bins", t.display()))?,
        None => ClipTokenizer::sd_v1()?,
    };
    let r = ms_ssim_report(&groups, &tok, a.bin_width)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let head = format!("MS-SSIM (window {WIN_SIZE}, sigma {WIN_SIGMA}, 5 scales): {:.4} ± {:.4}", r.mean, r.std);
    println!("{head} over {} pairs of {} images, {} prompts", r.pairs, r.images, r.prompts);
    println!("{:>12}  {:>7}  {:>7}  {:>7}  {:>7}", "CLIP tokens", "prompts", "pairs", "mean", "std");
    for b in &r.bins {
        let range = format!("{}–{}", b.tokens_min, b.tokens_max);
        println!("{range:>12}  {:>7}  {:>7}  {:>7.4}  {:>7.4}", b.prompts, b.pairs, b.mean, b.std);
    }
    Ok(())
}

/// A feature network and its weights (eval fid's and eval retrieval's).
#[derive(Args, Debug)]
pub struct FeatureNetArgs {
    /// Feature network: inception (2048-d pool3), xrv (1024-d), clip (pooled, 768-d for ViT-B/32),
    /// clip-proj (projected, 512-d).
    #[arg(long)]
    pub features: FeatureKind,
    /// The network's weights (safetensors; see below for converting the public releases).
    #[arg(long)]
    pub weights: PathBuf,
    /// transformers config.json of the CLIP model, for towers other than ViT-B/32.
    #[arg(long)]
    pub clip_config: Option<PathBuf>,
    /// CLIP's pixel normalisation: openai (the released CLIP's) or cxr-repair (the chest X-ray
    /// statistics of CXR-RePaiR and CheXzero, for CLIP models fine-tuned on MIMIC-CXR).
    #[arg(long, value_enum, default_value_t = PixelNorm::Openai)]
    pub pixel_norm: PixelNorm,
}

impl FeatureNetArgs {
    fn load(&self, backend: Box<dyn roentgen::backend::Backend>) -> Result<FeatureNet> {
        let mut net = FeatureNet::load(self.features, &self.weights, self.clip_config.as_deref(), backend)?;
        net.set_pixel_norm(self.pixel_norm).context("--pixel-norm")?;
        Ok(net)
    }
}

#[derive(Args, Debug)]
pub struct FidArgs {
    /// Folder of real images (PNG 8/16-bit gray or RGB, JPEG; not recursive).
    #[arg(long)]
    pub real: PathBuf,
    /// Folder of generated images.
    #[arg(long)]
    pub fake: PathBuf,
    #[command(flatten)]
    pub net: FeatureNetArgs,
    /// Neither read nor write the per-folder feature cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Print a JSON object on stdout instead of the text line.
    #[arg(long)]
    pub json: bool,
}

fn fid(g: &super::Global, a: FidArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    // Check both folders before the (slow) work.
    let real_list = list_images(&a.real)?;
    let fake_list = list_images(&a.fake)?;
    for (dir, list) in [(&a.real, &real_list), (&a.fake, &fake_list)] {
        if list.len() < 2 {
            bail!(
                "{}: {} image; FID needs at least 2 per folder (a covariance of one sample is undefined)",
                dir.display(),
                list.len()
            );
        }
    }
    let backend = super::open_backend(g)?;
    let mut net = a.net.load(backend)?;
    let key = if a.no_cache { 0 } else { cache_key(&a.net.weights, a.net.clip_config.as_deref(), a.net.pixel_norm)? };
    let real = folder_features(&a.real, &mut net, a.net.features, key, !a.no_cache)?;
    let fake = folder_features(&a.fake, &mut net, a.net.features, key, !a.no_cache)?;
    let (d, name) = (real.dims, a.net.features.name());
    let fid = frechet_distance(&stats(&real.features, real.n, d)?, &stats(&fake.features, fake.n, d)?)?;
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let folder = |f: &FolderFeatures| {
            serde_json::json!({"dir": f.dir.display().to_string(), "images": f.n, "cached": f.reused,
                "computed": f.computed, "cache": f.cache.as_ref().map(|p| p.display().to_string())})
        };
        let v = serde_json::json!({"fid": fid, "features": name, "dims": d,
            "weights": a.net.weights.display().to_string(), "real": folder(&real), "fake": folder(&fake), "seconds": secs});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("FID {fid:.6} ({name}, {d}-d features; real: {} images, fake: {} images)", real.n, fake.n);
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct EvalPhantomArgs {
    #[command(flatten)]
    pub set: ImageSetArgs,
    /// Reference phantoms drawn per class for the measurement's own accuracy (0: none).
    #[arg(long, default_value_t = 64)]
    pub reference_count: usize,
    /// Seed of the reference phantoms.
    #[arg(long, default_value_t = 1)]
    pub reference_seed: u64,
    /// Side of the reference phantoms (default: the evaluated images' commonest width, within 32–256).
    #[arg(long)]
    pub reference_size: Option<usize>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// With --json, also list every image's prompt classes and measurement.
    #[arg(long)]
    pub per_image: bool,
}

fn phantom(a: EvalPhantomArgs) -> Result<()> {
    let items = a.set.read(items_from_manifest, items_from_folder)?;
    let report = phantom_report(
        &items,
        &EvalOptions {
            reference_count: a.reference_count,
            reference_seed: a.reference_seed,
            reference_size: a.reference_size,
        },
    )?;
    if a.json {
        println!("{}", report.to_json(a.per_image));
    } else {
        print!("{}", report.render_table());
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub set: ImageSetArgs,
    /// The classifier: TorchXRayVision's densenet121-res224-all as safetensors, with its classifier
    /// head (see below for converting the public release), or a `train-classifier` checkpoint
    /// (best.safetensors: its labels, architecture and input size come from its metadata).
    #[arg(long)]
    pub weights: PathBuf,
    /// How CheXpert labels become targets: xrv (TorchXRayVision's: No Finding negative for all,
    /// -1 missing), columns (-1 missing), u-ones (-1 positive), u-zeros (-1 negative).
    #[arg(long, value_enum, default_value_t = LabelPolicy::Xrv)]
    pub label_policy: LabelPolicy,
    /// How a non-square image becomes 512×512 after its longer side is 512: pad (torchvision's
    /// CenterCrop(512): black margins; the paper's words read literally) or crop (XRV's
    /// XRayCenterCrop: the central square). Default: pad, or what a train-classifier checkpoint
    /// was trained with.
    #[arg(long, value_enum)]
    pub square: Option<Square>,
    /// Bootstrap draws of the images for the intervals (0: no intervals).
    #[arg(long, default_value_t = 1000)]
    pub resamples: usize,
    /// The intervals' coverage.
    #[arg(long, default_value_t = 0.95)]
    pub level: f64,
    /// Seed of the bootstrap draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// With --json, also list every image's 18 scores and targets.
    #[arg(long)]
    pub per_image: bool,
}

fn classify(g: &super::Global, a: ClassifyArgs) -> Result<()> {
    if !(a.level > 0.0 && a.level < 1.0) {
        bail!("--level {}: the interval's coverage is a fraction between 0 and 1 (e.g. 0.95)", a.level);
    }
    let policy = a.label_policy;
    let file = WeightsFile::open(&a.weights).with_context(|| format!("--weights {}", a.weights.display()))?;
    let meta = file.metadata()?;
    let (kind, config, square) =
        match classify::trained_classifier(&meta).with_context(|| format!("--weights {}", a.weights.display()))? {
            Some((kind, config, trained_square)) => (kind, config, a.square.unwrap_or(trained_square)),
            None => (classify::ClassifierKind::xrv(), DenseNetConfig::densenet121(), a.square.unwrap_or(Square::Pad)),
        };
    let items = a.set.read(
        |m, base| classify::items_from_manifest(m, base, &kind, policy),
        |dir| classify::items_from_folder(dir, &kind, policy),
    )?;
    if items.len() < 2 {
        bail!("{} labelled image: an AUROC needs at least 2", items.len());
    }
    if file.is_torch() {
        roentgen::io::published::check(&a.weights, "xrv")?;
    }
    let src = file.source()?;
    let weights = Weights { src: src.as_ref(), network: densenet::NETWORK };
    let mut net = DenseNet::load(super::open_backend(g)?, &weights, config)
        .with_context(|| format!("--weights {}", a.weights.display()))?;
    let paths: Vec<PathBuf> = items.iter().map(|i| i.path.clone()).collect();
    let (scores, low) = classify::score_images(&mut net, &kind, &paths, square)?;
    if !low.is_empty() {
        let names: Vec<String> = low.iter().take(3).map(|p| p.display().to_string()).collect();
        roentgen::diag::warn(format!(
            "{} of {} images use a narrow or dark range of 8-bit levels (e.g. {}): the classifier expects 0–255 \
             radiographs; a 12-bit image stored in 16 bits reads almost black",
            low.len(),
            items.len(),
            names.join(", ")
        ));
    }
    let targets: Vec<_> = items.iter().map(|i| i.targets.clone()).collect();
    let boot = classify::BootstrapOptions { resamples: a.resamples, level: a.level, seed: a.seed };
    let report = classify::report(&kind, &scores, &targets, boot)?;
    if a.json {
        let mut v = report.to_json();
        v["weights"] = serde_json::json!(a.weights.display().to_string());
        v["label_policy"] = serde_json::json!(value_name(a.label_policy));
        v["square"] = serde_json::json!(value_name(square));
        v["narrow_range_images"] = serde_json::json!(low.len());
        if a.per_image {
            let rows: Vec<_> = items
                .iter()
                .zip(&scores)
                .map(|(i, s)| serde_json::json!({"image": i.path.display().to_string(), "scores": s, "targets": i.targets}))
                .collect();
            v["per_image"] = serde_json::json!(rows);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{} images, {} (label policy {}, square {})",
            items.len(),
            a.weights.display(),
            value_name(a.label_policy),
            value_name(square)
        );
        print!("{}", report.render_table());
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct TextKnnArgs {
    /// Reports with labels: a manifest (JSONL or CSV) whose rows have "text" and "labels" (as
    /// `prepare mimic` and `phantom` write).
    #[arg(long)]
    pub manifest: PathBuf,
    /// A pipeline folder (text_encoder/ and tokenizer/) or a text encoder folder (then --tokenizer).
    #[arg(long, required_unless_present = "tfidf")]
    pub model: Option<PathBuf>,
    /// Tokenizer folder, when --model is a text encoder folder.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The text encoder's architecture with PyTorch's default initialisation from this seed,
    /// instead of its weights (the control that learned nothing).
    #[arg(long, value_name = "SEED")]
    pub random_init: Option<u64>,
    /// TF-IDF vectors instead of a text encoder (scikit-learn's TfidfVectorizer defaults).
    #[arg(long, conflicts_with_all = ["model", "tokenizer", "random_init"])]
    pub tfidf: bool,
    /// How token states become one vector: pooled (CLIP's end-of-text token, BERT's [CLS]) or
    /// mean (over the report's tokens).
    #[arg(long, value_enum, default_value_t = Pooling::Pooled)]
    pub pooling: Pooling,
    /// Neighbours per report.
    #[arg(long, short, default_value_t = 10)]
    pub k: usize,
    /// Keep rows whose text and findings repeat an earlier row's.
    #[arg(long)]
    pub keep_duplicates: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

fn text_knn(g: &super::Global, a: TextKnnArgs) -> Result<()> {
    let rows = read_manifest_rows(&a.manifest, None)?;
    let mut texts = Vec::with_capacity(rows.len());
    let mut findings = Vec::with_capacity(rows.len());
    let mut seen = std::collections::HashSet::new();
    for row in rows {
        let at = || format!("{}:{}", a.manifest.display(), row.line);
        let Some(labels) = &row.labels else {
            bail!("{}: no labels (each row needs a \"labels\" object, as `prepare mimic` and `phantom` write)", at())
        };
        let f = text_knn::report_findings(labels).with_context(at)?;
        if a.keep_duplicates || seen.insert((row.text.clone(), f.clone())) {
            texts.push(row.text);
            findings.push(f);
        }
    }
    if texts.len() <= a.k {
        bail!(
            "{} distinct reports: --k {} needs more than k (or --keep-duplicates to count repeated rows)",
            texts.len(),
            a.k
        );
    }
    let (embeddings, source) = if a.tfidf {
        (text_knn::tfidf(&texts), "TF-IDF".to_string())
    } else {
        let model = a.model.as_deref().expect("clap requires --model without --tfidf");
        let mut b = super::open_backend(g)?;
        let init = match a.random_init {
            Some(seed) => EncoderWeights::DefaultInit(seed),
            None => EncoderWeights::File(None),
        };
        let (encoder, tok) = load_text_encoder(b.as_mut(), model, a.tokenizer.as_deref(), init)?;
        let e = text_knn::embed_texts(b.as_mut(), &encoder, &tok, &texts, a.pooling)?;
        let what = match a.random_init {
            Some(seed) => format!("{} (default initialisation, seed {seed})", model.display()),
            None => model.display().to_string(),
        };
        (e, format!("{what}, pooling {}", value_name(a.pooling)))
    };
    let report = text_knn::knn_precision(&embeddings, &findings, a.k)?;
    if a.json {
        let mut v = report.to_json();
        v["embeddings"] = serde_json::json!(source);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{} reports, {source}", texts.len());
        print!("{}", report.render_table());
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct RetrievalArgs {
    /// Query images with labels (e.g. generated ones): a manifest whose rows have "labels".
    #[arg(long)]
    pub queries: PathBuf,
    /// Candidate images with labels (e.g. real ones): a manifest whose rows have "labels"
    /// (image→image retrieval).
    #[arg(long, required_unless_present = "reports", conflicts_with = "reports")]
    pub candidates: Option<PathBuf>,
    /// Candidate reports with labels: a manifest whose rows have "text" and "labels" (image→text
    /// retrieval, with --features clip-proj and a whole CLIPModel file as --weights: each tower
    /// projected into CLIP's joint space).
    #[arg(long)]
    pub reports: Option<PathBuf>,
    /// CLIP's tokenizer folder (vocab.json, merges.txt) for --reports; default: the folder of
    /// --weights (a transformers CLIP repository holds both).
    #[arg(long, requires = "reports")]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub net: FeatureNetArgs,
    /// The classes, comma-separated; only images with exactly one of them take part (default: the
    /// paper's eight CheXpert findings, or the four phantom findings for phantom rows).
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<String>,
    /// How CheXpert values become labels (as eval classify).
    #[arg(long, value_enum, default_value_t = LabelPolicy::Xrv)]
    pub label_policy: LabelPolicy,
    /// Neighbours to score, comma-separated (the paper's 5, 10, 50).
    #[arg(short, long, value_delimiter = ',', default_value = "5,10,50")]
    pub k: Vec<usize>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

fn retrieval(g: &super::Global, a: RetrievalArgs) -> Result<()> {
    use roentgen::eval::clip_text::ClipTextTower;
    use roentgen::eval::features::features_of;
    use roentgen::eval::labels::{is_phantom, named_targets};
    use roentgen::eval::retrieval::{cosine_neighbours, precision_at_k, single_class, PAPER_CLASSES, PHANTOM_CLASSES};
    if a.reports.is_some() && a.net.features != FeatureKind::ClipProj {
        bail!(
            "--reports: image→text retrieval compares CLIP's image and text embeddings in their joint space; \
             use --features clip-proj with a whole CLIPModel file as --weights"
        );
    }
    let (cand_path, to_text) = match (&a.candidates, &a.reports) {
        (Some(c), None) => (c.clone(), false),
        (None, Some(r)) => (r.clone(), true),
        _ => unreachable!("clap requires exactly one of --candidates and --reports"),
    };
    let q_rows = read_manifest_rows(&a.queries, None)?;
    let c_rows = read_manifest_rows(&cand_path, None)?;
    let classes: Vec<String> = if a.classes.is_empty() {
        match q_rows.iter().find_map(|r| r.labels.as_ref()) {
            Some(l) if is_phantom(l) => PHANTOM_CLASSES.map(String::from).to_vec(),
            _ => PAPER_CLASSES.map(String::from).to_vec(),
        }
    } else {
        a.classes.iter().map(|c| c.trim().to_string()).collect()
    };
    // The single-label rows of a manifest, with their class.
    let single = |path: &Path, rows: Vec<Example>, needs_text: bool| -> Result<Vec<(Example, usize)>> {
        let mut out = Vec::new();
        for r in rows {
            let at = || format!("{}:{}", path.display(), r.line);
            let Some(l) = &r.labels else { bail!("{}: no labels for image {}", at(), r.image.display()) };
            if let Some(c) = single_class(&named_targets(l, &classes, a.label_policy).with_context(at)?) {
                if needs_text && r.text.trim().is_empty() {
                    bail!("{}: an empty report text (each row of --reports needs a \"text\")", at());
                }
                out.push((r, c));
            }
        }
        Ok(out)
    };
    let (nq, nc) = (q_rows.len(), c_rows.len());
    let queries = single(&a.queries, q_rows, false)?;
    let candidates = single(&cand_path, c_rows, to_text)?;
    let (what, direction) = if to_text { ("reports", "image→text") } else { ("candidates", "image→image") };
    roentgen::diag::progress(format!(
        "{} of {nq} queries and {} of {nc} {what} have exactly one of {}",
        queries.len(),
        candidates.len(),
        classes.join(", ")
    ));
    let paths = |v: &[(Example, usize)]| v.iter().map(|(r, _)| r.image.clone()).collect::<Vec<_>>();
    // The text tower first, on a backend of its own, given back before the image tower loads.
    let candidate_features = if to_text {
        let mut b = super::open_backend(g)?;
        let tok_dir = match &a.tokenizer {
            Some(t) => t.clone(),
            None => a.net.weights.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf),
        };
        let tower = ClipTextTower::load(b.as_mut(), &a.net.weights, a.net.clip_config.as_deref(), &tok_dir)?;
        let texts: Vec<String> = candidates.iter().map(|(r, _)| r.text.clone()).collect();
        Some(tower.embed(b.as_mut(), &texts)?)
    } else {
        None
    };
    let backend = super::open_backend(g)?;
    let mut net = a.net.load(backend)?;
    let qf = features_of(&mut net, &paths(&queries))?;
    let cf = match candidate_features {
        Some(t) => t,
        None => features_of(&mut net, &paths(&candidates))?,
    };
    if qf.first().map(Vec::len) != cf.first().map(Vec::len) {
        bail!(
            "the image embedding has {} dimensions and the text embedding {}: not one CLIP model's towers",
            qf.first().map_or(0, Vec::len),
            cf.first().map_or(0, Vec::len)
        );
    }
    let kmax = a.k.iter().copied().max().unwrap_or(0);
    let neighbours = cosine_neighbours(&qf, &cf, kmax, false);
    let class_of = |v: &[(Example, usize)]| v.iter().map(|(_, c)| *c).collect::<Vec<_>>();
    let report = precision_at_k(&classes, &class_of(&queries), &class_of(&candidates), &neighbours, &a.k)?;
    if a.json {
        let mut v = report.to_json();
        v["features"] = serde_json::json!(a.net.features.name());
        v["direction"] = serde_json::json!(direction);
        v["pixel_norm"] = serde_json::json!(value_name(a.net.pixel_norm));
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{direction} retrieval, {} features: {} queries, {} {what}",
            a.net.features.name(),
            queries.len(),
            candidates.len()
        );
        print!("{}", report.render_table());
    }
    Ok(())
}
