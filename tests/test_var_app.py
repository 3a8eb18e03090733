"""VAR in the app: a saved VARPipeline folder is a model of the catalog, `ditstudio generate`, the UI tabs and
`ditstudio eval`. The folders are tiny random pipelines (VAR-tiny / TextVAR-tiny on vqvae-tiny: 16 px, scales
1, 2, 4, 8), built as tests/test_var.py builds them; the text one references the shipped shapes CLIP.

What must hold: the catalog reads task, family and resolution from the folder and names what is broken; generate is
seeded (the same images twice) and gives exactly the tokens and pixels of calling VARPipeline directly; top-k /
top-p are checked, and refused for diffusion models (steps / sampler / negative prompt for VAR); eval routes to
evaluate_var; the UI handler produces the images generate gives, with one preview per scale."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline

from app import generate as gen
from app.catalog import describe, servable_models
from app.cli import main
from test_pipelines import tiny_transformer, tiny_vae
from vlm.var import VAR, TextVAR
from vlm.var_pipeline import DEFAULT_SAMPLING, VARPipeline, evaluate_var
from vlm.vqvae import MultiScaleVQVAE

CLIP = Path(__file__).resolve().parents[1] / "weights" / "shapes-clip"
needs_clip = pytest.mark.skipif(not (CLIP / "config.json").is_file(), reason="shipped shapes-clip absent")
SCALES = 4  # VAR-tiny's patch_nums (1, 2, 4, 8)
torch.set_num_threads(1)  # as tests/test_var.py: these tiny models run fastest on one thread of a shared CPU


@pytest.fixture(scope="module")
def class_var(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    pipe = VARPipeline(VAR.from_name("VAR-tiny").eval(), MultiScaleVQVAE.from_name("vqvae-tiny").eval())
    folder = tmp_path_factory.mktemp("models") / "tiny-var-c2i"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_var(tmp_path_factory) -> Path:
    if not (CLIP / "config.json").is_file():
        pytest.skip("shipped shapes-clip absent")
    from shapes.clip import ShapesCLIP

    clip = ShapesCLIP.from_pretrained(CLIP)
    torch.manual_seed(1)
    pipe = VARPipeline(TextVAR.from_name("TextVAR-tiny", text_dim=clip.config.text_width).eval(),
                       MultiScaleVQVAE.from_name("vqvae-tiny").eval(), text_encoder=clip)
    folder = tmp_path_factory.mktemp("models") / "tiny-var-t2i"
    pipe.save_pretrained(folder, text_encoder_folder=CLIP)
    return folder


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dit") / "tiny-dit"
    DiTPipeline(transformer=tiny_transformer(), vae=tiny_vae(), scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, PIL.Image.Image) else PIL.Image.open(image)
                      .convert("RGB"))


# ----------------------------------------------------------------------------------------------- catalog
def test_catalog_describes_var_folders(class_var):
    info = describe(class_var)
    assert {k: info[k] for k in ("name", "task", "class_name", "transformer", "family", "resolution", "frames",
                                 "uses")} == {
        "name": "tiny-var-c2i", "task": "class-to-image", "class_name": "VARPipeline", "transformer": "VAR",
        "family": "var", "resolution": 16, "frames": None, "uses": []}
    assert info["size_bytes"] == sum(f.stat().st_size for f in class_var.rglob("*") if f.is_file())
    listed = servable_models(extra_paths=[class_var])
    assert [m["task"] for m in listed if m["name"] == "tiny-var-c2i"] == ["class-to-image"]
    assert gen.model_kind(class_var) == gen.CLASS and gen.is_var(class_var) and gen.var_scales(class_var) == SCALES


@needs_clip
def test_catalog_describes_a_text_var_and_its_referenced_encoder(text_var):
    info = describe(text_var)
    assert (info["task"], info["transformer"], info["family"], info["resolution"]) == (
        "text-to-image", "TextVAR", "var", 16)
    assert info["uses"] == [str(CLIP.resolve())]
    assert gen.model_kind(text_var) == gen.TEXT


@pytest.mark.parametrize("edit, message", [
    (lambda index, folder: index["transformer"].__setitem__(1, "GPT"), "'GPT' VAR transformer; valid: VAR, TextVAR"),
    (lambda index, folder: index["component_folders"].pop("vqvae"), "no component_folders entry for the tokenizer"),
    (lambda index, folder: (folder / "tokenizer" / "config.json").unlink(), "tokenizer config .* not found"),
    (lambda index, folder: (folder / "tokenizer" / "config.json").write_text("{}"), "no valid sample_size"),
    (lambda index, folder: index.update(transformer=["vlm.var", "TextVAR"]),
     "no component_folders entry for the text encoder"),
])
def test_catalog_names_what_is_broken(class_var, tmp_path, edit, message):
    folder = tmp_path / "broken"
    shutil.copytree(class_var, folder)
    index = json.loads((folder / "model_index.json").read_text())
    edit(index, folder)
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message):
        describe(folder)
    assert [m["error"] for m in servable_models(extra_paths=[folder]) if m["path"] == str(folder)]


# ----------------------------------------------------------------------------------------------- generate
def test_generate_is_seeded_and_equals_the_pipeline(class_var):
    calls = []

    def record(k, K, tokens, f_hat):
        calls.append((k, K, [t.clone() for t in tokens], tuple(f_hat.shape)))

    kwargs = dict(cfg=2.0, seed=5, num=2, top_k=10, top_p=0.9, device="cpu")
    first = gen.generate_var_images(class_var, [3, "7"], callback=record, **kwargs)
    again = gen.generate_var_images(class_var, [3, 7], **kwargs)
    assert [k for k, *_ in calls] == list(range(SCALES)) and {K for _, K, *_ in calls} == {SCALES}
    assert len(first) == 4 and all(np.array_equal(pixels(a), pixels(b)) for (a, _), (b, _) in zip(first, again))
    assert {k: first[1][1][k] for k in ("model", "task", "family", "label", "index", "size", "scales", "cfg", "top_k",
                                        "top_p", "seed", "dtype")} == {
        "model": "tiny-var-c2i", "task": "class-to-image", "family": "var", "label": 3, "index": 1, "size": [16, 16],
        "scales": SCALES, "cfg": 2.0, "top_k": 10, "top_p": 0.9, "seed": 5, "dtype": "float32"}
    assert [s["label"] for _, s in first] == [3, 3, 7, 7]

    pipe = VARPipeline.from_pretrained(class_var)
    direct = pipe([3, 7], guidance_scale=2.0, top_k=10, top_p=0.9, num_images_per_prompt=2,
                  generator=torch.Generator("cpu").manual_seed(5))
    tokens = calls[-1][2]
    assert len(tokens) == SCALES and all(torch.equal(a, b) for a, b in zip(tokens, direct.tokens))
    assert all(np.array_equal(pixels(a), pixels(b)) for (a, _), b in zip(first, direct.images))
    other = pipe([3, 7], guidance_scale=2.0, top_k=10, top_p=0.9, num_images_per_prompt=2,
                 generator=torch.Generator("cpu").manual_seed(6))
    assert not all(torch.equal(a, b) for a, b in zip(tokens, other.tokens))  # the seed matters


def _argv(folder, out, *extra):
    return ["generate", "--model", str(folder), "--seed", "5", "--cfg", "2", "--out", str(out), *extra]


def test_cli_writes_the_pngs_of_generate(class_var, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(class_var, out, "--label", "3", "--num", "2", "--top-k", "10", "--top-p", "0.9")) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(records) == 2 and len(list(out.glob("*.png"))) == 2
    expected = gen.generate_var_images(class_var, 3, cfg=2.0, seed=5, num=2, top_k=10, top_p=0.9, device="cpu")
    for record, (image, settings) in zip(records, expected):
        assert gen.read_settings(record["path"]) == record["settings"]
        assert {k: v for k, v in record["settings"].items() if k != "seconds"} == \
            {k: v for k, v in settings.items() if k != "seconds"}
        assert np.array_equal(pixels(record["path"]), pixels(image))


@needs_clip
def test_cli_text_var_is_seeded(text_var, tmp_path, capsys):
    for out in (tmp_path / "a", tmp_path / "b"):
        assert main(_argv(text_var, out, "--prompt", "a big red star", "--top-k", "5")) == 0
    a, b = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert a["settings"]["prompt"] == "a big red star" and a["settings"]["task"] == "text-to-image"
    assert np.array_equal(pixels(a["path"]), pixels(b["path"]))
    direct = VARPipeline.from_pretrained(text_var)(["a big red star"], guidance_scale=2.0, top_k=5, top_p=0.0,
                                                   generator=torch.Generator("cpu").manual_seed(5))
    assert np.array_equal(pixels(a["path"]), pixels(direct.images[0]))


@pytest.mark.parametrize("extra, message", [
    (["--label", "3", "--top-k", "-1"], r"top-k must be an integer >= 0 \(0 = off\); got -1"),
    (["--label", "3", "--top-k", "2.5"], "--top-k must be an integer; got '2.5'"),
    (["--label", "3", "--top-p", "1.5"], r"top-p must be a number in \[0, 1\] \(0 = off\); got 1.5"),
    (["--label", "3", "--top-p", "-0.1"], r"top-p must be a number in \[0, 1\]"),
    (["--label", "3", "--top-p", "nan"], r"top-p must be a number in \[0, 1\]"),
    (["--label", "3", "--steps", "10"], "VAR \\(next-scale\\) model: it samples one step per scale and takes no "
                                        "--steps"),
    (["--label", "3", "--sampler", "ddim"], "takes no --sampler"),
    (["--label", "3", "--compile", "default"], "takes no --compile"),
    (["--label", "3", "--cfg", "-1"], r"cfg \(guidance scale\) must be a finite number >= 0"),
    (["--label", "10"], r"class id 10 out of range: model has classes \[0, 10\)"),
    (["--prompt", "a red star"], "it takes --label, not --prompt"),
    (["--label", "3", "--size", "64"], "generates 16 px images only"),
])
def test_bad_var_input_gives_one_clear_line(class_var, tmp_path, extra, message, capsys):
    assert main(_argv(class_var, tmp_path / "out", *extra)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ditstudio generate: error: ")
    assert re.search(message, err), err
    assert captured.out == "" and not (tmp_path / "out").exists()


def test_diffusion_models_refuse_top_k_and_top_p(dit_folder, class_var, tmp_path, capsys):
    for flag in ("--top-k", "--top-p"):
        assert main(_argv(dit_folder, tmp_path / "out", "--label", "3", flag, "0")) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"ditstudio generate: error: model {dit_folder} is a class-to-image model: {flag} only "
                       "applies to VAR (next-scale) models, not to this diffusion model")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="is a diffusion model, not a VAR model"):
        gen.generate_var_images(dit_folder, 3, top_k=5, device="cpu")
    with pytest.raises(ValueError, match="is a VAR \\(next-scale\\) model: it has no steps or sampler"):
        gen.generate_class_images(class_var, 3, steps=4, device="cpu")


def test_cli_defaults_to_the_cards_sampling_settings(tmp_path):
    """A shipped VAR model is sampled at its card's evaluation settings unless the command line says otherwise."""
    out = tmp_path / "out"
    argv = ["generate", "--model", "shapes-var-c2i", "--label", "3", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    (png,) = sorted(out.glob("*.png"))
    settings = gen.read_settings(png)
    assert (settings["cfg"], settings["top_k"], settings["top_p"]) == (2.0, 0, 0.8)  # weights/shapes-var-c2i/card.json
    assert main([*argv, "--cfg", "3", "--top-p", "0"]) == 0
    settings = gen.read_settings(sorted(out.glob("*.png"), key=lambda p: p.stat().st_mtime)[-1])
    assert (settings["cfg"], settings["top_p"]) == (3.0, 0.0)


def test_cuda_graphs_flag_only_for_var_on_cuda(dit_folder, class_var, tmp_path, capsys):
    assert main(_argv(dit_folder, tmp_path / "out", "--label", "3", "--cuda-graphs")) == 2
    assert "--cuda-graphs only applies to VAR" in capsys.readouterr().err
    assert main(_argv(class_var, tmp_path / "out", "--label", "3", "--cuda-graphs", "--device", "cpu")) == 2
    assert "--cuda-graphs needs --device cuda (got cpu)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@needs_clip
def test_text_var_refuses_a_negative_prompt(text_var, tmp_path, capsys):
    assert main(_argv(text_var, tmp_path / "out", "--prompt", "a red star", "--negative-prompt", "blue")) == 2
    assert "takes no --negative-prompt" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- eval
EVAL_KEYS = {"prompt_accuracy", "shape", "colour", "count", "guidance_scale", "top_k", "top_p", "n", "seed",
             "eval_seconds"}


def test_eval_routes_to_evaluate_var(class_var, tmp_path, capsys):
    assert main(["eval", "--model", str(class_var), "--n", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    metrics = result["metrics"]
    assert set(metrics) == EVAL_KEYS and (result["n"], result["seed"], result["card_metrics"]) == (4, 0, {})
    assert {k: metrics[k] for k in DEFAULT_SAMPLING} == DEFAULT_SAMPLING  # no card: VAR's default sampling
    direct = evaluate_var(VARPipeline.from_pretrained(class_var), n=4, seed=0)
    assert {k: v for k, v in metrics.items() if k != "eval_seconds"} == pytest.approx(
        {k: v for k, v in direct.items() if k != "eval_seconds"}, nan_ok=True)
    # with a model card: its sample count, seed and sampling settings, and its metrics beside
    carded = tmp_path / "carded"
    shutil.copytree(class_var, carded)
    (carded / "card.json").write_text(json.dumps({"eval": {"kind": "var-class", "n": 3, "seed": 2, "cfg": 1.0,
                                                           "top_k": 5, "top_p": 0.5},
                                                  "metrics": {"prompt_accuracy": 0.25}}))
    assert main(["eval", "--model", str(carded)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("carded: n=3 seed=2") and "prompt_accuracy" in text and "0.2500" in text
    assert main(["eval", "--model", str(class_var), "--n", "0"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- UI
def _drain(handler, *args, progress=lambda *a, **k: None) -> list:
    """Every tuple a UI generate handler yields."""
    return list(handler(*args, progress=progress))


def test_ui_class_tab_generates_a_var_folder(class_var, tmp_path):
    gr = pytest.importorskip("gradio")
    from app import ui

    seen = []
    handler = ui.make_generate(gen.CLASS, tmp_path, "cpu")
    outputs = _drain(handler, str(class_var), "3", "", "dpm++", 25, 2.0, 5, False, 2, ["earlier.png"], 10, 0.9,
                     progress=lambda frac, **k: seen.append((frac, k.get("desc"))))
    previews = [o[0] for o in outputs[:-1]]
    assert len(previews) == SCALES and all(isinstance(p, PIL.Image.Image) and p.size == (16, 16) for p in previews)
    assert [o[2].split(" ·")[0] for o in outputs[:-1]] == [f"scale {k}/{SCALES}" for k in range(1, SCALES + 1)]
    assert seen[0][0] == 0 and [f for f, _ in seen[1:]] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    preview, gallery, status, state = outputs[-1]
    assert gallery == state and gallery[0] == "earlier.png" and len(gallery) == 3 and preview == gallery[1]
    assert "seed 5 · 2 in" in status
    direct = gen.generate_var_images(class_var, 3, cfg=2.0, seed=5, num=2, top_k=10, top_p=0.9, device="cpu")
    assert all(np.array_equal(pixels(p), pixels(image)) for p, (image, _) in zip(gallery[1:], direct))
    # the last preview is the first image's final f̂
    assert np.array_equal(pixels(previews[-1]), pixels(direct[0][0]))
    # restore: the VAR settings come back, steps and sampler stay as they are
    restored = ui.restore_settings(gallery[1], gen.CLASS)
    assert restored[0] == "tiny-var-c2i" and restored[1] == 3 and restored[5:] == (2.0, 5, False, 1, 10, 0.9)
    assert restored[3] == gr.update() and restored[4] == gr.update()


@needs_clip
def test_ui_text_tab_generates_a_text_var(text_var, tmp_path):
    pytest.importorskip("gradio")
    from app import ui

    handler = ui.make_generate(gen.TEXT, tmp_path, "cpu")
    *_, (preview, gallery, status, _) = _drain(handler, str(text_var), " a red star ", "", "dpm++", 25, 2.0, 5,
                                               False, 1, [], 5, 0.0)
    (image, settings), = gen.generate_var_images(text_var, "a red star", cfg=2.0, seed=5, top_k=5, device="cpu")
    assert np.array_equal(pixels(gallery[0]), pixels(image)) and settings["prompt"] == "a red star"


@pytest.mark.parametrize("kind, model, extra, message", [
    (gen.CLASS, "class_var", dict(top_p=1.5), "top-p must be between 0 and 1; got 1.5"),
    (gen.CLASS, "class_var", dict(top_k=-1), "top-k must be >= 0; got -1"),
    (gen.CLASS, "class_var", dict(top_k="many"), "top-k must be a whole number"),
    (gen.CLASS, "class_var", dict(what="11"), r"class id 11 out of range"),
    (gen.TEXT, "class_var", dict(what="a red star"), "is a class-to-image model .* not a text-to-image model"),
    (gen.CLASS, "dit_folder", dict(top_k=5), "top-k / top-p only apply to VAR \\(next-scale\\) models"),
    (gen.CLASS, "dit_folder", dict(top_p=0.5), "top-k / top-p only apply to VAR"),
])
def test_ui_bad_var_input_is_a_message(request, tmp_path, kind, model, extra, message):
    gr = pytest.importorskip("gradio")
    from app import ui

    args = {"what": "3", "negative": "", "top_k": 0, "top_p": 0.0, **extra}
    folder = request.getfixturevalue(model)
    handler = ui.make_generate(kind, tmp_path, "cpu")
    with pytest.raises(gr.Error, match=message):
        _drain(handler, str(folder), args["what"], args["negative"], "dpm++", 25, 2.0, 5, False, 1, [],
               args["top_k"], args["top_p"])
    assert not any(tmp_path.rglob("*.png"))


@needs_clip
def test_ui_lists_var_folders_in_their_task_tabs(class_var, text_var):
    pytest.importorskip("gradio")
    from app import ui

    assert class_var.parent != text_var.parent
    assert ui.models_by_kind(class_var.parent)[gen.CLASS] == {"tiny-var-c2i": str(class_var)}
    assert ui.models_by_kind(text_var.parent)[gen.TEXT] == {"tiny-var-t2i": str(text_var)}


def test_ui_tab_shows_var_controls_for_a_var_model(class_var, dit_folder, tmp_path):
    """A models dir holding a VAR folder: the Class → image tab offers it by name with top-k / top-p shown and steps /
    sampler hidden; picking a diffusion model flips them (filters back to 0); Generate resolves the name; the
    Benchmark tab leaves VAR out."""
    gr = pytest.importorskip("gradio")
    from app.ui import build_app

    demo = build_app(class_var.parent, tmp_path / "outputs", "cpu")
    blocks = list(demo.blocks.values())
    tabs = [b.label for b in blocks if isinstance(b, gr.Tab)]
    assert tabs == ["Class → image", "Benchmark"]
    by_label = {}
    for b in blocks:  # the first of a label: the Class → image tab's (the Benchmark tab has its own "steps")
        by_label.setdefault(getattr(b, "label", None), b)
    assert by_label["model"].value == "tiny-var-c2i"
    assert by_label["top-k (VAR; 0 = off)"].visible and by_label["top-p (VAR; 0 = off)"].visible
    assert not by_label["steps"].visible and not by_label["sampler"].visible
    benchmark_models = next(b for b in blocks if isinstance(b, gr.CheckboxGroup) and b.label == "models")
    assert benchmark_models.choices == []  # the Benchmark tab's list: VAR is benchmarked by bench/var_speed.py
    pick = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "pick_family")
    sampler, steps, _, top_k, top_p = pick(str(dit_folder))
    assert sampler["visible"] and steps["visible"] and not top_k["visible"] and top_k["value"] == 0
    sampler, steps, _, top_k, top_p = pick("tiny-var-c2i")  # a name from the models dir
    assert not steps["visible"] and top_p["visible"] and "value" not in top_p
    # the Generate button's handler resolves that name through the tab's list (not a shipped model)
    generate = next(f.fn for f in demo.fns.values() if f.api_name == "class_to_image")
    *_, (_, gallery, status, _) = generate("tiny-var-c2i", "3", "", "dpm++", 25, 2.0, 5, False, 1, [], 0, 0.0,
                                           progress=lambda *a, **k: None)
    (image, _), = gen.generate_var_images(class_var, 3, cfg=2.0, seed=5, device="cpu")
    assert len(gallery) == 1 and np.array_equal(pixels(gallery[0]), pixels(image))


# ----------------------------------------------------------------------------------------------- shipped models
WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
needs_shipped_var = pytest.mark.skipif(not (WEIGHTS / "shapes-var-c2i" / "model_index.json").is_file(),
                                       reason="shipped VAR models absent")


@needs_shipped_var
def test_shipped_tokenizer_meets_its_target_by_the_eval_command(capsys):
    # the card's numbers, reproduced by `ditstudio eval` (its own kind: var-tokenizer); 64 of the card's 256 scenes
    assert main(["eval", "--model", "shapes-vqvae", "--n", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metrics"]["psnr_db"] >= 30.0 and out["metrics"]["analyser_agreement"] >= 0.7
    assert out["card_metrics"]["psnr_db"] >= 30.0


@needs_shipped_var
def test_shipped_var_models_draw_the_prompt(capsys):
    # regression floor for the shipped VAR models, 48 prompts each (seed 0): measured 0.957 / 0.910 on 1,920 held-out
    # prompts (docs/var.md); a broken tokenizer reference, int8 storage or dtype path gives far less
    assert main(["eval", "--model", "shapes-var-c2i", "--n", "48", "--seed", "0", "--json"]) == 0
    c2i = json.loads(capsys.readouterr().out)["metrics"]
    assert c2i["prompt_accuracy"] >= 0.85 and c2i["colour"] >= 0.95
    assert main(["eval", "--model", "shapes-var-t2i", "--n", "48", "--seed", "0", "--json"]) == 0
    t2i = json.loads(capsys.readouterr().out)["metrics"]
    assert t2i["one_object_accuracy"] >= 0.75 and t2i["one_object_colour"] >= 0.9
