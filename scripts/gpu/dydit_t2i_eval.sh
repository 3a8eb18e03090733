#!/usr/bin/env bash
# One device call (seventeenth session): the shipped text DyDiT against the dense shapes-t2i on N captions per object
# count with seed SEED (other captions and noise than the training calls' seed-0 set), the dense model measured in
# the same call; the folder's card and README are left as they are (--no-card).  issue 8
# Usage: N=1920 SEED=1 bash scripts/gpu/dydit_t2i_eval.sh   (carry [".whl"])
set -uo pipefail
N=${N:-1920}
SEED=${SEED:-1}
FOLDER=${FOLDER:-weights/shapes-dydit-t2i}
source scripts/gpu/env.sh
device_header "N=$N SEED=$SEED FOLDER=$FOLDER bash scripts/gpu/dydit_t2i_eval.sh"
OMP_NUM_THREADS=8 python3 scripts/finetune_dydit.py --evaluate "$FOLDER" --final-eval-n "$N" --eval-seed "$SEED" \
  --no-card > "$OUT/comparison.json" 2> "$OUT/eval.log"
echo "exit $? at $SECONDS s"
show_comparisons "$OUT/comparison.json"
tail -c 400 "$OUT/eval.log"
