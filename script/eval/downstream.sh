#!/usr/bin/env bash
# Downstream evaluation of one class's generated anomalies, in one command:
#   localization  - DRAEM's segmentation U-Net trained on the generated pairs (+ real train/good images)
#   baseline      - the same U-Net trained on DRAEM-style Perlin-noise anomalies
#   classification- ResNet-34 trained on the generated images, labelled by defect type (needs >= 2 types)
#   table         - $OUT/results.md over every class evaluated under $OUT
# All three are tested on the real MVTec test images the generator never saw (see docs/anomaly_downstream.md).
#
#   bash script/eval/downstream.sh hazelnut
#
# Environment (defaults = the references' protocol):
#   MVTEC_ROOT=datasets/mvtec_ad  GEN_ROOT=generate_data  OUT=outputs/downstream  DEFECTS="" (all types)
#   SPLIT_RULE="" (datasets/mvtec.py's default; use the rule the generator was trained with)
#   RESOLUTION=256  LOC_STEPS=6400  LOC_BATCH=16  BASE_WIDTH=64
#   CLS_STEPS="" (30 epochs of 5 x the generated images at batch CLS_BATCH, as the references)  CLS_BATCH=8
#   SEED=0  NOTE=""  SKIP_PERLIN=  SKIP_CLASSIFICATION=  EXTRA_LOC="" EXTRA_CLS="" (more flags)
#   OVERWRITE=1 starts every job afresh; otherwise a job continues from its latest checkpoint (a finished
#   job is only re-evaluated).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -ne 1 ]; then
  echo "usage: bash script/eval/downstream.sh <class>   (e.g. hazelnut; settings via environment, see the header)" >&2
  exit 2
fi
CLASS=$1
source script/lib/python.sh  # PYTHON, else .env/bin/python, else python3
PY=$PYTHON
MVTEC_ROOT=${MVTEC_ROOT:-datasets/mvtec_ad}
GEN_ROOT=${GEN_ROOT:-generate_data}
OUT=${OUT:-outputs/downstream}
RESOLUTION=${RESOLUTION:-256}
LOC_STEPS=${LOC_STEPS:-6400}
LOC_BATCH=${LOC_BATCH:-16}
BASE_WIDTH=${BASE_WIDTH:-64}
CLS_BATCH=${CLS_BATCH:-8}
SEED=${SEED:-0}
read -r -a DEFECT_ARGS <<< "${DEFECTS:+--defects $DEFECTS}"
read -r -a SPLIT_ARGS <<< "${SPLIT_RULE:+--split_rule $SPLIT_RULE}"
read -r -a EXTRA_LOC_ARGS <<< "${EXTRA_LOC:-}"
read -r -a EXTRA_CLS_ARGS <<< "${EXTRA_CLS:-}"
if [ -n "${OVERWRITE:-}" ]; then RUN=(--overwrite_output_dir); else RUN=(--resume_from_checkpoint latest); fi
COMMON=(--class_name "$CLASS" --mvtec_root "$MVTEC_ROOT" --resolution "$RESOLUTION" --seed "$SEED"
        --note "${NOTE:-}" "${RUN[@]}" "${DEFECT_ARGS[@]}" "${SPLIT_ARGS[@]}")

echo "== localization: U-Net on generated pairs ($GEN_ROOT/$CLASS)"
"$PY" eval/downstream/localization.py "${COMMON[@]}" --source generated --generated_root "$GEN_ROOT" \
  --output_dir "$OUT/$CLASS/localization-generated" --max_train_steps "$LOC_STEPS" \
  --train_batch_size "$LOC_BATCH" --base_width "$BASE_WIDTH" "${EXTRA_LOC_ARGS[@]}"

if [ -z "${SKIP_PERLIN:-}" ]; then
  echo "== localization baseline: the same U-Net on Perlin-noise anomalies"
  "$PY" eval/downstream/localization.py "${COMMON[@]}" --source perlin \
    --output_dir "$OUT/$CLASS/localization-perlin" --max_train_steps "$LOC_STEPS" \
    --train_batch_size "$LOC_BATCH" --base_width "$BASE_WIDTH" "${EXTRA_LOC_ARGS[@]}"
fi

NUM_DEFECTS=$(if [ -n "${DEFECTS:-}" ]; then echo "$DEFECTS" | wc -w;
              else find "$MVTEC_ROOT/$CLASS/test" -mindepth 1 -maxdepth 1 -type d ! -name good | wc -l; fi)
if [ -n "${SKIP_CLASSIFICATION:-}" ]; then
  echo "== classification skipped (SKIP_CLASSIFICATION)"
elif [ "$NUM_DEFECTS" -lt 2 ]; then
  echo "== classification skipped: it needs at least 2 defect types, this run has $NUM_DEFECTS"
else
  if [ -z "${CLS_STEPS:-}" ]; then  # references: 30 epochs over 5 x (<= 500 images per type), batch CLS_BATCH
    CLS_STEPS=$("$PY" - "$GEN_ROOT/$CLASS" "$CLS_BATCH" ${DEFECTS:-} <<'PYEOF'
import math, sys
from pathlib import Path
root, batch, wanted = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
dirs = [root / d / "image" for d in wanted] if wanted else sorted(root.glob("*/image"))
n = sum(min(500, sum(1 for p in d.glob("*") if p.is_file())) for d in dirs if d.is_dir())
print(max(1, 30 * math.ceil(5 * n / batch)))
PYEOF
)
  fi
  echo "== classification: ResNet-34 on generated images ($CLS_STEPS steps)"
  "$PY" eval/downstream/classification.py "${COMMON[@]}" --generated_root "$GEN_ROOT" \
    --output_dir "$OUT/$CLASS/classification" --max_train_steps "$CLS_STEPS" \
    --train_batch_size "$CLS_BATCH" "${EXTRA_CLS_ARGS[@]}"
fi

echo "== table: $OUT/results.md"
"$PY" eval/downstream/make_table.py --root "$OUT"
