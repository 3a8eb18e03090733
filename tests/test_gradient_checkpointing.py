"""Gradient checkpointing (diffusers' enable_gradient_checkpointing) recomputes each block in the backward pass:
the loss and every gradient equal those of the plain forward, for the three model families."""

import pytest
import torch

from dit.dit import DiT
from dit.latte import LatteDiT
from dit.pixart import PixArtDiT


def _randomized(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialised layers would leave most gradients zero
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _case(kind):
    g = torch.Generator().manual_seed(1)
    small = dict(hidden_size=32, depth=2, num_heads=2, sample_size=8, patch_size=2, in_channels=4)
    t = torch.tensor([3, 700])
    if kind == "dit":
        model = DiT(num_classes=5, class_dropout_prob=0.0, **small)
        return model, (torch.randn(2, 4, 8, 8, generator=g), t, torch.tensor([1, 4]))
    text = torch.randn(2, 5, 16, generator=g)
    if kind == "pixart":
        model = PixArtDiT(caption_channels=16, max_text_tokens=5, **small)
        return model, (torch.randn(2, 4, 8, 8, generator=g), t, text)
    model = LatteDiT(caption_channels=16, max_text_tokens=5, num_frames=3, **small)
    return model, (torch.randn(2, 4, 3, 8, 8, generator=g), t, text)


@pytest.mark.parametrize("kind", ["dit", "pixart", "latte"])
def test_checkpointed_gradients_equal_plain_ones(kind):
    model, inputs = _case(kind)
    _randomized(model).train()

    def grads():
        model.zero_grad()
        loss = model(*inputs).pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_ref, ref = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    calls = []
    inner = model._gradient_checkpointing_func
    model._gradient_checkpointing_func = lambda block, *a: calls.append(block) or inner(block, *a)
    loss, got = grads()
    assert len(calls) == (2 if kind != "latte" else 4)  # every block went through checkpointing
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    assert got.keys() == ref.keys() and len(ref) > 10
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # no recomputation without gradients (sampling is unaffected)
        calls.clear()
        model(*inputs)
    assert calls == []
