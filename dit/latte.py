"""Text-conditional video DiT in the Latte style (Ma et al., "Latte: Latent Diffusion Transformer for Video
Generation", 2024), as diffusers' `LatteTransformer3DModel` (the Latte-1 text-to-video model) computes it.

Reads top to bottom: helpers (the temporal sin-cos table), the temporal block, the model, and the named sizes.
Everything else is PixArt's (`dit/pixart.py`) or DiT's (`dit/dit.py`), imported: the patch embedding with its
scaled 2-D sin-cos table, the timestep embedder, adaLN-single conditioning, the caption projection, the spatial
block (self-attention over one frame, cross-attention to the text, MLP: exactly `PixArtBlock`) and the final layer.
What Latte adds to PixArt:

- the video (B, C, F, H, W) is patchified frame by frame: B·F images of N tokens with the same 2-D positions;
- after every spatial block comes a temporal block: the same adaLN-single block without cross-attention, whose
  self-attention runs over the F frames of one patch position (B·N sequences of F tokens);
- a fixed 1-D sin-cos table over frames is added once, right before the first temporal block (not at the input),
  and only for videos (F > 1; a single frame is an image and gets none), as diffusers does;
- `depth` counts (spatial, temporal) pairs, as diffusers' `num_layers`: Latte-1 has num_layers = 28, i.e. 28
  spatial and 28 temporal blocks (56 blocks in all; the class-conditional Latte-XL/2 of the paper's repository
  instead splits 28 blocks into 14 pairs).

The conditioning is computed once per forward: t (B, D) for the final layer and the shared block modulation
(B, 6, D); the spatial blocks see it once per frame, the temporal blocks once per patch position.

Checkpoints of diffusers' `LatteTransformer3DModel` are adapted by `dit/loaders.py` `latte_from_diffusers`.

Shapes: B batch, C latent channels, F frames, H/W latent height/width, p patch size, N = (H/p)(W/p) tokens per
frame, L text tokens, E text encoder width (caption_channels), D hidden size, h heads, Dh = D / h head size.

Seams, as in PixArt: `spatial_blocks[i]` and `temporal_blocks[i]` have separate named `attn` / `cross_attn` / `mlp`
submodules taking and returning (batch', tokens, D); every linear is a plain `nn.Linear`; `forward` is `embed` ->
`condition` / `embed_text` -> (spatial block, to_temporal, temporal block, to_spatial)* -> `head`, all public.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from attention import attention

from .dit import (
    BLOCK_MODULATIONS,
    LAYERNORM_EPS,
    MLP,
    QKNorm,
    SelfAttention,
    TimestepEmbedder,
    modulate,
    sincos_1d,
)
from .pixart import (
    PIXART_TEXT_TOKENS,
    CaptionProjection,
    PixArtBlock,
    PixArtFinalLayer,
    adaln_single_condition,
    default_interpolation_scale,
    embed_caption,
    init_adaln_single_weights,
    keep_mask,
    make_caption_refiner,
    scaled_sincos_2d,
)

# Latte-1 generates 16-frame clips.
LATTE_FRAMES = 16


# ----------------------------------------------------------------------------------------------- helpers
def temporal_sincos(num_frames: int, dim: int) -> Tensor:
    """(num_frames, dim) table [sin(f w_i), cos(f w_i)] over frame indices f (diffusers'
    `get_1d_sincos_pos_embed_from_grid`, the same formula as one half of the 2-D table)."""
    return sincos_1d(torch.arange(num_frames), dim).float()


# ----------------------------------------------------------------------------------------------- block
class TemporalTextAttention(nn.Module):
    """Ours (off in Latte-1): a narrow cross-attention from a temporal block's tokens to the caption, its output
    projection zero at the start.

    Why: the shapes video model never learned its motion words, and the reason found (docs/dit.md, twenty-second
    session) is the spatial cross-attention it inherits from the image model: 86-91% of its mass sits on [SOT], the
    attention sink, and the direction word gets 0.1%. A softmax passes a token's gradient in proportion to its
    weight, so any loss, the counterfactual-caption contrast included, reaches the direction word through it ~1000x
    weakened. This attention starts fresh (near-uniform weights, each kept token ~1/L) with QK-norm keeping its
    logits bounded, and its queries are the temporal blocks' tokens, which carry their frame's place (the temporal
    table). Width `width` (heads of 16 channels): 0.1 M parameters for the 6 x 128 shapes model, 0.2 MB in fp16.

    Cross-attention is per query, so the B·N sequences of F frames are read as B sequences of N·F tokens against
    each sample's L text tokens: the text is never repeated per patch position."""

    HEAD_DIM = 16

    def __init__(self, hidden_size: int, width: int, norm_eps: float):
        super().__init__()
        if width % self.HEAD_DIM:
            raise ValueError(f"temporal_text_attention width {width} is not a multiple of {self.HEAD_DIM}")
        self.num_heads = width // self.HEAD_DIM
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.q = nn.Linear(hidden_size, width)
        self.kv = nn.Linear(hidden_size, 2 * width)
        self.proj = nn.Linear(width, hidden_size)
        self.qk_norm = QKNorm(self.HEAD_DIM)

    def heads(self, x_MFD: Tensor, text_BLD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, h, N·F, dh) from the x (M, F, D), M = B·N sequences sample-major; k, v (B, h, L, dh) from the text;
        QK-norm applied (also read by dit/grounding.py CrossAttentionMaps to record the attention)."""
        M, F, D = x_MFD.shape
        B, L, _ = text_BLD.shape
        h, dh = self.num_heads, self.HEAD_DIM
        q = self.q(self.norm(x_MFD)).view(B, (M // B) * F, h, dh).transpose(1, 2)
        k, v = self.kv(text_BLD).view(B, L, 2, h, dh).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.qk_norm(q, k)
        return q, k, v

    def forward(self, x_MFD: Tensor, text_BLD: Tensor, text_keep_BL: Tensor | None) -> Tensor:
        """x (M, F, D); text (B, L, D) -> the update (M, F, D)."""
        M, F, _ = x_MFD.shape
        q, k, v = self.heads(x_MFD, text_BLD)
        out = attention(q, k, v, key_padding_mask=text_keep_BL)  # (B, h, N·F, dh)
        return self.proj(out.transpose(1, 2).reshape(M, F, -1))


class LatteTemporalBlock(nn.Module):
    """x + gate * attn(modulate(norm(x))), x + gate * mlp(modulate(norm(x))) over the frames of one patch position.

    PixArt's block without the cross-attention: the six (B', D) modulations are the model's shared 6·D vector plus
    this block's `scale_shift_table` rows (shift, scale, gate for attention, then for the MLP). With `text_width` > 0
    (ours) a `TemporalTextAttention` update comes between the two, where PixArt's block has its cross-attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, norm_eps: float, qk_norm: bool = False,
                 text_width: int = 0):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(BLOCK_MODULATIONS, hidden_size))
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm)
        self.text_attn = TemporalTextAttention(hidden_size, text_width, norm_eps) if text_width else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.mlp = MLP(hidden_size, mlp_ratio)

    def forward(self, x_MFD: Tensor, t6_M6D: Tensor, text_BLD: Tensor | None = None,
                text_keep_BL: Tensor | None = None) -> Tensor:
        """x (M, F, D) with M = B·N sequences of F frames, t6 (M, 6, D); the text (B, L, D) only with text_attn."""
        mods = (self.scale_shift_table[None] + t6_M6D).unbind(1)  # 6 x (M, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        x_MFD = x_MFD + gate_a[:, None] * self.attn(modulate(self.norm1(x_MFD), shift_a, scale_a))
        if self.text_attn is not None:
            x_MFD = x_MFD + self.text_attn(x_MFD, text_BLD, text_keep_BL)
        x_MFD = x_MFD + gate_m[:, None] * self.mlp(modulate(self.norm2(x_MFD), shift_m, scale_m))
        return x_MFD


# ----------------------------------------------------------------------------------------------- model
class LatteDiT(ModelMixin, ConfigMixin):
    """Text-conditional video DiT: forward(sample (B, C, F, H, W), timestep (B,) or scalar,
    encoder_hidden_states (B, L, E), encoder_attention_mask (B, L) True/1 = keep, optional)
    -> (B, C_out, F, H, W), C_out = 2C with learn_sigma (diffusers' output layout).

    F must be `num_frames` (the length of the temporal table) or 1 (an image: no temporal table, as diffusers).
    Padded text tokens are never attended to; a sample whose text is entirely padded gets zero cross-attention.
    interpolation_scale None means PixArt's rule, max(sample_size // 64, 1) (diffusers' Latte always uses it).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["PixArtBlock", "LatteTemporalBlock"]  # the blocks: FSDP's shard groups

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        caption_channels: int = 4096,
        max_text_tokens: int = PIXART_TEXT_TOKENS,
        num_frames: int = LATTE_FRAMES,
        learn_sigma: bool = True,
        norm_eps: float = LAYERNORM_EPS,
        interpolation_scale: float | None = None,
        qk_norm: bool = False,
        caption_refiner_layers: int = 0,
        caption_refiner_mlp_ratio: float = 1.0,
        temporal_text_modulation: bool = False,
        temporal_text_attention: int = 0,
    ):
        super().__init__()
        self.gradient_checkpointing = False  # diffusers' enable_gradient_checkpointing() turns it on
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not a multiple of patch_size {patch_size}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        grid = sample_size // patch_size
        scale = default_interpolation_scale(sample_size) if interpolation_scale is None else interpolation_scale
        # Fixed, so not saved: functions of the config.
        self.register_buffer("pos_embed", scaled_sincos_2d(grid, grid, hidden_size, scale)[None], persistent=False)
        self.register_buffer("temporal_pos_embed", temporal_sincos(num_frames, hidden_size)[None], persistent=False)
        self.time_embed = TimestepEmbedder(hidden_size)  # [cos, sin] features, no frequency shift (as diffusers)
        # adaLN-single: the one map from t to the 6·D block modulation, shared by all spatial and temporal blocks.
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, BLOCK_MODULATIONS * hidden_size))
        self.caption_embed = CaptionProjection(caption_channels, hidden_size)
        self.caption_refiner = make_caption_refiner(self.config)  # PixArt's: see dit/pixart.py CaptionRefiner
        self.spatial_blocks = nn.ModuleList(
            PixArtBlock(hidden_size, num_heads, mlp_ratio, norm_eps, qk_norm) for _ in range(depth)
        )
        self.temporal_blocks = nn.ModuleList(
            LatteTemporalBlock(hidden_size, num_heads, mlp_ratio, norm_eps, qk_norm, temporal_text_attention)
            for _ in range(depth)
        )
        self.final = PixArtFinalLayer(hidden_size, patch_size, self.out_channels)
        # Ours, off in Latte-1 (whose temporal blocks see only t): the caption's mean token, after the refiner, adds
        # to the temporal blocks' modulation. A motion ("moving to the left") is a property of the whole clip that
        # the temporal blocks must realise; in Latte-1 it reaches them only through the spatial cross-attention,
        # and the shapes video model never learned to carry it (bench/t2v_motion_probe.py).
        self.temporal_text = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, BLOCK_MODULATIONS * hidden_size)) \
            if temporal_text_modulation else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_adaln_single_weights(self, tabled_blocks=(*self.spatial_blocks, *self.temporal_blocks),
                                  cross_blocks=self.spatial_blocks)
        if self.temporal_text is not None:  # zero: the text enters the temporal blocks gradually
            nn.init.zeros_(self.temporal_text[1].weight)
            nn.init.zeros_(self.temporal_text[1].bias)
        for block in self.temporal_blocks:
            if block.text_attn is not None:  # zero output: the block starts as it was; the rest trains from there
                nn.init.zeros_(block.text_attn.proj.weight)
                nn.init.zeros_(block.text_attn.proj.bias)

    # The stages of forward, public so that methods can run blocks over their own token sets.
    def embed(self, sample_BCFHW: Tensor) -> Tensor:
        """(B, C, F, H, W) -> (B·F, N, D): every frame patchified alone, with the same 2-D positions."""
        B, C, F, H, W = sample_BCFHW.shape
        frames = sample_BCFHW.transpose(1, 2).reshape(B * F, C, H, W)  # sample-major: row b·F + f
        x = self.patch_embed(frames)  # (B·F, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)  # (B·F, N, D)

    def condition(self, timestep: Tensor | float | int, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """-> t (B, D) for the final layer and the shared block modulation (B, 6, D)."""
        return adaln_single_condition(self, timestep, batch, device)

    def embed_text(self, encoder_hidden_states_BLE: Tensor, text_keep_BL: Tensor | None = None) -> Tensor:
        return embed_caption(self, encoder_hidden_states_BLE, text_keep_BL)  # (B, L, D)

    def temporal_modulation(self, t6_B6D: Tensor, text_BLD: Tensor, text_keep_BL: Tensor | None) -> Tensor:
        """The temporal blocks' shared modulation (B, 6, D): t's, plus the caption's with temporal_text_modulation
        (the mean over the kept tokens of the embedded text; an all-padded caption contributes the bias only)."""
        if self.temporal_text is None:
            return t6_B6D
        if text_keep_BL is None:
            pooled = text_BLD.mean(1)
        else:
            w = text_keep_BL.to(text_BLD.dtype)[..., None]
            pooled = (text_BLD * w).sum(1) / w.sum(1).clamp(min=1)
        return t6_B6D + self.temporal_text(pooled).view_as(t6_B6D)

    @staticmethod
    def to_temporal(x_BF_ND: Tensor, frames: int) -> Tensor:
        """(B·F, N, D) -> (B·N, F, D): one sequence per patch position."""
        BF, N, D = x_BF_ND.shape
        return x_BF_ND.view(BF // frames, frames, N, D).transpose(1, 2).reshape(-1, frames, D)

    @staticmethod
    def to_spatial(x_BN_FD: Tensor, tokens: int) -> Tensor:
        """(B·N, F, D) -> (B·F, N, D): one sequence per frame."""
        BN, F, D = x_BN_FD.shape
        return x_BN_FD.view(BN // tokens, tokens, F, D).transpose(1, 2).reshape(-1, tokens, D)

    def head(self, x_BF_ND: Tensor, t_BD: Tensor, batch: int, height: int, width: int) -> Tensor:
        p, C = self.config.patch_size, self.out_channels
        frames = x_BF_ND.shape[0] // batch
        x = self.final(x_BF_ND, t_BD.repeat_interleave(frames, dim=0))  # (B·F, N, p*p*C)
        x = x.view(batch, frames, height // p, width // p, p, p, C)
        x = x.permute(0, 6, 1, 2, 4, 3, 5)  # (B, C, F, H/p, p, W/p, p)
        return x.reshape(batch, C, frames, height, width)

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        encoder_attention_mask: Tensor | None = None,
    ) -> Tensor:
        cfg = self.config
        if sample.ndim != 5:
            raise ValueError(f"sample must be (batch, channels, frames, height, width), got {tuple(sample.shape)}")
        B, C, F, H, W = sample.shape
        if (H, W) != (cfg.sample_size,) * 2:
            raise ValueError(f"sample is {H}x{W}, this LatteDiT takes {cfg.sample_size}x{cfg.sample_size}")
        if C != cfg.in_channels:
            raise ValueError(f"sample has {C} channels, this LatteDiT takes {cfg.in_channels}")
        if F not in (1, cfg.num_frames):
            raise ValueError(f"sample has {F} frames, this LatteDiT takes num_frames={cfg.num_frames} or 1 (an image)")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != B \
                or encoder_hidden_states.shape[2] != cfg.caption_channels:
            raise ValueError(
                f"encoder_hidden_states must be (batch {B}, tokens, caption_channels {cfg.caption_channels}), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        L = encoder_hidden_states.shape[1]
        if L > cfg.max_text_tokens:
            raise ValueError(f"{L} text tokens, this LatteDiT takes at most max_text_tokens={cfg.max_text_tokens}")
        text_keep_BL = keep_mask(encoder_attention_mask, B, L)
        x = self.embed(sample)  # (B·F, N, D)
        N = x.shape[1]
        t_BD, t6_B6D = self.condition(timestep, B, sample.device)  # computed once, used by every block and the head
        # Each frame of a sample sees that sample's text and modulation; each patch position its modulation.
        text_BLD = self.embed_text(encoder_hidden_states, text_keep_BL)
        text_BF_LD = text_BLD.repeat_interleave(F, dim=0)  # (B·F, L, D)
        keep_BF_L = None if text_keep_BL is None else text_keep_BL.repeat_interleave(F, dim=0)  # (B·F, L)
        t6_spatial = t6_B6D.repeat_interleave(F, dim=0)  # (B·F, 6, D)
        t6_temporal = self.temporal_modulation(t6_B6D, text_BLD, text_keep_BL)
        t6_temporal = t6_temporal.repeat_interleave(N, dim=0)  # (B·N, 6, D)
        for i, (spatial, temporal) in enumerate(zip(self.spatial_blocks, self.temporal_blocks)):
            x = self.run_block(spatial, x, t6_spatial, text_BF_LD, keep_BF_L)
            x = self.to_temporal(x, F)  # (B·N, F, D)
            if i == 0 and F > 1:
                x = x + self.temporal_pos_embed.to(x.dtype)
            x = self.run_block(temporal, x, t6_temporal, text_BLD, text_keep_BL)
            x = self.to_spatial(x, N)  # (B·F, N, D)
        return self.head(x, t_BD, B, H, W)

    def run_block(self, block: nn.Module, *args) -> Tensor:
        """One block; with gradient checkpointing on (and gradients wanted) its activations are recomputed in the
        backward pass instead of kept, trading ~1/3 more compute for memory (diffusers' mechanism)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    # ------------------------------------------------------------------------------------------- saving
    # Set when the model was loaded over an image model (see "saving over an image model" below): save_pretrained
    # then writes over the same one again.
    image_model_folder: Path | None = None

    def save_pretrained(self, save_directory, image_model: str | Path | None = None, **kwargs) -> None:
        """diffusers' save_pretrained; with `image_model` (the transformer folder of the text-to-image model this video
        model started from, or its pipeline folder), or when loaded over one, only the weights that differ from it
        are written, with a reference to it (`save_over_image_model`)."""
        image_model = image_model if image_model is not None else self.image_model_folder
        if image_model is not None:
            return save_over_image_model(self, save_directory, image_model)
        for stale in (OVER_IMAGE_WEIGHTS, IMAGE_MODEL_REFERENCE):  # a full save replaces an earlier delta
            (Path(save_directory) / stale).unlink(missing_ok=True)
        return super().save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "LatteDiT":
        """diffusers' from_pretrained, or, for a folder saved over an image model, `load_over_image_model`."""
        folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        if (folder / IMAGE_MODEL_REFERENCE).is_file():
            return load_over_image_model(cls, folder, kwargs.get("torch_dtype"))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "LatteDiT":
        if name not in LATTE_CONFIGS:
            raise ValueError(f"unknown Latte size {name!r}; valid: {', '.join(LATTE_CONFIGS)}")
        return cls(**{**LATTE_CONFIGS[name], **overrides})


# ----------------------------------------------------------------------------------------------- image init
# The config entries a video model must share with the image model it starts from (all but depth/num_frames).
SHARED_WITH_IMAGE = ("sample_size", "patch_size", "in_channels", "hidden_size", "num_heads", "mlp_ratio",
                     "caption_channels", "max_text_tokens", "learn_sigma", "norm_eps", "interpolation_scale", "qk_norm",
                     "caption_refiner_layers", "caption_refiner_mlp_ratio")


def with_temporal_text_attention(model: LatteDiT, width: int) -> LatteDiT:
    """A copy of a trained LatteDiT whose temporal blocks get a `TemporalTextAttention` of this width (output zero,
    so the copy computes exactly what `model` does until it is trained); a model that has it at this width already
    is returned as it is."""
    have = model.config.get("temporal_text_attention", 0)
    if have == width:
        return model
    if have:
        raise ValueError(f"the model already has temporal text attention of width {have}, not {width}")
    new = type(model)(**{**dict(model.config), "temporal_text_attention": width})
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(".text_attn." not in k for k in missing):
        raise ValueError(f"weights do not fit the model with temporal text attention: missing {missing}, "
                         f"unexpected {unexpected}")
    new.image_model_folder = model.image_model_folder
    p = next(model.parameters())
    return new.to(device=p.device, dtype=p.dtype)


def with_temporal_text_modulation(model: LatteDiT) -> LatteDiT:
    """A copy of a trained LatteDiT with the caption's modulation of the temporal blocks added (zero, so the copy
    computes exactly what `model` does until it is trained); a model that has it already is returned as it is."""
    if model.config.temporal_text_modulation:
        return model
    new = type(model)(**{**dict(model.config), "temporal_text_modulation": True})
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("temporal_text.") for k in missing):
        raise ValueError(f"weights do not fit the model with temporal text modulation: missing {missing}, "
                         f"unexpected {unexpected}")
    new.image_model_folder = model.image_model_folder
    p = next(model.parameters())
    return new.to(device=p.device, dtype=p.dtype)


@torch.no_grad()
def init_from_image_model(video: LatteDiT, image: nn.Module) -> LatteDiT:
    """Start a video model from a trained text-to-image PixArt model, as Latte does (its best variant initialises
    from PixArt-α): the patch embedding, timestep and caption embedders, adaLN-single map, final layer and spatial
    block i are the image model's (block i), and every temporal block's output projections (attention `proj`, MLP
    `fc2`) are zeroed, so each temporal block starts as the identity: a one-frame video is then exactly the image
    model's output, and a clip starts as the image model per frame plus the temporal position table. Training
    then only has to learn motion, not what the objects look like. Returns `video`, changed in place."""
    vc, ic = video.config, image.config
    if vc.depth != ic.depth:
        raise ValueError(f"the video model has {vc.depth} spatial blocks, the image model {ic.depth}: they must match")
    differ = {k: (vc.get(k), ic.get(k)) for k in SHARED_WITH_IMAGE if vc.get(k) != ic.get(k)}
    if differ:
        raise ValueError(f"video and image model configs differ in {differ} (video, image)")
    src = image.state_dict()
    dst = {k.replace("blocks.", "spatial_blocks.", 1) if k.startswith("blocks.") else k: v for k, v in src.items()}
    missing, unexpected = video.load_state_dict(dst, strict=False)
    if unexpected or any(not k.startswith("temporal_blocks.") for k in missing):
        raise ValueError(f"image weights do not fit the video model: missing {missing}, unexpected {unexpected}")
    for block in video.temporal_blocks:
        for linear in (block.attn.proj, block.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()
    return video


# ----------------------------------------------------------------------------------------------- saving over an image model
# A video model started from an image model and trained in part (the temporal blocks, say, and the spatial blocks'
# cross-attention) keeps most of the image model's weights bit for bit. Saved over that image model, its folder
# holds only the tensors that differ plus a reference to the image model's folder: AnimateDiff ships its motion
# modules apart from the image UNet for the same reason. The shipped shapes-t2v is saved so over shapes-t2i
# (both fp16), which keeps it under the per-model size budget. Nothing here is diffusers' (it has no such format).
OVER_IMAGE_WEIGHTS = "weights_over_image_model.safetensors"
IMAGE_MODEL_REFERENCE = "image_model.json"


def _image_transformer_folder(image_model: str | Path) -> Path:
    """A text-to-image pipeline folder or its transformer folder -> the transformer folder (absolute)."""
    folder = Path(image_model).resolve()
    index = folder / "model_index.json"
    if index.is_file():
        folder = (folder / json.loads(index.read_text()).get("component_folders", {}).get("transformer",
                                                                                           "transformer")).resolve()
    if not (folder / "config.json").is_file():
        raise ValueError(f"image model {image_model}: no transformer config.json in {folder}")
    return folder


def _fingerprint(state: dict[str, Tensor], keys) -> str:
    """sha256 over the named tensors' names, dtypes, shapes and bytes: which image weights a saved delta relies on."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(keys):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _image_state_for(video: LatteDiT, image_folder: Path) -> dict[str, Tensor]:
    """The image model's weights under the video model's names (block i -> spatial_blocks.i), after checking that
    the two configs agree in everything the spatial half shares."""
    from .pixart import PixArtDiT

    image = PixArtDiT.from_pretrained(image_folder)  # in its stored dtype: compared and combined bit for bit
    vc, ic = video.config, image.config
    differ = {k: (vc.get(k), ic.get(k)) for k in (*SHARED_WITH_IMAGE, "depth") if vc.get(k) != ic.get(k)}
    if differ:
        raise ValueError(f"the video model and the image model at {image_folder} differ in {differ} (video, image)")
    return {k.replace("blocks.", "spatial_blocks.", 1) if k.startswith("blocks.") else k: v
            for k, v in image.state_dict().items()}


@torch.no_grad()
def save_over_image_model(video: LatteDiT, folder: str | Path, image_model: str | Path) -> None:
    """Write config.json, the tensors of `video` that are not equal (in `video`'s dtype) to the image model's and
    image_model.json, the image transformer folder's path relative to `folder`."""
    from safetensors.torch import save_file

    folder, image_folder = Path(folder), _image_transformer_folder(image_model)
    image_state = _image_state_for(video, image_folder)
    own = {k: v.detach().cpu() for k, v in video.state_dict().items()}  # the image weights load on the CPU
    delta = {k: v.contiguous() for k, v in own.items()
             if k not in image_state or image_state[k].shape != v.shape or not torch.equal(image_state[k].to(v.dtype), v)}
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("diffusion_pytorch_model*.safetensors"):  # a delta replaces an earlier full save
        stale.unlink()
    video.save_config(folder)
    save_file(delta, folder / OVER_IMAGE_WEIGHTS, metadata={"format": "pt"})
    borrowed = [k for k in own if k not in delta]
    reference = {"image_model": Path(os.path.relpath(image_folder, folder.resolve())).as_posix(),
                 "tensors_here": len(delta), "tensors_from_image_model": len(borrowed),
                 "image_weights_sha256": _fingerprint(image_state, borrowed)}
    (folder / IMAGE_MODEL_REFERENCE).write_text(json.dumps(reference, indent=2) + "\n")
    video.image_model_folder = image_folder


def load_over_image_model(cls: type[LatteDiT], folder: Path, torch_dtype: torch.dtype | None = None) -> LatteDiT:
    """The inverse of `save_over_image_model`: the image model's weights, overlaid with the folder's own; every
    tensor of the video model must come from exactly one of them, with the right shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    reference = json.loads((folder / IMAGE_MODEL_REFERENCE).read_text())
    image_folder = (folder / reference["image_model"]).resolve()
    if not image_folder.is_dir():
        raise ValueError(f"{folder} is saved over the image model at {image_folder}, which is not there")
    video = cls.from_config(cls.load_config(folder))
    try:
        own = load_file(folder / OVER_IMAGE_WEIGHTS)
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{folder / OVER_IMAGE_WEIGHTS}: not a readable safetensors file ({exc})") from exc
    expected = video.state_dict()
    unexpected = sorted(set(own) - set(expected))
    if unexpected:
        raise ValueError(f"{folder / OVER_IMAGE_WEIGHTS} holds tensors this LatteDiT does not have: {unexpected[:5]}")
    image_state = _image_state_for(video, image_folder)
    borrowed = [k for k in expected if k not in own and k in image_state]
    if reference.get("image_weights_sha256") != _fingerprint(image_state, borrowed):
        raise ValueError(f"{folder} was saved over the image model at {image_folder}, whose weights have changed since "
                         "(a retrained image model needs the video model saved in full, or over it again)")
    state = {k: v for k, v in image_state.items() if k in expected} | own
    missing = sorted(set(expected) - set(state))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or wrong:
        raise ValueError(f"{folder} over {image_folder}: missing {missing[:5]}, wrong shapes {wrong[:5]}")
    video.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    video.image_model_folder = image_folder
    return (video.to(torch_dtype) if torch_dtype is not None else video).eval()


# ----------------------------------------------------------------------------------------------- sizes
# Latte-1 (text to video, 512 px): SD VAE latents 64x64x4 per frame, 16 frames, T5-XXL text (4096 wide, 120 tokens).
LATTE_512_VIDEO = dict(
    sample_size=64, in_channels=4, caption_channels=4096, max_text_tokens=PIXART_TEXT_TOKENS, num_frames=LATTE_FRAMES
)
# The shapes world: 16x16x4 latents from its VAE, its 96-wide CLIP text encoder with 32-token prompts, 8 frames.
SHAPES_TEXT_VIDEO = dict(sample_size=16, in_channels=4, caption_channels=96, max_text_tokens=32, num_frames=8)

LATTE_CONFIGS: dict[str, dict] = {
    # depth = (spatial, temporal) pairs, diffusers' num_layers: Latte-1 has 28 + 28 blocks, 16 heads x 72.
    "Latte-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2, **LATTE_512_VIDEO),
    # T/1: the first shapes-t2v (1.57 M parameters, 3.15 MB in fp16; patch 1: see DiT-T/1)
    "Latte-T/1": dict(depth=3, hidden_size=128, num_heads=4, patch_size=1, **SHAPES_TEXT_VIDEO),
    # T6/1: six pairs, the depth of PixArt-T/1 (shapes-t2i), so that it can start from it (init_from_image_model):
    # the shipped shapes-t2v, saved over shapes-t2i
    "Latte-T6/1": dict(depth=6, hidden_size=128, num_heads=4, patch_size=1, **SHAPES_TEXT_VIDEO),
    "Latte-T/2": dict(depth=3, hidden_size=128, num_heads=4, patch_size=2, **SHAPES_TEXT_VIDEO),
}
