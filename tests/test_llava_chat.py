"""app.chat: the function the CLI and the Chat tab call, its streaming, the CLI output and the Gradio handler,
and clear errors for bad input; plus the training script's smoke run (resume-safe, model card written)."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from app import chat as chat_mod
from shapes import eval_set
from shapes.clip import ShapesCLIP
from vlm.generate import answer
from test_llava import tiny_decoder, tiny_tokenizer
from vlm.llava import LlavaVLM, ShapesCLIPTower

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tok = tiny_tokenizer()
    model = tiny_decoder(tok)
    clip = REPO / "weights" / "shapes-clip"
    vlm = LlavaVLM(model.eval(), ShapesCLIPTower(ShapesCLIP.from_pretrained(clip)), tok, str(clip))
    out = tmp_path_factory.mktemp("models") / "tiny-llava"
    vlm.save_pretrained(out, dtype=torch.float32)
    return out


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    img = eval_set("vqa", 1, seed=3)["image"][0]
    path = tmp_path_factory.mktemp("img") / "scene.png"
    PIL.Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
    return path


def test_chat_streams_and_matches_generation(folder, image_path):
    pieces = []
    out = chat_mod.chat(str(folder), str(image_path), "describe the image.", stream=pieces.append, max_new_tokens=5)
    assert pieces and pieces[-1] == out and all(out.startswith(p) for p in pieces)
    vlm = chat_mod.load_chat_model(str(folder))
    img = torch.from_numpy(np.array(PIL.Image.open(image_path).convert("RGB"))).permute(2, 0, 1)[None]
    assert out == answer(vlm, img, "describe the image.", short_answer=False, max_new_tokens=5)[0]
    # Same answer from a PIL image, an array and a tensor; sampling is reproducible by seed.
    pil = PIL.Image.open(image_path)
    assert chat_mod.chat(str(folder), pil, "describe the image.", max_new_tokens=5) == out
    assert chat_mod.chat(str(folder), img[0], "describe the image.", max_new_tokens=5) == out
    a = chat_mod.chat(str(folder), pil, "what colour?", temperature=1.0, top_p=0.9, seed=5, max_new_tokens=5)
    b = chat_mod.chat(str(folder), pil, "what colour?", temperature=1.0, top_p=0.9, seed=5, max_new_tokens=5)
    assert a == b
    assert chat_mod.is_description_request("Describe the scene briefly.")
    assert not chat_mod.is_description_request("what colour is the star?")


def test_chat_bad_input(folder, image_path, tmp_path):
    with pytest.raises(ValueError, match="no image"):
        chat_mod.chat(str(folder), None, "what colour?")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        chat_mod.chat(str(folder), str(tmp_path / "missing.png"), "what colour?")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        chat_mod.chat(str(folder), str(tmp_path / "bad.png"), "what colour?")
    with pytest.raises(ValueError, match="question is empty"):
        chat_mod.chat(str(folder), str(image_path), "   ")
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        chat_mod.chat("no-such-model", str(image_path), "what colour?")
    with pytest.raises(ValueError, match="not a vision-language"):
        chat_mod.chat(str(REPO / "weights" / "shapes-clip"), str(image_path), "what colour?")
    with pytest.raises(ValueError, match="max_new_tokens"):
        chat_mod.chat(str(folder), str(image_path), "what?", max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        chat_mod.chat(str(folder), str(image_path), "what?", top_p=1.5)


def test_cli_run_streams_to_stdout(folder, image_path, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    chat_mod.add_parser(sub)
    args = parser.parse_args(["chat", "--model", str(folder), "--image", str(image_path), "--question",
                              "describe the image.", "--max-new-tokens", "5"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    expected = chat_mod.chat(str(folder), str(image_path), "describe the image.", max_new_tokens=5)
    assert printed == expected + "\n"


def test_gradio_handler(folder, image_path):
    import gradio as gr

    pil = PIL.Image.open(image_path)
    outs = list(chat_mod.chat_handler(str(folder), pil, "describe the image.", 5, 0.0, 1.0, 0))
    assert outs[-1] == chat_mod.chat(str(folder), pil, "describe the image.", max_new_tokens=5)
    assert len(outs) >= 2  # streamed, not one final value
    with pytest.raises(gr.Error, match="upload an image"):
        list(chat_mod.chat_handler(str(folder), None, "what?"))
    with pytest.raises(gr.Error, match="question is empty"):
        list(chat_mod.chat_handler(str(folder), pil, ""))
    with pytest.raises(gr.Error, match="unknown model"):
        list(chat_mod.chat_handler("no-such-model", pil, "what?"))
    with gr.Blocks():
        parts = chat_mod.build_chat_tab(models=[str(folder)])
    assert parts["model"].value == str(folder) and isinstance(parts["image"], gr.Image)


def test_train_script_smoke_and_resume(tmp_path):
    """Two stages run, stop after step 3 (as an interruption), resume to the end, save a loadable model + card."""
    cmd = [sys.executable, str(REPO / "scripts" / "train_llava.py"), "--out", str(tmp_path / "run"),
           "--size", "shapes-llava-tiny", "--steps", "5", "--stage1-steps", "2", "--batch-size", "4", "--pool", "32",
           "--eval-n", "4", "--eval-every", "5", "--ckpt-every", "3", "--log-every", "1", "--cpu", "--threads", "1"]
    subprocess.run(cmd + ["--stop-after", "3"], check=True, cwd=REPO, capture_output=True)
    assert (tmp_path / "run" / "checkpoints" / "step_3").is_dir() and not (tmp_path / "run" / "model").exists()
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5]
    assert [r["stage"] for r in log if "loss" in r] == [1, 1, 2, 2, 2]
    card = json.loads((tmp_path / "run" / "model" / "card.json").read_text())
    assert card["eval"]["kind"] == "vqa" and 0.0 <= card["metrics"]["vqa_exact_match"] <= 1.0
    vlm = LlavaVLM.from_pretrained(tmp_path / "run" / "model")
    assert vlm.model.config.num_hidden_layers == 2
