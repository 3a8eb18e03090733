"""Metrics built on the analyser.

- ``prompt_accuracy``: share of samples whose detected objects match the prompt (a class id, a caption, a
  ``Scene`` or a ``ParsedCaption``): right number of objects, every stated attribute of every object right
  (under the best one-to-one matching of prompt objects to detections) and every stated relation true. Also
  per attribute: shape, colour, size, position (3x3 cell) over the prompt objects that state it; count over
  samples; relation over stated relations.
- ``motion_accuracy``: objects are tracked across the frames and each track's motion is classified from its
  centroid track (net displacement -> left/right/up/down, a return trip upwards -> bounce), its radius (grow,
  shrink) and its colour (recolour); share of prompt objects whose motion is right, and of videos all right.
- ``control_fidelity``: IoU between a control map and the same map recomputed from the generated image by the
  analyser (edges: with 1 px tolerance; seg and boxes: mean IoU over the classes present).
- ``vqa_accuracy``: exact match after normalisation (``vqa.normalise_answer``), overall and per question kind;
  descriptions count as right when they parse to the same objects as the reference.
- ``frechet_distance`` / ``feature_stats``: FID-style distance between Gaussians fitted to features from any
  image -> feature function (the shapes CLIP image tower later), see ``frechet_distance_images``.
- ``psnr`` / ``mean_abs_error``: fidelity to a reference output (same seed, dense model).
- ``analyser_agreement``: share of rendered scenes the analyser reads exactly right (its own accuracy).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .analyse import Detection, analyse_batch
from .scene import CELLS, SceneBatch
from .text import ParsedCaption, ParsedObject, as_parsed, parse_caption

ATTRIBUTES = ("shape", "colour", "size", "cell")
_ATTR_WEIGHT = {"shape": 2.0, "colour": 2.0, "size": 1.0, "cell": 1.0, "motion": 1.0, "colour2": 1.0}


# ----------------------------------------------------------------------------------------------- matching
def _prompts(prompts, n: int, video: bool = False) -> list[ParsedCaption]:
    if isinstance(prompts, SceneBatch):
        prompts = prompts.to_scenes()
    if isinstance(prompts, (torch.Tensor, np.ndarray)):
        prompts = [int(p) for p in np.asarray(prompts.cpu() if isinstance(prompts, torch.Tensor) else prompts)]
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} samples")
    return [as_parsed(p, video) for p in prompts]


def _match(spec: list[ParsedObject], found: list, attrs=ATTRIBUTES, relations=()) -> list[int | None]:
    """Best one-to-one assignment of prompt objects to found objects (fewest weighted stated-attribute
    mismatches, and with relations, fewest violated relations too: exhaustive for up to 6 objects);
    returns for each prompt object the index of its match or None."""
    if not spec or not found:
        return [None] * len(spec)
    cost = np.zeros((len(spec), len(found)))
    for i, p in enumerate(spec):
        for j, d in enumerate(found):
            stated = [a for a in attrs if getattr(p, a) is not None]
            cost[i, j] = sum(_ATTR_WEIGHT[a] for a in stated if getattr(p, a) != getattr(d, a))
    if relations and len(spec) <= 6 and len(found) <= 6:
        best, best_cost = None, math.inf
        slots = list(range(len(found))) + [None] * max(0, len(spec) - len(found))
        for perm in itertools.permutations(slots, len(spec)):
            c = sum(cost[i, j] if j is not None else 10.0 for i, j in enumerate(perm))
            for i, rel, k in relations:
                ji, jk = perm[i], perm[k]
                c += 1.0 if ji is None or jk is None or not _relation_holds(found[ji], found[jk], rel) else 0.0
            if c < best_cost:
                best, best_cost = list(perm), c
        return best
    rows, cols = linear_sum_assignment(cost)
    out: list[int | None] = [None] * len(spec)
    for r, c in zip(rows, cols):
        out[r] = int(c)
    return out


def _relation_holds(a, b, rel: str) -> bool:
    ra, ca = divmod(CELLS.index(a.cell), 3)
    rb, cb = divmod(CELLS.index(b.cell), 3)
    return {"above": ra < rb, "below": ra > rb, "left": ca < cb, "right": ca > cb}[rel]


@dataclass
class SampleScore:
    """Per-sample outcome: ``correct`` overall, and per attribute lists of booleans (one per stated value)."""

    correct: bool
    count: bool
    attrs: dict = field(default_factory=dict)


def score_sample(detections: Sequence, spec: ParsedCaption, attrs=ATTRIBUTES) -> SampleScore:
    """Compare detected objects (``Detection`` or anything with the attributes) with a parsed prompt."""
    objs = spec.objects
    n_expected = spec.count if spec.count is not None else len(objs)
    count_ok = len(detections) == n_expected
    match = _match(objs, list(detections), attrs, spec.relations)
    res: dict[str, list[bool]] = {a: [] for a in attrs}
    res["relation"] = []
    for p, j in zip(objs, match):
        for a in attrs:
            if getattr(p, a) is not None:
                res[a].append(j is not None and getattr(detections[j], a) == getattr(p, a))
    for i, rel, k in spec.relations:
        ji, jk = match[i], match[k]
        holds = ji is not None and jk is not None and _relation_holds(detections[ji], detections[jk], rel)
        res["relation"].append(holds)
    ok = count_ok and all(all(v) for v in res.values())
    return SampleScore(ok, count_ok, res)


def _aggregate(scores: list[SampleScore], attrs) -> dict:
    out = {"accuracy": float(np.mean([s.correct for s in scores])) if scores else float("nan")}
    out["count"] = float(np.mean([s.count for s in scores])) if scores else float("nan")
    for a in list(attrs) + ["relation"]:
        vals = [v for s in scores for v in s.attrs.get(a, [])]
        out["position" if a == "cell" else a] = float(np.mean(vals)) if vals else float("nan")
    out["n"] = len(scores)
    return out


def prompt_accuracy(images, prompts, detections: list | None = None) -> dict:
    """Prompt accuracy of generated ``images`` ((B, 3, H, W) uint8 or float in [-1, 1]) against their prompts
    (class ids, captions, Scenes, ParsedCaptions or a SceneBatch). Returns ``accuracy``, ``shape``, ``colour``,
    ``size``, ``position``, ``count``, ``relation`` (NaN where nothing was stated) and ``n``. Pass
    ``detections`` to reuse an earlier ``analyse_batch``."""
    dets = analyse_batch(images) if detections is None else detections
    specs = _prompts(prompts, len(dets))
    return _aggregate([score_sample(d, s) for d, s in zip(dets, specs)], ATTRIBUTES)


def analyser_agreement(images, scenes: SceneBatch) -> dict:
    """How often the analyser reads rendered scenes exactly right (every attribute of every object)."""
    return prompt_accuracy(images, scenes)


# ----------------------------------------------------------------------------------------------- motion
@dataclass
class Track:
    """An object followed through a video: per-frame shape, centre, half-extent and colour (None where
    unseen). Its attributes are those of a ``Detection`` (shape by majority, colour / cell / size of the first
    frame it is seen in, colour2 of the last) plus ``motion``."""

    shapes: list
    cx: list
    cy: list
    r: list
    colours: list

    @property
    def shape(self):
        return Counter(s for s in self.shapes if s is not None).most_common(1)[0][0]

    @property
    def colour(self):
        return next(c for c in self.colours if c is not None)

    @property
    def colour2(self):
        return next(c for c in reversed(self.colours) if c is not None)

    @property
    def cell(self):
        i = next(i for i, c in enumerate(self.cx) if c is not None)
        return CELLS[int(np.clip(self.cy[i] * 3, 0, 2.999)) * 3 + int(np.clip(self.cx[i] * 3, 0, 2.999))]

    @property
    def size(self):
        from .analyse import size_name

        return size_name(next(r for r in self.r if r is not None))

    @property
    def motion(self) -> str:
        return classify_motion(self.cx, self.cy, self.r, self.colours)


def track_objects(frames: list[list[Detection]], max_jump: float = 0.25) -> list[Track]:
    """Link per-frame detections into tracks (Hungarian matching on centre distance, shape mismatch costing
    extra); a detection that matches no track within ``max_jump`` starts a new one."""
    t_len = len(frames)
    tracks: list[Track] = []
    last: list[tuple[float, float, str]] = []
    for f, dets in enumerate(frames):
        if tracks and dets:
            cost = np.array(
                [[math.hypot(d.cx - x, d.cy - y) + (0.1 if d.shape != s else 0.0) for d in dets] for x, y, s in last]
            )
            rows, cols = linear_sum_assignment(cost)
            pairs = [(r, c) for r, c in zip(rows, cols) if cost[r, c] < max_jump]
        else:
            pairs = []
        used = set()
        for r, c in pairs:
            d = dets[c]
            tr = tracks[r]
            tr.shapes[f], tr.cx[f], tr.cy[f], tr.r[f], tr.colours[f] = d.shape, d.cx, d.cy, d.r, d.colour
            last[r] = (d.cx, d.cy, d.shape)
            used.add(c)
        for c, d in enumerate(dets):
            if c in used:
                continue
            tr = Track(*([None] * t_len for _ in range(5)))
            tr.shapes[f], tr.cx[f], tr.cy[f], tr.r[f], tr.colours[f] = d.shape, d.cx, d.cy, d.r, d.colour
            tracks.append(tr)
            last.append((d.cx, d.cy, d.shape))
    return tracks


def classify_motion(cx, cy, r=None, colours=None, move: float = 0.1, hop: float = 0.08, scale: float = 1.25) -> str:
    """Motion of one object from its per-frame centre (normalised, y down), half-extent and colour (None where
    unseen): "recolour" if the colour at the end differs from the start, "grow"/"shrink" if the half-extent
    changes by more than ``scale``, "left"/"right"/"up"/"down" if the centre moves more than ``move`` (dominant
    axis), "bounce" if it goes up by more than ``hop`` and comes back, else "none"."""
    keep = [i for i, v in enumerate(cx) if v is not None]
    if len(keep) < 2:
        return "none"
    x = np.array([cx[i] for i in keep], float)
    y = np.array([cy[i] for i in keep], float)
    if colours is not None:
        cols = [colours[i] for i in keep]
        k = max(1, len(cols) // 3)
        first, last = Counter(cols[:k]).most_common(1)[0][0], Counter(cols[-k:]).most_common(1)[0][0]
        if first != last:
            return "recolour"
    if r is not None:
        rr = np.array([r[i] for i in keep], float)
        ratio = rr[-1] / max(rr[0], 1e-9)
        if ratio > scale:
            return "grow"
        if ratio < 1 / scale:
            return "shrink"
    dx, dy = x[-1] - x[0], y[-1] - y[0]
    if max(abs(dx), abs(dy)) > move:
        if abs(dx) >= abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"
    if y[0] - y.min() > hop:
        return "bounce"
    return "none"


def motion_accuracy(videos, prompts, detections: list | None = None) -> dict:
    """Motion accuracy of generated videos ((B, T, 3, H, W)) against their prompts (captions, Scenes of
    ``sample_video_scenes`` or a SceneBatch). Returns ``accuracy`` (videos with the right number of objects and
    every stated motion right), ``motion`` (per prompt object), ``direction`` (left/right/up/down objects only),
    ``count`` and the still-image attributes of the first frame (shape, colour, size, position)."""
    if detections is None:
        t = videos.shape[1]
        flat = analyse_batch(videos.reshape(-1, *videos.shape[2:]))
        detections = [flat[i : i + t] for i in range(0, len(flat), t)]
    specs = _prompts(prompts, len(detections), video=True)
    scores, direction = [], []
    attrs = ATTRIBUTES + ("motion", "colour2")
    for frames, spec in zip(detections, specs):
        tracks = track_objects(frames)
        s = score_sample(tracks, spec, attrs)
        scores.append(s)
        match = _match(spec.objects, tracks, attrs)
        for p, j in zip(spec.objects, match):
            if p.motion in ("left", "right", "up", "down"):
                direction.append(j is not None and tracks[j].motion == p.motion)
    out = _aggregate(scores, attrs)
    out["direction"] = float(np.mean(direction)) if direction else float("nan")
    return out


def frame_prompt_accuracy(videos, prompts, detections: list | None = None) -> dict:
    """Per-frame prompt accuracy of generated videos ((B, T, 3, H, W)): every frame on its own against the
    prompt's attributes that hold in every frame -- the number of objects, each object's shape, and its colour
    (a recolouring object may show either its start or its end colour). Size and position are left out because
    growing, shrinking and moving change them by design. Returns ``accuracy`` (share of frames right),
    ``video_accuracy`` (share of videos with every frame right), ``shape``, ``colour``, ``count`` and ``n``
    (frames). ``detections``: per video, a list of per-frame detections (as ``motion_accuracy`` takes)."""
    if detections is None:
        t = videos.shape[1]
        flat = analyse_batch(videos.reshape(-1, *videos.shape[2:]))
        detections = [flat[i : i + t] for i in range(0, len(flat), t)]
    specs = _prompts(prompts, len(detections), video=True)
    frames_ok, videos_ok, shape_ok, colour_ok, count_ok = [], [], [], [], []
    for frames, spec in zip(detections, specs):
        # a recolouring object is matched on shape alone, then its colour checked against both ends
        still = [ParsedObject(shape=o.shape, colour=None if o.colour2 else o.colour) for o in spec.objects]
        n_expected = spec.count if spec.count is not None else len(spec.objects)
        video_ok = True
        for found in frames:
            match = _match(still, list(found), ("shape", "colour"))
            shapes = [j is not None and found[j].shape == o.shape for o, j in zip(spec.objects, match)]
            colours = [j is not None and found[j].colour in {o.colour, o.colour2} - {None}
                       for o, j in zip(spec.objects, match)]
            count = len(found) == n_expected
            ok = count and all(shapes) and all(colours)
            frames_ok.append(ok)
            shape_ok += shapes
            colour_ok += colours
            count_ok.append(count)
            video_ok &= ok
        videos_ok.append(video_ok)
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"accuracy": mean(frames_ok), "video_accuracy": mean(videos_ok), "shape": mean(shape_ok),
            "colour": mean(colour_ok), "count": mean(count_ok), "n": len(frames_ok)}


# ----------------------------------------------------------------------------------------------- control
def iou(a, b) -> float:
    """IoU of two boolean masks (1.0 when both are empty)."""
    a, b = _np(a).astype(bool), _np(b).astype(bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def mean_iou(a, b, ignore: int = 0) -> float:
    """Mean IoU over the labels present in either integer map, except ``ignore`` (1.0 if none)."""
    a, b = _np(a), _np(b)
    labels = np.setdiff1d(np.union1d(np.unique(a), np.unique(b)), [ignore])
    if len(labels) == 0:
        return 1.0
    return float(np.mean([iou(a == k, b == k) for k in labels]))


def _dilate(m: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(m, np.ones((3, 3), bool))


def control_fidelity(images, targets, kind: str) -> dict:
    """IoU between control maps and the maps recomputed from generated ``images`` by the analyser.

    ``targets``: a ``ControlMaps`` (raw maps), a raw tensor of that kind ((B, H, W): bool edges, 1 + class id
    seg map, 1 + class id or 0/1 box map), or the RGB control images (B, 3, H, W) uint8. Edges are compared
    after a 3x3 dilation of both (1 px tolerance); seg and boxes by mean IoU over the labels present (labels
    reduced to box / no box when the target is an RGB box map). Returns ``iou`` (mean) and ``per_image``."""
    from .control import ControlMaps, box_masks, maps_from_image, rgb_to_raw

    if isinstance(targets, ControlMaps):
        if kind == "edges":
            target = targets.edges
        elif kind == "seg":
            target = targets.seg
        else:
            target = box_masks(targets.boxes, targets.box_labels, targets.seg.shape[-1])
    elif isinstance(targets, torch.Tensor) and targets.dim() == 4:
        target = rgb_to_raw(kind, targets)
    else:
        target = torch.as_tensor(targets)
    got = maps_from_image(images)
    if kind == "edges":
        pred = got.edges
    elif kind == "seg":
        pred = got.seg
    elif kind == "boxes":
        pred = box_masks(got.boxes, got.box_labels, got.seg.shape[-1])
        if target.max() <= 1:  # binary target (RGB box map): compare box / no box
            pred = (pred > 0).long()
    else:
        raise ValueError(f"unknown control kind {kind!r}")
    per = []
    for t, p in zip(target.cpu().numpy(), pred.cpu().numpy()):
        per.append(iou(_dilate(t), _dilate(p)) if kind == "edges" else mean_iou(t.astype(np.int64), p.astype(np.int64)))
    return {"iou": float(np.mean(per)) if per else float("nan"), "per_image": per}


# ----------------------------------------------------------------------------------------------- VQA
def vqa_accuracy(predictions: Sequence[str], answers: Sequence[str], kinds: Sequence[str] | None = None) -> dict:
    """Exact match after ``normalise_answer``; ``describe`` answers count as right when prediction and
    reference parse to the same objects. Returns ``accuracy`` and, with ``kinds``, one entry per kind."""
    from .vqa import exact_match

    if len(predictions) != len(answers):
        raise ValueError("predictions and answers differ in length")
    kinds = list(kinds) if kinds is not None else [None] * len(answers)
    hits = []
    for p, a, k in zip(predictions, answers, kinds):
        if k == "describe":
            hits.append(_same_objects(parse_caption(p), parse_caption(a)))
        else:
            hits.append(exact_match(p, a))
    out = {"accuracy": float(np.mean(hits)) if hits else float("nan"), "n": len(hits)}
    for k in sorted({k for k in kinds if k is not None}):
        sel = [h for h, kk in zip(hits, kinds) if kk == k]
        out[k] = float(np.mean(sel))
    return out


def _same_objects(a: ParsedCaption, b: ParsedCaption) -> bool:
    key = lambda o: (o.shape, o.colour, o.size, o.cell)  # noqa: E731
    return sorted(map(key, a.objects), key=str) == sorted(map(key, b.objects), key=str)


# ----------------------------------------------------------------------------------------------- Fréchet
def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features, in float64."""
    f = _np(features).astype(np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError("features must be (N, D) with N >= 2")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), the trace of the square root taken as
    the sum of square roots of the eigenvalues of sigma1^(1/2) sigma2 sigma1^(1/2) (symmetric, so stable)."""
    mu1, mu2 = np.atleast_1d(_np(mu1)).astype(np.float64), np.atleast_1d(_np(mu2)).astype(np.float64)
    s1, s2 = np.atleast_2d(_np(sigma1)).astype(np.float64), np.atleast_2d(_np(sigma2)).astype(np.float64)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def image_features(images, feature_fn: Callable, batch_size: int = 256) -> np.ndarray:
    """Features of images through ``feature_fn`` (a callable (B, 3, H, W) uint8 tensor -> (B, D) features,
    e.g. the shapes CLIP image tower wrapped to take uint8), in batches."""
    feats = []
    for i in range(0, len(images), batch_size):
        with torch.no_grad():
            feats.append(_np(feature_fn(images[i : i + batch_size])))
    return np.concatenate(feats).astype(np.float64)


def frechet_distance_images(images, reference, feature_fn: Callable, batch_size: int = 256) -> float:
    """Fréchet distance of generated ``images`` to ``reference``: a (mu, sigma) pair (e.g. shipped statistics,
    see ``load_stats``) or reference images, with features from ``feature_fn``."""
    mu, sigma = feature_stats(image_features(images, feature_fn, batch_size))
    if isinstance(reference, tuple):
        ref_mu, ref_sigma = reference
    else:
        ref_mu, ref_sigma = feature_stats(image_features(reference, feature_fn, batch_size))
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)


def save_stats(path, mu, sigma) -> None:
    np.savez(path, mu=_np(mu), sigma=_np(sigma))


def load_stats(path) -> tuple[np.ndarray, np.ndarray]:
    d = np.load(path)
    return d["mu"], d["sigma"]


# ----------------------------------------------------------------------------------------------- fidelity
def _default_range(x) -> float:
    return 255.0 if _np(x).dtype == np.uint8 else 2.0


def psnr(output, reference, data_range: float | None = None) -> float:
    """PSNR in dB, 10 log10(range^2 / MSE), averaged over samples when given a batch (B, ...) of >= 4 dims;
    ``data_range`` defaults to 255 for uint8 and 2 for float (images in [-1, 1]). Identical inputs give inf."""
    a, b = _np(output).astype(np.float64), _np(reference).astype(np.float64)
    rng = data_range if data_range is not None else _default_range(output)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1) if a.ndim >= 4 else np.array([((a - b) ** 2).mean()])
    with np.errstate(divide="ignore"):
        vals = 10 * np.log10(rng**2 / mse)
    return float(np.mean(vals))


def mean_abs_error(output, reference, data_range: float | None = None) -> float:
    """Mean absolute difference, in units of the data (uint8 levels, or the float range), or as a fraction of
    ``data_range`` when given."""
    a, b = _np(output).astype(np.float64), _np(reference).astype(np.float64)
    mae = float(np.abs(a - b).mean())
    return mae / data_range if data_range else mae


def degrade(images: torch.Tensor, blur_sigma: float = 0.7, noise_std: float = 4.0, seed: int = 0) -> torch.Tensor:
    """Gaussian blur (sigma in pixels) plus Gaussian noise (std in uint8 levels) on (B, 3, H, W) uint8 images,
    re-quantised to uint8: the perturbation the analyser must tolerate."""
    from scipy import ndimage

    x = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
    if blur_sigma > 0:
        x = ndimage.gaussian_filter(x, (0, blur_sigma, blur_sigma, 0))
    x = x + np.random.default_rng(seed).normal(0.0, noise_std, x.shape)
    return torch.from_numpy(np.clip(np.round(x), 0, 255).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


__all__ = [
    "SampleScore",
    "Track",
    "score_sample",
    "prompt_accuracy",
    "analyser_agreement",
    "track_objects",
    "classify_motion",
    "motion_accuracy",
    "frame_prompt_accuracy",
    "iou",
    "mean_iou",
    "control_fidelity",
    "vqa_accuracy",
    "feature_stats",
    "frechet_distance",
    "image_features",
    "frechet_distance_images",
    "save_stats",
    "load_stats",
    "psnr",
    "mean_abs_error",
    "degrade",
]
