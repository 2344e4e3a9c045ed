//! `roentgen prepare iu-xray`: the Indiana University chest X-ray collection (Demner-Fushman et al.,
//! 2016; 3,955 reports, 7,470 images), from its Open-I XML reports, with the paper's text rules.
//!
//! The reports are `ecgen-radiology/<n>.xml` files, as a folder or as the `NLMCXR_reports.tgz`
//! distributed by Open-I (a copy ships inside the `torchxrayvision` package, in its `data/` folder).
//! Each report's `<AbstractText Label="IMPRESSION">` and `Label="FINDINGS"` are read; `--section`
//! picks which becomes the prompt (the paper: impression), and the other is kept as an extra field.
//! Each `<parentImage id="...">` becomes one manifest row whose image is `<--images>/<id>.<--image-ext>`
//! (the Open-I PNG download names its files so; torchxrayvision reads the same paths); the images
//! need not exist to build the manifest.
//!
//! Views are not in the XML. With `--metadata` (torchxrayvision's `nlmcxr_dicom_metadata.csv.gz`:
//! columns `imageid` and `View Position`) `--views` filters as for MIMIC; ids of the form
//! `CXR1_1_IM-0001-3001` are looked up as `CXR1_IM-0001-3001` when the exact id is absent, which is
//! how the metadata spells them.
//!
//! Drops (in images): `no_image` counts reports without images (in reports, not images), then
//! `view`, `no_section` (the chosen section empty or missing), `too_short`, `too_many_tokens`.

use super::{Count, Row, Summary, TextOptions, TextStats, TextVerdict};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// What to read and keep.
#[derive(Clone, Debug)]
pub struct IuOptions {
    /// The Open-I XML reports: a folder (searched recursively for *.xml) or a .tgz/.tar.gz of them.
    pub reports: PathBuf,
    /// The JSONL manifest to write.
    pub out: PathBuf,
    /// Folder of the images: rows point to <DIR>/<parentImage id>.<ext>. It need not exist yet
    /// (the manifest can be built before the images are downloaded).
    pub images: PathBuf,
    /// Image file extension.
    pub image_ext: String,
    /// Which report section becomes the prompt.
    pub section: Section,
    /// DICOM metadata CSV (.csv or .csv.gz) with columns imageid and "View Position", for $views.
    pub metadata: Option<PathBuf>,
    /// View Position(s) to keep (PA, AP, LATERAL, LL, a comma list) or all; other than all needs $metadata.
    pub views: String,
    /// The text rule, its tokenizer and the summary file.
    pub text: TextOptions,
}

word_enum!(
    /// Which section of an Indiana University report becomes the prompt.
    pub enum Section("report section") { Impression = "impression", Findings = "findings" }
);

/// One parsed Open-I report.
#[derive(Debug, Clone, PartialEq)]
pub struct IuReport {
    /// The file name inside the folder or archive, e.g. "ecgen-radiology/1.xml".
    pub file: String,
    /// `<uId id="CXR1"/>`.
    pub uid: String,
    pub impression: String,
    pub findings: String,
    /// `<MeSH><major>` terms.
    pub mesh: Vec<String>,
    /// `<parentImage id>`s.
    pub images: Vec<String>,
}

/// Parses one report; errors name the file. Image ids must be plain file names (Open-I's are, e.g.
/// `CXR1_1_IM-0001-3001`): one with a path separator or `..` is refused with the whole run rather
/// than skipped, since the collection has none, so such an id means a corrupt or crafted archive,
/// and a manifest partly built from one (with a warning easily lost in a log) should not exist.
pub fn parse_report(file: &str, xml: &str) -> Result<IuReport> {
    let doc = roxmltree::Document::parse(xml).with_context(|| format!("{file}: not valid XML"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "eCitation" {
        bail!("{file}: root element is <{}>, expected <eCitation> (an Open-I report)", root.tag_name().name());
    }
    let elems = |name: &'static str| root.descendants().filter(move |n| n.is_element() && n.tag_name().name() == name);
    let uid = elems("uId").find_map(|n| n.attribute("id")).with_context(|| format!("{file}: no <uId id=...>"))?;
    let section = |label: &str| {
        let texts: Vec<String> = elems("AbstractText")
            .filter(|n| n.attribute("Label").is_some_and(|l| l.trim().eq_ignore_ascii_case(label)))
            .map(|n| n.descendants().filter(|d| d.is_text()).filter_map(|d| d.text()).collect::<String>())
            .collect();
        super::normalize_ws(&texts.join(" "))
    };
    let images: Vec<String> = elems("parentImage").filter_map(|n| n.attribute("id")).map(str::to_string).collect();
    for id in &images {
        if let Err(why) = super::check_component(id) {
            bail!(
                "{file}: <parentImage id={id:?}> {why}: image ids are file names under $images; refusing the reports"
            );
        }
    }
    Ok(IuReport {
        file: file.to_string(),
        uid: uid.to_string(),
        impression: section("IMPRESSION"),
        findings: section("FINDINGS"),
        mesh: elems("major").filter_map(|n| n.text()).map(|t| t.trim().to_string()).collect(),
        images,
    })
}

/// Sort key: "ecgen-radiology/12.xml" → (folder, 12, name), so reports come in numeric order.
fn order_key(name: &str) -> (String, u64, String) {
    let p = Path::new(name);
    let num = p.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse().ok()).unwrap_or(u64::MAX);
    (p.parent().map(|d| d.display().to_string()).unwrap_or_default(), num, name.to_string())
}

/// All `*.xml` files of a folder (recursively) or a gzip'd tar, as (name, text), in numeric order.
pub fn read_reports(path: &Path) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    if path.is_dir() {
        let mut stack = vec![path.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).with_context(|| format!("{}: cannot read folder", dir.display()))? {
                let p = e.with_context(|| format!("{}: cannot read folder", dir.display()))?.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x.eq_ignore_ascii_case("xml")) {
                    let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
                    let rel = p.strip_prefix(path).unwrap_or(&p).display().to_string();
                    out.push((rel, text));
                }
            }
        }
    } else {
        let f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)));
        let ctx = || format!("{}: not a readable .tgz of XML reports", path.display());
        for e in ar.entries().with_context(ctx)? {
            let mut e = e.with_context(ctx)?;
            let name = e.path().with_context(ctx)?.display().to_string();
            if e.header().entry_type().is_file() && name.to_ascii_lowercase().ends_with(".xml") {
                let mut text = String::new();
                e.read_to_string(&mut text).with_context(|| format!("{}: {name}: cannot read", path.display()))?;
                out.push((name, text));
            }
        }
    }
    if out.is_empty() {
        bail!("{}: no .xml reports found", path.display());
    }
    out.sort_by_cached_key(|(n, _)| order_key(n));
    Ok(out)
}

/// imageid → View Position from the DICOM metadata CSV.
fn read_views(path: &Path) -> Result<HashMap<String, String>> {
    let f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let r: Box<dyn Read> = if path.extension().is_some_and(|x| x == "gz") {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)))
    } else {
        Box::new(std::io::BufReader::new(f))
    };
    let mut rdr = csv::ReaderBuilder::new().flexible(true).from_reader(r);
    let h = rdr.headers().with_context(|| format!("{}: cannot read the header", path.display()))?.clone();
    let col = |c: &str| h.iter().position(|x| x == c).with_context(|| format!("{}: no column {c:?}", path.display()));
    let (id, view) = (col("imageid")?, col("View Position")?);
    let mut m = HashMap::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: line {}: malformed CSV", path.display(), i + 2))?;
        m.insert(rec.get(id).unwrap_or("").to_string(), rec.get(view).unwrap_or("").trim().to_string());
    }
    Ok(m)
}

/// The metadata's spelling of an XML image id: exact, else "CXR1_1_IM-…" → "CXR1_IM-…".
fn view_of<'a>(views: &'a HashMap<String, String>, id: &str) -> Option<&'a str> {
    views.get(id).map(String::as_str).or_else(|| {
        let (head, rest) = id.split_once('_')?;
        let (mid, tail) = rest.split_once('_')?;
        mid.bytes().all(|b| b.is_ascii_digit()).then(|| views.get(&format!("{head}_{tail}")).map(String::as_str))?
    })
}

pub fn run(a: IuOptions) -> Result<super::Prepared> {
    // Every check on the arguments comes before any reading, so a typo costs nothing.
    super::existing("$reports", &a.reports, false)?;
    if let Some(m) = &a.metadata {
        super::existing("$metadata", m, false)?;
    }
    if let Some(t) = &a.text.tokenizer {
        super::existing("$tokenizer", t, true)?;
    }
    // The extension is appended to every image id: letters and digits only, so it cannot add a path.
    if a.image_ext.is_empty() || !a.image_ext.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("$image_ext {:?}: give an extension of letters and digits, without the dot (png, jpg)", a.image_ext);
    }
    let views = super::parse_views(&a.views)?;
    let mut inputs: Vec<(&str, &Path)> = vec![("$reports", a.reports.as_path())];
    if let Some(m) = &a.metadata {
        inputs.push(("$metadata", m.as_path()));
    }
    let outputs = super::plan_outputs(&a.out, a.text.summary.as_deref(), &inputs)?;
    let meta = match (&a.metadata, &views) {
        (Some(m), _) => Some(read_views(m)?),
        (None, Some(_)) => bail!("$views {} needs $metadata (the XML reports carry no view)", a.views),
        (None, None) => None,
    };
    if let (Some(m), Some(v)) = (&meta, &views) {
        let mut present = BTreeMap::new();
        for view in m.values() {
            *present.entry(view.clone()).or_insert(0) += 1;
        }
        super::check_views(&a.views, v, &present)?;
    }
    let tok = super::load_tokenizer(a.text.tokenizer.as_deref())?;
    let filter = a.text.filter;
    let files = read_reports(&a.reports)?;
    let reports: Vec<IuReport> = files.iter().map(|(n, x)| parse_report(n, x)).collect::<Result<_>>()?;
    let texts: Vec<&str> = reports
        .iter()
        .map(|r| if a.section == Section::Impression { &r.impression } else { &r.findings }.as_str())
        .collect();
    let verdicts = filter.check_all(&texts, &tok);
    let images_dir = super::absolute(&a.images)?;

    let mut counts = [0usize; 6]; // no_image (reports), view, no_section, too_short, too_many_tokens, kept
    let (mut rows, mut chars, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
    let mut kept_reports = BTreeSet::new();
    for ((r, text), verdict) in reports.iter().zip(&texts).zip(&verdicts) {
        if r.images.is_empty() {
            counts[0] += 1;
            continue;
        }
        for id in &r.images {
            let view = meta.as_ref().map(|m| view_of(m, id).unwrap_or("").to_string());
            if let (Some(v), Some(want)) = (&view, &views) {
                if !want.iter().any(|w| w.eq_ignore_ascii_case(v)) {
                    counts[1] += 1;
                    continue;
                }
            }
            let k = match verdict {
                _ if text.is_empty() => 2,
                TextVerdict::TooShort => 3,
                TextVerdict::TooManyTokens => 4,
                TextVerdict::Keep { .. } => 5,
            };
            counts[k] += 1;
            let TextVerdict::Keep { chars: c, tokens: t } = *verdict else { continue };
            if k != 5 {
                continue;
            }
            chars.push(c);
            tokens.push(t);
            kept_reports.insert(r.file.as_str());
            let mut extra = json!({
                "report": r.file, "uid": r.uid, "image_id": id, "impression": r.impression,
                "findings": r.findings, "mesh": r.mesh, "chars": c, "tokens": t,
            });
            if let (Some(v), Value::Object(o)) = (&view, &mut extra) {
                o.insert("view".into(), json!(v));
            }
            let Value::Object(extra) = extra else { unreachable!() };
            let image = images_dir.join(format!("{id}.{}", a.image_ext)).display().to_string();
            rows.push(Row { image, text: text.to_string(), extra });
        }
    }
    let names = ["no_image (reports)", "view", "no_section", "too_short", "too_many_tokens"];
    if rows.is_empty() {
        let flags = [
            format!("$reports {}", a.reports.display()),
            format!("$views {}", a.views),
            format!("$section {}", format!("{:?}", a.section).to_lowercase()),
            format!("$min_chars {}", a.text.filter.min_chars),
            format!("$max_tokens {}", a.text.filter.max_tokens),
        ];
        let rules: Vec<(&str, usize, String)> =
            names.iter().zip(counts).zip(flags).map(|((n, c), f)| (*n, c, f)).collect();
        let listed: usize = reports.iter().map(|r| r.images.len()).sum();
        return Err(super::nothing_left(
            &format!("{listed} images of {} reports in {}", reports.len(), a.reports.display()),
            &rules,
        ));
    }
    let summary = Summary {
        dataset: "iu-xray".into(),
        manifest: a.out.display().to_string(),
        options: json!({
            "reports": a.reports.display().to_string(), "reports_read": reports.len(),
            "images": images_dir.display().to_string(), "section": format!("{:?}", a.section).to_lowercase(),
            "views": views.as_ref().map_or(json!("all"), |v| json!(v)),
            "metadata": a.metadata.as_ref().map(|m| m.display().to_string()),
            "min_chars": a.text.filter.min_chars, "max_tokens": a.text.filter.max_tokens, "tokenizer": super::tokenizer_name(a.text.tokenizer.as_deref()),
        }),
        images: rows.len(),
        studies: kept_reports.len(),
        subjects: None,
        findings: Vec::new(),
        text: TextStats::new(&chars, &tokens),
        dropped: names.iter().zip(counts).map(|(n, c)| Count { name: n.to_string(), count: c }).collect(),
    };
    super::finish(&outputs, &rows, summary)
}
