//! `roentgen prepare`: training and test manifests from MIMIC-CXR-JPG and the Indiana University
//! chest X-ray reports, with the RoentGen paper's filtering (Section 3, Table 1).
//!
//! Both write the JSONL manifest `roentgen train` reads, one `{"image": path, "text": prompt, ...}`
//! line per image (extra fields: ids, view, labels, token count), and a summary with Table 1's rows
//! (counts per CheXpert finding, mean/std characters and CLIP tokens of the texts, and how many
//! images each rule dropped), printed and written as JSON.
//!
//! The text rules are the paper's: the IMPRESSION section only; impressions under 7 characters
//! ("Slight", "Unchanged") and over the CLIP tokenizer's 77 tokens (BOS and EOS included, before
//! truncation) are dropped. Texts are whitespace-normalised (line breaks and runs of spaces become one
//! space) and otherwise kept verbatim, de-identification blanks ("___", "XXXX") included.

pub mod iu;
pub mod mimic;
pub mod report;

use crate::tokenizer::ClipTokenizer;
use anyhow::{Context, Result};
use clap::Subcommand;
use rayon::prelude::*;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum PrepareCommand {
    /// MIMIC-CXR-JPG (files/pXX/pSUBJECT/sSTUDY/*.jpg, the reports, the metadata/CheXpert/split CSVs)
    /// → the paper's training set (p10–p18 minus the official test studies), p19 hold-out, or the
    /// official test split.
    Mimic(mimic::MimicArgs),
    /// Indiana University chest X-ray collection (Open-I XML reports: a folder or the .tgz).
    IuXray(iu::IuArgs),
}

pub fn run(cmd: PrepareCommand) -> Result<()> {
    match cmd {
        PrepareCommand::Mimic(a) => mimic::run(a),
        PrepareCommand::IuXray(a) => iu::run(a),
    }
}

/// The paper's text filter (Section 3).
#[derive(Clone, Copy, Debug)]
pub struct TextFilter {
    /// Keep texts of at least this many characters (7: drops "Slight", "Unchanged").
    pub min_chars: usize,
    /// Keep texts of at most this many CLIP tokens, BOS and EOS included (77).
    pub max_tokens: usize,
}

/// Why a text failed [`TextFilter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextVerdict {
    Keep { chars: usize, tokens: usize },
    TooShort,
    TooManyTokens,
}

impl TextFilter {
    pub fn check(&self, text: &str, tok: &ClipTokenizer) -> TextVerdict {
        let chars = text.chars().count();
        if chars < self.min_chars {
            return TextVerdict::TooShort;
        }
        let tokens = tok.encode(text).tokens;
        if tokens > self.max_tokens {
            return TextVerdict::TooManyTokens;
        }
        TextVerdict::Keep { chars, tokens }
    }

    /// Checks many texts in parallel.
    pub fn check_all(&self, texts: &[&str], tok: &ClipTokenizer) -> Vec<TextVerdict> {
        texts.par_iter().map(|t| self.check(t, tok)).collect()
    }
}

/// Collapses every run of whitespace (line breaks included) to one space and trims.
pub fn normalize_ws(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The CheXpert findings, in Table 1's order (the CSV's column names).
pub const FINDINGS: [&str; 14] = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
];

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Count {
    pub name: String,
    pub count: usize,
}

/// Mean and standard deviation of the kept texts (Table 1's "Impression" rows).
#[derive(Serialize, Debug, Clone, Default)]
pub struct TextStats {
    pub chars_mean: f64,
    pub chars_std: f64,
    pub tokens_mean: f64,
    pub tokens_std: f64,
}

impl TextStats {
    /// Over one value per manifest row; the std is the sample std (n − 1), as pandas computes it.
    pub fn new(chars: &[usize], tokens: &[usize]) -> TextStats {
        let ms = |v: &[usize]| {
            let n = v.len() as f64;
            if v.is_empty() {
                return (0.0, 0.0);
            }
            let mean = v.iter().sum::<usize>() as f64 / n;
            let var =
                if v.len() < 2 { 0.0 } else { v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0) };
            (mean, var.sqrt())
        };
        let ((chars_mean, chars_std), (tokens_mean, tokens_std)) = (ms(chars), ms(tokens));
        TextStats { chars_mean, chars_std, tokens_mean, tokens_std }
    }
}

/// What `prepare` writes next to the manifest and prints.
#[derive(Serialize, Debug, Clone)]
pub struct Summary {
    pub dataset: String,
    pub manifest: String,
    /// The selection that was made (split, groups, views, caps, seed, ...).
    pub options: serde_json::Value,
    /// Manifest rows (images): Table 1's n.
    pub images: usize,
    /// Distinct studies (MIMIC) or reports (IU) among the rows.
    pub studies: usize,
    /// Distinct patients (MIMIC; the IU reports carry no patient id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subjects: Option<usize>,
    /// Rows positive (1.0) for each CheXpert finding, Table 1's order (MIMIC only).
    pub findings: Vec<Count>,
    pub text: TextStats,
    /// Images dropped by each rule, in the order the rules apply.
    pub dropped: Vec<Count>,
}

impl Summary {
    pub fn print(&self) {
        println!("{} → {}", self.dataset, self.manifest);
        println!("  {:<28}{:>10}", "n (images)", self.images);
        println!("  {:<28}{:>10}", "studies", self.studies);
        if let Some(n) = self.subjects {
            println!("  {:<28}{:>10}", "subjects", n);
        }
        if !self.findings.is_empty() {
            println!("  Abnormalities");
            for f in &self.findings {
                println!("    {:<26}{:>10}", f.name, f.count);
            }
        }
        println!("  Text");
        println!("    {:<26}{:>10.1}", "Mean no. char.", self.text.chars_mean);
        println!("    {:<26}{:>10.1}", "Std", self.text.chars_std);
        println!("    {:<26}{:>10.1}", "Mean no. tok.", self.text.tokens_mean);
        println!("    {:<26}{:>10.1}", "Std", self.text.tokens_std);
        println!("  Dropped (images)");
        for d in &self.dropped {
            println!("    {:<26}{:>10}", d.name, d.count);
        }
    }
}

/// One manifest line: the two fields `train` reads, then per-dataset extras.
#[derive(Serialize, Debug, Clone)]
pub struct Row {
    pub image: String,
    pub text: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Writes the manifest atomically (temporary file, then rename).
pub fn write_manifest(path: &Path, rows: &[Row]) -> Result<()> {
    let mut buf = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut buf, r)?;
        buf.push(b'\n');
    }
    write_atomic(path, &buf)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))?;
    }
    let mut name = path.file_name().with_context(|| format!("{}: not a file name", path.display()))?.to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    f.write_all(bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))
}

/// `--summary PATH`, else `<manifest without extension>.summary.json` next to the manifest.
pub fn summary_path(manifest: &Path, given: Option<&Path>) -> PathBuf {
    given.map(Path::to_path_buf).unwrap_or_else(|| {
        let stem = manifest.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        manifest.with_file_name(format!("{stem}.summary.json"))
    })
}

/// Writes manifest and summary, prints the summary (as JSON with `json`).
pub fn finish(manifest: &Path, summary_at: Option<&Path>, rows: &[Row], summary: &Summary, json: bool) -> Result<()> {
    write_manifest(manifest, rows)?;
    let sp = summary_path(manifest, summary_at);
    write_atomic(&sp, (serde_json::to_string_pretty(summary)? + "\n").as_bytes())?;
    if json {
        println!("{}", serde_json::to_string(summary)?);
    } else {
        summary.print();
        println!("wrote {} ({} rows) and {}", manifest.display(), rows.len(), sp.display());
    }
    Ok(())
}

/// Loads the CLIP tokenizer used for the 77-token rule and the token statistics.
pub fn load_tokenizer(dir: &Path) -> Result<ClipTokenizer> {
    ClipTokenizer::from_dir(dir)
        .with_context(|| format!("{}: loading the CLIP tokenizer for the 77-token rule (--tokenizer)", dir.display()))
}

/// Deterministic Fisher–Yates shuffle (SplitMix64), for the seeded caps and samples.
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = crate::rng::SplitMix64::new(seed);
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Views as ViewPosition spells them: a comma list (PA, AP, LATERAL, LL, ...) or `all` (None).
pub fn parse_views(s: &str) -> Result<Option<Vec<String>>> {
    let v: Vec<String> = s.split(',').map(|x| x.trim().to_ascii_uppercase()).filter(|x| !x.is_empty()).collect();
    if v.is_empty() {
        anyhow::bail!("--views {s:?}: give PA, AP, LATERAL, a comma list, or all");
    }
    Ok(if v.iter().any(|x| x == "ALL") { None } else { Some(v) })
}

/// The absolute form of a path (without resolving links), so manifests work from any folder.
pub fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("{}: cannot make absolute", p.display()))
}
