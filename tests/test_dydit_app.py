"""DyDiT models in the app (app/catalog.py, app/generate.py, app/ui.py): `ditstudio models` lists a DyDiT folder
like any generator with its lambda and measured executed FLOPs, `ditstudio generate` runs it and records the
executed FLOPs of the batch, and the UI's model lists include it. The DyDiT folder references the shipped dense
shapes-c2i / shapes-t2i by relative path; its routers are set so that some heads, groups and tokens are off."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from app.catalog import describe, servable_models
from app.cli import main
from app.generate import generate_class_images, generate_text_images
from dit.dydit import DyDiT
from dit.dydit_io import load_dydit_pipeline, save_dydit

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
needs_shipped = pytest.mark.skipif(not (WEIGHTS / "shapes-c2i").is_dir() or not (WEIGHTS / "shapes-t2i").is_dir(),
                                   reason="shipped shapes models absent")


def dydit_folder(root: Path, base: str, lam: float = 0.5) -> Path:
    """A DyDiT of the shipped `base` with routers that switch part of the width and tokens off."""
    from dit.dydit_io import load_base_dit

    model = DyDiT.from_dit(load_base_dit(WEIGHTS / base))
    with torch.no_grad():
        for i, r in enumerate(model.routers):
            for lin in (r.head_router, r.channel_router):
                lin.weight.zero_()
                lin.bias.copy_(torch.tensor([3.0, -3.0, 3.0 if i % 2 else -3.0]))
            r.token_router[2].bias.fill_(0.0)
    folder = root / f"dy-{base}"
    save_dydit(folder, model, lam=lam, base=WEIGHTS / base)
    (folder / "card.json").write_text(json.dumps({"comparison": {"sampling_flops_ratio": 0.61}}))
    return folder


@needs_shipped
def test_models_lists_dydit_with_lambda_and_flops(tmp_path, capsys):
    extra = tmp_path / "models"
    folder = dydit_folder(extra, "shapes-c2i", lam=0.5)
    info = describe(folder)
    assert info["task"] == "class-to-image" and info["resolution"] == 64 and info["method"] == "DyDiT"
    assert info["lam"] == 0.5 and info["flops_executed"] == 0.61 and info["base"] == "shapes-c2i"
    assert str((WEIGHTS / "shapes-c2i").resolve()) in info["uses"]
    assert info["size_bytes"] < 200_000  # routers only; the dense weights are referenced
    assert main(["models", "--json", "--models-dir", str(extra)]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed[folder.name]["method"] == "DyDiT" and listed["shapes-c2i"]["method"] is None
    assert main(["models", "--models-dir", str(extra)]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith(folder.name))
    assert "0.61 (DyDiT, λ 0.5)" in row and "class-to-image" in row
    broken = extra / "dy-broken"
    broken.mkdir()
    (broken / "dydit_config.json").write_text(json.dumps({"format": "dydit", "base": "../nowhere"}))
    errors = {m["name"]: m.get("error") for m in servable_models(extra)}
    assert "cannot be served" in errors["dy-broken"]


@needs_shipped
def test_generate_runs_dydit_and_records_executed_flops(tmp_path, capsys):
    folder = dydit_folder(tmp_path, "shapes-c2i")
    results = generate_class_images(folder, [3, 7], steps=3, cfg=4.0, seed=1, device="cpu")
    settings = results[0][1]
    assert 0.2 < settings["flops_executed"] < 0.95
    assert settings["gflops_executed"] == pytest.approx(settings["gflops_dense"] * settings["flops_executed"],
                                                        rel=1e-2)
    # the same batch through the library pipeline: its counter gives the same ratio
    pipe = load_dydit_pipeline(folder)
    pipe.set_sampler("dpm++")
    pipe([3, 7], num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(1))
    assert pipe.transformer.counter.ratio == pytest.approx(settings["flops_executed"], abs=1e-4)
    # the CLI writes the PNGs with the settings embedded
    assert main(["generate", "--model", str(folder), "--class-label", "3", "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["settings"]["flops_executed"] < 0.95 and Path(record["path"]).is_file()
    # a DyDiT's masks change its shapes with t: --compile (a static whole-graph compile) is refused in one line
    assert main(["generate", "--model", str(folder), "--class-label", "3", "--steps", "2", "--device", "cpu",
                 "--compile", "default", "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a DyDiT model: --compile applies to dense transformers only" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out2").exists()


@needs_shipped
def test_text_dydit_generates(tmp_path):
    folder = dydit_folder(tmp_path, "shapes-t2i")
    (image, settings), = generate_text_images(folder, "a big red star", steps=2, seed=0, device="cpu")
    assert image.size == (64, 64) and settings["task"] == "text-to-image" and settings["flops_executed"] < 0.95


@needs_shipped
def test_ui_model_lists_include_dydit(tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from app.ui import models_by_kind

    root = tmp_path / "weights"
    root.mkdir()
    for name in ("shapes-c2i", "shapes-t2i", "shapes-vae", "shapes-clip"):
        os.symlink(WEIGHTS / name, root / name)
    dydit_folder(root, "shapes-c2i")
    kinds = models_by_kind(root)
    assert "dy-shapes-c2i" in kinds["class"] and "shapes-c2i" in kinds["class"]
    assert "dy-shapes-c2i" not in kinds["text"]


@needs_shipped
def test_evaluate_writes_the_comparison_into_the_card_and_eval_reruns_it(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(WEIGHTS.parent / "scripts"))
    import finetune_dydit

    folder = dydit_folder(tmp_path, "shapes-c2i")
    (folder / "card.json").unlink()
    comparison = finetune_dydit.main(finetune_dydit.parse_args(["--evaluate", str(folder), "--final-eval-n", "2"]))
    card = json.loads((folder / "card.json").read_text())
    assert card["comparison"]["kind"] == "class" and card["eval"]["n"] == 2 and card["eval"]["kind"] == "class"
    assert 0 <= card["comparison"]["dense"]["prompt_accuracy"] <= 1
    assert 0.2 < comparison["sampling_flops_ratio"] < 0.95
    assert "Dense vs DyDiT" in (folder / "README.md").read_text()
    assert describe(folder)["flops_executed"] == pytest.approx(comparison["sampling_flops_ratio"])
    capsys.readouterr()
    assert main(["eval", "--model", str(folder)]) == 0  # `ditstudio eval` re-runs the card's evaluation
    assert "prompt_accuracy" in capsys.readouterr().out
