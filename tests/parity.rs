//! `roentgen parity` end to end: the fixture pipeline against diffusers run by the pinned Python
//! (ROENTGEN_PARITY_PYTHON, or the fixture environment .venv-fixtures), as a folder and as a
//! single file; every stage within its tolerance. Without such a Python the test says so and
//! checks only that the command refuses clearly (CI has no PyTorch).

mod common;

use common::*;
use serde_json::Value;
use std::path::PathBuf;

fn reference_python() -> Option<PathBuf> {
    let p = std::env::var_os("ROENTGEN_PARITY_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv-fixtures/bin/python"));
    (p.exists() && roentgen::tools::parity::check_python(&p).is_ok()).then_some(p)
}

#[test]
fn parity_passes_on_the_fixture_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", tmp.path());
    let Some(python) = reference_python() else {
        println!("SKIPPED: no Python with torch, diffusers and transformers (set ROENTGEN_PARITY_PYTHON); checking the refusal only");
        let missing = tmp.path().join("no-python");
        CliArgs::new(&["parity"]).opt("--model", &pipe).opt("--python", &missing).expect_error(&[
            "--python",
            "cannot run it",
            "torch, diffusers and transformers",
        ]);
        return;
    };
    let single = fixture("single-file/pipe-a.safetensors");
    for (model, config) in [(pipe.clone(), None), (single, Some(pipe.clone()))] {
        let mut args = CliArgs::new(&["parity", "--json", "--height", "32", "--width", "32", "--steps", "6"])
            .opt("--model", &model)
            .opt("--python", &python);
        if let Some(c) = &config {
            args = args.opt("--config", c);
        }
        let (out, _) = args.run_ok();
        let v: Value = serde_json::from_str(&out).unwrap();
        let stages = v["stages"].as_array().unwrap();
        for s in stages {
            println!(
                "{:<32} max abs {:.2e}  max rel {:.2e}  rel L2 {:.2e}  {}",
                s["stage"].as_str().unwrap(),
                s["max_abs"].as_f64().unwrap(),
                s["max_rel"].as_f64().unwrap(),
                s["rel_l2"].as_f64().unwrap(),
                if s["pass"] == true { "pass" } else { "FAIL" }
            );
        }
        assert_eq!(v["pass"], true, "{}", model.display());
        // tokens, embeddings, 3 U-Net calls, VAE, 5 schedulers, image
        assert_eq!(stages.len(), 12);
        assert_eq!(v["reference"]["diffusers"].as_str().map(|s| !s.is_empty()), Some(true));
    }
}
