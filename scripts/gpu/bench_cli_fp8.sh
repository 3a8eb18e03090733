#!/usr/bin/env bash
# One device call (eighteenth session): the user-facing `ditstudio bench` at DiT-XL/2 (random weights), bf16 and
# with --fp8, both with the cudagraphs preset: the same path `ditstudio generate --fp8 --compile cudagraphs` runs.
# Usage: bash scripts/gpu/bench_cli_fp8.sh   (carry [".whl"])
set -uo pipefail
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
device_header "bash scripts/gpu/bench_cli_fp8.sh"
for extra in "" "--fp8"; do
  tag=$([ -n "$extra" ] && echo fp8 || echo bf16)
  timeout 270 python3 -m app.cli bench --model DiT-XL/2 --steps 50 --batch 32 --dtype bfloat16 --device cuda \
    --compile cudagraphs --repeats 3 $extra --out "$OUT/ditstudio_bench_$tag.json" 2>&1 | tail -5
  echo "exit $? ($tag)"
done
ls -la "$OUT"
