"""Tests of the shared attention layer (attention/).

Every backend that runs on the test machine is compared with an *independent* float64 oracle written here
(its masks are built from the pattern definitions directly, not with attention.masks), forward and backward,
for every pattern. CUDA-only checks are marked ``gpu`` and skipped without a GPU.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import attention as attn
from attention import attention, backends, explain, masks, use_backend
from attention.dispatch import AUTO_TABLE, ENV_VAR, table_row
from attention.problem import prepare

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """A DITSTUDIO_ATTENTION_BACKEND set in the shell must not steer these tests (those that need it set it)."""
    monkeypatch.delenv(ENV_VAR, raising=False)


def devices_and_backends() -> list[tuple[str, str]]:
    """(device, backend) pairs that can run here: every backend whose supports() accepts a plain call."""
    pairs = []
    for device in ["cpu"] + (["cuda"] if CUDA else []):
        for name, (ok, _) in attn.available_backends(device, dtype=torch.bfloat16 if device == "cuda" else None).items():
            if ok:
                pairs.append((device, name))
    return pairs


CPU_BACKENDS = [name for device, name in devices_and_backends() if device == "cpu"]


def test_expected_cpu_backends_are_available():
    # If this changes, the parity tests below silently test less: make it loud.
    assert CPU_BACKENDS == ["sdpa_flash", "sdpa_math", "flex", "reference"]


# ---------------------------------------------------------------------------------------------------------
# Independent oracle
# ---------------------------------------------------------------------------------------------------------


def oracle_allowed(pattern, q_positions, kv_positions, q_full, kv_full, segments):
    """Boolean (nq, nk) mask from the definitions: positions are indices into the full sequences."""
    offset = kv_full - q_full  # queries are the last q_full tokens
    pq = q_positions.view(-1, 1) + offset
    pk = kv_positions.view(1, -1)
    if pattern == "dense":
        return torch.ones(pq.shape[0], pk.shape[1], dtype=torch.bool)
    if pattern == "causal":
        return pk <= pq
    if pattern == "block_causal":
        seg = torch.tensor([s for s, length in enumerate(segments) for _ in range(length)])
        return seg[pk] <= seg[pq]
    raise AssertionError(pattern)


def oracle(q, k, v, *, pattern="dense", segments=None, key_padding_mask=None, q_index=None, kv_index=None,
           scale=None):
    """float64 attention, one (sample, head) at a time, rows without keys -> 0, padded query rows -> 0."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = H // Hkv
    scale = D ** -0.5 if scale is None else scale
    per_sample = []
    for b in range(B):
        qi = torch.arange(Nq) if q_index is None else q_index[b].cpu()
        heads = []
        for h in range(H):
            if kv_index is None:
                ki = torch.arange(Nk)
            else:
                ki = kv_index[b].cpu()
                if ki.dim() == 2:  # per kv-head
                    ki = ki[h // group]
            qq = q[b, h, qi.to(q.device)].double()
            kk = k[b, h // group, ki.to(q.device)].double()
            vv = v[b, h // group, ki.to(q.device)].double()
            allowed = oracle_allowed(pattern, qi, ki, Nq, Nk, segments)
            if key_padding_mask is not None:
                allowed = allowed & key_padding_mask[b].cpu()[ki].view(1, -1)
            allowed = allowed.to(q.device)
            scores = (qq @ kk.T * scale).masked_fill(~allowed, -math.inf)
            probs = torch.softmax(scores, dim=-1)
            probs = torch.where(allowed.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
            heads.append(probs @ vv)
        per_sample.append(torch.stack(heads))
    n = max(x.shape[1] for x in per_sample)
    return torch.stack([F.pad(x, (0, 0, 0, n - x.shape[1])) for x in per_sample])


# ---------------------------------------------------------------------------------------------------------
# Cases: every pattern, odd lengths
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    make: Callable  # (generator, dtype, device) -> (q, k, v, kwargs)


def _rand(g, dtype, device, *shape):
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _case(name, B, H, Hkv, Nq, Nk, D, Dv=None, **extra):
    def make(g, dtype, device):
        q = _rand(g, dtype, device, B, H, Nq, D)
        k = _rand(g, dtype, device, B, Hkv, Nk, D)
        v = _rand(g, dtype, device, B, Hkv, Nk, Dv or D)
        kwargs = {key: (val(g, device) if callable(val) else val) for key, val in extra.items()}
        return q, k, v, kwargs

    return Case(name, make)


def _kpm(B, Nk, empty_sample=False):
    def make(g, device):
        keep = torch.rand(B, Nk, generator=g) > 0.35
        keep[:, 0] = True
        if empty_sample:
            keep[-1] = False  # a sample with no key at all: its rows must come out as zeros
        return keep.to(device)

    return make


def _index(B, N, n, heads=None):
    def make(g, device):
        shape = (B, heads) if heads else (B,)
        rows = [torch.randperm(N, generator=g)[:n].sort().values for _ in range(math.prod(shape))]
        return torch.stack(rows).view(*shape, n).to(device)

    return make


def _uneven(counts, N):
    def make(g, device):
        return [torch.randperm(N, generator=g)[:c].to(device) for c in counts]  # unsorted on purpose

    return make


CASES = [
    _case("dense_self", 2, 2, 2, 37, 37, 64),
    _case("dense_cross", 2, 2, 2, 37, 53, 72),
    _case("dense_v_dim", 1, 2, 2, 19, 23, 64, Dv=32),
    _case("causal_square", 2, 2, 2, 37, 37, 80, pattern="causal"),
    _case("causal_rect", 2, 2, 2, 37, 53, 64, pattern="causal"),
    _case("causal_q_longer", 1, 2, 2, 29, 17, 64, pattern="causal"),
    _case("block_causal", 2, 2, 2, 30, 30, 64, pattern="block_causal", segments=[1, 4, 9, 16]),
    _case("block_causal_rect", 2, 2, 2, 20, 30, 64, pattern="block_causal", segments=[1, 4, 9, 16]),
    _case("gqa_causal", 2, 4, 2, 37, 37, 64, pattern="causal"),
    _case("gqa_mqa_dense", 2, 4, 1, 23, 31, 64),
    _case("padding_dense", 3, 2, 2, 37, 53, 64, key_padding_mask=_kpm(3, 53, empty_sample=True)),
    _case("padding_causal", 2, 2, 2, 37, 53, 64, pattern="causal", key_padding_mask=_kpm(2, 53)),
    _case("subset_equal", 2, 2, 2, 41, 41, 64, q_index=_index(2, 41, 17), kv_index=_index(2, 41, 29)),
    _case("subset_unequal", 3, 2, 2, 41, 41, 64, q_index=_uneven([17, 5, 30], 41), kv_index=_uneven([29, 41, 9], 41)),
    _case("subset_causal", 2, 2, 2, 41, 41, 64, pattern="causal", q_index=_index(2, 41, 13),
          kv_index=_uneven([20, 33], 41)),
    _case("per_head_kv_gqa", 2, 4, 2, 37, 41, 64, kv_index=_index(2, 41, 19, heads=2)),
    _case("per_head_kv_block_causal", 2, 2, 2, 30, 30, 64, pattern="block_causal", segments=[1, 4, 9, 16],
          kv_index=_index(2, 30, 11, heads=2), key_padding_mask=_kpm(2, 30)),
]
CASE_IDS = [c.name for c in CASES]


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _assert_close(actual, expected, rtol, what):
    """max |actual - expected| <= rtol * max |expected| (a relative error over the whole tensor)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * scale + 1e-7, f"{what}: max error {err:.3e} > {rtol:.0e} x max {scale:.3e}"


# Calls a backend legitimately cannot run: forcing it must raise a ValueError with this reason.
EXPECTED_UNSUPPORTED = {
    ("sdpa_flash", "dense_v_dim"): "same last dimension",
}


def _check_against_oracle(backend, case, device, dtype, rtol, grad_rtol, backward):
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    q, k, v, kwargs = case.make(g, dtype, device)
    if device == "cpu" and (backend, case.name) in EXPECTED_UNSUPPORTED:
        with pytest.raises(ValueError, match=EXPECTED_UNSUPPORTED[backend, case.name]):
            attention(*(_leaves((q, k, v)) if backward else (q, k, v)), backend=backend, **kwargs)
        return
    expected_inputs = _leaves((q, k, v), torch.float64)
    expected = oracle(*expected_inputs, **kwargs)
    inputs = _leaves((q, k, v)) if backward else (q, k, v)
    out = attention(*inputs, backend=backend, **kwargs)
    assert out.dtype == dtype
    _assert_close(out, expected, rtol, f"{backend}/{case.name} forward")
    if backward:
        upstream = torch.randn(out.shape, generator=g).to(device)
        got = torch.autograd.grad(out, inputs, upstream.to(dtype))
        want = torch.autograd.grad(expected, expected_inputs, upstream.double())
        for name, a, b in zip("qkv", got, want):
            _assert_close(a, b, grad_rtol, f"{backend}/{case.name} d{name}")


# ---------------------------------------------------------------------------------------------------------
# Parity: every CPU backend x every pattern, float32 forward + backward, bfloat16 forward
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backend_float32_matches_oracle(backend, case):
    # FlexAttention has no backward on CPU (torch limitation): forward only, and see the test further down.
    _check_against_oracle(backend, case, "cpu", torch.float32, rtol=1e-5, grad_rtol=1e-5, backward=backend != "flex")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backend_bfloat16_forward_matches_oracle(backend, case):
    _check_against_oracle(backend, case, "cpu", torch.bfloat16, rtol=3e-2, grad_rtol=None, backward=False)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_auto_dispatch_matches_oracle_in_training(case):
    _check_against_oracle(None, case, "cpu", torch.float32, rtol=1e-5, grad_rtol=1e-5, backward=True)


# ---------------------------------------------------------------------------------------------------------
# Mask code against masks built independently
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("Nq,Nk", [(37, 53), (53, 53), (1, 53), (53, 37)])
def test_causal_lower_right_dense_mask(Nq, Nk):
    got = masks.dense_mask(masks.causal_lower_right(Nq, Nk), None, None, Nq, Nk)
    want = torch.tensor([[j <= i + Nk - Nq for j in range(Nk)] for i in range(Nq)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("segments,Nq", [([1, 4, 9, 16], 30), ([1, 4, 9, 16], 16), ([3, 5, 7], 9), ([6], 2)])
def test_block_causal_dense_mask(segments, Nq):
    Nk = sum(segments)
    seg = [s for s, length in enumerate(segments) for _ in range(length)]
    got = masks.dense_mask(masks.block_causal(segments, Nq), None, None, Nq, Nk)
    want = torch.tensor([[seg[j] <= seg[i + Nk - Nq] for j in range(Nk)] for i in range(Nq)])
    assert torch.equal(got, want)


def test_composed_masks_dense_mask():
    g = torch.Generator().manual_seed(3)
    B, Nq, Nk = 3, 7, 11
    keep = torch.rand(B, Nk, generator=g) > 0.5
    mod = masks.or_masks(masks.and_masks(masks.causal_lower_right(Nq, Nk), masks.padding(keep)),
                         lambda b, h, qi, kj: (qi == 0) & (kj == 0))
    got = masks.dense_mask(mod, B, None, Nq, Nk)
    want = torch.zeros(B, 1, Nq, Nk, dtype=torch.bool)
    for b in range(B):
        for i in range(Nq):
            for j in range(Nk):
                want[b, 0, i, j] = (j <= i + Nk - Nq and bool(keep[b, j])) or (i == 0 and j == 0)
    assert torch.equal(got, want)


def test_flex_block_mask_agrees_with_dense_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    mod = masks.block_causal([1, 4, 9, 16, 25, 36, 49, 64], q_len=140)
    bm = create_block_mask(mod, None, None, 140, 204, device="cpu", BLOCK_SIZE=16)
    dense_from_blocks = bm.to_dense()  # (1, 1, q blocks, kv blocks): 1 where the block has any visible key
    dense = masks.dense_mask(mod, None, None, 140, 204)
    padded = F.pad(dense, (0, 208 - 204, 0, 144 - 140))
    any_per_block = padded.view(9, 16, 13, 16).any(dim=3).any(dim=1)
    assert torch.equal(dense_from_blocks[0, 0].bool(), any_per_block)


# ---------------------------------------------------------------------------------------------------------
# Hand-built and structural checks
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rectangular_causal_is_bottom_right(backend):
    # Equal scores (q = k = 0) make each output row the mean of the values it may see; one-hot values show
    # exactly which keys those are. With Nq=2, Nk=4 bottom-right: row 0 sees keys 0..2, row 1 sees 0..3.
    q = torch.zeros(1, 1, 2, 4)
    k = torch.zeros(1, 1, 4, 4)
    v = torch.eye(4).view(1, 1, 4, 4)
    out = attention(q, k, v, pattern="causal", backend=backend)[0, 0]
    want = torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0], [0.25, 0.25, 0.25, 0.25]])
    torch.testing.assert_close(out, want)
    # SDPA's own is_causal is top-left for this shape (row 0 would see key 0 only): we must differ from it.
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)[0, 0]
    torch.testing.assert_close(top_left[0], torch.tensor([1.0, 0, 0, 0]))


@pytest.mark.parametrize("pattern,extra", [("dense", {}), ("causal", {}), ("block_causal", {"segments": [1, 4, 9, 16]})])
@pytest.mark.parametrize("backend", ["sdpa_flash", "sdpa_math", "reference"])
def test_gqa_equals_repeated_heads(backend, pattern, extra):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 6, 30, 64, generator=g), torch.randn(2, 2, 30, 64, generator=g),
               torch.randn(2, 2, 30, 64, generator=g))
    q1, k1, v1 = _leaves((q, k, v))
    q2, k2, v2 = _leaves((q, k, v))
    grouped = attention(q1, k1, v1, pattern=pattern, backend=backend, **extra)
    repeated = attention(q2, k2.repeat_interleave(3, dim=1), v2.repeat_interleave(3, dim=1), pattern=pattern,
                         backend=backend, **extra)
    torch.testing.assert_close(grouped, repeated, rtol=1e-5, atol=1e-6)
    (grouped * repeated.detach()).sum().backward()
    (repeated * repeated.detach()).sum().backward()
    for a, b in ((q1, q2), (k1, k2), (v1, v2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["sdpa_flash", "sdpa_math", "flex"])
def test_token_subsets_equal_attention_on_gathered_tensors(backend):
    g = torch.Generator().manual_seed(6)
    B, H, N, D = 3, 2, 40, 64
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    q_index = torch.stack([torch.randperm(N, generator=g)[:12] for _ in range(B)])
    kv_index = torch.stack([torch.randperm(N, generator=g)[:25] for _ in range(B)])
    out = attention(q, k, v, q_index=q_index, kv_index=kv_index, backend=backend)

    def gather(t, idx):
        return torch.stack([t[b][:, idx[b]] for b in range(B)])

    manual = attention(gather(q, q_index), gather(k, kv_index), gather(v, kv_index), backend=backend)
    assert out.shape == (B, H, 12, D)
    torch.testing.assert_close(out, manual, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pattern", ["dense", "causal"])
@pytest.mark.parametrize("backend", ["sdpa_flash", "sdpa_math", "flex"])
def test_unequal_token_subsets_equal_per_sample_calls(backend, pattern):
    g = torch.Generator().manual_seed(7)
    B, H, N, D = 3, 2, 40, 64
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    q_counts, kv_counts = [12, 3, 20], [25, 40, 7]
    q_index = [torch.randperm(N, generator=g)[:c] for c in q_counts]
    kv_index = [torch.randperm(N, generator=g)[:c] for c in kv_counts]
    out = attention(q, k, v, pattern=pattern, q_index=q_index, kv_index=kv_index, backend=backend)
    assert out.shape == (B, H, max(q_counts), D)
    for b in range(B):
        single = attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], pattern=pattern, q_index=q_index[b][None],
                           kv_index=kv_index[b][None], backend=backend)
        torch.testing.assert_close(out[b:b + 1, :, :q_counts[b]], single, rtol=1e-6, atol=1e-6)
        assert torch.all(out[b, :, q_counts[b]:] == 0), "padded query rows must be zero"


@pytest.mark.parametrize("backend", ["sdpa_flash", "sdpa_math", "flex"])
def test_per_head_kv_index_equals_per_head_calls(backend):
    g = torch.Generator().manual_seed(8)
    B, H, Hkv, N, D = 2, 4, 2, 33, 64
    q = torch.randn(B, H, N, D, generator=g)
    k, v = (torch.randn(B, Hkv, N, D, generator=g) for _ in range(2))
    kv_index = torch.stack([torch.stack([torch.randperm(N, generator=g)[:10] for _ in range(Hkv)]) for _ in range(B)])
    out = attention(q, k, v, kv_index=kv_index, backend=backend)
    for b in range(B):
        for h in range(H):
            kh = h // (H // Hkv)
            single = attention(q[b:b + 1, h:h + 1], k[b:b + 1, kh:kh + 1, kv_index[b, kh]],
                               v[b:b + 1, kh:kh + 1, kv_index[b, kh]], backend=backend)
            torch.testing.assert_close(out[b:b + 1, h:h + 1], single, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["sdpa_flash", "sdpa_math", "reference"])
def test_rows_without_keys_are_zero_with_zero_gradient(backend):
    g = torch.Generator().manual_seed(9)
    q, k, v = _leaves([torch.randn(2, 2, 9, 64, generator=g) for _ in range(3)])
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1] = False
    out = attention(q, k, v, key_padding_mask=keep, backend=backend)
    assert torch.all(out[1] == 0) and torch.isfinite(out).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.all(t.grad[1] == 0)


def test_scale_argument_is_used():
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 2, 16, 64, generator=g) for _ in range(3))
    for backend in CPU_BACKENDS:
        _assert_close(attention(q, k, v, scale=0.3, backend=backend), oracle(q, k, v, scale=0.3), 1e-5, backend)


def test_flex_block_masks_are_cached():
    backends._cached_block_mask.cache_clear()
    q = torch.randn(1, 2, 24, 64)
    attention(q, q, q, pattern="causal", backend="flex")
    attention(q + 1, q, q, pattern="causal", backend="flex")
    info = backends._cached_block_mask.cache_info()
    assert info.misses == 1 and info.hits == 1


@pytest.mark.slow
def test_flex_compiled_on_cpu(monkeypatch):
    # The default CPU path is eager flex (compiling takes ~20 s here); check the compiled path once.
    monkeypatch.setattr(backends, "FLEX_COMPILE_ON_CPU", True)
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 32, 64, generator=g) for _ in range(3))
    kv = torch.randn(1, 2, 48, 64, generator=g)
    monkeypatch.setattr(backends, "_FLEX_SHAPES", {})
    out = attention(q, kv, kv, pattern="causal", backend="flex")
    _assert_close(out, oracle(q, kv, kv, pattern="causal"), 1e-5, "compiled flex")
    assert len(backends._FLEX_SHAPES["causal_bottom_right"]) == 1
    # Past FLEX_MAX_SHAPES specialisations flex refuses new shapes (dynamo would run them unfused)...
    monkeypatch.setattr(backends, "FLEX_MAX_SHAPES", 1)
    attention(q + 1, kv, kv, pattern="causal", backend="flex")  # same shape: still fine
    with pytest.raises(ValueError, match="FLEX_MAX_SHAPES"):
        attention(q[:, :, :31], kv, kv, pattern="causal", backend="flex")
    # ... and auto moves on with the reason recorded.
    with use_backend("auto"), pytest.MonkeyPatch.context() as mp:
        mp.setitem(AUTO_TABLE, ("cpu", "*", "*", "causal_rect"), ["flex", "sdpa_math"])
        d = explain(q[:, :, :31], kv, kv, pattern="causal")
    assert d.backend == "sdpa_math" and "FLEX_MAX_SHAPES" in dict(d.rejected)["flex"]


# ---------------------------------------------------------------------------------------------------------
# Dispatch, overrides, availability
# ---------------------------------------------------------------------------------------------------------


def _small(requires_grad=False):
    g = torch.Generator().manual_seed(12)
    return [torch.randn(1, 2, 16, 64, generator=g).requires_grad_(requires_grad) for _ in range(3)]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_explain_picks_a_backend_that_supports_the_call(case, requires_grad):
    q, k, v, kwargs = case.make(torch.Generator().manual_seed(0), torch.float32, "cpu")
    q.requires_grad_(requires_grad)
    d = explain(q, k, v, **kwargs)
    assert d.source == "auto" and d.backend in attn.BACKENDS
    p = prepare(q, k, v, **kwargs)
    assert attn.BACKENDS[d.backend].supports(p)[0]
    for name, reason in d.rejected:
        assert not attn.BACKENDS[name].supports(p)[0] and reason


def test_auto_uses_the_table_and_records_rejections(monkeypatch):
    q, k, v = _small()
    monkeypatch.setitem(AUTO_TABLE, ("cpu", "*", "*", "dense"), ["sdpa_cudnn", "sdpa_efficient", "sdpa_math"])
    d = explain(q, k, v)
    assert d.backend == "sdpa_math"
    assert [name for name, _ in d.rejected] == ["sdpa_cudnn", "sdpa_efficient"]
    assert all("CUDA only" in reason for _, reason in d.rejected)


def test_cpu_bfloat16_training_uses_the_train_row():
    assert table_row("cpu", torch.bfloat16, 64, "dense", training=True)[1][0] == "sdpa_math"
    assert table_row("cpu", torch.bfloat16, 64, "dense", training=False)[1][0] == "sdpa_flash"
    q, k, v = (t.bfloat16() for t in _small())
    assert explain(q, k, v).backend == "sdpa_flash"
    assert explain(*_leaves((q, k, v))).backend == "sdpa_math"


def test_env_var_and_context_manager_override_auto(monkeypatch):
    q, k, v = _small()
    monkeypatch.setenv(ENV_VAR, "reference")
    d = explain(q, k, v)
    assert (d.backend, d.source) == ("reference", "env")
    with use_backend("sdpa_math"):
        d = explain(q, k, v)
        assert (d.backend, d.source) == ("sdpa_math", "use_backend")
        with use_backend("flex"):
            assert explain(q, k, v).backend == "flex"
        assert explain(q, k, v).backend == "sdpa_math"
        d = explain(q, k, v, backend="sdpa_flash")  # an explicit argument wins over both
        assert (d.backend, d.source) == ("sdpa_flash", "argument")
        assert explain(q, k, v, backend="auto").source == "auto"
    assert explain(q, k, v).backend == "reference"
    monkeypatch.delenv(ENV_VAR)
    assert explain(q, k, v).source == "auto"


def test_override_really_runs_the_forced_backend(monkeypatch):
    q, k, v = _small()
    calls = []
    original = attn.BACKENDS["sdpa_math"]
    monkeypatch.setitem(attn.BACKENDS, "sdpa_math",
                        attn.Backend(lambda p: calls.append(1) or original.run(p), original.supports))
    with use_backend("sdpa_math"):
        attention(q, k, v)
    assert calls == [1]


@pytest.mark.parametrize("name", ["sdpa_cudnn", "sdpa_efficient", "xformers"])
def test_forcing_an_unsupported_backend_raises(name, monkeypatch):
    q, k, v = _small()
    with pytest.raises(ValueError, match=f"backend '{name}' .*does not support this call: .+"):
        attention(q, k, v, backend=name)
    monkeypatch.setenv(ENV_VAR, name)
    with pytest.raises(ValueError, match="chosen by env"):
        attention(q, k, v)


def test_flex_refuses_backward_on_cpu_with_a_reason():
    q, k, v = _small(requires_grad=True)
    with pytest.raises(ValueError, match="no backward on CPU"):
        attention(q, k, v, backend="flex")
    with torch.no_grad():  # inference with the same tensors is fine
        attention(q, k, v, backend="flex")


def test_unknown_backend_names_raise(monkeypatch):
    q, k, v = _small()
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        attention(q, k, v, backend="nope")
    with pytest.raises(ValueError, match="unknown attention backend"):
        with use_backend("nope"):
            pass
    monkeypatch.setenv(ENV_VAR, "nope")
    with pytest.raises(ValueError, match=ENV_VAR):
        attention(q, k, v)


def test_xformers_reports_unavailable_with_a_reason():
    ok, reason = attn.available_backends("cpu")["xformers"]
    try:
        import xformers  # noqa: F401
    except ImportError:
        assert not ok and "not installed" in reason
    else:
        assert ok or reason  # installed: either its kernels run here or we are told why not


def test_available_backends_and_auto_choices_on_cpu():
    available = attn.available_backends("cpu")
    assert set(available) == set(attn.BACKENDS)
    assert available["sdpa_cudnn"] == (False, "cuDNN attention runs on CUDA only (tensors on cpu)")
    assert all(isinstance(reason, str) and reason for _, reason in available.values())
    choices = attn.auto_choices("cpu")
    assert set(choices) >= {"dense", "dense_cross", "causal", "causal_rect", "block_causal", "gqa", "key_padding",
                            "token_subset_unequal"}
    assert all(available[name][0] for name in choices.values())


def test_probe_rejects_a_kernel_with_the_wrong_causal_alignment():
    # A kernel that runs but computes top-left causal must not pass supports() for a bottom-right call.
    q, k, v = torch.randn(1, 2, 8, 64), torch.randn(1, 2, 24, 64), torch.randn(1, 2, 24, 64)
    p = prepare(q, k, v, pattern="causal")
    assert p.form == "causal_bottom_right"

    def top_left(t):
        return F.scaled_dot_product_attention(t.q, t.k, t.v, is_causal=True, scale=t.scale)

    ok, reason = backends._probe("top_left_test", p, top_left)
    assert not ok and "differs from the float64 reference" in reason


# ---------------------------------------------------------------------------------------------------------
# Validation: every bad input is a ValueError naming the problem
# ---------------------------------------------------------------------------------------------------------

Q, K, V = torch.randn(2, 4, 10, 64), torch.randn(2, 2, 12, 64), torch.randn(2, 2, 12, 64)

BAD_CALLS = [
    ("not_a_tensor", lambda: attention(Q.numpy(), K, V), "q must be a torch.Tensor"),
    ("3d", lambda: attention(Q[0], K, V), "q must be 4-D"),
    ("int_dtype", lambda: attention(Q.long(), K.long(), V.long()), "floating tensor"),
    ("dtype_mismatch", lambda: attention(Q, K.double(), V), "one dtype"),
    ("device_mismatch", lambda: attention(Q, K.to("meta"), V), "one device"),
    ("batch_mismatch", lambda: attention(Q, K[:1], V[:1]), "batch sizes differ"),
    ("kv_heads_differ", lambda: attention(Q, K, V[:, :1]), "same number of heads"),
    ("heads_not_dividing", lambda: attention(Q[:, :3], K, V), "multiple of kv heads"),
    ("head_dim_mismatch", lambda: attention(Q, K[..., :32], V), "head_dim of q"),
    ("v_tokens_differ", lambda: attention(Q, K, V[:, :, :11]), "same number of tokens"),
    ("unknown_pattern", lambda: attention(Q, K, V, pattern="sliding"), "unknown attention pattern"),
    ("segments_missing", lambda: attention(Q, K, V, pattern="block_causal"), "needs segments"),
    ("segments_sum", lambda: attention(Q, K, V, pattern="block_causal", segments=[1, 4, 9]), "sum to 14 but k has Nk=12"),
    ("segments_nonpositive", lambda: attention(Q, K, V, pattern="block_causal", segments=[0, 12]), "positive"),
    ("segments_with_dense", lambda: attention(Q, K, V, segments=[12]), "only apply to pattern='block_causal'"),
    ("block_causal_q_longer", lambda: attention(K.repeat(1, 2, 1, 1), Q[:, :2], Q[:, :2], pattern="block_causal",
                                                segments=[10]), "Nq <= Nk"),
    ("kpm_dtype", lambda: attention(Q, K, V, key_padding_mask=torch.ones(2, 12)), "dtype torch.bool"),
    ("kpm_shape", lambda: attention(Q, K, V, key_padding_mask=torch.ones(2, 10, dtype=torch.bool)), r"shape \(B, Nk\)"),
    ("q_index_range", lambda: attention(Q, K, V, q_index=torch.tensor([[0, 10], [1, 2]])), "q_index out of range"),
    ("kv_index_negative", lambda: attention(Q, K, V, kv_index=torch.tensor([[0, -1], [1, 2]])), "kv_index out of range"),
    ("kv_index_list_range", lambda: attention(Q, K, V, kv_index=[torch.tensor([0, 12]), torch.tensor([1])]),
     r"kv_index\[0\] out of range"),
    ("index_dtype", lambda: attention(Q, K, V, q_index=torch.zeros(2, 3)), "integer indices"),
    ("index_batch", lambda: attention(Q, K, V, q_index=torch.zeros(3, 3, dtype=torch.long)), "q_index must have shape"),
    ("index_list_len", lambda: attention(Q, K, V, q_index=[torch.tensor([0])]), "list of 1 tensors but the batch has B=2"),
    ("per_head_q_index", lambda: attention(Q, K, V, q_index=torch.zeros(2, 4, 3, dtype=torch.long)), "q_index must have shape"),
    ("per_head_wrong_heads", lambda: attention(Q, K, V, kv_index=torch.zeros(2, 3, 3, dtype=torch.long)), "kv_index must have shape"),
    ("empty_index", lambda: attention(Q, K, V, kv_index=[torch.tensor([], dtype=torch.long)] * 2), "keeps no token"),
    ("bad_scale", lambda: attention(Q, K, V, scale=-1.0), "scale must be a positive finite number"),
    ("nan_scale", lambda: attention(Q, K, V, scale=float("nan")), "scale must be"),
]


@pytest.mark.parametrize("call,message", [(c, m) for _, c, m in BAD_CALLS], ids=[n for n, _, _ in BAD_CALLS])
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): every backend that loads, half precision, forward + backward
# ---------------------------------------------------------------------------------------------------------

CUDA_BACKENDS = [name for device, name in devices_and_backends() if device == "cuda"]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", CUDA_BACKENDS or ["none"])
def test_cuda_backend_matches_oracle(backend, case):
    g = torch.Generator().manual_seed(0)
    q, k, v, kwargs = case.make(g, torch.bfloat16, "cuda")
    p = prepare(*_leaves((q, k, v)), **kwargs)
    ok, reason = attn.BACKENDS[backend].supports(p)
    if not ok:
        pytest.skip(f"{backend}: {reason}")
    _check_against_oracle(backend, case, "cuda", torch.bfloat16, rtol=3e-2, grad_rtol=6e-2, backward=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_auto_matches_oracle(case):
    _check_against_oracle(None, case, "cuda", torch.bfloat16, rtol=3e-2, grad_rtol=6e-2, backward=True)


# ----- torch.compile: the layer traces into one graph (no graph break), so compiled models and CUDA graphs
# keep attention inside them; the traced path equals the eager one -----
_Q = torch.Generator().manual_seed(5)


def _t(*shape):
    return torch.randn(*shape, generator=_Q)


@pytest.mark.parametrize("case", ["dense", "cross", "causal", "causal_rect_gqa", "decode_step", "block_causal",
                                  "key_padding", "subset"])
def test_traces_without_graph_breaks(case):
    q, k, v = _t(2, 4, 8, 32), _t(2, 4, 8, 32), _t(2, 4, 8, 32)
    kv = _t(2, 2, 12, 32)
    kpm = torch.ones(2, 8, dtype=torch.bool)
    kpm[1, 5:] = False
    idx = torch.tensor([[0, 2, 4], [1, 3, 7]])
    args, kw = {
        "dense": ((q, k, v), {}),
        "cross": ((q, kv[:, :, :5], kv[:, :, :5]), {}),
        "causal": ((q, k, v), {"pattern": "causal"}),
        "causal_rect_gqa": ((q[:, :, :5], kv, kv), {"pattern": "causal"}),
        "decode_step": ((q[:, :, :1], kv, kv), {"pattern": "causal"}),
        "block_causal": ((q, k, v), {"pattern": "block_causal", "segments": [1, 3, 4]}),
        "key_padding": ((q, k, v), {"key_padding_mask": kpm}),
        "subset": ((q, k, v), {"q_index": idx, "kv_index": idx}),
    }[case]
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, **kw), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args), attention(*args, **kw), rtol=1e-5, atol=1e-5)


def test_decode_step_needs_no_mask():
    q, kv = _t(1, 4, 1, 32), _t(1, 4, 9, 32)
    assert prepare(q, kv, kv, pattern="causal").form == "none"
    torch.testing.assert_close(attention(q, kv, kv, pattern="causal"), attention(q, kv, kv, backend="reference"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nq", [255, 200, 64])
@pytest.mark.parametrize("backend", ["sdpa_math", "sdpa_flash"])
def test_block_causal_split_into_dense_pieces_matches_reference(nq, backend):
    """Long segments run as dense prefix calls (problem.block_causal_pieces); forward and backward must equal
    the float64 masked reference, also for rectangular queries that start inside a segment."""
    segs = [1, 4, 9, 16, 25, 36, 64, 100]  # 255 tokens; the last two segments are long enough to split off
    from attention.problem import block_causal_pieces
    assert sum(not masked for *_, masked in block_causal_pieces(tuple(segs), nq, 255)) >= 1
    q = _t(2, 2, nq, 16).requires_grad_()
    k, v = _t(2, 2, 255, 16).requires_grad_(), _t(2, 2, 255, 16).requires_grad_()
    out = attention(q, k, v, pattern="block_causal", segments=segs, backend=backend)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention(*leaves, pattern="block_causal", segments=segs, backend="reference")
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    g = _t(*out.shape)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, leaves, g.double())):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)


def test_one_key_is_probed_on_one_key():
    """cuDNN SDPA refuses a key/value length of 1 (VAR's first scale under a KV cache: 1 query, 1 key); a probe on
    13 keys passed it, so auto picked cuDNN and the call failed with "No available kernel" on the H100. A single key
    is its own probe class, probed on a 1 x 1 problem."""
    from attention.problem import prepare, tiny_like

    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 1, 16)
    p = prepare(q, k, k)
    assert p.features[7] == "k=1" and prepare(torch.randn(2, 4, 3, 16), k, k).features[7] == "k=1"
    tiny = tiny_like(p)
    assert tiny.q.shape[2] == 1 and tiny.k.shape[2] == 1 and tiny.form == "none"
    torch.testing.assert_close(attention(q, k, k), k.expand(2, 4, 1, 16))  # one key: the output is its value
    assert prepare(torch.randn(2, 4, 5, 16), torch.randn(2, 4, 5, 16), torch.randn(2, 4, 5, 16)).features[7] == "square"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
def test_one_key_runs_under_auto_on_cuda():
    q = torch.randn(2, 16, 1, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 16, 1, 64, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(attention(q, k, k), k)
