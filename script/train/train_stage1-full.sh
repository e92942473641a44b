#!/usr/bin/env bash
# Stage 1 (full): DreamBooth LoRA on one MVTec class's train/good images + DINOv2 perceptual loss.
# The seed command, with MODEL_NAME, INSTANCE_DIR, NAME, OUTPUT_DIR overridable from the environment and
# any extra flags passed through ("$@" comes last, so it overrides the defaults below).
#   bash script/train/train_stage1-full.sh
#   NAME=bottle bash script/train/train_stage1-full.sh --max_train_steps 3000
#   bash script/train/train_stage1-full.sh --help     # the trainer's flags
# Python: PYTHON, else .env/bin/python when .env exists; launcher: LAUNCH, else accelerate's launcher run by that
# Python (script/lib/python.sh). Demo on the tiny assets (CPU, minutes): see docs/anomaly_training.md.
# Data handling (few-shot split, flips, resize, fg background) is the reference trainers' by default: see
# "Deviations from the reference" in docs/anomaly_training.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
source script/lib/python.sh
for arg in "$@"; do  # --help needs no model or data
  if [ "$arg" = "--help" ] || [ "$arg" = "-h" ]; then exec "$PYTHON" train/stage1-full/train.py --help; fi
done

MODEL_NAME="${MODEL_NAME:-models/stable-diffusion-v1-5}"
INSTANCE_DIR="${INSTANCE_DIR:-datasets/mvtec_ad}"
NAME="${NAME:-hazelnut}"
OUTPUT_DIR="${OUTPUT_DIR:-all_generate/}"

if [ ! -d "$MODEL_NAME" ] && [[ "$MODEL_NAME" != */* || "$MODEL_NAME" == models/* ]]; then
  echo "error: Stable Diffusion 1.5 not found at MODEL_NAME=$MODEL_NAME" >&2
  echo "  Download it in diffusers layout on a machine with network (hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir $MODEL_NAME)" >&2
  echo "  or point MODEL_NAME at a local copy. Demo on the tiny model instead:" >&2
  echo "    $PYTHON preprocessing/make_tiny_assets.py --out .cache/tiny" >&2
  echo "    export MODEL_NAME=.cache/tiny/sd15 INSTANCE_DIR=.cache/tiny/mvtec OUTPUT_DIR=outputs/tiny_anomaly_scripts" >&2
  echo "    and the flags of docs/anomaly_training.md (Demo on the tiny assets)." >&2
  exit 2
fi
if [ ! -d "$INSTANCE_DIR/$NAME" ]; then
  echo "error: MVTec AD class dir $INSTANCE_DIR/$NAME not found (INSTANCE_DIR=$INSTANCE_DIR, NAME=$NAME)." >&2
  echo "  Download MVTec AD from https://www.mvtec.com/company/research/datasets/mvtec-ad and extract it to $INSTANCE_DIR," >&2
  echo "  or use the synthetic one: $PYTHON preprocessing/make_tiny_assets.py --out .cache/tiny; INSTANCE_DIR=.cache/tiny/mvtec" >&2
  exit 2
fi

# shellcheck disable=SC2086
$LAUNCH train/stage1-full/train.py \
  --mixed_precision="no" \
  --mvtec_name="$NAME" \
  --pretrained_model_name_or_path="$MODEL_NAME" \
  --instance_data_dir="$INSTANCE_DIR" \
  --output_dir="$OUTPUT_DIR/$NAME/stage1-full" \
  --instance_prompt="a vfx" \
  --resolution=512 \
  --train_batch_size=8 \
  --learning_rate=2e-5 \
  --max_train_steps=5000 \
  --rank 32 \
  --train_text_encoder \
  --use_dinov2_loss \
  --dinov2_loss_weight=0.1 \
  --dinov2_model_name="vitb14" \
  --dinov2_loss_type="l2" \
  --dinov2_feature_layers 3 6 9 11 \
  "$@"
