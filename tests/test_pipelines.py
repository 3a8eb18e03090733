"""Tests of the class -> image pipeline (dit/pipelines.py).

Parity is the main test: a tiny diffusers `DiTPipeline` saved to a folder, run with a seeded generator, and our
pipeline loaded from the same folder and seed must give the same images to 1e-5, for DDIM and DPM-Solver++. Weights
are random at std 1/sqrt(fan_in): diffusers' zero-initialised output layer would predict eps = 0 everywhere, so
guidance, the noise draw and the variance split would all go untested.

diffusers' `DiTPipeline` hard-codes the null class as 1000 (ImageNet); our tiny model has 10 classes, so its null
row is 10. The reference run remaps 1000 -> 10 with a forward pre-hook on the diffusers transformer (test-only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

from dit.dit import DiT
from dit.pipelines import SAMPLERS, ClassToImagePipeline

NUM_CLASSES = 10
DIFFUSERS_NULL_CLASS = 1000  # what DiTPipeline passes as the unconditional label
ATOL = 1e-5
STEPS = 4
SEED = 0
LABELS = [3, 7, 0]
LABEL_STD = 1.0
BIAS_STD = 0.1


def randomize_(module: torch.nn.Module, seed: int, skip=lambda name: False) -> None:
    """std 1/sqrt(fan_in) weights (unit-scale label rows, 0.1 biases), so every path moves the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if skip(name):
                continue
            if "embedding_table" in name:
                std = LABEL_STD
            elif p.ndim == 1:
                std = BIAS_STD
            else:
                std = p[0].numel() ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_transformer(seed: int = 0) -> DiTTransformer2DModel:
    ref = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=NUM_CLASSES,
    ).eval()
    # Our loader computes the conditioning once, so every block must hold block 0's embedder copy.
    randomize_(ref, seed, skip=lambda n: ".norm1.emb." in n and not n.startswith("transformer_blocks.0."))
    emb0 = ref.transformer_blocks[0].norm1.emb.state_dict()
    for block in ref.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(emb0)
    return ref


def tiny_vae(seed: int = 1) -> AutoencoderKL:
    torch.manual_seed(seed)  # its default init draws from the global generator
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=16,
    ).eval()
    return vae


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit_pipeline")
    DiTPipeline(transformer=tiny_transformer(), vae=tiny_vae(), scheduler=DDIMScheduler()).save_pretrained(path)
    return path


def diffusers_images(folder, scheduler_cls, labels=LABELS, guidance=4.0) -> np.ndarray:
    ref = DiTPipeline.from_pretrained(folder)
    ref.scheduler = scheduler_cls.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)

    def null_to_ours(module, args, kwargs):
        y = kwargs["class_labels"]
        kwargs["class_labels"] = torch.where(y == DIFFUSERS_NULL_CLASS, torch.full_like(y, NUM_CLASSES), y)
        return args, kwargs

    ref.transformer.register_forward_pre_hook(null_to_ours, with_kwargs=True)
    out = ref(labels, guidance_scale=guidance, num_inference_steps=STEPS,
              generator=torch.Generator().manual_seed(SEED), output_type="np")
    return out.images


def ours(folder, sampler=None) -> ClassToImagePipeline:
    pipe = ClassToImagePipeline.from_pretrained(folder, sampler=sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, labels=LABELS, guidance=4.0, **kw):
    return pipe(labels, num_inference_steps=STEPS, guidance_scale=guidance,
                generator=torch.Generator().manual_seed(SEED), **kw)


# ----------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("scheduler_cls, sampler", [(DDIMScheduler, None), (DPMSolverMultistepScheduler, "dpm++")])
def test_parity_with_diffusers_dit_pipeline(folder, scheduler_cls, sampler):
    expected = diffusers_images(folder, scheduler_cls)
    pipe = ours(folder, sampler)
    assert type(pipe.scheduler) is scheduler_cls
    got = run(pipe, output_type="np").images
    assert got.shape == expected.shape == (len(LABELS), 16, 16, 3)
    err = np.abs(got - expected).max()
    print(f"{scheduler_cls.__name__}: max abs diff {err:.2e}")
    assert err < ATOL
    # The images are not trivially equal: classes differ, and the test is not passing on constant images.
    assert np.abs(got[0] - got[1]).max() > 1e-2


def test_guidance_one_is_conditional_only_and_matches_diffusers(folder):
    expected = diffusers_images(folder, DDIMScheduler, guidance=1.0)
    pipe = ours(folder)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    got = run(pipe, guidance=1.0, output_type="np").images
    assert np.abs(got - expected).max() < ATOL
    assert calls == [len(LABELS)] * STEPS  # no null-class half
    guided = run(pipe, guidance=4.0, output_type="np").images
    assert np.abs(guided - got).max() > 1e-3


def test_seed_is_deterministic_and_matters(folder):
    pipe = ours(folder)
    a = run(pipe, output_type="pt").images
    b = run(pipe, output_type="pt").images
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = pipe(LABELS, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED + 1), output_type="pt")
    assert (a - c.images).abs().max() > 1e-3


def test_callback_once_per_step_and_latents_returned(folder):
    pipe = ours(folder)
    seen = []
    out = run(pipe, output_type="pt", callback=lambda step, t, latents: seen.append((step, t, latents.clone())))
    assert [s for s, _, _ in seen] == list(range(STEPS))
    assert [int(t) for _, t, _ in seen] == pipe.scheduler.timesteps.tolist()
    assert out.latents.shape == (len(LABELS), 4, 8, 8)
    torch.testing.assert_close(seen[-1][2], out.latents, rtol=0, atol=0)
    assert out.images.shape == (len(LABELS), 3, 16, 16)
    assert 0 <= out.images.min() and out.images.max() <= 1
    latent_out = run(pipe, output_type="latent")
    torch.testing.assert_close(latent_out.images, out.latents, rtol=0, atol=0)


def test_batch_equals_single_runs_with_the_same_noise(folder):
    """Each image of a batch depends only on its own label and noise: a batch of several labels equals the
    single-label runs fed the matching noise rows (a per-sample list of generators, as randn_tensor supports)."""
    pipe = ours(folder)
    gens = [torch.Generator().manual_seed(SEED + i) for i in range(len(LABELS))]
    batch = pipe(LABELS, num_inference_steps=STEPS, generator=gens, output_type="np").images
    assert batch.shape == (len(LABELS), 16, 16, 3)
    for i, y in enumerate(LABELS):
        single = pipe([y], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED + i),
                      output_type="np").images
        assert np.abs(single[0] - batch[i]).max() < ATOL


def test_pil_output(folder):
    images = run(ours(folder), labels=[1, 2]).images
    assert len(images) == 2 and images[0].size == (16, 16)


# ----------------------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs(folder, name):
    pipe = ours(folder, name)
    assert type(pipe.scheduler) is SAMPLERS[name]
    out = run(pipe, output_type="pt")
    assert torch.isfinite(out.images).all() and torch.isfinite(out.latents).all()


def test_ddpm_learned_range_gets_the_variance_channels(folder):
    """A DDPM scheduler with variance_type "learned_range" consumes the (conditional) variance channels; the
    result differs from the fixed-variance DDPM with the same seed."""
    pipe = ours(folder, "ddpm")
    fixed = run(pipe, output_type="latent").latents
    seen = []
    pipe.scheduler = SAMPLERS["ddpm"].from_config(pipe.scheduler.config, variance_type="learned_range")
    original = pipe.scheduler.step
    pipe.scheduler.step = lambda out, t, x, **kw: seen.append(out.shape) or original(out, t, x, **kw)
    learned = run(pipe, output_type="latent").latents
    assert seen == [(len(LABELS), 8, 8, 8)] * STEPS
    assert torch.isfinite(learned).all() and (learned - fixed).abs().max() > 1e-4


def test_vae_shift_factor_applied(folder):
    pipe = ours(folder)
    plain = run(pipe, output_type="pt")
    pipe.vae.register_to_config(shift_factor=0.5)
    shifted = run(pipe, output_type="pt")
    torch.testing.assert_close(shifted.latents, plain.latents, rtol=0, atol=0)
    z = plain.latents / pipe.vae.config.scaling_factor + 0.5
    expected = (pipe.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(shifted.images, expected, rtol=0, atol=1e-6)


def test_set_sampler_keeps_schedule(folder):
    pipe = ours(folder).set_sampler("euler")
    assert type(pipe.scheduler) is SAMPLERS["euler"]
    assert pipe.scheduler.config.num_train_timesteps == DDIMScheduler().config.num_train_timesteps


def test_unknown_sampler_lists_valid(folder):
    with pytest.raises(ValueError, match="valid: ddpm, ddim, dpm\\+\\+, euler"):
        ours(folder, "heun")


def test_direct_construction_with_our_dit(folder):
    """Our DiT + vae + scheduler passed directly gives what the folder gives."""
    from dit.loaders import dit_from_diffusers

    dit = dit_from_diffusers(DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer")).eval()
    assert isinstance(dit, DiT)
    pipe = ClassToImagePipeline(transformer=dit, vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
                                scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"))
    pipe.set_progress_bar_config(disable=True)
    a = run(pipe, output_type="np").images
    b = run(ours(folder), output_type="np").images
    assert np.abs(a - b).max() == 0


# ----------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(class_labels=[]), "empty"),
        (dict(class_labels=[NUM_CLASSES]), r"\[0, 10\)"),
        (dict(class_labels=[-1]), r"\[0, 10\)"),
        (dict(class_labels=[1.5]), "integers"),
        (dict(num_inference_steps=0), ">= 1"),
        (dict(num_inference_steps=2.0), ">= 1"),
        (dict(guidance_scale=-0.5), ">= 0"),
        (dict(guidance_scale="4"), ">= 0"),
        (dict(guidance_scale=float("nan")), ">= 0"),
        (dict(output_type="jpeg"), "valid: pil, np, pt, latent"),
    ],
)
def test_bad_inputs(folder, kwargs, match):
    pipe = ours(folder)
    kwargs = {"class_labels": [1], **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        ClassToImagePipeline.from_pretrained(tmp_path)
