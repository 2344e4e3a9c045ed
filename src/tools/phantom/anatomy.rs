//! The anatomy model: a PA chest radiograph described in normalised image coordinates (x, y in
//! [0, 1], y down; the patient's right on the image's left), so one phantom renders identically at any
//! size and the measurement reads any size through the same geometry.
//!
//! Each hemithorax's lung field is bounded by
//! - above and laterally, the apex and the inner chest wall: a quarter ellipse from the apex (`apex`)
//!   out to full width (`hw` from the midline) at `y_wide`, then nearly straight down to the
//!   costophrenic angle; medially the lung top falls away from the apex's dome towards the
//!   mediastinum;
//! - below, the hemidiaphragm: a parabolic dome peaking at `dome[s]` a little medial of the middle of
//!   the hemithorax and falling to the costophrenic angle `cp[s]` at the chest wall (the right dome
//!   sits higher than the left, as the liver pushes it up);
//! - medially, the mediastinum (with the aortic knob on the left) and, lower down, the heart: rows of
//!   a super-ellipse, rounder above (atria, great vessels) than below (ventricles), reaching further
//!   to the patient's left than to the right and leaning further left towards the apex (the cardiac
//!   axis); it sits on the diaphragm.
//!
//! Findings change what fills these outlines (see [`Phantom::draw`] and `render`): fluid below a
//! meniscus in a costophrenic recess, an air rim inside the chest wall, a patchy opacity at a lobe's
//! centre ([`Geometry::lobe_centre`]), a wider heart.
//!
//! The cardiothoracic ratio is the heart's greatest width over the lungs' greatest inner width
//! (2·hw), as a radiologist measures it; > 0.5 is cardiomegaly.

use super::spec::{Findings, Lobe, Side, Size, Zone};
use crate::rng::splitmix::SplitMix64;

/// Where the heart sits: its transverse extent is ctr · 2hw, split `right_frac` to the patient's
/// right of the midline and the rest to the left; vertically centred at `yc` (its widest level)
/// with half-height `half_h`; its lower part is hidden below the diaphragm.
#[derive(Clone, Copy, Debug)]
pub struct Heart {
    pub ctr: f64,
    pub right_frac: f64,
    pub yc: f64,
    pub half_h: f64,
}

/// The thorax of one phantom (normalised coordinates).
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// Midline x.
    pub cx: f64,
    /// Lung half-width at its widest (inner chest wall to midline).
    pub hw: f64,
    /// Lung apex y.
    pub apex: f64,
    /// Level at which the lungs reach full width.
    pub y_wide: f64,
    /// Hemidiaphragm dome peak y, indexed by [`Side::index`] (right, left).
    pub dome: [f64; 2],
    /// Costophrenic angle y (where the diaphragm meets the chest wall), per side.
    pub cp: [f64; 2],
    pub heart: Heart,
}

/// Normal heart sizes (cardiothoracic ratio) are drawn from this range, enlarged ones from
/// [`CTR_ENLARGED`]: both well clear of the clinical cut-off 0.5, so the label is unambiguous.
pub const CTR_NORMAL: (f64, f64) = (0.39, 0.46);
pub const CTR_ENLARGED: (f64, f64) = (0.56, 0.63);
/// The clinical definition of cardiomegaly: cardiothoracic ratio above one half.
pub const CTR_CUTOFF: f64 = 0.5;

/// Fraction of the hemithorax width (from the midline) where the dome peaks.
const DOME_PEAK: f64 = 0.42;
/// Fraction of the hemithorax width (from the midline) of the apex's highest point.
const APEX_PEAK: f64 = 0.45;

impl Geometry {
    /// The average thorax, about which phantoms vary and on which the measurement lays its windows.
    pub fn nominal() -> Geometry {
        Geometry {
            cx: 0.5,
            hw: 0.36,
            apex: 0.12,
            y_wide: 0.50,
            dome: [0.665, 0.69],
            cp: [0.775, 0.79],
            heart: Heart { ctr: 0.5, right_frac: 0.4, yc: 0.585, half_h: 0.14 },
        }
    }

    /// A nominal thorax moved by small random amounts (position, width, diaphragm heights, heart
    /// position), with the given cardiothoracic ratio.
    pub fn jittered(rng: &mut SplitMix64, ctr: f64) -> Geometry {
        let n = Geometry::nominal();
        let mut j = |a: f64| (rng.next_f64() * 2.0 - 1.0) * a;
        let dd = j(0.01);
        Geometry {
            cx: n.cx + j(0.01),
            hw: n.hw + j(0.012),
            apex: n.apex + j(0.012),
            y_wide: n.y_wide + j(0.015),
            dome: [n.dome[0] + dd + j(0.006), n.dome[1] + dd + j(0.006)],
            cp: [n.cp[0] + dd + j(0.006), n.cp[1] + dd + j(0.006)],
            heart: Heart {
                ctr,
                right_frac: n.heart.right_frac + j(0.02),
                yc: n.heart.yc + j(0.01),
                half_h: n.heart.half_h + j(0.01),
            },
        }
    }

    /// Signed distance from the midline towards side `s` (positive inside that hemithorax).
    pub fn d(&self, s: Side, x: f64) -> f64 {
        s.sign() * (x - self.cx)
    }

    /// Image x of a point at distance `d` from the midline on side `s`.
    pub fn x(&self, s: Side, d: f64) -> f64 {
        self.cx + s.sign() * d
    }

    /// Inner chest wall: lung half-width at height y (0 above the apex).
    pub fn d_out(&self, y: f64) -> f64 {
        if y <= self.apex {
            0.0
        } else if y < self.y_wide {
            let t = (self.y_wide - y) / (self.y_wide - self.apex);
            self.hw * (1.0 - t * t).max(0.0).sqrt()
        } else {
            self.hw * (1.0 - 0.04 * ((y - self.y_wide) / (self.cp[1] - self.y_wide)).clamp(0.0, 1.5))
        }
    }

    /// Elliptical radius: 1 on the chest wall / apex outline, 0 at the midline (used for the
    /// pneumothorax band, which follows the outline).
    pub fn r(&self, s: Side, x: f64, y: f64) -> f64 {
        let u = self.d(s, x) / self.hw;
        if y < self.y_wide {
            let v = (self.y_wide - y) / (self.y_wide - self.apex);
            (u * u + v * v).sqrt()
        } else {
            u
        }
    }

    /// The hemidiaphragm's height at distance d from the midline.
    pub fn dia(&self, s: Side, d: f64) -> f64 {
        let i = s.index();
        let peak = DOME_PEAK * self.hw;
        let k = (self.cp[i] - self.dome[i]) / (self.hw - peak).powi(2);
        self.dome[i] + k * (d - peak).powi(2)
    }

    /// Heart half-extent towards side s at height y (0 outside the heart's rows).
    pub fn heart_d(&self, s: Side, y: f64) -> f64 {
        let h = &self.heart;
        let t = (y - h.yc) / h.half_h;
        if t.abs() >= 1.0 {
            return 0.0;
        }
        // The cardiac axis: the silhouette leans to the patient's left towards the apex.
        let right = h.right_frac - 0.06 * t;
        let frac = if s == Side::Right { right } else { 1.0 - right };
        // Rounded above (the atria and great vessels), fuller below (the ventricles), curving in to
        // the apex so the costophrenic angles stay clear.
        let p = if t < 0.0 { 2.0 } else { 2.2 };
        h.ctr * 2.0 * self.hw * frac * (1.0 - t.abs().powf(p)).powf(1.0 / p)
    }

    /// Mediastinal half-width towards side s at height y (the aortic knob bulges to the left).
    pub fn mediastinum_d(&self, s: Side, y: f64) -> f64 {
        let base = 0.05 + 0.02 * ((y - 0.2) / 0.3).clamp(0.0, 1.0);
        let knob = if s == Side::Left { 0.035 * (-((y - 0.33) / 0.035).powi(2)).exp() } else { 0.0 };
        base + knob
    }

    /// Medial lung border: the larger of the mediastinum and the heart.
    pub fn d_in(&self, s: Side, y: f64) -> f64 {
        self.mediastinum_d(s, y).max(self.heart_d(s, y))
    }

    /// How far (normalised units, positive inside) the point is within side s's lung field: the
    /// smallest margin to the chest wall, the mediastinum/heart and the diaphragm.
    pub fn lung_margin(&self, s: Side, x: f64, y: f64) -> f64 {
        let d = self.d(s, x);
        let lateral = self.d_out(y) - d;
        let medial = d - self.d_in(s, y);
        let below = self.dia(s, d) - y;
        // The apex is a dome over the middle of the hemithorax: medially the lung top falls towards
        // the mediastinum (at about the level of the clavicles' heads).
        let peak = APEX_PEAK * self.hw;
        let top = self.apex + if d < peak { 1.2 * ((peak - d) / self.hw).powi(2) } else { 0.0 };
        let above = y - top;
        lateral.min(medial).min(below).min(above)
    }

    /// The centre of a lobe's consolidation (distance from the midline, y).
    pub fn lobe_centre(&self, lobe: Lobe) -> (f64, f64) {
        let s = lobe.side();
        match lobe.zone() {
            Zone::Upper => (0.52 * self.hw, 0.255),
            Zone::Middle => (0.54 * self.hw, 0.425),
            Zone::Lower => (0.76 * self.hw, 0.57 + (self.dome[s.index()] - 0.665)),
        }
    }
}

/// Continuous parameters of a finding's appearance.
#[derive(Clone, Copy, Debug)]
pub struct EffusionShape {
    /// Height of the fluid's upper surface where it meets the chest wall (the meniscus's top).
    pub wall_y: f64,
    /// How far the surface falls from the chest wall to the midline (the meniscus's curvature).
    pub drop: f64,
}

#[derive(Clone, Copy, Debug)]
pub struct PneumothoraxShape {
    /// Width of the air rim between the chest wall and the visceral pleural line (normalised).
    pub rim: f64,
}

#[derive(Clone, Debug)]
pub struct ConsolidationShape {
    /// Blobs (centre x, y in image coordinates, radius) whose union is the patchy opacity.
    pub blobs: Vec<(f64, f64, f64)>,
    pub density: f64,
}

/// Everything needed to render one phantom; drawn once, rendered at any size.
#[derive(Clone, Debug)]
pub struct Phantom {
    pub findings: Findings,
    pub geom: Geometry,
    pub effusion: [Option<EffusionShape>; 2],
    pub pneumothorax: Option<(Side, PneumothoraxShape)>,
    pub consolidation: Option<ConsolidationShape>,
    /// Seed of the anatomical details (vessel trees, rib spacing) and of the pixel noise.
    pub detail_seed: u64,
    /// Exposure: contrast gain and brightness offset applied to the whole image.
    pub gain: f64,
    pub offset: f64,
}

fn uniform(rng: &mut SplitMix64, (a, b): (f64, f64)) -> f64 {
    a + (b - a) * rng.next_f64()
}

impl Phantom {
    /// Draws the appearance of the given findings on a randomly varied thorax.
    pub fn draw(findings: Findings, rng: &mut SplitMix64) -> Phantom {
        let ctr = uniform(rng, if findings.cardiomegaly { CTR_ENLARGED } else { CTR_NORMAL });
        let geom = Geometry::jittered(rng, ctr);
        let mut effusion = [None, None];
        if let Some(e) = findings.effusion {
            for s in Side::BOTH {
                if e.laterality.has(s) {
                    let cp = geom.cp[s.index()];
                    effusion[s.index()] = Some(match e.size {
                        // Fills the costophrenic recess: the surface meets the chest wall 13–15% of
                        // the image height above the angle and the dome a little lateral of its peak.
                        Size::Small => EffusionShape { wall_y: cp - uniform(rng, (0.13, 0.15)), drop: 0.07 },
                        // Up to mid-thorax at the wall, over the dome medially.
                        Size::Large => EffusionShape { wall_y: uniform(rng, (0.46, 0.51)), drop: 0.16 },
                    });
                }
            }
        }
        let pneumothorax = findings.pneumothorax.map(|p| {
            let rim = match p.size {
                Size::Small => uniform(rng, (0.07, 0.09)),
                Size::Large => uniform(rng, (0.12, 0.16)),
            };
            (p.side, PneumothoraxShape { rim })
        });
        let consolidation = findings.consolidation.map(|lobe| {
            let (dc, yc) = geom.lobe_centre(lobe);
            let s = lobe.side();
            let mut blobs = Vec::new();
            let main = uniform(rng, (0.05, 0.065));
            blobs.push((geom.x(s, dc + 0.01 * (rng.next_f64() - 0.5)), yc + 0.01 * (rng.next_f64() - 0.5), main));
            for _ in 0..3 {
                let a = rng.next_f64() * std::f64::consts::TAU;
                let rr = 0.035 * rng.next_f64();
                blobs.push((geom.x(s, dc + rr * a.cos()), yc + rr * a.sin() * 0.8, main * uniform(rng, (0.5, 0.75))));
            }
            ConsolidationShape { blobs, density: uniform(rng, (0.17, 0.21)) }
        });
        Phantom {
            findings,
            geom,
            effusion,
            pneumothorax,
            consolidation,
            detail_seed: rng.next_u64(),
            gain: uniform(rng, (0.92, 1.08)),
            offset: uniform(rng, (-0.03, 0.03)),
        }
    }

    /// The cardiothoracic ratio drawn.
    pub fn ctr(&self) -> f64 {
        self.geom.heart.ctr
    }
}

/// Fluid surface height at distance d from the midline: highest at the chest wall (the meniscus)
/// and falling medially, steeply only near the wall (cubic), so the fluid hugs the lateral costophrenic
/// recess before it covers the dome.
pub fn fluid_surface(g: &Geometry, e: &EffusionShape, d: f64) -> f64 {
    let u = (d / g.hw).clamp(0.0, 1.2);
    e.wall_y + e.drop * (1.0 - u * u * u)
}
