"""scripts/training.SpikeGuard: a loss spike restores the last healthy model / optimiser / EMA state and halves
the LR; healthy windows only move the rollback point."""

import sys
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from training import SpikeGuard, cosine_schedule  # noqa: E402


def test_spike_restores_state_and_halves_lr():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = cosine_schedule(opt, steps=1000, warmup=1)
    ema = EMAModel(list(model.parameters()), decay=0.9)
    guard = SpikeGuard(model, opt, sched, ema, every=5, factor=3.0)

    def train_step(step, reported_loss):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        ema.step(model.parameters())
        return guard.update(step, torch.tensor(reported_loss))

    step = 0
    for _ in range(10):  # two healthy windows: the second one's end is the rollback point
        step += 1
        assert train_step(step, 0.1) is None
    healthy = {k: v.clone() for k, v in model.state_dict().items()}
    healthy_ema = [p.clone() for p in ema.shadow_params]
    healthy_moment = opt.state[model.weight]["exp_avg"].clone()
    lr_before = sched.get_last_lr()[0]
    events = [train_step(step + i + 1, 5.0) for i in range(5)]  # a spike: 50x the best window
    assert events[:4] == [None] * 4 and events[4]["rollback"] == 1 and events[4]["lr_scale"] == 0.5
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, healthy[k], rtol=0, atol=0)
    for p, h in zip(ema.shadow_params, healthy_ema):
        torch.testing.assert_close(p, h, rtol=0, atol=0)
    torch.testing.assert_close(opt.state[model.weight]["exp_avg"], healthy_moment, rtol=0, atol=0)
    sched.step()
    assert abs(sched.get_last_lr()[0] - 0.5 * lr_before) < 0.01 * lr_before  # halved (cosine barely moved)


def test_no_rollback_without_a_healthy_point_or_past_the_limit():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = cosine_schedule(opt, steps=100, warmup=1)
    guard = SpikeGuard(model, opt, sched, every=2, max_rollbacks=1)
    assert [guard.update(s, torch.tensor(float("nan"))) for s in (1, 2)] == [None, None]  # nothing saved yet
    for s in (3, 4):
        guard.update(s, torch.tensor(1.0))
    assert guard.update(5, torch.tensor(9.0)) is None and guard.update(6, torch.tensor(9.0))["rollback"] == 1
    guard.update(7, torch.tensor(9.0))
    assert guard.update(8, torch.tensor(9.0)) is None  # the limit reached: only reports from now on
