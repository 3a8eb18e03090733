"""One CUDA graph per scale for VAR sampling (the batch-1 latency lever of issue 9).

At batch 1 a VAR-d30 image is ten scales × 30 blocks × ~15 kernels; each kernel takes microseconds on the GPU
and longer to launch from Python, so the GPU waits on the host (measured on the H100: 57 ms of kernels in a
0.49 s sample). A CUDA graph replays a whole scale's kernels from one launch.

`ScaleGraphs(transformer, rows)` owns what the graphs read and write at fixed addresses: the condition rows, one
input buffer per scale, a full-size `caching.KVCache` and the per-scale logits. `start(cond_BC, context)` copies
this run's condition in (and records the graphs on the first CUDA call); `step(k, x)` copies scale k's input
tokens in, replays graph k (blocks + head) and returns its logits. Sampling (guidance mix, top-k / top-p,
multinomial) and f̂ stay outside, in `sample_tokens`, so the tokens are the eager path's for the same generator.

Recording: one eager pass over all scales on a side stream first (attention-backend probes, cuBLAS workspaces,
allocator), then the cache is reset and scale k is captured after scales 0..k-1: capturing runs the Python once,
so `KVCache.append` writes each scale at the offsets it will have at replay, and the cache's bookkeeping ends at
the full pyramid, as after an eager run. The graphs share one memory pool and are always replayed in capture
order, which is what makes sharing it safe.

Why by hand (torch.cuda.graph, not torch.compile(mode="reduce-overhead")): every scale has its own token count and
cache offsets, so a compiled step would specialise per scale anyway (ten recompilations of the whole model, minutes
at d30); capturing the eager kernels costs one warm-up pass and the numbers are the eager path's kernels.

On a CPU (or `capture=False`) the same buffers run eagerly: the tests check that path against `sample_tokens`'s
plain loop, and the GPU check (bench/var_speed.py) compares the replayed tokens with the eager ones.
A compression policy (ScaleKV) changes the cache's shapes per run, so it cannot be graphed: use the plain loop.
"""
from __future__ import annotations

import torch
from torch import Tensor

from caching import KVCache


class ScaleGraphs:
    def __init__(self, transformer, rows: int, *, cache_dtype: torch.dtype | None = None, capture: bool | None = None):
        p = next(transformer.parameters())
        self.transformer, self.rows, self.device, self.dtype = transformer, rows, p.device, p.dtype
        self.capture = p.device.type == "cuda" if capture is None else capture
        if self.capture and p.device.type != "cuda":
            raise ValueError("CUDA graphs need the transformer on a CUDA device")
        C = transformer.config.embed_dim
        self.cache: KVCache = transformer.make_cache(rows, dtype=cache_dtype)
        self.cond = torch.zeros(rows, C, dtype=p.dtype, device=p.device)
        self.x = [torch.zeros(rows, n, C, dtype=p.dtype, device=p.device) for n in transformer.segments]
        self.context: tuple[Tensor, Tensor] | None = None
        self.logits: list[Tensor | None] = [None] * len(self.x)
        self.graphs: list[torch.cuda.CUDAGraph] | None = None

    @property
    def num_scales(self) -> int:
        return len(self.x)

    def matches(self, rows: int, context) -> bool:
        """Whether a run with `rows` condition rows and this context can use these buffers (else build another)."""
        if rows != self.rows:
            return False
        if self.context is None:  # no context yet: fine if none comes, or if nothing was recorded without one
            return context is None or self.graphs is None
        return context is not None and all(a.shape == b.shape and a.dtype == b.dtype
                                           for a, b in zip(context, self.context))

    def _step(self, k: int) -> None:
        h = self.transformer.run_blocks(self.x[k], self.cond, self.context, cache=self.cache, scale_index=k)
        self.logits[k] = self.transformer.logits(h, self.cond)

    def _record(self) -> None:
        self.cache.reset()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for k in range(self.num_scales):
                self._step(k)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.cache.reset()
        graphs, pool = [], None
        for k in range(self.num_scales):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self._step(k)
            pool = g.pool()
            graphs.append(g)
        self.graphs = graphs

    def start(self, cond_BC: Tensor, context: tuple[Tensor, Tensor] | None = None) -> None:
        """Begin a sampling run: copy its condition rows (and text context) into the graphs' inputs."""
        if tuple(cond_BC.shape) != tuple(self.cond.shape):
            raise ValueError(f"these graphs were built for condition rows {tuple(self.cond.shape)}, "
                             f"got {tuple(cond_BC.shape)}")
        if self.context is None and context is not None:
            if self.graphs is not None:
                raise ValueError("these graphs were recorded without a text context")
            self.context = tuple(torch.zeros_like(t) for t in context)
        elif context is not None and not self.matches(self.rows, context):
            raise ValueError(f"text context of shapes {[tuple(t.shape) for t in context]} does not match these "
                             f"graphs' {[tuple(t.shape) for t in self.context]}")
        self.cond.copy_(cond_BC)
        if context is not None:
            for dst, src in zip(self.context, context):
                dst.copy_(src)
        if self.capture and self.graphs is None:
            self._record()
        if not self.capture:
            self.cache.reset()

    def step(self, k: int, x_BlC: Tensor) -> Tensor:
        """Scale k: its input tokens (rows, l_k, C) in, its logits (rows, l_k, V) float32 out (a buffer the next
        run overwrites: read it before starting another run)."""
        self.x[k].copy_(x_BlC)
        if self.graphs is not None:
            self.graphs[k].replay()
        else:
            self._step(k)
        return self.logits[k]
