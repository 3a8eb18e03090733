#!/usr/bin/env bash
# GPU benchmark of VAR sampling, ours vs the official FoundationVision/VAR code (bench/var_speed.py). Not run yet.
#
# Here, before the device call:   scripts/gpu/var_fetch_official.sh      # -> third_party/VAR (git-ignored)
# Device call, from the repo root: bash scripts/gpu/var_speed.sh          # carry: ["third_party/VAR"] (+ ".whl" as
#                                                                         #  the other scripts/gpu/*.sh use it)
# Writes bench/results/var_speed.json (device, date, torch, command, parity, per depth × batch: s/batch, img/s,
# peak memory, KV bytes, MFU, speed-up) and var_speed.log, and copies both into $OUT.
set -uo pipefail
mkdir -p bench/results
if [ ! -f third_party/VAR/models/var.py ]; then
  echo "third_party/VAR is missing: run scripts/gpu/var_fetch_official.sh here and carry it" >&2
  exit 2
fi
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 bench/var_speed.py --official third_party/VAR --depths 16 30 --batches 1 16 64 \
  --cfg 1.5 --top-k 900 --top-p 0.96 --burn-in 2 --repeats 5 --out bench/results/var_speed.json \
  2>&1 | tee bench/results/var_speed.log
cp bench/results/var_speed.json bench/results/var_speed.log "$OUT"/ 2>/dev/null || true
