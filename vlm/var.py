"""VAR: next-scale prediction transformer (Tian et al., "Visual Autoregressive Modeling", 2024), class-conditional,
and a text-conditional variant in the style of Infinity (cross-attention to text tokens, sos from pooled text).

Reads top to bottom: helpers, the attention layers, the blocks, the shared transformer body, the two public models
(`VAR`, `TextVAR`) and the named sizes. Module and parameter names of `VAR` follow FoundationVision/VAR
`models/var.py` and `basic_var.py`, so the released `var_dNN.pth` state dicts load strictly (vlm/var_loaders.py).

Shapes: B batch, K scales with sides pn_k, l_k = pn_k² tokens, L = Σ l_k, C width (64·depth for the paper sizes),
H heads of Dh = C / H, Cv tokenizer feature width, V vocabulary, T text tokens, E text width.

Paper symbols → code:
- condition c (class embedding / pooled text): `cond_BD`; sos (the first scale's single token) = c + pos_start
- token map r_k: the tokenizer's indices of scale k; the input of scale k ≥ 1 is word_embed(area_down(f̂_{<k}, pn_k))
- level and position embeddings: `lvl_embed[k]` + `pos_1LC`
- AdaLN: (γ1, γ2, s1, s2, b1, b2) = ada_lin(c); x += γ1·Attn(LN(x)(1+s1)+b1); x += γ2·FFN(LN(x)(1+s2)+b2)
- attention within the pyramid: block-causal by scale in training (attention pattern "block_causal", segments
  l_0..l_{K-1}); at sampling, scale k's queries attend densely to the KV cache of scales ≤ k.

Seams: `condition` → `embed` / `embed_scale` → `run_blocks` (each `block(x, cond, context, cache, scale)`) →
`logits`, all public, so sampling (vlm/var_pipeline.py) and cache policies (ScaleKV) call the pieces; every attention
layer hands its post-norm queries to `cache.append(..., q=q)` so a policy can score keys with the real queries.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from attention import attention
from caching import KVCache
from dit.int8_weights import INT8_WEIGHTS, load_int8

# LayerNorm epsilon of the official VAR (every norm in its blocks is affine-free).
LAYERNORM_EPS = 1e-6
# attn_l2_norm: q·exp(scale_mul) with scale_mul initialised at ln 4 and clamped at ln 100 (official values).
SCALE_MUL_INIT = math.log(4.0)
SCALE_MUL_MAX = math.log(100.0)
# Without attn_l2_norm the official softmax scale is 0.25 / sqrt(Dh), a quarter of the usual one.
PLAIN_SCALE_FACTOR = 0.25
# Modulation vectors per block (γ1, γ2, s1, s2, b1, b2) and before the head (s, b).
BLOCK_MODULATIONS = 6
HEAD_MODULATIONS = 2


# ----------------------------------------------------------------------------------------------- helpers
def scale_lengths(patch_nums: Sequence[int]) -> list[int]:
    return [p * p for p in patch_nums]


def level_ids(patch_nums: Sequence[int]) -> Tensor:
    """(L,) int64: the scale of each token in the concatenated pyramid."""
    return torch.cat([torch.full((p * p,), k, dtype=torch.long) for k, p in enumerate(patch_nums)])


def block_causal_bias(patch_nums: Sequence[int]) -> Tensor:
    """(1, 1, L, L) float additive mask: 0 where level(key) <= level(query), else -inf (the official buffer)."""
    lvl = level_ids(patch_nums)
    return torch.where(lvl[:, None] >= lvl[None, :], 0.0, -torch.inf).reshape(1, 1, len(lvl), len(lvl))


# ----------------------------------------------------------------------------------------------- attention
class SelfAttention(nn.Module):
    """Multi-head self-attention with VAR's biases (q and v learned, k zero) and optional L2-normed q/k."""

    def __init__(self, embed_dim: int, num_heads: int, attn_l2_norm: bool):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"width {embed_dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            # Cosine attention: the logit scale is learned per head instead of 1/sqrt(Dh).
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), SCALE_MUL_INIT))
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        # k needs no bias (softmax is invariant to it); the official code keeps a zero buffer to cat a full bias.
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    @property
    def scale(self) -> float:
        return 1.0 if self.attn_l2_norm else PLAIN_SCALE_FACTOR / math.sqrt(self.head_dim)

    def qkv(self, x_BLC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, H, L, Dh), q and k already normalised and q scaled when attn_l2_norm."""
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, Dh)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(SCALE_MUL_MAX).exp()
            k = F.normalize(k, dim=-1)
            # Under autocast the normalisation runs in float32 (autocast's list) while v leaves the linear in bf16;
            # the attention entry point takes one dtype (SDPA under autocast would have cast them itself).
            q, k = q.to(v.dtype), k.to(v.dtype)
        return q, k, v

    def forward(self, x_BLC: Tensor, *, segments: Sequence[int] | None = None, cache: KVCache | None = None,
                layer: int = 0, scale_index: int = 0) -> Tensor:
        B, L, C = x_BLC.shape
        q, k, v = self.qkv(x_BLC)
        if cache is not None:
            # Sampling: this scale's tokens see every cached token of the scales before and themselves.
            k, v = cache.append(layer, k, v, segment=scale_index, q=q)
            o = attention(q, k.to(q.dtype), v.to(q.dtype), pattern="dense", scale=self.scale)
        else:
            o = attention(q, k, v, pattern="block_causal", segments=segments, scale=self.scale)
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys/values from the (projected) text tokens, padded text keys masked."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.to_q = nn.Linear(embed_dim, embed_dim)
        self.to_kv = nn.Linear(embed_dim, 2 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x_BLC: Tensor, text_BTC: Tensor, text_mask_BT: Tensor) -> Tensor:
        B, L, C = x_BLC.shape
        T = text_BTC.shape[1]
        q = self.to_q(x_BLC).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(text_BTC).view(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = attention(q, k, v, pattern="dense", key_padding_mask=text_mask_BT)
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# ----------------------------------------------------------------------------------------------- blocks
class Block(nn.Module):
    """AdaLN self-attention block: the six modulation vectors come from the condition through ada_lin."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float, attn_l2_norm: bool, norm_eps: float,
                 drop_path: float):
        super().__init__()
        self.attn = SelfAttention(embed_dim, num_heads, attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, BLOCK_MODULATIONS * embed_dim))
        self.drop_path = drop_path

    def _drop(self, x_BLC: Tensor) -> Tensor:
        """Stochastic depth: drop the residual branch per sample in training (rescaled by the keep rate)."""
        if not self.training or self.drop_path == 0.0:
            return x_BLC
        keep = x_BLC.new_empty(x_BLC.shape[0], 1, 1).bernoulli_(1 - self.drop_path)
        return x_BLC * keep / (1 - self.drop_path)

    def modulations(self, cond_BC: Tensor) -> tuple[Tensor, ...]:
        B, C = cond_BC.shape
        return self.ada_lin(cond_BC).view(B, 1, BLOCK_MODULATIONS, C).unbind(2)  # 6 × (B, 1, C)

    def forward(self, x_BLC: Tensor, cond_BC: Tensor, context=None, **attn_kwargs) -> Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulations(cond_BC)
        x_BLC = x_BLC + self._drop(self.attn(self.ln_wo_grad(x_BLC) * (1 + scale1) + shift1, **attn_kwargs) * gamma1)
        return x_BLC + self._drop(self.ffn(self.ln_wo_grad(x_BLC) * (1 + scale2) + shift2) * gamma2)


class CrossBlock(Block):
    """Infinity's block: self-attention, then cross-attention to the text (pre-norm, ungated), then the FFN."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float, attn_l2_norm: bool, norm_eps: float,
                 drop_path: float):
        super().__init__(embed_dim, num_heads, mlp_ratio, attn_l2_norm, norm_eps, drop_path)
        self.cross_norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.cross_attn = CrossAttention(embed_dim, num_heads)

    def forward(self, x_BLC: Tensor, cond_BC: Tensor, context=None, **attn_kwargs) -> Tensor:
        text_BTC, text_mask_BT = context
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulations(cond_BC)
        x_BLC = x_BLC + self._drop(self.attn(self.ln_wo_grad(x_BLC) * (1 + scale1) + shift1, **attn_kwargs) * gamma1)
        x_BLC = x_BLC + self.cross_attn(self.cross_norm(x_BLC), text_BTC, text_mask_BT)
        return x_BLC + self._drop(self.ffn(self.ln_wo_grad(x_BLC) * (1 + scale2) + shift2) * gamma2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, embed_dim: int, norm_eps: float):
        super().__init__()
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, HEAD_MODULATIONS * embed_dim))

    def forward(self, x_BLC: Tensor, cond_BC: Tensor) -> Tensor:
        B, C = cond_BC.shape
        scale, shift = self.ada_lin(cond_BC).view(B, 1, HEAD_MODULATIONS, C).unbind(2)
        return self.ln_wo_grad(x_BLC) * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------- the body
class _NextScaleTransformer(ModelMixin, ConfigMixin):
    """What the class and text models share: embeddings of the pyramid, the blocks, the head, the init."""

    block_class = Block

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """diffusers' from_pretrained, or for a folder stored with int8 weights (`dit.int8_weights.save_int8`: the
        shipped shapes transformers) the dequantised model."""
        folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        if (folder / INT8_WEIGHTS).is_file():
            return load_int8(cls, folder, kwargs.get("torch_dtype"))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """diffusers' save_pretrained; a full save replaces an int8 one written there before."""
        (Path(save_directory) / INT8_WEIGHTS).unlink(missing_ok=True)
        return super().save_pretrained(save_directory, **kwargs)

    def _build(self, depth: int, embed_dim: int, num_heads: int, vocab_size: int, z_channels: int,
               patch_nums: Sequence[int], mlp_ratio: float, attn_l2_norm: bool, norm_eps: float,
               drop_path_rate: float) -> None:
        patch_nums = tuple(int(p) for p in patch_nums)
        if list(patch_nums) != sorted(set(patch_nums)) or patch_nums[0] < 1 or len(patch_nums) < 2:
            raise ValueError(f"patch_nums must be at least two strictly increasing positive ints, got {patch_nums}")
        self.patch_nums = patch_nums
        self.segments = scale_lengths(patch_nums)
        self.L, self.first_l = sum(self.segments), self.segments[0]
        C = embed_dim
        self.word_embed = nn.Linear(z_channels, C)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(patch_nums), C)
        # Stochastic depth grows linearly with depth (official); plain floats so building on the meta device works.
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(self.block_class(C, num_heads, mlp_ratio, attn_l2_norm, norm_eps, rates[i])
                                    for i in range(depth))
        # Buffers of the official state dict: the level of each token and the (unused here: attention takes the
        # segments) training mask. Kept so the release loads strictly and tests can compare against it.
        self.register_buffer("lvl_1L", level_ids(patch_nums).view(1, self.L))
        self.register_buffer("attn_bias_for_masking", block_causal_bias(patch_nums))
        self.head_nm = AdaLNBeforeHead(C, norm_eps)
        self.head = nn.Linear(C, vocab_size)

    def initialize_weights(self, init_adaln: float, init_adaln_gamma: float, init_head: float) -> None:
        """The official init (VAR `init_weights` with init_std < 0), in one place."""
        std = math.sqrt(1 / (3 * self.config.embed_dim))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_1LC, std=std)
        # Small head: initial logits near uniform.
        self.head.weight.data.mul_(init_head)
        # Gentle modulation at the start; the block gates γ (first 2C rows) nearly closed, so every block starts
        # close to the identity and depth does not blow up the residual stream.
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        C, depth = self.config.embed_dim, len(self.blocks)
        for block in self.blocks:
            # Residual branches scaled by 1/sqrt(2·depth), as GPT-2 does, so the stream's variance stays bounded.
            block.attn.proj.weight.data.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.data.div_(math.sqrt(2 * depth))
            w = block.ada_lin[-1].weight.data
            w[2 * C:].mul_(init_adaln)
            w[:2 * C].mul_(init_adaln_gamma)

    # --- pieces (public: sampling and cache policies call them)
    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def head_dim(self) -> int:
        return self.config.embed_dim // self.config.num_heads

    def lvl_pos(self) -> Tensor:
        """(1, L, C): level embedding of each token plus its position embedding."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def embed(self, cond_BC: Tensor, x_BLCv_wo_first_l: Tensor) -> Tensor:
        """Teacher-forced input of the whole pyramid: [sos ‖ word_embed(x)] + level/position: (B, L, C)."""
        B = cond_BC.shape[0]
        if x_BLCv_wo_first_l.ndim != 3 or x_BLCv_wo_first_l.shape[1:] != (self.L - self.first_l,
                                                                           self.config.z_channels):
            raise ValueError(f"teacher-forcing input must be (B, {self.L - self.first_l}, {self.config.z_channels}), "
                             f"got {tuple(x_BLCv_wo_first_l.shape)}")
        if x_BLCv_wo_first_l.shape[0] != B:
            raise ValueError(f"batch of the condition ({B}) and of the input ({x_BLCv_wo_first_l.shape[0]}) differ")
        sos = cond_BC.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start
        x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.to(sos.dtype))), 1)
        return x + self.lvl_pos()

    def embed_scale(self, k: int, cond_BC: Tensor | None = None, map_BlCv: Tensor | None = None) -> Tensor:
        """Input tokens of scale k alone (sampling): sos for k = 0, else word_embed(map), plus level/position."""
        start = sum(self.segments[:k])
        lp = self.lvl_pos()[:, start:start + self.segments[k]]
        if k == 0:
            return cond_BC.unsqueeze(1).expand(-1, self.first_l, -1) + self.pos_start + lp
        return self.word_embed(map_BlCv) + lp

    def run_blocks(self, x_BLC: Tensor, cond_BC: Tensor, context=None, *, cache: KVCache | None = None,
                   scale_index: int = 0, segments: Sequence[int] | None = None) -> Tensor:
        """All blocks. Without a cache the tokens are the pyramid's first scales (block-causal over `segments`,
        default all scales); with a cache they are one scale's tokens, appended to each layer's cache."""
        kw = dict(segments=segments or self.segments) if cache is None else dict(cache=cache, scale_index=scale_index)
        for i, block in enumerate(self.blocks):
            x_BLC = block(x_BLC, cond_BC, context, layer=i, **kw)
        return x_BLC

    def logits(self, h_BLC: Tensor, cond_BC: Tensor) -> Tensor:
        return self.head(self.head_nm(h_BLC, cond_BC)).float()  # (B, L, V)

    def make_cache(self, batch: int, *, dtype: torch.dtype | None = None, policy=None, capacity: int | None = None
                   ) -> KVCache:
        """A KV cache for `batch` rows (2B with guidance) holding the whole pyramid in every layer."""
        p = next(self.parameters())
        return KVCache(len(self.blocks), batch, self.num_heads, self.head_dim, capacity or self.L,
                       dtype=dtype or p.dtype, device=p.device, policy=policy)


# ----------------------------------------------------------------------------------------------- public models
class VAR(_NextScaleTransformer):
    """Class-conditional VAR; row `num_classes` of class_emb is the null class (classifier-free guidance)."""

    @register_to_config
    def __init__(self, depth: int = 16, embed_dim: int = 1024, num_heads: int = 16, num_classes: int = 1000,
                 vocab_size: int = 4096, z_channels: int = 32,
                 patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), mlp_ratio: float = 4.0,
                 attn_l2_norm: bool = True, norm_eps: float = LAYERNORM_EPS, drop_path_rate: float = 0.0,
                 cond_drop_rate: float = 0.1, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5,
                 init_head: float = 0.02):
        super().__init__()
        self.class_emb = nn.Embedding(num_classes + 1, embed_dim)
        self._build(depth, embed_dim, num_heads, vocab_size, z_channels, patch_nums, mlp_ratio, attn_l2_norm,
                    norm_eps, drop_path_rate)
        self.initialize_weights(init_adaln, init_adaln_gamma, init_head)

    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    def condition(self, class_labels_B: Tensor) -> tuple[Tensor, None]:
        """(cond (B, C), no context); label `null_class_id` is the unconditional row."""
        labels = torch.as_tensor(class_labels_B, device=self.class_emb.weight.device)
        if labels.ndim != 1 or labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"class labels must be a 1-D integer tensor, got {tuple(labels.shape)} {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.config.num_classes):
            raise ValueError(f"class labels must be in [0, {self.config.num_classes}] ({self.config.num_classes} "
                             f"= null); got {labels.tolist()}")
        return self.class_emb(labels), None

    def forward(self, class_labels: Tensor, x_BLCv_wo_first_l: Tensor) -> Tensor:
        """Teacher-forced logits (B, L, V). Label dropout for guidance is the caller's (see scripts/train_var.py)."""
        cond, _ = self.condition(class_labels)
        return self.logits(self.run_blocks(self.embed(cond, x_BLCv_wo_first_l), cond), cond)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "VAR":
        if name not in VAR_CONFIGS:
            raise ValueError(f"unknown VAR size {name!r}; valid: {', '.join(VAR_CONFIGS)}")
        return cls(**{**VAR_CONFIGS[name], **overrides})


class TextVAR(_NextScaleTransformer):
    """Text-conditional VAR (Infinity-style): every block cross-attends to the projected text tokens; the
    condition (AdaLN input and sos) is the mask-averaged projected text. The null condition is the empty prompt's
    encoding (the pipeline encodes ""), so the model needs no special row."""

    block_class = CrossBlock

    @register_to_config
    def __init__(self, depth: int = 4, embed_dim: int = 128, num_heads: int = 4, text_dim: int = 96,
                 vocab_size: int = 512, z_channels: int = 16, patch_nums: Sequence[int] = (1, 2, 3, 4, 6, 8),
                 mlp_ratio: float = 4.0, attn_l2_norm: bool = True, norm_eps: float = LAYERNORM_EPS,
                 drop_path_rate: float = 0.0, cond_drop_rate: float = 0.1, init_adaln: float = 0.5,
                 init_adaln_gamma: float = 1e-3, init_head: float = 0.02):
        super().__init__()
        self.text_proj = nn.Sequential(nn.Linear(text_dim, embed_dim), nn.GELU(approximate="tanh"),
                                       nn.Linear(embed_dim, embed_dim))
        self.text_pool = nn.Linear(embed_dim, embed_dim)
        self._build(depth, embed_dim, num_heads, vocab_size, z_channels, patch_nums, mlp_ratio, attn_l2_norm,
                    norm_eps, drop_path_rate)
        self.initialize_weights(init_adaln, init_adaln_gamma, init_head)

    def condition(self, text_BTE: Tensor, text_mask_BT: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if text_BTE.ndim != 3 or text_BTE.shape[-1] != self.config.text_dim:
            raise ValueError(f"text tokens must be (B, T, {self.config.text_dim}), got {tuple(text_BTE.shape)}")
        if text_mask_BT.shape != text_BTE.shape[:2] or text_mask_BT.dtype != torch.bool:
            raise ValueError(f"text mask must be bool {tuple(text_BTE.shape[:2])}, got {tuple(text_mask_BT.shape)} "
                             f"{text_mask_BT.dtype}")
        if not bool(text_mask_BT.any(1).all()):
            raise ValueError("every text needs at least one kept token")
        ctx = self.text_proj(text_BTE.to(self.text_pool.weight.dtype))  # (B, T, C)
        w = text_mask_BT.unsqueeze(-1).to(ctx.dtype)
        pooled = (ctx * w).sum(1) / w.sum(1)
        return self.text_pool(pooled), (ctx, text_mask_BT)

    def forward(self, text_tokens: Tensor, text_mask: Tensor, x_BLCv_wo_first_l: Tensor) -> Tensor:
        cond, ctx = self.condition(text_tokens, text_mask)
        return self.logits(self.run_blocks(self.embed(cond, x_BLCv_wo_first_l), cond, ctx), cond)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "TextVAR":
        if name not in TEXT_VAR_CONFIGS:
            raise ValueError(f"unknown TextVAR size {name!r}; valid: {', '.join(TEXT_VAR_CONFIGS)}")
        return cls(**{**TEXT_VAR_CONFIGS[name], **overrides})


# ----------------------------------------------------------------------------------------------- growing
@torch.no_grad()
def grow_depth(model: _NextScaleTransformer, depth: int) -> _NextScaleTransformer:
    """A deeper model that computes exactly what the trained `model` computes, to train on from there (a larger model
    without starting over). New block j is a copy of old block floor(j·d_old/depth); a block's second and later
    copies start as the identity: their residual gains γ1, γ2 (the first 2C outputs of ada_lin) are zero and, in a
    text block, so is the ungated cross-attention's output projection. Gradients still reach the copies through
    γ, so they move off the identity as training goes on (progressive stacking with zero-gated repeats)."""
    old = model.config.depth
    if depth <= old:
        raise ValueError(f"grow_depth: depth {depth} must exceed the model's {old}")
    deeper = type(model).from_config({**model.config, "depth": depth})
    C = model.config.embed_dim
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    for j in range(depth):
        i = j * old // depth
        repeat = j > 0 and (j - 1) * old // depth == i
        for k, v in model.blocks[i].state_dict().items():
            v = v.clone()
            if repeat and k in ("ada_lin.1.weight", "ada_lin.1.bias"):
                v[:2 * C] = 0
            if repeat and k.startswith("cross_attn.proj."):
                v.zero_()
            state[f"blocks.{j}.{k}"] = v
    deeper.load_state_dict(state)
    return deeper.to(model.dtype)


# ----------------------------------------------------------------------------------------------- sizes
# Per depth: (γ init, i.e. the official `alng`). Width 64·depth and depth heads of 64 are derived here, once.
PAPER_DEPTHS = {16: 1e-3, 20: 1e-3, 24: 1e-4, 30: 1e-5}
IMAGENET = dict(num_classes=1000, vocab_size=4096, z_channels=32, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
# The shapes world: 48 classes, the vqvae-shapes-f8 tokenizer (vocabulary 512, 16 channels, 6 scales).
SHAPES = dict(vocab_size=512, z_channels=16, patch_nums=(1, 2, 3, 4, 6, 8))

VAR_CONFIGS: dict[str, dict] = {
    **{f"VAR-d{d}": dict(depth=d, embed_dim=64 * d, num_heads=d, drop_path_rate=0.1 * d / 24,
                         init_adaln_gamma=g, **IMAGENET) for d, g in PAPER_DEPTHS.items()},
    # 1.3 M parameters (2.6 MB fp16): with the text model (1.6 M) and the tokenizer (1.06 M) under the 8 MB budget.
    "VAR-shapes-d4": dict(depth=4, embed_dim=128, num_heads=4, num_classes=48, init_adaln_gamma=1e-3, **SHAPES),
    # d4 grown to depth 8 (grow_depth) and trained on: the shipped shapes-var-c2i since 2026-11-24, 2.5 M parameters
    # stored as int8 (2.6 MB), so that it fits the 8 MB budget beside the text model and the tokenizer.
    "VAR-shapes-d8": dict(depth=8, embed_dim=128, num_heads=4, num_classes=48, init_adaln_gamma=1e-3, **SHAPES),
    # Tests: the smallest model with every piece.
    "VAR-tiny": dict(depth=2, embed_dim=32, num_heads=2, num_classes=10, vocab_size=64, z_channels=8,
                     patch_nums=(1, 2, 4, 8), init_adaln_gamma=0.5),
}
TEXT_VAR_CONFIGS: dict[str, dict] = {
    "TextVAR-shapes-d4": dict(depth=4, embed_dim=128, num_heads=4, text_dim=96, **SHAPES),
    # d4 grown to depth 6 (grow_depth) and trained on: the shipped shapes-var-t2i since 2026-11-24 (int8, 2.5 MB)
    "TextVAR-shapes-d6": dict(depth=6, embed_dim=128, num_heads=4, text_dim=96, **SHAPES),
    "TextVAR-tiny": dict(depth=2, embed_dim=32, num_heads=2, text_dim=12, vocab_size=64, z_channels=8,
                         patch_nums=(1, 2, 4, 8), init_adaln_gamma=0.5),
}
