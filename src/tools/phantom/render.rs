//! Rasterises a [`Phantom`] at any size. Brightness is attenuation, as on a radiograph: air (outside
//! the body, the lungs, the trachea, a pneumothorax) is dark; soft tissue, fluid and bone are bright.
//!
//! Every structure is an analytic function of the normalised coordinates with edges softened over
//! about one pixel, so a phantom looks the same at 64 and at 256 pixels (only finer). The layers, in
//! order: the body (neck, shoulders, chest wall) in soft tissue; the abdomen below the diaphragm; the
//! mediastinum and heart (denser); the spine (vertebral bodies, discs, pedicles) and the trachea and
//! main bronchi (air); the lung fields (air: they take away most of the soft-tissue density); vessel
//! trees branching from each hilum and fading towards the periphery (the lung markings); posterior rib
//! arcs (falling laterally), fainter anterior ribs, the clavicles and the humeral heads; a gastric air
//! bubble under the left dome. Then the findings, then pixel noise and an exposure (gain, offset).

use super::anatomy::{fluid_surface, Geometry, Phantom};
use super::spec::Side;
use crate::rng::splitmix::SplitMix64;
use rayon::prelude::*;

fn smoothstep(e0: f64, e1: f64, x: f64) -> f64 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// A soft indicator of `margin > 0` whose edge spans `2e`.
fn inside(margin: f64, e: f64) -> f64 {
    smoothstep(-e, e, margin)
}

/// A band |δ| < half, edges softened over e.
fn band(delta: f64, half: f64, e: f64) -> f64 {
    inside(half - delta.abs(), e)
}

/// A vessel segment of the lung markings (image coordinates).
#[derive(Clone, Copy, Debug)]
struct Segment {
    a: (f64, f64),
    b: (f64, f64),
    width: f64,
    amp: f64,
}

impl Segment {
    fn dist2(&self, x: f64, y: f64) -> f64 {
        let (dx, dy) = (self.b.0 - self.a.0, self.b.1 - self.a.1);
        let l2 = dx * dx + dy * dy;
        let t = if l2 > 0.0 { (((x - self.a.0) * dx + (y - self.a.1) * dy) / l2).clamp(0.0, 1.0) } else { 0.0 };
        let (px, py) = (self.a.0 + t * dx - x, self.a.1 + t * dy - y);
        px * px + py * py
    }
}

/// Hilum of side s: where the pulmonary arteries enter the lung.
pub fn hilum(g: &Geometry, s: Side) -> (f64, f64) {
    (g.x(s, 0.085), 0.405)
}

/// Vessel tree of one lung: six trunks fanning from the hilum (apex to base), each forking four
/// times, thinner and fainter at every generation; branches stop at the lung's edge.
fn vessel_tree(g: &Geometry, s: Side, rng: &mut SplitMix64, out: &mut Vec<Segment>) {
    /// One vessel segment to draw from `from` at angle `th` (0 lateral, positive down), and the
    /// `depth` generations of forks below it.
    struct Branch {
        from: (f64, f64),
        th: f64,
        len: f64,
        width: f64,
        amp: f64,
        depth: u32,
    }
    fn grow(g: &Geometry, s: Side, rng: &mut SplitMix64, b: Branch, out: &mut Vec<Segment>) {
        let p = b.from;
        let q = (p.0 + s.sign() * b.len * b.th.cos(), p.1 + b.len * b.th.sin());
        if g.lung_margin(s, q.0, q.1) < -0.01 {
            return;
        }
        out.push(Segment { a: p, b: q, width: b.width, amp: b.amp });
        if b.depth == 0 {
            return;
        }
        for k in [-1.0, 1.0] {
            let dth = k * (0.28 + 0.3 * rng.next_f64());
            let len = b.len * (0.72 + 0.16 * rng.next_f64());
            let fork =
                Branch { from: q, th: b.th + dth, len, width: b.width * 0.74, amp: b.amp * 0.8, depth: b.depth - 1 };
            grow(g, s, rng, fork, out);
        }
    }
    let h = hilum(g, s);
    for i in 0..6 {
        // −115° (up) … +70° (down), 0° lateral.
        let th = (-115.0 + 37.0 * i as f64 + 10.0 * (rng.next_f64() - 0.5)).to_radians();
        let len = 0.06 + 0.02 * rng.next_f64();
        grow(g, s, rng, Branch { from: h, th, len, width: 0.0065, amp: 0.1, depth: 4 }, out);
    }
}

/// Precomputed anatomical detail (random but fixed per phantom).
struct Detail {
    vessels: Vec<Segment>,
    /// Posterior ribs: spine-end height per rib, per side.
    ribs: [Vec<f64>; 2],
    /// Vertebral period and phase.
    vert: (f64, f64),
}

fn detail(ph: &Phantom) -> Detail {
    let g = &ph.geom;
    let mut rng = SplitMix64::new(ph.detail_seed);
    let mut vessels = Vec::new();
    for s in Side::BOTH {
        vessel_tree(g, s, &mut rng, &mut vessels);
    }
    let spacing = 0.057 + 0.004 * (rng.next_f64() - 0.5);
    let first = g.apex - 0.005 + 0.01 * rng.next_f64();
    let ribs = [0, 1].map(|_| (0..10).map(|k| first + spacing * k as f64 + 0.006 * (rng.next_f64() - 0.5)).collect());
    let vert = (0.05 + 0.004 * rng.next_f64(), rng.next_f64());
    Detail { vessels, ribs, vert }
}

fn body_half_width(y: f64) -> f64 {
    0.13 + 0.34 * smoothstep(0.0, 0.13, y)
}

/// Renders the phantom as a `size`×`size` gray image, values in [0, 1], row-major.
pub fn render(ph: &Phantom, size: usize) -> Vec<f32> {
    let det = detail(ph);
    let mut img = vec![0f32; size * size];
    img.par_chunks_mut(size).enumerate().for_each(|(j, row)| {
        let y = (j as f64 + 0.5) / size as f64;
        for (i, px) in row.iter_mut().enumerate() {
            let x = (i as f64 + 0.5) / size as f64;
            *px = pixel(ph, &det, size, x, y) as f32;
        }
    });
    // Quantum noise, drawn in raster order so the image does not depend on the thread count.
    let mut rng = SplitMix64::new(ph.detail_seed ^ 0x6A09_E667_F3BC_C908);
    for v in img.iter_mut() {
        let n = 0.012 * rng.next_normal() as f64;
        let out = (*v as f64 + n - 0.45) * ph.gain + 0.45 + ph.offset;
        *v = out.clamp(0.0, 1.0) as f32;
    }
    img
}

/// The attenuation at one point (before noise and exposure).
fn pixel(ph: &Phantom, det: &Detail, size: usize, x: f64, y: f64) -> f64 {
    let g = &ph.geom;
    let e = (0.8 / size as f64).max(0.004);
    let ax = (x - g.cx).abs();
    let s = if x < g.cx { Side::Right } else { Side::Left };
    let d = ax;
    let si = s.index();

    // Body: soft tissue, a little thicker (brighter) centrally.
    let bw = body_half_width(y);
    let body = inside(bw - ax, e.max(0.008));
    let mut v = 0.035 + body * (0.545 + 0.06 * (1.0 - (ax / bw).min(1.0)));

    // Abdomen under the diaphragm (liver on the right a little denser); gastric bubble on the left.
    let below = inside(y - g.dia(s, d), e) * body;
    v += below * (0.07 + if s == Side::Right { 0.025 } else { 0.0 });
    if s == Side::Left {
        let (bx, by) = (0.17, g.dome[1] + 0.055);
        let q = ((d - bx) / 0.05).powi(2) + ((y - by) / 0.026).powi(2);
        v -= 0.2 * inside(1.0 - q, 0.3) * below;
    }

    // Mediastinum and heart.
    // The heart sits on the diaphragm: below it, only the abdomen.
    let heart = inside(g.heart_d(s, y) - d, e) * inside(g.dia(s, d) + 0.01 - y, e);
    let medi = inside(g.mediastinum_d(s, y) - d, e) * smoothstep(0.08, 0.16, y);
    v += body * (0.07 * heart.max(medi) + 0.03 * heart);

    // Spine: vertebral bodies separated by discs, with pedicles; faint behind the heart.
    let spine = inside(0.034 - d, e) * body;
    if spine > 0.0 {
        let (period, phase) = det.vert;
        let t = (y / period + phase).fract();
        let disc = band(t - 0.5, 0.09, 0.05);
        let ped = {
            let dy = (t - 0.35) * period;
            let q = ((d - 0.024) / 0.008).powi(2) + (dy / 0.011).powi(2);
            inside(1.0 - q, 0.35)
        };
        let behind_heart = 1.0 - 0.45 * heart.max(medi);
        v += spine * behind_heart * (0.05 - 0.03 * disc + 0.035 * ped);
    }

    // Trachea and main bronchi (air).
    let carina = 0.37;
    let trachea = inside(0.016 - d, e) * inside(carina - y, e) * smoothstep(0.0, 0.04, y);
    let bronchus = {
        let seg = Segment { a: (g.cx, carina), b: (g.x(s, 0.075), 0.415), width: 0.0, amp: 0.0 };
        inside(0.011 - seg.dist2(x, y).sqrt(), e)
    };
    v -= 0.1 * trachea.max(0.7 * bronchus) * body;

    // Lung fields.
    let lung = inside(g.lung_margin(s, x, y), e) * body;

    // Findings that change the lung's content (computed first: they hide markings and ribs).
    let mut fluid = 0.0;
    if let Some(es) = &ph.effusion[si] {
        let surf = fluid_surface(g, es, d);
        fluid = smoothstep(surf - 0.012, surf + 0.018, y) * lung;
    }
    let (mut rim_air, mut pleural_line, mut collapsed) = (0.0, 0.0, 0.0);
    if let Some((ps, shape)) = &ph.pneumothorax {
        if *ps == s {
            let taper = 1.0 - 0.6 * ((y - 0.42) / (g.cp[si] - 0.42)).clamp(0.0, 1.0);
            let line_r = 1.0 - shape.rim * taper / g.hw;
            let r = g.r(s, x, y);
            let er = e / g.hw;
            rim_air = smoothstep(line_r - er, line_r + er, r) * lung;
            collapsed = lung - rim_air;
            let sigma = (0.45 / size as f64).max(0.004);
            pleural_line = (0.004 / sigma) * (-((r - line_r) * g.hw / sigma).powi(2) / 2.0).exp() * lung;
        }
    }
    let visible = (1.0 - rim_air) * (1.0 - 0.75 * fluid);

    // Air takes away most of the soft-tissue density; the bases keep a little more (breasts, dome).
    v -= (0.37 - 0.035 * smoothstep(0.45, 0.8, y)) * lung;

    // Lung markings: vessels (Gaussian cross-section at least half a pixel wide) and the hilum.
    let mut mark = 0.0;
    if lung > 0.0 {
        for sg in &det.vessels {
            let w = sg.width.max(0.55 / size as f64);
            let cut = 9.0 * w * w;
            let (minx, maxx) = (sg.a.0.min(sg.b.0), sg.a.0.max(sg.b.0));
            let (miny, maxy) = (sg.a.1.min(sg.b.1), sg.a.1.max(sg.b.1));
            if x < minx - 3.0 * w || x > maxx + 3.0 * w || y < miny - 3.0 * w || y > maxy + 3.0 * w {
                continue;
            }
            let d2 = sg.dist2(x, y);
            if d2 < cut {
                // Widened to half a pixel at low resolution, with its density kept (partial volume).
                mark += sg.amp * (sg.width / w) * (-d2 / (2.0 * w * w)).exp();
            }
        }
        let (hx, hy) = hilum(g, s);
        let hq = ((x - hx) / 0.03).powi(2) + ((y - hy) / 0.045).powi(2);
        mark += 0.08 * (-hq).exp();
    }
    v += mark.min(0.18) * lung * visible;

    // Bones: posterior ribs (arcs falling laterally), anterior ribs (faint, falling medially),
    // clavicles, humeral heads. More conspicuous over the lungs than over soft tissue.
    let u = d / g.hw;
    let mut bone = 0.0;
    if (0.03..1.1 * g.hw).contains(&d) {
        let ends = smoothstep(0.03, 0.06, d) * (1.0 - smoothstep(1.02 * g.hw, 1.1 * g.hw, d));
        for (k, &y0) in det.ribs[si].iter().enumerate() {
            let yr = y0 - 0.06 * u + 0.22 * u * u;
            let half = 0.0105 + 0.0007 * k as f64;
            if (y - yr).abs() < half + 2.0 * e {
                bone += 0.065 * band(y - yr, half, e) * ends;
            }
        }
        if u > 0.3 {
            for k in 0..5 {
                let ya = 0.30 + 0.075 * k as f64 - 0.12 * (u - 0.3);
                bone += 0.035 * band(y - ya, 0.011, e) * smoothstep(0.3, 0.45, u);
            }
        }
    }
    if (0.02..0.36).contains(&d) {
        let t = (d - 0.03) / 0.3;
        let yc = 0.2 - 0.075 * t + 0.012 * (std::f64::consts::TAU * t).sin();
        bone += 0.15 * band(y - yc, 0.013, e) * smoothstep(0.02, 0.04, d) * (1.0 - smoothstep(0.33, 0.36, d));
    }
    let hq = ((d - 0.49) / 0.075).powi(2) + ((y - 0.135) / 0.075).powi(2);
    bone += 0.13 * inside(1.0 - hq, 0.15);
    // Fluid hides bone partly; a pneumothorax does not (the ribs are in the chest wall).
    v += bone * body * (0.3 + 0.7 * lung) * (1.0 - 0.6 * fluid);

    // Findings.
    // Effusion: fluid fills the lung below its meniscus (`fluid_surface`, highest at the chest
    // wall), with a soft upper edge where the layer thins and more density with depth; it hides the
    // markings, most of the ribs, the costophrenic angle and the hemidiaphragm's outline.
    // Pneumothorax: outside the visceral pleural line (elliptic radius 1 − rim/hw, the rim narrowing
    // towards the base as air rises in an erect patient) the pleural space is air — darker than lung
    // and without markings; the collapsed lung inside is a little denser; the line itself is a thin
    // bright ridge (σ 0.004, or half a pixel with its density kept).
    // Consolidation: a patchy opacity, the union of a few flat-topped blobs at the lobe's centre,
    // confined to the lung.
    if fluid > 0.0 {
        let surf_depth = (y - fluid_surface(g, ph.effusion[si].as_ref().unwrap(), d)).clamp(0.0, 0.12);
        v += fluid * (0.36 + 0.3 * surf_depth);
    }
    if rim_air > 0.0 || pleural_line > 0.0 {
        v += -0.1 * rim_air + 0.03 * collapsed + 0.13 * pleural_line;
    }
    if let Some(c) = &ph.consolidation {
        let mut m: f64 = 0.0;
        for &(bx, by, r) in &c.blobs {
            let q = ((x - bx).powi(2) + (y - by).powi(2)) / (r * r);
            m = m.max((-q * q).exp());
        }
        if m > 0.0 {
            // Patchy: an interference pattern modulates the density ±15%.
            let patch = 0.85 + 0.15 * ((x * 91.0).sin() * (y * 77.0).cos());
            v += c.density * m * patch * inside(g.lung_margin(c_side(ph), x, y), e) * body;
        }
    }
    v
}

fn c_side(ph: &Phantom) -> Side {
    ph.findings.consolidation.map(|l| l.side()).unwrap_or(Side::Right)
}
