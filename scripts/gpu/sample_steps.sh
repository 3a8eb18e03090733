# Sourced by the sampling-speed calls (speed_sampling*.sh): the device preamble, then `step LIMIT_S ARGS...` runs
# bench/sample_dit.py under its own time limit, merging its rows into $OUT/sample_dit.json as they are measured (a
# step cut off keeps what it measured), with $STEP_ARGS added to every step.
set -uo pipefail
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
J="$OUT/sample_dit.json"
step() {  # LIMIT_S ARGS...
  local limit=$1; shift
  # shellcheck disable=SC2086  # STEP_ARGS is a list of words
  timeout "$limit" python3 bench/sample_dit.py --out "$J" --merge --budget-s $((limit - 40)) ${STEP_ARGS:-} "$@" 2>&1 \
    | tee -a "$OUT/sample_dit.log" | grep -E '^\{|Error|error|skipped' | cut -c1-400
}
