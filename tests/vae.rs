//! The VAE against diffusers' AutoencoderKL: encoder moments (mean and log-variance) and decoder.

mod common;
use common::*;
use roentgen::backend::cpu::CpuBackend;
use roentgen::backend::Backend;
use roentgen::models::vae::{AutoencoderKL, VaeConfig};
use roentgen::nn::Cx;
use roentgen::nn::Fmap;

fn upload_nchw(b: &CpuBackend, arena: &mut roentgen::tensor::Arena, shape: &[usize], data: &[f32]) -> Fmap {
    let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    let f = Fmap::alloc(arena, n, h, w, c).unwrap();
    b.upload(&f.t, &nchw_to_nhwc(data, n, c, h, w)).unwrap();
    f
}

fn download_nchw(b: &CpuBackend, f: &Fmap) -> Vec<f32> {
    nhwc_to_nchw(&b.download(&f.t).unwrap(), f.batch, f.c, f.h, f.w)
}

fn check_vae(name: &str) {
    let dir = fixture(name);
    let io = dir.join("io.safetensors");
    let mut b = CpuBackend::new();
    let (vae, report) = AutoencoderKL::load(&mut b, &dir, None).unwrap();
    assert_eq!(report.tensors, vae.table.entries().len());

    let (ishape, image) = read_f32(&io, "image");
    let mut arena = vae.allocate_encode_arena(&mut b, ishape[0], ishape[2], ishape[3]).unwrap();
    let x = upload_nchw(&b, &mut arena, &ishape, &image);
    let moments = vae.encode(&mut Cx::new(&b, &mut arena), &x).unwrap();
    let (mshape, want) = read_f32(&io, "moments");
    assert_eq!(mshape, vec![moments.batch, moments.c, moments.h, moments.w]);
    assert_close(&format!("{name} encoder moments"), &download_nchw(&b, &moments), &want, F32_PARITY);
    let (mean, logvar) = roentgen::models::vae::split_moments(&b.download(&moments.t).unwrap(), 4);
    let (m, h, w) = (moments.batch, moments.h, moments.w);
    assert_close(
        &format!("{name} latent mean"),
        &nhwc_to_nchw(&mean, m, 4, h, w),
        &read_f32(&io, "mean").1,
        F32_PARITY,
    );
    assert_close(
        &format!("{name} latent logvar"),
        &nhwc_to_nchw(&logvar, m, 4, h, w),
        &read_f32(&io, "logvar").1,
        F32_PARITY,
    );

    let (zshape, z) = read_f32(&io, "latents");
    let mut arena = vae.allocate_decode_arena(&mut b, zshape[0], zshape[2], zshape[3]).unwrap();
    let zt = upload_nchw(&b, &mut arena, &zshape, &z);
    let img = vae.decode(&mut Cx::new(&b, &mut arena), &zt).unwrap();
    let (dshape, want) = read_f32(&io, "decoded");
    assert_eq!(dshape, vec![img.batch, img.c, img.h, img.w]);
    assert_close(&format!("{name} decoded image"), &download_nchw(&b, &img), &want, F32_PARITY);
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
    let counts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("param_counts.json")).unwrap()).unwrap();
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
