#!/usr/bin/env bash
# DinoVQ + latent DINOv2 head demo on the tiny offline assets (CPU, about a minute).
#   bash script/demo_dinovq.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
source script/lib/python.sh
PY=$PYTHON
OUT=${1:-outputs/demo/dinovq}
TINY=.cache/tiny
export HF_HUB_OFFLINE=1

"$PY" preprocessing/make_tiny_assets.py --out "$TINY"
rm -rf "${OUT:?}/dinovq" "$OUT/latent_head"  # a demo run starts fresh (the resume below is part of the demo)

# 8 steps of DinoVQ (tiny ViT, PatchGAN from step 4), checkpoint at 4, eval + PNG grid at 4 and 8,
# then a resume from the latest checkpoint that continues to 10 steps.
"$PY" train/dinovq/train.py --config configs/dinovq_tiny_demo.yaml --output_dir "$OUT/dinovq" \
    --set data.train_dir="$TINY/imagenet" dino.source="$TINY/dinov2/dinov2_tiny14_pretrain.pth"
"$PY" train/dinovq/train.py --config configs/dinovq_tiny_demo.yaml --output_dir "$OUT/dinovq" \
    --max_steps 10 --resume_from_checkpoint latest \
    --set data.train_dir="$TINY/imagenet" dino.source="$TINY/dinov2/dinov2_tiny14_pretrain.pth"

# Distil a latent-space patch head for the tiny DINOv2 on the tiny SD-1.5 VAE latents.
"$PY" train/latent_dino_head/train.py --sd_path "$TINY/sd15" \
    --dino_source "$TINY/dinov2/dinov2_tiny14_pretrain.pth" --dino_variant tiny14 --resolution 56 \
    --image_size 64 --data_dir "$TINY/imagenet" --output_dir "$OUT/latent_head" \
    --hidden 32 --depth 2 --batch_size 4 --max_train_steps 20 --checkpointing_steps 10 --num_workers 0 \
    --log_every 5 --overwrite_output_dir

echo "outputs: $OUT/dinovq (checkpoints, samples/*.png, logs/ for TensorBoard), $OUT/latent_head"
