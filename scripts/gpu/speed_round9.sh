#!/usr/bin/env bash
# One device call (ninth session) for issue 6's rows still unmeasured, in priority order. Each step runs under its
# own `timeout`: its cap, or what is left of TOTAL seconds for the whole script if less (time a step does not use
# goes to the later ones); a step with less than its minimum left is skipped. A step cut off keeps the rows it wrote.
#   train:         DiT-XL/2 256 px training, global batch 256, bf16: diffusers' model vs ours at micro-batch 64, and
#                  micro-batch 256 with gradient checkpointing (bench/train_dit_speed.py)
#   pixart:        PixArt-α 512 px, 8 images, 20 DPM++ steps: ours compiled vs diffusers compiled (`default` preset),
#                  re-timed since the fc1+GELU cuBLASLt epilogue (dit/epilogue.py)
#   latte:         Latte-1 16 × 512², one guided forward: ours compiled vs diffusers compiled, likewise
#   train-compile: ours at micro-batch 64 under torch.compile (merged into the train JSON)
#   dydit:         DyDiT-XL/2 λ 0.5, batch 8: dense / dense-compiled (never run on a GPU) / sliced-cap-graphs
# STEPS chooses (default all five); TOTAL (540) the whole script's seconds; T_TRAIN / T_PIXART the caps of the first
# two. SMOKE=1 runs every step at the benchmarks' tiny CPU sizes (argument check before a call; PATH=.venv/bin:$PATH
# OUT=/tmp/r9 SMOKE=1 bash scripts/gpu/speed_round9.sh). Carry: [".whl"].
set -uo pipefail
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
LOG="$OUT/speed_round9.log"
TOTAL=${TOTAL:-540}
STEPS=${STEPS:-"train pixart latte train-compile dydit"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, diffusers, platform; print('python', platform.python_version(), 'torch', torch.__version__,
'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'gpu',
torch.cuda.get_device_name() if torch.cuda.is_available() else None)" | tee "$OUT/env.txt"
if [[ -n "${SMOKE:-}" ]]; then  # tiny sizes on the CPU: micro-batches dividing the smoke's global batch of 8
  SMOKE_ARG=--smoke TRAIN_VARIANTS=diffusers:4,ours:4,ours:8:ckpt,diffusers:8:ckpt TRAIN_COMPILE=ours:4:compile
  PIXART_BATCHES=1 DYDIT_SIZE="tiny --device cpu --steps 3" RES=$OUT/smoke_results
else
  SMOKE_ARG= TRAIN_VARIANTS=diffusers:64,ours:64,ours:256:ckpt,diffusers:256:ckpt TRAIN_COMPILE=ours:64:compile
  PIXART_BATCHES=8 DYDIT_SIZE="XL --steps 50" RES=bench/results
fi
mkdir -p "$RES"
echo "# provenance: $(head -1 "$OUT/device.txt"), $(cat "$OUT/env.txt"), started $(date -u '+%Y-%m-%d %H:%M UTC'),"\
     "command: STEPS=\"$STEPS\" TOTAL=$TOTAL bash scripts/gpu/speed_round9.sh" > "$LOG"

capped_step train ${T_TRAIN:-130} 60 python3 bench/train_dit_speed.py $SMOKE_ARG --variants $TRAIN_VARIANTS \
  --steps 5 --warmup 2 --out $RES/train_dit_speed.json
capped_step pixart ${T_PIXART:-200} 110 python3 bench/sample_dit.py $SMOKE_ARG --workloads pixart512 --presets default \
  --diffusers-presets default --batches $PIXART_BATCHES --split-preset default \
  --out $RES/sample_dit_round9_pixart.json
capped_step latte 600 200 python3 bench/sample_dit.py $SMOKE_ARG --workloads latte512 --presets default \
  --diffusers-presets default --split-preset default --out $RES/sample_dit_round9_latte.json
capped_step train-compile 600 100 python3 bench/train_dit_speed.py $SMOKE_ARG --variants $TRAIN_COMPILE --steps 5 --warmup 2 \
  --merge --out $RES/train_dit_speed.json
capped_step dydit 600 100 python3 bench/dydit_speed.py --size $DYDIT_SIZE --batches 8 --lams 0.5 --repeats 2 --no-split \
  --variants dense dense-compiled sliced-cap-graphs --out $RES/dydit_speed_round9.json
echo "== done at $SECONDS s" | tee -a "$LOG"
cp "$RES"/{train_dit_speed,sample_dit_round9_pixart,sample_dit_round9_latte,dydit_speed_round9}.json "$OUT"/ 2>/dev/null
grep -E "^== |^exit|Error|^\{|^\| |B=" "$LOG" | cut -c1-400
ls -la "$OUT"
