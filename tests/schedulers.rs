//! The schedulers against diffusers 0.42.1, step by step (fixtures: tests/fixtures/schedulers/,
//! written by tests/fixtures/generate_schedulers.py), and their refusal of unsupported configs.
//!
//! Each fixture is a diffusers run from seeded latents with a synthetic, non-constant model output
//! `0.9 · scale_model_input(sample_k) + randn_k` (randn_k from a second seeded generator, redrawn
//! here bit-exactly). Two replays:
//! - teacher-forced: each step gets diffusers' own sample_k, so its error is that step's alone;
//! - free-running: our own samples all the way, as the pipeline runs.
//!
//! Both must meet the f32 parity bar at every step.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use roentgen::rng::torch::{NormalVariant, TorchGenerator};
use roentgen::sample::schedulers::{self, Scheduler, SchedulerKind, SchedulerOptions};
use serde_json::{json, Value};

struct Fixture {
    path: PathBuf,
    meta: HashMap<String, String>,
    f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    f64s: HashMap<String, Vec<f64>>,
}

fn load(path: &Path) -> Fixture {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (mut f32s, mut f64s) = (HashMap::new(), HashMap::new());
    for (name, t) in st.tensors() {
        match t.dtype() {
            safetensors::Dtype::F32 => {
                let v = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                f32s.insert(name, (t.shape().to_vec(), v));
            }
            safetensors::Dtype::F64 => {
                let v = t.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect();
                f64s.insert(name, v);
            }
            d => panic!("{}: {name}: unexpected dtype {d:?}", path.display()),
        }
    }
    Fixture { path: path.to_path_buf(), meta, f32s, f64s }
}

fn scheduler_fixtures() -> Vec<PathBuf> {
    let dir = common::fixture("schedulers");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors") && !p.ends_with("train_schedules.safetensors"))
        .collect();
    v.sort();
    v
}

/// max |a − b| / max(1, max |b|).
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
    got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

/// The synthetic model output of the fixture generator.
/// One step's sample against diffusers' (failing with the per-element report beyond the parity
/// tolerance); returns the relative error.
fn check_step(what: &str, got: &[f32], want: &[f32]) -> f32 {
    let err = rel_err(got, want);
    if err > common::F32_PARITY {
        common::assert_close(what, got, want, common::F32_PARITY);
    }
    err
}

fn model_output(s: &Scheduler, sample: &[f32], k: usize, noise_gen: &mut TorchGenerator) -> Vec<f32> {
    let mut scaled = sample.to_vec();
    s.scale_model_input(&mut scaled, k);
    let noise = noise_gen.randn(sample.len());
    scaled.iter().zip(&noise).map(|(&x, &n)| 0.9f32 * x + n).collect()
}

/// Replays one fixture; returns (kind, max relative error teacher-forced, free-running).
fn replay(fx: &Fixture) -> (SchedulerKind, f32, f32) {
    let name = fx.path.file_stem().unwrap().to_string_lossy().to_string();
    let config: Value = serde_json::from_str(&fx.meta["config"]).unwrap();
    let kind: SchedulerKind = fx.meta["kind"].parse().unwrap();
    assert_eq!(kind.class_name(), fx.meta["class"]);
    let steps: usize = fx.meta["steps"].parse().unwrap();
    let latents_seed: u64 = fx.meta["latents_seed"].parse().unwrap();
    let noise_seed: u64 = fx.meta["noise_seed"].parse().unwrap();
    let variant = match fx.meta["capability"].as_str() {
        "DEFAULT" => NormalVariant::Default,
        _ => NormalVariant::Avx2,
    };
    let make = || {
        let mut s = schedulers::from_config(Some(kind), &config, &fx.path, &SchedulerOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        s.set_timesteps(steps).unwrap();
        s
    };

    let mut s = make();
    let want_t = &fx.f64s["timesteps"];
    if s.timesteps() != &want_t[..] {
        // Euler with Karras sigmas has fractional timesteps recovered through logs of the sigma
        // table; diffusers takes those logs with numpy's float32 SIMD log (and its sigma table
        // comes from torch's float32 sqrt), which are not correctly rounded, so a few timesteps
        // differ in the last digits. Everything else is exact.
        assert_eq!(s.timesteps().len(), want_t.len(), "{name}: timesteps");
        let fractional = kind == SchedulerKind::Euler && config["use_karras_sigmas"] == Value::Bool(true);
        let max = s.timesteps().iter().zip(want_t).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        println!("{name}: timesteps differ by up to {max:.2e}");
        assert!(fractional && max <= 1e-4, "{name}: timesteps {:?}, diffusers {want_t:?}", s.timesteps());
    }
    let want_sigma = fx.f32s["init_noise_sigma"].1[0];
    let got_sigma = s.init_noise_sigma();
    assert!(
        (got_sigma - want_sigma).abs() <= 1e-6 * want_sigma.abs().max(1.0),
        "{name}: init_noise_sigma {got_sigma} vs {want_sigma}"
    );
    if let Some((_, want)) = fx.f32s.get("sigmas") {
        common::assert_close(&format!("{name}: sigmas"), s.sigmas(), want, 1e-6);
    } else {
        assert!(s.sigmas().is_empty());
    }

    let (shape, x0) = &fx.f32s["x0"];
    let n: usize = shape.iter().product();
    let (_, samples) = &fx.f32s["samples"];
    let calls = want_t.len();
    assert_eq!(samples.len(), calls * n, "{name}: samples");

    // The initial latents, as diffusers' prepare_latents makes them: bit-exact given diffusers'
    // init_noise_sigma (ours can differ from it in the last bit: torch's float32 sqrt, used for
    // `sqrt(σ_max² + 1)`, is not correctly rounded).
    let mut gen = TorchGenerator::with_variant(latents_seed, variant);
    let ours_x0: Vec<f32> = gen.randn(n).iter().map(|&x| x * want_sigma).collect();
    let exact = ours_x0.iter().zip(x0).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
    assert_eq!(exact, n, "{name}: initial latents differ from torch's");

    // Teacher-forced.
    let mut noise_gen = TorchGenerator::with_variant(noise_seed, variant);
    let mut max_tf = 0f32;
    for k in 0..calls {
        let sample = if k == 0 { &x0[..] } else { &samples[(k - 1) * n..k * n] };
        let mo = model_output(&s, sample, k, &mut noise_gen);
        let got = s.step(&mo, k, sample, &mut gen).unwrap_or_else(|e| panic!("{name}: step {k}: {e:#}"));
        let want = &samples[k * n..(k + 1) * n];
        max_tf = max_tf.max(check_step(&format!("{name}: step {k} (t = {}), teacher-forced", want_t[k]), &got, want));
    }

    // Free-running, with fresh generators.
    let mut s = make();
    let mut gen = TorchGenerator::with_variant(latents_seed, variant);
    let mut noise_gen = TorchGenerator::with_variant(noise_seed, variant);
    let mut x: Vec<f32> = gen.randn(n).iter().map(|&v| v * s.init_noise_sigma()).collect();
    let mut max_fr = 0f32;
    for k in 0..calls {
        let mo = model_output(&s, &x, k, &mut noise_gen);
        x = s.step(&mo, k, &x, &mut gen).unwrap();
        let want = &samples[k * n..(k + 1) * n];
        max_fr = max_fr.max(check_step(&format!("{name}: step {k} (t = {}), free-running", want_t[k]), &x, want));
    }
    // The last step must still be a meaningful comparison.
    common::assert_close(&format!("{name}: final sample"), &x, &samples[(calls - 1) * n..], common::F32_PARITY);
    println!("{name:28} {calls:3} calls: max rel. error teacher-forced {max_tf:.2e}, free-running {max_fr:.2e}");
    (kind, max_tf, max_fr)
}

#[test]
fn schedulers_match_diffusers_step_by_step() {
    let files = scheduler_fixtures();
    assert!(files.len() >= 20, "expected the scheduler fixtures, found {}", files.len());
    let mut per_kind: BTreeMap<&str, (usize, f32, f32)> = BTreeMap::new();
    for f in &files {
        let (kind, tf, fr) = replay(&load(f));
        let e = per_kind.entry(kind.cli_name()).or_default();
        e.0 += 1;
        e.1 = e.1.max(tf);
        e.2 = e.2.max(fr);
    }
    println!("\nper scheduler, max |ours - diffusers| / max(1, max |diffusers|) over all steps:");
    for (kind, (configs, tf, fr)) in &per_kind {
        println!("  {kind:8} {configs} configs: teacher-forced {tf:.2e}, free-running {fr:.2e}");
    }
    assert_eq!(per_kind.len(), 5, "every scheduler has fixtures");
}

#[test]
fn training_alphas_cumprod_match_torch() {
    let fx = load(&common::fixture("schedulers/train_schedules.safetensors"));
    for name in ["sd14", "linear", "squaredcos_cap_v2", "sd14_zero_snr"] {
        let config: Value = serde_json::from_str(&fx.meta[name]).unwrap();
        let ours = schedulers::training_alphas_cumprod(&config, &fx.path).unwrap();
        let want = &fx.f32s[name].1;
        let exact = ours.iter().zip(want).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
        println!("alphas_cumprod {name}: {exact} of {} bit-exact", want.len());
        common::assert_close(&format!("alphas_cumprod {name}"), &ours, want, 1e-6);
    }
}

#[test]
fn kinds_parse_from_cli_and_class_names() {
    for k in SchedulerKind::ALL {
        assert_eq!(k.cli_name().parse::<SchedulerKind>().unwrap(), k);
        assert_eq!(k.class_name().parse::<SchedulerKind>().unwrap(), k);
    }
    assert_eq!("Euler_A".parse::<SchedulerKind>().unwrap(), SchedulerKind::EulerAncestral);
    let e = "lms".parse::<SchedulerKind>().unwrap_err().to_string();
    assert!(e.contains("lms") && e.contains("dpm++2m"), "{e}");
}

#[test]
fn sd14_config_loads_for_every_scheduler() {
    for k in SchedulerKind::ALL {
        let mut s = schedulers::load(&common::sd14_config(), Some(k), &SchedulerOptions::default()).unwrap();
        s.set_timesteps(50).unwrap();
        assert!(s.timesteps().len() >= 50, "{k}");
    }
    // No kind: the config's _class_name (PNDMScheduler), with SD's skip_prk_steps: 51 calls for 50 steps.
    let mut s = schedulers::load(&common::sd14_config(), None, &SchedulerOptions::default()).unwrap();
    assert_eq!(s.kind(), SchedulerKind::Pndm);
    s.set_timesteps(50).unwrap();
    assert_eq!(s.timesteps().len(), 51);
    assert_eq!(&s.timesteps()[..3], &[981.0, 961.0, 961.0]);
}

fn sd14() -> Value {
    let p = common::sd14_config().join("scheduler").join("scheduler_config.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn build(kind: Option<SchedulerKind>, patch: Value, opts: &SchedulerOptions) -> anyhow::Result<Scheduler> {
    let mut c = sd14();
    for (k, v) in patch.as_object().unwrap() {
        c[k] = v.clone();
    }
    schedulers::from_config(kind, &c, Path::new("scheduler/scheduler_config.json"), opts)
}

/// The error (with its causes) that `build` with default options gives for `patch` on `kind`;
/// panics if the config is accepted.
fn refusal(kind: SchedulerKind, patch: &Value) -> String {
    let err = match build(Some(kind), patch.clone(), &SchedulerOptions::default()) {
        Ok(_) => panic!("{kind}: {patch} was accepted"),
        Err(e) => format!("{e:#}"),
    };
    println!("{kind} {patch}: {err}");
    err
}

#[test]
fn unsupported_config_values_are_errors_naming_the_field() {
    use SchedulerKind::*;
    let none = SchedulerOptions::default();
    let cases: Vec<(SchedulerKind, Value, &str, &str)> = vec![
        (Pndm, json!({"beta_schedule": "cosine"}), "beta_schedule", "cosine"),
        (Ddim, json!({"trained_betas": [0.1, 0.2]}), "trained_betas", "0.1"),
        (DpmSolverMultistep, json!({"algorithm_type": "sde-dpmsolver++"}), "algorithm_type", "sde-dpmsolver++"),
        (DpmSolverMultistep, json!({"algorithm_type": "dpmsolver"}), "algorithm_type", "dpmsolver"),
        (DpmSolverMultistep, json!({"solver_order": 4}), "solver_order", "4"),
        (DpmSolverMultistep, json!({"solver_type": "rk4"}), "solver_type", "rk4"),
        (DpmSolverMultistep, json!({"variance_type": "learned_range"}), "variance_type", "learned_range"),
        (DpmSolverMultistep, json!({"use_lu_lambdas": true}), "use_lu_lambdas", "true"),
        (Pndm, json!({"prediction_type": "sample"}), "prediction_type", "sample"),
        (EulerAncestral, json!({"prediction_type": "sample"}), "prediction_type", "sample"),
        (Euler, json!({"timestep_spacing": "quadratic"}), "timestep_spacing", "quadratic"),
        (Euler, json!({"interpolation_type": "log_linear"}), "interpolation_type", "log_linear"),
        (Euler, json!({"timestep_type": "continuous"}), "timestep_type", "continuous"),
        (Euler, json!({"final_sigmas_type": "one"}), "final_sigmas_type", "one"),
        (Ddim, json!({"thresholding": true}), "thresholding", "true"),
        (Ddim, json!({"num_train_timesteps": "1000"}), "num_train_timesteps", "\"1000\""),
        (Ddim, json!({"num_train_timesteps": 0}), "num_train_timesteps", "0"),
        (Euler, json!({"num_train_timesteps": 12.5}), "num_train_timesteps", "12.5"),
        (Pndm, json!({"beta_start": "small"}), "beta_start", "small"),
        (Pndm, json!({"skip_prk_steps": "yes"}), "skip_prk_steps", "yes"),
        (Euler, json!({"use_karras_sigmas": 1}), "use_karras_sigmas", "1"),
        (Pndm, json!({"steps_offset": 0.5}), "steps_offset", "0.5"),
        (Ddim, json!({"beta_start": 2.0, "beta_end": 3.0}), "beta_start", "2"),
    ];
    for (kind, patch, field, value) in cases {
        let err = refusal(kind, &patch);
        assert!(
            err.contains(field) && err.contains(value),
            "{kind} {patch}: error {err:?} does not name {field} and {value}"
        );
        assert!(err.contains("scheduler_config.json"), "{err}");
    }

    // Karras sigmas asked of a scheduler that has none.
    let opts = SchedulerOptions { karras_sigmas: Some(true), ..Default::default() };
    let err = build(Some(EulerAncestral), json!({}), &opts).err().expect("karras for euler-a").to_string();
    assert!(err.contains("use_karras_sigmas"), "{err}");
    assert!(build(Some(DpmSolverMultistep), json!({}), &opts).is_ok());

    // Class name problems.
    let err = build(None, json!({"_class_name": "LMSDiscreteScheduler"}), &none).err().unwrap();
    let err = format!("{err:#}");
    assert!(err.contains("_class_name") && err.contains("LMSDiscreteScheduler"), "{err}");
    let mut c = sd14();
    c.as_object_mut().unwrap().remove("_class_name");
    let err = schedulers::from_config(None, &c, Path::new("x.json"), &none).err().unwrap().to_string();
    assert!(err.contains("_class_name"), "{err}");
    let err =
        schedulers::from_config(Some(Ddim), &json!([1, 2]), Path::new("x.json"), &none).err().unwrap().to_string();
    assert!(err.contains("JSON object"), "{err}");
    let err = schedulers::load(Path::new("/nonexistent/folder"), None, &none).err().unwrap().to_string();
    assert!(err.contains("scheduler_config.json"), "{err}");
}

#[test]
fn bad_calls_are_errors_not_panics() {
    let none = SchedulerOptions::default();
    let mut g = TorchGenerator::new(0);
    for kind in SchedulerKind::ALL {
        let mut s = build(Some(kind), json!({}), &none).unwrap();
        assert!(s.step(&[0.0; 4], 0, &[0.0; 4], &mut g).is_err(), "{kind}: step before set_timesteps");
        assert!(s.set_timesteps(0).is_err(), "{kind}: 0 steps");
        assert!(s.set_timesteps(1001).is_err(), "{kind}: more steps than training timesteps");
        s.set_timesteps(10).unwrap();
        let n = s.timesteps().len();
        assert!(s.step(&[0.0; 4], 0, &[0.0; 5], &mut g).is_err(), "{kind}: length mismatch");
        assert!(s.step(&[0.0; 4], n, &[0.0; 4], &mut g).is_err(), "{kind}: step past the end");
    }
    // Multistep schedulers refuse steps out of order.
    for kind in [SchedulerKind::Pndm, SchedulerKind::DpmSolverMultistep] {
        let mut s = build(Some(kind), json!({}), &none).unwrap();
        s.set_timesteps(10).unwrap();
        assert!(s.step(&[0.5; 4], 1, &[0.5; 4], &mut g).is_err(), "{kind}: out of order");
    }
    // A steps_offset that pushes timesteps past the last training timestep (diffusers raises
    // IndexError): an error naming the timestep.
    for kind in [SchedulerKind::Pndm, SchedulerKind::Ddim] {
        let mut s = build(Some(kind), json!({"steps_offset": 100}), &none).unwrap();
        s.set_timesteps(10).unwrap();
        let err = s.step(&[0.1; 4], 0, &[0.5; 4], &mut g).expect_err("timestep 1000 is out of range").to_string();
        assert!(err.contains("timestep 1000"), "{kind}: {err}");
    }
}

/// Every scheduler, spacing and a range of step counts (down to 1, up to the training length) runs
/// to the end without a panic, and its final sample is finite where diffusers' would be.
#[test]
fn any_step_count_runs_to_the_end() {
    let none = SchedulerOptions::default();
    let mut g = TorchGenerator::new(3);
    let mut runs = 0;
    for kind in SchedulerKind::ALL {
        for spacing in ["leading", "trailing", "linspace"] {
            for karras in [false, true] {
                if karras && !matches!(kind, SchedulerKind::Euler | SchedulerKind::DpmSolverMultistep) {
                    continue;
                }
                for prk in [true, false] {
                    if !prk && kind != SchedulerKind::Pndm {
                        continue;
                    }
                    for n in [1, 2, 3, 4, 5, 7, 16, 999, 1000] {
                        let patch =
                            json!({"timestep_spacing": spacing, "use_karras_sigmas": karras, "skip_prk_steps": prk});
                        let mut s = build(Some(kind), patch, &none).unwrap();
                        s.set_timesteps(n).unwrap();
                        let mut x = g.randn(16);
                        let sigma = s.init_noise_sigma();
                        x.iter_mut().for_each(|v| *v *= sigma);
                        for k in 0..s.timesteps().len() {
                            let mut inp = x.clone();
                            s.scale_model_input(&mut inp, k);
                            let mo: Vec<f32> = inp.iter().map(|v| 0.5 * v).collect();
                            match s.step(&mo, k, &x, &mut g) {
                                Ok(v) => x = v,
                                // Schedules diffusers itself cannot run (a timestep past the table).
                                Err(e) => {
                                    assert!(e.to_string().contains("outside"), "{kind} {spacing} n={n}: {e}");
                                    break;
                                }
                            }
                        }
                        runs += 1;
                    }
                }
            }
        }
    }
    println!("{runs} schedules run");
}

/// Every size read from a scheduler config is bounded before anything is allocated from it: a
/// `num_train_timesteps` of 2^31..2^63 used to size the training tables directly (gigabytes, or an
/// abort on allocation). Each is an error naming the file, the field and the value; the bounds
/// themselves still load.
#[test]
fn sizes_in_configs_are_bounded_before_allocation() {
    use SchedulerKind::*;
    let none = SchedulerOptions::default();
    // (The small out-of-range values come first: on a build without the bounds they fail the test
    // before the huge ones could try to allocate.)
    let cases: Vec<(SchedulerKind, Value, &str, &str)> = vec![
        (Ddim, json!({"num_train_timesteps": 100_001}), "num_train_timesteps", "100001"),
        (Pndm, json!({"steps_offset": -1}), "steps_offset", "-1"),
        (Euler, json!({"steps_offset": 1001}), "steps_offset", "1001"),
        (DpmSolverMultistep, json!({"steps_offset": 1u64 << 40}), "steps_offset", "1099511627776"),
        (Pndm, json!({"num_train_timesteps": -5}), "num_train_timesteps", "-5"),
        (Euler, json!({"num_train_timesteps": 1}), "num_train_timesteps", "1"),
        (Ddim, json!({"num_train_timesteps": i64::MAX}), "num_train_timesteps", "9223372036854775807"),
        (EulerAncestral, json!({"num_train_timesteps": 1u64 << 63}), "num_train_timesteps", "9223372036854775808"),
        (Ddim, json!({"num_train_timesteps": u64::MAX}), "num_train_timesteps", "18446744073709551615"),
        (Pndm, json!({"num_train_timesteps": 1e30}), "num_train_timesteps", "1e+30"),
        (DpmSolverMultistep, json!({"solver_order": 1u64 << 40}), "solver_order", "1099511627776"),
        (Ddim, json!({"_use_default_values": "clip_sample"}), "_use_default_values", "clip_sample"),
        (Ddim, json!({"num_train_timesteps": 1u64 << 31}), "num_train_timesteps", "2147483648"),
        (Euler, json!({"num_train_timesteps": 1u64 << 32}), "num_train_timesteps", "4294967296"),
    ];
    for (kind, patch, field, value) in cases {
        let err = refusal(kind, &patch);
        assert!(
            err.contains(field) && err.contains(value) && err.contains("scheduler_config.json"),
            "{kind} {patch}: error {err:?} does not name the file, {field} and {value}"
        );
    }
    // Training reads the same table (roentgen train's add_noise).
    let mut c = sd14();
    c["num_train_timesteps"] = json!(1u64 << 33);
    let err = schedulers::training_alphas_cumprod(&c, Path::new("pipe/scheduler/scheduler_config.json"))
        .expect_err("2^33 training timesteps");
    assert!(format!("{err:#}").contains("num_train_timesteps"), "{err:#}");

    // The bounds themselves are fine, and so are steps counts up to them.
    for (n, offset) in [(2, 0), (2, 2), (100_000, 100_000)] {
        for kind in SchedulerKind::ALL {
            let mut s = build(Some(kind), json!({"num_train_timesteps": n, "steps_offset": offset}), &none)
                .unwrap_or_else(|e| panic!("{kind} n={n}: {e:#}"));
            s.set_timesteps(n.min(50)).unwrap();
            assert!(s.set_timesteps(n + 1).is_err(), "{kind}: {} steps of {n}", n + 1);
        }
    }
}
