"""Which part of a DyDiT costs its accuracy: one DyDiT folder sampled with `dit.evaluation.evaluate_pipeline` (the
shapes prompts, seed 0, 25 DPM-Solver++ steps, cfg 4) in several variants, each against the same prompts:

    sliced       the folder as shipped (the sliced inference path)
    complete     every gate on (the complete path: full width, every token), its TD-LoRA still applied
    all-tokens   the token routers forced to keep every token (width routing as trained)
    all-width    the head and channel routers forced on (token routing as trained)
    dense        the dense base model alone

Written for the text DyDiT (docs/dydit.md, "Twelfth session"), whose accuracy stays ~30 points under the dense model
even at λ 0.7, where the class model is within 2 points.

    python bench/dydit_router_ablation.py runs/t2i-lora0.7/model --n 96 --out bench/results/dydit_router_ablation.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dit.dydit_io import load_dydit_pipeline, read_config  # noqa: E402
from dit.evaluation import evaluate_pipeline  # noqa: E402

VARIANTS = ("sliced", "complete", "all-tokens", "all-width", "dense")


def variant_pipeline(folder: Path, variant: str):
    """The folder's pipeline changed as `variant` says (a fresh load each time: the changes are in place)."""
    pipe = load_dydit_pipeline(folder)
    if variant == "dense":
        base = (folder / read_config(folder)["base"]).resolve()
        pipe = type(pipe).from_pretrained(base)
    else:
        dydit = pipe.transformer.dydit
        with torch.no_grad():
            for r in dydit.routers:
                if variant == "all-tokens":  # sigmoid(logit / tau) > 0.5 for every token
                    r.token_router[2].bias.add_(100.0)
                elif variant == "all-width":
                    r.head_router.bias.fill_(100.0)
                    r.channel_router.bias.fill_(100.0)
        dydit.clear_cache()
        if variant == "complete":
            forward = dydit.forward
            dydit.forward = lambda *a, mode=None, counter=None, **k: forward(*a, mode="complete", counter=counter, **k)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", help="a DyDiT folder (dit/dydit_io.py)")
    p.add_argument("--n", type=int, default=96, help="prompts per evaluation (per object count for text models)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/dydit_router_ablation.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    read_config(folder)  # a clear error for a folder that is not a DyDiT
    rows = []
    for variant in args.variants:
        pipe = variant_pipeline(folder, variant)
        counter = getattr(pipe.transformer, "counter", None)
        if counter is not None:
            counter.reset()
        t0 = time.perf_counter()
        metrics = evaluate_pipeline(pipe, n=args.n, seed=0)
        row = {"variant": variant, **metrics, "seconds": round(time.perf_counter() - t0, 1),
               "flops_executed": None if counter is None else counter.ratio}
        rows.append(row)
        print(variant, {k: round(v, 3) for k, v in metrics.items() if k.endswith("accuracy")},
              "flops", row["flops_executed"], flush=True)
    result = {"device": f"CPU ({platform.machine()}), {args.threads} threads", "torch": torch.__version__,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(shlex.quote(a) for a in ["python", "bench/dydit_router_ablation.py",
                                                            *(argv if argv is not None else sys.argv[1:])]),
              "folder": str(folder), "rows": rows}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
