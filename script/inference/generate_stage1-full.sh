#!/usr/bin/env bash
# Stage-1 generation: N normal images of a class with the stage-1 LoRA -> generate_data/<class>/full/.
# Override any variable from the environment, e.g. NAME=bottle NUM_IMAGES=100 bash script/inference/generate_stage1-full.sh
# Sampler: PRESET=official (default: PNDM, 100 steps, guidance 2.5, as DualAnoDiff's inference) or fast.
set -euo pipefail
cd "$(dirname "$0")/../.."
source script/lib/python.sh  # PYTHON, else .env/bin/python when .env exists
PY=$PYTHON
MODEL_NAME=${MODEL_NAME:-models/stable-diffusion-v1-5}
NAME=${NAME:-hazelnut}
OUTPUT_DIR=${OUTPUT_DIR:-all_generate}
LORA_DIR=${LORA_DIR:-$OUTPUT_DIR/$NAME/stage1-full}
GEN_ROOT=${GEN_ROOT:-generate_data}
NUM_IMAGES=${NUM_IMAGES:-500}
# official = DualAnoDiff's inference (PNDM, 100 steps, guidance 2.5); fast = DDIM, 50 steps, 2.5.
# SCHEDULER / STEPS / GUIDANCE, when set, override the preset's values.
PRESET=${PRESET:-official}
SCHEDULER=${SCHEDULER:-}
STEPS=${STEPS:-}
GUIDANCE=${GUIDANCE:-}
SEED=${SEED:-0}
BATCH_SIZE=${BATCH_SIZE:-8}

if [ ! -d "$MODEL_NAME" ] && [[ "$MODEL_NAME" != */* || "$MODEL_NAME" == ./* || "$MODEL_NAME" == /* ]]; then
  echo "Base model $MODEL_NAME not found. Put SD-1.5 (diffusers layout) there or set MODEL_NAME;" \
       "for the tiny CPU demo run: bash script/demo_anomaly.sh" >&2
  exit 1
fi
if [ ! -d "$LORA_DIR" ]; then
  echo "Stage-1 LoRA dir $LORA_DIR not found: train it with bash script/train/train_stage1-full.sh or set LORA_DIR." >&2
  exit 1
fi
exec "$PY" eval/generate.py stage1 \
  --pretrained_model_name_or_path "$MODEL_NAME" \
  --lora_dir "$LORA_DIR" \
  --mvtec_name "$NAME" \
  --output_root "$GEN_ROOT" \
  --num_images "$NUM_IMAGES" \
  --preset "$PRESET" \
  ${SCHEDULER:+--scheduler "$SCHEDULER"} \
  ${STEPS:+--num_inference_steps "$STEPS"} \
  ${GUIDANCE:+--guidance_scale "$GUIDANCE"} \
  --seed "$SEED" \
  --batch_size "$BATCH_SIZE" \
  "$@"
