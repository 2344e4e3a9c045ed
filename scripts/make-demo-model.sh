#!/usr/bin/env bash
# Rebuilds the bundled phantom demo model (issue 7) from nothing, with roentgen's own commands:
# phantoms → train-vae (from scratch) → train (text encoder and U-Net from scratch) → eval phantom.
# Everything is seeded; on a 2-core machine it takes about 40 min (see scripts/demo/README.md).
# The CPU backend's sums are deterministic for a given thread count: the bundled model was made with
# 2 threads, so THREADS defaults to 2 (another count gives a slightly different model).
#
#   scripts/make-demo-model.sh [WORK_DIR]        (default: demo-work/)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-demo-work}
VAE_STEPS=${VAE_STEPS:-600}
UNET_STEPS=${UNET_STEPS:-4500}
THREADS=${THREADS:-2}
# BIN=path/to/roentgen uses a binary already built (e.g. one built with --features cuda)
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=target/release/roentgen
fi
mkdir -p "$WORK"
# 1. data: 64 px phantoms with impressions
[ -f "$WORK/phantoms/manifest.jsonl" ] || $BIN phantom --out "$WORK/phantoms" --count 4000 --size 64 --seed 7 > "$WORK/phantoms.txt"
# 2. the VAE, from scratch
$BIN --threads "$THREADS" train-vae --config scripts/demo/vae_config.json --data "$WORK/phantoms/manifest.jsonl" --output "$WORK/vae" \
  --resolution 64 --batch-size 8 --steps "$VAE_STEPS" --lr 2e-3 --kl-weight 1e-6 --seed 1 --checkpoint-every 200 \
  --overwrite --log-every 10
VAE_CKPT="$WORK/vae/checkpoint-$VAE_STEPS"
# 3. the starting pipeline: configs only for the text encoder and U-Net (trained from scratch)
INIT="$WORK/init"
rm -rf "$INIT" && mkdir -p "$INIT/text_encoder" "$INIT/unet" "$INIT/vae" "$INIT/scheduler"
cp scripts/demo/text_encoder_config.json "$INIT/text_encoder/config.json"
cp scripts/demo/unet_config.json "$INIT/unet/config.json"
cp "$VAE_CKPT/config.json" "$VAE_CKPT/diffusion_pytorch_model.safetensors" "$INIT/vae/"
cp weights/sd-v1-4-config/scheduler/scheduler_config.json "$INIT/scheduler/"
cp -r weights/sd-v1-4-config/tokenizer "$INIT/tokenizer"
cp weights/sd-v1-4-config/model_index.json "$INIT/model_index.json"
# 4. text encoder + U-Net jointly, as RoentGen
$BIN --threads "$THREADS" train --model "$INIT" --data "$WORK/phantoms/manifest.jsonl" --output "$WORK/run" --resolution 64 \
  --batch-size 16 --steps "$UNET_STEPS" --lr 5e-4 --lr-schedule constant_with_warmup --warmup-steps 100 \
  --text-encoder-init random --unet-init random --uncond-prob 0.1 --cache-latents --checkpoint-every 500 --seed 2 --overwrite --log-every 10
# 5. the shipped form: f16 weights, no training state; then the prompt-following measurement
$BIN export --model "$WORK/run/checkpoint-$UNET_STEPS" --out "$WORK/phantom-demo" --dtype f16 --overwrite
BIN=$BIN scripts/demo/eval-demo.sh "$WORK/phantom-demo" "$WORK/eval"
echo "model: $WORK/phantom-demo (weights/phantom-demo is this folder); measurement: $WORK/eval/eval.txt"
