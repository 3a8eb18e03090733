"""Train the shapes LLaVA: the two LLaVA-1.5 stages on the shapes world, on accelerate.

    python scripts/train_llava.py --out runs/llava --size shapes-llava --stage1-steps 600 --steps 4000 \
        --batch-size 64 --save-to weights/shapes-llava --cpu          # the shipped model (CPU)
    python scripts/train_llava.py --out runs/smoke --size shapes-llava-tiny --steps 6 --stage1-steps 2 \
        --batch-size 4 --pool 64 --eval-n 8 --cpu                      # smoke test

Stage 1 (steps 0 .. --stage1-steps): feature alignment on captions with LLaVA's 'plain' template
"<image>{caption}\\n", loss on the caption only. LLaVA-1.5 trains only the projector here because its LLM is a
pretrained Vicuna; the shapes world has no pretrained language model, so by default (`--stage1-train lm`) the
decoder learns the captions' language in this stage too; `--stage1-train projector` is the paper's setting.
Stage 2 (the remaining steps): instruction tuning on shapes visual questions (colour, shape, count, position,
existence, size, with LLaVA-1.5's single-word instruction) and description requests (`--describe-frac`), in
the v1 conversation template with 1..--max-turns questions about the image per conversation, loss on the
answers and their </s>. Each stage: linear warm-up over 3% of its
steps, then cosine to zero (its own peak LR: --stage1-lr, --lr); weight decay 0, as LLaVA-1.5.

The CLIP tower is frozen, so its features are computed once for a fixed pool of `--pool` rendered scenes and
cached in the run folder (pool.safetensors); each step draws its scenes and fresh questions / paraphrased
captions about them from (seed, step), so a resumed run sees exactly the batches of an uninterrupted one.
`--tune-vision-blocks N` (default 0: the tower stays frozen) trains the last N blocks of the tower's feature path
in stage 2 at their own peak LR `--vision-lr` (they are pretrained): the cache then holds the hidden states entering
those blocks (CLS included), and every step runs the N blocks on them (stage 1 too, without gradients: the
blocks stay frozen while the projector aligns). The saved folder then holds its tuned tower (`vision_tower/`).
`--feature-layer L` (default -2, LLaVA's penultimate block) picks which of the tower's hidden states the projector
reads, counted from the end as LLaVA's `hidden_states[L]`: -1 the last block's output, -2 the penultimate, ...,
-(blocks + 1) the patch embedding (+ positions and ln_pre) before any block. It is saved in the folder's
`config.vision_tower.feature_layer`, so the model loads with the same layer; the pool cache records it.
Evaluation every --eval-every steps: exact match per question kind on held-out questions (vlm.generate).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from safetensors.torch import load_file, save_file  # noqa: E402

from shapes.clip import ShapesCLIP, vocabulary_corpus  # noqa: E402
from shapes.data import make_batch  # noqa: E402
from shapes.text import caption  # noqa: E402
from shapes.vqa import SHORT_KINDS, make_question  # noqa: E402
from training import add_common_args, start_run, write_model_card  # noqa: E402
from vlm.generate import DESCRIBE_QUESTIONS, evaluate_vqa, vqa_eval_set  # noqa: E402
from vlm.llava import IGNORE_INDEX, LLAVA_SIZES, LlavaVLM, ShapesCLIPTower, from_name, num_params  # noqa: E402
from vlm.vlm_tokenizer import VLMTokenizer, prompt_v1, train_shapes_tokenizer, user_prompt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CLIP = REPO / "weights" / "shapes-clip"
EVAL_SEED = 2024  # held-out questions (shapes.eval_set keeps its seed space apart from the training pool's)
POOL_SALT = 0x11A7A  # the training pool's seed, apart from other scripts' pools
TARGETS = {"vqa_exact_match": ">= 0.90"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--size", default="shapes-llava", help=f"named size: {', '.join(LLAVA_SIZES)}")
    p.add_argument("--clip", default=str(SHIPPED_CLIP), help="the shapes CLIP folder whose image tower is used")
    p.add_argument("--pool", type=int, default=16384, help="scenes in the fixed training pool (features cached)")
    p.add_argument("--stage1-steps", type=int, default=500)
    p.add_argument("--stage1-lr", type=float, default=1e-3)
    p.add_argument("--stage1-train", choices=["lm", "projector"], default="lm",
                   help="stage 1 trains projector + decoder (default; no pretrained LLM here) or the projector only")
    p.add_argument("--tune-vision-blocks", type=int, default=0,
                   help="stage 2 also trains the last N blocks of the CLIP tower's feature path (0 = frozen tower)")
    p.add_argument("--feature-layer", type=int, default=-2,
                   help="the tower's hidden state the projector reads, LLaVA's hidden_states index: -1 last block, "
                        "-2 penultimate (default), ..., -(blocks + 1) the patch embedding")
    p.add_argument("--vision-lr", type=float, default=None,
                   help="peak LR of the tuned vision blocks (default 0.1 x --lr: they are pretrained)")
    p.add_argument("--warmup-frac", type=float, default=0.03)
    p.add_argument("--describe-frac", type=float, default=0.15, help="share of stage-2 samples asking a description")
    p.add_argument("--max-turns", type=int, default=4, help="stage 2: up to this many questions per conversation")
    p.add_argument("--eval-n", type=int, default=256, help="short-answer questions per evaluation (+ n/4 describe)")
    p.add_argument("--final-eval-n", type=int, default=None, help="questions of the final evaluation (default eval-n)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader processes building the steps' batches ahead (0: in the training loop)")
    p.add_argument("--save-to", default=None, help="model folder (default --out/model)")
    p.add_argument("--save-dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    args = p.parse_args(argv)
    if args.size not in LLAVA_SIZES:
        p.error(f"unknown --size {args.size!r}; valid: {', '.join(LLAVA_SIZES)}")
    if not 0 <= args.stage1_steps < args.steps:
        p.error("--stage1-steps must be >= 0 and below --steps (stage 2 needs steps)")
    if args.tune_vision_blocks < 0:
        p.error("--tune-vision-blocks must be >= 0")
    if args.feature_layer >= 0:
        p.error("--feature-layer counts from the end (LLaVA's hidden_states index): -1 .. -(blocks + 1)")
    if args.vision_lr is None:
        args.vision_lr = 0.1 * args.lr
    return args


# ----------------------------------------------------------------------------------------------- data
def tokenizer_for(run_dir: Path) -> VLMTokenizer:
    """The run's tokenizer: trained once on the shapes vocabulary corpus, then read back (resume-safe)."""
    folder = run_dir / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        tok = train_shapes_tokenizer(vocabulary_corpus())
        tok.save_pretrained(str(folder))
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
    return VLMTokenizer(tok, tok.convert_tokens_to_ids("<image>"))


def build_pool(run_dir: Path, n: int, seed: int, tower: ShapesCLIPTower, tune_blocks: int = 0):
    """The fixed pool: scenes (re-drawn from the seed), and their frozen tower outputs (cached on disk): the
    features (n, N, C), or with `tune_blocks` the hidden states entering the last tuned blocks (n, 1 + N, C).
    A tower reading another layer than -2 records it in the file's metadata (checked on resume)."""
    rng = np.random.default_rng([POOL_SALT, seed])
    batch = make_batch("caption", rng, n)
    path = run_dir / "pool.safetensors"
    key = "block_inputs" if tune_blocks else "features"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        meta_n = int(meta.get("tune_vision_blocks", 0))
        meta_layer = int(meta.get("feature_layer", -2))
        if meta_layer != tower.feature_layer:
            raise ValueError(f"{path} caches the tower's layer {meta_layer}, not --feature-layer "
                             f"{tower.feature_layer}; use a new --out")
        if meta_n != tune_blocks:
            raise ValueError(f"{path} caches the tower for --tune-vision-blocks {meta_n}, not {tune_blocks}; "
                             f"use a new --out")
        feats = load_file(path)[key]
        if feats.shape[0] != n:
            raise ValueError(f"{path} holds {feats.shape[0]} scenes but --pool is {n}; use a new --out")
    else:
        def encode(images):
            return tower.block_inputs(images, tune_blocks) if tune_blocks else tower(images)

        chunks = [encode(batch["image"][i:i + 512]).to(torch.float16).cpu()  # CPU: --workers index it
                  for i in tqdm(range(0, n, 512), desc="tower features of the pool", mininterval=10)]
        feats = torch.cat(chunks)
        meta = {"tune_vision_blocks": str(tune_blocks)} if tune_blocks else {}
        if tower.feature_layer != -2:
            meta["feature_layer"] = str(tower.feature_layer)
        save_file({key: feats.contiguous()}, path, metadata=meta or None)
    return batch["scenes"], feats


def step_batch(step: int, args, scenes, feats, tok: VLMTokenizer):
    """Step `step`'s samples: (ids, labels, mask, image features), right-padded."""
    rng = np.random.default_rng([args.seed, step])
    idx = rng.integers(0, feats.shape[0], args.batch_size)
    # One turn count per step: the batch's conversations then have similar lengths (little right padding).
    n_turns = int(rng.integers(1, args.max_turns + 1))
    seqs = []
    for i in idx:
        scene = scenes[int(i)]
        if step < args.stage1_steps:
            # LLaVA's 'plain' template: "<image>" + caption + "\n", loss on the caption (and </s>) only.
            head = tok.encode_prompt("<image>")
            cap = tok._ids(caption(scene, rng), bos=False) + [tok.eos_id]
            seqs.append((head + cap, [IGNORE_INDEX] * len(head) + cap))
        else:
            # Several questions about one image as a multi-turn conversation, as in LLaVA-1.5's mix (its VQAv2 /
            # GQA samples group an image's questions); only the first turn carries the image.
            turns = []
            for t in range(n_turns):
                if rng.random() < args.describe_frac:
                    q = DESCRIBE_QUESTIONS[int(rng.integers(len(DESCRIBE_QUESTIONS)))]
                    turns.append((user_prompt(q, False), caption(scene)))
                else:
                    qa = make_question(scene, rng, SHORT_KINDS)
                    turns.append((user_prompt(qa.question, True), qa.answer))
                if t:
                    turns[-1] = (turns[-1][0].replace("<image>\n", "", 1), turns[-1][1])
            seqs.append(tok.encode_conversation(turns))
    T = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for r, (s, lab) in enumerate(seqs):
        ids[r, :len(s)], labels[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), torch.tensor(lab), True
    return ids, labels, mask, feats[torch.as_tensor(idx)].float()


class StepBatches(torch.utils.data.Dataset):
    """Steps `start` .. `stop` - 1 as a dataset, so a DataLoader's workers build the batches ahead of the loop.

    On the GPU the tiny decoder's step takes less time than building its batch in Python (tokenising the
    questions: ~45 ms at batch 64 on one core), so without workers the GPU waits. Each item is exactly
    `step_batch(step, ...)`, seeded by the step, so the samples (and resuming) do not depend on the worker count."""

    def __init__(self, start: int, stop: int, args, scenes, feats, tok):
        self.start, self.stop, self.args, self.scenes, self.feats, self.tok = start, stop, args, scenes, feats, tok

    def __len__(self):
        return max(0, self.stop - self.start)

    def __getitem__(self, i):
        return step_batch(self.start + i, self.args, self.scenes, self.feats, self.tok)


def step_batches(start: int, args, scenes, feats, tok):
    """An iterator over the batches of steps `start` .. args.steps - 1 (built by args.workers processes)."""
    ds = StepBatches(start, args.steps, args, scenes, feats, tok)
    if not args.workers:
        return (ds[i] for i in range(len(ds)))
    return iter(torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=args.workers,
                                            prefetch_factor=8, pin_memory=torch.cuda.is_available()))


def lr_factors(args, time_progress=None):
    """Per param group (projector, decoder, and with --tune-vision-blocks the vision blocks): step -> learning rate
    (the optimiser's base LR is 1). The vision blocks follow stage 2's curve scaled to --vision-lr, 0 in stage 1.

    With `time_progress` (Run.time_progress: share of --time-limit spent) stage 2's cosine follows whichever of
    step and time is further along, so a run cut by the time limit still ends annealed (as
    training.cosine_schedule does; such a run is then not bit-exact on resume)."""
    import math

    s1, s2 = args.stage1_steps, args.steps - args.stage1_steps

    def curve(s, n, peak, clock=0.0):
        warm = max(1, round(args.warmup_frac * n))
        progress = min(1.0, max(s / n, clock))
        return peak * min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * progress))

    def stage2(step):
        return curve(step - s1, s2, args.lr, time_progress() if time_progress else 0.0)

    def projector(step):
        return curve(step, s1, args.stage1_lr) if step < s1 else stage2(step)

    def decoder(step):
        if step < s1:
            return curve(step, s1, args.stage1_lr) if args.stage1_train == "lm" else 0.0
        return stage2(step)

    def vision(step):
        return 0.0 if step < s1 else stage2(step) * args.vision_lr / args.lr

    return [projector, decoder] + ([vision] if args.tune_vision_blocks else [])


# ----------------------------------------------------------------------------------------------- main
def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    run = start_run(args)
    acc = run.accelerator
    tok = tokenizer_for(run.out)
    clip = ShapesCLIP.from_pretrained(args.clip, device=acc.device)
    n_blocks = len(clip.model.visual.transformer.resblocks)
    if not -(n_blocks + 1) <= args.feature_layer <= -1:
        raise ValueError(f"--feature-layer {args.feature_layer}: the tower has {n_blocks} blocks, so -1 .. "
                         f"-{n_blocks + 1}")
    tower = ShapesCLIPTower(clip, args.feature_layer)
    n_tune = args.tune_vision_blocks
    scenes, feats = build_pool(run.out, args.pool, args.seed, tower, n_tune)
    model = from_name(args.size, vocab_size=tok.vocab_size, image_token_id=tok.image_token_id,
                      pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, mm_hidden_size=tower.hidden_size,
                      vision_tower={**LLAVA_SIZES[args.size]["vision_tower"], "feature_layer": args.feature_layer})
    proj = list(model.mm_projector.parameters())
    proj_ids = {id(p) for p in proj}
    rest = [p for p in {id(p): p for p in model.parameters()}.values() if id(p) not in proj_ids]
    groups = [{"params": proj}, {"params": rest}]
    if n_tune:
        # The tower's own last blocks (shared with `tower`, so evaluation and saving see the tuned weights).
        tail = tower.tail(n_tune)
        groups.append({"params": list(tail.parameters())})
    opt = torch.optim.AdamW(groups, lr=1.0, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factors(args, run.time_progress if args.time_limit else None))
    if n_tune:
        model, tail, opt, sched = acc.prepare(model, tail, opt, sched)
    else:
        model, opt, sched = acc.prepare(model, opt, sched)
    step = run.resume()
    raw = acc.unwrap_model(model)
    vlm = LlavaVLM(raw, tower, tok, args.clip, tuned_vision_blocks=n_tune)
    params = list(model.parameters())
    if n_tune:
        acc.unwrap_model(tail).requires_grad_(True)  # LlavaVLM froze the whole tower; its tail trains
        params += list(tail.parameters())
    eval_data = vqa_eval_set(args.eval_n, EVAL_SEED)

    def evaluate():
        raw.eval()
        m = evaluate_vqa(vlm, data=eval_data)
        raw.train()
        return m

    acc.print(f"LLaVA {args.size}: {num_params(raw) / 1e6:.2f} M parameters, vocab {tok.vocab_size}, "
              f"pool {args.pool}, device {acc.device}"
              + (f", tuning the tower's last {n_tune} blocks (lr {args.vision_lr:g})" if n_tune else ""))
    bar = tqdm(total=args.steps, initial=step, disable=not acc.is_local_main_process, desc="llava", mininterval=10)
    model.train()
    loss_sum, n_sum, t_log = 0.0, 0, time.time()
    batches = step_batches(step, args, scenes, feats, tok)
    while step < args.steps:
        ids, labels, mask, f = next(batches)
        dev = acc.device
        with acc.autocast():
            if n_tune:
                # Stage 1 runs the blocks without gradients (frozen there); stage 2 trains them.
                with torch.set_grad_enabled(step >= args.stage1_steps):
                    f = tail(f.to(dev, non_blocking=True))
            loss = model(ids.to(dev, non_blocking=True), f.to(dev, non_blocking=True),
                         mask.to(dev, non_blocking=True), labels.to(dev, non_blocking=True))["loss"]
        acc.backward(loss)
        acc.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        loss_sum, n_sum = loss_sum + loss.item(), n_sum + 1
        if step % args.log_every == 0 or step == args.steps:
            rec = {"step": step, "loss": loss_sum / n_sum, "lr": sched.get_last_lr()[1],
                   "stage": 1 if step <= args.stage1_steps else 2, "sec_per_step": (time.time() - t_log) / n_sum}
            run.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", stage=rec["stage"])
            loss_sum, n_sum, t_log = 0.0, 0, time.time()
        state = run.end_of_step(step, bar, evaluate)
        if state == "interrupted":
            return {}
        if state == "stop":
            break
    bar.close()

    metrics = {}
    if acc.is_main_process:
        raw.eval()
        folder = Path(args.save_to) if args.save_to else run.out / "model"
        vlm.save_pretrained(folder, dtype=getattr(torch, args.save_dtype))
        # The card's numbers are those of the saved (e.g. float16-rounded) weights, as `ditstudio eval` reloads them.
        final = evaluate_vqa(LlavaVLM.from_pretrained(folder, device=acc.device),
                             n=args.final_eval_n or args.eval_n, seed=EVAL_SEED, with_examples=True)
        examples = final.pop("examples")
        metrics = final
        run.plot(["vqa_exact_match"])
        write_model_card(
            folder, title=folder.name,
            summary=(f"A LLaVA-1.5-style vision-language model on the shapes world: the shapes CLIP image tower "
                     f"(`{Path(args.clip).name}`, "
                     + ("penultimate-layer" if args.feature_layer == -2 else f"layer {args.feature_layer}")
                     + " patch features, "
                     + (f"its last {n_tune} feature-path blocks tuned in stage 2 at peak LR {args.vision_lr:g}, "
                        f"stored in `vision_tower/`), a " if n_tune else "referenced, not copied), a ")
                     + f"2-layer GELU projector and a {raw.config.num_hidden_layers}-layer Llama-style decoder "
                     f"(width {raw.config.hidden_size}, {raw.config.num_attention_heads} heads, "
                     f"{raw.num_kv_heads} KV heads, {num_params(raw) / 1e6:.2f} M parameters), trained in LLaVA-1.5's "
                     f"two stages: {args.stage1_steps} caption steps, then {args.steps - args.stage1_steps} "
                     f"instruction steps on shapes visual questions. Answers are greedy; `vqa_exact_match` is over "
                     f"the short-answer kinds, `describe` is the share of descriptions that parse to the scene's "
                     f"objects.\n\nExamples: " + "; ".join(f"{e['q']} -> {e['pred']!r} ({e['a']})" for e in examples)),
            run=run, metrics=metrics, targets=TARGETS,
            extra={"eval": {"kind": "vqa", "n": args.final_eval_n or args.eval_n, "seed": EVAL_SEED},
                   "parameters": num_params(raw), "pool": args.pool, "stage1_steps": args.stage1_steps,
                   **({"feature_layer": args.feature_layer} if args.feature_layer != -2 else {}),
                   **({"tune_vision_blocks": n_tune, "vision_lr": args.vision_lr} if n_tune else {})})
        acc.print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main(parse_args())
