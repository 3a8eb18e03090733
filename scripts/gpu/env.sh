# Sourced by every device-call script: $OUT exists, the carried wheels in .whl/ (diffusers, open_clip, ...) are
# installed into /tmp/site when present, and the project runs from PYTHONPATH.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

# device_header COMMAND: the GPU, torch, the time and the exact command, shown and written to $OUT/device.txt.
device_header() {
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
    python3 -c "import torch, datetime; print('torch', torch.__version__, datetime.datetime.now().isoformat())"
    echo "command: $*"
  } | tee "$OUT/device.txt"
}

# capped_step NAME CAP_S MIN_S COMMAND...: run COMMAND (output appended to $LOG) if NAME is in $STEPS, under its own
# cap or what is left of $TOTAL seconds if less; skipped when less than MIN_S is left. A step cut off keeps its rows.
capped_step() {
  local name=$1 cap=$2 min=$3; shift 3
  [[ " $STEPS " == *" $name "* ]] || return 0
  local left=$((TOTAL - SECONDS)); local limit=$((cap < left ? cap : left)) t0=$SECONDS
  if ((limit < min)); then echo "== $name: skipped, $left s left of $TOTAL (needs $min)" | tee -a "$LOG"; return 0; fi
  echo "== $name ($limit s, at $SECONDS s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1; echo "exit $? after $((SECONDS - t0)) s" | tee -a "$LOG"
}

# show_comparisons FILE...: one line per DyDiT comparison.json (scripts/finetune_dydit.py --evaluate): dense and DyDiT
# metrics and the FLOPs ratios. Empty files (a comparison cut off by its timeout) are skipped.
show_comparisons() {
  local c
  for c in "$@"; do
    [ -s "$c" ] || continue
    python3 -c "import json,sys; c=json.load(open(sys.argv[1])); print(sys.argv[1], {k: c[k] for k in ('dense','dydit','sampling_flops_ratio','sampling_flops_ratio_with_overheads')})" "$c" 2>&1 | cut -c1-900
  done
}

# end_trainings: after the training jobs in PIDS were started in the background (and a watchdog WATCHDOG that runs
# `pack` late): wait for them, stop the watchdog, show each log's last step / final / error lines, run `pack` (the
# caller's function) and bundle the logs.
end_trainings() {
  wait "${PIDS[@]}"
  echo "trainings done at $SECONDS s"
  pkill -P "$WATCHDOG" 2>/dev/null; kill "$WATCHDOG" 2>/dev/null  # its sleep too: it holds the output pipe open
  local f
  for f in "$OUT"/*.log; do
    echo "== $f"; grep -v "^\s*$" "$f" | grep -vi "warn" | grep -i "step\|final\|error\|Trace" | tail -8 | cut -c1-900
  done
  pack
  (cd "$OUT" && tar czf logs.tgz --remove-files *.log)
  ls -la "$OUT"
}

# compare_runs [ARGS...]: after the DyDiT text trainings in PIDS (one per entry of $RUNS, "name" or "name@from", each
# in runs/t2i-name) were started in the background: wait for them, compare every saved folder with the dense model
# (scripts/finetune_dydit.py --evaluate, $EVAL_N captions, ARGS added), all in parallel under what is left of $WATCH,
# into runs/t2i-name/comparison.json, then stop the watchdog $WATCHDOG and show the comparisons.
compare_runs() {
  ((${#PIDS[@]})) && wait "${PIDS[@]}"
  echo "trainings done at $SECONDS s"
  local left=$((WATCH - 10 - SECONDS)) spec run d
  PIDS=()
  for spec in $RUNS; do
    run=${spec%%@*}; d=runs/t2i-$run; [ -d "$d/model" ] || continue
    OMP_NUM_THREADS=4 timeout "$left" python3 scripts/finetune_dydit.py --evaluate "$d/model" --final-eval-n "$EVAL_N" \
      "$@" > "$d/comparison.json" 2> "$OUT/eval-t2i-$run.log" &
    PIDS+=($!)
  done
  ((${#PIDS[@]})) && wait "${PIDS[@]}"
  echo "comparisons done at $SECONDS s"
  pkill -P "$WATCHDOG" 2>/dev/null; kill "$WATCHDOG" 2>/dev/null
  show_comparisons runs/t2i-*/comparison.json
}
