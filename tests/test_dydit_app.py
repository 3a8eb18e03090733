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


@needs_shipped
def test_included_int8_backbone_is_served_with_the_base_pipelines_components(tmp_path):
    """A DyDiT trained on another dense transformer (here shapes-t2i's, perturbed) ships that backbone inside its
    folder, int8 with per-row scales, and borrows only the VAE, scheduler and text encoder of "base" (the shipped
    text DyDiT's layout, scripts/pack_dydit.py). The served model is the included backbone, not the base's, and
    it matches the float32 DyDiT within the int8 rounding."""
    from dit.dydit_io import BACKBONE_DIR, load_base_dit, load_dydit
    from dit.int8_weights import INT8_WEIGHTS

    dit = load_base_dit(WEIGHTS / "shapes-t2i")
    with torch.no_grad():
        dit.blocks[0].mlp.fc1.weight.mul_(1.5)  # another dense model than the base folder's
    model = DyDiT.from_dit(dit).eval()
    folder = save_dydit(tmp_path / "dy-own", model, lam=0.5, base=WEIGHTS / "shapes-t2i", include_backbone=True,
                        int8_backbone=True)
    config = json.loads((folder / "dydit_config.json").read_text())
    assert config["backbone"] == "included" and config["base"].endswith("shapes-t2i")
    assert (folder / BACKBONE_DIR / INT8_WEIGHTS).is_file()
    assert not list((folder / BACKBONE_DIR).glob("diffusion_pytorch_model*"))
    dense_bytes = (WEIGHTS / "shapes-t2i" / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert (folder / BACKBONE_DIR / INT8_WEIGHTS).stat().st_size < 0.6 * dense_bytes  # fp16 there, int8 here

    loaded = load_dydit(folder)
    w, w8 = dit.blocks[0].mlp.fc1.weight, loaded.dit.blocks[0].mlp.fc1.weight
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((w8 - w).abs() <= scale * 0.5 + 1e-3).all()  # the perturbed weights, rounded per row
    base_w = load_base_dit(WEIGHTS / "shapes-t2i").blocks[0].mlp.fc1.weight
    assert (w8 - base_w).abs().max() > 10 * scale.max()  # ... not the base folder's

    pipe = load_dydit_pipeline(folder)
    torch.testing.assert_close(pipe.transformer.dydit.dit.blocks[0].mlp.fc1.weight, w8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 8, dit.config.caption_channels, generator=g)
    for step in (100, 700):  # the sliced path shares one timestep per batch
        t = torch.tensor([step, step])
        with torch.no_grad():
            ref, got = model(x, t, text).sample, loaded(x, t, text).sample
        rel = ((got - ref).norm() / ref.norm()).item()
        assert 0 < rel < 2e-2


@needs_shipped
def test_pack_dydit_includes_the_backbone_and_keeps_the_routers(tmp_path):
    """scripts/pack_dydit.py: a routers-only folder repacked with its backbone included (int8) serves the same
    routers and a backbone within int8 rounding of the original; bad destinations are refused, nothing replaced."""
    import importlib.util

    from dit.dydit_io import load_dydit

    spec = importlib.util.spec_from_file_location("pack_dydit", Path(__file__).resolve().parents[1] / "scripts"
                                                  / "pack_dydit.py")
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    source = dydit_folder(tmp_path, "shapes-t2i")
    keep = tmp_path / "not-a-dydit"
    keep.mkdir()
    (keep / "file.txt").write_text("mine")
    with pytest.raises(SystemExit):
        pack.main([str(source), str(keep), "--components", str(WEIGHTS / "shapes-t2i"), "--int8"])
    assert (keep / "file.txt").read_text() == "mine"
    with pytest.raises(SystemExit):
        pack.main([str(source), str(tmp_path / "out"), "--components", str(WEIGHTS / "shapes-vae"), "--int8"])
    assert pack.main([str(source), str(tmp_path / "out"), "--components", str(WEIGHTS / "shapes-t2i"), "--int8"]) == 0
    a, b = load_dydit(source), load_dydit(tmp_path / "out")
    for (k, v), (k2, v2) in zip(a.routers.state_dict().items(), b.routers.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    config = json.loads((tmp_path / "out" / "dydit_config.json").read_text())
    assert config["backbone"] == "included" and config["trained_on"].endswith("shapes-t2i")
    w, w8 = a.dit.blocks[1].attn.qkv.weight, b.dit.blocks[1].attn.qkv.weight
    assert not torch.equal(w, w8) and ((w8 - w).abs() <= w.abs().amax(1, keepdim=True) / 254 + 1e-6).all()
