"""Class-conditional DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023).

Reads top to bottom: helpers (sin-cos tables, modulate), embedders (patches, timesteps, labels), the block with
adaLN-Zero, the final layer, the model, and the named sizes. It computes what facebookresearch/DiT `models.py`
computes; checkpoints of that repository and of diffusers' `DiTTransformer2DModel` are adapted by `dit/loaders.py`.

Shapes: B batch, C latent channels, H/W latent height/width, p patch size, N = (H/p)(W/p) tokens,
D hidden size, h heads, Dh = D / h head size.

Seams for the methods that change one piece (DyDiT, TREAD, TerDiT):
- `block.attn` and `block.mlp` are separate named submodules taking and returning (B, N, D), so a method
  replaces them (a width-routed MLP, ternary linears) with `block.mlp = ...`;
- every linear layer is a plain `nn.Linear` (a quantizer swaps them by name);
- `DiT.forward` is `embed` -> `blocks` (each `block(x, c)`) -> `head`, and `embed`, `condition`, `head` are
  public, so a method that routes tokens around a span of blocks calls them itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from attention import attention

from .epilogue import can_fuse, linear_gelu_tanh

# Width of the sinusoidal timestep features fed to the timestep MLP (official DiT: frequency_embedding_size).
TIMESTEP_FREQ_DIM = 256
# Longest period of the sinusoidal tables, for timesteps and for 2-D positions alike.
MAX_PERIOD = 10_000
# LayerNorm epsilon of the official DiT (every norm in it is affine-free with this eps).
LAYERNORM_EPS = 1e-6
# Std of the normal init of the label table and the timestep MLP (official DiT).
EMBED_INIT_STD = 0.02
# Number of modulation vectors per block: shift, scale, gate for attention, then for the MLP.
BLOCK_MODULATIONS = 6
# ... and for the final layer: shift, scale.
FINAL_MODULATIONS = 2


# ----------------------------------------------------------------------------------------------- helpers
def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """(n,) positions -> (n, dim) table [sin(pos * w_i), cos(pos * w_i)], w_i = MAX_PERIOD^(-i / (dim/2))."""
    half = dim // 2
    omega = 1.0 / MAX_PERIOD ** (torch.arange(half, dtype=torch.float64) / half)
    angles = positions.to(torch.float64)[:, None] * omega[None]  # (n, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> Tensor:
    """(grid_h * grid_w, dim) fixed position table, tokens in row-major order.

    The first half of each row encodes the token's column, the second half its row: the official DiT builds the
    grid with np.meshgrid(w, h) and names the halves the other way round, so this is the order its weights
    were trained with.
    """
    rows = torch.arange(grid_h).repeat_interleave(grid_w)  # (N,)
    cols = torch.arange(grid_w).repeat(grid_h)  # (N,)
    return torch.cat([sincos_1d(cols, dim // 2), sincos_1d(rows, dim // 2)], dim=1).float()


def timestep_features(t: Tensor, dim: int = TIMESTEP_FREQ_DIM, freq_shift: int = 0) -> Tensor:
    """(B,) timesteps, possibly fractional -> (B, dim) [cos(t f_i), sin(t f_i)],
    f_i = MAX_PERIOD^(-i / (dim/2 - freq_shift)).

    freq_shift = 0 is the official DiT; diffusers' DiT port uses 1 (its `Timesteps(downscale_freq_shift=1)`),
    which the diffusers loader sets so that a converted model computes what diffusers computes.
    """
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(MAX_PERIOD) * i / (half - freq_shift))
    angles = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def modulate(x_BND: Tensor, shift_BD: Tensor, scale_BD: Tensor) -> Tensor:
    return x_BND * (1 + scale_BD[:, None]) + shift_BD[:, None]


# ----------------------------------------------------------------------------------------------- embedders
class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features -> Linear, SiLU, Linear -> (B, D)."""

    def __init__(self, hidden_size: int, freq_shift: int = 0):
        super().__init__()
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(TIMESTEP_FREQ_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t_B: Tensor) -> Tensor:
        features = timestep_features(t_B, TIMESTEP_FREQ_DIM, self.freq_shift)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class id -> (B, D). With dropout_prob > 0 the table has one extra row, the null class `num_classes`,
    used for classifier-free guidance; in training each label becomes the null class with dropout_prob."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, y_B: Tensor) -> Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y_B.shape, device=y_B.device) < self.dropout_prob
            y_B = torch.where(drop, torch.full_like(y_B, self.num_classes), y_B)
        return self.table(y_B)


# ----------------------------------------------------------------------------------------------- block
class QKNorm(nn.Module):
    """Optional RMSNorm of queries and keys over each head's channels (one learned scale per channel, shared by the
    heads), so attention logits stay bounded whatever the scale of the block's input.

    Why: the official DiT has none, and our small shapes models trained at high learning rates grew first-block
    attention logits to ~3·10^4 (entropy 1.3 of a possible 5.5: one-hot attention), where bf16 rounding of q and k
    alone changes that block's output by 2% (ten times the other blocks'), and every continued training diverged,
    sooner each time (docs/dit.md). Normalising q and k is the standard cure (ViT-22B, SD3). Off by default, so real
    checkpoints keep their architecture; heads sliced by DyDiT keep their norm (it is per head channel)."""

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.q = nn.RMSNorm(head_dim, eps=eps)
        self.k = nn.RMSNorm(head_dim, eps=eps)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.q(q), self.k(k)


def no_qk_norm(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    return q, k


class SelfAttention(nn.Module):
    """Multi-head self-attention, fused q/k/v projection (rows: q of all heads, then k, then v); `qk_norm` adds
    QKNorm (`self.qk_norm(q, k)` is the identity without it, so methods that run the projections themselves call it
    too)."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.qk_norm = QKNorm(hidden_size // num_heads) if qk_norm else no_qk_norm

    def forward(self, x_BND: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """`key_padding_mask` (B, N) bool, True = attend to this token (padded text tokens in a caption refiner)."""
        B, N, D = x_BND.shape
        qkv = self.qkv(x_BND).view(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, Dh)
        q, k = self.qk_norm(q, k)
        out = attention(q, k, v, key_padding_mask=key_padding_mask)  # (B, h, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x_BND: Tensor) -> Tensor:
        if getattr(self.fc2, "takes_gelu", False):  # an FP8 fc2 applies the GELU as it quantises (dit/fp8.py)
            return self.fc2(self.fc1(x_BND))
        if can_fuse(x_BND, self.fc1):  # GPU inference: bias + GELU in the product's epilogue (dit/epilogue.py)
            return self.fc2(linear_gelu_tanh(x_BND, self.fc1.weight, self.fc1.bias))
        return self.fc2(F.gelu(self.fc1(x_BND), approximate="tanh"))


class DiTBlock(nn.Module):
    """x + gate * attn(modulate(norm(x))), then the same for the MLP; shift/scale/gate come from c (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, norm_eps: float, mlp_norm_eps: float,
                 qk_norm: bool = False):
        super().__init__()
        self.modulation = nn.Linear(hidden_size, BLOCK_MODULATIONS * hidden_size)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = MLP(hidden_size, mlp_ratio)

    def forward(self, x_BND: Tensor, c_BD: Tensor) -> Tensor:
        mods = self.modulation(F.silu(c_BD)).chunk(BLOCK_MODULATIONS, dim=1)  # 6 x (B, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        x_BND = x_BND + gate_a[:, None] * self.attn(modulate(self.norm1(x_BND), shift_a, scale_a))
        x_BND = x_BND + gate_m[:, None] * self.mlp(modulate(self.norm2(x_BND), shift_m, scale_m))
        return x_BND


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map of each token to its p*p*C_out patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm_eps: float):
        super().__init__()
        self.modulation = nn.Linear(hidden_size, FINAL_MODULATIONS * hidden_size)
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x_BND: Tensor, c_BD: Tensor) -> Tensor:
        shift, scale = self.modulation(F.silu(c_BD)).chunk(FINAL_MODULATIONS, dim=1)
        return self.linear(modulate(self.norm(x_BND), shift, scale))  # (B, N, p*p*C_out)


# ----------------------------------------------------------------------------------------------- model
class DiT(ModelMixin, ConfigMixin):
    """Class-conditional DiT on latents: forward(sample (B, C, H, W), timestep (B,) or scalar, class_labels (B,))
    -> (B, C_out, H, W), C_out = 2C with learn_sigma (noise prediction, then the variance interpolation values).

    Class id `num_classes` (`null_class_id`) is the unconditional label for classifier-free guidance; it exists
    when class_dropout_prob > 0, as in the official model.

    timestep_freq_shift and mlp_norm_eps exist only to reproduce diffusers' port exactly (it uses 1 and 1e-5 where
    the official DiT uses 0 and 1e-6); models built here keep the official values.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]  # the blocks: FSDP's shard groups

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        class_dropout_prob: float = 0.1,
        norm_eps: float = LAYERNORM_EPS,
        mlp_norm_eps: float = LAYERNORM_EPS,
        timestep_freq_shift: int = 0,
        qk_norm: bool = False,
    ):
        super().__init__()
        self.gradient_checkpointing = False  # diffusers' enable_gradient_checkpointing() turns it on
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not a multiple of patch_size {patch_size}")
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        grid = sample_size // patch_size
        # Fixed, so not saved: it is a function of the config (the official checkpoint's copy is checked on load).
        self.register_buffer("pos_embed", sincos_2d(grid, grid, hidden_size)[None], persistent=False)  # (1, N, D)
        self.time_embed = TimestepEmbedder(hidden_size, timestep_freq_shift)
        self.label_embed = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, norm_eps, mlp_norm_eps, qk_norm) for _ in range(depth)
        )
        self.final = FinalLayer(hidden_size, patch_size, self.out_channels, norm_eps)
        self.initialize_weights()

    @property
    def null_class_id(self) -> int:
        if self.config.class_dropout_prob <= 0:
            raise ValueError("this DiT has no null class (class_dropout_prob = 0), so no classifier-free guidance")
        return self.config.num_classes

    def initialize_weights(self) -> None:
        # Linears: xavier-uniform weights, zero biases (timm ViT default the official DiT follows).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # The patch conv is a linear map of each flattened patch, so it is initialised like one.
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        # Embeddings: small normals, as the official DiT.
        nn.init.normal_(self.label_embed.table.weight, std=EMBED_INIT_STD)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=EMBED_INIT_STD)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=EMBED_INIT_STD)
        # adaLN-Zero: zero modulation makes every block the identity (gates are 0) at the start of training.
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        # Zero final modulation and output linear: the untrained model predicts exactly zero.
        for layer in (self.final.modulation, self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # The three stages of forward, public so that methods can run blocks over their own token sets.
    def embed(self, sample_BCHW: Tensor) -> Tensor:
        x = self.patch_embed(sample_BCHW)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)  # (B, N, D)

    def condition(self, timestep: Tensor | float | int, class_labels_B: Tensor, batch: int) -> Tensor:
        t = torch.as_tensor(timestep, device=class_labels_B.device)
        t_B = t.expand(batch) if t.ndim == 0 else t
        return self.time_embed(t_B) + self.label_embed(class_labels_B)  # c: (B, D)

    def head(self, x_BND: Tensor, c_BD: Tensor, height: int, width: int) -> Tensor:
        p, C = self.config.patch_size, self.out_channels
        x = self.final(x_BND, c_BD)  # (B, N, p*p*C)
        B = x.shape[0]
        x = x.view(B, height // p, width // p, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, H/p, p, W/p, p)
        return x.reshape(B, C, height, width)

    def forward(self, sample: Tensor, timestep: Tensor | float | int, class_labels: Tensor) -> Tensor:
        B, C, H, W = sample.shape
        if (H, W) != (self.config.sample_size,) * 2:
            raise ValueError(f"sample is {H}x{W}, this DiT takes {self.config.sample_size}x{self.config.sample_size}")
        x = self.embed(sample)
        c = self.condition(timestep, class_labels, B)  # computed once, used by every block and the head
        for block in self.blocks:
            x = self.run_block(block, x, c)
        return self.head(x, c, H, W)

    def run_block(self, block: nn.Module, *args) -> Tensor:
        """One block; with gradient checkpointing on (and gradients wanted) its activations are recomputed in the
        backward pass instead of kept, trading ~1/3 more compute for memory (diffusers' mechanism)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "DiT":
        if name not in DIT_CONFIGS:
            raise ValueError(f"unknown DiT size {name!r}; valid: {', '.join(DIT_CONFIGS)}")
        return cls(**{**DIT_CONFIGS[name], **overrides})


# ----------------------------------------------------------------------------------------------- sizes
# (depth, hidden_size, num_heads) of the paper's sizes; each comes with patch 2, 4 and 8.
PAPER_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
PAPER_PATCHES = (2, 4, 8)
# ImageNet 256 px through the SD VAE (downsampling 8): 32x32x4 latents, 1000 classes.
IMAGENET_LATENT = dict(sample_size=32, in_channels=4, num_classes=1000)
# The shapes world: 64 px through its VAE gives 16x16x4 latents; 48 classes (shapes.NUM_CLASSES).
SHAPES_LATENT = dict(sample_size=16, in_channels=4, num_classes=48)
# T/1 is the shipped shapes-c2i (1.88 M parameters, 3.75 MB in fp16): patch 1, because a shape's outline spans only
# 2-4 latent pixels and patch 2 made it a blob.
TINY_SIZES = {"T": (6, 128, 4)}

DIT_CONFIGS: dict[str, dict] = {
    **{
        f"DiT-{size}/{p}": dict(depth=d, hidden_size=w, num_heads=h, patch_size=p, **IMAGENET_LATENT)
        for size, (d, w, h) in PAPER_SIZES.items()
        for p in PAPER_PATCHES
    },
    **{
        f"DiT-{size}/{p}": dict(depth=d, hidden_size=w, num_heads=h, patch_size=p, **SHAPES_LATENT)
        for size, (d, w, h) in TINY_SIZES.items()
        for p in (1, 2)
    },
}
