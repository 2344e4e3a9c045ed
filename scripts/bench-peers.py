#!/usr/bin/env python3
"""Side by side on the same machine (issues 9 and 19): diffusers/PyTorch and roentgen on SD v1.4's
real architecture with random weights (the configs of --model; no download).

Stages (--stages):
  unet          one guided U-Net step (batch 2 × prompts, 77 tokens), at every --batch;
  vae-decode    the VAE decoder at the image size;
  text-encoder  the CLIP text encoder (batch 2 × prompts);
  train-step    one joint U-Net + text-encoder training step (MSE on the noise, AdamW, gradient norm
                clipped at 1 as `roentgen train` does), at --train-batch; PyTorch autocasts to bf16
                with --precision bf16;
  sample        the whole `roentgen sample` command against diffusers' StableDiffusionPipeline
                (from_pretrained, then the call), load included (--sample-model: a pipeline with weights).

Every measurement is a fresh process per engine (so each has its own peak resident memory), and the
engines alternate: --rounds rounds of [PyTorch, roentgen] for each stage, batch and thread count;
each round times --iters calls after --warmup. The table gives the median over every timed call of
every round, the spread (min–max), the peak RSS, and PyTorch's median ÷ roentgen's (above 1:
roentgen is faster).

    python3 scripts/bench-peers.py --binary target/release/roentgen --device cpu --precision f32 \\
        --model ../shared/reference-configs/sd-v1-4 --threads 2 --height 256 --width 256 \\
        --stages unet,vae-decode,text-encoder,train-step --batch 1,2,4 --train-batch 1 --rounds 3
    python3 scripts/bench-peers.py ... --stages unet,text-encoder --threads 1,2     # thread scaling
    python3 scripts/bench-peers.py ... --stages sample --sample-model DIR --height 256 --width 256
    python3 scripts/bench-peers.py --binary gpu-bin/roentgen --device cuda           # the GPU machine

Needs torch, diffusers and transformers (on the GPU machine diffusers travels as a wheel: see the
device tool's README). Writes --json-out if given.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["unet", "vae-decode", "text-encoder", "train-step", "sample"]
PROMPT = "Small right pleural effusion."


def ints(s):
    return [int(x) for x in str(s).split(",") if x]


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True, help="the roentgen binary (built with --features cuda for --device cuda)")
    ap.add_argument("--model", default=str(ROOT / "weights" / "sd-v1-4-config"), help="pipeline folder with the configs")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", default="1", help="prompts per sampling call, a comma list for the unet stage (guidance doubles it)")
    ap.add_argument("--train-batch", type=int, default=8, help="images per training step")
    ap.add_argument("--iters", type=int, default=3, help="timed calls per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first, per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating [PyTorch, roentgen] rounds per measurement")
    ap.add_argument("--stages", default="unet,vae-decode,text-encoder,train-step",
                    help="comma-separated subset of " + ", ".join(STAGES))
    ap.add_argument("--sample-model", help="for the sample stage: a pipeline folder with weights (diffusers layout)")
    ap.add_argument("--sample-steps", type=int, default=20, help="sample stage: denoising steps (PNDM, guidance 4)")
    ap.add_argument("--threads", default="", help="CPU threads for both engines, a comma list (default: every core)")
    ap.add_argument("--json-out", help="write the results here as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one PyTorch measurement in this process
    ap.add_argument("--worker-batch", type=int, default=1, help=argparse.SUPPRESS)
    return ap.parse_args()


def run_child(cmd):
    """Runs cmd; returns (return code, stdout, stderr, peak RSS in bytes, wall seconds). The child's own
    peak RSS comes from wait4's rusage (Linux reports ru_maxrss in KiB)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return p.returncode, out.read().decode(), err.read().decode(), ru.ru_maxrss * 1024, wall


# ---------------------------------------------------------------------------------------------
# PyTorch, one measurement per process (`--worker STAGE`).

def worker(a):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    threads = ints(a.threads)
    if threads:
        torch.set_num_threads(threads[0])
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    model = Path(a.model)
    torch.manual_seed(0)
    stage, batch = a.worker, a.worker_batch
    lh, lw = a.height // 8, a.width // 8
    n = 2 * batch

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        for _ in range(a.warmup):
            fn()
        sync()
        times = []
        for _ in range(a.iters):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    if stage == "sample":
        from diffusers import StableDiffusionPipeline
        t0 = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(a.sample_model, safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False,
                                                       torch_dtype=torch.float32).to(a.device)
        load_s = time.perf_counter() - t0
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            pipe(PROMPT, num_inference_steps=a.sample_steps, guidance_scale=4.0, height=a.height, width=a.width,
                 generator=torch.Generator().manual_seed(0))
        return {"times_ms": [(time.perf_counter() - t0) * 1e3], "load_s": load_s}
    if stage in ("unet", "train-step"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model / "unet"))
    if stage in ("text-encoder", "train-step"):
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(model / "text_encoder"))
    with torch.no_grad():
        if stage == "unet":
            u = unet.to(dev, dtype).to(memory_format=torch.channels_last).eval()
            x = torch.randn(n, 4, lh, lw, device=dev, dtype=dtype).to(memory_format=torch.channels_last)
            t = torch.full((n,), 500, device=dev)
            ctx = torch.randn(n, 77, u.config.cross_attention_dim, device=dev, dtype=dtype)
            return {"times_ms": timed(lambda: u(x, t, encoder_hidden_states=ctx).sample)}
        if stage == "vae-decode":
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(model / "vae"))
            v = vae.to(dev, dtype).to(memory_format=torch.channels_last).eval()
            z = torch.randn(batch, 4, lh, lw, device=dev, dtype=dtype)
            return {"times_ms": timed(lambda: v.decode(z).sample)}
        if stage == "text-encoder":
            te = text.to(dev, dtype).eval()
            ids = torch.randint(0, text.config.vocab_size, (n, 77), device=dev)
            return {"times_ms": timed(lambda: te(ids).last_hidden_state)}
    # train-step: f32 master weights (bf16 autocast with --precision bf16), fused AdamW where available.
    unet = unet.to(dev).to(memory_format=torch.channels_last).train()
    text = text.to(dev).train()
    params = list(unet.parameters()) + list(text.parameters())
    try:
        opt = torch.optim.AdamW(params, lr=5e-5, fused=dev.type == "cuda")
    except (TypeError, RuntimeError):
        opt = torch.optim.AdamW(params, lr=5e-5)
    b = a.train_batch
    lat = torch.randn(b, 4, lh, lw, device=dev).to(memory_format=torch.channels_last)
    noise = torch.randn_like(lat)
    tids = torch.randint(0, text.config.vocab_size, (b, 77), device=dev)
    tt = torch.randint(0, 1000, (b,), device=dev)

    def train_step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            enc = text(tids).last_hidden_state
            pred = unet(lat + noise, tt, encoder_hidden_states=enc).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"times_ms": timed(train_step)}


# ---------------------------------------------------------------------------------------------
# The driver: alternating fresh processes.

def pytorch_round(a, stage, batch, threads):
    cmd = [sys.executable, __file__, "--worker", stage, "--worker-batch", str(batch), "--binary", a.binary,
           "--model", a.model, "--device", a.device, "--precision", a.precision, "--height", str(a.height),
           "--width", str(a.width), "--train-batch", str(a.train_batch), "--iters", str(a.iters),
           "--warmup", str(a.warmup), "--sample-steps", str(a.sample_steps)]
    if a.sample_model:
        cmd += ["--sample-model", a.sample_model]
    if threads:
        cmd += ["--threads", str(threads)]
    rc, out, err, rss, _ = run_child(cmd)
    if rc != 0:
        return {"error": err.strip()[-800:]}
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_bytes": rss}


def roentgen_round(a, stage, batch, threads):
    g = ["--threads", str(threads)] if threads else []
    if stage == "sample":
        with tempfile.TemporaryDirectory() as out:
            cmd = [a.binary, *g, "--device", a.device, "sample", "--model", a.sample_model, "--prompt", PROMPT,
                   "--steps", str(a.sample_steps), "--guidance", "4", "--height", str(a.height), "--width",
                   str(a.width), "--seed", "0", "--out", out, "--json"]
            rc, stdout, err, rss, wall = run_child(cmd)
        if rc != 0:
            return {"error": err.strip()[-800:]}
        return {"times_ms": [wall * 1e3], "peak_rss_bytes": rss, **json.loads(stdout)["timings"]}
    cmd = [a.binary, *g, "--device", a.device, "--precision", a.precision, "bench", stage, "--model", a.model,
           "--random-weights", "--height", str(a.height), "--width", str(a.width),
           "--batch", str(a.train_batch if stage == "train-step" else batch),
           "--iters", str(a.iters), "--warmup", str(a.warmup), "--json"]
    rc, stdout, err, rss, _ = run_child(cmd)
    if rc != 0:
        return {"error": err.strip()[-800:]}
    r = json.loads(stdout)
    return {"times_ms": r["times_ms"], "peak_rss_bytes": rss, "gflop_per_call": r["gflop_per_call"]}


def summary(rounds):
    errors = [r["error"] for r in rounds if "error" in r]
    if errors:
        return {"error": errors[0]}
    times = [t for r in rounds for t in r["times_ms"]]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "calls": len(times), "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rounds)}


def fmt(s):
    if "error" in s:
        return f"{'error':>28}"
    return f"{s['median_ms']:>10.0f} ({s['min_ms']:.0f}–{s['max_ms']:.0f}) {s['peak_rss_bytes'] / 2**30:>5.1f}G"


def main():
    a = parse()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    stages = a.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        sys.exit(f"bench-peers: --stages: unknown stage(s) {', '.join(sorted(unknown))}")
    if "sample" in stages and not a.sample_model:
        sys.exit("bench-peers: the sample stage needs --sample-model (a pipeline folder with weights)")
    if a.rounds < 1 or a.iters < 1 or a.warmup < 0:
        sys.exit("bench-peers: --rounds and --iters must be at least 1, --warmup at least 0")
    try:
        import torch
    except ImportError as e:
        sys.exit(f"bench-peers: {e}: needs torch, diffusers and transformers")
    cpu = ""
    if a.device == "cpu" and Path("/proc/cpuinfo").exists():
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    card = torch.cuda.get_device_name() if a.device == "cuda" else f"cpu ({cpu}, {os.cpu_count()} logical cores)"
    results = {"device": a.device, "card": card, "precision": a.precision, "height": a.height, "width": a.width,
               "torch": torch.__version__, "rounds": a.rounds, "iters": a.iters, "warmup": a.warmup,
               "date": time.strftime("%Y-%m-%d"), "measurements": []}
    print(f"{card}, {a.precision}, {a.height}×{a.width}; torch {torch.__version__}; {a.rounds} alternating rounds × "
          f"{a.iters} calls after {a.warmup} warm-up, fresh processes")
    print(f"{'stage':<13} {'batch':>5} {'thr':>3}  {'PyTorch ms median (spread) RSS':>30}  "
          f"{'roentgen ms median (spread) RSS':>31}  {'speed-up':>8}")
    for stage in stages:
        batches = ints(a.batch) if stage == "unet" else [a.train_batch] if stage == "train-step" else ints(a.batch)[:1]
        for batch in batches:
            for threads in ints(a.threads) or [0]:
                pt, ro = [], []
                for _ in range(a.rounds):
                    pt.append(pytorch_round(a, stage, batch, threads))
                    ro.append(roentgen_round(a, stage, batch, threads))
                ps, rs = summary(pt), summary(ro)
                m = {"stage": stage, "batch": batch, "threads": threads or os.cpu_count(), "pytorch": ps,
                     "roentgen": rs, "pytorch_rounds": pt, "roentgen_rounds": ro}
                ratio = ps["median_ms"] / rs["median_ms"] if "error" not in ps and "error" not in rs else None
                m["speedup"] = ratio
                results["measurements"].append(m)
                line = f"{stage:<13} {batch:>5} {m['threads']:>3}  {fmt(ps):>30}  {fmt(rs):>31}  "
                line += f"{ratio:>7.2f}×" if ratio else ""
                print(line, flush=True)
                for who, s in (("PyTorch", ps), ("roentgen", rs)):
                    if "error" in s:
                        print(f"  {who}: {s['error'].splitlines()[-1] if s['error'] else 'failed'}")
                if stage == "sample" and ratio:
                    print(f"  load: PyTorch {[round(r['load_s'], 2) for r in pt]} s (from_pretrained), "
                          f"roentgen {[round(r['load_s'], 2) for r in ro]} s")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
