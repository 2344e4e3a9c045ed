#!/usr/bin/env bash
# Builds, here (no GPU needed), what the GPU machine runs: the release binary and the CUDA parity
# test binary, both with --features cuda, into gpu-bin/ (ignored by git; carry it to the device
# machine with `carry: ["gpu-bin"]`, then run scripts/gpu-check.sh there).
#
# A device call carries 64 MiB in all: the working tree (tracked and untracked, not ignored, files)
# plus the carried paths. So the kernels are compiled for the H100/H200 alone (sm_90a cubins, no PTX,
# no -lineinfo: ROENTGEN_CUDA_ARCHS, see build.rs), the binaries are stripped, and the script fails
# when the tree plus gpu-bin/ comes to 60 MiB or more. It builds in target/gpu-bundle, so the usual
# target/ (all architectures, line info) is left as it is.
#
#   scripts/gpu-bundle.sh          (several minutes the first time: nvcc compiles every kernel)
# ROENTGEN_CUDA_ARCHS=sm_80,sm_90a scripts/gpu-bundle.sh builds for an A100 as well.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda-toolchain.sh >/dev/null
export CARGO_TARGET_DIR=target/gpu-bundle
export ROENTGEN_CUDA_ARCHS=${ROENTGEN_CUDA_ARCHS:-sm_90a}
LIMIT_MIB=60

# nccl: the data-parallel gradient sum (loaded at run time; gpu-check times it on one rank).
cargo build --release --features cuda,nccl --quiet
# The test binary's path is in cargo's JSON messages; its compiler errors go to the log shown on failure.
LOG=$CARGO_TARGET_DIR/gpu-bundle-test-build.log
TEST_BIN=$(cargo test --release --features cuda --test cuda --no-run --message-format=json 2>"$LOG" |
  python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        print(m["executable"])' | tail -1) || { cat "$LOG" >&2; echo "building the cuda test binary failed" >&2; exit 1; }
[ -n "$TEST_BIN" ] || { cat "$LOG" >&2; echo "could not find the cuda test binary" >&2; exit 1; }

rm -rf gpu-bin && mkdir -p gpu-bin
cp "$CARGO_TARGET_DIR/release/roentgen" gpu-bin/roentgen
cp "$TEST_BIN" gpu-bin/cuda-tests
{
  git rev-parse HEAD
  if [ -n "$(git status --porcelain)" ]; then echo "dirty: $(git status --porcelain | wc -l) files changed or new"; fi
  echo "kernels: $ROENTGEN_CUDA_ARCHS (ROENTGEN_CUDA_ARCHS), built $(date -u +%Y-%m-%dT%H:%MZ)"
} >gpu-bin/COMMIT

# Bytes of the regular files (and links) named on stdin, NUL-separated; missing ones count 0.
bytes_of() {
  python3 -c 'import os, sys
print(sum(os.lstat(p).st_size for p in sys.stdin.buffer.read().split(b"\0") if p and os.path.lexists(p)))'
}
# What a device call sends besides the carried paths: tracked and untracked-not-ignored files, and
# shared/ where there is one.
tree_bytes() {
  {
    git ls-files -co --exclude-standard -z
    if [ -d shared ]; then find shared -type f -print0; fi
  } | bytes_of
}
mib() { python3 -c "print(f'{$1 / 2**20:.1f}')"; }

# Debug info: strip it (line tables alone make each binary tens of MB). Keep the symbol table, so
# that a panic's backtrace names its functions, unless the total is over the limit without it.
strip --strip-debug gpu-bin/roentgen gpu-bin/cuda-tests
tree=$(tree_bytes)
bin=$(find gpu-bin -type f -print0 | bytes_of)
if ((tree + bin >= LIMIT_MIB << 20)); then
  echo "over $LIMIT_MIB MiB with symbols: stripping the symbol tables too"
  strip gpu-bin/roentgen gpu-bin/cuda-tests
  bin=$(find gpu-bin -type f -print0 | bytes_of)
fi
ls -l gpu-bin
echo "working tree (tracked + untracked, not ignored): $(mib "$tree") MiB"
echo "gpu-bin/: $(mib "$bin") MiB (roentgen $(mib "$(stat -c %s gpu-bin/roentgen)"), cuda-tests $(mib "$(stat -c %s gpu-bin/cuda-tests)"))"
echo "a device call with carry=[\"gpu-bin\"] sends $(mib $((tree + bin))) MiB (the limit is 64 MiB; this script's, $LIMIT_MIB)"
if ((tree + bin >= LIMIT_MIB << 20)); then
  echo "too large: the working tree plus gpu-bin/ is $(mib $((tree + bin))) MiB, over $LIMIT_MIB MiB." >&2
  echo "Ignore or remove large untracked files (git status), or build fewer targets (ROENTGEN_CUDA_ARCHS)." >&2
  exit 1
fi
