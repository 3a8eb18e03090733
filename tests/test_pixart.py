"""Tests of the PixArt-α-style text-conditional DiT (dit/pixart.py) and its diffusers loader
(dit/loaders.py `pixart_from_diffusers`).

Parity is the main test: diffusers' PixArtTransformer2DModel with random weights at O(1) activation scale (zero or
0.02-scale weights would hide mapping bugs: a zero cross-attention output hides the text path, small q/k leave
attention uniform so a q/k swap goes unnoticed), loaded into ours, must agree to 1e-5 relative, without and with a
text padding mask; a deliberately broken mapping must miss that tolerance by far.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from dit.loaders import pixart_from_diffusers, pixart_state_dict_from_diffusers_into
from dit.pixart import PIXART_CONFIGS, PixArtDiT, scaled_sincos_2d

DIFFUSERS_TINY = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=2,
    attention_head_dim=16, cross_attention_dim=32, caption_channels=24, norm_type="ada_norm_single",
    num_embeds_ada_norm=1000,
)
TEXT_TOKENS = 7
RTOL = 1e-5
# A broken mapping must move the output by at least this much (relative), far above RTOL.
BROKEN_MIN_ERR = 1e-2
BIAS_STD = 0.1
TABLE_STD = 1.0


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """std 1/sqrt(fan_in) for matrices, 0.1 for biases, 1.0 for the scale-shift tables."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "scale_shift_table" in name:
                std = TABLE_STD
            elif p.ndim == 1:
                std = BIAS_STD
            else:
                std = p[0].numel() ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)


def diffusers_tiny(seed: int = 0, **overrides) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**{**DIFFUSERS_TINY, **overrides}).eval()
    randomize_(model, seed)
    return model


def inputs(batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = DIFFUSERS_TINY
    x = torch.randn(batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], generator=g)
    t = torch.tensor([0, 321, 999])[:batch]
    text = torch.randn(batch, TEXT_TOKENS, cfg["caption_channels"], generator=g)
    return x, t, text


def padding_mask(batch: int = 3) -> torch.Tensor:
    """0/1 keep mask (as tokenizers give it): sample 1 keeps 3 tokens, sample 2 keeps 5. No sample is fully padded:
    diffusers' -10000 bias then averages over the padded tokens, where we give zero cross-attention."""
    mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, 5:] = 0
    return mask


def run_diffusers(model, x, t, text, mask=None) -> torch.Tensor:
    return model(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask, return_dict=False)[0]


@pytest.fixture(scope="module")
def pair():
    theirs = diffusers_tiny()
    return theirs, pixart_from_diffusers(theirs).eval()


# ----------------------------------------------------------------------------------------------- parity
@torch.no_grad()
def test_parity_with_diffusers_no_mask(pair):
    theirs, ours = pair
    x, t, text = inputs()
    ref = run_diffusers(theirs, x, t, text)
    out = ours(x, t, text)
    err = rel_err(out, ref)
    print(f"PixArt parity, no mask: rel err {err:.2e}")
    assert out.shape == ref.shape == (3, 8, 8, 8)
    assert err < RTOL, err


@torch.no_grad()
def test_parity_with_diffusers_padding_mask(pair):
    theirs, ours = pair
    x, t, text = inputs()
    mask = padding_mask()
    ref = run_diffusers(theirs, x, t, text, mask)
    err = rel_err(ours(x, t, text, mask), ref)
    print(f"PixArt parity, padded text: rel err {err:.2e}")
    assert err < RTOL, err
    # The same with a bool mask; and the mask matters (the padded tokens are random, so ignoring it is visible).
    assert rel_err(ours(x, t, text, mask.bool()), ref) < RTOL
    assert rel_err(ours(x, t, text), ref) > BROKEN_MIN_ERR


@torch.no_grad()
def test_padded_tokens_are_ignored(pair):
    _, ours = pair
    x, t, text = inputs()
    mask = padding_mask()
    changed = text.clone()
    changed[~mask.bool()] = 100.0  # whatever sits in the padded slots
    assert torch.allclose(ours(x, t, text, mask), ours(x, t, changed, mask), atol=1e-6)


@torch.no_grad()
def test_scalar_timestep_and_learn_sigma_off():
    theirs = diffusers_tiny(seed=1, out_channels=4)
    ours = pixart_from_diffusers(theirs).eval()
    assert not ours.config.learn_sigma and ours.out_channels == 4
    x, _, text = inputs()
    ref = run_diffusers(theirs, x, torch.full((3,), 250), text)
    out = ours(x, 250, text)
    assert out.shape == (3, 4, 8, 8)
    assert rel_err(out, ref) < RTOL


@torch.no_grad()
def test_parity_with_interpolation_scale():
    # Positions / 2, as PixArt at 1024 px: the scaled table must equal diffusers' PatchEmbed buffer.
    theirs = diffusers_tiny(seed=2, interpolation_scale=2)
    ours = pixart_from_diffusers(theirs).eval()
    torch.testing.assert_close(ours.pos_embed, theirs.pos_embed.pos_embed, rtol=0, atol=1e-6)
    x, t, text = inputs()
    assert rel_err(ours(x, t, text), run_diffusers(theirs, x, t, text)) < RTOL


def test_scaled_table_is_dit_table_at_scale_one():
    from dit.dit import sincos_2d

    torch.testing.assert_close(scaled_sincos_2d(4, 4, 32, 1.0), sincos_2d(4, 4, 32), rtol=0, atol=0)


@torch.no_grad()
def test_broken_mapping_fails(pair):
    """The parity test can fail: swapping q and k of one self-attention, or the two cross-attention k/v halves,
    or shift and scale of the final table, moves the output far beyond the tolerance."""
    theirs, _ = pair
    x, t, text = inputs()
    ref = run_diffusers(theirs, x, t, text)
    sd = theirs.state_dict()
    swaps = [
        ("transformer_blocks.0.attn1.to_q.weight", "transformer_blocks.0.attn1.to_k.weight"),
        ("transformer_blocks.1.attn2.to_k.weight", "transformer_blocks.1.attn2.to_v.weight"),
    ]
    for a, b in swaps:
        broken = {**sd, a: sd[b], b: sd[a]}
        model = pixart_state_dict_from_diffusers_into(PixArtDiT(**pair[1].config), broken).eval()
        err = rel_err(model(x, t, text), ref)
        assert err > BROKEN_MIN_ERR, (a, b, err)
    table = sd["scale_shift_table"]
    model = pixart_state_dict_from_diffusers_into(
        PixArtDiT(**pair[1].config), {**sd, "scale_shift_table": table.flip(0)}
    ).eval()
    assert rel_err(model(x, t, text), ref) > BROKEN_MIN_ERR


# ----------------------------------------------------------------------------------------------- contract
def test_save_load_round_trip(pair, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path)
    loaded = PixArtDiT.from_pretrained(tmp_path).eval()
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(ours.config)
    assert torch.equal(loaded.pos_embed, ours.pos_embed)
    x, t, text = inputs()
    mask = padding_mask()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, text, mask), ours(x, t, text, mask))


@pytest.mark.parametrize("name", list(PIXART_CONFIGS))
def test_named_sizes_shapes(name):
    cfg = PIXART_CONFIGS[name]
    if name == "PixArt-XL/2":
        # Build on the meta device: 600M parameters are not needed to check shapes of the config.
        with torch.device("meta"):
            model = PixArtDiT.from_name(name)
        n_params = sum(p.numel() for p in model.parameters())
        assert 5.5e8 < n_params < 6.5e8, n_params  # PixArt-α XL/2: ~611M
        assert model.config.hidden_size // model.config.num_heads == 72
        return
    model = PixArtDiT.from_name(name).eval()
    s, c, L = cfg["sample_size"], cfg["in_channels"], cfg["max_text_tokens"]
    x = torch.randn(2, c, s, s)
    text = torch.randn(2, L, cfg["caption_channels"])
    with torch.no_grad():
        out = model(x, torch.tensor([1, 900]), text, torch.ones(2, L, dtype=torch.bool))
    assert out.shape == (2, 2 * c, s, s)


def test_unknown_name_lists_valid():
    with pytest.raises(ValueError, match="PixArt-XL/2.*PixArt-T/2"):
        PixArtDiT.from_name("PixArt-XXL/2")


def test_input_errors(pair):
    _, ours = pair
    x, t, text = inputs()
    with pytest.raises(ValueError, match="caption_channels"):
        ours(x, t, text[..., :5])
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        ours(x, t, text, torch.ones(3, TEXT_TOKENS + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="0 and 1"):
        ours(x, t, text, torch.full((3, TEXT_TOKENS), 2))
    with pytest.raises(ValueError, match="sample is"):
        ours(torch.randn(3, 4, 6, 6), t, text)


# ----------------------------------------------------------------------------------------------- loader errors
def test_loader_rejects_unsupported_configs():
    with pytest.raises(ValueError, match="use_additional_conditions"):
        pixart_from_diffusers(diffusers_tiny(use_additional_conditions=True))
    with pytest.raises(ValueError, match="activation_fn"):
        pixart_from_diffusers(diffusers_tiny(activation_fn="geglu"))
    with pytest.raises(ValueError, match="caption_channels"):
        pixart_from_diffusers(diffusers_tiny(caption_channels=None))
    with pytest.raises(ValueError, match="out_channels"):
        pixart_from_diffusers(diffusers_tiny(out_channels=6))


def test_loader_reports_missing_unexpected_misshaped(pair):
    theirs, ours = pair
    sd = theirs.state_dict()
    fresh = lambda: PixArtDiT(**ours.config)  # noqa: E731

    missing = {k: v for k, v in sd.items() if k != "transformer_blocks.1.attn2.to_out.0.weight"}
    with pytest.raises(ValueError, match=r"missing transformer_blocks\.1\.attn2\.to_out\.0\.weight"):
        pixart_state_dict_from_diffusers_into(fresh(), missing)

    extra = {**sd, "adaln_single.emb.resolution_embedder.linear_1.weight": torch.zeros(10, 256)}
    with pytest.raises(ValueError, match=r"unexpected adaln_single\.emb\.resolution_embedder"):
        pixart_state_dict_from_diffusers_into(fresh(), extra)

    wrong = {**sd, "proj_out.weight": torch.zeros(16, 32)}
    with pytest.raises(ValueError, match=r"shape mismatch final\.linear\.weight"):
        pixart_state_dict_from_diffusers_into(fresh(), wrong)

    unfusable = {**sd, "transformer_blocks.0.attn1.to_v.weight": torch.zeros(16, 32)}
    with pytest.raises(ValueError, match="differ in shape"):
        pixart_state_dict_from_diffusers_into(fresh(), unfusable)

    deeper = diffusers_tiny(num_layers=3).state_dict()
    with pytest.raises(ValueError, match=r"unexpected transformer_blocks\.2\."):
        pixart_state_dict_from_diffusers_into(fresh(), deeper)


@torch.no_grad()
def test_loader_from_folder(pair, tmp_path):
    theirs, ours = pair
    theirs.save_pretrained(tmp_path)
    loaded = pixart_from_diffusers(tmp_path).eval()
    x, t, text = inputs()
    assert torch.equal(loaded(x, t, text), ours(x, t, text))
