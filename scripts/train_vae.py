"""Train the tiny shapes VAE (diffusers AutoencoderKL, 64 px → 16×16×4) on endlessly rendered shapes scenes.

    accelerate launch scripts/train_vae.py --out runs/vae --steps 6000 --batch-size 128 --mixed-precision bf16
    python scripts/train_vae.py --out runs/vae-smoke --steps 20 --batch-size 8 --cpu     # smoke test

Objective: L1 + L2 reconstruction on pixels in [-1, 1] plus a light KL (the latent only needs to be smooth
enough for diffusion; no perceptual or GAN loss: flat-colour shapes need neither). At the end the latent
scaling factor is measured (1 / std of the latents) and the model is saved in fp16 to `--out/model`,
with a model card holding the held-out metrics.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from shapes.vae import build_tiny_vae, evaluate_vae, training_images
from training import add_common_args, cosine_schedule, optimizer_step, start_run, write_model_card

TARGETS = {"psnr_db": ">= 32", "analyser_agreement": ">= 0.98"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--scale-n", type=int, default=512, help="images used to measure the latent scaling factor")
    p.set_defaults(lr=1e-3)
    return p.parse_args(argv)


class RoundTrip(torch.nn.Module):
    """encode → sample → decode as one forward, so DDP sees the whole step; returns (reconstruction, KL per
    pixel)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        post = self.vae.encode(x).latent_dist
        return self.vae.decode(post.sample()).sample, post.kl().mean() / x[0].numel()


def evaluate_during_training(vae, n: int) -> dict:
    metrics = evaluate_vae(vae.eval(), n=min(n, 200), seed=12345)
    vae.train()
    return metrics


def main(args) -> dict:
    run = start_run(args)
    acc = run.accelerator
    vae = build_tiny_vae(args.size)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = min(200, args.steps // 10)
    sched = cosine_schedule(opt, args.steps, warmup)
    net, opt, sched = acc.prepare(RoundTrip(vae), opt, sched)
    step = run.resume()

    bar = tqdm(total=args.steps, initial=step, disable=not acc.is_local_main_process, desc="vae")
    while step < args.steps:
        # Each process renders its own slice of step `step`'s batch from a seed fixed by (seed, step, rank).
        x = training_images(args.batch_size, size=args.size, seed=args.seed * 1_000_003 + step * 64 + acc.process_index,
                        device=acc.device)
        with acc.autocast():
            rec, kl = net(x)
            loss = F.l1_loss(rec.float(), x) + F.mse_loss(rec.float(), x) + args.kl_weight * kl
        acc.backward(loss)
        optimizer_step(acc, net.parameters(), opt, sched)
        step += 1
        bar.update(1)
        if step % 50 == 0 or step == args.steps:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            run.log({"step": step, "loss": loss.item(), "kl": kl.item(), "lr": sched.get_last_lr()[0]})
        state = run.end_of_step(step, bar, lambda: evaluate_during_training(vae, args.eval_n))
        if state == "interrupted":
            bar.close()
            return {}
        if state == "stop":
            break
    bar.close()

    metrics = {}
    if acc.is_main_process:
        model = vae.float().eval()
        # Latent scale: diffusion models want unit-variance latents (what 0.18215 does for SD's VAE).
        with torch.no_grad():
            x = training_images(args.scale_n, size=args.size, seed=999, device=acc.device)
            z = model.encode(x).latent_dist.mode()
            model.register_to_config(scaling_factor=float(1.0 / z.std()), shift_factor=float(z.mean()))
        folder = run.out / "model"
        model.to(torch.float16).save_pretrained(folder)
        model.float()
        t = time.time()
        metrics = evaluate_vae(model, n=args.eval_n, seed=2024)
        metrics["eval_seconds"] = round(time.time() - t, 1)
        run.plot(["psnr_db", "analyser_agreement"])
        write_model_card(folder, title="shapes-vae",
                         summary="Tiny diffusers AutoencoderKL for the shapes world: 64×64 RGB ↔ 16×16×4 latents. "
                                 "Latents are multiplied by `scaling_factor` (after subtracting `shift_factor`) "
                                 "before diffusion.",
                         run=run, metrics=metrics, targets=TARGETS,
                         extra={"eval": {"kind": "vae", "n": args.eval_n, "seed": 2024}})
        print({"final": metrics})
    acc.end_training()
    return metrics


if __name__ == "__main__":
    main(parse_args())
