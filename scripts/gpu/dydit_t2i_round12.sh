#!/usr/bin/env bash
# One device call (twelfth session): the text DyDiT (routers on shapes-t2i, PixArt style) at lambda 0.6 and 0.7,
# three runs side by side on one GPU, then each compared with the dense shapes-t2i on EVAL_N seeded captions:
#   lora0.6: routers + TD-LoRA continued from LORA_FROM (the lambda 0.5 run of the tenth session), lambda 0.6
#   full0.6: routers + the whole backbone fine-tuned from the dense shapes-t2i (stage 1: complete term), lambda 0.6
#   lora0.7: as lora0.6 at lambda 0.7 (a second point of the text curve)                                    issue 8
#   freshX:  routers + TD-LoRA from fresh routers on the dense shapes-t2i (lambda 1 for 100 steps, X by step 1,000):
#            whether the continued runs above are held back by the lambda 0.5 folder they start from
# Usage: LIMIT=420 [LORA_FROM=runs/dydit-t2i-lora/model] [LORA_LR=1e-3] [RUNS="lora0.6 ..."] bash scripts/gpu/dydit_t2i_round12.sh
#        (carry [".whl"] and LORA_FROM's run folder)
set -uo pipefail
LIMIT=${LIMIT:-420}
WATCH=${WATCH:-565}
EVAL_N=${EVAL_N:-480}
LORA_FROM=${LORA_FROM:-runs/dydit-t2i-lora/model}
LORA_LR=${LORA_LR:-1e-3}  # the continued (lora*) runs; 1e-3 diverged continuing resume/shapes-dydit-t2i-lam0.7 (call 7)
RUNS=${RUNS:-"lora0.6 full0.6 lora0.7"}
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p runs
device_header "LIMIT=$LIMIT LORA_FROM=$LORA_FROM LORA_LR=$LORA_LR RUNS=\"$RUNS\" EVAL_N=$EVAL_N bash scripts/gpu/dydit_t2i_round12.sh"
pack() { tar czf "$OUT/models.tgz" runs/t2i-*/model runs/t2i-*/log.jsonl runs/t2i-*/comparison.json 2>/dev/null; }
(sleep "$WATCH"; pack; echo "watchdog packed at $WATCH s") &
WATCHDOG=$!
COMMON=(--model weights/shapes-t2i --lam-hold 0 --lam-reach 0 --steps 40000 --batch-size 256 --pool 20000
        --ema-decay 0.999 --eval-every 100000 --ckpt-every 100000 --eval-n 16 --log-every 50 --mixed-precision bf16
        --schedule cosine --warmup 100 --anneal-to-time-limit --time-limit "$LIMIT")
PIDS=()
for run in $RUNS; do
  lam=${run#lora}; lam=${lam#full}; lam=${lam#fresh}
  case $run in
    lora*) extra=(--init-from "$LORA_FROM" --train td-lora --lora-rank 4 --lora-experts 4 --lr "$LORA_LR") ;;
    full*) extra=(--train full --stage1-steps 1000 --lr 1e-4 --lam-hold 100 --lam-reach 1000) ;;
    fresh*) extra=(--train td-lora --lora-rank 4 --lora-experts 4 --lr 1e-3 --lam-hold 100 --lam-reach 1000) ;;
  esac
  OMP_NUM_THREADS=4 python3 scripts/finetune_dydit.py --out "runs/t2i-$run" "${COMMON[@]}" "${extra[@]}" \
    --lam "$lam" --save-to "runs/t2i-$run/model" > "$OUT/t2i-$run.log" 2>&1 &
  PIDS+=($!)
done
((${#PIDS[@]})) && wait "${PIDS[@]}"
echo "trainings done at $SECONDS s"
for run in $RUNS; do
  d=runs/t2i-$run; left=$((WATCH - 10 - SECONDS)); ((left < 15)) && { echo "no time left to compare $d"; break; }
  timeout "$left" python3 scripts/finetune_dydit.py --evaluate "$d/model" --final-eval-n "$EVAL_N" \
    > "$d/comparison.json" 2> "$OUT/eval-t2i-$run.log"
  echo "compared $d (exit $?) at $SECONDS s"
done
pkill -P "$WATCHDOG" 2>/dev/null; kill "$WATCHDOG" 2>/dev/null
show_comparisons runs/t2i-*/comparison.json
for f in "$OUT"/t2i-*.log; do echo "== $f"; tail -c 300 "$f"; echo; done
pack
(cd "$OUT" && tar czf logs.tgz --remove-files *.log)
ls -la "$OUT"
