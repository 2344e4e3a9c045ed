//! Editing (issue 21). img2img: `roentgen sample --init-image F --strength S` against diffusers'
//! StableDiffusionImg2ImgPipeline (tests/fixtures/generate_img2img.py) on the small fixture
//! pipelines: PNDM and DPM-Solver++ 2M at strengths 0.3, 0.75 and 1.0, DDIM, Euler and Euler
//! ancestral at 0.75, and a gray 17×26 image that diffusers' processor resizes (Lanczos) to 16×24.
//! Each run draws the init image's latent sample, then the noise (then Euler ancestral's step noise)
//! from the seed's generator, as diffusers does. Inpainting: `--mask M` against
//! StableDiffusionInpaintPipeline (tests/fixtures/generate_inpaint.py) with pipe-a's 4-channel U-Net
//! (blending) and a 9-channel inpainting U-Net.

mod common;
use common::*;
use serde_json::Value;

fn cli_scheduler(class: &str) -> &'static str {
    match class {
        "PNDMScheduler" => "pndm",
        "DDIMScheduler" => "ddim",
        "EulerDiscreteScheduler" => "euler",
        "EulerAncestralDiscreteScheduler" => "euler-a",
        "DPMSolverMultistepScheduler" => "dpm++2m",
        other => panic!("unexpected scheduler {other}"),
    }
}

fn check(run_name: &str) {
    check_in("img2img", run_name)
}

/// Runs `run_name` of the fixture folder `set` (img2img or inpaint) and compares with diffusers.
fn check_in(set: &str, run_name: &str) {
    let fix = fixture(set);
    let all: Value = serde_json::from_str(&std::fs::read_to_string(fix.join("runs.json")).unwrap()).unwrap();
    let run = all["runs"].as_array().unwrap().iter().find(|r| r["name"] == run_name).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline(run["pipeline"].as_str().unwrap_or("pipe-a"), dir.path());
    if run["unet_channels"] == 9 {
        std::fs::remove_dir_all(pipe.join("unet")).unwrap();
        copy_dir(&fix.join("unet-9ch"), &pipe.join("unet"));
    }
    let image = match all["init_image"].as_str() {
        Some(shared) => fixture(shared),
        None => fix.join(run["image"].as_str().unwrap()),
    };
    let dump = dir.path().join("dump.safetensors");
    let num = |k: &str| run[k].as_u64().unwrap().to_string();
    let mut args = CliArgs::new(&["sample"]).opt("--model", &pipe);
    for p in run["prompts"].as_array().unwrap() {
        args = args.opt("--prompt", p.as_str().unwrap());
    }
    if let Some(m) = all["mask"].as_str() {
        args = args.opt("--mask", fix.join(m));
    }
    let args = args
        .opt("--init-image", image)
        .opt("--strength", run["strength"].to_string())
        .opt("--scheduler", cli_scheduler(run["scheduler"].as_str().unwrap()))
        .opt("--num-images", num("num_images"))
        .opt("--steps", num("steps"))
        .opt("--seed", num("seed"))
        .with(&["--guidance", "4", "--batch-size", "2"])
        .opt("--out", dir.path().join("out"))
        .opt("--dump", &dump);
    let (_, stderr) = args.run_ok();
    let io = fix.join(format!("io-{run_name}.safetensors"));
    let (shape, got) = read_f32(&dump, "image");
    let (want_shape, want) = read_f32(&io, "image");
    assert_eq!(shape, want_shape, "{run_name}");
    let max_err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("{run_name}: image max |ours − diffusers| = {max_err:.2e} (bar {PIPELINE_ABS:.0e})");
    assert!(max_err <= PIPELINE_ABS, "{run_name}: image error {max_err}");
    assert_close(
        &format!("{run_name} final latents"),
        &read_f32(&dump, "latents").1,
        &read_f32(&io, "latents").1,
        PIPELINE_ABS,
    );
    if run_name.contains("resized") {
        assert!(stderr.contains("17×26 resized to 16×24"), "{stderr}");
    }
}

#[test]
fn img2img_pndm_matches_diffusers_at_three_strengths() {
    for s in ["0.3", "0.75", "1.0"] {
        check(&format!("pndm-{s}"));
    }
}

#[test]
fn img2img_dpm_solver_matches_diffusers_at_three_strengths() {
    for s in ["0.3", "0.75", "1.0"] {
        check(&format!("dpm-{s}"));
    }
}

#[test]
fn img2img_ddim_euler_and_euler_ancestral_match_diffusers() {
    for name in ["ddim-0.75", "euler-0.75", "euler-a-0.75"] {
        check(name);
    }
}

#[test]
fn img2img_resizes_a_gray_image_as_diffusers_does() {
    check("euler-gray-resized");
}

/// int(6 × 0.1) = 0 steps: diffusers would add noise at an empty list of timesteps; refused. (PNDM's
/// schedule has one timestep more than steps, so there diffusers, and roentgen, run one step.)
#[test]
fn img2img_refuses_a_strength_that_leaves_no_step() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let args = CliArgs::new(&["sample", "--prompt", "Large left pleural effusion."])
        .opt("--model", &pipe)
        .opt("--init-image", fixture("img2img").join("rgb-16x16.png"))
        .opt("--out", dir.path().join("out"))
        .with(&["--strength", "0.1", "--steps", "6", "--seed", "1", "--scheduler", "ddim"]);
    args.expect_error(&["--strength", "no step left to denoise"]);
    let args = CliArgs::new(&["sample", "--prompt", "x", "--strength", "0.5"]).opt("--model", &pipe);
    let (code, _, err) = run_cli(&args.0.iter().map(String::as_str).collect::<Vec<_>>(), None);
    assert!(code != 0 && err.contains("--init-image"), "{err}");
}

/// The resize img2img uses is Pillow's Lanczos, byte for byte (shrinking, enlarging, one axis).
#[test]
fn lanczos_resize_matches_pillow_exactly() {
    let bytes = std::fs::read(fixture("img2img").join("lanczos.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for k in 0..4 {
        let (src, out) = (st.tensor(&format!("src{k}")).unwrap(), st.tensor(&format!("out{k}")).unwrap());
        let (s, o) = (src.shape(), out.shape());
        let got = roentgen::eval::resize::pil_lanczos(src.data(), s[0], s[1], 3, o[0], o[1]);
        let diff = got.iter().zip(out.data()).filter(|(a, b)| a != b).count();
        println!("{}×{} → {}×{}: {diff} of {} bytes differ from Pillow", s[1], s[0], o[1], o[0], got.len());
        assert_eq!(diff, 0);
    }
}

#[test]
fn inpainting_with_an_ordinary_unet_matches_diffusers() {
    for name in ["unet4-pndm-1.0", "unet4-dpm-0.75", "unet4-euler-a-1.0"] {
        check_in("inpaint", name);
    }
}

#[test]
fn inpainting_with_an_inpainting_unet_matches_diffusers() {
    for name in ["unet9-pndm-1.0", "unet9-euler-0.6"] {
        check_in("inpaint", name);
    }
}

/// An inpainting U-Net without a mask is refused, naming what it needs.
#[test]
fn an_inpainting_unet_needs_an_image_and_a_mask() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    std::fs::remove_dir_all(pipe.join("unet")).unwrap();
    copy_dir(&fixture("inpaint/unet-9ch"), &pipe.join("unet"));
    let args = CliArgs::new(&["sample", "--prompt", "Large left pleural effusion.", "--seed", "1"])
        .opt("--model", &pipe)
        .opt("--out", dir.path().join("out"));
    args.expect_error(&["inpainting", "9 input channels", "--mask"]);
}
