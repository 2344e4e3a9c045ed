#!/usr/bin/env bash
# Data-parallel scaling on one machine with several GPUs (issue 17): for 1, 2, 4, … ranks (one per
# GPU, up to the GPUs present), the gradient sum alone (`bench allreduce`: SD v1.4's U-Net + text
# encoder gradients, NCCL) and a short training run (images/s from its log). Needs a build with
# `--features mpi,nccl`, Open MPI's mpirun, and the model and data to train on. Nothing here has run
# yet: this repository's machines have had at most one GPU.
#
#   scripts/multi-gpu-scaling.sh MODEL DATA OUT [STEPS] [BATCH]
#   e.g. scripts/multi-gpu-scaling.sh sd-v1-4 train.jsonl runs/scaling 30 4
#
# Writes OUT/scaling.md (the table) and, per rank count, OUT/N/{allreduce.json,train.log,run/}.
set -euo pipefail
[ $# -ge 3 ] || { sed -n 2,11p "$0" >&2; exit 2; }
MODEL=$1 DATA=$2 OUT=$3 STEPS=${4:-30} BATCH=${5:-4}
BIN=${BIN:-target/release/roentgen}
[ -x "$BIN" ] || { echo "$BIN: build it with cargo build --release --features mpi,nccl" >&2; exit 1; }
command -v mpirun >/dev/null || { echo "mpirun not found (apt-get install openmpi-bin libopenmpi-dev)" >&2; exit 1; }
GPUS=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
[ "$GPUS" -ge 1 ] || { echo "nvidia-smi sees no GPU" >&2; exit 1; }
mkdir -p "$OUT"
{
  echo "# data-parallel scaling: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) × $GPUS, $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo "per-rank batch $BATCH, $STEPS steps, model $MODEL, data $DATA"
  echo
  echo "| ranks | allreduce ms | bus GB/s | train images/s | speed-up | efficiency |"
  echo "|---:|---:|---:|---:|---:|---:|"
} >"$OUT/scaling.md"
base=""
for n in 1 2 4 8 16; do
  [ "$n" -le "$GPUS" ] || break
  d="$OUT/$n"
  rm -rf "$d" && mkdir -p "$d"
  mpirun -np "$n" "$BIN" --device cuda bench allreduce --iters 10 --json >"$d/allreduce.json"
  mpirun -np "$n" "$BIN" --device cuda train --model "$MODEL" --data "$DATA" --output "$d/run" \
    --batch-size "$BATCH" --steps "$STEPS" --checkpoint-every 0 --cache-latents 2>"$d/train.log" >/dev/null
  read -r ms bus < <(python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print(r["median_ms"], r["bus_bandwidth_gbps"])' "$d/allreduce.json")
  ips=$(python3 -c 'import json, sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["images_per_s"])' "$d/run/train_log.jsonl")
  base=${base:-$ips}
  python3 -c 'import sys; n, ms, bus, ips, base = sys.argv[1:]; s = float(ips) / float(base)
print(f"| {n} | {float(ms):.1f} | {float(bus):.1f} | {float(ips):.2f} | {s:.2f} | {s / int(n):.0%} |")' \
    "$n" "$ms" "$bus" "$ips" "$base" >>"$OUT/scaling.md"
done
cat "$OUT/scaling.md"
