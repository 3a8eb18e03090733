#!/usr/bin/env bash
# One device call (eleventh session, last): (1) compare the DyDiT folders of call 5 that ran out of time (lambda 0.5
# continued, lambda 0.6) with the dense shapes-c2i on 480 prompts, then (2) issue 6's unmeasured DiT-XL/2 512 px rows:
# bench/sample_dit.py --workloads dit512 at batch 8 (ours default / cudagraphs / eager, diffusers default / eager),
# within what is left of TOTAL seconds.
# Usage: TOTAL=560 bash scripts/gpu/final_round11.sh   (carry [".whl"])
set -uo pipefail
TOTAL=${TOTAL:-560}
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
R=bench/results/gpu_round11/call5/models/runs
mkdir -p "$OUT/compare"
OUT=$OUT/compare LAMS="" WATCH=200 COMPARE="$R/dydit-lam0.5/model $R/dydit-lam0.6/model" \
  bash scripts/gpu/dydit_lambda_round11.sh > "$OUT/compare.log" 2>&1
echo "== compare done at $SECONDS s"; grep "compared\|compare-" "$OUT/compare.log" | cut -c1-700
left=$((TOTAL - SECONDS - 15))
echo "== dit512 ($left s budget, at $SECONDS s)"
python3 bench/sample_dit.py --workloads dit512 --batches 8 --presets default,cudagraphs,eager \
  --diffusers-presets eager,default --split-preset cudagraphs --reps 3 --budget-s "$left" \
  --out "$OUT/sample_dit_round11_dit512.json" > "$OUT/dit512.log" 2>&1
echo "exit $? at $SECONDS s"
grep -E "^\| |Error|error" "$OUT/dit512.log" | tail -20 | cut -c1-300
ls -la "$OUT" "$OUT/compare"
