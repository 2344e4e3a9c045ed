#!/usr/bin/env bash
# Regenerates the parity fixtures from PyTorch: builds a pinned Python environment in .venv-fixtures
# (torch, transformers, diffusers; open-clip-torch only for its CLIP BPE list) and runs
# tests/fixtures/generate.py. `cargo test` never runs Python; run this only to change fixtures.
#
#   scripts/make-fixtures.sh              # everything
#   scripts/make-fixtures.sh clip         # one part of generate.py (see below)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv-fixtures}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
# Pinned: the fixtures record these versions in tests/fixtures/VERSIONS.json.
"$VENV/bin/pip" install -q torch==2.15.0 transformers==5.23.0 diffusers==0.42.1 safetensors==0.8.0 numpy==2.4.6
# Only the data file bpe_simple_vocab_16e6.txt.gz is used; without --no-deps it would pull in
# torchvision and ftfy.
"$VENV/bin/pip" install -q --no-deps open-clip-torch==3.3.0
# Evaluation references (issue 6): MS-SSIM, FID networks and their preprocessing.
"$VENV/bin/pip" install -q pytorch_msssim==1.0.0 pillow==13.0.0 torchvision==0.29.2 scipy==1.17.1 \
  pytorch-fid==0.3.0 scikit-image==0.26.0
"$VENV/bin/pip" install -q --no-deps torchxrayvision==1.5.7
# The paper's other evaluations (issue 16): AUROC, and what torchxrayvision's dataset code imports
# (its label policy is the reference of tests/xrv_labels.rs).
"$VENV/bin/pip" install -q scikit-learn==1.9.1 pandas==3.1.1 imageio==2.38.2 requests==2.34.2 tqdm==4.70.1
# generate.py: tokenizer, CLIP, U-Net, VAE, pipelines, parameter counts (parts: tokenizer | clip |
# pipeline | unet | vae | sd-pipelines | counts | demo). generate_schedulers.py: torch randn per CPU
# capability and every scheduler step by step (parts: randn | schedulers).
# generate_msssim.py, generate_fid.py, iu-xray/make_sample.py: evaluation and report fixtures;
# generate_bert.py: BERT models, WordPiece vocabularies and tokenizer cases; generate_auroc.py,
# generate_xrv_labels.py, generate_xrv_outputs.py and generate_bce.py: sklearn AUROC, torchxrayvision
# label targets, output normalisation and `eval classify` end to end, the classifier's masked BCE;
# generate_text_knn.py: `eval text-knn` with transformers and sklearn; generate_classifier_ops.py:
# batch norm in training and pooling's backward; generate_retrieval.py: `eval retrieval` (issue 16);
# generate_torch_files.py: PyTorch checkpoints in every form and what torch.load reads from them;
# generate_single_file.py: SD single-file checkpoints checked by diffusers' own conversion (issue 22;
# run after generate.py, it reads the pipe-a fixture); generate_img2img.py and generate_inpaint.py:
# diffusers' img2img and inpainting pipelines on pipe-a/pipe-b (issue 21; after generate.py, and
# img2img before inpaint, whose init image it writes); generate_train_inpaint.py: training an
# inpainting U-Net (after generate.py's train10 and generate_inpaint.py's unet-9ch).
if [ "$#" -eq 0 ]; then
  "$VENV/bin/python" tests/fixtures/generate.py
  "$VENV/bin/python" tests/fixtures/generate_schedulers.py
  "$VENV/bin/python" tests/fixtures/generate_msssim.py
  "$VENV/bin/python" tests/fixtures/generate_fid.py
  "$VENV/bin/python" tests/fixtures/generate_bert.py
  "$VENV/bin/python" tests/fixtures/generate_resize.py
  "$VENV/bin/python" tests/fixtures/generate_gemm_kat.py
  "$VENV/bin/python" tests/fixtures/generate_auroc.py
  "$VENV/bin/python" tests/fixtures/generate_xrv_labels.py
  "$VENV/bin/python" tests/fixtures/generate_xrv_outputs.py
  "$VENV/bin/python" tests/fixtures/generate_bce.py
  "$VENV/bin/python" tests/fixtures/generate_text_knn.py
  "$VENV/bin/python" tests/fixtures/generate_classifier_ops.py
  "$VENV/bin/python" tests/fixtures/generate_retrieval.py
  "$VENV/bin/python" tests/fixtures/generate_torch_files.py
  "$VENV/bin/python" tests/fixtures/generate_single_file.py
  "$VENV/bin/python" tests/fixtures/generate_img2img.py
  "$VENV/bin/python" tests/fixtures/generate_inpaint.py
  "$VENV/bin/python" tests/fixtures/generate_train_inpaint.py
  "$VENV/bin/python" tests/fixtures/iu-xray/make_sample.py
else
  "$VENV/bin/python" tests/fixtures/generate.py "$@"
fi
du -sh tests/fixtures
