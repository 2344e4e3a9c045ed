//! Procedural chest-radiograph phantoms with findings and report sentences (issue 7), and the
//! measurement that checks whether an image shows the finding its prompt asked for.
//!
//! `roentgen phantom` draws gray PA chest radiographs — thorax and soft tissue, lungs with vessel
//! markings, posterior and anterior ribs, clavicles, spine, trachea, diaphragm domes, heart — with
//! findings drawn at random and recorded as labels: cardiomegaly (cardiothoracic ratio > 0.5),
//! pleural effusion (right/left/bilateral, small/large, a meniscus at the costophrenic angle),
//! pneumothorax (right/left, small/large: a visceral pleural line with a lucent rim without lung
//! markings outside it), focal consolidation (one of six lobes), or no finding. Each image gets an
//! impression sentence in radiology language and a line in a `roentgen train` manifest.
//!
//! `roentgen eval phantom` measures those findings in any image of the same kind (e.g. samples of a
//! model trained on phantoms) with the phantom's own geometry, and reports per prompt class how often
//! the requested finding (and side) is seen, next to the same measurement on freshly drawn phantoms of
//! that class, so the measurement's own accuracy is on the same table.
//!
//! - [`spec`]: findings, sides, lobes, the class mix, labels.
//! - [`anatomy`]: the geometry of the thorax and of each finding (normalised coordinates).
//! - [`render`]: rasterisation at any size.
//! - [`report`]: impression sentences; [`parse`]: reading them (and similar prompts) back.
//! - [`measure`]: the measurements and their thresholds, on a fixed 64×64 analysis grid.
//! - [`cli`]: `roentgen phantom`; [`eval`]: `roentgen eval phantom`.
//!
//! Everything is deterministic: image `i` of seed `K` depends only on (K, i) — not on `--count` or
//! the thread count — and the same seed writes byte-identical files.

pub mod anatomy;
pub mod eval;
pub mod measure;
pub mod parse;
pub mod render;
pub mod report;
pub mod spec;
pub mod write;

use crate::rng::splitmix::SplitMix64;
use anatomy::Phantom;
use spec::Findings;

/// One generated phantom: pixels in [0, 1] (size × size, row-major), what it shows, and its text.
#[derive(Clone, Debug)]
pub struct Generated {
    pub size: usize,
    pub pixels: Vec<f32>,
    pub findings: Findings,
    /// The cardiothoracic ratio drawn (the heart's width over the lungs' inner width).
    pub ctr: f64,
    /// The impression sentence.
    pub text: String,
    /// The labels object written to the manifest.
    pub labels: serde_json::Value,
}

/// The generator of image `index` of seed `seed` (independent of every other image).
pub fn image_rng(seed: u64, index: u64) -> SplitMix64 {
    let mut r = SplitMix64::new(seed ^ index.wrapping_add(1).wrapping_mul(0xA076_1D64_78BD_642F));
    SplitMix64::new(r.next_u64() ^ 0xE703_7ED1_A0B4_28DB)
}

/// Draws and renders image `index` of seed `seed`: findings from the class mix of
/// [`spec::draw_findings`], then the anatomy, the sentence and the pixels.
pub fn generate(seed: u64, index: u64, size: usize) -> Generated {
    let mut rng = image_rng(seed, index);
    let findings = spec::draw_findings(&mut rng);
    generate_from(findings, &mut rng, size)
}

/// Renders a phantom with the given findings (the rest drawn from `rng`).
pub fn generate_from(findings: Findings, rng: &mut SplitMix64, size: usize) -> Generated {
    let ph = Phantom::draw(findings, rng);
    let text = report::impression(rng, &findings, ph.ctr());
    let pixels = render::render(&ph, size);
    Generated { size, pixels, findings, ctr: ph.ctr(), text, labels: findings.labels_json(ph.ctr()) }
}
