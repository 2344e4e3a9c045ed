//! `roentgen eval phantom`: does each image show the finding its prompt asked for?
//!
//! Images come from a folder of PNGs carrying their prompt in the "prompt" text chunk (what
//! `roentgen sample` and `roentgen phantom` write) or from a JSONL manifest (`{"image", "text"}`).
//! Each prompt is parsed ([`super::parse`]) into the findings it requests, which put the image into
//! one or more classes ("cardiomegaly", "effusion-left", "pneumothorax-right", "consolidation-left",
//! "no-finding", …). Each image is measured ([`super::measure`]) and, per class, the report gives:
//! - **shown**: how often the requested finding is measured (for "no-finding": how often the image
//!   is measured normal);
//! - **side**: how often it is measured present on the requested side (bilateral effusions: on both
//!   sides and only there);
//! - **lobe**: for consolidations whose prompt names a lobe, how often that lobe is measured;
//! - **other**: how often a finding the prompt did not ask for is measured.
//!
//! Next to each class, the same figures for freshly drawn phantoms of that class (rendered at the
//! evaluated images' size and quantised to 8 bits as written files are): the measurement's own
//! accuracy, the ceiling a generator can be held to.

use super::measure::{measure_gray, Measurement, GRID};
use super::parse::{parse, Request};
use super::spec::{Effusion, Findings, Laterality, Lobe, Pneumothorax, Side, Size};
use crate::io::manifest::read_manifest_rows;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One image to evaluate.
#[derive(Clone, Debug)]
pub struct Item {
    pub path: PathBuf,
    pub prompt: String,
}

/// Reads a PNG's text chunk `key` (tEXt, zTXt or iTXt, before or after the image data).
pub fn png_text(path: &Path, key: &str) -> Result<Option<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .with_context(|| format!("{}: not a readable PNG", path.display()))?;
    let find = |i: &png::Info| {
        let utf8 = i.utf8_text.iter().filter(|t| t.keyword == key).find_map(|t| t.get_text().ok());
        let latin = || i.uncompressed_latin1_text.iter().find(|t| t.keyword == key).map(|t| t.text.clone());
        let z = || i.compressed_latin1_text.iter().filter(|t| t.keyword == key).find_map(|t| t.get_text().ok());
        utf8.or_else(latin).or_else(z)
    };
    if let Some(t) = find(reader.info()) {
        return Ok(Some(t));
    }
    // Chunks after the image data: decode to the end.
    let mut buf = vec![0; reader.output_buffer_size().with_context(|| format!("{}: PNG too large", path.display()))?];
    reader.next_frame(&mut buf).with_context(|| format!("{}: corrupt PNG", path.display()))?;
    reader.finish().with_context(|| format!("{}: corrupt PNG", path.display()))?;
    Ok(find(reader.info()))
}

/// Reads any image the `image` crate decodes (PNG 8/16-bit, JPEG; gray, RGB, alpha) as gray in
/// [0, 1]; color is reduced with PIL's `convert("L")` weights, as `sample --gray` does.
pub fn read_gray(path: &Path) -> Result<(Vec<f32>, usize, usize)> {
    let img = image::open(path).with_context(|| format!("{}: cannot read image", path.display()))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let px: Vec<f32> = match img {
        image::DynamicImage::ImageLuma8(g) => g.into_raw().into_iter().map(|v| v as f32 / 255.0).collect(),
        image::DynamicImage::ImageLuma16(g) => g.into_raw().into_iter().map(|v| v as f32 / 65535.0).collect(),
        image::DynamicImage::ImageLumaA8(g) => g.pixels().map(|p| p[0] as f32 / 255.0).collect(),
        image::DynamicImage::ImageLumaA16(g) => g.pixels().map(|p| p[0] as f32 / 65535.0).collect(),
        other => other
            .to_rgb8()
            .pixels()
            .map(|p| ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as f32 / 255.0)
            .collect(),
    };
    if w == 0 || h == 0 {
        bail!("{}: empty image", path.display());
    }
    Ok((px, w, h))
}

/// The PNGs of a folder (sorted by name) with their "prompt" chunks.
pub fn items_from_folder(dir: &Path) -> Result<Vec<Item>> {
    let files = crate::io::images::png_files(dir, "`roentgen sample` or `roentgen phantom`")?;
    files
        .into_par_iter()
        .map(|p| {
            let prompt = png_text(&p, "prompt")?.with_context(|| {
                format!(
                    "{}: no \"prompt\" text chunk (not written by `roentgen sample` or `roentgen phantom`?); pass $manifest",
                    p.display()
                )
            })?;
            Ok(Item { path: p, prompt })
        })
        .collect()
}

/// The rows of a manifest ([`read_manifest_rows`]: JSONL or CSV; relative image paths resolve
/// against `base`, default the manifest's folder).
pub fn items_from_manifest(manifest: &Path, base: Option<&Path>) -> Result<Vec<Item>> {
    Ok(read_manifest_rows(manifest, base)?.into_iter().map(|row| Item { path: row.image, prompt: row.text }).collect())
}

/// Tallies of one class.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClassStats {
    pub images: usize,
    pub shown: usize,
    /// Images whose class has a side, and those measured on that side.
    pub sided: usize,
    pub side_right: usize,
    /// Images whose prompt names a lobe, and those measured in that lobe.
    pub lobed: usize,
    pub lobe_right: usize,
    pub other: usize,
}

fn rate(k: usize, n: usize) -> Option<f64> {
    (n > 0).then(|| k as f64 / n as f64)
}

impl ClassStats {
    pub fn shown_rate(&self) -> Option<f64> {
        rate(self.shown, self.images)
    }
    pub fn side_rate(&self) -> Option<f64> {
        rate(self.side_right, self.sided)
    }
    pub fn lobe_rate(&self) -> Option<f64> {
        rate(self.lobe_right, self.lobed)
    }
    pub fn other_rate(&self) -> Option<f64> {
        rate(self.other, self.images)
    }

    fn to_json(&self) -> Value {
        json!({
            "images": self.images,
            "shown": self.shown_rate(),
            "side": self.side_rate(),
            "lobe": self.lobe_rate(),
            "other_findings": self.other_rate(),
        })
    }
}

/// Adds one measured image to the tallies of every class its request belongs to.
pub fn tally(stats: &mut BTreeMap<String, ClassStats>, req: &Request, m: &Measurement) {
    let other = (m.cardiomegaly && !req.cardiomegaly)
        || (m.effusion.is_some() && req.effusion.is_none())
        || (m.pneumothorax.is_some() && req.pneumothorax.is_none())
        || (m.consolidation.is_some() && req.consolidation.is_none());
    for class in req.classes() {
        let st = stats.entry(class.clone()).or_default();
        st.images += 1;
        st.other += other as usize;
        let (shown, side): (bool, Option<bool>) = if class == "no-finding" {
            (m.is_normal(), None)
        } else if class == "cardiomegaly" {
            (m.cardiomegaly, None)
        } else if class.starts_with("effusion") {
            let want = req.effusion.and_then(|e| e.0);
            (m.effusion.is_some(), want.map(|w| m.effusion == Some(w)))
        } else if class.starts_with("pneumothorax") {
            let want = req.pneumothorax.and_then(|p| p.0);
            (m.pneumothorax.is_some(), want.map(|w| m.pneumothorax == Some(w)))
        } else {
            let (want_side, want_lobe) = req.consolidation.unwrap_or((None, None));
            if let Some(l) = want_lobe {
                st.lobed += 1;
                st.lobe_right += (m.consolidation == Some(l)) as usize;
            }
            (m.consolidation.is_some(), want_side.map(|w| m.consolidation.map(Lobe::side) == Some(w)))
        };
        st.shown += shown as usize;
        if let Some(ok) = side {
            st.sided += 1;
            st.side_right += ok as usize;
        }
    }
}

/// Findings of a reference phantom for a class (details the class leaves open are drawn).
fn reference_findings(class: &str, rng: &mut crate::rng::splitmix::SplitMix64) -> Option<Findings> {
    let mut f = Findings::default();
    let size = if rng.next_u64() % 2 == 0 { Size::Small } else { Size::Large };
    let side = if rng.next_u64() % 2 == 0 { Side::Right } else { Side::Left };
    let (kind, lat) = class.split_once('-').unwrap_or((class, ""));
    match (kind, lat) {
        ("no", "finding") => {}
        ("cardiomegaly", _) => f.cardiomegaly = true,
        ("effusion", l) => {
            let laterality = match l {
                "right" => Laterality::Right,
                "left" => Laterality::Left,
                "bilateral" => Laterality::Bilateral,
                _ => [Laterality::Right, Laterality::Left, Laterality::Bilateral][(rng.next_u64() % 3) as usize],
            };
            f.effusion = Some(Effusion { laterality, size });
        }
        ("pneumothorax", l) => {
            let side = match l {
                "right" => Side::Right,
                "left" => Side::Left,
                _ => side,
            };
            f.pneumothorax = Some(Pneumothorax { side, size });
        }
        ("consolidation", l) => {
            let lobes: Vec<Lobe> = Lobe::ALL
                .into_iter()
                .filter(|lobe| match l {
                    "right" => lobe.side() == Side::Right,
                    "left" => lobe.side() == Side::Left,
                    _ => true,
                })
                .collect();
            f.consolidation = Some(lobes[(rng.next_u64() % lobes.len() as u64) as usize]);
        }
        _ => return None,
    }
    Some(f)
}

/// FNV-1a of a class name: a stable per-class offset of the reference seed.
fn class_hash(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3))
}

/// Draws, renders (8-bit quantised) and measures `count` phantoms of `class`; their tallies.
pub fn reference_stats(class: &str, count: usize, seed: u64, size: usize) -> ClassStats {
    let per: Vec<Option<(Request, Measurement)>> = (0..count)
        .into_par_iter()
        .map(|i| {
            let mut rng = super::image_rng(seed ^ class_hash(class), i as u64);
            let f = reference_findings(class, &mut rng)?;
            let g = super::generate_from(f, &mut rng, size);
            let px: Vec<f32> = g.pixels.iter().map(|v| (v * 255.0).round() / 255.0).collect();
            Some((parse(&g.text), measure_gray(&px, size, size)))
        })
        .collect();
    let mut stats = BTreeMap::new();
    for (req, m) in per.into_iter().flatten() {
        tally(&mut stats, &req, &m);
    }
    stats.remove(class).unwrap_or_default()
}

/// The evaluation of a set of images.
#[derive(Clone, Debug)]
pub struct Report {
    pub images: usize,
    /// Prompts that request nothing the measurement knows (with their image), left out.
    pub unparsed: Vec<(PathBuf, String)>,
    pub classes: BTreeMap<String, ClassStats>,
    pub reference: BTreeMap<String, ClassStats>,
    pub reference_count: usize,
    pub reference_seed: u64,
    pub reference_size: usize,
    /// Per image: path, classes, measurement.
    pub per_image: Vec<(PathBuf, Vec<String>, Measurement)>,
}

pub struct EvalOptions {
    pub reference_count: usize,
    pub reference_seed: u64,
    pub reference_size: Option<usize>,
}

/// Measures every item and, per class, draws the reference phantoms.
pub fn evaluate(items: &[Item], opts: &EvalOptions) -> Result<Report> {
    // Before the parallel loop, so that no worker of it computes the baseline (see `baseline`).
    super::measure::baseline();
    let measured: Vec<Result<(Request, Measurement, usize)>> = items
        .par_iter()
        .map(|it| {
            let (px, w, h) = read_gray(&it.path)?;
            Ok((parse(&it.prompt), measure_gray(&px, w, h), w))
        })
        .collect();
    let mut classes = BTreeMap::new();
    let mut unparsed = Vec::new();
    let mut widths: BTreeMap<usize, usize> = BTreeMap::new();
    let mut per_image = Vec::new();
    for (it, r) in items.iter().zip(measured) {
        let (req, m, w) = r?;
        let cls = req.classes();
        if cls.is_empty() {
            unparsed.push((it.path.clone(), it.prompt.clone()));
            continue;
        }
        *widths.entry(w).or_default() += 1;
        tally(&mut classes, &req, &m);
        per_image.push((it.path.clone(), cls, m));
    }
    if classes.is_empty() {
        bail!(
            "none of the {} prompts requests a finding this measurement knows (cardiomegaly, pleural effusion, \
             pneumothorax, consolidation) or says the study is normal; e.g. {:?}",
            items.len(),
            unparsed.first().map(|u| u.1.as_str()).unwrap_or("")
        );
    }
    let common = widths.iter().max_by_key(|(w, n)| (**n, std::cmp::Reverse(**w))).map(|(w, _)| *w).unwrap_or(128);
    let reference_size = opts.reference_size.unwrap_or(common.clamp(super::write::MIN_SIZE, 256));
    super::write::check_size(reference_size).context("$reference_size")?;
    let reference = if opts.reference_count == 0 {
        BTreeMap::new()
    } else {
        classes
            .keys()
            .map(|c| (c.clone(), reference_stats(c, opts.reference_count, opts.reference_seed, reference_size)))
            .collect()
    };
    Ok(Report {
        images: items.len(),
        unparsed,
        classes,
        reference,
        reference_count: opts.reference_count,
        reference_seed: opts.reference_seed,
        reference_size,
        per_image,
    })
}

fn pct(r: Option<f64>) -> String {
    r.map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v))
}

impl Report {
    pub fn to_json(&self, per_image: bool) -> Value {
        let classes: serde_json::Map<String, Value> = self
            .classes
            .iter()
            .map(|(k, v)| {
                let mut o = v.to_json();
                o["reference"] = self.reference.get(k).map_or(Value::Null, ClassStats::to_json);
                (k.clone(), o)
            })
            .collect();
        let mut out = json!({
            "images": self.images,
            "evaluated": self.images - self.unparsed.len(),
            "unparsed": self.unparsed.iter().map(|(p, t)| json!({"image": p.display().to_string(), "text": t})).collect::<Vec<_>>(),
            "analysis_grid": GRID,
            "reference": {"per_class": self.reference_count, "seed": self.reference_seed, "size": self.reference_size},
            "classes": classes,
        });
        if per_image {
            out["per_image"] = self
                .per_image
                .iter()
                .map(|(p, c, m)| json!({"image": p.display().to_string(), "classes": c, "measurement": m}))
                .collect();
        }
        out
    }

    pub fn render_table(&self) -> String {
        let reference = if self.reference_count == 0 {
            "none".to_string()
        } else {
            format!(
                "{} phantoms per class at {} px (seed {})",
                self.reference_count, self.reference_size, self.reference_seed
            )
        };
        let mut s = format!(
            "{} images ({} evaluated), measured on a {GRID}×{GRID} grid; reference: {reference}\n",
            self.images,
            self.images - self.unparsed.len(),
        );
        s.push_str(&format!(
            "{:<22}{:>7}{:>8}{:>8}{:>8}{:>8}  |{:>6}{:>8}{:>8}{:>8}{:>8}\n",
            "class", "images", "shown", "side", "lobe", "other", "ref", "shown", "side", "lobe", "other"
        ));
        for (k, v) in &self.classes {
            let r = self.reference.get(k).cloned().unwrap_or_default();
            s.push_str(&format!(
                "{k:<22}{:>7}{:>8}{:>8}{:>8}{:>8}  |{:>6}{:>8}{:>8}{:>8}{:>8}\n",
                v.images,
                pct(v.shown_rate()),
                pct(v.side_rate()),
                pct(v.lobe_rate()),
                pct(v.other_rate()),
                r.images,
                pct(r.shown_rate()),
                pct(r.side_rate()),
                pct(r.lobe_rate()),
                pct(r.other_rate()),
            ));
        }
        s.push_str(
            "shown: requested finding measured (no-finding: measured normal); side: on the requested side; \
             lobe: in the named lobe; other: an unrequested finding measured; ref: fresh phantoms of the class\n",
        );
        if !self.unparsed.is_empty() {
            s.push_str(&format!(
                "{} prompt(s) name no known finding and were left out, e.g. {:?}\n",
                self.unparsed.len(),
                self.unparsed[0].1
            ));
        }
        s
    }
}
