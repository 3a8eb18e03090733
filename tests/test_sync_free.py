"""The sampling loop (`dit.pipelines.denoise`) must not make the host wait for the GPU at every step.

diffusers' DDIM / DDPM keep alphas_cumprod on the CPU and branch on the timestep in Python, so a timestep tensor on
the GPU turns each `scheduler.step` into a device-to-host sync: the host cannot queue step i+1 until step i's forward
has finished, and the GPU idles for the host's time between the two. The loop hands the schedulers CPU timesteps and
the model one device copy per run.

On the CPU: the scheduler sees CPU timesteps and the model sees the run's timesteps in order, on the latents'
device. On a GPU: the number of synchronising CUDA calls in a run does not grow with the number of steps (counted by
`torch.cuda.set_sync_debug_mode("warn")`), for every sampler the pipelines offer.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler

from dit.pipelines import SAMPLERS, denoise


def _pipe(scheduler):
    return SimpleNamespace(scheduler=scheduler, progress_bar=lambda it: it)


def _scheduler(name: str):
    base = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                         set_alpha_to_one=False)
    return SAMPLERS[name].from_config(base.config)


class _Spy:
    """Wraps a scheduler: records the device of every timestep `step` receives."""

    def __init__(self, scheduler):
        self.inner, self.step_devices = scheduler, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, model_output, timestep, sample, **kw):
        self.step_devices.append(timestep.device.type)
        return self.inner.step(model_output, timestep, sample, **kw)


def test_scheduler_gets_cpu_timesteps_model_gets_the_run_in_order():
    sched = _scheduler("ddim")
    sched.set_timesteps(6)
    spy = _Spy(sched)
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    latents = torch.randn(2, 4, 8, 8)
    denoise(_pipe(spy), model, latents, 3.0, None, None)
    assert spy.step_devices == ["cpu"] * 6
    assert [int(t[0]) for t in seen] == sched.timesteps.tolist()
    assert all(t.shape == (4,) and t.device == latents.device for t in seen)  # guided: [cond; uncond]


def _syncs_in_a_run(name: str, steps: int, device) -> int:
    sched = _scheduler(name)
    sched.set_timesteps(steps, device=device)  # as the pipelines call it: the timesteps live on the GPU
    latents = torch.randn(2, 4, 16, 16, device=device)
    gen = torch.Generator(device).manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            denoise(_pipe(sched), lambda x, t: 0.1 * x + t.float().mean() * 1e-4, latents, 4.0, gen, None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_no_host_sync_per_step_on_cuda(name):
    device = torch.device("cuda")
    _syncs_in_a_run(name, 2, device)  # warm-up: lazy initialisation (cuBLAS handles, generator state) syncs once
    few, many = _syncs_in_a_run(name, 3, device), _syncs_in_a_run(name, 12, device)
    assert many == few, f"{name}: {few} syncs in 3 steps, {many} in 12: the loop syncs every step"
