//! Every `Backend` operation, forward and backward, against the CPU backend at several shapes.

use super::harness::*;
use anyhow::{ensure, Result};
use roentgen::backend::cpu::CpuBackend;
use roentgen::backend::cuda::versions::KernelFamily;
use roentgen::backend::cuda::CudaBackend;
use roentgen::backend::{Activation, Backend, ElementwiseOps, OptimOps};
use roentgen::ops::conv::Im2colParams;
use roentgen::ops::elementwise::{
    BiasRowsParams, ConcatParams, EmbeddingBackward, EmbeddingForward, GegluParams, TimestepEmbeddingParams,
};
use roentgen::ops::norm::{BatchNormBackward, BatchNormForward, BatchNormParams, BatchNormStats, BatchNormTrainParams};
use roentgen::ops::pool::{Pool2dParams, PoolMode};
use roentgen::ops::Window2d;
use roentgen::tensor::Tensor;

const ACTS: [Activation; 4] = [Activation::QuickGelu, Activation::Gelu, Activation::GeluTanh, Activation::Silu];

/// The inputs of an attention backward case from those of its forward (`fwd_ins`: out, lse, q, k,
/// v): fresh dq, dk, dv (accumulated into) and dout, then q, k, v and the CPU forward's out and
/// log-sum-exp (the backward reads the forward's saved outputs, so they come from the reference).
fn attention_backward_inputs(
    rng: &mut Rng,
    fwd_ins: &[Vec<f32>],
    fwd: &dyn Fn(&dyn Backend, &[Tensor]) -> Result<()>,
) -> Vec<Vec<f32>> {
    let mut cpu = CpuBackend::new();
    let st = place(&mut cpu, fwd_ins).unwrap();
    fwd(&cpu, &st).unwrap();
    let (o, lse) = (cpu.download(&st[0]).unwrap(), cpu.download(&st[1]).unwrap());
    let (q, k) = (fwd_ins[2].len(), fwd_ins[3].len());
    let mut ins = vec![rng.normal(q), rng.normal(k), rng.normal(k), rng.normal(q)];
    ins.extend_from_slice(&fwd_ins[2..5]);
    ins.extend([o, lse]);
    ins
}

/// Every operation at several shapes, for one precision.
pub fn op_cases(r: &mut Runner, gpu: &mut CudaBackend, bf16: bool, tag: &str) {
    let mut rng = Rng(0x5EED ^ bf16 as u64);
    // Elements left unused before every tensor of the next cases (see `place_skewed`); 0 but for
    // the convolution whose tensors are 4-byte aligned only.
    let skew = std::cell::Cell::new(0);
    // A kernel version other than 1 for the next cases (versions.rs): set for the case, then back.
    let version: std::cell::Cell<Option<(KernelFamily, u32)>> = std::cell::Cell::new(None);
    let mut g = |name: String, inputs: Vec<Vec<f32>>, outs: &[usize], op: Op| {
        let chosen = version.get();
        let name = match chosen {
            Some((f, v)) => format!("{name} ({}={v})", f.name()),
            None => name,
        };
        r.case(&format!("{tag}/{name}"), || {
            if let Some((f, v)) = chosen {
                gpu.set_kernel_version(f, v)?;
            }
            let out = compare_skewed(gpu, bf16, &inputs, outs, op, skew.get());
            if let Some((f, _)) = chosen {
                gpu.set_kernel_version(f, 1)?;
            }
            out
        });
    };

    // linear: (rows, in, out) incl. SD's 4096×320 → 320 and odd sizes
    for &(rows, i, o) in &[(7, 5, 3), (77, 768, 320), (4096, 320, 1280), (130, 33, 65)] {
        let ins = vec![rng.normal(rows * o), rng.normal(rows * i), rng.scaled(o * i, 0.05), rng.normal(o)];
        // (cuBLASLt: the bias through its BIAS epilogue, and without a bias)
        g(format!("linear_forward {rows}x{i}->{o}"), ins.clone(), &[0], &|b, t| linear_forward(b, (rows, i, o), t));
        g(format!("linear_forward {rows}x{i}->{o} no bias"), ins.clone(), &[0], &|b, t| {
            linear_forward(b, (rows, i, o), &t[..3])
        });
        // The residual summed in the epilogue (cuBLASLt: C = residual, D = out), with and without
        // a bias; then with every tensor 4-byte aligned only: cuBLASLt promised 4-byte operands,
        // or, where the bias is not 16-byte aligned (7x5 and 130x33), cuBLAS with the bias and
        // the residual added by kernels.
        let mut ins = ins;
        ins.push(rng.normal(rows * o));
        g(format!("linear_forward {rows}x{i}->{o} + residual"), ins.clone(), &[0], &|b, t| {
            linear_forward_residual(b, (rows, i, o), t, true)
        });
        g(format!("linear_forward {rows}x{i}->{o} no bias + residual"), ins.clone(), &[0], &|b, t| {
            linear_forward_residual(b, (rows, i, o), t, false)
        });
        skew.set(1);
        g(format!("linear_forward {rows}x{i}->{o} + residual, 4-byte aligned"), ins, &[0], &|b, t| {
            linear_forward_residual(b, (rows, i, o), t, true)
        });
        skew.set(0);
        if rows != 4096 {
            // A group of 3 layers on one input (q, k, v): one batched cuBLASLt product, blocks of
            // one output; then 4-byte aligned (every product's operands as promised, strides included).
            // (Not at SD's 4096 rows: 200 s of emulated backward for no path the others miss.)
            let group = 3;
            let ins = vec![rng.normal(group * rows * o), rng.normal(rows * i), rng.scaled(group * o * i, 0.05)];
            // Its backward: dinp += Σ dout_g · W_g, the weight gradients in one batched product.
            let back = vec![
                rng.normal(rows * i),
                rng.normal(group * o * i),
                rng.normal(group * rows * o),
                rng.normal(rows * i),
                rng.scaled(group * o * i, 0.05),
            ];
            for sk in [0, 1] {
                skew.set(sk);
                let aligned = if sk == 1 { ", 4-byte aligned" } else { "" };
                g(format!("linear_group_forward {group} x {rows}x{i}->{o}{aligned}"), ins.clone(), &[0], &|b, t| {
                    linear_group_forward(b, (rows, i, o), group, t)
                });
                g(
                    format!("linear_group_backward {group} x {rows}x{i}->{o}{aligned}"),
                    back.clone(),
                    &[0, 1],
                    &|b, t| linear_group_backward(b, (rows, i, o), group, t),
                );
            }
            skew.set(0);
        }
        let ins = vec![
            rng.normal(rows * i),
            rng.normal(o * i),
            rng.normal(o),
            rng.normal(rows * o),
            rng.normal(rows * i),
            rng.scaled(o * i, 0.05),
        ];
        g(format!("linear_backward {rows}x{i}->{o}"), ins, &[0, 1, 2], &|b, t| linear_backward(b, (rows, i, o), t));
    }

    // layer norm
    for &(rows, cols) in &[(3, 32), (154, 768), (5, 1000), (600, 77), (5, 320)] {
        let x: Vec<f32> = rng.normal(rows * cols).into_iter().map(|v| v * 2.0 + 0.5).collect();
        let ins = vec![
            vec![0.0; rows * cols],
            vec![0.0; rows],
            vec![0.0; rows],
            x.clone(),
            rng.normal(cols),
            rng.normal(cols),
        ];
        g(format!("layer_norm_forward {rows}x{cols}"), ins, &[0, 1, 2], &|b, t| layer_norm_forward(b, rows, cols, t));
        // backward from the statistics the CPU computes of x
        let mut cpu = CpuBackend::new();
        let st = place(
            &mut cpu,
            &[vec![0.0; rows * cols], vec![0.0; rows], vec![0.0; rows], x.clone(), vec![1.0; cols], vec![0.0; cols]],
        )
        .unwrap();
        layer_norm_forward(&cpu, rows, cols, &st).unwrap();
        let (mean, rstd) = (cpu.download(&st[1]).unwrap(), cpu.download(&st[2]).unwrap());
        let ins = vec![
            rng.normal(rows * cols),
            rng.normal(cols),
            rng.normal(cols),
            rng.normal(rows * cols),
            x,
            rng.normal(cols),
            mean,
            rstd,
        ];
        g(format!("layer_norm_backward {rows}x{cols}"), ins, &[0, 1, 2], &|b, t| layer_norm_backward(b, rows, cols, t));
    }

    // group norm ± SiLU: (batch, h·w, channels, groups): SD's 64×64×320, the VAE's 8-group case,
    // and 2×600×96 in 3 groups, which takes several chunks per group
    for &(n, hw, c, gr) in
        &[(2, 16, 64, 32), (1, 4096, 320, 32), (2, 256, 32, 8), (1, 49, 96, 32), (2, 600, 96, 3), (1, 40, 64, 32)]
    {
        for silu in [false, true] {
            let x: Vec<f32> = rng.normal(n * hw * c).into_iter().map(|v| v * 1.5 - 0.3).collect();
            let ins = vec![
                vec![0.0; n * hw * c],
                vec![0.0; n * gr],
                vec![0.0; n * gr],
                x.clone(),
                rng.normal(c),
                rng.normal(c),
            ];
            // Every version of the forward (versions.rs), each against the CPU.
            for &(v, _) in KernelFamily::GroupNorm.versions() {
                version.set((v != 1).then_some((KernelFamily::GroupNorm, v)));
                g(format!("group_norm_forward {n}x{hw}x{c}/{gr} silu={silu}"), ins.clone(), &[0, 1, 2], &|b, t| {
                    group_norm_forward(b, group_norm(n, hw, c, gr, silu), t)
                });
            }
            version.set(None);
            let mut cpu = CpuBackend::new();
            let (w, bi) = (rng.normal(c), rng.normal(c));
            let st = place(
                &mut cpu,
                &[vec![0.0; n * hw * c], vec![0.0; n * gr], vec![0.0; n * gr], x.clone(), w.clone(), bi.clone()],
            )
            .unwrap();
            group_norm_forward(&cpu, group_norm(n, hw, c, gr, silu), &st).unwrap();
            let (mean, rstd) = (cpu.download(&st[1]).unwrap(), cpu.download(&st[2]).unwrap());
            let ins = vec![
                rng.normal(n * hw * c),
                rng.normal(c),
                rng.normal(c),
                rng.normal(n * hw * c),
                x,
                w,
                bi,
                mean,
                rstd,
            ];
            // Every version of the backward, each against the CPU.
            for &(v, _) in KernelFamily::GroupNormBackward.versions() {
                version.set((v != 1).then_some((KernelFamily::GroupNormBackward, v)));
                g(format!("group_norm_backward {n}x{hw}x{c}/{gr} silu={silu}"), ins.clone(), &[0, 1, 2], &|b, t| {
                    group_norm_backward(b, group_norm(n, hw, c, gr, silu), t)
                });
            }
            version.set(None);
        }
    }

    // batch norm at inference (the evaluation networks): (rows, channels), with and without ReLU
    for &(rows, c) in &[(7, 3), (3136, 64), (196, 1024), (5, 33)] {
        for relu in [false, true] {
            let ins = vec![vec![0.0; rows * c], rng.normal(rows * c), rng.normal(c), rng.normal(c)];
            g(format!("batch_norm_forward {rows}x{c} relu={relu}"), ins, &[0], &|b, t| {
                let t = BatchNormForward { out: &t[0], inp: &t[1], scale: &t[2], shift: &t[3] };
                b.batch_norm_forward(&BatchNormParams { rows, channels: c, relu }, &t)
            });
        }
    }

    // batch norm in training (the classifier trained from scratch): statistics with the running
    // update, and the backward with and without the ReLU mask; (rows, channels) incl. DenseNet's
    // stem (batch 2 at 112×112, 64 channels) and values far from 0
    for &(rows, c, loc) in &[(7, 3, 0.0), (25088, 64, 0.0), (196, 1024, 5.0), (130, 33, -2.0)] {
        for relu in [false, true] {
            let p = BatchNormTrainParams { rows, channels: c, eps: 1e-5, momentum: 0.1, relu };
            let x: Vec<f32> = rng.normal(rows * c).iter().map(|v| v * 3.0 + loc).collect();
            let ins = vec![
                rng.normal(c),
                rng.normal(c).iter().map(|v| 1.0 + v.abs()).collect(),
                vec![0.0; c],
                vec![0.0; c],
                vec![0.0; c],
                vec![0.0; c],
                x.clone(),
                rng.normal(c),
                rng.normal(c),
            ];
            if !relu {
                g(format!("batch_norm_stats {rows}x{c} mean {loc}"), ins, &[0, 1, 2, 3, 4, 5], &|b, t| {
                    let t = BatchNormStats {
                        running_mean: &t[0],
                        running_var: &t[1],
                        mean: &t[2],
                        rstd: &t[3],
                        scale: &t[4],
                        shift: &t[5],
                        inp: &t[6],
                        weight: &t[7],
                        bias: &t[8],
                    };
                    b.batch_norm_stats(&p, &t)
                });
            }
            let ins = vec![
                rng.normal(rows * c),
                rng.normal(c),
                rng.normal(c),
                rng.normal(rows * c),
                x,
                rng.normal(rows * c),
                rng.normal(c).iter().map(|v| v + loc).collect(),
                rng.normal(c).iter().map(|v| 0.5 + v.abs()).collect(),
                rng.normal(c),
            ];
            g(format!("batch_norm_backward {rows}x{c} relu={relu}"), ins, &[0, 1, 2], &|b, t| {
                let t = BatchNormBackward {
                    dinp: &t[0],
                    dweight: &t[1],
                    dbias: &t[2],
                    dout: &t[3],
                    inp: &t[4],
                    out: &t[5],
                    mean: &t[6],
                    rstd: &t[7],
                    weight: &t[8],
                };
                b.batch_norm_backward(&p, &t)
            });
        }
    }

    // im2col: Inception's rectangular kernels (1×7 / 7×1 with their padding, 1×3 / 3×1) and an odd
    // strided one; (batch, h, w, c, kernel h, kernel w, stride, [top, bottom, left, right])
    for &(n, h, w, c, kh, kw, st, pad) in &[
        (2, 17, 17, 128, 1, 7, 1, [0, 0, 3, 3]),
        (2, 17, 17, 160, 7, 1, 1, [3, 3, 0, 0]),
        (1, 8, 8, 384, 1, 3, 1, [0, 0, 1, 1]),
        (1, 8, 8, 384, 3, 1, 1, [1, 1, 0, 0]),
        (3, 9, 7, 5, 3, 2, 2, [1, 0, 0, 1]),
    ] {
        let p = Im2colParams { batch: n, channels: c, window: Window2d { h, w, kernel: [kh, kw], stride: st, pad } };
        let ins = vec![vec![0.0; p.rows() * p.patch_len()], rng.normal(n * h * w * c)];
        g(format!("im2col_forward {n}x{h}x{w}x{c} {kh}x{kw}/{st} pad {pad:?}"), ins, &[0], &|b, t| {
            b.im2col_forward(&p, &t[0], &t[1])
        });
    }

    // pooling: (batch, h, w, c, kernel h, kernel w, stride, pad) — DenseNet's stem max pool and
    // transition average, a global average (7×7 and a non-square map), odd sizes with padding
    for &(n, h, w, c, kh, kw, st, pad) in &[
        (2, 112, 112, 64, 3, 3, 2, 1),
        (2, 56, 56, 128, 2, 2, 2, 0),
        (2, 7, 7, 1024, 7, 7, 1, 0),
        (1, 5, 9, 6, 5, 9, 1, 0),
        (1, 9, 7, 5, 3, 3, 1, 1),
        (3, 10, 11, 4, 3, 2, 2, 1),
    ] {
        for mode in [PoolMode::Max, PoolMode::Avg, PoolMode::AvgExcludePad] {
            let window = Window2d { h, w, kernel: [kh, kw], stride: st, pad: [pad; 4] };
            let p = Pool2dParams { batch: n, channels: c, window, mode };
            let ins = vec![vec![0.0; p.out_elements()], rng.normal(p.in_elements())];
            g(format!("pool2d_forward {n}x{h}x{w}x{c} {kh}x{kw}/{st} pad {pad} {mode:?}"), ins, &[0], &|b, t| {
                b.pool2d_forward(&p, &t[0], &t[1])
            });
            // The backward (accumulating into dinp); max windows on values with ties (halves).
            let x: Vec<f32> = rng.normal(p.in_elements()).iter().map(|v| (v * 2.0).round() / 2.0).collect();
            let ins = vec![rng.normal(p.in_elements()), rng.normal(p.out_elements()), x];
            g(format!("pool2d_backward {n}x{h}x{w}x{c} {kh}x{kw}/{st} pad {pad} {mode:?}"), ins, &[0], &|b, t| {
                b.pool2d_backward(&p, &t[0], &t[1], &t[2])
            });
        }
    }

    // convolution: (batch, h, w, c_in, c_out, kernel, stride, pad, skew)
    let p1 = [1, 1, 1, 1];
    let convs: &[(usize, usize, usize, usize, usize, usize, usize, [usize; 4], usize)] = &[
        (2, 8, 8, 4, 32, 3, 1, p1, 0),              // conv_in of a small U-Net
        (1, 64, 64, 320, 320, 3, 1, p1, 0),         // SD's 64×64 resnet conv
        (2, 16, 16, 64, 64, 3, 2, p1, 0),           // U-Net downsampler
        (2, 9, 8, 8, 12, 3, 2, p1, 0),              // downsampler, odd sizes
        (1, 17, 15, 32, 16, 3, 2, [0, 1, 0, 1], 0), // the VAE's asymmetric-pad downsampler, odd sizes
        (2, 9, 9, 48, 24, 1, 1, [0, 0, 0, 0], 0),   // 1×1 shortcut
        (1, 12, 12, 3, 16, 3, 1, p1, 0),            // RGB input
        (1, 8, 8, 32, 4, 3, 1, p1, 0),              // conv_out to 4 latent channels
        (2, 7, 6, 5, 9, 3, 1, p1, 0),               // c_in 5: rows not a multiple of the vector width
        (1, 9, 8, 40, 70, 3, 1, p1, 0),             // several N tiles and a K tail
        (2, 15, 13, 8, 12, 3, 1, p1, 0),            // 390 rows: the weight/bias-grad split falls mid-row
        (1, 4, 5, 320, 192, 3, 1, p1, 0),           // SD widths at a tiny image: 180 K tiles
        (1, 7, 9, 8, 16, 3, 1, p1, 1),              // every tensor 4-byte aligned only
    ];
    for &(n, h, w, ci, co, k, s, pad, sk) in convs {
        skew.set(sk);
        let (ins, bwd_ins) = conv2d_inputs(&mut rng, &conv2d((n, h, w, ci, co, k, s, pad)));
        let aligned = if sk > 0 { format!(", tensors {sk} elements off alignment") } else { String::new() };
        let name = format!("{n}x{h}x{w}x{ci}->{co} k{k} s{s} pad{pad:?}{aligned}");
        // Every version of the bf16 implicit GEMM (versions.rs; split-K takes these small grids on
        // the emulated device's 108 SMs), forward and data gradient; f32 has one version.
        // Versions 4–6 differ from 3 only in how operands reach shared memory (the cp.async
        // pipeline), whose paths (the ring wrapping, fewer tiles than stages, the synchronous
        // fallbacks) the smaller shapes and conv_versions_agree_case reach: the SD-size shape,
        // ≈1 min of the emulated device per version, runs at versions 1–3.
        let sd_size = h * w >= 64 * 64;
        let versions: Vec<u32> = if bf16 {
            KernelFamily::Conv.versions().iter().map(|&(v, _)| v).filter(|&v| v <= 3 || !sd_size).collect()
        } else {
            vec![1]
        };
        for &v in &versions {
            version.set((v != 1).then_some((KernelFamily::Conv, v)));
            g(format!("conv2d_forward {name}"), ins.clone(), &[0], &|b, t| {
                conv2d_forward(b, conv2d((n, h, w, ci, co, k, s, pad)), t)
            });
            g(format!("conv2d_backward {name}"), bwd_ins.clone(), &[0, 1, 2], &|b, t| {
                conv2d_backward(b, conv2d((n, h, w, ci, co, k, s, pad)), t, true)
            });
        }
        version.set(None);
        // The fused epilogue (batch bias and residual after the bias) at the first shapes.
        if ci <= 8 {
            let mut fused = ins.clone();
            fused.push(rng.normal(n * co));
            fused.push(rng.normal(ins[0].len()));
            for &v in &versions {
                version.set((v != 1).then_some((KernelFamily::Conv, v)));
                g(format!("conv2d_forward + batch bias + residual {name}"), fused.clone(), &[0], &|b, t| {
                    conv2d_forward(b, conv2d((n, h, w, ci, co, k, s, pad)), t)
                });
            }
            version.set(None);
        }
        g(format!("conv2d_backward (no dinp, no bias) {name}"), bwd_ins, &[1], &|b, t| {
            conv2d_backward(b, conv2d((n, h, w, ci, co, k, s, pad)), t, false)
        });
    }
    skew.set(0);

    // attention: (batch, q_len, kv_len, heads, head_dim, causal, masked); a key mask (BERT's padding) drops
    // the last 1 + 3·b keys of sequence b
    let atts: &[(usize, usize, usize, usize, usize, bool, bool)] = &[
        (2, 16, 16, 2, 8, false, false),
        (2, 77, 77, 12, 64, true, false),     // CLIP's causal self-attention
        (2, 4096, 77, 8, 40, false, false),   // SD 64×64 cross-attention
        (2, 1024, 1024, 8, 80, false, false), // SD 32×32 self-attention
        (2, 64, 64, 8, 160, false, false),    // SD 8×8 self-attention
        (1, 33, 19, 3, 24, false, false),     // odd sizes
        (2, 70, 77, 2, 40, false, false),     // cross-attention, partial tiles on both sides
        (1, 70, 70, 2, 80, true, false),      // causal, partial tiles
        (2, 20, 20, 1, 8, true, false),       // the smallest head dim, causal
        (1, 40, 50, 1, 160, false, false),    // the largest head dim of the flash kernels
        (1, 45, 70, 2, 33, false, false),     // an odd head dim
        (1, 144, 144, 2, 40, false, false),   // several 64-row tiles
        // head_dim > 160: the materialised path (cuBLAS + row softmax)
        (2, 40, 40, 1, 512, false, false), // the VAE's mid-block attention (one head of 512), small
        (2, 64, 64, 1, 512, false, false), // the same, 64 positions
        (2, 33, 45, 2, 200, false, false), // two heads of 200 (a head's rows strided in the token rows)
        (1, 40, 40, 2, 200, true, false),  // causal
        (1, 1024, 1024, 1, 512, false, false), // a 256×256 VAE's mid-block (32×32 latent)
        (2, 12, 12, 2, 16, false, true),
        (2, 77, 77, 12, 64, false, true), // BERT-base's 12 heads of 64 over padded prompts
        (2, 20, 20, 1, 200, false, true), // the materialised path with a mask
        (2, 33, 77, 1, 64, false, true),  // masked cross-attention
    ];
    for &(bt, ql, kl, hd, dh, causal, masked) in atts {
        let d = hd * dh;
        let sc = 1.0 / (dh as f32).sqrt();
        let p = attn((bt, ql, kl, hd, dh, sc, causal));
        let mask: Option<Vec<u32>> =
            masked.then(|| (0..bt * kl).map(|i| u32::from(i % kl < kl - 3 * (i / kl) - 1)).collect());
        let (op, name) = if masked {
            ("masked_attention", format!("b{bt} q{ql} kv{kl} h{hd} d{dh}"))
        } else {
            ("attention", format!("b{bt} q{ql} kv{kl} h{hd} d{dh} causal={causal}"))
        };
        let (q, k, v) = (rng.normal(bt * ql * d), rng.normal(bt * kl * d), rng.normal(bt * kl * d));
        let ins = vec![vec![0.0; bt * ql * d], vec![0.0; bt * ql * hd], q, k, v];
        // Every version of the bf16 forward (versions.rs; version 2 holds head dims ≤ 96 and runs
        // version 1 past them); f32 has one version.
        let versions: Vec<u32> =
            if bf16 { KernelFamily::Attention.versions().iter().map(|&(v, _)| v).collect() } else { vec![1] };
        for &v in &versions {
            version.set((v != 1).then_some((KernelFamily::Attention, v)));
            g(format!("{op}_forward {name}"), ins.clone(), &[0, 1], &|b, t| {
                attention_forward(b, p, [&t[0], &t[1], &t[2], &t[3], &t[4]], mask.as_deref())
            });
        }
        version.set(None);
        if ql * kl > 1 << 22 {
            continue; // the backward at 4096×77 is covered by the smaller shapes; keep the CPU time sane
        }
        let ins = attention_backward_inputs(&mut rng, &ins, &|b, t| {
            attention_forward(b, p, [&t[0], &t[1], &t[2], &t[3], &t[4]], mask.as_deref())
        });
        g(format!("{op}_backward {name}"), ins, &[0, 1, 2], &|b, t| {
            let t9 = [&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7], &t[8]];
            attention_backward(b, p, t9, mask.as_deref())
        });
    }

    // One normal (a partial group of four) from a small seed and a stream past 32 bits.
    g("randn n1 seed 7 stream (5 << 32) | 3".into(), vec![rng.normal(4)], &[0], &|b, t| {
        b.randn(&t[0], 1, 7, (5 << 32) | 3)
    });

    // elementwise
    for &n in &[1000usize, 1001, 1 << 20] {
        for act in ACTS {
            let x = rng.scaled(n, 3.0);
            g(format!("activation_forward {act:?} n{n}"), vec![vec![0.0; n], x.clone()], &[0], &|b, t| {
                b.activation_forward(&t[0], &t[1], act, n)
            });
            g(format!("activation_backward {act:?} n{n}"), vec![rng.normal(n), rng.normal(n), x], &[0], &|b, t| {
                b.activation_backward(&t[0], &t[1], &t[2], act, n)
            });
        }
        g(format!("add_forward n{n}"), vec![vec![0.0; n], rng.normal(n), rng.normal(n)], &[0], &|b, t| {
            b.add_forward(&t[0], &t[1], &t[2], n)
        });
        g(format!("accumulate n{n}"), vec![rng.normal(n), rng.normal(n)], &[0], &|b, t| b.accumulate(&t[0], &t[1], n));
        g(format!("scale n{n}"), vec![rng.normal(n)], &[0], &|b, t| b.scale(&t[0], -0.37, n));
        g(format!("lerp n{n}"), vec![rng.normal(n), rng.normal(n)], &[0], &|b, t| b.lerp(&t[0], &t[1], n, 0.0123));
        g(format!("zero n{n}"), vec![rng.normal(n)], &[0], &|b, t| b.zero(&t[0]));
        if n == 1000 {
            // SD's time embedding (320, flip) of 4 timesteps, and an odd width with a shift.
            let ts = vec![999.0, 0.0, 1.0, 481.0];
            for (dim, flip, shift) in [(320, true, 0.0), (33, false, 1.0)] {
                g(format!("timestep_embedding dim {dim}"), vec![rng.normal(4 * dim), ts.clone()], &[0], &|b, t| {
                    b.timestep_embedding(
                        &TimestepEmbeddingParams { batch: 4, dim, flip_sin_to_cos: flip, freq_shift: shift },
                        &t[0],
                        &t[1],
                    )
                });
            }
        }
        // Training noise: the same Philox stream as the CPU (a partial last group of four when
        // n % 4 != 0; the three values past n must stay untouched), and add_noise in place.
        g(format!("randn n{n}"), vec![rng.normal(n + 3)], &[0], &|b, t| {
            b.randn(&t[0], n, 0xFEED_FACE_CAFE_BEEF, (9 << 32) | 2)
        });
        for v in [false, true] {
            g(format!("ddpm_add_noise n{n} v_prediction {v}"), vec![rng.normal(n), rng.normal(n)], &[0, 1], &|b, t| {
                b.ddpm_add_noise(&add_noise(n, 0.8, 0.6, v), &t[0], &t[1])
            });
        }
        g(format!("mse_loss n{n}"), vec![rng.normal(n), vec![0.0], rng.normal(n), rng.normal(n)], &[0, 1], &|b, t| {
            b.mse_loss(&t[0], &t[1], &t[2], &t[3], n)
        });
        g(format!("sum_squares n{n}"), vec![vec![0.0], rng.normal(n)], &[0], &|b, t| b.sum_squares(&t[0], &t[1], n));
        let vv: Vec<f32> = rng.normal(n).into_iter().map(|x| x * x * 1e-3).collect();
        g(
            format!("adamw_step n{n}"),
            vec![rng.normal(n), rng.scaled(n, 0.1), rng.scaled(n, 0.01), vv],
            &[0, 2, 3],
            &|b, t| b.adamw_step(&adamw(n, 1e-3, 7), &t[0], &t[1], &t[2], &t[3]),
        );
    }
    for &(n, rows, c) in &[(2, 64, 320), (1, 7, 33)] {
        g(
            format!("add_bias_rows_forward {n}x{rows}x{c}"),
            vec![vec![0.0; n * rows * c], rng.normal(n * rows * c), rng.normal(n * c)],
            &[0],
            &|b, t| b.add_bias_rows_forward(&BiasRowsParams { batch: n, rows, channels: c }, &t[0], &t[1], &t[2]),
        );
        g(
            format!("add_bias_rows_backward {n}x{rows}x{c}"),
            vec![rng.normal(n * c), rng.normal(n * rows * c)],
            &[0],
            &|b, t| b.add_bias_rows_backward(&BiasRowsParams { batch: n, rows, channels: c }, &t[0], &t[1]),
        );
    }
    for &(rows, ca, cb) in &[(128, 320, 640), (9, 3, 5)] {
        g(
            format!("concat_channels_forward {rows}x({ca}+{cb})"),
            vec![vec![0.0; rows * (ca + cb)], rng.normal(rows * ca), rng.normal(rows * cb)],
            &[0],
            &|b, t| {
                b.concat_channels_forward(&ConcatParams { rows, a_channels: ca, b_channels: cb }, &t[0], &t[1], &t[2])
            },
        );
        g(
            format!("concat_channels_backward {rows}x({ca}+{cb})"),
            vec![rng.normal(rows * ca), rng.normal(rows * cb), rng.normal(rows * (ca + cb))],
            &[0, 1],
            &|b, t| {
                b.concat_channels_backward(&ConcatParams { rows, a_channels: ca, b_channels: cb }, &t[0], &t[1], &t[2])
            },
        );
    }
    for &(rows, inner) in &[(4096, 1280), (7, 12)] {
        let x = rng.scaled(rows * 2 * inner, 2.0);
        g(format!("geglu_forward {rows}x{inner}"), vec![vec![0.0; rows * inner], x.clone()], &[0], &|b, t| {
            b.geglu_forward(&GegluParams { rows, inner }, &t[0], &t[1])
        });
        g(
            format!("geglu_backward {rows}x{inner}"),
            vec![rng.normal(rows * 2 * inner), rng.normal(rows * inner), x],
            &[0],
            &|b, t| b.geglu_backward(&GegluParams { rows, inner }, &t[0], &t[1], &t[2]),
        );
    }
    // (batch, in h, in w, out h, out w, channels): exact 2×, uneven up, and down
    for &(n, ih, iw, oh, ow, c) in &[
        (2, 8, 8, 16, 16, 64),
        (1, 5, 7, 10, 14, 3),
        (1, 4, 4, 7, 9, 8),
        (2, 5, 4, 10, 8, 6),
        (1, 5, 7, 7, 10, 3),
        (2, 7, 5, 3, 2, 4),
    ] {
        g(
            format!("upsample_nearest_forward {ih}x{iw}->{oh}x{ow}x{c}"),
            vec![vec![0.0; n * oh * ow * c], rng.normal(n * ih * iw * c)],
            &[0],
            &|b, t| b.upsample_nearest_forward(&upsample((n, ih, iw, oh, ow, c)), &t[0], &t[1]),
        );
        g(
            format!("upsample_nearest_backward {ih}x{iw}->{oh}x{ow}x{c}"),
            vec![rng.normal(n * ih * iw * c), rng.normal(n * oh * ow * c)],
            &[0],
            &|b, t| b.upsample_nearest_backward(&upsample((n, ih, iw, oh, ow, c)), &t[0], &t[1]),
        );
    }
    for &(bt, seq, dim, vocab) in &[(2, 77, 768, 49408), (3, 5, 8, 11)] {
        let ids: Vec<u32> = (0..bt * seq).map(|_| (rng.next() % vocab as u64) as u32).collect();
        let i2 = ids.clone();
        g(
            format!("embedding_forward b{bt} s{seq} d{dim}"),
            vec![vec![0.0; bt * seq * dim], rng.normal(vocab * dim), rng.normal(77 * dim)],
            &[0],
            &|b, t| {
                b.embedding_forward(
                    &embedding(bt, seq, dim),
                    &EmbeddingForward { out: &t[0], ids: &i2, wte: &t[1], wpe: &t[2] },
                )
            },
        );
        let mut ids = ids;
        ids[1] = ids[0]; // a repeated id accumulates twice
        g(
            format!("embedding_backward b{bt} s{seq} d{dim}"),
            vec![rng.normal(vocab * dim), rng.normal(77 * dim), rng.normal(bt * seq * dim)],
            &[0, 1],
            &|b, t| {
                b.embedding_backward(
                    &embedding(bt, seq, dim),
                    &EmbeddingBackward { dwte: &t[0], dwpe: &t[1], dout: &t[2], ids: &ids },
                )
            },
        );
    }
}

/// Attention over no keys, on the flash path (head dim 40) and the materialised one (200): every
/// output row is 0 and every lse is −inf, bit for bit as the CPU reference writes them over
/// outputs that held random values.
pub fn no_key_cases(r: &mut Runner, gpu: &mut CudaBackend, tag: &str) {
    for dh in [40, 200] {
        r.case(&format!("{tag}/attention_forward without keys, head dim {dh}"), || {
            let mut rng = Rng(0x0EE5 + dh as u64);
            let (bt, ql, hd) = (2, 5, 2);
            let d = hd * dh;
            let ins =
                vec![rng.normal(bt * ql * d), rng.normal(bt * ql * hd), rng.normal(bt * ql * d), vec![0.0], vec![0.0]];
            let run = |b: &mut dyn Backend| -> Result<(Vec<f32>, Vec<f32>)> {
                let t = place(b, &ins)?;
                attention_forward(b, attn((bt, ql, 0, hd, dh, 0.1, false)), [&t[0], &t[1], &t[2], &t[3], &t[4]], None)?;
                Ok((b.download(&t[0])?, b.download(&t[1])?))
            };
            let (want_out, want_lse) = run(&mut CpuBackend::new())?;
            let (out, lse) = run(gpu)?;
            ensure!(want_out.iter().all(|&x| x == 0.0), "the CPU reference left a nonzero output");
            ensure!(want_lse.iter().all(|&x| x == f32::NEG_INFINITY), "the CPU reference's lse is not -inf");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            ensure!(bits(&out) == bits(&want_out), "outputs differ from the CPU's zeros: {:?}…", &out[..4]);
            ensure!(bits(&lse) == bits(&want_lse), "lse differs from the CPU's -inf: {:?}…", &lse[..4]);
            Ok("out 0, lse -inf, as the CPU".into())
        });
    }
}

/// The materialised attention path (head_dim > 160) with its workspace limit lowered, so that
/// chunks split pairs and span pairs (masked and causal too), forward and backward.
pub fn wide_attention_chunk_cases(r: &mut Runner, gpu: &mut CudaBackend, bf16: bool, tag: &str) {
    let mut rng = Rng(0xA77E ^ bf16 as u64);
    let default = gpu.attention_workspace_limit();
    // (batch, q_len, kv_len, heads, head_dim, causal, masked, limit in score rows)
    let cases: &[(usize, usize, usize, usize, usize, bool, bool, usize)] = &[
        (2, 23, 300, 3, 161, false, false, 7),
        (2, 9, 9, 3, 200, true, false, 40),
        (2, 30, 45, 1, 176, false, true, 11),
    ];
    for &(bt, ql, kl, hd, dh, causal, masked, rows) in cases {
        gpu.set_attention_workspace_limit(rows * kl);
        let d = hd * dh;
        let sc = 1.0 / (dh as f32).sqrt();
        let name = format!("b{bt} q{ql} kv{kl} h{hd} d{dh} causal={causal} masked={masked}, chunks of {rows} rows");
        let mask: Vec<u32> = (0..bt * kl).map(|i| u32::from(i % kl < kl - 3 * (i / kl) - 1 || i % 5 == 0)).collect();
        let (q, k, v) = (rng.normal(bt * ql * d), rng.normal(bt * kl * d), rng.normal(bt * kl * d));
        let ins = vec![vec![0.0; bt * ql * d], vec![0.0; bt * ql * hd], q, k, v];
        let fwd = |b: &dyn Backend, t: &[Tensor]| {
            if masked {
                attention_forward(
                    b,
                    attn((bt, ql, kl, hd, dh, sc, false)),
                    [&t[0], &t[1], &t[2], &t[3], &t[4]],
                    Some(&mask),
                )
            } else {
                attention_forward(b, attn((bt, ql, kl, hd, dh, sc, causal)), [&t[0], &t[1], &t[2], &t[3], &t[4]], None)
            }
        };
        r.case(&format!("{tag}/wide attention_forward {name}"), || compare(gpu, bf16, &ins, &[0, 1], &fwd));
        let ins = attention_backward_inputs(&mut rng, &ins, &fwd);
        r.case(&format!("{tag}/wide attention_backward {name}"), || {
            compare(gpu, bf16, &ins, &[0, 1, 2], &|b, t| {
                if masked {
                    attention_backward(
                        b,
                        attn((bt, ql, kl, hd, dh, sc, false)),
                        [&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7], &t[8]],
                        Some(&mask),
                    )
                } else {
                    attention_backward(
                        b,
                        attn((bt, ql, kl, hd, dh, sc, causal)),
                        [&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7], &t[8]],
                        None,
                    )
                }
            })
        });
    }
    gpu.set_attention_workspace_limit(default);
    // Overlapping outputs are refused with an error (the CPU reference asserts).
    r.case(&format!("{tag}/attention and conv2d refuse overlapping outputs"), || {
        let (dh, l) = (200, 6);
        let t = place(gpu, &[rng.normal(3 * l * dh), vec![0.0; l], rng.normal(16 * 9 * 4)])?;
        let win = |off: usize, n: usize| Tensor::new(t[0].pool, t[0].offset + off, [n].into());
        let (q, o) = (win(0, l * dh), win(l * dh / 2, l * dh));
        let e = attention_forward(gpu, attn((1, l, l, 1, dh, 0.1, false)), [&o, &t[1], &q, &q, &q], None).err();
        ensure!(
            e.is_some_and(|e| e.to_string().contains("overlaps")),
            "attention_forward with out overlapping q was accepted"
        );
        let e =
            attention_backward(gpu, attn((1, l, l, 1, dh, 0.1, false)), [&o, &o, &o, &q, &q, &q, &q, &q, &t[1]], None)
                .err();
        ensure!(
            e.is_some_and(|e| e.to_string().contains("overlap")),
            "attention_backward with dq = dk = dv was accepted"
        );
        let w = &t[2];
        let out = Tensor::new(w.pool, w.offset, [4 * 4 * 4].into());
        let e = conv2d_forward(gpu, conv2d((1, 4, 4, 4, 4, 3, 1, [1, 1, 1, 1])), &[out, q, *w]).err();
        ensure!(
            e.is_some_and(|e| e.to_string().contains("overlaps")),
            "conv2d_forward with out overlapping the weight was accepted"
        );
        gpu.synchronize()?;
        Ok("refused".into())
    });
}

/// A second pass over ops that use scratch memory must not allocate.
pub fn allocation_case(r: &mut Runner, gpu: &mut CudaBackend) {
    r.case("allocations stay flat in steady state", || {
        let mut rng = Rng(9);
        let (bt, l, hd, dh, n) = (2, 77, 4, 16, 4096);
        let d = hd * dh;
        let t = place(
            gpu,
            &[
                vec![0.0; bt * l * d],
                vec![0.0; bt * l * hd],
                rng.normal(bt * l * d),
                rng.normal(bt * l * d),
                rng.normal(bt * l * d),
                vec![0.0],
                rng.normal(n),
                rng.normal(49408 * 8),
                rng.normal(77 * 8),
                vec![0.0; bt * l * 8],
                vec![0.0; 2 * 256 * 32],
                vec![0.0; 2 * 8],
                vec![0.0; 2 * 8],
                rng.normal(2 * 256 * 32),
                rng.normal(32),
                rng.normal(32),
            ],
        )?;
        let mask: Vec<u32> = (0..bt * l).map(|i| u32::from(i % l < 50)).collect();
        let ids: Vec<u32> = (0..bt * l).map(|i| (i * 613 % 49408) as u32).collect();
        let round = |gpu: &CudaBackend| -> Result<()> {
            attention_forward(
                gpu,
                attn((bt, l, l, hd, dh, 0.25, false)),
                [&t[0], &t[1], &t[2], &t[3], &t[4]],
                Some(&mask),
            )?;
            gpu.sum_squares(&t[5], &t[6], n)?;
            gpu.embedding_forward(
                &embedding(bt, l, 8),
                &EmbeddingForward { out: &t[9], ids: &ids, wte: &t[7], wpe: &t[8] },
            )?;
            group_norm_forward(gpu, group_norm(2, 256, 32, 8, true), &t[10..16])?;
            gpu.synchronize()
        };
        round(gpu)?;
        let before = gpu.allocation_count();
        for _ in 0..3 {
            round(gpu)?;
        }
        let after = gpu.allocation_count();
        ensure!(after == before, "{} device allocations in steady state", after - before);
        Ok(format!("{before} allocations, flat over 3 rounds"))
    });
}
