#!/usr/bin/env bash
# One device call (eighth session) for the speed rows still unmeasured, in priority order, each under its own time
# limit (a step cut off keeps the rows it wrote):
#   dit:   DiT-XL/2 256 px batch 32, ours `default` vs `fused-regional` (the fused preset compiled per block: the
#          whole-model compile ran past 280 s twice) and FP8 linears, beside diffusers compiled      (issue 6)
#   dydit: DyDiT-XL/2 λ 0.5: dense / dense replayed per step as CUDA graphs / sliced-cap / sliced-cap graphs (issue 8)
#   var:   the user path of VAR's CUDA graphs on the shipped model (scripts/gpu/var_graphs_check.sh)        (issue 9)
# STEPS chooses (default "dit dydit var"); T_DIT / T_DYDIT / T_VAR the limits; DIT_PRESETS, DIT_BATCHES, DIT_FP8
# (empty: no FP8 rows). Carry: [".whl"].
set -uo pipefail
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
mkdir -p bench/results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
STEPS=${STEPS:-"dit dydit var"}
run() {  # NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name ($limit s): $*" | tee -a "$OUT/speed_round8.log"
  timeout "$limit" "$@" >> "$OUT/speed_round8.log" 2>&1; echo "exit $?" | tee -a "$OUT/speed_round8.log"
}
[[ " $STEPS " == *" dit "* ]] && run dit ${T_DIT:-330} python3 bench/sample_dit.py \
  --workloads dit256 --presets ${DIT_PRESETS:-default,fused-regional} --diffusers-presets default --batches ${DIT_BATCHES:-32} \
  --split-preset ${DIT_SPLIT:-fused-regional} ${DIT_FP8---fp8} --budget-s $((${T_DIT:-330} - 60)) --out bench/results/${DIT_OUT:-sample_dit_round8.json}
[[ " $STEPS " == *" dydit "* ]] && run dydit ${T_DYDIT:-200} python3 bench/dydit_speed.py --size XL \
  --batches ${DYDIT_BATCHES:-8 32 1} --steps 50 --lams 0.5 --repeats 2 --no-split \
  --variants dense dense-graphs dense-compiled sliced-cap sliced-cap-graphs --out bench/results/dydit_speed_graphs.json
[[ " $STEPS " == *" var "* ]] && { echo "== var" >> "$OUT/speed_round8.log"; timeout ${T_VAR:-60} bash scripts/gpu/var_graphs_check.sh >> "$OUT/speed_round8.log" 2>&1; echo "exit $?" >> "$OUT/speed_round8.log"; }
cp bench/results/${DIT_OUT:-sample_dit_round8.json} bench/results/dydit_speed_graphs.json "$OUT"/ 2>/dev/null
grep -E "^== |^exit|Error" "$OUT/speed_round8.log" | cut -c1-300
ls -la "$OUT"
