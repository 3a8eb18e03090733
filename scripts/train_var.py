"""Train a VAR next-scale transformer (vlm/var.py) on the shapes world with a trained tokenizer (train_vqvae.py):
class-conditional (`VAR-*`) or text-conditional (`TextVAR-*`, captions through the shapes CLIP text tower).

    accelerate launch scripts/train_var.py --out runs/var-c2i --model VAR-shapes-d4 --tokenizer runs/vqvae/model \
        --steps 20000 --batch-size 256 --mixed-precision bf16
    accelerate launch scripts/train_var.py --out runs/var-t2i --model TextVAR-shapes-d4 --tokenizer runs/vqvae/model ...
    python scripts/train_var.py --out runs/var-smoke --model VAR-shapes-d4 --tokenizer runs/vqvae/model \
        --steps 20 --batch-size 8 --cpu                                           # smoke test

Objective (the paper's): cross-entropy over all L tokens of the pyramid, teacher-forced (the input of scale k is the
tokenizer's f̂ of scales < k, area-downsampled), the condition replaced by the null one (class `num_classes` / the
empty caption) with probability `--cond-drop` (0.1) for classifier-free guidance. AdamW β (0.9, 0.95), weight decay
on matrices only (not on embeddings, norms, biases or scale_mul), warm-up then cosine, gradient clipping.
Step s's batch and condition dropout come from (seed, s, rank): a resumed run is exact. The tokenizer and the text
encoder are frozen. The (EMA) model is saved as a `VARPipeline` folder (fp16) in `--out/model` with a model card;
every `--eval-every` steps the shapes analyser measures prompt accuracy of samples (vlm.var_pipeline.evaluate_var).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from diffusers.training_utils import EMAModel  # noqa: E402

from shapes import NUM_CLASSES  # noqa: E402
from shapes.clip import ShapesCLIP  # noqa: E402
from shapes.data import make_batch  # noqa: E402
from shapes.render import to_float  # noqa: E402
from shapes.scene import class_name  # noqa: E402
from training import add_common_args, cosine_schedule, optimizer_step, start_run, write_model_card  # noqa: E402
from vlm.var import TEXT_VAR_CONFIGS, VAR_CONFIGS, TextVAR, VAR, grow_depth  # noqa: E402
from vlm.var_pipeline import VARPipeline, evaluate_var  # noqa: E402
from vlm.vqvae import MultiScaleVQVAE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"class": {"prompt_accuracy": ">= 0.95"}, "text": {"one_object_accuracy": ">= 0.90"}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--model", default="VAR-shapes-d4", choices=sorted(VAR_CONFIGS) + sorted(TEXT_VAR_CONFIGS))
    p.add_argument("--tokenizer", required=True,
                   help="folder of a trained MultiScaleVQVAE (train_vqvae.py --out/model)")
    p.add_argument("--text-encoder", default=str(REPO / "weights" / "shapes-clip"))
    p.add_argument("--cond-drop", type=float, default=0.1, help="probability of the null condition (guidance)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (0: none)")
    p.add_argument("--eval-n", type=int, default=96)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--init-from", default=None,
                   help="a saved VAR pipeline folder whose transformer (same --model) starts this run: a short device "
                        "call cannot carry optimizer checkpoints to the next, so training goes on from the weights")
    p.add_argument("--grow-depth", type=int, default=None, metavar="D",
                   help="with --init-from: start from that (shallower) model grown to depth D, computing what it "
                        "computes (vlm/var.py grow_depth); --model names the grown size's family and width")
    p.add_argument("--int8", action="store_true",
                   help="save the transformer's linear weights as int8 with per-row scales (dit/int8_weights.py): "
                        "about half the bytes of fp16; the shipped shapes models use it to fit the 8 MB budget")
    p.add_argument("--save-to", default=None, help="the pipeline folder to write (default --out/model)")
    p.add_argument("--reference-tokenizer", action="store_true",
                   help="reference --tokenizer from the saved folder instead of copying it (shipped class and text "
                        "models share one tokenizer folder)")
    p.set_defaults(lr=1e-3, batch_size=32)
    return p.parse_args(argv)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay the weight matrices of linear layers only: embeddings, position tables, norms, biases and the
    attention logit scale are not decayed (as the official VAR trainer)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        no_decay = p.ndim < 2 or "emb" in name or name.startswith("pos_") or "scale_mul" in name
        (plain if no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


class TokenBatches:
    """Step s's training batch: images of the task's kind rendered from (seed, s, rank), tokenized by the frozen
    tokenizer, conditions with dropout; returns (condition inputs, teacher-forcing input, target tokens)."""

    def __init__(self, task: str, vq: MultiScaleVQVAE, clip: ShapesCLIP | None, null_class: int, cond_drop: float):
        self.task, self.vq, self.clip, self.null_class, self.cond_drop = task, vq, clip, null_class, cond_drop

    @torch.no_grad()
    def __call__(self, n: int, seed: int, device) -> tuple[tuple, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(seed)
        batch = make_batch("class" if self.task == "class" else "caption", rng, n, size=self.vq.config.sample_size)
        x = to_float(batch["image"]).to(device)
        tokens = self.vq.encode_indices(x)
        target_BL = torch.cat(tokens, 1)
        x_BLCv = self.vq.teacher_forcing_input(tokens)
        drop = torch.as_tensor(rng.random(n) < self.cond_drop)
        if self.task == "class":
            labels = torch.where(drop, self.null_class, batch["label"]).to(device)
            return (labels,), x_BLCv, target_BL
        texts = ["" if d else c for d, c in zip(drop.tolist(), batch["caption"])]
        tok, mask = self.clip.encode_text_tokens(texts)
        return (tok.to(device), mask.to(device)), x_BLCv, target_BL


def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    run = start_run(args)
    acc = run.accelerator
    task = "text" if args.model.startswith("TextVAR") else "class"
    vq = MultiScaleVQVAE.from_pretrained(args.tokenizer, torch_dtype=torch.float32).to(acc.device).eval()
    vq.requires_grad_(False)
    clip = ShapesCLIP.from_pretrained(args.text_encoder, device=acc.device).eval() if task == "text" else None
    if task == "text":
        clip.requires_grad_(False)
        model = TextVAR.from_name(args.model, text_dim=clip.config.text_width)
    else:
        model = VAR.from_name(args.model)
    if args.init_from:
        init = VARPipeline.from_pretrained(args.init_from, torch_dtype=torch.float32).transformer
        if args.grow_depth:
            init = grow_depth(init, args.grow_depth)
            model = type(model).from_config({**model.config, "depth": args.grow_depth})
        public = lambda cfg: json.loads(json.dumps({k: v for k, v in dict(cfg).items()  # noqa: E731
                                                    if not k.startswith("_")}))  # tuples as saved: lists
        if type(init) is not type(model) or public(init.config) != public(model.config):
            raise ValueError(f"--init-from {args.init_from} holds a {type(init).__name__} whose config differs from "
                             f"{args.model}'s: {public(init.config)} vs {public(model.config)}")
        model.load_state_dict(init.state_dict())
    elif args.grow_depth:
        raise ValueError("--grow-depth grows the model given by --init-from: give one")
    if model.patch_nums != vq.patch_nums or model.config.vocab_size != vq.config.vocab_size \
            or model.config.z_channels != vq.config.z_channels:
        raise ValueError(f"{args.model} (patch_nums {model.patch_nums}, vocabulary {model.config.vocab_size}, "
                         f"channels {model.config.z_channels}) does not match the tokenizer {args.tokenizer} "
                         f"({vq.patch_nums}, {vq.config.vocab_size}, {vq.config.z_channels})")
    batches = TokenBatches(task, vq, clip, getattr(model, "null_class_id", -1), args.cond_drop)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    sched = cosine_schedule(opt, args.steps, min(500, args.steps // 20), run.time_progress)
    net, opt, sched = acc.prepare(model, opt, sched)
    ema = EMAModel(model.parameters(), decay=args.ema) if args.ema > 0 else None
    if ema is not None:
        ema.to(acc.device)
        acc.register_for_checkpointing(ema)
    step = run.resume()

    def pipeline() -> VARPipeline:
        return VARPipeline(acc.unwrap_model(net), vq, text_encoder=clip)

    def evaluate() -> dict:
        m = acc.unwrap_model(net)
        if ema is not None:
            ema.store(m.parameters())
            ema.copy_to(m.parameters())
        m.eval()
        metrics = evaluate_var(pipeline(), n=args.eval_n, seed=0, guidance_scale=args.cfg, top_k=args.top_k,
                               top_p=args.top_p)
        m.train()
        if ema is not None:
            ema.restore(m.parameters())
        return {k: v for k, v in metrics.items() if isinstance(v, float)}

    bar = tqdm(total=args.steps, initial=step, disable=not acc.is_local_main_process, desc=args.model)
    while step < args.steps:
        cond, x_BLCv, target_BL = batches(args.batch_size, args.seed * 1_000_003 + step * 64 + acc.process_index,
                                          acc.device)
        with acc.autocast():
            logits_BLV = net(*cond, x_BLCv)
            loss = F.cross_entropy(logits_BLV.float().flatten(0, 1), target_BL.flatten())
        acc.backward(loss)
        grad_norm = optimizer_step(acc, net.parameters(), opt, sched, max_grad_norm=2.0)
        if ema is not None:
            ema.step(net.parameters())
        step += 1
        bar.update(1)
        if step % 25 == 0 or step == args.steps:
            with torch.no_grad():
                last = model.segments[-1]
                acc_last = (logits_BLV[:, -last:].argmax(-1) == target_BL[:, -last:]).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            run.log({"step": step, "loss": loss.item(), "last_scale_token_accuracy": acc_last,
                     "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0]})
        state = run.end_of_step(step, bar, evaluate)
        if state == "interrupted":
            bar.close()
            return {}
        if state == "stop":
            break
    bar.close()

    metrics = {}
    if acc.is_main_process:
        m = acc.unwrap_model(net)
        if ema is not None:
            ema.copy_to(m.parameters())
        m.eval()
        folder = Path(args.save_to) if args.save_to else run.out / "model"
        pipeline().save_pretrained(folder, text_encoder_folder=args.text_encoder if task == "text" else None,
                                   dtype=torch.float16, int8=args.int8,
                                   tokenizer_folder=args.tokenizer if args.reference_tokenizer else None,
                                   id2label={i: class_name(i) for i in range(NUM_CLASSES)} if task == "class" else None)
        t = time.time()
        metrics = {k: v for k, v in evaluate_var(pipeline(), n=args.eval_n, seed=0, guidance_scale=args.cfg,
                                                 top_k=args.top_k, top_p=args.top_p).items()
                   if isinstance(v, (int, float))}
        metrics["eval_seconds"] = round(time.time() - t, 1)
        run.plot(["prompt_accuracy"] if task == "class" else ["one_object_accuracy"])
        tok_where = "`../" + Path(args.tokenizer).name + "` (referenced)" if args.reference_tokenizer \
            else "in `tokenizer/`"
        write_model_card(folder, title=f"shapes-var-{'c2i' if task == 'class' else 't2i'}",
                         summary=f"{args.model}{' grown to depth %d' % args.grow_depth if args.grow_depth else ''}"
                                 f"{', int8 weights' if args.int8 else ''} ({'class' if task == 'class' else 'text'} → image by next-scale "
                                 f"prediction) on the tokenizer {tok_where} ({vq.num_tokens} tokens over scales "
                                 f"{'/'.join(str(p) for p in vq.patch_nums)}).",
                         run=run, metrics=metrics, targets=TARGETS[task],
                         extra={"eval": {"kind": f"var-{task}", "n": args.eval_n, "seed": 0, "cfg": args.cfg,
                                         "top_k": args.top_k, "top_p": args.top_p}})
        print({"final": metrics})
    acc.end_training()
    return metrics


if __name__ == "__main__":
    main(parse_args())
