"""KV caches for autoregressive decoding: VAR (append a whole scale at a time) and the vision-language decoders
(prefill, then one token per step), with exact memory accounting and a pluggable compression policy.

Layout: one `LayerKV` per decoder layer, each holding preallocated K and V buffers of shape
(B, H_kv, capacity, D) written in place at the current length (gpt-fast's KVCache: no torch.cat per step, so
decoding does not copy the whole cache every token, and the buffers keep their address for CUDA graphs).
Layers are independent: after compression a layer may hold fewer tokens than another (ScaleKV gives drafter
layers larger budgets than refiner layers), and within a layer every (batch row, head) keeps the same number
of tokens, chosen per row and head, so K/V stay dense tensors that attention reads without padding.

Each cached token remembers its original position and the *segment* (scale index for VAR, 0 = prompt / 1.. =
decode steps for a language model) it was appended with, so memory can be reported per layer and per scale and
masks can be built from original positions.

A policy (`CachePolicy`) is asked after each append whether to evict; `FullCache` never does. Compression
policies return, per layer, the indices (B, H_kv, keep) of the tokens to keep; the cache gathers them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor


class CachePolicy(ABC):
    """Decides which cached tokens a layer keeps. Called by `KVCache.append` after the new tokens are written.

    `select(layer, cache, q)` returns None (keep everything) or a LongTensor (B, H_kv, keep) of indices into the
    layer's live tokens, in the order they should be stored (position order is customary). `q` is the query of
    the tokens just appended, (B, H_q, n, D), for policies that score keys by the current queries (ScaleKV's
    observation window); it may be None when the caller does not provide it.
    """

    name = "policy"

    @abstractmethod
    def select(self, layer: int, cache: "LayerKV", q: Tensor | None) -> Tensor | None:
        """None (keep all) or the (B, H_kv, keep) indices of the live tokens to keep."""


class FullCache(CachePolicy):
    """Keep every token (the reference every compression policy is measured against)."""

    name = "full"

    def select(self, layer: int, cache: "LayerKV", q: Tensor | None) -> Tensor | None:
        return None


@dataclass
class LayerKV:
    """One layer's K/V: buffers (B, H_kv, capacity, D) and, per live token, its position and segment."""

    k_buf: Tensor
    v_buf: Tensor
    pos_buf: Tensor  # (B, H_kv, capacity) int64: original position of each live token
    seg_buf: Tensor  # (B, H_kv, capacity) int32: segment (scale / step) it arrived with
    length: int = 0  # live tokens (the same for every row and head of this layer)
    appended: int = 0  # tokens ever appended (the next original position)

    @property
    def k(self) -> Tensor:
        return self.k_buf[:, :, : self.length]

    @property
    def v(self) -> Tensor:
        return self.v_buf[:, :, : self.length]

    @property
    def positions(self) -> Tensor:
        return self.pos_buf[:, :, : self.length]

    @property
    def segments(self) -> Tensor:
        return self.seg_buf[:, :, : self.length]

    @property
    def capacity(self) -> int:
        return self.k_buf.shape[2]

    def bytes_per_token(self) -> int:
        """K and V bytes of one cached token across the batch and the kv heads."""
        B, H, _, D = self.k_buf.shape
        return B * H * (D * self.k_buf.element_size() + self.v_buf.shape[-1] * self.v_buf.element_size())

    def nbytes(self) -> int:
        return self.length * self.bytes_per_token()


class KVCache:
    """Per-layer K/V storage for one batch of sequences.

    cache = KVCache(num_layers, batch, kv_heads, head_dim, capacity, dtype=..., device=..., policy=FullCache())
    k_all, v_all = cache.append(layer, k_new, v_new, segment=s)   # (B, H_kv, n, D) in, live K/V out

    `capacity` is the most tokens one layer ever holds before eviction (prompt + new tokens for a language model,
    the sum of all scales for VAR). Appending past it raises instead of silently reallocating.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 policy: CachePolicy | None = None, v_head_dim: int | None = None):
        if min(num_layers, batch, kv_heads, head_dim, capacity) <= 0:
            raise ValueError(f"KVCache sizes must be positive: layers={num_layers}, batch={batch}, "
                             f"kv_heads={kv_heads}, head_dim={head_dim}, capacity={capacity}")
        self.policy = policy or FullCache()
        vd = v_head_dim or head_dim
        self.layers = [
            LayerKV(
                k_buf=torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device),
                v_buf=torch.zeros(batch, kv_heads, capacity, vd, dtype=dtype, device=device),
                pos_buf=torch.zeros(batch, kv_heads, capacity, dtype=torch.long, device=device),
                seg_buf=torch.zeros(batch, kv_heads, capacity, dtype=torch.int32, device=device),
            )
            for _ in range(num_layers)
        ]

    # ------------------------------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> LayerKV:
        return self.layers[layer]

    def length(self, layer: int = 0) -> int:
        return self.layers[layer].length

    @property
    def batch(self) -> int:
        return self.layers[0].k_buf.shape[0]

    def append(self, layer: int, k: Tensor, v: Tensor, *, segment: int = 0, q: Tensor | None = None
               ) -> tuple[Tensor, Tensor]:
        """Write `k`, `v` (B, H_kv, n, D) after the layer's live tokens, let the policy evict, and return the
        layer's live K and V (views of the buffers, valid until the next append to this layer)."""
        L = self.layers[layer]
        B, H, cap, D = L.k_buf.shape
        if k.ndim != 4 or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D or v.shape[:3] != k.shape[:3] \
                or v.shape[3] != L.v_buf.shape[3]:
            raise ValueError(f"layer {layer}: expected k, v of shape ({B}, {H}, n, {D}) / (..., {L.v_buf.shape[3]}), "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        n = k.shape[2]
        if L.length + n > cap:
            raise ValueError(f"layer {layer}: {L.length} cached + {n} new tokens exceed the capacity {cap}; "
                             f"build the cache with a larger capacity")
        sl = slice(L.length, L.length + n)
        L.k_buf[:, :, sl] = k.to(L.k_buf.dtype)
        L.v_buf[:, :, sl] = v.to(L.v_buf.dtype)
        L.pos_buf[:, :, sl] = torch.arange(L.appended, L.appended + n, device=L.pos_buf.device)
        L.seg_buf[:, :, sl] = segment
        L.length += n
        L.appended += n
        keep = self.policy.select(layer, L, q)
        if keep is not None:
            self.keep(layer, keep)
        return L.k, L.v

    def keep(self, layer: int, index: Tensor) -> None:
        """Keep only the live tokens `index` (B, H_kv, m) of one layer, compacted to the front of its buffers."""
        L = self.layers[layer]
        B, H = L.k_buf.shape[:2]
        if index.ndim != 3 or index.shape[:2] != (B, H):
            raise ValueError(f"layer {layer}: keep index must be ({B}, {H}, m), got {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= L.length):
            raise ValueError(f"layer {layer}: keep index out of range [0, {L.length})")
        m = index.shape[2]
        idx_d = index.unsqueeze(-1)
        k = L.k.gather(2, idx_d.expand(-1, -1, -1, L.k_buf.shape[3]))
        v = L.v.gather(2, idx_d.expand(-1, -1, -1, L.v_buf.shape[3]))
        pos = L.positions.gather(2, index)
        seg = L.segments.gather(2, index)
        L.k_buf[:, :, :m] = k
        L.v_buf[:, :, :m] = v
        L.pos_buf[:, :, :m] = pos
        L.seg_buf[:, :, :m] = seg
        L.length = m

    def reset(self) -> None:
        for L in self.layers:
            L.length = 0
            L.appended = 0

    def reorder(self, rows: Tensor) -> None:
        """Keep / reorder batch rows (e.g. drop finished sequences): rows is a LongTensor of row indices; the
        buffers shrink to len(rows) rows."""
        for L in self.layers:
            L.k_buf = L.k_buf.index_select(0, rows)
            L.v_buf = L.v_buf.index_select(0, rows)
            L.pos_buf = L.pos_buf.index_select(0, rows)
            L.seg_buf = L.seg_buf.index_select(0, rows)

    # ------------------------------------------------------------------------------------------ memory
    def nbytes(self) -> int:
        """Bytes of live K/V over all layers (what the cache needs; the preallocation may be larger)."""
        return sum(L.nbytes() for L in self.layers)

    def allocated_bytes(self) -> int:
        """Bytes of the K/V buffers as allocated (capacity × bytes per token, all layers)."""
        return sum(L.capacity * L.bytes_per_token() for L in self.layers)

    def bytes_per_layer(self) -> list[int]:
        return [L.nbytes() for L in self.layers]

    def bytes_per_segment(self) -> dict[int, int]:
        """Live K/V bytes by the segment (scale / step) the tokens arrived with, summed over layers."""
        out: dict[int, int] = {}
        for L in self.layers:
            if not L.length:
                continue
            B, H = L.k_buf.shape[:2]
            per_token_head = L.bytes_per_token() // (B * H)
            segs, counts = torch.unique(L.segments, return_counts=True)
            for s, c in zip(segs.tolist(), counts.tolist()):
                out[s] = out.get(s, 0) + c * per_token_head
        return dict(sorted(out.items()))

    def memory_report(self) -> dict:
        return {"policy": self.policy.name, "live_bytes": self.nbytes(), "allocated_bytes": self.allocated_bytes(),
                "bytes_per_layer": self.bytes_per_layer(), "bytes_per_segment": self.bytes_per_segment(),
                "tokens_per_layer": [L.length for L in self.layers]}


def kv_bytes(num_layers: int, tokens: int, kv_heads: int, head_dim: int, batch: int = 1,
             dtype: torch.dtype = torch.float16) -> int:
    """Analytic K+V bytes of a full cache: 2 · layers · tokens · kv_heads · head_dim · batch · element size."""
    return 2 * num_layers * tokens * kv_heads * head_dim * batch * torch.empty((), dtype=dtype).element_size()
