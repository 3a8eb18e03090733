"""Validation of an attention call and its reduction to one normalised :class:`Problem`.

Every backend receives the same Problem: q/k/v already gathered to the kept tokens, the pattern expressed in
the cheapest *form* a kernel can take, one mask_mod that is exact for every form, and the query rows that must
come out as zeros. Backends never see user arguments, so none can silently drop one.
"""

from __future__ import annotations

import functools
import itertools
import math
import dataclasses
from dataclasses import dataclass, field
from numbers import Real
from typing import Sequence

import torch
from torch import Tensor

from . import masks

# How a backend can express the mask, cheapest first:
#   "none"                no mask at all (dense, or dense over an equal-count token subset)
#   "causal"              square causal: SDPA is_causal=True
#   "causal_bottom_right" rectangular causal with Nq < Nk, diagonal aligned bottom-right
#   "block_causal"        by segments; data-independent, so flex can cache its BlockMask
#   "explicit"            anything data-dependent (key padding, unequal subsets, subsets with a causal pattern,
#                         causal with Nq > Nk): needs the mask_mod evaluated per batch element (and head)
FORMS = ("none", "causal", "causal_bottom_right", "block_causal", "explicit")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

IndexArg = Tensor | Sequence[Tensor] | None


@dataclass
class Problem:
    """One attention call, normalised. Shapes: q (B, H, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv)."""

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    pattern: str
    form: str
    # Exact mask over the gathered tokens (pattern & padding | rescued rows); None for form "none".
    mask_mod: masks.MaskMod | None
    # Hashable identity of a data-independent mask (forms causal*, block_causal), for BlockMask caching.
    mask_key: tuple | None
    mask_per_batch: bool  # the explicit mask differs between batch elements
    mask_per_head: bool  # ... and between heads (per-head kv subsets)
    # Rows to zero in the output, bool broadcastable to (B, H, Nq): (B, 1|H, 1|Nq); None when all rows are valid.
    zero_rows: Tensor | None
    needs_grad: bool  # autograd is on and an input requires grad (training)
    # Dense pattern with only a key-padding mask: the whole mask is one row per sample, (B, 1, 1, Nk) bool
    # (kept key, or a rescued empty row). Kernels then read a bias broadcast over queries and heads instead
    # of a (B, 1, Nq, Nk) one built per call.
    key_row_mask: Tensor | None = None
    group: int = field(init=False)  # query heads per kv head
    features: tuple = field(init=False)  # what decides whether a kernel can run this (probe cache key)

    def __post_init__(self):
        self.group = self.q.shape[1] // self.k.shape[1]
        Nq, Nk = self.q.shape[2], self.k.shape[2]
        self.features = (
            self.q.device.type,
            self.q.device.index,
            self.q.dtype,
            self.q.shape[-1],
            self.v.shape[-1],
            self.form,
            self.group > 1,
            # One key (unmasked or causal) is its own class: cuDNN SDPA refuses a key/value length of 1 (VAR's
            # first scale under a KV cache is 1 query x 1 key), which a probe on 13 keys would not show.
            "k=1" if Nk == 1 and self.form in ("none", "causal", "causal_bottom_right")
            else ("square" if Nq == Nk else ("q<k" if Nq < Nk else "q>k")),
            self.mask_per_head,
            self.needs_grad,
        )

    def dense_mask(self) -> Tensor | None:
        """Boolean mask (Nq, Nk) or (B, 1|H, Nq, Nk) (possibly an expanded view); None for form "none"."""
        if self.mask_mod is None:
            return None
        Nq, Nk = self.q.shape[2], self.k.shape[2]
        if self.mask_key is not None:
            return _cached_dense_mask(self.mask_key, Nq, Nk, self.q.device)
        B, H = self.q.shape[:2]
        return masks.dense_mask(
            self.mask_mod, B if self.mask_per_batch else None, H if self.mask_per_head else None, Nq, Nk, self.q.device
        )

    def additive_mask(self) -> Tensor | None:
        """The mask as a bias in q's dtype (0 = attend, -inf = masked), shaped like :meth:`dense_mask`.

        SDPA turns a *boolean* mask into a bias itself, but via a device scalar created from the host, which
        synchronises with the GPU on every call; a bias we build with masked_fill does not.
        """
        if self.mask_mod is None:
            return None
        if self.mask_key is not None:
            return _cached_bias(self.mask_key, self.q.shape[2], self.k.shape[2], self.q.device, self.q.dtype)
        if self.key_row_mask is not None:
            return _bias(self.key_row_mask, self.q.dtype)
        return _bias(self.dense_mask(), self.q.dtype)

    def with_kv(self, k: Tensor, v: Tensor) -> "Problem":
        """The same problem with other K/V tensors (e.g. GQA heads repeated for a kernel without GQA)."""
        return self if (k is self.k and v is self.v) else dataclasses.replace(self, k=k, v=v)

    def finish(self, out: Tensor) -> Tensor:
        """Zero the rows that have no key or are padding (same rule for every backend)."""
        if self.zero_rows is None:
            return out
        return out.masked_fill(self.zero_rows[..., None], 0)


@functools.lru_cache(maxsize=128)
def pattern_mod(pattern: str, q_len: int, kv_len: int, segments: tuple | None, device: torch.device) -> masks.MaskMod:
    """Cached so a block-causal call does not rebuild (and copy to the GPU) its segment ids every time."""
    return masks.pattern_mask(pattern, q_len, kv_len, segments, device)


def _bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


@functools.lru_cache(maxsize=32)
def _cached_bias(mask_key: tuple, q_len: int, kv_len: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return _bias(_cached_dense_mask(mask_key, q_len, kv_len, device), dtype)


# A block-causal query segment at least this long runs as its own dense call against its key prefix (see
# block_causal_pieces); shorter leading segments share one masked call.
MIN_DENSE_PIECE = 64


@functools.lru_cache(maxsize=128)
def block_causal_pieces(segments: tuple, q_len: int, kv_len: int) -> tuple[tuple[int, int, int, bool], ...]:
    """Split a block-causal call into (q_start, q_end, keys, masked) pieces, in q's own row indexing.

    A query in segment s sees exactly keys [0, end_s): a full prefix, so each long trailing segment is a
    *dense* rectangular call on q[q_start:q_end] against k[:keys], with no mask and no wasted work. The short
    leading segments (VAR's 1, 4, 9, ... token scales) go together into one masked call. For VAR-d30's 680
    tokens this computes 63% of the dense pairs instead of 100% (the useful share is 62%).
    """
    ends = list(itertools.accumulate(segments))
    q0 = kv_len - q_len  # position of the first query (queries are the last q_len tokens)
    pieces = []
    s = len(segments) - 1
    while s >= 0 and ends[s] > q0 and min(segments[s], ends[s] - q0) >= MIN_DENSE_PIECE:
        pieces.append((max(ends[s] - segments[s] - q0, 0), ends[s] - q0, ends[s], False))
        s -= 1
    if s >= 0 and ends[s] > q0:
        pieces.append((0, ends[s] - q0, ends[s], True))
    return tuple(reversed(pieces))


@functools.lru_cache(maxsize=32)
def _cached_dense_mask(mask_key: tuple, q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """Dense mask of a data-independent pattern (mask_key = (pattern, ...)), built once per shape."""
    segments = mask_key[1] if mask_key[0] == "block_causal" else None
    return masks.dense_mask(pattern_mod(mask_key[0], q_len, kv_len, segments, device), None, None, q_len, kv_len, device)


def _fail(message: str) -> None:
    raise ValueError(message)


def _check_tensors(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            _fail(f"{name} must be 4-D (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            _fail(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if not (q.device == k.device == v.device):
        _fail(f"q, k, v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        _fail(f"q, k, v must have one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        _fail(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        _fail(f"k and v must have the same number of heads, got k {k.shape[1]} and v {v.shape[1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        _fail(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]}) for grouped-query attention")
    if q.shape[-1] != k.shape[-1]:
        _fail(f"head_dim of q ({q.shape[-1]}) and k ({k.shape[-1]}) differ")
    if k.shape[2] != v.shape[2]:
        _fail(f"k and v must have the same number of tokens, got k {k.shape[2]} and v {v.shape[2]}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        _fail(f"q and k need at least one token, got Nq={q.shape[2]}, Nk={k.shape[2]}")


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale) or scale <= 0:
        _fail(f"scale must be a positive finite number or None, got {scale!r}")
    return float(scale)


def _check_segments(pattern: str, segments, kv_len: int, q_len: int) -> tuple[int, ...] | None:
    if pattern != "block_causal":
        if segments is not None:
            _fail(f"segments only apply to pattern='block_causal', got pattern={pattern!r}")
        return None
    if segments is None:
        _fail("pattern='block_causal' needs segments (a list of segment lengths summing to Nk)")
    if isinstance(segments, Tensor):
        segments = segments.tolist()
    try:
        segs = tuple(int(s) for s in segments)
    except (TypeError, ValueError):
        _fail(f"segments must be a sequence of positive ints, got {segments!r}")
    if any(s <= 0 for s in segs) or any(int(s) != s for s in segments):
        _fail(f"segments must be positive ints, got {list(segments)}")
    if sum(segs) != kv_len:
        _fail(f"segments sum to {sum(segs)} but k has Nk={kv_len} tokens")
    if q_len > kv_len:
        _fail(f"block_causal needs Nq <= Nk (queries are the last Nq tokens), got Nq={q_len}, Nk={kv_len}")
    return segs


def _check_key_padding(key_padding_mask, B: int, kv_len: int, device) -> Tensor | None:
    if key_padding_mask is None:
        return None
    if not isinstance(key_padding_mask, Tensor):
        _fail(f"key_padding_mask must be a bool tensor of shape (B, Nk), got {type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        _fail(f"key_padding_mask must have dtype torch.bool (True = keep), got {key_padding_mask.dtype}")
    if tuple(key_padding_mask.shape) != (B, kv_len):
        _fail(f"key_padding_mask must have shape (B, Nk) = {(B, kv_len)}, got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != device:
        _fail(f"key_padding_mask is on {key_padding_mask.device}, q/k/v on {device}")
    return key_padding_mask


def _check_index_tensor(name: str, idx: Tensor, limit: int, device) -> None:
    if idx.dtype not in (torch.int64, torch.int32):
        _fail(f"{name} must hold integer indices (int64/int32), got {idx.dtype}")
    if idx.device != device:
        _fail(f"{name} is on {idx.device}, q/k/v on {device}")
    # The range check reads the indices on the host (a GPU sync); a traced graph cannot, and there
    # torch.gather's own bounds check still fails loudly on a bad index.
    if torch.compiler.is_compiling():
        return
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limit):
        _fail(f"{name} out of range: indices must lie in [0, {limit}), got min {int(idx.min())}, max {int(idx.max())}")


def _gather_index(name: str, index: IndexArg, B: int, heads: int, limit: int, device, allow_per_head: bool):
    """Normalise a token index to (positions (B, Hi, n) long, keep (B, Hi, n) bool or None).

    Hi is 1 for per-sample indices and ``heads`` for per-head ones. Unequal counts (a list) are padded with
    position 0 (a real token, so gathered values stay finite) and flagged in ``keep``.
    """
    if isinstance(index, Tensor):
        _check_index_tensor(name, index, limit, device)
        if index.dim() == 2 and index.shape[0] == B:
            return index.long()[:, None, :], None
        if allow_per_head and index.dim() == 3 and index.shape[:2] == (B, heads):
            return index.long(), None
        expected = f"(B, n) = ({B}, n)" + (f" or per kv-head (B, Hkv, n) = ({B}, {heads}, n)" if allow_per_head else "")
        _fail(f"{name} must have shape {expected}, got {tuple(index.shape)}")
    if not isinstance(index, (list, tuple)):
        _fail(f"{name} must be a LongTensor or a list of B LongTensors, got {type(index).__name__}")
    if len(index) != B:
        _fail(f"{name} is a list of {len(index)} tensors but the batch has B={B}")
    per_head = None
    for i, idx in enumerate(index):
        if not isinstance(idx, Tensor):
            _fail(f"{name}[{i}] must be a LongTensor, got {type(idx).__name__}")
        _check_index_tensor(f"{name}[{i}]", idx, limit, device)
        this_per_head = idx.dim() == 2
        shape_ok = idx.dim() == 1 or (allow_per_head and idx.dim() == 2 and idx.shape[0] == heads)
        if not shape_ok:
            _fail(f"{name}[{i}] must be 1-D (n_i,)" + (f" or per kv-head ({heads}, n_i)" if allow_per_head else "")
                  + f", got shape {tuple(idx.shape)}")
        if per_head is not None and per_head != this_per_head:
            _fail(f"{name} mixes per-sample (1-D) and per-head (2-D) entries")
        per_head = this_per_head
    counts = [idx.shape[-1] for idx in index]
    n = max(counts)
    if n == 0:
        _fail(f"{name} keeps no token in any sample")
    hi = heads if per_head else 1
    pos = torch.zeros(B, hi, n, dtype=torch.long, device=device)
    keep = torch.zeros(B, hi, n, dtype=torch.bool, device=device)
    for i, idx in enumerate(index):
        c = idx.shape[-1]
        pos[i, :, :c] = idx.long().reshape(-1, c) if per_head else idx.long()
        keep[i, :, :c] = True
    if len(set(counts)) == 1:
        keep = None  # a list with equal counts is just a stacked tensor
    return pos, keep


def _gather_tokens(t: Tensor, pos: Tensor) -> Tensor:
    """t (B, Ht, N, D) gathered at pos (B, 1|Ht, n) along tokens -> (B, Ht, n, D)."""
    B, Ht, _, D = t.shape
    index = pos[..., None].expand(B, Ht, pos.shape[-1], D)
    return torch.gather(t, 2, index)


def prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pattern: str = "dense",
    segments: Sequence[int] | None = None,
    key_padding_mask: Tensor | None = None,
    q_index: IndexArg = None,
    kv_index: IndexArg = None,
    scale: float | None = None,
) -> Problem:
    """Validate the user's arguments and build the normalised Problem (see module docstring)."""
    _check_tensors(q, k, v)
    if not isinstance(pattern, str) or pattern not in masks.PATTERNS:
        _fail(f"unknown attention pattern {pattern!r}; expected one of {masks.PATTERNS}")
    B, H, Nq_full, D = q.shape
    Hkv, Nk_full = k.shape[1], k.shape[2]
    device = q.device
    group = H // Hkv
    scale = _check_scale(scale, D)
    segs = _check_segments(pattern, segments, Nk_full, Nq_full)
    kpm = _check_key_padding(key_padding_mask, B, Nk_full, device)

    # --- token subsets: gather into a smaller dense batch ------------------------------------------------
    q_pos = q_keep = kv_pos = kv_keep = None
    if q_index is not None:
        q_pos3, q_keep3 = _gather_index("q_index", q_index, B, H, Nq_full, device, allow_per_head=False)
        q = _gather_tokens(q, q_pos3)
        q_pos = q_pos3[:, 0]
        q_keep = None if q_keep3 is None else q_keep3[:, 0]
    if kv_index is not None:
        kv_pos, kv_keep = _gather_index("kv_index", kv_index, B, Hkv, Nk_full, device, allow_per_head=True)
        k = _gather_tokens(k, kv_pos)
        v = _gather_tokens(v, kv_pos)
    if kpm is not None:
        # The user's padding mask speaks about original keys; carry it to the gathered ones.
        if kv_pos is None:
            kpm_kept = kpm[:, None, :]
        else:
            kpm_kept = torch.gather(kpm[:, None, :].expand(B, kv_pos.shape[1], Nk_full), 2, kv_pos)
        kv_keep = kpm_kept if kv_keep is None else (kv_keep & kpm_kept)
    Nq, Nk = q.shape[2], k.shape[2]
    per_head = (kv_pos is not None and kv_pos.shape[1] > 1) or (kv_keep is not None and kv_keep.shape[1] > 1)

    # --- the pattern, on original positions -----------------------------------------------------------
    full_mod = pattern_mod(pattern, Nq_full, Nk_full, segs, device)
    gathered = q_index is not None or kv_index is not None
    positional = pattern != "dense" and gathered
    keyed = kv_keep is not None

    # Rows that see no key at all are opened to every key for the kernel ("rescued", see masks.whole_rows)
    # and zeroed afterwards, like padded query slots.
    empty = None
    if keyed or positional or (pattern == "causal" and Nq_full > Nk_full):
        qp = q_pos if q_pos is not None else torch.arange(Nq, device=device).expand(B, Nq)
        kp = kv_pos if kv_pos is not None else torch.arange(Nk, device=device).expand(B, 1, Nk)
        empty = masks.rows_without_keys(full_mod, qp, kp, kv_keep, group)  # (B, 1|H, 1|Nq)
    zero_rows = empty
    if q_keep is not None:
        zero_rows = ~q_keep[:, None, :] if empty is None else (empty | ~q_keep[:, None, :])

    # --- cheapest exact form ---------------------------------------------------------------------------
    mask_key = None
    if pattern == "dense" and not keyed:
        form, mask_mod = "none", None
    elif pattern == "causal" and not keyed and not gathered and Nq_full <= Nk_full:
        if Nq == 1:  # one query at the end of the keys (a decode step) sees every key: no mask at all
            form, mask_mod = "none", None
        else:
            form = "causal" if Nq == Nk else "causal_bottom_right"
            mask_mod, mask_key = full_mod, ("causal",)
    elif pattern == "block_causal" and not keyed and not gathered:
        form, mask_mod, mask_key = "block_causal", full_mod, ("block_causal", segs)
    else:
        form = "explicit"
        # Flex applies mask_mods to every real (b, h), so per-sample tensors must not keep a size-1 head dim.
        kv_pos_mod = kv_pos[:, 0] if kv_pos is not None and kv_pos.shape[1] == 1 else kv_pos
        mod = masks.on_positions(full_mod, q_pos, kv_pos_mod, group) if positional else full_mod
        if keyed:
            keep = kv_keep[:, 0] if kv_keep.shape[1] == 1 else kv_keep
            mod = masks.and_masks(mod, masks.padding(keep, group))
        mask_mod = mod if empty is None else masks.or_masks(mod, masks.whole_rows(empty))

    key_row_mask = None
    if form == "explicit" and pattern == "dense" and not gathered and not per_head and kv_keep is not None \
            and (empty is None or empty.shape[1:] == (1, 1)):
        key_row_mask = kv_keep[:, :, None, :] if empty is None else (kv_keep[:, :, None, :] | empty[..., None])
    per_batch = form == "explicit"
    per_head_mask = per_batch and (per_head or (empty is not None and empty.shape[1] > 1))
    return Problem(
        q=q,
        k=k,
        v=v,
        scale=scale,
        pattern=pattern,
        form=form,
        mask_mod=mask_mod,
        mask_key=mask_key,
        mask_per_batch=per_batch,
        mask_per_head=per_head_mask,
        zero_rows=zero_rows,
        key_row_mask=key_row_mask,
        needs_grad=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
    )


def tiny_like(p: Problem, seed: int = 0) -> Problem:
    """A small Problem with the same features as ``p``: used to probe whether a kernel really runs it."""
    _, _, dtype, D, Dv, form, gqa, shape, per_head, needs_grad = p.features
    device = p.q.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    # Odd lengths on purpose: kernels that need aligned sequence lengths (or pad masks) must show it here.
    Nq, Nk = {"square": (13, 13), "q<k": (7, 21), "q>k": (21, 7), "k=1": (1, 1)}[shape]
    Hkv = 1 if gqa else 2
    H = 2
    B = 2

    def rand(*shape_):
        return torch.randn(*shape_, generator=g).to(device=device, dtype=dtype).requires_grad_(needs_grad)

    q, k, v = rand(B, H, Nq, D), rand(B, Hkv, Nk, D), rand(B, Hkv, Nk, Dv)
    kwargs: dict = {}
    if form in ("causal", "causal_bottom_right"):
        kwargs["pattern"] = "causal"
    elif form == "block_causal":
        kwargs.update(pattern="block_causal", segments=[1, 3, 4, Nk - 8])
    elif form == "explicit":
        kwargs["pattern"] = "causal"
        if per_head:
            keep_per_head = torch.stack([torch.arange(0, Nk - 1, 2), torch.arange(1, Nk, 2)])[:Hkv]
            kwargs["kv_index"] = keep_per_head.to(device)[None].expand(B, Hkv, -1).contiguous()
        else:
            kpm = torch.ones(B, Nk, dtype=torch.bool)
            kpm[1, Nk // 2:] = False
            kwargs["key_padding_mask"] = kpm.to(device)
    with torch.set_grad_enabled(needs_grad):
        tiny = prepare(q, k, v, **kwargs)
    if tiny.form != form:
        # Can only happen if prepare's form rules change; fail loudly rather than probe the wrong thing.
        raise AssertionError(f"tiny probe problem has form {tiny.form!r}, wanted {form!r}")
    return tiny
