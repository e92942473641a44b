#!/usr/bin/env bash
# The README's demo: every pipeline end to end on the embedded tiny assets, offline, on CPU.
# Each system has its own script (run alone too); set SKIP_ANOMALY=1, SKIP_DOWNSTREAM=1, SKIP_DINOVQ=1 or
# SKIP_UREPA=1 to leave one out. Outputs: outputs/demo/foundation, outputs/demo_anomaly,
# outputs/demo_downstream, outputs/demo_dinovq, outputs/demo_urepa. LPIPS/Inception (and the downstream
# ResNet-34) run with random weights here (none are downloadable offline): their numbers only show that the
# code runs; see the README for real weights.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON="${PYTHON:-.env/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$SECONDS

echo "== assets: tiny SD-1.5 pipeline, tiny DINOv2, synthetic MVTec AD and ImageNet -> .cache/tiny"
"$PYTHON" preprocessing/make_tiny_assets.py --out .cache/tiny

echo "== foundation: pipeline load + 2-step sample, DINOv2 adapter from an official-layout checkpoint"
"$PYTHON" script/demo_foundation.py --assets .cache/tiny --out outputs/demo/foundation

if [ -z "${SKIP_ANOMALY:-}" ]; then
  echo "== anomaly generation: stage 1 -> stage 2 -> image/mask generation -> IC-LPIPS and IS"
  bash script/demo_anomaly.sh
fi

if [ -z "${SKIP_DOWNSTREAM:-}" ]; then
  echo "== downstream evaluation: localization U-Net (generated + Perlin baseline), ResNet-34 classifier, table"
  bash script/demo_downstream.sh
fi

if [ -z "${SKIP_DINOVQ:-}" ]; then
  echo "== DinoVQ: tokenizer training with PatchGAN + resume, latent-space DINOv2 head distillation"
  bash script/demo_dinovq.sh outputs/demo_dinovq
fi

if [ -z "${SKIP_UREPA:-}" ]; then
  echo "== U-REPA: caches -> aligned training (2 processes) + baseline -> FID/sFID, alignment, grids"
  bash script/demo_urepa.sh
fi
echo "== demo finished in $((SECONDS - start)) s"
