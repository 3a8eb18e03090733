"""Two tools of the shipped VAR models (docs/var.md): int8 storage of the transformers' weights (dit/int8_weights.py)
and growing a trained transformer deeper without changing what it computes (vlm/var.py grow_depth)."""
import json
import sys
from pathlib import Path

import pytest
import torch

from dit.int8_weights import INT8_WEIGHTS, SCALE_SUFFIX, dequantize_rows, quantize_rows, save_int8
from vlm.var import VAR, TextVAR, grow_depth

REPO = Path(__file__).resolve().parents[1]


def _random(model, seed=0):
    """O(1) weights everywhere: the fresh init's near-zero gains (γ) would make 'the same output' trivial."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def _models():
    var = _random(VAR.from_name("VAR-tiny", embed_dim=64, num_heads=2))
    text = _random(TextVAR.from_name("TextVAR-tiny", embed_dim=64, num_heads=2), 1)
    return [(var, (torch.tensor([1, 7]),)), (text, (torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool)))]


def test_quantize_rows_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 80) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different scales
    w[5] = 0  # a zero row stays exactly zero
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (48, 1)
    back = dequantize_rows(q, scale)
    assert torch.all((back - w).abs() <= scale.float() / 2 + 1e-7)
    assert torch.equal(back[5], torch.zeros(80)) and q.abs().max() == 127


@pytest.mark.parametrize("which", [0, 1])
def test_int8_round_trip_is_the_dequantised_model(tmp_path, which):
    model, cond = _models()[which]
    info = save_int8(model, tmp_path / "m")
    assert info["quantised"] > 0
    model.half().save_pretrained(tmp_path / "fp16")
    model.float()
    fp16_bytes = (tmp_path / "fp16" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert info["bytes"] < 0.75 * fp16_bytes, (info, fp16_bytes)
    back = type(model).from_pretrained(tmp_path / "m")
    assert back.dtype == torch.float32 and not back.training
    # every quantised weight is exactly q * scale, every other tensor its fp16 rounding
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "m" / INT8_WEIGHTS)
    for k, v in back.state_dict().items():
        if k + SCALE_SUFFIX in stored:
            assert torch.equal(v, dequantize_rows(stored[k], stored[k + SCALE_SUFFIX])), k
        elif v.is_floating_point():
            assert torch.equal(v, model.state_dict()[k].half().float()), k
    x = torch.randn(2, model.L - 1, model.config.z_channels)
    with torch.no_grad():
        ref, got = model(*cond, x), back(*cond, x)
    assert (got - ref).abs().max() / ref.abs().max() < 0.03
    assert not torch.equal(got, ref)  # it is quantised


def test_int8_folder_refuses_bad_files(tmp_path):
    model, _ = _models()[0]
    save_int8(model, tmp_path / "m")
    # another architecture's config over these weights
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "depth": 3}))
    with pytest.raises(ValueError, match="does not fit"):
        VAR.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / INT8_WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        VAR.from_pretrained(tmp_path / "m")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "m" / INT8_WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="storage format"):
        VAR.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("which,depth", [(0, 3), (0, 4), (1, 5)])
def test_grown_model_computes_what_the_trained_one_computes(which, depth):
    model, cond = _models()[which]
    deeper = grow_depth(model, depth)
    assert deeper.config.depth == depth and len(deeper.blocks) == depth
    x = torch.randn(2, model.L - 1, model.config.z_channels)
    with torch.no_grad():
        torch.testing.assert_close(deeper(*cond, x), model(*cond, x), rtol=1e-5, atol=1e-5)
    # the repeats are not dead: their gains get gradients
    deeper.train()
    deeper(*cond, x).square().mean().backward()
    repeat = next(j for j in range(1, depth) if (j - 1) * 2 // depth == j * 2 // depth)
    assert deeper.blocks[repeat].ada_lin[1].weight.grad[:2 * model.config.embed_dim].abs().sum() > 0
    with pytest.raises(ValueError, match="must exceed"):
        grow_depth(model, 2)


def test_train_var_grows_and_saves_int8(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "scripts"))
    import train_var
    from vlm.var import VAR_CONFIGS
    from vlm.var_pipeline import VARPipeline
    from vlm.vqvae import MultiScaleVQVAE

    monkeypatch.setitem(VAR_CONFIGS, "VAR-tiny48", {**VAR_CONFIGS["VAR-tiny"], "num_classes": 48, "embed_dim": 64})
    torch.manual_seed(0)
    MultiScaleVQVAE.from_name("vqvae-tiny").save_pretrained(tmp_path / "tok")

    def run(name, *extra):
        train_var.main(train_var.parse_args([
            "--out", str(tmp_path / name), "--model", "VAR-tiny48", "--tokenizer", str(tmp_path / "tok"), "--steps",
            "2", "--batch-size", "4", "--cpu", "--eval-n", "2", "--eval-every", "1000", "--ckpt-every", "1000",
            *extra]))

    run("a", "--save-to", str(tmp_path / "first"))
    run("b", "--init-from", str(tmp_path / "first"), "--grow-depth", "3", "--lr", "0", "--int8",
        "--save-to", str(tmp_path / "grown"))
    assert (tmp_path / "grown" / "transformer" / INT8_WEIGHTS).is_file()
    assert not list((tmp_path / "grown" / "transformer").glob("diffusion_pytorch_model*"))
    first = VARPipeline.from_pretrained(tmp_path / "first").transformer
    grown = VARPipeline.from_pretrained(tmp_path / "grown").transformer
    assert grown.config.depth == 3
    # lr 0: the grown model is the first one grown (up to the int8 rounding of its weights)
    x = torch.randn(2, first.L - 1, first.config.z_channels)
    labels = torch.tensor([3, 40])
    with torch.no_grad():
        ref, got = first(labels, x), grown(labels, x)
    assert (got - ref).abs().max() / ref.abs().max() < 0.05
    with pytest.raises(ValueError, match="--init-from"):
        run("c", "--grow-depth", "3")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int8_save_from_the_gpu(tmp_path):
    model, _ = _models()[0]
    save_int8(model.cuda(), tmp_path / "m")
    back = VAR.from_pretrained(tmp_path / "m")
    q = {k: v for k, v in back.state_dict().items()}
    assert all(q[k].shape == v.shape for k, v in model.state_dict().items())
