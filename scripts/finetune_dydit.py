"""Fine-tune DyDiT (timestep-dynamic width + spatially dynamic tokens) on any of our DiTs: class DiT, text PixArtDiT,
video LatteDiT, under the DDPM or the flow-matching objective (spec: /work/shared/specs/dydit.md section 2; model:
dit/dydit.py; TD-LoRA: dit/td_lora.py; folder format: dit/dydit_io.py).

    python scripts/finetune_dydit.py --out runs/dydit --model shapes-c2i --lam 0.5 --steps 20000 \
        --stage1-steps 3000 --batch-size 256 --lr 1e-4 --pool 100000 --skip-grad-norm 200 --mixed-precision bf16
    python scripts/finetune_dydit.py --out runs/dydit-t2i --model shapes-t2i --train td-lora --lam 0.5 --steps 400 \
        --batch-size 32 --lr 1e-3 --router-bias 3 --pool 4096 --cpu --final-eval-n 96
    python scripts/finetune_dydit.py --evaluate weights/shapes-dydit-c2i --final-eval-n 480   # re-measure a folder
    python scripts/finetune_dydit.py --out runs/more --model shapes-c2i --train td-lora --init-from \
        weights/shapes-dydit-c2i --lam-hold 0 --lam-reach 0 --schedule cosine --warmup 100 --steps 5000 ...  # continue

Each step draws t stratified (the batch split evenly over the four quarters of [0, T) for DDPM, of [0, 1) for flow),
runs the dynamic (masked, Gumbel gates) forward through the objective (dit/objectives.py: MSE(eps) + VLB for
DDPM with learned sigma, velocity MSE for flow) and adds L_F = 2 (mean r - lambda_t)^2 with lambda_t from
`flops_target` (--lam-start, 1 by default, for --lam-hold steps, then linear to --lam at --lam-reach). With
--distill W the frozen dense model is a teacher: W * MSE(dynamic prediction, dense prediction of the same x_t) is
added (ours; the spec trains on the data loss alone). For the first --stage1-steps steps
(stage 1) a second, complete forward (all gates on) adds its loss too; this term only trains the backbone, so with
a frozen backbone (`--train routers` or `td-lora`) it is not computed. `--train td-lora` adds TD-LoRA adapters
(--lora-rank, --lora-experts) that train with the routers, the backbone frozen (DyDiT++'s PEFT recipe). A step whose
global grad norm is >= --skip-grad-norm is skipped (no update, no EMA step); the skip rate is logged. Evaluations
measure the executed-FLOPs ratio with the eval-mode sliced path and a MacCounter on a fixed batch over a grid of
timesteps. The EMA of the trained parameters is saved with dit.dydit_io.save_dydit to --out/model (or --save-to):
routers (+ adapters) and a reference to the base model when the backbone is frozen. --final-eval-n N measures the
saved DyDiT and its dense base with dit.evaluation.evaluate_pipeline on the same N seeded prompts (25 DPM-Solver++
steps, cfg 4) and puts both, and the executed-FLOPs ratio of those sampling runs, in the model card.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script
sys.path.insert(0, str(Path(__file__).resolve().parent))  # training.py, train_dit.py

from diffusers import AutoencoderKL  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

from dit.dit import DIT_CONFIGS  # noqa: E402
from dit.dydit import GATE_TAU, DyDiT, MacCounter, flops_loss, flops_target, high_noise_floor_loss  # noqa: E402
from dit.dydit_io import included_backbone, load_dydit, load_dydit_pipeline, read_config, save_dydit  # noqa: E402
from dit.evaluation import evaluate_pipeline, task_of  # noqa: E402
from dit.latte import LATTE_CONFIGS  # noqa: E402
from dit.objectives import FlowMatchingObjective, flow_interpolate, make_objective  # noqa: E402
from dit.pixart import PIXART_CONFIGS  # noqa: E402
from dit.grounding import CrossAttentionMaps, grounding_loss  # noqa: E402
from train_dit import (REPO, SHIPPED_CLIP, SHIPPED_VAE, TASK_OF, Conditioner, batch_seed,  # noqa: E402
                       grounding_targets, load_model, parse_objects, prediction_type_of, shapes_data)
from training import add_common_args, cosine_schedule, start_run, write_model_card  # noqa: E402

EVAL_SEED = 12345
QUARTERS = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--model", default="shapes-c2i",
                   help="a DiT / PixArtDiT / LatteDiT: shipped model, saved folder, named size, or .pt")
    p.add_argument("--objective", default="ddpm", choices=["ddpm", "flow"])
    p.add_argument("--lam", type=float, default=0.5, help="target FLOPs ratio lambda")
    p.add_argument("--lam-hold", type=int, default=100, help="lambda_t = --lam-start for these steps")
    p.add_argument("--lam-start", type=float, default=1.0,
                   help="lambda_t before the ramp (1: the dense model; a continued run stepping lambda down: its "
                        "folder's lambda)")
    p.add_argument("--lam-reach", type=int, default=1000, help="lambda_t reaches --lam at this step (spec: 5000 for 0.7)")
    p.add_argument("--high-noise-floor", type=float, default=None, metavar="R",
                   help="add L_floor (dit/dydit.py: high_noise_floor_loss): every sample at noise level >= "
                        "--high-noise-from must execute at least R of the dense FLOPs (L_F keeps the mean at lambda, so "
                        "the low-noise steps give up the difference); default: off, the spec's batch-mean L_F alone")
    p.add_argument("--high-noise-from", type=float, default=0.7, metavar="F",
                   help="with --high-noise-floor: the noise level (DDPM t/T, flow t) from which the floor holds")
    p.add_argument("--p2-gamma", type=float, default=0.0,
                   help="ddpm: weight each sample's loss by P2's 1 / (1 + SNR_t)^gamma (dit/objectives.py): the routers "
                        "then weigh an error at high noise (layout, count) more against the FLOPs it saves; 0: off")
    p.add_argument("--stage1-steps", type=int, default=None,
                   help="steps with the complete forward's loss added (default: all steps)")
    p.add_argument("--train", default="routers", choices=["routers", "full", "td-lora"],
                   help="routers: frozen backbone; full: backbone too; td-lora: routers + TD-LoRA, frozen backbone")
    p.add_argument("--lora-rank", type=int, default=4, help="td-lora: rank r of each expert")
    p.add_argument("--lora-experts", type=int, default=4, help="td-lora: experts K mixed by softmax(Linear(E_t))")
    p.add_argument("--distill", type=float, default=0.0, metavar="W",
                   help="add W * MSE(dynamic prediction, dense base's prediction) on the same x_t (ours, not the "
                        "spec's: the frozen dense model as teacher; on the text model at W 2 and lr 1e-3 every run "
                        "diverged, docs/dydit.md)")
    p.add_argument("--max-grad-norm", type=float, default=float("inf"),
                   help="clip the global grad norm to this before the update (default: no clipping; the text "
                        "DyDiT's runs at lr 1e-3 diverged with norms rising from 0.002 to 10-46)")
    p.add_argument("--skip-grad-norm", type=float, default=None,
                   help="skip the update when the global grad norm is >= this (spec: 200 for lam 0.5, 50 for 0.7)")
    p.add_argument("--tau", type=float, default=GATE_TAU, help="Gumbel-sigmoid temperature")
    p.add_argument("--router-bias", type=float, default=None,
                   help="set every router's output bias to this (default: the dydit.py init, 15 width / 35 token, "
                        "all gates on); a short run needs a small positive value so the gates can move; too low risks "
                        "an early collapse")
    p.add_argument("--vae", default=str(SHIPPED_VAE))
    p.add_argument("--text-encoder", default=str(SHIPPED_CLIP), help="text / video models: the ShapesCLIP folder")
    p.add_argument("--uncond-prob", type=float, default=0.1, help="text models: share of captions replaced by ''")
    p.add_argument("--pool", type=int, default=0, help="shapes data pool size (0: fresh batches every step)")
    p.add_argument("--objects", default="1-3", metavar="MIN-MAX", help="shapes text data: objects per scene")
    p.add_argument("--grounding-loss", type=float, default=0.0, metavar="WEIGHT",
                   help="text models (with --pool): keep the dense model's token grounding while the DyDiT trains "
                        "(dit/grounding.py; the shipped shapes-t2i was trained with it, weight 0.05)")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--eval-n", type=int, default=16, help="fixed, seeded batch for the FLOPs and loss evaluation")
    p.add_argument("--flops-grid", type=int, default=10, help="timesteps (evenly over the range) of the FLOPs measure")
    p.add_argument("--final-eval-n", type=int, default=0,
                   help="prompts of the final sample evaluation of the DyDiT and its dense base (0: off)")
    p.add_argument("--save-to", default=None, help="the DyDiT folder to write (default: --out/model)")
    p.add_argument("--evaluate", default=None, metavar="FOLDER",
                   help="only measure a saved DyDiT folder against its base (--final-eval-n prompts) and update its card")
    p.add_argument("--eval-seed", type=int, default=0,
                   help="with --evaluate: the seed of the prompts and noise (another seed: another sample set)")
    p.add_argument("--no-card", action="store_true",
                   help="with --evaluate: only print the comparison; leave the folder's card and README as they are")
    p.add_argument("--dense-metrics", default=None, metavar="JSON",
                   help="with --evaluate: the base's evaluate_pipeline result for the same n and seed (not re-measured)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--init-from", default=None, metavar="FOLDER",
                   help="continue a saved DyDiT folder (its routers, TD-LoRA and, if included, backbone) instead of "
                        "fresh routers on --model; --train and the TD-LoRA sizes must match what it holds")
    p.add_argument("--rebase", action="store_true",
                   help="with --init-from: put the folder's routers and TD-LoRA on --model's backbone, even where the "
                        "folder includes its own (a dense model retrained since, of the same sizes); the result is "
                        "saved over --model, without a backbone")
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                   help="LR after the --warmup steps: constant, or cosine decay to zero at --steps")
    p.add_argument("--warmup", type=int, default=0, help="LR warm-up steps (linear from 0)")
    p.add_argument("--anneal-to-time-limit", action="store_true",
                   help="cosine: decay by elapsed time as well as steps, so a --time-limit run ends annealed")
    p.set_defaults(lr=1e-4)
    argv = sys.argv[1:] if argv is None else argv
    if "--evaluate" in argv and "--out" not in argv:  # no run folder: only a measurement
        argv = [*argv, "--out", "unused", "--steps", "0"]
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- pieces
def build_dydit(dit, tau: float, seed: int, router_bias: float | None = None) -> DyDiT:
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


def continued_dydit(folder: Path, dit, args) -> DyDiT:
    """The DyDiT saved in `folder`, to train on: its backbone is `dit` (the --model) unless the folder includes one
    (full fine-tuning), and it must have been trained the way this run trains it."""
    config = read_config(folder)
    has_backbone = config["backbone"] == "included"
    included = has_backbone and not args.rebase  # the backbone this run routes is the folder's own
    # An included backbone with TD-LoRA is a packed folder (scripts/pack_dydit.py): a frozen backbone of its own.
    held = "td-lora" if config.get("td_lora") else ("full" if has_backbone else "routers")
    if args.rebase and held == "full":
        raise ValueError(f"--init-from {folder} --rebase: it is a full fine-tune, whose backbone is part of what was "
                         f"trained; only routers and TD-LoRA move to another backbone")
    if included and held == "td-lora" and args.distill > 0:
        raise ValueError(f"--init-from {folder}: it includes its own backbone, and --distill's teacher would be "
                         f"--model's transformer instead")
    if held != args.train:
        raise ValueError(f"--init-from {folder}: it holds a {held} fine-tune, this run trains --train {args.train}")
    lora = config.get("td_lora")
    if lora and (lora["rank"], lora["experts"]) != (args.lora_rank, args.lora_experts):
        raise ValueError(f"--init-from {folder}: TD-LoRA rank {lora['rank']} x {lora['experts']} experts, this run "
                         f"asks {args.lora_rank} x {args.lora_experts}")
    model = load_dydit(folder, backbone=None if included else dit)
    for router in model.routers:
        router.gate.tau = args.tau
    return model.train()


def packed_backbone(init_from: str | None, rebase: bool = False) -> str | None:
    """"int8" / "float" when --init-from is a TD-LoRA folder with its own backbone (scripts/pack_dydit.py), whose
    continuation is saved the same way; None otherwise (and with --rebase: the backbone is --model's)."""
    if not init_from or rebase:
        return None
    return included_backbone(init_from) if read_config(init_from).get("td_lora") else None


def stratified_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) ints: sample i lies in quarter i * 4 // n of [0, T), uniform within it (the batch split evenly)."""
    width = num_train_timesteps // QUARTERS
    quarter = torch.arange(n, device=generator.device) * QUARTERS // n
    return quarter * width + torch.randint(0, width, (n,), generator=generator, device=generator.device)


def stratified_flow_times(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) floats: sample i uniform in quarter i * 4 // n of [0, 1)."""
    quarter = torch.arange(n, device=generator.device) * QUARTERS // n
    return (quarter + torch.rand(n, generator=generator, device=generator.device)) / QUARTERS


def draw(objective, x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, noise) with stratified t, in the objective's own units (DDPM step ids, flow t in [0, 1))."""
    if isinstance(objective, FlowMatchingObjective):
        t_B = stratified_flow_times(x0.shape[0], gen)
    else:
        t_B = stratified_timesteps(x0.shape[0], objective.num_train_timesteps, gen)
    return t_B.to(x0.device), torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.device, x0.dtype)


def noise_level(objective, t_B: torch.Tensor) -> torch.Tensor:
    """(B,) each sample's place on the noise axis in [0, 1]: DDPM t/T, flow t (both 1 = pure noise)."""
    if isinstance(objective, FlowMatchingObjective):
        return t_B.float()
    return t_B.float() / objective.num_train_timesteps


def noisy(objective, x0, noise, t_B):
    """x_t and the timestep the model sees (flow: t * timestep_scale)."""
    if isinstance(objective, FlowMatchingObjective):
        return flow_interpolate(x0, noise, t_B)[0], t_B * objective.timestep_scale
    return objective.scheduler.add_noise(x0, noise, t_B), t_B


def model_time_grid(objective, grid: int) -> list[float]:
    """`grid` timesteps evenly over the range the model sees."""
    top = objective.timestep_scale if isinstance(objective, FlowMatchingObjective) else objective.num_train_timesteps - 1
    return torch.linspace(0, top, grid).round().tolist()


def _grad_norm(params) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def run_loss(objective, net, x0, cond, draws, mode: str, teacher=None):
    """The objective's loss terms with the DyDiT in `mode`, and the DyDiTOutput of that forward. With a `teacher`
    (the frozen dense model) the terms gain `distill`: MSE between the two predictions of the same x_t (the noise /
    velocity channels; a learned variance is left to the objective's own term)."""
    seen = {}

    def model_fn(x_t, t, c):
        seen["out"] = net(x_t, t, *c, mode=mode)
        seen["inputs"] = (x_t, t, c)
        return seen["out"].sample

    terms = objective(model_fn, x0, cond, draws=draws)
    if teacher is not None:
        x_t, t, c = seen["inputs"]
        with torch.no_grad():
            target = teacher(x_t, t, *c)[:, : x0.shape[1]]
        terms["distill"] = torch.nn.functional.mse_loss(seen["out"].sample[:, : x0.shape[1]].float(), target.float())
    return terms, seen["out"]


@torch.no_grad()
def measure_flops(model: DyDiT, objective, x0, cond, noise, grid: int) -> dict:
    """Executed/dense MACs of the sliced eval path (MacCounter) on a fixed batch, over `grid` timesteps; plus the
    per-t ratio and the per-(t, layer) active shares of heads, groups and tokens (the gate heat map)."""
    was_training = model.training
    model.eval()
    total, by_t, gates = MacCounter(), {}, {}
    for t in model_time_grid(objective, grid):
        t_in = torch.full((x0.shape[0],), t, device=x0.device)
        if isinstance(objective, FlowMatchingObjective):
            x_t = flow_interpolate(x0, noise, t_in / objective.timestep_scale)[0]
        else:
            x_t = objective.scheduler.add_noise(x0, noise, t_in.long())
        c = MacCounter()
        out = model(x_t, t, *cond, mode="sliced", counter=c)
        total.dense += c.dense
        total.executed += c.executed
        by_t[int(t)] = round(c.ratio, 4)
        gates[int(t)] = [[round(m[k].mean().item(), 3) for k in ("head", "channel", "token")] for m in out.masks]
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
    if spec in DIT_CONFIGS or spec in PIXART_CONFIGS or spec in LATTE_CONFIGS:
        return None
    path = Path(spec)
    if not path.exists() and (REPO / "weights" / spec).is_dir():
        path = REPO / "weights" / spec
    return path.resolve() if path.is_dir() else None


def compare_with_dense(folder: Path, n: int, seed: int = 0, dense_metrics: dict | None = None,
                       device: str | None = None) -> dict:
    """dit.evaluation.evaluate_pipeline of the DyDiT in `folder` and of its dense base pipeline, same n seeded
    prompts and settings (25 DPM-Solver++ steps, cfg 4), and the executed/dense MACs of the DyDiT's sampling.
    `dense_metrics`: the base's result for the same (n, seed), measured before (not measured again). `device`
    (default: the GPU where there is one) runs both; its noise streams differ from the CPU's, so it is recorded."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_dydit_pipeline(folder).to(device)
    pipe.set_progress_bar_config(disable=True)
    dense_s = None
    if dense_metrics is None:
        base = (folder / read_config(folder)["base"]).resolve()
        dense = type(pipe).from_pretrained(base).to(device)
        dense.set_progress_bar_config(disable=True)
        t0 = time.perf_counter()
        dense_metrics = evaluate_pipeline(dense, n=n, seed=seed)
        dense_s = round(time.perf_counter() - t0, 1)
    elif (dense_metrics["n"], dense_metrics["seed"]) != (n, seed):
        raise ValueError(f"dense metrics for n={dense_metrics['n']}, seed={dense_metrics['seed']}; asked n={n}, "
                         f"seed={seed}")
    pipe.transformer.counter.reset()
    t0 = time.perf_counter()
    dy_metrics = evaluate_pipeline(pipe, n=n, seed=seed)
    dy_s = time.perf_counter() - t0
    c = pipe.transformer.counter
    return {"kind": task_of(pipe), "dense": dense_metrics, "dydit": dy_metrics, "sampling_flops_ratio": c.ratio,
            "sampling_flops_ratio_with_overheads": c.ratio_with_overheads,
            "blocks_gmacs_per_image_dense": c.dense / n / 1e9, "blocks_gmacs_per_image_executed": c.executed / n / 1e9,
            "eval_seconds_dense": dense_s, "eval_seconds_dydit": round(dy_s, 1), "device": str(device)}


def update_card(folder: Path, comparison: dict) -> None:
    """Add the dense-vs-DyDiT comparison to card.json and README.md."""
    card_path = folder / "card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    card["comparison"] = comparison
    card["eval"] = {"kind": comparison["kind"], **{k: comparison["dydit"][k] for k in ("n", "seed", "cfg", "steps",
                                                                                       "sampler")}}
    card["metrics"] = {**card.get("metrics", {}), **{k: v for k, v in comparison["dydit"].items()
                                                     if k.endswith("accuracy")}}
    card_path.write_text(json.dumps(card, indent=2))
    task_keys = [k for k in comparison["dydit"] if k.endswith("accuracy")]
    rows = "\n".join(f"| {k} | {comparison['dense'][k]:.4f} | {comparison['dydit'][k]:.4f} |" for k in task_keys)
    seed_arg = f" --eval-seed {comparison['dydit']['seed']}" if comparison["dydit"]["seed"] else ""
    text = (f"\n## Dense vs DyDiT (dit.evaluation, {comparison['dydit']['n']} seeded prompts, "
            f"{comparison['dydit']['steps']} {comparison['dydit']['sampler']} steps, cfg {comparison['dydit']['cfg']})\n\n"
            f"| metric | dense | DyDiT |\n|---|---|---|\n{rows}\n"
            f"| executed / dense block MACs over the sampling runs | 1 | {comparison['sampling_flops_ratio']:.4f} |\n"
            f"| ... with router and adapter overheads | 1 | {comparison['sampling_flops_ratio_with_overheads']:.4f} |\n"
            f"\nMeasured with `python scripts/finetune_dydit.py --evaluate {_shown(folder)} --final-eval-n "
            f"{comparison['dydit']['n']}{seed_arg}` (the dense numbers: the same call of dit.evaluation.evaluate_pipeline on the "
            f"base pipeline).\n")
    readme = folder / "README.md"
    old = readme.read_text() if readme.is_file() else f"# {folder.name}\n"
    old = old.split("\n## Dense vs DyDiT")[0]
    readme.write_text(old.rstrip("\n") + "\n" + text)


def _shown(path: Path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


# ----------------------------------------------------------------------------------------------- main
def main(args) -> dict:
    if args.evaluate:
        if not args.final_eval_n:
            raise ValueError("--evaluate needs --final-eval-n (the number of prompts)")
        dense = json.loads(Path(args.dense_metrics).read_text()) if args.dense_metrics else None
        comparison = compare_with_dense(Path(args.evaluate), args.final_eval_n, seed=args.eval_seed, dense_metrics=dense)
        if not args.no_card:
            update_card(Path(args.evaluate), comparison)
        print(json.dumps(comparison, indent=2))
        return comparison
    if not 0 < args.lam <= 1:
        raise ValueError(f"--lam must be in (0, 1], got {args.lam}")
    if args.high_noise_floor is not None and not (0 < args.high_noise_floor <= 1 and 0 <= args.high_noise_from < 1):
        raise ValueError(f"--high-noise-floor must be in (0, 1] and --high-noise-from in [0, 1); got "
                         f"{args.high_noise_floor}, {args.high_noise_from}")
    if args.p2_gamma and args.objective != "ddpm":
        raise ValueError("--p2-gamma is a DDPM option (the flow objective has no SNR weighting here)")
    if args.rebase and not args.init_from:
        raise ValueError("--rebase moves an --init-from folder's routers onto --model: give --init-from")
    stage1 = args.steps if args.stage1_steps is None else args.stage1_steps
    run = start_run(args)
    acc = run.accelerator
    dit = load_model(args.model, args.objective)
    task = TASK_OF.get(type(dit))
    if task is None:
        raise ValueError(f"--model {args.model}: a {type(dit).__name__}; DyDiT takes a DiT, PixArtDiT or LatteDiT")
    vae = AutoencoderKL.from_pretrained(args.vae).to(acc.device).eval().requires_grad_(False)
    text_encoder = None
    if task != "class":
        from shapes.clip import ShapesCLIP

        text_encoder = ShapesCLIP.from_pretrained(args.text_encoder, device=acc.device).eval().requires_grad_(False)
    if task == "class" and dit.config.class_dropout_prob > 0:
        # As train_dit.py: the conditioner drops labels (from the step's seed) instead of the model's own torch.rand,
        # so a --distill teacher sees the very labels the DyDiT sees; runtime only, the config keeps the prob.
        conditioner = Conditioner(task, uncond_prob=dit.config.class_dropout_prob, null_class=dit.config.num_classes)
        dit.label_embed.dropout_prob = 0.0
    else:
        conditioner = Conditioner(task, text_encoder, args.uncond_prob)
    as_args = (lambda c: (c,)) if task == "class" else (lambda c: tuple(c))  # the DyDiT's cond (, cond_mask)
    # A DyDiT predicts what its base predicts (ε or v: the base pipeline's scheduler says which).
    objective = make_objective(args.objective, **({"prediction_type": prediction_type_of(args.model),
                                                   "p2_gamma": args.p2_gamma} if args.objective == "ddpm" else {}))
    # The teacher is a copy taken before the DyDiT wraps (and full training changes) the backbone.
    teacher = copy.deepcopy(dit).to(acc.device).eval().requires_grad_(False) if args.distill > 0 else None
    if args.init_from:
        model = continued_dydit(Path(args.init_from), dit, args)
    else:
        model = build_dydit(dit, args.tau, args.seed, args.router_bias)
    if args.train != "full":
        model.frozen_backbone()
    if args.train == "td-lora" and model.lora is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed + 1)
            model.add_td_lora(args.lora_rank, args.lora_experts)
    params = [p for p in model.parameters() if p.requires_grad]
    router_ids = {id(p) for p in model.routers.parameters()}
    groups = {"routers": [p for p in params if id(p) in router_ids],
              "rest": [p for p in params if id(p) not in router_ids]}  # TD-LoRA, or the backbone (full)
    targets = None
    if args.grounding_loss:
        if task != "text":
            raise ValueError("--grounding-loss applies to text-to-image models here")
        targets = grounding_targets(text_encoder, dit.config.sample_size // dit.config.patch_size,
                                    vae.config.sample_size)
    data = shapes_data(task, vae, getattr(dit.config, "num_frames", 8), pool=args.pool, seed=args.seed,
                       tokenize=text_encoder.tokenize if text_encoder is not None else None,
                       objects=parse_objects(args.objects), targets=targets)
    ema = EMAModel(params, decay=args.ema_decay, foreach=True)
    ema.to(acc.device)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if args.schedule == "cosine":
        sched = cosine_schedule(opt, args.steps, args.warmup, run.time_progress if args.anneal_to_time_limit else None)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    # Stepped here once per optimiser step, not prepared: accelerate would step it once per process.
    net, opt = acc.prepare(model, opt)
    skips = SkipCounter()
    acc.register_for_checkpointing(sched)
    acc.register_for_checkpointing(ema)
    acc.register_for_checkpointing(skips)
    step = run.resume()
    ema.to(acc.device)  # diffusers' EMAModel.load_state_dict leaves the restored averages on the CPU
    unwrapped = acc.unwrap_model(net)

    x_eval, raw_eval = data.batch(EVAL_SEED, args.eval_n, acc.device)
    cond_eval = as_args(conditioner(raw_eval))
    g_eval = torch.Generator(acc.device).manual_seed(EVAL_SEED)
    t_eval, noise_eval = draw(objective, x_eval, g_eval)

    @torch.no_grad()
    def evaluate() -> dict:
        was_training = unwrapped.training
        unwrapped.eval()
        terms, out = run_loss(objective, unwrapped, x_eval, cond_eval, (t_eval, noise_eval), "masked")
        metrics = {"eval_loss": terms["loss"].item(), "flops_mask": out.flops_ratio.mean().item(),
                   "skip_rate": skips.rate}
        unwrapped.train(was_training)
        return {**metrics, **measure_flops(unwrapped, objective, x_eval, cond_eval, noise_eval, args.flops_grid)}

    if step == 0 and acc.is_main_process:
        run.log({"step": 0, **evaluate()})
    bar = tqdm(total=args.steps, initial=step, disable=not acc.is_local_main_process, desc=f"dydit-{task}")
    # the backbone's cross-attention maps (the DyDiT runs them dense, through the modules the hooks sit on)
    maps = CrossAttentionMaps(unwrapped.dit) if args.grounding_loss else None
    net.train()
    while step < args.steps:
        seed = batch_seed(args.seed, step, acc.process_index)
        x0, raw = data.batch(seed, args.batch_size, acc.device)
        cond = as_args(conditioner(raw, seed))
        draws = draw(objective, x0, torch.Generator(acc.device).manual_seed(seed))
        lam_t = flops_target(step, args.lam, args.lam_hold, args.lam_reach, args.lam_start)
        with acc.autocast():
            with maps.recording() if maps is not None else contextlib.nullcontext():
                dyn_terms, dyn = run_loss(objective, net, x0, cond, draws, "masked", teacher)
            terms = {"loss_dynamic": dyn_terms["loss"], "loss_flops": flops_loss(dyn.flops_ratio.float(), lam_t)}
            if args.high_noise_floor is not None:
                terms["loss_floor"] = high_noise_floor_loss(dyn.flops_ratio.float(), noise_level(objective, draws[0]),
                                                            args.high_noise_floor, args.high_noise_from)
            if maps is not None:
                masks, tokens = data.grounding(seed, args.batch_size, acc.device)
                tokens = conditioner.grounded(tokens, seed)
                terms["loss_grounding"] = args.grounding_loss * grounding_loss(maps.take(), masks, tokens)
            if teacher is not None:
                terms["loss_distill"] = args.distill * dyn_terms["distill"]
            if step < stage1 and args.train == "full":  # the complete term trains the backbone only
                terms["loss_complete"] = run_loss(objective, net, x0, cond, draws, "complete")[0]["loss"]
        loss = sum(terms.values())
        acc.backward(loss)
        logging = (step + 1) % args.log_every == 0 or step + 1 == args.steps
        # Where a rising norm comes from (routers or adapters / backbone): measured before clipping, on log steps.
        parts = {f"grad_norm_{name}": _grad_norm(group) for name, group in groups.items()} if logging else {}
        grad_norm = float(acc.clip_grad_norm_(params, args.max_grad_norm))  # the norm before clipping
        skip = args.skip_grad_norm is not None and not grad_norm < args.skip_grad_norm  # NaN skips too
        skips.steps += 1
        if skip:
            skips.skipped += 1
        else:
            opt.step()  # once per step (the official stage-1 code steps twice; spec section 5)
            ema.step(params)
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            bar.set_postfix(loss=f"{loss.item():.4f}", r=f"{dyn.flops_ratio.mean().item():.3f}")
            run.log({"step": step, "loss": loss.item(), **{k: v.item() for k, v in terms.items()},
                     "flops_train": dyn.flops_ratio.mean().item(), "lam_t": lam_t, "grad_norm": grad_norm,
                     "lr": sched.get_last_lr()[0], "skipped": skip, "skip_rate": skips.rate,
                     "stage": 1 if step <= stage1 else 2, **parts})
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
        folder = Path(args.save_to) if args.save_to else run.out / "model"
        base = base_reference(args.model)
        packed = packed_backbone(args.init_from, args.rebase)
        save_dydit(folder, final, lam=args.lam, base=base, include_backbone=args.train == "full" or packed is not None,
                   int8_backbone=packed == "int8",
                   extra={"train": args.train, "objective": args.objective, "task": task, "steps": step,
                          "stage1_steps": stage1, "distill": args.distill})
        metrics = evaluate()
        run.plot(["eval_loss", "flops_executed"])
        lora = f", TD-LoRA rank {args.lora_rank} x {args.lora_experts} experts" if args.train == "td-lora" else ""
        write_model_card(
            folder, title=folder.name,
            summary=f"DyDiT (lambda {args.lam}, {args.train}{lora}) fine-tuned from `{args.model}` with the "
                    f"{args.objective} objective on {data.description}; FLOPs measured on the sliced eval path over "
                    f"{args.flops_grid} timesteps. EMA weights (decay {args.ema_decay}).",
            run=run, metrics={k: v for k, v in metrics.items() if isinstance(v, float)},
            targets={"flops_executed": args.lam},
            extra={"base_model": args.model, "lam": args.lam, "train": args.train, "objective": args.objective,
                   "task": task, "skip_rate": skips.rate, "flops_by_t": metrics["flops_by_t"],
                   "gates": metrics["gates"], "steps_done": step,
                   **({"td_lora": {"rank": args.lora_rank, "experts": args.lora_experts}} if lora else {})})
        if args.final_eval_n and base is not None and args.objective == "ddpm":
            comparison = compare_with_dense(folder, args.final_eval_n)
            update_card(folder, comparison)
            metrics["comparison"] = comparison
        print({"final": {k: v for k, v in metrics.items() if k not in ("gates", "flops_by_t")}})
    acc.end_training()
    return metrics


if __name__ == "__main__":
    main(parse_args())
