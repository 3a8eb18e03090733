#!/usr/bin/env bash
# One device call (tenth session, 2026-11-24), trainings side by side on one GPU:
#   dydit-c2i-lora:  DyDiT at lambda 0.5 on the shipped shapes-c2i (QK-norm, 0.954): routers + TD-LoRA, the backbone
#                    frozen, lr 1e-3 with warm-up and cosine decay to the time limit (the earlier GPU runs kept a
#                    constant LR to the end).                                                          issue 8
#   dydit-c2i-full:  the same with every weight trained (the spec's full fine-tuning, stage 1's complete-forward term
#                    for the first 1,000 steps), lr 2e-4.                                              issue 8
#   dydit-t2i-lora:  routers + TD-LoRA on the shipped shapes-t2i.                                      issue 8
#   t2v:             shapes-t2v continued (temporal blocks, spatial cross-attention, caption projection). issue 5
#   t2i-full:        every weight of shapes-t2i trained.                                               issue 8
# DYDIT_ARGS is added to every DyDiT run (second call: "--distill 3", the frozen dense model's output as a target;
# that option was measured worse and removed). CONTINUE=1 (third call): each DyDiT run goes on from the first call's
# folder runs/dydit-NAME/model (carried), already at lambda, into runs/dydit-NAME-c; BATCH sets the batch (64).
# After the trainings, each DyDiT folder is compared with its dense base on EVAL_N seeded prompts (GPU), one at a
# time, each under a time cap. The first call ran the comparisons inside the trainings and ran out of time in them;
# a watchdog now packs whatever exists at WATCH seconds, so a late step cannot lose the trained folders.
# Usage: LIMIT=400 [RUNS="c2i-lora c2i-full t2i-lora t2v"] bash scripts/gpu/train_round10.sh   (carry [".whl"])
set -uo pipefail
LIMIT=${LIMIT:-400}
WATCH=${WATCH:-555}
EVAL_N=${EVAL_N:-480}
RUNS=${RUNS:-"c2i-lora c2i-full t2i-lora t2v"}
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p runs
device_header "LIMIT=$LIMIT RUNS=\"$RUNS\" DYDIT_ARGS=\"${DYDIT_ARGS:-}\" bash scripts/gpu/train_round10.sh"
pack() { tar czf "$OUT/models.tgz" --exclude='*/checkpoints' weights/shapes-t2v runs/*/model runs/*/log.jsonl \
  runs/*/*.png runs/*/comparison.json 2>/dev/null; }
(sleep "$WATCH"; pack; echo "watchdog packed at $WATCH s") &
WATCHDOG=$!

dydit() {  # NAME MODEL EVAL_N [extra args...]
  local name=$1 model=$2 n=$3; shift 3
  local start=(--lam-hold 100 --lam-reach 1000) out=runs/dydit-$name
  if [ "${CONTINUE:-0}" = 1 ]; then start=(--init-from "runs/dydit-$name/model" --lam-hold 0 --lam-reach 0); out=$out-c; fi
  OMP_NUM_THREADS=3 python3 scripts/finetune_dydit.py --out "$out" --model "$model" --lam 0.5 \
    --steps 40000 --batch-size "${BATCH:-64}" "${start[@]}" --pool 20000 --ema-decay 0.999 \
    --eval-every 100000 --ckpt-every 100000 --eval-n 16 --log-every 50 --mixed-precision bf16 \
    --schedule cosine --warmup 100 --anneal-to-time-limit --time-limit "$LIMIT" --save-to "$out/model" \
    ${DYDIT_ARGS:-} "$@" > "$OUT/dydit-$name.log" 2>&1
}
PIDS=()
for r in $RUNS; do
  case $r in
    c2i-lora) dydit c2i-lora weights/shapes-c2i 480 --train td-lora --lora-rank 4 --lora-experts 4 --lr 1e-3 & ;;
    c2i-full) dydit c2i-full weights/shapes-c2i 480 --train full --stage1-steps 1000 --lr ${FULL_LR:-2e-4} & ;;
    t2i-lora) dydit t2i-lora weights/shapes-t2i 256 --train td-lora --lora-rank 4 --lora-experts 4 --lr 1e-3 & ;;
    t2i-full) dydit t2i-full weights/shapes-t2i 256 --train full --stage1-steps 1000 --lr ${FULL_LR:-2e-4} & ;;
    t2v) OMP_NUM_THREADS=3 accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 \
      --dynamo_backend no scripts/train_dit.py --out runs/shapes-t2v --model weights/shapes-t2v --steps 20000 \
      --batch-size 64 --sample-eval-n 32 --final-eval-n 128 --eval-every 1000 --pool 30000 --compile \
      --save-to weights/shapes-t2v --mixed-precision bf16 --lr ${T2V_LR:-4e-4} --keep-best --warmup 300 \
      --ema-decay 0.999 --save-dtype float16 --ckpt-every 100000 --time-limit "$LIMIT" --anneal-to-time-limit \
      --log-every 50 --rollback-on-spike 200 \
      --trainable 'temporal_blocks\.|spatial_blocks\.\d+\.cross_attn\.|caption_embed\.' > "$OUT/t2v.log" 2>&1 & ;;
    *) echo "unknown run $r"; exit 2 ;;
  esac
  PIDS+=($!)
done
wait "${PIDS[@]}"
echo "trainings done at $SECONDS s"
SUF=; [ "${CONTINUE:-0}" = 1 ] && SUF=-c
for r in $RUNS; do  # one comparison at a time, each capped
  [[ $r == t2v ]] && continue
  d=runs/dydit-$r$SUF/model
  left=$((WATCH - 10 - SECONDS)); ((left < 20)) && { echo "no time left to compare $d"; break; }
  timeout "$left" python3 scripts/finetune_dydit.py --evaluate "$d" --final-eval-n "$EVAL_N" \
    > "${d%/model}/comparison.json" 2> "$OUT/eval-$(basename "${d%/model}").log"
  echo "compared $d (exit $?) at $SECONDS s"
done
pkill -P "$WATCHDOG" 2>/dev/null; kill "$WATCHDOG" 2>/dev/null  # its sleep too: it holds the output pipe open
for f in "$OUT"/*.log; do echo "== $f"; grep -v "^\s*$" "$f" | grep -vi "warn" | tail -3 | cut -c1-600; done
for r in $RUNS; do d=runs/dydit-$r$SUF; [[ $r == t2v ]] && continue; echo "== $d"; python3 -c "import json,sys; c=json.load(open(sys.argv[1])); print({k: c[k] for k in ('dense','dydit','sampling_flops_ratio','sampling_flops_ratio_with_overheads')})" "$d/comparison.json" 2>&1 | cut -c1-900; done
pack
(cd "$OUT" && tar czf logs.tgz --remove-files *.log)
ls -la "$OUT"
