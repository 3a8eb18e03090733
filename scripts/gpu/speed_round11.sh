#!/usr/bin/env bash
# One device call (eleventh session): DyDiT's compiled sliced path on the GPU (issue 8), in priority order, each step
# under its own timeout (its cap, or what is left of TOTAL if less; skipped below its minimum):
#   tests: the CUDA tests never run on a GPU before: the compiled sliced halves captured per step
#          (tests/test_dydit_compiled.py), the fc1 + GELU epilogue (tests/test_epilogue.py), step graphs
#   dydit: DyDiT-XL/2 lambda 0.5, 50 DDIM steps, guided: dense-compiled (the strongest dense baseline) against
#          sliced-cap-graphs (eager kernels, one CUDA graph per step) and sliced-compiled-graphs (the same with the
#          block halves compiled: DyDiT.compile_sliced), batch 8 then 32 then 1, with a kernel-kind time split
# Usage: TOTAL=560 bash scripts/gpu/speed_round11.sh   (carry [".whl"]). SMOKE=1: tiny sizes on the CPU.
set -uo pipefail
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
LOG="$OUT/speed_round11.log"
TOTAL=${TOTAL:-560}
STEPS=${STEPS:-"tests dydit"}
BATCHES=${BATCHES:-"8 32 1"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt" || true
python3 -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__,
'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" | tee "$OUT/env.txt"
if [[ -n "${SMOKE:-}" ]]; then SIZE="tiny --device cpu --steps 3"; RES=$OUT/smoke; else SIZE="XL --steps 50"; RES=$OUT; fi
mkdir -p "$RES"
echo "# provenance: $(head -1 "$OUT/device.txt"), $(cat "$OUT/env.txt"), started $(date -u '+%Y-%m-%d %H:%M UTC'),"\
     "commit $(git log -1 --format=%h 2>/dev/null), command: STEPS=\"$STEPS\" BATCHES=\"$BATCHES\" TOTAL=$TOTAL"\
     "bash scripts/gpu/speed_round11.sh" > "$LOG"
capped_step tests 150 40 python3 -m pytest -q -p no:cacheprovider tests/test_dydit_compiled.py tests/test_epilogue.py \
  tests/test_step_graphs.py -rs
capped_step dydit 600 120 python3 bench/dydit_speed.py --size $SIZE --batches $BATCHES --lams 0.5 --repeats 3 --no-split \
  --kernel-split --variants dense-compiled sliced-cap-graphs sliced-compiled-graphs --out $RES/dydit_speed_round11.json
echo "== done at $SECONDS s" | tee -a "$LOG"
grep -E "^== |^exit|Error|passed|failed|^\| |B=|SKIP" "$LOG" | cut -c1-400
ls -la "$OUT"
