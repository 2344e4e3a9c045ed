//! Reads the requested findings back from a prompt: every phrasing [`super::report`] writes, and the
//! usual variants of radiology wording (abbreviated lobes, "pneumothoraces", "left-sided",
//! "blunting of the costophrenic angle", "airspace opacity", negations such as "No pleural effusion or
//! pneumothorax" or "without focal consolidation").
//!
//! Per sentence: find the finding mentions (a mention is a keyword position), drop those inside a
//! negation's scope (a cue — "no", "not", "without", "negative for", "free of" — before the mention,
//! up to "but"/"however"/"although"/"with"), give each side word ("left", "right", "bilateral",
//! "both") to the nearest mention, and read size words ("small", "large", …) and lobes likewise.

use super::spec::{Findings, Laterality, Lobe, Side, Size, Zone};

/// What a prompt asks for. A field is `None` when the finding is not requested; inner `None`s are
/// details the prompt does not say (e.g. "Pleural effusion." has no side).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub cardiomegaly: bool,
    pub effusion: Option<(Option<Laterality>, Option<Size>)>,
    pub pneumothorax: Option<(Option<Side>, Option<Size>)>,
    pub consolidation: Option<(Option<Side>, Option<Lobe>)>,
    /// The prompt names no finding and says the study is normal ("No acute …", "Normal …", "clear",
    /// or only rules findings out: "No pleural effusion.").
    pub normal: bool,
}

impl Request {
    pub fn any_finding(&self) -> bool {
        self.cardiomegaly || self.effusion.is_some() || self.pneumothorax.is_some() || self.consolidation.is_some()
    }

    /// The evaluation classes the prompt belongs to ("effusion" without a side when none is said).
    pub fn classes(&self) -> Vec<String> {
        let mut c = Vec::new();
        if self.cardiomegaly {
            c.push("cardiomegaly".to_string());
        }
        if let Some((lat, _)) = self.effusion {
            c.push(lat.map_or("effusion".to_string(), |l| format!("effusion-{}", l.name())));
        }
        if let Some((side, _)) = self.pneumothorax {
            c.push(side.map_or("pneumothorax".to_string(), |s| format!("pneumothorax-{}", s.name())));
        }
        if let Some((side, _)) = self.consolidation {
            c.push(side.map_or("consolidation".to_string(), |s| format!("consolidation-{}", s.name())));
        }
        if c.is_empty() && self.normal {
            c.push("no-finding".to_string());
        }
        c
    }

    /// The findings, when the prompt fixes every detail the generator draws (side, size, lobe).
    pub fn findings(&self) -> Option<Findings> {
        let mut f = Findings { cardiomegaly: self.cardiomegaly, ..Findings::default() };
        if let Some((lat, size)) = self.effusion {
            f.effusion = Some(super::spec::Effusion { laterality: lat?, size: size? });
        }
        if let Some((side, size)) = self.pneumothorax {
            f.pneumothorax = Some(super::spec::Pneumothorax { side: side?, size: size? });
        }
        if let Some((_, lobe)) = self.consolidation {
            f.consolidation = Some(lobe?);
        }
        if !self.any_finding() && !self.normal {
            return None;
        }
        Some(f)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Cardiomegaly,
    Effusion,
    Pneumothorax,
    Consolidation,
}

const NEGATION: [&str; 5] = ["no", "not", "without", "negative", "free"];
const SCOPE_END: [&str; 5] = ["but", "however", "although", "though", "with"];
const CONNECTORS: [&str; 7] = ["with", "and", "without", "but", "however", "plus", "also"];
const NORMAL_CUES: [&str; 5] = ["normal", "clear", "unremarkable", "acute", "negative"];

fn kind_of(word: &str, words: &[&str]) -> Option<Kind> {
    let has = |w: &str| words.contains(&w);
    match word {
        "cardiomegaly" => Some(Kind::Cardiomegaly),
        w if w.starts_with("enlarg") && (has("cardiac") || has("heart") || has("cardiomediastinal")) => {
            Some(Kind::Cardiomegaly)
        }
        "effusion" | "effusions" => Some(Kind::Effusion),
        "costophrenic" if has("blunting") || has("blunted") => Some(Kind::Effusion),
        "pneumothorax" | "pneumothoraces" | "ptx" => Some(Kind::Pneumothorax),
        "consolidation" | "consolidations" | "consolidative" | "opacity" | "opacities" | "opacification"
        | "pneumonia" | "airspace" | "infiltrate" => Some(Kind::Consolidation),
        _ => None,
    }
}

fn size_of(word: &str) -> Option<Size> {
    match word {
        "small" | "trace" | "tiny" | "minimal" | "minute" => Some(Size::Small),
        "large" | "massive" | "big" | "huge" | "extensive" => Some(Size::Large),
        _ => None,
    }
}

/// Lobes named in a sentence, with the word position they were named at.
fn lobes(words: &[&str]) -> Vec<(usize, Lobe)> {
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let abbrev = match *w {
            "rul" => Some(Lobe::RightUpper),
            "rml" => Some(Lobe::RightMiddle),
            "rll" => Some(Lobe::RightLower),
            "lul" => Some(Lobe::LeftUpper),
            "lll" => Some(Lobe::LeftLower),
            "lingula" | "lingular" => Some(Lobe::Lingula),
            _ => None,
        };
        if let Some(l) = abbrev {
            out.push((i, l));
            continue;
        }
        let zone = match *w {
            "upper" | "apical" | "apex" => Some(Zone::Upper),
            "middle" | "mid" => Some(Zone::Middle),
            "lower" | "basilar" | "basal" | "base" | "bases" => Some(Zone::Lower),
            _ => None,
        };
        if let Some(z) = zone {
            let side = (i.saturating_sub(2)..i).rev().find_map(|j| match words[j] {
                "right" => Some(Side::Right),
                "left" => Some(Side::Left),
                _ => None,
            });
            if let Some(s) = side {
                // "left middle lobe" is the lingula.
                out.push((i, Lobe::from_parts(s, z)));
            } else if z == Zone::Middle && words.get(i + 1) == Some(&"lobe") {
                out.push((i, Lobe::RightMiddle));
            }
        }
    }
    out
}

/// Parses one prompt.
pub fn parse(prompt: &str) -> Request {
    let lower = prompt.to_lowercase().replace(['-', '/'], " ");
    let mut req = Request::default();
    let mut normal_cue = false;
    for sentence in lower.split(['.', ';', '\n']) {
        let words: Vec<&str> = sentence.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
        if words.is_empty() {
            continue;
        }
        normal_cue |= words.iter().any(|w| NORMAL_CUES.contains(w));
        // Mentions: every keyword position, with whether a negation cue governs it.
        let mut mentions: Vec<(usize, Kind)> = Vec::new();
        let mut negated = false;
        for (i, w) in words.iter().enumerate() {
            if NEGATION.contains(w) {
                negated = true;
            } else if SCOPE_END.contains(w) {
                negated = false;
            }
            if let Some(k) = kind_of(w, &words) {
                if negated {
                    normal_cue = true; // "No effusion.": a finding ruled out reads as normal
                } else {
                    mentions.push((i, k));
                }
            }
        }
        if mentions.is_empty() {
            continue;
        }
        // A modifier belongs to the next mention (adjectives precede their noun: "small bilateral
        // pleural effusions"), unless a connector ("with", "and", …) comes first or there is none;
        // then to the last one before it ("effusions bilaterally with …", "… the left hemidiaphragm").
        let owner = |i: usize| {
            let next =
                mentions.iter().find(|m| m.0 >= i).filter(|m| !words[i..m.0].iter().any(|w| CONNECTORS.contains(w)));
            next.or_else(|| mentions.iter().rev().find(|m| m.0 < i))
                .or_else(|| mentions.iter().find(|m| m.0 >= i))
                .map(|m| m.1)
        };
        let (mut right, mut left, mut both) = ([false; 4], [false; 4], [false; 4]);
        let mut size: [Option<Size>; 4] = [None; 4];
        let idx = |k: Kind| k as usize;
        for (i, w) in words.iter().enumerate() {
            let Some(k) = owner(i) else { continue };
            match *w {
                "right" => right[idx(k)] = true,
                "left" => left[idx(k)] = true,
                "bilateral" | "bilaterally" | "both" => both[idx(k)] = true,
                _ => {
                    if let Some(s) = size_of(w) {
                        size[idx(k)].get_or_insert(s);
                    }
                }
            }
        }
        let mut positive: Vec<Kind> = mentions.iter().map(|m| m.1).collect();
        positive.dedup();
        let lobes = lobes(&words);
        for &k in &positive {
            let i = idx(k);
            let lat = if both[i] { Some(Laterality::Bilateral) } else { Laterality::from_sides(right[i], left[i]) };
            let side = match lat {
                Some(Laterality::Right) => Some(Side::Right),
                Some(Laterality::Left) => Some(Side::Left),
                _ => None,
            };
            match k {
                Kind::Cardiomegaly => req.cardiomegaly = true,
                Kind::Effusion => {
                    let e = req.effusion.get_or_insert((None, None));
                    e.0 = e.0.or(lat);
                    e.1 = e.1.or(size[i]);
                }
                Kind::Pneumothorax => {
                    let p = req.pneumothorax.get_or_insert((None, None));
                    p.0 = p.0.or(side);
                    p.1 = p.1.or(size[i]);
                }
                Kind::Consolidation => {
                    let lobe = lobes.iter().map(|l| l.1).next();
                    let c = req.consolidation.get_or_insert((None, None));
                    c.1 = c.1.or(lobe);
                    c.0 = c.0.or(lobe.map(Lobe::side)).or(side);
                }
            }
        }
    }
    req.normal = !req.any_finding() && normal_cue;
    req
}
