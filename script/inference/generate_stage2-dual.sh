#!/usr/bin/env bash
# Stage-2 generation: N (image, fg, mask) triplets of one defect type with the dual LoRA model
# -> generate_data/<class>/<defect>/{image,fg,mask}/. Variables are overridable from the environment.
# Sampler: PRESET=official (default: PNDM, 100 steps, guidance 2.5, as DualAnoDiff's inference) or fast.
set -euo pipefail
cd "$(dirname "$0")/../.."
source script/lib/python.sh  # PYTHON, else .env/bin/python when .env exists
PY=$PYTHON
MODEL_NAME=${MODEL_NAME:-models/stable-diffusion-v1-5}
NAME=${NAME:-hazelnut}
ANOMALY=${ANOMALY:-hole}
OUTPUT_DIR=${OUTPUT_DIR:-all_generate}
WEIGHTS_DIR=${WEIGHTS_DIR:-$OUTPUT_DIR/$NAME/stage2-$ANOMALY-dual}
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
if [ ! -f "$WEIGHTS_DIR/dual_config.json" ]; then
  echo "Stage-2 weights $WEIGHTS_DIR/dual_config.json not found: train with bash script/train/train_stage2-dual.sh" \
       "or set WEIGHTS_DIR (the stage-2 --output_dir or one of its checkpoint-<step>/ dirs)." >&2
  exit 1
fi
exec "$PY" eval/generate.py stage2 \
  --pretrained_model_name_or_path "$MODEL_NAME" \
  --weights_dir "$WEIGHTS_DIR" \
  --mvtec_name "$NAME" \
  --mvtec_anomaly_name "$ANOMALY" \
  --output_root "$GEN_ROOT" \
  --num_images "$NUM_IMAGES" \
  --preset "$PRESET" \
  ${SCHEDULER:+--scheduler "$SCHEDULER"} \
  ${STEPS:+--num_inference_steps "$STEPS"} \
  ${GUIDANCE:+--guidance_scale "$GUIDANCE"} \
  --seed "$SEED" \
  --batch_size "$BATCH_SIZE" \
  "$@"
