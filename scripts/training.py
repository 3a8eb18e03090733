"""What every training script here shares: an accelerate run folder with checkpoint + resume, a JSONL log, a
loss/metric plot, and the model card written beside the shipped weights.

Resume loses no step beyond the last checkpoint: `accelerator.save_state` stores model, optimiser, LR
schedule and RNG states, and each script draws step `s`'s batch from `seed + s` (the shapes world is a
function of its seed), so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType, set_seed
from diffusers.training_utils import EMAModel
from torch.distributed.tensor import DTensor, distribute_tensor


def add_common_args(p) -> None:
    p.add_argument("--out", required=True, help="run folder: checkpoints/, log.jsonl, plot, and the final model")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--keep-ckpts", type=int, default=2)
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds of training (counted over resumes); past it the run checkpoints, ends early, then "
                        "saves and evaluates as usual")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end this process after that step, as an interruption would (resume by running again)")


@dataclass
class Run:
    """One training run's folder and bookkeeping."""
    args: object
    accelerator: Accelerator
    out: Path
    start_step: int = 0
    t0: float = field(default_factory=time.time)
    train_seconds_before: float = 0.0

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        if not self.ckpt_root.is_dir():
            return None
        ckpts = [p for p in self.ckpt_root.iterdir() if re.fullmatch(r"step_\d+", p.name)]
        return max(ckpts, key=lambda p: int(p.name.split("_")[1]), default=None)

    def resume(self) -> int:
        """Load the newest checkpoint if there is one; returns the step to continue from."""
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            return 0
        self.accelerator.load_state(str(ckpt))
        meta = json.loads((ckpt / "meta.json").read_text())
        self.start_step = meta["step"]
        self.train_seconds_before = meta.get("train_seconds", 0.0)
        self.accelerator.print(f"resumed from {ckpt} at step {self.start_step}")
        return self.start_step

    def train_seconds(self) -> float:
        return self.train_seconds_before + time.time() - self.t0

    def time_progress(self) -> float:
        """Share of --time-limit spent (0 without a limit)."""
        return self.train_seconds() / self.args.time_limit if self.args.time_limit else 0.0

    def interrupted(self, step: int) -> bool:
        """True once `--stop-after` is reached: the caller returns without saving the final model."""
        return self.args.stop_after is not None and step >= self.args.stop_after and step < self.args.steps

    def out_of_time(self, step: int) -> bool:
        """True once `--time-limit` has passed; records the step actually reached for the model card."""
        if self.args.time_limit is None:
            return False
        # Every process must stop at the same step, or the others wait forever in the next collective.
        over = torch.tensor(float(self.train_seconds() >= self.args.time_limit), device=self.accelerator.device)
        if self.accelerator.reduce(over, reduction="max").item() == 0:
            return False
        self.accelerator.print(f"time limit reached at step {step} of {self.args.steps}")
        self.args.steps = step
        return True

    def end_of_step(self, step: int, bar, evaluate, evaluate_everywhere: bool = False) -> str:
        """The bookkeeping after optimiser step `step`: evaluation every --eval-every steps and at the end
        (`evaluate()` returns a metrics dict; it runs on the main process only, or with `evaluate_everywhere` on
        every process, e.g. to gather sharded weights, and the main process's result is logged), a checkpoint
        every --ckpt-every steps. Returns "go" to continue, "stop" to end the loop and save (time limit), or
        "interrupted" to return without saving (--stop-after)."""
        args = self.args
        main = self.accelerator.is_main_process
        if (step % args.eval_every == 0 or step == args.steps) and (main or evaluate_everywhere):
            metrics = evaluate()
            if main:
                self.log({"step": step, **metrics})
                bar.write(f"step {step}: {metrics}")
        if step % args.ckpt_every == 0 and step < args.steps:
            self.checkpoint(step)
        if self.interrupted(step):
            # Leave together and take the process group down: a process that exits while gloo's threads still
            # serve the other rank aborts ("terminate called without an active exception", seen in CI).
            self.accelerator.wait_for_everyone()
            self.accelerator.end_training()
            return "interrupted"
        if self.out_of_time(step):
            # The full state too, so that a later call (a longer --time-limit, same --out) goes on with the
            # optimiser moments instead of restarting Adam on trained weights.
            if not (self.ckpt_root / f"step_{step}").is_dir():
                self.checkpoint(step)
            return "stop"
        return "go"

    def checkpoint(self, step: int) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = self.ckpt_root / f"step_{step}"
        acc.save_state(str(path))
        if acc.is_main_process:
            (path / "meta.json").write_text(json.dumps({"step": step, "train_seconds": self.train_seconds()}))
            ckpts = sorted((p for p in self.ckpt_root.iterdir() if re.fullmatch(r"step_\d+", p.name)),
                           key=lambda p: int(p.name.split("_")[1]))
            for old in ckpts[: -self.args.keep_ckpts]:
                for f in sorted(old.rglob("*"), reverse=True):
                    f.unlink() if f.is_file() else f.rmdir()
                old.rmdir()

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def read_log(self) -> list[dict]:
        path = self.out / "log.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def plot(self, metric_keys: list[str]) -> Path:
        """Loss (every logged step) and each metric (every evaluation) against the step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.read_log()
        fig, axes = plt.subplots(1, 1 + len(metric_keys), figsize=(4 * (1 + len(metric_keys)), 3))
        axes = list(axes) if len(metric_keys) else [axes]
        loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
        if loss:
            axes[0].plot(*zip(*loss))
        axes[0].set(title="training loss", xlabel="step", yscale="log")
        for ax, key in zip(axes[1:], metric_keys):
            pts = [(r["step"], r[key]) for r in records if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o")
            ax.set(title=key, xlabel="step")
        fig.tight_layout()
        path = self.out / "training.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path


def fsdp_plugin(mixed_precision: str = "no", checkpoint_blocks: bool = False) -> FullyShardedDataParallelPlugin:
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) through accelerate: every transformer block is its own shard
    group (accelerate's transformer-based wrap reads the block classes from the model's `_no_split_modules`), the
    root group holds the embedders and the final layer; parameters are resharded after each block's forward;
    checkpoints and `get_state_dict` hold the full, unsharded weights. Under --mixed-precision the blocks compute in
    bf16 / fp16 from fp32 master weights, and gradients are reduced in fp32 (as DDP's are).

    `checkpoint_blocks`: activation checkpointing of every block, applied by accelerate inside the shard groups
    (torch's checkpoint_wrapper around each block, then fully_shard: accelerate's and torchtitan's order, so the
    checkpointed region holds the block's computation and not FSDP's gather hooks); it replaces the model's own
    (diffusers') gradient checkpointing under FSDP."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute else None
    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          reshard_after_forward=True, state_dict_type="FULL_STATE_DICT",
                                          mixed_precision_policy=policy, activation_checkpointing=checkpoint_blocks)


def start_run(args, *, split_batches: bool = False, fsdp: bool = False, checkpoint_blocks: bool = False) -> Run:
    """The run folder and the Accelerator. `fsdp`: shard the model over the processes (`fsdp_plugin`, with
    `checkpoint_blocks`) instead of replicating it (DDP); on one process there is nothing to shard and training is
    the plain one."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from accelerate import DataLoaderConfiguration
    from accelerate.state import PartialState

    plugin = fsdp_plugin(args.mixed_precision, checkpoint_blocks) if fsdp else None
    # (Accelerator's own split_batches= keyword is accepted but ignored by recent accelerate: the config object is
    # what its LR scheduler wrapper reads.)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu, fsdp_plugin=plugin,
                              dataloader_config=DataLoaderConfiguration(split_batches=split_batches))
    if fsdp and accelerator.num_processes > 1 and not accelerator.is_fsdp2:
        if accelerator.distributed_type != DistributedType.MULTI_CPU:
            raise RuntimeError(f"--fsdp: accelerate chose {accelerator.distributed_type} instead of FSDP")
        # accelerate 1.15 applies an FSDP plugin only to accelerator processes (AcceleratorState.__init__ lists
        # MULTI_GPU, MULTI_NPU, ...); CPU processes would silently train with DDP instead. torch's fully_shard
        # runs on a CPU (gloo) mesh, so take accelerate's FSDP path explicitly: the same code as on GPUs, which is
        # what tests/test_train_parallel.py checks on the CPU.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    set_seed(args.seed)
    return Run(args=args, accelerator=accelerator, out=out)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the shard of an FSDP2 (DTensor) parameter or state, else the tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 (DTensor) shard gathered from every process (a collective), else the tensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class EMA(EMAModel):
    """diffusers' EMAModel, kept in the parameters' own layout, with a checkpoint state that is always the full
    weights: under FSDP each process averages its own shards (no communication per step) and `state_dict` gathers
    them (a collective: accelerate's save_state calls it on every process, then writes the main one's).
    `load_state_dict` copies the saved weights into the existing shadows in place, so they keep their device and
    sharding (diffusers' own replaces them with the loaded CPU tensors: a resumed GPU run would average CUDA
    parameters into CPU shadows)."""

    def state_dict(self) -> dict:
        return {**super().state_dict(), "shadow_params": [full(p).cpu() for p in self.shadow_params]}

    @torch.no_grad()
    def copy_to(self, parameters) -> None:
        """Shard by shard (DTensor has no sharding rule for the foreach copy diffusers uses)."""
        for shadow, param in zip(self.shadow_params, parameters):
            local(param).copy_(local(shadow))

    def load_state_dict(self, state_dict: dict) -> None:
        shadows = self.shadow_params
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for mine, saved in zip(shadows, self.shadow_params):
                if isinstance(mine, DTensor):  # every process holds the full tensor: take its shard, no transfer
                    saved = distribute_tensor(saved.to(mine.device), mine.device_mesh, mine.placements,
                                              src_data_rank=None)
                local(mine).copy_(local(saved))
        self.shadow_params = shadows


def cosine_schedule(opt: torch.optim.Optimizer, steps: int, warmup: int,
                    time_progress=None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `steps`. With `time_progress` (a callable
    giving the share of a time budget spent, e.g. `Run.time_progress`) the decay follows whichever of step and
    time is further along, so a run cut by --time-limit still ends annealed (and is then not bit-exact on resume:
    its schedule depends on the clock)."""
    def factor(s: int) -> float:
        progress = min(1.0, max(s / steps, time_progress() if time_progress else 0.0))
        return min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_step(acc: Accelerator, params, opt, sched, max_grad_norm: float = 1.0) -> torch.Tensor:
    """Clip, step, schedule, zero; returns the pre-clip gradient norm (a tensor: reading it is the caller's sync)."""
    norm = acc.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm


class SpikeGuard:
    """Roll back to the last healthy weights when the training loss spikes, and halve the learning rate.

    Why: the shipped shapes models' continuation runs collapsed after 1–5k steps (loss 0.02 → 0.2–1.0, never
    recovering; see docs/dit.md), and a device call is too short to notice and restart by hand. Large-scale
    practice (PaLM's skip-and-rewind on loss spikes) is to restore a recent good state and go on with a smaller
    step; the step counter keeps moving, so the batches after the spike are new ones.

    Every `every` steps the mean loss of that window is compared with the best window mean so far: within
    `factor` × best, the current model / optimiser / EMA state is copied to host memory as the rollback point;
    above it, that point is restored and every LR scaled by `lr_decay` (at most `max_rollbacks` times, then the
    guard only reports). Losses are summed on the device and read once per window (no per-step host sync).
    Memory: one host copy of the parameters, EMA and optimiser moments (fine for the shapes sizes; off by default).
    """

    def __init__(self, model, opt, sched, ema=None, *, every: int = 100, factor: float = 3.0,
                 lr_decay: float = 0.5, max_rollbacks: int = 5, reduce=None):
        self.model, self.opt, self.sched, self.ema = model, opt, sched, ema
        # Across processes every replica must take the same decision: `reduce` averages the window's loss sum over
        # them (a collective, at window ends only, which all processes reach at the same step).
        self.reduce = reduce or (lambda t: t)
        self.every, self.factor, self.lr_decay, self.max_rollbacks = every, factor, lr_decay, max_rollbacks
        self.best = math.inf
        self.window_sum, self.window_n = None, 0
        self.saved = None
        self.rollbacks: list[dict] = []

    # Snapshots hold each process's own part (`local`: its shards under FSDP, everything under DDP) and are copied
    # back in place, so every tensor keeps its device, dtype and sharding.
    def _opt_states(self) -> list[dict]:
        return [self.opt.state[p] for group in self.opt.param_groups for p in group["params"]]

    def _snapshot(self):
        cpu = lambda t: local(t).detach().to("cpu", copy=True) if torch.is_tensor(t) else t  # noqa: E731
        return {"model": {k: cpu(v) for k, v in self.model.state_dict().items()},
                "opt": [{n: cpu(v) for n, v in st.items()} for st in self._opt_states()],
                "ema": [cpu(p) for p in self.ema.shadow_params] if self.ema is not None else None}

    @torch.no_grad()
    def _restore(self, snap) -> None:
        for k, v in self.model.state_dict().items():
            local(v).copy_(snap["model"][k])
        for st, saved in zip(self._opt_states(), snap["opt"]):
            for n, v in st.items():
                if torch.is_tensor(v):
                    local(v).copy_(saved[n])
                else:
                    st[n] = saved[n]
        if self.ema is not None:
            for shadow, saved in zip(self.ema.shadow_params, snap["ema"]):
                local(shadow).copy_(saved)

    def update(self, step: int, loss: torch.Tensor) -> dict | None:
        """Call after each optimiser step with that step's loss; returns a record when it rolled back."""
        loss = loss.detach().float()
        self.window_sum = loss if self.window_sum is None else self.window_sum + loss
        self.window_n += 1
        if self.window_n < self.every:
            return None
        mean = self.reduce(self.window_sum).item() / self.window_n
        self.window_sum, self.window_n = None, 0
        if math.isfinite(mean) and mean <= self.factor * self.best:
            self.best = min(self.best, mean)
            self.saved = self._snapshot()
            return None
        if self.saved is None or len(self.rollbacks) >= self.max_rollbacks:
            return None
        self._restore(self.saved)
        sched = getattr(self.sched, "scheduler", self.sched)  # accelerate wraps the LR scheduler
        sched.base_lrs = [lr * self.lr_decay for lr in sched.base_lrs]
        record = {"step": step, "rollback": len(self.rollbacks) + 1, "window_loss": mean, "best_window_loss": self.best,
                  "lr_scale": self.lr_decay ** (len(self.rollbacks) + 1)}
        self.rollbacks.append(record)
        return record


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def _safetensors_dtype(path: Path) -> str:
    """The file's tensor dtypes, e.g. "f16" or "f16+i8" (int8 storage: dit/int8_weights.py)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        dtypes = sorted({str(f.get_slice(k).get_dtype()).lower() for k in f.keys()})
    return "+".join(dtypes) if dtypes else "empty"


def write_model_card(folder: Path, *, title: str, summary: str, run: Run, metrics: dict, targets: dict,
                     extra: dict | None = None) -> None:
    """README.md (for people) and card.json (for `ditstudio eval` and doctor) beside the weights."""
    weights = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    dtypes = sorted({_safetensors_dtype(f) for f in folder.rglob("*.safetensors")})
    card = {
        "title": title,
        "size_bytes": weights,
        "command": command_line(),
        "steps": run.args.steps,
        "batch_size": run.args.batch_size,
        "seed": run.args.seed,
        "device": device_name(run.accelerator.device),
        "num_processes": run.accelerator.num_processes,
        "train_seconds": round(run.train_seconds(), 1),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "metrics": metrics,
        "targets": targets,
        **(extra or {}),
    }
    (folder / "card.json").write_text(json.dumps(card, indent=2))
    rows = "\n".join(f"| {k} | {v:.4g} | {targets.get(k, '')} |" if isinstance(v, float) else
                     f"| {k} | {v} | {targets.get(k, '')} |" for k, v in metrics.items())
    (folder / "README.md").write_text(
        f"# {title}\n\n{summary}\n\n"
        f"- weights: {weights / 1e6:.2f} MB ({'/'.join(dtypes)} safetensors)\n"
        f"- trained with: `{card['command']}`\n"
        f"- {card['steps']} steps at batch {card['batch_size']}, seed {card['seed']}, on {card['device']} "
        f"(× {card['num_processes']}), {card['train_seconds']:.0f} s, torch {card['torch']}, {card['date']}\n\n"
        f"## Metrics (held-out, seeded; reproduce with `ditstudio eval --model {folder.name}`)\n\n"
        f"| metric | value | target |\n| --- | --- | --- |\n{rows}\n")
