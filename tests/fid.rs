//! `roentgen eval fid`: the Fréchet distance against pytorch-fid's scipy formula, the three feature
//! networks (InceptionV3 pool3 of pytorch-fid, TorchXRayVision's DenseNet-121, CLIP's image tower)
//! and their preprocessing against the reference libraries, the feature cache, and bad input.
//! Fixtures: tests/fixtures/generate_fid.py.
//!
//! The real networks' random weights are not stored (95 + 28 + 350 MB): they come from a
//! counter-based generator mirrored in generate_fid.py (SplitMix64 keyed by the tensor name's FNV-1a
//! hash), so only images, small inputs and PyTorch's outputs are fixtures.

mod common;

use common::seeded::{seeded_source, uniform_f64};
use common::{assert_close, fixture, read_f32, run_cli, F32_PARITY};
use roentgen::eval::frechet::{frechet_distance, stats};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Fréchet distance
// ---------------------------------------------------------------------------------------------

/// generate_fid.py's frechet_features: X = Z·A/√d + μ in f64.
fn frechet_features(tag: &str, n: usize, d: usize, shift: bool) -> Vec<f64> {
    let z = uniform_f64(&format!("{tag}.z"), n * d, -3f64.sqrt(), 3f64.sqrt());
    let mut a = uniform_f64(&format!("frechet{d}.a"), d * d, -1.0, 1.0);
    if shift {
        let b = uniform_f64(&format!("frechet{d}.b"), d * d, -1.0, 1.0);
        a.iter_mut().zip(&b).for_each(|(x, y)| *x += 0.5 * y);
    }
    let mu: Vec<f64> =
        uniform_f64(&format!("{tag}.mu"), d, -1.0, 1.0).iter().map(|m| m * if shift { 1.5 } else { 1.0 }).collect();
    let mut x = vec![0f64; n * d];
    for i in 0..n {
        let row = &mut x[i * d..(i + 1) * d];
        for k in 0..d {
            let zk = z[i * d + k];
            for (o, av) in row.iter_mut().zip(&a[k * d..(k + 1) * d]) {
                *o += zk * av;
            }
        }
        let s = (d as f64).sqrt();
        row.iter_mut().zip(&mu).for_each(|(o, m)| *o = *o / s + m);
    }
    x
}

#[test]
fn frechet_distance_matches_pytorch_fid_scipy() {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("fid/frechet.json")).unwrap()).unwrap();
    for case in v["cases"].as_array().unwrap() {
        let d = case["dims"].as_u64().unwrap() as usize;
        let (n1, n2) = (case["n1"].as_u64().unwrap() as usize, case["n2"].as_u64().unwrap() as usize);
        let x1 = frechet_features(&format!("frechet{d}.x1"), n1, d, false);
        let x2 = frechet_features(&format!("frechet{d}.x2"), n2, d, true);
        // The generator agrees with numpy's (guards against a vacuous comparison).
        for (got, key) in [(&x1, "x1_first"), (&x2, "x2_first")] {
            for (i, w) in case[key].as_array().unwrap().iter().enumerate() {
                let w = w.as_f64().unwrap();
                assert!((got[i] - w).abs() <= 1e-12 * w.abs().max(1.0), "{d}-d {key}[{i}]: {} vs {w}", got[i]);
            }
        }
        let t0 = std::time::Instant::now();
        let (s1, s2) = (stats(&x1, n1, d).unwrap(), stats(&x2, n2, d).unwrap());
        let fid = frechet_distance(&s1, &s2).unwrap();
        let want = case["fid"].as_f64().unwrap();
        let rel = (fid - want).abs() / want.abs();
        println!(
            "{d}-d ({n1} and {n2} samples): ours {fid:.12}, scipy {want:.12}, relative error {rel:.3e}, {:.2} s",
            t0.elapsed().as_secs_f64()
        );
        assert!(rel <= 1e-6, "{d}-d: relative error {rel:e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Resampling kernels
// ---------------------------------------------------------------------------------------------

fn fid_fixture(name: &str) -> PathBuf {
    fixture(&format!("fid/{name}"))
}

#[test]
fn bilinear_resize_matches_torch_interpolate() {
    use roentgen::eval::net::Pixels;
    use roentgen::eval::resize::bilinear_torch;
    let f = fid_fixture("resize.safetensors");
    for tag in ["up", "down"] {
        let (si, x) = read_f32(&f, &format!("bilinear_{tag}_in"));
        let (so, want) = read_f32(&f, &format!("bilinear_{tag}_out"));
        let (c, h, w, oh, ow) = (si[1], si[2], si[3], so[2], so[3]);
        let hwc = Pixels::from_chw(&x, c, h, w).data;
        let got = bilinear_torch(&hwc, h, w, c, oh, ow);
        let got = common::nhwc_to_nchw(&got, 1, c, oh, ow);
        assert_close(&format!("bilinear {tag} {h}×{w} → {oh}×{ow}"), &got, &want, 1e-6);
    }
}

#[test]
fn skimage_resize_matches_xray_resizer() {
    use roentgen::eval::resize::skimage_resize;
    let f = fid_fixture("resize.safetensors");
    for tag in ["up", "down", "down2"] {
        let (si, x) = read_f32(&f, &format!("skimage_{tag}_in"));
        let (so, want) = read_f32(&f, &format!("skimage_{tag}_out"));
        let got = skimage_resize(&x, si[1], si[2], so[1], so[2]);
        // Values are in [-1024, 1024]: the bar is relative to that scale.
        assert_close(&format!("skimage resize {tag} {}² → {}²", si[1], so[1]), &got, &want, 1e-6);
    }
}

// ---------------------------------------------------------------------------------------------
// Networks
// ---------------------------------------------------------------------------------------------

use roentgen::eval::features::{load_image, FeatureKind, FeatureNet};

fn cpu() -> Box<dyn roentgen::backend::Backend> {
    Box::new(roentgen::backend::cpu::CpuBackend::new())
}

fn pipeline_images() -> Vec<PathBuf> {
    ["a.png", "b.png", "c.png"].iter().map(|n| fid_fixture(&format!("images/{n}"))).collect()
}

/// Features of the three pipeline images, compared row by row with the reference.
fn check_rows(what: &str, net: &mut FeatureNet, paths: &[PathBuf], file: &Path, tensor: &str) {
    let (shape, want) = read_f32(file, tensor);
    assert_eq!(shape[0], paths.len());
    let d = shape[1];
    assert_eq!(net.dims(), d, "{what}: dims");
    for (i, p) in paths.iter().enumerate() {
        let got = net.extract(&load_image(p).unwrap()).unwrap();
        let name = p.file_name().unwrap().to_string_lossy();
        assert_close(&format!("{what} {name}"), &got, &want[i * d..(i + 1) * d], F32_PARITY);
    }
}

#[test]
fn inception_matches_pytorch_fid() {
    use roentgen::eval::inception::{expected_tensors, InceptionV3};
    use roentgen::eval::net::Pixels;
    use roentgen::eval::tensors::Weights;
    let src = seeded_source("seeded inception", &expected_tensors());
    // The network alone at a reduced, odd size (83×77; the minimum is 75).
    let mut model = InceptionV3::load(cpu(), &Weights { src: &src, network: "inception" }).unwrap();
    let x: Vec<f32> = uniform_f64("inception.input", 3 * 83 * 77, -1.0, 1.0).iter().map(|&v| v as f32).collect();
    let got = model.forward(&[Pixels::from_chw(&x, 3, 83, 77)]).unwrap().concat();
    let (_, want) = read_f32(&fid_fixture("inception.safetensors"), "small_out");
    assert_close("inception pool3 at 83×77", &got, &want, F32_PARITY);
    // From PNG files: RGB conversion, ÷255, bilinear to 299 (up from 64×80, down from 310×320 and
    // 300×261), 2x − 1.
    let mut net = FeatureNet::from_source(FeatureKind::Inception, &src, None, cpu()).unwrap();
    check_rows("inception pool3", &mut net, &pipeline_images(), &fid_fixture("inception.safetensors"), "features");
}

#[test]
fn xrv_densenet_matches_torchxrayvision() {
    use roentgen::eval::densenet::{preprocess, DenseNetConfig};
    let src = seeded_source("seeded xrv", &DenseNetConfig::densenet121().expected_tensors());
    let file = fid_fixture("xrv.safetensors");
    // Preprocessing: normalize, gray, XRayCenterCrop, XRayResizer(224) — every 7th row.
    for (tag, p) in ["a", "b", "c"].iter().zip(pipeline_images()) {
        let img = load_image(&p).unwrap();
        let x = preprocess(&img.pixels, img.height, img.width, img.channels);
        let rows: Vec<f32> = (0..224).step_by(7).flat_map(|y| x.data[y * 224..(y + 1) * 224].to_vec()).collect();
        let (_, want) = read_f32(&file, &format!("pre_rows_{tag}"));
        assert_close(&format!("xrv preprocessing {tag}.png"), &rows, &want, 1e-6);
    }
    let mut net = FeatureNet::from_source(FeatureKind::Xrv, &src, None, cpu()).unwrap();
    check_rows("xrv features2", &mut net, &pipeline_images(), &file, "features");
}

#[test]
fn clip_tiny_matches_transformers() {
    use roentgen::eval::clip_vision::{preprocess, PixelNorm};
    let dir = fid_fixture("clip-tiny");
    let cfg = dir.join("config.json");
    let file = fid_fixture("clip.safetensors");
    // CLIP preprocessing (Pillow bicubic to the shortest side, centre crop, mean/std) at 32 px.
    let (_, want) = read_f32(&file, "tiny_pixels");
    for (i, p) in pipeline_images().iter().enumerate() {
        let img = load_image(p).unwrap();
        let x = preprocess(&img.pixels, img.height, img.width, img.channels, 32, PixelNorm::Openai);
        let got = common::nhwc_to_nchw(&x.data, 1, 3, 32, 32);
        assert_close(&format!("clip pixels {}", p.display()), &got, &want[i * 3072..(i + 1) * 3072], 1e-6);
    }
    for (kind, tensor) in [(FeatureKind::Clip, "tiny_pooled"), (FeatureKind::ClipProj, "tiny_proj")] {
        let mut net = FeatureNet::load(kind, &dir.join("model.safetensors"), Some(&cfg), cpu()).unwrap();
        check_rows(&format!("tiny clip {}", kind.name()), &mut net, &pipeline_images(), &file, tensor);
    }
}

#[test]
fn clip_vit_b32_matches_transformers() {
    use roentgen::eval::clip_vision::ClipVisionConfig;
    let mut specs = ClipVisionConfig::vit_b32().expected_tensors();
    specs.push(("visual_projection.weight".into(), vec![512, 768]));
    let src = seeded_source("seeded ViT-B/32", &specs);
    let file = fid_fixture("clip.safetensors");
    let paths = &pipeline_images()[1..];
    for (kind, tensor) in [(FeatureKind::Clip, "b32_pooled"), (FeatureKind::ClipProj, "b32_proj")] {
        let mut net = FeatureNet::from_source(kind, &src, None, cpu()).unwrap();
        check_rows(&format!("ViT-B/32 {}", kind.name()), &mut net, paths, &file, tensor);
    }
}

/// Our name tables against the state dicts of the public releases' classes (pytorch-fid's
/// Inception3, xrv.models.DenseNet(), CLIPVisionModelWithProjection(CLIPVisionConfig())): every
/// tensor we read exists with that shape, and the ones we skip are the known unused ones.
#[test]
fn tensor_tables_match_the_public_layouts() {
    use roentgen::eval::{clip_vision::ClipVisionConfig, densenet::DenseNetConfig, inception};
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fid_fixture("specs.json")).unwrap()).unwrap();
    let mut clip = ClipVisionConfig::vit_b32().expected_tensors();
    clip.push(("visual_projection.weight".into(), vec![512, 768]));
    type Case<'a> = (&'a str, Vec<(String, Vec<usize>)>, &'a [&'a str]);
    let cases: [Case; 3] = [
        ("inception", inception::expected_tensors(), &["num_batches_tracked", "fc.weight", "fc.bias"]),
        (
            "xrv",
            DenseNetConfig::densenet121().expected_tensors(),
            &["num_batches_tracked", "classifier.weight", "classifier.bias"],
        ),
        ("clip", clip, &[]),
    ];
    for (net, ours, skipped) in cases {
        let theirs: HashMap<String, Vec<usize>> = v[net]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, s)| (k.clone(), s.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()))
            .collect();
        for (name, shape) in &ours {
            assert_eq!(theirs.get(name), Some(shape), "{net}: {name}");
        }
        let ours: HashMap<_, _> = ours.into_iter().collect();
        for name in theirs.keys().filter(|k| !ours.contains_key(*k)) {
            assert!(skipped.iter().any(|s| name.ends_with(s)), "{net}: {name} is not read");
        }
        println!("{net}: {} tensors read of {}", ours.len(), theirs.len());
    }
}

#[test]
fn sixteen_bit_png_and_jpeg_decode() {
    let a = load_image(&fid_fixture("images/d8.png")).unwrap();
    let b = load_image(&fid_fixture("images/d16.png")).unwrap();
    assert_eq!((a.width, a.height, a.channels), (40, 48, 1));
    assert_eq!(a.pixels, b.pixels, "a 16-bit PNG of 257·v must decode to the 8-bit v");
    let j = load_image(&fid_fixture("images/e.jpg")).unwrap();
    let (shape, want) = read_f32(&fid_fixture("jpeg.safetensors"), "pixels");
    assert_eq!((j.height, j.width, j.channels), (shape[0], shape[1], shape[2]));
    let diff: Vec<f32> = j.pixels.iter().zip(&want).map(|(a, b)| (*a as f32 - b).abs()).collect();
    let max = diff.iter().fold(0f32, |m, x| m.max(*x));
    let mean = diff.iter().sum::<f32>() / diff.len() as f32;
    println!("JPEG vs PIL: max {max} levels, mean {mean:.3}");
    assert!(max <= 4.0 && mean <= 0.5, "JPEG decode differs from PIL's: max {max}, mean {mean}");
}

// ---------------------------------------------------------------------------------------------
// End to end: the CLI on two folders, the tiny CLIP, FID against pytorch-fid; the cache
// ---------------------------------------------------------------------------------------------

fn tiny_clip_args<'a>(real: &'a str, fake: &'a str, kind: &'a str, weights: &'a str, cfg: &'a str) -> Vec<&'a str> {
    vec![
        "eval",
        "fid",
        "--real",
        real,
        "--fake",
        fake,
        "--features",
        kind,
        "--weights",
        weights,
        "--clip-config",
        cfg,
        "--json",
    ]
}

fn json_run(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = run_cli(args, None);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn cli_fid_matches_pytorch_fid_and_caches() {
    let tmp = tempfile::tempdir().unwrap();
    let (real, fake) = (tmp.path().join("real"), tmp.path().join("fake"));
    common::copy_dir(&fid_fixture("e2e/real"), &real);
    common::copy_dir(&fid_fixture("e2e/fake"), &fake);
    let weights = fid_fixture("clip-tiny/model.safetensors");
    let cfg = fid_fixture("clip-tiny/config.json");
    let (r, f, w, c) = (
        real.display().to_string(),
        fake.display().to_string(),
        weights.display().to_string(),
        cfg.display().to_string(),
    );
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fid_fixture("e2e.json")).unwrap()).unwrap();
    // Per-image features of the folders, then the FID, for both CLIP outputs.
    let feats = fid_fixture("e2e.safetensors");
    for (kind, key) in [(FeatureKind::Clip, "pooled"), (FeatureKind::ClipProj, "proj")] {
        let mut net = FeatureNet::load(kind, &weights, Some(&cfg), cpu()).unwrap();
        for (dir, tag) in [(&real, "real"), (&fake, "fake")] {
            let got = roentgen::eval::fid::folder_features(dir, &mut net, kind, 0, false).unwrap();
            let (_, want) = read_f32(&feats, &format!("{tag}_{key}"));
            assert_close(&format!("{} features of {tag}/", kind.name()), &got.features, &want, F32_PARITY);
        }
        let v = json_run(&tiny_clip_args(&r, &f, kind.name(), &w, &c));
        let (fid, reference) = (v["fid"].as_f64().unwrap(), want[kind.name()].as_f64().unwrap());
        let rel = (fid - reference).abs() / reference;
        println!("{}: FID ours {fid:.9}, pytorch-fid {reference:.9}, relative error {rel:.2e}", kind.name());
        // Features agree to ~1e-6 (f32); the distance inherits that, not the f64 solver's 1e-12.
        assert!(rel <= 1e-4, "{}: FID {fid} vs {reference}", kind.name());
        assert_eq!((v["real"]["computed"].as_u64(), v["real"]["cached"].as_u64()), (Some(24), Some(0)));
        assert_eq!(v["dims"].as_u64(), Some(if kind == FeatureKind::Clip { 16 } else { 8 }));
    }
    // Second run: everything from the cache, the same value to the bit.
    let args = tiny_clip_args(&r, &f, "clip", &w, &c);
    let v1 = json_run(&args);
    assert_eq!((v1["real"]["computed"].as_u64(), v1["real"]["cached"].as_u64()), (Some(0), Some(24)));
    let cache = PathBuf::from(v1["real"]["cache"].as_str().unwrap());
    assert!(cache.exists() && cache.file_name().unwrap().to_string_lossy().starts_with(".roentgen-features-clip-"));
    // A new image is computed on its own; a modified one is recomputed; a removed one drops out.
    std::fs::copy(fake.join("fake-00.png"), real.join("zz-new.png")).unwrap();
    let v2 = json_run(&args);
    assert_eq!(
        (v2["real"]["images"].as_u64(), v2["real"]["computed"].as_u64(), v2["real"]["cached"].as_u64()),
        (Some(25), Some(1), Some(24))
    );
    assert_ne!(v2["fid"], v1["fid"]);
    std::fs::copy(fake.join("fake-01.png"), real.join("real-03.png")).unwrap();
    std::fs::remove_file(real.join("zz-new.png")).unwrap();
    let v3 = json_run(&args);
    assert_eq!(
        (v3["real"]["images"].as_u64(), v3["real"]["computed"].as_u64(), v3["real"]["cached"].as_u64()),
        (Some(24), Some(1), Some(23))
    );
    // Another pixel normalisation is another input: nothing from the cache, another value.
    let mut cxr = args.clone();
    cxr.extend(["--pixel-norm", "cxr-repair"]);
    let vc = json_run(&cxr);
    assert_eq!((vc["real"]["computed"].as_u64(), vc["real"]["cached"].as_u64()), (Some(24), Some(0)));
    assert_ne!(vc["fid"], v3["fid"]);
    // --no-cache computes everything and gives the same value.
    let mut nc = args.clone();
    nc.push("--no-cache");
    let v4 = json_run(&nc);
    assert_eq!(v4["real"]["computed"].as_u64(), Some(24));
    assert_eq!(v4["fid"], v3["fid"]);
    // Text output: one line with the value.
    let (code, out, _) = run_cli(&args[..args.len() - 1], None);
    assert_eq!(code, 0);
    assert!(out.starts_with("FID ") && out.contains("clip, 16-d"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Bad input: a clear error naming the folder, file or tensor, exit 1, no panic
// ---------------------------------------------------------------------------------------------

fn expect_error(args: &[&str], needles: &[&str]) {
    let (code, out, err) = run_cli(args, None);
    assert_ne!(code, 0, "expected failure for {args:?}; stdout {out}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "error for {args:?} lacks {n:?}: {err}");
    }
    println!("{:?}\n  → {}", &args[2..], err.lines().find(|l| l.starts_with("error")).unwrap_or(err.trim()));
}

/// Writes `src`'s tensors, edited, to `dst`.
fn rewrite(src: &Path, dst: &Path, edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .iter()
        .map(|(n, t)| {
            (
                n.to_string(),
                t.shape().to_vec(),
                t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
            )
        })
        .collect();
    edit(&mut v);
    use roentgen::io::safetensors::{write_atomic, OutTensor};
    let t: Vec<(&str, Vec<usize>, OutTensor)> =
        v.iter().map(|(n, s, d)| (n.as_str(), s.clone(), OutTensor::F32(d))).collect();
    write_atomic(dst, &t).unwrap();
}

#[test]
fn bad_input_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).display().to_string();
    let real = fid_fixture("e2e/real").display().to_string();
    let fake = fid_fixture("e2e/fake").display().to_string();
    let w = fid_fixture("clip-tiny/model.safetensors");
    let ws = w.display().to_string();
    let cfg = fid_fixture("clip-tiny/config.json").display().to_string();
    let base = |r: &str, f: &str, kind: &str, w: &str| -> Vec<String> {
        ["eval", "fid", "--real", r, "--fake", f, "--features", kind, "--weights", w, "--no-cache"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let run = |args: Vec<String>, needles: &[&str]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_error(&a, needles);
    };
    // Folders: missing, empty, a single image, an unreadable image.
    run(base(&t("nope"), &fake, "clip", &ws), &["nope", "cannot read the folder"]);
    std::fs::create_dir(tmp.path().join("empty")).unwrap();
    std::fs::write(tmp.path().join("empty/notes.txt"), "x").unwrap();
    run(base(&t("empty"), &fake, "clip", &ws), &["empty", "no images"]);
    std::fs::create_dir(tmp.path().join("one")).unwrap();
    std::fs::copy(fid_fixture("images/a.png"), tmp.path().join("one/a.png")).unwrap();
    run(base(&real, &t("one"), "clip", &ws), &["one", "at least 2"]);
    std::fs::create_dir(tmp.path().join("bad")).unwrap();
    std::fs::copy(fid_fixture("images/a.png"), tmp.path().join("bad/a.png")).unwrap();
    std::fs::write(tmp.path().join("bad/broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let mut a = base(&real, &t("bad"), "clip", &ws);
    a.extend(["--clip-config".into(), cfg.clone()]);
    run(a, &["broken.png"]);
    // Weights: missing file, not safetensors, another network, a missing tensor, a wrong shape.
    run(base(&real, &fake, "xrv", &t("none.safetensors")), &["none.safetensors", "no such file"]);
    std::fs::write(tmp.path().join("junk.safetensors"), b"this is not a safetensors file").unwrap();
    run(base(&real, &fake, "inception", &t("junk.safetensors")), &["junk.safetensors", "not a valid safetensors"]);
    run(base(&real, &fake, "inception", &ws), &["'Conv2d_1a_3x3.conv.weight' is missing", "InceptionV3"]);
    run(base(&real, &fake, "xrv", &ws), &["'features.conv0.weight' is missing", "DenseNet-121"]);
    run(
        base(&real, &fake, "clip", &ws),
        &["'vision_model.embeddings.patch_embedding.weight' has shape [16, 3, 8, 8]", "needs [768, 3, 32, 32]"],
    );
    rewrite(&w, &tmp.path().join("no-ln.safetensors"), |v| v.retain(|t| t.0 != "vision_model.post_layernorm.bias"));
    let mut a = base(&real, &fake, "clip", &t("no-ln.safetensors"));
    a.extend(["--clip-config".into(), cfg.clone()]);
    run(a, &["'vision_model.post_layernorm.bias' is missing"]);
    rewrite(&w, &tmp.path().join("no-proj.safetensors"), |v| v.retain(|t| t.0 != "visual_projection.weight"));
    let mut a = base(&real, &fake, "clip-proj", &t("no-proj.safetensors"));
    a.extend(["--clip-config".into(), cfg.clone()]);
    run(a, &["'visual_projection.weight' is missing"]);
    rewrite(&w, &tmp.path().join("nan.safetensors"), |v| {
        for t in v.iter_mut().filter(|t| t.0 == "vision_model.pre_layrnorm.weight") {
            t.2[3] = f32::NAN;
        }
    });
    let mut a = base(&real, &fake, "clip", &t("nan.safetensors"));
    a.extend(["--clip-config".into(), cfg.clone()]);
    run(a, &["'vision_model.pre_layrnorm.weight'", "non-finite"]);
    // Options: an unknown network, a CLIP config for Inception, a broken config.
    run(base(&real, &fake, "resnet", &ws), &["resnet"]);
    let mut a = base(&real, &fake, "inception", &ws);
    a.extend(["--clip-config".into(), cfg.clone()]);
    run(a, &["--clip-config"]);
    std::fs::write(tmp.path().join("cfg.json"), r#"{"hidden_size": 16, "num_attention_heads": 3}"#).unwrap();
    let mut a = base(&real, &fake, "clip", &ws);
    a.extend(["--clip-config".into(), t("cfg.json")]);
    run(a, &["cfg.json", "num_attention_heads"]);
}
