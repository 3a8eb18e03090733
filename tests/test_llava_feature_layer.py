"""scripts/train_llava.py --feature-layer: the projector reads the tower's hidden state L (LLaVA's hidden_states
index, counted from the end: -1 the last block, -(blocks + 1) the patch embedding), the folder's config records
it and loading reads the same layer; the pool cache records a non-default layer and is not resumed with another."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import train_llava  # noqa: E402
from test_llava_tune_vision import train  # noqa: E402  (the same tiny CPU run)
from shapes import eval_set  # noqa: E402
from shapes.clip import ShapesCLIP  # noqa: E402
from vlm.llava import LlavaVLM, ShapesCLIPTower  # noqa: E402

CLIP = REPO / "weights" / "shapes-clip"


@pytest.fixture(scope="module")
def images():
    return eval_set("vqa", 5, seed=7)["image"]


def hidden_states(clip: ShapesCLIP, images) -> list[torch.Tensor]:
    """open_clip's own forward (encode_image), read with hooks: [ln_pre output, block 0 output, ...]."""
    v = clip.model.visual
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out)) for m in (v.ln_pre, *v.transformer.resblocks)]
    try:
        with torch.no_grad():
            clip.encode_image(images)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 1 + len(v.transformer.resblocks)
    return seen


def test_tower_reads_hidden_state_L(images):
    clip = ShapesCLIP.from_pretrained(CLIP)
    hs = hidden_states(clip, images)
    assert len(hs) == 5  # embedding + 4 blocks
    feats = {}
    for layer in (-1, -2, -3, -4, -5):
        f = ShapesCLIPTower(clip, layer)(images)
        assert f.shape == (5, 64, 96)
        torch.testing.assert_close(f, hs[layer][:, 1:], rtol=0, atol=1e-6)
        feats[layer] = f
    # The layers differ (a wrong index would repeat one of them).
    assert all(not torch.allclose(feats[a], feats[b], atol=1e-3) for a in feats for b in feats if a < b)
    # The tuning split follows the layer: -4 has 1 feature-path block, -5 none.
    assert len(ShapesCLIPTower(clip, -4).feature_blocks()) == 1 and ShapesCLIPTower(clip, -5).feature_blocks() == []


def test_feature_layer_round_trips(tmp_path, images):
    assert train_llava.parse_args(["--out", str(tmp_path / "d"), "--steps", "900"]).feature_layer == -2
    with pytest.raises(SystemExit):
        train_llava.parse_args(["--out", str(tmp_path / "d"), "--steps", "900", "--feature-layer", "0"])
    train(tmp_path / "run", "--feature-layer", "-4")
    folder = tmp_path / "run" / "model"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["vision_tower"]["feature_layer"] == -4 and cfg["vision_tower"]["kind"] == "shapes-clip"
    assert json.loads((folder / "card.json").read_text())["feature_layer"] == -4
    with safe_open(str(tmp_path / "run" / "pool.safetensors"), "pt") as f:
        assert f.metadata() == {"feature_layer": "-4"}
    clip = ShapesCLIP.from_pretrained(CLIP)
    hs = hidden_states(clip, images)
    vlm = LlavaVLM.from_pretrained(folder)
    assert vlm.vision_tower.feature_layer == -4
    torch.testing.assert_close(vlm.encode_images(images), hs[-4][:, 1:], rtol=0, atol=1e-6)
    # The pool cached layer -4 (float16), not the default -2.
    pool = load_file(tmp_path / "run" / "pool.safetensors")["features"].float()
    default = ShapesCLIPTower(clip)
    scenes, _ = train_llava.build_pool(tmp_path / "run", 32, 0, ShapesCLIPTower(clip, -4))  # train()'s pool
    from shapes.render import render

    pool_images = render(scenes.select(list(range(4))), 64)
    torch.testing.assert_close(pool[:4], ShapesCLIPTower(clip, -4)(pool_images), rtol=0, atol=0.02)
    assert not torch.allclose(pool[:4], default(pool_images), atol=0.1)
    # A run folder's cache is not resumed with another layer (nor with the default).
    with pytest.raises(ValueError, match="caches the tower's layer -4, not --feature-layer -2"):
        train(tmp_path / "run")
