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

use crate::text::bpe::ClipTokenizer;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// The paper's text filter (Section 3).
#[derive(Clone, Copy, Debug)]
pub struct TextFilter {
    /// Keep texts of at least this many characters (7: drops "Slight", "Unchanged").
    pub min_chars: usize,
    /// Keep texts of at most this many CLIP tokens, BOS and EOS included (77).
    pub max_tokens: usize,
}

/// What every prepare job shares: the text rule, the tokenizer that counts its tokens, and where
/// the summary goes.
#[derive(Clone, Debug)]
pub struct TextOptions {
    /// The paper's text filter (7 characters, 77 CLIP tokens).
    pub filter: TextFilter,
    /// CLIP tokenizer (a tokenizer or pipeline folder) of the token rule. Default: the Stable
    /// Diffusion v1 tokenizer built into roentgen (the files of weights/sd-v1-4-config/tokenizer).
    pub tokenizer: Option<PathBuf>,
    /// Where to write the summary JSON (default: <manifest stem>.summary.json beside the manifest).
    pub summary: Option<PathBuf>,
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
    /// The summary as the table `roentgen prepare` prints (Table 1's rows).
    pub fn render(&self) -> String {
        let mut s = format!("{} → {}\n", self.dataset, self.manifest);
        s += &format!("  {:<28}{:>10}\n", "n (images)", self.images);
        s += &format!("  {:<28}{:>10}\n", "studies", self.studies);
        if let Some(n) = self.subjects {
            s += &format!("  {:<28}{:>10}\n", "subjects", n);
        }
        if !self.findings.is_empty() {
            s += "  Abnormalities\n";
            for f in &self.findings {
                s += &format!("    {:<26}{:>10}\n", f.name, f.count);
            }
        }
        s += "  Text\n";
        s += &format!("    {:<26}{:>10.1}\n", "Mean no. char.", self.text.chars_mean);
        s += &format!("    {:<26}{:>10.1}\n", "Std", self.text.chars_std);
        s += &format!("    {:<26}{:>10.1}\n", "Mean no. tok.", self.text.tokens_mean);
        s += &format!("    {:<26}{:>10.1}\n", "Std", self.text.tokens_std);
        s += "  Dropped (images)\n";
        for d in &self.dropped {
            s += &format!("    {:<26}{:>10}\n", d.name, d.count);
        }
        s
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

/// Writes `bytes` atomically (`files::write_atomic`: an exclusive temporary beside `path`, synced,
/// renamed over it), creating the folder first.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))?;
    }
    crate::io::files::write_bytes_atomic(path, bytes)
}

/// `--summary PATH`, else `<manifest without extension>.summary.json` next to the manifest.
pub fn summary_path(manifest: &Path, given: Option<&Path>) -> PathBuf {
    given.map(Path::to_path_buf).unwrap_or_else(|| {
        let stem = manifest.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        manifest.with_file_name(format!("{stem}.summary.json"))
    })
}

/// Where the manifest and the summary go, checked before any work (see [`plan_outputs`]).
#[derive(Debug, Clone)]
pub struct Outputs {
    pub manifest: PathBuf,
    pub summary: PathBuf,
}

/// The path a file is reached by: symbolic links and `..` resolved through the part that exists,
/// the rest appended lexically. Two outputs with the same key would overwrite each other.
fn resolved(p: &Path) -> Result<PathBuf> {
    let abs = absolute(p)?;
    let mut rest = Vec::new();
    let mut base = abs.as_path();
    loop {
        if let Ok(mut out) = base.canonicalize() {
            for part in rest.iter().rev() {
                match part {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    c => out.push(c.as_os_str()),
                }
            }
            return Ok(out);
        }
        match (base.components().next_back(), base.parent()) {
            (Some(last), Some(parent)) => {
                rest.push(last);
                base = parent;
            }
            _ => return Ok(abs),
        }
    }
}

/// Whether two paths are one file: by device and inode when both exist (hard links included),
/// else by their resolved paths.
fn same_file(a: &Path, ka: &Path, b: &Path, kb: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return (ma.dev(), ma.ino()) == (mb.dev(), mb.ino());
        }
    }
    ka == kb
}

/// Checks one output before any work: it has a file name, what exists at the path is a regular
/// file (a folder, device, FIFO or socket is never replaced), and the nearest existing folder
/// above it is a folder. Returns the path to write: a symbolic link to a regular file is written
/// through, so the link stays and its target is replaced.
fn check_output(flag: &str, p: &Path) -> Result<PathBuf> {
    let text = p.as_os_str().to_string_lossy();
    if p.file_name().is_none() || text.ends_with('/') || text.ends_with("/.") {
        bail!("{flag} {}: not a file name", p.display());
    }
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => bail!("{flag} {}: is a folder; give a file path", p.display()),
        Ok(m) if !m.is_file() => bail!(
            "{flag} {}: exists and is not a regular file ({}); refusing to replace it",
            p.display(),
            crate::io::files::kind_of(&m)
        ),
        _ => {}
    }
    let key = resolved(p)?;
    let mut up = key.parent();
    while let Some(d) = up {
        if let Ok(m) = std::fs::metadata(d) {
            if !m.is_dir() {
                bail!("{flag} {}: {} is not a folder", p.display(), d.display());
            }
            break;
        }
        up = d.parent();
    }
    Ok(key)
}

/// The manifest (`--out`) and summary (`--summary`, or its default beside the manifest) paths,
/// checked before any work: each as [`check_output`], the two not the same file (the summary would
/// silently replace the manifest), and neither one of the input files (`inputs`: flag and path),
/// which the rename would destroy.
pub fn plan_outputs(out: &Path, summary: Option<&Path>, inputs: &[(&str, &Path)]) -> Result<Outputs> {
    let sp = summary_path(out, summary);
    let sflag = if summary.is_some() { "$summary" } else { "the summary (default: beside $out)" };
    let manifest = check_output("$out", out)?;
    let summary_key = check_output(sflag, &sp)?;
    if same_file(out, &manifest, &sp, &summary_key) {
        bail!(
            "{sflag} {} and $out {} are the same file: the summary would replace the manifest",
            sp.display(),
            out.display()
        );
    }
    for (flag, input) in inputs {
        if !input.is_file() {
            continue;
        }
        let key = resolved(input)?;
        for (oflag, o, ok) in [("$out", out, &manifest), (sflag, sp.as_path(), &summary_key)] {
            if same_file(o, ok, input, &key) {
                bail!(
                    "{oflag} {} is the input {flag} {}: refusing to overwrite an input",
                    o.display(),
                    input.display()
                );
            }
        }
    }
    Ok(Outputs { manifest, summary: summary_key })
}

/// What a `prepare` run wrote.
pub struct Prepared {
    pub summary: Summary,
    /// The manifest file and its number of rows.
    pub manifest: PathBuf,
    pub rows: usize,
    /// The summary file (JSON).
    pub summary_file: PathBuf,
}

/// Writes manifest and summary.
pub fn finish(out: &Outputs, rows: &[Row], summary: Summary) -> Result<Prepared> {
    write_manifest(&out.manifest, rows)?;
    write_atomic(&out.summary, (serde_json::to_string_pretty(&summary)? + "\n").as_bytes())?;
    Ok(Prepared { summary, manifest: out.manifest.clone(), rows: rows.len(), summary_file: out.summary.clone() })
}

/// The error for a selection that kept nothing: an empty manifest with exit 0 hides a wrong path or
/// filter, so nothing is written and the message gives every rule's count (name, images removed,
/// the flag that sets it) and names the last rule that removed any: the one that emptied it.
pub fn nothing_left(listed: &str, rules: &[(&str, usize, String)]) -> anyhow::Error {
    let counts: Vec<String> = rules
        .iter()
        .map(|(name, n, flag)| if flag.is_empty() { format!("{name} {n}") } else { format!("{name} ({flag}) {n}") })
        .collect();
    let blame = match rules.iter().rev().find(|(_, n, _)| *n > 0) {
        Some((name, _, flag)) if !flag.is_empty() => format!("; the last were removed by {name} ({flag})"),
        Some((name, _, _)) => format!("; the last were removed by {name}"),
        None => String::new(),
    };
    anyhow::anyhow!("no images left, nothing written: of {listed}, removed by each rule: {}{blame}", counts.join(", "))
}

/// Checks that an id from the data is one plain file-name component before it becomes part of a
/// path: not empty, `.` or `..`, and without path separators or control characters, so a crafted
/// or corrupt id (`../../etc/passwd`, `/abs`) can never point a manifest row outside its folder.
pub fn check_component(s: &str) -> std::result::Result<(), &'static str> {
    if s.is_empty() {
        return Err("is empty");
    }
    if s == "." || s == ".." {
        return Err("is a relative folder name");
    }
    if s.contains(['/', '\\']) {
        return Err("contains a path separator");
    }
    if s.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    Ok(())
}

/// Loads the CLIP tokenizer used for the 77-token rule and the token statistics: `--tokenizer`
/// when given, else the SD v1 tokenizer built into the binary.
pub fn load_tokenizer(dir: Option<&Path>) -> Result<ClipTokenizer> {
    match dir {
        Some(d) => ClipTokenizer::from_dir(d)
            .with_context(|| format!("$tokenizer {}: loading the CLIP tokenizer for the 77-token rule", d.display())),
        None => ClipTokenizer::sd_v1(),
    }
}

/// How the summary records the tokenizer.
pub fn tokenizer_name(dir: Option<&Path>) -> String {
    dir.map_or(crate::text::bpe::BUILTIN_SD_V1.to_string(), |d| d.display().to_string())
}

/// A path given by `flag` that must exist (as a folder when `folder`): a typo is an error naming
/// the flag, not an empty manifest. Returns its absolute form.
pub fn existing(flag: &str, p: &Path, folder: bool) -> Result<PathBuf> {
    match std::fs::metadata(p) {
        Err(_) => bail!("{flag} {}: no such {}", p.display(), if folder { "folder" } else { "file or folder" }),
        Ok(m) if folder && !m.is_dir() => bail!("{flag} {}: not a folder", p.display()),
        Ok(_) => absolute(p),
    }
}

/// ViewPosition values of MIMIC-CXR's metadata (the MIMIC-CXR-JPG documentation's list).
pub const KNOWN_VIEWS: [&str; 14] = [
    "PA",
    "AP",
    "LATERAL",
    "LL",
    "AP AXIAL",
    "AP LLD",
    "AP RLD",
    "PA LLD",
    "PA RLD",
    "LAO",
    "RAO",
    "LPO",
    "SWIMMERS",
    "XTABLE LATERAL",
];

/// Refuses `--views` values that are neither a known ViewPosition nor present in this metadata
/// (`present`: value → images), listing what the metadata has: a misspelt view would otherwise
/// filter every image away.
pub fn check_views(arg: &str, views: &[String], present: &BTreeMap<String, usize>) -> Result<()> {
    for v in views {
        let known = KNOWN_VIEWS.iter().any(|k| k.eq_ignore_ascii_case(v));
        if !known && !present.keys().any(|p| p.eq_ignore_ascii_case(v)) {
            let have: Vec<String> =
                present.iter().map(|(k, n)| format!("{} ({n})", if k.is_empty() { "<empty>" } else { k })).collect();
            bail!(
                "$views {arg}: unknown view {v:?}; the metadata has {}; known ViewPositions: {}, or all",
                have.join(", "),
                KNOWN_VIEWS.join(", ")
            );
        }
    }
    Ok(())
}

/// Deterministic Fisher–Yates shuffle (SplitMix64), for the seeded caps and samples.
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = crate::rng::splitmix::SplitMix64::new(seed);
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Views as ViewPosition spells them: a comma list (PA, AP, LATERAL, LL, ...) or `all` (None).
pub fn parse_views(s: &str) -> Result<Option<Vec<String>>> {
    let v: Vec<String> = s.split(',').map(|x| x.trim().to_ascii_uppercase()).filter(|x| !x.is_empty()).collect();
    if v.is_empty() {
        anyhow::bail!("$views {s:?}: give PA, AP, LATERAL, a comma list, or all");
    }
    Ok(if v.iter().any(|x| x == "ALL") { None } else { Some(v) })
}

/// The absolute form of a path (without resolving links), so manifests work from any folder.
pub fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("{}: cannot make absolute", p.display()))
}
