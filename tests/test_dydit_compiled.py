"""The compiled sliced path (`DyDiT.compile_sliced`): the sliced block halves through torch.compile with symbolic
sizes. Checked on the CPU (inductor's C++ backend) against the eager sliced path over a whole guided DDIM run in
which every step has its own head / group widths and the blocks have different token capacities, with QK-norm and
TD-LoRA on: same latents to float32 rounding, and only a few graphs compiled for all blocks and steps (a static
compile would recompile per width set and, past dynamo's recompile limit, silently fall back to eager)."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from dit.dit import DiT
from dit.dydit import DyDiT
from test_dydit import TINY
from test_dydit_lora import random_lora_
from test_step_graphs import ddim, inputs, scheduler, timestep_routers_

torch.set_num_threads(2)


def planned_dydit(lora: bool) -> tuple[DyDiT, torch.Tensor, torch.Tensor]:
    """Tiny QK-norm DiT (3 blocks), per-step widths, calibrated token capacities (not all equal), optional TD-LoRA."""
    torch.manual_seed(0)
    dit = DiT(**{**TINY, "depth": 3, "qk_norm": True}).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g) if p.ndim == 1
                    else torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    model = DyDiT.from_dit(dit).eval()
    timestep_routers_(model)
    if lora:
        model.add_td_lora(rank=2, experts=3).eval()
        random_lora_(model)
    sched = scheduler()
    x0, y = inputs(3, seed=4)
    model.set_sampling_grid(sched.timesteps)
    ddim(lambda i, *a: model(*a, mode="sliced").sample, sched, x0, y)  # exact gather: calibration
    model.use_token_capacity(margin=0.1, multiple=4)
    rows = 6 * model.num_tokens
    caps = [model._capacity_for(layer, rows) for layer in range(3)]
    assert len(set(caps)) > 1 and min(caps) < rows, caps  # blocks gather different row counts, fewer than all
    widths = {tuple((len(h), len(gr)) for h, gr in model.width_plan(float(t))) for t in sched.timesteps}
    assert len(widths) > 2, widths  # the steps run several width sets
    return model, x0, y


@pytest.mark.parametrize("lora", [False, True])
def test_compiled_sliced_equals_eager_with_few_graphs(lora):
    model, x0, y = planned_dydit(lora)
    sched = scheduler()
    model.set_sampling_grid(sched.timesteps)
    ref = ddim(lambda i, *a: model(*a, mode="sliced").sample, sched, x0, y)
    torch._dynamo.reset()
    counters.clear()
    model.compile_sliced()
    assert model.sliced_compiled
    for _ in range(2):
        model.set_sampling_grid(sched.timesteps)
        got = ddim(lambda i, *a: model(*a, mode="sliced").sample, sched, x0, y)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert model.token_overflow() == 0
    # One graph for the whole block (DiT has no cross-attention), plus one for the steps that run a single head
    # (torch specialises size 1).
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    model.eager_sliced()
    assert not model.sliced_compiled
    model.set_sampling_grid(sched.timesteps)
    torch.testing.assert_close(ddim(lambda i, *a: model(*a, mode="sliced").sample, sched, x0, y), ref,
                               rtol=0, atol=0)


def test_compile_sliced_refuses_graph_modes():
    model = DyDiT.from_dit(DiT(**TINY)).eval()
    with pytest.raises(ValueError, match="step_graphs"):
        model.compile_sliced(mode="reduce-overhead")
    assert not model.sliced_compiled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_sliced_step_graphs_on_cuda_equal_eager():
    """The GPU speed path (bench/dydit_speed.py sliced-compiled-graphs): compiled halves captured into one CUDA graph
    per step, bf16, replayed twice, against the eager sliced run."""
    from dit.step_graphs import dydit_step_graphs

    model, x0, y = planned_dydit(lora=True)
    dev = torch.device("cuda")
    model.to(dev, torch.bfloat16)
    x0, y = x0.to(dev, torch.bfloat16), y.to(dev)
    sched = scheduler(dev)
    model.set_sampling_grid(sched.timesteps)
    ref = ddim(lambda i, *a: model(*a, mode="sliced").sample, sched, x0, y).float()
    model.compile_sliced()
    graphs = dydit_step_graphs(model, sched.timesteps)
    for _ in range(2):
        got = ddim(graphs, sched, x0, y).float()
        assert graphs.recorded == len(sched.timesteps)
        assert float((got - ref).norm() / ref.norm()) < 2e-2  # bf16: fused kernels round differently


def test_moving_the_model_drops_its_weight_caches_and_keeps_the_calibration():
    """A sampling plan holds slices of the weights; .to() makes new weights, so the plan must go (else the old
    weights would be used silently), while the token calibration, which does not depend on them, stays."""
    model, x0, y = planned_dydit(lora=False)
    sched = scheduler()
    model.set_sampling_grid(sched.timesteps)
    assert model._grid is not None and model._permuted
    kept = dict(model._kept_frac)
    model.to(torch.float64)
    assert model._grid is None and not model._permuted and not model._steps
    assert model._kept_frac == kept and model._capacity is not None
    model.set_sampling_grid(sched.timesteps)
    got = ddim(lambda i, *a: model(*a, mode="sliced").sample, sched, x0.double(), y)
    assert got.dtype == torch.float64
    assert all(w.qkv_w.dtype == torch.float64 for w in model._grid[1][0])


@pytest.mark.parametrize("family", ["pixart", "latte"])
def test_compiled_sliced_on_the_text_and_video_families(family):
    """PixArt (dense cross-attention between the compiled halves) and Latte (temporal blocks: one sequence per patch
    position) through the compiled path equal their eager sliced path, at several timesteps."""
    from test_dydit_families import base, inputs, partial_routers_

    model = DyDiT.from_dit(base(family)).eval()
    partial_routers_(model)
    x, cond, keep = inputs(family, model.dit, 4, seed=4, cfg=True)
    ts = (50, 500, 950)
    with torch.no_grad():
        for t in ts:  # exact gather: calibrates every block
            model(x, t, cond, keep, mode="sliced")
        model.use_token_capacity(margin=0.1, multiple=4)
        ref = [model(x, t, cond, keep, mode="sliced").sample for t in ts]
        torch._dynamo.reset()
        counters.clear()
        model.compile_sliced()
        got = [model(x, t, cond, keep, mode="sliced").sample for t in ts]
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
    assert model.token_overflow() == 0
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])


def test_only_the_leading_dimension_of_sliced_arguments_stays_symbolic():
    """The compiled sliced functions see the model width, tokens per sequence and head size as constants (so the
    LayerNorms and the token -> sequence division compile to constants); only the rows may vary between calls."""
    from dit.dydit import _mark_static_beyond_rows

    x, w, b = torch.zeros(4, 16, 8), torch.zeros(6, 2, 8), torch.zeros(6)
    lora = (torch.zeros(8, 3), torch.zeros(5, 3))
    _mark_static_beyond_rows((x, (w, b, None, 1e-6, lora)))
    static = lambda t: getattr(t, "_dynamo_static_indices", set())  # noqa: E731
    assert static(x) == {1, 2} and static(w) == {1, 2} and static(b) == set()
    assert static(lora[0]) == {1} and static(lora[1]) == {1}
