#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, NVVM, headers; no driver, no GPU needed) from PyPI
# into .cuda-toolchain/ (ignored by git). build.rs finds it there, so `cargo build --features cuda`
# works on machines with no CUDA toolkit. Machines with a toolkit can skip this: build.rs also
# honours NVCC, CUDA_HOME/CUDA_PATH and nvcc on PATH.
#
#   scripts/install-cuda-toolchain.sh            (idempotent; prints the nvcc path)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.cuda-toolchain
NVCC="$DIR/venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc"
if ! ls $NVCC >/dev/null 2>&1; then
  command -v python3 >/dev/null || { echo "python3 is needed to install nvcc from PyPI" >&2; exit 1; }
  if ! python3 -m venv "$DIR/venv" 2>/dev/null; then
    # Debian ships venv separately; install it where we may (CI runs as root).
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$DIR/venv" && python3 -m venv "$DIR/venv"
    else
      echo "python3 -m venv failed: install the venv module (Debian: apt-get install python3-venv)" >&2; exit 1
    fi
  fi
  "$DIR/venv/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
ls $NVCC
