//! Impression sentences in radiology language, several phrasings per finding, size and side, drawn
//! at random (deterministically from the phantom's generator), so a text-conditioned model sees the
//! variety of wording real impressions have. [`super::parse`] reads every phrasing back.

use super::spec::{Effusion, Findings, Laterality, Lobe, Pneumothorax, Size};
use crate::rng::splitmix::SplitMix64;

fn pick<'a>(rng: &mut SplitMix64, xs: &[&'a str]) -> &'a str {
    xs[(rng.next_u64() % xs.len() as u64) as usize]
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// Severity word for an enlarged heart by cardiothoracic ratio.
fn severity(ctr: f64) -> &'static str {
    if ctr < 0.585 {
        "mild"
    } else if ctr < 0.615 {
        "moderate"
    } else {
        "marked"
    }
}

/// "No finding" impressions; some negate findings by name, which the parser must read as negated.
pub const NORMAL: [&str; 9] = [
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary abnormality.",
    "No acute intrathoracic process.",
    "Normal chest radiograph.",
    "No acute cardiopulmonary disease.",
    "No evidence of acute cardiopulmonary disease.",
    "The lungs are clear. No pleural effusion or pneumothorax.",
    "Normal heart size. Clear lungs without focal consolidation, effusion or pneumothorax.",
    "Heart size is normal. No focal consolidation, pleural effusion or pneumothorax.",
];

fn cardiomegaly(rng: &mut SplitMix64, ctr: f64, alone: bool) -> String {
    let sev = severity(ctr);
    let mut forms = vec![
        "Cardiomegaly.".to_string(),
        format!("{} cardiomegaly.", cap(sev)),
        "Enlarged cardiac silhouette.".to_string(),
        "The cardiac silhouette is enlarged.".to_string(),
        format!("{} enlargement of the cardiac silhouette.", cap(sev)),
        "The heart is enlarged.".to_string(),
    ];
    if alone {
        forms.push("Cardiomegaly without acute pulmonary process.".to_string());
        forms.push("Enlarged heart. No pleural effusion or pneumothorax.".to_string());
    }
    forms.swap_remove((rng.next_u64() % forms.len() as u64) as usize)
}

fn effusion(rng: &mut SplitMix64, e: Effusion) -> String {
    let size = e.size.name();
    match e.laterality {
        Laterality::Bilateral => {
            let mut forms = vec![
                format!("{} bilateral pleural effusions.", cap(size)),
                format!("Bilateral {size} pleural effusions."),
                format!("{} pleural effusions bilaterally.", cap(size)),
                format!("There are {size} bilateral pleural effusions."),
            ];
            forms.push(match e.size {
                Size::Small => {
                    "Blunting of both costophrenic angles, consistent with small bilateral effusions.".into()
                }
                Size::Large => "Large bilateral pleural effusions obscuring both hemidiaphragms.".into(),
            });
            forms.swap_remove((rng.next_u64() % forms.len() as u64) as usize)
        }
        lat => {
            let side = lat.name();
            let mut forms = vec![
                format!("{} {side} pleural effusion.", cap(size)),
                format!("{} {side}-sided pleural effusion.", cap(size)),
                format!("There is a {size} {side} pleural effusion."),
                format!("{} {side} effusion.", cap(size)),
            ];
            forms.push(match e.size {
                Size::Small => {
                    format!("Blunting of the {side} costophrenic angle, consistent with a small pleural effusion.")
                }
                Size::Large => format!("Large {side} pleural effusion obscuring the {side} hemidiaphragm."),
            });
            forms.swap_remove((rng.next_u64() % forms.len() as u64) as usize)
        }
    }
}

fn pneumothorax(rng: &mut SplitMix64, p: Pneumothorax) -> String {
    let (size, side) = (p.size.name(), p.side.name());
    let mut forms = vec![
        format!("{} {side} pneumothorax.", cap(size)),
        format!("{} {side}-sided pneumothorax.", cap(size)),
        format!("There is a {size} {side} pneumothorax."),
    ];
    forms.push(match p.size {
        Size::Small => format!("Small {side} apical pneumothorax."),
        Size::Large => format!("Large {side} pneumothorax with a visible pleural line."),
    });
    forms.swap_remove((rng.next_u64() % forms.len() as u64) as usize)
}

fn consolidation(rng: &mut SplitMix64, lobe: Lobe) -> String {
    let noun = format!("the {}", lobe.name());
    let adj = if lobe == Lobe::Lingula { "lingular".to_string() } else { lobe.name().to_string() };
    let forms = [
        format!("{} consolidation.", cap(&adj)),
        format!("Focal consolidation in {noun}."),
        format!("Consolidation in {noun}, concerning for pneumonia."),
        format!("{} opacity, likely pneumonia.", cap(&adj)),
        format!("Airspace opacity in {noun} consistent with pneumonia."),
        format!("{} pneumonia.", cap(&adj)),
    ];
    forms[(rng.next_u64() % forms.len() as u64) as usize].clone()
}

/// The impression for a phantom's findings (ctr: its cardiothoracic ratio, for the severity word).
pub fn impression(rng: &mut SplitMix64, f: &Findings, ctr: f64) -> String {
    if f.is_normal() {
        return pick(rng, &NORMAL).to_string();
    }
    if let Some(p) = f.pneumothorax {
        return pneumothorax(rng, p);
    }
    let n = f.cardiomegaly as usize + f.effusion.is_some() as usize + f.consolidation.is_some() as usize;
    // Heart failure pattern, said in one sentence half the time.
    if let (true, Some(e), None) = (f.cardiomegaly, f.effusion, f.consolidation) {
        if rng.next_f64() < 0.5 {
            let lat = match e.laterality {
                Laterality::Bilateral => format!("{} bilateral pleural effusions", e.size.name()),
                l => format!("{} {} pleural effusion", e.size.name(), l.name()),
            };
            let head = pick(rng, &["Cardiomegaly", "Enlarged cardiac silhouette", "Enlarged heart"]);
            return format!("{head} with {lat}.");
        }
    }
    let mut parts = Vec::new();
    if f.cardiomegaly {
        parts.push(cardiomegaly(rng, ctr, n == 1));
    }
    if let Some(e) = f.effusion {
        parts.push(effusion(rng, e));
    }
    if let Some(l) = f.consolidation {
        parts.push(consolidation(rng, l));
    }
    if parts.len() > 1 && rng.next_f64() < 0.5 {
        parts.reverse();
    }
    parts.join(" ")
}

/// `n` impressions for the given findings from a fixed generator (for tests and documentation).
pub fn samples(f: &Findings, ctr: f64, n: usize) -> Vec<String> {
    let mut rng = SplitMix64::new(0x5EED);
    (0..n).map(|_| impression(&mut rng, f, ctr)).collect()
}
