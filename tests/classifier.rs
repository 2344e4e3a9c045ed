//! The classifier of the paper's Table 5 (issue 16) against PyTorch (fixtures by
//! tests/fixtures/generate_classifier_ops.py):
//! - its operations against PyTorch's CPU kernels: batch norm in training mode (the batch's
//!   statistics, the running update with momentum 0.1 and the unbiased variance, the output with
//!   and without ReLU, the backward) and pooling's backward (DenseNet's max 3/2/1 with tied values,
//!   its 2×2 average, the global average, a padded average both ways); the CUDA kernels of the same
//!   operations are checked against these CPU references by tests/cuda.rs;
//! - whole training steps of a tiny DenseNet and of DenseNet-121 against torchvision's
//!   `loss.backward()`, and the eval-mode forward;
//! - the cyclic learning rate against torch's CyclicLR;
//! - `roentgen train-classifier` end to end on phantoms: it learns, resumes exactly, and refuses
//!   what it must.

mod common;

use common::*;
use roentgen::backend::cpu::CpuBackend;
use roentgen::backend::{Backend, NormOps, PoolOps};
use roentgen::ops::norm::{BatchNormBackward, BatchNormForward, BatchNormParams, BatchNormStats, BatchNormTrainParams};
use roentgen::ops::pool::{Pool2dParams, PoolMode};
use roentgen::ops::Window2d;
use roentgen::tensor::{Shape, Tensor};
use serde_json::Value;

fn cases() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("classifier-ops/cases.json")).unwrap()).unwrap()
}

fn get(name: &str) -> Vec<f32> {
    read_f32(&fixture("classifier-ops/ops.safetensors"), name).1
}

fn put(b: &mut CpuBackend, data: &[f32]) -> Tensor {
    let pool = b.alloc(data.len().max(1), "t").unwrap();
    let t = Tensor::new(pool, 0, Shape::new(&[data.len()]));
    b.upload(&t, data).unwrap();
    t
}

fn shape(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

#[test]
fn batch_norm_training_matches_pytorch() {
    for case in cases()["batch_norm"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let [n, c, h, w] = shape(&case["shape"])[..] else { panic!() };
        let relu = case["relu"].as_bool().unwrap();
        let g = |t: &str| get(&format!("bn_{name}_{t}"));
        let mut b = CpuBackend::new();
        let rows = n * h * w;
        let p = BatchNormTrainParams { rows, channels: c, eps: 1e-5, momentum: 0.1, relu };
        let (x, weight, bias) = (put(&mut b, &g("x")), put(&mut b, &g("weight")), put(&mut b, &g("bias")));
        let (rm, rv) = (put(&mut b, &g("rm0")), put(&mut b, &g("rv0")));
        let zeros = |b: &mut CpuBackend, k: usize| put(b, &vec![0.0; k]);
        let (mean, rstd, scale, shift) = (zeros(&mut b, c), zeros(&mut b, c), zeros(&mut b, c), zeros(&mut b, c));
        let stats = BatchNormStats {
            inp: &x,
            weight: &weight,
            bias: &bias,
            running_mean: &rm,
            running_var: &rv,
            mean: &mean,
            rstd: &rstd,
            scale: &scale,
            shift: &shift,
        };
        b.batch_norm_stats(&p, &stats).unwrap();
        let y = zeros(&mut b, rows * c);
        let fwd = BatchNormForward { out: &y, inp: &x, scale: &scale, shift: &shift };
        b.batch_norm_forward(&BatchNormParams { rows, channels: c, relu }, &fwd).unwrap();
        let down = |t: &Tensor| b.download(t).unwrap();
        assert_close(&format!("{name}: batch mean"), &down(&mean), &g("mean"), 1e-6);
        assert_close(&format!("{name}: invstd"), &down(&rstd), &g("invstd"), 1e-6);
        assert_close(&format!("{name}: running mean"), &down(&rm), &g("rm1"), 1e-6);
        assert_close(&format!("{name}: running var (unbiased)"), &down(&rv), &g("rv1"), 1e-6);
        assert_close(&format!("{name}: output"), &down(&y), &g("y"), 1e-6);
        let (dx, dw, db, dy) = (zeros(&mut b, rows * c), zeros(&mut b, c), zeros(&mut b, c), put(&mut b, &g("dy")));
        let bwd = BatchNormBackward {
            dinp: &dx,
            dweight: &dw,
            dbias: &db,
            dout: &dy,
            inp: &x,
            out: &y,
            mean: &mean,
            rstd: &rstd,
            weight: &weight,
        };
        b.batch_norm_backward(&p, &bwd).unwrap();
        let down = |t: &Tensor| b.download(t).unwrap();
        assert_close(&format!("{name}: dx"), &down(&dx), &g("dx"), 1e-5);
        assert_close(&format!("{name}: dweight"), &down(&dw), &g("dweight"), 1e-5);
        assert_close(&format!("{name}: dbias"), &down(&db), &g("dbias"), 1e-5);
    }
}

#[test]
fn pooling_backward_matches_pytorch() {
    for case in cases()["pool"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let [n, c, h, w] = shape(&case["shape"])[..] else { panic!() };
        let (kernel, stride, pad, mode) = match name {
            "max3s2p1" => (3, 2, 1, PoolMode::Max),
            "avg2s2" => (2, 2, 0, PoolMode::Avg),
            "global" => (h, 1, 0, PoolMode::Avg),
            "avg3s2p1" => (3, 2, 1, PoolMode::Avg),
            "avg3s2p1_exclude" => (3, 2, 1, PoolMode::AvgExcludePad),
            other => panic!("unknown case {other}"),
        };
        let p = Pool2dParams {
            batch: n,
            channels: c,
            window: Window2d { h, w, kernel: [kernel, kernel], stride, pad: [pad; 4] },
            mode,
        };
        let g = |t: &str| get(&format!("pool_{name}_{t}"));
        let mut b = CpuBackend::new();
        let x = put(&mut b, &g("x"));
        let y = put(&mut b, &vec![0.0; p.out_elements()]);
        b.pool2d_forward(&p, &y, &x).unwrap();
        assert_close(&format!("{name}: forward"), &b.download(&y).unwrap(), &g("y"), 1e-6);
        // The gradient accumulates: start from a known value and subtract it after.
        let start: Vec<f32> = (0..p.in_elements()).map(|i| (i % 5) as f32 * 0.25).collect();
        let (dx, dy) = (put(&mut b, &start), put(&mut b, &g("dy")));
        b.pool2d_backward(&p, &dx, &dy, &x).unwrap();
        let got: Vec<f32> = b.download(&dx).unwrap().iter().zip(&start).map(|(d, s)| d - s).collect();
        assert_close(&format!("{name}: dx"), &got, &g("dx"), 1e-6);
    }
}

use roentgen::eval::densenet::DenseNetConfig;
use roentgen::tensor::Layout;
use roentgen::train::densenet::ClassifierPools;

/// A layout entry's tensor.
fn entry(l: &Layout, name: &str) -> Tensor {
    let e = l.find(name).unwrap_or_else(|| panic!("no tensor {name}"));
    Tensor::new(l.pool(), e.offset, e.shape)
}

/// One training step of `config` on the CPU from weights `weight(name)`: the logits, the loss,
/// and the pools (gradients and updated running statistics) to read.
fn train_step(
    b: &mut CpuBackend,
    config: &DenseNetConfig,
    outputs: usize,
    weight: &dyn Fn(&str, &[usize]) -> Vec<f32>,
    x: &[f32],
    targets: &[Option<bool>],
) -> (ClassifierPools, Vec<f32>, f32) {
    let pools = ClassifierPools::allocate(b, config, outputs).unwrap();
    pools.load_with(b, |name, shape| Ok(weight(name, shape))).unwrap();
    pools.zero_grads(b).unwrap();
    let batch = targets.len() / outputs;
    let side = ((x.len() / batch) as f64).sqrt() as usize;
    let mut arena = pools.training_arena(b, batch, side, side).unwrap();
    let (logits, loss) = pools.forward_backward(b, &mut arena, [batch, side, side], x, targets).unwrap();
    (pools, logits, loss)
}

/// Gradients are small, and a norm weight's gradient can cancel to far below its terms: the bar
/// is 1e-4 of the tensor's own largest value plus 1e-6 of the largest gradient in the network
/// (`global`), not 1e-4 absolute.
fn assert_grad(what: &str, got: &[f32], want: &[f32], global: f32) {
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(scale > 0.0, "{what}: the reference gradient is zero");
    assert_eq!(got.len(), want.len(), "{what}: length");
    let err = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let bar = 1e-4 * scale + 1e-6 * global;
    println!("{what}: max |ours - reference| = {err:.3e} (scale {scale:.3e}, bar {bar:.1e})");
    assert!(err <= bar, "{what}: max error {err:e} exceeds {bar:e}");
}

fn targets_of(v: &Value) -> Vec<Option<bool>> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|t| t.as_i64().unwrap()))
        .map(|t| (t >= 0).then_some(t == 1))
        .collect()
}

/// Every gradient and running statistic of one training step of a tiny DenseNet (growth 4,
/// blocks 2-2) against torchvision's `loss.backward()`.
#[test]
fn tiny_densenet_training_step_matches_pytorch() {
    let f = fixture("classifier-ops/tiny-densenet.safetensors");
    let meta = &cases()["tiny_densenet"];
    let config = DenseNetConfig::tiny();
    let targets = targets_of(&meta["targets"]);
    let mut b = CpuBackend::new();
    let weight = |name: &str, _: &[usize]| read_f32(&f, &format!("w.{name}")).1;
    let (pools, logits, loss) = train_step(&mut b, &config, 3, &weight, &read_f32(&f, "x").1, &targets);
    assert_close("tiny DenseNet logits", &logits, &read_f32(&f, "logits").1, F32_PARITY);
    // The eval-mode forward on the weights before the step.
    let mut b0 = CpuBackend::new();
    let fresh = ClassifierPools::allocate(&mut b0, &config, 3).unwrap();
    fresh.load_with(&b0, |name, _| Ok(read_f32(&f, &format!("w.{name}")).1)).unwrap();
    let mut arena = fresh.training_arena(&mut b0, 2, 32, 32).unwrap();
    let mut cx = roentgen::nn::Cx::new(&b0, &mut arena);
    let x = roentgen::nn::Fmap::alloc(cx.arena, 2, 32, 32, 1).unwrap();
    cx.b.upload(&x.t, &read_f32(&f, "x").1).unwrap();
    let eval = fresh.net.forward_eval(&mut cx, &x).unwrap();
    assert_close(
        "tiny DenseNet eval-mode logits",
        &b0.download(&eval).unwrap(),
        &read_f32(&f, "logits_eval").1,
        F32_PARITY,
    );
    let want_loss = read_f32(&f, "loss").1[0];
    assert!((loss - want_loss).abs() <= 1e-6 * want_loss.abs().max(1.0), "loss {loss} vs {want_loss}");
    let grads: Vec<(String, Vec<f32>, Vec<f32>)> = pools
        .grad_table
        .entries()
        .iter()
        .map(|e| {
            let got = b.download(&entry(&pools.grad_table, &e.name)).unwrap();
            (e.name.clone(), got, read_f32(&f, &format!("grad.{}", e.name)).1)
        })
        .collect();
    let global = grads.iter().flat_map(|(_, _, w)| w.iter()).fold(0f32, |m, x| m.max(x.abs()));
    for (name, got, want) in &grads {
        assert_grad(&format!("grad {name}"), got, want, global);
    }
    let checked = grads.len();
    for e in pools.buffers.entries() {
        let got = b.download(&entry(&pools.buffers, &e.name)).unwrap();
        assert_close(&format!("after step: {}", e.name), &got, &read_f32(&f, &format!("after.{}", e.name)).1, 1e-6);
    }
    // conv0, norm0 (2), 4 dense layers × (norm1 2, conv1, norm2 2, conv2), the transition (norm 2,
    // conv), norm5 (2), the classifier (2).
    assert_eq!(checked, 1 + 2 + 4 * 6 + 3 + 2 + 2, "parameters compared");
}

/// One training step of DenseNet-121 (18 outputs, 64×64 inputs, the shared generator's weights)
/// against torchvision: the logits and loss, and every parameter's gradient and running statistic
/// by its sum, L2 norm and 16 sampled values (the full tensors would be 28 MB of fixture).
///
/// The gradient bar is looser than ARCHITECTURE.md's 1e-4, for a reason that is not ours to fix:
/// among the 1.5 million batch-norm outputs of this step, some lie within rounding of 0, where the
/// ReLU after them decides whether a gradient passes; f32 results that differ in the last bits can
/// decide differently. In this fixture one does (denseblock3.denselayer22.norm1, channel 519:
/// −7.3e-7 in PyTorch), and its channel is denselayer9's output, so every gradient below that
/// layer differs by up to 1.2e-2 of its tensor's largest value (those above agree to 3e-5). A
/// wrong formula moves gradients by their own size, so 5e-2 of the tensor's largest sampled value
/// still fails it; the forward (logits, running statistics) keeps the 1e-4 bar, and the tiny
/// network above, with no such value, checks every gradient at the standard bar.
#[test]
fn densenet121_training_step_matches_pytorch() {
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("classifier-ops/densenet121-64px.json")).unwrap())
            .unwrap();
    let f32s = |v: &Value| -> Vec<f32> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect() };
    let config = DenseNetConfig::densenet121();
    let targets = targets_of(&doc["targets"]);
    let mut b = CpuBackend::new();
    let weight = |name: &str, shape: &[usize]| common::seeded::seeded_tensor(name, shape);
    let (pools, logits, loss) = train_step(&mut b, &config, 18, &weight, &f32s(&doc["x"]), &targets);
    assert_close("DenseNet-121 logits", &logits, &f32s(&doc["logits"]), F32_PARITY);
    let want_loss = doc["loss"].as_f64().unwrap();
    assert!((loss as f64 - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0), "loss {loss} vs {want_loss}");
    // (largest relative error seen, its tensor)
    let check = |kind: &str, l: &Layout, want: &serde_json::Map<String, Value>, rel: f64| {
        let mut worst = (0f64, String::new());
        for e in l.entries() {
            let w = &want[&e.name];
            let got = b.download(&entry(l, &e.name)).unwrap();
            let norm = got.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            let wn = w["norm"].as_f64().unwrap();
            let idx: Vec<usize> =
                w["indices"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as usize).collect();
            let want_sampled = f32s(&w["values"]);
            let scale =
                want_sampled.iter().fold(0f64, |m, &x| m.max(x.abs() as f64)).max(wn / (got.len() as f64).sqrt());
            let err = idx.iter().zip(&want_sampled).fold(0f64, |m, (&i, &b)| m.max((got[i] - b).abs() as f64));
            assert!((norm - wn).abs() <= rel * wn, "{kind} {}: L2 norm {norm} vs {wn}", e.name);
            assert!(err <= rel * scale, "{kind} {}: sampled values differ by {err:e} (scale {scale:e})", e.name);
            if err / scale > worst.0 {
                worst = (err / scale, e.name.clone());
            }
        }
        println!(
            "{kind}: {} tensors within {rel:e}; largest relative error {:.1e} ({})",
            l.entries().len(),
            worst.0,
            worst.1
        );
        l.entries().len()
    };
    let grads = check("gradients", &pools.grad_table, doc["grads"].as_object().unwrap(), 5e-2);
    let stats = check("running statistics", &pools.buffers, doc["after"].as_object().unwrap(), 1e-4);
    assert_eq!((grads, stats), (doc["grads"].as_object().unwrap().len(), doc["after"].as_object().unwrap().len()));
}

/// The classifier's cyclic learning rate against torch's CyclicLR (triangular), step by step.
#[test]
fn cyclic_learning_rate_matches_torch() {
    use roentgen::train::schedule::cyclic_triangular;
    for c in cases()["cyclic_lr"].as_array().unwrap() {
        let (base, max) = (c["base"].as_f64().unwrap(), c["max"].as_f64().unwrap());
        let up = c["step_size_up"].as_u64().unwrap() as usize;
        for (k, want) in c["lrs"].as_array().unwrap().iter().enumerate() {
            let (got, want) = (cyclic_triangular(k, base, max, up), want.as_f64().unwrap());
            assert!(
                (got - want).abs() <= 1e-15 * max,
                "step {k} (base {base}, max {max}, up {up}): {got} vs torch {want}"
            );
        }
    }
}

fn roentgen_json(args: &[&str]) -> Value {
    let (code, out, err) = run_cli(args, None);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn tensors(path: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect();
    v.sort();
    v
}

/// `train-classifier` on 160 phantoms (small DenseNet, 48 px): the loss falls; a run stopped after
/// 2 epochs and resumed to 3 ends with exactly the weights, moments and best checkpoint of an
/// uninterrupted 3-epoch run; a folder holding a run is not overwritten, and a resume with another
/// architecture setting is refused by name; the checkpoint names its labels.
#[test]
fn train_classifier_learns_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let ph = tmp.path().join("ph");
    let (code, _, err) =
        run_cli(&["phantom", "--out", ph.to_str().unwrap(), "--count", "160", "--size", "48", "--seed", "5"], None);
    assert_eq!(code, 0, "{err}");
    let manifest = ph.join("manifest.jsonl");
    let m = manifest.to_str().unwrap().to_string();
    let run = |out: &std::path::Path, epochs: &str, extra: &[&str]| {
        let o = out.to_str().unwrap().to_string();
        let mut args =
            vec!["train-classifier", "--manifest", &m, "--arch", "small", "--resolution", "48", "--batch", "16"];
        args.extend_from_slice(&["--epochs", epochs, "--output", &o, "--json"]);
        args.extend_from_slice(extra);
        roentgen_json(&args)
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let ra = run(&a, "3", &[]);
    assert_eq!(
        (ra["epochs"].as_u64(), ra["train_rows"].as_u64(), ra["val_rows"].as_u64()),
        (Some(3), Some(144), Some(16))
    );
    let log: Vec<Value> = std::fs::read_to_string(a.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let losses: Vec<f64> = log.iter().map(|l| l["train_loss"].as_f64().unwrap()).collect();
    println!(
        "train losses {losses:?}, validation AUROC {:?}",
        log.iter().map(|l| l["val_auroc"].clone()).collect::<Vec<_>>()
    );
    assert!(losses[2] < losses[0], "the training loss does not fall: {losses:?}");
    run(&b, "2", &[]);
    let (code, _, err) = run_cli(
        &[
            "train-classifier",
            "--manifest",
            &m,
            "--arch",
            "small",
            "--resolution",
            "48",
            "--epochs",
            "3",
            "--output",
            b.to_str().unwrap(),
        ],
        None,
    );
    assert_ne!(code, 0);
    assert!(err.contains("already holds a run") && err.contains("--resume"), "{err}");
    let (code, _, err) = run_cli(
        &[
            "train-classifier",
            "--manifest",
            &m,
            "--arch",
            "small",
            "--resolution",
            "64",
            "--batch",
            "16",
            "--epochs",
            "3",
            "--output",
            b.to_str().unwrap(),
            "--resume",
        ],
        None,
    );
    assert_ne!(code, 0);
    assert!(err.contains("resolution was 48") && err.contains("is 64"), "{err}");
    let rb = run(&b, "3", &["--resume"]);
    assert_eq!(rb["best_val_auroc"], ra["best_val_auroc"]);
    for name in ["last.safetensors", "best.safetensors"] {
        assert!(
            tensors(&a.join(name)) == tensors(&b.join(name)),
            "{name}: the resumed run differs from the uninterrupted one"
        );
    }
    let file = roentgen::io::safetensors::SafetensorsFile::open(&a.join("best.safetensors")).unwrap();
    let meta: std::collections::HashMap<String, String> = file.metadata().unwrap().into_iter().collect();
    assert_eq!(meta["labels"], r#"["no-finding","cardiomegaly","effusion","pneumothorax","consolidation"]"#);
    assert_eq!((meta["arch"].as_str(), meta["resolution"].as_str()), ("small", "48"));
    // eval classify reads the checkpoint (labels, architecture, size from its metadata): its
    // scores are the sigmoid of the trained network's eval-mode logits.
    let v = roentgen_json(&[
        "eval",
        "classify",
        "--manifest",
        &m,
        "--weights",
        a.join("best.safetensors").to_str().unwrap(),
        "--resamples",
        "20",
        "--json",
        "--per-image",
    ]);
    let names: Vec<&str> = v["classes"].as_array().unwrap().iter().map(|c| c["class"].as_str().unwrap()).collect();
    assert_eq!(names, ["no-finding", "cardiomegaly", "effusion", "pneumothorax", "consolidation"]);
    assert!(v["average"]["auroc"].as_f64().unwrap() > 0.5, "{}", v["average"]);
    let first = &v["per_image"][0];
    let img = roentgen::eval::features::load_image(std::path::Path::new(first["image"].as_str().unwrap())).unwrap();
    let x = roentgen::eval::densenet::paper_preprocess(
        &img.pixels,
        img.height,
        img.width,
        img.channels,
        roentgen::eval::densenet::Square::Pad,
        48,
    );
    let mut cpu = CpuBackend::new();
    let small = roentgen::train::classifier::Arch::Small.config();
    let pools = ClassifierPools::allocate(&mut cpu, &small, 5).unwrap();
    let file = roentgen::io::safetensors::SafetensorsFile::open(&a.join("best.safetensors")).unwrap();
    let src = roentgen::eval::tensors::FileSource::new(&file).unwrap();
    let w = roentgen::eval::tensors::Weights { src: &src, network: "best" };
    pools.load_with(&cpu, |name, shape| w.get(name, shape)).unwrap();
    let mut arena = pools.training_arena(&mut cpu, 1, 48, 48).unwrap();
    let mut cx = roentgen::nn::Cx::new(&cpu, &mut arena);
    let xs = roentgen::nn::Fmap::alloc(cx.arena, 1, 48, 48, 1).unwrap();
    cx.b.upload(&xs.t, &x.data).unwrap();
    let logits = cpu.download(&pools.net.forward_eval(&mut cx, &xs).unwrap()).unwrap();
    let want: Vec<f32> = logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
    let got: Vec<f32> = first["scores"].as_array().unwrap().iter().map(|s| s.as_f64().unwrap() as f32).collect();
    assert_close("eval classify scores vs the trained network's eval forward", &got, &want, 1e-5);
}
