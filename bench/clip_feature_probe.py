"""Linear probes on the shapes-CLIP image tower's features (what LLaVA's projector sees): how much of an object's
colour and place (3×3 cell) a linear map can read from them, mean-pooled and per token. A ceiling check for the
shapes LLaVA's weakest question kinds (docs/llava.md). CPU, ~2 minutes.

    python bench/clip_feature_probe.py --out bench/results/clip_feature_probe.json

`--layers pixels,embed,0,1,2,3` runs the same probes on every layer's patch tokens (CLS dropped): `embed` = after the
patch embedding + positions (+ ln_pre, what block 0 reads), `i` = after block i (negative i counts from the end, as
`feature_layer`: -2 is what LLaVA reads), `pixels` = the raw image mean-pooled per patch (mean RGB of each 8×8
patch, 3 values a token): a sanity ceiling for the probes' targets. Besides the first object's colour and cell (the
default run's targets, which a scene of 2-3 objects leaves ambiguous: "the first object" is a random one of them),
it probes two unambiguous targets: `cell_colour` (for each of the 9 cells, the colour of the object in it or
"empty"; accuracy over the occupied cells, what "what colour is the shape at the top?" needs) and
`single_colour` / `single_cell` (the object of one-object scenes). Probes on all 64 tokens of a block are slow on one
CPU thread: ~6 min with --train 2048 --single-train 1024 --probe-steps 200.

    python bench/clip_feature_probe.py --layers pixels,embed,0,1,2,3 --out bench/results/clip_feature_probe_layers.json
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
from shapes.render import render  # noqa: E402
from shapes.scene import COLOURS, sample_scenes  # noqa: E402
from vlm.llava import ShapesCLIPTower  # noqa: E402

CELLS = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")


def features(tower, seed: int, n: int):
    """Tower features of n captioned scenes and their first object's colour and cell."""
    batch = make_batch("caption", np.random.default_rng(seed), n)
    objs = [batch["scenes"][i].objects[0] for i in range(n)]
    with torch.no_grad():
        f = torch.cat([tower(batch["image"][i:i + 256]) for i in range(0, n, 256)]).float()
    return f, torch.tensor([COLOURS.index(o.colour) for o in objs]), torch.tensor([CELLS.index(o.cell) for o in objs])


def linear_probe(x_tr, y_tr, x_te, y_te, classes: int, steps: int = 400, score_mask=None) -> float:
    """Held-out accuracy of a standardised multinomial logistic regression (Adam, small L2).

    y (n,) for one target, or (n, H) for H independent targets of `classes` classes each (one linear head per
    target column, trained together: the loss is their sum); `score_mask` (n_test, H) bool picks which test
    labels are scored (default all)."""
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    heads = 1 if y_tr.ndim == 1 else y_tr.shape[1]
    w = torch.zeros(x_tr.shape[1], heads * classes, requires_grad=True)
    b = torch.zeros(heads * classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)

    def logits(x):
        z = x @ w + b
        return z if y_tr.ndim == 1 else z.view(-1, heads, classes).transpose(1, 2)  # (n, classes, H)

    for _ in range(steps):
        opt.zero_grad()
        (F.cross_entropy(logits(x_tr), y_tr) * heads + 1e-4 * w.square().sum()).backward()
        opt.step()
    with torch.no_grad():
        right = logits(x_te).argmax(1) == y_te
    if score_mask is not None:
        right = right[score_mask]
    return round(right.float().mean().item(), 4)


# ----------------------------------------------------------------------------------------------- --layers
def parse_layers(spec: str, n_blocks: int) -> list[str]:
    """"pixels,embed,0,1,-2" -> canonical names: pixels, embed, and block indices made non-negative."""
    out = []
    for item in (t.strip() for t in spec.split(",") if t.strip()):
        if item in ("pixels", "embed"):
            out.append(item)
            continue
        try:
            i = int(item)
        except ValueError:
            raise SystemExit(f"--layers: {item!r} is not pixels, embed or a block index") from None
        if not -n_blocks <= i < n_blocks:
            raise SystemExit(f"--layers: block {i} is out of range for a tower of {n_blocks} blocks")
        out.append(str(i % n_blocks))
    return list(dict.fromkeys(out))


@torch.no_grad()
def layer_tokens(clip: ShapesCLIP, images, layers: list[str]) -> dict[str, torch.Tensor]:
    """Patch tokens (B, N, C) of each named layer (CLS dropped) in one pass through the tower."""
    out = {}
    x = clip._prepare(images)
    if "pixels" in layers:
        p = clip.config.patch_size
        out["pixels"] = F.avg_pool2d(x, p).flatten(2).transpose(1, 2)  # (B, N, 3): mean RGB of each patch
    v = clip.model.visual
    h = v._embeds(x)
    if "embed" in layers:
        out["embed"] = h[:, 1:]
    last = max((int(k) for k in layers if k not in ("pixels", "embed")), default=-1)
    for i, blk in enumerate(v.transformer.resblocks[: last + 1]):
        h = blk(h)
        if str(i) in layers:
            out[str(i)] = h[:, 1:]
    return {k: out[k].float() for k in layers}


def scenes_for(kind: str, seed: int, n: int):
    """Scenes + images of a probe set: "caption" (1-3 objects, as LLaVA's pool) or "single" (one object)."""
    if kind == "caption":
        batch = make_batch("caption", np.random.default_rng(seed), n)
        return batch["scenes"], batch["image"]
    b = sample_scenes(np.random.default_rng([seed, 1]), n, min_objects=1, max_objects=1)
    return b, render(b, 64)


def targets(b) -> dict[str, torch.Tensor]:
    """first-object colour / cell, and the per-cell colour map (n, 9) with len(COLOURS) = empty."""
    cell_colour = np.full((len(b), len(CELLS)), len(COLOURS), np.int64)
    rows, slots = np.nonzero(b.valid)
    cell_colour[rows, b.cell[rows, slots]] = b.colour[rows, slots]
    return dict(colour=torch.as_tensor(b.colour[:, 0].astype(np.int64)), cell=torch.as_tensor(b.cell[:, 0].astype(np.int64)),
                cell_colour=torch.as_tensor(cell_colour))


def layers_main(args, clip: ShapesCLIP) -> dict:
    layers = parse_layers(args.layers, len(clip.model.visual.transformer.resblocks))
    sets = {}
    for kind, n_tr, n_te in (("caption", args.train, args.test), ("single", args.single_train, args.single_test)):
        parts = []
        for seed, n in ((1, n_tr), (2, n_te)):
            b, images = scenes_for(kind, seed, n)
            toks = [layer_tokens(clip, images[i:i + 256], layers) for i in range(0, n, 256)]
            parts.append(({k: torch.cat([t[k] for t in toks]) for k in layers}, targets(b)))
        sets[kind] = parts
    result = {}
    for name in layers:
        (f_tr, y_tr), (f_te, y_te) = sets["caption"]
        (s_tr, z_tr), (s_te, z_te) = sets["single"]
        res = {}
        for view, reduce in (("mean_pooled", lambda f: f.mean(1)), ("all_tokens", lambda f: f.flatten(1))):
            tr, te = reduce(f_tr[name]), reduce(f_te[name])
            occupied = y_te["cell_colour"] < len(COLOURS)
            res[view] = dict(
                colour=linear_probe(tr, y_tr["colour"], te, y_te["colour"], len(COLOURS), args.probe_steps),
                cell=linear_probe(tr, y_tr["cell"], te, y_te["cell"], len(CELLS), args.probe_steps),
                cell_colour=linear_probe(tr, y_tr["cell_colour"], te, y_te["cell_colour"], len(COLOURS) + 1,
                                         args.probe_steps, score_mask=occupied))
            tr, te = reduce(s_tr[name]), reduce(s_te[name])
            res[view].update(
                single_colour=linear_probe(tr, z_tr["colour"], te, z_te["colour"], len(COLOURS), args.probe_steps),
                single_cell=linear_probe(tr, z_tr["cell"], te, z_te["cell"], len(CELLS), args.probe_steps))
            print(name, view, res[view], flush=True)
        result[name] = dict(features=list(f_tr[name].shape[1:]), **res)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clip", default=str(REPO / "weights" / "shapes-clip"))
    p.add_argument("--train", type=int, default=4096)
    p.add_argument("--test", type=int, default=1024)
    p.add_argument("--out", default=None)
    p.add_argument("--layers", default=None,
                   help="comma list of pixels, embed, block indices (e.g. pixels,embed,0,1,2,3): probe every layer's "
                        "patch tokens (default: only the tower's LLaVA features, layer -2, first-object targets)")
    p.add_argument("--single-train", type=int, default=2048, help="--layers: one-object training scenes")
    p.add_argument("--single-test", type=int, default=512, help="--layers: one-object held-out scenes")
    p.add_argument("--probe-steps", type=int, default=400, help="--layers: Adam steps per probe")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.layers is not None:
        clip = ShapesCLIP.from_pretrained(args.clip).eval()
        result = layers_main(args, clip)
        if args.out:
            Path(args.out).write_text(json.dumps(dict(
                date=dt.date.today().isoformat(), torch=torch.__version__, device="CPU", threads=torch.get_num_threads(),
                command=" ".join(shlex.quote(a) for a in ["python", *sys.argv]),
                samples=dict(caption_train=args.train, caption_test=args.test, single_train=args.single_train,
                             single_test=args.single_test, probe_steps=args.probe_steps),
                targets=dict(colour="first object's colour (1-3 objects: ambiguous when 2-3)",
                             cell="first object's 3x3 cell (ambiguous likewise)",
                             cell_colour="per cell: colour of its object or empty; accuracy over occupied cells",
                             single_colour="one-object scenes: the object's colour",
                             single_cell="one-object scenes: the object's cell"),
                chance=dict(colour=round(1 / len(COLOURS), 4), cell=round(1 / len(CELLS), 4)),
                llava_feature_layer=dict(index=-2, block=str(len(clip.model.visual.transformer.resblocks) - 2)),
                layers=result), indent=1) + "\n")
        return 0
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
