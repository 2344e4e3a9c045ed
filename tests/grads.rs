//! Gradients against PyTorch's loss.backward() (tests/fixtures/generate.py, gen_grads): every
//! parameter of a small U-Net and text encoder, and the U-Net's input gradients.

mod common;
use common::*;
use roentgen::backend::cpu::CpuBackend;
use roentgen::backend::Backend;
use roentgen::backend::{ElementwiseOps, OptimOps};
use roentgen::models::unet::UNet;
use roentgen::models::Component;
use roentgen::nn::Cx;
use roentgen::nn::Fmap;
use roentgen::tensor::{Arena, Layout, Tensor};
use std::path::PathBuf;

/// Compares every gradient in `table` (bound to the gradient pool) with the fixture's `grad.<name>`.
fn check_all_grads(what: &str, b: &CpuBackend, table: &Layout, io: &std::path::Path, alias: &dyn Fn(&str) -> String) {
    let bytes = std::fs::read(io).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = 0;
    for e in table.entries() {
        let key = format!("grad.{}", e.name);
        let key = if st.tensor(&key).is_ok() { key } else { format!("grad.{}", alias(&e.name)) };
        let (_, want) = read_f32(io, &key);
        let t = Tensor::new(table.pool(), e.offset, e.shape);
        let got = b.download(&t).unwrap();
        assert_grad_close(&format!("{what} {}", e.name), &got, &want);
        checked += 1;
    }
    println!("{what}: {checked} parameter gradients match");
}

/// Gradients may legitimately be constant (e.g. a bias whose every output sees the same upstream
/// value), so only the error bar of assert_close applies, relative to the tensor's own scale.
fn assert_grad_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err <= F32_PARITY * scale.max(1e-3), "{what}: max error {err:e}, scale {scale:e}");
}

/// The grads fixture's `component` on a CPU backend, and the path of its inputs and PyTorch's
/// gradients (`io`).
fn load_fixture<C: Component>(component: &str, io: &str) -> (CpuBackend, C, PathBuf) {
    let dir = fixture("grads");
    let mut b = CpuBackend::new();
    let (model, _) = C::load(&mut b, &dir.join(component), None).unwrap();
    (b, model, dir.join(io))
}

/// The small U-Net's gradients against PyTorch's; with `recompute`, the forward keeps only block
/// inputs and outputs (gradient checkpointing). Returns every gradient the step wrote (parameters,
/// sample, context), in order, and the planned arena peak.
fn unet_gradients(recompute: bool) -> (Vec<f32>, usize) {
    let (mut b, unet, io) = load_fixture::<UNet>("unet", "unet-io.safetensors");
    let (grads, gtable) = unet.allocate_grads(&mut b).unwrap();
    let (sshape, sample) = read_f32(&io, "sample");
    let (n, c, h, w) = (sshape[0], sshape[1], sshape[2], sshape[3]);
    let (cshape, ctx) = read_f32(&io, "encoder_hidden_states");
    let ctx_len = cshape[1];
    let (_, timesteps) = read_f32(&io, "timesteps");
    let (_, target) = read_f32(&io, "target");

    let cap = unet.plan_training(n, h, w, ctx_len, recompute).unwrap();
    let pool = b.alloc(cap, "train.arena").unwrap();
    let mut arena = Arena::new(pool, cap);
    let x = Fmap::alloc(&mut arena, n, h, w, c).unwrap();
    let ctx_t = arena.alloc([n * ctx_len, cshape[2]]).unwrap();
    let dctx = arena.alloc(ctx_t.shape).unwrap();
    let dout = Fmap::alloc(&mut arena, n, h, w, c).unwrap();
    b.upload(&x.t, &nchw_to_nhwc(&sample, n, c, h, w)).unwrap();
    b.upload(&ctx_t, &ctx).unwrap();
    b.zero(&dctx).unwrap();
    arena.set_keep(!recompute);
    let saved = unet.forward_saved(&mut Cx::new(&b, &mut arena), &x, &timesteps, &ctx_t, ctx_len).unwrap();
    arena.set_keep(false);
    assert_eq!(saved.recompute, recompute);
    // loss = mean((pred − target)²), in channels-last order (the mean does not care).
    let side = b.alloc(2 * x.numel() + 16, "test.side").unwrap();
    let mut l = Layout::new(side);
    let tgt = l.tensor("target", [x.numel()]);
    let loss = l.tensor("loss", [1]);
    let dsample = Fmap { t: l.tensor("dsample", x.t.shape), ..x };
    b.upload(&tgt, &nchw_to_nhwc(&target, n, c, h, w)).unwrap();
    b.zero(&dsample.t).unwrap();
    b.mse_loss(&dout.t, &loss, &saved.out.t, &tgt, x.numel()).unwrap();
    unet.backward(&grads, &mut Cx::new(&b, &mut arena), &saved, &dout, &dctx, Some(&dsample)).unwrap();

    let got_loss = b.download(&loss).unwrap()[0];
    let want_loss = read_f32(&io, "loss").1[0];
    println!("loss: ours {got_loss}, PyTorch {want_loss}");
    assert!((got_loss - want_loss).abs() <= F32_PARITY * want_loss.abs().max(1.0));
    check_all_grads("unet", &b, &gtable, &io, &|n| n.to_string());
    let ds = nhwc_to_nchw(&b.download(&dsample.t).unwrap(), n, c, h, w);
    assert_close("d loss / d sample", &ds, &read_f32(&io, "grad.sample").1, F32_PARITY);
    let dc = b.download(&dctx).unwrap();
    assert_close("d loss / d context", &dc, &read_f32(&io, "grad.encoder_hidden_states").1, F32_PARITY);
    let whole = Tensor::new(gtable.pool(), 0, [gtable.total()].into());
    let mut all = b.download(&whole).unwrap();
    all.extend(ds);
    all.extend(dc);
    (all, cap)
}

#[test]
fn unet_gradients_match_pytorch_backward() {
    unet_gradients(false);
}

/// Gradient checkpointing recomputes each block's internals from its kept input: the same
/// arithmetic in the same order, so the same gradients to the bit, in a smaller arena.
#[test]
fn unet_gradients_with_recomputation_match_pytorch_and_the_kept_forward() {
    let (kept, kept_peak) = unet_gradients(false);
    let (recomputed, recomputed_peak) = unet_gradients(true);
    let differing = kept.iter().zip(&recomputed).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differing, 0, "{differing} of {} gradient values differ with recomputation", kept.len());
    println!("planned arena: {kept_peak} elements keeping every activation, {recomputed_peak} recomputing");
    assert!(recomputed_peak < kept_peak, "recomputation planned {recomputed_peak} ≥ {kept_peak} elements");
}

#[test]
fn text_encoder_gradients_match_pytorch_backward() {
    use roentgen::models::clip::ClipTextModel;
    let (mut b, clip, io) = load_fixture::<ClipTextModel>("text_encoder", "text-io.safetensors");
    let (grads, gtable) = clip.allocate_grads(&mut b).unwrap();
    let (ishape, ids) = read_ids(&io, "input_ids");
    let (batch, seq) = (ishape[0], ishape[1]);
    let (_, target) = read_f32(&io, "target");
    let mut arena = clip.allocate_arena(&mut b, batch, seq, true).unwrap();
    let acts = clip.forward(&mut Cx::new(&b, &mut arena), &ids, batch, seq).unwrap();
    let hidden = clip.last_hidden_state(&acts);
    let side = b.alloc(2 * target.len() + 16, "test.side").unwrap();
    let mut l = Layout::new(side);
    let tgt = l.tensor("target", [target.len()]);
    let dout = l.tensor("dout", [target.len()]);
    let loss = l.tensor("loss", [1]);
    b.upload(&tgt, &target).unwrap();
    b.mse_loss(&dout, &loss, &hidden, &tgt, target.len()).unwrap();
    clip.backward(&mut Cx::new(&b, &mut arena), &grads, &acts, &dout, &ids).unwrap();
    let got_loss = b.download(&loss).unwrap()[0];
    let want_loss = read_f32(&io, "loss").1[0];
    println!("loss: ours {got_loss}, PyTorch {want_loss}");
    assert!((got_loss - want_loss).abs() <= F32_PARITY * want_loss.abs().max(1.0));
    // transformers 5 names the parameters without "text_model." in some paths: accept either.
    check_all_grads("text encoder", &b, &gtable, &io, &|n| n.trim_start_matches("text_model.").to_string());
}

#[test]
fn vae_gradients_match_pytorch_backward() {
    use roentgen::models::vae::AutoencoderKL;
    use roentgen::train::vae::VaeTrainer;
    let dir = fixture("vae-grads");
    let io = dir.join("io.safetensors");
    let mut b = CpuBackend::new();
    let (vae, _) = AutoencoderKL::load(&mut b, &dir, None).unwrap();
    let (ishape, images) = read_f32(&io, "images");
    let (_, eps) = read_f32(&io, "eps");
    let kw = read_f32(&io, "kl_weight").1[0];
    let mut tr = VaeTrainer::new(&mut b, &vae, Default::default(), kw, ishape[0], ishape[2]).unwrap();
    let (loss, rec, kl) = tr.compute_grads(&b, &vae, &images, &eps).unwrap();
    let (wl, wr, wk) = (read_f32(&io, "loss").1[0], read_f32(&io, "rec_loss").1[0], read_f32(&io, "kl").1[0]);
    println!("loss {loss} (PyTorch {wl}), reconstruction {rec} ({wr}), KL {kl} ({wk})");
    assert!((loss - wl).abs() <= F32_PARITY * wl.abs().max(1.0));
    assert!((kl - wk).abs() <= F32_PARITY * wk.abs().max(1.0));
    check_all_grads("vae", &b, &tr.grad_table, &io, &|n| n.to_string());
}
