"""Tests of the text -> image and text -> video pipelines (dit/text_pipelines.py), on the CPU.

Tiny random `PixArtDiT` / `LatteDiT` whose text width and latent shape match the SHIPPED text encoder and VAE
(`weights/shapes-clip`: 96-wide tokens, 32 per prompt; `weights/shapes-vae`: 64 px <-> 16x16x4), which these tests
load. Weights are random at std 1/sqrt(fan_in): the models' zero-initialised cross-attention output and final layer
would make the text (and so guidance and the mask) invisible.

The parity test builds one guided step by hand (cond and uncond forwards run separately, combined with w = 3,
one `scheduler.step`) and asks the batched pipeline for the same latents.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from dit.latte import LatteDiT
from dit.pixart import PixArtDiT
from dit.text_pipelines import (
    SAMPLERS,
    TextToImageOutput,
    TextToImagePipeline,
    TextToVideoOutput,
    TextToVideoPipeline,
)
from shapes.clip import ShapesCLIP

ROOT = Path(__file__).resolve().parents[1]
CLIP_FOLDER = ROOT / "weights" / "shapes-clip"
VAE_FOLDER = ROOT / "weights" / "shapes-vae"
ATOL = 1e-5
SEED = 0
STEPS = 3
FRAMES = 3
PROMPTS = ["a red circle", "two blue squares and a green triangle"]
# Matches the shipped CLIP (96-wide tokens, 32 per prompt) and VAE (16x16x4 latents).
TEXT_MODEL = dict(sample_size=16, in_channels=4, caption_channels=96, max_text_tokens=32, patch_size=4,
                  hidden_size=32, num_heads=2)
BIAS_STD = 0.1


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """std 1/sqrt(fan_in) weights and 0.1 biases, so every path (text included) moves the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = BIAS_STD if p.ndim == 1 else p[0].numel() ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


@pytest.fixture(scope="module")
def clip() -> ShapesCLIP:
    return ShapesCLIP.from_pretrained(CLIP_FOLDER)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(VAE_FOLDER).eval()


def image_pipe(clip, vae, scheduler=None, **overrides) -> TextToImagePipeline:
    model = randomize_(PixArtDiT(depth=2, **{**TEXT_MODEL, **overrides}), seed=1)
    pipe = TextToImagePipeline(model, vae, scheduler or DDIMScheduler(), clip)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def video_pipe(clip, vae, scheduler=None, **overrides) -> TextToVideoPipeline:
    model = randomize_(LatteDiT(depth=1, num_frames=FRAMES, **{**TEXT_MODEL, **overrides}), seed=2)
    pipe = TextToVideoPipeline(model, vae, scheduler or DDIMScheduler(), clip)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ipipe(clip, vae) -> TextToImagePipeline:
    return image_pipe(clip, vae)


@pytest.fixture(scope="module")
def vpipe(clip, vae) -> TextToVideoPipeline:
    return video_pipe(clip, vae)


def seeded(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def record_forwards(model: torch.nn.Module) -> list[dict]:
    """Wrap model.forward (instance attribute) to record each call's batch and text mask."""
    calls, original = [], model.forward

    def forward(sample, timestep, encoder_hidden_states, encoder_attention_mask=None):
        calls.append(dict(batch=sample.shape[0], text=encoder_hidden_states.clone(),
                          mask=None if encoder_attention_mask is None else encoder_attention_mask.clone()))
        return original(sample, timestep, encoder_hidden_states, encoder_attention_mask)

    model.forward = forward
    return calls


# ----------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_image_output_types_and_shapes(ipipe, output_type):
    out = ipipe(PROMPTS, num_inference_steps=2, generator=seeded(), output_type=output_type,
                num_images_per_prompt=2)
    assert isinstance(out, TextToImageOutput)
    assert out.latents.shape == (4, 4, 16, 16)
    images = out.images
    if output_type == "pil":
        assert isinstance(images, list) and len(images) == 4
        assert all(isinstance(im, PIL.Image.Image) and im.size == (64, 64) and im.mode == "RGB" for im in images)
    elif output_type == "np":
        assert isinstance(images, np.ndarray) and images.shape == (4, 64, 64, 3)
        assert images.min() >= 0 and images.max() <= 1
    elif output_type == "pt":
        assert isinstance(images, torch.Tensor) and images.shape == (4, 3, 64, 64)
        assert images.min() >= 0 and images.max() <= 1
    else:
        assert torch.equal(images, out.latents)


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_video_output_types_and_shapes(vpipe, output_type):
    out = vpipe(PROMPTS, num_inference_steps=2, generator=seeded(), output_type=output_type)
    assert isinstance(out, TextToVideoOutput)
    assert out.latents.shape == (2, 4, FRAMES, 16, 16)
    frames = out.frames
    if output_type == "pil":
        assert isinstance(frames, list) and len(frames) == 2
        assert all(len(video) == FRAMES for video in frames)
        assert all(isinstance(im, PIL.Image.Image) and im.size == (64, 64) for video in frames for im in video)
    elif output_type == "np":
        assert isinstance(frames, np.ndarray) and frames.shape == (2, FRAMES, 64, 64, 3)
    elif output_type == "pt":
        assert isinstance(frames, torch.Tensor) and frames.shape == (2, FRAMES, 3, 64, 64)
    else:
        assert torch.equal(frames, out.latents)


def test_video_decodes_each_frame_alone(vpipe):
    """Frame f of sample b in the output is the VAE decode of latent frame f of sample b."""
    out = vpipe(PROMPTS, num_inference_steps=1, generator=seeded(), output_type="pt")
    cfg = vpipe.vae.config
    z = out.latents[1, :, 2][None] / cfg.scaling_factor + cfg.shift_factor  # sample 1, frame 2
    one = vpipe.image_processor.postprocess(vpipe.vae.decode(z).sample, "pt")[0]
    torch.testing.assert_close(out.frames[1, 2], one, atol=1e-5, rtol=0)


def test_return_tuple(ipipe):
    images, latents = ipipe("a red circle", num_inference_steps=1, output_type="pt", return_dict=False)
    assert images.shape == (1, 3, 64, 64) and latents.shape == (1, 4, 16, 16)


# ----------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("kind", ["image", "video"])
def test_seed_determinism(ipipe, vpipe, kind):
    pipe = ipipe if kind == "image" else vpipe
    a = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="pt")
    b = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="pt")
    c = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(SEED + 1), output_type="pt")
    assert torch.equal(a.latents, b.latents)
    assert not torch.allclose(a.latents, c.latents)


def test_ddpm_is_deterministic_from_the_seed(clip, vae):
    """DDPM draws step noise: it must come from the same generator."""
    pipe = image_pipe(clip, vae, scheduler=DDPMScheduler())
    a = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="latent").latents
    b = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="latent").latents
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- guidance
def manual_guided_step(pipe, prompts, negatives, guidance, shape):
    """One step of CFG built by hand: cond and uncond forwards run apart, then combined and stepped."""
    model, scheduler = pipe.transformer, DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(1)
    (t,) = scheduler.timesteps
    x = randn_tensor(shape, generator=seeded(), dtype=torch.float32) * scheduler.init_noise_sigma
    text_c, keep_c = pipe.text_encoder.encode_text_tokens(prompts)
    text_u, keep_u = pipe.text_encoder.encode_text_tokens(negatives)
    C = model.config.in_channels
    batch_t = t.expand(len(prompts))
    with torch.no_grad():
        eps_c = model(scheduler.scale_model_input(x, t), batch_t, text_c, keep_c)[:, :C]
        eps_u = model(scheduler.scale_model_input(x, t), batch_t, text_u, keep_u)[:, :C]
    assert not torch.allclose(eps_c, eps_u, atol=1e-3), "the text must move the prediction"
    eps = eps_u + guidance * (eps_c - eps_u)
    return scheduler.step(eps, t, x).prev_sample


@pytest.mark.parametrize("negative", ["", "a purple star"])
def test_batched_cfg_equals_separate_cond_and_uncond_image(ipipe, negative):
    got = ipipe(PROMPTS, negative_prompt=negative, num_inference_steps=1, guidance_scale=3.0,
                generator=seeded(), output_type="latent").latents
    expected = manual_guided_step(ipipe, PROMPTS, [negative] * len(PROMPTS), 3.0, (2, 4, 16, 16))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_batched_cfg_equals_separate_cond_and_uncond_video(vpipe):
    got = vpipe(PROMPTS, num_inference_steps=1, guidance_scale=3.0, generator=seeded(), output_type="latent").latents
    expected = manual_guided_step(vpipe, PROMPTS, ["", ""], 3.0, (2, 4, FRAMES, 16, 16))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_negative_prompt_list_is_per_prompt(ipipe):
    got = ipipe(PROMPTS, negative_prompt=["a purple star", ""], num_inference_steps=1, guidance_scale=3.0,
                generator=seeded(), output_type="latent").latents
    expected = manual_guided_step(ipipe, PROMPTS, ["a purple star", ""], 3.0, (2, 4, 16, 16))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_guidance_one_runs_one_forward_per_step_without_uncond(clip, vae):
    pipe = image_pipe(clip, vae)
    calls = record_forwards(pipe.transformer)
    pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=1.0, output_type="latent", num_images_per_prompt=2)
    assert [c["batch"] for c in calls] == [4] * STEPS
    calls.clear()
    pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=3.0, output_type="latent", num_images_per_prompt=2)
    assert [c["batch"] for c in calls] == [8] * STEPS  # [cond; uncond] in one forward


def test_text_mask_reaches_the_transformer(clip, vae):
    pipe = video_pipe(clip, vae)
    calls = record_forwards(pipe.transformer)
    pipe(PROMPTS, negative_prompt="a star", num_inference_steps=2, guidance_scale=2.0, output_type="latent",
         num_images_per_prompt=2)
    tokens, keep = clip.encode_text_tokens(PROMPTS + ["a star", "a star"])
    expected_keep = keep.repeat_interleave(2, dim=0)  # rows: p0, p0, p1, p1, neg x4
    assert len(calls) == 2
    for call in calls:
        assert call["mask"].dtype == torch.bool
        assert torch.equal(call["mask"], expected_keep)
        torch.testing.assert_close(call["text"], tokens.repeat_interleave(2, dim=0))
    assert not expected_keep.all(), "the prompts are padded: some tokens must be masked"


def test_all_kept_text_mask_is_dropped_and_the_result_unchanged(ipipe):
    """A keep mask with no padding reaches the transformer as None (dense cross-attention, no bias to build); the
    image is the one the explicit all-true mask gives."""
    tokens, keep = ipipe.text_encoder.encode_text_tokens(["a red circle", "a red circle", "", ""])
    L = int(keep[0].sum())  # both rows share the prompt, so cut the padding off: every remaining token is kept
    text, full = tokens[:, :L], torch.ones(4, L, dtype=torch.bool)
    calls = record_forwards(ipipe.transformer)
    try:
        run = dict(prompt_embeds=text[:2], negative_prompt_embeds=text[2:], num_inference_steps=2,
                   guidance_scale=3.0, output_type="latent")
        out_none = ipipe(**run, generator=seeded()).images
        assert calls and all(c["mask"] is None for c in calls)
        model = ipipe.transformer
        explicit = model.__class__.forward(model, out_none, torch.tensor([500, 500]), text[:2], full[:2])
        dropped = model.__class__.forward(model, out_none, torch.tensor([500, 500]), text[:2], None)
        torch.testing.assert_close(explicit, dropped)
    finally:
        del ipipe.transformer.forward  # the instance attribute record_forwards set
    calls.clear()


def test_learned_variance_goes_to_a_learned_range_scheduler(clip, vae):
    """With variance_type "learned_range" the conditional half's variance channels reach scheduler.step."""
    pipe = image_pipe(clip, vae, scheduler=DDPMScheduler(variance_type="learned_range"))
    seen = []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda model_output, *a, **k: seen.append(model_output.shape) or step(model_output, *a, **k)
    pipe(PROMPTS, num_inference_steps=2, guidance_scale=3.0, output_type="latent")
    assert seen == [(2, 8, 16, 16)] * 2


def test_samplers_swap_by_name(ipipe):
    for name in SAMPLERS:
        pipe = TextToImagePipeline(ipipe.transformer, ipipe.vae, ipipe.scheduler, ipipe.text_encoder).set_sampler(name)
        pipe.set_progress_bar_config(disable=True)
        assert isinstance(pipe.scheduler, SAMPLERS[name])
        out = pipe("a red circle", num_inference_steps=2, generator=seeded(), output_type="latent").latents
        assert torch.isfinite(out).all()


def test_callback_once_per_step(vpipe):
    seen = []
    vpipe(PROMPTS, num_inference_steps=STEPS, output_type="latent",
          callback=lambda step, t, latents: seen.append((step, int(t), tuple(latents.shape))))
    assert [s for s, _, _ in seen] == list(range(STEPS))
    assert [t for _, t, _ in seen] == vpipe.scheduler.timesteps.tolist()
    assert all(shape == (2, 4, FRAMES, 16, 16) for _, _, shape in seen)


def test_long_prompt_is_truncated_by_the_encoder(ipipe):
    """A prompt of more words than the encoder's 32-token context runs: ShapesCLIP truncates it."""
    long = " ".join(["a red circle and"] * 20)
    out = ipipe(long, num_inference_steps=1, output_type="latent")
    assert out.latents.shape == (1, 4, 16, 16)


# ----------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("kind", ["image", "video"])
def test_save_load_round_trip_references_shared_weights(clip, vae, tmp_path, kind):
    pipe = image_pipe(clip, vae) if kind == "image" else video_pipe(clip, vae)
    folder = tmp_path / "weights" / f"shapes-{kind}"
    pipe.save_pretrained(folder, vae_folder=VAE_FOLDER, text_encoder_folder=CLIP_FOLDER)
    index = json.loads((folder / "model_index.json").read_text())
    refs = index["component_folders"]
    assert refs["transformer"] == "transformer" and refs["scheduler"] == "scheduler"
    assert not Path(refs["vae"]).is_absolute() and (folder / refs["vae"]).resolve() == VAE_FOLDER
    assert (folder / refs["text_encoder"]).resolve() == CLIP_FOLDER
    assert sorted(p.name for p in folder.iterdir()) == ["model_index.json", "scheduler", "transformer"]

    cls = type(pipe)
    loaded = cls.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.transformer) is type(pipe.transformer) and type(loaded.scheduler) is DDIMScheduler
    a = pipe(PROMPTS, num_inference_steps=2, generator=seeded(), output_type="np")
    b = loaded(PROMPTS, num_inference_steps=2, generator=seeded(), output_type="np")
    a, b = (a.images, b.images) if kind == "image" else (a.frames, b.frames)
    np.testing.assert_array_equal(a, b)

    # A loaded pipeline remembers its shared folders, so it saves again without being told them.
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    refs2 = json.loads((again / "model_index.json").read_text())["component_folders"]
    assert (again / refs2["vae"]).resolve() == VAE_FOLDER
    assert (again / refs2["text_encoder"]).resolve() == CLIP_FOLDER


def test_from_pretrained_sampler_override(ipipe, tmp_path):
    ipipe.save_pretrained(tmp_path / "p", vae_folder=VAE_FOLDER, text_encoder_folder=CLIP_FOLDER)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "p", sampler="euler")
    assert isinstance(pipe.scheduler, SAMPLERS["euler"])
    with pytest.raises(ValueError, match="unknown sampler"):
        TextToImagePipeline.from_pretrained(tmp_path / "p", sampler="heun")
    with pytest.raises(ValueError, match="not a TextToVideoPipeline"):
        TextToVideoPipeline.from_pretrained(tmp_path / "p")


def test_save_and_load_errors(ipipe, tmp_path):
    with pytest.raises(ValueError, match="pass vae_folder="):
        ipipe.save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match="is not a folder"):
        ipipe.save_pretrained(tmp_path / "p", vae_folder=tmp_path / "nope", text_encoder_folder=CLIP_FOLDER)
    with pytest.raises(ValueError, match="no model_index.json"):
        TextToImagePipeline.from_pretrained(tmp_path)
    ipipe.save_pretrained(tmp_path / "p", vae_folder=VAE_FOLDER, text_encoder_folder=CLIP_FOLDER)
    index_path = tmp_path / "p" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["component_folders"]["vae"] = "../missing-vae"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="component folders not found: vae"):
        TextToImagePipeline.from_pretrained(tmp_path / "p")
    index["component_folders"]["vae"] = str(VAE_FOLDER)  # absolute references work too
    index["text_encoder"] = ["somewhere", "T5Encoder"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="unknown text encoder 'T5Encoder'"):
        TextToImagePipeline.from_pretrained(tmp_path / "p")


# ----------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=[]), "empty list"),
        (dict(prompt=3), "string or a list of strings"),
        (dict(prompt=None), "give a prompt"),
        (dict(prompt=["a red circle", 7]), "every prompt must be a string"),
        (dict(negative_prompt=["one"]), "negative_prompt must be"),
        (dict(negative_prompt=5), "negative_prompt must be"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=2.5), "num_inference_steps"),
        (dict(num_inference_steps=True), "num_inference_steps"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(guidance_scale=float("inf")), "guidance_scale"),
        (dict(guidance_scale="3"), "guidance_scale"),
        (dict(guidance_scale=True), "guidance_scale"),
        (dict(output_type="jpeg"), "unknown output_type"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(generator=[torch.Generator()] * 3), "3 generators for a batch of 2"),
    ],
)
def test_bad_inputs_raise(ipipe, vpipe, kwargs, match):
    args = {**dict(prompt=PROMPTS, num_inference_steps=1, output_type="latent"), **kwargs}
    for pipe in (ipipe, vpipe):
        with pytest.raises(ValueError, match=match):
            pipe(**args)


def test_unknown_sampler_raises(ipipe):
    with pytest.raises(ValueError, match="unknown sampler 'heun'; valid: ddpm"):
        TextToImagePipeline(ipipe.transformer, ipipe.vae, ipipe.scheduler, ipipe.text_encoder).set_sampler("heun")


def test_encoder_longer_than_max_text_tokens_raises(clip, vae):
    pipe = image_pipe(clip, vae, max_text_tokens=16)  # the shipped CLIP gives 32 tokens per prompt
    with pytest.raises(ValueError, match="gives 32 tokens per prompt.*max_text_tokens=16"):
        pipe("a red circle", num_inference_steps=1, output_type="latent")


def test_text_encoder_must_encode_tokens(ipipe):
    with pytest.raises(ValueError, match="encode_text_tokens"):
        TextToImagePipeline(ipipe.transformer, ipipe.vae, ipipe.scheduler, text_encoder=torch.nn.Identity())


@pytest.mark.parametrize("kind", ["image", "video"])
def test_prompt_embeds_give_the_prompt_result(ipipe, vpipe, kind):
    """Text tokens passed in (an outside encoder, as PixArt-α / Latte checkpoints use T5) give exactly what the
    pipeline's own encoder gives; a pipeline built without an encoder then samples from embeddings alone."""
    pipe = ipipe if kind == "image" else vpipe
    prompts, negative = ["a red star", "two blue circles"], "a green square"
    kw = dict(num_inference_steps=3, guidance_scale=3.0, output_type="latent")
    ref = pipe(prompts, negative_prompt=negative, generator=seeded(), **kw).latents
    text, keep = pipe.encode_prompts(prompts + [negative] * 2, torch.device("cpu"), torch.float32)
    embeds = dict(prompt_embeds=text[:2], prompt_attention_mask=keep[:2], negative_prompt_embeds=text[2:],
                  negative_prompt_attention_mask=keep[2:])
    torch.testing.assert_close(pipe(generator=seeded(), **embeds, **kw).latents, ref, rtol=0, atol=0)

    bare = type(pipe)(transformer=pipe.transformer, vae=pipe.vae, scheduler=pipe.scheduler, text_encoder=None)
    torch.testing.assert_close(bare(generator=seeded(), **embeds, **kw).latents, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no text encoder: pass prompt_embeds"):
        bare("a red star", **kw)
    with pytest.raises(ValueError, match="needs negative_prompt_embeds"):
        bare(prompt_embeds=text[:2], **kw)
    with pytest.raises(ValueError, match="prompt or prompt_embeds, not both"):
        pipe("a red star", prompt_embeds=text[:1], **kw)
    with pytest.raises(ValueError, match=r"prompt_embeds must be \(prompts, tokens"):
        pipe(prompt_embeds=text[:2, :, :5], negative_prompt_embeds=text[2:], **kw)
    with pytest.raises(ValueError, match="must match prompt_embeds"):
        pipe(prompt_embeds=text[:2], negative_prompt_embeds=text[2:3], **kw)
