"""The training objectives (oracle losses, hand-computed flow targets, where the VLB gradient goes) and
scripts/train_dit.py end to end on a tiny DiT: the loss falls on shapes, a LoRA fine-tune on a folder saves a
reloadable merged model, and a resumed run ends with exactly the weights of an uninterrupted one."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dit.dit import DiT
from dit.objectives import DDPMObjective, FlowMatchingObjective, flow_interpolate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import train_dit  # noqa: E402

TINY = dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=48)
needs_vae = pytest.mark.skipif(not train_dit.SHIPPED_VAE.is_dir(), reason="shapes-vae not shipped yet")


def _x0(b=8, seed=0):
    return torch.randn(b, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


# ----- objectives -----
def test_ddpm_loss_is_zero_for_the_true_noise():
    obj = DDPMObjective()
    x0 = _x0()
    abar = obj.scheduler.alphas_cumprod

    def oracle(x_t, t, cond):  # ε recovered from x_t = √ᾱ x0 + √(1-ᾱ) ε
        a = abar[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    out = obj(oracle, x0, None, torch.Generator().manual_seed(1))
    assert out["loss"].item() < 1e-6 and "vlb" not in out
    zero = obj(lambda x, t, c: torch.zeros_like(x), x0, None, torch.Generator().manual_seed(1))
    assert 0.5 < zero["loss"].item() < 1.5  # E||ε||² = 1


def test_p2_weighting_is_one_over_k_plus_snr_to_the_gamma():
    """--p2-gamma: each sample's ε-MSE times 1 / (k + SNR_t)^γ, checked per sample against a hand computation; the
    logged mse stays the plain mean; γ = 0 is the plain loss; bad values are refused."""
    x0 = _x0(16)
    plain, p2 = DDPMObjective(), DDPMObjective(p2_gamma=1.0, p2_k=1.0)
    t = torch.tensor([0, 10, 100, 300, 500, 700, 900, 999] * 2)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    model = lambda x, tt, c: 0.5 * x  # noqa: E731  any fixed predictor
    a, b = plain(model, x0, None, draws=(t, noise)), p2(model, x0, None, draws=(t, noise))
    x_t = plain.scheduler.add_noise(x0, noise, t)
    per_sample = ((noise - 0.5 * x_t) ** 2).mean(dim=(1, 2, 3))
    abar = plain.scheduler.alphas_cumprod.double()[t]
    weights = 1.0 / (1.0 + abar / (1 - abar))
    assert torch.allclose(a["loss"], per_sample.mean(), rtol=1e-5)
    assert torch.allclose(b["loss"], (per_sample * weights.float()).mean(), rtol=1e-5)
    assert torch.allclose(b["mse"], a["mse"])
    assert weights[0] < 1e-3 and weights[6] > 0.999  # the cleanest step nearly off, the noisiest at full weight
    assert DDPMObjective(p2_gamma=0.0).loss_weights is None
    with pytest.raises(ValueError, match="p2_gamma"):
        DDPMObjective(p2_gamma=-1.0)


def test_v_prediction_oracle_and_vlb_mean():
    """prediction_type "v_prediction": the true velocity √ᾱ ε - √(1-ᾱ) x0 scores zero (and the ε oracle does not);
    the ε the VLB's mean is built from, √ᾱ v + √(1-ᾱ) x_t, is the true noise for the true v; the scheduler carries
    the type (what the saved pipeline's samplers read); a bad type is refused."""
    obj = DDPMObjective(prediction_type="v_prediction")
    assert obj.scheduler.config.prediction_type == "v_prediction"
    x0 = _x0()
    abar = obj.scheduler.alphas_cumprod

    def velocity(x_t, t, cond):  # recover ε from x_t, then v
        a = abar[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    def noise_oracle(x_t, t, cond):
        a = abar[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    assert obj(velocity, x0, None, torch.Generator().manual_seed(1))["loss"].item() < 1e-6
    assert obj(noise_oracle, x0, None, torch.Generator().manual_seed(1))["loss"].item() > 0.1
    # learned σ: with the true v in the mean channels, the VLB equals the ε model's VLB with the true ε
    sigma = torch.zeros(8, 4, 16, 16)
    with_v = obj(lambda x, t, c: torch.cat([velocity(x, t, c), sigma], 1), x0, None, torch.Generator().manual_seed(2))
    with_eps = DDPMObjective()(lambda x, t, c: torch.cat([noise_oracle(x, t, c), sigma], 1), x0, None,
                               torch.Generator().manual_seed(2))
    torch.testing.assert_close(with_v["vlb"], with_eps["vlb"], rtol=1e-4, atol=1e-5)
    assert DDPMObjective(scheduler=obj.scheduler).prediction_type == "v_prediction"  # read from a given scheduler
    with pytest.raises(ValueError, match="prediction_type"):
        DDPMObjective(prediction_type="sample")


def test_flow_target_hand_case():
    x0, noise = torch.full((1, 1, 1, 1), 1.0), torch.full((1, 1, 1, 1), 3.0)
    x_t, target = flow_interpolate(x0, noise, torch.tensor([0.25]))
    assert x_t.item() == pytest.approx(0.75 * 1.0 + 0.25 * 3.0) and target.item() == pytest.approx(2.0)
    obj = FlowMatchingObjective()
    x0 = _x0()
    seen = {}

    def oracle(x_t, t, cond):  # the exact velocity ε - x0, recovered from x_t and t
        seen["t"] = t
        s = (t / obj.timestep_scale).view(-1, 1, 1, 1)
        return (x_t - x0) / s  # x_t - x0 = t (ε - x0)
    assert obj(oracle, x0, None, torch.Generator().manual_seed(0))["loss"].item() < 1e-6
    assert ((seen["t"] >= 0) & (seen["t"] <= 1000)).all() and seen["t"].max() > 1  # scaled to 0..1000
    ln = FlowMatchingObjective("logit_normal")
    t, _ = ln.sample(torch.zeros(4096, 1), torch.Generator().manual_seed(0))
    assert 0.45 < t.mean().item() < 0.55 and t.min() > 0 and t.max() < 1


def test_learned_sigma_vlb_is_finite_and_trains_only_the_variance():
    obj = DDPMObjective()
    x0 = _x0()
    out_param = torch.nn.Parameter(torch.randn(8, 8, 16, 16) * 0.5)
    terms = obj(lambda x, t, c: out_param, x0, None, torch.Generator().manual_seed(0))
    assert torch.isfinite(terms["vlb"]) and terms["vlb"] > 0
    (grad,) = torch.autograd.grad(terms["loss"], out_param)
    no_vlb = DDPMObjective(vlb_weight=0.0)(lambda x, t, c: out_param, x0, None, torch.Generator().manual_seed(0))
    (grad_mse,) = torch.autograd.grad(no_vlb["loss"], out_param)
    # stop-gradient on the mean: the VLB adds nothing to the ε channels' gradient, and only it reaches the variance
    torch.testing.assert_close(grad[:, :4], grad_mse[:, :4], rtol=0, atol=0)
    assert grad_mse[:, 4:].abs().max() == 0 and grad[:, 4:].abs().max() > 0
    # every timestep, including t = 0 (the discretised decoder likelihood), is finite
    t = torch.arange(0, 1000, 111).repeat_interleave(1)[:8]
    vlb = obj.vlb_terms(x0[: len(t)].clamp(-1, 1), x0[: len(t)], t, torch.zeros(len(t), 4, 16, 16),
                        torch.zeros(len(t), 4, 16, 16))
    assert torch.isfinite(vlb).all()


# ----- the script -----
@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_dit")
    torch.manual_seed(0)
    model = DiT(**TINY)
    # adaLN-Zero makes a fresh DiT's blocks the identity (no gradient to attention/MLP, so nothing for LoRA to
    # learn); small random modulations stand in for a pretrained model.
    with torch.no_grad():
        for block in model.blocks:
            block.modulation.weight.normal_(std=0.02)
        model.final.linear.weight.normal_(std=0.02)  # zero output layer: no gradient would reach the blocks
    model.save_pretrained(folder)
    return folder


def _train(out, model, steps, *extra):
    args = train_dit.parse_args(["--out", str(out), "--model", str(model), "--steps", str(steps), "--batch-size", "8",
                                 "--cpu", "--eval-n", "8", "--log-every", "1", "--eval-every", "1000", *extra])
    return train_dit.main(args)


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


@needs_vae
def test_loss_falls_on_shapes(tiny_dit, tmp_path):
    metrics = _train(tmp_path, tiny_dit, 40, "--lr", "2e-3", "--warmup", "5", "--ckpt-every", "1000",
                     "--rollback-on-spike", "10")  # the guard armed: a falling loss never triggers it
    losses = _losses(tmp_path)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert not any("rollback" in r for r in records)
    assert all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in records if "loss" in r)
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses
    assert np.isfinite(metrics["eval_loss"])
    assert (tmp_path / "model" / "card.json").is_file() and (tmp_path / "model" / "README.md").is_file()


@needs_vae
def test_v_prediction_run_saves_its_type_and_continues_with_it(tiny_dit, tmp_path):
    """--prediction-type v_prediction: the loss falls, the saved pipeline's scheduler says v_prediction (its samplers
    convert), and a run started from that folder keeps v without being told; flow refuses the option."""
    _train(tmp_path / "v", tiny_dit, 30, "--lr", "2e-3", "--warmup", "5", "--ckpt-every", "1000",
           "--prediction-type", "v_prediction")
    losses = _losses(tmp_path / "v")
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses
    config = json.loads((tmp_path / "v" / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    assert train_dit.prediction_type_of(str(tmp_path / "v" / "model")) == "v_prediction"
    assert train_dit.prediction_type_of(str(tiny_dit)) == "epsilon"  # a bare transformer folder
    from dit.pipelines import ClassToImagePipeline

    pipe = ClassToImagePipeline.from_pretrained(tmp_path / "v" / "model")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="DDPM options"):
        _train(tmp_path / "f", tiny_dit, 1, "--objective", "flow", "--prediction-type", "v_prediction")


@needs_vae
def test_lora_finetune_on_a_folder(tiny_dit, tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(220, 30, 30), (30, 30, 220)]):
        (data / f"class_{c}").mkdir(parents=True)
        for i in range(4):
            img = np.full((80, 72, 3), 255, np.uint8)
            x, y = rng.integers(5, 40, 2)
            img[y:y + 25, x:x + 25] = colour
            Image.fromarray(img).save(data / f"class_{c}" / f"{i}.png")
    out = tmp_path / "run"
    metrics = _train(out, tiny_dit, 6, "--data", str(data), "--lora", "4", "--lr", "1e-2", "--warmup", "1",
                     "--ema-decay", "0.9")
    assert np.isfinite(metrics["eval_loss"])
    tuned = DiT.from_pretrained(out / "model" / "transformer")
    start = DiT.from_pretrained(tiny_dit)
    a, b = tuned.state_dict(), start.state_dict()
    assert a.keys() == b.keys()  # merged: no LoRA leftovers
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed and all(("attn" in k or "mlp" in k) and k.endswith("weight") for k in changed), changed


@needs_vae
def test_training_resumes_exactly(tiny_dit, tmp_path):
    """A run stopped after its checkpoint and resumed (model, optimiser, EMA, RNG) ends with the same weights."""
    common = ["--lr", "1e-3", "--seed", "3", "--ckpt-every", "2", "--objective", "ddpm"]
    _train(tmp_path / "straight", tiny_dit, 4, *common)
    _train(tmp_path / "crashed", tiny_dit, 4, *common, "--stop-after", "3")  # checkpointed at 2, step 3 lost
    assert (tmp_path / "crashed" / "checkpoints" / "step_2").is_dir()
    assert not (tmp_path / "crashed" / "model").exists()
    _train(tmp_path / "crashed", tiny_dit, 4, *common)
    a = load_file(tmp_path / "straight" / "model" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "crashed" / "model" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ----- text models on a folder, the data pool, caption dropout, best-weights selection -----
TINY_PIXART = dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                   caption_channels=96, max_text_tokens=32)
needs_clip = pytest.mark.skipif(not train_dit.SHIPPED_CLIP.is_dir(), reason="shapes-clip not shipped yet")


@pytest.fixture(scope="module")
def tiny_pixart(tmp_path_factory):
    from dit.pixart import PixArtDiT

    folder = tmp_path_factory.mktemp("tiny_pixart")
    torch.manual_seed(0)
    model = PixArtDiT(**TINY_PIXART)
    with torch.no_grad():  # zero cross-attention output and output layer: no gradient would reach the blocks
        for block in model.blocks:
            block.cross_attn.proj.weight.normal_(std=0.02)
        model.final.linear.weight.normal_(std=0.02)
    model.save_pretrained(folder)
    return folder


def _captioned_folder(folder, rows):
    folder.mkdir(parents=True)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30)}
    lines = []
    for i, row in enumerate(rows):
        img = np.full((64, 64, 3), 255, np.uint8)
        img[10 + 3 * i:40 + 3 * i, 12:42] = colours[row.get("text", "a red square").split()[1]]
        Image.fromarray(img).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", **row}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@needs_vae
@needs_clip
def test_text_lora_finetune_on_a_captioned_folder(tiny_pixart, tmp_path):
    from dit.pixart import PixArtDiT
    from dit.text_pipelines import TextToImagePipeline

    rows = [{"text": f"a {c} square"} for c in ("red", "blue", "green", "red", "blue", "green")]
    data = _captioned_folder(tmp_path / "data", rows)
    out = tmp_path / "run"
    metrics = _train(out, tiny_pixart, 4, "--data", str(data), "--lora", "4", "--lr", "1e-2", "--warmup", "1",
                     "--ema-decay", "0.5")
    assert np.isfinite(metrics["eval_loss"])
    pipe = TextToImagePipeline.from_pretrained(out / "model")
    assert isinstance(pipe.transformer, PixArtDiT)
    a = pipe.transformer.state_dict()
    b = PixArtDiT.from_pretrained(tiny_pixart).state_dict()
    assert a.keys() == b.keys()  # merged: no LoRA leftovers
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed and all(("attn" in k or "mlp" in k) and k.endswith("weight") for k in changed), changed
    assert any("cross_attn" in k for k in changed), changed


@needs_vae
@needs_clip
def test_folder_errors(tiny_pixart, tmp_path):
    no_text = _captioned_folder(tmp_path / "no_text", [{"label": "red"}, {"label": "blue"}])
    with pytest.raises(ValueError, match="text"):
        _train(tmp_path / "a", tiny_pixart, 1, "--data", str(no_text))
    with pytest.raises(ValueError, match="text"):
        train_dit._folder_items(no_text, "text")
    with pytest.raises(ValueError, match="shapes"):
        train_dit._folder_items(no_text, "video")


@needs_vae
@needs_clip
def test_video_model_refuses_a_folder(tmp_path):
    from dit.latte import LatteDiT

    LatteDiT(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, caption_channels=96,
             max_text_tokens=32, num_frames=4).save_pretrained(tmp_path / "latte")
    data = _captioned_folder(tmp_path / "data", [{"text": "a red square"}])
    with pytest.raises(ValueError, match="video"):
        _train(tmp_path / "run", tmp_path / "latte", 1, "--data", str(data))


@needs_vae
def test_pool_training_is_deterministic(tiny_dit, tmp_path):
    def weights(name, seed):
        _train(tmp_path / name, tiny_dit, 3, "--pool", "24", "--seed", str(seed), "--lr", "1e-3", "--ema-decay", "0.5")
        return load_file(tmp_path / name / "model" / "transformer" / "diffusion_pytorch_model.safetensors")

    a, b, c = weights("a", 1), weights("b", 1), weights("c", 2)
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert "a pool of 24 rendered shapes" in (tmp_path / "a" / "model" / "README.md").read_text()


def test_pool_draws_batches_from_the_pool():
    class FakeVAE:  # encode() needs device, dtype, config and encode(x).latent_dist.mode()
        device, dtype = torch.device("cpu"), torch.float32
        config = type("C", (), {"sample_size": 32, "shift_factor": 0.0, "scaling_factor": 1.0})()

        def encode(self, x):
            z = torch.nn.functional.avg_pool2d(x, 8)[:, :, :, :]  # (B, 3, 4, 4)
            return type("O", (), {"latent_dist": type("D", (), {"mode": lambda self: z})()})()

    data = train_dit.shapes_data("class", FakeVAE(), pool=10, seed=0)
    assert "pool of 10" in data.description and data.num_classes == 48
    x1, y1 = data.batch(7, 6, "cpu")
    x2, y2 = data.batch(7, 6, "cpu")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # a function of the step's seed
    x3, _ = data.batch(8, 64, "cpu")
    assert len({tuple(r.flatten().tolist()) for r in x3}) <= 10  # only pooled items


@needs_clip
def test_conditioner_caption_dropout():
    from shapes.clip import ShapesCLIP

    enc = ShapesCLIP.from_pretrained(str(train_dit.SHIPPED_CLIP), device="cpu").eval()
    caps = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square", "star", "heart")]
    empty = enc.tokenize([""])
    ids = enc.tokenize(caps)
    assert not (ids == empty).all(1).any()  # no caption tokenizes like the empty prompt

    def dropped(prob, seed):
        seen = {}
        cond = train_dit.Conditioner("text", enc, prob)
        real = enc.encode_text_tokens
        enc.encode_text_tokens = lambda i: (seen.setdefault("ids", i), real(i))[1]
        try:
            tokens, keep = cond(caps, seed)
        finally:
            del enc.encode_text_tokens
        assert tokens.dtype == torch.float32 and tokens.shape[0] == len(caps)
        return (seen["ids"] == empty).all(1)

    assert dropped(1.0, 3).all() and not dropped(0.0, 3).any()
    half = dropped(0.5, 3)
    assert torch.equal(half, dropped(0.5, 3)) and 0 < half.sum() < len(caps)
    assert any(not torch.equal(half, dropped(0.5, s)) for s in range(4, 8))
    # no seed (evaluation): nothing dropped whatever the probability
    cond = train_dit.Conditioner("text", enc, 1.0)
    t_none, _ = cond(caps)
    t_keep, _ = train_dit.Conditioner("text", enc, 0.0)(caps, 3)
    torch.testing.assert_close(t_none, t_keep)
    # token ids in (a pool's) give the same as the captions
    t_ids, _ = train_dit.Conditioner("text", enc, 0.0)(ids, 3)
    torch.testing.assert_close(t_ids, t_keep)
    assert train_dit.Conditioner("class")(torch.tensor([1, 2])).tolist() == [1, 2]


def test_selection_score():
    s = train_dit.selection_score
    assert s("class", {"prompt_accuracy": 0.7, "shape": 0.1}) == pytest.approx(0.7)
    assert s("text", {"one_object_accuracy": 0.9, "two_object_accuracy": 0.5, "one_object_shape": 0.0}) == \
        pytest.approx(0.7)
    assert s("video", {"motion_accuracy": 0.6, "frame_prompt_accuracy": 1.0, "direction": 0.0}) == pytest.approx(0.8)
    assert s("text", {"one_object_accuracy": 0.9}) == pytest.approx(0.9)  # a missing target is left out
    assert s("class", {"eval_loss": 0.1}) == -1.0  # no sample metrics: below any real score


@needs_vae
def test_time_limit_checkpoints_so_a_longer_limit_resumes(tiny_dit, tmp_path, capsys):
    _train(tmp_path, tiny_dit, 50, "--time-limit", "0.001", "--ckpt-every", "1000")  # stops after step 1
    assert (tmp_path / "checkpoints" / "step_1" / "meta.json").is_file()
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert card["steps"] == 1
    _train(tmp_path, tiny_dit, 3, "--ckpt-every", "1000")  # same run folder, no limit: continues from step 1
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "loss" in r] \
        == [1, 2, 3]


def test_qk_norm_flag_builds_fresh_sizes_and_refuses_trained_models(tmp_path):
    for name, cls in (("DiT-T/2", "DiT"), ("PixArt-T/2", "PixArtDiT"), ("Latte-T/2", "LatteDiT")):
        model = train_dit.load_model(name, "ddpm", qk_norm=True)
        assert type(model).__name__ == cls and model.config.qk_norm
        assert any("qk_norm" in k for k in model.state_dict())
        assert not train_dit.load_model(name, "ddpm").config.qk_norm
    DiT(**TINY).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="--qk-norm applies to a fresh named size"):
        train_dit.load_model(str(tmp_path / "m"), "ddpm", qk_norm=True)


@needs_vae
def test_init_from_image_checks_the_pair(tmp_path):
    # PixArt-T/2 has 6 blocks, Latte-T/2 3 pairs: refused before any training; a class model is no image model
    with pytest.raises(ValueError, match="spatial blocks"):
        _train(tmp_path / "a", "Latte-T/2", 1, "--init-from-image", "PixArt-T/2")
    with pytest.raises(ValueError, match="starts a video model from a text-to-image model"):
        _train(tmp_path / "b", "Latte-T/2", 1, "--init-from-image", "DiT-T/2")
    # the six-pair size starts from the six-block image size: one step runs from the copied weights
    _train(tmp_path / "c", "Latte-T6/1", 1, "--init-from-image", "PixArt-T/1", "--batch-size", "2", "--eval-n", "2")
    assert _losses(tmp_path / "c")


@needs_vae
def test_trainable_trains_only_the_matching_parameters(tmp_path):
    from dit.latte import LatteDiT
    from dit.pixart import PixArtDiT

    torch.manual_seed(0)
    image = PixArtDiT.from_name("PixArt-T/1")
    with torch.no_grad():  # a trained model's gates and output layer are not zero (fresh ones are: no gradients)
        for p in image.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    image.save_pretrained(tmp_path / "image")
    image = PixArtDiT.from_pretrained(tmp_path / "image").state_dict()
    _train(tmp_path / "v", "Latte-T6/1", 2, "--init-from-image", str(tmp_path / "image"), "--trainable",
           r"temporal_blocks\.", "--batch-size", "2", "--eval-n", "2", "--ema-decay", "0", "--lr", "1e-2",
           "--warmup", "0", "--save-to", str(tmp_path / "video"))
    video = LatteDiT.from_pretrained(tmp_path / "video" / "transformer").state_dict()
    for k, v in image.items():  # the image weights: frozen, saved unchanged
        assert torch.equal(video[k.replace("blocks.", "spatial_blocks.", 1) if k.startswith("blocks.") else k], v), k
    # the temporal blocks trained: their zero-initialised output projections moved
    assert video["temporal_blocks.0.attn.proj.weight"].abs().sum() > 0
    with pytest.raises(ValueError, match="matches no parameter"):
        _train(tmp_path / "w", "Latte-T/2", 1, "--trainable", "no_such_module")


@needs_vae
def test_video_model_saved_over_its_image_model(tmp_path):
    """--trainable on the temporal blocks and the spatial cross-attention with --save-over-image: the folder holds
    only those tensors (the rest is the image model's, referenced); continuing it saves over the image model again."""
    from safetensors.torch import load_file

    from dit.latte import OVER_IMAGE_WEIGHTS, LatteDiT
    from dit.pixart import PixArtDiT

    torch.manual_seed(0)
    image = PixArtDiT.from_name("PixArt-T/1")
    with torch.no_grad():
        for p in image.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    image.save_pretrained(tmp_path / "image")
    common = ("--batch-size", "2", "--eval-n", "2", "--ema-decay", "0", "--lr", "1e-2", "--warmup", "0")
    _train(tmp_path / "v", "Latte-T6/1", 2, "--init-from-image", str(tmp_path / "image"), "--trainable",
           r"temporal_blocks\.|spatial_blocks\.\d+\.cross_attn\.", "--save-over-image", str(tmp_path / "image"),
           *common, "--save-to", str(tmp_path / "video"))
    saved = load_file(tmp_path / "video" / "transformer" / OVER_IMAGE_WEIGHTS)
    assert saved and all(k.startswith("temporal_blocks.") or ".cross_attn." in k for k in saved), sorted(saved)
    assert any(".cross_attn." in k for k in saved)
    first = LatteDiT.from_pretrained(tmp_path / "video" / "transformer").state_dict()
    _train(tmp_path / "w", str(tmp_path / "video"), 1, "--trainable", r"temporal_blocks\.", *common,
           "--save-to", str(tmp_path / "video2"))
    assert (tmp_path / "video2" / "transformer" / OVER_IMAGE_WEIGHTS).is_file()
    second = LatteDiT.from_pretrained(tmp_path / "video2" / "transformer").state_dict()
    assert not torch.equal(first["temporal_blocks.0.mlp.fc2.weight"], second["temporal_blocks.0.mlp.fc2.weight"])
    assert torch.equal(first["spatial_blocks.0.cross_attn.q.weight"], second["spatial_blocks.0.cross_attn.q.weight"])
    with pytest.raises(ValueError, match="video models"):
        _train(tmp_path / "x", "PixArt-T/2", 1, "--save-over-image", str(tmp_path / "image"))


@needs_vae
def test_grounding_loss_for_text_and_video_models(tmp_path):
    """--grounding-loss: the pool carries each item's object masks and tokens (per frame for a video), the term is
    logged and in (0, 1); it needs a pool and a caption-reading model."""
    def grounding(out):
        return [r["grounding"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "grounding" in r]

    _train(tmp_path / "t", "PixArt-T/2", 2, "--grounding-loss", "0.05", "--pool", "16", "--objects", "1-2",
           "--ckpt-every", "1000")
    _train(tmp_path / "v", "Latte-T/2", 2, "--grounding-loss", "0.05", "--pool", "8", "--batch-size", "2",
           "--eval-n", "2", "--ckpt-every", "1000")
    for run in ("t", "v"):
        g = grounding(tmp_path / run)
        assert len(g) == 2 and all(0 < x < 1 for x in g), (run, g)
    with pytest.raises(ValueError, match="--pool"):
        _train(tmp_path / "n", "PixArt-T/2", 1, "--grounding-loss", "0.05")
    with pytest.raises(ValueError, match="text and video models"):
        _train(tmp_path / "c", "DiT-T/2", 1, "--grounding-loss", "0.05", "--pool", "8")
