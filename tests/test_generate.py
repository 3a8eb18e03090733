"""`ditstudio generate`: the PNG it writes is diffusers' `DiTPipeline` image for the same folder, label, steps,
guidance and seed; settings round-trip through the PNG text; labels by name; bad input is one line, exit 2.

The model folder is the tiny random DiTPipeline of tests/test_pipelines.py, with an `id2label` written into its
model_index.json the way hub DiT folders carry it (save_pretrained does not write it). diffusers passes the null class
as 1000 (ImageNet); the reference run remaps it to the tiny model's 10 with a pre-hook, as test_pipelines.py does.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline

from app.cli import main
from app.generate import generate_class_images, load_pipeline, read_settings
from test_pipelines import DIFFUSERS_NULL_CLASS, NUM_CLASSES, tiny_transformer, tiny_vae

NAMES = ["tench, Tinca tinca", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray",
         "stingray", "cock", "hen", "ostrich"]
assert len(NAMES) == NUM_CLASSES
STEPS = 4
SEED = 7


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_dit")
    DiTPipeline(transformer=tiny_transformer(), vae=tiny_vae(), scheduler=DDIMScheduler()).save_pretrained(path)
    index = json.loads((path / "model_index.json").read_text())
    index["id2label"] = {str(i): name for i, name in enumerate(NAMES)}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def diffusers_uint8(folder: Path, label: int, device: str, guidance: float = 4.0) -> np.ndarray:
    """diffusers' DiTPipeline image as uint8, converted as its numpy_to_pil does."""
    ref = DiTPipeline.from_pretrained(folder).to(device)
    ref.set_progress_bar_config(disable=True)

    def null_to_ours(module, args, kwargs):
        y = kwargs["class_labels"]
        kwargs["class_labels"] = torch.where(y == DIFFUSERS_NULL_CLASS, torch.full_like(y, NUM_CLASSES), y)
        return args, kwargs

    ref.transformer.register_forward_pre_hook(null_to_ours, with_kwargs=True)
    images = ref([label], guidance_scale=guidance, num_inference_steps=STEPS,
                 generator=torch.Generator(device).manual_seed(SEED), output_type="np").images
    return (images[0] * 255).round().astype("uint8")


def generate(folder, out, *extra) -> list[str]:
    """argv with the test's steps and seed; `extra` comes last, so its options win (argparse keeps the last)."""
    return ["generate", "--model", str(folder), "--steps", str(STEPS), "--seed", str(SEED), "--out", str(out),
            *extra]


def test_png_equals_diffusers_and_carries_its_settings(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "--model", str(folder), "--class-label", "3", "--steps", "4", "--seed", "7",
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    path = Path(record["path"])
    assert [p.name for p in out.iterdir()] == [path.name]
    assert path.name.endswith(f"_{folder.name.replace('_', '-')}_3_7_0.png")  # '_' separates the fields
    settings = record["settings"]
    assert record["seed"] == SEED and record["model"] == folder.name and record["seconds"] == settings["seconds"]

    with PIL.Image.open(path) as image:
        got = np.asarray(image.convert("RGB"))
    expected = diffusers_uint8(folder, 3, settings["device"])
    assert got.shape == expected.shape == (16, 16, 3)
    # Identical on CPU; on a GPU the two pipelines' kernels may round a value across a uint8 step.
    tolerance = 0 if settings["device"] == "cpu" else 1
    assert np.abs(got.astype(int) - expected).max() <= tolerance
    assert got.std() > 1  # not a constant image

    assert read_settings(path) == settings
    assert {k: settings[k] for k in ("model", "task", "label", "steps", "cfg", "sampler", "seed", "index", "size",
                                     "dtype")} == {
        "model": folder.name, "task": "class-to-image", "label": 3, "steps": STEPS, "cfg": 4.0, "sampler": "ddim",
        "seed": SEED, "index": 0, "size": [16, 16], "dtype": "float32"}
    assert settings["device"] in ("cpu", "cuda") and settings["seconds"] >= 0


def test_label_by_name_and_alias_equals_label_by_id(folder):
    by_id = generate_class_images(folder, 0, steps=STEPS, seed=SEED, device="cpu")
    for name in ("tench", "Tinca tinca"):
        by_name = generate_class_images(folder, name, steps=STEPS, seed=SEED, device="cpu")
        assert by_name[0][1]["label"] == 0
        assert np.array_equal(np.asarray(by_name[0][0]), np.asarray(by_id[0][0]))


def test_num_sampler_and_pipeline_cache(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(generate(folder, out, "--class-label", "goldfish", "--num", "3", "--sampler", "euler",
                         "--cfg", "1.5", "--device", "cpu")) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["settings"]["index"] for r in records] == [0, 1, 2]
    assert {r["settings"]["sampler"] for r in records} == {"euler"}
    assert {r["settings"]["label"] for r in records} == {1}
    assert len(list(out.glob("*.png"))) == 3
    pixels = [np.asarray(PIL.Image.open(r["path"])) for r in records]
    assert np.abs(pixels[0].astype(int) - pixels[1]).max() > 0  # different noise per image
    # The sampler is per call: the cached pipeline goes back to the saved DDIM when none is named.
    assert load_pipeline.cache_info().currsize >= 1
    pipe_before = load_pipeline(folder.resolve(), "cpu", "float32")
    again = generate_class_images(folder, 1, steps=STEPS, seed=SEED, device="cpu")
    assert again[0][1]["sampler"] == "ddim"
    assert load_pipeline(folder.resolve(), "cpu", "float32") is pipe_before
    assert type(pipe_before.scheduler) is DDIMScheduler


@pytest.mark.parametrize("extra, message", [
    (["--class-label", "3", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--class-label", "platypus"], "unknown class label 'platypus'; valid names include"),
    (["--class-label", "10"], "class id 10 out of range"),
    (["--class-label", "3", "--steps", "0"], "steps must be an integer >= 1"),
    (["--class-label", "3", "--steps", "many"], "--steps must be an integer"),
    (["--class-label", "3", "--cfg", "-1"], "cfg (guidance scale) must be a finite number >= 0"),
    (["--class-label", "3", "--cfg", "nan"], "cfg (guidance scale) must be a finite number >= 0"),
    (["--class-label", "3", "--cfg", "lots"], "--cfg must be a number"),
    (["--class-label", "3", "--sampler", "heun"], "unknown sampler 'heun'; valid: ddpm, ddim, dpm++, euler"),
    (["--class-label", "3", "--num", "0"], "num must be an integer in [1, 64]"),
    (["--class-label", "3", "--num", "65"], "num must be an integer in [1, 64]"),
    (["--class-label", "3", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["--class-label", "3", "--device", "tpu"], "unknown device 'tpu'"),
    (["--class-label", "3", "--compile", "fastest"], "compile preset 'fastest' is unknown; valid: eager, default"),
    pytest.param(["--class-label", "3", "--device", "cuda"], "no CUDA device", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a CUDA device")),
])
def test_bad_input_gives_one_clear_line(folder, tmp_path, extra, message, capsys):
    argv = generate(folder, tmp_path / "out", *extra)
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("ditstudio generate: error: ")
    assert captured.out == "" and not (tmp_path / "out").exists()


def test_not_a_dit_pipeline_folder(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    assert main(generate(tmp_path, tmp_path / "out", "--class-label", "1")) == 2
    err = capsys.readouterr().err
    assert "is a 'PixArtAlphaPipeline' folder; generate takes DiTPipeline, ClassToImagePipeline, " \
           "TextToImagePipeline, TextToVideoPipeline" in err and len(err.strip().splitlines()) == 1


def test_compile_preset_gives_the_eager_image_and_is_recorded(folder, tmp_path, capsys):
    # `--compile default` runs the same transformer compiled in place (dit.fast): the image agrees with eager to
    # float32 rounding (a uint8 step at most where fusion reorders sums), the PNG records the preset, and the cached
    # pipeline goes back to eager for the next eager call
    from dit.fast import preset_of

    eager = np.asarray(generate_class_images(folder, 3, steps=STEPS, seed=SEED)[0][0]).astype(int)
    image, settings = generate_class_images(folder, 3, steps=STEPS, seed=SEED, compile="default")[0]
    assert settings["compile"] == "default"
    assert preset_of(load_pipeline(folder.resolve(), "cpu", "float32").transformer) == "default"
    assert np.abs(np.asarray(image).astype(int) - eager).max() <= 1
    assert main(generate(folder, tmp_path / "out", "--class-label", "3", "--compile", "default")) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["settings"]["compile"] == "default" and read_settings(record["path"])["compile"] == "default"
    again, plain = generate_class_images(folder, 3, steps=STEPS, seed=SEED)[0]
    assert "compile" not in plain and np.array_equal(np.asarray(again).astype(int), eager)
    assert preset_of(load_pipeline(folder.resolve(), "cpu", "float32").transformer) == "eager"


def test_fp8_linears_are_applied_recorded_and_undone(folder, tmp_path, capsys):
    # `fp8=True` / `--fp8` swaps the cached transformer's block linears for dit.fp8's (on the CPU their exact
    # emulation): the image moves by about e4m3's error and no more, the PNG records it, and the next plain call gets
    # the float layers back (the same image as before, bit for bit)
    from dit.fp8 import FP8Linear, is_quantized

    eager = np.asarray(generate_class_images(folder, 3, steps=STEPS, seed=SEED)[0][0]).astype(int)
    image, settings = generate_class_images(folder, 3, steps=STEPS, seed=SEED, fp8=True)[0]
    transformer = load_pipeline(folder.resolve(), "cpu", "float32").transformer
    assert settings["fp8"] is True and is_quantized(transformer)
    assert isinstance(transformer.blocks[0].mlp.fc2, FP8Linear)
    diff = np.abs(np.asarray(image).astype(int) - eager)
    assert diff.mean() < 8 and diff.max() < 128, (diff.mean(), diff.max())
    assert main(generate(folder, tmp_path / "out", "--class-label", "3", "--fp8")) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["settings"]["fp8"] is True and read_settings(record["path"])["fp8"] is True
    again, plain = generate_class_images(folder, 3, steps=STEPS, seed=SEED)[0]
    assert "fp8" not in plain and np.array_equal(np.asarray(again).astype(int), eager)
    assert not is_quantized(transformer) and type(transformer.blocks[0].mlp.fc2) is torch.nn.Linear
