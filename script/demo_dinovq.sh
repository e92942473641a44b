#!/usr/bin/env bash
# DinoVQ + latent DINOv2 head demo on the tiny offline assets (CPU, a few minutes): train -> resume -> export ->
# tokenize (codes LMDB cache) -> evaluate, then the latent head. The tiny tokenizer and the Inception are RANDOM /
# barely trained: the numbers and pictures show the pipeline, not a result.
#   bash script/demo_dinovq.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
source script/lib/python.sh
PY=$PYTHON
OUT=${1:-outputs/demo/dinovq}
TINY=.cache/tiny
export HF_HUB_OFFLINE=1

"$PY" preprocessing/make_tiny_assets.py --out "$TINY"
rm -rf "${OUT:?}/dinovq" "$OUT/latent_head" "$OUT/tokenizer_step8" "$OUT/codes" "$OUT/eval"  # a demo run starts fresh

# 8 steps of DinoVQ (tiny ViT, PatchGAN from step 4, EMA of the generator), checkpoint at 4, eval + PNG grid at
# 4 and 8, then a resume from the latest checkpoint that continues to 10 steps and exports $OUT/dinovq/dinovq.
"$PY" train/dinovq/train.py --config configs/dinovq_tiny_demo.yaml --output_dir "$OUT/dinovq" --ema \
    --max_steps 10 --stop_at_step 8 \
    --set data.train_dir="$TINY/imagenet" dino.source="$TINY/dinov2/dinov2_tiny14_pretrain.pth"
"$PY" train/dinovq/train.py --config configs/dinovq_tiny_demo.yaml --output_dir "$OUT/dinovq" --ema \
    --max_steps 10 --resume_from_checkpoint latest \
    --set data.train_dir="$TINY/imagenet" dino.source="$TINY/dinov2/dinov2_tiny14_pretrain.pth"
# any checkpoint exports too (live weights here; the default takes the EMA when the checkpoint has it)
"$PY" train/dinovq/export.py "$OUT/dinovq/checkpoint-8" --output "$OUT/tokenizer_step8" --weights live

# Tokenize the tiny ImageNet train split into an LMDB code cache ([2, 4, 4] int16 per image: image + flip), as
# two shards of one cache (on a cluster: parallel jobs), then evaluate the final tokenizer on the val split.
"$PY" preprocessing/sample_imagenet_subset.py --imagenet_root "$TINY/imagenet" --per_class 2 \
    --class_index_json "$TINY/imagenet/imagenet_class_index.json" --out "$OUT/codes/train.csv"
for i in 0 1; do
  "$PY" preprocessing/extract_dinovq_codes.py --tokenizer "$OUT/dinovq/dinovq" --csv "$OUT/codes/train.csv" \
      --output "$OUT/codes/cache" --flip --num_shards 2 --shard_index $i --batch_size 8 --num_workers 0 --no_progress
done
"$PY" -c "
import sys; sys.path.insert(0, '.')
from datasets.dinovq_codes import DinoVQCodes
from models.dinovq import DinoVQModel
codes, tok = DinoVQCodes('$OUT/codes/cache'), DinoVQModel.from_pretrained('$OUT/dinovq/dinovq')
key = codes.keys()[0]
print(f'{len(codes)} images tokenized; {key}: codes {tuple(codes.get(key).shape)} ->',
      f'decode_code -> {tuple(tok.decode_code(codes.get(key)[None]).shape)}')"
# LPIPS needs the VGG16 weights (absent offline): --no_lpips; rFID with a RANDOM Inception (meaningless value).
"$PY" eval/evaluate_dinovq.py --tokenizer "$OUT/dinovq/dinovq" --data "$TINY/imagenet" --split val \
    --output_dir "$OUT/eval" --per_class --no_lpips --inception_path random --num_workers 0 --batch_size 8 \
    --note "tiny tokenizer, 10 CPU steps; random Inception: values meaningless"

# Distil a latent-space patch head for the tiny DINOv2 on the tiny SD-1.5 VAE latents.
"$PY" train/latent_dino_head/train.py --sd_path "$TINY/sd15" \
    --dino_source "$TINY/dinov2/dinov2_tiny14_pretrain.pth" --dino_variant tiny14 --resolution 56 \
    --image_size 64 --data_dir "$TINY/imagenet" --output_dir "$OUT/latent_head" \
    --hidden 32 --depth 2 --batch_size 4 --max_train_steps 20 --checkpointing_steps 10 --num_workers 0 \
    --log_every 5 --overwrite_output_dir

echo "outputs: $OUT/dinovq (checkpoints, dinovq/ = exported tokenizer, samples/*.png, logs/ for TensorBoard),"
echo "         $OUT/codes (code cache), $OUT/eval (metrics.json, reconstructions.png), $OUT/latent_head"
