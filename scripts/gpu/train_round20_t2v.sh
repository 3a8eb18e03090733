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
# scripts/gpu/train_round21_t2v.sh runs the same continuations (its gG runs) and more; this keeps round 20's
# settings (EMA 0.999, seed 20, sample metrics every 1,000 steps) so the recorded commands still reproduce.
EMA=${EMA:-0.999} SEED=${SEED:-20} EVAL_EVERY=${EVAL_EVERY:-1000} RUNS=${RUNS:-"g1 g2"} \
  exec bash scripts/gpu/train_round21_t2v.sh
