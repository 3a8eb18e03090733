"""Does a text-to-video model read the motion words? A probe of the denoiser itself, no sampling (CPU, ~1 minute).

Rendered one-object videos moving left or right (half each) are noised at several timesteps. The model predicts the
noise three times, with the true caption, with the direction word swapped ("left" <-> "right") and with the empty
caption. A model that reads the direction has a lower loss with the true caption than with the swapped one, and
its x0 prediction moves the object the captioned way. Reported per timestep:
- `loss_true`, `loss_swapped`, `loss_empty`: the ε-prediction MSE (a v-prediction model's output is converted to ε);
- `shift_true`, `shift_swapped`: how far the x0 prediction's horizontal centre of mass moves from the first to the
  last frame toward the true direction, in latent cells (the clean latents' own shift is `data_shift`).
The centre of mass is of each cell's deviation from its frame's mean, summed over latent channels.

Two more readings per timestep, on the same noisy inputs:
- `output_change`: how much the model's output moves, relative to its size, when the caption's direction is swapped,
  its colour is changed ("red" -> the next colour) or its shape is changed (the next shape);
- `attention`: the share of the cross-attention (all blocks, heads and image tokens) that goes to [SOT], to the
  direction word, to the colour and shape words, and to [EOT]; `temporal_text_attention`, the same for the temporal
  blocks' text attention of a model that has one (`LatteDiT(temporal_text_attention=W)`).

    python bench/t2v_motion_probe.py --model weights/shapes-t2v --out bench/results/t2v_motion_probe.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)
sys.path.insert(1, str(REPO / "scripts"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402

from dit.text_pipelines import TextToVideoPipeline  # noqa: E402
from shapes.render import render_video  # noqa: E402
from dit.grounding import CrossAttentionMaps  # noqa: E402
from shapes.scene import COLOURS, MOTIONS, SHAPES, sample_video_scenes  # noqa: E402
from shapes.text import captions  # noqa: E402
from train_dit import encode_video  # noqa: E402

TIMESTEPS = (100, 300, 500, 700, 900)


def swap_direction(text: str) -> str:
    return text.replace("right", "\0").replace("left", "right").replace("\0", "left")


def swap_word(text: str, vocabulary) -> str:
    """The first word of `vocabulary` in `text` replaced by the next one in it (a caption with another colour/shape)."""
    words = text.split(" ")
    for i, w in enumerate(words):
        if w in vocabulary:
            words[i] = vocabulary[(vocabulary.index(w) + 1) % len(vocabulary)]
            break
    return " ".join(words)


def token_positions(encoder, ids: torch.Tensor, vocabulary) -> torch.Tensor:
    """(B, L) bool: the caption tokens (ids (B, L)) that are words of `vocabulary`."""
    wanted = torch.tensor(encoder.tokenizer.convert_tokens_to_ids(list(vocabulary)))
    return torch.isin(ids, wanted)


def horizontal_shift(x0: torch.Tensor, sign: torch.Tensor) -> float:
    """Mean shift (last frame - first frame) of the horizontal centre of mass of x0 (B, C, F, h, w), signed so that
    the true direction is positive."""
    dev = (x0 - x0.mean(dim=(-1, -2), keepdim=True)).abs().sum(1)  # (B, F, h, w)
    cols = dev.sum(-2)  # (B, F, w)
    cx = (cols * torch.arange(cols.shape[-1], dtype=cols.dtype)).sum(-1) / cols.sum(-1)
    return ((cx[:, -1] - cx[:, 0]) * sign).mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "weights" / "shapes-t2v"))
    p.add_argument("--n", type=int, default=64, help="videos (half moving left, half right)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.n < 2:
        raise ValueError("--n must be at least 2")
    torch.manual_seed(args.seed)
    pipe = TextToVideoPipeline.from_pretrained(args.model)
    model, vae, encoder = pipe.transformer.eval(), pipe.vae, pipe.text_encoder
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    n = args.n
    right, left = MOTIONS.index("right"), MOTIONS.index("left")
    motions = np.array([[left if i % 2 else right] for i in range(n)])
    scenes = sample_video_scenes(np.random.default_rng(args.seed), n, 1, 1, motions=motions)
    caps = captions(scenes, None, video=True)
    sign = torch.tensor([-1.0 if i % 2 else 1.0 for i in range(n)])
    video = render_video(scenes, model.config.num_frames, vae.config.sample_size)
    rows = {}
    with torch.no_grad():
        z = encode_video(vae, video)  # (B, C, F, h, w), as the training script encodes its data
        texts = {"true": caps, "swapped": [swap_direction(c) for c in caps], "empty": [""] * n,
                 "colour": [swap_word(c, COLOURS) for c in caps], "shape": [swap_word(c, SHAPES) for c in caps]}
        encoded = {k: encoder.encode_text_tokens(v) for k, v in texts.items()}
        ids = encoder.tokenize(caps)
        groups = {"sot": ids == ids[0, 0], "direction": token_positions(encoder, ids, ("left", "right")),
                  "colour": token_positions(encoder, ids, COLOURS), "shape": token_positions(encoder, ids, SHAPES),
                  "eot": ids == encoder.tokenizer.eos_token_id}
        maps = CrossAttentionMaps(model)
        temporal_maps = CrossAttentionMaps(model, "text_attn") if model.config.get("temporal_text_attention") else None
        g = torch.Generator().manual_seed(args.seed + 1)
        for t in TIMESTEPS:
            eps = torch.randn(z.shape, generator=g)
            tt = torch.full((n,), t)
            xt = ddpm.add_noise(z, eps, tt)
            a = ddpm.alphas_cumprod[t]
            row, outs = {}, {}
            for name, (e, keep) in encoded.items():
                recorders = [r for r in (maps, temporal_maps) if r is not None] if name == "true" else []
                with contextlib.ExitStack() as stack:
                    for r in recorders:
                        stack.enter_context(r.recording())
                    out = model(xt, tt, e, keep)
                # attention share per token group: mean over blocks, heads, image tokens; the spatial cross-attention
                # and, where the model has it, the temporal blocks' text attention
                for key, r in zip(("attention", "temporal_text_attention"), recorders):
                    A = torch.stack([m.mean((1, 2)) for m in r.take()]).mean(0)  # (B', L), B' = B·F or B
                    A = A.view(n, -1, A.shape[-1]).mean(1)  # (B, L)
                    row[key] = {g: round((A * mask).sum(-1).mean().item(), 5) for g, mask in groups.items()}
                out = (out.sample if hasattr(out, "sample") else out)[:, :z.shape[1]]
                if ddpm.config.prediction_type == "v_prediction":  # compare as ε: ε = √ᾱ v + √(1-ᾱ) x_t
                    out = a.sqrt() * out + (1 - a).sqrt() * xt
                outs[name] = out
                if name in ("colour", "shape"):
                    continue
                row[f"loss_{name}"] = ((out - eps) ** 2).mean().item()
                if name != "empty":
                    row[f"shift_{name}"] = horizontal_shift((xt - (1 - a).sqrt() * out) / a.sqrt(), sign)
            size = outs["true"].norm()
            row["output_change"] = {k: round(((outs[k] - outs["true"]).norm() / size).item(), 5)
                                    for k in ("swapped", "colour", "shape")}
            rows[str(t)] = row
            print(t, row, flush=True)
        data_shift = horizontal_shift(z, sign)
    print("data_shift", round(data_shift, 3))
    result = {"device": "cpu", "torch": torch.__version__, "date": dt.datetime.now().isoformat(timespec="seconds"),
              "command": "python " + shlex.join(sys.argv), "model": args.model, "n": n, "seed": args.seed,
              "example_captions": caps[:2], "data_shift": data_shift, "by_timestep": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
