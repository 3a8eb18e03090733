#!/usr/bin/env bash
# One device call (twelfth session): DyDiT's compiled sliced path with static inner sizes (issue 8), then issue 6's
# unmeasured DiT-XL/2 512 px batches, in priority order, each step under its own timeout (its cap, or what is left of
# TOTAL if less; skipped below its minimum):
#   tests:  tests/test_dydit_compiled.py (the compiled sliced halves captured per step, CUDA) and the step graphs
#   dydit:  DyDiT-XL/2 lambda 0.5, 50 DDIM steps, guided: dense-compiled (the strongest dense baseline) against
#           sliced-compiled-graphs (DyDiT.compile_sliced + one CUDA graph per step), batch 32, 8, 1, kernel split
#   dit512: bench/sample_dit.py --workloads dit512 at batch 32 and 1 (ours cudagraphs / default, diffusers default)
# Usage: TOTAL=560 bash scripts/gpu/speed_round12.sh   (carry [".whl"]). SMOKE=1: tiny DyDiT on the CPU.
set -uo pipefail
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
LOG="$OUT/speed_round12.log"
TOTAL=${TOTAL:-560}
STEPS=${STEPS:-"tests dydit dit512"}
BATCHES=${BATCHES:-"32 8 1"}
if [[ -n "${SMOKE:-}" ]]; then SIZE="tiny --device cpu --steps 3"; else SIZE="XL --steps 50"; fi
device_header "STEPS=\"$STEPS\" BATCHES=\"$BATCHES\" TOTAL=$TOTAL bash scripts/gpu/speed_round12.sh" > "$LOG"
capped_step tests 120 40 python3 -m pytest -q -p no:cacheprovider tests/test_dydit_compiled.py tests/test_step_graphs.py -rs
capped_step dydit 330 120 python3 bench/dydit_speed.py --size $SIZE --batches $BATCHES --lams 0.5 --repeats 3 \
  --no-split --kernel-split --variants dense-compiled sliced-compiled-graphs --out "$OUT/dydit_speed_round12.json"
left=$((TOTAL - SECONDS - 10))
capped_step dit512 600 90 python3 bench/sample_dit.py --workloads dit512 --batches 32 1 --presets cudagraphs,default \
  --diffusers-presets default --split-preset cudagraphs --reps 3 --budget-s "$left" \
  --out "$OUT/sample_dit_round12_dit512.json"
echo "== done at $SECONDS s" | tee -a "$LOG"
grep -E "^== |^exit|Error|passed|failed|^\| |B=|SKIP" "$LOG" | cut -c1-400
ls -la "$OUT"
