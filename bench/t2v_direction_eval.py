"""Does a text-to-video model move an object the way its caption says? Samples, not the denoiser (CPU, minutes).

One-object videos moving left, right, up or down (a quarter each) are captioned canonically ("a red circle moving to
the right"), once without and once with the object's starting cell ("a red circle in the top left moving to the
right"), and sampled with the same noise. The analyser tracks the object and classifies its motion
(`shapes.metrics.classify_motion`). Reported per caption form: `direction` (the tracked motion is the captioned one),
`moved` (the object moved at all: left/right/up/down), `still` (classified "none"), and the motion confusion
(captioned -> tracked counts). The shapes world's evaluation (`ditstudio eval`) mixes eight motions and states the
start of 30% of the objects; this isolates the four directions and the effect of stating where an object starts.

    python bench/t2v_direction_eval.py --model weights/shapes-t2v --n 32 --out bench/results/t2v_direction_eval.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dit.evaluation import DEFAULT_SETTINGS, generate_samples  # noqa: E402
from dit.text_pipelines import TextToVideoPipeline  # noqa: E402
from shapes.analyse import analyse_batch  # noqa: E402
from shapes.metrics import track_objects  # noqa: E402
from shapes.scene import MOTIONS, sample_video_scenes  # noqa: E402
from shapes.text import motion_phrase, object_phrase, position_phrase  # noqa: E402

DIRECTIONS = ("left", "right", "up", "down")


def direction_captions(scenes, with_position: bool) -> list[str]:
    """Canonical one-object captions, with or without the starting cell."""
    out = []
    for s in scenes:
        o = s.objects[0]
        text = object_phrase(o.shape, o.colour, o.size)
        if with_position:
            text += " " + position_phrase(o.cell)
        out.append(f"{text} {motion_phrase(o.motion, o.colour, o.colour2)}")
    return out


def tracked_motions(videos: torch.Tensor) -> list[str]:
    """The motion of each video's longest track ("none" if nothing is tracked)."""
    t = videos.shape[1]
    flat = analyse_batch(videos.reshape(-1, *videos.shape[2:]))
    out = []
    for i in range(0, len(flat), t):
        tracks = track_objects(flat[i:i + t])
        if not tracks:
            out.append("none")
            continue
        longest = max(tracks, key=lambda tr: sum(c is not None for c in tr.cx))
        out.append(longest.motion)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "weights" / "shapes-t2v"))
    p.add_argument("--n", type=int, default=32, help="videos per caption form (a quarter per direction)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.n < 4 or args.n % 4:
        p.error("--n must be a positive multiple of 4 (a quarter per direction)")
    torch.manual_seed(args.seed)
    pipe = TextToVideoPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_sampler(DEFAULT_SETTINGS["sampler"])
    motions = np.array([[MOTIONS.index(DIRECTIONS[i % 4])] for i in range(args.n)])
    scenes = sample_video_scenes(np.random.default_rng(args.seed), args.n, 1, 1, motions=motions).to_scenes()
    asked = [s.objects[0].motion for s in scenes]
    result = {"device": "cpu", "torch": torch.__version__, "date": dt.datetime.now().isoformat(timespec="seconds"),
              "command": "python " + shlex.join(sys.argv), "model": args.model, "n": args.n, "seed": args.seed,
              "settings": {k: DEFAULT_SETTINGS[k] for k in ("steps", "cfg", "sampler")}, "forms": {}}
    per_batch = max(1, 64 // pipe.transformer.config.num_frames)
    for form, with_position in (("no_position", False), ("with_position", True)):
        caps = direction_captions(scenes, with_position)
        videos = generate_samples(pipe, caps, per_batch, args.seed, DEFAULT_SETTINGS["steps"], DEFAULT_SETTINGS["cfg"])
        got = tracked_motions(videos)
        result["forms"][form] = {
            "example": caps[0],
            "direction": float(np.mean([g == a for g, a in zip(got, asked)])),
            "moved": float(np.mean([g in DIRECTIONS for g in got])),
            "still": float(np.mean([g == "none" for g in got])),
            "confusion": {a: dict(Counter(g for g, b in zip(got, asked) if b == a)) for a in DIRECTIONS},
        }
        print(form, json.dumps(result["forms"][form]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
