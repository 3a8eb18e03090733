#!/usr/bin/env bash
# One device call (sixteenth session): DyDiT's kept-token kernels (dit/kept_tokens.py: the gather + LayerNorm +
# modulation and the gated scatter as Triton kernels, no padded copy of the stream) against the plain-torch gather and
# scatter of the twelfth session, in the same run, against the strongest dense baseline (issue 8), in priority order,
# each step under its own timeout (its cap, or what is left of TOTAL if less; skipped below its minimum):
#   probe:  bench/dydit_ln_probe.py: the kernels alone against inductor's LayerNorm / gather / scatter (CUDA graphs)
#   tests:  the kernels against plain torch on CUDA (eager and compiled), the compiled sliced path's step graphs
#   dydit:  DyDiT-XL/2 lambda 0.5, 50 DDIM steps, guided, bf16: dense-compiled, sliced-compiled-graphs (all kernels),
#           -mlp (the MLP half's only) and -plain (none), batch 32, 8, 1 (a step cut off keeps its rows), kernel split
# Seventeenth session: several rows per kernel program (autotuned), kept_rows in one block, and the probe also times
# the proj / fc2 weight layouts (PROBE_ARGS="--products"); TAG names the output files (round16, round17, ...).
# Usage: TOTAL=560 bash scripts/gpu/speed_round16.sh   (carry [".whl"]). SMOKE=1: tiny DyDiT on the CPU.
set -uo pipefail
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
TAG=${TAG:-round16}
PROBE_ARGS=${PROBE_ARGS:-}
LOG="$OUT/speed_$TAG.log"
TOTAL=${TOTAL:-560}
STEPS=${STEPS:-"probe tests dydit"}
BATCHES=${BATCHES:-"32 8 1"}
VARIANTS=${VARIANTS:-"dense-compiled sliced-compiled-graphs sliced-compiled-graphs-mlp sliced-compiled-graphs-plain"}
if [[ -n "${SMOKE:-}" ]]; then SIZE="tiny --device cpu --steps 3"; else SIZE="XL --steps 50"; fi
device_header "TAG=$TAG PROBE_ARGS=\"$PROBE_ARGS\" STEPS=\"$STEPS\" BATCHES=\"$BATCHES\" VARIANTS=\"$VARIANTS\" TOTAL=$TOTAL bash scripts/gpu/speed_round16.sh" > "$LOG"
capped_step probe 100 30 python3 bench/dydit_ln_probe.py --reps 10 $PROBE_ARGS --out "$OUT/dydit_ln_probe_$TAG.json"
capped_step tests 100 40 python3 -m pytest -q -p no:cacheprovider tests/test_kept_tokens.py tests/test_dydit_compiled.py \
  -k cuda -rs
capped_step dydit 480 120 python3 bench/dydit_speed.py --size $SIZE --batches $BATCHES --lams 0.5 --repeats 3 \
  --no-split --kernel-split --variants $VARIANTS --out "$OUT/dydit_speed_$TAG.json"
echo "== done at $SECONDS s" | tee -a "$LOG"
grep -E "^== |^exit|Error|passed|failed|^\| |B=|SKIP" "$LOG" | cut -c1-400
ls -la "$OUT"
