//! Bad input: each case gets one clear error line naming the file, tensor or field, a non-zero
//! exit, and never a panic.

mod common;
use common::expect_cli_error as expect_error;
use common::*;
use std::path::{Path, PathBuf};

/// A pipeline folder holding a copy of clip-b as its text encoder and the SD v1.4 tokenizer.
fn pipeline(dir: &Path) -> PathBuf {
    let pipe = dir.join("pipe");
    copy_dir(&fixture("clip-b"), &pipe.join("text_encoder"));
    copy_dir(&sd14_config().join("tokenizer"), &pipe.join("tokenizer"));
    std::fs::write(
        pipe.join("model_index.json"),
        r#"{"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}"#,
    )
    .unwrap();
    pipe
}

/// encode-text with `pipe`, into e.safetensors beside it.
fn encode(pipe: &Path) -> CliArgs {
    encode_text_args(pipe, "No acute process.", &pipe.with_file_name("e.safetensors"))
}

/// A temporary folder holding `pipeline`'s folder: (the folder, the pipeline).
fn temp_pipeline() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let pipe = pipeline(dir.path());
    (dir, pipe)
}

fn s(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Rewrites a safetensors file through `edit` on (name, dtype, shape, bytes) entries.
fn rewrite(path: &Path, edit: impl Fn(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut entries: Vec<_> =
        st.iter().map(|(n, v)| (n.to_string(), v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut entries);
    let views: Vec<_> = entries
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn truncated_safetensors_file_is_named() {
    let (_dir, pipe) = temp_pipeline();
    let f = pipe.join("text_encoder/model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(len / 2).unwrap();
    encode(&pipe).expect_error(&["model.safetensors", "truncated"]);
    // inspect reads headers only, and must say the same
    expect_error(&["inspect", f.to_str().unwrap()], &["model.safetensors", "truncated"]);
    // a file cut inside its header
    file.set_len(20).unwrap();
    expect_error(&["inspect", f.to_str().unwrap()], &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn corrupt_safetensors_header_is_named() {
    let (_dir, pipe) = temp_pipeline();
    let f = pipe.join("text_encoder/model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[8..16].copy_from_slice(b"garbage!");
    std::fs::write(&f, &bytes).unwrap();
    encode(&pipe).expect_error(&["model.safetensors", "JSON header cannot be parsed"]);
    // a header length larger than the file
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&f, &bytes).unwrap();
    encode(&pipe).expect_error(&["model.safetensors", "header"]);
}

#[test]
fn missing_component_folder_is_named() {
    let (_dir, pipe) = temp_pipeline();
    std::fs::remove_dir_all(pipe.join("text_encoder")).unwrap();
    encode(&pipe).expect_error(&["text_encoder", "missing component folder"]);
}

#[test]
fn missing_weight_file_and_config_are_named() {
    let (_dir, pipe) = temp_pipeline();
    std::fs::remove_file(pipe.join("text_encoder/model.safetensors")).unwrap();
    let line = encode(&pipe).expect_error(&["text_encoder", "no weights (", "pytorch_model.bin"]);
    assert!(line.contains("model.fp16.safetensors"), "the listing shows what is there: {line}");
    encode(&pipe).with(&["--variant", "fp32"]).expect_error(&["text_encoder", "no 'fp32' variant weights"]);
    std::fs::remove_file(pipe.join("text_encoder/config.json")).unwrap();
    encode(&pipe).expect_error(&["text_encoder/config.json", "no such file"]);
}

#[test]
fn missing_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let te = dir.path().join("te");
    copy_dir(&fixture("clip-a-sharded"), &te);
    std::fs::remove_file(te.join("model-00002-of-00004.safetensors")).unwrap();
    expect_error(&["inspect", te.to_str().unwrap()], &["model-00002-of-00004.safetensors", "missing"]);
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let (_dir, pipe) = temp_pipeline();
    rewrite(&pipe.join("text_encoder/model.safetensors"), |e| {
        let t = e.iter_mut().find(|t| t.0.ends_with("layers.1.mlp.fc1.weight")).unwrap();
        t.2.reverse(); // (96, 40) stored as (40, 96): same bytes, transposed shape
    });
    encode(&pipe).expect_error(&["model.safetensors", "encoder.layers.1.mlp.fc1.weight", "[40, 96]", "[96, 40]"]);
}

#[test]
fn wrong_dtype_names_the_tensor() {
    let (_dir, pipe) = temp_pipeline();
    rewrite(&pipe.join("text_encoder/model.safetensors"), |e| {
        let t = e.iter_mut().find(|t| t.0.ends_with("final_layer_norm.weight")).unwrap();
        t.1 = safetensors::Dtype::I32;
    });
    encode(&pipe).expect_error(&["final_layer_norm.weight", "I32", "F32, F16 or BF16"]);
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let (_dir, pipe) = temp_pipeline();
    let f = pipe.join("text_encoder/model.safetensors");
    rewrite(&f, |e| e.retain(|t| !t.0.ends_with("layers.2.self_attn.v_proj.bias")));
    encode(&pipe).expect_error(&["1 expected tensor(s) missing", "layers.2.self_attn.v_proj.bias"]);
    copy_dir(&fixture("clip-b"), &pipe.join("text_encoder"));
    rewrite(&f, |e| {
        let extra = e[0].clone();
        e.push(("text_model.encoder.layers.9.extra.weight".into(), extra.1, extra.2, extra.3));
    });
    encode(&pipe).expect_error(&["unexpected tensor", "layers.9.extra.weight"]);
}

#[test]
fn unknown_hidden_act_names_the_field() {
    let (_dir, pipe) = temp_pipeline();
    let cfg = pipe.join("text_encoder/config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"gelu\"", "\"relu6\"");
    std::fs::write(&cfg, text).unwrap();
    encode(&pipe).expect_error(&["config.json", "hidden_act", "relu6"]);
    std::fs::write(&cfg, "{\"hidden_size\": \"wide\"}").unwrap();
    encode(&pipe).expect_error(&["config.json", "hidden_size", "expected an integer"]);
    std::fs::write(&cfg, "{not json").unwrap();
    encode(&pipe).expect_error(&["config.json", "invalid JSON"]);
}

#[test]
fn bad_tokenizer_folders_are_named() {
    let dir = tempfile::tempdir().unwrap();
    expect_error(&["tokenize", "--model", "/no/such/folder", "--prompt", "x"], &["/no/such/folder"]);
    std::fs::write(dir.path().join("vocab.json"), "{\"a\": 0}").unwrap();
    expect_error(
        &["tokenize", "--model", dir.path().to_str().unwrap(), "--prompt", "x"],
        &["not a CLIP tokenizer folder"],
    );
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\na b\n").unwrap();
    expect_error(
        &["tokenize", "--model", dir.path().to_str().unwrap(), "--prompt", "x"],
        &["bos_token", "not in the vocabulary"],
    );
    expect_error(
        &["tokenize", "--model", sd14_config().to_str().unwrap(), "--input", "/no/such/prompts.txt"],
        &["/no/such/prompts.txt"],
    );
}

#[test]
fn over_long_prompt_is_truncated_with_a_warning() {
    let long = "bilateral pleural effusions with adjacent atelectasis. ".repeat(20);
    let (code, out, err) = run_cli(&["tokenize", "--model", sd14_config().to_str().unwrap(), "--prompt", &long], None);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["truncated"], true);
    assert_eq!(v["ids"].as_array().unwrap().len(), 77);
    assert_eq!(v["ids"][76], 49407, "EOS stays last after truncation");
    assert!(v["tokens"].as_u64().unwrap() > 77);
    assert!(err.contains("warning: prompt 1 has") && err.contains("truncated to 77"), "{err}");
}

#[test]
fn cuda_device_without_cuda_build_says_so() {
    if cfg!(feature = "cuda") {
        return;
    }
    expect_error(
        &["--device", "cuda", "inspect", sd14_config().to_str().unwrap()],
        &["CUDA support was not compiled", "--features cuda"],
    );
}

// ---- sampling ----

fn sample_args(pipe: &Path, out: &Path, extra: &[&str]) -> CliArgs {
    sample_16px_args(pipe, "2", out).opt("--prompt", "Small right effusion.").with(extra)
}

#[test]
fn sampling_size_not_a_multiple_of_the_vae_factor_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let a = sample_args(&pipe, &dir.path().join("o"), &[]).set("--height", "15");
    a.expect_error(&["--height 15", "multiples of 2"]);
}

#[test]
fn latents_in_of_the_wrong_shape_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let f = dir.path().join("l.safetensors");
    write_f32(&f, "latents", &[1, 4, 4, 8], &(0..128).map(|i| (i as f32).sin()).collect::<Vec<_>>());
    expect_error(
        &s(&sample_args(&pipe, &dir.path().join("o"), &["--latents-in", f.to_str().unwrap()])),
        &["l.safetensors", "[1, 4, 4, 8]", "[1, 4, 8, 8]"],
    );
    write_f32(&f, "noise", &[1, 4, 8, 8], &(0..256).map(|i| (i as f32).sin()).collect::<Vec<_>>());
    expect_error(
        &s(&sample_args(&pipe, &dir.path().join("o"), &["--latents-in", f.to_str().unwrap()])),
        &["no tensor named 'latents'"],
    );
}

#[test]
fn unwritable_output_path_is_refused_before_sampling() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    // a folder below a regular file cannot be created
    expect_error(&s(&sample_args(&pipe, &blocker.join("sub"), &[])), &["cannot create the output folder"]);
}

#[test]
fn missing_or_mismatched_components_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let out = dir.path().join("o");
    std::fs::remove_dir_all(pipe.join("vae")).unwrap();
    expect_error(&s(&sample_args(&pipe, &out, &[])), &["vae", "missing component folder"]);
    // a VAE from another pipeline: 4 latent channels still, but the unet wants cross-attention 8 from
    // a text encoder of width 40 (clip-b)
    copy_dir(&fixture("pipe-a/vae"), &pipe.join("vae"));
    std::fs::remove_dir_all(pipe.join("text_encoder")).unwrap();
    copy_dir(&fixture("clip-b"), &pipe.join("text_encoder"));
    expect_error(&s(&sample_args(&pipe, &out, &[])), &["hidden_size 40", "cross_attention_dim 8"]);
    expect_error(&s(&sample_args(&dir.path().join("nothing"), &out, &[])), &["nothing"]);
    expect_error(&s(&sample_args(&fixture("clip-a"), &out, &[])), &["not a pipeline folder"]);
}

#[test]
fn unsupported_unet_block_type_or_config_value_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let cfg = pipe.join("unet/config.json");
    let orig = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, orig.replace("\"DownBlock2D\"", "\"KDownBlock2D\"")).unwrap();
    expect_error(&s(&sample_args(&pipe, &dir.path().join("o"), &[])), &["down_block_types", "KDownBlock2D"]);
    let mut v: serde_json::Value = serde_json::from_str(&orig).unwrap();
    v["class_embed_type"] = "timestep".into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    expect_error(&s(&sample_args(&pipe, &dir.path().join("o"), &[])), &["class_embed_type", "timestep"]);
    let mut v: serde_json::Value = serde_json::from_str(&orig).unwrap();
    v["num_attention_heads"] = 4.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    expect_error(&s(&sample_args(&pipe, &dir.path().join("o"), &[])), &["num_attention_heads"]);
    std::fs::write(&cfg, &orig).unwrap();
    let sched = pipe.join("scheduler/scheduler_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sched).unwrap()).unwrap();
    v["beta_schedule"] = "sigmoid".into();
    std::fs::write(&sched, v.to_string()).unwrap();
    expect_error(&s(&sample_args(&pipe, &dir.path().join("o"), &[])), &["beta_schedule", "sigmoid"]);
    expect_error(&s(&sample_args(&pipe, &dir.path().join("o"), &["--scheduler", "lms"])), &["--scheduler", "lms"]);
}

#[test]
fn gray_output_is_single_channel_with_the_settings_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let out = dir.path().join("x.png");
    let a = sample_args(&pipe, &out, &["--gray", "--seed", "5", "--negative-prompt", "lateral"]);
    let (code, _, err) = run_cli(&s(&a), None);
    assert_eq!(code, 0, "{err}");
    let (color, w, h, px, text) = roentgen::io::images::read_png(&out).unwrap();
    assert_eq!((color, w, h), (png::ColorType::Grayscale, 16, 16));
    assert!(px.iter().any(|&p| p != px[0]), "a constant image");
    let get = |k: &str| text.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone()).unwrap();
    assert_eq!(
        (get("seed").as_str(), get("negative_prompt").as_str(), get("scheduler").as_str()),
        ("5", "lateral", "pndm")
    );
    assert!(err.contains("text encoding") && err.contains("per step") && err.contains("VAE decode"), "{err}");
}
