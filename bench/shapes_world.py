"""Shapes-world throughput and analyser agreement: single-thread generation speed per kind (target >= 1,000
64-px images a second on one CPU core) and the analyser against ground truth, clean and with blur + noise
(target >= 98%). Writes bench/results/shapes_world.json (device, date, torch, command).

    python bench/shapes_world.py [--device cuda] [--n 1000]
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from shapes.data import KINDS, eval_set, generation_speed, render_speed
from shapes.metrics import analyser_agreement, degrade


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "shapes_world.json"))
    args = p.parse_args(argv)
    speed = {"render_only_64px": render_speed(64, threads=1)}
    for kind in KINDS:
        size = 256 if kind == "tiny" else 64
        speed[f"{kind}_{size}px"] = generation_speed(kind, size, batch=250 if kind == "tiny" else 1000)
    agreement = {}
    for size in (32, 64, 128, 256):
        d = eval_set("caption", args.n, seed=0, size=size)
        agreement[f"{size}px"] = {"clean": analyser_agreement(d["image"], d["scenes"])["accuracy"],
                                  "blur0.7_noise4": analyser_agreement(degrade(d["image"], 0.7, 4.0), d["scenes"])["accuracy"]}
    result = {
        "device": f"CPU ({platform.processor() or platform.machine()}), 1 thread for speed",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
        "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv),
        "speed_per_s_single_thread": {k: round(v) for k, v in speed.items()},
        "analyser_agreement_n": args.n, "analyser_agreement": agreement,
        "targets": {"speed": ">= 1000 img/s at 64 px on one core", "agreement": ">= 0.98 clean and with blur+noise"},
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
