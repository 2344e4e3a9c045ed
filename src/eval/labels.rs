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
//! Other policies (`LabelPolicy`: each column alone, uncertain as missing, positive or negative)
//! are offered by `eval classify --label-policy`. A phantom's labels (`roentgen phantom`) state four
//! findings exactly and are read as they are (`phantom_targets`).
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

/// How CheXpert's values become targets. `Xrv` is TorchXRayVision's (the module comment); the
/// others read each column alone, as the CheXpert paper's uncertainty policies do: `Columns` keeps
/// −1 missing, `UOnes` makes it positive, `UZeros` negative. Under all of them a blank is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LabelPolicy {
    /// XRV's: "No Finding" = 1 makes every pathology negative; −1 and blank are missing.
    #[default]
    Xrv,
    /// Each column as it is: 1 positive, 0 negative, −1 missing.
    Columns,
    /// As `columns`, but −1 (uncertain) counts as positive.
    UOnes,
    /// As `columns`, but −1 (uncertain) counts as negative.
    UZeros,
}

/// The 18 targets of one manifest row's `labels` object (CheXpert name → 1, 0 or −1; a blank is
/// absent) under XRV's policy: `Some(true)` positive, `Some(false)` negative, `None` missing. A
/// name that is not a CheXpert finding, or a value other than 1, 0 and −1, is an error naming it.
pub fn xrv_targets(labels: &Map<String, Value>) -> Result<[Option<bool>; 18]> {
    chexpert_targets(labels, LabelPolicy::Xrv)
}

/// The (name, value) pairs of a row's CheXpert labels, checked: a name that is not one of the 14
/// CheXpert findings, or a value other than 1, 0 and −1, is an error naming it.
pub fn chexpert_values(labels: &Map<String, Value>) -> Result<Vec<(&str, f64)>> {
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
    Ok(values)
}

/// [`xrv_targets`] under any policy.
pub fn chexpert_targets(labels: &Map<String, Value>, policy: LabelPolicy) -> Result<[Option<bool>; 18]> {
    let values = chexpert_values(labels)?;
    let healthy = policy == LabelPolicy::Xrv && values.iter().any(|&(n, v)| n == "No Finding" && v == 1.0);
    let mut targets = [None; 18];
    for (chexpert, xrv) in CHEXPERT_TO_XRV {
        let value = values.iter().find(|(n, _)| *n == chexpert).map(|&(_, v)| v);
        targets[xrv_index(xrv)] = if healthy { Some(false) } else { column_target(value, policy) };
    }
    Ok(targets)
}

/// One CheXpert column's target: 1 positive, 0 negative, −1 (uncertain) by `policy`, blank missing.
fn column_target(value: Option<f64>, policy: LabelPolicy) -> Option<bool> {
    match value {
        Some(v) if v == 1.0 => Some(true),
        Some(v) if v == 0.0 => Some(false),
        Some(_) => match policy {
            LabelPolicy::UOnes => Some(true),
            LabelPolicy::UZeros => Some(false),
            LabelPolicy::Xrv | LabelPolicy::Columns => None,
        },
        None => None,
    }
}

fn xrv_index(name: &str) -> usize {
    XRV_PATHOLOGIES.iter().position(|p| *p == name).expect("every mapped name is an XRV output")
}

/// The findings a phantom's labels (`roentgen phantom`'s "labels": `no_finding`, `cardiomegaly`,
/// `pleural_effusion`, `pneumothorax`, `consolidation`) state, with their XRV output. A phantom's
/// label is exact: each of these four is known, positive or negative, in every phantom; every
/// other output is missing (a phantom neither has nor lacks, say, a fracture: it was never drawn).
pub const PHANTOM_TO_XRV: [(&str, &str); 4] = [
    ("cardiomegaly", "Cardiomegaly"),
    ("pleural_effusion", "Effusion"),
    ("pneumothorax", "Pneumothorax"),
    ("consolidation", "Consolidation"),
];

/// The 18 targets of a phantom's labels object (see [`PHANTOM_TO_XRV`]): a finding is positive
/// when its field is `true` or an object (the side and size), negative when `false` or null.
pub fn phantom_targets(labels: &Map<String, Value>) -> Result<[Option<bool>; 18]> {
    let mut targets = [None; 18];
    for (field, xrv) in PHANTOM_TO_XRV {
        let present = match labels.get(field) {
            Some(Value::Bool(b)) => *b,
            Some(Value::Object(_)) => true,
            Some(Value::Null) => false,
            Some(v) => bail!("phantom label {field:?} is {v}: expected true/false, null or an object"),
            None => bail!("phantom labels have no {field:?} field (expected all of no_finding, cardiomegaly, pleural_effusion, pneumothorax, consolidation)"),
        };
        targets[xrv_index(xrv)] = Some(present);
    }
    Ok(targets)
}

/// The targets of any row's `labels`: a phantom's (it has a `no_finding` field) or CheXpert's
/// (under `policy`; a phantom's labels have no uncertainty, so no policy applies to them).
pub fn row_targets(labels: &Value, policy: LabelPolicy) -> Result<[Option<bool>; 18]> {
    let Value::Object(map) = labels else {
        bail!("labels are {labels}: expected an object (CheXpert names → 1/0/-1, or a phantom's labels)")
    };
    if map.contains_key("no_finding") {
        phantom_targets(map)
    } else {
        chexpert_targets(map, policy)
    }
}

/// The phantom findings a classifier can be trained on (`roentgen phantom`'s classes and their
/// findings without the side).
pub const PHANTOM_FINDINGS: [&str; 5] = ["no-finding", "cardiomegaly", "effusion", "pneumothorax", "consolidation"];

/// The paper's Table 5 label set (CheXpert names).
pub const TABLE5_LABELS: [&str; 6] =
    ["Cardiomegaly", "Edema", "Pleural Effusion", "Pneumonia", "Pneumothorax", "No Finding"];

/// Whether a row's labels are a phantom's (they list its `classes`).
pub fn is_phantom(labels: &Value) -> bool {
    labels.get("classes").is_some_and(Value::is_array)
}

/// Targets for the label names `names` (a classifier's outputs) from one row's labels. CheXpert
/// rows: each name's column under `policy` (XRV's: No Finding = 1 makes every other name negative;
/// −1 and blank missing). Phantom rows: every name is known, positive when the phantom's findings
/// (its classes, and their findings without the side, e.g. `effusion` for `effusion-left`) hold
/// it. A name that is neither a CheXpert column nor a phantom finding is an error naming it.
pub fn named_targets(labels: &Value, names: &[String], policy: LabelPolicy) -> Result<Vec<Option<bool>>> {
    let Value::Object(map) = labels else {
        bail!("labels are {labels}: expected an object (CheXpert names → 1/0/-1, or a phantom's labels)")
    };
    if is_phantom(labels) {
        let findings = crate::eval::text_knn::report_findings(labels)?;
        return names
            .iter()
            .map(|n| {
                let sided = ["-right", "-left", "-bilateral"].iter().any(|s| n.ends_with(s));
                if !PHANTOM_FINDINGS.contains(&n.as_str()) && !sided {
                    bail!("label {n:?} is not a phantom finding (expected one of {}, or one with -right, -left or -bilateral)", PHANTOM_FINDINGS.join(", "));
                }
                Ok(Some(findings.contains(n)))
            })
            .collect();
    }
    let values = chexpert_values(map)?;
    let healthy = policy == LabelPolicy::Xrv && values.iter().any(|&(n, v)| n == "No Finding" && v == 1.0);
    names
        .iter()
        .map(|n| {
            if !CHEXPERT_TO_XRV.iter().any(|(c, _)| c == n) && !CHEXPERT_UNMAPPED.contains(&n.as_str()) {
                bail!("label {n:?} is not a CheXpert finding (expected one of the 14 columns of mimic-cxr-2.0.0-chexpert)");
            }
            let value = values.iter().find(|(c, _)| c == n).map(|&(_, v)| v);
            Ok(if healthy && n != "No Finding" { Some(false) } else { column_target(value, policy) })
        })
        .collect()
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

    /// The policies by their definitions, on one row: Edema uncertain, Effusion positive, Atelectasis
    /// negative, No Finding set (contradicting Effusion, as labeller output can).
    #[test]
    fn policies_treat_uncertain_and_no_finding_as_defined() {
        let row = obj(json!({"Edema": -1.0, "Pleural Effusion": 1.0, "Atelectasis": 0.0, "No Finding": 1.0}));
        let at = |p, name| chexpert_targets(&row, p).unwrap()[xrv_index(name)];
        for name in ["Edema", "Effusion", "Atelectasis", "Cardiomegaly"] {
            assert_eq!(at(LabelPolicy::Xrv, name), Some(false), "{name}");
        }
        assert_eq!(at(LabelPolicy::Xrv, "Mass"), None);
        let expect =
            [(LabelPolicy::Columns, None), (LabelPolicy::UOnes, Some(true)), (LabelPolicy::UZeros, Some(false))];
        for (p, edema) in expect {
            assert_eq!(at(p, "Edema"), edema, "{p:?}");
            assert_eq!(
                (at(p, "Effusion"), at(p, "Atelectasis"), at(p, "Cardiomegaly")),
                (Some(true), Some(false), None)
            );
        }
    }

    #[test]
    fn named_targets_follow_the_policy_and_read_phantoms() {
        let names: Vec<String> = ["Edema", "No Finding", "Pneumonia"].map(String::from).to_vec();
        let row = json!({"Edema": -1.0, "No Finding": 1.0});
        assert_eq!(named_targets(&row, &names, LabelPolicy::Xrv).unwrap(), [Some(false), Some(true), Some(false)]);
        assert_eq!(named_targets(&row, &names, LabelPolicy::UOnes).unwrap(), [Some(true), Some(true), None]);
        let phantom = json!({"no_finding": false, "classes": ["effusion-left"]});
        let names: Vec<String> = ["effusion", "effusion-left", "cardiomegaly"].map(String::from).to_vec();
        assert_eq!(named_targets(&phantom, &names, LabelPolicy::Xrv).unwrap(), [Some(true), Some(true), Some(false)]);
        let e = named_targets(&phantom, &["Edema".to_string()], LabelPolicy::Xrv).unwrap_err().to_string();
        assert!(e.contains("\"Edema\" is not a phantom finding"), "{e}");
    }

    #[test]
    fn phantom_labels_state_their_four_findings() {
        let l = json!({"no_finding": false, "cardiomegaly": true, "cardiothoracic_ratio": 0.6,
            "pleural_effusion": {"side": "left", "size": "small"}, "pneumothorax": null, "consolidation": null,
            "classes": ["cardiomegaly", "effusion_left"]});
        let t = row_targets(&l, LabelPolicy::Xrv).unwrap();
        let known: Vec<_> = (0..18).filter_map(|k| t[k].map(|v| (XRV_PATHOLOGIES[k], v))).collect();
        assert_eq!(
            known,
            [("Consolidation", false), ("Pneumothorax", false), ("Effusion", true), ("Cardiomegaly", true)]
        );
        let mut bad = l.clone();
        bad.as_object_mut().unwrap().remove("pneumothorax");
        let e = row_targets(&bad, LabelPolicy::Xrv).unwrap_err().to_string();
        assert!(e.contains("no \"pneumothorax\" field"), "{e}");
        let e = row_targets(&json!([1, 0]), LabelPolicy::Xrv).unwrap_err().to_string();
        assert!(e.contains("expected an object"), "{e}");
    }
}
