//! Ground-truth labels for the classifier evaluations (issue 16): CheXpert findings, as `roentgen
//! prepare mimic` writes them into a manifest's `labels`, turned into targets for TorchXRayVision's
//! 18 outputs.
//!
//! XRV's policy is the default, as its `MIMIC_Dataset` then `relabel_dataset` apply it
//! (torchxrayvision 1.5.7; tests/xrv_labels.rs checks against that code):
//! - a study labelled "No Finding" = 1 is negative (0) for every pathology the CheXpert labeller
//!   has, whatever its own columns say (blanks, −1 and 1 included);
//! - otherwise 1 is positive, 0 negative, and −1 (uncertain) and a blank are missing;
//! - "Pleural Effusion" is XRV's "Effusion"; the other CheXpert names are XRV's own;
//! - "No Finding", "Pleural Other" and "Support Devices" have no XRV output. XRV's NIH-only outputs
//!   (Infiltration, Emphysema, Fibrosis, Pleural_Thickening, Nodule, Mass, Hernia) have no CheXpert
//!   label and are always missing.
//!
//! A missing target takes no part in that class's AUROC (`auroc::class_auroc`).

use anyhow::{bail, Result};
use serde_json::{Map, Value};

/// The outputs of `densenet121-res224-all`, in order (`xrv.datasets.default_pathologies`).
pub const XRV_PATHOLOGIES: [&str; 18] = [
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
];

/// The CheXpert findings that XRV has an output for, with that output's name.
pub const CHEXPERT_TO_XRV: [(&str, &str); 11] = [
    ("Atelectasis", "Atelectasis"),
    ("Cardiomegaly", "Cardiomegaly"),
    ("Consolidation", "Consolidation"),
    ("Edema", "Edema"),
    ("Enlarged Cardiomediastinum", "Enlarged Cardiomediastinum"),
    ("Fracture", "Fracture"),
    ("Lung Lesion", "Lung Lesion"),
    ("Lung Opacity", "Lung Opacity"),
    ("Pleural Effusion", "Effusion"),
    ("Pneumonia", "Pneumonia"),
    ("Pneumothorax", "Pneumothorax"),
];

/// The CheXpert columns with no XRV output: read (so that a typo is caught) but not mapped.
pub const CHEXPERT_UNMAPPED: [&str; 3] = ["No Finding", "Pleural Other", "Support Devices"];

/// The 18 targets of one manifest row's `labels` object (CheXpert name → 1, 0 or −1; a blank is
/// absent) under XRV's policy: `Some(true)` positive, `Some(false)` negative, `None` missing. A
/// name that is not a CheXpert finding, or a value other than 1, 0 and −1, is an error naming it.
pub fn xrv_targets(labels: &Map<String, Value>) -> Result<[Option<bool>; 18]> {
    let mut values = Vec::with_capacity(labels.len());
    for (name, v) in labels {
        if !CHEXPERT_TO_XRV.iter().any(|(c, _)| c == name) && !CHEXPERT_UNMAPPED.contains(&name.as_str()) {
            bail!(
                "label {name:?} is not a CheXpert finding (expected one of the 14 columns of mimic-cxr-2.0.0-chexpert)"
            );
        }
        let value = match v.as_f64() {
            Some(x) if x == 1.0 || x == 0.0 || x == -1.0 => x,
            _ => bail!("label {name:?} is {v}: CheXpert labels are 1, 0 or -1 (blank: leave it out)"),
        };
        values.push((name.as_str(), value));
    }
    let healthy = values.iter().any(|&(n, v)| n == "No Finding" && v == 1.0);
    let mut targets = [None; 18];
    for (chexpert, xrv) in CHEXPERT_TO_XRV {
        let k = XRV_PATHOLOGIES.iter().position(|p| *p == xrv).expect("every mapped name is an XRV output");
        let value = values.iter().find(|(n, _)| *n == chexpert).map(|&(_, v)| v);
        targets[k] = match (healthy, value) {
            (true, _) => Some(false),
            (false, Some(v)) if v == 1.0 => Some(true),
            (false, Some(v)) if v == 0.0 => Some(false),
            _ => None, // −1 (uncertain) or blank
        };
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn bad_names_and_values_are_refused_by_name() {
        let e = xrv_targets(&obj(json!({"Pleural Efusion": 1.0}))).unwrap_err().to_string();
        assert!(e.contains("\"Pleural Efusion\" is not a CheXpert finding"), "{e}");
        let e = xrv_targets(&obj(json!({"Edema": 2.0}))).unwrap_err().to_string();
        assert!(e.contains("\"Edema\" is 2.0"), "{e}");
        let e = xrv_targets(&obj(json!({"Edema": "yes"}))).unwrap_err().to_string();
        assert!(e.contains("1, 0 or -1"), "{e}");
    }
}
