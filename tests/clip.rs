//! The CLIP text encoder against transformers' CLIPTextModel (fixtures from tests/fixtures/generate.py),
//! and checkpoint loading in every file form: single file, shards with an index, f16/bf16 variants.

mod common;
use common::*;
use roentgen::backend::cpu::CpuBackend;
use roentgen::backend::Backend;
use roentgen::models::clip::{ClipTextConfig, ClipTextModel};
use roentgen::models::Component;
use roentgen::nn::Cx;
use std::path::Path;

/// Loads `dir` (with `variant`), runs the fixture's ids and compares with `reference_key` of io.safetensors.
/// Loaded frozen, as the sampler loads: a single f32 file is used in place (mapped as the
/// parameter pool); shards and f16/bf16 variants are copied and converted.
fn check_forward(what: &str, dir: &Path, variant: Option<&str>, io: &Path, reference_key: &str) {
    let mut b = CpuBackend::new();
    let (model, report) = ClipTextModel::load_frozen(&mut b, dir, variant).unwrap();
    assert_eq!(report.tensors, model.table.entries().len());
    let single_f32 = report.files.len() == 1 && report.dtypes.keys().all(|d| d == "f32");
    assert_eq!(
        report.mapped, single_f32,
        "{what}: mapped {} for {:?} in {:?}",
        report.mapped, report.dtypes, report.files
    );
    let (shape, ids) = read_ids(io, "input_ids");
    let (want_shape, want) = read_f32(io, reference_key);
    let mut arena = model.allocate_arena(&mut b, shape[0], shape[1], false).unwrap();
    let acts = model.forward(&mut Cx::new(&b, &mut arena), &ids, shape[0], shape[1]).unwrap();
    let out = model.last_hidden_state(&acts);
    assert_eq!(out.shape.dims(), &want_shape[..]);
    assert_close(what, &b.download(&out).unwrap(), &want, F32_PARITY);
}

#[test]
fn clip_text_encoder_matches_transformers_quick_gelu_config() {
    let dir = fixture("clip-a");
    check_forward("clip-a last_hidden_state", &dir, None, &dir.join("io.safetensors"), "last_hidden_state");
}

#[test]
fn clip_text_encoder_matches_transformers_gelu_config() {
    let dir = fixture("clip-b");
    let cfg = ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(cfg.head_dim(), 8);
    check_forward("clip-b last_hidden_state", &dir, None, &dir.join("io.safetensors"), "last_hidden_state");
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let io = fixture("clip-a").join("io.safetensors");
    check_forward("clip-a from 4 shards", &fixture("clip-a-sharded"), None, &io, "last_hidden_state");
}

/// clip-b's weights from the `variant` files (converted to f32 once) against transformers run on the
/// same rounded weights.
fn check_variant(variant: &str) {
    let dir = fixture("clip-b");
    let want = format!("last_hidden_state_{variant}_weights");
    check_forward(&format!("clip-b {variant} variant"), &dir, Some(variant), &dir.join("io.safetensors"), &want);
}

#[test]
fn fp16_variant_is_converted_once_and_matches_reference() {
    check_variant("fp16");
}

#[test]
fn bf16_variant_is_converted_once_and_matches_reference() {
    check_variant("bf16");
}

#[test]
fn known_buffer_position_ids_is_ignored() {
    let mut b = CpuBackend::new();
    let (_, report) = ClipTextModel::load(&mut b, &fixture("clip-a"), None).unwrap();
    assert_eq!(report.ignored, vec!["text_model.embeddings.position_ids".to_string()]);
    assert!(!report.mapped, "loaded for training: copied into the table's layout");
    let (_, report) = ClipTextModel::load_frozen(&mut b, &fixture("clip-a"), None).unwrap();
    assert_eq!(report.ignored, vec!["text_model.embeddings.position_ids".to_string()]);
    assert!(report.mapped, "a single f32 file with an ignored i64 buffer is used in place");
}

#[test]
fn sd14_text_encoder_has_the_reference_parameter_count() {
    let counts = reference_counts();
    let want = counts["text_encoder"].as_u64().unwrap() as usize;
    assert_eq!(want, 123_060_480);
    let cfg = ClipTextConfig::from_file(&sd14_config().join("text_encoder/config.json")).unwrap();
    let mut b = CpuBackend::new();
    let model = ClipTextModel::allocate(&mut b, cfg).unwrap();
    assert_eq!(model.num_params(), want);
}

#[test]
fn inspect_random_weights_instantiates_the_sd14_architecture() {
    let (code, out, err) =
        run_cli(&["inspect", sd14_config().to_str().unwrap(), "--random-weights", "--summary", "--json"], None);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["components"]["text_encoder"]["parameters"].as_u64(), Some(123_060_480));
    assert_eq!(v["components"]["unet"]["parameters"].as_u64(), Some(859_520_964));
    assert_eq!(v["components"]["vae"]["parameters"].as_u64(), Some(83_653_863));
    assert_eq!(v["components"]["vae"]["parameters_encoder"].as_u64(), Some(34_163_664));
    assert_eq!(v["components"]["vae"]["parameters_decoder"].as_u64(), Some(49_490_199));
    assert_eq!(v["components"]["tokenizer"]["tokenizer"]["pad_id"].as_u64(), Some(49407));
}

/// A pipeline folder: the tiny f16 text encoder with the full CLIP vocabulary, and the SD v1.4 tokenizer.
fn tiny_pipeline(dir: &Path) -> std::path::PathBuf {
    let pipe = dir.join("pipe");
    copy_dir(&fixture("tiny-text-pipeline"), &pipe);
    copy_dir(&sd14_config().join("tokenizer"), &pipe.join("tokenizer"));
    pipe
}

#[test]
fn encode_text_cli_matches_diffusers_encode_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = tiny_pipeline(dir.path());
    let prompts: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(pipe.join("prompts.json")).unwrap()).unwrap();
    let out = dir.path().join("emb.safetensors");
    let mut args = CliArgs::new(&["encode-text"]).opt("--model", &pipe);
    for p in &prompts {
        args = args.opt("--prompt", p);
    }
    let (_, err) = args.opt("--out", &out).run_ok();
    assert!(err.contains("warning: prompt 4 has"), "the over-long prompt must be reported: {err}");
    let io = pipe.join("io.safetensors");
    assert_eq!(read_ids(&out, "input_ids"), read_ids(&io, "input_ids"));
    let (shape, got) = read_f32(&out, "last_hidden_state");
    let (want_shape, want) = read_f32(&io, "last_hidden_state");
    assert_eq!(shape, want_shape);
    assert_close("encode-text last_hidden_state", &got, &want, F32_PARITY);
}

#[test]
fn ids_outside_the_vocabulary_are_refused() {
    // clip-a has a 1000-token vocabulary; the real tokenizer's ids exceed it.
    let dir = tempfile::tempdir().unwrap();
    let pipe = dir.path().join("pipe");
    copy_dir(&fixture("clip-a"), &pipe.join("text_encoder"));
    copy_dir(&sd14_config().join("tokenizer"), &pipe.join("tokenizer"));
    std::fs::write(
        pipe.join("model_index.json"),
        r#"{"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}"#,
    )
    .unwrap();
    let out = dir.path().join("emb.safetensors");
    let (code, _, err) = encode_text_args(&pipe, "No acute process.", &out).run();
    assert_eq!(code, 1);
    assert!(err.contains("outside the vocabulary of 1000"), "{err}");
    assert!(!out.exists());
}
