"""The web UI: its handlers on bad input, progress/cancel plumbing, settings restore, the API through gradio_client
against a served app, and a real browser (Playwright + Debian's chromium) generating an image."""
import json
import re
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")

from app import generate as gen  # noqa: E402
from app import ui  # noqa: E402
from shapes.analyse import analyse_batch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED = all((REPO / "weights" / n / "model_index.json").is_file() for n in ("shapes-c2i", "shapes-t2i", "shapes-t2v"))
needs_models = pytest.mark.skipif(not SHIPPED, reason="shipped shapes models absent")
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drain(handler, *args):
    """Run a generate handler to its end; -> the last yielded tuple."""
    last = None
    for last in handler(*args, progress=lambda *a, **k: None):
        pass
    return last


# ----------------------------------------------------------------------------------------------- handlers
@needs_models
@pytest.mark.parametrize("args, message", [
    (("shapes-t2i", "", "", "dpm++", 5, 4.0, 0, False, 1), "prompt is empty"),
    (("shapes-t2i", "   ", "", "dpm++", 5, 4.0, 0, False, 1), "prompt is empty"),
    (("shapes-t2i", "a red star", "", "dpm++", 0, 4.0, 0, False, 1), "steps must be between"),
    (("shapes-t2i", "a red star", "", "dpm++", 5000, 4.0, 0, False, 1), "steps must be between"),
    (("shapes-t2i", "a red star", "", "dpm++", "many", 4.0, 0, False, 1), "steps must be a whole number"),
    (("shapes-t2i", "a red star", "", "dpm++", 5, float("nan"), 0, False, 1), "guidance must be between"),
    (("shapes-t2i", "a red star", "", "dpm++", 5, 4.0, -1, False, 1), "seed must be between"),
    (("shapes-t2i", "a red star", "", "dpm++", 5, 4.0, None, False, 1), "seed must be a whole number"),
    (("shapes-t2i", "a red star", "", "dpm++", 5, 4.0, 0, False, 10_000), "batch size must be between"),
    (("shapes-t2i", "a red star", "", "warp-drive", 5, 4.0, 0, False, 1), "sampler"),
    (("no-such-model", "a red star", "", "dpm++", 5, 4.0, 0, False, 1), "unknown model"),
    (("shapes-c2i", "a red star", "", "dpm++", 5, 4.0, 0, False, 1), "text-to-image"),
    ((None, "a red star", "", "dpm++", 5, 4.0, 0, False, 1), "no model selected"),
])
def test_bad_input_is_a_message(tmp_path, args, message):
    handler = ui.make_generate(gen.TEXT, tmp_path, "cpu")
    with pytest.raises(gr.Error, match=message):
        _drain(handler, *args, [])
    # nothing was written for a refused request
    assert not any(tmp_path.rglob("*.png"))


@needs_models
def test_class_tab_unknown_class_and_good_request(tmp_path):
    handler = ui.make_generate(gen.CLASS, tmp_path, "cpu")
    with pytest.raises(gr.Error, match="unknown class label"):
        _drain(handler, "shapes-c2i", "golden unicorn", "", "dpm++", 5, 4.0, 0, False, 1, [])
    preview, gallery, status, state = _drain(handler, "shapes-c2i", "red star", "", "dpm++", 25, 4.0, 7, False, 2,
                                             ["earlier.png"])
    assert gallery == state and gallery[0] == "earlier.png" and len(gallery) == 3  # the session's gallery grows
    assert "seed 7" in status and preview == gallery[1]
    files = sorted(tmp_path.rglob("*.png"))
    assert len(files) == 2
    settings = gen.read_settings(files[0])
    assert settings["model"] == "shapes-c2i" and settings["seed"] == 7 and settings["steps"] == 25
    # the image is what `ditstudio generate` gives for the same settings
    (direct, _), _ = gen.generate_class_images("shapes-c2i", ["red star"], 25, 4.0, "dpm++", 7, 2, "cpu")
    assert np.array_equal(np.asarray(Image.open(gallery[1]).convert("RGB")), np.asarray(direct))


@needs_models
def test_random_seed_is_drawn_and_shown(tmp_path):
    handler = ui.make_generate(gen.TEXT, tmp_path, "cpu")
    _, _, status, _ = _drain(handler, "shapes-t2i", "a red star", "", "dpm++", 3, 4.0, 0, True, 1, [])
    seed = int(status.split("seed ")[1].split(" ")[0])
    settings = gen.read_settings(next(tmp_path.rglob("*.png")))
    assert settings["seed"] == seed


@needs_models
def test_progress_and_previews(tmp_path):
    seen = []
    handler = ui.make_generate(gen.TEXT, tmp_path, "cpu")
    outputs = list(handler("shapes-t2i", "a red star", "", "dpm++", 10, 4.0, 0, False, 1, [],
                           progress=lambda frac, **k: seen.append(frac)))
    previews = [o[0] for o in outputs[:-1]]
    assert len(previews) == 2 and all(isinstance(p, Image.Image) and p.size == (64, 64) for p in previews)
    assert seen[0] == 0 and seen[-1] == pytest.approx(1.0) and len(seen) == 11  # 0, then every step


def test_cancel_stops_the_sampling(monkeypatch):
    """Closing the handler's runner (what a cancelled gradio event does) stops the worker at its next step."""
    calls = []
    finished = threading.Event()

    def call(callback):
        import time

        import torch

        try:
            for step in range(100):
                calls.append(step)
                time.sleep(0.01)
                callback(step, None, torch.zeros(1))
        finally:
            finished.set()
        return "done"

    monkeypatch.setattr(ui, "_preview", lambda folder, latents: Image.new("RGB", (8, 8)))  # no VAE needed here
    runner = ui._run_with_progress(call, "unused", 100, lambda *a, **k: None)
    next(runner)  # the first preview (step 5)
    runner.close()
    assert finished.wait(5)
    assert len(calls) < 100


@needs_models
def test_restore_settings_from_a_png_and_refuse_junk(tmp_path):
    (image, settings), = gen.generate_text_images("shapes-t2i", "a blue square", 3, 2.5, seed=11, sampler="ddim",
                                                  negative_prompt="red", device="cpu")
    png = gen.save_png(image, settings, tmp_path, "20260101")
    restored = ui.restore_settings(str(png), gen.TEXT)
    assert restored == ("shapes-t2i", "a blue square", "red", "ddim", 3, 2.5, 11, False, 1, 0, 0.0)  # top-k / p off
    with pytest.raises(gr.Error, match="for text-to-image, not class-to-image"):
        ui.restore_settings(str(png), gen.CLASS)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(gr.Error, match="carries no DiT Studio settings"):
        ui.restore_settings(str(junk), gen.TEXT)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    with pytest.raises(gr.Error, match="carries no DiT Studio settings"):
        ui.restore_settings(str(plain), gen.TEXT)


@needs_models
def test_models_by_kind_lists_the_shipped_generators_only():
    kinds = ui.models_by_kind()
    assert "shapes-c2i" in kinds[gen.CLASS] and "shapes-t2i" in kinds[gen.TEXT] and "shapes-t2v" in kinds[gen.VIDEO]
    everything = [m for models in kinds.values() for m in models]
    assert "shapes-vae" not in everything and "shapes-clip" not in everything


# ----------------------------------------------------------------------------------------------- served app
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not SHIPPED:
        pytest.skip("shipped shapes models absent")
    outputs = tmp_path_factory.mktemp("outputs")
    port = _free_port()
    demo, url = ui.launch_app(port=port, outputs_dir=outputs, device="cpu", block=False)
    yield url, outputs
    demo.close()


def test_api_generates_what_was_asked_and_survives_bad_input(served):
    from gradio_client import Client

    url, outputs = served
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict("shapes-t2i", "", "", "dpm++", 5, 4.0, 0, False, 1, api_name="/text_to_image")
    with pytest.raises(Exception, match="steps must be|less than minimum value 1"):  # the slider checks first
        client.predict("shapes-t2i", "a red star", "", "dpm++", -3, 4.0, 0, False, 1, api_name="/text_to_image")
    # the server still answers, with the image asked for
    result, gallery, status = client.predict("shapes-t2i", "a big red star", "", "dpm++", 25, 4.0, 0, False, 2,
                                             api_name="/text_to_image")
    assert "seed 0" in status
    gallery = [item["image"] if isinstance(item, dict) else item for item in gallery]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in gallery]
    assert len(images) == 2 and all(im.shape == (64, 64, 3) for im in images)
    assert all(im.std() > 5 for im in images)  # not blank
    found = analyse_batch(np.stack(images))
    assert sum(any(d.colour == "red" and d.shape == "star" for d in dets) for dets in found) >= 1
    saved = sorted(Path(outputs).rglob("*.png"))
    assert len(saved) == 2 and gen.read_settings(saved[0])["prompt"] == "a big red star"
    video, _, status = client.predict("shapes-t2v", "a video of a red star moving left", "", "dpm++", 5, 4.0, 1,
                                      False, 1, api_name="/text_to_video")
    with Image.open(video) as gif:
        assert gif.format == "GIF" and gif.n_frames >= 2
    assert json.loads(json.dumps(gen.read_settings(next(Path(outputs).rglob("*.gif")))))["num_frames"] == 8


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_real_browser_generates_an_image(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, outputs = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.get_by_role("tab", name="Text → image").click()
            prompt = page.get_by_label("prompt", exact=True)
            prompt.fill("a big red star")
            page.get_by_role("button", name="Generate").first.click()
            page.get_by_text(re.compile(r"seed \d+ · 1 in [\d.]+ s · saved to")).wait_for(timeout=120_000)
            # the result and the gallery show the saved PNG (served from the outputs folder)
            page.wait_for_function("() => [...document.images].some(i => i.src.includes('.png') && i.complete"
                                   " && i.naturalWidth > 0)", timeout=30_000)
            page.screenshot(path=str(tmp_path / "browser.png"), full_page=True)
            sizes = page.eval_on_selector_all("img", "els => els.filter(e => e.src.includes('.png'))"
                                              ".map(e => [e.naturalWidth, e.naturalHeight])")
            assert [64, 64] in sizes, sizes
        finally:
            browser.close()
    shot = Image.open(tmp_path / "browser.png")
    assert shot.size[0] == 1280 and np.asarray(shot).std() > 10
    assert any(Path(outputs).rglob("*.png"))


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "weights" / "shapes-llava").is_dir(),
                    reason="no shipped vision-language model")
def test_chat_tab_is_wired_with_its_api_endpoint():
    """The shipped VLM gets a Chat tab (app/chat.py's build_chat_tab) and a /chat API endpoint."""
    import gradio as gr

    from app.ui import build_app

    demo = build_app()
    tabs = [b.label for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert tabs.index("Chat") == tabs.index("Benchmark") - 1
    assert "/chat" in {f"/{d.api_name}" for d in demo.fns.values() if d.api_name}


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "weights" / "shapes-llava").is_dir(),
                    reason="no shipped vision-language model")
def test_send_to_chat_moves_a_generated_image_into_the_chat_tab(tmp_path):
    """Each image tab's "Send to Chat" puts its result (a file path) into the Chat tab's image box and opens the tab;
    the video tab has none (the chat model reads stills)."""
    import gradio as gr

    from app.ui import build_app

    demo = build_app()
    sends = {b._id: b for b in demo.blocks.values() if isinstance(b, gr.Button) and b.value == "Send to Chat"}
    assert len(sends) == 2  # text -> image and class -> image
    chat_image = next(b for b in demo.blocks.values() if isinstance(b, gr.Image) and b.label == "image")
    wired = [f for f in demo.fns.values() if any(t[0] in sends for t in f.targets)]
    assert len(wired) == 2
    for f in wired:
        assert [o._id for o in f.outputs][0] == chat_image._id and isinstance(f.outputs[1], gr.Tabs)
        assert isinstance(f.inputs[0], gr.Image) and f.inputs[0].label == "result"
        picture = tmp_path / "made.png"
        path, tab = f.fn(str(picture))
        assert path == str(picture) and tab.selected == "chat"
