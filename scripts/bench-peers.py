#!/usr/bin/env python3
"""Side by side on the same machine (issue 9): diffusers/PyTorch and roentgen on SD v1.4's real
architecture with random weights (configs from weights/sd-v1-4-config; no download).

Times, for PyTorch (channels-last, SDPA attention, bf16 weights or f32):
  - one guided U-Net step (batch 2 × --batch), the VAE decoder, the CLIP text encoder (batch 2 × --batch);
  - one training step of U-Net + text encoder jointly (cached latents, MSE on the noise, AdamW with f32
    master weights, bf16 autocast), at --train-batch;
then runs `roentgen bench` for the same stages and prints the ratios (PyTorch time / roentgen time:
above 1 means roentgen is faster). roentgen has no training benchmark yet: its row says so.

    python3 scripts/bench-peers.py --binary gpu-bin/roentgen --device cuda            # the GPU machine
    python3 scripts/bench-peers.py --binary target/release/roentgen --device cpu \\
        --height 64 --width 64 --iters 1 --warmup 0 --train-batch 1                  # a smoke run on a CPU
    python3 scripts/bench-peers.py --binary target/release/roentgen --device cpu --precision f32 \
        --stages unet --threads 2 --height 512 --width 512 --iters 3 --warmup 2      # one stage, 2 threads each
    python3 scripts/bench-peers.py ... --stages sample --sample-model DIR --height 256 --width 256
        # a whole sample, load included (DIR: a pipeline with weights, e.g. random ones saved by diffusers)

Needs torch, diffusers and transformers (on the GPU machine diffusers travels as a wheel: see the
device tool's README). Writes --json-out if given.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True, help="the roentgen binary (built with --features cuda for --device cuda)")
    ap.add_argument("--model", default=str(ROOT / "weights" / "sd-v1-4-config"), help="pipeline folder with the configs")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1, help="prompts per sampling call (guidance doubles it)")
    ap.add_argument("--train-batch", type=int, default=8, help="images per training step")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--stages", default="unet,vae-decode,text-encoder,train-step",
                    help="comma-separated subset of unet, vae-decode, text-encoder, train-step, sample")
    ap.add_argument("--sample-model", help="for the sample stage: a pipeline folder with weights (diffusers layout)")
    ap.add_argument("--sample-steps", type=int, default=20, help="sample stage: denoising steps (PNDM, guidance 4)")
    ap.add_argument("--threads", type=int, help="CPU threads for both engines (default: every core)")
    ap.add_argument("--json-out", help="write the results here as JSON")
    a = ap.parse_args()
    stages = a.stages.split(",")
    unknown = set(stages) - {"unet", "vae-decode", "text-encoder", "train-step", "sample"}
    if unknown:
        sys.exit(f"bench-peers: --stages: unknown stage(s) {', '.join(sorted(unknown))}")
    if "sample" in stages and not a.sample_model:
        sys.exit("bench-peers: the sample stage needs --sample-model (a pipeline folder with weights)")

    try:
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel
    except ImportError as e:
        sys.exit(f"bench-peers: {e}: needs torch, diffusers and transformers (carry diffusers as a wheel on the GPU machine)")

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    model = Path(a.model)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(model / "vae"))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(model / "text_encoder"))
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    lh, lw = a.height // f, a.width // f
    n = 2 * a.batch

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
        return min(times), sum(times) / len(times)

    results = {"device": a.device, "precision": a.precision, "height": a.height, "width": a.width,
               "batch": a.batch, "torch": torch.__version__,
               "card": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "pytorch": {}, "roentgen": {}}

    # Sampling stages, no autograd, bf16 weights (or f32), channels-last, SDPA (diffusers' default).
    with torch.no_grad():
        u = unet.to(dev, dtype).to(memory_format=torch.channels_last).eval()
        x = torch.randn(n, 4, lh, lw, device=dev, dtype=dtype).to(memory_format=torch.channels_last)
        t = torch.full((n,), 500, device=dev)
        ctx = torch.randn(n, 77, text.config.hidden_size, device=dev, dtype=dtype)
        if "unet" in stages:
            results["pytorch"]["unet"] = timed(lambda: u(x, t, encoder_hidden_states=ctx).sample)
        v = vae.to(dev, dtype).to(memory_format=torch.channels_last).eval()
        z = torch.randn(a.batch, 4, lh, lw, device=dev, dtype=dtype)
        if "vae-decode" in stages:
            results["pytorch"]["vae-decode"] = timed(lambda: v.decode(z).sample)
        te = text.to(dev, dtype).eval()
        ids = torch.randint(0, text.config.vocab_size, (n, 77), device=dev)
        if "text-encoder" in stages:
            results["pytorch"]["text-encoder"] = timed(lambda: te(ids).last_hidden_state)

    # Training: U-Net + text encoder, f32 master weights, bf16 autocast, fused AdamW where available.
    unet.float().train()
    text.float().train()
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
        opt.step()
        opt.zero_grad(set_to_none=True)

    if "train-step" in stages:
        ms = timed(train_step)
        results["pytorch"]["train-step"] = ms
        results["pytorch_train_images_per_s"] = b / (ms[0] / 1e3)

    # roentgen, same stages.
    for stage in [s for s in ["unet", "vae-decode", "text-encoder"] if s in stages]:
        cmd = [a.binary, "--device", a.device, "--precision", a.precision, "bench", stage, "--model", str(model),
               "--random-weights", "--height", str(a.height), "--width", str(a.width), "--batch", str(a.batch),
               "--iters", str(max(a.iters, 1)), "--warmup", str(a.warmup), "--json"]
        if a.threads:
            cmd[3:3] = ["--threads", str(a.threads)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            results["roentgen"][stage] = {"error": p.stderr.strip()[-500:]}
            continue
        r = json.loads(p.stdout)
        results["roentgen"][stage] = (r["min_ms"], r["mean_ms"])

    print(f"{results['card']}, {a.precision}, {a.height}×{a.width}, batch {a.batch}; torch {torch.__version__}")
    print(f"{'stage':<14} {'pytorch ms':>11} {'roentgen ms':>12} {'speed-up':>9}   (min over {a.iters} calls)")
    for stage in [s for s in ["unet", "vae-decode", "text-encoder"] if s in stages]:
        pt = results["pytorch"][stage][0]
        ro = results["roentgen"][stage]
        if isinstance(ro, dict):
            print(f"{stage:<14} {pt:>11.2f} {'error':>12}   {ro['error'].splitlines()[-1] if ro['error'] else ''}")
        else:
            print(f"{stage:<14} {pt:>11.2f} {ro[0]:>12.2f} {pt / ro[0]:>8.2f}×")
    if "train-step" in stages:
        print(f"{'train-step':<14} {results['pytorch']['train-step'][0]:>11.2f} {'not built':>12}   "
              f"(PyTorch: {results['pytorch_train_images_per_s']:.2f} images/s at batch {b}; roentgen has no training benchmark yet)")
    if "sample" in stages:
        sample_both(a, results)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(results, indent=2) + "\n")


def sample_both(a, results):
    """The whole of one sample, load included: `roentgen sample` as a command against diffusers'
    StableDiffusionPipeline (from_pretrained, then the call), same prompt, seed, steps, guidance 4,
    size, threads; one run each (a sample is long)."""
    import tempfile
    import torch
    from diffusers import StableDiffusionPipeline
    prompt = "Small right pleural effusion."
    with tempfile.TemporaryDirectory() as out:
        cmd = [a.binary, "--device", a.device, "sample", "--model", a.sample_model, "--prompt", prompt,
               "--steps", str(a.sample_steps), "--guidance", "4", "--height", str(a.height), "--width", str(a.width),
               "--seed", "0", "--out", out, "--json"]
        if a.threads:
            cmd[1:1] = ["--threads", str(a.threads)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        ro_s = time.perf_counter() - t0
    if p.returncode != 0:
        results["roentgen"]["sample"] = {"error": p.stderr.strip()[-500:]}
    else:
        results["roentgen"]["sample"] = {"total_s": ro_s, **json.loads(p.stdout)["timings"]}
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(a.sample_model, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False,
                                                   torch_dtype=torch.float32).to(a.device)
    load_s = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe(prompt, num_inference_steps=a.sample_steps, guidance_scale=4.0, height=a.height, width=a.width,
             generator=torch.Generator().manual_seed(0))
    results["pytorch"]["sample"] = {"total_s": time.perf_counter() - t0, "load_s": load_s}
    ro, pt = results["roentgen"]["sample"], results["pytorch"]["sample"]
    if "error" in ro:
        print(f"{'sample':<14} {pt['total_s'] * 1e3:>11.0f} {'error':>12}   {ro['error'].splitlines()[-1]}")
    else:
        print(f"{'sample':<14} {pt['total_s'] * 1e3:>11.0f} {ro['total_s'] * 1e3:>12.0f} {pt['total_s'] / ro['total_s']:>8.2f}×"
              f"   (whole command, {a.sample_steps} PNDM steps; load {pt['load_s']:.1f} s vs {ro['load_s']:.1f} s)")


if __name__ == "__main__":
    main()
