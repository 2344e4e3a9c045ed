//! The VAE against diffusers' AutoencoderKL: encoder moments (mean and log-variance) and decoder.

mod common;
use common::*;
use roentgen::backend::cpu::CpuBackend;
use roentgen::backend::Backend;
use roentgen::models::vae::{AutoencoderKL, VaeConfig};
use roentgen::models::Component;
use roentgen::nn::Cx;
use roentgen::nn::Fmap;
use roentgen::tensor::Arena;

fn upload_nchw(b: &CpuBackend, arena: &mut roentgen::tensor::Arena, shape: &[usize], data: &[f32]) -> Fmap {
    let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    let f = Fmap::alloc(arena, n, h, w, c).unwrap();
    b.upload(&f.t, &nchw_to_nhwc(data, n, c, h, w)).unwrap();
    f
}

fn download_nchw(b: &CpuBackend, f: &Fmap) -> Vec<f32> {
    nhwc_to_nchw(&b.download(&f.t).unwrap(), f.batch, f.c, f.h, f.w)
}

/// Runs one half of the VAE (`run`, in an arena from `arena`) on the NCHW tensor `input` of the
/// fixture's io.safetensors and checks its output against `output`; returns the output (the arena
/// stays alive in the backend).
fn check_stage(
    b: &mut CpuBackend,
    [name, input, output]: [&str; 3],
    arena: &dyn Fn(&mut CpuBackend, [usize; 3]) -> anyhow::Result<Arena>,
    run: &dyn Fn(&mut Cx, &Fmap) -> anyhow::Result<Fmap>,
) -> Fmap {
    let io = fixture(name).join("io.safetensors");
    let (shape, x) = read_f32(&io, input);
    let mut arena = arena(b, [shape[0], shape[2], shape[3]]).unwrap();
    let xt = upload_nchw(b, &mut arena, &shape, &x);
    let y = run(&mut Cx::new(b, &mut arena), &xt).unwrap();
    let (yshape, want) = read_f32(&io, output);
    assert_eq!(yshape, vec![y.batch, y.c, y.h, y.w]);
    assert_close(&format!("{name} {input} → {output}"), &download_nchw(b, &y), &want, F32_PARITY);
    y
}

fn check_vae(name: &str) {
    let dir = fixture(name);
    let mut b = CpuBackend::new();
    let (vae, report) = AutoencoderKL::load(&mut b, &dir, None).unwrap();
    assert_eq!(report.tensors, vae.table.entries().len());

    let moments = check_stage(
        &mut b,
        [name, "image", "moments"],
        &|b, [n, h, w]| vae.allocate_encode_arena(b, n, h, w),
        &|cx, x| vae.encode(cx, x),
    );
    let (mean, logvar) = roentgen::models::vae::split_moments(&b.download(&moments.t).unwrap(), 4);
    let (m, h, w) = (moments.batch, moments.h, moments.w);
    for (half, tensor) in [(mean, "mean"), (logvar, "logvar")] {
        let want = read_f32(&dir.join("io.safetensors"), tensor).1;
        assert_close(&format!("{name} latent {tensor}"), &nhwc_to_nchw(&half, m, 4, h, w), &want, F32_PARITY);
    }
    check_stage(
        &mut b,
        [name, "latents", "decoded"],
        &|b, [n, h, w]| vae.allocate_decode_arena(b, n, h, w),
        &|cx, z| vae.decode(cx, z),
    );
}

#[test]
fn vae_encode_decode_match_diffusers() {
    check_vae("vae-a");
}

#[test]
fn vae_with_2022_attention_names_three_levels_matches_diffusers() {
    check_vae("vae-b");
}

#[test]
fn sd14_vae_has_the_reference_parameter_counts() {
    let counts = reference_counts();
    let cfg = VaeConfig::from_file(&sd14_config().join("vae/config.json")).unwrap();
    assert_eq!(cfg.scale_factor(), 8);
    let table = roentgen::tensor::Layout::measure(|l| roentgen::models::vae::params_layout(l, &cfg));
    assert_eq!(table.numel() as u64, counts["vae"].as_u64().unwrap());
    let enc: usize = table
        .entries()
        .iter()
        .filter(|e| e.name.starts_with("encoder.") || e.name.starts_with("quant_conv."))
        .map(|e| e.shape.numel())
        .sum();
    assert_eq!((enc, table.numel() - enc), (34_163_664, 49_490_199));
}
