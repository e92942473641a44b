#!/usr/bin/env bash
# U-REPA on the tiny assets, CPU: preprocessing -> aligned run (2 processes) + baseline run (1 process)
# -> evaluation of both final checkpoints (EMA sampling with interval CFG, FID/sFID with a RANDOM Inception
# unless INCEPTION is set, SVCCA + t-SNE alignment, labelled fixed-seed comparison grid).
# Outputs under outputs/demo/urepa/ (the paths are in configs/sd15_repa_tiny.yaml).
# The evaluation is cut to what the demo needs (one checkpoint per run, 10 samples, 8 images for the alignment
# analysis): on a CPU the FID/sFID matrix square roots (2048 x 2048) dominate its time.
set -euo pipefail
cd "$(dirname "$0")/.."
source script/lib/python.sh
OUT=outputs/demo/urepa
INCEPTION=${INCEPTION:-random}   # path to inception-2015-12-05.pt for meaningful FID/sFID
export HF_HUB_OFFLINE=1
ACCELERATE=("$PYTHON" -m accelerate.commands.launch --num_machines 1 --mixed_precision no --dynamo_backend no)

[ -f "$OUT/data/clip.safetensors" ] || OUT=$OUT bash script/demo_urepa_preprocess.sh
rm -rf "$OUT/run_aligned" "$OUT/run_baseline" "$OUT/eval"  # a demo run starts fresh; the caches in data/ stay

echo "== aligned run (lambda 0.8, w 3): 2 CPU processes (gloo); on CPU accelerate needs --multi_gpu for >1 process"
"${ACCELERATE[@]}" --multi_gpu --num_processes 2 train_sd15.py --config configs/sd15_repa_tiny.yaml
echo "== baseline run (lambda 0): same LoRA, no hooks/heads, 1 process"
"${ACCELERATE[@]}" --num_processes 1 train_sd15.py --config configs/sd15_repa_tiny.yaml \
    --set output_dir=$OUT/run_baseline loss.align_coeff=0.0 train.sample_every=0

echo "== evaluation of both final checkpoints"
"$PYTHON" eval/evaluate_sd15.py \
    --checkpoints $OUT/run_aligned/checkpoint-20 --baseline $OUT/run_baseline/checkpoint-20 \
    --out_dir $OUT/eval --num_samples 10 --batch_size 10 --num_steps 5 \
    --ref_dir .cache/tiny/imagenet/ILSVRC/Data/CLS-LOC/val --num_ref 10 --inception_path "$INCEPTION" \
    --align_csv $OUT/data/train.csv --align_latent_dir $OUT/data/latents --align_dino_dir $OUT/data/dino \
    --align_num 8 --grid_classes 0 1 2 3 4 \
    --figure_note "tiny random-weight SD-1.5 trained 20 steps — pictures are noise by design"
echo "U-REPA demo done: $OUT/eval (comparison_grid.png, fid_vs_step.png, tsne_*.png, alignment.json)"
