#!/usr/bin/env bash
# One device call (twelfth session, last), in priority order, each step under its own timeout (its cap, or what is
# left of TOTAL if less; skipped below its minimum):
#   tests:  the CUDA test of the compiled sliced path with static inner sizes (cut off in call 2) and the step graphs
#   code:   DyDiT-XL/2 lambda 0.5, batch 32, sliced-compiled-graphs once, with a fresh inductor cache whose generated
#           kernels (the Triton source of every compiled sliced graph) come back in $OUT/inductor_code.tgz: why the
#           LayerNorm kernels of the sliced path move fewer bytes per second than the dense model's (issue 8)
#   dit512: bench/sample_dit.py --workloads dit512 at batch 32 and 1 (ours cudagraphs, diffusers default) (issue 6)
# Usage: TOTAL=560 bash scripts/gpu/final_round12.sh   (carry [".whl"])
set -uo pipefail
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1
LOG="$OUT/final_round12.log"
TOTAL=${TOTAL:-560}
STEPS=${STEPS:-"tests code dit512"}
device_header "STEPS=\"$STEPS\" TOTAL=$TOTAL bash scripts/gpu/final_round12.sh" > "$LOG"
TORCHINDUCTOR_CACHE_DIR=/tmp/inductor capped_step tests 170 60 python3 -m pytest -q -p no:cacheprovider \
  tests/test_dydit_compiled.py -k cuda tests/test_step_graphs.py -rs
TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_code capped_step code 170 90 python3 bench/dydit_speed.py --size XL --steps 50 \
  --batches 32 --lams 0.5 --repeats 1 --no-split --variants sliced-compiled-graphs --out "$OUT/dydit_speed_code_b32.json"
if [ -d /tmp/inductor_code ]; then
  (cd /tmp/inductor_code && grep -rl --include='*.py' "triton" . | head -200 | tar czf "$OUT/inductor_code.tgz" -T -)
fi
left=$((TOTAL - SECONDS - 10))
TORCHINDUCTOR_CACHE_DIR=/tmp/inductor capped_step dit512 600 90 python3 bench/sample_dit.py --workloads dit512 \
  --batches 32,1 --presets cudagraphs --diffusers-presets default --split-preset cudagraphs --reps 3 --budget-s "$left" \
  --out "$OUT/sample_dit_round12_dit512.json"
echo "== done at $SECONDS s" | tee -a "$LOG"
grep -E "^== |^exit|Error|passed|failed|^\| |B=|SKIP" "$LOG" | cut -c1-400
ls -la "$OUT"
