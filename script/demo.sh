#!/usr/bin/env bash
# The README's demo: every pipeline end to end on the embedded tiny assets, offline, on CPU.
# Each stage has its own script; set SKIP_<NAME>=1 (e.g. SKIP_DINOVQ=1) to leave one out.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON="${PYTHON:-.env/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export DEMO_OUT="${DEMO_OUT:-outputs/demo}"
export TINY_ASSETS="${TINY_ASSETS:-.cache/tiny}"

echo "== assets: tiny SD-1.5 pipeline, tiny DINOv2, synthetic MVTec AD and ImageNet -> $TINY_ASSETS"
"$PYTHON" preprocessing/make_tiny_assets.py --out "$TINY_ASSETS"

echo "== foundation: pipeline load + 2-step sample, DINOv2 adapter from an official-layout checkpoint"
"$PYTHON" script/demo_foundation.py --assets "$TINY_ASSETS" --out "$DEMO_OUT/foundation"

if [ -z "${SKIP_DINOVQ:-}" ]; then
  echo "== DinoVQ: tokenizer training with PatchGAN + resume, latent-space DINOv2 head distillation"
  bash script/demo_dinovq.sh "$DEMO_OUT/dinovq"
fi

if [ -z "${SKIP_UREPA:-}" ]; then
  echo "== U-REPA preprocessing: ImageNet subset CSV, one-pass VAE + DINO LMDB caches, CLIP embeddings"
  OUT="$DEMO_OUT/urepa" TINY="$TINY_ASSETS" bash script/demo_urepa_preprocess.sh
fi
