"""Load foreign DiT checkpoints into `dit.dit.DiT`, adapting their layouts here rather than in the model.

- `load_official_dit(path)` / `dit_from_official_state_dict(sd)`: facebookresearch/DiT checkpoints
  (`DiT-XL-2-256x256.pt`), read with `torch.load(weights_only=True)`, never unpickling arbitrary objects.
- `dit_from_diffusers(model_or_folder)`: diffusers' `DiTTransformer2DModel` (e.g. the facebook/DiT-XL-2-256 repo).

Every loader infers the config from the tensors' shapes, builds the model, then checks that the mapped state dict
covers our parameters exactly (names and shapes) and raises ValueError listing what is missing, unexpected or
mis-shaped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .dit import PAPER_SIZES, TINY_SIZES, DiT, sincos_2d

# How many offending names an error message lists.
MAX_LISTED = 8
# The official checkpoint and diffusers' port both trained/ship with label dropout 0.1 (one null-class row).
OFFICIAL_CLASS_DROPOUT = 0.1
# The official checkpoint stores its float32 copy of the sin-cos table computed in float64 by numpy.
POS_EMBED_ATOL = 1e-5
# diffusers' DiT port: its timestep features divide by (half - 1), and its MLP-side LayerNorm uses config.norm_eps.
DIFFUSERS_TIMESTEP_FREQ_SHIFT = 1


def _listing(names) -> str:
    names = sorted(names)
    more = f" ... (+{len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def _require(sd: Mapping[str, Tensor], *keys: str, source: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"not a {source} DiT checkpoint: missing keys {_listing(missing)}")


def _check_fit(sd: Mapping[str, Tensor], expected: Mapping[str, Tensor], source: str, model: DiT) -> None:
    """Raise ValueError listing missing, unexpected and mis-shaped names (in the checkpoint's own naming)."""
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    mis_shaped = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(expected) & set(sd)
        if sd[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    if mis_shaped:
        problems.append(f"shape mismatch {_listing(mis_shaped)}")
    if problems:
        config = {k: v for k, v in model.config.items() if not k.startswith("_")}
        raise ValueError(f"{source} checkpoint does not fit DiT({config}): " + "; ".join(problems))


def _load_exact(model: DiT, sd: dict[str, Tensor], source: str) -> DiT:
    _check_fit(sd, model.state_dict(), source, model)
    model.load_state_dict(sd, strict=True)
    return model


# ----------------------------------------------------------------------------------------------- official
OFFICIAL_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


# Our prefix -> the official one, for everything outside the blocks (inside them only adaLN_modulation.1 differs).
OURS_TO_OFFICIAL_PREFIX = [
    ("patch_embed.", "x_embedder.proj."),
    ("time_embed.mlp.", "t_embedder.mlp."),
    ("label_embed.table.", "y_embedder.embedding_table."),
    ("final.modulation.", "final_layer.adaLN_modulation.1."),
    ("final.linear.", "final_layer.linear."),
]


def _official_to_ours(key: str) -> str:
    """Official name -> ours. Only prefixes differ; q/k/v are fused in both."""
    for new, old in OURS_TO_OFFICIAL_PREFIX:
        if key.startswith(old):
            return new + key[len(old):]
    m = OFFICIAL_BLOCK_KEY.match(key)
    if m:
        rest = key[m.end():]
        if rest.startswith("adaLN_modulation.1."):
            rest = "modulation." + rest[len("adaLN_modulation.1."):]
        return f"blocks.{m.group(1)}.{rest}"
    return key  # unknown: reported as unexpected


def _paper_heads(hidden: int) -> int:
    """The head count is not in the weights: take it from the named size with this width."""
    for depth_width_heads in (*PAPER_SIZES.values(), *TINY_SIZES.values()):
        if depth_width_heads[1] == hidden:
            return depth_width_heads[2]
    raise ValueError(f"hidden size {hidden} is not one of the named DiT sizes; pass num_heads=...")


def official_config_from_state_dict(sd: Mapping[str, Tensor], num_heads: int | None = None) -> dict:
    """depth, hidden, patch, channels, classes, learn_sigma and input size from the official tensors' shapes."""
    _require(sd, "x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
             "pos_embed", source="facebookresearch/DiT")
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    out_channels = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"final layer gives {out_channels} channels for {in_channels} input channels")
    tokens = sd["pos_embed"].shape[-2]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"pos_embed has {tokens} tokens, not a square grid")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := OFFICIAL_BLOCK_KEY.match(k))), default=-1)
    # The official table always has the null-class row (its models train with label dropout).
    return dict(
        sample_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
        num_heads=num_heads or _paper_heads(hidden),
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out_channels == 2 * in_channels, class_dropout_prob=OFFICIAL_CLASS_DROPOUT,
    )


def dit_from_official_state_dict(state_dict: Mapping[str, Tensor], **config) -> DiT:
    """Build a DiT from a facebookresearch/DiT state dict; `config` overrides what is inferred (e.g. num_heads,
    which the weights do not determine)."""
    sd = dict(state_dict)
    cfg = {**official_config_from_state_dict(sd, config.get("num_heads")), **config}
    model = DiT(**cfg)
    # Names and shapes are checked in the official naming, so the error names what the file holds.
    _check_fit(sd, official_state_dict(model), "facebookresearch/DiT", model)
    if not torch.allclose(sd.pop("pos_embed").float(), model.pos_embed, atol=POS_EMBED_ATOL):
        raise ValueError("the checkpoint's pos_embed is not the fixed 2-D sin-cos table this DiT uses")
    return _load_exact(model, {_official_to_ours(k): v for k, v in sd.items()}, "facebookresearch/DiT")


def _read_weights(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler fails in many ways on foreign bytes; all mean "not weights"
        raise ValueError(f"{path} is not a tensor checkpoint torch.load(weights_only=True) can read: {e}") from e
    # Training checkpoints of the official repo nest the weights; prefer the EMA ones used for sampling.
    if isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        for key in ("ema", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ValueError(f"{path} does not hold a state dict of named tensors")
    return dict(obj)


def load_official_dit(path: str | Path, **config) -> DiT:
    """Load a facebookresearch/DiT checkpoint file (.pt or .safetensors) into our DiT."""
    return dit_from_official_state_dict(_read_weights(Path(path)), **config)


# ----------------------------------------------------------------------------------------------- diffusers
DIFFUSERS_EMBED = "transformer_blocks.{i}.norm1.emb."


def dit_from_diffusers(model_or_folder) -> DiT:
    """Build a DiT computing what diffusers' `DiTTransformer2DModel` computes.

    diffusers keeps a copy of the timestep/class embedder in every block; we compute the conditioning once, so
    block 0's copy is used after checking the others are identical. Its per-block adaLN chunks (shift, scale,
    gate for attention, then MLP) and final (shift, scale) are in the official order, so rows map unchanged;
    separate q/k/v are fused into our qkv.
    """
    if isinstance(model_or_folder, (str, Path)):
        from diffusers import DiTTransformer2DModel

        model_or_folder = DiTTransformer2DModel.from_pretrained(model_or_folder)
    cfg = model_or_folder.config
    unsupported = {
        "norm_type": (cfg.norm_type, "ada_norm_zero"),
        "activation_fn": (cfg.activation_fn, "gelu-approximate"),
        "attention_bias": (cfg.attention_bias, True),
        "norm_elementwise_affine": (cfg.norm_elementwise_affine, False),
    }
    bad = [f"{k}={got!r} (need {want!r})" for k, (got, want) in unsupported.items() if got != want]
    if bad:
        raise ValueError(f"diffusers DiT variant not supported: {', '.join(bad)}")
    sd = {k: v.detach() for k, v in model_or_folder.state_dict().items()}
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    out_channels = cfg.out_channels or cfg.in_channels
    if out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        raise ValueError(f"out_channels {out_channels} is neither in_channels nor twice it")
    model = DiT(
        sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels, hidden_size=hidden,
        depth=cfg.num_layers, num_heads=cfg.num_attention_heads, num_classes=cfg.num_embeds_ada_norm,
        learn_sigma=out_channels == 2 * cfg.in_channels, class_dropout_prob=OFFICIAL_CLASS_DROPOUT,
        mlp_norm_eps=cfg.norm_eps, timestep_freq_shift=DIFFUSERS_TIMESTEP_FREQ_SHIFT,
    )
    return _load_exact(model, diffusers_to_ours(sd, cfg.num_layers), "diffusers DiTTransformer2DModel")


def diffusers_to_ours(sd: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    sd = dict(sd)
    out: dict[str, Tensor] = {}

    def take(key: str) -> Tensor:
        if key not in sd:
            raise ValueError(f"diffusers DiT state dict: missing {key}")
        return sd.pop(key)

    # The embedder, once: block 0's copy, after checking that every block holds the same one.
    emb0 = DIFFUSERS_EMBED.format(i=0)
    embed_names = {
        "timestep_embedder.linear_1": "time_embed.mlp.0",
        "timestep_embedder.linear_2": "time_embed.mlp.2",
    }
    for theirs, ours in embed_names.items():
        for param in ("weight", "bias"):
            out[f"{ours}.{param}"] = take(f"{emb0}{theirs}.{param}")
    out["label_embed.table.weight"] = take(f"{emb0}class_embedder.embedding_table.weight")
    theirs_to_ours = {f"{t}.{param}": f"{o}.{param}" for t, o in embed_names.items() for param in ("weight", "bias")}
    theirs_to_ours["class_embedder.embedding_table.weight"] = "label_embed.table.weight"
    differing = []
    for i in range(1, depth):
        prefix = DIFFUSERS_EMBED.format(i=i)
        for name, ours in theirs_to_ours.items():
            copy = take(prefix + name)
            if copy.shape != out[ours].shape or not torch.equal(copy, out[ours]):
                differing.append(prefix + name)
    if differing:
        raise ValueError(
            "diffusers DiT blocks hold different timestep/class embedders, but this DiT computes the conditioning "
            f"once: {_listing(differing)} differ from block 0's copy"
        )

    out["patch_embed.weight"] = take("pos_embed.proj.weight")
    out["patch_embed.bias"] = take("pos_embed.proj.bias")
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for param in ("weight", "bias"):
            out[f"{dst}modulation.{param}"] = take(f"{src}norm1.linear.{param}")
            out[f"{dst}attn.qkv.{param}"] = torch.cat([take(f"{src}attn1.to_{n}.{param}") for n in "qkv"], dim=0)
            out[f"{dst}attn.proj.{param}"] = take(f"{src}attn1.to_out.0.{param}")
            out[f"{dst}mlp.fc1.{param}"] = take(f"{src}ff.net.0.proj.{param}")
            out[f"{dst}mlp.fc2.{param}"] = take(f"{src}ff.net.2.{param}")
    for param in ("weight", "bias"):
        out[f"final.modulation.{param}"] = take(f"proj_out_1.{param}")
        out[f"final.linear.{param}"] = take(f"proj_out_2.{param}")
    # Whatever is left has no place in our model; passing it on makes _load_exact list it as unexpected.
    out.update(sd)
    return out


def official_state_dict(model: DiT) -> dict[str, Tensor]:
    """Our weights in the facebookresearch/DiT layout (the inverse of `dit_from_official_state_dict`), with the
    `pos_embed` the official checkpoint stores."""
    inverse = {}
    for key, value in model.state_dict().items():
        for ours, theirs in OURS_TO_OFFICIAL_PREFIX:
            if key.startswith(ours):
                inverse[theirs + key[len(ours):]] = value
                break
        else:
            inverse[key.replace(".modulation.", ".adaLN_modulation.1.")] = value
    grid = model.config.sample_size // model.config.patch_size
    inverse["pos_embed"] = sincos_2d(grid, grid, model.config.hidden_size)[None]
    return inverse


# ----------------------------------------------------------------------------------------------- PixArt (diffusers)
# diffusers' PixArtTransformer2DModel names outside the blocks -> ours (weights and biases alike).
PIXART_DIFFUSERS_TO_OURS = {
    "pos_embed.proj": "patch_embed",
    "adaln_single.emb.timestep_embedder.linear_1": "time_embed.mlp.0",
    "adaln_single.emb.timestep_embedder.linear_2": "time_embed.mlp.2",
    "adaln_single.linear": "time_modulation.1",
    "caption_projection.linear_1": "caption_embed.fc1",
    "caption_projection.linear_2": "caption_embed.fc2",
    "proj_out": "final.linear",
}
# ... and inside block i (besides q/k/v, which are fused here).
PIXART_DIFFUSERS_BLOCK_TO_OURS = {
    "attn1.to_out.0": "attn.proj",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_out.0": "cross_attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}


def pixart_from_diffusers(model_or_folder):
    """Build a `dit.pixart.PixArtDiT` computing what diffusers' `PixArtTransformer2DModel` computes (a model, or a
    folder / hub id for `from_pretrained`).

    Layout adapted here: self-attention q/k/v are fused into `attn.qkv` (rows q, k, v), cross-attention k/v into
    `cross_attn.kv` (rows k, v); the tables and the adaLN-single linear map unchanged (same chunk order: shift,
    scale, gate for attention, then MLP; final shift, scale). Raises ValueError on configs we do not compute
    (micro-conditioning, other norms or activations, no caption projection, ...) and on missing, unexpected or
    mis-shaped tensors.
    """
    from .pixart import PixArtDiT, default_interpolation_scale

    if isinstance(model_or_folder, (str, Path)):
        from diffusers import PixArtTransformer2DModel

        model_or_folder = PixArtTransformer2DModel.from_pretrained(model_or_folder)
    cfg = model_or_folder.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    # diffusers resolves use_additional_conditions=None to "on exactly for sample_size 128" (PixArt-α 1024 px).
    additional = cfg.use_additional_conditions
    if additional is None:
        additional = cfg.sample_size == 128
    unsupported = {
        "norm_type": (cfg.norm_type, "ada_norm_single"),
        "activation_fn": (cfg.activation_fn, "gelu-approximate"),
        "attention_bias": (cfg.attention_bias, True),
        "norm_elementwise_affine": (cfg.norm_elementwise_affine, False),
        "attention_type": (cfg.attention_type, "default"),
        "use_additional_conditions (resolved)": (additional, False),
        "cross_attention_dim": (cfg.cross_attention_dim, hidden),
    }
    bad = [f"{k}={got!r} (need {want!r})" for k, (got, want) in unsupported.items() if got != want]
    if cfg.caption_channels is None:
        bad.append("caption_channels=None (need a caption projection)")
    if bad:
        raise ValueError(f"diffusers PixArt variant not supported: {', '.join(bad)}")
    out_channels = cfg.out_channels or cfg.in_channels
    if out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        raise ValueError(f"out_channels {out_channels} is neither in_channels nor twice it")
    interpolation_scale = cfg.interpolation_scale
    if interpolation_scale is None:
        interpolation_scale = default_interpolation_scale(cfg.sample_size)
    model = PixArtDiT(
        sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels, hidden_size=hidden,
        depth=cfg.num_layers, num_heads=cfg.num_attention_heads, caption_channels=cfg.caption_channels,
        learn_sigma=out_channels == 2 * cfg.in_channels, norm_eps=cfg.norm_eps,
        interpolation_scale=float(interpolation_scale),
    )
    sd = {k: v.detach() for k, v in model_or_folder.state_dict().items()}
    return pixart_state_dict_from_diffusers_into(model, sd)


def pixart_state_dict_from_diffusers_into(model, state_dict: Mapping[str, Tensor]):
    """Load a diffusers-layout PixArt state dict into `model` (a PixArtDiT), checking names and shapes."""
    blocks = [(f"transformer_blocks.{i}.", f"blocks.{i}.", True) for i in range(model.config.depth)]
    return _adaln_single_from_diffusers(model, state_dict, "diffusers PixArtTransformer2DModel", blocks)


def _adaln_single_from_diffusers(model, state_dict: Mapping[str, Tensor], source: str, blocks):
    """The diffusers -> ours mapping shared by the adaLN-single models (PixArt, Latte). `blocks` lists
    (diffusers prefix, our prefix, has cross-attention). Self-attention q/k/v are fused into `attn.qkv`,
    cross-attention k/v into `cross_attn.kv`; every tensor must be used exactly once."""
    sd = dict(state_dict)
    out: dict[str, Tensor] = {}
    missing: list[str] = []

    def take(key: str) -> Tensor | None:
        if key not in sd:
            missing.append(key)
            return None
        return sd.pop(key)

    def fuse(ours: str, keys: list[str]) -> None:
        parts = [take(k) for k in keys]
        if any(p is None for p in parts):
            return
        if len({p.shape for p in parts}) > 1:
            shapes = ", ".join(f"{k} {tuple(p.shape)}" for k, p in zip(keys, parts))
            raise ValueError(f"{source} checkpoint: projections fused into {ours} differ in shape: {shapes}")
        out[ours] = torch.cat(parts, dim=0)

    for theirs, ours in PIXART_DIFFUSERS_TO_OURS.items():
        for param in ("weight", "bias"):
            if (value := take(f"{theirs}.{param}")) is not None:
                out[f"{ours}.{param}"] = value
    if (value := take("scale_shift_table")) is not None:
        out["final.scale_shift_table"] = value
    for src, dst, cross in blocks:
        if (value := take(f"{src}scale_shift_table")) is not None:
            out[f"{dst}scale_shift_table"] = value
        for param in ("weight", "bias"):
            fuse(f"{dst}attn.qkv.{param}", [f"{src}attn1.to_{n}.{param}" for n in "qkv"])
            if cross:
                fuse(f"{dst}cross_attn.kv.{param}", [f"{src}attn2.to_{n}.{param}" for n in "kv"])
            for theirs, ours in PIXART_DIFFUSERS_BLOCK_TO_OURS.items():
                if not cross and theirs.startswith("attn2."):
                    continue
                if (value := take(f"{src}{theirs}.{param}")) is not None:
                    out[f"{dst}{ours}.{param}"] = value
    problems = []
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if sd:  # left over: no place in our model (e.g. extra blocks, micro-conditioning embedders)
        problems.append(f"unexpected {_listing(sd)}")
    if problems:
        config = {k: v for k, v in model.config.items() if not k.startswith("_")}
        raise ValueError(f"{source} checkpoint does not fit {type(model).__name__}({config}): " + "; ".join(problems))
    return _load_exact(model, out, source)


# ----------------------------------------------------------------------------------------------- Latte (diffusers)
def latte_from_diffusers(model_or_folder):
    """Build a `dit.latte.LatteDiT` computing what diffusers' `LatteTransformer3DModel` computes (a model, or a
    folder / hub id for `from_pretrained`).

    diffusers' `transformer_blocks.i` are our `spatial_blocks.i` (named as PixArt's blocks) and its
    `temporal_transformer_blocks.i` our `temporal_blocks.i` (the same names without cross-attention); everything
    outside the blocks is named as in PixArt. Self-attention q/k/v are fused into `attn.qkv` (rows q, k, v),
    cross-attention k/v into `cross_attn.kv` (rows k, v). Raises ValueError on configs we do not compute (other
    norms or activations, affine norms, no attention bias, cross_attention_dim other than the hidden size, no
    caption projection) and on missing, unexpected or mis-shaped tensors.
    """
    from .latte import LatteDiT

    if isinstance(model_or_folder, (str, Path)):
        from diffusers import LatteTransformer3DModel

        model_or_folder = LatteTransformer3DModel.from_pretrained(model_or_folder)
    cfg = model_or_folder.config
    if cfg.patch_size is None or cfg.in_channels is None:
        raise ValueError(f"diffusers Latte variant not supported: patch_size={cfg.patch_size!r}, "
                         f"in_channels={cfg.in_channels!r} (need a patchified latent input)")
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    unsupported = {
        "norm_type": (cfg.norm_type, "ada_norm_single"),
        "activation_fn": (cfg.activation_fn, "gelu-approximate"),
        "attention_bias": (cfg.attention_bias, True),
        "norm_elementwise_affine": (cfg.norm_elementwise_affine, False),
        "cross_attention_dim": (cfg.cross_attention_dim, hidden),
    }
    bad = [f"{k}={got!r} (need {want!r})" for k, (got, want) in unsupported.items() if got != want]
    if cfg.caption_channels is None:
        bad.append("caption_channels=None (need a caption projection)")
    if bad:
        raise ValueError(f"diffusers Latte variant not supported: {', '.join(bad)}")
    out_channels = cfg.out_channels or cfg.in_channels
    if out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        raise ValueError(f"out_channels {out_channels} is neither in_channels nor twice it")
    model = LatteDiT(
        sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels, hidden_size=hidden,
        depth=cfg.num_layers, num_heads=cfg.num_attention_heads, caption_channels=cfg.caption_channels,
        num_frames=cfg.video_length, learn_sigma=out_channels == 2 * cfg.in_channels, norm_eps=cfg.norm_eps,
    )
    sd = {k: v.detach() for k, v in model_or_folder.state_dict().items()}
    return latte_state_dict_from_diffusers_into(model, sd)


def latte_state_dict_from_diffusers_into(model, state_dict: Mapping[str, Tensor]):
    """Load a diffusers-layout Latte state dict into `model` (a LatteDiT), checking names and shapes."""
    blocks = []
    for i in range(model.config.depth):
        blocks.append((f"transformer_blocks.{i}.", f"spatial_blocks.{i}.", True))
        blocks.append((f"temporal_transformer_blocks.{i}.", f"temporal_blocks.{i}.", False))
    return _adaln_single_from_diffusers(model, state_dict, "diffusers LatteTransformer3DModel", blocks)
