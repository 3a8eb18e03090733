"""Linear probes on the shapes-CLIP image tower's features (what LLaVA's projector sees): how much of an object's
colour and place (3×3 cell) a linear map can read from them, mean-pooled and per token. A ceiling check for the
shapes LLaVA's weakest question kinds (docs/llava.md). CPU, ~2 minutes.

    python bench/clip_feature_probe.py --out bench/results/clip_feature_probe.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from shapes.clip import ShapesCLIP  # noqa: E402
from shapes.data import make_batch  # noqa: E402
from shapes.scene import COLOURS  # noqa: E402
from vlm.llava import ShapesCLIPTower  # noqa: E402

CELLS = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")


def features(tower, seed: int, n: int):
    """Tower features of n captioned scenes and their first object's colour and cell."""
    batch = make_batch("caption", np.random.default_rng(seed), n)
    objs = [batch["scenes"][i].objects[0] for i in range(n)]
    with torch.no_grad():
        f = torch.cat([tower(batch["image"][i:i + 256]) for i in range(0, n, 256)]).float()
    return f, torch.tensor([COLOURS.index(o.colour) for o in objs]), torch.tensor([CELLS.index(o.cell) for o in objs])


def linear_probe(x_tr, y_tr, x_te, y_te, classes: int, steps: int = 400) -> float:
    """Held-out accuracy of a standardised multinomial logistic regression (Adam, small L2)."""
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    w = torch.zeros(x_tr.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        (F.cross_entropy(x_tr @ w + b, y_tr) + 1e-4 * w.square().sum()).backward()
        opt.step()
    return round(((x_te @ w + b).argmax(1) == y_te).float().mean().item(), 4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clip", default=str(REPO / "weights" / "shapes-clip"))
    p.add_argument("--train", type=int, default=4096)
    p.add_argument("--test", type=int, default=1024)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    tower = ShapesCLIPTower(ShapesCLIP.from_pretrained(args.clip).eval())
    f_tr, c_tr, p_tr = features(tower, 1, args.train)
    f_te, c_te, p_te = features(tower, 2, args.test)
    result = {}
    for name, tr, te in (("mean_pooled", f_tr.mean(1), f_te.mean(1)), ("all_tokens", f_tr.flatten(1), f_te.flatten(1))):
        result[name] = dict(colour=linear_probe(tr, c_tr, te, c_te, len(COLOURS)),
                            cell=linear_probe(tr, p_tr, te, p_te, len(CELLS)))
        print(name, result[name])
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            date=dt.date.today().isoformat(), torch=torch.__version__, device="cpu",
            command=" ".join(shlex.quote(a) for a in ["python", *sys.argv]), features=list(f_tr.shape[1:]),
            chance=dict(colour=round(1 / len(COLOURS), 4), cell=round(1 / len(CELLS), 4)), probes=result), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
