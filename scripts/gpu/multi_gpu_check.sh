#!/usr/bin/env bash
# One device call on an H200 pair (kind nvidia-h200-x2): scripts/train_dit.py on one GPU and, unchanged, on two
# (accelerate launch --multi_gpu, DDP) at the same global batch. The global batch is drawn whole from each step's
# seed and split over processes (scripts/train_dit.py), so the two loss curves must agree to float rounding;
# the log's "seconds" give each run's throughput. Then the same two-GPU run sharded (--fsdp, FSDP2): its curve
# agrees to bf16 rounding only (FSDP computes with bf16 copies of the weights where DDP autocasts the products).
# Then (SPEED=1, the default) the DiT-XL/2 training-throughput benchmark on one GPU.
#   [SPEED=0] bash scripts/gpu/multi_gpu_check.sh [STEPS]
set -uo pipefail
STEPS=${1:-400}
source scripts/gpu/env.sh
mkdir -p runs
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 OMP_NUM_THREADS=4
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nvidia-smi topo -m; date -u; python3 -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__)"; } 2>&1 | tee "$OUT/device.txt"
ARGS=(scripts/train_dit.py --model DiT-T/1 --steps "$STEPS" --batch-size 1024 --pool 60000 --lr 3e-4 --warmup 50
      --log-every 10 --eval-every 100000 --ckpt-every 100000 --mixed-precision bf16 --ema-decay 0.999 --seed 3)
accelerate launch --num_processes 1 --mixed_precision bf16 --dynamo_backend no "${ARGS[@]}" --out runs/mg-1gpu \
  > "$OUT/mg-1gpu.log" 2>&1
accelerate launch --multi_gpu --num_processes 2 --mixed_precision bf16 --dynamo_backend no "${ARGS[@]}" \
  --out runs/mg-2gpu > "$OUT/mg-2gpu.log" 2>&1
accelerate launch --multi_gpu --num_processes 2 --mixed_precision bf16 --dynamo_backend no "${ARGS[@]}" --fsdp \
  --out runs/mg-2gpu-fsdp > "$OUT/mg-2gpu-fsdp.log" 2>&1
cp runs/mg-1gpu/log.jsonl "$OUT/mg-1gpu.jsonl"; cp runs/mg-2gpu/log.jsonl "$OUT/mg-2gpu.jsonl"
cp runs/mg-2gpu-fsdp/log.jsonl "$OUT/mg-2gpu-fsdp.jsonl"
python3 - "$OUT" <<'PY' | tee "$OUT/multi_gpu_summary.json"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def load(name):
    return [json.loads(l) for l in (out / f"{name}.jsonl").read_text().splitlines() if '"loss"' in l]
a, b = load("mg-1gpu"), load("mg-2gpu")
steps = [r["step"] for r in a]
diff = [abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a, b)]
def throughput(rows):  # images per second between the 2nd log record (compile / warm-up done) and the last
    return (rows[-1]["step"] - rows[1]["step"]) * 1024 / (rows[-1]["seconds"] - rows[1]["seconds"])
summary = {"steps": steps[-1], "global_batch": 1024, "max_rel_loss_diff": max(diff),
           "rel_loss_diff_first_10": diff[:10], "img_per_s_1gpu": throughput(a),
           "img_per_s_2gpu": throughput(b), "scaling": throughput(b) / throughput(a)}
if (out / "mg-2gpu-fsdp.jsonl").is_file():  # the sharded run (see mg-2gpu-fsdp.log if it is missing)
    c = load("mg-2gpu-fsdp")
    diff_fsdp = [abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a, c)]
    summary.update(fsdp_steps=c[-1]["step"], fsdp_max_rel_loss_diff=max(diff_fsdp),
                   fsdp_rel_loss_diff_first_10=diff_fsdp[:10], img_per_s_2gpu_fsdp=throughput(c))
print(json.dumps(summary, indent=1))
PY
if [ "${SPEED:-1}" = 1 ]; then
  python3 bench/train_dit_speed.py --out "$OUT/train_dit_speed.json" > "$OUT/train_dit_speed.log" 2>&1
  tail -12 "$OUT/train_dit_speed.log"
fi
