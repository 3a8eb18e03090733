"""Dense and DyDiT class-to-image models on the same seeded prompts: prompt accuracy, Fréchet distance to the shipped
real-scene statistics, and the executed / dense FLOPs (spec section 6: accuracy and Fréchet distance against the
executed-FLOPs ratio, same seeds and sampler as dense).

Each model samples the same `--n` class prompts (dit.evaluation.class_prompts, seed 0) with the same noise (25
DPM-Solver++ steps, guidance 4: the app's defaults). The Fréchet distance uses the shapes CLIP image features and the
class-scene reference statistics shipped beside it (`weights/shapes-clip/fid_stats_class_64px.npz`, rendered scenes);
it is biased upwards at small n, so only rows with the same n compare.

    python bench/dydit_quality.py --models shapes-c2i shapes-dydit-c2i --n 480   # bench/results/dydit_quality.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/, first on the path

import torch  # noqa: E402

from app.catalog import resolve_model  # noqa: E402
from app.generate import load_pipeline  # noqa: E402
from dit.evaluation import DEFAULT_SETTINGS, generate_samples, class_prompts  # noqa: E402
from shapes.clip import ShapesCLIP, frechet_to_reference  # noqa: E402
from shapes.metrics import prompt_accuracy  # noqa: E402

CLIP = Path(__file__).resolve().parents[1] / "weights" / "shapes-clip"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["shapes-c2i", "shapes-dydit-c2i"])
    p.add_argument("--n", type=int, default=480)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/dydit_quality.json")
    args = p.parse_args(argv)
    if args.n < 2:
        raise ValueError("--n must be at least 2 (a covariance needs two images)")
    torch.set_num_threads(args.threads)
    clip = ShapesCLIP.from_pretrained(CLIP)
    labels = class_prompts(args.n, 0)
    steps, cfg = DEFAULT_SETTINGS["steps"], DEFAULT_SETTINGS["cfg"]
    rows = []
    for name in args.models:
        pipe = load_pipeline(resolve_model(name).resolve(), "cpu", "float32")
        if type(pipe).__name__ != "ClassToImagePipeline":
            raise ValueError(f"{name}: a {type(pipe).__name__}; this benchmark compares class-to-image models")
        pipe.set_sampler(DEFAULT_SETTINGS["sampler"])
        pipe.set_progress_bar_config(disable=True)
        counter = getattr(pipe.transformer, "counter", None)  # DyDiT: executed and dense MACs
        if counter is not None:
            counter.reset()
        t0 = time.perf_counter()
        images = generate_samples(pipe, labels, args.batch, 0, steps, cfg)
        seconds = time.perf_counter() - t0
        acc = prompt_accuracy(images, labels)
        rows.append({"model": name, "prompt_accuracy": round(acc["accuracy"], 4), "shape": round(acc["shape"], 4),
                     "colour": round(acc["colour"], 4), "count": round(acc["count"], 4),
                     "frechet_distance": round(frechet_to_reference(clip, CLIP, images, "class"), 3),
                     "flops_executed": round(counter.ratio, 4) if counter is not None else 1.0,
                     "sampling_seconds": round(seconds, 1)})
        print(rows[-1], flush=True)
    result = {"device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} threads",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv),
              "settings": {"n": args.n, "seed": 0, "steps": steps, "cfg": cfg, "sampler": DEFAULT_SETTINGS["sampler"],
                           "reference": "weights/shapes-clip/fid_stats_class_64px.npz"}, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| model | executed / dense FLOPs | prompt accuracy | shape / colour / count | Fréchet distance |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['flops_executed']:.3f} | {r['prompt_accuracy']:.3f} | "
              f"{r['shape']:.3f} / {r['colour']:.3f} / {r['count']:.3f} | {r['frechet_distance']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
