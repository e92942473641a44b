#!/usr/bin/env bash
# Downstream evaluation on the tiny offline assets, CPU, about 1-2 minutes: stand-in "generated" pairs
# (rendered by the synthetic MVTec generator, not by a diffusion model) -> localization U-Net on them and on
# Perlin anomalies -> ResNet-34 classifier -> results table. Tiny models, a few dozen steps, 64 px, a
# random-init ResNet: every number it prints is MEANINGLESS; it only shows that the pipeline runs.
# Outputs: outputs/demo/downstream/ (results.md, */metrics.json, predictions.png, confusion.png).
set -euo pipefail
cd "$(dirname "$0")/.."
source script/lib/python.sh
PY=$PYTHON
OUT=${OUT:-outputs/demo/downstream}
TINY=${TINY:-.cache/tiny}
export HF_HUB_OFFLINE=1

"$PY" preprocessing/make_tiny_assets.py --out "$TINY" > /dev/null
"$PY" preprocessing/standin_generated.py --out "$OUT/generate_data" --class_name hazelnut --num_images 8 --size 64
PYTHON="$PY" MVTEC_ROOT="$TINY/mvtec" GEN_ROOT="$OUT/generate_data" OUT="$OUT" RESOLUTION=64 \
  LOC_STEPS=${LOC_STEPS:-30} LOC_BATCH=4 BASE_WIDTH=8 CLS_STEPS=${CLS_STEPS:-12} CLS_BATCH=4 OVERWRITE=1 \
  NOTE="DEMO on tiny synthetic data, stand-in generated pairs, few steps: values are meaningless" \
  EXTRA_LOC="--checkpointing_steps 15 --report_to none" \
  EXTRA_CLS="--resnet_weights none --checkpointing_steps 12 --report_to none" \
  bash script/eval/downstream.sh hazelnut
echo "demo done: $OUT/results.md"
