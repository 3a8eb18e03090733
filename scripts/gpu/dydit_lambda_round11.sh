#!/usr/bin/env bash
# One device call (eleventh session): DyDiT-c2i at several lambda side by side on one GPU, each continued from the
# shipped weights/shapes-dydit-c2i (lambda 0.5; --init-from, the new lambda from the first step), then each compared
# with the dense shapes-c2i on EVAL_N seeded prompts on the GPU: the issue's curve over lambda, and lambda 0.5 trained
# further (the candidate to ship).                                                                        issue 8
# T2I_FROM=FOLDER (carried) also continues a text DyDiT (routers + TD-LoRA on shapes-t2i, lambda 0.5) into
# runs/dydit-t2i-e; COMPARE="FOLDER ..." compares already trained DyDiT folders first (copied under runs/, so that
# their relative base path resolves), e.g. the previous call's lambda 0.9.
# INIT_FROM=FOLDER: continue another DyDiT-c2i instead (e.g. resume/shapes-dydit-c2i-lam0.6).
# Usage: LIMIT=430 [LAMS="0.5 0.3 0.7 0.9"] [INIT_FROM=...] [T2I_FROM=runs/dydit-t2i-lora/model] [COMPARE=...] \
#        bash scripts/gpu/dydit_lambda_round11.sh   (carry [".whl"] and T2I_FROM's run folder)
set -uo pipefail
LIMIT=${LIMIT:-430}
WATCH=${WATCH:-565}
EVAL_N=${EVAL_N:-480}
LAMS=${LAMS-"0.5 0.3 0.7 0.9"}  # LAMS="" trains none (COMPARE only)
LR=${LR:-5e-4}
INIT_FROM=${INIT_FROM:-weights/shapes-dydit-c2i}  # the DyDiT-c2i each lambda run continues
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p runs
device_header "LIMIT=$LIMIT LAMS=\"$LAMS\" INIT_FROM=$INIT_FROM LR=$LR EVAL_N=$EVAL_N T2I_FROM=${T2I_FROM:-} COMPARE=\"${COMPARE:-}\" bash scripts/gpu/dydit_lambda_round11.sh"
pack() { tar czf "$OUT/models.tgz" runs/dydit-lam*/model runs/dydit-lam*/log.jsonl runs/dydit-lam*/comparison.json \
  runs/dydit-t2i-e/model runs/dydit-t2i-e/log.jsonl runs/dydit-t2i-e/comparison.json runs/compare-*/comparison.json \
  2>/dev/null; }
i=0
for f in ${COMPARE:-}; do  # before the trainings: the GPU is free, so these take seconds
  i=$((i + 1)); d=runs/compare-$i; mkdir -p "$d"; cp -r "$f" "$d/model"
  python3 - "$d/model/dydit_config.json" <<'PY'
import json, sys
p = sys.argv[1]; c = json.load(open(p)); c["base"] = "../../../weights/" + c["base"].rstrip("/").split("/")[-1]
json.dump(c, open(p, "w"), indent=2)
PY
  python3 scripts/finetune_dydit.py --evaluate "$d/model" --final-eval-n "$EVAL_N" > "$d/comparison.json" \
    2> "$OUT/eval-compare-$i.log"
  echo "compared $f as $d (exit $?) at $SECONDS s"
done
(sleep "$WATCH"; pack; echo "watchdog packed at $WATCH s") &
WATCHDOG=$!
PIDS=()
for lam in $LAMS; do
  OMP_NUM_THREADS=3 python3 scripts/finetune_dydit.py --out "runs/dydit-lam$lam" --model weights/shapes-c2i \
    --init-from "$INIT_FROM" --lam-hold 0 --lam-reach 0 --lam "$lam" --train td-lora --lora-rank 4 \
    --lora-experts 4 --lr "$LR" --steps 40000 --batch-size 256 --pool 20000 --ema-decay 0.999 \
    --eval-every 100000 --ckpt-every 100000 --eval-n 16 --log-every 50 --mixed-precision bf16 \
    --schedule cosine --warmup 100 --anneal-to-time-limit --time-limit "$LIMIT" --save-to "runs/dydit-lam$lam/model" \
    > "$OUT/dydit-lam$lam.log" 2>&1 &
  PIDS+=($!)
done
if [ -n "${T2I_FROM:-}" ]; then
  OMP_NUM_THREADS=3 python3 scripts/finetune_dydit.py --out runs/dydit-t2i-e --model weights/shapes-t2i \
    --init-from "$T2I_FROM" --lam-hold 0 --lam-reach 0 --lam 0.5 --train td-lora --lora-rank 4 --lora-experts 4 \
    --lr "${T2I_LR:-1e-3}" --steps 40000 --batch-size 256 --pool 20000 --ema-decay 0.999 --eval-every 100000 \
    --ckpt-every 100000 --eval-n 16 --log-every 50 --mixed-precision bf16 --schedule cosine --warmup 100 \
    --anneal-to-time-limit --time-limit "$LIMIT" --save-to runs/dydit-t2i-e/model > "$OUT/dydit-t2i-e.log" 2>&1 &
  PIDS+=($!)
fi
((${#PIDS[@]})) && wait "${PIDS[@]}"  # (a bare `wait` would also wait for the watchdog)
echo "trainings done at $SECONDS s"
for d in ${T2I_FROM:+runs/dydit-t2i-e} $(for lam in $LAMS; do echo runs/dydit-lam$lam; done); do
  left=$((WATCH - 10 - SECONDS)); ((left < 15)) && { echo "no time left to compare $d"; break; }
  timeout "$left" python3 scripts/finetune_dydit.py --evaluate "$d/model" --final-eval-n "$EVAL_N" \
    > "$d/comparison.json" 2> "$OUT/eval-$(basename "$d").log"
  echo "compared $d (exit $?) at $SECONDS s"
done
pkill -P "$WATCHDOG" 2>/dev/null; kill "$WATCHDOG" 2>/dev/null
show_comparisons runs/compare-*/comparison.json runs/dydit-t2i-e/comparison.json runs/dydit-lam*/comparison.json
for f in "$OUT"/dydit-*.log; do echo "== $f"; tail -c 300 "$f"; echo; done
pack
(cd "$OUT" && tar czf logs.tgz --remove-files *.log)
ls -la "$OUT"
