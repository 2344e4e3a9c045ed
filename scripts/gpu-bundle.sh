#!/usr/bin/env bash
# Builds, here (no GPU needed), what the GPU machine runs: the release binary and the CUDA parity
# test binary, both with --features cuda, into gpu-bin/ (ignored by git; carry it to the device
# machine with `carry: ["gpu-bin"]`, then run scripts/gpu-check.sh there).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda-toolchain.sh >/dev/null
cargo build --release --features cuda --quiet
TEST_BIN=$(cargo test --release --features cuda --test cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        print(m["executable"])' | tail -1)
[ -n "$TEST_BIN" ] || { echo "could not find the cuda test binary" >&2; exit 1; }
rm -rf gpu-bin && mkdir -p gpu-bin
cp target/release/roentgen gpu-bin/roentgen
cp "$TEST_BIN" gpu-bin/cuda-tests
# Debug info makes each binary ~70 MB; a device call carries 64 MiB in all.
strip --strip-debug gpu-bin/roentgen gpu-bin/cuda-tests
git rev-parse HEAD > gpu-bin/COMMIT
git status --porcelain | grep -q . && echo "dirty" >> gpu-bin/COMMIT || true
du -sh gpu-bin
[ "$(du -sm gpu-bin | cut -f1)" -lt 60 ] || { echo "gpu-bin/ is over 60 MiB: a device call carries 64 MiB in all" >&2; exit 1; }
