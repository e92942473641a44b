#!/usr/bin/env bash
# U-REPA preprocessing on the tiny assets (CPU, ~1-2 min): sample CSV -> one-pass latent + DINO caches
# -> CLIP class embeddings -> a dataset smoke check. Outputs under ${OUT:-outputs/demo/urepa}/data:
#   train.csv  latents/  dino/  clip.safetensors
# Real data: see docs/urepa_preprocessing.md (same scripts, real weights and ImageNet).
set -euo pipefail
cd "$(dirname "$0")/.."
source script/lib/python.sh
PY=$PYTHON
OUT=${OUT:-outputs/demo/urepa}/data
TINY=${TINY:-.cache/tiny}
mkdir -p "$OUT"

"$PY" preprocessing/make_tiny_assets.py --out "$TINY"

# 10 images per class of the 5 tiny classes (class 0 includes the deliberately corrupt JPEG)
"$PY" preprocessing/sample_imagenet_subset.py --imagenet_root "$TINY/imagenet" --per_class 10 \
    --class_index_json "$TINY/imagenet/imagenet_class_index.json" --out "$OUT/train.csv"

# both caches in one pass, split over 2 jobs run in parallel (each resumable; they share the output dirs)
pids=()
for i in 0 1; do
  "$PY" preprocessing/build_caches.py --csv "$OUT/train.csv" --num_shards 2 --shard_index $i \
      --latent_dir "$OUT/latents" --pretrained_model_name_or_path "$TINY/sd15" --vae_resolution 64 \
      --dino_dir "$OUT/dino" --dinov2_weights "$TINY/dinov2/dinov2_tiny14_pretrain.pth" --variant tiny14 \
      --dino_resolution 56 --batch_size 8 --num_workers 1 --shard_size 16 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done  # a failed shard fails the demo

# class prompts "a photo of a {name}" + the null prompt (last row)
"$PY" preprocessing/prepare_clip_embeddings.py --pretrained_model_name_or_path "$TINY/sd15" \
    --class_index_json "$TINY/imagenet/imagenet_class_index.json" --out "$OUT/clip.safetensors"

"$PY" - "$OUT" <<'PYEOF'
import sys
sys.path.insert(0, ".")
from datasets.sd15_aligned import SD15AlignedDataset
out = sys.argv[1]
ds = SD15AlignedDataset(f"{out}/train.csv", f"{out}/latents", f"{out}/dino", f"{out}/clip.safetensors",
                        expected={"D": 64, "num_tokens": 16, "dtype": "float16", "encoder": "dinov2_tiny14"})
item = ds[0]
print(ds)
print({"latent": tuple(item["latent"].shape), "dino_tokens.mid": tuple(item["dino_tokens"]["mid"].shape),
       "encoder_hidden_states": tuple(item["encoder_hidden_states"].shape), "class_id": item["class_id"]})
PYEOF
echo "preprocessing demo done: $OUT"
