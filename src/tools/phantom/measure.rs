//! Measuring the findings in an image with the phantom's own geometry.
//!
//! **Grid.** Any image is first resampled (area averaging) to a fixed 64×64 analysis grid: the
//! findings are large-scale (a heart's width, fluid at a lung base, a lucent rim several pixels wide,
//! a lobe-sized patch), so 64 pixels resolve them, and one grid makes every window and threshold
//! independent of the image size.
//!
//! **Geometry.** Windows are laid on the nominal thorax ([`Geometry::nominal`]) fitted to the image:
//! the chest walls (the lung → soft-tissue edge, scanning outward from the lateral lung, in rows above
//! where any effusion reaches) give the midline and the lung half-width; the lung bases give each
//! hemidiaphragm's height (walking down columns, the first rise from aerated lung is the diaphragm or
//! the top of an effusion, which is only ever higher, so the lowest such boundary is the diaphragm;
//! the two domes move together within 0.012, twice their independent variation, which keeps a base
//! hidden by fluid or the heart on its partner's level).
//!
//! **References.** Brightness is read relative to two references measured in the same image, so
//! exposure (gain, offset) and a generator's overall tone cancel:
//! - `T`, the heart core (midline, heart rows): soft tissue as dense as the chest gets;
//! - `L`, aerated lung: the 30th-percentile brightness of each lung's upper and middle zones (lateral
//!   of the hilum, inside the rim a pneumothorax occupies), the brighter side's: a pneumothorax only
//!   darkens its side, and a consolidation covering a fifth of the zone does not lift a 30th
//!   percentile.
//!
//! Scores are in units of the lung–soft-tissue contrast `C = T − L`. Each is compared with its value
//! on normal anatomy ([`Baseline`]: the mean over normal phantoms, so windows that normally hold more
//! rib and vessel, like the upper zones, or less, like the bases, need no hand-set offsets), and a
//! finding is called when the excess passes about half the contrast the finding is drawn with (see
//! each constant):
//! - **Cardiomegaly**: per heart row, walk out from the midline until the brightness falls below the
//!   midpoint `L + C/2` (the heart border, interpolated to sub-pixel; a border counts only with
//!   aerated lung beyond it, so fluid or a patch closing in on the heart does not widen it); the heart
//!   width is the widest row, the thoracic width the widest chest-wall-to-chest-wall distance. A
//!   cardiothoracic ratio above 0.5 is cardiomegaly, the clinical definition (phantoms are drawn at
//!   0.39–0.46 or 0.56–0.63).
//! - **Pleural effusion**: fluid collects first in the lateral costophrenic recess and its meniscus
//!   climbs the chest wall, so the window is the lateral lung just above each hemidiaphragm (0.74–0.97
//!   of the hemithorax width, from 7% to 1.5% of the image height above the diaphragm), lateral of the
//!   heart. Each side is decided on its own: right, left or bilateral. A second window higher up the
//!   lateral wall (rows 0.55–0.60) tells large from small.
//! - **Pneumothorax**: the air outside the visceral pleural line is darker than aerated lung and has no
//!   vessel markings. The window is the outer rim of each lung's upper two thirds (elliptic radius
//!   0.85–0.96, inside even a small pneumothorax's rim); the finding is on the side whose rim is
//!   darker than normal and clearly darker than the other side's (the asymmetry cancels a generator's
//!   overall vignetting). The rim's high-pass energy (markings make it) is reported too.
//! - **Consolidation**: a lobe-sized patch brighter than aerated lung. One window per lobe (a disc at
//!   the lobe's centre, lateral of the heart border); the brightest window above threshold names the
//!   lobe and the side. Lower-lobe windows are not read once an effusion is seen: its fluid fills them
//!   (a radiograph cannot tell the two apart there either, and the generator never draws the pair).

use super::anatomy::{Geometry, CTR_CUTOFF};
use super::spec::{Findings, Laterality, Lobe, Side, Size, Zone};
use serde::Serialize;

/// Side of the analysis grid.
pub const GRID: usize = 64;

/// Effusion: fluid is drawn 0.36–0.40 above aerated lung (≈ 0.85 C); a small effusion fills most of
/// the recess window (≈ 0.6 C over normal). Margin: half of that.
pub const EFFUSION_MARGIN: f64 = 0.3;
/// Pneumothorax: the rim is drawn 0.10 darker than lung (≈ 0.23 C) and without its markings (a few
/// hundredths more). Margins: a quarter of that for the rim's darkness over normal, and a half for its
/// darkness beyond the other side's rim.
pub const PNEUMOTHORAX_MARGIN: f64 = 0.06;
pub const PNEUMOTHORAX_ASYMMETRY: f64 = 0.11;
/// Consolidation: drawn 0.17–0.21 above lung (≈ 0.4 C), covering most of its window (≈ 0.33 C over
/// normal). Margin: half of that.
pub const CONSOLIDATION_MARGIN: f64 = 0.17;

/// A gray image on the analysis grid, values in [0, 1].
#[derive(Clone, Debug)]
pub struct Grid {
    pub v: Vec<f64>,
}

/// Area-average resampling of one axis: output cell i covers input [i·n/m, (i+1)·n/m).
fn area_weights(n: usize, m: usize) -> Vec<Vec<(usize, f64)>> {
    let scale = n as f64 / m as f64;
    (0..m)
        .map(|i| {
            let (a, b) = (i as f64 * scale, (i + 1) as f64 * scale);
            let mut w = Vec::new();
            let mut j = a.floor() as usize;
            while (j as f64) < b && j < n {
                let overlap = (b.min(j as f64 + 1.0) - a.max(j as f64)).max(0.0);
                if overlap > 0.0 {
                    w.push((j, overlap / scale));
                }
                j += 1;
            }
            w
        })
        .collect()
}

impl Grid {
    /// Resamples a row-major gray image (values in [0, 1]) of any size to the analysis grid.
    pub fn from_gray(pixels: &[f32], width: usize, height: usize) -> Grid {
        let wx = area_weights(width, GRID);
        let wy = area_weights(height, GRID);
        let mut rows = vec![0f64; height * GRID];
        for y in 0..height {
            for (i, w) in wx.iter().enumerate() {
                rows[y * GRID + i] = w.iter().map(|&(j, f)| f * pixels[y * width + j] as f64).sum();
            }
        }
        let mut v = vec![0f64; GRID * GRID];
        for (o, w) in wy.iter().enumerate() {
            for i in 0..GRID {
                v[o * GRID + i] = w.iter().map(|&(j, f)| f * rows[j * GRID + i]).sum();
            }
        }
        Grid { v }
    }

    fn centre(i: usize) -> f64 {
        (i as f64 + 0.5) / GRID as f64
    }

    /// Brightness at normalised (x, y), bilinear between pixel centres.
    pub fn at(&self, x: f64, y: f64) -> f64 {
        let fx = (x * GRID as f64 - 0.5).clamp(0.0, (GRID - 1) as f64);
        let fy = (y * GRID as f64 - 0.5).clamp(0.0, (GRID - 1) as f64);
        let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(GRID - 1), (y0 + 1).min(GRID - 1));
        let (tx, ty) = (fx - x0 as f64, fy - y0 as f64);
        let p = |xx: usize, yy: usize| self.v[yy * GRID + xx];
        (1.0 - ty) * ((1.0 - tx) * p(x0, y0) + tx * p(x1, y0)) + ty * ((1.0 - tx) * p(x0, y1) + tx * p(x1, y1))
    }

    /// Values of the pixels whose centres satisfy `keep(x, y)`.
    pub fn select(&self, keep: impl Fn(f64, f64) -> bool) -> Vec<f64> {
        let mut out = Vec::new();
        for j in 0..GRID {
            for i in 0..GRID {
                if keep(Self::centre(i), Self::centre(j)) {
                    out.push(self.v[j * GRID + i]);
                }
            }
        }
        out
    }

    /// Mean absolute deviation from the 3×3 neighbourhood mean (high-pass energy) over a region.
    pub fn roughness(&self, keep: impl Fn(f64, f64) -> bool) -> f64 {
        let mut acc = (0.0, 0usize);
        for j in 1..GRID - 1 {
            for i in 1..GRID - 1 {
                if keep(Self::centre(i), Self::centre(j)) {
                    let mut m = 0.0;
                    for dj in 0..3 {
                        for di in 0..3 {
                            m += self.v[(j + dj - 1) * GRID + i + di - 1];
                        }
                    }
                    acc.0 += (self.v[j * GRID + i] - m / 9.0).abs();
                    acc.1 += 1;
                }
            }
        }
        acc.0 / acc.1.max(1) as f64
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// The raw scores of one image, before any decision. Brightness scores are in units of the
/// lung–tissue contrast `C`, relative to the aerated-lung reference; per side `[right, left]`.
#[derive(Clone, Debug, Serialize)]
pub struct Scores {
    /// Heart core brightness and per-side aerated-lung brightness ([right, left]), image units.
    pub tissue: f64,
    pub lung: [f64; 2],
    /// Cardiothoracic ratio: heart width / thoracic width (normalised image units).
    pub ctr: f64,
    pub heart_width: f64,
    pub thorax_width: f64,
    /// The thorax fitted to the image: midline, lung half-width, dome heights [right, left].
    pub midline: f64,
    pub half_width: f64,
    pub dome: [f64; 2],
    /// Brightness of the lateral lung just above each hemidiaphragm (the costophrenic recess).
    pub effusion: [f64; 2],
    /// Brightness higher up the lateral chest wall (reached by large effusions only).
    pub effusion_high: [f64; 2],
    /// Darkness of the outer rim of each lung's upper two thirds below aerated lung.
    pub pneumothorax: [f64; 2],
    /// High-pass energy in that rim (vessel markings and ribs make it; a pneumothorax rim has none).
    pub rim_roughness: [f64; 2],
    /// Brightness of each lobe's window, in [`Lobe::ALL`] order (NaN where not read).
    pub consolidation: [f64; 6],
}

/// Scores of normal anatomy: the mean of [`Scores`] over phantoms with no finding. Each decision
/// compares a score's excess over its normal value with a margin set from the finding's drawn
/// contrast, so windows that normally hold more rib or vessel (the upper zones) or less (the bases)
/// need no hand-tuned offsets.
#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    pub phantoms: usize,
    pub effusion: [f64; 2],
    pub effusion_high: [f64; 2],
    pub pneumothorax: [f64; 2],
    pub rim_roughness: [f64; 2],
    pub consolidation: [f64; 6],
}

/// The baseline is measured on this many normal phantoms, 128 pixels, drawn from this seed (a seed no
/// test or example uses).
pub const BASELINE_PHANTOMS: usize = 48;
pub const BASELINE_SEED: u64 = 0xBA5E_119E;

/// The normal baseline, computed once per process (about a second of rendering).
///
/// In a thread pool of its own: `baseline()` is called from the global pool's workers (evaluate's
/// parallel loop), and an initializer whose parallel work (here and inside `render`) waited on that
/// pool would deadlock — its workers sit blocked on this OnceLock while the thread that holds it
/// waits for them (seen as an occasional hang of tests/phantom.rs). Parallel callers initialize it
/// before their parallel loop (`eval::evaluate` does), so that no worker of theirs runs the
/// initializer: one waiting inside it could pick up a job that asks for the baseline again.
pub fn baseline() -> &'static Baseline {
    static B: std::sync::OnceLock<Baseline> = std::sync::OnceLock::new();
    B.get_or_init(|| match rayon::ThreadPoolBuilder::new().num_threads(rayon::current_num_threads()).build() {
        Ok(pool) => pool.install(compute_baseline),
        Err(_) => compute_baseline(),
    })
}

fn compute_baseline() -> Baseline {
    {
        use rayon::prelude::*;
        let scores: Vec<Scores> = (0..BASELINE_PHANTOMS)
            .into_par_iter()
            .map(|i| {
                let mut rng = super::image_rng(BASELINE_SEED, i as u64);
                let g = super::generate_from(Findings::default(), &mut rng, 128);
                scores(&Grid::from_gray(&g.pixels, 128, 128))
            })
            .collect();
        let avg = |f: &dyn Fn(&Scores) -> f64| {
            let v: Vec<f64> = scores.iter().map(f).filter(|x| x.is_finite()).collect();
            mean(&v)
        };
        Baseline {
            phantoms: scores.len(),
            effusion: [0, 1].map(|i| avg(&|s| s.effusion[i])),
            effusion_high: [0, 1].map(|i| avg(&|s| s.effusion_high[i])),
            pneumothorax: [0, 1].map(|i| avg(&|s| s.pneumothorax[i])),
            rim_roughness: [0, 1].map(|i| avg(&|s| s.rim_roughness[i])),
            consolidation: [0, 1, 2, 3, 4, 5].map(|k| avg(&|s| s.consolidation[k])),
        }
    }
}

/// What the measurement saw in one image: the scores and the decisions.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    pub scores: Scores,
    pub cardiomegaly: bool,
    pub effusion: Option<Laterality>,
    pub effusion_size: Option<Size>,
    pub pneumothorax: Option<Side>,
    pub consolidation: Option<Lobe>,
}

impl Measurement {
    pub fn is_normal(&self) -> bool {
        !self.cardiomegaly && self.effusion.is_none() && self.pneumothorax.is_none() && self.consolidation.is_none()
    }

    /// The findings measured, as [`Findings`] (sizes: effusion as measured, pneumothorax "small").
    pub fn findings(&self) -> Findings {
        Findings {
            cardiomegaly: self.cardiomegaly,
            effusion: self
                .effusion
                .map(|l| super::spec::Effusion { laterality: l, size: self.effusion_size.unwrap_or(Size::Small) }),
            pneumothorax: self.pneumothorax.map(|s| super::spec::Pneumothorax { side: s, size: Size::Small }),
            consolidation: self.consolidation,
        }
    }
}

/// Where the brightness along a row, walking over `span` (distances from the midline) outward on
/// side s, first crosses `thr` (downward when `falling`, else upward), as a distance from the
/// midline; None if it never does within the span.
fn crossing(
    grid: &Grid,
    g: &Geometry,
    s: Side,
    y: f64,
    span: std::ops::Range<f64>,
    thr: f64,
    falling: bool,
) -> Option<f64> {
    let step = 0.25 / GRID as f64;
    let mut prev = grid.at(g.x(s, span.start), y);
    let mut d = span.start;
    while d < span.end {
        let dn = d + step;
        let cur = grid.at(g.x(s, dn), y);
        let crossed = if falling { prev >= thr && cur < thr } else { prev <= thr && cur > thr };
        if crossed {
            let t = if (cur - prev).abs() > 1e-12 { (thr - prev) / (cur - prev) } else { 0.5 };
            return Some(d + t * step);
        }
        prev = cur;
        d = dn;
    }
    None
}

/// Fits the nominal thorax to the image: the chest walls (lung → soft tissue, scanning outward from
/// the lateral lung) in the rows just above the lung bases give the midline and the lung half-width,
/// and the lung bases give each hemidiaphragm's height; the rest of the geometry is nominal. Returns
/// the geometry and the widest wall-to-wall distance.
fn fit_thorax(grid: &Grid, thr: f64) -> (Geometry, Option<f64>) {
    let n = Geometry::nominal();
    let (mut centres, mut halves, mut widest) = (Vec::new(), Vec::new(), None::<f64>);
    for j in 0..GRID {
        let y = Grid::centre(j);
        if !(0.37..0.45).contains(&y) {
            continue;
        }
        let w = Side::BOTH.map(|s| crossing(grid, &n, s, y, 0.85 * n.hw..1.3 * n.hw, thr, false));
        if let [Some(r), Some(l)] = w {
            centres.push(n.cx + 0.5 * (l - r));
            halves.push(0.5 * (l + r) * n.hw / n.d_out(y));
            widest = Some(widest.map_or(r + l, |m| m.max(r + l)));
        }
    }
    let mut g = n;
    if !centres.is_empty() {
        g.cx = quantile(&centres, 0.5).clamp(n.cx - 0.03, n.cx + 0.03);
        g.hw = quantile(&halves, 0.5).clamp(n.hw - 0.03, n.hw + 0.03);
    }
    // Diaphragm heights: walking down columns across each hemithorax, the first rise from aerated lung
    // to soft tissue is the diaphragm — or the top of an effusion, which is only ever higher. The
    // lowest such boundary relative to the nominal dome therefore gives the diaphragm's offset
    // (columns inside the heart, which never show lung, give none). The two domes move mostly
    // together, so a side whose every column is raised by fluid is held within 0.012 of the other.
    let offsets = Side::BOTH.map(|s| {
        [0.5, 0.6, 0.7, 0.8, 0.9]
            .iter()
            .filter_map(|u| {
                let d = u * g.hw;
                let dia = g.dia(s, d);
                boundary_below(grid, g.x(s, d), 0.5, dia, dia + 0.06, thr).map(|y| y - dia)
            })
            .reduce(f64::max)
            .map(|o| o.clamp(-0.03, 0.03))
    });
    let common = offsets.iter().flatten().copied().reduce(f64::max);
    for s in Side::BOTH {
        if let (Some(own), Some(common)) = (offsets[s.index()], common) {
            let off = own.max(common - 0.012);
            g.dome[s.index()] += off;
            g.cp[s.index()] += off;
        }
    }
    (g, widest)
}

/// Walking down column x from y0 to y1: the first upward crossing of `thr` after at least one pixel
/// below it above `dark_before` (aerated lung first, then the bright boundary; a column that shows
/// no lung above the nominal diaphragm — inside the heart — has none, and the gastric bubble below
/// the left dome cannot pass for lung), interpolated.
fn boundary_below(grid: &Grid, x: f64, y0: f64, dark_before: f64, y1: f64, thr: f64) -> Option<f64> {
    let step = 0.25 / GRID as f64;
    let (mut y, mut seen_dark) = (y0, false);
    let mut prev = grid.at(x, y);
    while y < y1 {
        let cur = grid.at(x, y + step);
        seen_dark |= prev < thr && y < dark_before;
        if seen_dark && prev <= thr && cur > thr {
            let t = if (cur - prev).abs() > 1e-12 { (thr - prev) / (cur - prev) } else { 0.5 };
            return Some(y + t * step);
        }
        prev = cur;
        y += step;
    }
    None
}

/// The raw scores of one image on the analysis grid.
pub fn scores(grid: &Grid) -> Scores {
    let n = Geometry::nominal();

    // References (wide windows on the nominal thorax: they tolerate its variation).
    let tissue = quantile(&grid.select(|x, y| (x - n.cx).abs() < 0.05 && (0.5..0.6).contains(&y)), 0.5);
    let lung = Side::BOTH.map(|s| {
        quantile(
            &grid.select(|x, y| {
                let d = n.d(s, x);
                (0.18..0.5).contains(&y) && d > 0.11 && n.lung_margin(s, x, y) > 0.02 && n.r(s, x, y) < 0.82
            }),
            0.3,
        )
    });
    // The brighter lung's reference: a pneumothorax only darkens its side, and a consolidation
    // barely moves a 30th percentile.
    let lung_ref = lung[0].max(lung[1]);
    let contrast = (tissue - lung_ref).max(0.02);
    let thr = lung_ref + 0.5 * contrast;

    // The thorax of this image; every window below is laid on it.
    let (g, widest) = fit_thorax(grid, thr);
    let hw = g.hw;
    let thorax_width = widest.filter(|w| (1.6 * hw..2.3 * hw).contains(w)).unwrap_or(2.0 * hw);

    // Heart: widest row between the two borders.
    let mut heart_border = Vec::new(); // (y, [right, left]) per analysis row in the heart's range
    let mut heart_width: f64 = 0.0;
    for j in 0..GRID {
        let y = Grid::centre(j);
        if !(0.42..0.76).contains(&y) {
            continue;
        }
        // A border is a heart–lung interface only with aerated lung beyond it (two analysis pixels):
        // where fluid or a patch closes in on the heart the gap is not a border, and the row is left
        // out rather than measured across.
        let b = Side::BOTH.map(|s| {
            crossing(grid, &g, s, y, 0.0..0.9 * hw, thr, true)
                .filter(|&d| (1..=2).all(|k| grid.at(g.x(s, d + k as f64 / GRID as f64), y) < thr))
        });
        heart_border.push((y, b));
        if (0.5..0.64).contains(&y) {
            if let [Some(r), Some(l)] = b {
                heart_width = heart_width.max(r + l);
            }
        }
    }
    let ctr = heart_width / thorax_width;

    // The heart border towards side s in the analysis row at y (0 where none was found).
    let heart_at = |s: Side, y: f64| {
        heart_border.iter().find(|h| (h.0 - y).abs() < 0.5 / GRID as f64).and_then(|h| h.1[s.index()]).unwrap_or(0.0)
    };

    // Effusion: the lateral costophrenic recess (lateral of an enlarged heart that reaches into
    // it), and higher up the lateral wall.
    let effusion = Side::BOTH.map(|s| {
        let v = grid.select(|x, y| {
            let d = g.d(s, x);
            let dia = g.dia(s, d);
            (0.74..0.97).contains(&(d / hw)) && y > dia - 0.07 && y < dia - 0.015 && d > heart_at(s, y) + 0.02
        });
        (mean(&v) - lung_ref) / contrast
    });
    let effusion_high = Side::BOTH.map(|s| {
        let v = grid.select(|x, y| {
            let u = g.d(s, x) / hw;
            (0.82..0.97).contains(&u) && (0.55..0.6).contains(&y)
        });
        (mean(&v) - lung_ref) / contrast
    });

    // Pneumothorax: the outer rim of the upper two thirds of each lung (above where a large
    // effusion's meniscus reaches).
    let rim = |s: Side, x: f64, y: f64| {
        let r = g.r(s, x, y);
        (0.14..0.44).contains(&y) && (0.85..0.96).contains(&r) && g.d(s, x) > 0.0
    };
    let pneumothorax = Side::BOTH.map(|s| (lung_ref - mean(&grid.select(|x, y| rim(s, x, y)))) / contrast);
    let rim_roughness = Side::BOTH.map(|s| grid.roughness(|x, y| rim(s, x, y)) / contrast);

    // Consolidation: a disc at each lobe's centre, lateral of the measured heart border.
    let mut consolidation = [f64::NAN; 6];
    for (k, &lobe) in Lobe::ALL.iter().enumerate() {
        let s = lobe.side();
        let (dc, yc) = g.lobe_centre(lobe);
        let v = grid.select(|x, y| {
            let d = g.d(s, x);
            let in_disc = (d - dc).powi(2) + (y - yc).powi(2) < 0.045f64.powi(2);
            in_disc && d > heart_at(s, y) + 0.02 && g.lung_margin(s, x, y) > 0.0
        });
        if v.len() >= 4 {
            consolidation[k] = (mean(&v) - lung_ref) / contrast;
        }
    }

    Scores {
        tissue,
        lung,
        ctr,
        heart_width,
        thorax_width,
        midline: g.cx,
        half_width: g.hw,
        dome: g.dome,
        effusion,
        effusion_high,
        pneumothorax,
        rim_roughness,
        consolidation,
    }
}

/// Decides the findings from an image's scores (see the module documentation).
pub fn decide(sc: Scores, base: &Baseline) -> Measurement {
    let cardiomegaly = sc.ctr > CTR_CUTOFF;
    let eff = [0, 1].map(|i| sc.effusion[i] - base.effusion[i] > EFFUSION_MARGIN);
    let effusion = Laterality::from_sides(eff[0], eff[1]);
    let effusion_size = effusion.map(|_| {
        let high = (0..2).any(|i| eff[i] && sc.effusion_high[i] - base.effusion_high[i] > EFFUSION_MARGIN);
        if high {
            Size::Large
        } else {
            Size::Small
        }
    });
    let dark = [0, 1].map(|i| sc.pneumothorax[i] - base.pneumothorax[i]);
    let pneumothorax = Side::BOTH.into_iter().find(|s| {
        let (i, o) = (s.index(), s.other().index());
        dark[i] > PNEUMOTHORAX_MARGIN && dark[i] - dark[o] > PNEUMOTHORAX_ASYMMETRY
    });
    let consolidation = Lobe::ALL
        .iter()
        .enumerate()
        // Lower-lobe windows are not read once an effusion is seen (its fluid fills them).
        .filter(|(_, l)| !(l.zone() == Zone::Lower && effusion.is_some()))
        .map(|(k, l)| (*l, sc.consolidation[k] - base.consolidation[k]))
        .filter(|(_, c)| *c > CONSOLIDATION_MARGIN)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(l, _)| l);
    Measurement { scores: sc, cardiomegaly, effusion, effusion_size, pneumothorax, consolidation }
}

/// Measures one image given on the analysis grid.
pub fn measure(grid: &Grid) -> Measurement {
    decide(scores(grid), baseline())
}

/// Measures a row-major gray image (values in [0, 1]) of any size.
pub fn measure_gray(pixels: &[f32], width: usize, height: usize) -> Measurement {
    measure(&Grid::from_gray(pixels, width, height))
}
