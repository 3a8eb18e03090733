"""Training throughput of DiT-XL/2 at 256 px on one GPU, ours against diffusers' `DiTTransformer2DModel` with the
same random weights, in one run (issue 6, "Training at scale"). Not a test.

One training step = the DDPM objective with learned σ (dit.objectives, as scripts/train_dit.py trains) on a global
batch of `--batch` latents, bf16 autocast, fused AdamW, gradient clipping; the batch is split into micro-batches
(gradient accumulation) and blocks may be recomputed in the backward pass (gradient checkpointing), per variant:

    python bench/train_dit_speed.py --out bench/results/train_dit_speed.json
    python bench/train_dit_speed.py --variants ours:64:ckpt,ours:256:ckpt --merge
    python bench/train_dit_speed.py --smoke --out /tmp/train_smoke.json    # tiny sizes, CPU

A variant is IMPL:MICRO_BATCH[:ckpt][:compile]. Reported per variant: img/s, MFU (FLOPs of forward + backward of
one micro-batch counted by FlopCounterMode, × micro-batches / step time / the GPU's dense bf16 peak), peak memory;
a variant that does not fit is recorded as out of memory.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench/attention.py would shadow the attention package

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.sample_dit import PEAK_BF16, SMOKE, XL, device_name, randomize_  # noqa: E402
from dit.objectives import DDPMObjective  # noqa: E402

CONFIG = dict(XL, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
SMOKE_CONFIG = dict(SMOKE, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
DEFAULT_VARIANTS = "diffusers:32,diffusers:64,diffusers:64:ckpt,ours:32,ours:64,ours:64:ckpt,ours:128:ckpt," \
                   "ours:256:ckpt,ours:64:compile,ours:128:ckpt:compile"


_BUILT: dict[tuple[str, str], torch.nn.Module] = {}  # (impl, config) -> the random model, float32 on the CPU


def build(impl: str, config: dict, device):
    """A fresh copy of the random model: built once per (impl, config) on the CPU (at XL, diffusers' init, the
    random weights and the conversion to ours take 15-30 s of CPU time) and copied for every variant."""
    from diffusers import DiTTransformer2DModel

    from dit.loaders import dit_from_diffusers

    key = (impl, json.dumps(config, sort_keys=True))
    if key not in _BUILT:
        theirs_key = ("diffusers", key[1])
        if theirs_key not in _BUILT:
            _BUILT[theirs_key] = DiTTransformer2DModel(**config)
            randomize_(_BUILT[theirs_key], 0)
        if impl == "ours":
            _BUILT[key] = dit_from_diffusers(_BUILT[theirs_key])
    return copy.deepcopy(_BUILT[key]).to(device).train()


def model_fn(impl: str, model):
    if impl == "diffusers":
        return lambda x, t, y: model(x, timestep=t, class_labels=y).sample
    return lambda x, t, y: model(x, t, y)


def measure(args, variant: str, config: dict, device) -> dict:
    impl, micro, *flags = variant.split(":")
    micro = int(micro)
    if impl not in ("ours", "diffusers") or args.batch % micro or set(flags) - {"ckpt", "compile"}:
        raise ValueError(f"bad variant {variant!r}: IMPL (ours|diffusers):MICRO (divides --batch {args.batch})"
                         f"[:ckpt][:compile]")
    row = {"variant": variant, "impl": impl, "micro_batch": micro, "accumulation": args.batch // micro,
           "gradient_checkpointing": "ckpt" in flags, "compile": "compile" in flags, "batch": args.batch}
    model = build(impl, config, device)
    objective = DDPMObjective()
    S, C = config["sample_size"], config["in_channels"]
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(args.batch, C, S, S, device=device, generator=g)
    y = torch.randint(0, 1000, (args.batch,), device=device, generator=g)
    accum = args.batch // micro
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    # FLOPs per image of forward + backward, counted on the plain eager model before checkpointing and compiling
    # (recomputation by checkpointing is overhead, not model FLOPs: MFU is the model's FLOPs over time), on a few
    # images: the count is linear in the batch, and a large micro-batch run without checkpointing does not fit (the
    # H100's micro-batch-256 checkpointed rows ran out of memory in this count on all 256 images, 2026-11-24: about
    # 100 GiB of activations, from the 64-image rows' peak)
    n = min(micro, 8)
    with FlopCounterMode(display=False) as counter, autocast:
        objective(model_fn(impl, model), x0[:n], y[:n], g)["loss"].backward()
    model.zero_grad(set_to_none=True)
    row["train_gflop_per_image"] = round(counter.get_total_flops() / n / 1e9, 4)
    if "ckpt" in flags:
        model.enable_gradient_checkpointing()
    fn = model_fn(impl, torch.compile(model) if "compile" in flags else model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        for m in range(accum):
            rows = slice(m * micro, (m + 1) * micro)
            with autocast:
                loss = objective(fn, x0[rows], y[rows], g)["loss"] / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    row["warmup_s"] = round(time.perf_counter() - t0, 1)
    times = []
    for _ in range(args.steps):
        t1 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t1)
    step_s = statistics.median(times)
    row.update(step_s=round(step_s, 4), img_per_s=round(args.batch / step_s, 2))
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    peak = next((v for k, v in PEAK_BF16.items() if k in device_name(device)), None)
    if peak:
        row["mfu"] = round(row["train_gflop_per_image"] * 1e9 * row["img_per_s"] / peak, 4)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/train_dit_speed.json")
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--batch", type=int, default=256, help="global batch per optimiser step")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--merge", action="store_true")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = SMOKE_CONFIG if args.smoke else CONFIG
    if args.smoke:
        args.batch = min(args.batch, 8)
    out = Path(args.out)
    result = json.loads(out.read_text()) if args.merge and out.is_file() else {"rows": []}
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    result["commands"] = result.get("commands", []) + [command]  # with --merge, every run that added rows
    result.update(device=device_name(device), date=dt.date.today().isoformat(), torch=torch.__version__,
                  command=command, config=config, smoke=args.smoke)
    for variant in args.variants.split(","):
        try:
            row = measure(args, variant, config, device)
        except torch.cuda.OutOfMemoryError as e:
            row = {"variant": variant, "error": f"out of memory: {str(e).splitlines()[0]}"}
        torch.cuda.empty_cache() if device.type == "cuda" else None
        result["rows"] = [r for r in result["rows"] if r["variant"] != variant] + [row]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
