#!/usr/bin/env bash
# The first look at a real GPU, in one device call. Runs on the GPU machine (H100/H200, CUDA 13.0,
# PyTorch; no Rust, no network) from the repository root, with gpu-bin/ carried (scripts/gpu-bundle.sh
# builds it here):
#   run(command="scripts/gpu-check.sh", carry=["gpu-bin"], timeout_s=570)
#
# In order, each step under `timeout`, so that a hang or a crash costs that step only:
#   1. preflight (~10 s): date, commit, nvidia-smi, where libcuda/libcublas/libcublasLt/libnccl are,
#      LD_LIBRARY_PATH set from that (cudarc dlopens cuBLAS by name), `roentgen cuda-info`;
#   2. the headline: `bench unet` in bf16 at 512×512 (SD v1.4's architecture, random weights,
#      CUDA graphs on) with the per-kernel profile;
#   3. the CUDA parity suite (CUDA vs the CPU reference), one process per part (f32/conv2d_forward,
#      bf16/wide, ...; from `cuda-tests --list`), so that a sticky CUDA error or a hang in one part
#      leaves the others to run;
#   4. PyTorch's ceilings on the same card (scripts/gpu-ceilings.py): GEMM, conv2d, attention;
#   5. the rest: bench --autotune (issue 18: every kernel version gated against v1 and timed at
#      SD v1.4's shapes; kernel-versions.json) and the headline again with the tuned versions,
#      bench vae-decode and text-encoder (bf16), a training step at 512² with and without
#      --gradient-checkpointing (peak device memory) and the planned memory at batch 32, unet in f32 with the profile, unet in
#      bf16 with --cuda-graphs off (launch overhead), bench allreduce (NCCL, one rank), and scripts/bench-peers.py and `roentgen parity`
#      (bf16 and f32, the fixture pipeline) if diffusers imports.
# Then prints $OUT/summary.md.
#
# Deadline: everything ends within ROENTGEN_GPU_DEADLINE seconds (540) of the start: each step runs
# under min(its own budget, the time left - 5 s), and a step with no time left is recorded as
# "not run: deadline". The parity suite has ROENTGEN_PARITY_BUDGET seconds (200) in all and
# ROENTGEN_PART_TIMEOUT (60) per part.
#
# Writes into $OUT (default gpu-out), appending as each step runs, so that a kill at any moment keeps
# everything up to then (a device call brings back at most 8 files):
#   preflight.txt  date, commit, card, libraries found, LD_LIBRARY_PATH, cuda-info
#   headline.txt   the bf16 U-Net bench with every profile row
#   parity.txt     every part's full output
#   ceilings.txt   PyTorch's ceilings: the table and a "json: {...}" line
#   rest.txt       the other benches' full output
#   peers.json     bench-peers.py's numbers (only when diffusers imports)
#   kernel-versions.json  the autotuned table (issue 18)
#   summary.md     the short version of all of it, printed at the end
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
DEADLINE=${ROENTGEN_GPU_DEADLINE:-540}
MARGIN=5        # seconds kept back from every step: the kill grace below, and the summary
MIN_STEP=3      # a step that would get fewer seconds than this is not started
KILL_GRACE=3    # timeout sends TERM, then KILL this much later (a process stuck in a kernel)
PARITY_BUDGET=${ROENTGEN_PARITY_BUDGET:-200}
PART_TIMEOUT=${ROENTGEN_PART_TIMEOUT:-60}
BIN=gpu-bin/roentgen
TESTS=gpu-bin/cuda-tests
M=weights/sd-v1-4-config
S=$OUT/summary.md
P=$OUT/preflight.txt
H=$OUT/headline.txt
T=$OUT/parity.txt
C=$OUT/ceilings.txt
R=$OUT/rest.txt
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# Start from empty files: this run's, not an earlier one's (locally $OUT may be reused).
for f in "$S" "$P" "$H" "$T" "$C" "$R" "$OUT/peers.json"; do rm -f "$f"; done

# --- time ----------------------------------------------------------------------------------------
now_us() {
  if [ -n "${EPOCHREALTIME:-}" ]; then echo $((10#${EPOCHREALTIME/[.,]/})); else date +%s%6N; fi
}
T0=$(now_us)
elapsed() { echo $((($(now_us) - T0) / 1000000)); }      # whole seconds since the start
secs_since() { # $1: a now_us value → seconds since then, one decimal
  local d=$((($(now_us) - $1) / 100000))
  echo "$((d / 10)).$((d % 10))"
}
left() { echo $((DEADLINE - $(elapsed) - MARGIN)); }     # seconds a step may still take
# Stopped from outside (TERM, ^C): say so in the summary and print what there is.
trap 'echo "- stopped by a signal at +$(elapsed) s" >>"$S"; cat "$S"; exit 143' TERM INT

STEPS=() # rows of the steps table at the end of the summary
STEP_RC=0 STEP_SECS=0 STEP_STATUS=""

# timed LIMIT LOG CMD...: CMD's stdout and stderr appended to LOG under `timeout LIMIT`; sets
# STEP_RC, STEP_SECS and STEP_STATUS (ok / exit N / timed out / killed by signal N).
timed() {
  local limit=$1 log=$2 start
  shift 2
  start=$(now_us)
  # stdin from /dev/null: nothing run here may eat the input of a loop around it.
  timeout -k "$KILL_GRACE" "$limit" "$@" </dev/null >>"$log" 2>&1
  STEP_RC=$?
  STEP_SECS=$(secs_since "$start")
  case $STEP_RC in
    0) STEP_STATUS=ok ;;
    124) STEP_STATUS="timed out after ${limit}s" ;;
    137) if (($(now_us) - start >= limit * 1000000)); then STEP_STATUS="timed out after ${limit}s (killed)"
         else STEP_STATUS="killed (signal 9: out of memory?)"; fi ;;
    125|126|127) STEP_STATUS="could not run (exit $STEP_RC)" ;;
    *) if ((STEP_RC > 128)); then STEP_STATUS="killed by signal $((STEP_RC - 128))"
       else STEP_STATUS="exit $STEP_RC"; fi ;;
  esac
}

# step LABEL BUDGET LOG CMD...: CMD under min(BUDGET, time left), with a header and a result line
# in LOG, and a row in the steps table. Returns 1 (and runs nothing) when no time is left.
# Sets STEP_OFF: LOG's size before the step, so that `segment LOG` is this step's output alone.
step() {
  local label=$1 budget=$2 log=$3 t
  shift 3
  t=$(left)
  ((budget < t)) && t=$budget
  STEP_OFF=$(stat -c %s "$log" 2>/dev/null || echo 0)
  if ((t < MIN_STEP)); then
    STEP_RC="" STEP_SECS=0 STEP_STATUS="not run: deadline"
    echo "== $label: not run: deadline ($(elapsed) s of $DEADLINE gone)" >>"$log"
    STEPS+=("| $label | $budget | – | – | not run: deadline |")
    return 1
  fi
  echo "== $label (at +$(elapsed) s, limit $t s): $*" >>"$log"
  timed "$t" "$log" "$@"
  echo "== $label: $STEP_STATUS, $STEP_SECS s" >>"$log"
  STEPS+=("| $label | $budget | $t | $STEP_SECS | $STEP_STATUS |")
  return 0
}
segment() { tail -c +$((STEP_OFF + 1)) "$1"; } # the last step's part of a log

# bench_summary: the headline lines of a `roentgen bench` output on stdin (up to and with the
# per-kernel header), then the first $1 profile rows.
bench_summary() {
  awk -v rows="$1" '
    /^== / { next }
    /per kernel/ { print; k = 1; next }
    k { if (n++ < rows) print; next }
    { print }'
}

# --- 1. preflight ---------------------------------------------------------------------------------
{
  echo "# roentgen GPU check: preflight"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(tr '\n' ' ' 2>/dev/null <gpu-bin/COMMIT || echo '(no gpu-bin/COMMIT)')"
  echo "host: $(uname -srm), $(nproc) CPUs, bash $BASH_VERSION"
  echo "deadline: $DEADLINE s; parity budget $PARITY_BUDGET s, $PART_TIMEOUT s per part"
} >>"$P"
{
  echo "# roentgen GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ); commit: $(tr '\n' ' ' 2>/dev/null <gpu-bin/COMMIT || echo '(no gpu-bin/COMMIT)')"
} >>"$S"
for f in "$BIN" "$TESTS"; do
  [ -x "$f" ] || echo "MISSING: $f (build it with scripts/gpu-bundle.sh; call with carry=[\"gpu-bin\"])" | tee -a "$S" >>"$P"
done

echo "## nvidia-smi" >>"$P"
# Some fields are missing on some drivers and fail the whole query: then the plain fields alone.
Q=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu,pstate
if command -v nvidia-smi >/dev/null; then
  timeout -k 1 5 nvidia-smi --query-gpu=$Q,compute_cap --format=csv >"$TMP/smi" 2>&1 ||
    timeout -k 1 5 nvidia-smi --query-gpu=$Q --format=csv >"$TMP/smi" 2>&1 ||
    echo "(nvidia-smi --query-gpu failed: exit $?)" >>"$TMP/smi"
  cat "$TMP/smi" >>"$P"
  timeout -k 1 5 nvidia-smi >>"$P" 2>&1 || echo "(nvidia-smi: exit $?)" >>"$P"
  echo "- card: $(sed -n 2p "$TMP/smi")" >>"$S"
  echo "  ($(head -1 "$TMP/smi"))" >>"$S"
else
  echo "nvidia-smi: not found" | tee -a "$S" >>"$P"
fi

# Where the CUDA libraries are. cudarc loads libcuda, libcublas and libcublasLt with dlopen by name
# (libcublasLt.so, then libcublasLt.so.13, .so.12, ...), so the folders holding them must be on
# LD_LIBRARY_PATH. Printed: "DIR <folder>" for every folder searched, "LIB <file> -> <target>".
find_libs() {
  local dirs=() d f
  # The loader's cache.
  while read -r f; do dirs+=("${f%/*}"); done < <(timeout 3 ldconfig -p 2>/dev/null |
    awk -F'=> ' '/lib(cuda|cublas|cublasLt|nccl)\.so/ { print $2 }')
  # The CUDA toolkit(s), the distribution's folder, the driver's mount (/usr/local/nvidia).
  for d in /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib /usr/lib/x86_64-linux-gnu \
    /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib64; do
    [ -d "$d" ] && dirs+=("$d")
  done
  # PyTorch's pip wheels: site-packages/nvidia/<cu13, cublas, nccl, ...>/lib.
  while read -r d; do [ -n "$d" ] && dirs+=("$d"); done < <(timeout 5 python3 -c '
import glob, os, nvidia
for p in nvidia.__path__:
    for d in sorted(glob.glob(os.path.join(p, "*", "lib"))):
        print(d)' 2>/dev/null)
  for d in /opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib /usr/local/lib/python3*/*-packages/nvidia/*/lib \
    /usr/lib/python3*/*-packages/nvidia/*/lib /root/.local/lib/python3*/site-packages/nvidia/*/lib; do
    [ -d "$d" ] && dirs+=("$d")
  done
  printf '%s\n' "${dirs[@]}" | awk '!seen[$0]++' | while read -r d; do
    echo "DIR $d"
    for f in "$d"/libcuda.so* "$d"/libcublas.so* "$d"/libcublasLt.so* "$d"/libnccl.so*; do
      [ -e "$f" ] && echo "LIB $f -> $(readlink -f "$f")"
    done
  done
}
export -f find_libs # for the `bash -c` under timeout below; unexported again after it
echo "## CUDA libraries (ldconfig -p, CUDA toolkits, /usr/lib/x86_64-linux-gnu, the driver's folder, pip's nvidia/*/lib)" >>"$P"
timeout -k 1 8 bash -c find_libs >"$TMP/libs" 2>&1 || echo "(library search: exit $?)" >>"$TMP/libs"
export -fn find_libs
grep '^LIB ' "$TMP/libs" | cut -c5- >>"$P"
echo "folders searched: $(grep -c '^DIR ' "$TMP/libs")" >>"$P"
# LD_LIBRARY_PATH: what the image set first (it knows its driver), then the folders with a CUDA 13
# cuBLAS (cudarc's bindings are CUDA 13.0's), then the other folders holding one of these libraries.
# Never a stubs/ folder: its libcuda only returns errors.
lib_dirs=$({
  grep -E '^LIB .*/libcublas(Lt)?\.so\.13' "$TMP/libs"
  grep -E '^LIB .*/lib(cuda|cublas|cublasLt)\.so' "$TMP/libs"
} | sed -E 's/^LIB (.*)\/[^/]* -> .*/\1/' | grep -v '/stubs' | awk '!seen[$0]++' | paste -sd: -)
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$lib_dirs"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >>"$P"
# Which file each name resolves to now, in the order cudarc tries the names (what it will load).
timeout -k 1 8 python3 -c '
import ctypes, os
def mapped(lib):
    paths = {l.split()[-1] for l in open("/proc/self/maps") if len(l.split()) > 5}
    return {p for p in paths if os.path.basename(p).startswith(f"lib{lib}.so")}
for lib in ["cuda", "cublas", "cublasLt", "nccl"]:
    for name in [f"lib{lib}.so", f"lib{lib}.so.13", f"lib{lib}.so.12", f"lib{lib}.so.1", f"lib{lib}.so.2"]:
        before = mapped(lib)
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        hit = sorted(mapped(lib) - before) or sorted(mapped(lib))  # (already loaded by a library before)
        print(f"dlopen {lib}: {name} -> {hit[0] if hit else name}")
        break
    else:
        print(f"dlopen {lib}: NOT FOUND (tried lib{lib}.so, .so.13, .so.12, .so.1, .so.2)")
' >"$TMP/dl" 2>&1 || echo "(dlopen check: exit $?)" >>"$TMP/dl"
cat "$TMP/dl" >>"$P"
sed 's/^/- /' "$TMP/dl" >>"$S"
echo "preflight: $(elapsed) s" >>"$P"
STEPS+=("| preflight | – | – | $(elapsed) | LD_LIBRARY_PATH set from what was found |")

echo "## roentgen cuda-info" >>"$P"
step "cuda-info" 30 "$P" "$BIN" cuda-info &&
  echo "- $(segment "$P" | grep -E '^(device|kernels)' | tr '\n' ' ') [$STEP_STATUS]" >>"$S"

# --- 2. the headline ------------------------------------------------------------------------------
{
  echo
  echo "## headline: bench unet, bf16, 512×512, guidance batch 2, CUDA graphs on (random weights)"
  echo '```'
} >>"$S"
if step "bench unet bf16 --profile" 150 "$H" \
  "$BIN" --device cuda --precision bf16 bench unet --model "$M" --random-weights --iters 10 --warmup 3 --profile; then
  segment "$H" | bench_summary 25 >>"$S"
fi
echo "[$STEP_STATUS, $STEP_SECS s; every profile row in headline.txt]" >>"$S"
echo '```' >>"$S"

# --- 3. the parity suite, part by part ------------------------------------------------------------
export ROENTGEN_REQUIRE_CUDA=1 ROENTGEN_ROOT=$PWD ROENTGEN_BIN=$PWD/$BIN
{
  echo
  echo "## CUDA parity suite (CUDA vs the CPU reference), one process per part"
} >>"$S"
PARITY_START=$(elapsed)
PARITY_END=$((PARITY_START + PARITY_BUDGET))
parity_left() { # seconds the parity suite may still take
  local a=$((PARITY_END - $(elapsed))) b
  b=$(left)
  echo $((a < b ? a : b))
}

# The case names, one a line (--list needs the device). Anything else in the output (a SKIPPED
# line, a closing line) means the list is not usable.
echo "== cuda-tests --list (at +$(elapsed) s)" >>"$T"
listed=0
t=$(parity_left)
((t > 30)) && t=30
if ((t >= MIN_STEP)); then
  start=$(now_us)
  timeout -k "$KILL_GRACE" "$t" "$TESTS" --list >"$TMP/cases" 2>>"$T"
  rc=$?
  echo "== --list: exit $rc, $(wc -l <"$TMP/cases") names, $(secs_since "$start") s" >>"$T"
  if ((rc == 0)) && [ -s "$TMP/cases" ] && ! grep -qE '^(test result|SKIPPED|running )' "$TMP/cases"; then
    listed=1
  else
    head -5 "$TMP/cases" >>"$T"
  fi
fi

if ((listed)); then
  # Parts: "f32/conv2d_forward" holds every case whose name starts with "f32/conv2d_forward ";
  # a name not of the form "<f32|bf16>/<word> ..." is a part of its own. In list order.
  awk '{ if (match($0, /^(f32|bf16)\/[^ \t]+/)) k = substr($0, 1, RLENGTH); else k = $0
         print k "\t" $0 }' "$TMP/cases" >"$TMP/keyed"
  cut -f1 "$TMP/keyed" | awk '!seen[$0]++' >"$TMP/parts"
  nparts=$(wc -l <"$TMP/parts")
  echo "$(wc -l <"$TMP/cases") cases in $nparts parts; $PARITY_BUDGET s in all, $PART_TIMEOUT s per part" | tee -a "$T" >>"$S"
  {
    echo
    echo "| part | cases | passed | failed | skipped | exit | s | note |"
    echo "|---|---:|---:|---:|---:|---|---:|---|"
  } >>"$S"
  : >"$TMP/failed"
  num() { echo "$closing" | grep -oE "[0-9]+ $1" | grep -oE '^[0-9]+' || echo 0; } # "N passed" → N
  tot_p=0 tot_f=0 tot_s=0 tot_cases=0 unfinished=0 not_run=()
  while IFS= read -r part; do
    awk -F'\t' -v k="$part" '$1 == k { print $2 }' "$TMP/keyed" >"$TMP/mine"
    n=$(wc -l <"$TMP/mine")
    tot_cases=$((tot_cases + n))
    # The harness keeps the cases whose name contains the filter. "f32/attention" alone would also
    # take every "f32/attention_forward ..." case, so the filter is the part and the space after it
    # (unless a name is exactly the part); a filter that still matches other cases is noted.
    if grep -qxF -- "$part" "$TMP/mine"; then filter=$part; else filter="$part "; fi
    matched=$(grep -cF -- "$filter" "$TMP/cases")
    t=$(parity_left)
    ((t > PART_TIMEOUT)) && t=$PART_TIMEOUT
    if ((t < MIN_STEP)); then
      not_run+=("$part")
      echo "== part '$part': not run: deadline" >>"$T"
      continue
    fi
    echo "== part '$part' ($n cases, filter '$filter', at +$(elapsed) s, limit $t s)" >>"$T"
    off=$(stat -c %s "$T")
    timed "$t" "$T" "$TESTS" "$filter"
    tail -c +$((off + 1)) "$T" >"$TMP/seg"
    echo "== part '$part': $STEP_STATUS, $STEP_SECS s" >>"$T"
    closing=$(grep -E '^test result:' "$TMP/seg" | tail -1)
    note="" stuck=""
    if [ -n "$closing" ]; then
      passed=$(num passed) failed=$(num failed) skipped=$(num skipped)
      # The device would not open in this process: every case skipped, the reason on that line.
      if [[ $closing == *"all skipped"* ]]; then
        skipped=$n note="all skipped: $(echo "$closing" | sed 's/.*all skipped (//; s/)$//' | cut -c1-150 | tr '|' '/')"
      fi
    else
      # No closing line: the process hung or died. Count what it printed, and name the first case
      # of the part that printed no outcome: the one it was running (unless it died before any).
      passed=$(grep -cE '^test .* \.\.\. ok' "$TMP/seg")
      failed=$(grep -cE '^test .* \.\.\. FAILED' "$TMP/seg")
      skipped=$(grep -cE '^test .* \.\.\. SKIPPED' "$TMP/seg")
      stuck=$(awk 'FILENAME == ARGV[1] { i = index($0, " ... "); if (/^test / && i) done[substr($0, 6, i - 6)] = 1; next }
                   !($0 in done) { print; exit }' "$TMP/seg" "$TMP/mine")
      note="no closing line${stuck:+; first case without an outcome: $stuck}"
      unfinished=$((unfinished + 1))
    fi
    ((matched != n)) && note="${note:+$note; }filter matched $matched cases"
    tot_p=$((tot_p + passed)) tot_f=$((tot_f + failed)) tot_s=$((tot_s + skipped))
    grep -E '^test .* \.\.\. FAILED' "$TMP/seg" | cut -c1-400 >>"$TMP/failed"
    [ -n "$stuck" ] && echo "test $stuck ... DID NOT FINISH ($STEP_STATUS)" >>"$TMP/failed"
    # (A case name may hold a '|', as "f32/randn n1 seed 7 stream (5 << 32) | 3" does.)
    echo "| ${part//|/\\|} | $n | $passed | $failed | $skipped | $STEP_STATUS | $STEP_SECS | ${note//|/\\|} |" >>"$S"
  done <"$TMP/parts"
  {
    echo
    echo "total: $tot_p passed, $tot_f failed, $tot_s skipped of $tot_cases cases; $unfinished parts did not finish (hung or died); ${#not_run[@]} parts not run (parity budget or deadline)"
    if ((${#not_run[@]})); then
      echo "not run: $(printf '%s, ' "${not_run[@]}" | sed 's/, $//')"
    fi
    if [ -s "$TMP/failed" ]; then
      echo
      echo "failures (the first 60; all in parity.txt):"
      echo '```'
      head -60 "$TMP/failed"
      echo '```'
    fi
  } >>"$S"
  STEPS+=("| parity suite ($nparts parts) | $PARITY_BUDGET | – | $(($(elapsed) - PARITY_START)) | $tot_p passed, $tot_f failed, $tot_s skipped, $unfinished parts unfinished, ${#not_run[@]} not run |")
else
  # No list: the whole suite in one process, as before.
  echo "--list gave no case names (see parity.txt): the whole suite in one process" >>"$S"
  if step "parity suite, one process" "$(parity_left)" "$T" "$TESTS"; then
    {
      echo '```'
      segment "$T" | grep -E '^test result|^device|FAILED|SKIPPED' | head -60
      # No closing line: the process hung or died after the last case that printed its outcome.
      segment "$T" | grep -q '^test result' || echo "no closing line; the last case that finished: $(segment "$T" | grep '^test ' | tail -1 | cut -c1-200)"
      echo "[$STEP_STATUS, $STEP_SECS s]"
      echo '```'
    } >>"$S"
  else
    echo "not run: deadline" >>"$S"
  fi
fi

# --- 4. PyTorch's ceilings on the same card -------------------------------------------------------
echo -e "\n## PyTorch ceilings on this card (scripts/gpu-ceilings.py)" >>"$S"
if step "ceilings (PyTorch)" 75 "$C" env PYTHONUNBUFFERED=1 python3 scripts/gpu-ceilings.py --json; then
  segment "$C" | grep -E '^(\||PyTorch |gpu-ceilings)' | sed '/^PyTorch /G' >>"$S" # (a blank line before the table)
  if [ "$STEP_STATUS" != ok ]; then
    echo '```' >>"$S"
    segment "$C" | grep -vE '^(\||json: |== )' | tail -5 >>"$S"
    echo "[$STEP_STATUS; see ceilings.txt]" >>"$S"
    echo '```' >>"$S"
  fi
else
  echo "not run: deadline" >>"$S"
fi

# --- 5. the rest ----------------------------------------------------------------------------------
# bench LABEL BUDGET PROFILE_ROWS ARGS...: one more roentgen bench into rest.txt and the summary.
bench() {
  local label=$1 budget=$2 rows=$3
  shift 3
  echo -e "\n## $label" >>"$S"
  echo '```' >>"$S"
  if step "$label" "$budget" "$R" "$BIN" --device cuda "$@"; then
    segment "$R" | bench_summary "$rows" >>"$S"
    echo "[$STEP_STATUS, $STEP_SECS s]" >>"$S"
  else
    echo "not run: deadline" >>"$S"
  fi
  echo '```' >>"$S"
}
# Kernel versions (issue 18): every version of every versioned family (ROENTGEN_KERNELS) at the
# shapes SD v1.4's U-Net (64×64 latents, guidance batch 2), VAE decoder (512²) and a training step
# (batch 1) run, each checked against version 1 on that shape before it is timed; the fastest
# correct one per shape goes to kernel-versions.json. Then the headline again with those versions.
CACHE=$OUT/kernel-versions.json
rm -f "$CACHE"
echo -e "\n## bench --autotune, bf16 (issue 18): every kernel version, gated against v1, timed per shape" >>"$S"
echo '```' >>"$S"
if step "bench --autotune" 150 "$R" env ROENTGEN_KERNEL_CACHE="$CACHE" "$BIN" --device cuda --precision bf16 \
  bench --autotune --model "$M" --random-weights --autotune-iters 50; then
  segment "$R" | grep -vE '^(== |autotune: )' | tail -60 >>"$S"
  echo "[$STEP_STATUS, $STEP_SECS s; the table in kernel-versions.json]" >>"$S"
else
  echo "not run: deadline" >>"$S"
fi
echo '```' >>"$S"
if [ -s "$CACHE" ]; then
  ROENTGEN_KERNEL_CACHE=$CACHE bench "bench unet, bf16, autotuned kernel versions (compare with the headline)" 60 0 \
    --precision bf16 bench unet --model "$M" --random-weights --iters 10 --warmup 3
fi
# bf16 activations (issue 18, in progress): half the U-Net's activation memory; the convolutions
# and attention still go through the f32 bridge, so this measures the bridge's cost for now.
bench "bench unet, bf16, --activations bf16 (compare with the headline)" 60 0 \
  --precision bf16 --activations bf16 bench unet --model "$M" --random-weights --iters 10 --warmup 3
bench "bench vae-decode, bf16" 60 0 --precision bf16 bench vae-decode --model "$M" --random-weights
bench "bench text-encoder, bf16" 30 0 --precision bf16 bench text-encoder --model "$M" --random-weights
# One joint U-Net + text-encoder AdamW step at 512² (issue 18), keeping every activation and with
# recomputation, each with its peak device memory; then the planning pass's memory at batch 32.
bench "bench train-step, bf16, 512², batch 2" 60 0 --precision bf16 bench train-step --model "$M" \
  --random-weights --batch 2 --iters 3 --warmup 1
bench "bench train-step, bf16, 512², batch 2, --gradient-checkpointing" 60 0 --precision bf16 bench train-step \
  --model "$M" --random-weights --batch 2 --iters 3 --warmup 1 --gradient-checkpointing
echo -e "\n## training step memory at batch 32, 512² (planning pass, no GPU)" >>"$S"
{ echo '```'; timeout -k 1 30 "$BIN" bench train-step --plan-only --model "$M" --batch 32 2>&1; echo '```'; } >>"$S"
bench "bench unet, f32, --profile" 120 15 --precision f32 bench unet --model "$M" --random-weights \
  --iters 10 --warmup 3 --profile
# The U-Net step launched kernel by kernel: against the graph replay of the headline, the launch cost.
bench "bench unet, bf16, --cuda-graphs off (launch overhead: compare with the headline)" 60 0 \
  --precision bf16 --cuda-graphs off bench unet --model "$M" --random-weights --iters 10 --warmup 3

# Data-parallel training's gradient sum (issue 17) on one rank: NCCL found by roentgen's own search
# (libnccl.so.2, e.g. PyTorch's nvidia-nccl wheel), loaded, and summing SD v1.4's U-Net + text
# encoder gradients in place on our stream, checked exact. Scaling needs several GPUs:
# `mpirun -np N gpu-bin/roentgen --device cuda bench allreduce` on such a machine.
bench "bench allreduce, NCCL, one rank (issue 17)" 40 0 bench allreduce --iters 5
if segment "$R" | grep -q "NCCL not found"; then
  NCCL_LIB=$(timeout -k 1 15 python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null || true)
  if [ -n "$NCCL_LIB" ]; then
    export ROENTGEN_NCCL=$NCCL_LIB
    bench "bench allreduce, NCCL at $NCCL_LIB (our search missed it)" 40 0 bench allreduce --iters 5
  fi
fi

# Side by side with diffusers/PyTorch (issue 9), where diffusers imports (carried as a wheel).
echo -e "\n## side by side with diffusers (scripts/bench-peers.py)" >>"$S"
if (($(left) >= 20)) && timeout -k 1 20 python3 -c "import diffusers" >/dev/null 2>&1; then
  echo '```' >>"$S"
  if step "bench-peers" 150 "$R" env PYTHONUNBUFFERED=1 python3 scripts/bench-peers.py --binary "$BIN" \
    --device cuda --rounds 1 --iters 10 --warmup 3 --json-out "$OUT/peers.json"; then
    segment "$R" | grep -v '^== ' | tail -25 >>"$S"
    echo "[$STEP_STATUS, $STEP_SECS s]" >>"$S"
  else
    echo "not run: deadline" >>"$S"
  fi
  echo '```' >>"$S"
  # roentgen parity (issue 22) on the fixture pipeline: this card's bf16 and f32 paths against
  # diffusers on the same card, stage by stage.
  P=/tmp/roentgen-parity-pipe
  rm -rf "$P" && mkdir -p "$P" && cp -r tests/fixtures/pipe-a "$P/" \
    && cp -r tests/fixtures/tiny-text-pipeline/text_encoder "$P/pipe-a/" \
    && cp -r weights/sd-v1-4-config/tokenizer "$P/pipe-a/"
  for prec in bf16 f32; do
    echo -e "\n## roentgen parity, cuda $prec (fixture pipeline, 32 px)" >>"$S"
    echo '```' >>"$S"
    if step "parity $prec" 60 "$R" "$BIN" --device cuda --precision "$prec" parity --model "$P/pipe-a" \
      --python python3 --height 32 --width 32 --steps 6; then
      segment "$R" | grep -E '^(stage|token|text|U-Net|VAE|pndm|ddim|euler|dpm|image|roentgen|error)' >>"$S"
      echo "[$STEP_STATUS, $STEP_SECS s]" >>"$S"
    else
      echo "not run: deadline" >>"$S"
    fi
    echo '```' >>"$S"
  done
else
  echo "skipped: diffusers is not importable here (carry it as a wheel), or no time was left" >>"$S"
fi

# --- the end --------------------------------------------------------------------------------------
{
  echo
  echo "## steps"
  echo
  echo "| step | budget s | limit s | took s | result |"
  echo "|---|---:|---:|---:|---|"
  printf '%s\n' "${STEPS[@]}"
  echo
  if command -v nvidia-smi >/dev/null; then
    echo "- card at the end: $(timeout -k 1 5 nvidia-smi --query-gpu=memory.used,clocks.sm,temperature.gpu,pstate --format=csv,noheader 2>&1)"
  fi
  echo "- total: $(elapsed) s of the $DEADLINE s deadline; files in $OUT/: $(cd "$OUT" && ls | tr '\n' ' ')"
} >>"$S"
cat "$S"
