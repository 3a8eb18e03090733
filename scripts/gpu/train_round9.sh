#!/usr/bin/env bash
# One device call (ninth session, 2026-11-24), three trainings side by side on one GPU:
#   t2v:    shapes-t2v continued with its temporal blocks AND the spatial blocks' cross-attention (and the caption
#           projection) trainable. With the image weights frozen the model had no way to read the motion words:
#           the frozen cross-attention read "moving right" as the place "right" (docs/dit.md). Saved over shapes-t2i
#           (only what differs), so it stays under the 4 MB budget.                                     issue 5
#   var-d8: shapes-var-c2i grown from depth 4 to 8 (vlm/var.py grow_depth: the grown model computes what the shipped
#           one does, the repeats start as identities) and trained on; saved with int8 weights (dit/int8_weights.py)
#           so that it fits the 8 MB VAR budget.                                                        issue 9
#   var-d7: the same grown to depth 7 (fits the budget beside the fp16 text model).                     issue 9
# Second call: VAR_RUNS=c2i-cont8 T2V_LR=5e-4 (the grown d8 continued; the video run again, its first save had
# failed). Third: T2V=0 VAR_RUNS="c2i-cont8 t2i-grow6" (no video run).
# Usage: LIMIT=400 bash scripts/gpu/train_round9.sh   (carry [".whl"]). Everything lands in $OUT: logs + one tarball.
set -uo pipefail
LIMIT=${LIMIT:-400}
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p runs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, datetime; print('torch', torch.__version__, datetime.datetime.now().isoformat())" | tee "$OUT/torch.txt"

[ "${T2V:-1}" = 1 ] && OMP_NUM_THREADS=4 accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
  scripts/train_dit.py --out runs/shapes-t2v --model weights/shapes-t2v --steps 20000 --batch-size 64 \
  --sample-eval-n 32 --final-eval-n 128 --eval-every 1000 --pool 30000 --compile --save-to weights/shapes-t2v \
  --mixed-precision bf16 --lr ${T2V_LR:-3e-4} --keep-best --warmup 300 --ema-decay 0.999 --save-dtype float16 \
  --ckpt-every 100000 --time-limit "$LIMIT" --anneal-to-time-limit --log-every 50 --rollback-on-spike 200 \
  --trainable 'temporal_blocks\.|spatial_blocks\.\d+\.cross_attn\.|caption_embed\.' > "$OUT/t2v.log" 2>&1 &
# VAR_RUNS, each KIND-MODE (c2i|t2i, growD|contD): "c2i-grow8 c2i-grow7" (first call: grown from the shipped d4),
# "c2i-cont8" (the grown d8 continued as the named size VAR-shapes-d8), "t2i-grow6" (the text model grown to 6).
for r in ${VAR_RUNS:-c2i-grow8 c2i-grow7}; do
  kind=${r%%-*} mode=${r#*-}; d=${mode: -1}
  base=VAR-shapes; [ "$kind" = t2i ] && base=TextVAR-shapes
  if [[ $mode == grow* ]]; then start=(--model "$base-d4" --init-from "weights/shapes-var-$kind" --grow-depth "$d")
  else start=(--model "$base-d$d" --init-from "weights/shapes-var-$kind-d$d"); fi
  sampling=(--cfg 2.0 --top-p 0.8); [ "$kind" = t2i ] && sampling=(--cfg 1.0 --top-p 0.9)
  OMP_NUM_THREADS=3 python3 scripts/train_var.py --out "runs/var-$r" "${start[@]}" \
    --tokenizer weights/shapes-vqvae --reference-tokenizer --save-to "weights/shapes-var-$kind-d$d" --steps 40000 \
    --batch-size 256 --lr ${VAR_LR:-5e-4} --ema 0.999 --mixed-precision bf16 --eval-every 100000 \
    --ckpt-every 100000 --eval-n 192 "${sampling[@]}" --time-limit $((LIMIT + 20)) --int8 \
    > "$OUT/var-$r.log" 2>&1 &
done
wait
for f in "$OUT"/*.log; do echo "== $f"; grep -v "^\s*$" "$f" | grep -vi "warn" | tail -3 | cut -c1-400; done
tar czf "$OUT/models.tgz" weights/shapes-t2v weights/shapes-var-c2i-d* weights/shapes-var-t2i-d* \
  runs/*/log.jsonl runs/*/*.png runs/*/card.json 2>/dev/null
(cd "$OUT" && tar czf logs.tgz --remove-files *.log)
ls -la "$OUT"
