"""Multi-scale residual VQ tokenizer of VAR (Tian et al., "Visual Autoregressive Modeling", 2024).

Reads top to bottom: the convolutional pieces (LDM VQ-f16 style ResNet blocks, one-head conv attention, down/up
sampling), the encoder and decoder, the refinement convolutions φ and their sharing rule, the residual quantizer,
the model, and the named sizes. Module and parameter names follow FoundationVision/VAR `models/vqvae.py`,
`basic_vae.py`, `quant.py`, so the released `vae_ch160v4096z32.pth` loads strictly (vlm/var_loaders.py).

Shapes: B batch, Cv = z_channels (token feature width), H/W latent side (= patch_nums[-1]), V vocab size,
K scales, pn_k the side of scale k, l_k = pn_k², L = Σ l_k.

Paper symbols → code:
- f = quant_conv(encoder(x)): the continuous latent (B, Cv, H, W)
- r_k (tokens of scale k): `indices[k]` (B, l_k), argmin_v ‖area_down(rest, pn_k) − e_v‖²
- φ_k: `quantize.quant_resi.qresi_ls[phi_indices[k]]`, φ(h) = (1 − ρ) h + ρ conv3×3(h), ρ = 0.5
- f̂ = Σ_k φ_k(bicubic_up(e[r_k], H)): `indices_to_fhat`; the image is decoder(post_quant_conv(f̂))
- teacher-forcing input of scale k+1: area_down(Σ_{i≤k} φ_i(up(e[r_i])), pn_{k+1}): `teacher_forcing_input`
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from attention import attention

# GroupNorm epsilon of the LDM autoencoder the official tokenizer copies.
GROUPNORM_EPS = 1e-6
# Default commitment weight β of the VQ loss (the paper's 0.25).
COMMITMENT_BETA = 0.25


# ----------------------------------------------------------------------------------------------- conv pieces
def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels, eps=GROUPNORM_EPS)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 projection only where the width changes: the official state dict has nin_shortcut keys there only.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x_BCHW: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x_BCHW)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x_BCHW) + h


class AttnBlock(nn.Module):
    """One-head self-attention over the pixels of a feature map, q/k/v from one 1x1 conv (official layout)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        B, C, H, W = x_BCHW.shape
        qkv = self.qkv(self.norm(x_BCHW)).reshape(B, 3, C, H * W).transpose(2, 3)  # (B, 3, HW, C)
        q, k, v = (t.unsqueeze(1).contiguous() for t in qkv.unbind(1))  # each (B, 1, HW, C): one head of width C
        h = attention(q, k, v, pattern="dense")  # scale 1/sqrt(C), as the official w_ratio
        return x_BCHW + self.proj_out(h[:, 0].transpose(1, 2).reshape(B, C, H, W))


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric pad (right/bottom only), so a stride-2 3x3 conv maps 2n pixels to exactly n (LDM's choice).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    m = nn.Module()
    m.block = nn.ModuleList(blocks)
    m.attn = nn.ModuleList(attns)
    return m


def _mid(channels: int, groups: int, using_mid_sa: bool) -> nn.Module:
    m = nn.Module()
    m.block_1 = ResnetBlock(channels, channels, groups)
    m.attn_1 = AttnBlock(channels, groups) if using_mid_sa else nn.Identity()
    m.block_2 = ResnetBlock(channels, channels, groups)
    return m


class Encoder(nn.Module):
    """x (B, 3, S, S) -> (B, z, S / 2^(levels-1), S / 2^(levels-1)); attention at the lowest level and the middle."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, in_channels: int,
                 groups: int, using_sa: bool, using_mid_sa: bool):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = ch
        for i, mult in enumerate(ch_mult):
            last = i == len(ch_mult) - 1
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c_in, ch * mult, groups))
                c_in = ch * mult
                if last and using_sa:
                    attns.append(AttnBlock(c_in, groups))
            level = _level(blocks, attns)
            if not last:
                level.downsample = Downsample2x(c_in)
            self.down.append(level)
        self.mid = _mid(c_in, groups, using_mid_sa)
        self.norm_out = _norm(c_in, groups)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, padding=1)

    def forward(self, x_B3HW: Tensor) -> Tensor:
        h = self.conv_in(x_B3HW)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z, h, w) -> (B, 3, h·2^(levels-1), ...); one more ResNet block per level than the encoder (LDM)."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, out_channels: int,
                 groups: int, using_sa: bool, using_mid_sa: bool):
        super().__init__()
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = _mid(c_in, groups, using_mid_sa)
        levels = []
        for i in reversed(range(len(ch_mult))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, ch * ch_mult[i], groups))
                c_in = ch * ch_mult[i]
                if i == len(ch_mult) - 1 and using_sa:
                    attns.append(AttnBlock(c_in, groups))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample2x(c_in)
            levels.insert(0, level)  # up[0] is the full-resolution level, as in the official state dict
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in, groups)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    def forward(self, z_BCHW: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z_BCHW))))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------- φ and sharing
class Phi(nn.Conv2d):
    """φ(h) = (1 − ρ)·h + ρ·conv3×3(h): the refinement applied to each scale's upsampled code map."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = ratio

    def forward(self, h_BCHW: Tensor) -> Tensor:
        return h_BCHW * (1 - self.ratio) + super().forward(h_BCHW) * self.ratio


def phi_indices(num_scales: int, num_phi: int) -> list[int]:
    """Which of the `num_phi` shared φ convolutions serves each of `num_scales` scales.

    The official rule (FoundationVision/VAR `quant.py`): scale k sits at k / (K − 1) in [0, 1] and takes the φ
    whose tick is nearest, the ticks being linspace(1/(3n), 1 − 1/(3n), n) for n = 4, else linspace(1/(2n),
    1 − 1/(2n), n). At K = 10 scale 2 is an exact tie in real numbers (5/36 either side); float64 rounding sends it
    to φ_1, and the released weights were trained with that, so the computation is kept in float64 as numpy does
    it: [0, 0, 1, 1, 1, 2, 2, 3, 3, 3] (tests/test_var.py pins this list)."""
    if num_scales < 2 or num_phi < 1:
        raise ValueError(f"need at least 2 scales and 1 φ, got {num_scales} scales and {num_phi} φ")
    n = num_phi
    lo = 1 / 3 / n if n == 4 else 1 / 2 / n
    ticks = np.linspace(lo, 1 - lo, n)
    return [int(np.argmin(np.abs(ticks - k / (num_scales - 1)))) for k in range(num_scales)]


class PhiPartiallyShared(nn.Module):
    """n φ convolutions shared by all scales (official `share_quant_resi` = n; state-dict key `qresi_ls.i`)."""

    def __init__(self, channels: int, num_phi: int, ratio: float):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, ratio) for _ in range(num_phi))


# ----------------------------------------------------------------------------------------------- quantizer
class MultiScaleQuantizer(nn.Module):
    """One codebook for every scale, residual quantization from the coarsest scale to the finest."""

    def __init__(self, vocab_size: int, z_channels: int, patch_nums: Sequence[int], beta: float,
                 quant_resi: float, share_quant_resi: int):
        super().__init__()
        self.patch_nums = tuple(patch_nums)
        self.beta = beta
        self.embedding = nn.Embedding(vocab_size, z_channels)
        self.quant_resi = PhiPartiallyShared(z_channels, share_quant_resi, quant_resi)
        self.phi_of_scale = phi_indices(len(self.patch_nums), share_quant_resi)
        # Per scale, an EMA of how often each code is hit in training (the official buffer); small scales tend to
        # collapse onto a few codes, and this is how one sees it.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.hit_updates = 0  # how many training batches fed the EMA (its warm-up: copy, then 0.9, then 0.99)

    def phi(self, k: int) -> Phi:
        return self.quant_resi.qresi_ls[self.phi_of_scale[k]]

    def nearest(self, z_NC: Tensor) -> Tensor:
        """Index of the nearest code (L2) for each row of z (N, Cv)."""
        e_VC = self.embedding.weight.to(z_NC.dtype)
        d_NV = z_NC.square().sum(1, keepdim=True) + e_VC.square().sum(1) - 2 * z_NC @ e_VC.t()
        return d_NV.argmin(1)

    def upsampled_phi(self, k: int, h_BChw: Tensor, side: int) -> Tensor:
        """φ_k(bicubic_up(h, side)); the last scale is already at full size and is not interpolated."""
        if k != len(self.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(side, side), mode="bicubic")
        return self.phi(k)(h_BChw)

    def codes(self, idx_Bl: Tensor, pn: int) -> Tensor:
        """Code ids (B, l) -> their map (B, Cv, pn, pn); soft codes (B, l, Cv) are taken as the vectors themselves."""
        emb = self.embedding(idx_Bl) if idx_Bl.dtype == torch.long else idx_Bl
        # contiguous: the transposed view has channels-last strides, and on the H100 that sent the bicubic upsampling
        # and φ's fp32 convolution to slow NHWC kernels (~6 ms per φ call at batch 64, call4_speed_others.log).
        return emb.transpose(1, 2).reshape(emb.shape[0], -1, pn, pn).contiguous()

    def quantize(self, f_BChw: Tensor) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """Residual quantization of f: (per-scale indices (B, l_k), f̂, per-scale f̂ after each scale)."""
        B, C, H, W = f_BChw.shape
        if (H, W) != (self.patch_nums[-1],) * 2:
            raise ValueError(f"latent is {H}x{W}, but patch_nums end at {self.patch_nums[-1]}")
        # Nearest-code search in at least float32 (as the release does under autocast).
        rest = f_BChw.detach().to(torch.promote_types(f_BChw.dtype, torch.float32)).clone()
        f_hat = torch.zeros_like(rest)
        indices, partial = [], []
        K = len(self.patch_nums)
        for k, pn in enumerate(self.patch_nums):
            z = F.interpolate(rest, size=(pn, pn), mode="area") if k != K - 1 else rest
            idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn * pn)
            h = self.upsampled_phi(k, self.codes(idx, pn), H)
            f_hat = f_hat + h
            rest = rest - h
            indices.append(idx)
            partial.append(f_hat)
        return indices, f_hat, partial

    def record_hits(self, indices: list[Tensor]) -> None:
        V = self.embedding.num_embeddings
        for k, idx in enumerate(indices):
            hit_V = idx.flatten().bincount(minlength=V).float()
            if self.hit_updates == 0:
                self.ema_vocab_hit_SV[k].copy_(hit_V)
            elif self.hit_updates < 100:
                self.ema_vocab_hit_SV[k].mul_(0.9).add_(hit_V, alpha=0.1)
            else:
                self.ema_vocab_hit_SV[k].mul_(0.99).add_(hit_V, alpha=0.01)
        self.hit_updates += 1

    @property
    def seeded(self) -> bool:
        """Whether training has touched the codebook yet (read from the saved hit counts, so it survives resume)."""
        return bool(self.ema_vocab_hit_SV.sum() > 0)

    @torch.no_grad()
    def refresh_codes(self, z_NC: Tensor, min_hits: float = 0.03) -> int:
        """Training aid against codebook collapse (SoundStream / Jukebox practice; the release's training code is
        unpublished): on the first batch the codebook is drawn from the batch's residual vectors (so codes start
        where the encoder's features are, not at N(0, 1)), and afterwards every code whose EMA hit count summed over
        scales is below `min_hits` is moved onto a random residual vector of the current batch. Returns how many
        codes moved."""
        V = self.embedding.num_embeddings
        if not self.seeded:
            dead = torch.ones(V, dtype=torch.bool, device=z_NC.device)
        else:
            dead = self.ema_vocab_hit_SV.sum(0) < min_hits
        n = int(dead.sum())
        if n:
            pick = torch.randint(0, z_NC.shape[0], (n,), device=z_NC.device)
            self.embedding.weight.data[dead] = z_NC[pick].to(self.embedding.weight.dtype)
        return n

    def vocab_usage(self, tokens_per_batch: int | None = None) -> list[float]:
        """Per scale, the share (%) of codes whose EMA hit count is above 8% of a uniform share of the tokens."""
        V = self.embedding.num_embeddings
        out = []
        for k, pn in enumerate(self.patch_nums):
            hits = self.ema_vocab_hit_SV[k]
            margin = (tokens_per_batch or hits.sum().item()) / V * 0.08
            out.append(float((hits >= margin).float().mean() * 100) if hits.sum() > 0 else 0.0)
        return out


# ----------------------------------------------------------------------------------------------- the model
class MultiScaleVQVAE(ModelMixin, ConfigMixin):
    """VAR's tokenizer: image (B, 3, S, S) in [-1, 1] <-> per-scale token maps over `patch_nums`.

    tokens = vq.encode_indices(x)        # list of K LongTensors (B, pn_k²)
    x_hat = vq.decode_indices(tokens)    # (B, 3, S, S) in [-1, 1]
    rec, vq_loss, indices = vq(x)        # training: straight-through reconstruction and the VQ loss
    """

    @register_to_config
    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2, norm_groups: int = 32,
                 using_sa: bool = True, using_mid_sa: bool = True, in_channels: int = 3,
                 beta: float = COMMITMENT_BETA, quant_resi: float = 0.5, share_quant_resi: int = 4,
                 quant_conv_ks: int = 3, refresh_dead_codes: bool = True,
                 patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                 sample_size: int = 256):
        super().__init__()
        patch_nums = tuple(int(p) for p in patch_nums)
        if list(patch_nums) != sorted(set(patch_nums)) or patch_nums[0] < 1:
            raise ValueError(f"patch_nums must be strictly increasing positive ints, got {patch_nums}")
        factor = 2 ** (len(ch_mult) - 1)
        if sample_size % factor or sample_size // factor != patch_nums[-1]:
            raise ValueError(f"sample_size {sample_size} / downsampling {factor} must equal the last patch_num "
                             f"{patch_nums[-1]}")
        conv = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
                    groups=norm_groups, using_sa=using_sa, using_mid_sa=using_mid_sa)
        self.encoder = Encoder(in_channels=in_channels, **conv)
        self.decoder = Decoder(out_channels=in_channels, **conv)
        self.quantize = MultiScaleQuantizer(vocab_size, z_channels, patch_nums, beta, quant_resi, share_quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=quant_conv_ks // 2)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.quantize.patch_nums

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def _check_images(self, x: Tensor) -> None:
        S = self.config.sample_size
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[2:] != (S, S):
            raise ValueError(f"images must be (B, {self.config.in_channels}, {S}, {S}) floats in [-1, 1]; "
                             f"got {tuple(x.shape)}")

    def _check_indices(self, indices: Sequence[Tensor]) -> None:
        if len(indices) != len(self.patch_nums):
            raise ValueError(f"expected {len(self.patch_nums)} scales of tokens, got {len(indices)}")
        for k, (idx, pn) in enumerate(zip(indices, self.patch_nums)):
            if idx.ndim != 2 or idx.shape[1] != pn * pn:
                raise ValueError(f"scale {k}: tokens must be (B, {pn * pn}), got {tuple(idx.shape)}")

    # --- encode / decode
    def features(self, x_B3HW: Tensor) -> Tensor:
        self._check_images(x_B3HW)
        return self.quant_conv(self.encoder(x_B3HW))  # f: (B, Cv, H, W)

    @torch.no_grad()
    def encode_indices(self, x_B3HW: Tensor) -> list[Tensor]:
        return self.quantize.quantize(self.features(x_B3HW))[0]

    def fhat_to_img(self, f_hat_BChw: Tensor, batch_chunk: int | None = None) -> Tensor:
        """Images in [-1, 1] from f̂, float32. The decoder runs in its own dtype and memory format (see
        `fast_decoder`) and, with `batch_chunk`, on that many images at a time: at 256 px its activations are
        160 channels at full resolution (2.7 GB per tensor for 64 images in float32), so chunks bound the peak."""
        w = self.post_quant_conv.weight
        chunks = f_hat_BChw.split(batch_chunk) if batch_chunk else (f_hat_BChw,)
        out = [self.decoder(self.post_quant_conv(c.to(w.dtype))).clamp(-1, 1) for c in chunks]
        return (out[0] if len(out) == 1 else torch.cat(out)).float()

    def fast_decoder(self, dtype: torch.dtype = torch.bfloat16, channels_last: bool = False,
                     compile: bool = False) -> "MultiScaleVQVAE":
        """Run the image decoder (post_quant_conv + decoder) in `dtype`, in place; the quantizer (codebook, φ) keeps
        its precision, so the tokens and f̂ do not change, only the pixels (by bf16 rounding; bench/var_speed.py
        reports by how much). Measured on the H100 (64 images at 256 px): float32 233 ms, bf16 159 ms, bf16
        channels-last 246 ms (GroupNorm and upsampling leave cuDNN's layout), hence channels_last off by default.
        `compile`: torch.compile the decoder (GroupNorm + SiLU + residual fused around cuDNN's convolutions;
        state-dict keys unchanged)."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for m in (self.post_quant_conv, self.decoder):
            m.to(dtype=dtype, memory_format=fmt)
        if compile:
            self.decoder.compile(dynamic=False)
        return self

    def indices_to_fhat(self, indices: Sequence[Tensor], upto: int | None = None) -> Tensor:
        """f̂ from the first `upto` scales (all by default): Σ_k φ_k(up(e[r_k]))."""
        self._check_indices(indices)
        q, H = self.quantize, self.patch_nums[-1]
        f_hat = 0
        for k, (idx, pn) in enumerate(list(zip(indices, self.patch_nums))[:upto]):
            f_hat = f_hat + q.upsampled_phi(k, q.codes(idx, pn), H)
        return f_hat

    @torch.no_grad()
    def decode_indices(self, indices: Sequence[Tensor], upto: int | None = None) -> Tensor:
        return self.fhat_to_img(self.indices_to_fhat(indices, upto))

    # --- what the transformer reads
    def teacher_forcing_input(self, indices: Sequence[Tensor]) -> Tensor:
        """(B, L − l_0, Cv): for each scale k ≥ 1, f̂ of scales < k area-downsampled to pn_k, flattened row-major."""
        self._check_indices(indices)
        q, H = self.quantize, self.patch_nums[-1]
        f_hat = torch.zeros(indices[0].shape[0], self.config.z_channels, H, H, device=indices[0].device,
                            dtype=q.embedding.weight.dtype)
        out = []
        for k in range(len(self.patch_nums) - 1):
            f_hat = f_hat + q.upsampled_phi(k, q.codes(indices[k], self.patch_nums[k]), H)
            out.append(self.next_scale_map(f_hat, k + 1).flatten(2).transpose(1, 2))
        return torch.cat(out, 1)

    def next_scale_map(self, f_hat_BChw: Tensor, k: int) -> Tensor:
        """The input map of scale k: f̂ so far, area-downsampled to pn_k (B, Cv, pn_k, pn_k)."""
        pn = self.patch_nums[k]
        return F.interpolate(f_hat_BChw, size=(pn, pn), mode="area")

    def add_scale(self, f_hat_BChw: Tensor, k: int, idx_Bl: Tensor) -> Tensor:
        """f̂ + φ_k(up(e[r_k])): one sampling step's update (also takes soft codes (B, l, Cv) in place of ids)."""
        q, pn = self.quantize, self.patch_nums[k]
        h = q.codes(idx_Bl, pn)
        return f_hat_BChw + q.upsampled_phi(k, h.to(f_hat_BChw.dtype), self.patch_nums[-1])

    # --- training
    def forward(self, x_B3HW: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Straight-through round trip: (reconstruction, VQ loss, per-scale indices).

        VQ loss = mean over scales k of β‖sg(f̂_k) − f‖² + ‖f̂_k − sg(f)‖², f̂_k the partial sum after scale k
        (codebook and φ learn from the second term, the encoder from the first); the decoder reads
        f + sg(f̂ − f), so reconstruction gradients reach the encoder unchanged."""
        f = self.features(x_B3HW)
        f = f.to(torch.promote_types(f.dtype, torch.float32))
        q = self.quantize
        B, C, H, W = f.shape
        rest = f.detach().clone()
        f_hat = torch.zeros_like(rest)
        indices, residuals, vq_loss = [], [], 0.0
        K = len(self.patch_nums)
        if self.training and not q.seeded and self.config.refresh_dead_codes:
            # Seed the codebook with this batch's features before the first assignment (see refresh_codes).
            q.refresh_codes(rest.permute(0, 2, 3, 1).reshape(-1, C))
        for k, pn in enumerate(self.patch_nums):
            z = F.interpolate(rest, size=(pn, pn), mode="area") if k != K - 1 else rest
            with torch.no_grad():
                z_NC = z.permute(0, 2, 3, 1).reshape(-1, C)
                idx = q.nearest(z_NC).view(B, pn * pn)
                residuals.append(z_NC)
            h = q.upsampled_phi(k, q.codes(idx, pn), H)
            f_hat = f_hat + h
            rest = rest - h.detach()
            vq_loss = vq_loss + q.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
            indices.append(idx)
        if self.training:
            q.record_hits(indices)
            if self.config.refresh_dead_codes:
                q.refresh_codes(torch.cat(residuals))
        f_st = f + (f_hat - f).detach()
        return self.decoder(self.post_quant_conv(f_st)), vq_loss / K, indices

    @classmethod
    def from_name(cls, name: str, **overrides) -> "MultiScaleVQVAE":
        if name not in VQVAE_CONFIGS:
            raise ValueError(f"unknown VQVAE size {name!r}; valid: {', '.join(VQVAE_CONFIGS)}")
        return cls(**{**VQVAE_CONFIGS[name], **overrides})


# ----------------------------------------------------------------------------------------------- sizes
IMAGENET_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
# The shapes world at 64 px: f8 (three downsamplings) gives an 8x8 latent, 6 scales, L = 130 tokens.
SHAPES_PATCH_NUMS = (1, 2, 3, 4, 6, 8)

VQVAE_CONFIGS: dict[str, dict] = {
    # The released tokenizer `vae_ch160v4096z32.pth` (108.9 M parameters).
    "vqvae-ch160v4096z32": dict(ch=160, ch_mult=(1, 1, 2, 2, 4), vocab_size=4096, z_channels=32,
                                patch_nums=IMAGENET_PATCH_NUMS, sample_size=256),
    # Shapes world: 64 px -> 8x8 latent; 1.06 M parameters (2.1 MB in fp16). Attention only in the middle: at 8x8 the
    # lowest level's attention blocks cost CPU training time (they are the LDM default, kept for the release).
    "vqvae-shapes-f8": dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8, vocab_size=512,
                            z_channels=16, using_sa=False, patch_nums=SHAPES_PATCH_NUMS, sample_size=64),
    # For tests: two levels, 16 px -> 8x8.
    "vqvae-tiny": dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, vocab_size=64, z_channels=8,
                       patch_nums=(1, 2, 4, 8), sample_size=16),
}
