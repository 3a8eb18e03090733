#!/usr/bin/env bash
# One device call: train the three shipped DiT defaults (shapes-c2i, shapes-t2i, shapes-t2v) side by side on one GPU
# (each is far too small to fill it), optionally beside another command, then pack the shipped folders, logs and
# plots into $OUT. Usage on the device machine, from the repo root:
#   bash scripts/gpu/train_defaults.sh [TIME_LIMIT_S] [EXTRA_ARGS_FOR_ALL...]
# The folders are written straight to weights/shapes-{c2i,t2i,t2v} (fp16, VAE and CLIP referenced as ../shapes-*).
# Where such a folder already exists, training continues from its weights (a session's device time is short, so
# the shipped models were trained over several calls; each card's command and steps are those of its last call).
set -uo pipefail
LIMIT=${1:-420}; shift || true
source scripts/gpu/env.sh
mkdir -p runs
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
COMMON=(--mixed-precision bf16 --lr ${LR:-3e-4} --keep-best --warmup 500 --ema-decay 0.999 --save-dtype float16 --ckpt-every 100000
        --time-limit "$LIMIT" --anneal-to-time-limit --log-every 50 --rollback-on-spike 200 "$@")
# FRESH: which models start from their named size instead of continuing the folder in weights/ ("c2i t2i", or 1 for
# all three); QKNORM: which of those get QK-norm (1 for all fresh ones; the continued models' first-block attention
# logits had grown until every continuation diverged: docs/dit.md). T2V_MODEL / EXTRA_<n>: the video model's size and
# any model's own extra arguments (after the common ones, so they win), e.g. T2V_MODEL=Latte-T6/1
# EXTRA_t2v="--init-from-image runs/t2i-start --lr 3e-4".
[ "${FRESH:-}" = 1 ] && FRESH="c2i t2i t2v"
[ "${QKNORM:-}" = 1 ] && QKNORM="${FRESH:-}"
train() {  # NAME MODEL STEPS BATCH SAMPLE_N FINAL_N EVAL_EVERY POOL
  local model=$2 short=${1#shapes-} extra=() own=()
  if [[ " ${FRESH:-} " == *" $short "* ]]; then
    [[ " ${QKNORM:-} " == *" $short "* ]] && extra=(--qk-norm)
  elif [ -f "weights/$1/model_index.json" ]; then model="weights/$1"; fi
  local var="EXTRA_$short"; read -r -a own <<< "${!var:-}"
  accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    scripts/train_dit.py --out "runs/$1" --model "$model" --steps "$3" --batch-size "$4" --sample-eval-n "$5" \
    --final-eval-n "$6" --eval-every "$7" --pool "$8" --compile --save-to "weights/$1" "${extra[@]}" "${COMMON[@]}" \
    "${own[@]}" > "$OUT/$1.log" 2>&1
}
ONLY=${ONLY:-"c2i t2i t2v"}  # which of the three to train in this call
pids=()
[[ $ONLY == *c2i* ]] && { train shapes-c2i DiT-T/1 40000 512 96 480 1000 150000 & pids+=($!); }
[[ $ONLY == *t2i* ]] && { train shapes-t2i PixArt-T/1 40000 512 64 256 1000 200000 & pids+=($!); }
[[ $ONLY == *t2v* ]] && { train shapes-t2v "${T2V_MODEL:-Latte-T/1}" 20000 64 32 128 1000 30000 & pids+=($!); }
for pid in "${pids[@]}"; do wait "$pid"; echo "exit $?"; done
for n in c2i t2i t2v; do grep -E "^step|final|Error|error" "$OUT/shapes-$n.log" | tail -8; done
tar czf "$OUT/dit_defaults.tgz" weights/shapes-c2i weights/shapes-t2i weights/shapes-t2v \
  runs/shapes-*/log.jsonl runs/shapes-*/training.png 2>/dev/null
ls -la "$OUT"
