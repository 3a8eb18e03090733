"""The tiny shapes VAE: diffusers' `AutoencoderKL` with a small config (64 px RGB → 16×16×4 latents), and its
evaluation (PSNR on held-out scenes, analyser agreement on the reconstructions).

The latent scaling factor (0.18215 for Stable Diffusion's VAE) is measured after training as 1 / std of the
latents on shapes scenes and stored in the config, so diffusion models see unit-variance latents.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL

from .data import eval_set
from .metrics import analyser_agreement, psnr
from .render import render, to_float, to_uint8
from .scene import sample_scenes


def tiny_vae_config(sample_size: int = 64) -> dict:
    """Three resolution levels (two downsamplings: 64 → 16), one ResNet per level."""
    return dict(in_channels=3, out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                sample_size=sample_size, scaling_factor=1.0)


def build_tiny_vae(sample_size: int = 64) -> AutoencoderKL:
    return AutoencoderKL(**tiny_vae_config(sample_size))


def training_images(n: int, size: int = 64, seed: int = 0, device=None) -> torch.Tensor:
    """A batch of 1-3 object scenes as float (n, 3, size, size) in [-1, 1], rendered on `device`."""
    return to_float(render(sample_scenes(np.random.default_rng(seed), n), size, device))


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Encode to the latent mean and decode: (B, 3, H, W) uint8 in, uint8 out (the deterministic round trip)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) uint8; got {tuple(images.shape)} {images.dtype}")
    outs = []
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size].to(vae.device)).to(vae.dtype)
        z = vae.encode(x).latent_dist.mode()
        outs.append(to_uint8(vae.decode(z).sample.float()).cpu())
    return torch.cat(outs)


@torch.no_grad()
def evaluate_vae(vae: AutoencoderKL, n: int = 500, seed: int = 0, size: int = 64) -> dict:
    """PSNR (dB, over the whole held-out set) of the round trip, and the share of reconstructions the analyser
    reads exactly as the ground-truth scene (every attribute of every object)."""
    ref = eval_set("caption", n, seed, size=size)
    rec = reconstruct(vae, ref["image"])
    agreement = analyser_agreement(rec, ref["scenes"])["accuracy"]
    return {"psnr_db": psnr(rec, ref["image"], data_range=255.0), "analyser_agreement": agreement,
            "analyser_agreement_reference": analyser_agreement(ref["image"], ref["scenes"])["accuracy"], "n": n}
