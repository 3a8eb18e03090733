"""Tests of the class-conditional DiT (dit/dit.py) and its checkpoint loaders (dit/loaders.py).

Parity is the main test: diffusers' DiTTransformer2DModel with random weights (zero-inits would hide mapping bugs,
since a zero adaLN makes every block the identity and a zero head hides the output), loaded into ours, must agree
to 1e-5 relative; an official-layout checkpoint must give the output of an independent functional port of
facebookresearch/DiT's forward.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel

import dit.dit as dit_module
from dit.dit import DIT_CONFIGS, DiT
from dit.loaders import dit_from_diffusers, dit_from_official_state_dict, load_official_dit, official_state_dict

TINY = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
RTOL = 1e-5
# Label rows and biases are drawn at unit scale / 0.1 so that class conditioning and offsets visibly matter.
LABEL_STD = 1.0
BIAS_STD = 0.1


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def randomize_(module: torch.nn.Module, seed: int, skip=lambda name: False) -> None:
    """Random weights at the scale that keeps activations O(1) (std 1/sqrt(fan_in)), so that every path (q vs k,
    gates, shift vs scale) changes the output by far more than the tolerance. Small weights such as 0.02 * randn
    leave attention logits near zero, and then a q/k swap goes unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if skip(name):
                continue
            if "embedding_table" in name or "label_embed" in name:
                std = LABEL_STD
            elif p.ndim == 1:
                std = BIAS_STD
            else:
                std = p[0].numel() ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)


def inputs(model_cfg: dict, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model_cfg["in_channels"], model_cfg["sample_size"], model_cfg["sample_size"], generator=g)
    t = torch.tensor([0, 17, 500, 999])[:batch]
    y = torch.tensor([0, 3, 9, model_cfg["num_classes"]])[:batch]  # the last one is the null class
    return x, t, y


def random_dit(seed: int = 0, **overrides) -> DiT:
    model = DiT(**{**TINY, **overrides}).eval()
    randomize_(model, seed)
    return model


# ----------------------------------------------------------------------------------------------- diffusers parity
def random_diffusers(seed: int = 0, **overrides) -> DiTTransformer2DModel:
    cfg = {**dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                  sample_size=8, patch_size=2, num_embeds_ada_norm=10), **overrides}
    ref = DiTTransformer2DModel(**cfg).eval()
    # Every block holds its own embedder copy; converted checkpoints hold identical ones, so randomise block 0's
    # and copy it into the others.
    randomize_(ref, seed, skip=lambda n: ".norm1.emb." in n and not n.startswith("transformer_blocks.0."))
    emb0 = ref.transformer_blocks[0].norm1.emb.state_dict()
    for block in ref.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(emb0)
    return ref


def test_parity_with_diffusers():
    ref = random_diffusers()
    ours = dit_from_diffusers(ref).eval()
    x, t, y = inputs(TINY)
    with torch.no_grad():
        expected = ref(x, t, y).sample
        got = ours(x, t, y)
        # Class conditioning matters, also for the null class, so the label mapping is exercised.
        other = ours(x, t, torch.tensor([1, 4, 8, 2]))
    assert got.shape == expected.shape == (4, 8, 8, 8)
    err = rel_err(got, expected)
    print(f"diffusers parity: relative error {err:.2e}, max abs {(got - expected).abs().max().item():.2e}")
    assert err < RTOL
    assert rel_err(other, expected) > 1e-2


def test_parity_with_diffusers_fractional_timesteps_no_sigma_and_norm_eps():
    # A large norm_eps makes the MLP-side LayerNorm eps (diffusers' config.norm_eps, not 1e-6) observable.
    ref = random_diffusers(seed=3, out_channels=None, norm_eps=0.5)
    ours = dit_from_diffusers(ref).eval()
    x, _, y = inputs(TINY)
    t = torch.tensor([0.5, 10.25, 333.3, 998.9])
    with torch.no_grad():
        assert rel_err(ours(x, t, y), ref(x, t, y).sample) < RTOL
    assert ours.config.learn_sigma is False and ours.out_channels == 4


def test_diffusers_from_folder(tmp_path):
    ref = random_diffusers(seed=5)
    ref.save_pretrained(tmp_path)
    ours = dit_from_diffusers(tmp_path).eval()
    x, t, y = inputs(TINY)
    with torch.no_grad():
        assert rel_err(ours(x, t, y), ref(x, t, y).sample) < RTOL


def test_diffusers_differing_embedder_copies_rejected():
    ref = random_diffusers()
    with torch.no_grad():
        ref.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    with pytest.raises(ValueError, match="transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"):
        dit_from_diffusers(ref)


# ----------------------------------------------------------------------------------------------- official layout
def official_pos_embed(dim: int, grid: int) -> np.ndarray:
    """facebookresearch/DiT get_2d_sincos_pos_embed, written out from its definition (meshgrid(w, h))."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)


def official_forward(sd: dict, x, t, y, num_heads: int, patch: int, out_channels: int):
    """The official DiT forward as plain functions over the official state dict (independent of our modules)."""
    lin = lambda h, name: F.linear(h, sd[name + ".weight"], sd[name + ".bias"])  # noqa: E731
    ln = lambda h: F.layer_norm(h, h.shape[-1:], eps=1e-6)  # noqa: E731
    mod = lambda h, shift, scale: h * (1 + scale[:, None]) + shift[:, None]  # noqa: E731
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = lin(F.silu(lin(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    B, N, D = h.shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        sm, cm, gm, sp, cp, gp = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        qkv = lin(mod(ln(h), sm, cm), b + "attn.qkv").reshape(B, N, 3, num_heads, D // num_heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) / math.sqrt(D // num_heads), dim=-1) @ qkv[2]
        h = h + gm[:, None] * lin(a.transpose(1, 2).reshape(B, N, D), b + "attn.proj")
        m = lin(F.gelu(lin(mod(ln(h), sp, cp), b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        h = h + gp[:, None] * m
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(mod(ln(h), shift, scale), "final_layer.linear")
    g = int(N**0.5)
    h = h.reshape(B, g, g, patch, patch, out_channels)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(B, out_channels, g * patch, g * patch)


def test_pos_embed_is_the_official_table():
    model = DiT(**TINY)
    expected = torch.from_numpy(official_pos_embed(TINY["hidden_size"], TINY["sample_size"] // TINY["patch_size"]))
    torch.testing.assert_close(model.pos_embed[0], expected.float(), rtol=0, atol=1e-6)


def test_official_checkpoint_file(tmp_path):
    model = random_dit(seed=7)
    sd = official_state_dict(model)
    assert {"x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
            "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.weight", "blocks.1.mlp.fc1.weight",
            "blocks.1.adaLN_modulation.1.weight", "final_layer.linear.weight",
            "final_layer.adaLN_modulation.1.weight", "pos_embed"} <= set(sd)
    path = tmp_path / "DiT-tiny.pt"
    torch.save({k: v.clone() for k, v in sd.items()}, path)
    loaded = load_official_dit(path, num_heads=TINY["num_heads"]).eval()  # heads: not in the weights
    assert {k: loaded.config[k] for k in TINY} == TINY
    assert loaded.config.learn_sigma is True
    x, t, y = inputs(TINY)
    with torch.no_grad():
        ours = model(x, t, y)
        got = loaded(x, t, y)
        reference = official_forward(sd, x, t, y, TINY["num_heads"], TINY["patch_size"], 2 * TINY["in_channels"])
    assert torch.equal(got, ours)
    err = rel_err(got, reference)
    print(f"official functional reference: relative error {err:.2e}")
    assert err < RTOL


def test_official_heads_inferred_from_named_sizes():
    model = DiT.from_name("DiT-T/2", depth=1)
    assert dit_from_official_state_dict(official_state_dict(model)).config.num_heads == 4  # DiT-T: 128 wide, 4 heads


# ----------------------------------------------------------------------------------------------- loader errors
def test_loader_errors_missing_unexpected_shape(tmp_path):
    sd = official_state_dict(DiT.from_name("DiT-T/2", depth=2))
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing blocks\.1\.mlp\.fc2\.bias"):
        dit_from_official_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected blocks\.0\.extra\.weight"):
        dit_from_official_state_dict({**sd, "blocks.0.extra.weight": torch.zeros(1)})
    bad = dict(sd)
    bad["blocks.0.attn.proj.weight"] = torch.zeros(128, 127)
    with pytest.raises(ValueError, match=r"shape mismatch blocks\.0\.attn\.proj\.weight \(128, 127\) vs \(128, 128\)"):
        dit_from_official_state_dict(bad)
    with pytest.raises(ValueError, match=r"missing final_layer\.linear\.bias"):
        dit_from_official_state_dict({k: v for k, v in sd.items() if k != "final_layer.linear.bias"})
    with pytest.raises(ValueError, match="missing keys pos_embed"):
        dit_from_official_state_dict({k: v for k, v in sd.items() if k != "pos_embed"})
    with pytest.raises(ValueError, match="pos_embed is not the fixed 2-D sin-cos table"):
        dit_from_official_state_dict({**sd, "pos_embed": sd["pos_embed"].flip(1)})


def test_loader_rejects_non_checkpoints(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights")
    with pytest.raises(ValueError, match="not a tensor checkpoint"):
        load_official_dit(text)
    plain = tmp_path / "list.pt"
    torch.save([1, 2, 3], plain)
    with pytest.raises(ValueError, match="state dict of named tensors"):
        load_official_dit(plain)


class _Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').touch()",))


def test_loader_never_unpickles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"x_embedder.proj.weight": _Exploit()}, f, protocol=2)
    with pytest.raises(ValueError, match="not a tensor checkpoint"):
        load_official_dit(evil)
    assert not (tmp_path / "PWNED").exists()


# ----------------------------------------------------------------------------------------------- model contract
def test_fresh_model_outputs_zeros():
    model = DiT(**TINY).eval()
    x, t, y = inputs(TINY)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), torch.zeros(4, 8, 8, 8))


def test_save_load_round_trip(tmp_path):
    model = random_dit(seed=11)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = DiT.from_pretrained(tmp_path).eval()
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    x, t, y = inputs(TINY)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_determinism():
    model = random_dit()
    x, t, y = inputs(TINY)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), model(x, t, y))
    assert torch.equal(random_dit()(x, t, y), random_dit()(x, t, y))


@pytest.mark.parametrize("learn_sigma, channels", [(True, 8), (False, 4)])
def test_output_shapes(learn_sigma, channels):
    model = random_dit(learn_sigma=learn_sigma, patch_size=4)
    x, t, y = inputs(TINY, batch=3)
    with torch.no_grad():
        assert model(x, t, y).shape == (3, channels, 8, 8)
        assert model(x, 250, y).shape == (3, channels, 8, 8)  # a scalar timestep is broadcast
    with pytest.raises(ValueError, match="takes 8x8"):
        model(torch.randn(1, 4, 16, 16), t[:1], y[:1])


def test_class_dropout_in_training_uses_the_null_class():
    model = random_dit(class_dropout_prob=1.0)
    x, t, y = inputs(TINY)
    null = torch.full_like(y, model.null_class_id)
    with torch.no_grad():
        expected = model.eval()(x, t, null)
        assert torch.equal(model.train()(x, t, y), expected)
    assert DiT(**TINY, class_dropout_prob=0.0).label_embed.table.num_embeddings == TINY["num_classes"]


def test_attention_goes_through_the_shared_layer(monkeypatch):
    calls = []

    def counting(q, k, v, **kw):
        calls.append(q.shape)
        return dit_module.__dict__["_real_attention"](q, k, v, **kw)

    monkeypatch.setitem(dit_module.__dict__, "_real_attention", dit_module.attention)
    monkeypatch.setattr(dit_module, "attention", counting)
    model = random_dit()
    x, t, y = inputs(TINY)
    with torch.no_grad():
        model(x, t, y)
    assert calls == [torch.Size([4, 2, 16, 16])] * TINY["depth"]


def test_block_seams_swap_mlp():
    model = random_dit()
    x, t, y = inputs(TINY)
    for block in model.blocks:
        block.attn = torch.nn.Identity()
        block.mlp = torch.nn.Identity()
    with torch.no_grad():
        model(x, t, y)  # the swapped modules are called with and return (B, N, D)


# ----------------------------------------------------------------------------------------------- sizes
def test_sizes():
    xl = DiT.from_name("DiT-XL/2", depth=1)  # depth overridden to keep the test light
    assert (xl.config.hidden_size, xl.config.num_heads, xl.config.patch_size) == (1152, 16, 2)
    assert {k: DIT_CONFIGS["DiT-XL/2"][k] for k in ("depth", "sample_size", "num_classes")} == dict(
        depth=28, sample_size=32, num_classes=1000)
    paper = {"DiT-L/4": (24, 1024, 16), "DiT-B/8": (12, 768, 12), "DiT-S/2": (12, 384, 6)}
    for name, (depth, hidden, heads) in paper.items():
        cfg = DIT_CONFIGS[name]
        assert (cfg["depth"], cfg["hidden_size"], cfg["num_heads"]) == (depth, hidden, heads)
    assert len([n for n in DIT_CONFIGS if not n.startswith("DiT-T")]) == 12
    import shapes

    tiny = DiT.from_name("DiT-T/2")
    assert tiny.config.num_classes == shapes.NUM_CLASSES and tiny.null_class_id == shapes.NULL_CLASS
    x = torch.randn(2, 4, 16, 16)
    assert tiny(x, torch.tensor([1, 2]), torch.tensor([0, shapes.NULL_CLASS])).shape == (2, 8, 16, 16)


def test_from_name_unknown():
    with pytest.raises(ValueError, match=r"unknown DiT size 'DiT-XXL/2'; valid: DiT-XL/2, .*DiT-T/2"):
        DiT.from_name("DiT-XXL/2")
