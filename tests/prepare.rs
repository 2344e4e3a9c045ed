//! `roentgen prepare`: the paper's manifests from a synthetic MIMIC-CXR-JPG tree (tests/prepare_tree)
//! and from a real sample of the IU X-ray reports (tests/fixtures/iu-xray). Each filtering rule has a
//! case that is present only if the rule is missing (or absent only if the rule is wrong).

mod common;
mod prepare_tree;
use common::*;
use prepare_tree::*;
use roentgen::text::bpe::ClipTokenizer;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// study id → the impression the manifest must carry.
fn expected_texts(tok: &ClipTokenizer) -> BTreeMap<&'static str, String> {
    let n = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut m: BTreeMap<&str, String> = [
        ("50414267", "No acute cardiopulmonary process."),
        ("53189527", "Mild pulmonary edema, slightly improved since ___."),
        ("57375967", "1. Moderate right pleural effusion. 2. Left basilar atelectasis."),
        ("51029426", "Small left pleural effusion."),
        ("50000002", "Stable."),
        ("50000005", "Small apical pneumothorax on the right."),
        ("50000006", "Cardiomegaly without edema."),
        ("59000002", "Left lower lobe consolidation concerning for pneumonia."),
        ("59000001", "Large right pleural effusion."),
        ("58000001", "Right lower lobe pneumonia."),
        ("58000002", "Mild cardiomegaly."),
        ("58000003", "No acute process."),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_string()))
    .collect();
    m.insert("50000004", n(&text_of_tokens(tok, 77)));
    for s in ["50000011", "50000012", "50000013", "50000014"] {
        m.insert(s, "No acute cardiopulmonary process.".into());
    }
    m
}

#[test]
fn mimic_train_applies_every_rule() {
    let tok = tokenizer();
    let (dir, root) = tree(false);
    let r = mimic(&root, &[], &dir.path().join("train.jsonl"));
    println!("{}", r.stdout);
    let got = studies_of(&r);
    let want = [
        "50414267", "57375967", "59000002", "51029426", "50000002", "50000004", "50000005", "50000006", "50000011",
        "50000012", "50000013", "50000014",
    ];
    assert_eq!(
        got.iter().collect::<BTreeSet<_>>(),
        want.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>().iter().collect()
    );
    assert_eq!(got.len(), want.len(), "one row per image");
    // Rows in subject/study order; images exist; text as expected; only PA.
    let texts = expected_texts(&tok);
    for (row, next) in r.rows.iter().zip(r.rows.iter().skip(1)) {
        assert!(
            (row["subject_id"].as_str(), row["study_id"].as_str())
                <= (next["subject_id"].as_str(), next["study_id"].as_str())
        );
    }
    for row in &r.rows {
        let study = row["study_id"].as_str().unwrap();
        assert_eq!(row["text"].as_str().unwrap(), texts[study], "study {study}");
        assert_eq!(row["view"], "PA");
        let img = PathBuf::from(row["image"].as_str().unwrap());
        assert!(img.is_absolute() && img.is_file(), "{img:?}");
        assert!(img.ends_with(format!(
            "files/p{}/p{}/s{study}/{}.jpg",
            &row["subject_id"].as_str().unwrap()[..2],
            row["subject_id"].as_str().unwrap(),
            row["dicom_id"].as_str().unwrap()
        )));
        assert_eq!(row["tokens"].as_u64().unwrap() as usize, tok.encode(&texts[study]).tokens);
    }
    // Each rule's drop count (in images).
    for (name, n) in [
        ("split", 5),
        ("view", 2),
        ("missing_image", 1),
        ("missing_report", 1),
        ("no_impression", 1),
        ("too_short", 1),
        ("too_many_tokens", 1),
        ("no_finding_cap", 0),
        ("sample", 0),
    ] {
        assert_eq!(dropped(&r, name), n, "dropped {name}");
    }
    // Table 1's rows.
    let s = &r.summary;
    assert_eq!(s["images"], 12);
    assert_eq!(s["studies"], 12);
    assert_eq!(s["subjects"], 12);
    let count =
        |f: &str| s["findings"].as_array().unwrap().iter().find(|x| x["name"] == f).unwrap()["count"].as_u64().unwrap();
    for (f, n) in [
        ("No Finding", 5),
        ("Pleural Effusion", 2),
        ("Atelectasis", 1),
        ("Edema", 0),
        ("Pneumothorax", 1),
        ("Cardiomegaly", 0),
        ("Pneumonia", 1),
        ("Consolidation", 1),
        ("Support Devices", 1),
        ("Lung Opacity", 1),
    ] {
        assert_eq!(count(f), n, "{f}");
    }
    assert_eq!(s["findings"].as_array().unwrap().len(), 14);
    let chars: Vec<f64> = r.rows.iter().map(|x| x["text"].as_str().unwrap().chars().count() as f64).collect();
    let tokens: Vec<f64> = r.rows.iter().map(|x| tok.encode(x["text"].as_str().unwrap()).tokens as f64).collect();
    let ms = |v: &[f64]| {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        (m, (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt())
    };
    let close = |a: &Value, b: f64| assert!((a.as_f64().unwrap() - b).abs() < 1e-9, "{a} vs {b}");
    close(&s["text"]["chars_mean"], ms(&chars).0);
    close(&s["text"]["chars_std"], ms(&chars).1);
    close(&s["text"]["tokens_mean"], ms(&tokens).0);
    close(&s["text"]["tokens_std"], ms(&tokens).1);
    assert!(r.stdout.contains("Mean no. tok.") && r.stdout.contains("Pleural Effusion"), "{}", r.stdout);
    // Labels travel with the rows: uncertain (-1.0) and negatives kept, empty cells left out.
    let row = r.rows.iter().find(|x| x["study_id"] == "57375967").unwrap();
    assert_eq!(row["labels"]["Pleural Effusion"], 1.0);
    assert!(row["labels"].get("No Finding").is_none());
}

#[test]
fn mimic_gzip_csvs_give_the_same_manifest() {
    let (d1, plain) = tree(false);
    let (d2, gz) = tree(true);
    let a = mimic(&plain, &[], &d1.path().join("a.jsonl"));
    let b = mimic(&gz, &[], &d2.path().join("b.jsonl"));
    let strip = |r: &Run| {
        r.rows.iter().map(|x| (x["study_id"].clone(), x["dicom_id"].clone(), x["text"].clone())).collect::<Vec<_>>()
    };
    assert_eq!(strip(&a), strip(&b));
}

#[test]
fn mimic_views() {
    let (dir, root) = tree(false);
    let all = mimic(&root, &["--views", "all"], &dir.path().join("all.jsonl"));
    assert_eq!(all.rows.len(), 14, "PA + the LATERAL of 50414267 + the AP of 53189527");
    let ap_lat = mimic(&root, &["--views", "AP,lateral"], &dir.path().join("al.jsonl"));
    let views: Vec<_> =
        ap_lat.rows.iter().map(|x| (x["study_id"].as_str().unwrap(), x["view"].as_str().unwrap())).collect();
    assert_eq!(views, [("50414267", "LATERAL"), ("53189527", "AP")]);
    assert_eq!(ap_lat.rows[1]["text"], "Mild pulmonary edema, slightly improved since ___.");
    // A report's several views share its text.
    let pair: Vec<_> = all.rows.iter().filter(|x| x["study_id"] == "50414267").collect();
    assert_eq!(pair.len(), 2);
    assert_eq!(pair[0]["text"], pair[1]["text"]);
}

#[test]
fn mimic_splits_and_groups() {
    let (dir, root) = tree(false);
    let p19 = mimic(&root, &["--split", "p19", "--views", "all"], &dir.path().join("p19.jsonl"));
    assert_eq!(studies_of(&p19), ["58000001", "58000002", "58000003"], "p19 whatever its official split");
    let test = mimic(&root, &["--split", "test"], &dir.path().join("test.jsonl"));
    assert_eq!(studies_of(&test), ["59000001", "58000002"], "official test split, every group");
    assert!(test.rows.iter().all(|x| x["split"] == "test"));
    let test_all = mimic(&root, &["--split", "test", "--views", "all"], &dir.path().join("ta.jsonl"));
    assert_eq!(test_all.rows.len(), 3);
    let p10 = mimic(&root, &["--groups", "p10"], &dir.path().join("p10.jsonl"));
    assert_eq!(studies_of(&p10), ["50414267", "57375967", "59000002"]);
    assert!(p10.rows.iter().all(|x| x["group"] == "p10"));
}

#[test]
fn mimic_no_finding_cap_and_sample() {
    let (dir, root) = tree(false);
    let nf_studies = |r: &Run| {
        r.rows
            .iter()
            .filter(|x| x["labels"]["No Finding"] == 1.0)
            .map(|x| x["study_id"].as_str().unwrap().to_string())
            .collect::<BTreeSet<_>>()
    };
    let full = mimic(&root, &[], &dir.path().join("full.jsonl"));
    assert_eq!(nf_studies(&full).len(), 5);
    let capped = mimic(&root, &["--cap-no-finding", "2", "--seed", "3"], &dir.path().join("cap.jsonl"));
    assert_eq!(nf_studies(&capped).len(), 2);
    assert_eq!(capped.rows.len(), 12 - 3, "only No-Finding studies are removed");
    assert_eq!(dropped(&capped, "no_finding_cap"), 3);
    let again = mimic(&root, &["--cap-no-finding", "2", "--seed", "3"], &dir.path().join("cap2.jsonl"));
    assert_eq!(nf_studies(&again), nf_studies(&capped), "seeded");
    let seeds: BTreeSet<_> = (0..6)
        .map(|s| {
            nf_studies(&mimic(
                &root,
                &["--cap-no-finding", "2", "--seed", &s.to_string()],
                &dir.path().join(format!("s{s}.jsonl")),
            ))
        })
        .collect();
    assert!(seeds.len() > 1, "the seed picks which studies stay");
    let sample = mimic(&root, &["--sample", "5", "--seed", "1"], &dir.path().join("sample.jsonl"));
    assert_eq!(sample.rows.len(), 5);
    let all: BTreeSet<_> = studies_of(&full).into_iter().collect();
    assert!(studies_of(&sample).iter().all(|s| all.contains(s)));
    assert_eq!(dropped(&sample, "sample"), 7);
}

#[test]
fn mimic_reports_folder_and_summary_path() {
    let (dir, root) = tree(false);
    // Move the reports into a separate tree, as mimic-cxr-reports.zip unpacks.
    let reports = dir.path().join("reports");
    for e in walk(&root.join("files")) {
        if e.extension().is_some_and(|x| x == "txt") {
            let dst = reports.join(e.strip_prefix(&root).unwrap());
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::rename(&e, &dst).unwrap();
        }
    }
    // Without --reports every study lacks its report: an error, not an empty manifest.
    let none = dir.path().join("none.jsonl");
    expect_error(
        &["mimic", "--root", root.to_str().unwrap(), "--out", none.to_str().unwrap()],
        &["no images left", "removed by missing_report (--reports"],
    );
    assert!(!none.exists());
    let json = mimic(&root, &["--json", "--reports", reports.to_str().unwrap()], &dir.path().join("json.jsonl"));
    let v: Value = serde_json::from_str(json.stdout.trim()).expect("--json prints one JSON object");
    assert_eq!(v["images"], 12);
    let sp = dir.path().join("elsewhere/summary.json");
    let out = dir.path().join("sub/with.jsonl");
    let args = CliArgs::new(&["prepare", "mimic"]).opt("--root", &root).opt("--reports", &reports).opt("--out", &out);
    args.opt("--summary", &sp).opt("--tokenizer", sd14_config()).run_ok();
    assert_eq!(read_jsonl(&out).len(), 12);
    let s: Value = serde_json::from_str(&std::fs::read_to_string(sp).unwrap()).unwrap();
    assert_eq!(s["images"], 12);
}

#[test]
fn impression_extraction() {
    use roentgen::tools::prepare::report::impression;
    assert_eq!(impression(STD_REPORT).as_deref(), Some("No acute cardiopulmonary process."));
    assert_eq!(impression("FINDINGS: x\nIMPRESSION:No acute process.\n").as_deref(), Some("No acute process."));
    assert_eq!(impression(" FINDINGS AND IMPRESSION:\n Heart size normal.\n").as_deref(), Some("Heart size normal."));
    assert_eq!(impression(" impressions:\n   1. Edema.\n   2. Effusion.\n").as_deref(), Some("1. Edema. 2. Effusion."));
    assert_eq!(impression(" IMPRESSION:\n\n").as_deref(), None, "an empty impression is no impression");
    assert_eq!(impression(" FINDINGS: x\r\n IMPRESSION:\r\n Small effusion.\r\n").as_deref(), Some("Small effusion."));
    assert_eq!(impression(" FINDINGS: Impression of a mass.\n").as_deref(), None);
    assert_eq!(
        impression(" IMPRESSION: Lines and tubes: unchanged.\n Dr. ___ paged at 10:30.\n").as_deref(),
        Some("Lines and tubes: unchanged. Dr. ___ paged at 10:30."),
    );
}

#[test]
fn bad_input_gets_clear_errors() {
    let (dir, root) = tree(false);
    let out = dir.path().join("o.jsonl");
    let (r, o) = (root.to_str().unwrap(), out.to_str().unwrap());
    expect_error(&["mimic", "--root", r, "--out", o, "--views", ","], &["--views", "PA, AP, LATERAL"]);
    let chex = root.join("mimic-cxr-2.0.0-chexpert.csv");
    let good = std::fs::read_to_string(&chex).unwrap();
    std::fs::write(&chex, good.replacen(",1.0,", ",yes,", 1)).unwrap();
    expect_error(&["mimic", "--root", r, "--out", o], &["chexpert.csv", "line", "\"yes\""]);
    std::fs::write(&chex, good.replace("Edema,", "Oedema,")).unwrap();
    expect_error(&["mimic", "--root", r, "--out", o], &["chexpert.csv", "no column \"Edema\""]);
    std::fs::remove_file(&chex).unwrap();
    expect_error(&["mimic", "--root", r, "--out", o], &["mimic-cxr-2.0.0-chexpert.csv", "missing"]);
    std::fs::write(&chex, good).unwrap();
    std::fs::remove_dir_all(root.join("files")).unwrap();
    expect_error(&["mimic", "--root", r, "--out", o], &["none of the", "files/p10/p10000032/s50414267"]);
    assert!(!out.exists(), "no manifest on error");

    let iu = fixture("iu-xray");
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    expect_error(&["iu-xray", "--reports", empty.to_str().unwrap(), "--out", o], &["empty", "no .xml reports"]);
    std::fs::write(empty.join("7.xml"), "<eCitation><uId id=\"CXR7\"/>").unwrap();
    expect_error(&["iu-xray", "--reports", empty.to_str().unwrap(), "--out", o], &["7.xml", "not valid XML"]);
    expect_error(
        &["iu-xray", "--reports", iu.to_str().unwrap(), "--out", o, "--views", "PA"],
        &["--views PA", "--metadata"],
    );
    let junk = dir.path().join("junk.tgz");
    std::fs::write(&junk, b"not a tarball").unwrap();
    expect_error(&["iu-xray", "--reports", junk.to_str().unwrap(), "--out", o], &["junk.tgz"]);
}

/// The IU fixture, read by `make_sample.py` with xml.etree + transformers.
fn iu_expected() -> Vec<Value> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(fixture("iu-xray/expected.json")).unwrap()).unwrap();
    v["reports"].as_array().unwrap().clone()
}

#[test]
fn iu_xray_matches_an_independent_reading() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("png");
    let r = iu(&fixture("iu-xray"), &["--images", imgs.to_str().unwrap()], &dir.path().join("iu.jsonl"));
    println!("{}", r.stdout);
    let exp = iu_expected();
    let kept: Vec<(String, String, String)> = exp
        .iter()
        .filter(|e| e["verdict"] == "keep")
        .flat_map(|e| {
            e["images"].as_array().unwrap().iter().map(|id| {
                let id = id.as_str().unwrap();
                (
                    imgs.join(format!("{id}.png")).display().to_string(),
                    e["impression"].as_str().unwrap().to_string(),
                    e["file"].as_str().unwrap().to_string(),
                )
            })
        })
        .collect();
    let got: Vec<(String, String, String)> = r
        .rows
        .iter()
        .map(|x| {
            (
                x["image"].as_str().unwrap().into(),
                x["text"].as_str().unwrap().into(),
                x["report"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(got, kept);
    for (row, e) in r.rows.iter().zip(
        exp.iter()
            .filter(|e| e["verdict"] == "keep")
            .flat_map(|e| e["images"].as_array().unwrap().iter().map(move |_| e)),
    ) {
        assert_eq!(row["tokens"], e["tokens"]);
        assert_eq!(row["findings"], e["findings"]);
        assert_eq!(row["uid"], e["uid"]);
    }
    // Drops per rule, in images (reports for no_image), against the independent verdicts.
    let n = |v: &str| {
        exp.iter().filter(|e| e["verdict"] == v).map(|e| e["images"].as_array().unwrap().len().max(1)).sum::<usize>()
            as u64
    };
    for (name, v) in [
        ("no_image (reports)", "no_image"),
        ("no_section", "no_section"),
        ("too_short", "too_short"),
        ("too_many_tokens", "too_many_tokens"),
    ] {
        assert_eq!(dropped(&r, name), n(v), "{name}");
        assert!(n(v) > 0, "the fixture exercises {name}");
    }
    // The 77-token boundary is in the sample on both sides.
    assert!(exp.iter().any(|e| e["tokens"] == 77 && e["verdict"] == "keep"));
    assert!(exp.iter().any(|e| e["tokens"] == 78 && e["verdict"] == "too_many_tokens"));
    assert_eq!(r.summary["studies"].as_u64().unwrap(), exp.iter().filter(|e| e["verdict"] == "keep").count() as u64);
}

#[test]
fn iu_xray_tgz_same_as_folder() {
    let dir = tempfile::tempdir().unwrap();
    let tgz = dir.path().join("NLMCXR_reports.tgz");
    {
        let f = std::fs::File::create(&tgz).unwrap();
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(f, flate2::Compression::default()));
        b.append_dir_all("ecgen-radiology", fixture("iu-xray/ecgen-radiology")).unwrap();
        b.into_inner().unwrap().finish().unwrap();
    }
    let a = iu(&fixture("iu-xray"), &["--images", "/x"], &dir.path().join("a.jsonl"));
    let b = iu(&tgz, &["--images", "/x"], &dir.path().join("b.jsonl"));
    assert!(!a.rows.is_empty());
    assert_eq!(a.rows, b.rows);
}

#[test]
fn iu_xray_findings_ext_and_views() {
    let dir = tempfile::tempdir().unwrap();
    let exp = iu_expected();
    let f = iu(&fixture("iu-xray"), &["--section", "findings", "--image-ext", "jpg"], &dir.path().join("f.jsonl"));
    for row in &f.rows {
        assert_eq!(row["text"], row["findings"]);
        assert!(row["image"].as_str().unwrap().ends_with(&format!("{}.jpg", row["image_id"].as_str().unwrap())));
    }
    // Reports without FINDINGS are dropped; over-long findings are dropped though their impression is fine.
    let no_findings: Vec<&str> = exp
        .iter()
        .filter(|e| e["findings"] == "" && !e["images"].as_array().unwrap().is_empty())
        .map(|e| e["file"].as_str().unwrap())
        .collect();
    assert!(!no_findings.is_empty());
    assert!(f.rows.iter().all(|x| !no_findings.contains(&x["report"].as_str().unwrap())));
    assert!(dropped(&f, "no_section") > 0);
    // Views from a DICOM metadata CSV; "CXR1_1_IM-0001-3001" is spelled "CXR1_IM-0001-3001" there.
    let meta = dir.path().join("meta.csv");
    std::fs::write(
        &meta,
        "imageid,Other,View Position\nCXR1_IM-0001-3001,a,PA\nCXR1_IM-0001-4001,b,LL\nCXR2_IM-0652-1001,c,PA\n",
    )
    .unwrap();
    let pa =
        iu(&fixture("iu-xray"), &["--metadata", meta.to_str().unwrap(), "--views", "PA"], &dir.path().join("pa.jsonl"));
    let ids: Vec<&str> = pa.rows.iter().map(|x| x["image_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["CXR1_1_IM-0001-3001", "CXR2_IM-0652-1001"]);
    assert!(pa.rows.iter().all(|x| x["view"] == "PA"));
    assert!(dropped(&pa, "view") > 0);
}
