"""caching.KVCache: in-place appends equal concatenation, eviction keeps the chosen tokens per row and head,
memory accounting is exact, bad input is refused."""

import pytest
import torch

from caching import CachePolicy, FullCache, KVCache, kv_bytes


def test_append_equals_concatenation_and_accounts_bytes():
    g = torch.Generator().manual_seed(0)
    cache = KVCache(2, batch=3, kv_heads=2, head_dim=4, capacity=10, dtype=torch.float16)
    ks, vs = [], []
    for seg, n in enumerate([1, 4, 2]):
        k, v = torch.randn(3, 2, n, 4, generator=g), torch.randn(3, 2, n, 4, generator=g)
        ks.append(k)
        vs.append(v)
        for layer in range(2):
            k_all, v_all = cache.append(layer, k, v, segment=seg)
    torch.testing.assert_close(k_all, torch.cat(ks, 2).half())
    torch.testing.assert_close(v_all, torch.cat(vs, 2).half())
    assert cache.length(1) == 7
    assert cache.nbytes() == kv_bytes(2, 7, 2, 4, batch=3, dtype=torch.float16) == 2 * 2 * 7 * 2 * 4 * 3 * 2
    assert cache.allocated_bytes() == kv_bytes(2, 10, 2, 4, batch=3, dtype=torch.float16)
    per_token = 2 * 2 * 2 * 4 * 3 * 2  # one token: 2 layers, K+V, 2 heads, dim 4, batch 3, fp16
    assert cache.bytes_per_segment() == {0: per_token * 1, 1: per_token * 4, 2: per_token * 2}
    assert cache[0].positions[0, 0].tolist() == list(range(7))


class KeepLastTwo(CachePolicy):
    name = "last-two"

    def select(self, layer, cache, q):
        B, H = cache.k.shape[:2]
        if cache.length <= 2:
            return None
        return torch.arange(cache.length - 2, cache.length).expand(B, H, 2)


def test_policy_eviction_per_layer_and_head():
    cache = KVCache(1, batch=1, kv_heads=2, head_dim=2, capacity=8, policy=KeepLastTwo())
    for step in range(5):
        k = torch.full((1, 2, 1, 2), float(step))
        cache.append(0, k, k, segment=step)
    assert cache.length(0) == 2
    assert cache[0].k[0, :, :, 0].tolist() == [[3.0, 4.0], [3.0, 4.0]]
    assert cache[0].positions[0, 0].tolist() == [3, 4]
    # per-head different choices
    cache.keep(0, torch.tensor([[[1], [0]]]))
    assert cache[0].k[0, :, 0, 0].tolist() == [4.0, 3.0]
    assert cache[0].positions[0, :, 0].tolist() == [4, 3]


def test_bad_input_is_refused():
    cache = KVCache(1, batch=2, kv_heads=2, head_dim=4, capacity=3, policy=FullCache())
    with pytest.raises(ValueError, match="expected k, v"):
        cache.append(0, torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4))
    with pytest.raises(ValueError, match="capacity"):
        cache.append(0, torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 4))
    assert cache.length(0) == 0  # nothing written by a refused append
    with pytest.raises(ValueError, match="positive"):
        KVCache(0, 1, 1, 1, 1)
    cache.append(0, torch.zeros(2, 2, 2, 4), torch.zeros(2, 2, 2, 4))
    with pytest.raises(ValueError, match="out of range"):
        cache.keep(0, torch.full((2, 2, 1), 5))


def test_reorder_rows():
    cache = KVCache(1, batch=3, kv_heads=1, head_dim=1, capacity=2)
    cache.append(0, torch.arange(3.0).view(3, 1, 1, 1), torch.zeros(3, 1, 1, 1))
    cache.reorder(torch.tensor([2, 0]))
    assert cache[0].k.flatten().tolist() == [2.0, 0.0] and cache.batch == 2
