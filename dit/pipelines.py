"""Class -> image sampling with our DiT: a thin diffusers pipeline (model, guidance, `scheduler.step`, VAE decode).

`ClassToImagePipeline` draws the same initial noise as diffusers' `DiTPipeline` (same `randn_tensor` call: shape
(B, C, S, S), the transformer's dtype, the execution device), so a seed gives the same image when both run the same
weights and scheduler. Differences from `DiTPipeline`, each deliberate:
- the null class is read from the model (`DiT.null_class_id`), not the literal 1000 of ImageNet;
- guidance runs whenever guidance_scale != 1 (0 gives the unconditional model; `DiTPipeline` skips any scale <= 1),
  and the scheduler steps the B latents once instead of stepping the duplicated 2B batch;
- the latents start at `scheduler.init_noise_sigma` (1 for DDPM/DDIM/DPM-Solver, sigma_max for Euler, which
  `DiTPipeline` leaves at 1);
- the learned-variance channels go to the scheduler only if its config asks for them (DDPM `variance_type`
  "learned"/"learned_range"); otherwise they are split off, as `DiTPipeline` always does;
- the VAE decode applies `shift_factor` when the VAE config sets one.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image
import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .dit import DiT
from .loaders import dit_from_diffusers

# Samplers by name; each is built from the loaded scheduler's config, so the training schedule (betas, number of
# training steps, prediction type) carries over.
SAMPLERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,  # its default algorithm_type is "dpmsolver++"
    "euler": EulerDiscreteScheduler,
}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Scheduler variance types under which the scheduler itself consumes the model's variance channels.
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
# The index file of a saved diffusers pipeline (component name -> [library, class]).
MODEL_INDEX = "model_index.json"

StepCallback = Callable[[int, Tensor, Tensor], None]


def decode_latents(vae: AutoencoderKL, latents_BCHW: Tensor) -> Tensor:
    """Diffusion latents -> VAE images (B, 3, H, W) in [-1, 1]: undo scaling_factor, then shift_factor if set."""
    cfg = vae.config
    z = latents_BCHW / cfg.scaling_factor
    if cfg.get("shift_factor") is not None:
        z = z + cfg.shift_factor
    return vae.decode(z.to(vae.dtype)).sample


def denoise(pipe, model_fn: Callable[[Tensor, Tensor], Tensor], latents: Tensor, guidance_scale: float,
            generator, callback: StepCallback | None) -> Tensor:
    """The sampling loop every pipeline here shares: `model_fn(x_in, t_B)` over [cond; uncond] when guided
    (guidance_scale != 1), eps = eps_uncond + w (eps_cond - eps_uncond), the learned-variance channels kept for the
    scheduler only if its `variance_type` consumes them (the conditional half's), then `scheduler.step`; stochastic
    samplers draw their step noise from `generator`. `callback(step, t, latents)` after every step.

    No host sync per step. The schedulers keep their tables (DDIM's and DDPM's alphas_cumprod) on the CPU and branch
    in Python on the timestep (`if prev_timestep >= 0`), so a timestep on the GPU makes every `step` wait for the
    model's forward to finish before the host can queue the next one (DiT-XL/2 at batch 32 on the H100 took 33.2 ms
    a step around a 30.4 ms forward; diffusers' own pipelines sync too, by copying t to the GPU each step).
    So the scheduler gets the CPU copy of each timestep and the model a slice of one device copy made per run; the
    scheduler's own `timesteps` move to the CPU for the run too (DDPM looks the previous timestep up in them), as
    diffusers' DiTPipeline keeps them."""
    scheduler, channels, batch = pipe.scheduler, latents.shape[1], latents.shape[0]
    guided = guidance_scale != 1
    learned_variance = scheduler.config.get("variance_type") in LEARNED_VARIANCE_TYPES
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generator} if takes_generator else {}
    timesteps_host = scheduler.timesteps.cpu()  # one copy (one sync) per run, before the first forward
    if scheduler.timesteps.device.type != "cpu":
        scheduler.timesteps = timesteps_host
    timesteps_model = timesteps_host.to(latents.device)
    for step, t in enumerate(pipe.progress_bar(timesteps_host)):
        x_in = scheduler.scale_model_input(latents, t)
        x_in = torch.cat([x_in, x_in]) if guided else x_in
        out = model_fn(x_in, timesteps_model[step].expand(x_in.shape[0]))  # (2B or B, C_out, ...)
        eps, variance = out[:, :channels], out[:, channels:]  # variance: empty unless learn_sigma
        if guided:
            eps_cond, eps_uncond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            variance = variance[:batch]  # the conditional half's
        model_output = torch.cat([eps, variance], dim=1) if learned_variance else eps
        latents = scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
        if callback is not None:
            callback(step, t, latents)
    return latents


def make_scheduler(sampler: str, config):
    """A scheduler of the named kind built from another scheduler's config (`from_config`)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler].from_config(config)


@dataclass
class ClassToImageOutput(BaseOutput):
    """images: PIL list, (B, H, W, 3) array or (B, 3, H, W) tensor in [0, 1], or the latents for output_type
    "latent"; latents: the final (B, C, S, S) latents before the VAE (always returned)."""

    images: list[PIL.Image.Image] | np.ndarray | Tensor
    latents: Tensor


class ClassToImagePipeline(DiffusionPipeline):
    """Components: transformer (our `DiT`), vae (`AutoencoderKL`), scheduler (any diffusers scheduler with
    `set_timesteps`, `scale_model_input`, `step`)."""

    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer: DiT, vae: AutoencoderKL, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        self.image_processor = VaeImageProcessor()

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, folder: str | Path, sampler: str | None = None, torch_dtype: torch.dtype | None = None):
        """Load a saved diffusers `DiTPipeline` folder (model_index.json, transformer/, vae/, scheduler/), or one this
        pipeline saved (transformer: our `DiT`, kept in float32 whatever the file's dtype): a diffusers
        transformer is converted with `dit_from_diffusers`, the scheduler class is the one model_index.json names
        (or `sampler`, built from its config)."""
        folder = Path(folder)
        index_path = folder / MODEL_INDEX
        if not index_path.is_file():
            raise ValueError(f"{folder} is not a saved diffusers pipeline: no {MODEL_INDEX}")
        index = json.loads(index_path.read_text())
        missing = [name for name in ("transformer", "vae", "scheduler") if name not in index]
        if missing:
            raise ValueError(f"{index_path} lacks components {', '.join(missing)}")
        library, scheduler_name = index["scheduler"]
        scheduler_cls = getattr(diffusers, scheduler_name, None) if library == "diffusers" else None
        if scheduler_cls is None:
            raise ValueError(f"{index_path}: scheduler {library}.{scheduler_name} is not a diffusers scheduler")
        scheduler = scheduler_cls.from_pretrained(folder, subfolder="scheduler")
        if sampler is not None:
            scheduler = make_scheduler(sampler, scheduler.config)
        if list(index["transformer"]) == ["dit.dit", "DiT"]:  # saved by this pipeline (the shipped models)
            transformer = DiT.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float32)
        elif list(index["transformer"]) == ["diffusers", "DiTTransformer2DModel"]:
            transformer = dit_from_diffusers(DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer"))
        else:
            raise ValueError(f"{index_path}: transformer {index['transformer']} is neither diffusers' "
                             "DiTTransformer2DModel nor our dit.dit.DiT")
        referenced = index.get("component_folders", {}).get("vae")  # a shared VAE, referenced (see save_pretrained)
        vae_path = (folder / referenced).resolve() if referenced else folder / "vae"
        if not vae_path.is_dir():
            raise ValueError(f"{index_path}: VAE folder {vae_path} not found")
        vae = AutoencoderKL.from_pretrained(vae_path)
        pipe = cls(transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler)
        pipe.vae_folder = vae_path
        return pipe.to(dtype=torch_dtype) if torch_dtype is not None else pipe

    def save_pretrained(self, folder: str | Path, vae_folder: str | Path | None = None,
                        id2label: dict[int, str] | None = None, **kwargs) -> None:
        """diffusers' layout. With `vae_folder` the VAE is referenced instead of copied (model_index.json
        "component_folders": {"vae": <path relative to folder>}), so the shipped models share one VAE; `id2label`
        goes into model_index.json as in diffusers' DiTPipeline folders."""
        folder = Path(folder)
        if vae_folder is None:
            super().save_pretrained(folder, **kwargs)
        else:
            if not Path(vae_folder).is_dir():
                raise ValueError(f"vae_folder {vae_folder} is not a folder")
            folder.mkdir(parents=True, exist_ok=True)
            self.transformer.save_pretrained(folder / "transformer")
            self.scheduler.save_pretrained(folder / "scheduler")
            index = {"_class_name": type(self).__name__, "_diffusers_version": diffusers.__version__,
                     "scheduler": ["diffusers", type(self.scheduler).__name__],
                     "transformer": [type(self.transformer).__module__, type(self.transformer).__name__],
                     "vae": ["diffusers", "AutoencoderKL"],
                     "component_folders": {"vae": os.path.relpath(Path(vae_folder).resolve(), folder.resolve())}}
            (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if id2label is not None:
            index = json.loads((folder / MODEL_INDEX).read_text())
            index["id2label"] = {str(k): v for k, v in sorted(id2label.items())}
            (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def set_sampler(self, sampler: str) -> "ClassToImagePipeline":
        """Swap the scheduler by name (see SAMPLERS), keeping the current scheduler's config."""
        self.scheduler = make_scheduler(sampler, self.scheduler.config)
        return self

    # ------------------------------------------------------------------------------------------- checks
    def _check_inputs(self, class_labels, num_inference_steps, guidance_scale, output_type) -> list[int]:
        if isinstance(class_labels, Tensor):
            class_labels = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, numbers.Integral):
            class_labels = [class_labels]
        labels = list(class_labels)
        if not labels:
            raise ValueError("class_labels is empty: give at least one class id")
        num_classes = self.transformer.config.num_classes
        bad = [
            y for y in labels
            if isinstance(y, bool) or not isinstance(y, numbers.Integral) or not 0 <= y < num_classes
        ]
        if bad:
            raise ValueError(f"class labels must be integers in [0, {num_classes}); got {bad}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1; got {num_inference_steps!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
                or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0; got {guidance_scale!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; valid: {', '.join(OUTPUT_TYPES)}")
        return [int(y) for y in labels]

    # ------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        return_dict: bool = True,
    ) -> ClassToImageOutput | tuple:
        """Sample one image per class label.

        guidance_scale w: eps = eps_uncond + w (eps_cond - eps_uncond), with the conditional and null-class
        halves in one forward; w = 1 runs the conditional model alone. `callback(step, t, latents)` is called
        after every scheduler step (latents: the (B, C, S, S) x_{t-1}); nothing in the loop syncs with the host.
        """
        labels = self._check_inputs(class_labels, num_inference_steps, guidance_scale, output_type)
        model, device = self.transformer, self._execution_device
        channels, size = model.config.in_channels, model.config.sample_size
        batch = len(labels)
        guided = guidance_scale != 1

        # set_timesteps first: Euler's init_noise_sigma is the largest sigma of the inference schedule.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # Exactly DiTPipeline's draw, so that a seed gives its image.
        latents = randn_tensor((batch, channels, size, size), generator=generator, device=device, dtype=model.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        y_B = torch.tensor(labels, device=device)
        y_in = torch.cat([y_B, torch.full_like(y_B, model.null_class_id)]) if guided else y_B  # (2B,) cond, uncond

        latents = denoise(self, lambda x, t: model(x, t, y_in), latents, guidance_scale, generator, callback)

        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(decode_latents(self.vae, latents), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, latents
        return ClassToImageOutput(images=images, latents=latents)

