"""vlm/var_loaders.py on tiny random weights laid out like the release (`var_dNN.pth`, `vae_ch160v4096z32.pth`):
saved with torch.save as plain and trainer-nested state dicts, reloaded strictly with weights_only, same outputs;
the config is inferred from the keys; wrong checkpoints are refused with the offending keys named."""

import pickle

import pytest
import torch

from vlm.var import VAR, level_ids
from vlm.var_loaders import load_official_var, load_official_vqvae, var_config_from_state_dict
from vlm.vqvae import MultiScaleVQVAE

torch.set_num_threads(1)
PATCH = (1, 2, 4)


def official_like_var(attn_l2_norm=True, depth=2):
    """A d=2 VAR with the release's naming and head width 64 (num_heads = depth, width 64·depth)."""
    torch.manual_seed(0)
    model = VAR(depth=depth, embed_dim=64 * depth, num_heads=depth, num_classes=5, vocab_size=32, z_channels=8,
                patch_nums=PATCH, attn_l2_norm=attn_l2_norm, init_adaln_gamma=0.5)
    with torch.no_grad():  # make the biases nonzero, so a dropped key would show in the outputs
        for b in model.blocks:
            b.attn.q_bias.normal_()
            b.attn.v_bias.normal_()
    return model.eval()


def official_like_vqvae():
    """The release's tokenizer architecture (ch_mult 1,1,2,2,4, attention, GroupNorm 32) at ch 32, 64 px."""
    torch.manual_seed(1)
    return MultiScaleVQVAE(ch=32, ch_mult=(1, 1, 2, 2, 4), vocab_size=64, z_channels=8, patch_nums=PATCH,
                           sample_size=64).eval()


@pytest.mark.parametrize("l2", [True, False])
@pytest.mark.parametrize("nested", [False, True])
def test_var_round_trip_through_a_release_layout_file(tmp_path, l2, nested):
    model = official_like_var(attn_l2_norm=l2)
    sd = model.state_dict()
    assert ("blocks.0.attn.scale_mul_1H11" in sd) == l2
    path = tmp_path / "var_d2.pth"
    torch.save({"trainer": {"var_wo_ddp": sd, "step": torch.tensor(3)}} if nested else sd, path)
    loaded = load_official_var(path)
    cfg = loaded.config
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.num_classes, cfg.vocab_size, cfg.z_channels) == \
        (2, 128, 2, 5, 32, 8)
    assert tuple(cfg.patch_nums) == PATCH and cfg.attn_l2_norm is l2
    labels = torch.tensor([0, 4, 5])
    x = torch.randn(3, model.L - 1, 8)
    torch.testing.assert_close(loaded(labels, x), model(labels, x), rtol=0, atol=0)


def test_var_config_of_the_release_d16_and_d30_layouts():
    for d in (16, 30):
        with torch.device("meta"):
            sd = VAR.from_name(f"VAR-d{d}").state_dict()
        sd["lvl_1L"] = level_ids((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)).view(1, 680)  # meta tensors hold no data
        cfg = var_config_from_state_dict(sd)
        assert (cfg["depth"], cfg["embed_dim"], cfg["num_heads"], cfg["num_classes"], cfg["vocab_size"]) == \
            (d, 64 * d, d, 1000, 4096)
        assert cfg["patch_nums"] == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) and cfg["attn_l2_norm"] and cfg["mlp_ratio"] == 4


def test_vqvae_round_trip_and_ema_rows_are_overwritten(tmp_path):
    vq = official_like_vqvae()
    sd = vq.state_dict()
    assert len(sd) == 324  # the release's key set at a smaller width
    sd["quantize.ema_vocab_hit_SV"] = torch.rand(10, 64)  # trained with the 10-scale schedule
    path = tmp_path / "vae.pth"
    torch.save({"trainer": {"vae_local": sd}}, path)
    loaded = load_official_vqvae(path, patch_nums=PATCH)
    assert loaded.config.ch == 32 and tuple(loaded.config.ch_mult) == (1, 1, 2, 2, 4) and loaded.config.using_sa
    assert loaded.quantize.ema_vocab_hit_SV.shape == (3, 64) and loaded.quantize.ema_vocab_hit_SV.sum() == 0
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    tokens = vq.encode_indices(x)
    assert all(torch.equal(a, b) for a, b in zip(tokens, loaded.encode_indices(x)))
    torch.testing.assert_close(loaded.decode_indices(tokens), vq.decode_indices(tokens), rtol=0, atol=0)


def test_wrong_checkpoints_are_refused_with_the_keys_named(tmp_path):
    sd = official_like_var().state_dict()
    missing = {k: v for k, v in sd.items() if k != "blocks.1.attn.proj.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.attn.proj.weight'\]"):
        load_official_var(missing)
    with pytest.raises(ValueError, match="unexpected keys.*blocks.1"):
        load_official_var(sd, depth=1)  # a depth mismatch shows up as extra blocks.N (VAR #136)
    with pytest.raises(ValueError, match="shape mismatches: head.weight"):
        load_official_var(sd, vocab_size=16)
    with pytest.raises(ValueError, match="missing keys.*scale_mul_1H11"):
        load_official_var(official_like_var(attn_l2_norm=False).state_dict(), attn_l2_norm=True)
    with pytest.raises(ValueError, match=r"\['trainer'\]\['var_wo_ddp'\]"):
        load_official_var({"trainer": {"vae_local": sd}})
    with pytest.raises(ValueError, match="key 'pos_start' is missing"):
        load_official_var({"head.weight": torch.zeros(2, 2)})
    with pytest.raises(FileNotFoundError):
        load_official_var(tmp_path / "absent.pth")


class NotAWeight:
    pass


def test_pickled_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"pos_start": NotAWeight()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_official_var(path)
