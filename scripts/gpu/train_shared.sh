#!/usr/bin/env bash
# One device call (see docs/gpu.md): train the shapes CLIP and the shapes VAE side by side on one GPU, then
# pack the shipped folders, logs and plots into $OUT. Usage on the device machine, from the repo root:
#   bash scripts/gpu/train_shared.sh [CLIP_STEPS] [VAE_STEPS] [TIME_LIMIT_S]
set -uo pipefail
CLIP_STEPS=${1:-8000}; VAE_STEPS=${2:-8000}; LIMIT=${3:-420}
source scripts/gpu/env.sh
mkdir -p runs
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
  scripts/train_clip.py --out runs/clip --steps "$CLIP_STEPS" --batch-size 512 --mixed-precision bf16 \
  --eval-every 1000 --ckpt-every 2000 --time-limit "$LIMIT" > "$OUT/clip.log" 2>&1 &
CLIP=$!
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
  scripts/train_vae.py --out runs/vae --steps "$VAE_STEPS" --batch-size 128 --mixed-precision bf16 \
  --eval-every 1000 --ckpt-every 2000 --time-limit "$LIMIT" > "$OUT/vae.log" 2>&1 &
VAE=$!
wait $CLIP; echo "clip exit $?"; wait $VAE; echo "vae exit $?"
tail -3 "$OUT/clip.log" "$OUT/vae.log"
tar czf "$OUT/shared_models.tgz" runs/clip/model runs/vae/model runs/clip/log.jsonl runs/vae/log.jsonl \
  runs/clip/training.png runs/vae/training.png 2>/dev/null
ls -la "$OUT"
