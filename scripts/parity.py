#!/usr/bin/env python3
"""The reference side of `roentgen parity`: runs the user's own diffusers/transformers on the model
and inputs roentgen gives, stage by stage, and writes every output to one safetensors file.

    python parity.py --model DIR|FILE [--config DIR] --inputs inputs.json --out ref.safetensors
                     [--device cpu|cuda] [--precision f32|bf16]

roentgen ships this file inside its binary and runs it itself; it is also readable on its own.
Stages (inputs.json: prompts, seed, height, width, steps, guidance, timesteps, schedulers):
  ids             the tokenizer's input_ids, padded to 77 (as diffusers' encode_prompt)
  embeds          the text encoder's last_hidden_state on those ids
  unet_t<T>       one U-Net call at timestep T on seeded latents (torch.randn with
                  Generator().manual_seed(seed), [1, C, h, w]) and the first prompt's embeds
  vae             the VAE decoder on the same latents / scaling_factor (raw output, before
                  postprocessing)
  sched_<name>    each scheduler from the pipeline's scheduler config: the final sample of a full
                  trajectory whose model output is 0.5·scaled input (no model involved), from
                  seeded latents × init_noise_sigma, with a generator of the same seed
  timesteps_<name> that scheduler's timesteps
  image           the whole pipeline from the seed: [N, 3, H, W] in [0, 1]
"""

import argparse
import inspect
import json
import sys
import warnings

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--config")
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="f32")
    a = ap.parse_args()

    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    inp = json.load(open(a.inputs))
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    # Always explicit: recent libraries otherwise keep each file's stored dtype (an f16 text encoder
    # stays f16). Older diffusers know the argument only as torch_dtype (newer ones warn about it).
    warnings.filterwarnings("ignore", category=FutureWarning)
    kw = {"torch_dtype": dtype}
    if a.config:
        pipe = StableDiffusionPipeline.from_single_file(a.model, config=a.config, local_files_only=True,
                                                        safety_checker=None, **kw)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, **kw)
    pipe = pipe.to(a.device)
    pipe.set_progress_bar_config(disable=True)
    dev = torch.device(a.device)
    out = {}
    seed = inp["seed"]
    with torch.no_grad():
        ids = pipe.tokenizer(inp["prompts"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        out["ids"] = ids.to(torch.int64)
        emb = pipe.text_encoder(ids.to(dev))[0]
        out["embeds"] = emb.float().cpu()
        f = pipe.vae_scale_factor
        c = pipe.unet.config.in_channels
        shape = (1, c, inp["height"] // f, inp["width"] // f)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        out["latents"] = latents
        for t in inp["timesteps"]:
            x = latents.to(dev, dtype)
            eps = pipe.unet(x, torch.tensor([t], device=dev), encoder_hidden_states=emb[:1]).sample
            out[f"unet_t{t}"] = eps.float().cpu()
        z = (latents / pipe.vae.config.scaling_factor).to(dev, dtype)
        out["vae"] = pipe.vae.decode(z).sample.float().cpu()
        for name in inp["schedulers"]:
            cls = getattr(diffusers, name)
            sched = cls.from_config(pipe.scheduler.config)
            sched.set_timesteps(inp["steps"])
            g = torch.Generator().manual_seed(seed)
            x = latents * sched.init_noise_sigma
            takes_generator = "generator" in inspect.signature(sched.step).parameters
            for t in sched.timesteps:
                xin = sched.scale_model_input(x, t)
                kw = {"generator": g} if takes_generator else {}
                x = sched.step(0.5 * xin, t, x, **kw).prev_sample
            out[f"sched_{name}"] = x.float()
            out[f"timesteps_{name}"] = sched.timesteps.double()
        images = pipe(inp["prompts"], num_inference_steps=inp["steps"], guidance_scale=inp["guidance"],
                      height=inp["height"], width=inp["width"],
                      generator=torch.Generator().manual_seed(seed), output_type="np").images
        out["image"] = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float()
    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                "transformers": transformers.__version__, "device": a.device, "precision": a.precision}
    save_file({k: v.contiguous() for k, v in out.items()}, a.out, metadata={"versions": json.dumps(versions)})


if __name__ == "__main__":
    sys.exit(main())
