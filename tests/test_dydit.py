"""Tests of DyDiT (dit/dydit.py): router init gives the dense model, gates binarise with straight-through gradients,
the sliced/gathered inference path equals the masked training path, the FLOPs loss drives the executed ratio to
lambda, and the MAC counter counts what runs.

A random DiT is used throughout: adaLN-Zero and the zero head would make every block the identity and the output
zero, and then a wrong mask or slice would go unnoticed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dit.dit import DiT, modulate
from dit.dydit import (
    DyDiT,
    MacCounter,
    add_dydit,
    flops_loss,
    flops_ratio,
    flops_target,
    gumbel_sigmoid_gate,
    high_noise_floor_loss,
    kept_index,
    token_skip_mlp,
)

TINY = dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=48)
N_TOKENS, WIDTH, HEADS, HIDDEN = 64, 64, 4, 256
ATOL = 1e-5


def tiny_dit(seed: int = 0) -> DiT:
    """TINY with every weight random at scale 1/sqrt(fan_in) (biases 0.1), so blocks and head are not identity/zero."""
    torch.manual_seed(seed)
    dit = DiT(**TINY)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return dit.eval()


def partial_routers_(model: DyDiT, seed: int = 1) -> None:
    """Router weights and biases that switch some heads, groups and tokens off, with logits far from 0 (so float
    rounding between the two paths cannot flip a gate)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in model.routers:
            for lin in (r.head_router, r.channel_router):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.5)
                lin.bias.copy_(torch.tensor([4.0, -4.0, 4.0]) * torch.randn(3, generator=g).sign())
            r.token_router[0].weight.mul_(4.0)
            r.token_router[2].weight.mul_(8.0)
            r.token_router[2].bias.fill_(0.0)


def inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    y = torch.randint(0, 48, (batch,), generator=g)
    return x, y


# ----------------------------------------------------------------------------------------------- a: init = dense
@pytest.mark.parametrize("mode", ["masked", "sliced"])
def test_router_init_equals_dense(mode):
    dit = tiny_dit()
    model = DyDiT.from_dit(dit)
    x, y = inputs(4)
    t = torch.tensor([0, 250, 600, 999])
    with torch.no_grad():
        ref = dit(x, t if mode == "masked" else 300, y)
    if mode == "masked":  # training mode, Gumbel noise on; the label dropout is left off to compare
        model.train()
        model.dit.label_embed.eval()
        out = model(x, t, y)
    else:
        model.eval()
        out = model(x, 300, y)
    torch.testing.assert_close(out.sample, ref, atol=1e-6, rtol=0)
    assert torch.equal(out.flops_ratio, torch.ones(4))


def test_composes_without_copies():
    dit = tiny_dit()
    model = add_dydit(dit)
    assert model.dit is dit
    dit_params = {id(p) for p in dit.parameters()}
    router_params = {id(p) for p in model.routers.parameters()}
    assert {id(p) for p in model.parameters()} == dit_params | router_params
    assert set(dit.state_dict()) == {k[len("dit."):] for k in model.state_dict() if k.startswith("dit.")}


# ----------------------------------------------------------------------------------------------- b: gates
def test_gate_binarises_and_straight_through():
    logits = torch.linspace(-20, 20, 101, requires_grad=True)
    for noise in (True, False):
        gate = gumbel_sigmoid_gate(logits, noise=noise)
        assert set(gate.unique().tolist()) <= {0.0, 1.0}
        (grad,) = torch.autograd.grad(gate.sum(), logits)
        assert (grad > 0).all()
    assert torch.equal(gumbel_sigmoid_gate(logits, noise=False), (torch.sigmoid(logits) > 0.5).float())


@pytest.mark.parametrize("training", [True, False])
def test_model_masks_binary_and_grads_reach_routers(training):
    model = DyDiT.from_dit(tiny_dit())
    partial_routers_(model)
    model.train(training)
    x, y = inputs(4)
    out = model(x, torch.tensor([10, 300, 700, 990]), y, mode="masked")
    for m in out.masks:
        for v in m.values():
            assert set(v.unique().tolist()) <= {0.0, 1.0}
        assert (m["head"][:, 0] == 1).all() and (m["channel"][:, 0] == 1).all()
    (out.sample.square().mean() + flops_loss(out.flops_ratio, 0.5)).backward()
    for r in model.routers:
        for lin in (r.head_router, r.channel_router, r.token_router[0], r.token_router[2]):
            assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- c: sliced = masked
@pytest.mark.parametrize("batch,cfg", [(1, False), (16, False), (16, True)])
def test_sliced_gathered_equals_masked(batch, cfg):
    model = DyDiT.from_dit(tiny_dit()).eval()
    partial_routers_(model)
    x, y = inputs(batch, seed=batch)
    if cfg:  # cond and uncond halves, same latents and timestep
        x = torch.cat([x[: batch // 2]] * 2)
        y = torch.cat([y[: batch // 2], torch.full((batch // 2,), model.dit.null_class_id)])
    some_off = [0, 0, 0]
    with torch.no_grad():
        for t in (50, 500, 950):
            masked = model(x, t, y, mode="masked")
            sliced = model(x, torch.full((batch,), t), y, mode="sliced")
            torch.testing.assert_close(sliced.sample, masked.sample, rtol=ATOL, atol=ATOL)
            for a, b in zip(masked.masks, sliced.masks):
                for key in a:
                    assert torch.equal(a[key], b[key]), key
                some_off = [s + int((a[k] == 0).any()) for s, k in zip(some_off, ("head", "channel", "token"))]
            torch.testing.assert_close(sliced.flops_ratio, masked.flops_ratio)
    assert all(some_off), f"routers switched nothing off ({some_off}); the test would be vacuous"


def test_sliced_cache_and_errors():
    model = DyDiT.from_dit(tiny_dit()).eval()
    partial_routers_(model)
    plan = model.width_plan(500)
    assert model.width_plan(500) is plan
    x, y = inputs(2)
    model(x, 500, y)
    weights = model.step_weights(500)
    copies = len(model._permuted) + len(model._sliced)
    assert 0 < copies <= len(model.dit.blocks)  # at most one weight copy per block for one mask each
    model(x, 500, y)
    assert model.step_weights(500) is weights and len(model._permuted) + len(model._sliced) == copies  # reused
    with pytest.raises(ValueError, match="same timestep"):
        model(x, torch.tensor([1, 2]), y)
    model.train()
    assert not model._sliced and not model._permuted and not model._steps  # weights may change in training
    with pytest.raises(ValueError, match="eval"):
        model(x, 500, y, mode="sliced")


def test_complete_mode_is_dense():
    dit = tiny_dit()
    model = DyDiT.from_dit(dit)
    partial_routers_(model)
    model.train()
    model.dit.label_embed.eval()
    x, y = inputs(3)
    out = model(x, torch.tensor([5, 500, 995]), y, mode="complete")
    torch.testing.assert_close(out.sample, dit(x, torch.tensor([5, 500, 995]), y), atol=1e-6, rtol=0)
    assert torch.equal(out.flops_ratio, torch.ones(3))


# ----------------------------------------------------------------------------------------------- d: gathered MLP
def test_token_skip_mlp_equals_masked_dense():
    g = torch.Generator().manual_seed(0)
    B, N, D = 3, 10, 8
    x = torch.randn(B, N, D, generator=g)
    shift, scale, gate = (torch.randn(B, D, generator=g) for _ in range(3))
    mlp = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.GELU(), torch.nn.Linear(16, D))
    norm = torch.nn.LayerNorm(D, elementwise_affine=False)
    keep = torch.rand(B, N, generator=g) > 0.5
    keep[0] = False  # a sample with no token kept
    keep[1] = True  # and one with all
    out, kept = token_skip_mlp(x, keep, lambda h, sample: mlp(h), norm, shift, scale, gate)
    ref = x + keep[..., None] * gate[:, None] * mlp(modulate(norm(x), shift, scale))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert kept == int(keep.sum())


def test_capacity_gather_equals_exact_and_flags_overflow():
    g = torch.Generator().manual_seed(1)
    B, N, D = 3, 10, 8
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    shift, scale, gate = (torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(3))
    mlp = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.GELU(), torch.nn.Linear(16, D)).double()
    norm = torch.nn.LayerNorm(D, elementwise_affine=False)
    keep = torch.rand(B, N, generator=g) > 0.5
    keep[0, 0] = False  # token 0 (the spare rows' stand-in) not kept: its row must come back untouched
    exact, k = token_skip_mlp(x, keep, lambda h, sample: mlp(h), norm, shift, scale, gate)
    seen = []
    for cap in (k, k + 7, B * N):
        out, count = token_skip_mlp(x, keep, lambda h, sample: seen.append(sample) or mlp(h), norm, shift, scale, gate,
                                    capacity=cap)
        torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)
        assert int(count) == k and seen[-1].shape == (cap,) and int(seen[-1].max()) < B
    idx, valid, count = kept_index(keep.reshape(-1), k)
    assert torch.equal(idx, keep.reshape(-1).nonzero().squeeze(1)) and bool(valid.all())
    short, count = token_skip_mlp(x, keep, lambda h, sample: mlp(h), norm, shift, scale, gate, capacity=k - 2)
    assert int(count) == k > k - 2  # the caller sees the overflow
    first = keep.reshape(-1).nonzero().squeeze(1)[: k - 2]
    flat, ex = short.reshape(B * N, D), exact.reshape(B * N, D)
    torch.testing.assert_close(flat[first], ex[first], rtol=1e-12, atol=1e-12)  # the first k - 2 are still exact


def test_dydit_token_capacity_after_calibration():
    model = DyDiT.from_dit(tiny_dit()).eval()
    partial_routers_(model)
    x, y = inputs(6, seed=6)
    with torch.no_grad():
        with pytest.raises(ValueError, match="calibration"):
            model.use_token_capacity()
        exact = [model(x, torch.full((6,), t), y, mode="sliced").sample for t in (50, 500, 950)]
        model.use_token_capacity(margin=0.1, multiple=4)
        rows = 6 * model.num_tokens
        assert min(model._capacity_for(layer, rows) for layer in model._kept_frac) < rows  # not vacuous
        counter = MacCounter()
        fast = [model(x, torch.full((6,), t), y, mode="sliced", counter=counter).sample for t in (50, 500, 950)]
        assert model.token_overflow() == 0
        for a, b in zip(fast, exact):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert counter.ratio < 1  # spare rows are counted as executed work, still under dense
        model._kept_frac = {k: v / 4 for k, v in model._kept_frac.items()}  # capacities too small
        model(x, torch.full((6,), 500), y, mode="sliced")
        assert model.token_overflow() > 0 and model.token_overflow() == 0  # read, then reset
        model.exact_token_gather()
        torch.testing.assert_close(model(x, torch.full((6,), 500), y, mode="sliced").sample, exact[1])


# ----------------------------------------------------------------------------------------------- e: FLOPs loss
def train_routers(lam: float, floor: float | None = None, steps: int = 150):
    """Routers only (backbone frozen), flops_loss toward `lam` (plus the high-noise floor from t = 700 on, if given)
    plus the noise-prediction MSE on random latents, Adam lr 1e-2. -> the model in eval mode and the generator."""
    model = DyDiT.from_dit(tiny_dit()).frozen_backbone()
    with torch.no_grad():
        for r in model.routers:
            r.head_router.bias.fill_(1.0)
            r.channel_router.bias.fill_(1.0)
            r.token_router[2].bias.fill_(1.0)
    opt = torch.optim.Adam(model.routers.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    model.dit.label_embed.eval()
    for step in range(steps):
        x, y = torch.randn(16, 4, 16, 16, generator=g), torch.randint(0, 48, (16,), generator=g)
        t = torch.randint(0, 1000, (16,), generator=g)
        out = model(x, t, y, mode="masked")
        noise = torch.randn(16, 4, 16, 16, generator=g)
        loss = flops_loss(out.flops_ratio, lam) + F.mse_loss(out.sample[:, :4], noise)
        if floor is not None:
            loss = loss + high_noise_floor_loss(out.flops_ratio, t / 1000, floor, 0.7)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), g


def executed_by_t(model: DyDiT, g: torch.Generator) -> dict[int, float]:
    """The executed ratio (MAC counter, sliced eval path) at t = 50, 150, ..., 950."""
    by_t = {}
    with torch.no_grad():
        for t in range(50, 1000, 100):
            counter = MacCounter()
            x, y = torch.randn(8, 4, 16, 16, generator=g), torch.randint(0, 48, (8,), generator=g)
            model(x, t, y, counter=counter)
            by_t[t] = counter.ratio
    return by_t


def test_flops_loss_drives_executed_ratio_to_lambda():
    """`train_routers` toward lambda = 0.5 for 150 steps; then the executed ratio over the whole t range.

    Two departures from the recipe, both for the step budget: the router biases start at +1, not +15/+35 (Adam moves
    a bias by about lr per step, so from +15 the gates would not reach the switching range in 1000 steps); and the
    MSE term is kept because without it the gates' logits settle near 0, where the noisy training ratio (which the
    loss sees) and the thresholded eval ratio differ: flops_loss alone gave eval ratios of 0.57-0.69 from +1/+2.
    """
    lam = 0.5
    by_t = executed_by_t(*train_routers(lam))
    assert abs(sum(by_t.values()) / len(by_t) - lam) < 0.1, by_t


def test_high_noise_floor_loss_values():
    r = torch.tensor([0.3, 0.9, 0.3, 0.5])
    n = torch.tensor([0.9, 0.95, 0.2, 0.7])
    # only samples at noise >= 0.7 count (three); 0.9 is above the floor
    want = 2 * ((0.6 - 0.3) ** 2 + (0.6 - 0.5) ** 2) / 3
    assert high_noise_floor_loss(r, n, 0.6, 0.7).item() == pytest.approx(want)
    assert high_noise_floor_loss(r, n, 0.25, 0.0).item() == 0.0
    assert high_noise_floor_loss(r, n, 0.6, 0.99).item() == 0.0  # no sample that noisy
    r = r.clone().requires_grad_()
    high_noise_floor_loss(r, n, 0.6, 0.7).backward()
    assert r.grad[0] < 0 and r.grad[3] < 0 and r.grad[1] == 0 and r.grad[2] == 0  # pushes the low ones up
    for floor, start in ((0.0, 0.5), (1.2, 0.5), (0.5, 1.0), (0.5, -0.1)):
        with pytest.raises(ValueError, match="high-noise floor"):
            high_noise_floor_loss(r, n, floor, start)


def test_high_noise_floor_moves_compute_to_the_noisy_steps():
    """As above, with the floor at 0.8 from t = 700 on: the mean stays near lambda, the noisiest steps execute at least
    about the floor, and more than they do when the same training runs without it."""
    lam, floor = 0.5, 0.8
    by_t = executed_by_t(*train_routers(lam, floor))
    plain = executed_by_t(*train_routers(lam))
    noisy = [r for t, r in by_t.items() if t >= 700]
    rest = [r for t, r in by_t.items() if t < 700]
    assert min(noisy) > floor - 0.1, by_t
    assert sum(noisy) / len(noisy) > sum(rest) / len(rest) + 0.2, by_t
    plain_noisy = [r for t, r in plain.items() if t >= 700]
    assert sum(noisy) / len(noisy) > sum(plain_noisy) / len(plain_noisy) + 0.1, (by_t, plain)
    assert abs(sum(by_t.values()) / len(by_t) - lam) < 0.1, by_t


def test_flops_target_schedule():
    assert flops_target(0, 0.5) == 1.0 and flops_target(99, 0.5) == 1.0
    assert flops_target(550, 0.5) == pytest.approx(0.75)
    assert flops_target(1000, 0.5) == 0.5 and flops_target(5000, 0.5) == 0.5
    assert flops_target(0, 0.5, hold=0, reach=0) == 0.5  # a continued run, already at lambda
    assert flops_target(0, 0.6, hold=0, reach=100, start=0.7) == 0.7 and flops_target(50, 0.6, 0, 100, 0.7) == pytest.approx(0.65)


# ----------------------------------------------------------------------------------------------- f: MAC counter
def test_counter_all_on_equals_dense():
    model = DyDiT.from_dit(tiny_dit()).eval()
    x, y = inputs(3)
    counter = MacCounter()
    with torch.no_grad():
        model(x, 400, y, counter=counter)
    A = 4 * N_TOKENS * WIDTH**2 + 2 * N_TOKENS**2 * WIDTH  # qkv + proj, q k^T + attn v
    M = 2 * N_TOKENS * WIDTH * HIDDEN
    assert model.dense_layer_macs() == (A, M)
    assert counter.dense == counter.executed == 3 * 2 * (A + M)


def test_counter_hand_count_known_mask():
    model = DyDiT.from_dit(tiny_dit()).eval()
    with torch.no_grad():
        for r in model.routers:
            for lin in (r.head_router, r.channel_router, r.token_router[2]):
                lin.weight.zero_()
        r0, r1 = model.routers
        r0.head_router.bias.copy_(torch.tensor([-1.0, 1.0, -1.0]))  # heads {0, 2}
        r0.channel_router.bias.copy_(torch.tensor([1.0, -1.0, -1.0]))  # groups {0, 1}
        r0.token_router[2].bias.fill_(-1.0)  # no token runs the MLP
        r1.head_router.bias.fill_(1.0)  # all 4 heads
        r1.channel_router.bias.fill_(-1.0)  # group 0 only
        r1.token_router[2].bias.fill_(1.0)  # every token
    B, N, D, dh, G = 2, N_TOKENS, WIDTH, 16, 64
    x, y = inputs(B)
    counter = MacCounter()
    with torch.no_grad():
        out = model(x, 123, y, counter=counter)
    layer0 = B * (N * D * 3 * 2 * dh + 2 * 2 * N * N * dh + N * 2 * dh * D) + 0
    layer1 = B * (N * D * 3 * 4 * dh + 2 * 4 * N * N * dh + N * 4 * dh * D) + B * N * D * G * 2
    assert counter.executed == layer0 + layer1
    # the spec's r from the masks is the counter's ratio (every sample has the same shapes here)
    torch.testing.assert_close(out.flops_ratio, torch.full((B,), counter.ratio))


def test_counter_ratio_matches_flops_ratio_random_masks():
    model = DyDiT.from_dit(tiny_dit()).eval()
    partial_routers_(model)
    x, y = inputs(16, seed=3)
    counter = MacCounter()
    with torch.no_grad():
        out = model(x, 700, y, counter=counter)
    assert counter.executed < counter.dense
    assert out.flops_ratio.mean().item() == pytest.approx(counter.ratio, rel=1e-6)
    A, M = model.dense_layer_macs()
    torch.testing.assert_close(flops_ratio(out.masks, A, M), out.flops_ratio)
