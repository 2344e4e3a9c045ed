//! `roentgen prepare` refuses what would give a wrong or empty manifest, before any work: paths that
//! do not exist (named by their flag), unknown groups and views, `--sample 0`, a selection that keeps
//! nothing (with the rule that emptied it), outputs that collide with each other or with an input or
//! are not regular files, and image ids that are paths. Also: the built-in tokenizer, from any folder.

mod common;
mod prepare_tree;
use common::*;
use prepare_tree::*;
use serde_json::Value;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// A synthetic MIMIC tree in a temporary folder, and the path of an o.jsonl there (not written):
/// (the folder, the tree's root, the output path).
fn tree_and_out() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let (dir, root) = tree(false);
    let out = dir.path().join("o.jsonl");
    (dir, root, out)
}

#[test]
fn default_tokenizer_is_built_in_and_works_from_any_folder() {
    // The default --tokenizer was a path relative to the checkout: from a data folder it failed.
    let (dir, root) = tree(false);
    let cwd = tempfile::tempdir().unwrap();
    let want = mimic(&root, &[], &dir.path().join("explicit.jsonl"));
    let (code, _, err) =
        run_cli_in(cwd.path(), &["prepare", "mimic", "--root", root.to_str().unwrap(), "--out", "rel.jsonl"]);
    assert_eq!(code, 0, "{err}");
    let got = read_jsonl(&cwd.path().join("rel.jsonl"));
    assert_eq!(got, want.rows, "the built-in tokenizer gives the manifest the SD v1.4 files give");
    let s: Value =
        serde_json::from_str(&std::fs::read_to_string(cwd.path().join("rel.summary.json")).unwrap()).unwrap();
    assert!(s["options"]["tokenizer"].as_str().unwrap().contains("built-in"), "{}", s["options"]);
    let (code, _, err) = run_cli_in(
        cwd.path(),
        &["prepare", "iu-xray", "--reports", fixture("iu-xray").to_str().unwrap(), "--out", "iu.jsonl"],
    );
    assert_eq!(code, 0, "{err}");
    let want = iu(
        &fixture("iu-xray"),
        &["--images", cwd.path().join("images").to_str().unwrap()],
        &dir.path().join("iu.jsonl"),
    );
    assert_eq!(read_jsonl(&cwd.path().join("iu.jsonl")), want.rows);
}

#[test]
fn missing_paths_name_their_flag() {
    let (dir, root, out) = tree_and_out();
    let (r, o) = (root.to_str().unwrap(), out.to_str().unwrap());
    let nowhere = dir.path().join("no-such");
    let nw = nowhere.to_str().unwrap();
    expect_error(&["mimic", "--root", nw, "--out", o], &["--root", nw, "no such folder"]);
    // A --reports typo used to drop every study as missing_report and write an empty manifest.
    expect_error(&["mimic", "--root", r, "--reports", nw, "--out", o], &["--reports", nw, "no such folder"]);
    expect_error(
        // The folder above files/ is wanted; pointing at files/ itself is the likely slip.
        &["mimic", "--root", r, "--out", o, "--reports", root.join("files").to_str().unwrap()],
        &["--reports", "no files/ folder"],
    );
    let iu_dir = fixture("iu-xray");
    expect_error(&["iu-xray", "--reports", nw, "--out", o], &["--reports", nw, "no such file or folder"]);
    expect_error(
        &["iu-xray", "--reports", iu_dir.to_str().unwrap(), "--out", o, "--metadata", nw, "--views", "PA"],
        &["--metadata", nw],
    );
    // --tokenizer given explicitly and wrong (expect_error appends a good one; clap keeps the last).
    let (code, _, err) = run_cli(&["prepare", "mimic", "--root", r, "--out", o, "--tokenizer", nw], None);
    assert_eq!(code, 1);
    assert!(err.contains("--tokenizer") && err.contains(nw), "{err}");
    assert!(!Path::new(o).exists(), "no manifest on error");
}

#[test]
fn unknown_groups_views_and_sample_zero_are_refused() {
    let (dir, root, out) = tree_and_out();
    let (r, o) = (root.to_str().unwrap(), out.to_str().unwrap());
    expect_error(&["mimic", "--root", r, "--out", o, "--groups", "p1O"], &["--groups", "\"p1o\"", "p10", "p19"]);
    expect_error(&["mimic", "--root", r, "--out", o, "--groups", "p20"], &["--groups", "p10, p11"]);
    // The error lists the views the metadata holds, with their image counts.
    expect_error(&["mimic", "--root", r, "--out", o, "--views", "PA,LATERL"], &["\"LATERL\"", "PA (", "LATERAL ("]);
    expect_error(&["mimic", "--root", r, "--out", o, "--sample", "0"], &["--sample 0"]);
    let meta = dir.path().join("meta.csv");
    std::fs::write(&meta, "imageid,View Position\nCXR1_IM-0001-3001,PA\nCXR1_IM-0001-4001,LL\n").unwrap();
    let iu_dir = fixture("iu-xray");
    let args = CliArgs::new(&["iu-xray"]).opt("--reports", &iu_dir).opt("--out", o).opt("--metadata", &meta);
    expect_error(&args.with(&["--views", "P"]).strs(), &["\"P\"", "PA (1)", "LL (1)"]);
    assert!(!Path::new(o).exists(), "no manifest on error");
}

#[test]
fn an_empty_selection_fails_and_names_the_rule() {
    let (_dir, root, out) = tree_and_out();
    let (r, o) = (root.to_str().unwrap(), out.to_str().unwrap());
    // p19 has PA and LATERAL images only: the view rule removes the last ones.
    expect_error(
        &["mimic", "--root", r, "--out", o, "--split", "p19", "--views", "AP"],
        &["no images left", "split", "the last were removed by view (--views AP)"],
    );
    expect_error(
        &["mimic", "--root", r, "--out", o, "--max-tokens", "2"],
        &["no images left", "view (--views PA) 2", "too_many_tokens (--max-tokens 2)", "removed by too_many_tokens"],
    );
    expect_error(
        &["iu-xray", "--reports", fixture("iu-xray").to_str().unwrap(), "--out", o, "--min-chars", "100000"],
        &["no images left", "reports", "removed by too_short (--min-chars 100000)"],
    );
    assert!(!out.exists(), "no manifest for an empty selection");
    // Reports that are elsewhere than --root (here: nowhere) leave nothing: the message says to look at --reports.
    for e in walk(&root.join("files")) {
        if e.extension().is_some_and(|x| x == "txt") {
            std::fs::remove_file(e).unwrap();
        }
    }
    expect_error(&["mimic", "--root", r, "--out", o], &["missing_report (--reports", "removed by missing_report"]);
}

fn mkfifo(p: &Path) {
    let st = std::process::Command::new("mkfifo").arg(p).status().expect("mkfifo");
    assert!(st.success());
}

#[test]
fn outputs_are_checked_before_any_work() {
    let (dir, root) = tree(false);
    let r = root.to_str().unwrap();
    let out = dir.path().join("m.jsonl");
    std::fs::write(&out, "an earlier manifest\n").unwrap();
    let o = out.to_str().unwrap();
    // The summary on the manifest, spelled the same, through `..`, or through a link.
    let sub = dir.path().join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    let link = dir.path().join("link.jsonl");
    std::os::unix::fs::symlink(&out, &link).unwrap();
    let dotdot = sub.join("../m.jsonl");
    for s in [o, dotdot.to_str().unwrap(), link.to_str().unwrap()] {
        expect_error(&["mimic", "--root", r, "--out", o, "--summary", s], &["--summary", "same file", "--out"]);
    }
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "an earlier manifest\n", "the manifest is untouched");
    // Not regular files: a folder, a FIFO (as --out, as --summary, and as the default summary path).
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let folder = dir.path().join("folder");
    std::fs::create_dir_all(&folder).unwrap();
    expect_error(&["mimic", "--root", r, "--out", folder.to_str().unwrap()], &["--out", "is a folder"]);
    expect_error(&["mimic", "--root", r, "--out", fifo.to_str().unwrap()], &["--out", "not a regular file"]);
    expect_error(
        &["mimic", "--root", r, "--out", o, "--summary", fifo.to_str().unwrap()],
        &["--summary", "not a regular file"],
    );
    std::fs::create_dir_all(dir.path().join("x.summary.json")).unwrap();
    expect_error(
        &["mimic", "--root", r, "--out", dir.path().join("x.jsonl").to_str().unwrap()],
        &["summary", "x.summary.json", "is a folder"],
    );
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO is still a FIFO");
    // Checked before the work: a broken CSV is not even read.
    std::fs::write(root.join("mimic-cxr-2.0.0-chexpert.csv"), "garbage").unwrap();
    expect_error(&["mimic", "--root", r, "--out", folder.to_str().unwrap()], &["--out", "is a folder"]);
    // An output on an input: the metadata CSV would be replaced by the summary.
    let meta = root.join("mimic-cxr-2.0.0-metadata.csv");
    let before = std::fs::read(&meta).unwrap();
    expect_error(
        &["mimic", "--root", r, "--out", o, "--summary", meta.to_str().unwrap()],
        &["is the input", "metadata"],
    );
    assert_eq!(std::fs::read(&meta).unwrap(), before);
    let iu_meta = dir.path().join("iu-meta.csv");
    std::fs::write(&iu_meta, "imageid,View Position\n").unwrap();
    expect_error(
        &[
            "iu-xray",
            "--reports",
            fixture("iu-xray").to_str().unwrap(),
            "--metadata",
            iu_meta.to_str().unwrap(),
            "--out",
            iu_meta.to_str().unwrap(),
        ],
        &["--out", "is the input --metadata"],
    );
}

#[test]
fn a_symlinked_manifest_is_written_through_the_link() {
    // What a careful user expects of `--out link`: the file it points at is replaced, the link stays.
    let (dir, root) = tree(false);
    let target = dir.path().join("target.jsonl");
    std::fs::write(&target, "old\n").unwrap();
    let link = dir.path().join("link.jsonl");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let r = mimic(&root, &[], &link);
    assert_eq!(r.rows.len(), 12);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(read_jsonl(&target), r.rows);
}

#[test]
fn ids_that_are_paths_are_refused() {
    // IU: a parentImage id with `..` or a separator would point a row outside --images.
    let dir = tempfile::tempdir().unwrap();
    let reports = dir.path().join("reports");
    copy_dir(&fixture("iu-xray/ecgen-radiology"), &reports);
    let o = dir.path().join("o.jsonl");
    let o = o.to_str().unwrap();
    let victim = walk(&reports)
        .into_iter()
        .find(|p| std::fs::read_to_string(p).unwrap().contains("<parentImage id=\""))
        .unwrap();
    let good = std::fs::read_to_string(&victim).unwrap();
    for bad in ["../../etc/passwd", "/etc/passwd", "..", "a\\b"] {
        let xml = good.replacen("<parentImage id=\"", &format!("<parentImage id=\"{bad}\" x=\""), 1);
        std::fs::write(&victim, xml).unwrap();
        let name = victim.file_name().unwrap().to_str().unwrap();
        expect_error(
            &["iu-xray", "--reports", reports.to_str().unwrap(), "--out", o],
            &[name, &format!("{bad:?}"), "parentImage"],
        );
    }
    std::fs::write(&victim, good).unwrap();
    expect_error(
        &["iu-xray", "--reports", reports.to_str().unwrap(), "--out", o, "--image-ext", "png/../../x"],
        &["--image-ext"],
    );
    assert!(!Path::new(o).exists());
    // MIMIC: the DICOM id names the .jpg; the study id a folder.
    let (_dir, root, o) = tree_and_out();
    let meta = root.join("mimic-cxr-2.0.0-metadata.csv");
    let text = std::fs::read_to_string(&meta).unwrap();
    let first_dicom = text.lines().nth(1).unwrap().split(',').next().unwrap().to_string();
    std::fs::write(&meta, text.replacen(&first_dicom, "../../../../x", 1)).unwrap();
    expect_error(
        &["mimic", "--root", root.to_str().unwrap(), "--out", o.to_str().unwrap()],
        &["metadata.csv", "line 2", "../../../../x"],
    );
}
