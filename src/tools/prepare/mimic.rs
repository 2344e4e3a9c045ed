//! `roentgen prepare mimic`: the paper's MIMIC-CXR-JPG training and test sets (Section 3, Table 1).
//!
//! The rules, in the order they apply (each drop is counted, in images, in the summary):
//! 1. split: `train` is subject groups p10–p18 minus the official test split ("Nine subgroups (P10-P18,
//!    excluding the studies used in the official MIMIC-CXR test set)"; the official validate split
//!    stays in), `p19` is the hold-out group p19 (whatever its official split), `test` is the official
//!    test split of every group. `--groups` narrows or replaces the groups (e.g. `p10` alone);
//! 2. view: the image's ViewPosition in the metadata CSV, `--views PA` (default), `AP`, `LATERAL`, a
//!    comma list, or `all` (no view filter);
//! 3. the JPEG must exist under `files/` (partial downloads are fine: what is absent is counted);
//! 4. the study's report must exist and have an IMPRESSION section (see [`super::report`]);
//! 5. the impression must have ≥ 7 characters and ≤ 77 CLIP tokens;
//! 6. `--cap-no-finding N` keeps N of the studies labelled "No Finding" = 1.0 by CheXpert, chosen by a
//!    seeded shuffle (`--seed`), with all their selected images (the paper caps "No finding" reports);
//! 7. `--sample N` keeps a seeded random N images (the paper's p19 test set has 5,000).
//!
//! Rows are one per image, ordered by subject, study and DICOM id; a study with several selected
//! views appears once per image with the same text.

use super::{report, Count, Row, Summary, TextOptions, TextStats, TextVerdict, FINDINGS};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// What to read and keep.
#[derive(Clone, Debug)]
pub struct MimicOptions {
    /// MIMIC-CXR-JPG root: files/pXX/pSUBJECT/sSTUDY/DICOM.jpg and mimic-cxr-2.0.0-metadata.csv,
    /// -chexpert.csv, -split.csv (or .csv.gz).
    pub root: PathBuf,
    /// Where the reports are, as files/pXX/pSUBJECT/sSTUDY.txt (MIMIC-CXR's mimic-cxr-reports.zip
    /// unpacked). Default: $root.
    pub reports: Option<PathBuf>,
    /// The JSONL manifest to write.
    pub out: PathBuf,
    /// train: p10–p18 minus the official test split; p19: the hold-out group; test: the official test split.
    pub split: Split,
    /// Subject groups, e.g. "p10" or "p10,p11" (default: p10–p18 for train, p19 for p19, all for test).
    pub groups: Option<String>,
    /// ViewPosition(s) to keep: PA, AP, LATERAL, a comma list, or all.
    pub views: String,
    /// Keep at most N studies labelled "No Finding" (seeded choice).
    pub cap_no_finding: Option<usize>,
    /// Keep a seeded random sample of N ≥ 1 images at the end (e.g. 5000 for the paper's p19 test set).
    pub sample: Option<usize>,
    /// Seed of the No-Finding cap and the sample.
    pub seed: u64,
    /// The text rule, its tokenizer and the summary file.
    pub text: TextOptions,
}

word_enum!(
    /// Which part of MIMIC-CXR to prepare.
    pub enum Split("split") { Train = "train", P19 = "p19", Test = "test" }
);

/// Opens `<root>/<base>.csv` or `<root>/<base>.csv.gz`.
fn open_csv(root: &Path, base: &str) -> Result<(PathBuf, csv::Reader<Box<dyn Read>>)> {
    for name in [format!("{base}.csv"), format!("{base}.csv.gz")] {
        let p = root.join(&name);
        if p.is_file() {
            let f = std::fs::File::open(&p).with_context(|| format!("{}: cannot open", p.display()))?;
            let r: Box<dyn Read> = if name.ends_with(".gz") {
                Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)))
            } else {
                Box::new(std::io::BufReader::new(f))
            };
            return Ok((p, csv::Reader::from_reader(r)));
        }
    }
    bail!("{}: missing {base}.csv (or .csv.gz)", root.display())
}

/// Reads a CSV into rows of the named columns, with errors naming the file, line and column.
fn read_columns(root: &Path, base: &str, cols: &[&str]) -> Result<(PathBuf, Vec<Vec<String>>)> {
    let (path, mut rdr) = open_csv(root, base)?;
    let headers = rdr.headers().with_context(|| format!("{}: cannot read the header", path.display()))?.clone();
    let idx: Vec<usize> = cols
        .iter()
        .map(|c| headers.iter().position(|h| h == *c).with_context(|| format!("{}: no column {c:?}", path.display())))
        .collect::<Result<_>>()?;
    let mut rows = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: line {}: malformed CSV", path.display(), i + 2))?;
        rows.push(idx.iter().map(|&j| rec.get(j).unwrap_or("").trim().to_string()).collect());
    }
    Ok((path, rows))
}

/// A CheXpert cell: 1.0 positive, 0.0 negative, −1.0 uncertain, empty not mentioned.
fn label(v: &str, path: &Path, line: usize, col: &str) -> Result<Option<f32>> {
    if v.is_empty() {
        return Ok(None);
    }
    match v.parse::<f32>() {
        Ok(x) if x == 1.0 || x == 0.0 || x == -1.0 => Ok(Some(x)),
        _ => bail!("{}: line {line}: column {col:?}: {v:?} is not 1.0, 0.0, -1.0 or empty", path.display()),
    }
}

struct Image {
    dicom: String,
    subject: String,
    study: String,
    view: String,
    group: String,
}

/// What became of a study's report.
enum StudyText {
    MissingReport,
    NoImpression,
    Filtered(TextVerdict),
    Kept { text: String, chars: usize, tokens: usize },
}

/// MIMIC-CXR's subject groups: the first two digits of the subject id.
const GROUPS: std::ops::RangeInclusive<u32> = 10..=19;

/// `--groups`: a comma list of p10…p19; anything else is refused with the valid names (a typo
/// would otherwise select nothing).
fn parse_groups(s: &str) -> Result<BTreeSet<String>> {
    let valid: Vec<String> = GROUPS.map(|i| format!("p{i}")).collect();
    let g: BTreeSet<String> = s.split(',').map(|x| x.trim().to_ascii_lowercase()).filter(|x| !x.is_empty()).collect();
    if g.is_empty() {
        bail!("$groups {s:?}: give one or more of {}", valid.join(", "));
    }
    if let Some(bad) = g.iter().find(|x| !valid.contains(x)) {
        bail!("$groups {s}: unknown subject group {bad:?}; MIMIC-CXR has {}", valid.join(", "));
    }
    Ok(g)
}

/// Where the official files live under `root`, for the output-is-an-input check.
fn input_files(root: &Path) -> Vec<PathBuf> {
    ["metadata", "split", "chexpert"]
        .iter()
        .flat_map(|b| ["csv", "csv.gz"].map(|x| root.join(format!("mimic-cxr-2.0.0-{b}.{x}"))))
        .collect()
}

pub fn run(a: MimicOptions) -> Result<super::Prepared> {
    // Every check on the arguments comes before any reading, so a typo costs nothing.
    let root = super::existing("$root", &a.root, true)?;
    let reports = match a.reports.as_deref() {
        Some(r) => {
            let r = super::existing("$reports", r, true)?;
            if !r.join("files").is_dir() {
                bail!(
                    "$reports {}: no files/ folder in it (expected files/pXX/pSUBJECT/sSTUDY.txt, as \
                     mimic-cxr-reports.zip unpacks)",
                    r.display()
                );
            }
            r
        }
        None => root.clone(),
    };
    let views = super::parse_views(&a.views)?;
    let groups: Option<BTreeSet<String>> = match (&a.groups, a.split) {
        (Some(g), _) => Some(parse_groups(g)?),
        (None, Split::Train) => Some((10..=18).map(|i| format!("p{i}")).collect()),
        (None, Split::P19) => Some(["p19".to_string()].into()),
        (None, Split::Test) => None,
    };
    if a.sample == Some(0) {
        bail!("$sample 0 keeps no images; give N ≥ 1, or leave $sample out to keep all");
    }
    if let Some(t) = &a.text.tokenizer {
        super::existing("$tokenizer", t, true)?;
    }
    let inputs = input_files(&root);
    let input_flags: Vec<(&str, &Path)> = inputs.iter().map(|p| ("$root", p.as_path())).collect();
    let outputs = super::plan_outputs(&a.out, a.text.summary.as_deref(), &input_flags)?;
    let tok = super::load_tokenizer(a.text.tokenizer.as_deref())?;
    let filter = a.text.filter;

    let meta_cols = ["dicom_id", "subject_id", "study_id", "ViewPosition"];
    let (meta_path, meta) = read_columns(&root, "mimic-cxr-2.0.0-metadata", &meta_cols)?;
    let (_, split_rows) = read_columns(&root, "mimic-cxr-2.0.0-split", &["dicom_id", "split"])?;
    let official: HashMap<String, String> =
        split_rows.into_iter().map(|mut r| (r.swap_remove(0), r.swap_remove(0))).collect();
    let mut chex_cols = vec!["subject_id", "study_id"];
    chex_cols.extend_from_slice(&FINDINGS);
    let (chex_path, chex_rows) = read_columns(&root, "mimic-cxr-2.0.0-chexpert", &chex_cols)?;
    let mut labels: HashMap<(String, String), Vec<Option<f32>>> = HashMap::new();
    for (i, r) in chex_rows.iter().enumerate() {
        let v =
            FINDINGS.iter().enumerate().map(|(k, f)| label(&r[k + 2], &chex_path, i + 2, f)).collect::<Result<_>>()?;
        labels.insert((r[0].clone(), r[1].clone()), v);
    }

    let mut images = Vec::with_capacity(meta.len());
    for (i, r) in meta.into_iter().enumerate() {
        let [dicom, subject, study, view]: [String; 4] = r.try_into().expect("four columns");
        // The three ids become path components (files/pXX/pSUBJECT/sSTUDY/DICOM.jpg): digits for
        // the subject and study, a plain file name for the DICOM id, so no row points elsewhere.
        let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
        if subject.len() < 2 || !digits(&subject) || !digits(&study) {
            bail!(
                "{}: line {}: bad subject_id/study_id {subject:?}/{study:?} (expected digits)",
                meta_path.display(),
                i + 2
            );
        }
        if let Err(why) = super::check_component(&dicom) {
            bail!("{}: line {}: dicom_id {dicom:?} {why} (it names a .jpg file)", meta_path.display(), i + 2);
        }
        let group = format!("p{}", &subject[..2]);
        images.push(Image { dicom, subject, study, view, group });
    }
    if images.is_empty() {
        bail!("{}: no images listed", meta_path.display());
    }
    if let Some(v) = &views {
        let mut present = BTreeMap::new();
        for im in &images {
            *present.entry(im.view.clone()).or_insert(0) += 1;
        }
        super::check_views(&a.views, v, &present)?;
    }
    let listed = images.len();
    images.sort_by(|x, y| (&x.subject, &x.study, &x.dicom).cmp(&(&y.subject, &y.study, &y.dicom)));

    let mut dropped: Vec<(&str, usize)> = Vec::new();
    let mut count_drop = |name: &'static str, n: usize| dropped.push((name, n));
    // 1. split and groups.
    let n0 = images.len();
    images.retain(|im| {
        let in_group = groups.as_ref().map_or(true, |g| g.contains(&im.group));
        let test = official.get(&im.dicom).is_some_and(|s| s == "test");
        in_group
            && match a.split {
                Split::Train => !test,
                Split::P19 => true,
                Split::Test => test,
            }
    });
    count_drop("split", n0 - images.len());
    // 2. views.
    let n0 = images.len();
    if let Some(v) = &views {
        images.retain(|im| v.iter().any(|x| x.eq_ignore_ascii_case(&im.view)));
    }
    count_drop("view", n0 - images.len());
    // 3. the JPEG on disk.
    let path_of = |im: &Image| {
        root.join("files")
            .join(&im.group)
            .join(format!("p{}", im.subject))
            .join(format!("s{}", im.study))
            .join(format!("{}.jpg", im.dicom))
    };
    let n0 = images.len();
    let exists: Vec<bool> = images.par_iter().map(|im| path_of(im).is_file()).collect();
    let mut it = exists.iter();
    images.retain(|_| *it.next().unwrap_or(&false));
    if n0 > 0 && images.is_empty() {
        bail!(
            "{}: none of the {n0} selected images exist (expected e.g. {})",
            root.display(),
            "files/p10/p10000032/s50414267/<dicom_id>.jpg under it"
        );
    }
    count_drop("missing_image", n0 - images.len());

    // 4–5. one report per study, read and filtered in parallel.
    let mut studies: Vec<(&str, &str, &str)> =
        images.iter().map(|im| (im.subject.as_str(), im.study.as_str(), im.group.as_str())).collect();
    studies.dedup();
    let texts: HashMap<(String, String), StudyText> = studies
        .par_iter()
        .map(|&(subject, study, group)| {
            let p = reports.join("files").join(group).join(format!("p{subject}")).join(format!("s{study}.txt"));
            let t = match std::fs::read(&p) {
                Err(_) => StudyText::MissingReport,
                Ok(bytes) => match report::impression(&String::from_utf8_lossy(&bytes)) {
                    None => StudyText::NoImpression,
                    Some(text) => match filter.check(&text, &tok) {
                        TextVerdict::Keep { chars, tokens } => StudyText::Kept { text, chars, tokens },
                        v => StudyText::Filtered(v),
                    },
                },
            };
            ((subject.to_string(), study.to_string()), t)
        })
        .collect();
    let mut counts = [0usize; 4];
    images.retain(|im| {
        let k = match &texts[&(im.subject.clone(), im.study.clone())] {
            StudyText::MissingReport => 0,
            StudyText::NoImpression => 1,
            StudyText::Filtered(TextVerdict::TooShort) => 2,
            StudyText::Filtered(_) => 3,
            StudyText::Kept { .. } => return true,
        };
        counts[k] += 1;
        false
    });
    for (name, n) in ["missing_report", "no_impression", "too_short", "too_many_tokens"].into_iter().zip(counts) {
        count_drop(name, n);
    }
    let labels_of = |im: &Image| labels.get(&(im.subject.clone(), im.study.clone()));
    // 6. the No-Finding cap, by study.
    let n0 = images.len();
    if let Some(cap) = a.cap_no_finding {
        let nf = FINDINGS.iter().position(|f| *f == "No Finding").expect("No Finding");
        let is_nf = |im: &Image| labels_of(im).is_some_and(|l| l[nf] == Some(1.0));
        let mut nf_studies: Vec<(String, String)> =
            images.iter().filter(|im| is_nf(im)).map(|im| (im.subject.clone(), im.study.clone())).collect();
        nf_studies.dedup();
        super::shuffle(&mut nf_studies, a.seed);
        let keep: BTreeSet<(String, String)> = nf_studies.into_iter().take(cap).collect();
        images.retain(|im| !is_nf(im) || keep.contains(&(im.subject.clone(), im.study.clone())));
    }
    count_drop("no_finding_cap", n0 - images.len());
    // 7. the sample.
    let n0 = images.len();
    if let Some(n) = a.sample.filter(|&n| n < images.len()) {
        let mut idx: Vec<usize> = (0..images.len()).collect();
        super::shuffle(&mut idx, a.seed ^ 0x5A3F_0C1E_9B27_D468);
        let keep: BTreeSet<usize> = idx.into_iter().take(n).collect();
        let mut i = 0;
        images.retain(|_| {
            i += 1;
            keep.contains(&(i - 1))
        });
    }
    count_drop("sample", n0 - images.len());
    if images.is_empty() {
        let flag = |name: &str| match name {
            "split" => format!(
                "$split {} $groups {}",
                format!("{:?}", a.split).to_lowercase(),
                groups.as_ref().map_or("all".into(), |g| { g.iter().cloned().collect::<Vec<_>>().join(",") })
            ),
            "view" => format!("$views {}", a.views),
            "missing_image" => format!("$root {}", root.display()),
            "missing_report" | "no_impression" => format!("$reports {}", reports.display()),
            "too_short" => format!("$min_chars {}", a.text.filter.min_chars),
            "too_many_tokens" => format!("$max_tokens {}", a.text.filter.max_tokens),
            "no_finding_cap" => format!("$cap_no_finding {}", a.cap_no_finding.unwrap_or(0)),
            _ => String::new(),
        };
        let rules: Vec<(&str, usize, String)> = dropped.iter().map(|&(n, c)| (n, c, flag(n))).collect();
        return Err(super::nothing_left(&format!("{listed} images listed in {}", meta_path.display()), &rules));
    }

    let mut rows = Vec::with_capacity(images.len());
    let (mut chars, mut tokens) = (Vec::new(), Vec::new());
    let mut positives = [0usize; FINDINGS.len()];
    for im in &images {
        let StudyText::Kept { text, chars: c, tokens: t } = &texts[&(im.subject.clone(), im.study.clone())] else {
            unreachable!("kept images have kept texts")
        };
        chars.push(*c);
        tokens.push(*t);
        let mut lab = Map::new();
        if let Some(l) = labels_of(im) {
            for (k, v) in l.iter().enumerate() {
                if let Some(v) = v {
                    lab.insert(FINDINGS[k].to_string(), json!(v));
                    positives[k] += (*v == 1.0) as usize;
                }
            }
        }
        let extra = json!({
            "subject_id": im.subject, "study_id": im.study, "dicom_id": im.dicom, "view": im.view,
            "group": im.group, "split": official.get(&im.dicom).map(String::as_str).unwrap_or(""),
            "chars": c, "tokens": t, "labels": lab,
        });
        let Value::Object(extra) = extra else { unreachable!() };
        rows.push(Row { image: path_of(im).display().to_string(), text: text.clone(), extra });
    }
    let summary = Summary {
        dataset: "mimic-cxr".into(),
        manifest: a.out.display().to_string(),
        options: json!({
            "root": root.display().to_string(), "reports": reports.display().to_string(),
            "split": format!("{:?}", a.split).to_lowercase(), "groups": groups,
            "views": views.as_ref().map_or(json!("all"), |v| json!(v)),
            "cap_no_finding": a.cap_no_finding, "sample": a.sample, "seed": a.seed,
            "min_chars": a.text.filter.min_chars, "max_tokens": a.text.filter.max_tokens, "tokenizer": super::tokenizer_name(a.text.tokenizer.as_deref()),
        }),
        images: rows.len(),
        studies: images.iter().map(|im| (&im.subject, &im.study)).collect::<BTreeSet<_>>().len(),
        subjects: Some(images.iter().map(|im| &im.subject).collect::<BTreeSet<_>>().len()),
        findings: FINDINGS.iter().zip(positives).map(|(f, c)| Count { name: f.to_string(), count: c }).collect(),
        text: TextStats::new(&chars, &tokens),
        dropped: dropped.into_iter().map(|(n, c)| Count { name: n.to_string(), count: c }).collect(),
    };
    super::finish(&outputs, &rows, summary)
}
