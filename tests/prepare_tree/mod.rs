//! The synthetic MIMIC-CXR-JPG tree in the published layout (MIMIC-CXR needs credentialed access)
//! and the helpers that run `roentgen prepare` on it, shared by tests/prepare.rs (the paper's
//! rules) and tests/prepare_checks.rs (refusing wrong paths, filters, outputs and ids).
#![allow(dead_code)]

use crate::common::*;
use roentgen::text::bpe::ClipTokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

pub fn tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_dir(&sd14_config()).unwrap()
}

/// A text of exactly `n` CLIP tokens (BOS/EOS included), spread over several report lines.
pub fn text_of_tokens(tok: &ClipTokenizer, n: usize) -> String {
    let words = ["left", "right", "lung", "base", "opacity", "effusion"];
    let mut s = String::from("Diffuse");
    let mut i = 0;
    while tok.encode(&s).tokens < n {
        s.push_str(if i % 9 == 8 { "\n " } else { " " });
        s.push_str(words[i % words.len()]);
        i += 1;
    }
    assert_eq!(tok.encode(&s).tokens, n, "could not build a {n}-token text");
    s
}

pub const STD_REPORT: &str = "                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with new onset ascites  // eval for infection
 
 TECHNIQUE:  Chest PA and lateral
 
 COMPARISON:  None.
 
 FINDINGS: 
 
 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.
 
 IMPRESSION: 
 
 No acute cardiopulmonary process.
";

// Report layouts seen in MIMIC-CXR (the impressions expected are in tests/prepare.rs, `expected_texts`).
pub const R_INLINE: &str = " FINDINGS: Edema.
 Impression:   Mild pulmonary edema,
   slightly improved since ___.
";
pub const R_NUMBERED: &str = " FINDINGS: see below

 IMPRESSION:
 
 1.  Moderate right pleural effusion.
 2.  Left basilar atelectasis.
 
 RECOMMENDATION(S):  Follow-up radiograph in 6 weeks.
";
pub const R_SPACED: &str = " COMPARISON: ___
 IMPRESSION :  Small left pleural effusion.
 NOTIFICATION:  Dr. ___ was paged at 10:30 a.m.
";
pub const R_ADDENDUM: &str = " IMPRESSION: Preliminary: no pneumothorax.

 ADDENDUM: reviewed
 IMPRESSION: Small apical pneumothorax on the right.
";
pub const R_WET_READ: &str = "                                 FINAL REPORT
 WET READ: ___ ___ 3:15 PM
  no ptx
 IMPRESSION: Left lower lobe consolidation
 concerning for pneumonia.
";

pub struct Study {
    subject: &'static str,
    study: &'static str,
    split: &'static str,
    views: Vec<&'static str>,
    /// None: no report file.
    report: Option<String>,
    labels: Vec<(&'static str, &'static str)>,
    /// Leave the JPEGs off the disk.
    no_jpeg: bool,
    /// No row in the CheXpert CSV.
    no_labels: bool,
}

pub fn st(
    subject: &'static str,
    study: &'static str,
    split: &'static str,
    views: &[&'static str],
    report: &str,
) -> Study {
    Study {
        subject,
        study,
        split,
        views: views.to_vec(),
        report: Some(report.to_string()),
        labels: vec![],
        no_jpeg: false,
        no_labels: false,
    }
}

pub fn with(mut s: Study, labels: &[(&'static str, &'static str)]) -> Study {
    s.labels = labels.to_vec();
    s
}

/// The synthetic collection; the comment says what each study tests. Expected impressions are in
/// `expected_texts` in tests/prepare.rs.
pub fn studies(tok: &ClipTokenizer) -> Vec<Study> {
    let nf = [("No Finding", "1.0")];
    let long78 = format!(" IMPRESSION:\n {}\n", text_of_tokens(tok, 78));
    let exact77 = format!(" FINDINGS: Patchy opacity.\n\n IMPRESSION:\n {}\n", text_of_tokens(tok, 77));
    let mut v = vec![
        // Standard layout; PA kept, LATERAL dropped by --views PA.
        with(st("10000032", "50414267", "train", &["PA", "LATERAL"], STD_REPORT), &nf),
        // Lower-case inline header, impression over two lines; AP.
        with(st("10000032", "53189527", "train", &["AP"], R_INLINE), &[("Edema", "1.0"), ("Pleural Effusion", "-1.0")]),
        // Numbered list, ended by RECOMMENDATION(S).
        with(
            st("10000764", "57375967", "train", &["PA"], R_NUMBERED),
            &[("Pleural Effusion", "1.0"), ("Atelectasis", "1.0"), ("No Finding", "")],
        ),
        // Space before the colon; NOTIFICATION (with a time's colon) ends it.
        with(st("11000011", "51029426", "train", &["PA"], R_SPACED), &[("Pleural Effusion", "1.0")]),
        // No IMPRESSION at all: dropped, not replaced by the findings.
        with(
            st("11000011", "52002000", "train", &["PA"], " FINDINGS:\n Enlarged heart.  No effusion.\n"),
            &[("Cardiomegaly", "1.0")],
        ),
        // 6 characters: dropped ("Slight").
        st("11000183", "50000001", "train", &["PA"], " IMPRESSION: Slight\n"),
        // 7 characters: kept.
        with(st("11000183", "50000002", "train", &["PA"], " IMPRESSION:\n Stable.\n"), &[("Support Devices", "1.0")]),
        // 78 tokens: dropped.
        st("12000001", "50000003", "train", &["PA"], &long78),
        // 77 tokens: kept.
        with(st("12000001", "50000004", "train", &["PA"], &exact77), &[("Lung Opacity", "1.0")]),
        // Two impressions (an addendum): the last one.
        with(st("13000001", "50000005", "train", &["PA"], R_ADDENDUM), &[("Pneumothorax", "1.0")]),
        // CONCLUSION is an impression; no CheXpert row at all.
        Study {
            no_labels: true,
            ..st("14000001", "50000006", "train", &["PA"], " CONCLUSION:\n Cardiomegaly without edema.\n")
        },
        // No report file.
        Study { report: None, ..st("18000001", "50000007", "train", &["PA"], "") },
        // JPEG missing from disk.
        Study {
            no_jpeg: true,
            ..st("18000001", "50000008", "train", &["PA"], " IMPRESSION: Clear lungs bilaterally.\n")
        },
        // Official validate split stays in training; WET READ header before the impression.
        with(
            st("10000888", "59000002", "validate", &["PA"], R_WET_READ),
            &[("Consolidation", "1.0"), ("Pneumonia", "1.0")],
        ),
        // Official test split, p10: not in train; in test.
        with(
            st("10000999", "59000001", "test", &["PA", "LATERAL"], " IMPRESSION: Large right pleural effusion.\n"),
            &[("Pleural Effusion", "1.0")],
        ),
        // p19: hold-out only.
        with(
            st("19000001", "58000001", "train", &["PA"], " Impression: Right lower lobe pneumonia.\n"),
            &[("Pneumonia", "1.0")],
        ),
        with(
            st("19000002", "58000002", "test", &["PA"], " IMPRESSION: Mild cardiomegaly.\n"),
            &[("Cardiomegaly", "1.0")],
        ),
        with(st("19000003", "58000003", "validate", &["LATERAL"], " IMPRESSION: No acute process.\n"), &nf),
    ];
    // More "No Finding" studies for the cap (with the first study: five in train).
    for (subject, study) in
        [("15000001", "50000011"), ("16000001", "50000012"), ("17000001", "50000013"), ("18000002", "50000014")]
    {
        v.push(with(st(subject, study, "train", &["PA"], STD_REPORT), &nf));
    }
    v
}

pub const FINDINGS: [&str; 14] = roentgen::tools::prepare::FINDINGS;

/// Writes the tree: JPEGs, reports, and the three CSVs (gzip'd when `gz`).
pub fn write_tree(root: &Path, studies: &[Study], gz: bool) {
    let mut meta = String::from(concat!(
        "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,",
        "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,",
        "PatientOrientationCodeSequence_CodeMeaning\n"
    ));
    let mut split = String::from("dicom_id,study_id,subject_id,split\n");
    let mut chex = format!("subject_id,study_id,{}\n", FINDINGS.join(","));
    for (k, s) in studies.iter().enumerate() {
        let dir = root.join("files").join(format!("p{}", &s.subject[..2])).join(format!("p{}", s.subject));
        for (i, view) in s.views.iter().enumerate() {
            let dicom =
                format!("{:08x}-{:08x}-{:08x}-{:08x}-{:08x}", 0x02aa804e + k, i, k * 7, 0x7bc16630u32, 0x4e384014u32);
            let (desc, rest) = ("CHEST (PA AND LAT)", "postero-anterior,Erect");
            meta += &format!(
                "{dicom},{},{},{desc},{view},3056,2544,21800506,213014.531,{desc},{rest}\n",
                s.subject, s.study
            );
            split += &format!("{dicom},{},{},{}\n", s.study, s.subject, s.split);
            if !s.no_jpeg {
                let p = dir.join(format!("s{}", s.study)).join(format!("{dicom}.jpg"));
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                image::GrayImage::from_fn(16, 12, |x, y| image::Luma([(x * 13 + y * 7) as u8])).save(&p).unwrap();
            }
        }
        if let Some(r) = &s.report {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("s{}.txt", s.study)), r).unwrap();
        }
        if !s.no_labels {
            let cells: Vec<&str> =
                FINDINGS.iter().map(|f| s.labels.iter().find(|(n, _)| n == f).map_or("", |(_, v)| *v)).collect();
            chex += &format!("{},{},{}\n", s.subject, s.study, cells.join(","));
        }
    }
    for (name, text) in [("metadata", meta), ("split", split), ("chexpert", chex)] {
        let base = root.join(format!("mimic-cxr-2.0.0-{name}.csv"));
        if gz {
            use std::io::Write;
            let f = std::fs::File::create(base.with_extension("csv.gz")).unwrap();
            let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::default());
            e.write_all(text.as_bytes()).unwrap();
            e.finish().unwrap();
        } else {
            std::fs::write(base, text).unwrap();
        }
    }
}

pub struct Run {
    pub rows: Vec<Value>,
    pub summary: Value,
    pub stdout: String,
}

pub fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

pub fn prepare(args: &[&str], out: &Path) -> Run {
    let tok = sd14_config().display().to_string();
    let mut full = vec!["prepare"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--out", out.to_str().unwrap(), "--tokenizer", &tok]);
    let (code, stdout, err) = run_cli(&full, None);
    assert_eq!(code, 0, "{full:?}: {err}");
    let stem = out.file_stem().unwrap().to_str().unwrap();
    let summary =
        serde_json::from_str(&std::fs::read_to_string(out.with_file_name(format!("{stem}.summary.json"))).unwrap())
            .unwrap();
    Run { rows: read_jsonl(out), summary, stdout }
}

pub fn mimic(root: &Path, extra: &[&str], out: &Path) -> Run {
    let mut a = vec!["mimic", "--root", root.to_str().unwrap()];
    a.extend_from_slice(extra);
    prepare(&a, out)
}

pub fn studies_of(r: &Run) -> Vec<String> {
    r.rows.iter().map(|x| x["study_id"].as_str().unwrap().to_string()).collect()
}

pub fn dropped(r: &Run, name: &str) -> u64 {
    r.summary["dropped"].as_array().unwrap().iter().find(|d| d["name"] == name).unwrap()["count"].as_u64().unwrap()
}

pub fn tree(gz: bool) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("mimic-cxr-jpg");
    write_tree(&root, &studies(&tokenizer()), gz);
    (dir, root)
}

pub fn walk(d: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

pub fn expect_error(args: &[&str], needles: &[&str]) {
    let tok = sd14_config().display().to_string();
    let mut full = vec!["prepare"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--tokenizer", &tok]);
    expect_cli_error(&full, needles);
}

pub fn iu(reports: &Path, extra: &[&str], out: &Path) -> Run {
    let mut a = vec!["iu-xray", "--reports", reports.to_str().unwrap()];
    a.extend_from_slice(extra);
    prepare(&a, out)
}
