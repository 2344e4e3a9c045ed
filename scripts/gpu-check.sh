#!/usr/bin/env bash
# Runs on the GPU machine (no Rust there) from the repository root, with gpu-bin/ carried
# (scripts/gpu-bundle.sh builds it): the CUDA parity suite, then benchmarks of SD v1.4's real
# architecture with random weights at 512×512 in both precisions, with per-kernel times.
# Writes $OUT/summary.md (and the raw logs) and prints the summary. Fits one device command:
#   run(command="scripts/gpu-check.sh", carry=["gpu-bin"], timeout_s=540)
# Budget (seconds) per part: ROENTGEN_TEST_TIMEOUT (300), ROENTGEN_BENCH_TIMEOUT (90 each).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
BIN=gpu-bin/roentgen
S="$OUT/summary.md"
{
  echo "# roentgen GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- commit: $(cat gpu-bin/COMMIT 2>/dev/null | tr '\n' ' ')"
  echo "- card: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null)"
  echo
} > "$S"

$BIN cuda-info > "$OUT/cuda-info.txt" 2>&1
echo "- $(tail -1 "$OUT/cuda-info.txt")" >> "$S"
echo >> "$S"
echo "## CUDA parity suite (CUDA vs the CPU reference)" >> "$S"
export ROENTGEN_ROOT=$PWD ROENTGEN_BIN=$PWD/$BIN
timeout "${ROENTGEN_TEST_TIMEOUT:-300}" gpu-bin/cuda-tests > "$OUT/tests.log" 2>&1
rc=$?
echo "exit status $rc" >> "$S"
echo '```' >> "$S"
grep -E "FAILED|^test result|^device|SKIPPED" "$OUT/tests.log" >> "$S"
echo '```' >> "$S"

M=weights/sd-v1-4-config
for prec in bf16 f32; do
  echo "## bench, --precision $prec (random weights, 512×512, guidance batch 2)" >> "$S"
  for stage in unet vae-decode text-encoder; do
    extra=""
    [ "$stage" = unet ] && extra="--iters 10 --warmup 3 --profile"
    echo '```' >> "$S"
    timeout "${ROENTGEN_BENCH_TIMEOUT:-90}" $BIN --device cuda --precision $prec bench $stage --model $M \
      --random-weights $extra >> "$S" 2>&1 || echo "bench $stage: exit $?" >> "$S"
    echo '```' >> "$S"
  done
done
# The U-Net step launched kernel by kernel, against the CUDA-graph replay above.
echo "## bench unet, bf16, --cuda-graphs off (launch overhead: compare with the graph replay above)" >> "$S"
echo '```' >> "$S"
timeout "${ROENTGEN_BENCH_TIMEOUT:-90}" $BIN --device cuda --precision bf16 --cuda-graphs off bench unet --model $M \
  --random-weights --iters 10 --warmup 3 >> "$S" 2>&1 || echo "bench unet (graphs off): exit $?" >> "$S"
echo '```' >> "$S"
# Side by side with diffusers/PyTorch (issue 9), where diffusers is importable (carried as a wheel).
echo "## side by side (scripts/bench-peers.py)" >> "$S"
if python3 -c "import diffusers" >/dev/null 2>&1; then
  echo '```' >> "$S"
  timeout "${ROENTGEN_PEERS_TIMEOUT:-150}" python3 scripts/bench-peers.py --binary "$BIN" --device cuda \
    --json-out "$OUT/peers.json" >> "$S" 2>&1 || echo "bench-peers: exit $?" >> "$S"
  echo '```' >> "$S"
else
  echo "skipped: diffusers is not importable here (carry it as a wheel)" >> "$S"
fi
cat "$S"
