"""Guidance / sampler selection for the shipped shapes DiT models, on validation prompts.

The cards evaluate at the app's defaults (25 DPM-Solver++ steps, guidance 4). Small models are often better at
lower guidance (the VAR models were: bench/results/var_sampling_selection.json). Settings are chosen here on
seed-1 prompts (other prompts, other noise than the cards' seed-0 evaluation), so the card's number stays a
held-out measurement. Writes bench/results/dit_sampling_selection.json after every row.

    python bench/dit_sampling_selection.py --model weights/shapes-c2i --cfg 1.5 2 3 4 --n 480 --seed 1
    python bench/dit_sampling_selection.py --model weights/shapes-t2i --transformer resume/shapes-t2i-qknorm/transformer
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit.evaluation import evaluate_pipeline, task_of  # noqa: E402


def load(folder: str, transformer: str | None):
    from dit.pipelines import ClassToImagePipeline
    from dit.text_pipelines import TextToImagePipeline, TextToVideoPipeline

    kind = json.loads((Path(folder) / "card.json").read_text())["eval"]["kind"]
    cls = {"class": ClassToImagePipeline, "text": TextToImagePipeline, "video": TextToVideoPipeline}[kind]
    pipe = cls.from_pretrained(folder)
    if transformer is not None:  # another state of the same architecture (e.g. resume/...) on the folder's VAE
        pipe.transformer = type(pipe.transformer).from_pretrained(transformer, torch_dtype=torch.float32).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--transformer", default=None)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.0])
    ap.add_argument("--samplers", nargs="+", default=["dpm++"])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--n", type=int, default=480)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="bench/results/dit_sampling_selection.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {
        "bench": "guidance / sampler selection for the shipped shapes DiT models (validation prompts)",
        "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)", "torch": torch.__version__,
        "rows": []}
    doc["date"] = time.strftime("%Y-%m-%d %H:%M")
    pipe = load(args.model, args.transformer)
    name = args.transformer or args.model
    for sampler in args.samplers:
        for cfg in args.cfg:
            m = evaluate_pipeline(pipe, n=args.n, seed=args.seed, steps=args.steps, cfg=cfg, sampler=sampler)
            row = {"model": name, "task": task_of(pipe), "command": "python " + " ".join(sys.argv), **m}
            doc["rows"].append(row)
            out.write_text(json.dumps(doc, indent=1))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
