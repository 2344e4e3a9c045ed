//! Whole pipelines on the CUDA backend: sampling and training steps end to end against the CPU
//! backend (through the CLI, as a user runs them), CUDA graphs, bf16 parameter copies, and that
//! neither the denoising loop nor the training step allocates device memory per step.

use super::common::*;
use super::harness::*;
use anyhow::{ensure, Result};
use roentgen::backend::cuda::CudaBackend;
use roentgen::backend::{Backend, ConvOps, ElementwiseOps, OptimOps, Precision};
use roentgen::ops::conv::Conv2dBackward;
use roentgen::tensor::Tensor;

/// The whole denoising loop allocates nothing per step: a fresh backend that samples 2 steps and
/// one that samples 7 end with the same number of device allocations.
pub fn denoising_allocation_case(r: &mut Runner) {
    r.case("allocations do not grow with the number of denoising steps", || {
        use roentgen::sample::pipeline::Pipeline;
        let dir = tempfile::tempdir()?;
        let pipe_dir = assemble_pipeline("pipe-a", dir.path());
        let count = |steps: usize| -> Result<usize> {
            let mut gpu = CudaBackend::new(0, Precision::Bf16)?;
            let pipe = Pipeline::load(&mut gpu, &pipe_dir, None)?;
            let req = two_prompt_request(steps, 5);
            let out = pipe.generate(&mut gpu, &req, &mut |_, _| Ok(()), &mut |_| {})?;
            ensure!(out.images.iter().all(|v| v.is_finite()), "non-finite pixels after {steps} steps");
            Ok(gpu.allocation_count())
        };
        let (short, long) = (count(2)?, count(7)?);
        ensure!(short == long, "{short} device allocations for 2 steps, {long} for 7");
        Ok(format!("{short} allocations for 2 steps and for 7"))
    });
}

/// Sampling frees what it allocated (`Backend::free`, graphs dropped with the arenas): three calls
/// on one loaded pipeline leave the device's pools as loading left them, with the same images.
pub fn sampling_frees_case(r: &mut Runner) {
    r.case("sampling frees its pools: three calls on one pipeline leave the pools as loaded", || {
        use roentgen::sample::pipeline::Pipeline;
        let dir = tempfile::tempdir()?;
        let pipe_dir = assemble_pipeline("pipe-a", dir.path());
        let mut gpu = CudaBackend::new(0, Precision::Bf16)?;
        let pipe = Pipeline::load(&mut gpu, &pipe_dir, None)?;
        // (pools and copies, the conv-weight permutations the frozen models keep (params.rs))
        let held = |g: &CudaBackend| -> (usize, usize) {
            let kept = |label: &str| label.ends_with("(permuted conv weights)");
            let sizes = g.pool_sizes();
            let sum = |keep: bool| sizes.iter().filter(|(l, _)| kept(l) == keep).map(|(_, n)| n).sum();
            (sum(false), sum(true))
        };
        let (loaded, none) = held(&gpu);
        ensure!(none == 0, "{none} bytes of permuted conv weights before the first call");
        let req = two_prompt_request(3, 5);
        let mut images = Vec::new();
        let mut permuted = Vec::new();
        for call in 0..3 {
            images.push(pipe.generate(&mut gpu, &req, &mut |_, _| Ok(()), &mut |_| {})?.images);
            let (pools, kept) = held(&gpu);
            ensure!(pools == loaded, "call {}: {pools} bytes of pools, {loaded} after loading", call + 1);
            permuted.push(kept);
        }
        ensure!(images[0] == images[2], "the same request gave other images on its third call");
        ensure!(
            permuted[0] > 0 && permuted.iter().all(|&k| k == permuted[0]),
            "permuted conv weights kept after each call: {permuted:?} bytes (made at the first, then constant)"
        );
        Ok(format!("{loaded} bytes of pools before and after each call, {} of kept permutations", permuted[0]))
    });
}

/// Every kernel family at its newest version (versions.rs) composed through a whole f32 denoising
/// loop and VAE decode, and through a training step of U-Net and text encoder, against the CPU.
/// pipe-a assembled in `dir`, the two-prompt request (4 steps, seed 5) and the CPU's result of it:
/// the reference of the sampling cases below.
fn pipe_a_on_the_cpu(
    dir: &std::path::Path,
) -> Result<(std::path::PathBuf, roentgen::sample::pipeline::SampleRequest, roentgen::sample::pipeline::SampleOutput)> {
    use roentgen::sample::pipeline::Pipeline;
    let pipe_dir = assemble_pipeline("pipe-a", dir);
    let req = two_prompt_request(4, 5);
    let mut cpu = roentgen::backend::cpu::CpuBackend::new();
    let want = Pipeline::load(&mut cpu, &pipe_dir, None)?.generate(&mut cpu, &req, &mut |_, _| Ok(()), &mut |_| {})?;
    Ok((pipe_dir, req, want))
}

/// bf16 activations (issue 18, `--activations bf16`): two guided prompts through pipe-a with the
/// U-Net's and the VAE decoder's arenas in bf16 (every operation of their sampling forwards, the
/// convolutions and attention through the bf16 bridge), against the CPU within the bf16 bar; the
/// arenas half as large; training refused.
pub fn bf16_activations_sample_case(r: &mut Runner) {
    r.case("bf16/sample pipe-a with bf16 activations: cuda vs cpu, half the arenas", || {
        use roentgen::sample::pipeline::Pipeline;
        use roentgen::tensor::DType;
        let dir = tempfile::tempdir()?;
        let (pipe_dir, req, want) = pipe_a_on_the_cpu(dir.path())?;
        let mut gpu = CudaBackend::new(0, Precision::Bf16)?;
        let pipe = Pipeline::load(&mut gpu, &pipe_dir, None)?;
        let f32_arena = pipe.unet.allocate_arena(&mut gpu, 2, 8, 8, 77)?.capacity();
        let f32_vae = pipe.vae.allocate_decode_arena(&mut gpu, 1, 8, 8)?.capacity();
        let f32_acts = pipe.generate(&mut gpu, &req, &mut |_, _| Ok(()), &mut |_| {})?;
        gpu.set_activations(DType::BF16)?;
        let bf16_arena = pipe.unet.allocate_arena(&mut gpu, 2, 8, 8, 77)?.capacity();
        let bf16_vae = pipe.vae.allocate_decode_arena(&mut gpu, 1, 8, 8)?.capacity();
        for (what, bf16, f32) in [("U-Net", bf16_arena, f32_arena), ("VAE decoder", bf16_vae, f32_vae)] {
            ensure!(
                bf16 < f32 * 52 / 100,
                "the bf16 {what} arena holds {bf16} f32 slots, the f32 one {f32}: not about half"
            );
        }
        let got = pipe.generate(&mut gpu, &req, &mut |_, _| Ok(()), &mut |_| {})?;
        let vs_cpu = rel_l2_at_most(&got.images, &want.images, 5e-2)?;
        let f32_vs_cpu = rel_l2_at_most(&f32_acts.images, &want.images, 5e-2)?;
        let err = match roentgen::train::check_activations_for_training(&gpu) {
            Ok(()) => anyhow::bail!("training was not refused with bf16 activations"),
            Err(e) => format!("{e:#}"),
        };
        ensure!(err.contains("--activations f32"), "the refusal does not say what to do: {err}");
        Ok(format!(
            "images {vs_cpu} (f32 activations: {f32_vs_cpu}); arenas (U-Net, VAE decoder) {bf16_arena} and \
             {bf16_vae} slots against {f32_arena} and {f32_vae} in f32"
        ))
    });
}

pub fn newest_kernel_versions_case(r: &mut Runner) {
    use roentgen::backend::cuda::versions::KernelFamily;
    let newest = |gpu: &CudaBackend| -> Result<String> {
        for f in KernelFamily::ALL {
            gpu.set_kernel_version(f, f.versions().last().expect("a family has versions").0)?;
        }
        Ok(gpu.kernel_choice().describe())
    };
    // f32 (the parity bar) and bf16 (where the conv family's versions differ; the end-to-end bf16 bar).
    for (precision, tag, bar) in [(Precision::F32, "f32", 1e-4), (Precision::Bf16, "bf16", 5e-2)] {
        r.case(&format!("{tag}/sample pipe-a, every kernel family at its newest version: cuda vs cpu"), || {
            use roentgen::sample::pipeline::Pipeline;
            let dir = tempfile::tempdir()?;
            let (pipe_dir, req, want) = pipe_a_on_the_cpu(dir.path())?;
            let mut gpu = CudaBackend::new(0, precision)?;
            let chosen = newest(&gpu)?;
            let got =
                Pipeline::load(&mut gpu, &pipe_dir, None)?.generate(&mut gpu, &req, &mut |_, _| Ok(()), &mut |_| {})?;
            Ok(format!("{chosen}: images {}", rel_l2_at_most(&got.images, &want.images, bar)?))
        });
    }
    // With recomputation the device recomputes every block's internals in the backward; the CPU
    // reference keeps them (the same gradients, so the same step within the bar).
    for recompute in [false, true] {
        let with = if recompute { " with gradient checkpointing" } else { "" };
        r.case(&format!("f32/training step{with}, every kernel family at its newest version: cuda vs cpu"), || {
            newest_training_step(recompute, &newest)
        });
    }
}

fn newest_training_step(recompute: bool, newest: &dyn Fn(&CudaBackend) -> Result<String>) -> Result<String> {
    {
        use roentgen::models::clip::ClipTextModel;
        use roentgen::models::text::TextEncoder;
        use roentgen::models::unet::UNet;
        use roentgen::models::Component;
        use roentgen::train::{Batch, MicroBatchShape, Noise, OptimOptions, PredictionType, Trainer};
        let io = fixture("train10/io.safetensors");
        let cfg = sd14_config().join("scheduler/scheduler_config.json");
        let ac = roentgen::sample::schedulers::training_alphas_cumprod(
            &serde_json::from_str(&std::fs::read_to_string(&cfg)?)?,
            &cfg,
        )?;
        let step = |b: &mut dyn Backend, gradient_checkpointing: bool| -> Result<(f32, f32, Vec<f32>)> {
            let (unet, _) = UNet::load(b, &fixture("grads/unet"), None)?;
            let (clip, _) = ClipTextModel::load(b, &fixture("train10/text_encoder"), None)?;
            let clip = TextEncoder::Clip(clip);
            let opts = OptimOptions { lr: 1e-3, gradient_checkpointing, ..OptimOptions::default() };
            let shape = MicroBatchShape { size: 2, h: 8, w: 6, seq: 8 };
            let mut tr = Trainer::new(b, &unet, &clip, opts, ac.clone(), PredictionType::Epsilon, shape)?;
            let (s, latents) = read_f32(&io, "b0.latents");
            let batch = Batch {
                latents,
                latent_shape: [s[0], s[1], s[2], s[3]],
                input_ids: read_f32(&io, "b0.input_ids").1.iter().map(|&x| x as u32).collect(),
                attention_mask: vec![1; 16],
                noise: Noise::Given(read_f32(&io, "b0.noise").1),
                timesteps: read_f32(&io, "b0.timesteps").1.iter().map(|&t| t as usize).collect(),
                inpaint: None,
            };
            let st = tr.train_step(b, &unet, &clip, &[batch], 1, &roentgen::dist::Dist::single())?;
            let w = b.download(&Tensor::new(unet.table.pool(), 0, [unet.table.total()].into()))?;
            Ok((st.loss, st.grad_norm, w))
        };
        let (l0, n0, w0) = step(&mut roentgen::backend::cpu::CpuBackend::new(), false)?;
        let mut gpu = CudaBackend::new(0, Precision::F32)?;
        let chosen = newest(&gpu)?;
        let (l1, n1, w1) = step(&mut gpu, recompute)?;
        ensure!((l1 - l0).abs() <= 1e-4 * l0.abs().max(1.0), "loss {l1} vs cpu {l0}");
        ensure!((n1 - n0).abs() <= 1e-4 * n0.abs().max(1.0), "grad norm {n1} vs cpu {n0}");
        Ok(format!("{chosen}: loss {l1:.6} (cpu {l0:.6}), updated U-Net {}", rel_l2_at_most(&w1, &w0, 1e-4)?))
    }
}

/// `bench --autotune` on the emulated device: every shape of a versioned kernel that pipe-a's U-Net,
/// VAE decoder and training step run is timed in every version, each version checked against
/// version 1 first; one fastest correct version per shape goes to the cache, and a backend started
/// afterwards runs the tuned versions. (The emulation's times mean nothing; the mechanics and the
/// gate run.)
pub fn autotune_case(r: &mut Runner) {
    r.case("bf16/bench --autotune: shapes recorded, versions gated and timed, cache written and read", || {
        use roentgen::backend::cuda::versions::KernelFamily;
        let dir = tempfile::tempdir()?;
        let pipe = assemble_pipeline("pipe-a", dir.path());
        let cache = dir.path().join("cache/kernel-versions.json");
        // bf16: the path on which the conv family has several versions.
        let args =
            ["--device", "cuda", "--precision", "bf16", "bench", "--autotune", "--autotune-iters", "2", "--json"];
        let out = std::process::Command::new(roentgen_bin())
            .args(args)
            .args(["--height", "16", "--width", "16", "--model"])
            .arg(&pipe)
            .env("ROENTGEN_KERNEL_CACHE", &cache)
            .env_remove("ROENTGEN_KERNELS")
            .output()?;
        ensure!(out.status.success(), "bench --autotune: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let rows = v["rows"].as_array().cloned().unwrap_or_default();
        let mut report = Vec::new();
        let mut all_shapes = 0;
        for family in KernelFamily::ALL {
            let of_family: Vec<&serde_json::Value> = rows.iter().filter(|r| r["family"] == family.name()).collect();
            let shapes: std::collections::BTreeSet<&str> =
                of_family.iter().filter_map(|r| r["shape"].as_str()).collect();
            let versions = family.versions().len();
            ensure!(!shapes.is_empty(), "no {} shape was recorded", family.name());
            ensure!(
                of_family.len() == shapes.len() * versions,
                "{}: {} rows for {} shapes × {versions} versions",
                family.name(),
                of_family.len(),
                shapes.len()
            );
            for shape in &shapes {
                let of: Vec<&&serde_json::Value> = of_family.iter().filter(|r| r["shape"] == *shape).collect();
                ensure!(of.iter().all(|r| r["correct"] == true), "{shape}: a version failed the gate: {of:?}");
                ensure!(of.iter().filter(|r| r["chosen"] == true).count() == 1, "{shape}: not one chosen version");
            }
            // The resnets' group norm + SiLU (forward and backward), the data gradients'
            // accumulating convolutions, and the text encoder's causal attention.
            let needle = match family {
                KernelFamily::Conv => " acc",
                KernelFamily::Attention => " causal",
                KernelFamily::GroupNorm | KernelFamily::GroupNormBackward => " silu",
            };
            ensure!(shapes.iter().any(|s| s.ends_with(needle)), "no{needle} shape among {shapes:?}");
            report.push(format!("{} {} shapes × {versions} versions", family.name(), shapes.len()));
            all_shapes += shapes.len();
        }
        let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cache)?)?;
        let tables = written["devices"].as_object().cloned().unwrap_or_default();
        ensure!(tables.len() == 1, "cache tables: {tables:?}");
        let entries = tables.values().next().and_then(|t| t["entries"].as_array().cloned()).unwrap_or_default();
        ensure!(entries.len() == all_shapes, "{} cache entries for {all_shapes} shapes", entries.len());
        // A backend started now reads the table.
        std::env::set_var("ROENTGEN_KERNEL_CACHE", &cache);
        let gpu = CudaBackend::new(0, Precision::Bf16);
        std::env::remove_var("ROENTGEN_KERNEL_CACHE");
        let gpu = gpu?;
        let choice = gpu.kernel_choice();
        ensure!(choice.tuned_shapes() == all_shapes, "the new backend holds {} tuned shapes", choice.tuned_shapes());
        for e in &entries {
            let family = e["family"].as_str().and_then(KernelFamily::from_name).unwrap_or(KernelFamily::GroupNorm);
            let (shape, want) = (e["shape"].as_str().unwrap_or_default(), e["version"].as_u64().unwrap_or(0) as u32);
            ensure!(choice.version_for(family, shape) == want, "{shape}: tuned {want} not used");
        }
        Ok(format!("{}; every version through the gate; cache read back", report.join(", ")))
    });
}

/// `bench train-step` reports the most device memory held: at least the U-Net's and text encoder's
/// weights, gradients and two AdamW moments (4 × 4 bytes per parameter) plus the activation arena.
/// With --gradient-checkpointing the step runs in a smaller arena and holds less at its peak.
pub fn train_step_memory_case(r: &mut Runner) {
    r.case("bf16/bench train-step reports the peak device memory, lower with gradient checkpointing", || {
        let dir = tempfile::tempdir()?;
        let pipe = assemble_pipeline("pipe-a", dir.path());
        let bench = |recompute: &[&str]| -> Result<(u64, u64, u64)> {
            let args = CliArgs::new(&["bench", "train-step", "--height", "32", "--width", "32", "--iters", "1"])
                .opt("--model", &pipe)
                .with(&["--warmup", "0", "--json"])
                .with(recompute)
                .globals(&["--device", "cuda", "--precision", "bf16"]);
            let (code, stdout, err) = args.run();
            ensure!(code == 0, "bench train-step {recompute:?}: {err}");
            let v: serde_json::Value = serde_json::from_str(stdout.trim())?;
            let (params, act) = (v["parameters"].as_u64().unwrap_or(0), v["activation_bytes"].as_u64().unwrap_or(0));
            let peak = v["peak_device_bytes"].as_u64().unwrap_or(0);
            let floor = 16 * params + act;
            ensure!(peak >= floor, "peak device memory {peak} B below weights + gradients + moments + arena {floor} B");
            ensure!(peak < 64 * floor + (256 << 20), "peak device memory {peak} B implausibly above {floor} B");
            Ok((params, act, peak))
        };
        let (params, act, peak) = bench(&[])?;
        let (_, act_r, peak_r) = bench(&["--gradient-checkpointing"])?;
        ensure!(act_r < act, "recomputing: activation arena {act_r} B, keeping {act} B");
        ensure!(peak_r < peak, "recomputing: peak device memory {peak_r} B, keeping {peak} B");
        Ok(format!(
            "{params} parameters; keeping: arena {act} B, peak {peak} B; recomputing: arena {act_r} B, peak {peak_r} B"
        ))
    });
}

/// bf16: a convolution whose weight lies in a parameter pool reads the pool's bf16 copy and
/// must give bit for bit what the same weight gives in an ordinary pool: twice in a row (the
/// second, in a frozen pool, from the permutation the copy keeps), after a new upload (which must
/// make the permutation again), through the data gradient (the other layout), and after AdamW
/// steps (which update the copy in the same pass and unfreeze the pool). The permute launches are
/// counted: a frozen pool's permutations must actually be reused, and remade when the weights
/// change; a pool not frozen (a model being trained) keeps none.
pub fn param_copy_case(r: &mut Runner) {
    // (batch, h, w, c_in, c_out, kernel, stride): a 1×1 reads the copy directly; c_in 5 is unaligned.
    for (b, h, w, ci, co, k, stride) in
        [(2, 9, 7, 32, 48, 3, 1), (1, 7, 6, 12, 20, 3, 1), (2, 5, 5, 16, 24, 1, 1), (1, 9, 8, 5, 7, 3, 2)]
    {
        let pad = if k == 3 { [1; 4] } else { [0; 4] };
        let (oh, ow) = ((h + 2 * pad[0] - k) / stride + 1, (w + 2 * pad[2] - k) / stride + 1);
        let name = format!("{b}x{h}x{w}x{ci}->{co} k{k} s{stride}");
        r.case(
            &format!(
                "bf16/conv2d {name} through a parameter pool's bf16 copy and its kept permutations (repeat, \
                 upload, data gradient, AdamW; frozen or not) equals the plain path"
            ),
            || {
                let mut rng = Rng(0xC0FFEE + ci as u64);
                let nw = co * ci * k * k;
                let (x, wt, g) = (rng.normal(b * h * w * ci), rng.scaled(nw, 0.05), rng.scaled(nw, 0.1));
                let dout = rng.normal(b * oh * ow * co);
                let wt2: Vec<f32> = x.iter().map(|v| v * 0.01).chain(std::iter::repeat(0.0)).take(nw).collect();
                // (outputs of every phase, permute launches made)
                let run = |params: bool, frozen: bool| -> Result<(Vec<f32>, usize)> {
                    let mut gpu = CudaBackend::new(0, Precision::Bf16)?;
                    // The weight at a nonzero offset of its pool (as a parameter among others).
                    let wp = gpu.alloc(nw + 48, "weight")?;
                    if params {
                        gpu.mark_params(wp)?;
                    }
                    if frozen {
                        gpu.mark_frozen(wp);
                    }
                    let t = place(
                        &mut gpu,
                        &[
                            x.clone(),
                            vec![0.0; b * oh * ow * co],
                            g.clone(),
                            vec![0.0; nw],
                            vec![0.0; nw],
                            dout.clone(),
                            vec![0.0; x.len()],
                            vec![0.0; nw],
                        ],
                    )?;
                    let wt_t = Tensor::new(wp, 48, [nw].into());
                    gpu.upload(&wt_t, &wt)?;
                    gpu.set_profiling(true);
                    let p = conv2d((b, h, w, ci, co, k, stride, pad));
                    let mut outs = Vec::new();
                    let conv = |gpu: &CudaBackend, outs: &mut Vec<f32>| -> Result<()> {
                        conv2d_forward(gpu, p, &[t[1], t[0], wt_t])?;
                        outs.extend(gpu.download(&t[1])?);
                        Ok(())
                    };
                    let data_grad = |gpu: &CudaBackend, outs: &mut Vec<f32>| -> Result<()> {
                        gpu.zero(&t[6])?;
                        let bw = Conv2dBackward {
                            dinp: Some(&t[6]),
                            dweight: &t[7],
                            dbias: None,
                            dout: &t[5],
                            inp: &t[0],
                            weight: &wt_t,
                        };
                        gpu.conv2d_backward(&p, &bw)?;
                        outs.extend(gpu.download(&t[6])?);
                        Ok(())
                    };
                    conv(&gpu, &mut outs)?;
                    conv(&gpu, &mut outs)?;
                    gpu.upload(&wt_t, &wt2)?;
                    conv(&gpu, &mut outs)?;
                    data_grad(&gpu, &mut outs)?;
                    data_grad(&gpu, &mut outs)?;
                    for _ in 0..2 {
                        gpu.adamw_step(&adamw(nw, 1e-2, 1), &wt_t, &t[2], &t[3], &t[4])?;
                        conv(&gpu, &mut outs)?;
                        data_grad(&gpu, &mut outs)?;
                    }
                    let permutes = gpu
                        .kernel_profile()
                        .iter()
                        .filter(|(name, _, _)| name.starts_with("conv2d_weight_permute"))
                        .map(|(_, n, _)| n)
                        .sum();
                    Ok((outs, permutes))
                };
                let (plain, _) = run(false, false)?;
                // A 1×1 forward reads the copy as it is: no permutation.
                let forward = usize::from(k > 1);
                let mut report = Vec::new();
                for (frozen, what) in [(false, "not frozen"), (true, "frozen")] {
                    let (copy, permutes) = run(true, frozen)?;
                    let differ = plain.iter().zip(&copy).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                    ensure!(differ == 0, "{what}: {differ} of {} outputs differ through the bf16 copy", plain.len());
                    // Frozen: the forward layout once per weight values, the data gradient's once,
                    // then (AdamW unfreezes) both per call. Not frozen: every call.
                    let want = if frozen { 2 * forward + 1 + 2 * (forward + 1) } else { 5 * forward + 4 };
                    ensure!(permutes == want, "{what}: {permutes} weight permutations launched, not {want}");
                    report.push(format!("{what} {permutes} permutations"));
                }
                Ok(format!("{} outputs over 9 phases bit-identical; {}", plain.len(), report.join(", ")))
            },
        );
    }
}

/// The denoising loop with CUDA graphs (the default) gives the images of the loop launched
/// kernel by kernel, and did replay: with one U-Net call per step, the first runs directly,
/// the second is captured and every later one is a replay.
pub fn graph_case(r: &mut Runner) {
    r.case("sampling with CUDA graphs equals sampling without", || {
        use roentgen::sample::pipeline::Pipeline;
        let dir = tempfile::tempdir()?;
        let pipe_dir = assemble_pipeline("pipe-a", dir.path());
        let steps = 6;
        let run = |graphs: bool| -> Result<(Vec<f32>, usize, usize)> {
            let mut gpu = CudaBackend::new(0, Precision::F32)?;
            gpu.set_graphs(graphs);
            let pipe = Pipeline::load(&mut gpu, &pipe_dir, None)?;
            let req = two_prompt_request(steps, 11);
            let out = pipe.generate(&mut gpu, &req, &mut |_, _| Ok(()), &mut |_| {})?;
            Ok((out.images, out.timings.graph_replays, out.timings.unet_calls))
        };
        let (direct, r0, _) = run(false)?;
        let (graphed, r1, calls) = run(true)?;
        ensure!(r0 == 0, "{r0} graph replays with graphs off");
        // One U-Net call per timestep, and PNDM (pipe-a's scheduler) has steps + 1 of them: the
        // first call runs directly, the second is captured, every later one replays. (Found on
        // the emulated device: this case expected steps − 2 before it had ever run.)
        ensure!(r1 + 2 == calls, "{r1} graph replays for {calls} U-Net calls ({steps} steps); expected {}", calls - 2);
        let max = graphed.iter().zip(&direct).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        ensure!(max <= 1e-6, "images differ by up to {max:.2e} with graphs on");
        Ok(format!("{r1} replays of {calls} U-Net calls, max pixel difference {max:.1e}"))
    });
}

/// Two prompts, 16×16 pixels, guidance 4, one U-Net call per step.
fn two_prompt_request(steps: usize, seed: u64) -> roentgen::sample::pipeline::SampleRequest {
    roentgen::sample::pipeline::SampleRequest {
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
        init_image: None,
    }
}

/// Training steps allocate nothing either: 1 step and 4 steps (with latents cached, checkpoint at
/// the end) on fresh backends end with the same number of device allocations.
pub fn training_allocation_case(r: &mut Runner) {
    r.case("allocations do not grow with the number of training steps", || {
        use roentgen::train::run::{train, TrainConfig};
        let dir = tempfile::tempdir()?;
        let pipe = assemble_pipeline("pipe-a", dir.path());
        // Four 16×16 gray images whose content follows the text.
        std::fs::create_dir_all(dir.path().join("img"))?;
        let mut manifest = String::new();
        for i in 0..4u32 {
            let img = image::GrayImage::from_fn(16, 16, |x, y| image::Luma([((x * 13 + y * 7 + i * 29) % 251) as u8]));
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
            train(&mut gpu, &cfg, &mut |_, _| {}, &roentgen::dist::Dist::single())?;
            Ok(gpu.allocation_count())
        };
        let (short, long) = (count(1)?, count(4)?);
        ensure!(short == long, "{short} device allocations for 1 training step, {long} for 4");
        Ok(format!("{short} allocations for 1 step and for 4"))
    });
}

/// `roentgen sample` and `train-step` with --device cuda against --device cpu on fixture pipelines.
pub fn end_to_end_cases(r: &mut Runner, precision: &str, bar: f64) {
    let sample = |device: &str, dir: &std::path::Path, pipe: &std::path::Path| -> Result<Vec<f32>> {
        let dump = dir.join(format!("dump-{device}.safetensors"));
        let args = sample_16px_args(pipe, "6", dir.join(format!("png-{device}"))).opt("--seed", "3");
        let args =
            args.opt("--prompt", "Large left pleural effusion.").opt("--prompt", "No acute cardiopulmonary process.");
        let (code, _, err) = args.opt("--dump", &dump).globals(&["--device", device, "--precision", precision]).run();
        ensure!(code == 0, "sample --device {device}: {err}");
        Ok(read_f32(&dump, "image").1)
    };
    for pipe_name in ["pipe-a", "pipe-b", "pipe-bert"] {
        r.case(&format!("{precision}/sample {pipe_name}: cuda vs cpu"), || {
            let dir = tempfile::tempdir()?;
            let pipe = if pipe_name == "pipe-bert" {
                let p = dir.path().join(pipe_name);
                copy_dir(&fixture(pipe_name), &p);
                p
            } else {
                assemble_pipeline(pipe_name, dir.path())
            };
            let want = sample("cpu", dir.path(), &pipe)?;
            let got = sample("cuda", dir.path(), &pipe)?;
            rel_l2_at_most(&got, &want, bar)
        });
    }
    // Inpainting with a 9-channel U-Net: the VAE encoder, a 9-channel conv_in and the mask input.
    r.case(&format!("{precision}/inpaint with a 9-channel U-Net: cuda vs cpu"), || {
        let dir = tempfile::tempdir()?;
        let pipe = assemble_pipeline("pipe-a", dir.path());
        std::fs::remove_dir_all(pipe.join("unet"))?;
        copy_dir(&fixture("inpaint/unet-9ch"), &pipe.join("unet"));
        let run = |device: &str| -> Result<Vec<f32>> {
            let dump = dir.path().join(format!("inpaint-{device}.safetensors"));
            let args = CliArgs::new(&["sample", "--prompt", "Large left pleural effusion.", "--seed", "5"])
                .opt("--model", &pipe)
                .opt("--init-image", fixture("img2img/rgb-16x16.png"))
                .opt("--mask", fixture("inpaint/mask-16x16.png"))
                .with(&["--steps", "4", "--strength", "0.75"])
                .opt("--out", dir.path().join(format!("inpaint-{device}")))
                .opt("--dump", &dump);
            let (code, _, err) = args.globals(&["--device", device, "--precision", precision]).run();
            ensure!(code == 0, "sample --mask --device {device}: {err}");
            Ok(read_f32(&dump, "image").1)
        };
        let want = run("cpu")?;
        rel_l2_at_most(&run("cuda")?, &want, bar)
    });
    // An ordinary U-Net, and an inpainting one (its input assembled from the noisy latents, the
    // mask and the masked latents on the device).
    let batches: [(&str, &str, fn() -> Vec<(String, Vec<usize>, Vec<f32>)>); 2] = [
        ("train-step", "grads/unet", train10_first_batch),
        ("train-step of an inpainting U-Net", "inpaint/unet-9ch", train_inpaint_first_batch),
    ];
    for (what, unet, batch_of) in batches {
        r.case(&format!("{precision}/{what}: cuda vs cpu"), || {
            let dir = tempfile::tempdir()?;
            let pipe = train_step_pipeline_with(dir.path().join("pipe"), unet);
            let batch = dir.path().join("batch.safetensors");
            write_f32_tensors(&batch, &batch_of());
            let step = |device: &str| -> Result<(f64, f64, Vec<f32>)> {
                let out = dir.path().join(format!("stepped-{device}"));
                let args = train_step_args(&pipe, &batch, &out).opt("--lr", "1e-3");
                let (code, stdout, err) = args.globals(&["--device", device, "--precision", precision]).run();
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
}

/// The CLIP image tower (the FID feature network that runs on the backend) on the CUDA backend in
/// f32, against transformers' pooled and projected features of the three pipeline images.
pub fn clip_tower_case(r: &mut Runner) {
    r.case("f32/clip tower features: cuda vs transformers", || {
        use roentgen::eval::features::{load_image, FeatureKind, FeatureNet};
        let dir = fixture("fid/clip-tiny");
        let reference = fixture("fid/clip.safetensors");
        let images: Vec<_> = ["a", "b", "c"].iter().map(|n| fixture(&format!("fid/images/{n}.png"))).collect();
        let mut report = Vec::new();
        for (kind, tensor) in [(FeatureKind::Clip, "tiny_pooled"), (FeatureKind::ClipProj, "tiny_proj")] {
            let gpu = Box::new(CudaBackend::new(0, Precision::F32)?);
            let mut net = FeatureNet::load(kind, &dir.join("model.safetensors"), Some(&dir.join("config.json")), gpu)?;
            let prep = net.preprocessor();
            let inputs = images.iter().map(|p| Ok(prep.apply(&load_image(p)?))).collect::<Result<Vec<_>>>()?;
            let got: Vec<f32> = net.forward(&inputs)?.concat();
            let (_, want) = read_f32(&reference, tensor);
            ensure!(got.len() == want.len(), "{tensor}: {} values, reference has {}", got.len(), want.len());
            let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            ensure!(
                err <= F32_PARITY * scale,
                "{tensor}: max |cuda − transformers| {err:.2e} > {:.1e}",
                F32_PARITY * scale
            );
            report.push(format!("{tensor} max abs {err:.1e}"));
        }
        Ok(report.join(", "))
    });
}

/// A small DenseNet (TorchXRayVision's architecture at growth 4, blocks [2, 2]) with seeded
/// weights on the CUDA backend in f32, against the same network on the CPU backend: every layer
/// kind of the XRV features (7×7 stride-2 stem, batch norm + ReLU, max and average pooling, dense
/// concatenation, global average) on two images at once.
pub fn densenet_case(r: &mut Runner) {
    r.case("f32/densenet features: cuda vs cpu", || {
        use roentgen::eval::densenet::{DenseNet, DenseNetConfig};
        use roentgen::eval::net::Pixels;
        use roentgen::eval::tensors::{MapSource, Weights};
        let config = DenseNetConfig::tiny();
        let mut rng = Rng(77);
        let tensors = config
            .expected_tensors()
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                // Running variances positive, everything else centred.
                let v: Vec<f32> = if name.ends_with("running_var") {
                    rng.normal(n).iter().map(|x| 0.5 + x.abs()).collect()
                } else {
                    rng.scaled(n, 0.5)
                };
                (name, (shape, v))
            })
            .collect();
        let src = MapSource { label: "seeded densenet".into(), tensors };
        let images: Vec<Pixels> = (0..2).map(|_| Pixels::new(32, 32, 1, rng.scaled(32 * 32, 500.0))).collect();
        let features = |backend: Box<dyn Backend>| -> Result<Vec<f32>> {
            let mut net = DenseNet::load(backend, &Weights { src: &src, network: "densenet" }, config.clone())?;
            Ok(net.forward(&images)?.concat())
        };
        features_agree(&features, 2 * config.dims())
    });
}

/// One training step of a small DenseNet classifier (growth 4, blocks [2, 2], 3 outputs, two 32×32
/// images, one label missing) on the CUDA backend in f32 against the CPU backend: the logits, the
/// loss, every parameter's gradient and every running statistic after the step (batch norm in
/// training mode and its backward, pooling's backward, convolution and linear backward through the
/// dense concatenations).
pub fn densenet_training_case(r: &mut Runner) {
    r.case("f32/densenet classifier training step: cuda vs cpu", || {
        use roentgen::eval::densenet::DenseNetConfig;
        use roentgen::train::densenet::ClassifierPools;
        let config = DenseNetConfig::tiny();
        let mut rng = Rng(78);
        let pools = ClassifierPools::allocate(&mut roentgen::backend::cpu::CpuBackend::new(), &config, 3)?;
        let weights: std::collections::HashMap<String, Vec<f32>> = [&pools.params, &pools.buffers]
            .iter()
            .flat_map(|l| l.entries().to_vec())
            .map(|e| {
                let n = e.shape.numel();
                let v = if e.name.ends_with("running_var") {
                    rng.normal(n).iter().map(|x| 0.5 + x.abs()).collect()
                } else {
                    rng.scaled(n, 0.3)
                };
                (e.name, v)
            })
            .collect();
        let images = rng.normal(2 * 32 * 32);
        let targets = [Some(true), Some(false), None, Some(false), Some(true), Some(true)];
        let step = |mut b: Box<dyn Backend>| -> Result<Vec<(String, Vec<f32>)>> {
            let pools = ClassifierPools::allocate(b.as_mut(), &config, 3)?;
            pools.load_with(b.as_ref(), |name, _| Ok(weights[name].clone()))?;
            pools.zero_grads(b.as_ref())?;
            let mut arena = pools.training_arena(b.as_mut(), 2, 32, 32)?;
            let (logits, loss) = pools.forward_backward(b.as_ref(), &mut arena, [2, 32, 32], &images, &targets)?;
            let mut out = vec![("logits".to_string(), logits), ("loss".to_string(), vec![loss])];
            for l in [&pools.grad_table, &pools.buffers] {
                out.extend(pools.download(b.as_ref(), l)?.into_iter().map(|(n, _, v)| (n, v)));
            }
            Ok(out)
        };
        let want = step(Box::new(roentgen::backend::cpu::CpuBackend::new()))?;
        let got = step(Box::new(CudaBackend::new(0, Precision::F32)?))?;
        let mut worst = (0f32, String::new());
        for ((name, g), (_, w)) in got.iter().zip(&want) {
            let scale = w.iter().fold(1f32, |m, x| m.max(x.abs()));
            let err = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            ensure!(err <= F32_PARITY * scale, "{name}: max |cuda − cpu| {err:.2e} > {:.1e}", F32_PARITY * scale);
            if err / scale > worst.0 {
                worst = (err / scale, name.clone());
            }
        }
        Ok(format!("{} tensors; largest error {:.1e} ({})", got.len(), worst.0, worst.1))
    });
}

/// pytorch-fid's InceptionV3 with seeded weights on the CUDA backend in f32 at its smallest input
/// (75×75), against the CPU backend: the rectangular kernels (im2col), the padding-excluding and
/// max pools, the four- and six-way concatenations.
pub fn inception_case(r: &mut Runner) {
    r.case("f32/inception features: cuda vs cpu", || {
        use roentgen::eval::inception::{expected_tensors, InceptionV3, DIMS, MIN_SIZE};
        use roentgen::eval::net::Pixels;
        use roentgen::eval::tensors::{MapSource, Weights};
        let mut rng = Rng(75);
        let tensors = expected_tensors()
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let fan_in = shape[1..].iter().product::<usize>().max(1) as f32;
                let v: Vec<f32> = match name.rsplit('.').next() {
                    Some("running_var") => rng.normal(n).iter().map(|x| 0.5 + x.abs()).collect(),
                    Some("weight") if shape.len() == 4 => rng.scaled(n, 1.5 / fan_in.sqrt()),
                    _ => rng.scaled(n, 0.3),
                };
                (name, (shape, v))
            })
            .collect();
        let src = MapSource { label: "seeded inception".into(), tensors };
        let side = MIN_SIZE;
        let image = Pixels::new(side, side, 3, rng.scaled(side * side * 3, 0.6));
        let features = |backend: Box<dyn Backend>| -> Result<Vec<f32>> {
            let mut net = InceptionV3::load(backend, &Weights { src: &src, network: "inception" })?;
            Ok(net.forward(std::slice::from_ref(&image))?.concat())
        };
        features_agree(&features, DIMS)
    });
}

/// An evaluation network's `len` features from the CPU backend and from the CUDA backend in f32,
/// compared at the f32 parity bar (the CPU's not constant).
fn features_agree(features: &dyn Fn(Box<dyn Backend>) -> Result<Vec<f32>>, len: usize) -> Result<String> {
    let want = features(Box::new(roentgen::backend::cpu::CpuBackend::new()))?;
    let got = features(Box::new(CudaBackend::new(0, Precision::F32)?))?;
    ensure!(got.len() == len && want.len() == len, "{} features, cpu {}, expected {len}", got.len(), want.len());
    ensure!(want.iter().any(|v| *v != want[0]), "the CPU's features are constant");
    let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
    let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    ensure!(err <= F32_PARITY * scale, "max |cuda − cpu| {err:.2e} > {:.1e}", F32_PARITY * scale);
    Ok(format!("max abs {err:.1e} of {len} features (scale {scale:.2})"))
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

/// The fused resnet epilogues (time embedding after conv1, shortcut after conv2) on the device:
/// every output bit equals the separate layers', in f32 and bf16, at every conv version.
pub fn resnet_fusion_case(r: &mut Runner) {
    use roentgen::backend::cuda::versions::KernelFamily;
    for (precision, tag) in [(Precision::F32, "f32"), (Precision::Bf16, "bf16")] {
        r.case(
            &format!("{tag}/resnet epilogue fusion equals the separate layers to the bit, every conv version"),
            || {
                let mut report = Vec::new();
                for &(v, _) in KernelFamily::Conv.versions() {
                    let mut gpu = CudaBackend::new(0, precision)?;
                    gpu.set_kernel_version(KernelFamily::Conv, v)?;
                    let (resnets, differ) = resnet_fusion_mismatches(&mut gpu)?;
                    ensure!(differ == 0, "conv={v}: {differ} values differ over {resnets} resnets");
                    report.push(format!("conv={v}: {resnets} resnets"));
                }
                Ok(report.join(", "))
            },
        );
    }
}
