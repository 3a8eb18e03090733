#!/usr/bin/env bash
# One device call to find why continuations of the trained patch-1 shapes models collapse (docs/dit.md): continue
# shapes-c2i under several variants side by side, without the spike guard, logging loss / mse / vlb / grad norm
# every 25 steps, then report the first step where each variant's loss left its band.
#   bash scripts/gpu/divergence_ab.sh [TIME_LIMIT_S]
# Variants: base (bf16, fused AdamW, compile, VLB 1 — what diverged), fp32, loop (unfused AdamW, eager),
# novlb (VLB weight 0), eager (no compile). Each batch 256, lr 3e-4, 500 warm-up steps.
set -uo pipefail
LIMIT=${1:-420}
source scripts/gpu/env.sh
mkdir -p runs
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60 OMP_NUM_THREADS=2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
run() {  # NAME EXTRA...
  local name=$1; shift
  python3 scripts/train_dit.py --out "runs/ab-$name" --model weights/shapes-c2i --steps 40000 --batch-size 256 \
    --pool 100000 --lr 3e-4 --warmup 500 --ema-decay 0.999 --eval-every 1000 --sample-eval-n 48 --log-every 25 \
    --ckpt-every 100000 --time-limit "$LIMIT" --save-to "runs/ab-$name/model" "$@" > "$OUT/ab-$name.log" 2>&1
  cp "runs/ab-$name/log.jsonl" "$OUT/ab-$name.jsonl"
}
run base --mixed-precision bf16 --compile &
run fp32 --mixed-precision no --compile &
run loop --mixed-precision bf16 --adam-impl loop &
run novlb --mixed-precision bf16 --compile --vlb-weight 0 &
run eager --mixed-precision bf16 &
wait
python3 - "$OUT" <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("ab-*.jsonl")):
    rows = [json.loads(l) for l in f.read_text().splitlines()]
    loss = [(r["step"], r["loss"], r.get("mse"), r.get("vlb"), r.get("grad_norm")) for r in rows if "loss" in r]
    best = min(l for _, l, *_ in loss) if loss else float("nan")
    left = next(((s, l, m, v, g) for s, l, m, v, g in loss if l > 5 * best and s > 600), None)
    print(f"{f.stem}: {len(loss)} logs, last step {loss[-1][0] if loss else 0}, best loss {best:.4f}, "
          f"first >5x best after warm-up: {left}")
PY
