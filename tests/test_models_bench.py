"""`ditstudio models` (the catalog: shipped, --models-dir and path folders, corrupt ones skipped with a reason),
`ditstudio bench` / `app.bench.run_bench` on the shipped c2i and t2i models at 2 steps, and generate's
--size / --frames checks (one clear line, exit code 2, before any sampling)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import app.generate
from app.bench import run_bench
from app.catalog import describe, resolve_model, servable_models
from app.cli import main

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights"
STEPS = 2


def real_size(folder: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def diffusers_dit_folder(path: Path, sample_size: int = 32) -> Path:
    """The config files of a diffusers DiTPipeline folder (no weights: the catalog reads only configs)."""
    (path / "transformer").mkdir(parents=True)
    (path / "vae").mkdir()
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "KarrasDiffusionSchedulers"]}))
    (path / "transformer" / "config.json").write_text(json.dumps({
        "_class_name": "DiTTransformer2DModel", "sample_size": sample_size, "patch_size": 2}))
    (path / "vae" / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512]}))
    return path


# The shipped VAR models (issue 9), sharing weights/shapes-vqvae.
VAR_SHIPPED = ("shapes-var-c2i", "shapes-var-t2i")


def models_json(argv, capsys) -> list[dict]:
    assert main(["models", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_models_lists_the_shipped_generators(capsys):
    models = {m["name"]: m for m in models_json([], capsys)}
    dynamic = {n for n in ("shapes-dydit-c2i", "shapes-dydit-t2i") if (WEIGHTS / n).is_dir()}  # DyDiT (issue 8)
    # components (VAE, CLIP, the VAR tokenizer) are left out without --all
    assert set(models) == {"shapes-c2i", "shapes-t2i", "shapes-t2v", *VAR_SHIPPED, *dynamic}
    tasks = {"shapes-c2i": "class-to-image", "shapes-t2i": "text-to-image", "shapes-t2v": "text-to-video",
             "shapes-dydit-c2i": "class-to-image", "shapes-dydit-t2i": "text-to-image",
             "shapes-var-c2i": "class-to-image", "shapes-var-t2i": "text-to-image"}
    for name, m in models.items():
        assert m["task"] == tasks[name] and m["resolution"] == 64 and m["source"] == "shipped"
        assert "error" not in m
        real = real_size(WEIGHTS / name) / 2**20
        assert abs(m["size_mb"] - real) <= 0.1 * real
    assert models["shapes-t2v"]["frames"] == 8
    assert models["shapes-c2i"]["frames"] is None and models["shapes-t2i"]["frames"] is None
    everything = {m["name"]: m for m in models_json(["--all"], capsys)}
    assert everything["shapes-vae"]["task"] == everything["shapes-clip"]["task"] == "component"
    assert everything["shapes-vqvae"]["task"] == "component"
    for name in VAR_SHIPPED:  # the VAR models share the one tokenizer folder (issue 9)
        assert models[name]["family"] == "var" and any(u.endswith("shapes-vqvae") for u in models[name]["uses"])


def test_models_dir_corrupt_folder_and_path_argument(tmp_path, capsys):
    extra = tmp_path / "models"
    diffusers_dit_folder(extra / "imagenet-dit")
    (extra / "broken").mkdir()
    (extra / "broken" / "model_index.json").write_text("{not json")
    (extra / "empty").mkdir()
    given = diffusers_dit_folder(tmp_path / "elsewhere" / "my-dit", sample_size=64)
    models = {m["name"]: m for m in models_json(["--models-dir", str(extra), str(given)], capsys)}
    dynamic = {n for n in ("shapes-dydit-c2i", "shapes-dydit-t2i") if (WEIGHTS / n).is_dir()}  # DyDiT (issue 8)
    assert {"shapes-c2i", "shapes-t2i", "shapes-t2v", *VAR_SHIPPED, "imagenet-dit", "broken", "empty", "my-dit",
            *dynamic} == set(models)
    assert models["imagenet-dit"]["source"] == "models-dir" and models["imagenet-dit"]["task"] == "class-to-image"
    assert models["imagenet-dit"]["resolution"] == 256  # 32 latent px x 8 (4 VAE blocks)
    assert models["my-dit"]["source"] == "path" and models["my-dit"]["resolution"] == 512
    assert "not valid JSON" in models["broken"]["error"] and models["broken"]["source"] == "models-dir"
    assert "no model_index.json" in models["empty"]["error"]
    # The table names the readable models and the skipped ones with their reasons.
    assert main(["models", "--models-dir", str(extra), str(given)]) == 0
    out = capsys.readouterr().out
    assert "imagenet-dit" in out and "my-dit" in out and "skipped" in out and "not valid JSON" in out
    # resolve_model finds a models-dir folder by name; the catalog functions agree with the CLI.
    assert resolve_model("imagenet-dit", extra) == extra / "imagenet-dit"
    assert describe(given)["resolution"] == 512
    assert [m["name"] for m in servable_models(extra, [given])] == list(models)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "user_bench.json"
    code = main(["bench", "--model", "shapes-c2i", "--model", "shapes-t2i", "--steps", str(STEPS), "--repeats", "1",
                 "--device", "cpu", "--out", str(out)])
    return code, out


def test_bench_rows_flops_and_files(bench_run):
    code, out = bench_run
    assert code == 0 and out.is_file() and out.with_suffix(".png").stat().st_size > 1000
    result = json.loads(out.read_text())
    assert result["torch"] and result["date"] and "CPU" in result["device"]
    assert result["command"].startswith("ditstudio bench --model shapes-c2i --model shapes-t2i")
    rows = result["rows"]
    assert [r["model"] for r in rows] == ["shapes-c2i", "shapes-t2i"]
    assert [r["task"] for r in rows] == ["class-to-image", "text-to-image"]
    assert rows[0]["speedup"] == 1.0
    for r in rows:
        assert r["img_per_s"] > 0 and r["s_per_img"] > 0 and r["gflops"] > 0 and r["frames_per_s"] is None
        assert r["speedup"] == pytest.approx(rows[0]["s_per_img"] / r["s_per_img"], rel=1e-2)
        # Hand estimate: 2 FLOPs per parameter per token, cond + uncond halves, every step.
        estimate = 2 * r["params"] * r["tokens"] * 2 * STEPS / 1e9
        assert r["tokens"] == 256 and estimate / 2 < r["gflops"] < estimate * 2
        assert r["pipeline_gflops"] > r["gflops"]  # + the VAE decoder (and text encoder)


def test_run_bench_is_callable_and_checks_before_loading(monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("loaded a model before checking the arguments")

    monkeypatch.setattr(app.generate, "load_pipeline", no_loading)
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        run_bench(["shapes-c2i", "no-such-model"], steps=STEPS, repeats=1, device="cpu")
    with pytest.raises(ValueError, match="not a generator"):
        run_bench(["shapes-vae"], steps=STEPS, repeats=1, device="cpu")
    with pytest.raises(ValueError, match="no efficiency methods"):
        run_bench(["shapes-c2i"], variants=["tread"], device="cpu")
    with pytest.raises(ValueError, match="generates 64 px only"):
        run_bench(["shapes-c2i"], size=128, device="cpu")


@pytest.mark.parametrize("argv, message", [
    (["bench", "--model", "shapes-c2i", "--variant", "tread"], "--variant tread: no efficiency methods"),
    (["bench", "--model", "shapes-c2i", "--size", "128"], "--size 128: model shapes-c2i generates 64 px only"),
    (["bench", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["generate", "--model", "shapes-c2i", "--label", "1", "--size", "128", "--out", "{out}"],
     "--size 128: model shapes-c2i generates 64 px images only; give --size 64"),
    (["generate", "--model", "shapes-t2v", "--prompt", "x", "--frames", "16", "--out", "{out}"],
     "--frames 16: model shapes-t2v generates exactly 8 frames"),
    (["generate", "--model", "shapes-t2i", "--prompt", "x", "--frames", "8", "--out", "{out}"],
     "--frames only apply to text-to-video models"),
    (["generate", "--model", "shapes-t2v", "--prompt", "x", "--frames", "eight", "--out", "{out}"],
     "--frames must be an integer"),
    (["models", "--models-dir", "/no/such/dir"], "--models-dir /no/such/dir is not a folder"),
])
def test_mismatches_are_one_line_before_sampling(argv, message, tmp_path, monkeypatch, capsys):
    def no_loading(*a, **k):
        raise AssertionError("loaded a model before checking the arguments")

    monkeypatch.setattr(app.generate, "load_pipeline", no_loading)
    argv = [a.replace("{out}", str(tmp_path / "out")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_generate_accepts_the_models_own_size_and_frames():
    from argparse import Namespace

    folder = resolve_model("shapes-t2v")
    app.generate._check_shape(Namespace(size="64", frames="8"), folder)  # the model's own values: no error
    app.generate._check_shape(Namespace(size=None, frames=None), folder)
    with pytest.raises(ValueError, match="generates exactly 8 frames"):
        app.generate._check_shape(Namespace(size=None, frames="4"), folder)


def test_bench_a_named_dit_size_with_random_weights():
    """`ditstudio bench --model DiT-XL/2` times a named size with random weights (the speed issue's row); here
    the tiny size, through the same path: a 64 px class-to-image row, FLOPs counted, eager recorded."""
    result = run_bench(["DiT-T/2"], steps=2, batch=2, device="cpu", repeats=1)
    (row,) = result["rows"]
    assert row["model"] == "DiT-T/2 (random weights)" and row["path"] is None
    assert row["task"] == "class-to-image" and row["resolution"] == 64 and row["compile"] == "eager"
    assert row["tokens"] == 64 and row["gflops"] > 0 and row["img_per_s"] > 0
    with pytest.raises(ValueError, match="unknown preset"):
        run_bench(["DiT-T/2"], steps=2, device="cpu", compile="turbo")
    # --compile: counted before compiling (torch.compile does not run under FlopCounterMode), so the FLOPs are the
    # eager row's and the timed samples run the compiled model
    compiled = run_bench(["DiT-T/2"], steps=2, batch=2, device="cpu", repeats=1, compile="default")["rows"][0]
    assert compiled["compile"] == "default" and compiled["gflops"] == pytest.approx(row["gflops"], rel=1e-6)
    # --fp8: the same row with FP8 block linears (the CPU's emulation), recorded; same FLOPs
    fp8 = run_bench(["DiT-T/2"], steps=2, batch=2, device="cpu", repeats=1, fp8=True)["rows"][0]
    assert fp8["fp8"] is True and row["fp8"] is False and fp8["gflops"] == pytest.approx(row["gflops"], rel=0.01)
    with pytest.raises(ValueError, match="--size 128: DiT-XL/2 generates 256 px only"):
        run_bench(["DiT-XL/2"], size=128, device="cpu")
