"""The token grounding loss (dit/grounding.py): recorded maps are the cross-attention's own probabilities, the loss
is 0 for attention inside the object and grows as it leaves, its targets name the right tokens and cells, and its
gradient reaches the cross-attention."""
import numpy as np
import pytest
import torch

from attention import attention
from dit.grounding import CrossAttentionMaps, grounding_loss, object_masks, object_token_sets
from dit.latte import LatteDiT
from dit.pixart import PixArtDiT
from shapes.scene import COLOURS, SHAPES

TINY = dict(sample_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=2, num_heads=2, caption_channels=8,
            max_text_tokens=6, qk_norm=True, caption_refiner_layers=1)


def _model():
    torch.manual_seed(0)
    m = PixArtDiT(**TINY)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def test_recorded_maps_are_the_cross_attention_probabilities():
    m = _model()
    x, text = torch.randn(2, 4, 4, 4), torch.randn(2, 6, 8)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 3:] = False
    maps = CrossAttentionMaps(m)
    out = m(x, 10, text, keep)
    assert maps.take() == []  # nothing outside recording()
    with maps.recording():
        again = m(x, 10, text, keep)
    torch.testing.assert_close(again, out)  # the hooks change nothing
    probs = maps.take()
    assert len(probs) == 2 and probs[0].shape == (2, 2, 16, 6)
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(2, 2, 16))
    assert probs[0][1, :, :, 3:].abs().max() == 0  # padded tokens get no attention
    # the probabilities reproduce the block's attention output: P @ v
    block, seen = m.blocks[0], {}
    h = block.cross_attn.register_forward_hook(lambda mod, a, o: seen.update(args=a, out=o))
    with maps.recording():
        m(x, 10, text, keep)
    h.remove()
    P = maps.take()[0]
    xa, ta, _ = seen["args"]
    ca = block.cross_attn
    v = ca.kv(ta)[..., 32:].view(2, 6, 2, 16).transpose(1, 2)
    o = (P @ v).transpose(1, 2).reshape(2, 16, 32)
    torch.testing.assert_close(ca.proj(o), seen["out"], rtol=1e-4, atol=1e-5)
    maps.remove()
    assert not any(mod._forward_hooks for mod in maps.modules)


def test_loss_is_zero_inside_and_grows_outside():
    B, N, L = 1, 16, 4
    masks = torch.zeros(B, 2, N, dtype=torch.bool)
    masks[0, 0, :4], masks[0, 1, 8:12] = True, True
    tokens = torch.zeros(B, 2, L, dtype=torch.bool)
    tokens[0, 0, 0], tokens[0, 1, 1:3] = True, True
    A = torch.zeros(B, 1, N, L)
    A[0, 0, :4, 0] = 1.0   # token 0 (object 0) looked at inside object 0 only
    A[0, 0, 8:12, 1:3] = 1.0  # tokens 1, 2 (object 1) inside object 1
    assert grounding_loss([A], masks, tokens).item() == pytest.approx(0.0, abs=1e-6)
    A2 = A.clone()
    A2[0, 0, :4, 1:3] = 1.0  # object 1's tokens also looked at object 0's cells: half their mass outside
    assert grounding_loss([A2], masks, tokens).item() == pytest.approx((2 * 0.25 + 0) / 3, abs=1e-5)
    # video maps (B·F, h, N, L): the frames' mean map
    assert grounding_loss([torch.cat([A, A2])], masks, tokens).item() == pytest.approx(
        (2 * (1 - 2 / 3) ** 2) / 3, abs=1e-5)


def test_gradient_reaches_the_cross_attention_and_refiner():
    m = _model()
    maps = CrossAttentionMaps(m)
    masks = torch.zeros(2, 1, 16, dtype=torch.bool)
    masks[:, 0, :5] = True
    tokens = torch.zeros(2, 1, 6, dtype=torch.bool)
    tokens[:, 0, 1:3] = True
    with maps.recording():
        m(torch.randn(2, 4, 4, 4), 10, torch.randn(2, 6, 8))
    grounding_loss(maps.take(), masks, tokens).backward()
    for name in ("blocks.0.cross_attn.q.weight", "blocks.1.cross_attn.kv.weight", "caption_embed.fc1.weight",
                 "caption_refiner.layers.0.attn.qkv.weight", "blocks.0.attn.qkv.weight"):
        assert m.get_parameter(name).grad.abs().sum() > 0, name
    assert m.final.linear.weight.grad is None  # the head is not on the loss's path


def test_targets_name_each_objects_phrase_and_cells():
    words = [["[SOT]", "a", "big", "red", "circle", "on", "the", "left", "and", "a", "blue", "square", "[EOT]"],
             ["[SOT]", "a", "red", "star", "above", "a", "red", "star", "[EOT]"],  # two fits: left out
             ["[SOT]", "a", "square", "right", "of", "a", "green", "circle", "[EOT]"]]
    sh = lambda *n: [SHAPES.index(x) if x else -1 for x in n]  # noqa: E731
    co = lambda *n: [COLOURS.index(x) if x else -1 for x in n]  # noqa: E731
    shapes = np.array([sh("square", "circle"), sh("star", "star"), sh("circle", "square")])
    colours = np.array([co("blue", "red"), co("red", "red"), co("green", "white")])
    t = object_token_sets(words, shapes, colours, SHAPES, COLOURS, 16)
    assert t.shape == (3, 2, 16)
    assert np.flatnonzero(t[0, 1]).tolist() == [1, 2, 3, 4]  # "a big red circle" -> slot 1
    assert np.flatnonzero(t[0, 0]).tolist() == [9, 10, 11]  # "a blue square" -> slot 0
    assert not t[1].any()
    assert np.flatnonzero(t[2, 1]).tolist() == [1, 2] and np.flatnonzero(t[2, 0]).tolist() == [5, 6, 7]
    slots = torch.full((1, 8, 8), -1)
    slots[0, :2, :2] = 0  # object 0 in the top-left 2x2 pixels
    slots[0, 5, 7] = 1
    m = object_masks(slots, 2, 4)  # 4x4 latent grid: 2x2 pixels per cell
    assert m.shape == (1, 2, 16)
    assert np.flatnonzero(m[0, 0].numpy()).tolist() == [0] and np.flatnonzero(m[0, 1].numpy()).tolist() == [11]


def test_a_model_without_cross_attention_is_refused():
    from dit.dit import DiT
    with pytest.raises(ValueError, match="no cross_attn attention"):
        CrossAttentionMaps(DiT(sample_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2))
    with pytest.raises(ValueError, match="no text_attn attention"):
        CrossAttentionMaps(LatteDiT(sample_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                                    caption_channels=8, max_text_tokens=4, num_frames=2), "text_attn")


def test_video_phrases_take_their_motion_words():
    words = [["[SOT]", "a", "red", "circle", "moving", "to", "the", "left", "and", "a", "square", "turning", "blue",
              "[EOT]", "[PAD]"]]
    shapes = np.array([[SHAPES.index("square"), SHAPES.index("circle")]])
    colours = np.array([[COLOURS.index("green"), COLOURS.index("red")]])
    t = object_token_sets(words, shapes, colours, SHAPES, COLOURS, 15, whole_phrase=True)
    assert np.flatnonzero(t[0, 1]).tolist() == [1, 2, 3, 4, 5, 6, 7]  # through "left", not "and"
    assert np.flatnonzero(t[0, 0]).tolist() == [9, 10, 11, 12]  # "a square turning blue", colour only after the noun
    still = object_token_sets(words, shapes, colours, SHAPES, COLOURS, 15)
    assert np.flatnonzero(still[0, 1]).tolist() == [1, 2, 3]
