"""DyDiT on every base family (dit/dydit.py): class DiT, text PixArtDiT (cross-attention dense, adaLN-single) and
video LatteDiT (spatial and temporal blocks). Per family: router init equals the base model; the sliced inference
path (precomputed masks, permuted-prefix weight views, gathered tokens) equals the training-mode masked computation
to float32 rounding; gates binarise with gradients reaching the routers; the FLOPs loss drives the executed ratio
toward lambda on a short CPU run. Plus: prefix weights are views (no copy per step), the planned sampling grid
equals per-step planning and checks its timesteps, and the pipelines run a DyDiT through `DyDiTTransformer`.

Random weights throughout (adaLN-Zero / zero heads would hide a wrong mask)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dit.dit import DiT
from dit.dydit import DyDiT, DyDiTTransformer, MacCounter, block_macs, flops_loss
from dit.latte import LatteDiT
from dit.pixart import PixArtDiT

ATOL = 1e-5
TEXT = dict(caption_channels=32, max_text_tokens=8)
FAMILIES = {
    "dit": lambda: DiT(sample_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                       num_classes=48),
    "pixart": lambda: PixArtDiT(sample_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                                **TEXT),
    # a caption refiner changes the text the dense cross-attention reads, nothing DyDiT slices
    "pixart-refiner": lambda: PixArtDiT(sample_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                                        num_heads=4, caption_refiner_layers=1, **TEXT),
    "latte": lambda: LatteDiT(sample_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                              num_frames=3, **TEXT),
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model


def base(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return randomize_(FAMILIES[family](), seed).eval()


def inputs(family: str, model, batch: int, seed: int = 0, cfg: bool = False):
    """(sample, cond, cond_mask); with cfg the second half repeats the first half's latents, unconditioned."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    if family == "latte":
        x = torch.randn(batch, 4, c.num_frames, c.sample_size, c.sample_size, generator=g)
    else:
        x = torch.randn(batch, 4, c.sample_size, c.sample_size, generator=g)
    if family == "dit":
        y = torch.randint(0, 48, (batch,), generator=g)
        if cfg:
            x = torch.cat([x[: batch // 2]] * 2)
            y = torch.cat([y[: batch // 2], torch.full((batch // 2,), model.null_class_id)])
        return x, y, None
    text = torch.randn(batch, 6, c.caption_channels, generator=g)
    keep = torch.ones(batch, 6, dtype=torch.bool)
    keep[0, 4:] = False  # padded text tokens
    if cfg:
        x = torch.cat([x[: batch // 2]] * 2)
        text[batch // 2:] = 0
    return x, text, keep


def dense_forward(model, x, t, cond, keep):
    return model(x, t, cond) if isinstance(model, DiT) else model(x, t, cond, keep)


def partial_routers_(model: DyDiT, seed: int = 1) -> None:
    """Routers that switch some heads, groups and tokens off, logits far from 0 (rounding cannot flip a gate)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in model.routers:
            for lin in (r.head_router, r.channel_router):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.5)
                lin.bias.copy_(torch.tensor([4.0, -4.0, 4.0]) * torch.randn(3, generator=g).sign())
            r.token_router[0].weight.mul_(4.0)
            r.token_router[2].weight.mul_(8.0)
            r.token_router[2].bias.fill_(0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_init_equals_base(family):
    dense = base(family)
    model = DyDiT.from_dit(dense)
    x, cond, keep = inputs(family, dense, 3)
    t = torch.tensor([3, 400, 990])
    with torch.no_grad():
        ref = dense_forward(dense, x, t, cond, keep)
        model.train()
        if family == "dit":
            model.dit.label_embed.eval()  # no label dropout, to compare
        masked = model(x, t, cond, keep)
        model.eval()
        sliced = model(x, 400, cond, keep)
        ref_sliced = dense_forward(dense, x, 400, cond, keep)
    torch.testing.assert_close(masked.sample, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(sliced.sample, ref_sliced, atol=1e-5, rtol=0)
    assert torch.equal(masked.flops_ratio, torch.ones(3)) and torch.equal(sliced.flops_ratio, torch.ones(3))
    assert len(model.routers) == (2 * dense.config.depth if family == "latte" else dense.config.depth)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch,cfg", [(1, False), (4, True)])
def test_sliced_equals_masked(family, batch, cfg):
    model = DyDiT.from_dit(base(family)).eval()
    partial_routers_(model)
    x, cond, keep = inputs(family, model.dit, batch, seed=batch, cfg=cfg)
    some_off = [0, 0, 0]
    with torch.no_grad():
        for t in (50, 500, 950):
            masked = model(x, t, cond, keep, mode="masked")
            counter = MacCounter()
            sliced = model(x, torch.full((batch,), t), cond, keep, mode="sliced", counter=counter)
            torch.testing.assert_close(sliced.sample, masked.sample, rtol=ATOL, atol=ATOL)
            for a, b in zip(masked.masks, sliced.masks):
                for key in a:
                    assert torch.equal(a[key], b[key]), key
                some_off = [s + int((a[k] == 0).any()) for s, k in zip(some_off, ("head", "channel", "token"))]
            torch.testing.assert_close(sliced.flops_ratio, masked.flops_ratio)
            # the counter's executed/dense equals the batch mean of r (r is per sample, MACs add up)
            assert counter.ratio == pytest.approx(masked.flops_ratio.mean().item(), rel=1e-6)
    assert all(some_off), f"routers switched nothing off ({some_off}); the test would be vacuous"


@pytest.mark.parametrize("family", ["pixart", "latte"])
def test_cross_attention_is_dense_in_the_count(family):
    """All gates off but head 0 / group 0 / no token: the executed MACs still hold the whole cross-attention."""
    model = DyDiT.from_dit(base(family)).eval()
    with torch.no_grad():
        for r in model.routers:
            for lin in (r.head_router, r.channel_router, r.token_router[2]):
                lin.weight.zero_()
                lin.bias.fill_(-5.0)
    x, cond, keep = inputs(family, model.dit, 2)
    counter = MacCounter()
    with torch.no_grad():
        model(x, 300, cond, keep, counter=counter)
    c = model.dit.config
    D, dh, N = c.hidden_size, c.hidden_size // c.num_heads, (c.sample_size // c.patch_size) ** 2
    frames = getattr(c, "num_frames", 1)
    L = cond.shape[1]
    expected = 0
    for _ in range(c.depth):
        expected += sum(block_macs(2 * frames, N, D, dh, 0, 0, L))  # spatial / PixArt block: 1 head, no MLP
        if family == "latte":
            expected += sum(block_macs(2 * N, frames, D, dh, 0, 0))  # temporal block
    assert counter.executed == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_binarise_and_grads_reach_routers(family):
    model = DyDiT.from_dit(base(family))
    partial_routers_(model)
    model.train()
    x, cond, keep = inputs(family, model.dit, 4)
    out = model(x, torch.tensor([10, 300, 700, 990]), cond, keep, mode="masked")
    for m in out.masks:
        for v in m.values():
            assert set(v.unique().tolist()) <= {0.0, 1.0}
        assert (m["head"][:, 0] == 1).all() and (m["channel"][:, 0] == 1).all()
    (out.sample.square().mean() + flops_loss(out.flops_ratio, 0.5)).backward()
    for r in model.routers:
        for lin in (r.head_router, r.channel_router, r.token_router[0], r.token_router[2]):
            assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["pixart", "latte"])
def test_flops_loss_drives_executed_ratio_to_lambda(family):
    """Routers only, flops_loss toward 0.5 plus an MSE on random targets (see tests/test_dydit.py for why), Adam
    lr 1e-2, 100 steps from router biases +1; then the executed ratio of the sliced path over t in [50, 950]."""
    lam = 0.5
    model = DyDiT.from_dit(base(family)).frozen_backbone()
    with torch.no_grad():
        for r in model.routers:
            for lin in (r.head_router, r.channel_router, r.token_router[2]):
                lin.bias.fill_(1.0)
    opt = torch.optim.Adam(model.routers.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)

    def executed_ratio() -> float:
        model.eval()
        counter = MacCounter()
        with torch.no_grad():
            for t in range(50, 1000, 100):
                x, cond, keep = inputs(family, model.dit, 4, seed=t)
                model(x, t, cond, keep, counter=counter)
        model.train()
        return counter.ratio

    before = executed_ratio()
    for step in range(100):
        x, cond, keep = inputs(family, model.dit, 8, seed=100 + step)
        t = torch.randint(0, 1000, (8,), generator=g)
        out = model(x, t, cond, keep, mode="masked")
        loss = flops_loss(out.flops_ratio, lam) + F.mse_loss(out.sample[:, :4], torch.randn_like(out.sample[:, :4]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = executed_ratio()
    assert before > 0.8 and abs(after - lam) < 0.12, (before, after)


# ----------------------------------------------------------------------------------------------- inference plans
def test_prefix_weights_are_views_and_orders_put_frequent_units_first():
    model = DyDiT.from_dit(base("dit")).eval()
    with torch.no_grad():  # width masks that depend on t through one direction of E_t: nested over t
        t_emb = model.dit.time_embed(torch.linspace(0, 1000, 11))
        direction = t_emb[-1] - t_emb[0]
        for r in model.routers:
            for lin in (r.head_router, r.channel_router):
                lin.weight.copy_(direction[None].repeat(3, 1) / direction.norm() ** 2 * 8)
                base_logit = lin.weight @ t_emb[0]
                lin.bias.copy_(-base_logit + torch.tensor([-6.0, -1.0, 4.0]))  # switch on at different t
    orders = model.block_orders()
    for heads, groups in orders:
        assert heads[0] == 0 and groups[0] == 0  # always on, so first
        assert heads[1:3] == (3, 2) and groups[1:3] == (3, 2)  # on for more timesteps, earlier
    x, y, _ = inputs("dit", model.dit, 2)
    widths = set()
    with torch.no_grad():
        for t in (0, 300, 600, 999):
            for layer, w in enumerate(model.step_weights(t)):
                full = model._permuted[layer]
                assert w.qkv_w.untyped_storage().data_ptr() == full.qkv_w.untyped_storage().data_ptr()
                assert w.fc2_wt.untyped_storage().data_ptr() == full.fc2_wt.untyped_storage().data_ptr()
                widths.add(len(w.heads))
            sliced, masked = model(x, t, y, mode="sliced"), model(x, t, y, mode="masked")
            torch.testing.assert_close(sliced.sample, masked.sample, rtol=ATOL, atol=ATOL)
    assert len(widths) > 1 and not model._sliced  # several widths, every one a view


def test_sampling_grid_equals_per_step_plans_and_checks_t():
    model = DyDiT.from_dit(base("dit")).eval()
    partial_routers_(model)
    x, y, _ = inputs("dit", model.dit, 2)
    grid = torch.tensor([999, 700, 400, 100])
    with torch.no_grad():
        per_step = [model(x, t, y).sample for t in grid]
        model.clear_cache()
        model.set_sampling_grid(grid)
        planned = [model(x, t.expand(2), y).sample for t in grid]
        for a, b in zip(per_step, planned):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        model.set_sampling_grid(grid)
        with pytest.raises(RuntimeError):
            model(x, 123, y)  # not the grid's next timestep


@pytest.fixture(scope="module")
def shapes_vae():
    from diffusers import AutoencoderKL

    folder = Path(__file__).resolve().parents[1] / "weights" / "shapes-vae"
    if not folder.is_dir():
        pytest.skip("shapes-vae not shipped")
    return AutoencoderKL.from_pretrained(folder).eval()


def test_class_pipeline_runs_dydit_and_counts(shapes_vae):
    from dit.objectives import make_objective
    from dit.pipelines import ClassToImagePipeline, make_scheduler

    dense = base("dit")
    scheduler = make_scheduler("dpm++", make_objective("ddpm").scheduler.config)
    ref = ClassToImagePipeline(dense, shapes_vae, scheduler)
    model = DyDiT.from_dit(dense).eval()
    with torch.no_grad():  # all gates on whatever the activations (random weights make the residual stream large)
        for r in model.routers:
            for lin in (r.head_router, r.channel_router, r.token_router[2]):
                lin.weight.zero_()
    wrapper = DyDiTTransformer(model)
    pipe = ClassToImagePipeline(wrapper, shapes_vae, make_scheduler("dpm++", scheduler.config))
    wrapper.attach(pipe)
    kw = dict(num_inference_steps=4, guidance_scale=3.0, output_type="latent")
    a = ref([1, 2], generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe([1, 2], generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # routers at init: the dense model
    assert wrapper.counter.ratio == 1.0
    partial_routers_(model)
    model.clear_cache()
    wrapper.counter.reset()
    pipe([1, 2], generator=torch.Generator().manual_seed(0), **kw)
    assert wrapper.counter.ratio < 0.95 and wrapper.counter.dense == 4 * 4 * sum(
        sum(block_macs(1, 64, 64, 64, 64, 256)) for _ in range(2))  # 4 steps x batch 4 (cfg) x 2 blocks
