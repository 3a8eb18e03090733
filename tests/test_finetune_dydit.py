"""scripts/finetune_dydit.py end to end on a tiny DiT (CPU) and the DyDiT folder format (dit/dydit_io.py): routers-only
training drives the executed-FLOPs ratio (sliced path, MacCounter) from ~1 toward lambda, the saved folder reloads to
the same outputs and leaves the backbone bit-identical, the grad-norm skip rule skips and logs its rate, and
`--train td-lora` on a text model under the flow objective trains routers + adapters and saves them beside each
other."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from dit.dit import DiT
from dit.dydit_io import load_dydit, save_dydit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import finetune_dydit  # noqa: E402
import train_dit  # noqa: E402

TINY = dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=48)
needs_vae = pytest.mark.skipif(not train_dit.SHIPPED_VAE.is_dir(), reason="shapes-vae not shipped")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny DiT folder with small random adaLN and final-layer weights (adaLN-Zero would make every block the
    identity and the output zero, and every comparison of outputs below vacuous)."""
    torch.manual_seed(0)
    dit = DiT(**TINY)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "modulation" in name or name.startswith("final."):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("base") / "tiny-dit"
    dit.save_pretrained(folder)
    return folder


def _run(out: Path, base: Path, steps: int, *extra: str) -> dict:
    args = finetune_dydit.parse_args([
        "--out", str(out), "--model", str(base), "--steps", str(steps), "--batch-size", "8", "--pool", "32", "--cpu",
        "--lam", "0.5", "--lam-hold", "0", "--lam-reach", "10", "--ckpt-every", "1000", "--eval-n", "8",
        "--flops-grid", "4", *extra])
    return finetune_dydit.main(args)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@needs_vae
def test_routers_only_finetune_lowers_flops_and_reloads(tiny_base, tmp_path):
    out = tmp_path / "run"
    metrics = _run(out, tiny_base, 30, "--lr", "1e-2", "--router-bias", "2", "--eval-every", "15",
                   "--ema-decay", "0.5", "--stage1-steps", "10")
    evals = [r for r in _log(out) if "flops_executed" in r]
    first, last = evals[0], metrics
    assert first["step"] == 0 and first["flops_executed"] > 0.95  # gates start (nearly) all on
    assert last["flops_executed"] < 0.9 and first["flops_executed"] - last["flops_executed"] > 0.2
    assert abs(last["flops_executed"] - 0.5) < abs(first["flops_executed"] - 0.5)  # toward lambda
    assert {r["stage"] for r in _log(out) if "stage" in r} == {1, 2}

    folder = out / "model"
    config = json.loads((folder / "dydit_config.json").read_text())
    assert config["backbone"] == "base" and not (folder / "transformer").exists()
    assert (folder / config["base"]).resolve() == tiny_base.resolve()
    loaded = load_dydit(folder)
    # routers-only: the backbone is bit-identical to the base
    base = DiT.from_pretrained(tiny_base)
    for (k, a), (_, b) in zip(base.state_dict().items(), loaded.dit.state_dict().items()):
        assert torch.equal(a, b), k
    # the same outputs as the in-memory model (eval mode, sliced and masked paths)
    in_memory = finetune_dydit.build_dydit(base, 5.0, 0)
    in_memory.routers.load_state_dict(loaded.routers.state_dict())
    in_memory.eval()
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 5, 17, 47])
    for mode in ("sliced", "masked"):
        a, b = loaded(x, 500, y, mode=mode), in_memory(x, 500, y, mode=mode)
        torch.testing.assert_close(a.sample, b.sample, rtol=0, atol=1e-6)
    # the routers file is small: nothing of the backbone in it
    assert (folder / "routers.safetensors").stat().st_size < (tiny_base / "diffusion_pytorch_model.safetensors").stat().st_size


@needs_vae
def test_skip_rule_full_training_stage1(tiny_base, tmp_path):
    """--train full with stage 1 (complete forward); a tiny threshold skips every update: weights unchanged."""
    out = tmp_path / "skip"
    _run(out, tiny_base, 3, "--train", "full", "--skip-grad-norm", "1e-12", "--eval-every", "1000",
         "--lr", "1e-2", "--log-every", "1")
    steps = [r for r in _log(out) if "skipped" in r]
    assert len(steps) == 3 and all(r["skipped"] for r in steps) and steps[-1]["skip_rate"] == 1.0
    assert all("loss_complete" in r for r in steps)
    assert json.loads((out / "model" / "card.json").read_text())["skip_rate"] == 1.0
    loaded = load_dydit(out / "model")
    assert json.loads((out / "model" / "dydit_config.json").read_text())["backbone"] == "included"
    base = DiT.from_pretrained(tiny_base)
    for (k, a), (_, b) in zip(base.state_dict().items(), loaded.dit.state_dict().items()):
        assert torch.equal(a, b), k
    ref = finetune_dydit.build_dydit(base, 5.0, 0)
    for (k, a), (_, b) in zip(ref.routers.state_dict().items(), loaded.routers.state_dict().items()):
        assert torch.equal(a, b), k


def test_bad_lambda_is_refused(tmp_path):
    args = finetune_dydit.parse_args(["--out", str(tmp_path / "x"), "--steps", "1", "--lam", "1.5"])
    with pytest.raises(ValueError, match="--lam must be in"):
        finetune_dydit.main(args)


def test_bad_high_noise_floor_is_refused(tmp_path):
    for extra in (["--high-noise-floor", "0"], ["--high-noise-floor", "0.8", "--high-noise-from", "1"]):
        args = finetune_dydit.parse_args(["--out", str(tmp_path / "x"), "--steps", "1", *extra])
        with pytest.raises(ValueError, match="--high-noise-floor must be in"):
            finetune_dydit.main(args)


@needs_vae
def test_high_noise_floor_term_is_logged_and_trains(tiny_base, tmp_path):
    """The floor term is in the loss (logged each step): with a floor of 1 on every noise level it is positive as
    soon as the gates close below all-on."""
    out = tmp_path / "floor"
    _run(out, tiny_base, 4, "--lr", "1e-2", "--router-bias", "0.5", "--log-every", "1", "--eval-every", "1000",
         "--high-noise-floor", "1", "--high-noise-from", "0")
    steps = [r for r in _log(out) if "loss_floor" in r]
    assert len(steps) == 4 and all(r["loss_floor"] >= 0 for r in steps)
    assert any(r["loss_floor"] > 0 for r in steps) and all(r["flops_train"] < 1 for r in steps)
    ratio_gap = [2 * (1 - r["flops_train"]) ** 2 for r in steps]  # the floor term is at least 2 (1 - mean r)^2
    assert all(r["loss_floor"] >= g - 1e-6 for r, g in zip(steps, ratio_gap))


@needs_vae
def test_p2_weighting_lowers_the_loss_term_not_the_logged_mse(tiny_base, tmp_path):
    """--p2-gamma weights the DyDiT's data loss by 1 / (1 + SNR_t)^gamma (< 1 at every t): the same step, same draws,
    logs a smaller loss_dynamic than without it; refused with the flow objective."""
    runs = {}
    for name, extra in (("plain", []), ("p2", ["--p2-gamma", "1"])):
        out = tmp_path / name
        _run(out, tiny_base, 2, "--log-every", "1", "--eval-every", "1000", *extra)
        runs[name] = [r for r in _log(out) if "loss_dynamic" in r]
    assert len(runs["p2"]) == 2
    first_plain, first_p2 = runs["plain"][0], runs["p2"][0]
    assert 0 < first_p2["loss_dynamic"] < first_plain["loss_dynamic"]
    args = finetune_dydit.parse_args(["--out", str(tmp_path / "x"), "--steps", "1", "--objective", "flow",
                                      "--p2-gamma", "1"])
    with pytest.raises(ValueError, match="--p2-gamma is a DDPM option"):
        finetune_dydit.main(args)


def test_stratified_timesteps_cover_the_quarters():
    t = finetune_dydit.stratified_timesteps(8, 1000, torch.Generator().manual_seed(0))
    assert [int(v) // 250 for v in t] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_load_errors(tiny_base, tmp_path):
    from dit.dydit import DyDiT

    model = DyDiT.from_dit(DiT.from_pretrained(tiny_base))
    folder = tmp_path / "dy"
    save_dydit(folder, model, lam=0.5, base=tiny_base)
    cfg = json.loads((folder / "dydit_config.json").read_text())
    cfg["base"] = "../nowhere"
    (folder / "dydit_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="base model"):
        load_dydit(folder)
    other = tmp_path / "wide"
    DiT(**{**TINY, "hidden_size": 32}).save_pretrained(other)
    cfg["base"] = "../wide"
    (folder / "dydit_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="routers were trained for"):
        load_dydit(folder)
    cfg.update(base="../tiny", hidden_size=32)
    DiT(**{**TINY, "hidden_size": 32}).save_pretrained(tmp_path / "tiny")
    (folder / "dydit_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shapes do not match"):
        load_dydit(folder)


@pytest.fixture(scope="module")
def tiny_pixart(tmp_path_factory) -> Path:
    """A tiny PixArtDiT folder for the shapes CLIP (96-wide, 32-token text), small random adaLN / head weights."""
    from dit.pixart import PixArtDiT

    torch.manual_seed(0)
    model = PixArtDiT(sample_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                      caption_channels=96, max_text_tokens=32, learn_sigma=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "scale_shift_table" in name or "final" in name or "cross_attn.proj" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("base") / "tiny-pixart"
    model.save_pretrained(folder)
    return folder


@needs_vae
@pytest.mark.skipif(not train_dit.SHIPPED_CLIP.is_dir(), reason="shapes-clip not shipped")
def test_td_lora_text_flow_finetune(tiny_pixart, tmp_path):
    """--train td-lora on a text model under the flow objective: routers and adapters train, the backbone is
    frozen, the folder holds routers + adapter and reloads to the same outputs; FLOPs move toward lambda."""
    from dit.pixart import PixArtDiT

    out = tmp_path / "tdlora"
    metrics = _run(out, tiny_pixart, 30, "--train", "td-lora", "--objective", "flow", "--lr", "1e-2",
                   "--router-bias", "2", "--eval-every", "15", "--ema-decay", "0.5", "--lora-rank", "2",
                   "--lora-experts", "2")
    evals = [r for r in _log(out) if "flops_executed" in r]
    assert evals[0]["step"] == 0 and metrics["flops_executed"] < evals[0]["flops_executed"] - 0.1
    assert all("loss_complete" not in r for r in _log(out))  # frozen backbone: no complete term
    folder = out / "model"
    config = json.loads((folder / "dydit_config.json").read_text())
    assert config["td_lora"]["rank"] == 2 and config["base_class"] == "PixArtDiT" and config["objective"] == "flow"
    loaded = load_dydit(folder)
    base = PixArtDiT.from_pretrained(tiny_pixart)
    for (k, a), (_, b) in zip(base.state_dict().items(), loaded.dit.state_dict().items()):
        assert torch.equal(a, b), k
    # the adapter moved away from its zero init
    assert max(b.abs().max().item() for lora in loaded.lora for b in lora.B.values()) > 0
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = loaded(x, 300.0, text, mode="sliced"), loaded(x, 300.0, text, mode="masked")
    torch.testing.assert_close(a.sample, b.sample, rtol=1e-5, atol=1e-5)


def test_flow_times_are_stratified():
    t = finetune_dydit.stratified_flow_times(8, torch.Generator().manual_seed(0))
    assert [int(v * 4) for v in t] == [0, 0, 1, 1, 2, 2, 3, 3] and bool(((t >= 0) & (t < 1)).all())


@needs_vae
def test_init_from_continues_a_saved_dydit(tiny_base, tmp_path):
    """--init-from: a TD-LoRA fine-tune saved, then continued. Before any update the continued model is the saved
    one (same outputs), the cosine schedule anneals to zero at --steps, lambda holds from the first step (hold =
    reach = 0), and a folder of another kind or adapter size is refused."""
    first = tmp_path / "first"
    _run(first, tiny_base, 4, "--train", "td-lora", "--lora-rank", "2", "--lora-experts", "2", "--lr", "1e-2",
         "--router-bias", "2", "--eval-every", "1000", "--ema-decay", "0.5")
    saved = load_dydit(first / "model")
    args = finetune_dydit.parse_args([
        "--out", str(tmp_path / "second"), "--model", str(tiny_base), "--steps", "4", "--batch-size", "8", "--pool",
        "32", "--cpu", "--lam", "0.5", "--lam-hold", "0", "--lam-reach", "0", "--ckpt-every", "1000", "--eval-n", "8",
        "--flops-grid", "4", "--train", "td-lora", "--lora-rank", "2", "--lora-experts", "2", "--lr", "1e-2",
        "--init-from", str(first / "model"), "--schedule", "cosine", "--warmup", "1", "--eval-every", "1000",
        "--log-every", "1"])
    base = DiT.from_pretrained(tiny_base)
    continued = finetune_dydit.continued_dydit(Path(args.init_from), base, args).eval()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([1, 40])
    torch.testing.assert_close(continued(x, 700, y, mode="sliced").sample, saved(x, 700, y, mode="sliced").sample,
                               rtol=0, atol=0)
    finetune_dydit.main(args)
    steps = [r for r in _log(tmp_path / "second") if "lam_t" in r]
    assert [r["lam_t"] for r in steps] == [0.5] * 4
    assert steps[0]["lr"] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi / 4))) and steps[-1]["lr"] == 0.0
    for wrong, match in ((["--train", "full"], "holds a td-lora fine-tune"),
                         (["--train", "td-lora", "--lora-rank", "3"], "TD-LoRA rank 2 x 2 experts")):
        bad = finetune_dydit.parse_args(["--out", str(tmp_path / "bad"), "--steps", "1", "--lora-experts", "2",
                                         "--init-from", str(first / "model"), *wrong])
        with pytest.raises(ValueError, match=match):
            finetune_dydit.continued_dydit(Path(bad.init_from), base, bad)


@needs_vae
def test_init_from_a_packed_folder_trains_its_own_backbone_and_saves_it_packed(tiny_base, tmp_path):
    """--init-from a TD-LoRA folder that includes its backbone as int8 (scripts/pack_dydit.py's layout): the run
    routes that backbone (not --model's), keeps it frozen, and saves the continuation in the same layout; --distill
    is refused there (its teacher would be --model's transformer)."""
    from dit.dydit_io import BACKBONE_DIR
    from dit.int8_weights import INT8_WEIGHTS

    first = tmp_path / "first"
    _run(first, tiny_base, 2, "--train", "td-lora", "--lora-rank", "2", "--lora-experts", "2", "--lr", "1e-2",
         "--router-bias", "2", "--eval-every", "1000", "--ema-decay", "0.5")
    model = load_dydit(first / "model")
    with torch.no_grad():
        model.dit.blocks[0].mlp.fc1.weight.mul_(2.0)  # a backbone other than --model's
    packed = save_dydit(tmp_path / "packed", model, lam=0.5, base=tiny_base, include_backbone=True,
                        int8_backbone=True, extra={"train": "td-lora"})
    common = ["--model", str(tiny_base), "--batch-size", "8", "--pool", "32", "--cpu", "--lam", "0.5", "--lam-hold",
              "0", "--lam-reach", "0", "--ckpt-every", "1000", "--eval-n", "8", "--flops-grid", "4", "--train",
              "td-lora", "--lora-rank", "2", "--lora-experts", "2", "--lr", "1e-3", "--init-from", str(packed),
              "--eval-every", "1000"]
    args = finetune_dydit.parse_args(["--out", str(tmp_path / "second"), "--steps", "2", *common])
    continued = finetune_dydit.continued_dydit(packed, DiT.from_pretrained(tiny_base), args)
    torch.testing.assert_close(continued.dit.blocks[0].mlp.fc1.weight, load_dydit(packed).dit.blocks[0].mlp.fc1.weight)
    finetune_dydit.main(args)
    out = tmp_path / "second" / "model"
    config = json.loads((out / "dydit_config.json").read_text())
    assert config["backbone"] == "included" and config["td_lora"]["rank"] == 2
    assert (out / BACKBONE_DIR / INT8_WEIGHTS).is_file()
    a, b = load_dydit(packed).dit.state_dict(), load_dydit(out).dit.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # frozen, stored the same way
    bad = finetune_dydit.parse_args(["--out", str(tmp_path / "bad"), "--steps", "1", *common, "--distill", "1"])
    with pytest.raises(ValueError, match="includes its own backbone"):
        finetune_dydit.continued_dydit(packed, DiT.from_pretrained(tiny_base), bad)


def test_rebase_moves_a_packed_folders_routers_onto_the_model(tiny_base, tmp_path):
    """--init-from a packed folder with --rebase: its routers and TD-LoRA go onto --model's backbone (a dense model
    retrained since), which stays frozen; the result is saved over --model, without a backbone; a full fine-tune
    and --rebase without --init-from are refused."""
    first = tmp_path / "first"
    _run(first, tiny_base, 2, "--train", "td-lora", "--lora-rank", "2", "--lora-experts", "2", "--lr", "1e-2",
         "--router-bias", "2", "--eval-every", "1000", "--ema-decay", "0.5")
    model = load_dydit(first / "model")
    with torch.no_grad():
        model.dit.blocks[0].mlp.fc1.weight.mul_(2.0)  # the folder's own backbone differs from --model's
    packed = save_dydit(tmp_path / "packed", model, lam=0.5, base=tiny_base, include_backbone=True,
                        int8_backbone=True, extra={"train": "td-lora"})
    common = ["--model", str(tiny_base), "--batch-size", "8", "--pool", "32", "--cpu", "--lam", "0.5", "--lam-hold",
              "0", "--lam-reach", "0", "--ckpt-every", "1000", "--eval-n", "8", "--flops-grid", "4", "--train",
              "td-lora", "--lora-rank", "2", "--lora-experts", "2", "--lr", "1e-3", "--init-from", str(packed),
              "--eval-every", "1000", "--rebase"]
    args = finetune_dydit.parse_args(["--out", str(tmp_path / "second"), "--steps", "2", *common])
    base = DiT.from_pretrained(tiny_base)
    moved = finetune_dydit.continued_dydit(packed, base, args)
    assert moved.dit is base  # --model's backbone, not the folder's
    src = load_dydit(packed)
    for a, b in zip(moved.routers.state_dict().values(), src.routers.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(moved.lora.state_dict().values(), src.lora.state_dict().values()):
        assert torch.equal(a, b)
    finetune_dydit.main(args)
    out = tmp_path / "second" / "model"
    config = json.loads((out / "dydit_config.json").read_text())
    assert config["backbone"] == "base" and config["td_lora"]["rank"] == 2
    saved = load_dydit(out).dit.state_dict()
    dense = DiT.from_pretrained(tiny_base).state_dict()
    assert all(torch.equal(saved[k], dense[k]) for k in dense)  # frozen, and --model's
    with pytest.raises(ValueError, match="give --init-from"):
        finetune_dydit.main(finetune_dydit.parse_args(["--out", str(tmp_path / "x"), "--steps", "1", "--model",
                                                       str(tiny_base), "--cpu", "--rebase"]))
    full = save_dydit(tmp_path / "full", finetune_dydit.build_dydit(DiT.from_pretrained(tiny_base), 5.0, 0), lam=0.5,
                      base=tiny_base, include_backbone=True, extra={"train": "full"})
    with pytest.raises(ValueError, match="full fine-tune"):
        finetune_dydit.continued_dydit(full, DiT.from_pretrained(tiny_base), args)


def test_distill_term_is_zero_for_the_dense_path_and_trains(tiny_base, tmp_path):
    """--distill: the frozen dense base is the teacher. Gates all on and TD-LoRA at its zero init, the dynamic
    prediction is the teacher's, so the term is ~0; moved adapters make it positive; a run logs it."""
    from dit.objectives import make_objective

    base = DiT.from_pretrained(tiny_base)
    teacher = DiT.from_pretrained(tiny_base).eval()
    base.label_embed.dropout_prob = 0.0  # as the script: its conditioner drops the labels, the teacher sees them too
    model = finetune_dydit.build_dydit(base, 5.0, 0)  # the dydit.py init: every gate on
    model.frozen_backbone()
    torch.manual_seed(1)
    model.add_td_lora(2, 2)
    model.train()
    objective = make_objective("ddpm")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 16, 16, generator=g)
    y = torch.randint(0, 48, (8,), generator=g)
    draws = finetune_dydit.draw(objective, x0, g)
    terms, _ = finetune_dydit.run_loss(objective, model, x0, (y,), draws, "masked", teacher)
    assert terms["distill"].item() < 1e-10
    with torch.no_grad():
        for lora in model.lora:
            for b in lora.B.values():
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    terms, _ = finetune_dydit.run_loss(objective, model, x0, (y,), draws, "masked", teacher)
    assert terms["distill"].item() > 1e-9  # small: the fixture's blocks are weak (modulation 0.02)
    assert set(terms) >= {"loss", "distill"}

    out = tmp_path / "distill"
    _run(out, tiny_base, 3, "--train", "td-lora", "--lora-rank", "2", "--lora-experts", "2", "--distill", "0.5",
         "--eval-every", "1000", "--log-every", "1", "--lam-start", "0.9", "--lam-hold", "1", "--lam-reach", "3")
    steps = [r for r in _log(out) if "lam_t" in r]
    assert all("loss_distill" in r and r["loss_distill"] >= 0 for r in steps)
    assert [r["lam_t"] for r in steps] == pytest.approx([0.9, 0.9, 0.7])  # held at --lam-start, then the ramp
    assert json.loads((out / "model" / "dydit_config.json").read_text())["distill"] == 0.5


@needs_vae
def test_max_grad_norm_clips_before_the_update(tiny_base, tmp_path):
    """--max-grad-norm: clipped to 1e-30, Adam's update (m / (sqrt(v) + 1e-8)) is ~1e-22, so the TD-LoRA's B stays at
    its zero init; the logged norm is the one before clipping (the same as the unclipped run's first step)."""
    common = ("--train", "td-lora", "--lora-rank", "2", "--lora-experts", "2", "--lr", "1e-2", "--router-bias", "2",
              "--eval-every", "1000", "--ema-decay", "0", "--log-every", "1")
    _run(tmp_path / "free", tiny_base, 2, *common)
    _run(tmp_path / "clipped", tiny_base, 2, *common, "--max-grad-norm", "1e-30")
    free, clipped = load_dydit(tmp_path / "free" / "model"), load_dydit(tmp_path / "clipped" / "model")
    moved = lambda m: max(b.abs().max().item() for lora in m.lora for b in lora.B.values())  # noqa: E731
    assert moved(free) > 1e-4 and moved(clipped) < 1e-12
    first = lambda d: [r for r in _log(d) if "grad_norm" in r][0]["grad_norm"]  # noqa: E731
    assert first(tmp_path / "clipped") == pytest.approx(first(tmp_path / "free"), rel=1e-5) and first(tmp_path / "free") > 0
    # the logged parts (routers, adapters) make up the whole norm
    for r in (r for r in _log(tmp_path / "free") if "grad_norm" in r):
        assert math.hypot(r["grad_norm_routers"], r["grad_norm_rest"]) == pytest.approx(r["grad_norm"], rel=1e-4)
        assert r["grad_norm_routers"] > 0 and r["grad_norm_rest"] > 0


@needs_vae
def test_grounding_loss_trains_beside_the_flops_target(tiny_pixart, tmp_path):
    """--grounding-loss: the token grounding term (dit/grounding.py) is logged and trains the adapters with the rest;
    a class model, which reads no caption, is refused."""
    out = tmp_path / "ground"
    _run(out, tiny_pixart, 4, "--train", "td-lora", "--grounding-loss", "0.05", "--objects", "1-2", "--lora-rank", "2",
         "--lora-experts", "2", "--log-every", "1")
    logged = [r["loss_grounding"] for r in _log(out) if "loss_grounding" in r]
    assert len(logged) == 4 and all(0 < g < 0.05 for g in logged)
    with pytest.raises(ValueError, match="grounding"):
        _run(tmp_path / "class", REPO / "weights" / "shapes-c2i" / "transformer", 1, "--grounding-loss", "0.05")
