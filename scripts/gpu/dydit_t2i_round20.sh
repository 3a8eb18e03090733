#!/usr/bin/env bash
# One device call (twentieth session): text DyDiT on the shipped shapes-t2i of the nineteenth session (QK-norm, caption
# refiner, token grounding; one object 0.984, two objects 0.824), routers + TD-LoRA rank 4 x 4 on the frozen model,
# with the token grounding loss kept on, runs side by side on one GPU, then each compared with the dense shapes-t2i
# on EVAL_N seeded captions per object count (the dense model measured in the same call).                  issue 8
#   rebaseX:  the routers and TD-LoRA of weights/shapes-dydit-t2i (trained on the earlier QK-norm model, of which the
#             new shapes-t2i is a continuation) put on the new model (--rebase), at lambda X from the first step
#   freshX:   fresh routers on the new model, lambda 1 -> X over steps 100..RAMP
#   contX@FOLDER: continue FOLDER (a DyDiT saved over weights/shapes-t2i, carried) at lambda X
#   dcontX@FOLDER: contX with the dense shapes-t2i as a teacher (--distill DISTILL)
#   fcontX@FOLDER: contX with the high-noise floor (twenty-first session): every sample at noise level >= FLOOR_FROM
#             executes at least FLOOR of the dense FLOPs (--high-noise-floor; the shipped routers keep 0.32 at t >= 800)
#   pcontX@FOLDER: contX with the data loss P2-weighted by gamma P2 (--p2-gamma), so that the routers weigh the
#             high-noise steps more against the FLOPs they save (run in the twenty-second session: no change)
#   ffreshX:  freshX with the high-noise floor from the first step (the fcont runs started from routers and adapters
#             fitted without it, and lost quality they did not win back; twenty-second session, not yet run)
# Every run: lr LR (fresh: FRESH_LR), global grad norm clipped to CLIP, cosine decay to the time limit, grounding
# weight GROUND, a new data pool of 40,000 scenes with 1-2 objects (the dense model's data) drawn with seed SEED.
# Usage: LIMIT=400 RUNS="rebase0.58 fresh0.58" bash scripts/gpu/dydit_t2i_round20.sh   (carry [".whl"], and each
# contX folder)
set -uo pipefail
LIMIT=${LIMIT:-400}
WATCH=${WATCH:-570}
EVAL_N=${EVAL_N:-480}
RAMP=${RAMP:-2000}
LR=${LR:-5e-4}
FRESH_LR=${FRESH_LR:-1e-3}
CLIP=${CLIP:-0.25}
DISTILL=${DISTILL:-1}
GROUND=${GROUND:-0.05}
SEED=${SEED:-20}
FLOOR=${FLOOR:-0.5}
FLOOR_FROM=${FLOOR_FROM:-0.7}
P2=${P2:-1}
RUNS=${RUNS:-"rebase0.58 fresh0.58"}
MODEL=weights/shapes-t2i
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p runs
device_header "LIMIT=$LIMIT WATCH=$WATCH EVAL_N=$EVAL_N RAMP=$RAMP LR=$LR FRESH_LR=$FRESH_LR CLIP=$CLIP DISTILL=$DISTILL GROUND=$GROUND SEED=$SEED FLOOR=$FLOOR FLOOR_FROM=$FLOOR_FROM P2=$P2 RUNS=\"$RUNS\" bash scripts/gpu/dydit_t2i_round20.sh"
pack() { tar czf "$OUT/models.tgz" runs/t2i-*/model runs/t2i-*/log.jsonl runs/t2i-*/comparison.json 2>/dev/null; }
(sleep "$WATCH"; pack; echo "watchdog packed at $WATCH s") &
WATCHDOG=$!
COMMON=(--model "$MODEL" --steps 40000 --batch-size 256 --pool 40000 --seed "$SEED" --objects 1-2
        --grounding-loss "$GROUND" --ema-decay 0.999 --eval-every 100000 --ckpt-every 100000 --eval-n 16
        --log-every 50 --mixed-precision bf16 --schedule cosine --warmup 100 --anneal-to-time-limit
        --time-limit "$LIMIT" --train td-lora --lora-rank 4 --lora-experts 4 --max-grad-norm "$CLIP")
PIDS=()
for spec in $RUNS; do
  run=${spec%%@*}
  lam=${run##*[a-z]}
  case $run in
    rebase*) extra=(--init-from weights/shapes-dydit-t2i --rebase --lr "$LR" --lam-hold 0 --lam-reach 0) ;;
    fresh*)  extra=(--lr "$FRESH_LR" --lam-hold 100 --lam-reach "$RAMP") ;;
    ffresh*) extra=(--lr "$FRESH_LR" --lam-hold 100 --lam-reach "$RAMP" --high-noise-floor "$FLOOR"
                    --high-noise-from "$FLOOR_FROM") ;;
    cont*)   extra=(--init-from "${spec#*@}" --lr "$LR" --lam-hold 0 --lam-reach 0) ;;
    dcont*)  extra=(--init-from "${spec#*@}" --lr "$LR" --lam-hold 0 --lam-reach 0 --distill "$DISTILL") ;;
    fcont*)  extra=(--init-from "${spec#*@}" --lr "$LR" --lam-hold 0 --lam-reach 0 --high-noise-floor "$FLOOR"
                    --high-noise-from "$FLOOR_FROM") ;;
    pcont*)  extra=(--init-from "${spec#*@}" --lr "$LR" --lam-hold 0 --lam-reach 0 --p2-gamma "$P2") ;;
    *) echo "unknown run $run"; continue ;;
  esac
  rm -rf "runs/t2i-$run"   # a warm machine keeps runs/ between calls, and --out would resume the old run
  OMP_NUM_THREADS=4 python3 scripts/finetune_dydit.py --out "runs/t2i-$run" "${COMMON[@]}" "${extra[@]}" \
    --lam "$lam" --save-to "runs/t2i-$run/model" > "$OUT/t2i-$run.log" 2>&1 &
  PIDS+=($!)
done
compare_runs
for f in "$OUT"/t2i-*.log; do echo "== $f"; grep -i "step\|final\|error\|Trace" "$f" | tail -4 | cut -c1-600; done
pack
(cd "$OUT" && tar czf logs.tgz --remove-files *.log)
ls -la "$OUT"
