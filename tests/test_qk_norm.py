"""QK-norm (dit/dit.py: QKNorm): off by default (real checkpoints keep their architecture and keys); on, attention
no longer depends on the scale of queries and keys, in every family, through save/load and under DyDiT."""

from __future__ import annotations

import pytest
import torch

from dit.dit import DiT
from dit.dydit import DyDiT
from dit.latte import LatteDiT
from dit.pixart import PixArtDiT

SMALL = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2)


def build(kind: str, qk_norm: bool, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "dit":
        model = DiT(**SMALL, num_classes=10, qk_norm=qk_norm)
    elif kind == "pixart":
        model = PixArtDiT(**SMALL, caption_channels=16, max_text_tokens=5, qk_norm=qk_norm)
    else:
        model = LatteDiT(**SMALL, caption_channels=16, max_text_tokens=5, num_frames=3, qk_norm=qk_norm)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight random (adaLN-Zero would make blocks the identity and the test vacuous)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim == 1 else p[0].numel() ** -0.5))
    return model.eval()


def run(kind: str, model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if kind == "dit":
        return model(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.tensor([1, 7]))
    shape = (2, 4, 8, 8) if kind == "pixart" else (2, 4, 3, 8, 8)
    return model(torch.randn(*shape, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 16, generator=g))


def scale_queries_and_keys_(model, factor: float) -> int:
    """Multiply every attention's query and key projections (weights and biases) by `factor`; -> how many."""
    n = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "qkv"):  # SelfAttention: rows q, k, v
                D = module.proj.in_features
                module.qkv.weight[: 2 * D] *= factor
                module.qkv.bias[: 2 * D] *= factor
                n += 1
            elif hasattr(module, "kv") and hasattr(module, "q"):  # CrossAttention: q; kv rows k, v
                D = module.proj.in_features
                module.q.weight *= factor
                module.q.bias *= factor
                module.kv.weight[:D] *= factor
                module.kv.bias[:D] *= factor
                n += 1
    return n


@pytest.mark.parametrize("kind", ["dit", "pixart", "latte"])
def test_off_by_default_no_new_keys(kind):
    default = build(kind, False)
    assert not default.config.qk_norm
    assert not any("qk_norm" in k for k in default.state_dict())


@pytest.mark.parametrize("kind", ["dit", "pixart", "latte"])
def test_on_attention_ignores_query_key_scale(kind):
    with torch.no_grad():
        for qk_norm in (True, False):
            model = build(kind, qk_norm)
            before = run(kind, model)
            assert scale_queries_and_keys_(model, 30.0) >= 2
            after = run(kind, model)
            rel = ((after - before).norm() / before.norm()).item()
            if qk_norm:
                assert rel < 1e-5, rel
            else:  # the control: without the norm the same change moves the output a lot
                assert rel > 1e-2, rel


@pytest.mark.parametrize("kind", ["dit", "pixart", "latte"])
def test_save_load_round_trip(kind, tmp_path):
    model = build(kind, True)
    with torch.no_grad():  # learned norm scales away from their init, so a lost weight would show
        for name, p in model.named_parameters():
            if "qk_norm" in name:
                p.uniform_(0.5, 1.5)
    assert any("qk_norm" in k for k in model.state_dict())
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.config.qk_norm
    with torch.no_grad():
        torch.testing.assert_close(run(kind, loaded), run(kind, model))


def test_dydit_over_a_qk_norm_dit():
    dit = build("dit", True)
    model = DyDiT.from_dit(dit).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([300, 300]), torch.tensor([1, 7])
    with torch.no_grad():
        ref = dit(x, t, y)
        torch.testing.assert_close(model(x, t, y, mode="sliced").sample, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x, t, y, mode="masked").sample, ref, atol=1e-5, rtol=1e-5)
        # and the norm is really applied inside DyDiT's own attention paths: scaling q and k changes nothing
        scale_queries_and_keys_(dit, 30.0)
        torch.testing.assert_close(model(x, t, y, mode="sliced").sample, ref, atol=1e-4, rtol=1e-4)
