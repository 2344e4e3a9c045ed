//! The U-Net against diffusers' UNet2DConditionModel (fixtures from tests/fixtures/generate.py),
//! block by block.

mod common;
use common::*;
use roentgen::backend::cpu::CpuBackend;
use roentgen::backend::Backend;
use roentgen::models::unet::{UNet, UNetConfig};
use roentgen::models::Component;
use roentgen::nn::Cx;
use roentgen::nn::Fmap;

fn check_unet(name: &str) {
    let dir = fixture(name);
    let io = dir.join("io.safetensors");
    let mut b = CpuBackend::new();
    let (unet, report) = UNet::load(&mut b, &dir, None).unwrap();
    assert_eq!(report.tensors, unet.table.entries().len());
    let (s_shape, sample) = read_f32(&io, "sample");
    let (n, c, h, w) = (s_shape[0], s_shape[1], s_shape[2], s_shape[3]);
    let (ctx_shape, ctx) = read_f32(&io, "encoder_hidden_states");
    let t = read_f32(&io, "timestep").1[0];
    let mut arena = unet.allocate_arena(&mut b, n, h, w, ctx_shape[1]).unwrap();
    let x = Fmap::alloc(&mut arena, n, h, w, c).unwrap();
    let ctx_t = arena.alloc([n * ctx_shape[1], ctx_shape[2]]).unwrap();
    b.upload(&x.t, &nchw_to_nhwc(&sample, n, c, h, w)).unwrap();
    b.upload(&ctx_t, &ctx).unwrap();
    let mut probes = Vec::new();
    let out = unet.forward(&mut Cx::new(&b, &mut arena), &x, t, &ctx_t, ctx_shape[1], Some(&mut probes)).unwrap();
    println!("{name}: arena {} elements planned, {} used", arena.capacity(), arena.peak());
    // Block outputs first, in order, so the first failure names where the two diverge.
    for (pname, f) in &probes {
        let key = format!("probe.{pname}");
        if pname == "conv_out" {
            continue;
        }
        let (shape, want) = read_f32(&io, &key);
        assert_eq!(shape, vec![f.batch, f.c, f.h, f.w], "{key}");
        let got = nhwc_to_nchw(&b.download(&f.t).unwrap(), f.batch, f.c, f.h, f.w);
        assert_close(&format!("{name} {pname}"), &got, &want, F32_PARITY);
    }
    let (shape, want) = read_f32(&io, "out");
    assert_eq!(shape, vec![out.batch, out.c, out.h, out.w]);
    let got = nhwc_to_nchw(&b.download(&out.t).unwrap(), out.batch, out.c, out.h, out.w);
    assert_close(&format!("{name} noise prediction"), &got, &want, F32_PARITY);
}

#[test]
fn unet_forward_matches_diffusers_sd1_style_config() {
    check_unet("unet-a");
}

#[test]
fn unet_forward_matches_diffusers_head_dim_list_linear_projection_odd_size() {
    check_unet("unet-b");
}

#[test]
fn sd14_unet_has_the_reference_parameter_count() {
    let counts = reference_counts();
    let cfg = UNetConfig::from_file(&sd14_config().join("unet/config.json")).unwrap();
    assert_eq!(cfg.heads, vec![8; 4], "SD v1's attention_head_dim 8 means 8 heads");
    let table = roentgen::tensor::Layout::measure(|l| roentgen::models::unet::params_layout(l, &cfg));
    assert_eq!(table.numel() as u64, counts["unet"].as_u64().unwrap());
    assert_eq!(table.numel(), 859_520_964);
}

#[test]
fn sd14_guided_step_flop_count_matches_pytorch_flop_counter() {
    // The planning run counts FLOP from the shapes without allocating the 3.4 GB of weights; the
    // reference is torch.utils.flop_counter on the same architecture (tests/fixtures/generate.py).
    let counts = reference_counts();
    let want = counts["unet_guided_step_512_flops"].as_u64().unwrap();
    let cfg = UNetConfig::from_file(&sd14_config().join("unet/config.json")).unwrap();
    let mut table = roentgen::tensor::Layout::unbound();
    let params = roentgen::models::unet::params_layout(&mut table, &cfg);
    let unet = UNet { config: cfg, params, table };
    let (peak, kinds) = unet.plan_detailed(2, 64, 64, 77).unwrap();
    println!(
        "conv {:.4} linear {:.4} attention {:.4} TFLOP",
        kinds[0] as f64 / 1e12,
        kinds[1] as f64 / 1e12,
        kinds[2] as f64 / 1e12
    );
    let flops: u64 = kinds.iter().sum();
    println!(
        "SD v1.4 guided step: {:.3} TFLOP, activation arena {:.0} MiB",
        flops as f64 / 1e12,
        peak as f64 * 4.0 / 1048576.0
    );
    assert_eq!(flops, want, "ours {flops}, PyTorch {want}");
}

/// A resnet adds the time embedding and the shortcut in its convolutions' epilogues: the same
/// sums in the same order as the separate layers, so every output bit is theirs.
#[test]
fn fused_resnet_epilogues_equal_the_separate_layers_to_the_bit() {
    let (resnets, differ) = resnet_fusion_mismatches(&mut roentgen::backend::cpu::CpuBackend::new()).unwrap();
    println!("{resnets} resnets, {differ} values differ");
    assert!(resnets >= 5);
    assert_eq!(differ, 0);
}
