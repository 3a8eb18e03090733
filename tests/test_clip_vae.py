"""The shared shapes CLIP and VAE: contracts on tiny random models, and the shipped weights reproducing the
metrics on their model cards (on small seeded sets, so the suite stays fast)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shapes.clip import EOT_ID, PAD_ID, SOT_ID, ShapesCLIP, ShapesCLIPConfig, evaluate_clip, train_tokenizer
from shapes.data import eval_set
from shapes.vae import build_tiny_vae, evaluate_vae, reconstruct

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CLIP = REPO / "weights" / "shapes-clip"
SHIPPED_VAE = REPO / "weights" / "shapes-vae"
SMALL = ShapesCLIPConfig(vision_width=32, vision_layers=1, vision_head_width=16, text_width=32, text_layers=1,
                         text_heads=2, embed_dim=16)


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    tok = train_tokenizer(["a large red circle in the top left", "a small blue star at the bottom"], 64)
    return ShapesCLIP(SMALL, tok).eval()


def test_tokenizer_adds_sot_eot_and_pads(tiny_clip):
    ids = tiny_clip.tokenize(["a red circle", "a zebra circle"])
    assert ids.shape == (2, SMALL.context_length)
    assert (ids[:, 0] == SOT_ID).all()
    assert ids[0, 4].item() == EOT_ID and (ids[0, 5:] == PAD_ID).all()
    assert ids[1, 2].item() == 1  # an unseen word is [UNK]


def test_truncated_caption_keeps_eot(tiny_clip):
    ids = tiny_clip.tokenize(" ".join(["red"] * 100))
    assert ids[0, -1].item() == EOT_ID


def test_clip_feature_shapes(tiny_clip):
    img = eval_set("caption", 3, seed=1)["image"]
    assert tiny_clip.encode_image(img).shape == (3, SMALL.embed_dim)
    assert torch.allclose(tiny_clip.encode_image(img).norm(dim=-1), torch.ones(3), atol=1e-5)
    assert tiny_clip.image_patch_features(img).shape == (3, (64 // 8) ** 2, SMALL.vision_width)
    tokens, keep = tiny_clip.encode_text_tokens(["a red circle", "a large red circle in the top left"])
    assert tokens.shape == (2, SMALL.context_length, SMALL.text_width)
    assert keep.sum(1).tolist() == [5, 10]
    with pytest.raises(ValueError, match="images must be"):
        tiny_clip.encode_image(torch.zeros(2, 64, 64, 3, dtype=torch.uint8))


def test_penultimate_patch_features_match_open_clip_intermediates(tiny_clip):
    img = eval_set("caption", 2, seed=3)["image"]
    ours = tiny_clip.image_patch_features(img, layer=-1)
    x = tiny_clip.model.visual._embeds(tiny_clip._prepare(img))
    ref = tiny_clip.model.visual.transformer(x)[:, 1:]
    torch.testing.assert_close(ours, ref)


def test_clip_save_load_round_trip(tiny_clip, tmp_path):
    tiny_clip.save_pretrained(tmp_path, dtype=torch.float32)
    loaded = ShapesCLIP.from_pretrained(tmp_path)
    img = eval_set("caption", 2, seed=2)["image"]
    torch.testing.assert_close(loaded.encode_image(img), tiny_clip.encode_image(img))
    torch.testing.assert_close(loaded.encode_text(["a red circle"]), tiny_clip.encode_text(["a red circle"]))


def test_clip_load_rejects_bad_folders(tiny_clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        ShapesCLIP.from_pretrained(tmp_path)
    tiny_clip.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("logit_scale")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="does not match its config"):
        ShapesCLIP.from_pretrained(tmp_path)


def test_vae_round_trip_shapes_and_bad_input():
    vae = build_tiny_vae().eval()
    img = eval_set("caption", 2, seed=4)["image"]
    out = reconstruct(vae, img)
    assert out.shape == img.shape and out.dtype == torch.uint8
    with torch.no_grad():
        z = vae.encode(img.float() / 127.5 - 1).latent_dist.mode()
    assert z.shape == (2, 4, 16, 16)
    with pytest.raises(ValueError, match="uint8"):
        reconstruct(vae, img.float())


def test_vae_training_resumes_exactly(tmp_path):
    """A run stopped after its checkpoint and resumed ends with the same weights as one uninterrupted run."""
    script = REPO / "scripts" / "train_vae.py"
    common = ["--batch-size", "2", "--cpu", "--ckpt-every", "2", "--eval-every", "1000", "--eval-n", "4", "--scale-n", "8",
              "--lr", "1e-3", "--seed", "3"]

    def train(out, steps, *extra):
        subprocess.run([sys.executable, str(script), "--out", str(out), "--steps", str(steps), *common, *extra],
                       check=True, capture_output=True, cwd=REPO)

    train(tmp_path / "straight", 4)
    train(tmp_path / "crashed", 4, "--stop-after", "3")  # checkpointed at 2, step 3 lost
    assert (tmp_path / "crashed" / "checkpoints" / "step_2").is_dir()
    assert not (tmp_path / "crashed" / "model").exists()
    train(tmp_path / "crashed", 4)
    a = load_file(tmp_path / "straight" / "model" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "crashed" / "model" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ----- shipped models -----
needs_clip = pytest.mark.skipif(not SHIPPED_CLIP.is_dir(), reason="shapes-clip not shipped yet")
needs_vae = pytest.mark.skipif(not SHIPPED_VAE.is_dir(), reason="shapes-vae not shipped yet")


@needs_clip
def test_shipped_clip_meets_targets_on_a_small_set():
    clip = ShapesCLIP.from_pretrained(SHIPPED_CLIP)
    m = evaluate_clip(clip, n=256, seed=7)
    assert m["zero_shot_accuracy"] >= 0.93, m
    assert m["retrieval_top1_256"] >= 0.75, m


@needs_vae
def test_shipped_vae_meets_targets_on_a_small_set():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(SHIPPED_VAE, torch_dtype=torch.float32).eval()
    m = evaluate_vae(vae, n=100, seed=7)
    assert m["psnr_db"] >= 31.5, m
    assert m["analyser_agreement"] >= 0.96, m


@needs_clip
@needs_vae
def test_shipped_weights_budget():
    total = sum(f.stat().st_size for d in (SHIPPED_CLIP, SHIPPED_VAE) for f in d.glob("*.safetensors"))
    assert total < 5e6, total
    for d in (SHIPPED_CLIP, SHIPPED_VAE):
        card = json.loads((d / "card.json").read_text())
        assert {"command", "steps", "device", "train_seconds", "metrics"} <= card.keys()


@needs_clip
def test_shipped_frechet_reference_separates_real_from_degraded():
    from shapes.clip import frechet_to_reference
    from shapes.metrics import degrade

    clip = ShapesCLIP.from_pretrained(SHIPPED_CLIP)
    real = eval_set("caption", 1000, seed=11)["image"]
    fd_real = frechet_to_reference(clip, SHIPPED_CLIP, real)
    fd_blur = frechet_to_reference(clip, SHIPPED_CLIP, degrade(real, blur_sigma=1.5, noise_std=0.0))
    fd_wrong = frechet_to_reference(clip, SHIPPED_CLIP, eval_set("class", 1000, seed=11)["image"])
    assert fd_real < 2.0, fd_real
    assert fd_blur > 10 * fd_real and fd_wrong > 10 * fd_real, (fd_real, fd_blur, fd_wrong)
    with pytest.raises(ValueError, match="unknown Fréchet reference"):
        frechet_to_reference(clip, SHIPPED_CLIP, real, kind="video")
