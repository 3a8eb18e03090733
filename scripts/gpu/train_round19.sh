#!/usr/bin/env bash
# One device call (nineteenth session, 2026-11-25): the QK-norm text model of resume/ continued with a caption
# refiner (dit/pixart.py CaptionRefiner: 2 bidirectional layers over the caption tokens, zero-initialised), two
# learning rates side by side on one GPU. The control is the eleventh session's run (bench/results/gpu_round11/
# call1): the same model, data (--objects 1-2), batch and lr 3e-4 without a refiner, 5,117 steps: two-object 0.164.
#                                                                                                            issue 5
# Calls 2 and 4 go on from an earlier call's weights (START); call 4 adds the token grounding loss (dit/grounding.py)
# at two weights, GROUND_A and GROUND_B.
# Usage: LIMIT=440 bash scripts/gpu/train_round19.sh   (carry [".whl"]); RUNS="a b" (a: lr LR_A, b: lr LR_B)
set -uo pipefail
LIMIT=${LIMIT:-440}
WATCH=${WATCH:-570}
RUNS=${RUNS:-"a b"}
START=${START:-resume/shapes-t2i-qknorm/transformer}
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p runs
device_header "LIMIT=$LIMIT RUNS=\"$RUNS\" START=$START LR_A=${LR_A:-3e-4} LR_B=${LR_B:-6e-4} GROUND_A=${GROUND_A:-0} GROUND_B=${GROUND_B:-0} SAMPLE_EVAL_N=${SAMPLE_EVAL_N:-64} bash scripts/gpu/train_round19.sh"
git log -1 --format='commit %H' | tee -a "$OUT/device.txt"
pack() { for r in $RUNS; do tar czf "$OUT/t2i-$r.tgz" runs/t2i-$r/model/transformer runs/t2i-$r/model/*.json \
  runs/t2i-$r/model/*.md runs/t2i-$r/log.jsonl 2>/dev/null; done; }
(sleep "$WATCH"; pack; echo "watchdog packed at $WATCH s") &
WATCHDOG=$!
PIDS=()
for r in $RUNS; do
  case $r in a) lr=${LR_A:-3e-4} g=${GROUND_A:-0} ;; b) lr=${LR_B:-6e-4} g=${GROUND_B:-0} ;;
    *) echo "unknown run $r"; exit 2 ;; esac
  rm -rf runs/t2i-$r && mkdir -p runs/t2i-$r
  cp -r weights/shapes-t2i runs/t2i-$r/start
  rm -rf runs/t2i-$r/start/transformer && cp -r "$START" runs/t2i-$r/start/transformer
  OMP_NUM_THREADS=4 accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 \
    --dynamo_backend no scripts/train_dit.py --out runs/t2i-$r --model runs/t2i-$r/start --caption-refiner 2 \
    --grounding-loss "$g" --objects 1-2 --steps 40000 --batch-size 512 --sample-eval-n "${SAMPLE_EVAL_N:-64}" --final-eval-n 256 --eval-every 1000 \
    --pool 200000 --compile --save-to runs/t2i-$r/model --mixed-precision bf16 --lr "$lr" \
    --keep-best --warmup 300 --ema-decay 0.999 --save-dtype float16 --ckpt-every 100000 --time-limit "$LIMIT" \
    --anneal-to-time-limit --log-every 50 --rollback-on-spike 200 > "$OUT/t2i-$r.log" 2>&1 &
  PIDS+=($!)
done
end_trainings
