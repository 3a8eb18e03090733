#!/usr/bin/env bash
# One device call (nineteenth session, 2026-11-25): the video model rebuilt over the new text model (the QK-norm
# shapes-t2i with a caption refiner, bench/results/gpu_round19/call2). A video model saved over an image model
# refers to that image model's weights by fingerprint, so a new shapes-t2i needs a new shapes-t2v.
#   over:  Latte-T6/1 initialised from the text model; trained: temporal blocks, spatial cross-attention, caption
#          projection and refiner; saved over weights/shapes-t2i (what ships).
#   full:  the same start with every weight trained (the QK-norm model is not expected to diverge), a full save:
#          does freeing the spatial blocks let the model move objects (motion accuracy)?            issue 5
# GROUND=W adds the token grounding loss frame by frame (dit/grounding.py; the call after the text model's).
# Usage: T2I=<text transformer folder> LIMIT=440 bash scripts/gpu/train_round19_t2v.sh   (carry [".whl"])
set -uo pipefail
LIMIT=${LIMIT:-440}
WATCH=${WATCH:-570}
RUNS=${RUNS:-"over full"}
T2I=${T2I:-weights/shapes-t2i/transformer}
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p runs
device_header "T2I=$T2I LIMIT=$LIMIT WATCH=$WATCH RUNS=\"$RUNS\" LR=${LR:-5e-4} GROUND=${GROUND:-0} bash scripts/gpu/train_round19_t2v.sh"
if [ "$(realpath "$T2I")" != "$(realpath weights/shapes-t2i/transformer)" ]; then  # (call 6 named it and lost it)
  rm -rf weights/shapes-t2i/transformer && cp -r "$T2I" weights/shapes-t2i/transformer
fi
pack() { tar czf "$OUT/t2v.tgz" weights/shapes-t2v runs/t2v-*/log.jsonl runs/t2v-full/model/*.json \
  runs/t2v-full/model/*.md 2>/dev/null
  [ -d runs/t2v-full/model/transformer ] && tar czf "$OUT/t2v-full.tgz" runs/t2v-full/model/transformer; }
(sleep "$WATCH"; pack; echo "watchdog packed at $WATCH s") &
WATCHDOG=$!
common=(--model Latte-T6/1 --qk-norm --caption-refiner 2 --init-from-image weights/shapes-t2i --steps 40000
  --batch-size 64 --sample-eval-n 32 --final-eval-n 128 --eval-every 1000 --pool 30000 --compile
  --mixed-precision bf16 --lr "${LR:-5e-4}" --keep-best --warmup 300 --ema-decay 0.999 --save-dtype float16
  --ckpt-every 100000 --time-limit "$LIMIT" --anneal-to-time-limit --log-every 50 --rollback-on-spike 200
  --grounding-loss "${GROUND:-0}")
PIDS=()
for r in $RUNS; do
  rm -rf runs/t2v-$r && mkdir -p runs/t2v-$r
  case $r in
    over) extra=(--save-over-image weights/shapes-t2i --save-to weights/shapes-t2v
                 --trainable 'temporal_blocks\.|spatial_blocks\.\d+\.cross_attn\.|caption_embed\.|caption_refiner\.') ;;
    full) extra=(--save-to runs/t2v-full/model) ;;
    *) echo "unknown run $r"; exit 2 ;;
  esac
  rm -rf weights/shapes-t2v.old; [ $r = over ] && mv weights/shapes-t2v weights/shapes-t2v.old
  OMP_NUM_THREADS=4 accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 \
    --dynamo_backend no scripts/train_dit.py --out runs/t2v-$r "${common[@]}" "${extra[@]}" > "$OUT/t2v-$r.log" 2>&1 &
  PIDS+=($!)
done
end_trainings
