"""Per-step CUDA graphs for sampling (dit/step_graphs.py), on the CPU and, where there is one, on a CUDA GPU.

On a CPU `StepGraphs` runs its static buffers eagerly: these tests check that this path (step seeking, input
buffers, the DyDiT capacity path) gives a plain sampling loop's latents exactly, run after run, and refuses what it
cannot replay. The CUDA test captures the graphs and compares replays with the eager loop."""

import pytest
import torch
from diffusers import DDIMScheduler

from dit.dydit import DyDiT
from dit.step_graphs import StepGraphs, dense_step_graphs, dydit_step_graphs
from tests.test_dydit import inputs, partial_routers_, tiny_dit

torch.set_num_threads(1)
STEPS, GUIDANCE = 6, 4.0


def scheduler(device="cpu") -> DDIMScheduler:
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(STEPS, device=device)
    return sched


@torch.no_grad()
def ddim(call, sched, x0, y) -> torch.Tensor:
    """CFG (cond + uncond in one call) + DDIM; call(i, x, t, y) is step i's model call."""
    y_in = torch.cat([y, torch.full_like(y, 47)])  # the "uncond" half: any fixed class does for a comparison
    latents = x0
    for i, t in enumerate(sched.timesteps):
        x_in = torch.cat([latents] * 2)
        out = call(i, x_in, t.expand(x_in.shape[0]), y_in)
        eps_c, eps_u = out[:, :4].chunk(2)
        latents = sched.step(eps_u + GUIDANCE * (eps_c - eps_u), t, latents).prev_sample
    return latents


def timestep_routers_(model: DyDiT, seed: int = 5) -> None:
    """partial_routers_ (some tokens off), then width routers with zero bias: test_dydit's ±4 biases keep the same
    heads and groups at every t, and here each step should run its own widths."""
    partial_routers_(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in model.routers:
            for lin in (r.head_router, r.channel_router):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
                lin.bias.zero_()


def capacity_dydit(sched, x0, y, device="cpu", dtype=torch.float32) -> DyDiT:
    """A DyDiT whose routers give several widths over the run, calibrated, with use_token_capacity on."""
    model = DyDiT.from_dit(tiny_dit()).eval()
    timestep_routers_(model)
    model.to(device=device, dtype=dtype)
    plans = {tuple(model.width_plan(float(t))) for t in sched.timesteps}
    assert len(plans) > 1, "every step has the same widths: the per-step graphs would not be tested"
    model.set_sampling_grid(sched.timesteps)
    ddim(lambda i, *a: model(*a, mode="sliced").sample, sched, x0, y)  # exact gather: calibrates the capacities
    model.use_token_capacity(margin=0.1, multiple=4)
    assert min(model._capacity_for(layer, 2 * len(y) * model.num_tokens) for layer in model._kept_frac) \
        < 2 * len(y) * model.num_tokens  # the capacity path gathers fewer rows than all tokens: not vacuous
    return model


def test_dydit_step_graphs_equal_the_eager_sliced_loop_run_after_run():
    sched = scheduler()
    x0, y = inputs(3, seed=3)
    model = capacity_dydit(sched, x0, y)
    model.set_sampling_grid(sched.timesteps)
    ref = ddim(lambda i, *a: model(*a, mode="sliced").sample, sched, x0, y)
    graphs = dydit_step_graphs(model, sched.timesteps)
    assert graphs.capture is None  # decided by the inputs: eager on the CPU
    x_in, t0 = torch.cat([x0] * 2), sched.timesteps[0]
    graphs(0, x_in, t0.expand(6), torch.cat([y, y]))  # an abandoned run: each call must seek its own step
    for _ in range(2):  # the second run reuses the buffers
        got = ddim(graphs, sched, x0, y)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert not graphs.capture and graphs.recorded == 0
    assert model.token_overflow() == 0


def test_overflow_counter_is_one_tensor_updated_in_place():
    """A captured step adds into the counter tensor it saw at capture: forwards and resets must keep that tensor."""
    sched = scheduler()
    x0, y = inputs(2, seed=2)
    model = capacity_dydit(sched, x0, y)
    graphs = dydit_step_graphs(model, sched.timesteps)
    counter = model._overflow
    assert counter is not None and graphs.keep_alive[1] is counter
    model._kept_frac = {k: v / 4 for k, v in model._kept_frac.items()}  # capacities too small from here on
    model.use_token_capacity(margin=0.1, multiple=4)  # same settings: the graphs stay valid
    ddim(graphs, sched, x0, y)
    assert model._overflow is counter and int(counter) > 0
    assert model.token_overflow() > 0 and model.token_overflow() == 0 and model._overflow is counter


def test_dense_step_graphs_equal_the_eager_loop():
    sched = scheduler()
    x0, y = inputs(2, seed=1)
    dit = tiny_dit()
    ref = ddim(lambda i, *a: dit(*a), sched, x0, y)
    graphs = dense_step_graphs(dit, STEPS)
    for _ in range(2):
        torch.testing.assert_close(ddim(graphs, sched, x0, y), ref, rtol=0, atol=0)


def test_step_graphs_refuse_other_inputs_and_steps():
    dit = tiny_dit()
    graphs = StepGraphs(lambda *a: dit(*a), 3, capture=False)
    x, y = inputs(2)
    t = torch.tensor([500, 500])
    graphs(0, x, t, y)
    with pytest.raises(ValueError, match="built for inputs"):
        graphs(1, x[:1], t[:1], y[:1])  # another batch
    with pytest.raises(ValueError, match="built for inputs"):
        graphs(1, x.double(), t, y)  # another dtype
    with pytest.raises(ValueError, match="outside"):
        graphs(3, x, t, y)
    with pytest.raises(ValueError, match="tensors"):
        graphs(1, x, 500, y)
    with pytest.raises(ValueError, match="CUDA graphs need"):
        StepGraphs(lambda *a: dit(*a), 3, capture=True)(0, x, t, y)


def test_seek_needs_a_grid_and_a_step_inside_it():
    model = DyDiT.from_dit(tiny_dit()).eval()
    with pytest.raises(ValueError, match="no sampling grid"):
        model.seek_sampling_step(0)
    grid = torch.tensor([900, 500, 100])
    model.set_sampling_grid(grid)
    model.seek_sampling_step(2)
    x, y = inputs(2)
    with torch.no_grad():
        model(x, torch.tensor([100, 100]), y, mode="sliced")  # step 2's t
        model.seek_sampling_step(0)
        with pytest.raises(RuntimeError):
            model(x, torch.tensor([100, 100]), y, mode="sliced")  # not step 0's t
    with pytest.raises(ValueError, match="outside"):
        model.seek_sampling_step(3)


def test_dydit_step_graphs_refuse_a_replanned_model():
    sched = scheduler()
    x0, y = inputs(2)
    model = capacity_dydit(sched, x0, y)
    graphs = dydit_step_graphs(model, sched.timesteps)
    ddim(graphs, sched, x0, y)
    model.set_sampling_grid(sched.timesteps[:3])
    with pytest.raises(ValueError, match="re-planned"):
        ddim(graphs, sched, x0, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_captured_graphs_equal_eager_on_cuda(dtype, tol):
    dev = torch.device("cuda")
    sched = scheduler(dev)
    x0, y = inputs(4, seed=4)
    x0, y = x0.to(dev, dtype), y.to(dev)
    model = capacity_dydit(sched, x0, y, dev, dtype)
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    model.set_sampling_grid(sched.timesteps)
    ref = ddim(lambda i, *a: model(*a, mode="sliced").sample, sched, x0, y)
    assert model.token_overflow() == 0
    graphs = dydit_step_graphs(model, sched.timesteps)
    first = ddim(graphs, sched, x0, y)  # records: warm-up results
    assert graphs.capture and graphs.recorded == STEPS
    for _ in range(2):  # replays
        assert rel(ddim(graphs, sched, x0, y), ref) < tol
    assert rel(first, ref) < tol and model.token_overflow() == 0
    # the replays add into the counter token_overflow() reads
    model._kept_frac = {k: v / 4 for k, v in model._kept_frac.items()}  # capacities too small
    small = dydit_step_graphs(model, sched.timesteps)
    ddim(small, sched, x0, y)  # records
    model.token_overflow()
    ddim(small, sched, x0, y)  # replays only
    assert model.token_overflow() > 0

    dit = model.dit
    dense_ref = ddim(lambda i, *a: dit(*a), sched, x0, y)
    dense = dense_step_graphs(dit, STEPS)
    ddim(dense, sched, x0, y)
    assert dense.recorded == STEPS
    assert rel(ddim(dense, sched, x0, y), dense_ref) < tol
