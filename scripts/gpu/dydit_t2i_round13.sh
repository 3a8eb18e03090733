#!/usr/bin/env bash
# One device call (thirteenth session): text DyDiT (routers + TD-LoRA on shapes-t2i) toward lambda 0.6, runs side
# by side on one GPU, then each compared with the dense shapes-t2i on EVAL_N seeded captions, the comparisons in
# parallel (the eager sliced sampler is host-bound) against the dense numbers already measured on the H100.  issue 8
#   distillX:  fresh routers on the dense model, lambda 1 -> X over steps 100..RAMP, --distill 1 (dense teacher)
#   r8distillX: the same with TD-LoRA rank 8
#   stepX:     continues STEP_FROM (lambda 0.7) with lambda 0.7 -> X over steps 0..1500, lr LORA_LR, --distill 1
#   freshX:    distillX without the teacher (the control; call 6 of the twelfth session ran it with RAMP=1000)
#   r8freshX:  freshX with TD-LoRA rank 8
#   clipX:     freshX with the global grad norm clipped to CLIP (calls 1-2: norms rose from 0.002 to 10-46, diverged)
#   slowX:     clipX at lr 3e-4
#   wdX:       clipX with AdamW weight decay WD on routers and adapters (call 4: the adapters' grad norm kept rising)
#   contX / contlowX: continue CONT_FROM (a TD-LoRA rank-4 folder, carried) at lambda X from the first step, grad norm
#              clipped to CLIP, lr LORA_LR / CONT2_LR
#   downX:     continue CONT_FROM with lambda DOWN_FROM -> X over DOWN_REACH steps, lr LORA_LR, clipped (fourteenth session)
#   a run written RUN@FOLDER (cont/contlow/down) continues FOLDER instead of CONT_FROM (fifteenth session)
# QK=1: every run on the QK-norm text model instead (resume/shapes-t2i-qknorm's transformer in a copy of the
# shipped pipeline folder, weights/shapes-t2i-qk, made here on the device only), compared with that model measured
# in the same call.
# PROBE=1 first times the compiled sliced path's LayerNorm functions alone (bench/dydit_ln_probe.py, before the
# trainings share the GPU).
# Usage: LIMIT=400 RUNS="distill0.6 step0.6 r8distill0.6" bash scripts/gpu/dydit_t2i_round13.sh   (carry [".whl"])
set -uo pipefail
LIMIT=${LIMIT:-400}
WATCH=${WATCH:-560}
EVAL_N=${EVAL_N:-480}
RAMP=${RAMP:-2500}
STEP_FROM=${STEP_FROM:-resume/shapes-dydit-t2i-lam0.7}
LORA_LR=${LORA_LR:-3e-4}
FRESH_LR=${FRESH_LR:-1e-3}
DISTILL=${DISTILL:-1}
CLIP=${CLIP:-0.25}
WD=${WD:-0.1}
CONT_FROM=${CONT_FROM:-runs/from/model}
CONT2_LR=${CONT2_LR:-2e-4}
PROBE=${PROBE:-0}
DOWN_FROM=${DOWN_FROM:-0.6}     # downX: CONT_FROM's lambda stepped to X over DOWN_REACH steps
DOWN_REACH=${DOWN_REACH:-600}
QK=${QK:-0}
EXTRA=${EXTRA:-}                # more finetune_dydit.py arguments for every run, e.g. "--stage1-steps 0" (stage 2)
MODEL=weights/shapes-t2i
RUNS=${RUNS:-"distill0.6 step0.6 r8distill0.6"}
DENSE=bench/results/dense_shapes_t2i_cuda_n480.json
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p runs
DENSE_ARGS=(--dense-metrics "$DENSE")
[ "$EVAL_N" = 480 ] || DENSE_ARGS=()   # the kept dense numbers are for 480 captions: other sizes measure dense again
if [ "$QK" = 1 ]; then
  MODEL=weights/shapes-t2i-qk
  rm -rf "$MODEL"; cp -r weights/shapes-t2i "$MODEL"; rm -rf "$MODEL/transformer"
  cp -r resume/shapes-t2i-qknorm/transformer "$MODEL/transformer"
  DENSE_ARGS=()
  # The QK-norm model's dense numbers, measured once on the device (call 6 of the thirteenth session), when kept.
  [ -f bench/results/dense_shapes_t2i_qk_cuda_n480.json ] && [ "$EVAL_N" = 480 ] && DENSE_ARGS=(--dense-metrics bench/results/dense_shapes_t2i_qk_cuda_n480.json)
fi
device_header "LIMIT=$LIMIT WATCH=$WATCH RAMP=$RAMP STEP_FROM=$STEP_FROM LORA_LR=$LORA_LR FRESH_LR=$FRESH_LR DISTILL=$DISTILL CLIP=$CLIP WD=$WD CONT_FROM=$CONT_FROM CONT2_LR=$CONT2_LR DOWN_FROM=$DOWN_FROM DOWN_REACH=$DOWN_REACH PROBE=$PROBE QK=$QK EXTRA=\"$EXTRA\" RUNS=\"$RUNS\" EVAL_N=$EVAL_N bash scripts/gpu/dydit_t2i_round13.sh"
pack() { tar czf "$OUT/models.tgz" runs/t2i-*/model runs/t2i-*/log.jsonl runs/t2i-*/comparison.json 2>/dev/null; }
(sleep "$WATCH"; pack; echo "watchdog packed at $WATCH s") &
WATCHDOG=$!
if [ "$PROBE" = 1 ]; then
  timeout 150 python3 bench/dydit_ln_probe.py --out "$OUT/dydit_ln_probe.json" > "$OUT/probe.log" 2>&1
  echo "probe exit $? at $SECONDS s"; grep "variant" "$OUT/probe.log" | cut -c1-200
fi
COMMON=(--model "$MODEL" --steps 40000 --batch-size 256 --pool 20000 --ema-decay 0.999
        --eval-every 100000 --ckpt-every 100000 --eval-n 16 --log-every 50 --mixed-precision bf16
        --schedule cosine --warmup 100 --anneal-to-time-limit --time-limit "$LIMIT")
FRESH=(--train td-lora --lora-experts 4 --lr "$FRESH_LR" --lam-hold 100 --lam-reach "$RAMP")
PIDS=()
for spec in $RUNS; do
  run=${spec%%@*}; src=$CONT_FROM          # "cont0.55@resume/x": this run continues resume/x instead of CONT_FROM
  [ "$spec" != "$run" ] && src=${spec#*@}
  lam=${run##*[a-z]}
  case $run in
    distill*)   extra=("${FRESH[@]}" --lora-rank 4 --distill "$DISTILL") ;;
    r8distill*) extra=("${FRESH[@]}" --lora-rank 8 --distill "$DISTILL") ;;
    fresh*)     extra=("${FRESH[@]}" --lora-rank 4) ;;
    r8fresh*)   extra=("${FRESH[@]}" --lora-rank 8) ;;
    clip*)      extra=("${FRESH[@]}" --lora-rank 4 --max-grad-norm "$CLIP") ;;
    wd*)        extra=("${FRESH[@]}" --lora-rank 4 --max-grad-norm "$CLIP" --weight-decay "$WD") ;;
    slow*)      extra=(--train td-lora --lora-experts 4 --lr 3e-4 --lam-hold 100 --lam-reach "$RAMP" --lora-rank 4
                       --max-grad-norm "$CLIP") ;;
    step*)      extra=(--init-from "$STEP_FROM" --train td-lora --lora-rank 4 --lora-experts 4 --lr "$LORA_LR"
                       --lam-start 0.7 --lam-hold 0 --lam-reach 1500 --distill "$DISTILL") ;;
    contlow*)   extra=(--init-from "$src" --train td-lora --lora-rank 4 --lora-experts 4 --lr "$CONT2_LR"
                       --lam-hold 0 --lam-reach 0 --max-grad-norm "$CLIP") ;;
    down*)      extra=(--init-from "$src" --train td-lora --lora-rank 4 --lora-experts 4 --lr "$LORA_LR"
                       --lam-start "$DOWN_FROM" --lam-hold 0 --lam-reach "$DOWN_REACH" --max-grad-norm "$CLIP") ;;
    cont*)      extra=(--init-from "$src" --train td-lora --lora-rank 4 --lora-experts 4 --lr "$LORA_LR"
                       --lam-hold 0 --lam-reach 0 --max-grad-norm "$CLIP") ;;
    *) echo "unknown run $run"; continue ;;
  esac
  rm -rf "runs/t2i-$run"   # a warm machine keeps runs/ between calls, and --out would resume the old run
  OMP_NUM_THREADS=4 python3 scripts/finetune_dydit.py --out "runs/t2i-$run" "${COMMON[@]}" "${extra[@]}" \
    --lam "$lam" $EXTRA --save-to "runs/t2i-$run/model" > "$OUT/t2i-$run.log" 2>&1 &
  PIDS+=($!)
done
compare_runs "${DENSE_ARGS[@]}"
for f in "$OUT"/t2i-*.log; do echo "== $f"; tail -c 300 "$f"; echo; done
pack
(cd "$OUT" && tar czf logs.tgz --remove-files *.log)
ls -la "$OUT"
