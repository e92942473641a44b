#!/usr/bin/env bash
# The demo: every pipeline end to end on generated tiny assets, offline, on CPU. Sets up .env first when it
# is missing or requirements.txt changed (script/lib/env.sh); PYTHON=/path/to/python skips that set-up.
#   bash script/demo.sh
# Each system has its own script (run alone too); set SKIP_ANOMALY=1, SKIP_DOWNSTREAM=1, SKIP_DINOVQ=1 or
# SKIP_UREPA=1 to leave one out. Everything is written under outputs/demo/ (foundation/, anomaly/, downstream/,
# dinovq/, urepa/); the tiny assets go to .cache/tiny/, the trained stand-ins to .cache/trained/ (built once, ~10-25 min
# on 2 cores, then reused). The anomaly part and the foundation grid use the trained stand-in SD-1.5/DINOv2 (they
# draw digits and hazelnuts); the other parts use random-weight tiny models, and LPIPS/Inception run with random
# weights (none can be downloaded offline): their pictures are noise and metric values only show that the code runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source script/lib/env.sh
ensure_env
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$SECONDS
part() { echo; echo "== $1 ($((SECONDS - start)) s so far)"; echo "   expect: $2"; }

part "assets: tiny SD-1.5 pipeline, tiny DINOv2, synthetic MVTec AD and ImageNet -> .cache/tiny" \
  "generated once (~10-20 s), then reused; later parts print one line 'tiny assets: up to date'"
"$PYTHON" preprocessing/make_tiny_assets.py --out .cache/tiny

part "trained stand-ins: SD-1.5-layout VAE + U-Net + CLIP text encoder, tiny DINOv2, digit classifier -> .cache/trained" \
  "built once from sklearn's digits + synthetic MVTec (minutes; held-out PSNR and accuracies printed), then 'up to date'"
"$PYTHON" preprocessing/trained_assets.py --out .cache/trained

part "foundation: pipeline load + sample, DINOv2 adapter from an official-layout checkpoint, trained stand-in samples" \
  "a 2-image grid of noise (random-weight SD-1.5), the DINOv2 token shapes, a grid of digits/hazelnuts/carpets"
"$PYTHON" script/demo_foundation.py --assets .cache/tiny --out outputs/demo/foundation --trained_assets .cache/trained

if [ -z "${SKIP_ANOMALY:-}" ]; then
  part "anomaly generation: stage 1 -> stage 2 -> image/fg/mask generation -> IC-LPIPS and IS -> figures" \
    "a few LoRA steps on the trained stand-in: hazelnut images (defects not learnt in 4+4 steps), masks from untrained fg; mask IoU ~0.85-1.0 on synthetic fg; IC-LPIPS/IS meaningless (random nets)"
  bash script/demo_anomaly.sh
fi

if [ -z "${SKIP_DOWNSTREAM:-}" ]; then
  part "downstream evaluation: localization U-Net (stand-in generated pairs + Perlin baseline), ResNet-34 classifier, table" \
    "a results table and figures whose rows say 'values are meaningless' (tiny models, random-init ResNet)"
  PYTHON="$PYTHON" OUT=outputs/demo/downstream bash script/demo_downstream.sh
fi

if [ -z "${SKIP_DINOVQ:-}" ]; then
  part "DinoVQ: tokenizer training with PatchGAN + resume, latent-space DINOv2 head distillation" \
    "PSNR ~10 dB after 10 steps, 'LPIPS/rFID skipped' warnings (no weights offline), a resume at step 8"
  bash script/demo_dinovq.sh outputs/demo/dinovq
fi

if [ -z "${SKIP_UREPA:-}" ]; then
  part "U-REPA: caches -> aligned training (2 processes) + baseline -> FID/sFID, alignment, grids" \
    "one corrupt JPEG skipped and counted; labelled noise grids, aligned ~ baseline; FID ~2e-13 from a random Inception (meaningless); SVCCA ~0.2-0.3"
  bash script/demo_urepa.sh
fi
echo
echo "== demo finished in $((SECONDS - start)) s; outputs under outputs/demo/"
