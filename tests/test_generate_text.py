"""`ditstudio generate` on the three kinds of pipeline folder: our own ClassToImagePipeline (VAE referenced),
TextToImagePipeline (PNG) and TextToVideoPipeline (GIF + frame PNGs). Each output equals calling the pipeline
directly with the same seed, steps and guidance; settings round-trip; a flag of the wrong kind is one clear line.

The models are tiny random transformers with the shipped VAE (weights/shapes-vae) and text encoder
(weights/shapes-clip) referenced, never the shipped c2i/t2i/t2v weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler

from app.cli import main
from app.generate import generate_class_images, generate_text_images, generate_videos, read_settings
from dit.dit import DiT
from dit.latte import LatteDiT
from dit.pipelines import ClassToImagePipeline
from dit.pixart import PixArtDiT
from dit.text_pipelines import TextToImagePipeline, TextToVideoPipeline
from shapes.clip import ShapesCLIP

ROOT = Path(__file__).resolve().parents[1]
VAE_FOLDER = ROOT / "weights" / "shapes-vae"
CLIP_FOLDER = ROOT / "weights" / "shapes-clip"
TEXT_MODEL = dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                  caption_channels=96, max_text_tokens=32)
FRAMES = 4
NUM_CLASSES = 48
NAMES = {i: f"shape {i}" for i in range(NUM_CLASSES)}
STEPS, SEED, CFG = 2, 5, 3.0
PROMPT = "a red circle"


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (the zero-initialised output layers included), so outputs depend on the input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = 0.1 if p.ndim == 1 else p[0].numel() ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(VAE_FOLDER).eval()


@pytest.fixture(scope="module")
def clip() -> ShapesCLIP:
    return ShapesCLIP.from_pretrained(CLIP_FOLDER)


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory, vae, clip) -> Path:
    path = tmp_path_factory.mktemp("tiny_t2i")
    pipe = TextToImagePipeline(randomize_(PixArtDiT(**TEXT_MODEL), 1), vae, DDIMScheduler(), clip)
    pipe.save_pretrained(path, vae_folder=VAE_FOLDER, text_encoder_folder=CLIP_FOLDER)
    return path


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory, vae, clip) -> Path:
    path = tmp_path_factory.mktemp("tiny_t2v")
    pipe = TextToVideoPipeline(randomize_(LatteDiT(**TEXT_MODEL, num_frames=FRAMES), 2), vae, DDIMScheduler(), clip)
    pipe.save_pretrained(path, vae_folder=VAE_FOLDER, text_encoder_folder=CLIP_FOLDER)
    return path


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory, vae) -> Path:
    path = tmp_path_factory.mktemp("tiny_c2i")
    model = randomize_(DiT(sample_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                           num_classes=NUM_CLASSES), 3)
    ClassToImagePipeline(model, vae, DDPMScheduler()).save_pretrained(path, vae_folder=VAE_FOLDER, id2label=NAMES)
    return path


def direct(cls, folder: Path, *args, **kwargs):
    """The pipeline called directly, on the CPU, with the test's seed, steps and guidance."""
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(*args, num_inference_steps=STEPS, guidance_scale=CFG,
                generator=torch.Generator("cpu").manual_seed(SEED), output_type="pil", **kwargs)


def argv(folder, out, *extra) -> list[str]:
    return ["generate", "--model", str(folder), "--steps", str(STEPS), "--cfg", str(CFG), "--seed", str(SEED),
            "--device", "cpu", "--out", str(out), *extra]


def records(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


def pixels(path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.array(image.convert("RGB"))


def test_text_png_equals_pipeline_and_carries_its_settings(text_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv(text_folder, out, "--prompt", PROMPT, "--negative-prompt", "blue")) == 0
    [record] = records(capsys)
    path = Path(record["path"])
    assert path.suffix == ".png" and [p.name for p in out.iterdir()] == [path.name]
    assert "_a-red-circle_5_0.png" in path.name
    expected = np.array(direct(TextToImagePipeline, text_folder, PROMPT, negative_prompt="blue").images[0])
    got = pixels(path)
    assert got.shape == expected.shape == (64, 64, 3)
    assert np.array_equal(got, expected) and got.std() > 1
    settings = read_settings(path)
    assert settings == record["settings"]
    assert {k: settings[k] for k in ("model", "task", "prompt", "negative_prompt", "steps", "cfg", "sampler", "seed",
                                     "index", "size", "device", "dtype")} == {
        "model": text_folder.name, "task": "text-to-image", "prompt": PROMPT, "negative_prompt": "blue",
        "steps": STEPS, "cfg": CFG, "sampler": "ddim", "seed": SEED, "index": 0, "size": [64, 64], "device": "cpu",
        "dtype": "float32"}


def test_text_prompts_repeat_and_num(text_folder, tmp_path, capsys):
    assert main(argv(text_folder, tmp_path / "out", "--prompt", PROMPT, "--prompt", "a green square",
                     "--num", "2")) == 0
    got = records(capsys)
    assert [r["settings"]["prompt"] for r in got] == [PROMPT, PROMPT, "a green square", "a green square"]
    assert [r["settings"]["index"] for r in got] == [0, 1, 2, 3]
    expected = direct(TextToImagePipeline, text_folder, [PROMPT, "a green square"], num_images_per_prompt=2).images
    for r, image in zip(got, expected):
        assert np.array_equal(pixels(r["path"]), np.array(image))


def test_video_gif_and_frames_equal_pipeline(video_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv(video_folder, out, "--prompt", PROMPT, "--save-frames", "--fps", "5")) == 0
    [record] = records(capsys)
    gif = Path(record["path"])
    assert gif.suffix == ".gif" and len(record["frames"]) == FRAMES
    assert sorted(p.name for p in out.iterdir()) == sorted([gif.name, *(Path(f).name for f in record["frames"])])
    expected = direct(TextToVideoPipeline, video_folder, PROMPT).frames[0]
    assert len(expected) == FRAMES
    for k, (frame_path, frame) in enumerate(zip(record["frames"], expected)):
        assert np.array_equal(pixels(frame_path), np.array(frame))
        assert read_settings(frame_path) == {**record["settings"], "frame": k}
    assert np.abs(np.array(expected[0]).astype(int) - np.array(expected[-1])).max() > 0  # frames differ

    with PIL.Image.open(gif) as image:
        assert image.n_frames == FRAMES and image.size == (64, 64)
        assert image.info["loop"] == 0 and image.info["duration"] == 200
    settings = read_settings(gif)
    assert settings == record["settings"]
    assert {k: settings[k] for k in ("task", "prompt", "num_frames", "fps", "size", "steps", "seed")} == {
        "task": "text-to-video", "prompt": PROMPT, "num_frames": FRAMES, "fps": 5.0, "size": [64, 64],
        "steps": STEPS, "seed": SEED}


def test_video_function_and_default_fps(video_folder, tmp_path, capsys):
    [(frames, settings)] = generate_videos(video_folder, PROMPT, steps=STEPS, cfg=CFG, seed=SEED, device="cpu")
    assert len(frames) == FRAMES and settings["num_frames"] == FRAMES and settings["negative_prompt"] == ""
    assert main(argv(video_folder, tmp_path / "out", "--prompt", PROMPT)) == 0
    [record] = records(capsys)
    assert record["frames"] == [] and record["settings"]["fps"] == 4.0
    with PIL.Image.open(record["path"]) as image:
        assert image.n_frames == FRAMES and image.info["duration"] == 250


def test_our_class_pipeline_folder_generates_with_names(class_folder, tmp_path, capsys):
    index = json.loads((class_folder / "model_index.json").read_text())
    assert index["_class_name"] == "ClassToImagePipeline" and not (class_folder / "vae").exists()
    assert not Path(index["component_folders"]["vae"]).is_absolute()
    out = tmp_path / "out"
    assert main(argv(class_folder, out, "--label", "shape 7")) == 0
    [record] = records(capsys)
    assert record["settings"]["label"] == 7 and record["settings"]["task"] == "class-to-image"
    assert read_settings(record["path"]) == record["settings"]
    expected = np.array(direct(ClassToImagePipeline, class_folder, [7]).images[0])
    got = pixels(record["path"])
    assert got.shape == (64, 64, 3) and np.array_equal(got, expected) and got.std() > 1
    by_id = generate_class_images(class_folder, 7, steps=STEPS, cfg=CFG, seed=SEED, device="cpu")
    assert np.array_equal(np.array(by_id[0][0]), got)


@pytest.mark.parametrize("which, extra, message", [
    ("text", ["--label", "3"], "is a text-to-image model: it takes --prompt, not --label"),
    ("video", ["--label", "3", "--prompt", "x"], "is a text-to-video model: it takes --prompt, not --label"),
    ("text", [], "is a text-to-image model: give --prompt"),
    ("text", ["--prompt", "x", "--save-frames"], "--save-frames only apply to text-to-video models"),
    ("video", ["--prompt", "x", "--fps", "0"], "--fps must be a finite number > 0"),
    ("class", ["--prompt", "a red circle"], "is a class-to-image model: it takes --label, not --prompt"),
    ("class", ["--label", "1", "--negative-prompt", "x"], "it takes --label, not --negative-prompt"),
    ("class", [], "is a class-to-image model: give --label"),
    ("class", ["--label", "1", "--fps", "3"], "--fps only apply to text-to-video models"),
    ("text", ["--prompt", "x", "--steps", "0"], "steps must be an integer >= 1"),
    ("video", ["--prompt", "x", "--cfg", "-2"], "cfg (guidance scale) must be a finite number >= 0"),
    ("text", ["--prompt", "x", "--num", "65"], "num must be an integer in [1, 64]"),
    ("video", ["--prompt", "x", "--sampler", "heun"], "unknown sampler 'heun'"),
])
def test_wrong_flags_give_one_clear_line(text_folder, video_folder, class_folder, tmp_path, capsys, which, extra,
                                         message):
    folder = {"text": text_folder, "video": video_folder, "class": class_folder}[which]
    assert main(argv(folder, tmp_path / "out", *extra)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("ditstudio generate: error: ")
    assert captured.out == "" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(steps=2.5), "steps must be an integer >= 1"),
    (dict(cfg=-0.5), "cfg (guidance scale) must be a finite number >= 0"),
    (dict(cfg=float("inf")), "cfg (guidance scale) must be a finite number >= 0"),
    (dict(num=0), "num must be an integer in [1, 64]"),
    (dict(num=65), "num must be an integer in [1, 64]"),
    (dict(seed=-1), "seed must be an integer in [0, 2**63)"),
    (dict(dtype="float8"), "unknown dtype 'float8'"),
    (dict(device="tpu"), "unknown device 'tpu'"),
])
def test_out_of_range_numbers_raise(text_folder, video_folder, class_folder, kwargs, message):
    calls = [lambda: generate_text_images(text_folder, PROMPT, **kwargs),
             lambda: generate_videos(video_folder, PROMPT, **kwargs),
             lambda: generate_class_images(class_folder, 1, **kwargs)]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert message in str(info.value)


def test_functions_refuse_the_wrong_kind_of_model(text_folder, class_folder):
    with pytest.raises(ValueError, match="is a text-to-image model .*not a class-to-image model"):
        generate_class_images(text_folder, 1, steps=STEPS, device="cpu")
    with pytest.raises(ValueError, match="is a class-to-image model .*not a text-to-video model"):
        generate_videos(class_folder, PROMPT, steps=STEPS, device="cpu")
    with pytest.raises(ValueError, match="no prompt given"):
        generate_text_images(text_folder, [], steps=STEPS, device="cpu")
