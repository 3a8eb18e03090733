"""Text -> image (PixArt-style `PixArtDiT`) and text -> video (`LatteDiT`) sampling: thin diffusers pipelines
(encode the prompts once, then a loop of model, guidance, `scheduler.step`, then a VAE decode).

Follows `dit/pipelines.py` (`ClassToImagePipeline`) and reuses its pieces: the sampler registry (`SAMPLERS`,
`make_scheduler`), the output types, the learned-variance rule, the `randn_tensor` noise draw, the VAE decode with
`scaling_factor` / `shift_factor`, and `callback(step, t, latents)` after every scheduler step with no host sync
in the loop. What is text-specific, following diffusers' `PixArtAlphaPipeline`:
- classifier-free guidance is batched: one forward over [cond; uncond], where uncond is the encoded
  `negative_prompt` (default the empty prompt ""), each half with its own text padding mask, which is passed to
  the transformer as `encoder_attention_mask` (True = keep);
- with learn_sigma the model's variance channels are split off (as PixArt's pipeline does), unless the scheduler's
  `variance_type` consumes them ("learned"/"learned_range"), and then only the conditional half's are kept;
- prompts and negative prompts are encoded in one call to the text encoder, so both come back with the same
  number of tokens L whatever the encoder's padding rule.

The text encoder is anything with `encode_text_tokens(list[str]) -> (tokens (B, L, E), keep mask (B, L))`
(`TextEncoder`; the shipped one is `shapes.clip.ShapesCLIP`, E = 96). Prompts longer than the encoder's context are
truncated BY THE ENCODER (ShapesCLIP: 32 tokens, [EOT] kept in the last slot); the pipeline does not cut tokens. If
the encoder's L exceeds the transformer's `max_text_tokens`, the call raises a ValueError naming both numbers.

Video: the LatteDiT denoises (B, C, F, S, S) latents; the VAE decodes each of the B·F frames as an image. Outputs:
"pil" a list (per sample) of F PIL frames, "np" (B, F, H, W, 3), "pt" (B, F, 3, H, W), both in [0, 1], "latent" the
(B, C, F, S, S) latents.

Folder format (`save_pretrained` / `from_pretrained`), diffusers' layout with the big shared components referenced
instead of copied, so that every shipped text model shares `weights/shapes-vae` and `weights/shapes-clip`:

    <folder>/
      model_index.json            {"_class_name": "TextToImagePipeline" | "TextToVideoPipeline",
                                   "_diffusers_version": ...,
                                   "transformer": ["dit.pixart", "PixArtDiT"] | ["dit.latte", "LatteDiT"],
                                   "scheduler": ["diffusers", "<SchedulerClass>"],
                                   "vae": ["diffusers", "AutoencoderKL"],
                                   "text_encoder": ["shapes.clip", "ShapesCLIP"],
                                   "component_folders": {"transformer": "transformer", "scheduler": "scheduler",
                                                         "vae": "../shapes-vae", "text_encoder": "../shapes-clip"}}
      transformer/                config.json + diffusion_pytorch_model.safetensors (ModelMixin.save_pretrained);
                                  a video model saved over its image model instead holds config.json,
                                  weights_over_image_model.safetensors and image_model.json (dit/latte.py)
      scheduler/                  scheduler_config.json

`component_folders` entries are paths; a relative one is resolved against <folder> (so `weights/` can move as a
whole). The VAE and text-encoder folders are never written by `save_pretrained`: it records the folders the
pipeline was loaded from, or the ones passed as `vae_folder=` / `text_encoder_folder=`, and raises if it knows none.
Only the classes in `TEXT_ENCODERS` and diffusers' schedulers are loadable (no import by name from the file).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import PIL.Image
import diffusers
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from shapes.clip import ShapesCLIP

from .latte import LatteDiT
from .pipelines import (MODEL_INDEX, OUTPUT_TYPES, SAMPLERS, StepCallback, decode_latents, denoise,
                        make_scheduler)
from .pixart import PixArtDiT

__all__ = [
    "SAMPLERS",
    "TEXT_ENCODERS",
    "TextEncoder",
    "TextToImageOutput",
    "TextToImagePipeline",
    "TextToVideoOutput",
    "TextToVideoPipeline",
    "decode_latents",
]

# Text encoders a saved folder may name (model_index.json "text_encoder": [library, class]); each has
# `from_pretrained(folder)` and `encode_text_tokens`.
TEXT_ENCODERS = {"ShapesCLIP": ShapesCLIP}
# Component sub-folders written by save_pretrained.
TRANSFORMER_FOLDER, SCHEDULER_FOLDER = "transformer", "scheduler"
# Referenced (never copied) components.
REFERENCED = ("vae", "text_encoder")


@runtime_checkable
class TextEncoder(Protocol):
    def encode_text_tokens(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """-> per-token features (B, L, E) and keep mask (B, L), True/1 = real token."""
        ...


# ----------------------------------------------------------------------------------------------- helpers
def _is_count(value, minimum: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= minimum


def check_prompts(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    """-> (prompts, negative prompts of the same length); ValueError on anything but strings."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompt must be a string or a list of strings; got {type(prompt).__name__}")
    if not prompts:
        raise ValueError("prompt is an empty list: give at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"every prompt must be a string; got {bad!r}")
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
    if not isinstance(negatives, (list, tuple)) or len(negatives) != len(prompts) \
            or not all(isinstance(p, str) for p in negatives):
        raise ValueError(
            f"negative_prompt must be a string or a list of {len(prompts)} strings (one per prompt); "
            f"got {negative_prompt!r}"
        )
    return list(prompts), list(negatives)


def check_sampling(num_inference_steps, guidance_scale, output_type, num_images_per_prompt) -> None:
    if not _is_count(num_inference_steps, 1):
        raise ValueError(f"num_inference_steps must be an integer >= 1; got {num_inference_steps!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0; got {guidance_scale!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; valid: {', '.join(OUTPUT_TYPES)}")
    if not _is_count(num_images_per_prompt, 1):
        raise ValueError(f"num_images_per_prompt must be an integer >= 1; got {num_images_per_prompt!r}")


def _relative_reference(target: str | Path, folder: Path) -> str:
    """A path to `target` as stored in model_index.json: relative to `folder` where possible."""
    target = Path(target).resolve()
    try:
        return Path(os.path.relpath(target, folder.resolve())).as_posix()
    except ValueError:  # another drive (Windows): keep it absolute
        return target.as_posix()


# ----------------------------------------------------------------------------------------------- outputs
@dataclass
class TextToImageOutput(BaseOutput):
    """images: PIL list, (B, H, W, 3) array or (B, 3, H, W) tensor in [0, 1], or the latents for output_type
    "latent"; latents: the final (B, C, S, S) latents (always returned). B = prompts x num_images_per_prompt,
    prompt-major."""

    images: list[PIL.Image.Image] | np.ndarray | Tensor
    latents: Tensor


@dataclass
class TextToVideoOutput(BaseOutput):
    """frames: per sample a list of F PIL images, (B, F, H, W, 3) array or (B, F, 3, H, W) tensor in [0, 1], or the
    latents for output_type "latent"; latents: the final (B, C, F, S, S) latents (always returned)."""

    frames: list[list[PIL.Image.Image]] | np.ndarray | Tensor
    latents: Tensor


# ----------------------------------------------------------------------------------------------- pipelines
class _TextPipeline(DiffusionPipeline):
    """Shared by the image and video pipelines: components, loading/saving, checks, prompt encoding and the
    denoising loop. Subclasses give the transformer class, the latent shape and the decode."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    transformer_class: type = PixArtDiT
    output_class: type = TextToImageOutput

    def __init__(self, transformer, vae: AutoencoderKL, scheduler, text_encoder: TextEncoder):
        super().__init__()
        # None: the caller passes prompt embeddings (e.g. from its own T5, as PixArt-α / Latte checkpoints need).
        if text_encoder is not None and not isinstance(text_encoder, TextEncoder):
            raise ValueError(f"text_encoder {type(text_encoder).__name__} has no encode_text_tokens(texts)")
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder)
        self.image_processor = VaeImageProcessor()
        # Where the referenced components live on disk (set by from_pretrained), for save_pretrained.
        self.component_folders: dict[str, Path] = {}

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, folder: str | Path, sampler: str | None = None, torch_dtype: torch.dtype | None = None):
        """Load a folder written by `save_pretrained` (layout in the module docstring); `sampler` swaps the saved
        scheduler for another built from its config."""
        folder = Path(folder)
        index_path = folder / MODEL_INDEX
        if not index_path.is_file():
            raise ValueError(f"{folder} is not a saved text pipeline: no {MODEL_INDEX}")
        index = json.loads(index_path.read_text())
        if index.get("_class_name") != cls.__name__:
            raise ValueError(f"{index_path} describes a {index.get('_class_name')!r}, not a {cls.__name__}")
        folders = index.get("component_folders", {})
        missing = [name for name in (TRANSFORMER_FOLDER, SCHEDULER_FOLDER, *REFERENCED) if name not in folders]
        if missing:
            raise ValueError(f"{index_path}: component_folders lacks {', '.join(missing)}")
        paths = {name: (folder / path).resolve() for name, path in folders.items()}  # an absolute path stays absolute
        absent = [f"{name} -> {paths[name]}" for name in folders if not paths[name].is_dir()]
        if absent:
            raise ValueError(f"{index_path}: component folders not found: {'; '.join(absent)}")

        library, scheduler_name = index["scheduler"]
        scheduler_cls = getattr(diffusers, scheduler_name, None) if library == "diffusers" else None
        if scheduler_cls is None:
            raise ValueError(f"{index_path}: scheduler {library}.{scheduler_name} is not a diffusers scheduler")
        scheduler = scheduler_cls.from_pretrained(paths[SCHEDULER_FOLDER])
        if sampler is not None:
            scheduler = make_scheduler(sampler, scheduler.config)
        encoder_name = index["text_encoder"][1]
        if encoder_name not in TEXT_ENCODERS:
            raise ValueError(f"{index_path}: unknown text encoder {encoder_name!r}; valid: {', '.join(TEXT_ENCODERS)}")
        pipe = cls(
            # float32 whatever the file's dtype (shipped weights are fp16; CPUs run float32)
            transformer=cls.transformer_class.from_pretrained(paths[TRANSFORMER_FOLDER],
                                                              torch_dtype=torch.float32).eval(),
            vae=AutoencoderKL.from_pretrained(paths["vae"]).eval(),
            scheduler=scheduler,
            text_encoder=TEXT_ENCODERS[encoder_name].from_pretrained(paths["text_encoder"]).eval(),
        )
        pipe.component_folders = {name: paths[name] for name in REFERENCED}
        return pipe.to(dtype=torch_dtype) if torch_dtype is not None else pipe

    def save_pretrained(
        self, folder: str | Path, vae_folder: str | Path | None = None, text_encoder_folder: str | Path | None = None
    ) -> None:
        """Write transformer/ and scheduler/ and a model_index.json that references the VAE and text-encoder
        folders (`vae_folder` / `text_encoder_folder`, else those this pipeline was loaded from)."""
        folder = Path(folder)
        given = {"vae": vae_folder, "text_encoder": text_encoder_folder}
        references = {}
        for name in REFERENCED:
            source = given[name] if given[name] is not None else self.component_folders.get(name)
            if source is None:
                raise ValueError(
                    f"no folder known for the {name}: pass {name}_folder= (the folder it is saved in; it is "
                    f"referenced, not copied)"
                )
            if not Path(source).is_dir():
                raise ValueError(f"{name}_folder {source} is not a folder")
            references[name] = source
        folder.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(folder / TRANSFORMER_FOLDER)
        self.scheduler.save_pretrained(folder / SCHEDULER_FOLDER)
        encoder = type(self.text_encoder)
        index = {
            "_class_name": type(self).__name__,
            "_diffusers_version": diffusers.__version__,
            "transformer": [self.transformer_class.__module__, self.transformer_class.__name__],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "vae": ["diffusers", type(self.vae).__name__],
            "text_encoder": [encoder.__module__, encoder.__name__],
            "component_folders": {
                TRANSFORMER_FOLDER: TRANSFORMER_FOLDER,
                SCHEDULER_FOLDER: SCHEDULER_FOLDER,
                **{name: _relative_reference(path, folder) for name, path in references.items()},
            },
        }
        (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def set_sampler(self, sampler: str):
        """Swap the scheduler by name (see SAMPLERS), keeping the current scheduler's config."""
        self.scheduler = make_scheduler(sampler, self.scheduler.config)
        return self

    # ------------------------------------------------------------------------------------------- pieces
    def encode_prompts(self, texts: list[str], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """-> text tokens (B, L, E) in the transformer's dtype and keep mask (B, L) bool, on `device`."""
        tokens, keep = self.text_encoder.encode_text_tokens(texts)
        max_tokens = self.transformer.config.max_text_tokens
        if tokens.shape[1] > max_tokens:
            raise ValueError(
                f"the text encoder gives {tokens.shape[1]} tokens per prompt, the transformer takes at most "
                f"max_text_tokens={max_tokens}; long prompts are truncated by the encoder to its own context "
                f"length, so pair the transformer with an encoder whose context is <= {max_tokens}"
            )
        return tokens.to(device=device, dtype=dtype), keep.to(device=device, dtype=torch.bool)

    def _given_embeds(self, embeds, mask, neg_embeds, neg_mask, guided: bool, device, dtype) -> tuple[Tensor, Tensor]:
        """Checked prompt embeddings -> text (P or 2P, L, E) and keep mask, rows: cond, then negatives."""
        E, max_tokens = self.transformer.config.caption_channels, self.transformer.config.max_text_tokens

        def check(name, x, m):
            if not torch.is_tensor(x) or x.ndim != 3 or x.shape[2] != E or not 0 < x.shape[1] <= max_tokens:
                got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
                raise ValueError(f"{name} must be (prompts, tokens <= {max_tokens}, {E}); got {got}")
            if m is None:
                m = torch.ones(x.shape[:2], dtype=torch.bool)
            if not torch.is_tensor(m) or tuple(m.shape) != tuple(x.shape[:2]):
                raise ValueError(f"{name}'s attention mask must be {tuple(x.shape[:2])}")
            return x.to(device=device, dtype=dtype), m.to(device=device).bool()

        text, keep = check("prompt_embeds", embeds, mask)
        if not guided:
            return text, keep
        if neg_embeds is None:
            raise ValueError("guidance with prompt_embeds needs negative_prompt_embeds (the unconditional text)")
        neg, neg_keep = check("negative_prompt_embeds", neg_embeds, neg_mask)
        if neg.shape != text.shape:
            raise ValueError(f"negative_prompt_embeds {tuple(neg.shape)} must match prompt_embeds {tuple(text.shape)}")
        return torch.cat([text, neg]), torch.cat([keep, neg_keep])

    # Each subclass defines latent_shape(batch) -> the noise shape, and decode(latents, output_type).

    # ------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] = "",
        num_inference_steps: int = 20,
        guidance_scale: float = 4.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        num_images_per_prompt: int = 1,
        return_dict: bool = True,
        prompt_embeds: Tensor | None = None,
        prompt_attention_mask: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_prompt_attention_mask: Tensor | None = None,
    ):
        """Sample num_images_per_prompt outputs per prompt (prompt-major order).

        guidance_scale w: eps = eps_uncond + w (eps_cond - eps_uncond), the conditional and negative-prompt
        halves in one forward; w = 1 runs the conditional model alone (one forward of B per step).
        `callback(step, t, latents)` is called after every scheduler step; nothing in the loop syncs with the host.

        Instead of prompts, the text tokens themselves may be given (diffusers' PixArt convention, for a text
        encoder that is not part of this pipeline): prompt_embeds (P, L, E) with prompt_attention_mask (P, L)
        (1 = keep; default all kept), and for guidance negative_prompt_embeds / _mask of the same shape.
        """
        check_sampling(num_inference_steps, guidance_scale, output_type, num_images_per_prompt)
        model, device = self.transformer, self._execution_device
        guided = guidance_scale != 1
        if prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("give prompt or prompt_embeds, not both")
            text, keep = self._given_embeds(prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                                            negative_prompt_attention_mask, guided, device, model.dtype)
            n_prompts = prompt_embeds.shape[0]
        else:
            if prompt is None:
                raise ValueError("give a prompt (or prompt_embeds)")
            if self.text_encoder is None:
                raise ValueError("this pipeline has no text encoder: pass prompt_embeds (and negative_prompt_embeds "
                                 "for guidance) instead of prompts")
            prompts, negatives = check_prompts(prompt, negative_prompt)
            n_prompts = len(prompts)
            # One encoder call for both halves, so they share L; rows: cond prompts, then negatives.
            text, keep = self.encode_prompts(prompts + negatives if guided else prompts, device, model.dtype)
        batch = n_prompts * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch}: give one, or one per output")
        text = text.repeat_interleave(num_images_per_prompt, dim=0)  # (B or 2B, L, E)
        keep = keep.repeat_interleave(num_images_per_prompt, dim=0)  # (B or 2B, L)
        # A mask that keeps every token is no mask: passing None lets every cross-attention take the dense kernel
        # instead of building a padding bias each call (measured on the H100 at PixArt-α 512 px, batch 8: 1.3 ms of
        # mask kernels per compiled forward, bench/results/sample_dit_pixart_compiled.json). One host sync per
        # sampling run, not per step.
        keep = None if bool(keep.all()) else keep

        # set_timesteps first: Euler's init_noise_sigma is the largest sigma of the inference schedule.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = randn_tensor(self.latent_shape(batch), generator=generator, device=device, dtype=model.dtype)
        latents = latents * self.scheduler.init_noise_sigma

        latents = denoise(self, lambda x, t: model(x, t, text, keep), latents, guidance_scale, generator, callback)

        result = latents if output_type == "latent" else self.decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return result, latents
        return self.output_class(result, latents)


class TextToImagePipeline(_TextPipeline):
    """Components: transformer (our `PixArtDiT`), vae (`AutoencoderKL`), scheduler (any diffusers scheduler with
    `set_timesteps`, `scale_model_input`, `step`), text_encoder (a `TextEncoder`, e.g. `ShapesCLIP`)."""

    transformer_class = PixArtDiT
    output_class = TextToImageOutput

    def __init__(self, transformer: PixArtDiT, vae: AutoencoderKL, scheduler, text_encoder: TextEncoder):
        super().__init__(transformer, vae, scheduler, text_encoder)

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        cfg = self.transformer.config
        return (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def decode(self, latents_BCHW: Tensor, output_type: str):
        return self.image_processor.postprocess(decode_latents(self.vae, latents_BCHW), output_type)


class TextToVideoPipeline(_TextPipeline):
    """Components: transformer (our `LatteDiT`, F = its num_frames), vae (an image `AutoencoderKL`, run per frame),
    scheduler, text_encoder (a `TextEncoder`)."""

    transformer_class = LatteDiT
    output_class = TextToVideoOutput

    def __init__(self, transformer: LatteDiT, vae: AutoencoderKL, scheduler, text_encoder: TextEncoder):
        super().__init__(transformer, vae, scheduler, text_encoder)

    def save_pretrained(self, folder: str | Path, vae_folder: str | Path | None = None,
                        text_encoder_folder: str | Path | None = None,
                        image_model_folder: str | Path | None = None) -> None:
        """As the image pipeline's; with `image_model_folder` (the text-to-image pipeline or transformer folder the
        video model started from), or when the transformer was loaded over one, transformer/ holds only the
        weights that differ from that image model (`dit.latte.save_over_image_model`)."""
        if image_model_folder is not None:
            self.transformer.image_model_folder = Path(image_model_folder)
        super().save_pretrained(folder, vae_folder, text_encoder_folder)

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        cfg = self.transformer.config
        return (batch, cfg.in_channels, cfg.num_frames, cfg.sample_size, cfg.sample_size)

    def decode(self, latents_BCFHW: Tensor, output_type: str):
        B, C, F, H, W = latents_BCFHW.shape
        frames = latents_BCFHW.transpose(1, 2).reshape(B * F, C, H, W)  # sample-major: row b·F + f
        images = decode_latents(self.vae, frames)  # (B·F, 3, H', W')
        if output_type == "pil":
            pils = self.image_processor.postprocess(images, "pil")
            return [pils[b * F:(b + 1) * F] for b in range(B)]
        images = self.image_processor.postprocess(images, output_type)  # (B·F, H', W', 3) np / (B·F, 3, H', W') pt
        return images.reshape(B, F, *images.shape[1:])
