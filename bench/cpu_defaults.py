"""CPU time of the shipped DiT defaults at the app's default settings: 64 px, 25 DPM-Solver++ steps, guidance 4.0
(batched cond + uncond), one sample, torch limited to `--threads` (2: the project's reference laptop / CI machine).

Times: loading the pipeline folder (cold, from disk), the first sample after loading (what a user waits for) and
the median of `--reps` further samples, and the transformer's share. Writes JSON to bench/results/ and prints a
Markdown table for docs/benchmarks.md.

    python bench/cpu_defaults.py --threads 2 --out bench/results/cpu_defaults.json
    python bench/cpu_defaults.py --models shapes-c2i shapes-dydit-c2i --batch 8 --out bench/results/cpu_dydit_b8.json

A DyDiT folder (shapes-dydit-c2i) runs through the same pipeline call; its rows add the executed / dense FLOPs of the
timed samples (the DyDiT transformer's MAC counter), so dense and DyDiT compare at equal settings.
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

from app.generate import load_pipeline, model_kind  # noqa: E402
from app.catalog import resolve_model  # noqa: E402

MODELS = ("shapes-c2i", "shapes-t2i", "shapes-t2v", "shapes-dydit-c2i")
PROMPT = {"class": None, "text": "a red star in the top left and a big blue circle",
          "video": "a video of a green heart moving right"}


def sample(pipe, kind: str, steps: int, cfg: float, seed: int, batch: int = 1):
    gen = torch.Generator("cpu").manual_seed(seed)
    if kind == "class":
        return pipe([7 + i for i in range(batch)], num_inference_steps=steps, guidance_scale=cfg, generator=gen,
                    output_type="np")
    return pipe([PROMPT[kind]] * batch, num_inference_steps=steps, guidance_scale=cfg, generator=gen,
                output_type="np")


def time_transformer(pipe):
    """Wrap the transformer's forward to add up its wall time."""
    spent = {"s": 0.0, "calls": 0}
    forward = pipe.transformer.forward

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = forward(*a, **k)
        spent["s"] += time.perf_counter() - t0
        spent["calls"] += 1
        return out

    pipe.transformer.forward = timed
    return spent


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="bench/results/cpu_defaults.json")
    p.add_argument("--models", nargs="+", default=list(MODELS), help="shipped names (absent folders are skipped)")
    p.add_argument("--batch", type=int, default=1, help="samples per pipeline call")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        try:
            folder = resolve_model(name).resolve()
        except (FileNotFoundError, ValueError) as exc:
            print(f"skipping {name}: {exc}", flush=True)
            continue
        t0 = time.perf_counter()
        pipe = load_pipeline(folder, "cpu", "float32")
        pipe.set_sampler("dpm++")
        pipe.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - t0
        kind = model_kind(str(folder))
        spent = time_transformer(pipe)
        t0 = time.perf_counter()
        sample(pipe, kind, args.steps, args.cfg, 0, args.batch)
        first_s = time.perf_counter() - t0
        spent.update(s=0.0, calls=0)
        counter = getattr(pipe.transformer, "counter", None)  # DyDiT: executed and dense MACs
        if counter is not None:
            counter.reset()
        times = []
        for r in range(args.reps):
            t0 = time.perf_counter()
            sample(pipe, kind, args.steps, args.cfg, r + 1, args.batch)
            times.append(time.perf_counter() - t0)
        params = sum(p.numel() for p in pipe.transformer.parameters())
        rows.append({"model": name, "kind": kind, "params": params, "load_s": round(load_s, 3),
                     "first_sample_s": round(first_s, 3), "median_sample_s": round(statistics.median(times), 3),
                     "transformer_share": round(spent["s"] / sum(times), 3),
                     "frames": getattr(pipe.transformer.config, "num_frames", 1), "batch": args.batch,
                     **({"flops_executed": round(counter.ratio, 4)} if counter is not None else {})})
        print(rows[-1], flush=True)
    result = {"device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} threads",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv),
              "settings": {"size": 64, "steps": args.steps, "cfg": args.cfg, "sampler": "dpm++", "batch": args.batch},
              "target": "first image within 5 s on a 2-core CPU", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nBatch {args.batch} per call.\n\n| model | kind | parameters | load (s) | first call (s) | "
          "next calls, median (s) | transformer share | executed / dense FLOPs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        what = f"{r['kind']} ({r['frames']} frames)" if r["kind"] == "video" else r["kind"]
        print(f"| {r['model']} | {what} | {r['params'] / 1e6:.2f} M | {r['load_s']:.2f} | {r['first_sample_s']:.2f} | "
              f"{r['median_sample_s']:.2f} | {r['transformer_share']:.0%} | {r.get('flops_executed', 1)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
