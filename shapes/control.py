"""Control maps aligned with the image: edges, segmentation, layout boxes.

Raw forms (what metrics compare):

- ``edges``  (B, H, W) bool: inner boundary of each object's mask (pixels at coverage >= 0.5 with a 4-neighbour
  outside the object), one pixel wide;
- ``seg``    (B, H, W) int64: 0 = background, 1 + class id (1..48) on object pixels (coverage >= 0.5);
- ``boxes``  (B, K, 4) float32 normalised (x0, y0, x1, y1) with ``box_labels`` (B, K) class ids (-1 = none).

RGB forms (what a control network is fed), (B, 3, H, W) uint8, see ``control_rgb``:

- ``edges``: white edges on black;
- ``seg``: each object in its palette colour on a flat mid grey (128) -- colour from the pixel, shape from the
  silhouette, so the map can be read back with the analyser;
- ``boxes``: each box filled with its palette colour at 50 % over mid grey, with a full-colour outline.

``maps_from_image`` recomputes the raw maps from an (generated) image via the analyser, for control fidelity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .render import render_layers
from .scene import NUM_COLOURS, PALETTE, SceneBatch

CONTROL_KINDS = ("edges", "seg", "boxes")
GREY = 128


@dataclass
class ControlMaps:
    """Raw control maps of a batch, plus the image they belong to."""

    image: torch.Tensor  # (B, 3, H, W) uint8
    edges: torch.Tensor  # (B, H, W) bool
    seg: torch.Tensor  # (B, H, W) int64, 0 = background, 1 + class id
    objects: torch.Tensor  # (B, H, W) int64, object slot, -1 = background
    boxes: torch.Tensor  # (B, K, 4) float32 normalised x0, y0, x1, y1
    box_labels: torch.Tensor  # (B, K) int64 class id, -1 = empty slot

    def rgb(self, kind: str) -> torch.Tensor:
        """(B, 3, H, W) uint8 visualisation of one kind, the form a control network is fed."""
        return control_rgb(kind, self)


def edges_from_objects(objects: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool inner boundaries of an object-index map ((B, H, W) int, -1 = background)."""
    o = objects
    fg = o >= 0
    pad = torch.nn.functional.pad(o[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0].long()
    diff = torch.zeros_like(fg)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        diff |= pad[:, dy : dy + o.shape[1], dx : dx + o.shape[2]] != o
    return fg & diff


def control_maps(b: SceneBatch, size: int = 64, device=None) -> ControlMaps:
    """Render a batch and its raw control maps."""
    layers = render_layers(b, size, device)
    objects = layers.objects
    device = objects.device
    cls = torch.as_tensor(b.class_id, device=device)  # (B, K)
    seg = torch.where(objects >= 0, torch.gather(cls, 1, objects.clamp(min=0).flatten(1)).view_as(objects) + 1, 0)
    boxes = torch.as_tensor(np.where(b.valid[..., None], b.bboxes(), 0), dtype=torch.float32, device=device)
    return ControlMaps(layers.image, edges_from_objects(objects), seg, objects, boxes, cls)


def box_masks(boxes: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W) int64 map: 1 + class id inside each box (pixel centres), 0 elsewhere."""
    c = (torch.arange(size, device=boxes.device, dtype=torch.float32) + 0.5) / size
    x0, y0, x1, y1 = (boxes[..., i][..., None, None] for i in range(4))  # (B, K, 1, 1)
    inside = (c[None, None, None, :] >= x0) & (c[None, None, None, :] <= x1)
    inside = inside & (c[None, None, :, None] >= y0) & (c[None, None, :, None] <= y1)
    inside = inside & (labels >= 0)[..., None, None]
    lab = (labels + 1)[..., None, None].expand_as(inside)
    return torch.where(inside, lab, 0).amax(1)


def _palette_of_map(m: torch.Tensor) -> torch.Tensor:
    """(B, H, W) map of 1 + class id -> (B, H, W, 3) float palette colour (grey on 0)."""
    pal = torch.cat([torch.full((1, 3), GREY, dtype=torch.float32), torch.as_tensor(PALETTE, dtype=torch.float32)])
    pal = pal.to(m.device)
    colour_idx = torch.where(m > 0, (m - 1) % NUM_COLOURS + 1, 0)
    return pal[colour_idx]


def control_rgb(kind: str, maps: ControlMaps) -> torch.Tensor:
    """(B, 3, H, W) uint8 visualisation of ``maps`` for ``kind`` in edges / seg / boxes."""
    if kind == "edges":
        return (maps.edges[:, None].expand(-1, 3, -1, -1) * 255).to(torch.uint8)
    if kind == "seg":
        return _palette_of_map(maps.seg).permute(0, 3, 1, 2).round().to(torch.uint8)
    if kind == "boxes":
        size = maps.seg.shape[-1]
        filled = box_masks(maps.boxes, maps.box_labels, size)
        w = max(1, size // 64)  # outline width
        inner = box_masks(_shrink(maps.boxes, w / size), maps.box_labels, size)
        col = _palette_of_map(filled)
        out = torch.where(((filled > 0) & (inner == 0))[..., None], col, 0.5 * col + 0.5 * GREY)
        out = torch.where((filled == 0)[..., None], torch.full_like(col, GREY), out)
        return out.permute(0, 3, 1, 2).round().to(torch.uint8)
    raise ValueError(f"unknown control kind {kind!r}; expected one of {CONTROL_KINDS}")


def _shrink(boxes: torch.Tensor, d: float) -> torch.Tensor:
    return boxes + torch.tensor([d, d, -d, -d], device=boxes.device)


def maps_from_image(images) -> ControlMaps:
    """Recompute raw control maps from images (uint8 or float in [-1, 1], (B, 3, H, W)) with the analyser:
    seg / objects from each detection's coverage >= 0.5, edges from their boundaries, boxes from the fitted
    shapes."""
    from .analyse import analyse_batch

    res = analyse_batch(images, return_maps=True)
    n = len(res)
    h, w = res[0].labels.shape if n else (0, 0)
    k = max([1] + [len(a.objects) for a in res])
    objects = torch.full((n, h, w), -1, dtype=torch.int64)
    seg = torch.zeros((n, h, w), dtype=torch.int64)
    boxes = torch.zeros((n, k, 4), dtype=torch.float32)
    labels = torch.full((n, k), -1, dtype=torch.int64)
    for i, a in enumerate(res):
        lab = torch.from_numpy(a.labels)
        objects[i] = lab
        if a.objects:
            cls = torch.tensor([d.class_id for d in a.objects])
            seg[i] = torch.where(lab >= 0, cls[lab.clamp(min=0)] + 1, 0)
            boxes[i, : len(a.objects)] = torch.tensor([d.bbox for d in a.objects])
            labels[i, : len(a.objects)] = cls
    img = images if isinstance(images, torch.Tensor) else torch.zeros(0)
    return ControlMaps(img, edges_from_objects(objects), seg, objects, boxes, labels)


def rgb_to_raw(kind: str, rgb: torch.Tensor) -> torch.Tensor:
    """Read an RGB control map ((B, 3, H, W) uint8) back to its raw form: edges -> bool map; seg -> 1 + class id
    map (via the analyser: colour per pixel, shape from the silhouette); boxes -> 0/1 map of box pixels."""
    if kind == "edges":
        return rgb.float().mean(1) > 127
    if kind == "seg":
        return maps_from_image(rgb).seg
    if kind == "boxes":
        return ((rgb.int() - GREY).abs().amax(1) > 8).long()
    raise ValueError(f"unknown control kind {kind!r}; expected one of {CONTROL_KINDS}")


__all__ = [
    "CONTROL_KINDS",
    "ControlMaps",
    "control_maps",
    "control_rgb",
    "edges_from_objects",
    "box_masks",
    "maps_from_image",
    "rgb_to_raw",
]
