#!/usr/bin/env bash
# One device call (≤ 10 min) of the shapes models' training round of 2026-11-23 (fifth session), side by side on one
# GPU (each model is far too small to fill it; the CPUs render the data). Usage:  PHASE=A|B bash scripts/gpu/train_round.sh
#
# PHASE=A (first call):
#   - shapes-c2i and shapes-t2i from scratch with QK-norm (the continued models' attention logits had grown until
#     every continuation diverged: docs/dit.md), LR 1e-3                                                 issue 5
#   - shapes-t2v as Latte-T6/1 started from the shipped shapes-t2i (spatial blocks copied, temporal blocks start as
#     identities: dit/latte.py init_from_image_model), all weights trained                               issue 5
#   - the VAR tokenizer (weights/shapes-vqvae), then the class and text VAR transformers on it (they crashed:
#     fixed since)                                                                                        issue 9
# PHASE=B: c2i and t2i go on from call A's folders (carried in runs/start/, copied over weights/ first); shapes-t2v
#   starts again from the shipped shapes-t2i but trains only its temporal blocks (--trainable: call A's full
#   fine-tune diverged after 650 steps, like every continuation of the shipped models); the VAR transformers from
#   scratch.
# PHASE=C: everything goes on from call B's folders (runs/start/ again; or, next session, FROM_RESUME=1 with an
#   empty runs/start: c2i / t2i from resume/, the rest from weights/), VAR with --init-from; plus DyDiT-c2i
#   (λ 0.5, TD-LoRA) on the new shapes-c2i (issue 8; DYDIT=0 leaves it out) and the shapes LLaVA (issue 10,
#   LLAVA_ARGS; LLAVA_ARGS_B a second LLaVA run beside it).
# PHASE=V: only the class and text VAR transformers, continued from weights/shapes-var-* (issue 9).
# PHASE=R (eighth session): c2i and t2i continued from resume/ (QK-norm, lr LR, default 3e-4) beside the VAR pair
#   continued from weights/ at VAR_LR (default 5e-4); no video, DyDiT or LLaVA run.
# Everything is written to weights/ and runs/; $OUT gets the logs and one tarball of models (≤ 8 files come back).
set -uo pipefail
PHASE=${PHASE:-A}
DIT_LIMIT=${DIT_LIMIT:-420}   # seconds of training for the DiT defaults (compile and final evaluation come on top)
TOK_LIMIT=${TOK_LIMIT:-230}   # phase A: the tokenizer, then the VAR transformers for VAR_LIMIT
VAR_LIMIT=${VAR_LIMIT:-200}
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p runs
python3 -c "import torch, datetime; print('torch', torch.__version__, datetime.datetime.now().isoformat())" > "$OUT/torch.txt"

var_transformers() {  # LIMIT: the class and the text VAR transformer side by side, into weights/shapes-var-*
  local limit=$1
  for kind in c2i t2i; do
    local model=VAR-shapes-d4 init=()
    [ $kind = t2i ] && model=TextVAR-shapes-d4
    [ -n "${VAR_INIT:-}" ] && init=(--init-from "weights/shapes-var-$kind")  # read at the start, written at the end
    python3 scripts/train_var.py --out "runs/var-$kind" --model $model --tokenizer weights/shapes-vqvae \
      --reference-tokenizer --save-to "weights/shapes-var-$kind" --steps 40000 --batch-size 256 --lr ${VAR_LR:-1e-3} \
      --ema 0.999 --mixed-precision bf16 --eval-every 100000 --ckpt-every 100000 --eval-n 192 \
      --time-limit "$limit" "${init[@]}" > "$OUT/var-$kind.log" 2>&1 &
  done
  wait
}

rm -rf runs/t2i-start; cp -r weights/shapes-t2i runs/t2i-start  # the shipped text model the video model starts from (before any copy)
[ -d runs/start ] && [ "$PHASE" != A ] && cp -r runs/start/shapes-* weights/  # the previous call's folders
# FROM_RESUME=1 (with PHASE=C): c2i and t2i go on from the QK-norm transformers in resume/ (docs/dit.md) instead of
# the shipped ones, which cannot be continued; t2v and the VAR models go on from weights/.
if [ "${FROM_RESUME:-}" = 1 ]; then
  for n in c2i t2i; do  # (shapes-c2i's QK-norm state was shipped on 2026-11-24 and left resume/: it goes on from weights/)
    [ -d "resume/shapes-$n-qknorm" ] || continue
    rm -rf "weights/shapes-$n/transformer"; cp -r "resume/shapes-$n-qknorm/transformer" "weights/shapes-$n/"
  done
fi
T2V_FROZEN=(T2V_MODEL=Latte-T6/1 "EXTRA_t2v=--init-from-image runs/t2i-start --trainable temporal_blocks\. --lr 5e-4")
if [ "$PHASE" = A ]; then
  env OMP_NUM_THREADS=3 FRESH="c2i t2i t2v" QKNORM="c2i t2i" LR=1e-3 T2V_MODEL=Latte-T6/1 \
    EXTRA_t2v="--init-from-image runs/t2i-start --lr 3e-4" \
    bash scripts/gpu/train_defaults.sh "$DIT_LIMIT" > "$OUT/defaults.out" 2>&1 &
  (
    OMP_NUM_THREADS=2 python3 scripts/train_vqvae.py --out runs/vqvae-gpu --steps 30000 --batch-size 64 --lr 2e-3 \
      --eval-every 100000 --ckpt-every 100000 --time-limit "$TOK_LIMIT" > "$OUT/vqvae.log" 2>&1
    [ -f runs/vqvae-gpu/model/config.json ] && cp -r runs/vqvae-gpu/model weights/shapes-vqvae
    OMP_NUM_THREADS=2 var_transformers "$VAR_LIMIT"
  ) &
elif [ "$PHASE" = B ]; then
  env OMP_NUM_THREADS=3 FRESH="t2v" LR=8e-4 "${T2V_FROZEN[@]}" \
    bash scripts/gpu/train_defaults.sh "$DIT_LIMIT" > "$OUT/defaults.out" 2>&1 &
  OMP_NUM_THREADS=2 var_transformers "$DIT_LIMIT" &
elif [ "$PHASE" = R ]; then
  env OMP_NUM_THREADS=4 ONLY="c2i t2i" LR=${LR:-3e-4} bash scripts/gpu/train_defaults.sh "$DIT_LIMIT" \
    > "$OUT/defaults.out" 2>&1 &
  OMP_NUM_THREADS=3 VAR_INIT=1 VAR_LR=${VAR_LR:-5e-4} var_transformers "$DIT_LIMIT" &
elif [ "$PHASE" = V ]; then
  # PHASE=V (seventh session): only the two VAR transformers, continued from weights/ (--init-from), the whole call.
  OMP_NUM_THREADS=4 VAR_INIT=1 var_transformers "$DIT_LIMIT" &
else
  env OMP_NUM_THREADS=3 LR=${LR:-5e-4} "EXTRA_t2v=--trainable temporal_blocks\. --lr 3e-4" \
    bash scripts/gpu/train_defaults.sh "$DIT_LIMIT" > "$OUT/defaults.out" 2>&1 &
  OMP_NUM_THREADS=2 VAR_INIT=1 var_transformers "$DIT_LIMIT" &
  [ "${DYDIT:-1}" = 1 ] && OMP_NUM_THREADS=2 python3 scripts/finetune_dydit.py --out runs/dydit-c2i-gpu --model weights/shapes-c2i \
    --train td-lora --lora-rank 4 --lora-experts 4 --lam 0.5 --steps 30000 --batch-size 64 --lr 1e-3 --lam-hold 100 \
    --lam-reach 1000 --pool 20000 --ema-decay 0.999 --eval-every 100000 --ckpt-every 100000 --eval-n 16 \
    --final-eval-n 96 --mixed-precision bf16 --time-limit "$DIT_LIMIT" --save-to runs/dydit-c2i-gpu/model \
    > "$OUT/dydit.log" 2>&1 &
  OMP_NUM_THREADS=2 python3 scripts/train_llava.py --out runs/llava-gpu ${LLAVA_ARGS:-} --time-limit "$DIT_LIMIT" \
    --save-to runs/llava-gpu/model > "$OUT/llava.log" 2>&1 &
  # LLAVA_ARGS_B: a second LLaVA run side by side (an A/B of sizes or recipes), into runs/llava-gpu-b.
  [ -n "${LLAVA_ARGS_B:-}" ] && OMP_NUM_THREADS=2 python3 scripts/train_llava.py --out runs/llava-gpu-b $LLAVA_ARGS_B \
    --time-limit "$DIT_LIMIT" --save-to runs/llava-gpu-b/model > "$OUT/llava-b.log" 2>&1 &
fi
wait
for f in "$OUT"/*.log; do echo "== $f"; grep -v "^\s*$" "$f" | grep -vi "warn" | tail -4 | cut -c1-400; done
# (In a subshell: the seventh session's PHASE=V call had no defaults.out, this tar failed, `cd -` never ran and the
# models' tarball below was taken from $OUT: empty; the weights were fetched from the checkpoints afterwards.)
(cd "$OUT" && tar czf logs.tgz --remove-files *.log $(ls defaults.out 2>/dev/null))
# The shipped folders, logs and plots only (run folders also hold data pools and checkpoints: far over 16 MB), in
# pieces of at most 15 MB (call B's single 19.6 MB tarball did not come back):  cat models.tgz.* | tar xz
tar czf - weights/shapes-{c2i,t2i,t2v,vqvae,var-c2i,var-t2i} runs/*/model runs/*/log.jsonl runs/*/*.png \
  runs/*/card.json 2>/dev/null | split -b 15000000 - "$OUT/models.tgz."
rm -f "$OUT"/dit_defaults.tgz  # train_defaults.sh's own tarball: its contents are in models.tgz.*
ls -la "$OUT"
