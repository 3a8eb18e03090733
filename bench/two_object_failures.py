"""Why a text-to-image model misses two-object captions: each sample sorted into one failure kind, so that the next
training run can aim at it (issue 5: shapes-t2i scores about 0.9 on one object and 0.2 on two).

Samples the model on `--n` seeded two-object captions (dit.evaluation.caption_prompts, the cards' evaluation set;
25 DPM-Solver++ steps, guidance 4), reads the images with the shapes analyser and sorts every sample, first match
wins:
  count           the analyser does not find exactly two objects (reported with how many it found);
  leak            two objects, but both share a colour or a shape that the caption gives to only one of them (an
                  attribute of one object spilled onto the other);
  swap            two objects whose shapes and colours are the caption's, paired the other way round;
  wrong attribute two objects, some shape or colour not asked for at all;
  position        both objects right in shape and colour, but a stated cell or relation is wrong;
  size            all of the above right, a stated size wrong;
  right           everything stated is right (what prompt accuracy counts).

    python bench/two_object_failures.py --model shapes-t2i --n 192   # bench/results/two_object_failures.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/, first on the path

import torch  # noqa: E402

from app.catalog import resolve_model  # noqa: E402
from app.generate import load_pipeline  # noqa: E402
from dit.evaluation import DEFAULT_SETTINGS, generate_samples, caption_prompts  # noqa: E402
from shapes.analyse import analyse_batch  # noqa: E402
from shapes.metrics import score_sample  # noqa: E402
from shapes.text import as_parsed  # noqa: E402

KINDS = ("count", "leak", "swap", "wrong attribute", "position", "size", "right")


def failure_kind(dets, spec) -> str:
    """One of KINDS for the detections of one image and its parsed two-object caption."""
    if len(dets) != 2:
        return "count"
    want = [(o.shape, o.colour) for o in spec.objects]
    got = [(d.shape, d.colour) for d in dets]
    for k in (0, 1):  # attribute k (0 shape, 1 colour) stated for both objects and different, but drawn twice
        asked = [w[k] for w in want]
        drawn = [g[k] for g in got]
        if None not in asked and asked[0] != asked[1] and drawn[0] == drawn[1] and drawn[0] in asked:
            return "leak"
    matches = lambda a, b: all(x is None or x == y for x, y in zip(a, b))  # noqa: E731
    straight = matches(want[0], got[0]) and matches(want[1], got[1])
    crossed = matches(want[0], got[1]) and matches(want[1], got[0])
    if not (straight or crossed):
        shapes_ok = sorted(str(w[0]) for w in want if w[0]) == sorted(str(g[0]) for g, w in zip(got, want) if w[0])
        colours_ok = sorted(str(w[1]) for w in want if w[1]) == sorted(str(g[1]) for g, w in zip(got, want) if w[1])
        return "swap" if shapes_ok and colours_ok else "wrong attribute"
    score = score_sample(dets, spec)
    if not all(score.attrs.get("cell", [])) or not all(score.attrs.get("relation", [])):
        return "position"
    if not all(score.attrs.get("size", [])):
        return "size"
    return "right" if score.correct else "position"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="shapes-t2i")
    p.add_argument("--n", type=int, default=192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/two_object_failures.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(resolve_model(args.model).resolve(), "cpu", "float32")
    if type(pipe).__name__ != "TextToImagePipeline":
        raise ValueError(f"{args.model}: a {type(pipe).__name__}; this check reads text-to-image models")
    pipe.set_sampler(DEFAULT_SETTINGS["sampler"])
    pipe.set_progress_bar_config(disable=True)
    prompts = caption_prompts(args.n, 2, args.seed)
    t0 = time.perf_counter()
    images = generate_samples(pipe, prompts, args.batch, args.seed, DEFAULT_SETTINGS["steps"], DEFAULT_SETTINGS["cfg"])
    dets = analyse_batch(images)
    kinds = [failure_kind(d, as_parsed(c)) for d, c in zip(dets, prompts)]
    found = Counter(len(d) for d, k in zip(dets, kinds) if k == "count")
    shares = {k: round(kinds.count(k) / len(kinds), 4) for k in KINDS}
    examples = {k: [prompts[i] for i, x in enumerate(kinds) if x == k][:3] for k in KINDS}
    result = {"device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} threads",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv), "model": args.model,
              "n": args.n, "seed": args.seed, "settings": DEFAULT_SETTINGS, "shares": shares,
              "objects_found_when_count_fails": dict(sorted(found.items())), "examples": examples,
              "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| failure | share |\n|---|---|")
    for k in KINDS:
        print(f"| {k} | {shares[k]:.3f} |")
    print("objects found when the count is wrong:", dict(sorted(found.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
