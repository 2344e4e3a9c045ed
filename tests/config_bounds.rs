//! Model configs and model_index.json with values that used to be reinterpreted silently, index
//! out of bounds, or size allocations by 2^31–2^63: each must end, quickly, with exit 1 and one
//! error line naming the file and the field (issue 20, items 12 and 15).

mod common;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Runs the CLI, expects exit 1, no panic, within `limit` (an allocation of a corrupt size would
/// take minutes or abort), and an error line containing every one of `needles`.
fn expect_error(args: &[&str], needles: &[&str]) -> String {
    let t = Instant::now();
    let (code, out, err) = run_cli(args, None);
    let took = t.elapsed();
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    assert_eq!(code, 1, "expected exit 1 for {args:?}; stdout {out}; stderr {err}");
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error line: {err}"));
    for n in needles {
        assert!(line.contains(n), "error line lacks {n:?}: {line}");
    }
    assert!(took < Duration::from_secs(20), "{args:?} took {took:?} to fail");
    println!("{args:?}\n  → {line}");
    line.to_string()
}

/// Applies `edit` to the JSON object in `path`.
fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// A copy of a fixture component folder with only its config.json (inspect --random-weights
/// needs no weights), edited by `edit`.
fn component(dir: &Path, fixture_name: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> PathBuf {
    let c = dir.join(fixture_name);
    std::fs::create_dir_all(&c).unwrap();
    std::fs::copy(fixture(fixture_name).join("config.json"), c.join("config.json")).unwrap();
    edit_json(&c.join("config.json"), edit);
    c
}

/// `inspect --random-weights` refuses the fixture component `fixture_name` with `field` set to
/// `value`, with a message holding each of `needles`.
fn refused_by_inspect(dir: &Path, fixture_name: &str, field: &str, value: Value, needles: &[&str]) {
    let c = component(dir, fixture_name, |o| {
        o.insert(field.into(), value);
    });
    expect_error(&s(&inspect_random(&c)), needles);
}

fn inspect_random(c: &Path) -> Vec<String> {
    vec!["inspect".into(), "--random-weights".into(), c.display().to_string()]
}

fn s(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn sample_args(pipe: &Path, out: &Path) -> Vec<String> {
    ["sample", "--model", pipe.to_str().unwrap(), "--prompt", "Small right effusion.", "--steps", "1", "--out"]
        .iter()
        .map(|x| x.to_string())
        .chain([out.display().to_string()])
        .collect()
}

// ---- item 12: values silently reinterpreted ----

#[test]
fn unet_sample_size_that_is_not_a_positive_size_is_refused_by_sample() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let cfg = pipe.join("unet/config.json");
    // -16 used to become the 64-latent default (256 px for this VAE); the others were cut to an
    // integer, or read as their first entry.
    for bad in [json!(-16), json!(0), json!(8.5), json!([8]), json!([8, 0]), json!([8, 8, 8]), json!(1u64 << 40)] {
        edit_json(&cfg, |o| {
            o.insert("sample_size".into(), bad.clone());
        });
        let line = expect_error(&s(&sample_args(&pipe, &dir.path().join("o"))), &["unet/config.json", "sample_size"]);
        assert!(line.contains(&bad.to_string()), "the value is not shown: {line}");
    }
}

#[test]
fn unet_sample_size_as_height_width_pair_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let c = component(dir.path(), "unet-a", |o| {
        o.insert("sample_size".into(), json!([8, 12]));
    });
    let (code, out, err) = run_cli(&["inspect", c.to_str().unwrap(), "--json"], None);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let parsed = v["parsed_config"].as_str().unwrap();
    assert!(parsed.contains("sample_size: Some([8, 12])"), "{parsed}");
}

#[test]
fn config_flags_that_are_not_booleans_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // "yes" used to read as false (the default) without a word.
    refused_by_inspect(
        dir.path(),
        "unet-a",
        "use_linear_projection",
        json!("yes"),
        &["config.json", "use_linear_projection", "true or false"],
    );
    refused_by_inspect(dir.path(), "vae-a", "use_quant_conv", json!(0), &["config.json", "use_quant_conv"]);
}

#[test]
fn config_numbers_beyond_f32_or_negative_eps_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // 1e308 becomes an infinite f32 epsilon, and every normalised output 0.
    refused_by_inspect(dir.path(), "unet-a", "norm_eps", json!(1e308), &["config.json", "norm_eps"]);
    refused_by_inspect(dir.path(), "clip-b", "layer_norm_eps", json!(-1e-5), &["config.json", "layer_norm_eps"]);
}

/// A pipeline folder whose model_index.json is `text`.
fn pipe_with_index(dir: &Path, text: &str) -> PathBuf {
    let pipe = assemble_pipeline("pipe-a", dir);
    std::fs::write(pipe.join("model_index.json"), text).unwrap();
    pipe
}

#[test]
fn invalid_model_index_is_refused_by_sample_and_inspect() {
    let index = std::fs::read_to_string(fixture("pipe-a/model_index.json")).unwrap();
    let with = |k: &str, v: Value| {
        let mut o: Value = serde_json::from_str(&index).unwrap();
        o[k] = v;
        o.to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        ("[\"unet\", \"vae\"]".into(), "expected a JSON object"),
        ("42".into(), "expected a JSON object"),
        (with("unet", json!("diffusers")), "\"unet\""),
        (with("vae", json!(["diffusers"])), "\"vae\""),
        (with("scheduler", json!(["diffusers", 7])), "\"scheduler\""),
        (with("text_encoder", json!({"library": "transformers"})), "\"text_encoder\""),
        (with("_class_name", json!(["StableDiffusionPipeline"])), "\"_class_name\""),
    ];
    for (text, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        let pipe = pipe_with_index(dir.path(), &text);
        expect_error(&s(&sample_args(&pipe, &dir.path().join("o"))), &["model_index.json", needle]);
        expect_error(&["inspect", pipe.to_str().unwrap()], &["model_index.json", needle]);
    }
}

#[test]
fn model_index_options_and_absent_components_are_accepted() {
    // diffusers writes pipeline options as plain values and removed components as [null, null].
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    edit_json(&pipe.join("model_index.json"), |o| {
        o.insert("requires_safety_checker".into(), json!(true));
        o.insert("force_zeros_for_empty_prompt".into(), json!(false));
        o.insert("safety_checker".into(), json!(null));
        o.insert("image_encoder".into(), json!([null, null]));
    });
    let (code, out, err) = run_cli(&["inspect", pipe.to_str().unwrap(), "--json"], None);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let comps = v["components"].as_object().unwrap();
    assert!(comps.contains_key("unet") && comps.contains_key("vae"), "{comps:?}");
    assert!(!comps.contains_key("requires_safety_checker") && !comps.contains_key("image_encoder"), "{comps:?}");
}

// ---- item 15: unchecked sizes ----

#[test]
fn empty_unet_block_lists_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // All three empty used to agree (0 = 0 = 0) and then index block_out_channels[0].
    let c = component(dir.path(), "unet-a", |o| {
        for k in ["block_out_channels", "down_block_types", "up_block_types"] {
            o.insert(k.into(), json!([]));
        }
    });
    expect_error(&s(&inspect_random(&c)), &["config.json", "down_block_types"]);
    let c = component(dir.path(), "vae-a", |o| {
        for k in ["block_out_channels", "down_block_types", "up_block_types"] {
            o.insert(k.into(), json!([]));
        }
    });
    expect_error(&s(&inspect_random(&c)), &["config.json", "block_out_channels", "empty"]);
}

#[test]
fn unet_block_lists_that_disagree_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    refused_by_inspect(
        dir.path(),
        "unet-a",
        "block_out_channels",
        json!([16, 32, 32]),
        &["config.json", "down_block_types", "block_out_channels", "agree"],
    );
    refused_by_inspect(
        dir.path(),
        "unet-a",
        "layers_per_block",
        json!([1, 1, 1]),
        &["config.json", "layers_per_block", "3 entries for 2 blocks"],
    );
}

#[test]
fn huge_layer_counts_are_refused_before_allocation() {
    let dir = tempfile::tempdir().unwrap();
    for v in [1u64 << 31, 1 << 63, u64::MAX] {
        refused_by_inspect(
            dir.path(),
            "clip-b",
            "num_hidden_layers",
            json!(v),
            &["config.json", "num_hidden_layers", &v.to_string(), "1 to 1000"],
        );
        refused_by_inspect(dir.path(), "unet-a", "layers_per_block", json!(v), &["config.json", "layers_per_block"]);
        refused_by_inspect(
            dir.path(),
            "unet-a",
            "transformer_layers_per_block",
            json!([1, v]),
            &["config.json", "transformer_layers_per_block[1]"],
        );
        refused_by_inspect(dir.path(), "vae-a", "layers_per_block", json!(v), &["config.json", "layers_per_block"]);
    }
    // Each within its own bound, but together 2 × 1000 × 1000 transformer blocks.
    let c = component(dir.path(), "unet-a", |o| {
        o.insert("layers_per_block".into(), json!(1000));
        o.insert("transformer_layers_per_block".into(), json!(1000));
    });
    expect_error(&s(&inspect_random(&c)), &["config.json", "transformer_layers_per_block", "more than 10000"]);
}

#[test]
fn huge_or_zero_channel_counts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (fixture_name, field, v) in [
        ("unet-a", "block_out_channels", json!([16, 1u64 << 40])),
        ("unet-a", "cross_attention_dim", json!(1u64 << 31)),
        ("unet-a", "in_channels", json!(0)),
        ("vae-a", "latent_channels", json!(1u64 << 33)),
        ("clip-b", "hidden_size", json!(1u64 << 20)),
        ("clip-b", "vocab_size", json!(1u64 << 40)),
        ("clip-b", "max_position_embeddings", json!(1u64 << 31)),
    ] {
        refused_by_inspect(dir.path(), fixture_name, field, v.clone(), &["config.json", field]);
    }
}

#[test]
fn parameter_count_beyond_the_bound_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Every size within its own bound; together 2^24 × 2^16 = 2^40 embedding parameters.
    let c = component(dir.path(), "clip-b", |o| {
        o.insert("vocab_size".into(), json!(1 << 24));
        o.insert("hidden_size".into(), json!(1 << 16));
        o.insert("num_attention_heads".into(), json!(1 << 4));
    });
    expect_error(&s(&inspect_random(&c)), &["config.json", "parameters"]);
}

#[test]
fn unet_heads_and_groups_that_do_not_divide_channels_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    refused_by_inspect(
        dir.path(),
        "unet-a",
        "attention_head_dim",
        json!([2, 3]),
        &["config.json", "block_out_channels[1]", "attention_head_dim"],
    );
    refused_by_inspect(dir.path(), "unet-a", "norm_num_groups", json!(64), &["config.json", "norm_num_groups"]);
}

#[test]
fn bert_text_encoder_sizes_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = dir.path().join("pipe-bert");
    copy_dir(&fixture("pipe-bert"), &pipe);
    edit_json(&pipe.join("text_encoder/config.json"), |o| {
        o.insert("num_hidden_layers".into(), json!(1u64 << 31));
    });
    let out = dir.path().join("e.safetensors");
    expect_error(
        &encode_text_args(&pipe, "No acute process.", &out).strs(),
        &["text_encoder/config.json", "num_hidden_layers"],
    );
}

#[test]
fn real_model_configs_still_load() {
    // SD v1.4 (bundled) and the reference copy: every component parses and the U-Net keeps its
    // 859,520,964 parameters through the new checks.
    for root in [sd14_config(), root().join("../shared/reference-configs/sd-v1-4")] {
        if !root.is_dir() {
            continue;
        }
        let (code, out, err) = run_cli(&["inspect", root.to_str().unwrap(), "--json"], None);
        assert_eq!(code, 0, "{}: {err}", root.display());
        let v: Value = serde_json::from_str(&out).unwrap();
        let parsed = v["components"]["unet"]["parsed_config"].as_str().unwrap_or_default();
        assert!(parsed.contains("sample_size: Some([64, 64])"), "{parsed}");
    }
    // Larger released models than SD v1.4 (their sizes copied from the published configs): SD 2.x's
    // U-Net, the OpenCLIP ViT-H and ViT-bigG text towers of SD 2.x and SDXL. The parsed sizes must
    // come back unchanged (a bound that clipped or refused them would be too tight).
    let dir = tempfile::tempdir().unwrap();
    let sd2_unet = component(dir.path(), "unet-a", |o| {
        let sd14: Value =
            serde_json::from_str(&std::fs::read_to_string(sd14_config().join("unet/config.json")).unwrap()).unwrap();
        *o = sd14.as_object().unwrap().clone();
        o.insert("attention_head_dim".into(), json!([5, 10, 20, 20]));
        o.insert("cross_attention_dim".into(), json!(1024));
        o.insert("use_linear_projection".into(), json!(true));
        o.insert("sample_size".into(), json!(96));
    });
    let (code, out, err) = run_cli(&["inspect", sd2_unet.to_str().unwrap(), "--json"], None);
    assert_eq!(code, 0, "{err}");
    let parsed: Value = serde_json::from_str(&out).unwrap();
    let parsed = parsed["parsed_config"].as_str().unwrap().to_string();
    assert!(parsed.contains("heads: [5, 10, 20, 20]") && parsed.contains("sample_size: Some([96, 96])"), "{parsed}");
    for (name, hidden, layers, heads, inter) in [("vit-h", 1024, 23, 16, 4096), ("vit-bigg", 1280, 32, 20, 5120)] {
        let c = dir.path().join(name);
        std::fs::create_dir_all(&c).unwrap();
        let cfg = json!({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "gelu",
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": inter, "vocab_size": 49408, "max_position_embeddings": 77});
        std::fs::write(c.join("config.json"), cfg.to_string()).unwrap();
        let (code, out, err) = run_cli(&["inspect", c.to_str().unwrap(), "--json"], None);
        assert_eq!(code, 0, "{name}: {err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        let parsed = v["parsed_config"].as_str().unwrap();
        assert!(parsed.contains(&format!("num_hidden_layers: {layers}")), "{name}: {parsed}");
        assert!(parsed.contains(&format!("intermediate_size: {inter}")), "{name}: {parsed}");
    }
}
