#!/usr/bin/env bash
# One device call (twentieth session): does P2 loss weighting let the video model learn motion?          issue 5
# bench/t2v_motion_probe.py found that the shipped shapes-t2v does not read the direction words at all: swapping
# "left" and "right" changes its loss by < 0.1% at every noise level, and its x0 prediction at t >= 700 does not
# move the object. The ε loss weights an x0 error at t by SNR_t (0.007 at t = 700, 8.5 at t = 100), so the steps
# where a motion is decided get almost no gradient. P2 weighting (dit/objectives.py, --p2-gamma) lowers the low-noise
# steps instead. Each run continues the shipped shapes-t2v as it was trained (temporal blocks, spatial
# cross-attention, caption projection and refiner; saved over weights/shapes-t2i) with --p2-gamma G:
#   gG: P2 with gamma G (k 1), e.g. g1, g2
# Usage: LIMIT=400 RUNS="g1 g2" bash scripts/gpu/train_round20_t2v.sh   (carry [".whl"])
set -uo pipefail
LIMIT=${LIMIT:-400}
WATCH=${WATCH:-570}
RUNS=${RUNS:-"g1 g2"}
LR=${LR:-5e-4}
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p runs
device_header "LIMIT=$LIMIT WATCH=$WATCH RUNS=\"$RUNS\" LR=$LR bash scripts/gpu/train_round20_t2v.sh"
pack() { for r in $RUNS; do tar czf "$OUT/t2v-$r.tgz" runs/t2v-$r/model runs/t2v-$r/log.jsonl 2>/dev/null; done; }
(sleep "$WATCH"; pack; echo "watchdog packed at $WATCH s") &
WATCHDOG=$!
PIDS=()
for r in $RUNS; do
  case $r in g*) gamma=${r#g} ;; *) echo "unknown run $r"; exit 2 ;; esac
  rm -rf runs/t2v-$r && mkdir -p runs/t2v-$r
  OMP_NUM_THREADS=4 accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 \
    --dynamo_backend no scripts/train_dit.py --out runs/t2v-$r --model weights/shapes-t2v --p2-gamma "$gamma" \
    --save-over-image weights/shapes-t2i --save-to runs/t2v-$r/model \
    --trainable 'temporal_blocks\.|spatial_blocks\.\d+\.cross_attn\.|caption_embed\.|caption_refiner\.' \
    --steps 40000 --batch-size 64 --sample-eval-n 32 --final-eval-n 128 --eval-every 1000 --pool 30000 --seed 20 \
    --compile --mixed-precision bf16 --lr "$LR" --keep-best --warmup 200 --ema-decay 0.999 --save-dtype float16 \
    --ckpt-every 100000 --time-limit "$LIMIT" --anneal-to-time-limit --log-every 50 --rollback-on-spike 200 \
    > "$OUT/t2v-$r.log" 2>&1 &
  PIDS+=($!)
done
end_trainings
