"""TD-LoRA folded into each step's weights (`DyDiT.fold_td_lora`) against the low-rank path, on a shipped DyDiT: the
same seeded samples from both, their largest pixel difference, the executed / dense MACs with and without the
overheads (routers, TD-LoRA), and the sampling time, the two variants alternating in one process.

The app's defaults (25 DPM-Solver++ steps, guidance 4); batch 1 is the app's latency, larger batches the
evaluation's throughput. A variant's first run plans the steps (and, folded, merges the adapters once per timestep
value); it is timed apart as `first_seconds`, the later runs (two rounds of `--repeats`) give `seconds` (median).

    python bench/dydit_fold.py --model shapes-dydit-c2i --batches 1 16 --repeats 3   # bench/results/dydit_fold.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/, first on the path

import torch  # noqa: E402

from app.catalog import resolve_model  # noqa: E402
from app.generate import load_pipeline  # noqa: E402
from dit.dydit import FOLD_BUDGET_BYTES  # noqa: E402
from dit.evaluation import (DEFAULT_SETTINGS, caption_prompts, class_prompts, generate_samples, task_of,  # noqa: E402
                            video_prompts)

VARIANTS = {"low-rank": 0, "folded": FOLD_BUDGET_BYTES}  # fold_td_lora's budget for each


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="shapes-dydit-c2i", help="a DyDiT with TD-LoRA: a catalog name or a folder")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant and batch, after the first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/dydit_fold.json")
    args = p.parse_args(argv)
    if args.repeats < 1 or min(args.batches) < 1:
        raise ValueError("--repeats and --batches must be at least 1")
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(resolve_model(args.model).resolve(), "cpu", "float32")
    dydit = getattr(pipe.transformer, "dydit", None)
    if dydit is None or dydit.lora is None:
        raise ValueError(f"{args.model}: not a DyDiT with TD-LoRA adapters; nothing to fold")
    pipe.set_sampler(DEFAULT_SETTINGS["sampler"])
    pipe.set_progress_bar_config(disable=True)
    steps, cfg = DEFAULT_SETTINGS["steps"], DEFAULT_SETTINGS["cfg"]
    task = task_of(pipe)
    counter = pipe.transformer.counter
    rows = []
    for batch in args.batches:
        prompts = {"class": lambda: class_prompts(batch, 0), "text": lambda: caption_prompts(batch, 1, 0),
                   "video": lambda: video_prompts(batch, 0)}[task]()
        times = {v: [] for v in VARIANTS}
        first, images, ratios = {}, {}, {}
        # Two rounds, the variants in turn (A B, then B A), so that drift on a shared CPU hits both alike; switching
        # drops the cached plans, so each variant's first run of a round plans (and folds) again and is not timed.
        for order in (list(VARIANTS), list(VARIANTS)[::-1]):
            for name in order:
                dydit.fold_td_lora(VARIANTS[name])
                for rep in range(args.repeats + 1):
                    counter.reset()
                    t0 = time.perf_counter()
                    out = generate_samples(pipe, prompts, batch, 0, steps, cfg)
                    seconds = time.perf_counter() - t0
                    if rep:
                        times[name].append(round(seconds, 3))
                    elif name not in first:
                        first[name], images[name] = seconds, out
                        ratios[name] = (counter.ratio, counter.ratio_with_overheads)
        diff = int((images["folded"].int() - images["low-rank"].int()).abs().max())
        for name in VARIANTS:
            rows.append({"batch": batch, "variant": name, "first_seconds": round(first[name], 3),
                         "seconds": round(statistics.median(times[name]), 3), "runs": times[name],
                         "flops_executed": round(ratios[name][0], 4),
                         "flops_with_overheads": round(ratios[name][1], 4), "max_pixel_difference": diff})
            print(rows[-1], flush=True)
    result = {"device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} threads",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv),
              "model": args.model, "task": task,
              "settings": {"seed": 0, "steps": steps, "cfg": cfg, "sampler": DEFAULT_SETTINGS["sampler"]},
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| batch | variant | s per run (median) | first run | executed / dense | + overheads | max pixel diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['variant']} | {r['seconds']:.3f} | {r['first_seconds']:.3f} | "
              f"{r['flops_executed']:.3f} | {r['flops_with_overheads']:.3f} | {r['max_pixel_difference']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
