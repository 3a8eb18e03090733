"""Where a DyDiT's token routers keep tokens: inside the generated objects or on the background (spec section 6,
"spatial check unique to shapes"; expect objects > background).

Samples a shipped class-to-image DyDiT folder on `--n` seeded class prompts (25 DPM-Solver++ steps, guidance 4, the
app's defaults), records every block's token keep mask (sliced path: 1 = the token went through the MLP) of the
conditional half at every step, and segments the final images with the shapes analyser (`analyse_batch(...,
return_maps=True)`: each pixel's object or background). A token covers a patch of the image (64 px over a 16 x 16
latent with patch 1: 4 x 4 pixels); it counts as an object token when at least `--object-share` of its pixels belong
to a detected object. Reports, per block and per noise third of the sampling run, the keep rate of object tokens and
of background tokens, over the samples in which the analyser found an object.

    python bench/dydit_token_map.py --model shapes-dydit-c2i --n 96   # writes bench/results/dydit_token_map.json
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from app.catalog import resolve_model  # noqa: E402
from dit.dydit_io import load_dydit_pipeline  # noqa: E402
from dit.evaluation import DEFAULT_SETTINGS, class_prompts, generate_samples  # noqa: E402
from shapes.analyse import analyse_batch  # noqa: E402

THIRDS = ("high noise (first third of the steps)", "middle third", "low noise (last third)")


def token_object_share(labels_HW: np.ndarray, grid: int) -> np.ndarray:
    """(grid*grid,) share of each token's pixels that belong to a detected object (labels >= 0), row-major as the
    patchified tokens."""
    obj = torch.from_numpy((labels_HW >= 0).astype(np.float32))[None, None]
    return F.adaptive_avg_pool2d(obj, grid).flatten().numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="shapes-dydit-c2i", help="a class-to-image DyDiT folder or shipped name")
    p.add_argument("--n", type=int, default=96, help="class prompts (dit.evaluation.class_prompts, seed 0)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=DEFAULT_SETTINGS["steps"])
    p.add_argument("--cfg", type=float, default=DEFAULT_SETTINGS["cfg"])
    p.add_argument("--object-share", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/dydit_token_map.json")
    args = p.parse_args(argv)
    if not 0 < args.object_share <= 1:
        raise ValueError(f"--object-share must be in (0, 1], got {args.object_share}")
    torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    pipe = load_dydit_pipeline(folder)
    pipe.set_sampler("dpm++")
    pipe.set_progress_bar_config(disable=True)
    if type(pipe).__name__ != "ClassToImagePipeline":
        raise ValueError(f"{args.model}: a {type(pipe).__name__}; this check reads class-to-image DyDiTs")

    calls: list[list[torch.Tensor]] = []  # per model call: each block's (2B, N) token keep mask

    def record(_module, _args, out):
        calls.append([m["token"].detach().float().cpu() for m in out.masks])

    hook = pipe.transformer.dydit.register_forward_hook(record)
    labels = class_prompts(args.n, 0)
    sums = None  # (thirds, blocks, 2 [object, background], 2 [kept, total])
    images_with_objects = 0
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, args.n, args.batch)):
        chunk = labels[start:start + args.batch]
        calls.clear()
        images = generate_samples(pipe, chunk, len(chunk), i, args.steps, args.cfg)  # noise seed i, as evaluation
        maps = analyse_batch(images, return_maps=True)
        B, steps, blocks = len(chunk), len(calls), len(calls[0])
        grid = int(round(calls[0][0].shape[1] ** 0.5))
        if sums is None:
            sums = np.zeros((3, blocks, 2, 2))
        for b in range(B):
            share = token_object_share(maps[b].labels, grid)
            is_obj = share >= args.object_share
            is_bg = share == 0
            if not is_obj.any():
                continue
            images_with_objects += 1
            for s, masks in enumerate(calls):
                third = min(3 * s // steps, 2)
                for layer, m in enumerate(masks):
                    kept = m[b].numpy()  # the conditional half comes first (dit/pipelines.py)
                    sums[third, layer, 0] += (kept[is_obj].sum(), is_obj.sum())
                    sums[third, layer, 1] += (kept[is_bg].sum(), is_bg.sum())
    hook.remove()
    seconds = time.perf_counter() - t0
    rate = sums[..., 0] / np.maximum(sums[..., 1], 1)  # (thirds, blocks, [object, background])
    overall = sums.sum(axis=0)
    overall_rate = overall[..., 0] / np.maximum(overall[..., 1], 1)
    result = {
        "device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} threads",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv),
        "model": str(args.model), "n": args.n, "images_with_objects": images_with_objects,
        "settings": {"steps": args.steps, "cfg": args.cfg, "sampler": "dpm++", "object_share": args.object_share},
        "seconds": round(seconds, 1),
        "keep_rate_by_block": [{"block": layer, "object": round(float(overall_rate[layer, 0]), 4),
                                "background": round(float(overall_rate[layer, 1]), 4)}
                               for layer in range(overall_rate.shape[0])],
        "keep_rate_by_third_and_block": {THIRDS[k]: [[round(float(rate[k, layer, 0]), 4),
                                                      round(float(rate[k, layer, 1]), 4)]
                                                     for layer in range(rate.shape[1])] for k in range(3)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{images_with_objects} of {args.n} images with an object; {seconds:.0f} s\n")
    head = " | ".join(f"{t}: object / background" for t in THIRDS)
    print(f"| block | {head} | all steps: object / background |")
    print("|---|" + "---|" * 4)
    for layer in range(rate.shape[1]):
        cells = [f"{rate[k, layer, 0]:.2f} / {rate[k, layer, 1]:.2f}" for k in range(3)]
        print(f"| {layer} | " + " | ".join(cells) + f" | {overall_rate[layer, 0]:.2f} / {overall_rate[layer, 1]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
