"""Batches, an endless streaming ``IterableDataset`` and fixed seeded evaluation sets for every modality.

Kinds and what one item is (images uint8 (3, H, W), or float32 in [-1, 1] with ``image_format="float"``):

=========  =====================================================  ======================================
kind       item (tuple)                                           scenes
=========  =====================================================  ======================================
class      (image, class id)                                      one object; ids 0..47
caption    (image, caption)                                       1-3 objects, paraphrased captions
video      (frames (T, 3, H, W), caption)                         1-2 moving objects
control    (image, control map (3, H, W) uint8, caption)          1-3 objects; edges / seg / boxes map
vqa        (image, question, answer)                              1-3 objects; one-word answers
tiny       (image, question, answer)                              256 px, up to 8 tiny objects
=========  =====================================================  ======================================

``make_batch(kind, rng, n)`` returns everything about a batch as a dict (including the ``SceneBatch``, class
labels, canonical captions, raw control maps, question kinds); the stream and eval sets are built on it.
"""

from __future__ import annotations

import copy
import zlib

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .control import CONTROL_KINDS, control_maps, control_rgb
from .render import render, render_video, to_float
from .scene import (
    CELLS,
    NUM_COLOURS,
    as_rng,
    sample_class_scenes,
    sample_scenes,
    sample_tiny_scenes,
    sample_video_scenes,
)
from .text import VIDEO_POSITION_PROB, caption, counterfactual_video_caption, video_caption
from .vqa import SHORT_KINDS, make_question

KINDS = ("class", "caption", "video", "control", "vqa", "tiny")
TINY_SIZE = 256
# What each kind's tuple holds, in order (keys of ``make_batch``'s dict).
ITEM_KEYS = {
    "class": ("image", "label"),
    "caption": ("image", "caption"),
    "video": ("video", "caption"),
    "control": ("image", "control", "caption"),
    "vqa": ("image", "question", "answer"),
    "tiny": ("image", "question", "answer"),
}


def make_batch(
    kind: str,
    rng,
    n: int,
    size: int | None = None,
    device=None,
    paraphrase: bool = True,
    num_frames: int = 8,
    control: str = "edges",
    question_kinds=SHORT_KINDS,
    labels=None,
    objects: tuple[int, int] = (1, 3),
    position_prob: float = VIDEO_POSITION_PROB,
) -> dict:
    """One batch of ``kind`` drawn with ``rng`` (Generator or seed). Keys: ``scenes`` (SceneBatch) and, by
    kind, ``image`` (B, 3, H, W) uint8, ``label`` (B,) int64, ``caption`` / ``canonical`` lists of str,
    ``video`` (B, T, 3, H, W) uint8, ``control`` (B, 3, H, W) uint8 and ``maps`` (raw ``ControlMaps``),
    ``question`` / ``answer`` / ``question_kind`` lists of str; a video batch also has ``counterfactual``, each
    caption with its objects' motions replaced (``shapes.text.counterfactual_scene``). ``labels`` fixes the class
    ids of a class batch; ``paraphrase=False`` gives canonical captions; ``objects`` (min, max) bounds the objects
    per scene of the caption / control / vqa kinds; ``position_prob`` is the share of a video caption's objects whose
    starting position it states. ``size`` defaults to 64 px (256 px for tiny)."""
    rng = as_rng(rng)
    size = size or (TINY_SIZE if kind == "tiny" else 64)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    out: dict = {}
    if kind == "class":
        b = sample_class_scenes(rng, n, labels)
        out["label"] = torch.as_tensor(b.shape[:, 0] * NUM_COLOURS + b.colour[:, 0])
        out["image"] = render(b, size, device)
    elif kind == "video":
        b = sample_video_scenes(rng, n)
        out["video"] = render_video(b, num_frames, size, device)
        scenes = b.to_scenes()
        out["canonical"] = [video_caption(s) for s in scenes]
        if paraphrase:
            # Each scene's counterfactual caption (its motions replaced) draws its wording from a copy of the rng as
            # it stood before that scene's caption, so the two differ in the motion words, and rng moves as before.
            out["caption"], out["counterfactual"] = [], []
            for s in scenes:
                twin = copy.deepcopy(rng)
                out["caption"].append(video_caption(s, rng, position_prob))
                out["counterfactual"].append(counterfactual_video_caption(s, twin, position_prob))
        else:
            out["caption"] = out["canonical"]
            out["counterfactual"] = [counterfactual_video_caption(s) for s in scenes]
    elif kind == "tiny":
        b = sample_tiny_scenes(rng, n)
        out["image"] = render(b, size, device)
    else:
        lo, hi = objects
        if not 1 <= lo <= hi <= len(CELLS):  # one object per grid cell
            raise ValueError(f"objects must be (min, max) with 1 <= min <= max <= {len(CELLS)}, got {objects}")
        b = sample_scenes(rng, n, lo, hi)
        if kind == "control":
            if control not in CONTROL_KINDS:
                raise ValueError(f"unknown control kind {control!r}; expected one of {CONTROL_KINDS}")
            maps = control_maps(b, size, device)
            out["image"], out["maps"], out["control"] = maps.image, maps, control_rgb(control, maps)
        else:
            out["image"] = render(b, size, device)
    if kind in ("caption", "control", "vqa"):
        scenes = b.to_scenes()
        out["canonical"] = [caption(s) for s in scenes]
        out["caption"] = [caption(s, rng) for s in scenes] if paraphrase else out["canonical"]
    if kind in ("vqa", "tiny"):
        qas = [make_question(b[i], rng, question_kinds) for i in range(n)]
        out["question"] = [q.question for q in qas]
        out["answer"] = [q.answer for q in qas]
        out["question_kind"] = [q.kind for q in qas]
    out["scenes"] = b
    return out


def _stream_seed(seed: int, kind: str, worker: int, rank: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, zlib.crc32(kind.encode()), worker, rank])


class ShapesStream(IterableDataset):
    """Endless stream of ``kind`` items (see the module table), deterministic from ``seed``.

    Each DataLoader worker (and each distributed ``rank``, taken from torch.distributed when initialised)
    draws from its own seed sequence ``[seed, kind, worker, rank]``, so workers never repeat each other and a
    restart replays the same stream. Scenes are rendered ``chunk`` at a time. With ``batch_size`` the stream
    yields whole collated batches (use ``DataLoader(ds, batch_size=None)``), which is faster.
    """

    def __init__(
        self,
        kind: str = "class",
        size: int | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        chunk: int = 256,
        image_format: str = "uint8",
        rank: int | None = None,
        **batch_kwargs,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        if image_format not in ("uint8", "float"):
            raise ValueError("image_format must be 'uint8' or 'float'")
        self.kind, self.size, self.seed = kind, size, seed
        self.batch_size, self.chunk, self.image_format = batch_size, chunk, image_format
        self.rank, self.batch_kwargs = rank, batch_kwargs

    def _rank(self) -> int:
        if self.rank is not None:
            return self.rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return 0

    def _fields(self, batch: dict) -> tuple:
        vals = []
        for k in ITEM_KEYS[self.kind]:
            v = batch[k]
            if k in ("image", "video") and self.image_format == "float":
                v = to_float(v)
            vals.append(v)
        return tuple(vals)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng(_stream_seed(self.seed, self.kind, worker, self._rank()))
        n = self.batch_size or self.chunk
        while True:
            fields = self._fields(make_batch(self.kind, rng, n, self.size, **self.batch_kwargs))
            if self.batch_size:
                yield fields
            else:
                for i in range(n):
                    yield tuple(f[i] for f in fields)


def stream(kind: str = "class", batch_size: int = 64, seed: int = 0, num_workers: int = 0, **kwargs):
    """A DataLoader over ``ShapesStream`` yielding collated batches (tuples as in the module table)."""
    ds = ShapesStream(kind, seed=seed, batch_size=batch_size, **kwargs)
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)


_EVAL_SALT = 0xE7A1  # keeps evaluation scenes disjoint in seed space from the training streams


def eval_set(kind: str, n: int = 1000, seed: int = 0, size: int | None = None, **kwargs) -> dict:
    """A fixed evaluation set: ``make_batch(kind, ...)`` from a seed of its own (same ``(kind, n, seed, size,
    kwargs)``, same set, on any machine). Prompts/labels for generators, ground truth for metrics:
    ``scenes`` (SceneBatch), ``image``/``video`` (references), ``label``, ``caption``, ``canonical``, ``maps``,
    ``question``, ``answer`` ... as the kind provides."""
    rng = np.random.default_rng(np.random.SeedSequence([_EVAL_SALT, seed, zlib.crc32(kind.encode())]))
    return make_batch(kind, rng, n, size, **kwargs)


def generation_speed(
    kind: str = "caption", size: int = 64, batch: int = 1000, seconds: float = 2.0, threads: int | None = 1
) -> float:
    """Images (or video frames) generated per second -- scene sampling, rendering and, for captioned kinds,
    captions -- with ``torch.set_num_threads(threads)`` (restored afterwards). One warm-up batch first."""
    import time

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        rng = np.random.default_rng(0)
        per = batch * (8 if kind == "video" else 1)
        make_batch(kind, rng, batch, size)
        t0, done = time.perf_counter(), 0
        while True:
            make_batch(kind, rng, batch, size)
            done += per
            dt = time.perf_counter() - t0
            if dt >= seconds:
                return done / dt
    finally:
        torch.set_num_threads(old)


def render_speed(size: int = 64, batch: int = 1000, seconds: float = 2.0, threads: int | None = 1) -> float:
    """Images per second of scene sampling + rendering alone (no captions), single thread by default."""
    import time

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        rng = np.random.default_rng(0)
        render(sample_scenes(rng, batch), size)
        t0, done = time.perf_counter(), 0
        while True:
            render(sample_scenes(rng, batch), size)
            done += batch
            dt = time.perf_counter() - t0
            if dt >= seconds:
                return done / dt
    finally:
        torch.set_num_threads(old)


__all__ = [
    "KINDS",
    "ITEM_KEYS",
    "make_batch",
    "ShapesStream",
    "stream",
    "eval_set",
    "generation_speed",
    "render_speed",
]
