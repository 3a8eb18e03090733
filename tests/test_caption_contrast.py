"""The counterfactual-caption contrast (dit/caption_contrast.py): the counterfactual captions change the motions
and nothing else, the term's values and gradient by hand, one batched forward equals two separate ones, a short
optimisation with the term makes a tiny video model tell the two captions apart (and without it does not), and
train_dit.py runs it from a pool and refuses what it cannot do."""
import json
import sys
from pathlib import Path

import pytest
import torch

from dit.caption_contrast import CaptionContrast, contrast_loss, relative_gap
from dit.latte import LatteDiT
from dit.objectives import DDPMObjective, FlowMatchingObjective
from shapes.data import make_batch
from shapes.scene import MOTIONS
from shapes.text import COUNTERFACTUAL_MOTION, parse_caption

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import train_dit  # noqa: E402


def test_counterfactual_captions_change_the_motions_only():
    b = make_batch("video", 5, 64, size=16, num_frames=2)
    again = make_batch("video", 5, 64, size=16, num_frames=2)
    assert b["caption"] == again["caption"] and b["counterfactual"] == again["counterfactual"]
    seen = set()
    for scene, cap, counter in zip(b["scenes"].to_scenes(), b["caption"], b["counterfactual"]):
        assert cap != counter
        true, cf = parse_caption(cap).objects, parse_caption(counter).objects
        assert len(true) == len(cf) == len(scene.objects)
        for o, p, q in zip(scene.objects, true, cf):
            assert (p.shape, p.colour) == (q.shape, q.colour) == (o.shape, o.colour), (cap, counter)
            assert p.motion == o.motion and q.motion == COUNTERFACTUAL_MOTION[o.motion], (cap, counter)
            if o.motion == "recolour":
                assert q.colour2 not in (o.colour2, o.colour), (cap, counter)
            seen.add(o.motion)
    assert seen == set(MOTIONS[1:])  # every motion a video can have was swapped at least once here


def test_contrast_loss_and_gap_by_hand():
    err_true = torch.tensor([1.0, 1.0, 1.0, 2.0], requires_grad=True)
    err_cf = torch.tensor([2.0, 1.02, 0.5, 1.0], requires_grad=True)
    weight, active = torch.tensor([1.0, 1.0, 2.0, 1.0]), torch.tensor([True, True, False, True])
    loss = contrast_loss(err_true, err_cf, weight, active, margin=0.05)
    # rows: met by far (0), short of the margin (1 - 1.02 + 0.05), inactive, worse under the true caption (2 - 1 + 0.1)
    torch.testing.assert_close(loss, torch.tensor((0.03 + 1.1) / 4))
    loss.backward()
    torch.testing.assert_close(err_true.grad, torch.tensor([0, 0.25, 0, 0.25]))  # the margin's sg(e) takes none
    torch.testing.assert_close(err_cf.grad, torch.tensor([0, -0.25, 0, -0.25]))
    gap = relative_gap(err_true.detach(), err_cf.detach(), active)
    torch.testing.assert_close(gap, torch.tensor((1.0 + 0.02 - 0.5) / 3))
    assert relative_gap(err_true.detach(), err_cf.detach(), torch.zeros(4, dtype=torch.bool)) == 0


def _tiny_video():
    torch.manual_seed(0)
    model = LatteDiT(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                     caption_channels=24, max_text_tokens=6, num_frames=4, qk_norm=True)
    with torch.no_grad():  # O(1) weights: zero-initialised gates would hide the text's effect
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _fn(model):
    return lambda x, t, c: model(x, t, encoder_hidden_states=c[0], encoder_attention_mask=c[1])


@pytest.mark.parametrize("objective", [DDPMObjective(p2_gamma=1.0), FlowMatchingObjective()], ids=["ddpm-p2", "flow"])
def test_one_batched_forward_equals_two_separate(objective):
    model = _tiny_video().eval()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 4, 8, 8, generator=g)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0]] * 3).bool()
    cond, counter = (torch.randn(3, 6, 24, generator=g), keep), (torch.randn(3, 6, 24, generator=g), keep)
    t, noise = objective.sample(x0, g)
    if isinstance(objective, DDPMObjective):
        t = torch.tensor([100, 600, 900])
    else:
        t = torch.tensor([0.1, 0.6, 0.9])
    kept = torch.tensor([True, True, False])
    terms = CaptionContrast(objective, weight=2.0, margin=0.1, noise_from=0.5)(_fn(model), x0, cond, counter,
                                                                                 (t, noise), kept)
    x_t, mt = objective.noised(x0, noise, t)
    out, out_cf = model(x_t, mt, *cond), model(x_t, mt, *counter)
    plain = objective(_fn(model), x0, cond, draws=(t, noise))
    e, e_cf = (objective.prediction_error(o, x0, x_t, noise, t) for o in (out, out_cf))
    w = objective.sample_weight(t)
    expect = (w[1] * torch.relu(e[1] - e_cf[1] + 0.1 * e[1])) / 3  # row 0 below noise_from, row 2 dropped
    torch.testing.assert_close(terms["contrast"], expect, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(terms["loss"], plain["loss"] + 2.0 * expect, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(terms["contrast_gap"], (e_cf[1] - e[1]) / e[1], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="weight > 0"):
        CaptionContrast(objective, weight=0.0)


def test_the_term_teaches_a_tiny_model_to_tell_the_captions_apart():
    """The same 8 clips and noise, 50 Adam steps on the denoising loss alone and with the contrast: with it, the
    counterfactual caption explains the clips over 10% worse than the true one (the margin asks 5% per row);
    without it, the gap stays under 2%. The true caption's own loss ends no higher. The two captions differ in one
    token's features, as "left" and "right" do."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(8, 4, 4, 8, 8, generator=g)
    tokens = torch.randn(8, 6, 24, generator=g)
    counter_tokens = tokens.clone()
    counter_tokens[:, 3] = torch.randn(8, 24, generator=g)
    keep = torch.ones(8, 6, dtype=torch.bool)
    objective = DDPMObjective()
    draws = (torch.randint(400, 1000, (8,), generator=g), torch.randn(x0.shape, generator=g))
    kept = torch.ones(8, dtype=torch.bool)
    contrast = CaptionContrast(objective, 1.0, margin=0.05, noise_from=0.4)
    gaps, mse = {}, {}
    for with_contrast in (False, True):
        model = _tiny_video().train()
        opt = torch.optim.Adam(model.parameters(), lr=5e-3)
        for _ in range(50):
            if with_contrast:
                loss = contrast(_fn(model), x0, (tokens, keep), (counter_tokens, keep), draws, kept)["loss"]
            else:
                loss = objective(_fn(model), x0, (tokens, keep), draws=draws)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            terms = contrast(_fn(model.eval()), x0, (tokens, keep), (counter_tokens, keep), draws, kept)
        gaps[with_contrast], mse[with_contrast] = terms["contrast_gap"].item(), terms["mse"].item()
    assert gaps[True] > 0.1 and abs(gaps[False]) < 0.02, gaps
    assert mse[True] <= 1.05 * mse[False], mse


needs_vae = pytest.mark.skipif(not train_dit.SHIPPED_VAE.is_dir(), reason="shapes-vae not shipped yet")


@needs_vae
def test_train_dit_runs_the_contrast_from_a_pool_and_refuses_the_rest(tmp_path):
    def run(out, model, *extra):
        args = train_dit.parse_args(["--out", str(out), "--model", model, "--steps", "2", "--batch-size", "2",
                                     "--cpu", "--eval-n", "2", "--log-every", "1", "--eval-every", "1000",
                                     "--ckpt-every", "1000", *extra])
        return train_dit.main(args)

    run(tmp_path / "v", "Latte-T/2", "--caption-contrast", "1", "--pool", "4", "--contrast-from", "0")
    rows = [r for r in map(json.loads, (tmp_path / "v" / "log.jsonl").read_text().splitlines()) if "contrast" in r]
    assert len(rows) == 2 and all(r["contrast"] >= 0 and r["loss"] >= r["mse"] for r in rows), rows
    with pytest.raises(ValueError, match="--pool"):
        run(tmp_path / "n", "Latte-T/2", "--caption-contrast", "1")
    with pytest.raises(ValueError, match="video models"):
        run(tmp_path / "t", "PixArt-T/2", "--caption-contrast", "1", "--pool", "4")
