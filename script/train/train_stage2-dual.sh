#!/usr/bin/env bash
# Stage 2 (dual): dual-interrelated LoRA on one defect type, started from the stage-1 checkpoint.
# The seed command, with MODEL_NAME, INSTANCE_DIR, NAME, ANOMALY, OUTPUT_DIR (and STAGE1_CKPT) overridable from
# the environment; extra flags are passed through ("$@" comes last, so it overrides the defaults below).
#   bash script/train/train_stage2-dual.sh
#   ANOMALY=crack bash script/train/train_stage2-dual.sh --dual_mode shared
#   bash script/train/train_stage2-dual.sh --help     # the trainer's flags
# Python: PYTHON, else .env/bin/python when .env exists; launcher: LAUNCH, else accelerate's launcher run by that
# Python (script/lib/python.sh).
# Data handling (few-shot split, flips, resize, fg background) and the stage-2 interaction module are the
# reference trainers' by default: see "Deviations from the reference" in docs/anomaly_training.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
source script/lib/python.sh
for arg in "$@"; do  # --help needs no model, data or checkpoint
  if [ "$arg" = "--help" ] || [ "$arg" = "-h" ]; then exec "$PYTHON" train/stage2-dual/train.py --help; fi
done

MODEL_NAME="${MODEL_NAME:-models/stable-diffusion-v1-5}"
INSTANCE_DIR="${INSTANCE_DIR:-datasets/mvtec_ad}"
NAME="${NAME:-hazelnut}"
ANOMALY="${ANOMALY:-hole}"
OUTPUT_DIR="${OUTPUT_DIR:-all_generate/}"
STAGE1_CKPT="${STAGE1_CKPT:-$OUTPUT_DIR/$NAME/stage1-full/checkpoint-5000}"

if [ ! -d "$MODEL_NAME" ] && [[ "$MODEL_NAME" != */* || "$MODEL_NAME" == models/* ]]; then
  echo "error: Stable Diffusion 1.5 not found at MODEL_NAME=$MODEL_NAME" >&2
  echo "  Download it in diffusers layout (hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir $MODEL_NAME)" >&2
  echo "  or point MODEL_NAME at a local copy; for the tiny demo see docs/anomaly_training.md" >&2
  echo "  (MODEL_NAME=.cache/tiny/sd15 INSTANCE_DIR=.cache/tiny/mvtec after $PYTHON preprocessing/make_tiny_assets.py --out .cache/tiny)." >&2
  exit 2
fi
if [ ! -d "$INSTANCE_DIR/$NAME/test/$ANOMALY" ]; then
  echo "error: $INSTANCE_DIR/$NAME/test/$ANOMALY not found (INSTANCE_DIR=$INSTANCE_DIR NAME=$NAME ANOMALY=$ANOMALY)." >&2
  echo "  Download MVTec AD and extract it to $INSTANCE_DIR, or use the synthetic one (INSTANCE_DIR=.cache/tiny/mvtec)." >&2
  exit 2
fi
if [ ! -d "$STAGE1_CKPT" ]; then
  echo "error: stage-1 checkpoint $STAGE1_CKPT not found: run script/train/train_stage1-full.sh first, or set STAGE1_CKPT." >&2
  exit 2
fi

# shellcheck disable=SC2086
$LAUNCH train/stage2-dual/train.py \
  --mixed_precision="no" \
  --mvtec_name="$NAME" \
  --mvtec_anamaly_name="$ANOMALY" \
  --pretrained_model_name_or_path="$MODEL_NAME" \
  --instance_data_dir="$INSTANCE_DIR" \
  --output_dir="$OUTPUT_DIR/$NAME/stage2-$ANOMALY-dual" \
  --instance_prompt_blend="a vfx with sks" \
  --instance_prompt_fg="sks" \
  --resolution=512 \
  --train_batch_size=4 \
  --learning_rate=2e-5 \
  --max_train_steps=8000 \
  --resume_from_checkpoint="$STAGE1_CKPT" \
  --rank 32 \
  --train_text_encoder \
  --use_dinov2_loss \
  --dinov2_loss_weight=0.1 \
  --dinov2_model_name="vitb14" \
  --dinov2_loss_type="l2" \
  --dinov2_feature_layers 3 6 9 11 \
  "$@"
