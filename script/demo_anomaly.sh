#!/usr/bin/env bash
# The whole anomaly pipeline on the tiny offline assets, CPU, a few minutes:
# tiny assets -> stage 1 (DreamBooth LoRA + DINOv2 loss) -> stage 2 (dual LoRA) -> generation (images,
# fg, masks) -> IC-LPIPS and IS -> labelled figures (generated triplets; mask extraction on synthetic fg
# with known masks, IoU printed). Every step runs with the reference-compatible defaults (few-shot split, hv
# flips, bilinear resize, grey fg background, official interaction module, PNDM sampler, official centres).
# The base model is the trained stand-in SD-1.5 (preprocessing/trained_assets.py: trained offline on sklearn digits
# and the synthetic MVTec classes, so it draws hazelnuts), with the trained stand-in DINOv2 for the perceptual term;
# TRAINED=none uses the random-weight tiny assets instead (pictures are then noise). LPIPS/Inception have random
# weights (no real weights offline): those metric values only show that everything runs.
# Outputs go to outputs/demo/anomaly/ (OUT=... to move them).
set -euo pipefail
cd "$(dirname "$0")/.."
source script/lib/python.sh
PY=$PYTHON
OUT=${OUT:-outputs/demo/anomaly}
TINY=${TINY:-.cache/tiny}
STEPS1=${STEPS1:-4}
STEPS2=${STEPS2:-8}   # stage 2 continues the stage-1 step count: STEPS2 > STEPS1
NUM_IMAGES=${NUM_IMAGES:-8}
export HF_HUB_OFFLINE=1

TRAINED=${TRAINED:-.cache/trained}
NAME=hazelnut; ANOMALY=hole
if [ "$TRAINED" = none ]; then
  "$PY" preprocessing/make_tiny_assets.py --out "$TINY"
  MODEL="$TINY/sd15"; DATA="$TINY/mvtec"; DINO_WEIGHTS="$TINY/dinov2/dinov2_tiny14_pretrain.pth"
  PROMPT="a vfx"; NOTE="tiny random-weight SD-1.5 trained a few steps — pictures are noise by design"
else
  "$PY" preprocessing/trained_assets.py --out "$TRAINED" > /dev/null
  MODEL="$TRAINED/sd15"; DATA="$TRAINED/data/mvtec"; DINO_WEIGHTS="$TRAINED/dinov2/dinov2_tiny14_pretrain.pth"
  # the stand-in base knows this prompt (the reference's "a vfx" means nothing to it after a few LoRA steps)
  PROMPT="a photo of a hazelnut"
  NOTE="trained stand-in SD-1.5 + a few LoRA steps (tiny, 64 px): hazelnuts, defects not yet learnt"
fi
# A demo run starts fresh: generation skips files that exist, and would keep a previous run's images.
rm -rf "${OUT:?}/$NAME" "$OUT/generate_data" "$OUT/figures"
DINO=(--use_dinov2_loss --dinov2_loss_weight 0.1 --dinov2_model_name tiny14 --dinov2_loss_type l2
      --dinov2_feature_layers 1 3 --dinov2_weights "$DINO_WEIGHTS" --dinov2_resolution 28)

echo "== stage 1 =="
"$PY" train/stage1-full/train.py --mixed_precision no --mvtec_name $NAME --pretrained_model_name_or_path "$MODEL" \
  --instance_data_dir "$DATA" --output_dir "$OUT/$NAME/stage1-full" --instance_prompt "$PROMPT" --resolution 64 \
  --train_batch_size 2 --learning_rate 1e-4 --max_train_steps $STEPS1 --checkpointing_steps 2 --rank 4 \
  --train_text_encoder --report_to none --seed 0 "${DINO[@]}"

echo "== stage 2 =="
"$PY" train/stage2-dual/train.py --mixed_precision no --mvtec_name $NAME --mvtec_anamaly_name $ANOMALY \
  --pretrained_model_name_or_path "$MODEL" --instance_data_dir "$DATA" --output_dir "$OUT/$NAME/stage2-$ANOMALY-dual" \
  --instance_prompt_blend "$PROMPT with sks" --instance_prompt_fg "sks" --resolution 64 --train_batch_size 2 \
  --learning_rate 1e-4 --max_train_steps $STEPS2 --checkpointing_steps 4 \
  --resume_from_checkpoint "$OUT/$NAME/stage1-full/checkpoint-$STEPS1" --rank 4 --train_text_encoder \
  --report_to none --seed 0 "${DINO[@]}"

echo "== generation =="
# the reference's sampler (--preset official: PNDM, guidance 2.5), 5 steps instead of 100 to stay fast on CPU
"$PY" eval/generate.py stage1 --pretrained_model_name_or_path "$MODEL" --lora_dir "$OUT/$NAME/stage1-full" \
  --mvtec_name $NAME --output_root "$OUT/generate_data" --num_images $NUM_IMAGES --preset official \
  --num_inference_steps 5 --batch_size 4
"$PY" eval/generate.py stage2 --pretrained_model_name_or_path "$MODEL" \
  --weights_dir "$OUT/$NAME/stage2-$ANOMALY-dual" --mvtec_name $NAME --mvtec_anomaly_name $ANOMALY \
  --output_root "$OUT/generate_data" --num_images $NUM_IMAGES --preset official --num_inference_steps 5 --batch_size 4

echo "== IC-LPIPS (random VGG: smoke test only; official centres: first N//3 sorted test images) =="
"$PY" eval/compute_ic_lpips.py --gen_root "$OUT/generate_data" --class_name $NAME --mvtec_root "$DATA" \
  --num_full_centres 3 --random_vgg --resolution 64
echo "== Inception Score (random Inception: smoke test only) =="
"$PY" eval/compute_is.py --image_dir "$OUT/generate_data/$NAME/$ANOMALY" --splits 2 --batch_size 6 --random_weights \
  --output_json "$OUT/generate_data/$NAME/$ANOMALY/is.json"
echo "== figures: generated triplets (labelled) and mask extraction on synthetic fg with known masks =="
"$PY" script/demo_anomaly_figures.py --gen_dir "$OUT/generate_data/$NAME" --defect $ANOMALY --mvtec_root "$DATA" \
  --out "$OUT/figures" --note "$NOTE"
echo "demo done: $OUT (figures/generated_triplets.png, figures/mask_extraction.png, generate_data/)"
