"""Load the official FoundationVision/VAR release: `vae_ch160v4096z32.pth` (tokenizer) and `var_d16.pth` …
`var_d30.pth` (transformers), with `torch.load(weights_only=True)` (no unpickling of code).

The configuration is read from the state dict itself, so a checkpoint never meets a model of the wrong shape:
- transformer: depth from the highest `blocks.N`, width from `pos_start`, heads from `scale_mul_1H11` (or width / 64),
  attn_l2_norm from the presence of `scale_mul_1H11` (checkpoints trained with it have the key; building without
  it is the mismatch of VAR issue #25), classes from `class_emb` (last row = null), vocabulary from `head`, token
  channels from `word_embed`, patch_nums from the `lvl_1L` buffer (tokens per level);
- tokenizer: ch / ch_mult / blocks per level / attention from the encoder's keys, vocabulary and channels from
  the codebook, the number of shared φ from `quantize.quant_resi.qresi_ls.*`; patch_nums come from the caller
  (the release's default), since the tokenizer's weights do not depend on them. `quantize.ema_vocab_hit_SV` (a
  training statistic with one row per scale) is replaced by the model's own buffer when its rows differ.
Trainer checkpoints nest the weights under ['trainer']['var_wo_ddp' | 'vae_local'] (VAR #58, #144): unwrapped.
Missing or unexpected keys and shape mismatches raise a ValueError that names them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor

from .var import VAR
from .vqvae import IMAGENET_PATCH_NUMS, MultiScaleVQVAE

TRAINER_KEYS = {"var": "var_wo_ddp", "vqvae": "vae_local"}


def read_state_dict(source: str | Path | dict, kind: str) -> dict[str, Tensor]:
    """A plain state dict from a path (torch.load, weights_only) or a dict, unwrapping trainer nesting."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        sd = torch.load(path, map_location="cpu", weights_only=True)
    else:
        sd = source
    if not isinstance(sd, dict):
        raise ValueError(f"a {kind} checkpoint must hold a state dict, got {type(sd).__name__}")
    if "trainer" in sd:
        inner = sd["trainer"]
        key = TRAINER_KEYS[kind]
        if not isinstance(inner, dict) or key not in inner:
            raise ValueError(f"trainer checkpoint without ['trainer'][{key!r}] (has {sorted(inner)[:8]})")
        sd = inner[key]
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{kind} checkpoint entries that are not tensors: {bad[:5]}")
    return dict(sd)


def _require(sd: dict, key: str, kind: str) -> Tensor:
    if key not in sd:
        raise ValueError(f"not an official {kind} state dict: key {key!r} is missing")
    return sd[key]


def _load_strict(model: torch.nn.Module, sd: dict[str, Tensor], what: str) -> None:
    """Strict load with errors that list the offending keys and shapes (the model is on the meta device: assign)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"{what}: {len(missing)} missing keys {missing[:6]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:6]}")
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items()
             if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError(f"{what}: shape mismatches: {'; '.join(wrong[:6])}")
    model.load_state_dict(sd, strict=True, assign=True)


# ----------------------------------------------------------------------------------------------- transformer
def var_config_from_state_dict(sd: dict[str, Tensor]) -> dict:
    C = _require(sd, "pos_start", "VAR").shape[-1]
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise ValueError("not an official VAR state dict: no blocks.N keys")
    depth = max(blocks) + 1
    if blocks != set(range(depth)):
        raise ValueError(f"VAR state dict has gaps in its blocks: {sorted(set(range(depth)) - blocks)} missing")
    l2 = "blocks.0.attn.scale_mul_1H11" in sd
    heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1] if l2 else C // 64
    lvl = _require(sd, "lvl_1L", "VAR").flatten()
    counts = torch.bincount(lvl).tolist()
    patch_nums = [math.isqrt(c) for c in counts]
    if any(p * p != c for p, c in zip(patch_nums, counts)):
        raise ValueError(f"lvl_1L has non-square scale lengths {counts}")
    return dict(depth=depth, embed_dim=C, num_heads=heads,
                num_classes=_require(sd, "class_emb.weight", "VAR").shape[0] - 1,
                vocab_size=_require(sd, "head.weight", "VAR").shape[0],
                z_channels=_require(sd, "word_embed.weight", "VAR").shape[1], patch_nums=tuple(patch_nums),
                mlp_ratio=_require(sd, "blocks.0.ffn.fc1.weight", "VAR").shape[0] / C, attn_l2_norm=l2)


def load_official_var(source: str | Path | dict, dtype: torch.dtype | None = None, **overrides) -> VAR:
    """A `VAR` holding an official checkpoint (path or state dict). `overrides` change the inferred config (e.g.
    depth=...), which then has to match the weights exactly or the load raises."""
    sd = read_state_dict(source, "var")
    config = {**var_config_from_state_dict(sd), **overrides}
    with torch.device("meta"):
        model = VAR(**config)
    _load_strict(model, sd, f"VAR checkpoint (config {config})")
    return model.to(dtype=dtype).eval() if dtype is not None else model.eval()


# ----------------------------------------------------------------------------------------------- tokenizer
def vqvae_config_from_state_dict(sd: dict[str, Tensor], patch_nums=IMAGENET_PATCH_NUMS) -> dict:
    emb = _require(sd, "quantize.embedding.weight", "VQVAE")
    ch = _require(sd, "encoder.conv_in.weight", "VQVAE").shape[0]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels:
        raise ValueError("not an official VQVAE state dict: no encoder.down.N keys")
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels)
    n_blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    last = levels[-1]
    phis = {int(m.group(1)) for k in sd if (m := re.match(r"quantize\.quant_resi\.qresi_ls\.(\d+)\.", k))}
    if not phis:
        raise ValueError("VQVAE state dict has no quantize.quant_resi.qresi_ls.N (only partially shared φ is "
                         "supported, the release's layout)")
    groups = 32  # the release's GroupNorm groups (not recoverable from the weights)
    return dict(vocab_size=emb.shape[0], z_channels=emb.shape[1], ch=ch, ch_mult=ch_mult, num_res_blocks=n_blocks,
                norm_groups=groups, using_sa=f"encoder.down.{last}.attn.0.qkv.weight" in sd,
                using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd, share_quant_resi=len(phis),
                quant_conv_ks=_require(sd, "quant_conv.weight", "VQVAE").shape[-1], patch_nums=tuple(patch_nums),
                sample_size=patch_nums[-1] * 2 ** (len(levels) - 1))


def load_official_vqvae(source: str | Path | dict, patch_nums=IMAGENET_PATCH_NUMS, dtype: torch.dtype | None = None,
                        **overrides) -> MultiScaleVQVAE:
    """A `MultiScaleVQVAE` holding an official tokenizer checkpoint (path or state dict)."""
    sd = read_state_dict(source, "vqvae")
    config = {**vqvae_config_from_state_dict(sd, patch_nums), **overrides}
    with torch.device("meta"):
        model = MultiScaleVQVAE(**config)
    key = "quantize.ema_vocab_hit_SV"
    own_hits = torch.zeros(model.quantize.ema_vocab_hit_SV.shape)
    if key in sd and tuple(sd[key].shape) != tuple(own_hits.shape):
        # One row per scale of the schedule it was trained with; a different schedule starts from zero counts.
        sd[key] = own_hits
    _load_strict(model, sd, f"VQVAE checkpoint (config {config})")
    return model.to(dtype=dtype).eval() if dtype is not None else model.eval()
