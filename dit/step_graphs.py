"""One CUDA graph per sampling step, for models whose kernels differ from step to step (DyDiT's sliced path).

A DyDiT sliced step at batch 1-8 is hundreds of small kernels, and the GPU waits on Python launching them (the
host-bound regime of docs/benchmarks.md). With a sampling grid set and `use_token_capacity` on, a sliced forward
has no host sync (width plan precomputed per step, token gather by torch.nonzero_static into fixed row counts,
overflow counted on the device), so each step can be captured once and replayed from a single launch.

`StepGraphs(fn, steps, before_step)`: `graphs(i, x, t, cond)` copies the inputs into static buffers (allocated on
the first call, from those tensors' shapes and dtypes) and runs step i. On CUDA, step i's first call records it:
`before_step(i)` puts the model into step i's state (DyDiT: `seek_sampling_step(i)`), one eager pass on a side
stream warms it up (attention-backend choice, cuBLAS workspaces, DyDiT's per-plan caches, the overflow counter) and
gives this call's result, then `before_step(i)` again and the capture. Later calls replay it. All steps share one
memory pool; a sampling loop records them in step order and replays them in that order.

Why step i is recorded on its own first call rather than all steps up front (as vlm/var_graphs.py does): the
warm-up must run on step i's real inputs. DyDiT checks on the device that t is the grid's step-i value
(torch._assert_async), and on the capacity path the warm-up adds to the overflow count, so a warm-up on made-up
inputs would trip the assert or count false overflows. Using the warm-up's output as the call's result also means
the recording call counts its overflows once, like every later call.

Why by hand (torch.cuda.graph, not torch.compile(mode="reduce-overhead")): each step of a DyDiT run has its own
head / group / token-row counts, so a compiled model would specialise and recompile per distinct width set (up to
50 shapes per run, each a full-model compile); capturing the eager kernels costs one warm-up pass per step and runs
exactly the eager path's kernels.

On a CPU (or `capture=False`) the same buffers run eagerly (before_step(i) still called), so the tests can check
the logic against a plain loop; tests/test_step_graphs.py also compares a captured run on CUDA when there is one.

What a replay does not do: Python-side effects of the forward happen only while recording (DyDiT's MacCounter,
`_kept_frac` calibration, its `_grid_step` advance). Anything the graphs read is baked in at capture: the model's
weights and DyDiT's plan (grid, capacities, per-plan caches). Re-planning or retraining the model after recording
(set_sampling_grid on other timesteps, use_token_capacity / exact_token_gather, clear_cache, train(), new weights)
needs a new StepGraphs; `dydit_step_graphs` refuses calls once the DyDiT's grid or overflow counter was
replaced.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class StepGraphs:
    def __init__(self, fn: Callable[..., Tensor], steps: int, before_step: Callable[[int], None] | None = None, *,
                 check: Callable[["StepGraphs"], None] | None = None, capture: bool | None = None):
        """fn(*inputs) -> Tensor: one model call (e.g. x, t, cond). steps: the sampling run's number of steps.
        before_step(i): put the model into step i's state before it runs eagerly or is captured (None: nothing to
        do, e.g. a dense model). check(self): run at every call, replays included; raises if the model changed in
        a way the recorded graphs would not see. capture: None = when the inputs are on CUDA, False = eager."""
        if steps < 1:
            raise ValueError(f"need at least one step, got {steps}")
        self.fn, self.steps = fn, steps
        self.before_step = before_step or (lambda i: None)
        self.check = check or (lambda graphs: None)
        self.capture = capture
        self.inputs: tuple[Tensor, ...] | None = None  # static input buffers, shared by every step
        self.outputs: list[Tensor | None] = [None] * steps
        self.graphs: list[torch.cuda.CUDAGraph | None] = [None] * steps
        self._pool = None  # the graphs' shared memory pool (after the first capture)
        self._side: torch.cuda.Stream | None = None
        self.keep_alive: tuple = ()  # objects the graphs read that nothing else may keep (see dydit_step_graphs)

    @property
    def recorded(self) -> int:
        """How many steps have a captured graph."""
        return sum(g is not None for g in self.graphs)

    def _take_inputs(self, inputs: tuple[Tensor, ...]) -> None:
        if not all(torch.is_tensor(a) for a in inputs):
            raise ValueError(f"inputs must be tensors, got {[type(a).__name__ for a in inputs]}")
        if self.inputs is None:
            if self.capture is None:
                self.capture = inputs[0].device.type == "cuda"
            if self.capture and inputs[0].device.type != "cuda":
                raise ValueError("CUDA graphs need the inputs on a CUDA device")
            self.inputs = tuple(torch.empty_like(a, memory_format=torch.contiguous_format) for a in inputs)
        want = [(tuple(b.shape), b.dtype) for b in self.inputs]
        got = [(tuple(a.shape), a.dtype) for a in inputs]
        if got != want:  # the graphs read these buffers at fixed addresses and shapes
            raise ValueError(f"these step graphs were built for inputs (shape, dtype) {want}, got {got}")
        for dst, src in zip(self.inputs, inputs):
            dst.copy_(src)

    def _record(self, i: int) -> Tensor:
        current = torch.cuda.current_stream(self.inputs[0].device)
        if self._side is None:
            self._side = torch.cuda.Stream(self.inputs[0].device)
        self._side.wait_stream(current)  # the inputs were copied on the current stream
        with torch.cuda.stream(self._side):
            self.before_step(i)
            warm = self.fn(*self.inputs)
        current.wait_stream(self._side)
        graph = torch.cuda.CUDAGraph()
        self.before_step(i)
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.fn(*self.inputs)
        self._pool = graph.pool()
        self.graphs[i], self.outputs[i] = graph, out
        # Capturing ran nothing: this call's result is the warm-up's (the same kernels on the same inputs).
        out.copy_(warm)
        return out

    @torch.no_grad()  # inference only: a capture must not record autograd state
    def __call__(self, step: int, *inputs: Tensor) -> Tensor:
        """Step `step` on these inputs. On CUDA the result is the static output of step `step`'s graph: the next
        call (of any step: the graphs share memory) may overwrite it, so read or copy it first."""
        if not 0 <= step < self.steps:
            raise ValueError(f"step {step} is outside these graphs' {self.steps} steps")
        self._take_inputs(inputs)
        self.check(self)
        if not self.capture:
            self.before_step(step)
            return self.fn(*self.inputs)
        if self.graphs[step] is None:
            return self._record(step)
        self.graphs[step].replay()
        return self.outputs[step]


def dydit_step_graphs(dydit, timesteps: Tensor, *, mode: str = "sliced", capture: bool | None = None) -> StepGraphs:
    """Step graphs for a DyDiT sampling run over `timesteps` (the scheduler's, in order): sets the sampling grid
    (mode "sliced") and seeks step i before recording it; call graphs(i, x, t, cond[, cond_mask]). For graphs with
    no host sync inside, turn on `dydit.use_token_capacity()` first (the exact gather's nonzero syncs, and a sync
    cannot be captured). The masked / complete modes have no per-step state: before_step does nothing."""
    if mode != "sliced":
        return StepGraphs(lambda *a: dydit(*a, mode=mode).sample, len(timesteps), capture=capture)
    device = next(dydit.parameters()).device
    # On the model's device: the per-step t check would otherwise copy from the host inside the graph.
    dydit.set_sampling_grid(timesteps.to(device))
    grid, capacity = dydit._grid, dydit._capacity
    # The overflow counter the captured steps will add into (made now, so that a replaced one is noticed).
    counter = dydit._overflow_counter(device) if dydit._capacity is not None else None

    def check(graphs: StepGraphs) -> None:
        # Identity checks only (no device work): the recorded steps read this grid's weights and add into this
        # counter; a re-planned or cleared DyDiT has others, which a replay would silently not use.
        if dydit._grid is not grid or dydit._capacity != capacity or (counter is not None
                                                                       and dydit._overflow is not counter):
            raise ValueError("the DyDiT was re-planned (sampling grid, token capacity or caches) since these step "
                             "graphs were built: build new ones")
        if graphs.capture and dydit._capacity is None:
            raise ValueError("capturing the sliced path needs dydit.use_token_capacity() first: the exact token "
                             "gather (nonzero) waits on the GPU, which a CUDA graph cannot record")

    graphs = StepGraphs(lambda *a: dydit(*a, mode="sliced").sample, len(timesteps), dydit.seek_sampling_step,
                        check=check, capture=capture)
    graphs.keep_alive = (grid, counter)  # what the graphs read, alive even if the DyDiT drops it
    return graphs


def dense_step_graphs(model, steps: int, *, capture: bool | None = None) -> StepGraphs:
    """Step graphs for a dense model (every step runs the same kernels, so nothing to do before a step): the
    baseline that shows what graphs alone buy, apart from DyDiT's narrower steps."""
    return StepGraphs(lambda *a: model(*a), steps, capture=capture)
