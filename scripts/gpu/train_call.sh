#!/usr/bin/env bash
# One device call (≤ 10 min) that trains every shapes model the GPU should train, side by side on one GPU (each is
# far too small to fill it; the CPUs render the data):
#   - the three DiT defaults, continued from weights/ (scripts/gpu/train_defaults.sh, spike guard on)   issue 5
#   - the shapes LLaVA from scratch, many more steps than the CPU run could take                        issue 10
#   - DyDiT-c2i at lambda 0.5 with TD-LoRA (spec router bias, lambda warm-up to step 1000)              issue 8
#   - the VAR tokenizer (vqvae-shapes-f8), toward >= 30 dB                                               issue 9
# Each job's folder comes back as one tarball in $OUT.   Usage:  bash scripts/gpu/train_call.sh [LIMIT_S]
set -uo pipefail
LIMIT=${1:-330}
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p runs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
OMP_NUM_THREADS=3 bash scripts/gpu/train_defaults.sh "$LIMIT" > "$OUT/defaults.out" 2>&1 &
export OMP_NUM_THREADS=2
python3 scripts/train_llava.py --out runs/llava-gpu --size shapes-llava --steps 30000 --stage1-steps 400 \
  --batch-size 64 --lr 2e-3 --stage1-lr 1e-3 --eval-every 100000 --ckpt-every 100000 --log-every 100 --eval-n 256 \
  --final-eval-n 512 --time-limit "$LIMIT" --save-to runs/llava-gpu/model > "$OUT/llava.log" 2>&1 &
python3 scripts/finetune_dydit.py --out runs/dydit-c2i-gpu --model shapes-c2i --train td-lora --lora-rank 4 \
  --lora-experts 4 --lam 0.5 --steps 30000 --batch-size 64 --lr 1e-3 --lam-hold 100 --lam-reach 1000 --pool 20000 \
  --ema-decay 0.999 --eval-every 100000 --ckpt-every 100000 --eval-n 16 --final-eval-n 96 --mixed-precision bf16 \
  --time-limit "$LIMIT" --save-to runs/dydit-c2i-gpu/model > "$OUT/dydit.log" 2>&1 &
python3 scripts/train_vqvae.py --out runs/vqvae-gpu --steps 30000 --batch-size 64 --lr 2e-3 --eval-every 100000 \
  --ckpt-every 100000 --time-limit "$LIMIT" > "$OUT/vqvae.log" 2>&1 &
wait
for f in llava dydit vqvae; do echo "== $f"; grep -v "^\s*$" "$OUT/$f.log" | grep -vi "warn" | tail -6 | cut -c1-300; done
echo "== defaults"; tail -30 "$OUT/defaults.out" | cut -c1-300
cd "$OUT" && tar czf logs.tgz --remove-files *.log defaults.out && cd - >/dev/null  # at most 8 files come back
# Only the saved models, logs and plots: the run folders also hold feature caches and data pools (a first version
# of this call packed those too, 190 MB, and nothing came back).
tar czf "$OUT/other_runs.tgz" runs/llava-gpu/model runs/dydit-c2i-gpu/model runs/vqvae-gpu/model \
  runs/{llava-gpu,dydit-c2i-gpu,vqvae-gpu}/{log.jsonl,*.png,*.json} 2>/dev/null
ls -la "$OUT"
