#!/usr/bin/env bash
# U-REPA on the tiny assets, CPU: preprocessing -> aligned run (2 processes) + baseline run (1 process)
# -> evaluation (EMA sampling with interval CFG, FID/sFID with a RANDOM Inception unless INCEPTION is set,
# SVCCA + t-SNE alignment, fixed-seed comparison grid). Outputs under outputs/demo_urepa/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.env/bin/python}
ACC=${ACCELERATE:-.env/bin/accelerate}
OUT=outputs/demo_urepa
INCEPTION=${INCEPTION:-random}   # path to inception-2015-12-05.pt for meaningful FID/sFID
export HF_HUB_OFFLINE=1

[ -f "$OUT/data/clip.safetensors" ] || bash script/demo_urepa_preprocess.sh

# aligned (lambda 0.8, w 3): 2 CPU processes (gloo). On CPU, accelerate needs --multi_gpu to start >1 process.
"$ACC" launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
    train_sd15.py --config configs/sd15_repa_tiny.yaml
# baseline (lambda 0): same LoRA, no hooks/heads, 1 process
"$ACC" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    train_sd15.py --config configs/sd15_repa_tiny.yaml \
    --set output_dir=$OUT/run_baseline loss.align_coeff=0.0 train.sample_every=0

"$PY" eval/evaluate_sd15.py \
    --checkpoints $OUT/run_aligned/checkpoint-10 $OUT/run_aligned/checkpoint-20 \
    --baseline $OUT/run_baseline/checkpoint-20 \
    --out_dir $OUT/eval --num_samples 10 --batch_size 10 --num_steps 5 \
    --ref_dir .cache/tiny/imagenet/ILSVRC/Data/CLS-LOC/val --num_ref 10 --inception_path "$INCEPTION" \
    --align_csv $OUT/data/train.csv --align_latent_dir $OUT/data/latents --align_dino_dir $OUT/data/dino \
    --align_num 32 --grid_classes 0 1 2 3 4
echo "U-REPA demo done: $OUT/eval (fid_vs_step.png, comparison_grid.png, tsne_*.png, alignment.json)"
