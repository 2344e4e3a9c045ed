//! bf16 activations (issue 18): the operations that take activations stored in bf16, on bf16
//! tensors, against the CPU reference run on the same values. Each activation input is rounded to
//! bf16 first, so both backends start from identical numbers; CUDA computes in f32 as it does for
//! f32 tensors and rounds each output once. So every element must lie within one bf16 rounding of
//! the CPU's f32 result: |got − want| ≤ 2⁻⁸·|want| (a bf16 ulp is 2⁻⁷ relative at most; round to
//! nearest is within half of it, and the f32 paths' own last-bit differences add far less) plus
//! the f32 suite's tolerance for those differences.

use super::common::F32_PARITY;
use super::harness::*;
use anyhow::{ensure, Result};
use roentgen::backend::cpu::CpuBackend;
use roentgen::backend::cuda::versions::KernelFamily;
use roentgen::backend::cuda::CudaBackend;
use roentgen::backend::{Activation, Backend, ElementwiseOps};
use roentgen::ops::elementwise::{BiasRowsParams, ConcatParams, GegluParams, UpsampleParams};
use roentgen::tensor::{DType, Tensor};

/// bf16 rounding of `x`, nearest even (the device's `__float2bfloat16_rn`).
fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// What an input of a case is: an activation (a bf16 tensor on CUDA), a parameter (f32 tensors
/// whose values are bf16 numbers: what a product beside bf16 activations reads is their bf16 copy,
/// so both backends then use the same values), or an f32 tensor (statistics, a bias row added in
/// f32).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Act,
    Param,
    F32,
}
use Kind::{Act, Param, F32};

/// Places `inputs` in one new pool of `b`: those marked in `bf16` as bf16 tensors, the others f32,
/// each starting at a 16-byte boundary.
fn place_typed(b: &mut dyn Backend, inputs: &[Vec<f32>], bf16: &[bool]) -> Result<Vec<Tensor>> {
    let slots = |v: &Vec<f32>| v.len().max(1).div_ceil(4) * 4; // f32 slots, 16-byte aligned
    let pool = b.alloc(inputs.iter().map(slots).sum(), "bf16 activations test")?;
    let (mut at, mut ts) = (0, Vec::new());
    for (v, &half) in inputs.iter().zip(bf16) {
        let t = Tensor::new(pool, at, [v.len().max(1)].into());
        let t = if half { Tensor { dtype: DType::BF16, offset: 2 * at, ..t } } else { t };
        if !v.is_empty() {
            b.upload(&t, v)?;
        }
        at += slots(v);
        ts.push(t);
    }
    Ok(ts)
}

/// Runs `op` on the CPU (every tensor f32, the bf16 ones' values rounded to bf16) and on `gpu`
/// (those tensors bf16), and checks outputs `outs` element by element as the module says.
/// `setup` says how (see `Setup`).
fn compare_bf16(
    gpu: &mut CudaBackend,
    inputs: &[Vec<f32>],
    kinds: &[Kind],
    outs: &[usize],
    op: Op,
    setup: &Setup,
) -> Result<String> {
    let rounded: Vec<Vec<f32>> = inputs
        .iter()
        .zip(kinds)
        .map(|(v, &k)| if k == F32 { v.clone() } else { v.iter().map(|&x| bf16(x)).collect() })
        .collect();
    let bf16_in: Vec<bool> = kinds.iter().map(|&k| k == Act).collect();
    let mut cpu = CpuBackend::new();
    let tc = place_typed(&mut cpu, &rounded, &vec![false; inputs.len()])?;
    op(&cpu, &tc)?;
    let tg = place_typed(gpu, &rounded, &bf16_in)?;
    if setup.params_pool {
        gpu.mark_params(tg[0].pool)?;
    }
    op(gpu, &tg)?;
    gpu.synchronize()?;
    let mut report = Vec::new();
    for &i in outs {
        let (want, got) = (cpu.download(&tc[i])?, gpu.download(&tg[i])?);
        if let Some(bar) = setup.rel_l2 {
            let num: f64 = got.iter().zip(&want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().max(1e-30);
            let rel = (num / den).sqrt();
            ensure!(rel <= bar, "output {i}: relative L2 error {rel:.3e} > {bar:.0e}");
            report.push(format!("out{i} relL2 {rel:.1e}"));
            continue;
        }
        let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
        let mut worst = 0f32; // the largest |got − want| as a fraction of its element's bound
        for (k, (&a, &b)) in got.iter().zip(&want).enumerate() {
            let allowed = if bf16_in[i] { b.abs() / 256.0 } else { 0.0 } + F32_PARITY * scale;
            ensure!(
                (a - b).abs() <= allowed,
                "output {i} ({}): element {k}: cuda {a}, cpu {b} (allowed {allowed:.2e})",
                if bf16_in[i] { "bf16" } else { "f32" }
            );
            worst = worst.max((a - b).abs() / allowed);
        }
        report.push(format!("out{i} worst {worst:.2} of the bound"));
    }
    Ok(report.join(", "))
}

/// A bf16 tensor receives uploaded values rounded to nearest even and gives them back widened
/// exactly; an operation given activations of two types refuses, naming both.
pub fn bf16_storage_case(r: &mut Runner, gpu: &mut CudaBackend) {
    r.case("bf16 activations/upload rounds to nearest even, download widens, mixed types refused", || {
        // 1 + 2⁻⁸ is halfway between bf16 1 and 1 + 2⁻⁷: the tie goes to the even 1; 1 + 3·2⁻⁸
        // is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: to the even 1 + 2⁻⁶; 1 + 2⁻⁸ + 2⁻¹⁶ is past
        // the tie: up. The values after them need no rounding.
        let e = |k: i32| 2f32.powi(k);
        let sent = [1.0 + e(-8), 1.0 + 3.0 * e(-8), 1.0 + e(-8) + e(-16), -3.5, 1e-3, 65280.0];
        let want = [1.0, 1.0 + e(-6), 1.0 + e(-7), -3.5, bf16(1e-3), 65280.0];
        let t = place_typed(gpu, &[sent.to_vec(), vec![0.0; 6]], &[true, false])?;
        let got = gpu.download(&t[0])?;
        ensure!(got == want, "bf16 upload/download: {got:?}, expected {want:?}");
        ensure!(want[4] != 1e-3, "1e-3 is not a bf16 value, so the rounding is seen");
        let err = match gpu.add_forward(&t[1], &t[0], &t[0], 6) {
            Ok(()) => anyhow::bail!("an add of f32 out and bf16 inputs ran"),
            Err(e) => format!("{e:#}"),
        };
        ensure!(err.contains("add: a is bf16 but out is f32"), "refusal does not name the tensors: {err}");
        Ok(format!("rounded {got:?}; refused: {err}"))
    });
}

/// How a case runs besides its inputs: the group norm version; whether the GPU's pool is declared
/// a parameter pool (`Backend::mark_params`: a product then reads its parameters from the pool's
/// bf16 copy rather than from a copy made per call); and, for an operation whose bf16 kernels round
/// intermediate values too (attention's probabilities), a relative L2 bar instead of the
/// element-wise bound of one rounding.
struct Setup {
    group_norm: u32,
    params_pool: bool,
    rel_l2: Option<f64>,
}

/// Every operation written for bf16 activations, at shapes with tails (sizes not multiples of 2, 8
/// or 32), each group norm version with one and several chunks per group.
pub fn bf16_activation_cases(r: &mut Runner, gpu: &mut CudaBackend) {
    let mut rng = Rng(0xBF16);
    // Each case runs with `setup`: the group norm version (set for the case, then back to 1) and
    // whether the GPU's pool is a parameter pool.
    let mut g = |name: String, inputs: Vec<Vec<f32>>, kinds: Vec<Kind>, outs: &[usize], setup: Setup, op: Op| {
        r.case(&format!("bf16 activations/{name}"), || {
            gpu.set_kernel_version(KernelFamily::GroupNorm, setup.group_norm)?;
            let out = compare_bf16(gpu, &inputs, &kinds, outs, op, &setup);
            gpu.set_kernel_version(KernelFamily::GroupNorm, 1)?;
            out
        });
    };
    const PLAIN: Setup = Setup { group_norm: 1, params_pool: false, rel_l2: None };
    let n = 1027;
    for act in [Activation::QuickGelu, Activation::Gelu, Activation::GeluTanh, Activation::Silu] {
        let ins = vec![rng.normal(n), rng.scaled(n, 3.0)];
        g(format!("activation_forward {act:?} n{n}"), ins, vec![Act, Act], &[0], PLAIN, &move |b, t| {
            b.activation_forward(&t[0], &t[1], act, n)
        });
    }
    g(
        "add_forward n1027".into(),
        vec![rng.normal(n), rng.normal(n), rng.normal(n)],
        vec![Act; 3],
        &[0],
        PLAIN,
        &|b, t| b.add_forward(&t[0], &t[1], &t[2], 1027),
    );
    g("accumulate n1027".into(), vec![rng.normal(n), rng.normal(n)], vec![Act; 2], &[0], PLAIN, &|b, t| {
        b.accumulate(&t[0], &t[1], 1027)
    });
    g("zero n1027".into(), vec![rng.normal(n)], vec![Act], &[0], PLAIN, &|b, t| b.zero(&t[0]));
    let bias_rows = BiasRowsParams { batch: 2, rows: 37, channels: 13 };
    let ins = vec![rng.normal(2 * 37 * 13), rng.normal(2 * 37 * 13), rng.normal(2 * 13)];
    // The bias (a time embedding's projection) stays f32 beside bf16 activations.
    g("add_bias_rows_forward 2x37x13".into(), ins, vec![Act, Act, F32], &[0], PLAIN, &move |b, t| {
        b.add_bias_rows_forward(&bias_rows, &t[0], &t[1], &t[2])
    });
    let concat = ConcatParams { rows: 45, a_channels: 7, b_channels: 12 };
    let ins = vec![rng.normal(45 * 19), rng.normal(45 * 7), rng.normal(45 * 12)];
    g("concat_channels_forward 45x(7+12)".into(), ins, vec![Act; 3], &[0], PLAIN, &move |b, t| {
        b.concat_channels_forward(&concat, &t[0], &t[1], &t[2])
    });
    let geglu = GegluParams { rows: 33, inner: 21 };
    let ins = vec![rng.normal(33 * 21), rng.scaled(33 * 42, 2.0)];
    g("geglu_forward 33x21".into(), ins, vec![Act; 2], &[0], PLAIN, &move |b, t| b.geglu_forward(&geglu, &t[0], &t[1]));
    let up = UpsampleParams { batch: 2, in_h: 5, in_w: 3, out_h: 10, out_w: 6, channels: 7 };
    let ins = vec![rng.normal(2 * 10 * 6 * 7), rng.normal(2 * 5 * 3 * 7)];
    g("upsample_nearest_forward 5x3->10x6x7".into(), ins, vec![Act; 2], &[0], PLAIN, &move |b, t| {
        b.upsample_nearest_forward(&up, &t[0], &t[1])
    });
    // Linear layers: bf16 weights and biases (the parameter pool's copy, or one made per call)
    // and bf16 activations in and out, accumulated in f32. At 7×5→3 the bias in the pool's copy
    // lies 8 bytes past a 16-byte boundary, so cuBLASLt's bias epilogue cannot take it: the
    // cuBLAS path with the bias-fill kernel runs.
    for dims @ (rows, i, o) in [(7, 5, 3), (130, 33, 65), (77, 768, 320)] {
        let w = rng.scaled(o * i, 1.0 / (i as f32).sqrt());
        for (bias, params_pool) in [(false, false), (true, false), (true, true)] {
            let mut ins = vec![rng.normal(rows * o), rng.normal(rows * i), w.clone()];
            let mut kinds = vec![Act, Act, Param];
            if bias {
                ins.push(rng.normal(o));
                kinds.push(Param);
            }
            let from = if params_pool { "the pool's bf16 copy" } else { "a bf16 copy per call" };
            let name = format!("linear_forward {rows}x{i}->{o} bias={bias}, weights from {from}");
            let setup = Setup { params_pool, ..PLAIN };
            g(name, ins, kinds, &[0], setup, &move |b, t| linear_forward(b, dims, t));
        }
    }
    for dims @ (rows, i, o) in [(7, 5, 3), (130, 33, 65)] {
        for bias in [false, true] {
            let w = rng.scaled(o * i, 1.0 / (i as f32).sqrt());
            let ins = vec![rng.normal(rows * o), rng.normal(rows * i), w, rng.normal(o), rng.normal(rows * o)];
            g(
                format!("linear_forward {rows}x{i}->{o} bias={bias} + residual"),
                ins,
                vec![Act, Act, Param, Param, Act],
                &[0],
                PLAIN,
                &move |b, t| linear_forward_residual(b, dims, t, bias),
            );
        }
    }
    let dims @ (rows, i, o) = (130, 33, 65);
    let ins = vec![rng.normal(3 * rows * o), rng.normal(rows * i), rng.scaled(3 * o * i, 0.2)];
    g(format!("linear_group_forward 3x({rows}x{i}->{o})"), ins, vec![Act, Act, Param], &[0], PLAIN, &move |b, t| {
        linear_group_forward(b, dims, 3, t)
    });
    // Convolution with every epilogue term (bias, the per-sample bias, a residual), and attention:
    // through the bf16 bridge. Attention rounds its probabilities to bf16 before P·V (as with f32
    // activations), more than one rounding of the output: the bf16 suite's relative L2 bar.
    let p = conv2d((2, 9, 8, 8, 12, 3, 1, [1, 1, 1, 1]));
    let (mut ins, _) = conv2d_inputs(&mut rng, &p);
    ins.extend([rng.normal(2 * 12), rng.normal(p.out_rows() * 12)]);
    let kinds = vec![Act, Act, Param, Param, Act, Act];
    g("conv2d_forward 2x9x8x8->12 3x3 + bias, batch bias, residual".into(), ins, kinds, &[0], PLAIN, &move |b, t| {
        conv2d_forward(b, p, t)
    });
    let a = attn((2, 37, 29, 2, 40, 40f32.powf(-0.5), false));
    let (q, kv) = (2 * 37 * 80, 2 * 29 * 80);
    let ins = vec![rng.normal(q), rng.normal(2 * 37 * 2), rng.normal(q), rng.normal(kv), rng.normal(kv)];
    let setup = Setup { rel_l2: Some(2e-2), ..PLAIN };
    g(
        "attention_forward 2x37x29, 2 heads of 40".into(),
        ins,
        vec![Act, F32, Act, Act, Act],
        &[0, 1],
        setup,
        &move |b, t| attention_forward(b, a, [&t[0], &t[1], &t[2], &t[3], &t[4]], None),
    );
    // Layer norm: out and inp bf16, the statistics and the affine parameters f32; a mean far from
    // zero so the two-pass statistics matter.
    let (rows, cols) = (19, 77);
    let x: Vec<f32> = rng.normal(rows * cols).into_iter().map(|v| v * 2.0 + 3.0).collect();
    let ins = vec![rng.normal(rows * cols), rng.normal(rows), rng.normal(rows), x, rng.normal(cols), rng.normal(cols)];
    let types = vec![Act, F32, F32, Act, F32, F32];
    g(format!("layer_norm_forward {rows}x{cols}"), ins, types, &[0, 1, 2], PLAIN, &move |b, t| {
        layer_norm_forward(b, rows, cols, t)
    });
    // Group norm, every version, with groups of one chunk (15·5 and 256·20 elements, ≤ 8192) and
    // of two (1024·16).
    for (n, hw, c, groups, silu) in [(2, 15, 20, 4, true), (2, 256, 40, 2, false), (1, 1024, 64, 4, true)] {
        let x: Vec<f32> = rng.normal(n * hw * c).into_iter().map(|v| v * 1.5 - 0.3).collect();
        let ins = vec![
            rng.normal(n * hw * c),
            rng.normal(n * groups),
            rng.normal(n * groups),
            x,
            rng.normal(c),
            rng.normal(c),
        ];
        for &(v, _) in KernelFamily::GroupNorm.versions() {
            let p = group_norm(n, hw, c, groups, silu);
            let types = vec![Act, F32, F32, Act, F32, F32];
            let name = format!("group_norm_forward {n}x{hw}x{c}/{groups} silu={silu} (group_norm={v})");
            let setup = Setup { group_norm: v, ..PLAIN };
            g(name, ins.clone(), types, &[0, 1, 2], setup, &move |b, t| group_norm_forward(b, p, t));
        }
    }
}
