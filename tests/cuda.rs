//! The CUDA backend against the CPU reference: every `Backend` operation, forward and backward, on
//! fresh random inputs at several shapes (SD v1's included), in both precisions; end-to-end sampling
//! and a training step on the small fixture pipelines; and that a warmed-up operation sequence
//! allocates nothing on the device.
//!
//! A custom harness (`harness = false`): each case prints ok / FAILED / SKIPPED with its error, so a
//! machine without a GPU (or a build without `--features cuda`) shows every case as skipped and why,
//! never as passed. Tolerances (ARCHITECTURE.md, kept with the others in tests/common):
//! f32 path max |cuda − cpu| ≤ 1e-4 · max(1, max |cpu|); bf16 path relative L2 ≤ 2e-2.

//!
//! Runs on a real GPU when a driver is present, else (built with `--features cuda-emu`) on the
//! emulated device (src/backend/cuda/emu.rs: the same Rust launches, the kernels run on the CPU).
//!
//! Usage: `cargo test --release --features cuda-emu --test cuda [-- FILTER] [-- --list]`. FILTER
//! keeps the cases whose name contains it; `--list` prints the case names and runs none (the GPU
//! check runs the suite part by part, in separate processes, from that list). The closing line
//! counts passed, failed, skipped (could not run here) and filtered-out cases. On the emulated
//! device the cases run in interleaved shards, one process per core (up to 4; ROENTGEN_CUDA_SHARDS=N
//! sets the count, 1 runs everything in this process; `--shard I/N` runs one shard alone).
//! ROENTGEN_REQUIRE_CUDA=1 fails the run when any case is skipped; ROENTGEN_CUDA_SKIP_E2E=1 skips
//! the end-to-end cases (quick runs while working on one kernel); ROENTGEN_CUDA_FUZZ=N adds N
//! random shapes per operation family and precision (ROENTGEN_CUDA_FUZZ_SEED varies them).

#[cfg(feature = "cuda")]
#[path = "cuda/activations.rs"]
mod activations;
mod common;
#[cfg(feature = "cuda")]
#[path = "cuda/fuzz.rs"]
mod fuzz;
#[cfg(feature = "cuda")]
#[path = "cuda/harness.rs"]
mod harness;
#[cfg(feature = "cuda")]
#[path = "cuda/ops.rs"]
mod ops;
#[cfg(feature = "cuda")]
#[path = "cuda/pipelines.rs"]
mod pipelines;
#[cfg(feature = "cuda")]
#[path = "cuda/versions.rs"]
mod versions;

/// A whole number from the environment; a malformed one ends the run with its name.
#[cfg(feature = "cuda")]
fn env_number(var: &str) -> Option<u64> {
    let v = std::env::var(var).ok()?;
    Some(v.trim().parse().unwrap_or_else(|_| panic!("{var}={v:?}: expected a whole number")))
}

fn required() -> bool {
    std::env::var_os("ROENTGEN_REQUIRE_CUDA").is_some_and(|v| !v.is_empty() && v != "0")
}

#[cfg(not(feature = "cuda"))]
fn main() {
    let why = "this test binary was built without --features cuda (or cuda-emu)";
    println!("running the CUDA parity suite: SKIPPED, every case ({why})");
    println!("test result: {}. 0 passed; 0 failed; all skipped ({why})", if required() { "FAILED" } else { "ok" });
    if required() {
        println!("ROENTGEN_REQUIRE_CUDA is set and every case was skipped");
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
fn main() {
    use harness::Runner;
    use roentgen::backend::cuda::{driver_present, emulate, CudaBackend};
    use roentgen::backend::{Backend, Precision};

    let args: Vec<String> = std::env::args().skip(1).collect();
    let list = args.iter().any(|a| a == "--list");
    let shard_arg = args.iter().position(|a| a == "--shard").map(|i| {
        let v = args.get(i + 1).unwrap_or_else(|| panic!("--shard needs I/N"));
        harness::Shard::parse(v).unwrap_or_else(|e| panic!("{e:#}"))
    });
    let filter = args
        .iter()
        .enumerate()
        .find(|(i, a)| !a.starts_with('-') && !(*i > 0 && args[i - 1] == "--shard"))
        .map(|(_, a)| a.clone());
    if !list {
        println!(
            "running the CUDA parity suite (CUDA vs the CPU reference){}",
            filter.as_ref().map(|f| format!(", cases containing '{f}'")).unwrap_or_default()
        );
    }
    let why = if !driver_present() && !emulate() {
        Some(
            "no CUDA driver (libcuda) on this machine, and this build has no emulated device (--features cuda-emu)"
                .to_string(),
        )
    } else {
        CudaBackend::new(0, Precision::F32).err().map(|e| format!("{e:#}"))
    };
    if let Some(why) = why {
        println!("SKIPPED, every case: {why}");
        println!("test result: {}. 0 passed; 0 failed; all skipped ({why})", if required() { "FAILED" } else { "ok" });
        if required() {
            println!("ROENTGEN_REQUIRE_CUDA is set and every case was skipped");
            std::process::exit(1);
        }
        return;
    }
    // The emulated device runs one kernel at a time on one core: the suite is split into
    // interleaved shards, each in a process of its own (this one runs shard 0), one per core up to
    // 4, or ROENTGEN_CUDA_SHARDS of them. On a GPU one process (the default there) owns the device.
    let shard = shard_arg.unwrap_or_else(|| {
        let count = env_number("ROENTGEN_CUDA_SHARDS").map(|n| n as usize).unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            if emulate() {
                cores.min(4)
            } else {
                1
            }
        });
        harness::Shard { index: 0, count: if list { 1 } else { count.max(1) } }
    });
    let children: Vec<_> = if shard_arg.is_none() {
        (1..shard.count).map(|i| start_shard(&args, i, shard.count)).collect()
    } else {
        Vec::new()
    };
    let mut r = Runner::new(filter, list, shard);
    let mut device = String::new();
    for (prec, tag, bf16) in [(Precision::F32, "f32", false), (Precision::Bf16, "bf16", true)] {
        let mut gpu = CudaBackend::new(0, prec).expect("CUDA backend");
        if device.is_empty() {
            device = gpu.name();
        }
        if !list {
            println!("device: {}", gpu.name());
        }
        ops::op_cases(&mut r, &mut gpu, bf16, tag);
        ops::wide_attention_chunk_cases(&mut r, &mut gpu, bf16, tag);
        ops::no_key_cases(&mut r, &mut gpu, tag);
        if !bf16 {
            versions::group_norm_backward_versions_agree_case(&mut r, &mut gpu);
        }
        if bf16 {
            activations::bf16_storage_case(&mut r, &mut gpu);
            activations::bf16_activation_cases(&mut r, &mut gpu);
            versions::conv_versions_agree_case(&mut r, &mut gpu);
            versions::attention_versions_agree_case(&mut r, &mut gpu);
        }
        if let Some(n) = env_number("ROENTGEN_CUDA_FUZZ") {
            fuzz::fuzz_cases(
                &mut r,
                &mut gpu,
                bf16,
                tag,
                n as usize,
                env_number("ROENTGEN_CUDA_FUZZ_SEED").unwrap_or(1000),
            );
        }
        if !bf16 {
            ops::allocation_case(&mut r, &mut gpu);
        }
    }
    if std::env::var_os("ROENTGEN_CUDA_SKIP_E2E").is_some() {
        r.skip_reason = Some("ROENTGEN_CUDA_SKIP_E2E is set".into());
    }
    pipelines::denoising_allocation_case(&mut r);
    pipelines::sampling_frees_case(&mut r);
    pipelines::graph_case(&mut r);
    pipelines::param_copy_case(&mut r);
    pipelines::bf16_activations_sample_case(&mut r);
    pipelines::newest_kernel_versions_case(&mut r);
    pipelines::resnet_fusion_case(&mut r);
    pipelines::autotune_case(&mut r);
    pipelines::train_step_memory_case(&mut r);
    pipelines::training_allocation_case(&mut r);
    pipelines::clip_tower_case(&mut r);
    pipelines::densenet_case(&mut r);
    pipelines::densenet_training_case(&mut r);
    pipelines::inception_case(&mut r);
    pipelines::end_to_end_cases(&mut r, "f32", 1e-4);
    // bf16 through a whole denoising loop / step: errors compound over ~20 layers and 6 steps, so
    // the end-to-end bar is 5e-2 relative L2 (per operation it is 2e-2).
    pipelines::end_to_end_cases(&mut r, "bf16", 5e-2);
    for (i, child) in children.into_iter().enumerate() {
        merge_shard(&mut r, i + 1, shard.count, child);
    }
    if list {
        return;
    }
    if shard_arg.is_some() {
        print!("{}", r.shard_report());
    }
    if r.finish(&device, required()) {
        std::process::exit(1);
    }
}

/// A shard's process, started with this one's arguments and `--shard I/N`, its output read by a
/// thread (so that a full pipe never stalls it) until it ends.
#[cfg(feature = "cuda")]
struct ShardProcess {
    child: std::process::Child,
    output: std::thread::JoinHandle<String>,
}

#[cfg(feature = "cuda")]
fn start_shard(args: &[String], index: usize, count: usize) -> ShardProcess {
    use std::io::Read;
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = std::process::Command::new(exe)
        .args(args)
        .args(["--shard", &format!("{index}/{count}")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting shard {index}/{count} of the suite: {e}"));
    let mut out = child.stdout.take().expect("piped stdout");
    let output = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    ShardProcess { child, output }
}

/// Waits for shard `index`'s process, prints its cases' lines and adds its counts to `r`; a
/// process that ended without its summary is a failure of the run, named with its exit status.
#[cfg(feature = "cuda")]
fn merge_shard(r: &mut harness::Runner, index: usize, count: usize, mut p: ShardProcess) {
    let status = p.child.wait().expect("waiting for a shard of the suite");
    let output = p.output.join().unwrap_or_default();
    println!("== shard {index}/{count} (a process of its own) ==");
    for line in output.lines().filter(|l| !l.starts_with('@')) {
        println!("{line}");
    }
    match harness::ShardReport::parse(&output) {
        Some(rep) => r.merge(&rep),
        None => r.failed.push(format!("shard {index}/{count}: its process ended ({status}) before its summary")),
    }
}
