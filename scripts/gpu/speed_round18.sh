#!/usr/bin/env bash
# One device call (eighteenth session), issue 6: DiT-XL/2 sampling with the sync-free loop (dit.pipelines.denoise hands
# the scheduler CPU timesteps) and the FP8 linears (dit/fp8.py: bias in the kernel, quantisation fused by inductor),
# against diffusers compiled in the same run. Steps, in order, each under its own cap (what is left of TOTAL if less):
#   tests:  the sync-free loop, FP8 and epilogue tests on CUDA
#   gemm:   bench/fp8_gemm.py: bf16 / FP8 per-row / per-row fast / per-tensor fast on the four block products
#   sample: bench/sample_dit.py dit256 batch 32: diffusers compiled, ours compiled and CUDA-graphed, FP8 both ways
#   dydit:  bench/dydit_speed.py (issue 8) with the sync-free loop: dense-compiled and sliced-compiled-graphs
# Usage: TOTAL=570 bash scripts/gpu/speed_round18.sh   (carry [".whl"]); STEPS="..." picks steps.
set -uo pipefail
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
TAG=${TAG:-round18}
LOG="$OUT/speed_$TAG.log"
TOTAL=${TOTAL:-570}
STEPS=${STEPS:-"tests gemm sample"}
FP8=${FP8:-accurate,fast}
PRESETS=${PRESETS:-default,cudagraphs}
BATCHES=${BATCHES:-32}
WORKLOADS=${WORKLOADS:-dit256}
TESTS=${TESTS:-"tests/test_sync_free.py tests/test_fp8.py tests/test_epilogue.py"}
device_header "TAG=$TAG STEPS=\"$STEPS\" TESTS=\"$TESTS\" WORKLOADS=$WORKLOADS FP8=$FP8 PRESETS=$PRESETS BATCHES=$BATCHES TOTAL=$TOTAL bash scripts/gpu/speed_round18.sh" > "$LOG"
capped_step tests 120 30 python3 -m pytest -q -p no:cacheprovider $TESTS -rs
capped_step gemm 60 20 python3 bench/fp8_gemm.py --out "$OUT/fp8_gemm_$TAG.json"
left=$((TOTAL - SECONDS - 15))
capped_step sample 480 150 python3 bench/sample_dit.py --workloads $WORKLOADS --presets $PRESETS --diffusers-presets default \
  --batches $BATCHES --fp8 $FP8 --split-preset cudagraphs --budget-s $((left > 60 ? left - 60 : 0)) \
  --out "$OUT/sample_dit_$TAG.json"
capped_step dydit 400 120 python3 bench/dydit_speed.py --size XL --steps 50 --batches 32 8 1 --lams 0.5 --repeats 3 \
  --no-split --kernel-split --variants dense-compiled sliced-compiled-graphs --out "$OUT/dydit_speed_$TAG.json"
echo "== done at $SECONDS s" | tee -a "$LOG"
grep -E "^== |^exit|Error|passed|failed|^\| |SKIP|\"impl\"|\"linear\"" "$LOG" | cut -c1-700
ls -la "$OUT"
