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

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from .dit import (
    BLOCK_MODULATIONS,
    LAYERNORM_EPS,
    MLP,
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
    init_adaln_single_weights,
    keep_mask,
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
class LatteTemporalBlock(nn.Module):
    """x + gate * attn(modulate(norm(x))), x + gate * mlp(modulate(norm(x))) over the frames of one patch position.

    PixArt's block without the cross-attention: the six (B', D) modulations are the model's shared 6·D vector plus
    this block's `scale_shift_table` rows (shift, scale, gate for attention, then for the MLP)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, norm_eps: float, qk_norm: bool = False):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(BLOCK_MODULATIONS, hidden_size))
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.mlp = MLP(hidden_size, mlp_ratio)

    def forward(self, x_MFD: Tensor, t6_M6D: Tensor) -> Tensor:
        """x (M, F, D) with M = B·N sequences of F frames, t6 (M, 6, D)."""
        mods = (self.scale_shift_table[None] + t6_M6D).unbind(1)  # 6 x (M, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        x_MFD = x_MFD + gate_a[:, None] * self.attn(modulate(self.norm1(x_MFD), shift_a, scale_a))
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
        self.spatial_blocks = nn.ModuleList(
            PixArtBlock(hidden_size, num_heads, mlp_ratio, norm_eps, qk_norm) for _ in range(depth)
        )
        self.temporal_blocks = nn.ModuleList(
            LatteTemporalBlock(hidden_size, num_heads, mlp_ratio, norm_eps, qk_norm) for _ in range(depth)
        )
        self.final = PixArtFinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_adaln_single_weights(self, tabled_blocks=(*self.spatial_blocks, *self.temporal_blocks),
                                  cross_blocks=self.spatial_blocks)

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

    def embed_text(self, encoder_hidden_states_BLE: Tensor) -> Tensor:
        return self.caption_embed(encoder_hidden_states_BLE)  # (B, L, D)

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
        text_BF_LD = self.embed_text(encoder_hidden_states).repeat_interleave(F, dim=0)  # (B·F, L, D)
        keep_BF_L = None if text_keep_BL is None else text_keep_BL.repeat_interleave(F, dim=0)  # (B·F, L)
        t6_spatial = t6_B6D.repeat_interleave(F, dim=0)  # (B·F, 6, D)
        t6_temporal = t6_B6D.repeat_interleave(N, dim=0)  # (B·N, 6, D)
        for i, (spatial, temporal) in enumerate(zip(self.spatial_blocks, self.temporal_blocks)):
            x = self.run_block(spatial, x, t6_spatial, text_BF_LD, keep_BF_L)
            x = self.to_temporal(x, F)  # (B·N, F, D)
            if i == 0 and F > 1:
                x = x + self.temporal_pos_embed.to(x.dtype)
            x = self.run_block(temporal, x, t6_temporal)
            x = self.to_spatial(x, N)  # (B·F, N, D)
        return self.head(x, t_BD, B, H, W)

    def run_block(self, block: nn.Module, *args) -> Tensor:
        """One block; with gradient checkpointing on (and gradients wanted) its activations are recomputed in the
        backward pass instead of kept, trading ~1/3 more compute for memory (diffusers' mechanism)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "LatteDiT":
        if name not in LATTE_CONFIGS:
            raise ValueError(f"unknown Latte size {name!r}; valid: {', '.join(LATTE_CONFIGS)}")
        return cls(**{**LATTE_CONFIGS[name], **overrides})


# ----------------------------------------------------------------------------------------------- image init
# The config entries a video model must share with the image model it starts from (all but depth/num_frames).
SHARED_WITH_IMAGE = ("sample_size", "patch_size", "in_channels", "hidden_size", "num_heads", "mlp_ratio",
                     "caption_channels", "max_text_tokens", "learn_sigma", "norm_eps", "interpolation_scale", "qk_norm")


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
    # T/1 is the shipped shapes-t2v: 1.57 M parameters, 3.15 MB in fp16 (patch 1: see DiT-T/1)
    "Latte-T/1": dict(depth=3, hidden_size=128, num_heads=4, patch_size=1, **SHAPES_TEXT_VIDEO),
    # T6/1: six pairs, the depth of PixArt-T/1 (shapes-t2i), so that it can start from it (init_from_image_model)
    "Latte-T6/1": dict(depth=6, hidden_size=128, num_heads=4, patch_size=1, **SHAPES_TEXT_VIDEO),
    "Latte-T/2": dict(depth=3, hidden_size=128, num_heads=4, patch_size=2, **SHAPES_TEXT_VIDEO),
}
