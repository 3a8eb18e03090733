"""Attention patterns as small mask functions, attention-gym style.

A *mask_mod* is a function ``(b, h, q_idx, kv_idx) -> bool tensor`` that says whether query ``q_idx`` of batch
``b`` / head ``h`` may attend to key ``kv_idx``. The same functions serve two consumers:

* FlexAttention's ``create_block_mask``, which calls them through ``vmap`` on scalar index tensors, and
* :func:`dense_mask`, which calls them once on broadcastable index tensors to build the explicit boolean mask
  used by the float64 reference and by the SDPA fall-backs.

So every mask_mod here uses only element-wise tensor ops and tensor indexing (no Python ``if`` on values).
Patterns are composed with :func:`and_masks` / :func:`or_masks`.

Positions: for rectangular calls (``q_len < kv_len``) the queries are the *last* ``q_len`` tokens of the
sequence, i.e. query ``i`` sits at position ``i + kv_len - q_len`` ("bottom-right" alignment, as a decoder
with a KV cache needs). All patterns here are *prefix* patterns: if a query may see key position ``p`` it may
see every key position before ``p`` too. :func:`rows_without_keys` relies on that.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

PATTERNS = ("dense", "causal", "block_causal")


def noop(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Every query sees every key (dense self- or cross-attention)."""
    return kv_idx >= 0


def causal_lower_right(q_len: int, kv_len: int) -> MaskMod:
    """Causal mask with the diagonal aligned bottom-right: query i sees keys j <= i + kv_len - q_len.

    For q_len == kv_len this is the ordinary causal mask. SDPA's ``is_causal=True`` is top-left aligned for
    rectangular shapes, which is wrong for a query block that follows a cached prefix.
    """
    offset = kv_len - q_len

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    return causal


def segment_ids(segments: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """Segment number of every token: [1, 4] -> [0, 1, 1, 1, 1]."""
    lengths = torch.as_tensor(list(segments), dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(segments), device=device), lengths)


def block_causal(segments: Sequence[int], q_len: int | None = None, device: torch.device | str = "cpu") -> MaskMod:
    """A token sees its own segment and all earlier ones (VAR: its own scale and all coarser scales).

    ``segments`` are segment lengths summing to the key length. With ``q_len`` < key length the queries are
    the last ``q_len`` tokens.
    """
    seg = segment_ids(segments, device)
    offset = 0 if q_len is None else seg.numel() - q_len

    def block_causal_mod(b, h, q_idx, kv_idx):
        return seg[kv_idx] <= seg[q_idx + offset]

    return block_causal_mod


def padding(keep: Tensor, group: int = 1) -> MaskMod:
    """Key padding: ``keep`` is (B, Nk) or per kv-head (B, Hkv, Nk) bool, True = a real key.

    With a per-head ``keep`` the mask is evaluated for query head h on kv head ``h // group`` (grouped-query
    attention shares one kv head between ``group`` consecutive query heads, like ``repeat_interleave``).
    """
    if keep.dim() == 2:

        def key_padding(b, h, q_idx, kv_idx):
            return keep[b, kv_idx]

    else:

        def key_padding(b, h, q_idx, kv_idx):
            return keep[b, h // group, kv_idx]

    return key_padding


def on_positions(mask_mod: MaskMod, q_pos: Tensor | None, kv_pos: Tensor | None, group: int = 1) -> MaskMod:
    """Evaluate a pattern on the original positions of gathered token subsets.

    After ``q = q[:, :, q_index]`` the i-th query is original token ``q_pos[b, i]``; causal and block-causal
    patterns must compare original positions, not positions in the smaller gathered batch. ``q_pos`` is
    (B, nq); ``kv_pos`` is (B, nk) or per kv-head (B, Hkv, nk). ``None`` means "not gathered".
    """

    def q_position(b, h, q_idx):
        return q_idx if q_pos is None else q_pos[b, q_idx]

    def kv_position(b, h, kv_idx):
        if kv_pos is None:
            return kv_idx
        if kv_pos.dim() == 2:
            return kv_pos[b, kv_idx]
        return kv_pos[b, h // group, kv_idx]

    def positional(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_position(b, h, q_idx), kv_position(b, h, kv_idx))

    return positional


def whole_rows(rows: Tensor) -> MaskMod:
    """Open every key for the query rows flagged in ``rows``, bool (B, 1|H, 1|Nq).

    Used to *rescue* rows that would otherwise see no key at all (padding, causal with Nq > Nk): kernels
    disagree on what a fully masked row returns (NaN, zeros, garbage lse, NaN gradients), so we give such rows
    something finite to attend to and zero them in the output afterwards. The zeroing also zeroes their
    gradient, so the rescue never leaks into dq/dk/dv. Size-1 dims stay size 1 in the dense mask, so a
    per-sample rescue does not force a (B, 1, Nq, Nk) mask where (B, 1, 1, Nk) would do.
    """
    per_head, per_query = rows.shape[1] > 1, rows.shape[2] > 1

    def rescued(b, h, q_idx, kv_idx):
        return rows[b, h if per_head else 0, q_idx if per_query else 0]

    return rescued


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """A key is visible only if every mask allows it."""

    def both(b, h, q_idx, kv_idx):
        result = mask_mods[0](b, h, q_idx, kv_idx)
        for mod in mask_mods[1:]:
            result = result & mod(b, h, q_idx, kv_idx)
        return result

    return both


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """A key is visible if any mask allows it."""

    def either(b, h, q_idx, kv_idx):
        result = mask_mods[0](b, h, q_idx, kv_idx)
        for mod in mask_mods[1:]:
            result = result | mod(b, h, q_idx, kv_idx)
        return result

    return either


def pattern_mask(
    pattern: str,
    q_len: int,
    kv_len: int,
    segments: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> MaskMod:
    """The mask_mod of a named pattern over the full (un-gathered) sequences."""
    if pattern == "dense":
        return noop
    if pattern == "causal":
        return causal_lower_right(q_len, kv_len)
    if pattern == "block_causal":
        if segments is None:
            raise ValueError("pattern='block_causal' needs segments (a list of segment lengths)")
        return block_causal(segments, q_len, device)
    raise ValueError(f"unknown attention pattern {pattern!r}; expected one of {PATTERNS}")


def dense_mask(
    mask_mod: MaskMod,
    B: int | None,
    H: int | None,
    q_len: int,
    kv_len: int,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Materialise a mask_mod as a boolean tensor (True = attend).

    Returns (q_len, kv_len) when ``B`` and ``H`` are both None (the mask does not depend on batch or head),
    else (B or 1, H or 1, q_len, kv_len), broadcastable against (B, H, q_len, kv_len) scores. The mask_mod is
    evaluated once on broadcastable index tensors, not per element.
    """
    b = torch.arange(B or 1, device=device).view(-1, 1, 1, 1)
    h = torch.arange(H or 1, device=device).view(1, -1, 1, 1)
    q_idx = torch.arange(q_len, device=device).view(1, 1, -1, 1)
    kv_idx = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
    mask = mask_mod(b, h, q_idx, kv_idx).to(torch.bool)
    mask = mask.expand(B or 1, H or 1, q_len, kv_len)
    if B is None and H is None:
        return mask[0, 0]
    return mask


def rows_without_keys(
    pattern_mod: MaskMod,
    q_pos: Tensor,
    kv_pos: Tensor,
    kv_keep: Tensor | None,
    group: int = 1,
) -> Tensor:
    """Which query rows see no key at all, without building the (Nq, Nk) mask.

    Every pattern here is a prefix pattern (if key position p is visible, so is every earlier position), so a
    row sees some key iff it sees the earliest *kept* key. ``q_pos`` is (B, Nq) query positions, ``kv_pos`` is
    (B, Hk, Nk) key positions and ``kv_keep`` (B, Hk, Nk) bool or None (all kept), Hk being 1 or the number
    of kv heads. Returns bool (B, 1|H, 1|Nq), True = the row has no visible key; the query dim is 1 when the
    answer does not depend on the query (dense pattern: only "does the sample keep any key").
    """
    B, Hk, _ = kv_pos.shape
    if kv_keep is None:
        earliest = kv_pos.min(dim=-1).values
        any_kept = torch.ones_like(earliest, dtype=torch.bool)
    else:
        # Padded slots get a position past every real one so they never win the min.
        far = torch.iinfo(kv_pos.dtype).max
        earliest = kv_pos.masked_fill(~kv_keep, far).min(dim=-1).values
        any_kept = kv_keep.any(dim=-1)
        earliest = torch.where(any_kept, earliest, torch.zeros_like(earliest))
    if Hk > 1 and group > 1:
        earliest = earliest.repeat_interleave(group, dim=1)
        any_kept = any_kept.repeat_interleave(group, dim=1)
    b = torch.arange(B, device=q_pos.device).view(-1, 1, 1)
    h = torch.arange(earliest.shape[1], device=q_pos.device).view(1, -1, 1)
    sees = pattern_mod(b, h, q_pos[:, None, :], earliest[:, :, None]) & any_kept[:, :, None]
    return ~sees.expand(B, earliest.shape[1], sees.shape[2])
