"""Measure a generator on the shapes world: sample from fixed, seeded prompts and read the samples with the analyser.

One function per task, each taking a loaded pipeline (`ClassToImagePipeline`, `TextToImagePipeline`,
`TextToVideoPipeline`) and returning plain floats, so the training scripts' periodic evaluation, the model cards and
`ditstudio eval` all compute the same numbers:

- class -> image: `prompt_accuracy` (right shape and colour, one object) over class ids spread evenly over the
  48 classes;
- text -> image: `prompt_accuracy` on captions of one-object scenes and, separately, of two-object scenes
  (paraphrased captions, as users write them: sizes, positions and relations count when a caption states them);
- text -> video: `motion_accuracy` (per prompt object: is its motion right; and per video: everything right) and
  `frame_prompt_accuracy` (every frame on its own: count, shapes, colours).

The prompts come from their own seed space (`EVAL_SALT`), apart from the training streams, and the initial noise
of batch i from `seed + i`, so a (pipeline, n, seed, settings) tuple gives the same numbers on any machine up to
floating-point differences in the sampler.
"""
from __future__ import annotations

import time
import zlib

import numpy as np
import torch

from shapes.data import eval_set
from shapes.metrics import frame_prompt_accuracy, motion_accuracy, prompt_accuracy
from shapes.scene import NUM_CLASSES, sample_scenes
from shapes.text import caption

EVAL_SALT = 0xD17E
TASKS = ("class", "text", "video")
# What a shipped model is evaluated with unless its card says otherwise (the app's defaults).
DEFAULT_SETTINGS = dict(steps=25, cfg=4.0, sampler="dpm++")


def _rng(seed: int, what: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([EVAL_SALT, seed, zlib.crc32(what.encode())]))


def class_prompts(n: int, seed: int = 0) -> list[int]:
    """n class ids covering the classes evenly (each id n // 48 or n // 48 + 1 times), in a seeded order."""
    ids = np.arange(n) % NUM_CLASSES
    return [int(i) for i in _rng(seed, "class").permutation(ids)]


def caption_prompts(n: int, objects: int, seed: int = 0) -> list[str]:
    """Paraphrased captions of n scenes with exactly `objects` objects."""
    rng = _rng(seed, f"caption{objects}")
    scenes = sample_scenes(rng, n, objects, objects).to_scenes()
    return [caption(s, rng) for s in scenes]


def video_prompts(n: int, seed: int = 0) -> list[str]:
    """Paraphrased captions of n video scenes (1-2 moving objects), the shapes world's video evaluation set."""
    return eval_set("video", n, seed=seed)["caption"]


def generate_samples(pipe, prompts: list, batch_size: int, seed: int, steps: int, cfg: float) -> torch.Tensor:
    """uint8 samples (B, 3, H, W) or (B, T, 3, H, W), batch i's noise drawn from `seed + i` (the metrics' samples;
    public for the benchmarks that read the same images another way)."""
    device = pipe._execution_device
    out = []
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        gen = torch.Generator(device).manual_seed(seed + i)
        chunk = prompts[start:start + batch_size]
        if isinstance(chunk[0], int):
            x = pipe(chunk, num_inference_steps=steps, guidance_scale=cfg, generator=gen, output_type="pt").images
        else:
            x = pipe(chunk, num_inference_steps=steps, guidance_scale=cfg, generator=gen, output_type="pt")
            x = x.frames if hasattr(x, "frames") else x.images
        out.append((x.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    return torch.cat(out)


def task_of(pipe) -> str:
    from .latte import LatteDiT
    from .pixart import PixArtDiT

    model = getattr(pipe.transformer, "base_model", pipe.transformer)  # a method's wrapper (DyDiT) names its base
    if isinstance(model, LatteDiT):
        return "video"
    if isinstance(model, PixArtDiT):
        return "text"
    return "class"


def evaluate_pipeline(pipe, n: int = 256, seed: int = 0, steps: int = DEFAULT_SETTINGS["steps"],
                      cfg: float = DEFAULT_SETTINGS["cfg"], sampler: str | None = DEFAULT_SETTINGS["sampler"],
                      batch_size: int = 64) -> dict:
    """The task's metrics (flat dict of floats) for `n` prompts; `sampler` None keeps the pipeline's scheduler."""
    if n < 1 or steps < 1:
        raise ValueError(f"n and steps must be positive; got n={n}, steps={steps}")
    if sampler is not None:
        pipe.set_sampler(sampler)
    task, t0 = task_of(pipe), time.perf_counter()
    settings = dict(steps=steps, cfg=cfg, sampler=sampler, n=n, seed=seed)
    if task == "class":
        labels = class_prompts(n, seed)
        m = prompt_accuracy(generate_samples(pipe, labels, batch_size, seed, steps, cfg), labels)
        metrics = {"prompt_accuracy": m["accuracy"], "shape": m["shape"], "colour": m["colour"], "count": m["count"]}
    elif task == "text":
        metrics = {}
        for objects, name in ((1, "one_object"), (2, "two_object")):
            caps = caption_prompts(n, objects, seed)
            m = prompt_accuracy(generate_samples(pipe, caps, batch_size, seed, steps, cfg), caps)
            metrics.update({f"{name}_accuracy": m["accuracy"], f"{name}_shape": m["shape"],
                            f"{name}_colour": m["colour"], f"{name}_position": m["position"],
                            f"{name}_count": m["count"]})
    else:
        caps = video_prompts(n, seed)
        per_batch = max(1, batch_size // pipe.transformer.config.num_frames)
        videos = generate_samples(pipe, caps, per_batch, seed, steps, cfg)
        t = videos.shape[1]
        from shapes.analyse import analyse_batch

        flat = analyse_batch(videos.reshape(-1, *videos.shape[2:]))
        dets = [flat[i:i + t] for i in range(0, len(flat), t)]
        mo = motion_accuracy(videos, caps, dets)
        fr = frame_prompt_accuracy(videos, caps, dets)
        metrics = {"motion_accuracy": mo["motion"], "video_all_right": mo["accuracy"], "direction": mo["direction"],
                   "frame_prompt_accuracy": fr["accuracy"], "frame_shape": fr["shape"], "frame_colour": fr["colour"],
                   "frame_count": fr["count"]}
    return {**metrics, **settings, "eval_seconds": round(time.perf_counter() - t0, 1)}


# The model-card targets of the shipped defaults (issue: DiT backbones).
TARGETS = {
    "class": {"prompt_accuracy": ">= 0.95"},
    "text": {"one_object_accuracy": ">= 0.90", "two_object_accuracy": ">= 0.75"},
    "video": {"motion_accuracy": ">= 0.80", "frame_prompt_accuracy": ">= 0.85"},
}
