"""Text-conditional DiT in the PixArt-α style (Chen et al., "PixArt-α: Fast Training of Diffusion Transformer for
Photorealistic Text-to-Image Synthesis", 2023).

Reads top to bottom: helpers (the scaled sin-cos table), embedders (caption projection), the block (adaLN-single,
self-attention, cross-attention to the text, MLP), the final layer, the model, and the named sizes. Patch
embedding, timestep embedder, self-attention, MLP and `modulate` are the class-conditional DiT's (`dit/dit.py`);
what differs from DiT:

- adaLN-single: ONE timestep MLP gives t (B, D), and ONE linear turns SiLU(t) into the 6·D block modulation,
  computed once per forward; each block only adds its learned `scale_shift_table` (6, D) to it. The final layer
  adds its own table (2, D) to t itself (not to the 6·D vector, and without SiLU).
- a cross-attention to the projected text tokens after the self-attention, with no norm, modulation or gate;
- positions are the 2-D sin-cos table at positions / interpolation_scale (PixArt's base-size scaling; diffusers'
  `PatchEmbed` with base_size = the grid, so it is the DiT table for interpolation_scale 1).

Checkpoints of diffusers' `PixArtTransformer2DModel` are adapted by `dit/loaders.py` `pixart_from_diffusers`.

Shapes: B batch, C latent channels, H/W latent height/width, p patch size, N = (H/p)(W/p) tokens, L text tokens,
E text encoder width (caption_channels), D hidden size, h heads, Dh = D / h head size.

Seams, as in DiT: `block.attn`, `block.cross_attn` and `block.mlp` are separate named submodules taking and
returning (B, N, D) (cross_attn also takes the text (B, L, D) and its keep mask (B, L)); every linear is a plain
`nn.Linear`; `forward` is `embed` -> `condition` / `embed_text` -> blocks -> `head`, all public.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from attention import attention

from .dit import (
    BLOCK_MODULATIONS,
    EMBED_INIT_STD,
    FINAL_MODULATIONS,
    LAYERNORM_EPS,
    MLP,
    QKNorm,
    SelfAttention,
    TimestepEmbedder,
    modulate,
    no_qk_norm,
    sincos_1d,
)

# PixArt derives the position scale from the latent size: 1 up to 64x64 latents (512 px), 2 at 128x128 (1024 px).
POSITION_SCALE_BASE = 64
# The text length PixArt-α was trained with (T5 tokens per prompt).
PIXART_TEXT_TOKENS = 120


# ----------------------------------------------------------------------------------------------- helpers
def default_interpolation_scale(sample_size: int) -> float:
    """PixArt's (and diffusers') rule when the config leaves interpolation_scale unset."""
    return float(max(sample_size // POSITION_SCALE_BASE, 1))


def scaled_sincos_2d(grid_h: int, grid_w: int, dim: int, interpolation_scale: float) -> Tensor:
    """(grid_h * grid_w, dim) sin-cos table at positions / interpolation_scale, row-major tokens, first half of
    each row the column, second half the row (the order of `dit.dit.sincos_2d`, which this equals at scale 1)."""
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w) / interpolation_scale  # (N,)
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h) / interpolation_scale  # (N,)
    return torch.cat([sincos_1d(cols, dim // 2), sincos_1d(rows, dim // 2)], dim=1).float()


def keep_mask(encoder_attention_mask: Tensor | None, batch: int, text_tokens: int) -> Tensor | None:
    """(B, L) mask, bool or 0/1 numbers (tokenizers give int64), -> (B, L) bool, True = keep."""
    if encoder_attention_mask is None:
        return None
    if encoder_attention_mask.shape != (batch, text_tokens):
        raise ValueError(
            f"encoder_attention_mask must be (batch, text tokens) = {(batch, text_tokens)} with True/1 = keep, "
            f"got {tuple(encoder_attention_mask.shape)} (additive bias masks are not accepted)"
        )
    if encoder_attention_mask.dtype == torch.bool:
        return encoder_attention_mask
    if not ((encoder_attention_mask == 0) | (encoder_attention_mask == 1)).all():
        raise ValueError("encoder_attention_mask holds values other than 0 and 1; pass a bool or 0/1 keep mask")
    return encoder_attention_mask != 0


# ----------------------------------------------------------------------------------------------- embedders
class CaptionProjection(nn.Module):
    """Text encoder states (B, L, E) -> Linear, GELU(tanh), Linear -> (B, L, D)."""

    def __init__(self, caption_channels: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(caption_channels, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, text_BLE: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(text_BLE), approximate="tanh"))


class CaptionRefiner(nn.Module):
    """Bidirectional pre-norm transformer layers over the projected caption tokens (padded tokens masked), each
    ending in a zero-initialised output projection, so a refiner added to a trained model starts as the identity.

    Why: the shapes CLIP text tower is causal, as CLIP's is, so a token's features only know the words before it.
    In "a red circle on the left and a blue square on the right", "red" and "circle" cannot say where the circle
    is, and the words that can ("left", "right") also carry everything said before them. A cross-attention query
    at the image's left must then untangle which attributes belong there: two-object captions leak attributes and
    misplace objects. PixArt reads T5, whose encoder is bidirectional; Lumina-Image 2.0 adds the same kind of
    "context refiner" blocks in front of its diffusion transformer. Off (0 layers) in every real checkpoint's
    config; `with_caption_refiner` adds one to a trained model."""

    def __init__(self, hidden_size: int, num_heads: int, layers: int, mlp_ratio: float, norm_eps: float,
                 qk_norm: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(CaptionRefinerLayer(hidden_size, num_heads, mlp_ratio, norm_eps, qk_norm)
                                    for _ in range(layers))

    def forward(self, text_BLD: Tensor, text_keep_BL: Tensor | None) -> Tensor:
        for layer in self.layers:
            text_BLD = layer(text_BLD, text_keep_BL)
        return text_BLD

    @torch.no_grad()
    def zero_outputs(self) -> None:
        for layer in self.layers:
            for linear in (layer.attn.proj, layer.mlp.fc2):
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)


class CaptionRefinerLayer(nn.Module):
    """text + attn(norm(text)) over all kept tokens, then text + mlp(norm(text)); no timestep modulation (the text
    is refined once per forward, whatever the noise level)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, norm_eps: float, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.mlp = MLP(hidden_size, mlp_ratio)

    def forward(self, text_BLD: Tensor, text_keep_BL: Tensor | None) -> Tensor:
        text_BLD = text_BLD + self.attn(self.norm1(text_BLD), key_padding_mask=text_keep_BL)
        return text_BLD + self.mlp(self.norm2(text_BLD))


# ----------------------------------------------------------------------------------------------- block
class CrossAttention(nn.Module):
    """Image tokens (queries) attend to text tokens; k/v fused in one projection (rows: k of all heads, then v)."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.qk_norm = QKNorm(hidden_size // num_heads) if qk_norm else no_qk_norm

    def heads(self, x_BND: Tensor, text_BLD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, h, N, Dh) from the image tokens, k, v (B, h, L, Dh) from the text, QK-norm applied: what the
        attention reads (also read by dit/grounding.py to record the attention maps)."""
        B, N, D = x_BND.shape
        L, h = text_BLD.shape[1], self.num_heads
        q = self.q(x_BND).view(B, N, h, D // h).transpose(1, 2)
        k, v = self.kv(text_BLD).view(B, L, 2, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.qk_norm(q, k)
        return q, k, v

    def forward(self, x_BND: Tensor, text_BLD: Tensor, text_keep_BL: Tensor | None = None) -> Tensor:
        B, N, D = x_BND.shape
        q, k, v = self.heads(x_BND, text_BLD)
        out = attention(q, k, v, key_padding_mask=text_keep_BL)  # (B, h, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class PixArtBlock(nn.Module):
    """x + gate * attn(modulate(norm(x))), x + cross_attn(x, text), x + gate * mlp(modulate(norm(x))).

    The six (B, D) modulations are the model's shared 6·D vector plus this block's `scale_shift_table` rows, in the
    order shift, scale, gate for attention, then for the MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, norm_eps: float, qk_norm: bool = False):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(BLOCK_MODULATIONS, hidden_size))
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.mlp = MLP(hidden_size, mlp_ratio)

    def forward(self, x_BND: Tensor, t6_B6D: Tensor, text_BLD: Tensor, text_keep_BL: Tensor | None) -> Tensor:
        mods = (self.scale_shift_table[None] + t6_B6D).unbind(1)  # 6 x (B, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        x_BND = x_BND + gate_a[:, None] * self.attn(modulate(self.norm1(x_BND), shift_a, scale_a))
        x_BND = x_BND + self.cross_attn(x_BND, text_BLD, text_keep_BL)
        x_BND = x_BND + gate_m[:, None] * self.mlp(modulate(self.norm2(x_BND), shift_m, scale_m))
        return x_BND


class PixArtFinalLayer(nn.Module):
    """(shift, scale) = scale_shift_table + t, then norm, modulate, and a linear map to p*p*C_out per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(FINAL_MODULATIONS, hidden_size))
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYERNORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x_BND: Tensor, t_BD: Tensor) -> Tensor:
        shift, scale = (self.scale_shift_table[None] + t_BD[:, None]).unbind(1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x_BND), shift, scale))  # (B, N, p*p*C_out)


# ----------------------------------------------------------------------------------------------- model
class PixArtDiT(ModelMixin, ConfigMixin):
    """Text-conditional DiT: forward(sample (B, C, H, W), timestep (B,) or scalar, encoder_hidden_states (B, L, E),
    encoder_attention_mask (B, L) True/1 = keep, optional) -> (B, C_out, H, W), C_out = 2C with learn_sigma.

    Padded text tokens are never attended to; a sample whose text is entirely padded gets zero cross-attention
    (diffusers' additive -10000 bias would instead average over all its padded tokens).
    interpolation_scale None means PixArt's rule, max(sample_size // 64, 1).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["PixArtBlock"]  # the blocks: FSDP's shard groups

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
        learn_sigma: bool = True,
        norm_eps: float = LAYERNORM_EPS,
        interpolation_scale: float | None = None,
        qk_norm: bool = False,
        caption_refiner_layers: int = 0,
        caption_refiner_mlp_ratio: float = 1.0,
    ):
        super().__init__()
        self.gradient_checkpointing = False  # diffusers' enable_gradient_checkpointing() turns it on
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not a multiple of patch_size {patch_size}")
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        grid = sample_size // patch_size
        scale = default_interpolation_scale(sample_size) if interpolation_scale is None else interpolation_scale
        # Fixed, so not saved: it is a function of the config.
        self.register_buffer("pos_embed", scaled_sincos_2d(grid, grid, hidden_size, scale)[None], persistent=False)
        self.time_embed = TimestepEmbedder(hidden_size)  # [cos, sin] features, no frequency shift (as diffusers)
        # adaLN-single: the one map from t to the 6·D block modulation, shared by all blocks.
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, BLOCK_MODULATIONS * hidden_size))
        self.caption_embed = CaptionProjection(caption_channels, hidden_size)
        self.caption_refiner = make_caption_refiner(self.config)
        self.blocks = nn.ModuleList(PixArtBlock(hidden_size, num_heads, mlp_ratio, norm_eps, qk_norm)
                                    for _ in range(depth))
        self.final = PixArtFinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_adaln_single_weights(self, tabled_blocks=self.blocks, cross_blocks=self.blocks)

    # The stages of forward, public so that methods can run blocks over their own token sets.
    def embed(self, sample_BCHW: Tensor) -> Tensor:
        x = self.patch_embed(sample_BCHW)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)  # (B, N, D)

    def condition(self, timestep: Tensor | float | int, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """-> t (B, D) for the final layer and the shared block modulation (B, 6, D)."""
        return adaln_single_condition(self, timestep, batch, device)

    def embed_text(self, encoder_hidden_states_BLE: Tensor, text_keep_BL: Tensor | None = None) -> Tensor:
        return embed_caption(self, encoder_hidden_states_BLE, text_keep_BL)  # (B, L, D)

    def head(self, x_BND: Tensor, t_BD: Tensor, height: int, width: int) -> Tensor:
        p, C = self.config.patch_size, self.out_channels
        x = self.final(x_BND, t_BD)  # (B, N, p*p*C)
        B = x.shape[0]
        x = x.view(B, height // p, width // p, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, H/p, p, W/p, p)
        return x.reshape(B, C, height, width)

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        encoder_attention_mask: Tensor | None = None,
    ) -> Tensor:
        B, C, H, W = sample.shape
        cfg = self.config
        if (H, W) != (cfg.sample_size,) * 2:
            raise ValueError(f"sample is {H}x{W}, this PixArtDiT takes {cfg.sample_size}x{cfg.sample_size}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != B \
                or encoder_hidden_states.shape[2] != cfg.caption_channels:
            raise ValueError(
                f"encoder_hidden_states must be (batch {B}, tokens, caption_channels {cfg.caption_channels}), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        L = encoder_hidden_states.shape[1]
        if L > cfg.max_text_tokens:
            raise ValueError(f"{L} text tokens, this PixArtDiT takes at most max_text_tokens={cfg.max_text_tokens}")
        text_keep_BL = keep_mask(encoder_attention_mask, B, L)
        x = self.embed(sample)
        t_BD, t6_B6D = self.condition(timestep, B, sample.device)  # computed once, used by every block and the head
        text_BLD = self.embed_text(encoder_hidden_states, text_keep_BL)
        for block in self.blocks:
            x = self.run_block(block, x, t6_B6D, text_BLD, text_keep_BL)
        return self.head(x, t_BD, H, W)

    def run_block(self, block: nn.Module, *args) -> Tensor:
        """One block; with gradient checkpointing on (and gradients wanted) its activations are recomputed in the
        backward pass instead of kept, trading ~1/3 more compute for memory (diffusers' mechanism)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "PixArtDiT":
        if name not in PIXART_CONFIGS:
            raise ValueError(f"unknown PixArt size {name!r}; valid: {', '.join(PIXART_CONFIGS)}")
        return cls(**{**PIXART_CONFIGS[name], **overrides})


# ----------------------------------------------------------------------------------------------- sizes
# PixArt-α 512 px: SD VAE latents 64x64x4, T5-XXL text (width 4096, 120 tokens).
PIXART_512_LATENT = dict(sample_size=64, in_channels=4, caption_channels=4096, max_text_tokens=PIXART_TEXT_TOKENS)
# The shapes world: 16x16x4 latents from its VAE; its CLIP text encoder is 96 wide with 32-token prompts
# (shapes/clip.py text_width, context_length).
SHAPES_TEXT_LATENT = dict(sample_size=16, in_channels=4, caption_channels=96, max_text_tokens=32)

PIXART_CONFIGS: dict[str, dict] = {
    "PixArt-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2, **PIXART_512_LATENT),
    # T/1 is the shipped shapes-t2i: 1.77 M parameters, 3.54 MB in fp16 (patch 1: see DiT-T/1)
    "PixArt-T/1": dict(depth=6, hidden_size=128, num_heads=4, patch_size=1, **SHAPES_TEXT_LATENT),
    "PixArt-T/2": dict(depth=6, hidden_size=128, num_heads=4, patch_size=2, **SHAPES_TEXT_LATENT),
}


# ------------------------------------------------------------------------------------------ text path
# Shared by PixArtDiT and LatteDiT: the caption projection, then the optional refiner.
def make_caption_refiner(config) -> CaptionRefiner | None:
    if config.caption_refiner_layers < 0:
        raise ValueError(f"caption_refiner_layers must be >= 0, got {config.caption_refiner_layers}")
    if config.caption_refiner_layers == 0:
        return None
    return CaptionRefiner(config.hidden_size, config.num_heads, config.caption_refiner_layers,
                          config.caption_refiner_mlp_ratio, config.norm_eps, config.qk_norm)


def embed_caption(model: nn.Module, text_BLE: Tensor, text_keep_BL: Tensor | None) -> Tensor:
    text_BLD = model.caption_embed(text_BLE)
    if model.caption_refiner is not None:
        text_BLD = model.caption_refiner(text_BLD, text_keep_BL)
    return text_BLD


@torch.no_grad()
def with_caption_refiner(model: nn.Module, layers: int, mlp_ratio: float = 1.0) -> nn.Module:
    """A copy of a trained PixArtDiT / LatteDiT with a caption refiner of `layers` layers added in front of its
    blocks. The refiner's output projections are zero, so the copy computes exactly what `model` does until it is
    trained. A model that already has a refiner is returned unchanged if it matches, refused otherwise."""
    cfg = model.config
    if cfg.caption_refiner_layers:
        if (cfg.caption_refiner_layers, cfg.caption_refiner_mlp_ratio) != (layers, mlp_ratio):
            raise ValueError(f"the model already has a caption refiner ({cfg.caption_refiner_layers} layers, mlp ratio "
                             f"{cfg.caption_refiner_mlp_ratio}); asked for {layers} layers, mlp ratio {mlp_ratio}")
        return model
    new = type(model)(**{**dict(cfg), "caption_refiner_layers": layers, "caption_refiner_mlp_ratio": mlp_ratio})
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("caption_refiner.") for k in missing):
        raise ValueError(f"weights do not fit the model with a refiner: missing {missing}, unexpected {unexpected}")
    new.caption_refiner.zero_outputs()
    p = next(model.parameters())
    return new.to(device=p.device, dtype=p.dtype)


# ------------------------------------------------------------------------------------------ adaLN-single
# Shared by every adaLN-single model (PixArtDiT, LatteDiT): they own `time_embed`, `time_modulation`,
# `patch_embed`, `caption_embed`, `final`, and blocks with a `scale_shift_table`.
def adaln_single_condition(model: nn.Module, timestep, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """-> t (B, D) for the final layer and the block modulation (B, 6, D), computed once per forward."""
    t = torch.as_tensor(timestep, device=device)
    t_B = t.expand(batch) if t.ndim == 0 else t
    if t_B.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or (batch,) = ({batch},), got {tuple(t_B.shape)}")
    t_BD = model.time_embed(t_B)
    return t_BD, model.time_modulation(t_BD).view(batch, BLOCK_MODULATIONS, -1)


def init_adaln_single_weights(model: nn.Module, tabled_blocks, cross_blocks) -> None:
    """PixArt's initialisation, in one place for every adaLN-single model."""
    D = model.config.hidden_size
    # Linears: xavier-uniform weights, zero biases (timm ViT default PixArt follows).
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    # The patch conv is a linear map of each flattened patch, so it is initialised like one.
    nn.init.xavier_uniform_(model.patch_embed.weight.view(model.patch_embed.weight.shape[0], -1))
    nn.init.zeros_(model.patch_embed.bias)
    # Timestep MLP, adaLN-single linear and caption projection: small normals, as PixArt.
    for layer in (model.time_embed.mlp[0], model.time_embed.mlp[2], model.time_modulation[1],
                  model.caption_embed.fc1, model.caption_embed.fc2):
        nn.init.normal_(layer.weight, std=EMBED_INIT_STD)
    # Per-block and final tables: unit-variance rows / sqrt(D), PixArt's init, so blocks differ from the start.
    for block in tabled_blocks:
        nn.init.normal_(block.scale_shift_table, std=D**-0.5)
    for block in cross_blocks:
        # Zero cross-attention output: the text enters gradually, as in PixArt.
        nn.init.zeros_(block.cross_attn.proj.weight)
        nn.init.zeros_(block.cross_attn.proj.bias)
    nn.init.normal_(model.final.scale_shift_table, std=D**-0.5)
    if getattr(model, "caption_refiner", None) is not None:
        model.caption_refiner.zero_outputs()
    # Zero output linear: the untrained model predicts exactly zero.
    nn.init.zeros_(model.final.linear.weight)
    nn.init.zeros_(model.final.linear.bias)
