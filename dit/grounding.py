"""Token grounding loss for text-conditional DiTs (after TokenCompose: Wang et al., "TokenCompose: Text-to-Image
Diffusion with Token-level Supervision", CVPR 2024): during training, each object's caption tokens should be looked
at by the image tokens of that object, and not elsewhere.

Why: the shipped text model draws the right two objects in the right two cells of a two-object caption, but pairs
them at random (two-object position accuracy ~0.52, where a coin flip gives 0.5; one-object position 1.0). The
diffusion loss alone did not teach the cross-attention which object goes where in ~30k steps; a caption refiner
(dit/pixart.py) did not either (its object tokens stayed blind to their position words). The shapes world knows
exactly where each object is and which caption words name it, so the cross-attention maps can be supervised
directly, as TokenCompose does with segmentation masks for real photographs.

Pieces:
- `CrossAttentionMaps`: forward hooks on a model's cross-attention modules (PixArt blocks, Latte spatial blocks) that
  recompute each one's attention probabilities (B, h, N, L) from the hook's inputs (the fused SDPA kernel does not
  return them). Nothing in the model changes; the hooks exist only while recording.
- `grounding_loss`: TokenCompose's token loss: for every (sample, object, token of that object),
  (1 - attention mass inside the object's mask / total attention mass of that token)^2, averaged over the heads'
  mean map, the blocks and the valid triples.
- `object_token_sets` / `object_masks`: the targets on the shapes world: which token positions of a caption name
  which scene object (the article-to-noun span: "a big red circle"), and each object's cells on the latent grid.

Shapes: B batch, K object slots, N image tokens, L text tokens, h heads.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARTICLES = ("a", "an")


# ----------------------------------------------------------------------------------------------- recording maps
class CrossAttentionMaps:
    """Records every cross-attention's probabilities of `model` while `recording()` is open.

    The hooks read the cross-attention's inputs (x (B, N, D), text (B, L, D), keep (B, L)) and compute
    softmax(q k^T / sqrt(Dh)) from the layer's own `heads` (projections and QK-norm), padded text keys masked. They stay registered
    until `remove()` and do nothing outside `recording()`: registering and removing them around every step would
    make torch.compile recompile the model each time (it guards on the hooks)."""

    def __init__(self, model: nn.Module, suffix: str = "cross_attn"):
        """`suffix`: the modules recorded are those whose name ends so and that have `heads` (a LatteDiT's temporal
        text attention: "text_attn")."""
        self.modules = [m for name, m in model.named_modules() if name.endswith(suffix) and hasattr(m, "heads")]
        if not self.modules:
            raise ValueError(f"{type(model).__name__} has no {suffix} attention to record (a text model is needed)")
        self.maps: list[Tensor] = []
        self.active = False
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]

    def remove(self) -> None:
        for hd in self.handles:
            hd.remove()
        self.handles = []

    def _hook(self, module, args, output):
        if not self.active:
            return
        x, text = args[0], args[1]
        keep = args[2] if len(args) > 2 else None
        q, k, _ = module.heads(x, text)
        logits = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, h, N, L)
        if keep is not None:
            logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
        self.maps.append(torch.softmax(logits, dim=-1).nan_to_num(0.0))

    @contextlib.contextmanager
    def recording(self):
        self.maps, self.active = [], True
        try:
            yield self
        finally:
            self.active = False

    def take(self) -> list[Tensor]:
        maps, self.maps = self.maps, []
        return maps


def grounding_loss(maps: list[Tensor], masks_BKN: Tensor, tokens_BKL: Tensor, eps: float = 1e-6) -> Tensor:
    """TokenCompose's token loss over cross-attention maps [(B', h, N, L)]. masks (B, K, N) bool: object k's image
    tokens; tokens (B, K, L) bool: the caption tokens that name object k (all False: no target). Video models run
    their spatial blocks per frame (B' = B·F, frames of a sample consecutive): give per-frame masks and tokens
    (B·F rows) to ground every frame on its own, or (B rows) to ground the frames' mean map."""
    if not maps:
        raise ValueError("no cross-attention maps were recorded")
    masks, tokens = masks_BKN.float(), tokens_BKL.float()
    B, K, N = masks.shape
    total, count = 0.0, tokens.sum().clamp_min(1.0)
    for m in maps:
        A = m.mean(1)  # (B', N, L): the heads' mean map
        if A.shape[0] != B:
            A = A.view(B, A.shape[0] // B, N, -1).mean(1)  # frames: one map per sample
        mass = A.sum(1)  # (B, L): each token's total attention over the image
        inside = torch.einsum("bkn,bnl->bkl", masks, A)  # (B, K, L): the part inside object k
        frac = inside / (mass[:, None, :] + eps)
        total = total + (((1 - frac) ** 2) * tokens).sum() / count
    return total / len(maps)


# ----------------------------------------------------------------------------------------------- targets
# where a video caption's object phrase ends ("a red circle moving left and a ..."): its motion words are its own
PHRASE_ENDS = ("and", ",", "[EOT]", "[PAD]")


def object_token_sets(words: list[list[str]], shapes: np.ndarray, colours: np.ndarray, shape_names, colour_names,
                      max_len: int, whole_phrase: bool = False) -> np.ndarray:
    """(B, K, max_len) bool: for each caption (its tokens as words) and each scene object slot k (shape and colour
    ids (B, K), -1 = empty slot), the token positions of the phrase that names it, from its article to its shape
    noun ("a big red circle"); with `whole_phrase` on to the end of its phrase (video captions: "a red circle moving
    to the left", so that the motion words are tied to the moving object). A phrase is given to the one unused object
    whose shape (and colour, when the words before the noun say one) it names; a phrase that fits no object or more
    than one is left out (no target)."""
    B, K = shapes.shape
    out = np.zeros((B, K, max_len), bool)
    shape_of = {s: i for i, s in enumerate(shape_names)}
    colour_of = {c: i for i, c in enumerate(colour_names)}
    for b, toks in enumerate(words):
        toks = toks[:max_len]
        used = set()
        start = None
        for j, w in enumerate(toks):
            if w in ARTICLES:
                start = j
            elif w in shape_of and start is not None:
                span = toks[start:j + 1]
                colour = next((colour_of[c] for c in span if c in colour_of), None)
                fits = [k for k in range(K) if k not in used and shapes[b, k] == shape_of[w]
                        and (colour is None or colours[b, k] == colour)]
                if len(fits) == 1:
                    end = j + 1
                    while whole_phrase and end < len(toks) and toks[end] not in PHRASE_ENDS + ARTICLES:
                        end += 1
                    out[b, fits[0], start:end] = True
                    used.add(fits[0])
                start = None
    return out


def object_masks(slots_BHW: Tensor, num_slots: int, grid: int) -> Tensor:
    """(B, K, grid·grid) bool, row-major like the image tokens: the latent cells that object slot k touches, from the
    renderer's per-pixel slot map (B, H, W) (-1 = background)."""
    onehot = torch.stack([(slots_BHW == k) for k in range(num_slots)], 1).float()  # (B, K, H, W)
    cover = F.adaptive_avg_pool2d(onehot, grid)  # the share of each latent cell the object covers
    return (cover > 0).flatten(2)
