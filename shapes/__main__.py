"""Command line: ``python -m shapes speed | agreement | docs``.

- ``speed``: single-thread generation throughput per kind (images, or video frames, per second).
- ``agreement``: the analyser's agreement with the generator's ground truth, clean and with blur + noise, at
  several resolutions, and on the high-resolution tiny-object scenes.
- ``docs``: regenerate the example images of docs/shapes.md under docs/img/shapes/ and print the captions and
  questions shown there.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch


def _speed(args) -> None:
    from .data import KINDS, generation_speed, render_speed

    print(f"torch {torch.__version__}, 1 thread")
    print(f"render only  {args.size:>3} px: {render_speed(args.size, threads=1):8.0f} img/s")
    for kind in KINDS:
        size = 256 if kind == "tiny" else args.size
        unit = "frames/s" if kind == "video" else "img/s"
        speed = generation_speed(kind, size, batch=250 if kind == "tiny" else 1000)
        print(f"{kind:<12} {size:>3} px: {speed:8.0f} {unit}")


def _agreement(args) -> None:
    from .data import eval_set
    from .metrics import analyser_agreement, degrade

    def report(name, d, n):
        clean = analyser_agreement(d["image"], d["scenes"])["accuracy"]
        noisy = analyser_agreement(degrade(d["image"], 0.7, 4.0), d["scenes"])["accuracy"]
        print(f"{name:<12} clean {clean:.4f}  blur 0.7 + noise 4: {noisy:.4f}  ({n} scenes)")

    for size in args.sizes:
        report(f"{size} px", eval_set("caption", args.n, seed=args.seed, size=size), args.n)
    report("tiny 256 px", eval_set("tiny", args.n // 4, seed=args.seed), args.n // 4)


def _save(img_hwc: np.ndarray, path: str, scale: int = 1, colours: int | None = 256) -> None:
    from PIL import Image

    im = Image.fromarray(img_hwc)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    if colours:
        im = im.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    im.save(path, optimize=True)


def _grid(images: torch.Tensor, cols: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """(N, 3, H, W) uint8 -> one (rows*(H+pad)-pad, cols*(W+pad)-pad, 3) mosaic."""
    n, _, h, w = images.shape
    rows = (n + cols - 1) // cols
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, 3), fill, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = images[i].permute(1, 2, 0).numpy()
    return out


def _docs(args) -> None:
    from PIL import Image

    from . import control as C
    from .data import make_batch
    from .render import render, render_video
    from .scene import MOTIONS, NUM_CLASSES, sample_class_scenes, sample_scenes, sample_tiny_scenes, sample_video_scenes
    from .text import caption, video_caption
    from .vqa import QUESTION_KINDS, make_question

    out = args.out
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(2024)

    # 1. the 48 classes: rows = shapes, columns = colours, all on flat backgrounds
    b = sample_class_scenes(rng, labels=np.arange(NUM_CLASSES), backgrounds=0)
    _save(_grid(render(b, 64), 8), f"{out}/classes.png")

    # 2. captioned samples (2x) with paraphrased captions
    b = sample_scenes(rng, 8)
    _save(_grid(render(b, 64), 8), f"{out}/samples.png", scale=2)
    print("## samples.png captions (canonical | paraphrase)")
    for i in range(len(b)):
        print(f"| {i + 1} | {caption(b[i])} | {caption(b[i], rng)} |")

    # 3. one scene at every resolution, shown at 256 px
    b = sample_scenes(np.random.default_rng(7), 1, 3, 3, shapes=[[3, 5, 2]], colours=[[0, 3, 2]], backgrounds=1)
    ims = [render(b, s)[0] for s in (32, 64, 128, 256)]
    ims = [torch.nn.functional.interpolate(i[None].float(), size=256, mode="nearest")[0].to(torch.uint8) for i in ims]
    _save(_grid(torch.stack(ims), 4, pad=4), f"{out}/resolutions.png")

    # 4. videos: GIF of 4 videos side by side (2x) and a frame strip of the first
    pairs = (("right", "grow"), ("bounce", "recolour"), ("down", "left"), ("up", "shrink"))
    motions = [[MOTIONS.index(m) for m in pair] for pair in pairs]
    vb = sample_video_scenes(np.random.default_rng(11), 4, 2, 2, motions=np.array(motions))
    v = render_video(vb, 12, 64)
    d = {"scenes": vb}
    frames = [Image.fromarray(_grid(v[:, t], 4, pad=2)).resize((4 * 66 * 2 - 4, 128), Image.NEAREST) for t in range(12)]
    tall = Image.new("RGB", (frames[0].width, frames[0].height * len(frames)))
    for t, f in enumerate(frames):
        tall.paste(f, (0, t * f.height))
    pal = tall.quantize(255, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)  # one palette, all frames
    frames = [f.quantize(palette=pal, dither=Image.Dither.NONE) for f in frames]
    frames[0].save(f"{out}/video.gif", save_all=True, append_images=frames[1:], duration=150, loop=0, optimize=True)
    _save(_grid(v[0], 12), f"{out}/video_strip.png")
    print("## video.gif captions")
    for s in d["scenes"].to_scenes():
        print(f"- {video_caption(s)}")

    # 5. control maps: image | edges | seg | boxes for 3 scenes (2x)
    b = sample_scenes(np.random.default_rng(5), 3, 2, 3)
    cm = C.control_maps(b, 64)
    rows = [torch.stack([cm.image[i]] + [cm.rgb(k)[i] for k in C.CONTROL_KINDS]) for i in range(3)]
    _save(_grid(torch.cat(rows), 4), f"{out}/control.png", scale=2)
    print("## control.png captions")
    for i in range(3):
        print(f"- {caption(b[i])}")

    # 6. questions
    d = make_batch("vqa", np.random.default_rng(3), 4, 64, question_kinds=QUESTION_KINDS)
    _save(_grid(d["image"], 4), f"{out}/vqa.png", scale=2)
    print("## vqa.png questions")
    q_rng = np.random.default_rng(4)
    for i in range(4):
        qas = [make_question(d["scenes"][i], q_rng, [k]) for k in QUESTION_KINDS]
        print(f"{i + 1}: " + " / ".join(f"{qa.question} -> {qa.answer}" for qa in qas))

    # 7. tiny objects: 256 px scene and what is left of it at 64 px
    tb = sample_tiny_scenes(np.random.default_rng(9), 64, min_objects=6)
    tb = tb.select(np.flatnonzero(tb.bg_kind != 2)[:1])  # a smooth background keeps the PNG small
    img = render(tb, 256)
    d = {"scenes": tb}
    small = torch.nn.functional.interpolate(img.float(), size=64, mode="area")
    small = torch.nn.functional.interpolate(small, size=256, mode="nearest").round().to(torch.uint8)
    _save(_grid(torch.cat([img, small]), 2, pad=4), f"{out}/tiny.png", colours=None)
    print("## tiny.png questions")
    q_rng = np.random.default_rng(1)
    for k in ("count", "shape", "colour", "position", "existence"):
        qa = make_question(d["scenes"][0], q_rng, [k])
        print(f"- {qa.question} -> {qa.answer}")
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"## {len(os.listdir(out))} files, {total / 1024:.0f} KB in {out}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m shapes", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed", help="single-thread generation throughput")
    s.add_argument("--size", type=int, default=64)
    a = sub.add_parser("agreement", help="analyser agreement with the ground truth")
    a.add_argument("--n", type=int, default=1000)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    d = sub.add_parser("docs", help="regenerate docs/img/shapes")
    d.add_argument("--out", default="docs/img/shapes")
    args = p.parse_args(argv)
    {"speed": _speed, "agreement": _agreement, "docs": _docs}[args.cmd](args)


if __name__ == "__main__":
    main()
