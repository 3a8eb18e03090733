"""Sampling-settings / model selection for the shipped shapes VAR models, on validation prompts.

Appends one row per (model, setting) to bench/results/var_sampling_selection.json (the protocol is written there:
choose on seed-1 prompts, then evaluate the chosen model and setting once on the card's seed-0 prompts).

    python bench/var_sampling_selection.py --model /tmp/r1/weights/shapes-var-c2i --label "call R c2i" \
        --seed 1 --cfg 2.0 --top-p 0.8
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.var_pipeline import VARPipeline, evaluate_var  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--label", required=True, help="how the row names the model (which call, shipped or not)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--cfg", type=float, nargs="+", default=[2.0])
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=0.0)
    ap.add_argument("--held-out", action="store_true", help="mark the row as the one held-out evaluation")
    ap.add_argument("--out", default="bench/results/var_sampling_selection.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    doc = json.loads(out.read_text())
    pipe = VARPipeline.from_pretrained(args.model)
    for cfg in args.cfg:
        t0 = time.perf_counter()
        m = evaluate_var(pipe, n=args.n, seed=args.seed, guidance_scale=cfg, top_k=args.top_k, top_p=args.top_p)
        keys = [k for k in ("prompt_accuracy", "one_object_accuracy", "two_object_accuracy", "count",
                            "one_object_count") if k in m]
        name = f"{'HELD-OUT ' if args.held_out else ''}{args.label} seed {args.seed} cfg {cfg} top_p {args.top_p}"
        row = {"run": name, "metrics": {k: round(float(m[k]), 4) for k in keys},
               "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
               "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1)}
        doc = json.loads(out.read_text())  # re-read: another run may have appended meanwhile
        doc["rows"].append(row)
        out.write_text(json.dumps(doc, indent=2))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
