#!/usr/bin/env bash
# One device call (≤ 10 min): issue 6's sampling benchmark, in the order that matters most.
#   1. DiT-XL/2 256 px, 32 images: diffusers eager / compiled (its best) against ours eager / default / fused,
#      plus our eager forward under each attention backend;
#   2. the same at 1 and 8 images, eager and default (launch-bound sizes);
#   3. PixArt-α 512 px, 8 images, eager / default for both.
# Each step has its own time limit; rows are written to $OUT/sample_dit.json as they are measured (--merge), so a
# step cut off keeps what it measured. Usage on the device machine:  bash scripts/gpu/speed_sampling.sh
source scripts/gpu/sample_steps.sh
step ${S1:-330} --workloads dit256 --presets eager,default,fused --batches 32 \
  --attention-backends sdpa_cudnn,sdpa_flash,sdpa_efficient,flex
step ${S2:-90} --workloads dit256 --presets eager,default --batches 1,8
step ${S3:-140} --workloads pixart512 --presets eager,default --batches 8
python3 - "$J" <<'PY'
import json, sys
sys.path.insert(0, "bench")
from sample_dit import markdown
r = json.load(open(sys.argv[1])); print(markdown(r)); print("skipped:", r.get("skipped")); print(r.get("parity"))
print(r.get("attention_backend_forward_ms"), r.get("vae_decode_s"), r.get("scheduler_s"))
PY
