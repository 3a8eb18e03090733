"""LLaVA-1.5: a frozen CLIP vision tower, a 2-layer GELU MLP projector and a Llama-style decoder
(RMSNorm, RoPE, SwiGLU, grouped-query attention through `attention.attention`), one file, top to bottom:
helpers, decoder block, the decoder + projector (`LlavaModel`), vision towers, the bundle (`LlavaVLM`), sizes.

Sequence building follows LLaVA-1.5 (`llava_arch.prepare_inputs_labels_for_multimodal`): the prompt holds one
image placeholder id per image; it is replaced by the N projected patch tokens, positions stay contiguous over
the real tokens, the mask is causal, labels are -100 everywhere except the assistant answers (and their `</s>`).
Unlike the official code the merge is vectorised and keeps the batch's padding side, so left-padded batches
(generation) and right-padded ones (training) both come out right, and the visual positions of every row are
returned explicitly (`MultimodalInputs.image_index`) instead of being re-derived from input_ids later.

Seams for the methods built on this model (spec sections 2-4), without copying the model:
  - `visual_residuals={layer: (B, N_img, D)}` in `LlavaModel.decode`: added to the hidden states at the visual
    positions before that decoder layer (DeepStack's stacks; prefill only).
  - `attn: AttnSpec` in `LlavaModel.decode`: which tokens issue queries (`q_index`, NAAViT gathers the text
    queries), the pattern and padding mask handed to every layer's attention call.
  - `self.layers` is a plain ModuleList of `DecoderLayer`; a method swaps named layers for its own class
    (SAISA's visual-KV-only layers), and `self.mm_projector` can be replaced the same way.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from attention import attention

IGNORE_INDEX = -100  # label of every token the loss skips (LLaVA, transformers)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # the diffusers file name, as the other shipped models


# ----------------------------------------------------------------------------------------------- helpers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 and scale after casting back, as Llama does (bit-compatible with its checkpoints).
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (B, 1, N, head_dim) for integer positions (B, N), in Llama's half-split layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, N, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, N, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x_BHND: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x_BHND.chunk(2, dim=-1)
    return x_BHND * cos + torch.cat([-x2, x1], dim=-1) * sin


@dataclass
class AttnSpec:
    """What every layer's attention call gets (built once per forward, passed to all layers).

    key_padding_mask: (B, Nk) bool, True = real token, over all keys the layer attends (cached + new), or None.
    q_index: which of the new tokens issue queries, (B, n) LongTensor (None = all): NAAViT's seam.
    """

    pattern: str = "causal"
    key_padding_mask: Tensor | None = None
    q_index: Tensor | None = None


# ----------------------------------------------------------------------------------------------- decoder block
class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.qkv_proj = None  # q, k, v stacked in one Linear after fuse_projections (inference)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return self.qkv_proj(x).split([q_dim, kv_dim, kv_dim], dim=-1)

    def forward(self, x_BND: Tensor, cos: Tensor, sin: Tensor, attn: AttnSpec, cache=None, layer: int = 0,
                segment: int = 0) -> Tensor:
        B, N, _ = x_BND.shape
        q, k, v = self.project(x_BND)
        q = q.reshape(B, N, self.n_heads, self.head_dim).transpose(1, 2)  # B H N d
        k = k.reshape(B, N, self.n_kv_heads, self.head_dim).transpose(1, 2)  # B Hkv N d
        v = v.reshape(B, N, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # The shared cache returns every live key of this layer (prompt + earlier steps + these tokens);
            # the rectangular causal pattern is bottom-right aligned, so new query i sees keys up to its own.
            k, v = cache.append(layer, k, v, segment=segment, q=q)
        # q_index (NAAViT): only those new tokens issue queries; the keys stay whole.
        o = attention(q, k, v, pattern=attn.pattern, key_padding_mask=attn.key_padding_mask, q_index=attn.q_index)
        n_out = o.shape[2]
        return self.o_proj(o.transpose(1, 2).reshape(B, n_out, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.gate_up_proj = None  # gate and up stacked in one Linear after fuse_projections (inference)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _linear(weight: Tensor) -> nn.Linear:
    """A bias-free Linear holding `weight` (out, in) as is (no random init first: 7B-sized matrices)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
    return lin


@torch.no_grad()
def fuse_projections(model: "LlavaModel") -> "LlavaModel":
    """Stack each layer's q / k / v and gate / up weights into one Linear each (in place), for inference.

    At decode time (one token per row) every projection is a matrix-vector product bound by reading its weights;
    one product over the stacked matrix reads the same bytes in fewer, larger kernels (gpt-fast does the same).
    The outputs are those of the separate projections (the rows are stacked, nothing is re-computed). Checkpoints
    keep the separate layout: `unfuse_projections` restores it (LlavaVLM.save_pretrained refuses a fused model)."""
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        if a.qkv_proj is None:
            a.qkv_proj = _linear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            del a.q_proj, a.k_proj, a.v_proj
        if m.gate_up_proj is None:
            m.gate_up_proj = _linear(torch.cat([m.gate_proj.weight, m.up_proj.weight]))
            del m.gate_proj, m.up_proj
    return model


@torch.no_grad()
def unfuse_projections(model: "LlavaModel") -> "LlavaModel":
    """Undo `fuse_projections`: the checkpoint layout (q_proj, k_proj, v_proj, gate_proj, up_proj) again."""
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        if a.qkv_proj is not None:
            q_dim, kv_dim = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
            q, k, v = a.qkv_proj.weight.split([q_dim, kv_dim, kv_dim])
            a.q_proj, a.k_proj, a.v_proj = _linear(q.clone()), _linear(k.clone()), _linear(v.clone())
            a.qkv_proj = None
        if m.gate_up_proj is not None:
            gate, up = m.gate_up_proj.weight.chunk(2)
            m.gate_proj, m.up_proj = _linear(gate.clone()), _linear(up.clone())
            m.gate_up_proj = None
    return model


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, hidden: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = Attention(dim, n_heads, n_kv_heads, head_dim)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = MLP(dim, hidden)

    def forward(self, h_BND: Tensor, cos: Tensor, sin: Tensor, attn: AttnSpec, cache=None, layer: int = 0,
                segment: int = 0) -> Tensor:
        a = self.self_attn(self.input_layernorm(h_BND), cos, sin, attn, cache, layer, segment)
        if attn.q_index is not None:
            # Only the query tokens get an attention output (NAAViT): add it back at their positions.
            idx = attn.q_index[..., None].expand(-1, -1, h_BND.shape[-1])
            h_BND = h_BND.scatter_add(1, idx, a)
        else:
            h_BND = h_BND + a
        return h_BND + self.mlp(self.post_attention_layernorm(h_BND))


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class MultimodalInputs:
    """The decoder's input after the image placeholders were replaced by the projected patch tokens."""

    embeds: Tensor  # (B, L, D)
    attention_mask: Tensor  # (B, L) bool, True = real token
    position_ids: Tensor  # (B, L) long: 0.. over the real tokens of each row (pads get 0)
    image_index: Tensor | None  # (B, N_img) long: where the visual tokens sit, None without images
    labels: Tensor | None = None  # (B, L) long, IGNORE_INDEX outside the answers


def positions_from_mask(mask: Tensor) -> Tensor:
    """Contiguous positions over the real tokens of each row (left or right padding alike); pads get 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------------------------- the model
class LlavaModel(ModelMixin, ConfigMixin):
    """Projector + Llama-style decoder. The vision tower is separate (`LlavaVLM`): it is frozen, shared with
    other shipped models (the shapes CLIP) or stored under its own keys in real checkpoints.

    Parameter names follow Llama/LLaVA (`layers.i.self_attn.q_proj`, `mm_projector.0`), so foreign checkpoints
    map by prefix only (vlm/llava_loaders.py)."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        intermediate_size: int = 11008,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 4096,
        tie_word_embeddings: bool = False,
        mm_hidden_size: int = 1024,
        image_token_id: int = -200,
        pad_token_id: int = 0,
        eos_token_id: int = 2,
        vision_tower: dict | None = None,
        ditstudio_task: str = "vlm",
    ):
        super().__init__()
        kv = num_key_value_heads or num_attention_heads
        if hidden_size % num_attention_heads or num_attention_heads % kv:
            raise ValueError(f"hidden_size {hidden_size} must divide into {num_attention_heads} heads, and the "
                             f"heads into {kv} key/value groups")
        self.head_dim = hidden_size // num_attention_heads
        # mlp2x_gelu: Linear(vision, d) -> GELU -> Linear(d, d); index names 0/2 as in LLaVA's nn.Sequential.
        self.mm_projector = nn.Sequential(nn.Linear(mm_hidden_size, hidden_size), nn.GELU(),
                                          nn.Linear(hidden_size, hidden_size))
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(hidden_size, num_attention_heads, kv, self.head_dim, intermediate_size, rms_norm_eps)
            for _ in range(num_hidden_layers))
        self.norm = RMSNorm(hidden_size, rms_norm_eps)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Llama's init: normal(0, 0.02) for every matrix and the embedding, zero biases, unit norms.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        # Tied output: the lm head reads the embedding table (small shapes models: the vocabulary is a larger
        # share of the weights there than in a 7B model).
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads or self.config.num_attention_heads

    # ----- sequence building -----
    def project(self, image_features_BNC: Tensor) -> Tensor:
        return self.mm_projector(image_features_BNC.to(self.mm_projector[0].weight.dtype))

    def build_inputs(self, input_ids: Tensor, image_features: Tensor | None, attention_mask: Tensor | None = None,
                     labels: Tensor | None = None) -> MultimodalInputs:
        """Replace each row's image placeholder (config.image_token_id) by the projected features.

        input_ids (B, T) with exactly one placeholder per row when image_features (B, N, C_vision) is given, none
        otherwise; attention_mask (B, T) (1 = real token; left or right padding); labels (B, T) or None.
        Output length T + N - 1; padding stays on the side it was on."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, T); got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        is_img = input_ids == self.config.image_token_id
        text_ids = input_ids.masked_fill(is_img | ~mask, 0).clamp(min=0)
        text = self.embed_tokens(text_ids)  # (B, T, D)
        if image_features is None:
            if is_img.any():
                raise ValueError("input_ids hold image placeholders but no image_features were given")
            return MultimodalInputs(text, mask, positions_from_mask(mask), None, labels)
        if image_features.ndim != 3 or image_features.shape[0] != B \
                or image_features.shape[-1] != self.config.mm_hidden_size:
            raise ValueError(f"image_features must be ({B}, N, {self.config.mm_hidden_size}); "
                             f"got {tuple(image_features.shape)}")
        counts = is_img.sum(-1)
        if not bool((counts == 1).all()):
            raise ValueError(f"every row needs exactly one image placeholder (id {self.config.image_token_id}); "
                             f"found {counts.tolist()}")
        img = self.project(image_features)  # (B, N, D)
        N = img.shape[1]
        L = T + N - 1
        p = is_img.float().argmax(-1, keepdim=True)  # (B, 1) placeholder index
        j = torch.arange(T, device=input_ids.device)[None]
        # Text token j moves N-1 slots right if it comes after the placeholder; the placeholder slot and the next
        # N-1 take the image tokens.
        dest = torch.where(j > p, j + N - 1, j)  # (B, T)
        image_index = p + torch.arange(N, device=input_ids.device)[None]  # (B, N)
        D = text.shape[-1]
        embeds = text.new_zeros(B, L, D)
        # The placeholder's own slot (dest == p) is written with its dummy embedding, then overwritten by image token 0.
        embeds.scatter_(1, dest[..., None].expand(-1, -1, D), text)
        embeds = embeds.scatter(1, image_index[..., None].expand(-1, -1, D), img.to(embeds.dtype))
        new_mask = torch.ones(B, L, dtype=torch.bool, device=input_ids.device)
        new_mask.scatter_(1, dest, mask)
        new_labels = None
        if labels is not None:
            new_labels = torch.full((B, L), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
            new_labels.scatter_(1, dest, labels.masked_fill(is_img, IGNORE_INDEX))
        return MultimodalInputs(embeds, new_mask, positions_from_mask(new_mask), image_index, new_labels)

    # ----- decoder -----
    def decode(self, h_BLD: Tensor, position_ids: Tensor, *, attn: AttnSpec | None = None, cache=None,
               segment: int = 0, visual_residuals: dict[int, Tensor] | None = None,
               image_index: Tensor | None = None) -> Tensor:
        """Run the decoder layers on embeddings (B, L, D); returns the final-normed hidden states (B, L, D).

        visual_residuals {layer i: (B, N_img, D)} are added at `image_index` before layer i (DeepStack)."""
        attn = attn or AttnSpec()
        cos, sin = rope_cos_sin(position_ids, self.head_dim, self.config.rope_theta, h_BLD.dtype)
        if visual_residuals and image_index is None:
            raise ValueError("visual_residuals need image_index (the visual positions of each row)")
        for i, layer in enumerate(self.layers):
            if visual_residuals and i in visual_residuals:
                r = visual_residuals[i].to(h_BLD.dtype)
                h_BLD = h_BLD.scatter_add(1, image_index[..., None].expand(-1, -1, h_BLD.shape[-1]), r)
            h_BLD = layer(h_BLD, cos, sin, attn, cache, i, segment)
        return self.norm(h_BLD)

    def forward(self, input_ids: Tensor, image_features: Tensor | None = None, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, *, visual_residuals: dict[int, Tensor] | None = None) -> dict:
        """Full (uncached) forward: logits (B, L, V) and, with labels, the mean next-token loss over the answers."""
        x = self.build_inputs(input_ids, image_features, attention_mask, labels)
        # With right padding (training) causality alone keeps real tokens off the pads; an explicit padding mask
        # is only needed when pads come first, and it would push attention onto a slower masked kernel.
        right_padded = bool(x.attention_mask[:, 0].all())
        attn = AttnSpec("causal", None if right_padded else x.attention_mask)
        h = self.decode(x.embeds, x.position_ids, attn=attn, visual_residuals=visual_residuals,
                        image_index=x.image_index)
        logits = self.lm_head(h)
        out = {"logits": logits, "inputs": x}
        if x.labels is not None:
            out["loss"] = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x.labels[:, 1:].flatten(),
                                          ignore_index=IGNORE_INDEX)
        return out


# ----------------------------------------------------------------------------------------------- vision towers
class ShapesCLIPTower(nn.Module):
    """The shipped shapes CLIP's image tower: penultimate-layer patch features, CLS dropped (B, 64, 96)."""

    def __init__(self, clip, feature_layer: int = -2):
        super().__init__()
        self.clip = clip
        self.feature_layer = feature_layer
        self.hidden_size = clip.config.vision_width
        self.num_patches = (clip.config.image_size // clip.config.patch_size) ** 2

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 or float in [-1, 1] -> (B, N, C)."""
        return self.clip.image_patch_features(images, layer=self.feature_layer)

    # ----- split at a block: a frozen head (cached once) and a trainable tail (--tune-vision-blocks) -----
    def feature_blocks(self) -> list[nn.Module]:
        """The resblocks on the feature path: all up to `feature_layer` (the first 3 of 4 for -2)."""
        return self.clip.feature_blocks(self.feature_layer)

    def _check_n(self, n: int) -> None:
        if not 0 <= n <= len(self.feature_blocks()):
            raise ValueError(f"the tower's feature path has {len(self.feature_blocks())} blocks; cannot tune {n}")

    @torch.no_grad()
    def block_inputs(self, images: Tensor, n: int) -> Tensor:
        """The hidden states (CLS included) entering the last `n` feature-path blocks: (B, 1 + N, C)."""
        self._check_n(n)
        blocks = self.feature_blocks()
        x = self.clip.model.visual._embeds(self.clip._prepare(images))
        for blk in blocks[: len(blocks) - n]:
            x = blk(x)
        return x

    def tail(self, n: int) -> "TowerTail":
        """The last `n` feature-path blocks as a module (the tower's own blocks, shared, not copied):
        `tower.tail(n)(tower.block_inputs(images, n))` equals `tower(images)`."""
        self._check_n(n)
        blocks = self.feature_blocks()
        return TowerTail(blocks[len(blocks) - n:])


class TowerTail(nn.Module):
    """Blocks run on cached block inputs (B, 1 + N, C) -> patch features (B, N, C), CLS dropped. The feature path
    applies no norm after its blocks (LLaVA reads the raw penultimate hidden states), so nothing else follows."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x[:, 1:]


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP pixel statistics (LLaVA pads with the mean colour)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPTower(nn.Module):
    """A transformers `CLIPVisionModel` (ViT-L/14-336 in LLaVA-1.5): hidden_states[feature_layer], CLS dropped.
    Images: pad to square with the mean colour, resize to the tower's size, normalise by CLIP mean/std."""

    def __init__(self, vision_config: dict, feature_layer: int = -2):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.model = CLIPVisionModel(CLIPVisionConfig(**vision_config))
        self.feature_layer = feature_layer
        cfg = self.model.config
        self.image_size = cfg.image_size
        self.hidden_size = cfg.hidden_size
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 -> (B, 3, S, S) normalised float (LLaVA-1.5 'pad' aspect ratio)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W); got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        B, _, H, W = x.shape
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        if H != W:
            S = max(H, W)
            canvas = mean.expand(B, 3, S, S).clone()
            top, left = (S - H) // 2, (S - W) // 2
            canvas[:, :, top:top + H, left:left + W] = x
            x = canvas
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True)
        return (x - mean) / std

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Already preprocessed pixel values (B, 3, S, S) -> (B, N, C)."""
        p = next(self.model.parameters())
        out = self.model(pixel_values.to(p.dtype), output_hidden_states=True)
        return out.hidden_states[self.feature_layer][:, 1:]


# ----------------------------------------------------------------------------------------------- the bundle
class LlavaVLM(nn.Module):
    """Vision tower + LlavaModel + tokenizer: what chat, evaluation and training hold.

    Folder layout (shipped `weights/shapes-llava`): config.json + diffusion_pytorch_model.safetensors (the
    LlavaModel, diffusers ModelMixin), tokenizer.json (+ tokenizer_config.json), and the tower *referenced* by
    `config.vision_tower = {"kind": "shapes-clip", "path": "../shapes-clip", "feature_layer": -2}` (relative to
    the folder), never copied.

    A model trained with its tower's last blocks tuned (`tuned_vision_blocks` > 0, scripts/train_llava.py
    --tune-vision-blocks) no longer matches the shared tower, so its folder holds its own: the whole shapes CLIP in a
    `vision_tower/` subfolder, and `vision_tower = {"kind": "shapes-clip", "path": "vision_tower",
    "feature_layer": -2, "tuned_blocks": n}`."""

    TUNED_TOWER_DIR = "vision_tower"

    def __init__(self, model: LlavaModel, vision_tower: nn.Module, tokenizer=None, tower_path: str | None = None,
                 tuned_vision_blocks: int = 0):
        super().__init__()
        self.model = model
        self.vision_tower = vision_tower.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.tower_path = tower_path
        self.tuned_vision_blocks = tuned_vision_blocks

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) uint8 -> frozen tower features (B, N, C)."""
        tower = self.vision_tower
        x = tower.preprocess(images) if hasattr(tower, "preprocess") else images
        return tower(x.to(self.device))

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype = torch.float16) -> None:
        from safetensors.torch import save_file

        if any(layer.self_attn.qkv_proj is not None or layer.mlp.gate_up_proj is not None
               for layer in self.model.layers):
            raise ValueError("this model's projections are fused (fuse_projections); unfuse_projections(model) "
                             "restores the checkpoint layout before saving")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        spec = dict(self.model.config.vision_tower or {})
        spec.pop("tuned_blocks", None)
        if self.tuned_vision_blocks:
            # A tuned tower is this model's own: stored in the folder (the whole shapes CLIP, ~2 MB in float16).
            self.vision_tower.clip.save_pretrained(folder / self.TUNED_TOWER_DIR, dtype=dtype)
            spec.update(kind="shapes-clip", path=self.TUNED_TOWER_DIR, tuned_blocks=int(self.tuned_vision_blocks))
        else:
            if self.tower_path is None:
                raise ValueError("save_pretrained needs the vision tower's folder (tower_path) to reference")
            if (folder / self.TUNED_TOWER_DIR).exists():
                raise ValueError(f"{folder / self.TUNED_TOWER_DIR} exists (a tuned tower from an earlier save); this "
                                 f"model references its tower instead: save to a new folder")
            spec.update(kind="shapes-clip", path=os.path.relpath(Path(self.tower_path).resolve(), folder.resolve()))
        self.model.register_to_config(vision_tower=spec)
        self.model.save_config(folder)
        # Written here rather than by ModelMixin.save_pretrained: a tied lm_head shares the embedding's storage,
        # which safetensors refuses to write twice, so the tied copy is left out and re-tied on load.
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.model.state_dict().items()
                 if not (k == "lm_head.weight" and self.model.config.tie_word_embeddings)}
        save_file(state, folder / WEIGHTS_NAME)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> "LlavaVLM":
        from shapes.clip import ShapesCLIP

        from .vlm_tokenizer import VLMTokenizer

        folder = Path(folder)
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{folder} is not a LLaVA model folder: config.json is missing")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("_class_name") != "LlavaModel":
            raise ValueError(f"{cfg_path} describes {cfg.get('_class_name')!r}, not a LlavaModel")
        spec = cfg.get("vision_tower") or {}
        if spec.get("kind") != "shapes-clip":
            raise ValueError(f"{cfg_path}: vision tower {spec!r} is not a referenced shapes CLIP; load real LLaVA "
                             f"checkpoints with vlm.llava_loaders.load_llava")
        tower_dir = (folder / spec["path"]).resolve()
        tuned = int(spec.get("tuned_blocks", 0))
        own = folder / cls.TUNED_TOWER_DIR
        if tuned and tower_dir != own.resolve():
            raise ValueError(f"{cfg_path}: vision_tower.tuned_blocks={tuned} but its path {spec['path']!r} is not the "
                             f"folder's own tuned tower {cls.TUNED_TOWER_DIR!r}")
        if tuned and not (own / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is inconsistent: its config says the vision tower was tuned "
                                    f"(tuned_blocks={tuned}), but the tuned tower {own} is missing")
        if not tuned and own.exists():
            raise ValueError(f"{folder} is inconsistent: it holds a tuned tower ({own}) but its config references "
                             f"{spec['path']!r} without tuned_blocks")
        model = LlavaModel.from_config(LlavaModel.load_config(folder))
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing")
        from safetensors.torch import load_file

        state = load_file(weights)
        own = model.state_dict()
        tied = ("lm_head.weight",) if model.config.tie_word_embeddings else ()
        missing = [k for k in own if k not in state and k not in tied]
        unexpected = [k for k in state if k not in own or k in tied]
        if missing or unexpected:
            raise ValueError(f"{weights} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.load_state_dict(state, strict=False)  # a tied lm_head reads the loaded embedding
        model = model.to(device=device, dtype=dtype).eval()
        tower = ShapesCLIPTower(ShapesCLIP.from_pretrained(tower_dir, device=device, dtype=dtype),
                                spec.get("feature_layer", -2))
        if tuned:
            tower._check_n(tuned)
        tok = VLMTokenizer.from_folder(folder, image_token_id=model.config.image_token_id)
        return cls(model, tower, tok, str(tower_dir), tuned_vision_blocks=tuned).eval()


# ----------------------------------------------------------------------------------------------- sizes
CLIP_VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                      projection_dim=768)

LLAVA_SIZES: dict[str, dict] = {
    # Vicuna-7B v1.5 (Llama-2 7B) + CLIP ViT-L/14-336, the original checkpoint's layout (vocab 32000).
    "LLaVA-7B": dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, intermediate_size=11008, rms_norm_eps=1e-5, rope_theta=10000.0,
                     max_position_embeddings=4096, mm_hidden_size=1024, image_token_id=-200,
                     vision_tower={"kind": "clip", "config": CLIP_VIT_L_336, "feature_layer": -2}),
    "LLaVA-13B": dict(vocab_size=32000, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, intermediate_size=13824, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=4096, mm_hidden_size=1024, image_token_id=-200,
                      vision_tower={"kind": "clip", "config": CLIP_VIT_L_336, "feature_layer": -2}),
    # The shipped shapes model: the shapes CLIP tower (96 wide, 64 patches) and a small GQA decoder.
    "shapes-llava": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=352, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
                         tie_word_embeddings=True, mm_hidden_size=96,
                         vision_tower={"kind": "shapes-clip", "path": "../shapes-clip", "feature_layer": -2}),
    # A wider, deeper decoder for the same tower (~2 M parameters, ~4 MB in float16: still under the 5 MB budget).
    "shapes-llava-m": dict(hidden_size=192, num_hidden_layers=5, num_attention_heads=6, num_key_value_heads=2,
                           intermediate_size=512, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
                           tie_word_embeddings=True, mm_hidden_size=96,
                           vision_tower={"kind": "shapes-clip", "path": "../shapes-clip", "feature_layer": -2}),
    # Tests: the smallest decoder that still has GQA and more than one layer.
    "shapes-llava-tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                              max_position_embeddings=256, tie_word_embeddings=False, mm_hidden_size=96,
                              vision_tower={"kind": "shapes-clip", "path": "../shapes-clip", "feature_layer": -2}),
}


def from_name(name: str, **overrides) -> LlavaModel:
    """A LlavaModel of a named size (random weights); `overrides` set e.g. vocab_size / token ids."""
    if name not in LLAVA_SIZES:
        raise ValueError(f"unknown LLaVA size {name!r}; valid: {', '.join(LLAVA_SIZES)}")
    return LlavaModel(**{**LLAVA_SIZES[name], **overrides})


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def prefill_flops_per_token(cfg) -> float:
    """Matmul FLOPs per token of the decoder (2 per MAC), without attention scores: 2·(q,k,v,o + 3 MLP)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    kv = (cfg.num_key_value_heads or cfg.num_attention_heads) * (d // cfg.num_attention_heads)
    return 2 * cfg.num_hidden_layers * (2 * d * d + 2 * d * kv + 3 * d * f) + 2 * d * cfg.vocab_size


__all__ = ["AttnSpec", "CLIPTower", "IGNORE_INDEX", "LLAVA_SIZES", "LlavaModel", "LlavaVLM", "MultimodalInputs",
           "ShapesCLIPTower", "TowerTail", "from_name", "fuse_projections", "num_params", "positions_from_mask",
           "unfuse_projections"]
