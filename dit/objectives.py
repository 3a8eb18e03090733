"""Training objectives shared by every diffusion model here (DiT, PixArt, Latte, ...).

An objective is a callable ``objective(model_fn, x0, cond, generator) -> dict`` where

- ``model_fn(x_t, timestep, cond)`` runs the model (a closure, so each model wires its own conditioning);
  it returns (B, C, ...) or, for models that learn the variance, (B, 2C, ...) with the variance values last;
- ``x0`` are clean (scaled) latents, (B, C, H, W) or any (B, C, ...) layout;
- ``generator`` is a ``torch.Generator`` that draws every timestep and noise, so a step is reproducible.

The dict holds ``loss`` (the scalar to backpropagate) and its parts (``mse``, ``vlb``) detached for logging.

`DDPMObjective` is ε-prediction with diffusers' `DDPMScheduler` (Ho et al. 2020) plus, for learned variance, the
hybrid loss of improved DDPM (Nichol & Dhariwal 2021) that the DiT paper trains with. `FlowMatchingObjective` is
rectified flow / flow matching with velocity prediction (SiT, Ma et al. 2024; Esser et al. 2024 for logit-normal t).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from diffusers import DDPMScheduler
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor, object], Tensor]

# The DiT paper's diffusion: 1000 steps, linear betas 1e-4 .. 0.02 (as in Ho et al.).
DIT_NUM_TRAIN_TIMESTEPS = 1000
DIT_BETA_START, DIT_BETA_END = 1e-4, 0.02
# Flow time t in [0, 1] is passed to the model as t * FLOW_TIMESTEP_SCALE, so timestep embedders built for DDPM's
# integer steps 0..999 (DiT's sinusoidal features, max period 10000) see the same range (SiT does the same).
FLOW_TIMESTEP_SCALE = 1000.0


PREDICTION_TYPES = ("epsilon", "v_prediction")


def _mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.flatten(1).mean(1)


def _gather(values: Tensor, t_B: Tensor, like: Tensor) -> Tensor:
    """values[t] as float32 broadcastable against `like`: (T,) -> (B, 1, 1, ...)."""
    return values.to(like.device, torch.float32)[t_B].view(-1, *([1] * (like.ndim - 1)))


# diffusers ships no Gaussian KL nor the discretised decoder likelihood (its schedulers only sample), so the two
# formulas of improved DDPM (its `losses.py`) are written here.
def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    # The tanh approximation improved DDPM uses, kept so losses compare with published runs.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) elementwise (nats) for data in [-1, 1] quantised to 256 bins, under N(mean, e^(2 log_scale)):
    the decoder term L_0 of the variational bound."""
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class DDPMObjective:
    """ε-prediction: L_simple = ||ε - ε_θ(x_t, t)||², x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, t ~ U{0, ..., T-1}.

    When the model returns 2C channels (learn_sigma), the last C are v ∈ [-1, 1] and the model's variance is
    Σ_θ = exp(f log β_t + (1 - f) log β̃_t), f = (v + 1) / 2 (improved DDPM eq. 15); the loss becomes the hybrid
    L_simple + λ L_vlb, where L_vlb (in bits per dimension) is KL(q(x_{t-1}|x_t, x_0) || p_θ(x_{t-1}|x_t)) for
    t > 0 and -log p_θ(x_0|x_1) at t = 0, computed with the mean from a *stop-gradient* ε so that L_vlb trains
    only Σ_θ and L_simple only the mean. λ = `vlb_weight` = 1 as in the DiT code (improved DDPM's λ = 0.001
    went with a sum-reduced loss; DiT mean-reduces both terms).

    `prediction_type` "v_prediction" (Salimans & Ho, 2022; diffusers' scheduler option of that name): the first C
    channels are v = √ᾱ_t ε - √(1-ᾱ_t) x_0 and L_simple = ||v - v_θ||². In x_0 terms the ε loss weights an error by
    SNR_t and the v loss by 1 + SNR_t, and at high noise v_θ is -x_0 at full scale where an ε_θ is x_t plus a √ᾱ_t
    (~2% at t = 900) share of x_0, a few bf16 steps. The scheduler saved with the model carries the type, so its
    samplers convert. Default: the given scheduler's type, else "epsilon".

    `p2_gamma` > 0 weights each sample's MSE (of ε or v) by P2's λ_t = 1 / (k + SNR_t)^γ (Choi et al., "Perception
    Prioritized Training of Diffusion Models", CVPR 2022; SNR_t = ᾱ_t / (1-ᾱ_t), k = `p2_k`): the ε loss counts an
    x0 error at t by SNR_t, ~0.007 at t = 700 of DiT's schedule against 8.5 at t = 100, so what is decided at high
    noise (a layout, a motion) gets little gradient; P2 lowers the weight of the low-noise steps (clean-up) instead.
    γ = 0 is the plain loss. The L_vlb term and the logged "mse" stay unweighted. (diffusers' training scripts offer
    min-SNR-γ, which for ε-prediction also lowers only the low-noise steps, by min(1, γ/SNR); P2's is smooth.)

    Code names: `alphas_cumprod` ᾱ_t, `betas` β_t, `posterior_variance` β̃_t = β_t (1-ᾱ_{t-1}) / (1-ᾱ_t),
    `noise` ε, `eps` ε_θ, `v` the variance values, `x_t` x_t, `x0` x_0.
    """

    def __init__(self, scheduler: DDPMScheduler | None = None, vlb_weight: float = 1.0, p2_gamma: float = 0.0,
                 p2_k: float = 1.0, prediction_type: str | None = None):
        if p2_gamma < 0 or p2_k <= 0:
            raise ValueError(f"P2 weighting needs p2_gamma >= 0 and p2_k > 0; got {p2_gamma}, {p2_k}")
        prediction_type = prediction_type or (scheduler.config.prediction_type if scheduler is not None else "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")
        self.prediction_type = prediction_type
        self.scheduler = scheduler or DDPMScheduler(
            num_train_timesteps=DIT_NUM_TRAIN_TIMESTEPS, beta_start=DIT_BETA_START, beta_end=DIT_BETA_END,
            beta_schedule="linear", prediction_type=prediction_type)
        if self.scheduler.config.prediction_type != prediction_type:  # the saved pipeline's samplers read it from here
            self.scheduler = DDPMScheduler.from_config(self.scheduler.config, prediction_type=prediction_type)
        self.vlb_weight = vlb_weight
        betas = self.scheduler.betas.double()
        alphas_cumprod = self.scheduler.alphas_cumprod.double()
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        # β̃_0 = 0: clip log β̃ at t = 0 to β̃_1, as improved DDPM does.
        self.posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.log_betas = torch.log(betas)
        self.posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod)  # of x_0
        self.posterior_mean_coef2 = (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod)  # of x_t
        self.alphas_cumprod = alphas_cumprod
        snr = alphas_cumprod / (1 - alphas_cumprod)
        self.loss_weights = ((p2_k + snr) ** -p2_gamma).float() if p2_gamma > 0 else None  # (T,) P2's λ_t

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def sample(self, x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(t, ε): timesteps uniform over 0..T-1 and standard normal noise, drawn on the generator's device."""
        gdev = generator.device
        t_B = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), generator=generator, device=gdev)
        noise = torch.randn(x0.shape, generator=generator, device=gdev, dtype=torch.float32)
        return t_B.to(x0.device), noise.to(x0.device, x0.dtype)

    def vlb_terms(self, x0: Tensor, x_t: Tensor, t_B: Tensor, eps: Tensor, v: Tensor) -> Tensor:
        """L_vlb per sample (B,), in bits per dimension, with the model's mean built from `eps` as given (the
        caller detaches it)."""
        x0, x_t, eps, v = x0.float(), x_t.float(), eps.float(), v.float()
        abar = _gather(self.alphas_cumprod, t_B, x_t)
        coef1, coef2 = _gather(self.posterior_mean_coef1, t_B, x_t), _gather(self.posterior_mean_coef2, t_B, x_t)
        true_mean = coef1 * x0 + coef2 * x_t
        true_logvar = _gather(self.posterior_log_variance_clipped, t_B, x_t)
        pred_x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        model_mean = coef1 * pred_x0 + coef2 * x_t
        frac = (v + 1) / 2
        model_logvar = frac * _gather(self.log_betas, t_B, x_t) + (1 - frac) * true_logvar
        kl = _mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
        return torch.where(t_B == 0, nll, kl)

    # The steps of a loss, public so that a training term can run the model its own way (dit/caption_contrast.py).
    def noised(self, x0: Tensor, noise: Tensor, t_B: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, the timestep the model is given)."""
        return self.scheduler.add_noise(x0, noise, t_B), t_B

    def noise_level(self, t_B: Tensor) -> Tensor:
        """t / T in [0, 1): 0 clean, toward 1 pure noise."""
        return t_B.float() / self.num_train_timesteps

    def sample_weight(self, t_B: Tensor) -> Tensor:
        """(B,) the weight of each sample's prediction error in the loss: P2's λ_t, else 1."""
        if self.loss_weights is None:
            return torch.ones(t_B.shape, device=t_B.device)
        return self.loss_weights.to(t_B.device)[t_B]

    def prediction_error(self, out: Tensor, x0: Tensor, x_t: Tensor, noise: Tensor, t_B: Tensor) -> Tensor:
        """(B,) mean squared error of the model's prediction (ε or v, the first C channels of `out`), unweighted."""
        pred = out[:, : x0.shape[1]]
        if self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0.float(), noise.float(), t_B)
        else:
            target = noise
        return _mean_flat((target.float() - pred.float()) ** 2)

    def __call__(self, model_fn: ModelFn, x0: Tensor, cond, generator: torch.Generator | None = None,
                 draws: tuple[Tensor, Tensor] | None = None) -> dict:
        """`draws` = (t, ε) drawn beforehand by `sample` (a training step draws them for its whole global batch and
        gives each process / micro-batch its slice); else they are drawn here from `generator`."""
        t_B, noise = draws if draws is not None else self.sample(x0, generator)
        x_t, model_t = self.noised(x0, noise, t_B)
        return self.loss_terms(model_fn(x_t, model_t, cond), x0, x_t, noise, t_B)

    def loss_terms(self, out: Tensor, x0: Tensor, x_t: Tensor, noise: Tensor, t_B: Tensor,
                   error: Tensor | None = None) -> dict:
        """The loss dict (see the module docstring) of a model output `out` for x_t = noised(x0, noise, t); `error`:
        its `prediction_error`, when the caller has it already."""
        C = x0.shape[1]
        if out.shape[1] not in (C, 2 * C):
            raise ValueError(f"model returned {out.shape[1]} channels for {C}-channel latents (expected {C} or {2 * C})")
        pred = out[:, :C]
        if self.prediction_type == "v_prediction":
            abar = _gather(self.alphas_cumprod, t_B, pred).to(pred.dtype)
            eps = abar.sqrt() * pred + (1 - abar).sqrt() * x_t  # ε = √ᾱ v + √(1-ᾱ) x_t, for the VLB's mean
        else:
            eps = pred
        mse = self.prediction_error(out, x0, x_t, noise, t_B) if error is None else error
        losses = {"mse": mse.mean()}
        loss = mse if self.loss_weights is None else mse * self.sample_weight(t_B)
        if out.shape[1] == 2 * C:
            vlb = self.vlb_terms(x0, x_t, t_B, eps.detach(), out[:, C:])  # stop-gradient on the mean
            loss = loss + self.vlb_weight * vlb
            losses["vlb"] = vlb.mean()
        return {"loss": loss.mean(), **{k: v.detach() for k, v in losses.items()}}


def flow_interpolate(x0: Tensor, noise: Tensor, t_B: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, u): the straight path x_t = (1 - t) x_0 + t ε and its velocity u = dx_t/dt = ε - x_0."""
    t = t_B.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise, noise - x0


class FlowMatchingObjective:
    """Rectified flow / flow matching, velocity prediction: L = ||v_θ(x_t, t) - (ε - x_0)||², x_t = (1-t) x_0 + t ε.

    t ~ U(0, 1) (`timestep_sampling="uniform"`, SiT) or t = sigmoid(n), n ~ N(`logit_mean`, `logit_std`²)
    (`"logit_normal"`, Esser et al. 2024), which weights the middle of the path. t = 0 is data, t = 1 noise; the
    model receives t · `timestep_scale` (default 1000, see FLOW_TIMESTEP_SCALE), and a sampler must integrate
    dx/dt = v_θ from t = 1 to 0. Models that learn a variance have their extra channels ignored (no gradient).

    Code names: `noise` ε, `t_B` t, `target` u = ε - x_0, `pred` v_θ.
    """

    def __init__(self, timestep_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                 timestep_scale: float = FLOW_TIMESTEP_SCALE):
        if timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"timestep_sampling must be 'uniform' or 'logit_normal', got {timestep_sampling!r}")
        self.timestep_sampling, self.logit_mean, self.logit_std = timestep_sampling, logit_mean, logit_std
        self.timestep_scale = timestep_scale

    def sample(self, x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        gdev = generator.device
        if self.timestep_sampling == "uniform":
            t_B = torch.rand(x0.shape[0], generator=generator, device=gdev)
        else:
            n = torch.randn(x0.shape[0], generator=generator, device=gdev)
            t_B = torch.sigmoid(self.logit_mean + self.logit_std * n)
        noise = torch.randn(x0.shape, generator=generator, device=gdev, dtype=torch.float32)
        return t_B.to(x0.device), noise.to(x0.device, x0.dtype)

    def noised(self, x0: Tensor, noise: Tensor, t_B: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, the timestep the model is given: t · timestep_scale)."""
        return flow_interpolate(x0, noise, t_B)[0], t_B * self.timestep_scale

    def noise_level(self, t_B: Tensor) -> Tensor:
        return t_B.float()

    def sample_weight(self, t_B: Tensor) -> Tensor:
        return torch.ones(t_B.shape, device=t_B.device)

    def prediction_error(self, out: Tensor, x0: Tensor, x_t: Tensor, noise: Tensor, t_B: Tensor) -> Tensor:
        """(B,) mean squared error of the velocity (the first C channels of `out`)."""
        target = noise.float() - x0.float()
        return _mean_flat((out[:, : x0.shape[1]].float() - target) ** 2)

    def __call__(self, model_fn: ModelFn, x0: Tensor, cond, generator: torch.Generator | None = None,
                 draws: tuple[Tensor, Tensor] | None = None) -> dict:
        t_B, noise = draws if draws is not None else self.sample(x0, generator)
        x_t, model_t = self.noised(x0, noise, t_B)
        return self.loss_terms(model_fn(x_t, model_t, cond), x0, x_t, noise, t_B)

    def loss_terms(self, out: Tensor, x0: Tensor, x_t: Tensor, noise: Tensor, t_B: Tensor,
                   error: Tensor | None = None) -> dict:
        mse = (self.prediction_error(out, x0, x_t, noise, t_B) if error is None else error).mean()
        return {"loss": mse, "mse": mse.detach()}


def make_objective(name: str, **kwargs):
    """'ddpm' -> DDPMObjective, 'flow' -> FlowMatchingObjective."""
    objectives = {"ddpm": DDPMObjective, "flow": FlowMatchingObjective}
    if name not in objectives:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(objectives)}")
    return objectives[name](**kwargs)
