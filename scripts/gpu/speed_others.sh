#!/usr/bin/env bash
# One device call (≤ 10 min) for the speed numbers no call has measured yet, in priority order, each under its own
# time limit so that a slow one cannot take the others' time (a step cut off keeps what it wrote):
#   1. VAR-d16 / d30 sampling vs the official code (issue 9)            bench/var_speed.py      carry third_party/VAR
#   2. DyDiT-XL/2 at λ 0.5 vs dense DiT-XL/2 (issue 8)                   bench/dydit_speed.py
#   3. LLaVA-1.5-7B layout prefill / decode vs transformers (issue 10)   bench/llava_speed.py
#   4. Latte-1 512 px guided forward, ours vs diffusers (issue 6)        bench/sample_dit.py --workloads latte512
# Here, first: scripts/gpu/var_fetch_official.sh (third_party/VAR). Carry: [".whl", "third_party/VAR"].
# The sixth session (2026-11-23) measured all four (docs/benchmarks.md); the steps' default limits sum past one
# 600 s call, so choose with SKIP_VAR / SKIP_DYDIT / SKIP_LLAVA / SKIP_LATTE and T1..T4. Not yet measured: VAR's
# per-op profile (--profile 1), DyDiT at batch 32 and 1 (DYDIT_BATCHES="32 1"), LLaVA's compiled prefill and fused
# projections (--compile-prefill --fuse-projections).
# Results go to bench/results/*.json as each benchmark writes them, and are copied into $OUT.
set -uo pipefail
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
mkdir -p bench/results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
run() {  # NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name ($limit s): $*" | tee -a "$OUT/speed_others.log"
  timeout "$limit" "$@" >> "$OUT/speed_others.log" 2>&1; echo "exit $?" | tee -a "$OUT/speed_others.log"
}
# VAR_RUNS: ";"-separated argument sets, one bench run each (default: the full table with a batch-1 profile).
IFS=';' read -ra var_runs <<< "${VAR_RUNS:---depths 16 30 --batches 1 16 64 --profile 1 --out bench/results/var_speed.json}"
for va in "${var_runs[@]}"; do
  [ "${SKIP_VAR:-0}" != 1 ] && [ -f third_party/VAR/models/var.py ] && run var ${T1:-170} python3 bench/var_speed.py \
    --official third_party/VAR --cfg 1.5 --top-k 900 --top-p 0.96 --burn-in 2 --repeats 3 $va
done
# (2026-11-23, sixth session: at 140 s DyDiT got through one row; both benches now write their JSON after every row.)
[ "${SKIP_DYDIT:-0}" = 1 ] || run dydit ${T2:-190} python3 bench/dydit_speed.py --size XL --batches ${DYDIT_BATCHES:-8 32 1} --steps 50 \
  --lams 0.5 --repeats 2 --variants dense sliced sliced-cap --out bench/results/dydit_speed.json
[ "${SKIP_LLAVA:-0}" = 1 ] || TORCH_LOGS="graph_breaks,recompiles" run llava ${T3:-240} python3 bench/llava_speed.py \
  ${LLAVA_ARGS:---batches 1 8 --repeats 3 --profile-prefill --compile-prefill --fuse-projections} --out bench/results/llava_speed.json
[ "${SKIP_LATTE:-0}" = 1 ] || run latte ${T4:-200} python3 bench/sample_dit.py --workloads latte512 \
  --presets eager,default --diffusers-presets eager,default --split-preset default --budget-s $((${T4:-200} - 30)) \
  --out bench/results/sample_dit_latte.json
cp bench/results/{var_speed*,dydit_speed,llava_speed,sample_dit_latte}.json "$OUT"/ 2>/dev/null
grep -E "^== |^exit|Error" "$OUT/speed_others.log" | cut -c1-300
ls -la "$OUT"
