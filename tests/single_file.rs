//! Stable Diffusion single-file checkpoints (the CompVis/LDM layout of `.ckpt` releases and
//! A1111/ComfyUI files) against diffusers (fixture by tests/fixtures/generate_single_file.py, whose
//! files diffusers' own single-file conversion reads back exactly): every tensor name of the real
//! SD v1.4 configs, sampling the fixture pipeline from its single file (safetensors and .ckpt)
//! against diffusers' images, the EMA weights, and bad inputs.

mod common;

use common::*;
use roentgen::models::single_file::{text_names, unet_name, vae_name};
use roentgen::models::unet::UNet;
use roentgen::models::vae::AutoencoderKL;
use roentgen::models::Component;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    fixture("single-file")
}

/// Our name for every tensor of SD v1.4's U-Net, VAE and text encoder tables is the one diffusers'
/// conversion reads it from (686 + 248 + 196 tensors, layers_per_block 2, four blocks).
#[test]
fn single_file_names_equal_diffusers_for_sd_v1_4() {
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("sd-v1-4-names.json")).unwrap()).unwrap();
    let cfg = sd14_config();
    let unet_cfg = UNet::config_from_file(&cfg.join("unet/config.json")).unwrap();
    let vae_cfg = AutoencoderKL::config_from_file(&cfg.join("vae/config.json")).unwrap();
    let text_cfg =
        roentgen::models::clip::ClipTextModel::config_from_file(&cfg.join("text_encoder/config.json")).unwrap();
    let blocks = vae_cfg.block_out_channels.len();
    let tables = [
        ("unet", UNet::measure(&unet_cfg)),
        ("vae", AutoencoderKL::measure(&vae_cfg)),
        ("text_encoder", roentgen::models::clip::ClipTextModel::measure(&text_cfg)),
    ];
    for (comp, table) in tables {
        let want = want[comp].as_object().unwrap();
        let names: Vec<&str> = table.entries().iter().map(|e| e.name.as_str()).collect();
        let mut ours: Vec<&str> = names.clone();
        ours.sort();
        let mut theirs: Vec<&str> = want.keys().map(|k| k.as_str()).collect();
        theirs.sort();
        let only_ours: Vec<_> = ours.iter().filter(|n| !theirs.contains(n)).take(3).collect();
        let only_theirs: Vec<_> = theirs.iter().filter(|n| !ours.contains(n)).take(3).collect();
        assert!(
            ours == theirs,
            "{comp}: table {} vs diffusers {}: ours only {only_ours:?}, theirs only {only_theirs:?}",
            ours.len(),
            theirs.len()
        );
        for n in names {
            let got = match comp {
                "unet" => format!("model.diffusion_model.{}", unet_name(n, &unet_cfg).unwrap()),
                "vae" => format!("first_stage_model.{}", vae_name(n, blocks).unwrap()),
                _ => text_names(n)[0].clone(),
            };
            assert_eq!(got, want[n].as_str().unwrap(), "{comp} {n}");
        }
        println!("{comp}: {} names equal diffusers'", want.len());
    }
}

/// pipe-a's configs, tokenizer and scheduler (no weights are read from it).
fn config_folder(tmp: &Path) -> PathBuf {
    assemble_pipeline("pipe-a", tmp)
}

/// Samples pipe-a's diffusers run (PNDM, 6 steps, 16 px, two prompts, guidance 4, its initial
/// latents) from `model` (a folder or a single file); returns the dump.
fn sample_run(model: &Path, extra: &[&str], tmp: &Path, tag: &str) -> PathBuf {
    let io = fixture("pipe-a/io-pndm.safetensors");
    let (shape, lat) = read_f32(&io, "latents_in");
    let latents = tmp.join("latents.safetensors");
    write_f32(&latents, "latents", &shape, &lat);
    let dump = tmp.join(format!("dump-{tag}.safetensors"));
    CliArgs::new(&[
        "sample",
        "--prompt",
        "Large left pleural effusion.",
        "--prompt",
        "No acute cardiopulmonary process.",
    ])
    .opt("--model", model)
    .with(&["--num-images", "2", "--height", "16", "--width", "16", "--steps", "6", "--guidance", "4"])
    .opt("--latents-in", &latents)
    .opt("--out", tmp.join(format!("out-{tag}")))
    .opt("--dump", &dump)
    .with(extra)
    .run_ok();
    dump
}

/// `sample --model FILE`: the single file (safetensors, and the same as a .ckpt) samples what
/// diffusers samples from the pipeline folder (and diffusers' from_single_file loads the folder's
/// tensors exactly: from-single-file.json).
#[test]
fn sampling_a_single_file_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_folder(tmp.path());
    let loaded: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("from-single-file.json")).unwrap()).unwrap();
    for (comp, d) in loaded["max_abs_difference"].as_object().unwrap() {
        assert_eq!(d.as_f64(), Some(0.0), "diffusers' from_single_file {comp}");
    }
    let (_, want) = read_f32(&fixture("pipe-a/io-pndm.safetensors"), "image");
    let folder = read_f32(&sample_run(&cfg, &[], tmp.path(), "folder"), "image").1;
    for file in ["pipe-a.safetensors", "pipe-a.ckpt"] {
        let cfg_s = cfg.to_str().unwrap();
        let got = read_f32(&sample_run(&dir().join(file), &["--config", cfg_s], tmp.path(), file), "image").1;
        let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        println!("{file}: image max |ours - diffusers| = {err:.2e} (bar {PIPELINE_ABS:.0e})");
        assert!(err <= PIPELINE_ABS, "{file}: {err}");
        assert_eq!(got, folder, "{file}: the same tensors as the folder give the same image, bit for bit");
    }
}

/// `--ema` takes the U-Net from `model_ema.*` (LitEma's dotless names): the image of a folder whose
/// U-Net holds the EMA weights diffusers extracts (extract_ema=True).
#[test]
fn ema_weights_of_a_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_folder(tmp.path());
    let ema_pipe = tmp.path().join("ema-pipe");
    copy_dir(&cfg, &ema_pipe);
    std::fs::copy(dir().join("pipe-a-ema-unet.safetensors"), ema_pipe.join("unet/diffusion_pytorch_model.safetensors"))
        .unwrap();
    let want = read_f32(&sample_run(&ema_pipe, &[], tmp.path(), "ema-folder"), "image").1;
    let cfg_s = cfg.to_str().unwrap();
    let file = dir().join("pipe-a.ckpt");
    let got = read_f32(&sample_run(&file, &["--config", cfg_s, "--ema"], tmp.path(), "ema"), "image").1;
    assert_eq!(got, want);
    let plain = read_f32(&sample_run(&file, &["--config", cfg_s], tmp.path(), "plain"), "image").1;
    assert_ne!(got, plain, "the EMA weights differ from the U-Net's");
}

#[test]
fn bad_single_files_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_folder(tmp.path());
    let base = |model: &Path| {
        CliArgs::new(&["sample", "--prompt", "x", "--height", "16", "--width", "16", "--steps", "1"])
            .opt("--model", model)
            .opt("--config", &cfg)
            .opt("--out", tmp.path().join("out"))
    };
    // Not a Stable Diffusion checkpoint: the missing tensors are named.
    base(&fixture("torch-files/dtypes.pt")).expect_error(&["dtypes.pt", "expected tensor(s) missing", "text_model."]);
    // A checkpoint without EMA weights, asked for them.
    let no_ema = tmp.path().join("no-ema.safetensors");
    let bytes = std::fs::read(dir().join("pipe-a.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| !n.starts_with("model_ema.")).collect();
    std::fs::write(&no_ema, safetensors::serialize(kept, None).unwrap()).unwrap();
    base(&no_ema).with(&["--ema"]).expect_error(&["no-ema.safetensors", "no 'model_ema.*' tensors"]);
    // --config with a folder model.
    base(&cfg).expect_error(&["--config applies to a single-file --model"]);
}

/// The tensors of a safetensors file as f32 values (name → (shape, values)), optionally leaving
/// some out. (The fixture's text encoder is stored in f16, the rest in f32; an f32 export holds the
/// same values.)
fn tensors(path: &Path, skip: &dyn Fn(&str) -> bool) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(n, _)| !skip(n))
        .map(|(n, v)| {
            let values: Vec<f32> = match v.dtype() {
                safetensors::Dtype::F32 => {
                    v.data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
                }
                safetensors::Dtype::F16 => {
                    v.data().chunks(2).map(|b| half::f16::from_le_bytes(b.try_into().unwrap()).to_f32()).collect()
                }
                other => panic!("{n}: {other:?}"),
            };
            (n, (v.shape().to_vec(), values))
        })
        .collect()
}

/// Two tensor maps hold the same names, shapes and values (bit for bit).
fn assert_same(
    got: &std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    want: &std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    what: &str,
) {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what}: names");
    for (n, (shape, v)) in want {
        assert_eq!(&got[n].0, shape, "{what} {n}: shape");
        assert!(got[n].1.iter().zip(v).all(|(a, b)| a.to_bits() == b.to_bits()), "{what} {n}: values");
    }
}

/// `export --single-file` writes the fixture's single file (which diffusers' from_single_file loads
/// exactly) bit for bit in f32, and single file → folder → single file is exact; `--ema` unpacks
/// the EMA U-Net diffusers extracts.
#[test]
fn export_round_trips_between_the_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_folder(tmp.path());
    let no_ema = |n: &str| n.starts_with("model_ema.");
    let want = tensors(&dir().join("pipe-a.safetensors"), &no_ema);
    // folder → single file
    let single = tmp.path().join("exported.safetensors");
    CliArgs::new(&["export", "--single-file", "--dtype", "f32"]).opt("--model", &cfg).opt("--out", &single).run_ok();
    let got = tensors(&single, &|_| false);
    assert_same(&got, &want, "folder → single file");
    println!("folder → single file: {} tensors equal the fixture's, bit for bit", got.len());
    // single file (.ckpt) → folder → single file
    let folder = tmp.path().join("unpacked");
    CliArgs::new(&["export", "--dtype", "f32"])
        .opt("--model", dir().join("pipe-a.ckpt"))
        .opt("--config", &cfg)
        .opt("--out", &folder)
        .run_ok();
    let again = tmp.path().join("again.safetensors");
    CliArgs::new(&["export", "--single-file", "--dtype", "f32"]).opt("--model", &folder).opt("--out", &again).run_ok();
    assert_same(&tensors(&again, &|_| false), &want, "single file → folder → single file");
    // The unpacked folder samples as the original folder does.
    let a = read_f32(&sample_run(&cfg, &[], tmp.path(), "orig"), "image").1;
    let b = read_f32(&sample_run(&folder, &[], tmp.path(), "unpacked"), "image").1;
    assert_eq!(a, b);
    // --ema: the EMA U-Net, as diffusers extracts it.
    let ema_folder = tmp.path().join("unpacked-ema");
    CliArgs::new(&["export", "--dtype", "f32", "--ema"])
        .opt("--model", dir().join("pipe-a.safetensors"))
        .opt("--config", &cfg)
        .opt("--out", &ema_folder)
        .run_ok();
    let ema_want = tensors(&dir().join("pipe-a-ema-unet.safetensors"), &|_| false);
    let ema_got = tensors(&ema_folder.join("unet/diffusion_pytorch_model.safetensors"), &|_| false);
    assert_same(&ema_got, &ema_want, "EMA U-Net");
    // An existing output is refused.
    CliArgs::new(&["export", "--single-file"]).opt("--model", &cfg).opt("--out", &single).expect_error(&["exists"]);
}

/// `train` reads pipeline folders only: a single file is refused with the command that unpacks it.
#[test]
fn training_from_a_single_file_says_how_to_unpack_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_dataset(tmp.path(), 2);
    small_train_args(&dir().join("pipe-a.ckpt"), &data, &tmp.path().join("run"))
        .expect_error(&["pipe-a.ckpt: a single file", "roentgen export --model"]);
}

/// `inspect` reads a single file in either container and says what layout it holds.
#[test]
fn inspect_names_a_single_file() {
    for file in ["pipe-a.ckpt", "pipe-a.safetensors"] {
        let (out, _) = CliArgs::new(&["inspect", "--json"]).with(&[dir().join(file).to_str().unwrap()]).run_ok();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert!(v["layout"].as_str().unwrap().contains("Stable Diffusion single file"), "{file}: {}", v["layout"]);
        assert!(v["tensor_count"].as_u64().unwrap() > 500, "{file}");
    }
}
