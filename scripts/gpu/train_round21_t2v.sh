#!/usr/bin/env bash
# One device call (twenty-first session): does v-prediction let the video model learn motion?              issue 5
# bench/t2v_motion_probe.py: the shipped shapes-t2v (ε-prediction) does not read the direction words; its x0 estimate
# at t >= 700, where a motion is decided, does not move the object. In x0 terms the ε loss weights an error at t by
# SNR_t (0.007 at t = 700) and the v loss by 1 + SNR_t (~1): v-prediction gives the high-noise steps ~140x the
# gradient share, and at high noise its output is -x0 at full scale rather than a 2-8% share of an ε output
# (dit/objectives.py). P2 with the ε loss (round 20) only lowered the low-noise steps: motion 0.056 -> 0.119.
# Each run continues BASE (default the shipped shapes-t2v, saved over weights/shapes-t2i) on what it trained
# (temporal blocks, spatial cross-attention, caption projection and refiner), saved over weights/shapes-t2i again:
#   gG:  ε-prediction, P2 gamma G (round 20's runs; g0 = plain ε)
#   vG:  v-prediction (the output head `final.` trains too: its meaning changes), P2 gamma G (v0 = plain v; v1 = P2
#        gamma 1, which makes the v loss uniform in x0 terms)
#   tgG, tvG: gG / vG with the caption's modulation of the temporal blocks added (--temporal-text, trained): the
#        probe found the cross-attention gives the direction word ~0.1% of its mass and the output moves 14x less
#        for "left"/"right" swapped than for a colour swapped
#   cG:  gG plus the counterfactual-caption contrast (twenty-second session; dit/caption_contrast.py): weight CONTRAST,
#        margin MARGIN, at noise levels t/T >= CFROM; each step runs the model on the captions and on their
#        counterfactuals (motions swapped), so it takes about twice as long
#   agG, acG: gG / cG with a narrow cross-attention (width 32) from the temporal blocks to the caption added
#        (--temporal-text-attention; dit/latte.py TemporalTextAttention): the inherited spatial cross-attention gives
#        [SOT] ~90% of its mass and so passes the direction word ~0.1% of any gradient
# POS: the share of caption objects whose starting position is stated (--video-position-prob; the world's 0.3): at 1 the
#   caption fixes where each object starts, so its motion words decide where it is in every later frame, and
#   reading them pays in the loss at high noise (twenty-second session)
# EMA decay EMA (default 0.995: a type switch must not keep a large share of the ε weights in the average after
# ~2,000 steps; 0.999 would keep 13%), sample metrics every EVAL_EVERY steps on 32 videos, best kept.
# Usage: LIMIT=400 RUNS="v0 v1" bash scripts/gpu/train_round21_t2v.sh   (carry [".whl"], and BASE if not shipped)
set -uo pipefail
LIMIT=${LIMIT:-400}
WATCH=${WATCH:-570}
RUNS=${RUNS:-"v0 v1"}
LR=${LR:-5e-4}
EMA=${EMA:-0.995}
EVAL_EVERY=${EVAL_EVERY:-500}
SEED=${SEED:-21}
CONTRAST=${CONTRAST:-1}
MARGIN=${MARGIN:-0.1}
CFROM=${CFROM:-0.4}
POS=${POS:-0.3}
BASE=${BASE:-weights/shapes-t2v}
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p runs
device_header "LIMIT=$LIMIT WATCH=$WATCH RUNS=\"$RUNS\" LR=$LR EMA=$EMA EVAL_EVERY=$EVAL_EVERY SEED=$SEED BASE=$BASE CONTRAST=$CONTRAST MARGIN=$MARGIN CFROM=$CFROM POS=$POS bash scripts/gpu/train_round21_t2v.sh"
pack() { for r in $RUNS; do tar czf "$OUT/t2v-$r.tgz" runs/t2v-$r/model runs/t2v-$r/log.jsonl 2>/dev/null; done; }
(sleep "$WATCH"; pack; echo "watchdog packed at $WATCH s") &
WATCHDOG=$!
TRAINABLE='temporal_blocks\.|spatial_blocks\.\d+\.cross_attn\.|caption_embed\.|caption_refiner\.'
PIDS=()
for r in $RUNS; do
  extra=()
  case $r in t*) extra=(--temporal-text); trainable_more='|temporal_text\.' ;;
             a*) extra=(--temporal-text-attention 32); trainable_more='' ;;   # inside temporal_blocks.
             *) trainable_more='' ;; esac
  case ${r#[ta]} in
    g*) gamma=${r##*g}; kind=(--prediction-type epsilon); trainable=$TRAINABLE ;;
    c*) gamma=${r##*c}; kind=(--prediction-type epsilon --caption-contrast "$CONTRAST" --contrast-margin "$MARGIN"
                             --contrast-from "$CFROM"); trainable=$TRAINABLE ;;
    v*) gamma=${r#*v}; kind=(--prediction-type v_prediction); trainable="$TRAINABLE|final\." ;;
    *) echo "unknown run $r"; exit 2 ;;
  esac
  rm -rf runs/t2v-$r && mkdir -p runs/t2v-$r
  OMP_NUM_THREADS=4 accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 \
    --dynamo_backend no scripts/train_dit.py --out runs/t2v-$r --model "$BASE" "${kind[@]}" --p2-gamma "$gamma" \
    --save-over-image weights/shapes-t2i --save-to runs/t2v-$r/model --trainable "$trainable$trainable_more" "${extra[@]}" --video-position-prob "$POS" \
    --steps 40000 --batch-size 64 --sample-eval-n 32 --final-eval-n 128 --eval-every "$EVAL_EVERY" --pool 30000 \
    --seed "$SEED" --compile --mixed-precision bf16 --lr "$LR" --keep-best --warmup 200 --ema-decay "$EMA" \
    --save-dtype float16 --ckpt-every 100000 --time-limit "$LIMIT" --anneal-to-time-limit --log-every 50 \
    --rollback-on-spike 200 > "$OUT/t2v-$r.log" 2>&1 &
  PIDS+=($!)
done
end_trainings
