//! Random shapes (opt-in: ROENTGEN_CUDA_FUZZ=N cases per family, ROENTGEN_CUDA_FUZZ_SEED to vary
//! them; not part of the default run): convolutions with random kernels, strides, paddings and
//! alignments, attention with random lengths and head dims (causal, masked), group and layer
//! norms, nearest upsampling — each against the CPU backend like the fixed cases.

use super::harness::*;
use roentgen::backend::cuda::CudaBackend;

/// `n` random cases per family in one precision; the shapes depend on `seed` and the precision.
pub fn fuzz_cases(r: &mut Runner, gpu: &mut CudaBackend, bf16: bool, tag: &str, n: usize, seed: u64) {
    for i in 0..n as u64 {
        let mut rng = Rng(seed.wrapping_mul(1_000_003).wrapping_add(2 * i + bf16 as u64));
        let mut u = |lo: usize, hi: usize| lo + (rng.next() % (hi - lo + 1) as u64) as usize;

        // convolution
        let (k, s) = (u(1, 5), u(1, 3));
        let pad = [u(0, k + 1), u(0, k + 1), u(0, k + 1), u(0, k + 1)];
        let (b, ci, co, skew) = (u(1, 2), u(1, 40), u(1, 80), u(0, 3));
        let h = u(k.saturating_sub(pad[0] + pad[1]).max(1), 12);
        let w = u(k.saturating_sub(pad[2] + pad[3]).max(1), 12);
        let name = format!("{b}x{h}x{w}x{ci}->{co} k{k} s{s} pad{pad:?} skew {skew}");
        let mut data = Rng(seed ^ (i << 1 | bf16 as u64) ^ 0xF022);
        let (ins, bwd_ins) = conv2d_inputs(&mut data, &conv2d((b, h, w, ci, co, k, s, pad)));
        r.case(&format!("{tag}/fuzz conv2d_forward {name}"), || {
            compare_skewed(
                gpu,
                bf16,
                &ins,
                &[0],
                &|bk, t| conv2d_forward(bk, conv2d((b, h, w, ci, co, k, s, pad)), t),
                skew,
            )
        });
        r.case(&format!("{tag}/fuzz conv2d_backward {name}"), || {
            compare_skewed(
                gpu,
                bf16,
                &bwd_ins,
                &[0, 1, 2],
                &|bk, t| conv2d_backward(bk, conv2d((b, h, w, ci, co, k, s, pad)), t, true),
                skew,
            )
        });

        // attention: the flash kernels (head dim ≤ 160) and the materialised path past them; at
        // least 4 keys in bf16 (with one key the exact output is v itself and a relative error of
        // the rounding noise means nothing)
        let (bt, hd, dh) = (u(1, 2), u(1, 3), if u(0, 3) == 0 { u(161, 256) } else { u(1, 160) });
        let causal = u(0, 2) == 0;
        let masked = !causal && u(0, 1) == 1;
        let ql = u(if bf16 { 4 } else { 1 }, 90);
        let kl = if causal {
            ql
        } else {
            u(
                if masked {
                    6
                } else if bf16 {
                    4
                } else {
                    1
                },
                90,
            )
        };
        let mask: Vec<u32> = (0..bt * kl).map(|j| u32::from(j % kl < kl - 2 * (j / kl) - 1 || j % 5 == 0)).collect();
        let d = hd * dh;
        let sc = 1.0 / (dh as f32).sqrt();
        let ins = vec![
            vec![0.0; bt * ql * d],
            vec![0.0; bt * ql * hd],
            data.normal(bt * ql * d),
            data.normal(bt * kl * d),
            data.normal(bt * kl * d),
        ];
        let name = format!("b{bt} q{ql} kv{kl} h{hd} d{dh} causal={causal} masked={masked}");
        r.case(&format!("{tag}/fuzz attention_forward {name}"), || {
            compare(gpu, bf16, &ins, &[0, 1], &|bk, t| {
                if masked {
                    attention_forward(
                        bk,
                        attn((bt, ql, kl, hd, dh, sc, false)),
                        [&t[0], &t[1], &t[2], &t[3], &t[4]],
                        Some(&mask),
                    )
                } else {
                    attention_forward(
                        bk,
                        attn((bt, ql, kl, hd, dh, sc, causal)),
                        [&t[0], &t[1], &t[2], &t[3], &t[4]],
                        None,
                    )
                }
            })
        });

        // group norm ± SiLU, layer norm, nearest upsampling
        let (groups, cpg, nb, hw, silu) = (u(1, 8), u(1, 40), u(1, 2), u(1, 700), u(0, 1) == 1);
        let c = groups * cpg;
        let ins = vec![
            vec![0.0; nb * hw * c],
            vec![0.0; nb * groups],
            vec![0.0; nb * groups],
            data.normal(nb * hw * c),
            data.normal(c),
            data.normal(c),
        ];
        r.case(&format!("{tag}/fuzz group_norm_forward {nb}x{hw}x{c}/{groups} silu={silu}"), || {
            compare(gpu, bf16, &ins, &[0, 1, 2], &|bk, t| {
                group_norm_forward(bk, group_norm(nb, hw, c, groups, silu), t)
            })
        });
        let (rows, cols) = (u(1, 300), u(1, 200));
        let ins = vec![
            vec![0.0; rows * cols],
            vec![0.0; rows],
            vec![0.0; rows],
            data.normal(rows * cols),
            data.normal(cols),
            data.normal(cols),
        ];
        r.case(&format!("{tag}/fuzz layer_norm_forward {rows}x{cols}"), || {
            compare(gpu, bf16, &ins, &[0, 1, 2], &|bk, t| layer_norm_forward(bk, rows, cols, t))
        });
        let (ih, iw, oh, ow, ch) = (u(1, 9), u(1, 9), u(1, 20), u(1, 20), u(1, 5));
        let ins = vec![data.normal(oh * ow * ch), data.normal(ih * iw * ch)];
        r.case(&format!("{tag}/fuzz upsample_nearest_forward {ih}x{iw}->{oh}x{ow}x{ch}"), || {
            compare(gpu, bf16, &ins, &[0], &|bk, t| {
                bk.upsample_nearest_forward(&upsample((1, ih, iw, oh, ow, ch)), &t[0], &t[1])
            })
        });
        let ins = vec![data.normal(ih * iw * ch), data.normal(oh * ow * ch)];
        r.case(&format!("{tag}/fuzz upsample_nearest_backward {ih}x{iw}->{oh}x{ow}x{ch}"), || {
            compare(gpu, bf16, &ins, &[0], &|bk, t| {
                bk.upsample_nearest_backward(&upsample((1, ih, iw, oh, ow, ch)), &t[0], &t[1])
            })
        });
    }
}
