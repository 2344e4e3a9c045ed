//! `roentgen eval ms-ssim`: parity with pytorch_msssim 1.0.0 (fixtures by
//! tests/fixtures/generate_msssim.py), grouping by prompt from PNG text chunks or a manifest, the
//! token-length bins, and bad input (clear error naming the file or prompt, exit 1, no panic).

mod common;
use common::*;
use roentgen::eval::msssim::{ms_ssim, Gray, MIN_SIDE};
use serde_json::Value;
use std::path::Path;

/// MS-SSIM values are in [0, 1]: the project's f32 parity bar, absolute.
const BAR: f64 = F32_PARITY as f64;

/// The fixture's integer generator (see generate_msssim.py), bit for bit.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn noise(seed: u64, w: usize, h: usize) -> Vec<i64> {
    (0..(w * h) as u64).map(|i| (mix((seed << 32) | i) >> 56) as i64).collect()
}

fn pair(kind: &str, seed: u64, w: usize, h: usize) -> (Vec<u8>, Vec<u8>) {
    let mut x = noise(seed, w, h);
    let clip = |v: i64| v.clamp(0, 255);
    let y: Vec<i64> = match kind {
        "noise" => noise(seed + 1, w, h),
        "perturb" => x.iter().zip(noise(seed + 1, w, h)).map(|(a, n)| clip(a + n % 41 - 20)).collect(),
        "blur" => {
            let at =
                |r: isize, c: isize| x[r.clamp(0, h as isize - 1) as usize * w + c.clamp(0, w as isize - 1) as usize];
            (0..h * w)
                .map(|i| {
                    let (r, c) = ((i / w) as isize, (i % w) as isize);
                    let s: i64 = (-1..=1)
                        .flat_map(|dr| (-1..=1).map(move |dc| (dr, dc)))
                        .map(|(dr, dc)| at(r + dr, c + dc))
                        .sum();
                    s / 9
                })
                .collect()
        }
        "identical" => x.clone(),
        "inverted" => x.iter().map(|a| 255 - a).collect(),
        "gradient" => {
            let base: Vec<i64> = (0..h * w)
                .map(|i| ((i / w) as i64 * 255 / (h as i64 - 1) + (i % w) as i64 * 255 / (w as i64 - 1)) / 2)
                .collect();
            let n1 = noise(seed + 1, w, h);
            x = base.iter().zip(&x).map(|(b, a)| clip(b + a % 32)).collect();
            base.iter().zip(n1).map(|(b, n)| clip(b + n % 32)).collect()
        }
        k => panic!("unknown kind {k}"),
    };
    (x.iter().map(|&v| v as u8).collect(), y.iter().map(|&v| v as u8).collect())
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn parity_with_pytorch_msssim_on_generated_pairs() {
    let fx = read_json(&fixture("msssim/pairs.json"));
    let (mut max32, mut max64) = (0f64, 0f64);
    let cases = fx["cases"].as_array().unwrap();
    let mut distinct = std::collections::BTreeSet::new();
    for c in cases {
        let (kind, seed) = (c["kind"].as_str().unwrap(), c["seed"].as_u64().unwrap());
        let (w, h) = (c["width"].as_u64().unwrap() as usize, c["height"].as_u64().unwrap() as usize);
        let (x, y) = pair(kind, seed, w, h);
        let sum = |v: &[u8]| v.iter().map(|&p| p as u64).sum::<u64>();
        assert_eq!(sum(&x), c["x_sum"].as_u64().unwrap(), "{kind} {w}x{h}: generator differs from the fixture's");
        assert_eq!(sum(&y), c["y_sum"].as_u64().unwrap(), "{kind} {w}x{h}: generator differs from the fixture's");
        let got = ms_ssim(&Gray::from_u8(w, h, &x), &Gray::from_u8(w, h, &y)).unwrap();
        let (r32, r64) = (c["ms_ssim_f32"].as_f64().unwrap(), c["ms_ssim_f64"].as_f64().unwrap());
        println!("{kind:9} {w}x{h}: ours {got:.8}, pytorch_msssim f32 {r32:.8}, f64 {r64:.8}");
        assert!((got - r32).abs() <= BAR, "{kind} {w}x{h}: {got} vs pytorch_msssim {r32}");
        // Against the float64 run the only difference left is summation order: this fails if the
        // reference's float32-rounded window taps were replaced by the exact Gaussian (~7e-6 off).
        assert!((got - r64).abs() <= 1e-9, "{kind} {w}x{h}: {got} vs pytorch_msssim (float64) {r64}");
        max32 = max32.max((got - r32).abs());
        max64 = max64.max((got - r64).abs());
        distinct.insert((r32 * 1e4) as i64);
    }
    println!("max |ours - pytorch_msssim|: {max32:.3e} (float32 reference), {max64:.3e} (float64 reference)");
    assert!(distinct.len() >= 8, "fixture values should span the range, got {distinct:?}");
}

#[test]
fn small_images_are_refused() {
    let ok = Gray::from_u8(MIN_SIDE, MIN_SIDE, &vec![7; MIN_SIDE * MIN_SIDE]);
    assert!(ms_ssim(&ok, &ok).is_ok());
    for (w, h) in [(MIN_SIDE - 1, 300), (300, MIN_SIDE - 1)] {
        let g = Gray::from_u8(w, h, &vec![7; w * h]);
        let e = ms_ssim(&g, &g).unwrap_err().to_string();
        assert!(e.contains("too small") && e.contains("161"), "{e}");
    }
    let a = Gray::from_u8(200, 200, &vec![7; 200 * 200]);
    let b = Gray::from_u8(200, 201, &vec![7; 200 * 201]);
    assert!(ms_ssim(&a, &b).unwrap_err().to_string().contains("one size"));
}

fn tokenizer_arg() -> String {
    sd14_config().display().to_string()
}

/// Runs the CLI with --json and checks it against groups.json (per pair, overall, bins).
fn check_cli_json(args: &[&str]) {
    let tok = tokenizer_arg();
    let mut full = vec!["eval", "ms-ssim", "--json", "--tokenizer", &tok];
    full.extend_from_slice(args);
    let (code, out, err) = run_cli(&full, None);
    assert_eq!(code, 0, "{full:?}: {err}");
    let got: Value = serde_json::from_str(&out).unwrap();
    let want = read_json(&fixture("msssim/groups.json"));
    let groups = want["groups"].as_array().unwrap();
    assert_eq!(got["prompts"].as_u64().unwrap() as usize, groups.len());
    assert_eq!(got["images"], 9);
    assert_eq!(got["pairs"], 10);
    let tokenizer = roentgen::text::bpe::ClipTokenizer::from_dir(&sd14_config()).unwrap();
    let mut max_err = 0f64;
    for g in groups {
        let prompt = g["prompt"].as_str().unwrap();
        let p = got["per_prompt"].as_array().unwrap().iter().find(|p| p["prompt"] == prompt).unwrap();
        assert_eq!(p["tokens"].as_u64().unwrap() as usize, tokenizer.encode(prompt).tokens);
        let (ours, refs) = (p["pairs"].as_array().unwrap(), g["pairs"].as_array().unwrap());
        assert_eq!(ours.len(), refs.len(), "{prompt}");
        for (a, b) in ours.iter().zip(refs) {
            let e = (a.as_f64().unwrap() - b.as_f64().unwrap()).abs();
            assert!(e <= BAR, "{prompt}: pair {a} vs pytorch_msssim {b}");
            max_err = max_err.max(e);
        }
    }
    println!("{full:?}: max pair error {max_err:.3e}");
    assert!((got["mean"].as_f64().unwrap() - want["mean"].as_f64().unwrap()).abs() <= BAR);
    assert!((got["std"].as_f64().unwrap() - want["std"].as_f64().unwrap()).abs() <= BAR);
    // Bins: the fixture's prompts fall in distinct bins of 10; each bin holds its prompt's pairs.
    let bins = got["bins"].as_array().unwrap();
    assert_eq!(bins.len(), 3, "{bins:?}");
    for p in got["per_prompt"].as_array().unwrap() {
        let t = p["tokens"].as_u64().unwrap();
        let b = bins.iter().find(|b| b["tokens_min"].as_u64().unwrap() <= t && t <= b["tokens_max"].as_u64().unwrap());
        let b = b.unwrap_or_else(|| panic!("no bin for {t} tokens"));
        assert_eq!(b["tokens_min"].as_u64().unwrap(), t / 10 * 10);
        assert_eq!(b["pairs"].as_u64().unwrap() as usize, p["pairs"].as_array().unwrap().len());
        assert!((b["mean"].as_f64().unwrap() - p["mean"].as_f64().unwrap()).abs() < 1e-12);
    }
}

#[test]
fn groups_from_png_prompt_chunks_match_reference() {
    check_cli_json(&["--images", fixture("msssim/images").to_str().unwrap()]);
}

#[test]
fn groups_from_manifest_match_reference() {
    // Relative paths resolve against the manifest's folder...
    check_cli_json(&["--manifest", fixture("msssim/manifest.jsonl").to_str().unwrap()]);
    // ...or against --images when given.
    let dir = tempfile::tempdir().unwrap();
    let m = std::fs::read_to_string(fixture("msssim/manifest.jsonl")).unwrap().replace("images/", "");
    std::fs::write(dir.path().join("m.jsonl"), m).unwrap();
    check_cli_json(&[
        "--manifest",
        dir.path().join("m.jsonl").to_str().unwrap(),
        "--images",
        fixture("msssim/images").to_str().unwrap(),
    ]);
}

#[test]
fn table_output() {
    let (tok, imgs) = (tokenizer_arg(), fixture("msssim/images"));
    let (code, out, err) = run_cli(&["eval", "ms-ssim", "--images", imgs.to_str().unwrap(), "--tokenizer", &tok], None);
    assert_eq!(code, 0, "{err}");
    println!("{out}");
    let want = read_json(&fixture("msssim/groups.json"));
    let head = format!(
        "{:.4} ± {:.4} over 10 pairs of 9 images, 3 prompts",
        want["mean"].as_f64().unwrap(),
        want["std"].as_f64().unwrap()
    );
    assert!(out.contains(&head), "{out}");
    assert!(out.contains("CLIP tokens") && out.contains("0–9"), "{out}");
}

/// A PNG as `roentgen sample` writes it (UTF-8 iTXt chunks), from an 8-bit gray pattern.
fn sample_png(path: &Path, w: usize, h: usize, seed: u64, prompt: &str) {
    let px: Vec<f32> = noise(seed, w, h).iter().map(|&v| v as f32 / 255.0).collect();
    let text = [("prompt", prompt.to_string()), ("seed", seed.to_string())];
    roentgen::io::images::write_png(path, &roentgen::io::images::encode_png(&px, 1, h, w, true, &text).unwrap())
        .unwrap();
}

#[test]
fn images_written_by_sample_are_grouped_by_their_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = "Petite opacité — pneumonia?"; // non-Latin-1 text: an iTXt chunk
    for i in 0..3 {
        sample_png(&dir.path().join(format!("42-{i:04}.png")), 170, 165, i, prompt);
    }
    let tok = tokenizer_arg();
    let (code, out, err) =
        run_cli(&["eval", "ms-ssim", "--json", "--images", dir.path().to_str().unwrap(), "--tokenizer", &tok], None);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["prompts"], 1);
    assert_eq!(v["pairs"], 3);
    assert_eq!(v["per_prompt"][0]["prompt"], prompt);
}

/// Runs the CLI, expects exit 1, one error line containing every needle, and no panic.
fn expect_error(args: &[&str], needles: &[&str]) {
    let tok = tokenizer_arg();
    let mut full = vec!["eval", "ms-ssim"];
    if !args.contains(&"--tokenizer") {
        full.extend_from_slice(&["--tokenizer", &tok]);
    }
    full.extend_from_slice(args);
    expect_cli_error(&full, needles);
}

#[test]
fn bad_input_gets_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = |name: &str| {
        let p = tmp.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    let s = |p: &Path| p.to_str().unwrap().to_string();

    let empty = d("empty");
    expect_error(&["--images", &s(&empty)], &["empty", "no PNG images"]);
    expect_error(&[], &["--images", "--manifest"]);
    expect_error(&["--images", &s(&tmp.path().join("missing"))], &["missing", "cannot read folder"]);

    let corrupt = d("corrupt");
    sample_png(&corrupt.join("a.png"), 170, 170, 1, "p");
    std::fs::write(corrupt.join("b.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    expect_error(&["--images", &s(&corrupt)], &["b.png"]);

    let single = d("single");
    sample_png(&single.join("a.png"), 170, 170, 1, "Mild edema.");
    sample_png(&single.join("b.png"), 170, 170, 2, "Mild edema.");
    sample_png(&single.join("c.png"), 170, 170, 3, "Small right effusion.");
    expect_error(&["--images", &s(&single)], &["\"Small right effusion.\"", "at least two", "c.png"]);

    let sizes = d("sizes");
    sample_png(&sizes.join("a.png"), 170, 170, 1, "Mild edema.");
    sample_png(&sizes.join("b.png"), 171, 170, 2, "Mild edema.");
    expect_error(&["--images", &s(&sizes)], &["Mild edema.", "b.png", "171×170", "170×170"]);

    let small = d("small");
    sample_png(&small.join("a.png"), 160, 200, 1, "Mild edema.");
    sample_png(&small.join("b.png"), 160, 200, 2, "Mild edema.");
    expect_error(&["--images", &s(&small)], &["a.png", "too small", "161"]);

    let untagged = d("untagged");
    sample_png(&untagged.join("a.png"), 170, 170, 1, "Mild edema.");
    let px = vec![0.5f32; 170 * 170];
    roentgen::io::images::write_png(
        &untagged.join("b.png"),
        &roentgen::io::images::encode_png(&px, 1, 170, 170, true, &[]).unwrap(),
    )
    .unwrap();
    expect_error(&["--images", &s(&untagged)], &["b.png", "no \"prompt\" text chunk", "--manifest"]);

    let wide = d("sixteen");
    sample_png(&wide.join("a.png"), 170, 170, 1, "Mild edema.");
    {
        let f = std::fs::File::create(wide.join("b.png")).unwrap();
        let mut enc = png::Encoder::new(f, 170, 170);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Sixteen);
        enc.add_text_chunk("prompt".into(), "Mild edema.".into()).unwrap();
        enc.write_header().unwrap().write_image_data(&vec![3u8; 170 * 170 * 2]).unwrap();
    }
    expect_error(&["--images", &s(&wide)], &["b.png", "16-bit", "8-bit"]);

    let m = tmp.path().join("m.jsonl");
    std::fs::write(&m, "{\"image\": \"a.png\", \"text\": \"x\"}\n{\"image\": \"b.png\"}\n").unwrap();
    expect_error(&["--manifest", &s(&m)], &["m.jsonl:2", "\"text\""]);
    std::fs::write(&m, "{\"image\": \"a.png\", \"text\": \"x\"}\nnot json\n").unwrap();
    expect_error(&["--manifest", &s(&m)], &["m.jsonl:2", "not JSON"]);
    std::fs::write(&m, "{\"image\": \"a.png\", \"text\": \"x\"}\n{\"image\": \"gone.png\", \"text\": \"x\"}\n")
        .unwrap();
    expect_error(&["--manifest", &s(&m), "--images", &s(&single)], &["gone.png", "cannot open"]);
    std::fs::write(&m, "\n").unwrap();
    expect_error(&["--manifest", &s(&m)], &["m.jsonl", "no images listed"]);
    expect_error(&["--images", &s(&single), "--tokenizer", &s(&tmp.path().join("no-tok"))], &["no-tok", "tokenizer"]);
}
