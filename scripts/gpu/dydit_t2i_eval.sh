#!/usr/bin/env bash
# One device call (seventeenth session): the shipped text DyDiT against the dense shapes-t2i on N captions per object
# count with seed SEED (other captions and noise than the training calls' seed-0 set), on a copy of the folder (the
# evaluation rewrites a folder's README and card), the dense model measured in the same call.  issue 8
# Usage: N=1920 SEED=1 bash scripts/gpu/dydit_t2i_eval.sh   (carry [".whl"])
set -uo pipefail
N=${N:-1920}
SEED=${SEED:-1}
FOLDER=${FOLDER:-weights/shapes-dydit-t2i}
source scripts/gpu/env.sh
device_header "N=$N SEED=$SEED FOLDER=$FOLDER bash scripts/gpu/dydit_t2i_eval.sh"
COPY=/tmp/dydit-eval-copy
rm -rf "$COPY"; cp -r "$FOLDER" "$COPY"
python3 - "$COPY" "$(realpath "$FOLDER")" <<'PY'
import json, sys, pathlib
copy, folder = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
cfg = json.loads((copy / "dydit_config.json").read_text())
cfg["base"] = str((folder / cfg["base"]).resolve())  # the copy lives elsewhere: its base by absolute path
(copy / "dydit_config.json").write_text(json.dumps(cfg, indent=2))
PY
OMP_NUM_THREADS=8 python3 scripts/finetune_dydit.py --evaluate "$COPY" --final-eval-n "$N" --eval-seed "$SEED" \
  > "$OUT/comparison.json" 2> "$OUT/eval.log"
echo "exit $? at $SECONDS s"
show_comparisons "$OUT/comparison.json"
tail -c 400 "$OUT/eval.log"
