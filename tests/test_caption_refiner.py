"""The caption refiner (dit/pixart.py CaptionRefiner): a trained model gains one without changing its output, the
refined tokens see the words after them (the CLIP text tower's do not), padded tokens change nothing, and it
saves, loads and carries over into a video model."""
import pytest
import torch

from dit.latte import LatteDiT, init_from_image_model
from dit.pixart import PixArtDiT, with_caption_refiner

TINY = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, caption_channels=16,
            max_text_tokens=8, qk_norm=True)


def _trained(model: torch.nn.Module) -> torch.nn.Module:
    # every weight non-zero, as after training (the fresh model's zero outputs would hide differences)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _inputs(B=3, L=6, E=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, 8, 8, generator=g)
    text = torch.randn(B, L, E, generator=g)
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, 4:] = False
    return x, torch.tensor([10, 500, 900]), text, keep


def test_added_refiner_leaves_the_output_unchanged_and_then_learns():
    base = _trained(PixArtDiT(**TINY)).eval()
    x, t, text, keep = _inputs()
    model = with_caption_refiner(base, 2).eval()
    assert model.config.caption_refiner_layers == 2 and len(model.caption_refiner.layers) == 2
    torch.testing.assert_close(model(x, t, text, keep), base(x, t, text, keep), rtol=0, atol=0)
    # once its output projections are trained the text it hands the blocks differs
    _trained(model.caption_refiner)
    assert not torch.allclose(model(x, t, text, keep), base(x, t, text, keep), atol=1e-3)
    with pytest.raises(ValueError, match="already has a caption refiner"):
        with_caption_refiner(model, 1)
    assert with_caption_refiner(model, 2) is model


def test_refined_tokens_see_later_words_and_ignore_padding():
    model = _trained(PixArtDiT(**TINY, caption_refiner_layers=1)).eval()
    _, _, text, keep = _inputs()
    out = model.embed_text(text, keep)
    changed = text.clone()
    changed[0, 5] += 1.0  # the last word of caption 0
    out2 = model.embed_text(changed, keep)
    assert (out2[0, 0] - out[0, 0]).abs().max() > 1e-3  # the first token now knows about it: bidirectional
    torch.testing.assert_close(out2[1:], out[1:])
    padded = text.clone()
    padded[1, 4:] = 100.0  # caption 1's padding
    torch.testing.assert_close(model.embed_text(padded, keep)[1, :4], out[1, :4])


def test_refiner_saves_loads_and_goes_into_the_video_model(tmp_path):
    image = _trained(PixArtDiT(**TINY, caption_refiner_layers=1)).eval()
    image.save_pretrained(tmp_path / "t2i")
    again = PixArtDiT.from_pretrained(tmp_path / "t2i").eval()
    x, t, text, keep = _inputs()
    torch.testing.assert_close(again(x, t, text, keep), image(x, t, text, keep), rtol=0, atol=0)
    video = LatteDiT(**TINY, num_frames=3, caption_refiner_layers=1)
    init_from_image_model(video, image)
    video.eval()
    one_frame = video(x[:, :, None], t, text, keep)[:, :, 0]
    torch.testing.assert_close(one_frame, image(x, t, text, keep), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="caption_refiner_layers"):
        init_from_image_model(LatteDiT(**TINY, num_frames=3), image)


def test_refiner_config_is_checked():
    with pytest.raises(ValueError, match="caption_refiner_layers"):
        PixArtDiT(**TINY, caption_refiner_layers=-1)
