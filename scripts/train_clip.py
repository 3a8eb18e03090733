"""Train the tiny shapes CLIP (open_clip's CLIP with a small config, open_clip's contrastive loss) on rendered
scenes and their captions.

    accelerate launch scripts/train_clip.py --out runs/clip --steps 6000 --batch-size 512 --mixed-precision bf16
    python scripts/train_clip.py --out runs/clip-smoke --steps 20 --batch-size 16 --cpu     # smoke test

Each step mixes multi-object scenes with paraphrased captions and single-object scenes captioned by their
class name ("a red circle"), so both caption retrieval and zero-shot (shape, colour) classification are
learned. The tokenizer is trained first on the whole caption grammar's vocabulary.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from open_clip.loss import ClipLoss
from tqdm.auto import tqdm

import numpy as np

from shapes.clip import ShapesCLIP, ShapesCLIPConfig, class_prompts, evaluate_clip, train_tokenizer, vocabulary_corpus
from shapes.data import make_batch
from shapes.render import to_float
from training import add_common_args, cosine_schedule, optimizer_step, start_run, write_model_card

TARGETS = {"zero_shot_accuracy": ">= 0.95", "retrieval_top1_256": ">= 0.80"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--single-object-share", type=float, default=0.25)
    p.add_argument("--eval-n", type=int, default=1024)
    p.set_defaults(lr=2e-3, batch_size=512)
    return p.parse_args(argv)


CLASS_FRAMES = ("a {}", "a picture of a {}", "{}", "an image showing a {}")


def caption_batch(n: int, size: int, seed: int, single_object_share: float, device):
    """(images float (n, 3, size, size) in [-1, 1], captions): multi-object scenes with paraphrased captions,
    then single-object scenes captioned by class name in a few frames."""
    rng = np.random.default_rng(seed)
    n_single = int(round(n * single_object_share))
    multi = make_batch("caption", rng, n - n_single, size=size, device=device)
    single = make_batch("class", rng, n_single, size=size, device=device)
    names = [class_prompts()[i][2:] for i in single["label"].tolist()]
    captions = multi["caption"] + [CLASS_FRAMES[rng.integers(len(CLASS_FRAMES))].format(c) for c in names]
    return to_float(torch.cat([multi["image"], single["image"]])), captions


def evaluate_during_training(clip, n: int) -> dict:
    clip.eval()
    metrics = evaluate_clip(clip, n=min(n, 512), seed=12345)
    clip.train()
    return metrics


def main(args) -> dict:
    run = start_run(args)
    acc = run.accelerator
    tokenizer = train_tokenizer(vocabulary_corpus(), vocab_size=ShapesCLIPConfig.vocab_size)
    clip = ShapesCLIP(ShapesCLIPConfig(), tokenizer)
    model = clip.model
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = min(500, args.steps // 10)
    sched = cosine_schedule(opt, args.steps, warmup)
    model, opt, sched = acc.prepare(model, opt, sched)
    # open_clip's loss gathers features over processes itself (negatives from every GPU's batch).
    loss_fn = ClipLoss(local_loss=False, gather_with_grad=acc.num_processes > 1, rank=acc.process_index,
                       world_size=acc.num_processes)
    step = run.resume()

    bar = tqdm(total=args.steps, initial=step, disable=not acc.is_local_main_process, desc="clip")
    while step < args.steps:
        seed = args.seed * 1_000_003 + step * 64 + acc.process_index
        images, captions = caption_batch(args.batch_size, size=clip.config.image_size, seed=seed,
                                         single_object_share=args.single_object_share, device=acc.device)
        with acc.autocast():
            img_f, txt_f, scale = model(images, clip.tokenize(captions).to(acc.device))
            loss = loss_fn(img_f, txt_f, scale)
        acc.backward(loss)
        optimizer_step(acc, model.parameters(), opt, sched)
        with torch.no_grad():  # CLIP clamps the learned temperature at 100
            acc.unwrap_model(model).logit_scale.clamp_(0, math.log(100))
        step += 1
        bar.update(1)
        if step % 50 == 0 or step == args.steps:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            run.log({"step": step, "loss": loss.item(), "logit_scale": scale.item(),
                     "lr": sched.get_last_lr()[0]})
        state = run.end_of_step(step, bar, lambda: evaluate_during_training(clip, args.eval_n))
        if state == "interrupted":
            bar.close()
            return {}
        if state == "stop":
            break
    bar.close()

    metrics = {}
    if acc.is_main_process:
        clip.eval()
        folder = run.out / "model"
        clip.save_pretrained(folder)
        # Evaluate what ships: the fp16 weights, loaded back as a user would load them.
        shipped = ShapesCLIP.from_pretrained(folder, device=acc.device)
        t = time.time()
        metrics = evaluate_clip(shipped, n=args.eval_n, seed=2024)
        metrics["eval_seconds"] = round(time.time() - t, 1)
        run.plot(["zero_shot_accuracy", "retrieval_top1_256"])
        write_model_card(folder, title="shapes-clip",
                         summary="Tiny CLIP (open_clip model code and contrastive loss, custom small config) for the "
                                 "shapes world: ViT image tower on 64 px images (8 px patches), causal text tower "
                                 "with a word-level tokenizer. Its text tower conditions the text→image/video "
                                 "models; its image tower feeds the vision-language models and the Fréchet "
                                 "distance.",
                         run=run, metrics=metrics, targets=TARGETS,
                         extra={"eval": {"kind": "clip", "n": args.eval_n, "seed": 2024}})
        print({"final": metrics})
    acc.end_training()
    return metrics


if __name__ == "__main__":
    main(parse_args())
