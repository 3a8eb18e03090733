"""Train VAR's multi-scale VQ tokenizer (vlm/vqvae.py) on endlessly rendered shapes scenes.

    accelerate launch scripts/train_vqvae.py --out runs/vqvae --steps 20000 --batch-size 128 --mixed-precision bf16
    python scripts/train_vqvae.py --out runs/vqvae-cpu --steps 1200 --batch-size 16 --cpu --time-limit 1500

Objective (the paper's, without the perceptual and GAN terms: flat-colour shapes need neither):
L2 reconstruction on pixels in [-1, 1] + the VQ loss (mean over scales of β‖sg(f̂_k) − f‖² + ‖f̂_k − sg(f)‖², β 0.25)
with the straight-through estimator. Each scale's code usage is tracked (the `ema_vocab_hit_SV` buffer) and
reported at every evaluation: small scales collapsing onto a few codes is the known failure (Infinity #80).
Step s's batch comes from (seed, s, rank), so a resumed run is exact. The final model is saved (fp16) to
`--out/model` with a model card (held-out PSNR of the full round trip and of each scale's partial sum).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from diffusers.training_utils import EMAModel  # noqa: E402

from shapes.vae import training_images  # noqa: E402
from training import add_common_args, cosine_schedule, optimizer_step, start_run, write_model_card  # noqa: E402
from vlm.var_pipeline import evaluate_tokenizer  # noqa: E402
from vlm.vqvae import VQVAE_CONFIGS, MultiScaleVQVAE  # noqa: E402

TARGETS = {"psnr_db": ">= 30"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--model", default="vqvae-shapes-f8", choices=sorted(VQVAE_CONFIGS))
    p.add_argument("--eval-n", type=int, default=256)
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (0: no EMA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(lr=1e-3, batch_size=16)
    return p.parse_args(argv)


def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    run = start_run(args)
    acc = run.accelerator
    vq = MultiScaleVQVAE.from_name(args.model)
    size = vq.config.sample_size
    opt = torch.optim.AdamW(vq.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = cosine_schedule(opt, args.steps, min(200, args.steps // 10), run.time_progress)
    net, opt, sched = acc.prepare(vq, opt, sched)
    ema = EMAModel(vq.parameters(), decay=args.ema) if args.ema > 0 else None
    if ema is not None:
        acc.register_for_checkpointing(ema)
    step = run.resume()

    def evaluate():
        model = acc.unwrap_model(net)
        if ema is not None:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
        model.eval()
        m = evaluate_tokenizer(model, min(args.eval_n, 128))
        model.train()
        if ema is not None:
            ema.restore(model.parameters())
        return m

    bar = tqdm(total=args.steps, initial=step, disable=not acc.is_local_main_process, desc="vqvae")
    while step < args.steps:
        x = training_images(args.batch_size, size=size, seed=args.seed * 1_000_003 + step * 64 + acc.process_index,
                            device=acc.device)
        with acc.autocast():
            rec, vq_loss, _ = net(x)
            rec_loss = F.mse_loss(rec.float(), x)
            loss = rec_loss + vq_loss
        acc.backward(loss)
        optimizer_step(acc, net.parameters(), opt, sched)
        if ema is not None:
            ema.step(net.parameters())
        step += 1
        bar.update(1)
        if step % 25 == 0 or step == args.steps:
            bar.set_postfix(rec=f"{rec_loss.item():.4f}", vq=f"{vq_loss.item():.4f}")
            run.log({"step": step, "loss": loss.item(), "rec_loss": rec_loss.item(), "vq_loss": vq_loss.item(),
                     "lr": sched.get_last_lr()[0]})
        state = run.end_of_step(step, bar, evaluate)
        if state == "interrupted":
            bar.close()
            return {}
        if state == "stop":
            break
    bar.close()

    metrics = {}
    if acc.is_main_process:
        model = acc.unwrap_model(net)
        if ema is not None:
            ema.copy_to(model.parameters())
        model = model.float().eval()
        folder = run.out / "model"
        model.to(torch.float16).save_pretrained(folder)
        model.float()
        t = time.time()
        metrics = evaluate_tokenizer(model, args.eval_n)
        metrics["eval_seconds"] = round(time.time() - t, 1)
        run.plot(["psnr_db"])
        write_model_card(folder, title="shapes-var-tokenizer",
                         summary=f"VAR multi-scale residual VQ tokenizer for the shapes world: {size} px RGB ↔ "
                                 f"token maps {'/'.join(f'{p}x{p}' for p in model.patch_nums)} "
                                 f"({model.num_tokens} tokens, vocabulary {model.config.vocab_size}).",
                         run=run, metrics=metrics, targets=TARGETS,
                         extra={"eval": {"kind": "var-tokenizer", "n": args.eval_n, "seed": 2024}})
        print({"final": metrics})
    acc.end_training()
    return metrics


if __name__ == "__main__":
    main(parse_args())
