//! The CUDA backend against the CPU reference: every `Backend` operation, forward and backward, on
//! fresh random inputs at several shapes (SD v1's included), in both precisions; end-to-end sampling
//! and a training step on the small fixture pipelines; and that a warmed-up operation sequence
//! allocates nothing on the device.
//!
//! A custom harness (`harness = false`): each case prints ok / FAILED / SKIPPED with its error, so a
//! machine without a GPU (or a build without `--features cuda`) shows every case as skipped and why,
//! never as passed. Tolerances (ARCHITECTURE.md, kept with the others in tests/common):
//! f32 path max |cuda − cpu| ≤ 1e-4 · max(1, max |cpu|); bf16 path relative L2 ≤ 2e-2.

mod common;

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("running the CUDA parity suite: SKIPPED, every case (this test binary was built without --features cuda)");
    println!("test result: ok. 0 passed; 0 failed; all skipped");
}

#[cfg(feature = "cuda")]
fn main() {
    suite::main()
}

#[cfg(feature = "cuda")]
mod suite {
    use super::common::*;
    use anyhow::{ensure, Result};
    use roentgen::backend::cpu::CpuBackend;
    use roentgen::backend::cuda::{driver_present, emulate, CudaBackend};
    use roentgen::backend::{Activation, Backend, Precision};
    use roentgen::tensor::Tensor;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn uniform(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32
        }
        /// Standard normal values (Box–Muller), never constant.
        fn normal(&mut self, n: usize) -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let u = self.uniform().max(1e-7);
                    let v = self.uniform();
                    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
                })
                .collect()
        }
        fn scaled(&mut self, n: usize, s: f32) -> Vec<f32> {
            self.normal(n).into_iter().map(|x| x * s).collect()
        }
    }

    /// Uploads `inputs` into one new pool of `b` and returns their tensors.
    fn place(b: &mut dyn Backend, inputs: &[Vec<f32>]) -> Result<Vec<Tensor>> {
        let total: usize = inputs.iter().map(|v| v.len().max(1)).sum();
        let pool = b.alloc(total, "test")?;
        let mut off = 0;
        let mut ts = Vec::new();
        for v in inputs {
            let t = Tensor { pool, offset: off, shape: [v.len().max(1)].into() };
            if !v.is_empty() {
                b.upload(&t, v)?;
            }
            off += v.len().max(1);
            ts.push(t);
        }
        Ok(ts)
    }

    type Op<'a> = &'a dyn Fn(&dyn Backend, &[Tensor]) -> Result<()>;

    /// Runs `op` on the CPU and on `gpu` with the same inputs and compares the tensors listed in
    /// `outs` (indices into `inputs`; outputs start random, so accumulation is tested too).
    fn compare(gpu: &mut CudaBackend, bf16: bool, inputs: &[Vec<f32>], outs: &[usize], op: Op) -> Result<String> {
        let mut cpu = CpuBackend::new();
        let tc = place(&mut cpu, inputs)?;
        op(&cpu, &tc)?;
        let tg = place(gpu, inputs)?;
        op(gpu, &tg)?;
        gpu.synchronize()?;
        let mut report = Vec::new();
        for &i in outs {
            let want = cpu.download(&tc[i])?;
            let got = gpu.download(&tg[i])?;
            ensure!(got.iter().all(|x| x.is_finite()), "output {i}: non-finite values from CUDA");
            if bf16 {
                let num: f64 = got.iter().zip(&want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().max(1e-30);
                let rel = (num / den).sqrt();
                ensure!(rel <= 2e-2, "output {i}: relative L2 error {rel:.3e} > 2e-2");
                report.push(format!("out{i} relL2 {rel:.1e}"));
            } else {
                let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
                let (mut err, mut at) = (0f32, 0);
                for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                    if (a - b).abs() > err {
                        err = (a - b).abs();
                        at = k;
                    }
                }
                ensure!(
                    err <= F32_PARITY * scale,
                    "output {i}: max error {err:.3e} at {at} (cuda {}, cpu {}) > {:.1e}",
                    got[at],
                    want[at],
                    F32_PARITY * scale
                );
                report.push(format!("out{i} max {err:.1e}"));
            }
        }
        Ok(report.join(", "))
    }

    struct Runner {
        filter: Option<String>,
        passed: usize,
        failed: Vec<String>,
        skipped: usize,
    }

    impl Runner {
        fn case(&mut self, name: &str, f: impl FnOnce() -> Result<String>) {
            if self.filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
                self.skipped += 1;
                return;
            }
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                Ok(Ok(msg)) => {
                    println!("test {name} ... ok ({msg})");
                    self.passed += 1;
                }
                Ok(Err(e)) => {
                    println!("test {name} ... FAILED: {e:#}");
                    self.failed.push(name.to_string());
                }
                Err(_) => {
                    println!("test {name} ... FAILED (panicked)");
                    self.failed.push(name.to_string());
                }
            }
        }
    }

    const ACTS: [Activation; 4] = [Activation::QuickGelu, Activation::Gelu, Activation::GeluTanh, Activation::Silu];

    /// Every operation at several shapes, for one precision.
    fn op_cases(r: &mut Runner, gpu: &mut CudaBackend, bf16: bool, tag: &str) {
        let mut rng = Rng(0x5EED ^ bf16 as u64);
        let mut g = |name: String, inputs: Vec<Vec<f32>>, outs: &[usize], op: Op| {
            r.case(&format!("{tag}/{name}"), || compare(gpu, bf16, &inputs, outs, op));
        };

        // linear: (rows, in, out) incl. SD's 4096×320 → 320 and odd sizes
        for &(rows, i, o) in &[(7, 5, 3), (77, 768, 320), (4096, 320, 1280), (130, 33, 65)] {
            let ins = vec![rng.normal(rows * o), rng.normal(rows * i), rng.scaled(o * i, 0.05), rng.normal(o)];
            // (cuBLASLt: the bias through its BIAS epilogue, and without a bias)
            g(format!("linear_forward {rows}x{i}->{o}"), ins.clone(), &[0], &|b, t| {
                b.linear_forward(&t[0], &t[1], &t[2], Some(&t[3]), rows, i, o)
            });
            g(format!("linear_forward {rows}x{i}->{o} no bias"), ins.clone(), &[0], &|b, t| {
                b.linear_forward(&t[0], &t[1], &t[2], None, rows, i, o)
            });
            let ins = vec![
                rng.normal(rows * i),
                rng.normal(o * i),
                rng.normal(o),
                rng.normal(rows * o),
                rng.normal(rows * i),
                rng.scaled(o * i, 0.05),
            ];
            g(format!("linear_backward {rows}x{i}->{o}"), ins, &[0, 1, 2], &|b, t| {
                b.linear_backward(Some(&t[0]), &t[1], Some(&t[2]), &t[3], &t[4], &t[5], rows, i, o)
            });
        }

        // layer norm
        for &(rows, cols) in &[(3, 32), (154, 768), (5, 1000)] {
            let x: Vec<f32> = rng.normal(rows * cols).into_iter().map(|v| v * 2.0 + 0.5).collect();
            let ins = vec![
                vec![0.0; rows * cols],
                vec![0.0; rows],
                vec![0.0; rows],
                x.clone(),
                rng.normal(cols),
                rng.normal(cols),
            ];
            g(format!("layer_norm_forward {rows}x{cols}"), ins, &[0, 1, 2], &|b, t| {
                b.layer_norm_forward(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], rows, cols, 1e-5)
            });
            // backward from the statistics the CPU computes of x
            let mut cpu = CpuBackend::new();
            let st = place(
                &mut cpu,
                &[
                    vec![0.0; rows * cols],
                    vec![0.0; rows],
                    vec![0.0; rows],
                    x.clone(),
                    vec![1.0; cols],
                    vec![0.0; cols],
                ],
            )
            .unwrap();
            cpu.layer_norm_forward(&st[0], &st[1], &st[2], &st[3], &st[4], &st[5], rows, cols, 1e-5).unwrap();
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
            g(format!("layer_norm_backward {rows}x{cols}"), ins, &[0, 1, 2], &|b, t| {
                b.layer_norm_backward(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7], rows, cols)
            });
        }

        // group norm ± SiLU: (batch, hw, c, groups), SD's 64×64×320 and the VAE's 8-group case
        for &(n, hw, c, gr) in &[(2, 16, 64, 32), (1, 4096, 320, 32), (2, 256, 32, 8), (1, 49, 96, 32)] {
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
                g(format!("group_norm_forward {n}x{hw}x{c}/{gr} silu={silu}"), ins, &[0, 1, 2], &|b, t| {
                    b.group_norm_forward(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], n, hw, c, gr, 1e-5, silu)
                });
                let mut cpu = CpuBackend::new();
                let (w, bi) = (rng.normal(c), rng.normal(c));
                let st = place(
                    &mut cpu,
                    &[vec![0.0; n * hw * c], vec![0.0; n * gr], vec![0.0; n * gr], x.clone(), w.clone(), bi.clone()],
                )
                .unwrap();
                cpu.group_norm_forward(&st[0], &st[1], &st[2], &st[3], &st[4], &st[5], n, hw, c, gr, 1e-5, silu)
                    .unwrap();
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
                g(format!("group_norm_backward {n}x{hw}x{c}/{gr} silu={silu}"), ins, &[0, 1, 2], &|b, t| {
                    b.group_norm_backward(
                        &t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7], &t[8], n, hw, c, gr, silu,
                    )
                });
            }
        }

        // convolution: (batch, h, w, c_in, c_out, kernel, stride, pad)
        let convs: &[(usize, usize, usize, usize, usize, usize, usize, [usize; 4])] = &[
            (2, 8, 8, 4, 32, 3, 1, [1, 1, 1, 1]),      // conv_in of a small U-Net
            (1, 64, 64, 320, 320, 3, 1, [1, 1, 1, 1]), // SD's 64×64 resnet conv
            (2, 16, 16, 64, 64, 3, 2, [1, 1, 1, 1]),   // U-Net downsampler
            (1, 17, 15, 32, 16, 3, 2, [0, 1, 0, 1]),   // the VAE's asymmetric-pad downsampler, odd sizes
            (2, 9, 9, 48, 24, 1, 1, [0, 0, 0, 0]),     // 1×1 shortcut
            (1, 12, 12, 3, 16, 3, 1, [1, 1, 1, 1]),    // RGB input
            (1, 8, 8, 32, 4, 3, 1, [1, 1, 1, 1]),      // conv_out to 4 latent channels
        ];
        for &(n, h, w, ci, co, k, s, pad) in convs {
            let oh = (h + pad[0] + pad[1] - k) / s + 1;
            let ow = (w + pad[2] + pad[3] - k) / s + 1;
            let fan = (ci * k * k) as f32;
            let ins = vec![
                rng.normal(n * oh * ow * co),
                rng.normal(n * h * w * ci),
                rng.scaled(co * ci * k * k, fan.powf(-0.5)),
                rng.normal(co),
            ];
            let name = format!("{n}x{h}x{w}x{ci}->{co} k{k} s{s} pad{pad:?}");
            g(format!("conv2d_forward {name}"), ins, &[0], &|b, t| {
                b.conv2d_forward(&t[0], &t[1], &t[2], Some(&t[3]), n, h, w, ci, co, k, s, pad)
            });
            let ins = vec![
                rng.normal(n * h * w * ci),
                rng.normal(co * ci * k * k),
                rng.normal(co),
                rng.normal(n * oh * ow * co),
                rng.normal(n * h * w * ci),
                rng.scaled(co * ci * k * k, fan.powf(-0.5)),
            ];
            g(format!("conv2d_backward {name}"), ins.clone(), &[0, 1, 2], &|b, t| {
                b.conv2d_backward(Some(&t[0]), &t[1], Some(&t[2]), &t[3], &t[4], &t[5], n, h, w, ci, co, k, s, pad)
            });
            g(format!("conv2d_backward (no dinp, no bias) {name}"), ins, &[1], &|b, t| {
                b.conv2d_backward(None, &t[1], None, &t[3], &t[4], &t[5], n, h, w, ci, co, k, s, pad)
            });
        }

        // attention: (batch, q_len, kv_len, heads, head_dim, causal)
        let atts: &[(usize, usize, usize, usize, usize, bool)] = &[
            (2, 16, 16, 2, 8, false),
            (2, 77, 77, 12, 64, true),     // CLIP's causal self-attention
            (2, 4096, 77, 8, 40, false),   // SD 64×64 cross-attention
            (2, 1024, 1024, 8, 80, false), // SD 32×32 self-attention
            (2, 64, 64, 8, 160, false),    // SD 8×8 self-attention
            (1, 33, 19, 3, 24, false),     // odd sizes
            // head_dim > 160: the materialised path (cuBLAS + row softmax)
            (2, 40, 40, 1, 512, false), // the VAE's mid-block attention (one head of 512), small
            (2, 33, 45, 2, 200, false), // two heads of 200 (a head's rows strided in the token rows)
            (1, 40, 40, 2, 200, true),  // causal
            (1, 1024, 1024, 1, 512, false), // a 256×256 VAE's mid-block (32×32 latent)
        ];
        for &(bt, ql, kl, hd, dh, causal) in atts {
            let d = hd * dh;
            let sc = 1.0 / (dh as f32).sqrt();
            let name = format!("b{bt} q{ql} kv{kl} h{hd} d{dh} causal={causal}");
            let (q, k, v) = (rng.normal(bt * ql * d), rng.normal(bt * kl * d), rng.normal(bt * kl * d));
            let ins = vec![vec![0.0; bt * ql * d], vec![0.0; bt * ql * hd], q.clone(), k.clone(), v.clone()];
            g(format!("attention_forward {name}"), ins, &[0, 1], &|b, t| {
                b.attention_forward(&t[0], &t[1], &t[2], &t[3], &t[4], bt, ql, kl, hd, dh, sc, causal)
            });
            if ql * kl > 1 << 22 {
                continue; // the backward at 4096×77 is covered by the smaller shapes; keep the CPU time sane
            }
            let mut cpu = CpuBackend::new();
            let st =
                place(&mut cpu, &[vec![0.0; bt * ql * d], vec![0.0; bt * ql * hd], q.clone(), k.clone(), v.clone()])
                    .unwrap();
            cpu.attention_forward(&st[0], &st[1], &st[2], &st[3], &st[4], bt, ql, kl, hd, dh, sc, causal).unwrap();
            let (o, lse) = (cpu.download(&st[0]).unwrap(), cpu.download(&st[1]).unwrap());
            let ins = vec![
                rng.normal(bt * ql * d),
                rng.normal(bt * kl * d),
                rng.normal(bt * kl * d),
                rng.normal(bt * ql * d),
                q,
                k,
                v,
                o,
                lse,
            ];
            g(format!("attention_backward {name}"), ins, &[0, 1, 2], &|b, t| {
                b.attention_backward(
                    &t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7], &t[8], bt, ql, kl, hd, dh, sc, causal,
                )
            });
        }
        // masked attention (BERT): padding keys of a 2-sequence batch
        for &(bt, l, hd, dh) in &[(2, 12, 2, 16), (2, 77, 12, 64), (2, 20, 1, 200)] {
            let d = hd * dh;
            let sc = 1.0 / (dh as f32).sqrt();
            let mask: Vec<u32> = (0..bt * l).map(|i| u32::from(i % l < l - 3 * (i / l) - 1)).collect();
            let (q, k, v) = (rng.normal(bt * l * d), rng.normal(bt * l * d), rng.normal(bt * l * d));
            let ins = vec![vec![0.0; bt * l * d], vec![0.0; bt * l * hd], q.clone(), k.clone(), v.clone()];
            let m2 = mask.clone();
            g(format!("masked_attention_forward b{bt} l{l} h{hd} d{dh}"), ins, &[0, 1], &|b, t| {
                b.masked_attention_forward(&t[0], &t[1], &t[2], &t[3], &t[4], &m2, bt, l, l, hd, dh, sc)
            });
            let mut cpu = CpuBackend::new();
            let st = place(&mut cpu, &[vec![0.0; bt * l * d], vec![0.0; bt * l * hd], q.clone(), k.clone(), v.clone()])
                .unwrap();
            cpu.masked_attention_forward(&st[0], &st[1], &st[2], &st[3], &st[4], &mask, bt, l, l, hd, dh, sc).unwrap();
            let (o, lse) = (cpu.download(&st[0]).unwrap(), cpu.download(&st[1]).unwrap());
            let ins = vec![
                rng.normal(bt * l * d),
                rng.normal(bt * l * d),
                rng.normal(bt * l * d),
                rng.normal(bt * l * d),
                q,
                k,
                v,
                o,
                lse,
            ];
            g(format!("masked_attention_backward b{bt} l{l} h{hd} d{dh}"), ins, &[0, 1, 2], &|b, t| {
                b.masked_attention_backward(
                    &t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7], &t[8], &mask, bt, l, l, hd, dh, sc,
                )
            });
        }

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
            g(format!("accumulate n{n}"), vec![rng.normal(n), rng.normal(n)], &[0], &|b, t| {
                b.accumulate(&t[0], &t[1], n)
            });
            g(format!("scale n{n}"), vec![rng.normal(n)], &[0], &|b, t| b.scale(&t[0], -0.37, n));
            g(format!("lerp n{n}"), vec![rng.normal(n), rng.normal(n)], &[0], &|b, t| b.lerp(&t[0], &t[1], n, 0.0123));
            g(format!("zero n{n}"), vec![rng.normal(n)], &[0], &|b, t| b.zero(&t[0]));
            if n == 1000 {
                // SD's time embedding (320, flip) of 4 timesteps, and an odd width with a shift.
                let ts = vec![999.0, 0.0, 1.0, 481.0];
                for (dim, flip, shift) in [(320, true, 0.0), (33, false, 1.0)] {
                    g(format!("timestep_embedding dim {dim}"), vec![rng.normal(4 * dim), ts.clone()], &[0], &|b, t| {
                        b.timestep_embedding(&t[0], &t[1], 4, dim, flip, shift)
                    });
                }
            }
            // Training noise: the same Philox stream as the CPU (a partial last group of four when
            // n % 4 != 0; the three values past n must stay untouched), and add_noise in place.
            g(format!("randn n{n}"), vec![rng.normal(n + 3)], &[0], &|b, t| {
                b.randn(&t[0], n, 0xFEED_FACE_CAFE_BEEF, (9 << 32) | 2)
            });
            for v in [false, true] {
                g(
                    format!("ddpm_add_noise n{n} v_prediction {v}"),
                    vec![rng.normal(n), rng.normal(n)],
                    &[0, 1],
                    &|b, t| b.ddpm_add_noise(&t[0], &t[1], n, 0.8, 0.6, v),
                );
            }
            g(
                format!("mse_loss n{n}"),
                vec![rng.normal(n), vec![0.0], rng.normal(n), rng.normal(n)],
                &[0, 1],
                &|b, t| b.mse_loss(&t[0], &t[1], &t[2], &t[3], n),
            );
            g(format!("sum_squares n{n}"), vec![vec![0.0], rng.normal(n)], &[0], &|b, t| {
                b.sum_squares(&t[0], &t[1], n)
            });
            let vv: Vec<f32> = rng.normal(n).into_iter().map(|x| x * x * 1e-3).collect();
            g(
                format!("adamw_step n{n}"),
                vec![rng.normal(n), rng.scaled(n, 0.1), rng.scaled(n, 0.01), vv],
                &[0, 2, 3],
                &|b, t| b.adamw_step(&t[0], &t[1], &t[2], &t[3], n, 1e-3, 0.9, 0.999, 1e-8, 1e-2, 7),
            );
        }
        for &(n, rows, c) in &[(2, 64, 320), (1, 7, 33)] {
            g(
                format!("add_bias_rows_forward {n}x{rows}x{c}"),
                vec![vec![0.0; n * rows * c], rng.normal(n * rows * c), rng.normal(n * c)],
                &[0],
                &|b, t| b.add_bias_rows_forward(&t[0], &t[1], &t[2], n, rows, c),
            );
            g(
                format!("add_bias_rows_backward {n}x{rows}x{c}"),
                vec![rng.normal(n * c), rng.normal(n * rows * c)],
                &[0],
                &|b, t| b.add_bias_rows_backward(&t[0], &t[1], n, rows, c),
            );
        }
        for &(rows, ca, cb) in &[(128, 320, 640), (9, 3, 5)] {
            g(
                format!("concat_channels_forward {rows}x({ca}+{cb})"),
                vec![vec![0.0; rows * (ca + cb)], rng.normal(rows * ca), rng.normal(rows * cb)],
                &[0],
                &|b, t| b.concat_channels_forward(&t[0], &t[1], &t[2], rows, ca, cb),
            );
            g(
                format!("concat_channels_backward {rows}x({ca}+{cb})"),
                vec![rng.normal(rows * ca), rng.normal(rows * cb), rng.normal(rows * (ca + cb))],
                &[0, 1],
                &|b, t| b.concat_channels_backward(&t[0], &t[1], &t[2], rows, ca, cb),
            );
        }
        for &(rows, inner) in &[(4096, 1280), (7, 12)] {
            let x = rng.scaled(rows * 2 * inner, 2.0);
            g(format!("geglu_forward {rows}x{inner}"), vec![vec![0.0; rows * inner], x.clone()], &[0], &|b, t| {
                b.geglu_forward(&t[0], &t[1], rows, inner)
            });
            g(
                format!("geglu_backward {rows}x{inner}"),
                vec![rng.normal(rows * 2 * inner), rng.normal(rows * inner), x],
                &[0],
                &|b, t| b.geglu_backward(&t[0], &t[1], &t[2], rows, inner),
            );
        }
        for &(n, ih, iw, oh, ow, c) in &[(2, 8, 8, 16, 16, 64), (1, 5, 7, 10, 14, 3), (1, 4, 4, 7, 9, 8)] {
            g(
                format!("upsample_nearest_forward {ih}x{iw}->{oh}x{ow}x{c}"),
                vec![vec![0.0; n * oh * ow * c], rng.normal(n * ih * iw * c)],
                &[0],
                &|b, t| b.upsample_nearest_forward(&t[0], &t[1], n, ih, iw, oh, ow, c),
            );
            g(
                format!("upsample_nearest_backward {ih}x{iw}->{oh}x{ow}x{c}"),
                vec![rng.normal(n * ih * iw * c), rng.normal(n * oh * ow * c)],
                &[0],
                &|b, t| b.upsample_nearest_backward(&t[0], &t[1], n, ih, iw, oh, ow, c),
            );
        }
        for &(bt, seq, dim, vocab) in &[(2, 77, 768, 49408), (3, 5, 8, 11)] {
            let ids: Vec<u32> = (0..bt * seq).map(|_| (rng.next() % vocab as u64) as u32).collect();
            let i2 = ids.clone();
            g(
                format!("embedding_forward b{bt} s{seq} d{dim}"),
                vec![vec![0.0; bt * seq * dim], rng.normal(vocab * dim), rng.normal(77 * dim)],
                &[0],
                &|b, t| b.embedding_forward(&t[0], &i2, &t[1], &t[2], bt, seq, dim),
            );
            let mut ids = ids;
            ids[1] = ids[0]; // a repeated id accumulates twice
            g(
                format!("embedding_backward b{bt} s{seq} d{dim}"),
                vec![rng.normal(vocab * dim), rng.normal(77 * dim), rng.normal(bt * seq * dim)],
                &[0, 1],
                &|b, t| b.embedding_backward(&t[0], &t[1], &t[2], &ids, bt, seq, dim),
            );
        }
    }

    /// The materialised attention path (head_dim > 160) with its workspace limit lowered, so that
    /// chunks split pairs and span pairs (masked and causal too), forward and backward.
    fn wide_attention_chunk_cases(r: &mut Runner, gpu: &mut CudaBackend, bf16: bool, tag: &str) {
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
            let mask: Vec<u32> =
                (0..bt * kl).map(|i| u32::from(i % kl < kl - 3 * (i / kl) - 1 || i % 5 == 0)).collect();
            let (q, k, v) = (rng.normal(bt * ql * d), rng.normal(bt * kl * d), rng.normal(bt * kl * d));
            let ins = vec![vec![0.0; bt * ql * d], vec![0.0; bt * ql * hd], q.clone(), k.clone(), v.clone()];
            let fwd = |b: &dyn Backend, t: &[Tensor]| {
                if masked {
                    b.masked_attention_forward(&t[0], &t[1], &t[2], &t[3], &t[4], &mask, bt, ql, kl, hd, dh, sc)
                } else {
                    b.attention_forward(&t[0], &t[1], &t[2], &t[3], &t[4], bt, ql, kl, hd, dh, sc, causal)
                }
            };
            r.case(&format!("{tag}/wide attention_forward {name}"), || compare(gpu, bf16, &ins, &[0, 1], &fwd));
            let mut cpu = CpuBackend::new();
            let st = place(&mut cpu, &ins).unwrap();
            fwd(&cpu, &st).unwrap();
            let (o, lse) = (cpu.download(&st[0]).unwrap(), cpu.download(&st[1]).unwrap());
            let ins = vec![
                rng.normal(bt * ql * d),
                rng.normal(bt * kl * d),
                rng.normal(bt * kl * d),
                rng.normal(bt * ql * d),
                q,
                k,
                v,
                o,
                lse,
            ];
            r.case(&format!("{tag}/wide attention_backward {name}"), || {
                compare(gpu, bf16, &ins, &[0, 1, 2], &|b, t| {
                    if masked {
                        b.masked_attention_backward(
                            &t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7], &t[8], &mask, bt, ql, kl, hd, dh,
                            sc,
                        )
                    } else {
                        b.attention_backward(
                            &t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7], &t[8], bt, ql, kl, hd, dh, sc,
                            causal,
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
            let win = |off: usize, n: usize| Tensor { pool: t[0].pool, offset: t[0].offset + off, shape: [n].into() };
            let (q, o) = (win(0, l * dh), win(l * dh / 2, l * dh));
            let e = gpu.attention_forward(&o, &t[1], &q, &q, &q, 1, l, l, 1, dh, 0.1, false).err();
            ensure!(
                e.is_some_and(|e| e.to_string().contains("overlaps")),
                "attention_forward with out overlapping q was accepted"
            );
            let e = gpu.attention_backward(&o, &o, &o, &q, &q, &q, &q, &q, &t[1], 1, l, l, 1, dh, 0.1, false).err();
            ensure!(
                e.is_some_and(|e| e.to_string().contains("overlap")),
                "attention_backward with dq = dk = dv was accepted"
            );
            let w = &t[2];
            let out = Tensor { pool: w.pool, offset: w.offset, shape: [4 * 4 * 4].into() };
            let e = gpu.conv2d_forward(&out, &q, w, None, 1, 4, 4, 4, 4, 3, 1, [1, 1, 1, 1]).err();
            ensure!(
                e.is_some_and(|e| e.to_string().contains("overlaps")),
                "conv2d_forward with out overlapping the weight was accepted"
            );
            gpu.synchronize()?;
            Ok("refused".into())
        });
    }

    /// A second pass over ops that use scratch memory must not allocate.
    fn allocation_case(r: &mut Runner, gpu: &mut CudaBackend) {
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
                gpu.masked_attention_forward(&t[0], &t[1], &t[2], &t[3], &t[4], &mask, bt, l, l, hd, dh, 0.25)?;
                gpu.sum_squares(&t[5], &t[6], n)?;
                gpu.embedding_forward(&t[9], &ids, &t[7], &t[8], bt, l, 8)?;
                gpu.group_norm_forward(&t[10], &t[11], &t[12], &t[13], &t[14], &t[15], 2, 256, 32, 8, 1e-5, true)?;
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

    /// The whole denoising loop allocates nothing per step: a fresh backend that samples 2 steps and
    /// one that samples 7 end with the same number of device allocations.
    fn denoising_allocation_case(r: &mut Runner) {
        r.case("allocations do not grow with the number of denoising steps", || {
            use roentgen::pipeline::Pipeline;
            let dir = tempfile::tempdir()?;
            let pipe_dir = assemble_pipeline("pipe-a", dir.path());
            let count = |steps: usize| -> Result<usize> {
                let mut gpu = CudaBackend::new(0, Precision::Bf16)?;
                let pipe = Pipeline::load(&mut gpu, &pipe_dir, None)?;
                let req = two_prompt_request(steps, 5);
                let out = pipe.generate(&mut gpu, &req, &mut |_, _| {}, &mut |_| {})?;
                ensure!(out.images.iter().all(|v| v.is_finite()), "non-finite pixels after {steps} steps");
                Ok(gpu.allocation_count())
            };
            let (short, long) = (count(2)?, count(7)?);
            ensure!(short == long, "{short} device allocations for 2 steps, {long} for 7");
            Ok(format!("{short} allocations for 2 steps and for 7"))
        });
    }

    /// bf16: a convolution whose weight lies in a parameter pool reads the pool's bf16 copy and
    /// must give bit for bit what the same weight gives in an ordinary pool, before and after an
    /// AdamW step (which updates the copy in the same pass) and after a new upload.
    fn param_copy_case(r: &mut Runner) {
        r.case("bf16/conv2d through a parameter pool's bf16 copy (upload, AdamW) equals the plain path", || {
            let mut rng = Rng(0xC0FFEE);
            let (b, h, w, ci, co, k) = (2, 9, 7, 32, 48, 3);
            let nw = co * ci * k * k;
            let (x, wt, g) = (rng.normal(b * h * w * ci), rng.scaled(nw, 0.05), rng.scaled(nw, 0.1));
            let run = |params: bool| -> Result<Vec<f32>> {
                let mut gpu = CudaBackend::new(0, Precision::Bf16)?;
                // The weight at a nonzero offset of its pool (as a parameter among others).
                let wp = gpu.alloc(nw + 48, "weight")?;
                if params {
                    gpu.mark_params(wp)?;
                }
                let t =
                    place(&mut gpu, &[x.clone(), vec![0.0; b * h * w * co], g.clone(), vec![0.0; nw], vec![0.0; nw]])?;
                let wt_t = Tensor { pool: wp, offset: 48, shape: [nw].into() };
                gpu.upload(&wt_t, &wt)?;
                let mut outs = Vec::new();
                let conv = |gpu: &CudaBackend, outs: &mut Vec<f32>| -> Result<()> {
                    gpu.conv2d_forward(&t[1], &t[0], &wt_t, None, b, h, w, ci, co, k, 1, [1, 1, 1, 1])?;
                    outs.extend(gpu.download(&t[1])?);
                    Ok(())
                };
                conv(&gpu, &mut outs)?;
                gpu.adamw_step(&wt_t, &t[2], &t[3], &t[4], nw, 1e-2, 0.9, 0.999, 1e-8, 1e-2, 1)?;
                conv(&gpu, &mut outs)?;
                gpu.upload(
                    &wt_t,
                    &x[..nw.min(x.len())]
                        .iter()
                        .map(|v| v * 0.01)
                        .chain(std::iter::repeat(0.0))
                        .take(nw)
                        .collect::<Vec<_>>(),
                )?;
                conv(&gpu, &mut outs)?;
                Ok(outs)
            };
            let (plain, copy) = (run(false)?, run(true)?);
            let differ = plain.iter().zip(&copy).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            ensure!(differ == 0, "{differ} of {} outputs differ through the bf16 copy", plain.len());
            Ok(format!("{} outputs over 3 phases bit-identical", plain.len()))
        });
    }

    /// The denoising loop with CUDA graphs (the default) gives the images of the loop launched
    /// kernel by kernel, and did replay: with one U-Net call per step, the first runs directly,
    /// the second is captured and every later one is a replay.
    fn graph_case(r: &mut Runner) {
        r.case("sampling with CUDA graphs equals sampling without", || {
            use roentgen::pipeline::Pipeline;
            let dir = tempfile::tempdir()?;
            let pipe_dir = assemble_pipeline("pipe-a", dir.path());
            let steps = 6;
            let run = |graphs: bool| -> Result<(Vec<f32>, usize, usize)> {
                let mut gpu = CudaBackend::new(0, Precision::F32)?;
                gpu.set_graphs(graphs);
                let pipe = Pipeline::load(&mut gpu, &pipe_dir, None)?;
                let req = two_prompt_request(steps, 11);
                let out = pipe.generate(&mut gpu, &req, &mut |_, _| {}, &mut |_| {})?;
                Ok((out.images, out.timings.graph_replays, out.timings.unet_calls))
            };
            let (direct, r0, _) = run(false)?;
            let (graphed, r1, calls) = run(true)?;
            ensure!(r0 == 0, "{r0} graph replays with graphs off");
            // One U-Net call per timestep, and PNDM (pipe-a's scheduler) has steps + 1 of them: the
            // first call runs directly, the second is captured, every later one replays. (Found on
            // the emulated device: this case expected steps − 2 before it had ever run.)
            ensure!(
                r1 + 2 == calls,
                "{r1} graph replays for {calls} U-Net calls ({steps} steps); expected {}",
                calls - 2
            );
            let max = graphed.iter().zip(&direct).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            ensure!(max <= 1e-6, "images differ by up to {max:.2e} with graphs on");
            Ok(format!("{r1} replays of {calls} U-Net calls, max pixel difference {max:.1e}"))
        });
    }

    /// Two prompts, 16×16 pixels, guidance 4, one U-Net call per step.
    fn two_prompt_request(steps: usize, seed: u64) -> roentgen::pipeline::SampleRequest {
        roentgen::pipeline::SampleRequest {
            prompts: vec!["Large left pleural effusion.".into(), "Enlarged cardiac silhouette.".into()],
            negative_prompt: None,
            num_images_per_prompt: 1,
            batch_size: 2,
            seed,
            rng_variant: Default::default(),
            height: 16,
            width: 16,
            steps,
            guidance: 4.0,
            scheduler: None,
            scheduler_options: Default::default(),
            latents_in: None,
        }
    }

    /// Training steps allocate nothing either: 1 step and 4 steps (with latents cached, checkpoint at
    /// the end) on fresh backends end with the same number of device allocations.
    fn training_allocation_case(r: &mut Runner) {
        r.case("allocations do not grow with the number of training steps", || {
            use roentgen::train::run::{train, TrainConfig};
            let dir = tempfile::tempdir()?;
            let pipe = assemble_pipeline("pipe-a", dir.path());
            // Four 16×16 gray images whose content follows the text.
            std::fs::create_dir_all(dir.path().join("img"))?;
            let mut manifest = String::new();
            for i in 0..4u32 {
                let img =
                    image::GrayImage::from_fn(16, 16, |x, y| image::Luma([((x * 13 + y * 7 + i * 29) % 251) as u8]));
                img.save(dir.path().join(format!("img/{i}.png")))?;
                let text = ["Large left pleural effusion.", "No acute cardiopulmonary process."][i as usize % 2];
                manifest.push_str(&format!("{{\"image\": \"img/{i}.png\", \"text\": \"{text}\"}}\n"));
            }
            let data = dir.path().join("train.jsonl");
            std::fs::write(&data, manifest)?;
            let count = |steps: usize| -> Result<usize> {
                let mut gpu = CudaBackend::new(0, Precision::Bf16)?;
                let cfg = TrainConfig {
                    model: pipe.clone(),
                    data: data.clone(),
                    output: dir.path().join(format!("run-{steps}")),
                    resolution: 16,
                    batch_size: 2,
                    steps,
                    seed: 3,
                    optim: Default::default(),
                    unet_init_random: false,
                    checkpoint_every: 1000,
                    resume: false,
                    overwrite: true,
                    cache_latents: true,
                    log_every: 1,
                    on_bad_image: roentgen::train::data::OnBadImage::Fail,
                    variant: None,
                    ema_decay: None,
                    text_encoder: None,
                    text_encoder_init_random: false,
                    uncond_prob: 0.0,
                    checkpoints_total_limit: None,
                    allow_changed_settings: false,
                    verify_images: false,
                };
                train(&mut gpu, &cfg, &mut |_, _| {})?;
                Ok(gpu.allocation_count())
            };
            let (short, long) = (count(1)?, count(4)?);
            ensure!(short == long, "{short} device allocations for 1 training step, {long} for 4");
            Ok(format!("{short} allocations for 1 step and for 4"))
        });
    }

    /// `roentgen sample` and `train-step` with --device cuda against --device cpu on fixture pipelines.
    fn end_to_end_cases(r: &mut Runner, precision: &str, bar: f64) {
        let sample = |device: &str, dir: &std::path::Path, pipe: &std::path::Path| -> Result<Vec<f32>> {
            let dump = dir.join(format!("dump-{device}.safetensors"));
            let (code, _, err) = run_cli(
                &[
                    "--device",
                    device,
                    "--precision",
                    precision,
                    "sample",
                    "--model",
                    pipe.to_str().unwrap(),
                    "--prompt",
                    "Large left pleural effusion.",
                    "--prompt",
                    "No acute cardiopulmonary process.",
                    "--height",
                    "16",
                    "--width",
                    "16",
                    "--steps",
                    "6",
                    "--seed",
                    "3",
                    "--out",
                    dir.join(format!("png-{device}")).to_str().unwrap(),
                    "--dump",
                    dump.to_str().unwrap(),
                ],
                None,
            );
            ensure!(code == 0, "sample --device {device}: {err}");
            Ok(read_f32(&dump, "image").1)
        };
        for pipe_name in ["pipe-a", "pipe-b", "pipe-bert"] {
            r.case(&format!("{precision}/sample {pipe_name}: cuda vs cpu"), || {
                let dir = tempfile::tempdir()?;
                let pipe = if pipe_name == "pipe-bert" {
                    let p = dir.path().join(pipe_name);
                    copy_tree(&fixture(pipe_name), &p);
                    p
                } else {
                    assemble_pipeline(pipe_name, dir.path())
                };
                let want = sample("cpu", dir.path(), &pipe)?;
                let got = sample("cuda", dir.path(), &pipe)?;
                rel_l2_at_most(&got, &want, bar)
            });
        }
        r.case(&format!("{precision}/train-step: cuda vs cpu"), || {
            let dir = tempfile::tempdir()?;
            let pipe = dir.path().join("pipe");
            copy_dir(&fixture("grads/unet"), &pipe.join("unet"));
            copy_dir(&fixture("train10/text_encoder"), &pipe.join("text_encoder"));
            copy_dir(&fixture("pipe-a/vae"), &pipe.join("vae"));
            copy_dir(&sd14_config().join("scheduler"), &pipe.join("scheduler"));
            copy_dir(&sd14_config().join("tokenizer"), &pipe.join("tokenizer"));
            std::fs::copy(fixture("pipe-a/model_index.json"), pipe.join("model_index.json"))?;
            let io = fixture("train10/io.safetensors");
            let batch = dir.path().join("batch.safetensors");
            let mut named = Vec::new();
            for name in ["latents", "noise", "input_ids", "timesteps"] {
                let (s, v) = read_f32(&io, &format!("b0.{name}"));
                named.push((name.to_string(), s, v));
            }
            write_many_f32(&batch, &named);
            let step = |device: &str| -> Result<(f64, f64, Vec<f32>)> {
                let out = dir.path().join(format!("stepped-{device}"));
                let (code, stdout, err) = run_cli(
                    &[
                        "--device",
                        device,
                        "--precision",
                        precision,
                        "train-step",
                        "--model",
                        pipe.to_str().unwrap(),
                        "--batch",
                        batch.to_str().unwrap(),
                        "--output",
                        out.to_str().unwrap(),
                        "--lr",
                        "1e-3",
                    ],
                    None,
                );
                ensure!(code == 0, "train-step --device {device}: {err}");
                let v: serde_json::Value = serde_json::from_str(stdout.trim())?;
                let w = read_all_f32(&out.join("unet/diffusion_pytorch_model.safetensors"));
                Ok((v["loss"].as_f64().unwrap_or(f64::NAN), v["grad_norm"].as_f64().unwrap_or(f64::NAN), w))
            };
            let (l0, n0, w0) = step("cpu")?;
            let (l1, n1, w1) = step("cuda")?;
            ensure!((l1 - l0).abs() <= bar * l0.abs().max(1.0), "loss {l1} vs cpu {l0}");
            ensure!((n1 - n0).abs() <= bar * n0.abs().max(1.0), "grad norm {n1} vs cpu {n0}");
            let w = rel_l2_at_most(&w1, &w0, bar)?;
            Ok(format!("loss {l1:.6} (cpu {l0:.6}), grad norm {n1:.5} (cpu {n0:.5}), updated U-Net {w}"))
        });
    }

    fn rel_l2_at_most(got: &[f32], want: &[f32], bar: f64) -> Result<String> {
        ensure!(got.len() == want.len(), "{} values vs {}", got.len(), want.len());
        let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().max(1e-30);
        let rel = (num / den).sqrt();
        let max = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        ensure!(rel <= bar, "relative L2 error {rel:.3e} > {bar:.0e} (max abs {max:.2e})");
        Ok(format!("relL2 {rel:.1e}, max abs {max:.1e}"))
    }

    fn write_many_f32(path: &std::path::Path, named: &[(String, Vec<usize>, Vec<f32>)]) {
        let bytes: Vec<Vec<u8>> =
            named.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let views: Vec<_> = named
            .iter()
            .zip(&bytes)
            .map(|((n, s, _), b)| {
                (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
            })
            .collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    fn read_all_f32(path: &std::path::Path) -> Vec<f32> {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<_> = st.names().into_iter().map(|s| s.to_string()).collect();
        names.sort();
        let mut out = Vec::new();
        for n in names {
            let t = st.tensor(&n).unwrap();
            match t.dtype() {
                safetensors::Dtype::F32 => {
                    out.extend(t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())))
                }
                safetensors::Dtype::F16 => {
                    out.extend(t.data().chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()))
                }
                other => panic!("{}: tensor {n} has dtype {other:?}; expected F32 or F16", path.display()),
            }
        }
        out
    }

    fn copy_tree(src: &std::path::Path, dst: &std::path::Path) {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                copy_tree(&p, &dst.join(e.file_name()));
            } else {
                std::fs::copy(&p, dst.join(e.file_name())).unwrap();
            }
        }
    }

    pub fn main() {
        let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
        println!(
            "running the CUDA parity suite (CUDA vs the CPU reference){}",
            filter.as_ref().map(|f| format!(", cases containing '{f}'")).unwrap_or_default()
        );
        let why = if !driver_present() && !emulate() {
            Some("no CUDA driver (libcuda) on this machine".to_string())
        } else {
            match CudaBackend::new(0, Precision::F32) {
                Ok(_) => None,
                Err(e) => Some(format!("{e:#}")),
            }
        };
        if let Some(why) = why {
            println!("SKIPPED, every case: {why}");
            println!("test result: ok. 0 passed; 0 failed; all skipped ({why})");
            return;
        }
        let mut r = Runner { filter, passed: 0, failed: Vec::new(), skipped: 0 };
        for (prec, tag, bf16) in [(Precision::F32, "f32", false), (Precision::Bf16, "bf16", true)] {
            let mut gpu = CudaBackend::new(0, prec).expect("CUDA backend");
            println!("device: {}", gpu.name());
            op_cases(&mut r, &mut gpu, bf16, tag);
            wide_attention_chunk_cases(&mut r, &mut gpu, bf16, tag);
            if !bf16 {
                allocation_case(&mut r, &mut gpu);
            }
        }
        if std::env::var_os("ROENTGEN_CUDA_SKIP_E2E").is_none() {
            denoising_allocation_case(&mut r);
            graph_case(&mut r);
            param_copy_case(&mut r);
            training_allocation_case(&mut r);
            end_to_end_cases(&mut r, "f32", 1e-4);
            // bf16 through a whole denoising loop / step: errors compound over ~20 layers and 6
            // steps, so the end-to-end bar is 5e-2 relative L2 (per operation it is 2e-2).
            end_to_end_cases(&mut r, "bf16", 5e-2);
        } else {
            println!("end-to-end cases SKIPPED (ROENTGEN_CUDA_SKIP_E2E is set)");
        }
        println!(
            "test result: {}. {} passed; {} failed; {} filtered out",
            if r.failed.is_empty() { "ok" } else { "FAILED" },
            r.passed,
            r.failed.len(),
            r.skipped
        );
        if !r.failed.is_empty() {
            println!("failures:\n  {}", r.failed.join("\n  "));
            std::process::exit(1);
        }
    }
}
