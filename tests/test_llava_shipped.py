"""The shipped weights/shapes-llava: under 5 MB of float16 safetensors, the shapes CLIP referenced (not copied),
its model card meets the target, and the project's evaluation reproduces the card's numbers."""
import json
from pathlib import Path

import pytest

from vlm.generate import evaluate_vqa
from vlm.llava import LlavaVLM

FOLDER = Path(__file__).resolve().parents[1] / "weights" / "shapes-llava"
KINDS = ("colour", "shape", "count", "position", "existence", "size", "describe")


@pytest.fixture(scope="module")
def card():
    return json.loads((FOLDER / "card.json").read_text())


def test_folder_and_card(card):
    weights = list(FOLDER.glob("*.safetensors"))
    assert [w.name for w in weights] == ["diffusion_pytorch_model.safetensors"]
    assert weights[0].stat().st_size < 5e6 and card["size_bytes"] == weights[0].stat().st_size
    cfg = json.loads((FOLDER / "config.json").read_text())
    assert cfg["_class_name"] == "LlavaModel" and cfg["ditstudio_task"] == "vlm"
    assert cfg["vision_tower"] == {"kind": "shapes-clip", "path": "../shapes-clip", "feature_layer": -2}
    assert (FOLDER / "tokenizer.json").is_file()
    assert card["eval"]["kind"] == "vqa" and set(KINDS) <= set(card["metrics"])
    assert card["targets"]["vqa_exact_match"] == ">= 0.90"


def test_meets_vqa_target(card):
    assert card["metrics"]["vqa_exact_match"] >= 0.90


def test_evaluation_reproduces_card(card):
    vlm = LlavaVLM.from_pretrained(FOLDER)
    n, seed = card["eval"]["n"], card["eval"]["seed"]
    now = evaluate_vqa(vlm, n=n, seed=seed)
    for k in ("vqa_exact_match",) + KINDS:
        assert now[k] == pytest.approx(card["metrics"][k], abs=1e-9), k


def test_ditstudio_eval_runs_the_vqa_evaluation(capsys):
    """`ditstudio eval --model shapes-llava` routes the card's "vqa" kind to vlm.generate.evaluate_vqa."""
    from app.cli import main

    assert main(["eval", "--model", "shapes-llava", "--n", "32"]) == 0
    out = capsys.readouterr().out
    assert "shapes-llava: n=32" in out and "vqa_exact_match" in out and ">= 0.90" in out
