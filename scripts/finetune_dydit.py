"""Fine-tune DyDiT routers (timestep-dynamic width + spatially dynamic tokens) on a class DiT
(spec: /work/shared/specs/dydit.md section 2; model: dit/dydit.py; folder format: dit/dydit_io.py).

    python scripts/finetune_dydit.py --out runs/dydit --model shapes-c2i --lam 0.5 --steps 20000 \
        --stage1-steps 3000 --batch-size 256 --lr 1e-4 --pool 100000 --skip-grad-norm 200 --mixed-precision bf16
    python scripts/finetune_dydit.py --out runs/smoke --model shapes-c2i --steps 20 --batch-size 8 --pool 64 --cpu

Each step draws t stratified (the batch split evenly over [0,250), [250,500), [500,750), [750,1000)), runs the
dynamic (masked, Gumbel gates) forward and adds L_F = 2 (mean r - lambda_t)^2 with lambda_t from `flops_target`
(1 for --lam-hold steps, then linear to --lam at --lam-reach). For the first --stage1-steps steps (stage 1) a second,
complete forward (all gates on) adds its diffusion loss too; this term only trains the backbone, so with
`--train routers` (frozen backbone) it is not computed. L_diff is MSE(eps) + VLB (learned sigma), as in
dit.objectives.DDPMObjective. A step whose global grad norm is >= --skip-grad-norm is skipped (no update, no EMA
step); the skip rate is logged. Evaluations measure the executed-FLOPs ratio with the eval-mode sliced path and a
MacCounter on a fixed batch over a grid of timesteps. The EMA of the trained parameters is saved with
dit.dydit_io.save_dydit to --out/model (routers + a reference to the base model when the backbone is frozen).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script
sys.path.insert(0, str(Path(__file__).resolve().parent))  # training.py, train_dit.py

from diffusers import AutoencoderKL  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

from dit.dit import DIT_CONFIGS, DiT  # noqa: E402
from dit.dydit import GATE_TAU, DyDiT, MacCounter, flops_loss, flops_target  # noqa: E402
from dit.dydit_io import save_dydit  # noqa: E402
from dit.objectives import DDPMObjective, _mean_flat, make_objective  # noqa: E402
from train_dit import REPO, SHIPPED_VAE, batch_seed, load_model, shapes_data  # noqa: E402
from training import add_common_args, start_run, write_model_card  # noqa: E402

EVAL_SEED = 12345
QUARTERS = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--model", default="shapes-c2i", help="a class DiT: shipped model, saved folder, named size, or .pt")
    p.add_argument("--lam", type=float, default=0.5, help="target FLOPs ratio lambda")
    p.add_argument("--lam-hold", type=int, default=100, help="lambda_t = 1 for these steps")
    p.add_argument("--lam-reach", type=int, default=1000, help="lambda_t reaches --lam at this step (spec: 5000 for 0.7)")
    p.add_argument("--stage1-steps", type=int, default=None,
                   help="steps with the complete forward's loss added (default: all steps)")
    p.add_argument("--train", default="routers", choices=["routers", "full", "td-lora"],
                   help="routers: frozen backbone; full: backbone too; td-lora: not implemented yet")
    p.add_argument("--skip-grad-norm", type=float, default=None,
                   help="skip the update when the global grad norm is >= this (spec: 200 for lam 0.5, 50 for 0.7)")
    p.add_argument("--tau", type=float, default=GATE_TAU, help="Gumbel-sigmoid temperature")
    p.add_argument("--router-bias", type=float, default=None,
                   help="test/ablation knob: set every router's output bias to this (default: the dydit.py init, "
                        "15 width / 35 token, all gates on); low values start some gates off and risk early collapse")
    p.add_argument("--vae", default=str(SHIPPED_VAE))
    p.add_argument("--pool", type=int, default=0, help="shapes data pool size (0: fresh batches every step)")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--eval-n", type=int, default=16, help="fixed, seeded batch for the FLOPs and loss evaluation")
    p.add_argument("--flops-grid", type=int, default=10, help="timesteps (evenly over [0, 999]) of the FLOPs measure")
    p.add_argument("--log-every", type=int, default=10)
    p.set_defaults(lr=1e-4)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- pieces
def build_dydit(dit: DiT, tau: float, seed: int, router_bias: float | None = None) -> DyDiT:
    """The DyDiT around `dit`, its routers drawn from their own RNG stream (seed), so they do not depend on what
    ran before; `router_bias` overrides every router's output bias."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DyDiT.from_dit(dit, tau)
    if router_bias is not None:
        with torch.no_grad():
            for r in model.routers:
                for layer in (r.head_router, r.channel_router, r.token_router[2]):
                    layer.bias.fill_(router_bias)
    return model


def stratified_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) ints: sample i lies in quarter i * 4 // n of [0, T), uniform within it (the batch split evenly)."""
    width = num_train_timesteps // QUARTERS
    quarter = torch.arange(n, device=generator.device) * QUARTERS // n
    return quarter * width + torch.randint(0, width, (n,), generator=generator, device=generator.device)


def diffusion_loss(objective: DDPMObjective, out: torch.Tensor, x0, x_t, t_B, noise) -> torch.Tensor:
    """MSE(eps) + VLB (learned sigma, stop-gradient mean) per batch, as DDPMObjective.__call__ computes it."""
    C = x0.shape[1]
    eps = out[:, :C]
    loss = _mean_flat((noise.float() - eps.float()) ** 2)
    if out.shape[1] == 2 * C:
        loss = loss + objective.vlb_weight * objective.vlb_terms(x0, x_t, t_B, eps.detach(), out[:, C:])
    return loss.mean()


@torch.no_grad()
def measure_flops(model: DyDiT, objective, x0, labels, noise, grid: int) -> dict:
    """Executed/dense MACs of the sliced eval path (MacCounter) on a fixed batch, over `grid` timesteps; plus the
    per-t ratio and the per-(t, layer) active shares of heads, groups and tokens (the gate heat map)."""
    was_training = model.training
    model.eval()
    total, by_t, gates = MacCounter(), {}, {}
    for t in torch.linspace(0, objective.num_train_timesteps - 1, grid).round().long().tolist():
        t_B = torch.full((x0.shape[0],), t, device=x0.device)
        x_t = objective.scheduler.add_noise(x0, noise, t_B)
        c = MacCounter()
        out = model(x_t, t, labels, mode="sliced", counter=c)
        total.dense += c.dense
        total.executed += c.executed
        by_t[t] = round(c.ratio, 4)
        gates[t] = [[round(m[k].mean().item(), 3) for k in ("head", "channel", "token")] for m in out.masks]
    model.train(was_training)
    return {"flops_executed": total.ratio, "flops_by_t": by_t, "gates": gates}


class SkipCounter:
    """Updates skipped by the grad-norm rule; checkpointed so a resumed run keeps its rate."""

    def __init__(self):
        self.skipped = 0
        self.steps = 0

    @property
    def rate(self) -> float:
        return self.skipped / self.steps if self.steps else 0.0

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.steps = state["skipped"], state["steps"]


def base_reference(spec: str) -> Path | None:
    """The folder of --model when it is one (shipped name or path); None for a named size or a checkpoint file."""
    if spec in DIT_CONFIGS:
        return None
    path = Path(spec)
    if not path.exists() and (REPO / "weights" / spec).is_dir():
        path = REPO / "weights" / spec
    return path.resolve() if path.is_dir() else None


# ----------------------------------------------------------------------------------------------- main
def main(args) -> dict:
    if args.train == "td-lora":
        raise ValueError("--train td-lora: TD-LoRA (DyDiT++, timestep-mixed LoRA experts) is not implemented yet; "
                         "use --train routers (frozen backbone) or --train full")
    if not 0 < args.lam <= 1:
        raise ValueError(f"--lam must be in (0, 1], got {args.lam}")
    stage1 = args.steps if args.stage1_steps is None else args.stage1_steps
    run = start_run(args)
    acc = run.accelerator
    dit = load_model(args.model, "ddpm")
    if not isinstance(dit, DiT):
        raise ValueError(f"--model {args.model}: a {type(dit).__name__}; DyDiT fine-tuning takes a class DiT")
    vae = AutoencoderKL.from_pretrained(args.vae).to(acc.device).eval().requires_grad_(False)
    objective = make_objective("ddpm")
    model = build_dydit(dit, args.tau, args.seed, args.router_bias)
    if args.train == "routers":
        model.frozen_backbone()
    params = [p for p in model.parameters() if p.requires_grad]
    data = shapes_data("class", vae, pool=args.pool, seed=args.seed)
    ema = EMAModel(params, decay=args.ema_decay, foreach=True)
    ema.to(acc.device)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    net, opt = acc.prepare(model, opt)
    skips = SkipCounter()
    acc.register_for_checkpointing(ema)
    acc.register_for_checkpointing(skips)
    step = run.resume()
    unwrapped = acc.unwrap_model(net)

    x_eval, y_eval = data.batch(EVAL_SEED, args.eval_n, acc.device)
    g_eval = torch.Generator(acc.device).manual_seed(EVAL_SEED)
    noise_eval = torch.randn(x_eval.shape, generator=g_eval, device=acc.device)
    t_eval = stratified_timesteps(args.eval_n, objective.num_train_timesteps, g_eval)

    @torch.no_grad()
    def evaluate() -> dict:
        was_training = unwrapped.training
        unwrapped.eval()
        x_t = objective.scheduler.add_noise(x_eval, noise_eval, t_eval)
        out = unwrapped(x_t, t_eval, y_eval, mode="masked")
        metrics = {"eval_loss": diffusion_loss(objective, out.sample, x_eval, x_t, t_eval, noise_eval).item(),
                   "flops_mask": out.flops_ratio.mean().item(), "skip_rate": skips.rate}
        unwrapped.train(was_training)
        return {**metrics, **measure_flops(unwrapped, objective, x_eval, y_eval, noise_eval, args.flops_grid)}

    if step == 0 and acc.is_main_process:
        run.log({"step": 0, **evaluate()})
    bar = tqdm(total=args.steps, initial=step, disable=not acc.is_local_main_process, desc="dydit")
    net.train()
    while step < args.steps:
        seed = batch_seed(args.seed, step, acc.process_index)
        x0, y = data.batch(seed, args.batch_size, acc.device)
        gen = torch.Generator(acc.device).manual_seed(seed)
        t_B = stratified_timesteps(x0.shape[0], objective.num_train_timesteps, gen)
        noise = torch.randn(x0.shape, generator=gen, device=acc.device)
        x_t = objective.scheduler.add_noise(x0, noise, t_B)
        lam_t = flops_target(step, args.lam, args.lam_hold, args.lam_reach)
        with acc.autocast():
            dyn = net(x_t, t_B, y, mode="masked")
            terms = {"loss_dynamic": diffusion_loss(objective, dyn.sample, x0, x_t, t_B, noise),
                     "loss_flops": flops_loss(dyn.flops_ratio.float(), lam_t)}
            if step < stage1 and args.train != "routers":  # the complete term trains the backbone only
                full = net(x_t, t_B, y, mode="complete")
                terms["loss_complete"] = diffusion_loss(objective, full.sample, x0, x_t, t_B, noise)
        loss = sum(terms.values())
        acc.backward(loss)
        grad_norm = float(acc.clip_grad_norm_(params, float("inf")))
        skip = args.skip_grad_norm is not None and not grad_norm < args.skip_grad_norm  # NaN skips too
        skips.steps += 1
        if skip:
            skips.skipped += 1
        else:
            opt.step()  # once per step (the official stage-1 code steps twice; spec section 5)
            ema.step(params)
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            bar.set_postfix(loss=f"{loss.item():.4f}", r=f"{dyn.flops_ratio.mean().item():.3f}")
            run.log({"step": step, "loss": loss.item(), **{k: v.item() for k, v in terms.items()},
                     "flops_train": dyn.flops_ratio.mean().item(), "lam_t": lam_t, "grad_norm": grad_norm,
                     "skipped": skip, "skip_rate": skips.rate, "stage": 1 if step <= stage1 else 2})
        state = run.end_of_step(step, bar, evaluate)
        if state == "interrupted":
            bar.close()
            return {}
        if state == "stop":
            break
    bar.close()

    metrics = {}
    acc.wait_for_everyone()
    if acc.is_main_process:
        ema.copy_to(params)  # the shipped weights are the EMA of the trained parameters
        final = unwrapped.float().eval()
        folder = run.out / "model"
        base = base_reference(args.model)
        save_dydit(folder, final, lam=args.lam, base=base, include_backbone=args.train == "full",
                   extra={"train": args.train, "steps": args.steps, "stage1_steps": stage1})
        metrics = evaluate()
        run.plot(["eval_loss", "flops_executed"])
        write_model_card(
            folder, title=folder.name,
            summary=f"DyDiT routers (lambda {args.lam}, {args.train}) fine-tuned on {args.model} with {data.description}; "
                    f"FLOPs measured on the sliced eval path over {args.flops_grid} timesteps. EMA weights "
                    f"(decay {args.ema_decay}).",
            run=run, metrics={k: v for k, v in metrics.items() if isinstance(v, float)},
            targets={"flops_executed": args.lam},
            extra={"base_model": args.model, "lam": args.lam, "train": args.train, "skip_rate": skips.rate,
                   "flops_by_t": metrics["flops_by_t"]})
        print({"final": {k: v for k, v in metrics.items() if k != "gates"}})
    acc.end_training()
    return metrics


if __name__ == "__main__":
    main(parse_args())
