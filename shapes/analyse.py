"""Analyser: reads a generated image (or video frame) and returns the objects it sees.

Steps, per image:

1. **Background**: a plane per colour channel (flat and linear-gradient backgrounds are planes; noise averages
   out), fitted by least squares on low-chroma mid-tone pixels, then refitted twice on the pixels it explains
   (iteratively trimmed), so objects do not pull it.
2. **Objects**: pixels whose colour is far from the background plane (residual > ``FG_THRESHOLD``) form
   4-connected components; each pixel of the image is assigned to its nearest component (Voronoi split), so
   the anti-aliased rim of an object stays with it.
3. **Colour**: mean of a component's core pixels (residual near its maximum) -> nearest palette entry.
4. **Coverage**: each pixel's fraction of object colour, ``alpha = <I - bg, c - bg> / |c - bg|^2``; the
   object's area is the sum of alpha (sub-pixel exact and unchanged by blur).
5. **Shape**: for each of the six shapes, the template with the object's area and centroid (scale from
   area / unit area, centre from the centroid minus the shape's centroid offset) is drawn with the renderer's
   SDFs; the shape is the template with the highest soft IoU with alpha. The fit also gives the centre and
   half-extent, hence **size** (small / large / tiny by the geometric means of the nominal radii) and **cell**.

Geometric descriptors (solidity, compactness, corner count from the convex hull) are reported alongside in
``Detection.features`` for inspection; the template fit decides because it is the most robust at 8-16 px.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from .render import coverage, to_numpy_hwc
from .scene import CELLS, COLOURS, PALETTE, SHAPE_BBOX, SHAPES, SIZE_RADIUS, SIZES, cell_of

FG_THRESHOLD = 40.0  # RGB distance from the background plane that marks a pixel as object
MIN_PEAK = 60.0  # a component must reach this residual somewhere (rejects noise specks)
MIN_AREA = 4  # pixels
REGION_RADIUS = 3.0  # pixels around a component that count as its anti-aliased rim
BLUR_SIGMAS = (0.0, 0.5, 0.8, 1.1)  # templates are also compared blurred, for soft or generated images
# size thresholds: geometric means between the nominal half-extents
_R_TINY, _R_SMALL, _R_LARGE = SIZE_RADIUS[2], SIZE_RADIUS[0], SIZE_RADIUS[1]
SIZE_EDGES = (math.sqrt(_R_TINY * _R_SMALL), math.sqrt(_R_SMALL * _R_LARGE))


@functools.cache
def _unit_stats(n: int = 256):
    """Area and vertical centroid offset of each shape in its unit frame, measured with the renderer's SDFs
    (anti-aliased coverage, so accurate to ~1e-4 at n = 256)."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2.4 - 1.2
    y, x = torch.meshgrid(u, u, indexing="ij")
    areas, offs = [], []
    for s in range(len(SHAPES)):
        cov = coverage(
            torch.tensor([s]), torch.zeros(1), torch.zeros(1), torch.ones(1), x[None].float(), y[None].float(), 2.4 / n
        )[0].double()
        a = cov.sum() * (2.4 / n) ** 2
        areas.append(float(a))
        offs.append(float((cov * y).sum() * (2.4 / n) ** 2 / a))
    return np.array(areas), np.array(offs)


@dataclass
class Detection:
    """One detected object. Geometry is normalised to the image side (like the generator's ``Obj``):
    ``cx, cy`` the fitted bounding-box centre, ``r`` the fitted half-extent."""

    shape: str
    colour: str
    size: str
    cell: str
    cx: float
    cy: float
    r: float
    area: float  # pixels (sum of coverage)
    score: float  # soft IoU of the best template (1 = perfect)
    scores: dict = field(default_factory=dict)  # soft IoU per shape
    rgb: tuple = (0.0, 0.0, 0.0)  # observed core colour
    features: dict = field(default_factory=dict)  # geometric descriptors

    @property
    def class_id(self) -> int:
        return SHAPES.index(self.shape) * len(COLOURS) + COLOURS.index(self.colour)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        b = SHAPE_BBOX[SHAPES.index(self.shape)]
        return (self.cx + self.r * b[0], self.cy + self.r * b[1], self.cx + self.r * b[2], self.cy + self.r * b[3])

    def key(self) -> tuple[str, str, str, str]:
        return (self.shape, self.colour, self.size, self.cell)


@dataclass
class Analysis:
    """Full output of ``analyse_full``: detections plus per-pixel maps (H, W)."""

    objects: list[Detection]
    labels: np.ndarray  # int64, index into objects of the object covering the pixel (alpha >= 0.5), -1 = bg
    alpha: np.ndarray  # float32 coverage of the pixel's object
    background: np.ndarray  # (H, W, 3) float32 fitted background


# ----------------------------------------------------------------------------------------------- background
def fit_background(img: np.ndarray, iters: int = 3) -> np.ndarray:
    """Fit a plane per channel to the background of an (H, W, 3) float image; returns the (H, W, 3) plane.

    Fitted on a grid of about 64 x 64 pixels (all of them at <= 64 px): first on low-chroma mid-tone pixels,
    then on the pixels within 50, 30, 25 RGB units of the previous fit."""
    h, w, _ = img.shape
    s = max(1, min(h, w) // 64)
    ys = (np.arange(s // 2, h, s, dtype=np.float32) + 0.5) / h - 0.5
    xs = (np.arange(s // 2, w, s, dtype=np.float32) + 0.5) / w - 0.5
    Y = img[s // 2 :: s, s // 2 :: s].reshape(-1, 3)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    X = np.stack([np.ones(gx.size, np.float32), gx.ravel(), gy.ravel()], 1)
    chroma = Y.max(1) - Y.min(1)
    lum = Y.mean(1)
    inl = (chroma < 60) & (lum > 60) & (lum < 200)
    if inl.sum() < 0.2 * len(Y):
        inl = np.ones(len(Y), bool)
    beta = np.zeros((3, 3), np.float32)
    for thr in (50.0, 30.0, 25.0)[:iters]:
        Xi = X[inl]
        beta = np.linalg.solve(Xi.T @ Xi + 1e-6 * np.eye(3, dtype=np.float32), Xi.T @ Y[inl])
        res = np.sqrt(((Y - X @ beta) ** 2).sum(1))
        new = res < thr
        if new.sum() < 0.1 * len(Y):
            break
        inl = new
    yf = (np.arange(h, dtype=np.float32) + 0.5) / h - 0.5
    xf = (np.arange(w, dtype=np.float32) + 0.5) / w - 0.5
    return (beta[0] + xf[None, :, None] * beta[1] + yf[:, None, None] * beta[2]).astype(np.float32)


# ----------------------------------------------------------------------------------------------- components
@dataclass
class _Comp:
    img_index: int
    y0: int
    x0: int
    alpha: np.ndarray  # (h, w) coverage in the window (0 outside the component's region)
    colour: int
    rgb: np.ndarray
    pix_mask: np.ndarray  # (h, w) bool: component's region in the window


def _components(img: np.ndarray, bg: np.ndarray, img_index: int = 0):
    """Connected components of the foreground with their coverage windows; also returns the Voronoi label map."""
    h, w, _ = img.shape
    diff = img - bg
    res = np.sqrt((diff * diff).sum(-1))
    mask = res > FG_THRESHOLD
    lab, n = ndimage.label(mask)
    if n == 0:
        return [], np.full((h, w), -1, np.int64), res
    idx = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones_like(res), lab, idx)
    peaks = ndimage.maximum(res, lab, idx)
    keep = (sizes >= MIN_AREA) & (peaks >= MIN_PEAK)
    remap = np.zeros(n + 1, np.int64)
    remap[idx[keep]] = np.arange(1, keep.sum() + 1)
    lab = remap[lab]
    n = int(keep.sum())
    if n == 0:
        return [], np.full((h, w), -1, np.int64), res
    peaks = peaks[keep]
    dist, (iy, ix) = ndimage.distance_transform_edt(lab == 0, return_indices=True)
    region = np.where(dist <= REGION_RADIUS, lab[iy, ix], 0)  # Voronoi cell of each component, near it
    comps = []
    slices = ndimage.find_objects(region)
    for j, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        own = region[sl] == j
        win_img, win_bg, win_res = img[sl], bg[sl], res[sl]
        core = own & (win_res >= 0.75 * peaks[j - 1]) & (lab[sl] == j)
        rgb = win_img[core].mean(0)
        ci = int(np.argmin(((PALETTE.astype(np.float32) - rgb) ** 2).sum(1)))
        c = PALETTE[ci].astype(np.float32)
        d = c - win_bg
        alpha = ((win_img - win_bg) * d).sum(-1) / np.maximum((d * d).sum(-1), 1.0)
        alpha = np.where(own, alpha, 0.0).astype(np.float32)
        comps.append(_Comp(img_index, sl[0].start, sl[1].start, alpha, ci, rgb, own))
    return comps, region - 1, res


# ----------------------------------------------------------------------------------------------- shape fit
def _fit_templates(comps: list[_Comp], sizes: list[int], device="cpu"):
    """Soft IoU of each component's coverage with each shape's template; returns (N, S) scores and the fitted
    (N, S) centre x, centre y (pixels, image frame) and half-extent r (pixels)."""
    n, ns = len(comps), len(SHAPES)
    ph = max(c.alpha.shape[0] for c in comps)
    pw = max(c.alpha.shape[1] for c in comps)
    a = np.zeros((n, ph, pw), np.float32)
    for i, c in enumerate(comps):
        a[i, : c.alpha.shape[0], : c.alpha.shape[1]] = c.alpha
    area = np.clip(a, -1.0, 1.5).sum((1, 2))
    a_pos = np.clip(a, 0.0, 1.0)
    m = a_pos.sum((1, 2)) + 1e-6
    yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32) + 0.5
    mx = (a_pos * xx).sum((1, 2)) / m
    my = (a_pos * yy).sum((1, 2)) / m
    unit_area, unit_cy = _unit_stats()
    r = np.sqrt(np.maximum(area, 1.0)[:, None] / unit_area[None, :])  # (N, S) pixels
    cx = np.repeat(mx[:, None], ns, 1)
    cy = my[:, None] - unit_cy[None, :] * r
    t = lambda v, dt=torch.float32: torch.as_tensor(np.ascontiguousarray(v), dtype=dt, device=device)  # noqa
    shape = t(np.tile(np.arange(ns), n), torch.int64)
    px = t(np.broadcast_to(xx, (n * ns, ph, pw)))
    py = t(np.broadcast_to(yy, (n * ns, ph, pw)))
    tmpl = coverage(shape, t(cx.ravel()), t(cy.ravel()), t(r.ravel()), px, py, 1.0).view(n, ns, ph, pw)
    at = t(a_pos)[:, None]
    scores = None
    for sigma in BLUR_SIGMAS:
        tb = _gaussian_blur(tmpl, sigma)
        inter = torch.minimum(at, tb).sum((2, 3))
        union = torch.maximum(at, tb).sum((2, 3))
        sc = inter / union.clamp(min=1e-6)
        scores = sc if scores is None else torch.maximum(scores, sc)
    return scores.cpu().numpy(), cx, cy, r, area


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, S, H, W) maps, zero padded (sigma 0 = identity)."""
    if sigma <= 0:
        return x
    k = int(math.ceil(3 * sigma))
    g = torch.exp(-0.5 * (torch.arange(-k, k + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    g = g / g.sum()
    n, s, h, w = x.shape
    y = x.reshape(n * s, 1, h, w)
    y = torch.nn.functional.conv2d(y, g.view(1, 1, 1, -1), padding=(0, k))
    y = torch.nn.functional.conv2d(y, g.view(1, 1, -1, 1), padding=(k, 0))
    return y.view(n, s, h, w)


def _features(alpha: np.ndarray) -> dict:
    """Geometric descriptors of a coverage map: compactness 4 pi A / P^2 (A = sum of coverage, P = its total
    variation, the anti-aliased perimeter), solidity A / convex-hull area, and the number of hull corners
    (hull turns grouped over arcs of 0.2 equivalent radii; a group turning > 40 degrees is a corner;
    approximate at small sizes, where pixel steps add corners). Typical compactness / solidity / corners:
    circle 1.0 / 0.95 / 0-4, square 0.8 / 1.0 / 4, triangle 0.65 / 0.9 / 3-4, star 0.5 / 0.63 / 5, cross
    0.5 / 0.7 / 6-8, heart 0.85 / 0.93 / 1-6."""
    from scipy.spatial import ConvexHull

    a = np.clip(alpha, 0.0, 1.0).astype(np.float64)
    area = float(a.sum())
    if area < 3:
        return {}
    gy, gx = np.gradient(np.pad(a, 1))
    per = float(np.sqrt(gx * gx + gy * gy).sum())
    pts = np.argwhere(a >= 0.5).astype(np.float64)
    pts = np.concatenate([pts + o for o in ((-0.5, -0.5), (-0.5, 0.5), (0.5, -0.5), (0.5, 0.5))])
    try:
        hull = ConvexHull(pts)
    except Exception:  # degenerate (a line of pixels)
        return {"compactness": 4 * math.pi * area / max(per, 1.0) ** 2, "solidity": 1.0, "corners": 0}
    v = pts[hull.vertices]
    edge = np.roll(v, -1, 0) - v
    ang = np.arctan2(edge[:, 0], edge[:, 1])
    turn = np.abs((ang - np.roll(ang, 1) + np.pi) % (2 * np.pi) - np.pi)  # turn at each vertex
    reach = 0.2 * math.sqrt(area / math.pi)
    corners, acc, start = 0, 0.0, None
    order = np.argsort(-turn)  # grow groups from the sharpest vertices
    used = np.zeros(len(v), bool)
    for i in order:
        if used[i]:
            continue
        acc, j = 0.0, i
        group = [i]
        for step in (1, -1):  # extend along the hull both ways while within reach
            j = (i + step) % len(v)
            while not used[j] and j not in group and np.linalg.norm(v[j] - v[i]) < reach:
                group.append(j)
                j = (j + step) % len(v)
        used[group] = True
        corners += turn[group].sum() > math.radians(40)
    mask_area = float((a >= 0.5).sum())
    return {
        "compactness": 4 * math.pi * area / max(per, 1.0) ** 2,
        "solidity": mask_area / hull.volume,
        "corners": int(corners),
    }


def size_name(r_norm: float) -> str:
    """small / large / tiny from a normalised half-extent."""
    if r_norm < SIZE_EDGES[0]:
        return "tiny"
    return "small" if r_norm < SIZE_EDGES[1] else "large"


# ----------------------------------------------------------------------------------------------- public
def _as_images(images) -> list[np.ndarray]:
    """A batch (B, 3, H, W) / (B, H, W, 3) or one image -> list of float32 (H, W, 3) arrays in 0..255."""
    if isinstance(images, (list, tuple)):
        return [to_numpy_hwc(im).astype(np.float32) for im in images]
    arr = images
    nd = arr.dim() if isinstance(arr, torch.Tensor) else np.asarray(arr).ndim
    if nd == 3:
        return [to_numpy_hwc(arr).astype(np.float32)]
    return [to_numpy_hwc(im).astype(np.float32) for im in arr]


def analyse_batch(images, with_features: bool = False, return_maps: bool = False):
    """Analyse a batch of images: uint8 or float in [-1, 1], (B, 3, H, W) or (B, H, W, 3), tensor or array, or
    a list of images. Returns one list of ``Detection`` per image (or of ``Analysis`` with ``return_maps``)."""
    imgs = _as_images(images)
    comps, extras = [], []
    for k, img in enumerate(imgs):
        bg = fit_background(img)
        cs, region, _ = _components(img, bg, k)
        comps.extend(cs)
        extras.append((bg, region))
    results: list[list[Detection]] = [[] for _ in imgs]
    fitted = []
    if comps:
        scores, cx, cy, r, area = _fit_templates(comps, [im.shape[0] for im in imgs])
        for i, c in enumerate(comps):
            h, w = imgs[c.img_index].shape[:2]
            s = int(np.argmax(scores[i]))
            gx, gy = (c.x0 + cx[i, s]) / w, (c.y0 + cy[i, s]) / h
            rn = float(r[i, s]) / h
            det = Detection(
                shape=SHAPES[s],
                colour=COLOURS[c.colour],
                size=size_name(rn),
                cell=CELLS[int(cell_of(gx, gy))],
                cx=float(gx),
                cy=float(gy),
                r=rn,
                area=float(area[i]),
                score=float(scores[i, s]),
                scores={SHAPES[j]: float(scores[i, j]) for j in range(len(SHAPES))},
                rgb=tuple(float(v) for v in c.rgb),
                features=_features(c.alpha) if with_features else {},
            )
            results[c.img_index].append(det)
            fitted.append((c, det))
    if not return_maps:
        return results
    out = []
    for k, img in enumerate(imgs):
        bg, _ = extras[k]
        h, w = img.shape[:2]
        labels = np.full((h, w), -1, np.int64)
        alpha = np.zeros((h, w), np.float32)
        j = 0
        for c, det in fitted:
            if c.img_index != k:
                continue
            sl = (slice(c.y0, c.y0 + c.alpha.shape[0]), slice(c.x0, c.x0 + c.alpha.shape[1]))
            alpha[sl] = np.where(c.pix_mask, c.alpha, alpha[sl])
            labels[sl] = np.where(c.pix_mask & (c.alpha >= 0.5), j, labels[sl])
            j += 1
        out.append(Analysis(results[k], labels, alpha, bg))
    return out


def analyse(image, with_features: bool = False) -> list[Detection]:
    """Objects in one image (uint8 (H, W, 3) / (3, H, W), or float in [-1, 1]; tensor or array)."""
    return analyse_batch([image], with_features)[0]


def analyse_full(image) -> Analysis:
    """``analyse`` plus per-pixel maps (object labels, coverage, fitted background)."""
    return analyse_batch([image], return_maps=True)[0]


def analyse_video(frames) -> list[list[Detection]]:
    """Analyse every frame of a video ((T, 3, H, W) or (T, H, W, 3)); returns one detection list per frame."""
    return analyse_batch(frames)


__all__ = [
    "Detection",
    "Analysis",
    "analyse",
    "analyse_batch",
    "analyse_full",
    "analyse_video",
    "fit_background",
    "size_name",
    "FG_THRESHOLD",
    "SIZE_EDGES",
    "SIZES",
]
