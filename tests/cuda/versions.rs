//! Kernel versions (issue 18; src/backend/cuda/versions.rs) against each other on the same inputs:
//! a version that changes only how operands reach the arithmetic gives the bits of the version it
//! builds on; one that rounds differently stays within its autotune gate. (Each version also runs
//! the CPU comparisons of ops.rs.)

use super::harness::*;
use anyhow::{ensure, Result};
use roentgen::backend::cuda::autotune::{gate, rel_err};
use roentgen::backend::cuda::versions::KernelFamily;
use roentgen::backend::cuda::CudaBackend;
use roentgen::backend::Backend;

/// Versions 3 to 6 of the bf16 convolution only change how operands reach the tensor cores
/// (ldmatrix and two shared stages; then a cp.async pipeline of 2, 3 and 4 stages): the same
/// products in the same order as version 2 (which splits the same shapes), so forward outputs and
/// data gradients equal to the bit, on shapes that split, that do not, with strides, channel tails,
/// fewer reduction tiles than pipeline stages, operands cp.async cannot copy (channels not a
/// multiple of 4 or 8) and 4-byte-aligned tensors.
pub fn conv_versions_agree_case(r: &mut Runner, gpu: &mut CudaBackend) {
    r.case("bf16/conv2d versions 3 to 6 give version 2's bits (forward, data gradient)", || {
        let p1 = [1, 1, 1, 1];
        let shapes: &[(usize, usize, usize, usize, usize, usize, usize, [usize; 4], usize)] = &[
            (1, 4, 5, 320, 192, 3, 1, p1, 0),   // 180 K tiles: split
            (2, 9, 8, 8, 12, 3, 2, p1, 0),      // stride 2: four data-gradient phases
            (1, 9, 8, 40, 70, 3, 1, p1, 0),     // N tiles and a K tail
            (2, 7, 6, 5, 9, 3, 1, p1, 0),       // c_in 5
            (2, 9, 9, 48, 24, 1, 1, [0; 4], 0), // 2 reduction tiles: fewer than 4 stages' prologue
            (2, 5, 7, 16, 24, 1, 1, [0; 4], 0), // 1 reduction tile
            (2, 8, 8, 4, 32, 3, 1, p1, 0),      // c_in 4: activations by cp.async, weights not
            (1, 7, 9, 8, 16, 3, 1, p1, 1),      // 4-byte aligned only: no cp.async
        ];
        let mut rng = Rng(0xB175);
        let mut checked = 0usize;
        for &(n, h, w, ci, co, k, s, pad, skew) in shapes {
            let p = conv2d((n, h, w, ci, co, k, s, pad));
            let (fwd, bwd) = conv2d_inputs(&mut rng, &p);
            let run = |gpu: &mut CudaBackend, v: u32| -> Result<(Vec<f32>, Vec<f32>)> {
                gpu.set_kernel_version(KernelFamily::Conv, v)?;
                let t = place_skewed(gpu, &fwd, skew)?;
                conv2d_forward(gpu, p, &t)?;
                let tb = place_skewed(gpu, &bwd, skew)?;
                conv2d_backward(gpu, p, &tb, true)?;
                let out = (gpu.download(&t[0])?, gpu.download(&tb[0])?);
                gpu.set_kernel_version(KernelFamily::Conv, 1)?;
                Ok(out)
            };
            let (f2, d2) = run(gpu, 2)?;
            for v in 3..=6 {
                let (fv, dv) = run(gpu, v)?;
                for (what, a, b) in [("forward", &f2, &fv), ("data gradient", &d2, &dv)] {
                    let differ = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
                    ensure!(
                        differ == 0,
                        "version {v}, {n}x{h}x{w}x{ci}->{co} k{k} s{s}: {what}: {differ} of {} values differ",
                        a.len()
                    );
                    checked += a.len();
                }
            }
        }
        Ok(format!("{checked} values over {} shapes, equal to the bit", shapes.len()))
    });
}

/// Version 2 of the bf16 attention forward changes how Q, K and V reach the tensor cores (Q in
/// registers, K/V by cp.async into double-buffered tiles read by ldmatrix, 128 queries a block, an
/// m16n8k8 tail at head dims ≡ 8 mod 16) but keeps version 1's key tiles, roundings, products and
/// softmax: outputs and log-sum-exps equal to the bit. Shapes: SD's head dims 40, 80 and 160 (past
/// version 2's 96: version 1 runs), CLIP's causal 64, BERT's masked 64, odd head dims (not a
/// multiple of 4: the synchronous loads), 4-byte aligned tensors (the same), causal blocks past
/// the first, partial key tiles, fewer queries than a block, no keys. Version 3 (the exp2 softmax)
/// on the same shapes: within its autotune gate of version 1, output and log-sum-exp each.
pub fn attention_versions_agree_case(r: &mut Runner, gpu: &mut CudaBackend) {
    r.case("bf16/attention_forward version 2 gives version 1's bits, version 3 within its gate", || {
        // (batch, q_len, kv_len, heads, head_dim, causal, masked, skew)
        let shapes: &[(usize, usize, usize, usize, usize, bool, bool, usize)] = &[
            (2, 300, 77, 2, 40, false, false, 0), // SD cross-attention: k8 tail, partial key tile
            (1, 200, 200, 2, 40, false, false, 0), // self-attention, several key tiles
            (1, 150, 130, 2, 80, false, false, 0), // SD 32×32's head dim
            (1, 70, 70, 2, 160, false, false, 0), // SD 8×8's: version 1 runs
            (2, 77, 77, 3, 64, true, false, 0),   // CLIP: causal
            (1, 260, 260, 1, 24, true, false, 0), // causal past the first 128-query block
            (2, 77, 77, 2, 64, false, true, 0),   // BERT: a key mask
            (1, 45, 70, 2, 33, false, false, 0),  // head dim 33: synchronous loads, tail 40
            (1, 50, 90, 2, 96, false, false, 0),  // the largest version-2 bucket
            (1, 40, 66, 1, 8, false, false, 0),   // the smallest: k8 only
            (1, 33, 40, 2, 16, false, false, 1),  // 4-byte aligned tensors: synchronous loads
            (1, 20, 0, 2, 40, false, false, 0),   // no keys
        ];
        let mut rng = Rng(0xA772);
        let (mut checked, mut worst3) = (0usize, 0f64);
        for &(bt, ql, kl, hd, dh, causal, masked, skew) in shapes {
            let p = attn((bt, ql, kl, hd, dh, 1.0 / (dh as f32).sqrt(), causal));
            let d = hd * dh;
            let mask: Option<Vec<u32>> =
                masked.then(|| (0..bt * kl).map(|i| u32::from(i % kl < kl - 3 * (i / kl) - 1)).collect());
            let ins = vec![
                vec![0.0; bt * ql * d],
                vec![0.0; bt * ql * hd],
                rng.normal(bt * ql * d),
                rng.normal(bt * kl * d),
                rng.normal(bt * kl * d),
            ];
            let run = |gpu: &mut CudaBackend, v: u32| -> Result<(Vec<f32>, Vec<f32>)> {
                gpu.set_kernel_version(KernelFamily::Attention, v)?;
                let t = place_skewed(gpu, &ins, skew)?;
                attention_forward(gpu, p, [&t[0], &t[1], &t[2], &t[3], &t[4]], mask.as_deref())?;
                let out = (gpu.download(&t[0])?, gpu.download(&t[1])?);
                gpu.set_kernel_version(KernelFamily::Attention, 1)?;
                Ok(out)
            };
            let name = format!("b{bt} q{ql} kv{kl} h{hd} d{dh} causal={causal} masked={masked}");
            let ((o1, l1), (o2, l2), (o3, l3)) = (run(gpu, 1)?, run(gpu, 2)?, run(gpu, 3)?);
            for (what, a, b) in [("output", &o1, &o2), ("lse", &l1, &l2)] {
                let differ = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
                ensure!(differ == 0, "version 2, {name}: {what}: {differ} of {} values differ", a.len());
                checked += a.len();
            }
            ensure!(o1.iter().any(|x| *x != 0.0) || kl == 0, "{name}: an all-zero output");
            if kl > 0 {
                // Relative to each tensor's largest value, as the autotune gates (no key: lse -inf).
                for (what, a, b) in [("output", &o1, &o3), ("lse", &l1, &l3)] {
                    let err = rel_err(b, a);
                    ensure!(
                        err <= gate(KernelFamily::Attention, 3),
                        "version 3, {name}: {what} differs from version 1's by {err:.2e} of its scale"
                    );
                    worst3 = worst3.max(err);
                }
            }
        }
        Ok(format!(
            "version 2: {checked} values over {} shapes, equal to the bit; version 3: at most {worst3:.1e} of \
             version 1's scale (gate {:e})",
            shapes.len(),
            gate(KernelFamily::Attention, 3)
        ))
    });
}

/// Version 2 of the group norm backward computes v1's formula per element with v1's statistics
/// (summed in the same order): the input gradient equal to the bit, with and without SiLU, one
/// chunk per group and several.
pub fn group_norm_backward_versions_agree_case(r: &mut Runner, gpu: &mut CudaBackend) {
    r.case("group_norm_backward version 2 gives version 1's bits", || {
        let mut rng = Rng(0x6B2);
        let mut checked = 0usize;
        for &(n, hw, c, gr) in &[(2, 16, 64, 32), (2, 600, 96, 3), (1, 4096, 320, 32)] {
            for silu in [false, true] {
                let p = group_norm(n, hw, c, gr, silu);
                let (bg, elems) = (n * gr, n * hw * c);
                let ins = vec![
                    rng.normal(elems),
                    rng.normal(c),
                    rng.normal(c),
                    rng.normal(elems),
                    rng.normal(elems),
                    rng.normal(c),
                    rng.normal(c),
                    rng.normal(bg),
                    rng.normal(bg).iter().map(|v| 0.5 + v.abs()).collect(),
                ];
                let mut run = |v: u32| -> Result<Vec<f32>> {
                    gpu.set_kernel_version(KernelFamily::GroupNormBackward, v)?;
                    let t = place(gpu, &ins)?;
                    group_norm_backward(gpu, p, &t)?;
                    gpu.set_kernel_version(KernelFamily::GroupNormBackward, 1)?;
                    gpu.download(&t[0])
                };
                let (a, b) = (run(1)?, run(2)?);
                let differ = a.iter().zip(&b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
                ensure!(differ == 0, "{n}x{hw}x{c}/{gr} silu={silu}: {differ} of {} values differ", a.len());
                checked += a.len();
            }
        }
        Ok(format!("{checked} input-gradient values over 6 shapes, equal to the bit"))
    });
}
