//! What a phantom shows: the findings (cardiomegaly, pleural effusion, pneumothorax, focal
//! consolidation), drawn at random with a fixed class mix, and their labels.
//!
//! Sides are the patient's: on a PA radiograph the patient's right is on the viewer's left, so a
//! right-sided finding sits at x < midline in the image.

use crate::rng::splitmix::SplitMix64;
use serde::Serialize;
use serde_json::{json, Value};

/// The patient's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Right,
    Left,
}

impl Side {
    pub const BOTH: [Side; 2] = [Side::Right, Side::Left];

    pub fn name(self) -> &'static str {
        match self {
            Side::Right => "right",
            Side::Left => "left",
        }
    }

    /// Image-space direction away from the midline: the patient's right is the image's left (−1).
    pub fn sign(self) -> f64 {
        match self {
            Side::Right => -1.0,
            Side::Left => 1.0,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn other(self) -> Side {
        match self {
            Side::Right => Side::Left,
            Side::Left => Side::Right,
        }
    }
}

/// Which hemithorax (or both) an effusion is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Laterality {
    Right,
    Left,
    Bilateral,
}

impl Laterality {
    pub fn name(self) -> &'static str {
        match self {
            Laterality::Right => "right",
            Laterality::Left => "left",
            Laterality::Bilateral => "bilateral",
        }
    }

    pub fn has(self, s: Side) -> bool {
        matches!(
            (self, s),
            (Laterality::Bilateral, _) | (Laterality::Right, Side::Right) | (Laterality::Left, Side::Left)
        )
    }

    pub fn from_sides(right: bool, left: bool) -> Option<Laterality> {
        match (right, left) {
            (true, true) => Some(Laterality::Bilateral),
            (true, false) => Some(Laterality::Right),
            (false, true) => Some(Laterality::Left),
            (false, false) => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
}

/// The lobes a focal consolidation is drawn in (the lingula stands for the left "middle lobe").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Lobe {
    #[serde(rename = "right upper lobe")]
    RightUpper,
    #[serde(rename = "right middle lobe")]
    RightMiddle,
    #[serde(rename = "right lower lobe")]
    RightLower,
    #[serde(rename = "left upper lobe")]
    LeftUpper,
    #[serde(rename = "lingula")]
    Lingula,
    #[serde(rename = "left lower lobe")]
    LeftLower,
}

/// Upper, middle (right middle lobe / lingula) or lower zone of a hemithorax.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Zone {
    Upper,
    Middle,
    Lower,
}

impl Lobe {
    pub const ALL: [Lobe; 6] =
        [Lobe::RightUpper, Lobe::RightMiddle, Lobe::RightLower, Lobe::LeftUpper, Lobe::Lingula, Lobe::LeftLower];

    pub fn name(self) -> &'static str {
        match self {
            Lobe::RightUpper => "right upper lobe",
            Lobe::RightMiddle => "right middle lobe",
            Lobe::RightLower => "right lower lobe",
            Lobe::LeftUpper => "left upper lobe",
            Lobe::Lingula => "lingula",
            Lobe::LeftLower => "left lower lobe",
        }
    }

    pub fn side(self) -> Side {
        match self {
            Lobe::RightUpper | Lobe::RightMiddle | Lobe::RightLower => Side::Right,
            _ => Side::Left,
        }
    }

    pub fn zone(self) -> Zone {
        match self {
            Lobe::RightUpper | Lobe::LeftUpper => Zone::Upper,
            Lobe::RightMiddle | Lobe::Lingula => Zone::Middle,
            Lobe::RightLower | Lobe::LeftLower => Zone::Lower,
        }
    }

    pub fn from_parts(side: Side, zone: Zone) -> Lobe {
        match (side, zone) {
            (Side::Right, Zone::Upper) => Lobe::RightUpper,
            (Side::Right, Zone::Middle) => Lobe::RightMiddle,
            (Side::Right, Zone::Lower) => Lobe::RightLower,
            (Side::Left, Zone::Upper) => Lobe::LeftUpper,
            (Side::Left, Zone::Middle) => Lobe::Lingula,
            (Side::Left, Zone::Lower) => Lobe::LeftLower,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Effusion {
    pub laterality: Laterality,
    pub size: Size,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pneumothorax {
    pub side: Side,
    pub size: Size,
}

/// The findings of one phantom. All `false`/`None` is "no finding".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Findings {
    pub cardiomegaly: bool,
    pub effusion: Option<Effusion>,
    pub pneumothorax: Option<Pneumothorax>,
    pub consolidation: Option<Lobe>,
}

impl Findings {
    pub fn is_normal(&self) -> bool {
        *self == Findings::default()
    }

    /// Evaluation classes, e.g. ["cardiomegaly", "effusion-bilateral"]; ["no-finding"] when normal.
    pub fn classes(&self) -> Vec<String> {
        let mut c = Vec::new();
        if self.cardiomegaly {
            c.push("cardiomegaly".to_string());
        }
        if let Some(e) = self.effusion {
            c.push(format!("effusion-{}", e.laterality.name()));
        }
        if let Some(p) = self.pneumothorax {
            c.push(format!("pneumothorax-{}", p.side.name()));
        }
        if let Some(l) = self.consolidation {
            c.push(format!("consolidation-{}", l.side().name()));
        }
        if c.is_empty() {
            c.push("no-finding".to_string());
        }
        c
    }

    /// Whether the combination is one the generator draws. Excluded, because a radiograph (and the
    /// measurement) cannot separate them reliably: pneumothorax with any other finding; a lower-lobe
    /// consolidation with an effusion (the fluid fills the lower zones) or beside an enlarged heart; a
    /// middle-lobe / lingula consolidation beside an enlarged heart.
    pub fn is_drawable(&self) -> bool {
        if self.pneumothorax.is_some() {
            return !self.cardiomegaly && self.effusion.is_none() && self.consolidation.is_none();
        }
        if let Some(l) = self.consolidation {
            if self.cardiomegaly && l.zone() != Zone::Upper {
                return false;
            }
            if self.effusion.is_some() && l.zone() == Zone::Lower {
                return false;
            }
        }
        true
    }

    /// The labels as they go into the manifest ("labels") and the PNG's "labels" text chunk.
    pub fn labels_json(&self, ctr: f64) -> Value {
        json!({
            "no_finding": self.is_normal(),
            "cardiomegaly": self.cardiomegaly,
            "cardiothoracic_ratio": (ctr * 1000.0).round() / 1000.0,
            "pleural_effusion": self.effusion.map(|e| json!({"side": e.laterality.name(), "size": e.size.name()})),
            "pneumothorax": self.pneumothorax.map(|p| json!({"side": p.side.name(), "size": p.size.name()})),
            "consolidation": self.consolidation.map(|l| json!({"lobe": l.name(), "side": l.side().name()})),
            "classes": self.classes(),
        })
    }
}

fn pick<T: Copy>(rng: &mut SplitMix64, xs: &[T]) -> T {
    xs[(rng.next_u64() % xs.len() as u64) as usize]
}

fn size(rng: &mut SplitMix64) -> Size {
    pick(rng, &[Size::Small, Size::Large])
}

fn effusion(rng: &mut SplitMix64) -> Effusion {
    Effusion { laterality: pick(rng, &[Laterality::Right, Laterality::Left, Laterality::Bilateral]), size: size(rng) }
}

/// The class mix, in percent of images: 25 no finding, 17 cardiomegaly, 21 pleural effusion (right,
/// left, bilateral equally; small or large), 16 pneumothorax (right or left; small or large), 21
/// consolidation (the six lobes equally: three right, three left). Of the cardiomegaly, effusion and
/// consolidation images, 30% get a second finding of another of those kinds, drawn until the pair is
/// [`Findings::is_drawable`] (cardiomegaly with effusion is the commonest pairing, as in heart failure).
/// Over many draws each image class then holds: no finding 25%, cardiomegaly 21%, effusion right,
/// left and bilateral 8–9% each, pneumothorax right and left 8% each, consolidation right and left 13%
/// each; 14% of images have two findings (tests/phantom.rs checks the mix).
pub fn draw_findings(rng: &mut SplitMix64) -> Findings {
    let mut f = Findings::default();
    let u = rng.next_f64() * 100.0;
    let primary = if u < 25.0 {
        return f;
    } else if u < 42.0 {
        f.cardiomegaly = true;
        0
    } else if u < 63.0 {
        f.effusion = Some(effusion(rng));
        1
    } else if u < 79.0 {
        f.pneumothorax = Some(Pneumothorax { side: pick(rng, &Side::BOTH), size: size(rng) });
        return f;
    } else {
        f.consolidation = Some(pick(rng, &Lobe::ALL));
        2
    };
    if rng.next_f64() < 0.3 {
        let second = (primary + 1 + (rng.next_u64() % 2) as usize) % 3;
        for _ in 0..64 {
            let mut g = f;
            match second {
                0 => g.cardiomegaly = true,
                1 => g.effusion = Some(effusion(rng)),
                _ => g.consolidation = Some(pick(rng, &Lobe::ALL)),
            }
            if g.is_drawable() {
                return g;
            }
        }
    }
    f
}
