"""scripts/train_llava.py --tune-vision-blocks: the pool caches the hidden states entering the tower's last N
feature-path blocks, stage 2 trains those blocks (and only those), the folder stores its tuned tower and loads it
instead of the referenced shapes CLIP; N=0 (the default) keeps today's cache and folder."""
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import train_llava  # noqa: E402
from shapes import eval_set  # noqa: E402
from shapes.clip import ShapesCLIP  # noqa: E402
from shapes.data import make_batch  # noqa: E402
from vlm.generate import GenerationConfig, build_prompt_batch, generate  # noqa: E402
from test_llava import tiny_decoder, tiny_tokenizer  # noqa: E402
from vlm.llava import LlavaVLM, ShapesCLIPTower  # noqa: E402

CLIP = REPO / "weights" / "shapes-clip"
TUNED = "model.visual.transformer.resblocks.2."  # the last block of the feature path (layer -2 of 4 blocks)


def train(out: Path, *extra) -> dict:
    args = train_llava.parse_args(["--out", str(out), "--size", "shapes-llava-tiny", "--steps", "4",
                                   "--stage1-steps", "1", "--batch-size", "4", "--pool", "32", "--eval-n", "4",
                                   "--eval-every", "1000", "--ckpt-every", "1000", "--log-every", "1", "--cpu",
                                   "--threads", "1", "--save-dtype", "float32", *extra])
    return train_llava.main(args)


def clip_state(folder) -> dict:
    clip = ShapesCLIP.from_pretrained(folder)
    return {k: v.clone() for k, v in clip.state_dict().items()}


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "run"
    train(out, "--tune-vision-blocks", "1", "--vision-lr", "1e-3")
    return out


@pytest.fixture(scope="module")
def images():
    return eval_set("vqa", 6, seed=11)["image"]


def test_training_changes_only_the_tuned_block(tuned_run):
    folder = tuned_run / "model"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["vision_tower"] == {"kind": "shapes-clip", "path": "vision_tower", "feature_layer": -2,
                                   "tuned_blocks": 1}
    card = json.loads((folder / "card.json").read_text())
    assert card["tune_vision_blocks"] == 1 and card["vision_lr"] == 1e-3
    before, after = clip_state(CLIP), clip_state(folder / "vision_tower")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(TUNED) for k in changed), sorted(changed)[:5]
    # Both matrices of the block's attention and MLP moved (not only e.g. a bias).
    assert {TUNED + "attn.in_proj_weight", TUNED + "mlp.c_fc.weight"} <= changed
    vlm = LlavaVLM.from_pretrained(folder)
    assert vlm.tuned_vision_blocks == 1 and Path(vlm.tower_path) == (folder / "vision_tower").resolve()


def test_cached_block_inputs_give_the_tower_features(tmp_path, images):
    tower = ShapesCLIPTower(ShapesCLIP.from_pretrained(CLIP))
    full = tower(images)
    assert full.dtype == torch.float32 and full.shape == (6, 64, 96)
    for n in range(len(tower.feature_blocks()) + 1):
        x = tower.block_inputs(images, n)
        assert x.shape == (6, 65, 96)  # CLS included: the blocks attend to it
        torch.testing.assert_close(tower.tail(n)(x), full, rtol=1e-5, atol=1e-5)
    assert len(tower.feature_blocks()) == 3
    with pytest.raises(ValueError, match="cannot tune 4"):
        tower.tail(4)
    # The training pool caches exactly those inputs (float16), and the run's scenes are re-drawn from the seed.
    scenes, feats = train_llava.build_pool(tmp_path, 32, 0, tower, 2)
    assert feats.shape == (32, 65, 96) and feats.dtype == torch.float16
    with safe_open(str(tmp_path / "pool.safetensors"), "pt") as f:
        assert list(f.keys()) == ["block_inputs"] and f.metadata() == {"tune_vision_blocks": "2"}
    pool_images = make_batch("caption", np.random.default_rng([train_llava.POOL_SALT, 0]), 32)["image"]
    torch.testing.assert_close(tower.tail(2)(feats[:8].float()), tower(pool_images[:8]), rtol=0, atol=0.05)
    with pytest.raises(ValueError, match="tune-vision-blocks 2, not 1"):
        train_llava.build_pool(tmp_path, 32, 0, tower, 1)


def test_save_load_uses_the_tuned_tower(tmp_path, images):
    tok = tiny_tokenizer()
    model = tiny_decoder(tok)
    tower = ShapesCLIPTower(ShapesCLIP.from_pretrained(CLIP))
    with torch.no_grad():
        for p in tower.tail(1).parameters():
            p.add_(0.05 * torch.randn_like(p))
    vlm = LlavaVLM(model.eval(), tower, tok, str(CLIP), tuned_vision_blocks=1)
    vlm.save_pretrained(tmp_path / "m", dtype=torch.float32)
    loaded = LlavaVLM.from_pretrained(tmp_path / "m")
    assert loaded.tuned_vision_blocks == 1

    def run(v):
        f = v.encode_images(images)
        ids, mask = build_prompt_batch(v, ["what colour is the square?"] * len(images))
        logits = v.model(ids, f, mask)["logits"]
        return f, logits, generate(v.model, v.model.build_inputs(ids, f, mask), GenerationConfig(max_new_tokens=6))

    f0, logits0, ans0 = run(vlm)
    f1, logits1, ans1 = run(loaded)
    torch.testing.assert_close(f1, f0, rtol=0, atol=0)
    torch.testing.assert_close(logits1, logits0, rtol=0, atol=0)
    assert ans1 == ans0
    shipped = ShapesCLIPTower(ShapesCLIP.from_pretrained(CLIP))
    assert not torch.allclose(loaded.encode_images(images), shipped(images), atol=1e-3)
    # Self-contained: it loads after the copy moves away from weights/ (no ../shapes-clip beside it).
    moved = tmp_path / "elsewhere" / "deep" / "m"
    shutil.copytree(tmp_path / "m", moved)
    torch.testing.assert_close(LlavaVLM.from_pretrained(moved).encode_images(images), f0, rtol=0, atol=0)
    # A loaded tuned model saves its tower again.
    loaded.save_pretrained(tmp_path / "m2", dtype=torch.float32)
    torch.testing.assert_close(LlavaVLM.from_pretrained(tmp_path / "m2").encode_images(images), f0, rtol=0, atol=0)

    # Inconsistent folders are refused with a clear message.
    shutil.rmtree(moved / "vision_tower")
    with pytest.raises(FileNotFoundError, match="inconsistent.*tuned tower .* is missing"):
        LlavaVLM.from_pretrained(moved)
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["vision_tower"] = {"kind": "shapes-clip", "path": os.path.relpath(CLIP, tmp_path / "m"), "feature_layer": -2}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="holds a tuned tower"):
        LlavaVLM.from_pretrained(tmp_path / "m")
    cfg["vision_tower"]["tuned_blocks"] = 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not the folder's own tuned tower"):
        LlavaVLM.from_pretrained(tmp_path / "m")


def test_default_keeps_the_frozen_tower_and_reference(tmp_path):
    args = train_llava.parse_args(["--out", str(tmp_path / "x"), "--steps", "900", "--lr", "2e-3"])
    assert args.tune_vision_blocks == 0 and args.vision_lr == pytest.approx(2e-4)
    assert len(train_llava.lr_factors(args)) == 2
    train(tmp_path / "run")
    folder = tmp_path / "run" / "model"
    assert not (folder / "vision_tower").exists()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["vision_tower"] == {"kind": "shapes-clip", "path": os.path.relpath(CLIP, folder), "feature_layer": -2}
    assert "tune_vision_blocks" not in json.loads((folder / "card.json").read_text())
    with safe_open(str(tmp_path / "run" / "pool.safetensors"), "pt") as f:
        assert list(f.keys()) == ["features"] and not f.metadata()
    assert load_file(tmp_path / "run" / "pool.safetensors")["features"].shape == (32, 64, 96)
    vlm = LlavaVLM.from_pretrained(folder)
    assert vlm.tuned_vision_blocks == 0 and Path(vlm.tower_path) == CLIP.resolve()
    before, after = clip_state(CLIP), vlm.vision_tower.clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The shipped folder still loads from its reference.
    shipped = LlavaVLM.from_pretrained(REPO / "weights" / "shapes-llava")
    assert shipped.tuned_vision_blocks == 0 and Path(shipped.tower_path) == CLIP.resolve()
    # A run folder's cache is not reused for another N.
    with pytest.raises(ValueError, match="tune-vision-blocks 0, not 1"):
        train(tmp_path / "run", "--tune-vision-blocks", "1")


def test_resume_continues_the_tuned_blocks(tuned_run, tmp_path):
    """A run interrupted in stage 2 resumes the blocks' weights and Adam moments: same tower as uninterrupted."""
    out = tmp_path / "run"
    extra = ["--tune-vision-blocks", "1", "--vision-lr", "1e-3", "--ckpt-every", "2"]
    train(out, *extra, "--stop-after", "2")
    assert (out / "checkpoints" / "step_2").is_dir() and not (out / "model").exists()
    train(out, *extra)
    a, b = clip_state(tuned_run / "model" / "vision_tower"), clip_state(out / "model" / "vision_tower")
    assert all(torch.equal(a[k], b[k]) for k in a)
