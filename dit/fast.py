"""The GPU sampling fast path: the same model code users run, prepared for many forwards at one static shape.

`prepare_for_sampling(model, preset)` casts the model to the sampling dtype, freezes it and compiles its forward in
place (`nn.Module.compile`, so pipelines keep the same object and need no changes): static shapes (a sampling run
calls the model at one shape every step), the whole graph at once (`fullgraph`, so a graph break is an error here
rather than a silent slowdown), and per preset the inductor options that decide how much elementwise work is
fused into the matrix products.

Why presets and not one setting: the levers differ by size. At DiT-XL/2 the forward is matrix products plus
~14 GB of elementwise traffic (LayerNorm + modulation before qkv and fc1, GELU after fc1, gated residuals after
proj and fc2); only kernels that fuse that traffic into the products' prologues / epilogues beat diffusers'
compiled model, while at batch 1 launch overhead dominates and CUDA graphs are the lever. The benchmark
(bench/sample_dit.py) measures every preset in one run; `ditstudio generate --compile PRESET` uses the same one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Preset:
    """A torch.compile mode plus inductor config overrides (applied only while compiling, then restored)."""

    mode: str | None  # None: eager
    inductor: dict = field(default_factory=dict)
    description: str = ""
    # Regional compilation: compile one transformer block's forward, reused by every block (their code is the same
    # and dynamo takes module parameters as graph inputs), instead of the whole model. Compile time drops by about
    # the depth: the whole-model `fused` compile ran past 280 s at DiT-XL/2 twice on the H100 (docs/benchmarks.md).
    regional: bool = False


PRESETS: dict[str, Preset] = {
    "eager": Preset(None, description="no compilation"),
    "default": Preset("default", description="torch.compile defaults (fusion of elementwise ops, cuBLAS GEMMs)"),
    "cudagraphs": Preset("reduce-overhead", description="default kernels, replayed as CUDA graphs (launch overhead)"),
    "max-autotune": Preset("max-autotune", description="autotuned Triton / cuBLAS GEMMs + CUDA graphs"),
    # Triton GEMM templates win only when the elementwise work around them is fused in: let the autotuner
    # benchmark each candidate *with* its epilogue (gate * out + residual, bias + GELU) and fuse prologues
    # (LayerNorm output * (1 + scale) + shift) into the GEMM's input loads where inductor supports it.
    "fused": Preset("max-autotune", inductor={
        "benchmark_epilogue_fusion": True,
        "epilogue_fusion": True,
        "prologue_fusion": True,
        "coordinate_descent_tuning": True,
        "max_autotune_gemm_backends": "ATEN,TRITON",
    }, description="max-autotune with GEMM prologue/epilogue fusion benchmarked, coordinate-descent tuning"),
}
PRESETS["regional"] = Preset("default", regional=True, description="torch.compile defaults, one block compiled "
                                                                    "and reused by all (fast to compile)")
# Per block without CUDA graphs: a graphed block's output lives in the graph's memory pool and the next block's replay
# overwrites it ("accessing tensor output of CUDAGraphs that has been overwritten", H100, 2026-11-24); at the batch
# sizes where fusion matters the forward is GPU-bound, so graphs would add little.
PRESETS["fused-regional"] = Preset("max-autotune-no-cudagraphs", PRESETS["fused"].inductor, regional=True,
                                   description="the fused preset compiled per block (one block's autotuning serves "
                                               "all), without CUDA graphs")
# The same with inductor's persistent TMA GEMM templates (Hopper) among the autotuning candidates: a persistent kernel
# keeps each SM on output tiles and streams operands by TMA, the Triton form that comes closest to cuBLAS on H100,
# so that the candidates that carry the fused epilogues (bias + GELU, gate * out + residual) can win.
PRESETS["fused-tma-regional"] = Preset("max-autotune-no-cudagraphs",
                                       {**PRESETS["fused"].inductor, "triton.enable_persistent_tma_matmul": True},
                                       regional=True, description="fused-regional plus persistent TMA GEMM templates")
GRAPHED_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs

# Where the repeated blocks live: ours (DiT / PixArt `blocks`, Latte spatial / temporal) and diffusers' models.
BLOCK_LISTS = ("blocks", "spatial_blocks", "temporal_blocks", "transformer_blocks", "temporal_transformer_blocks")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = [b for name in BLOCK_LISTS for b in (getattr(model, name, None) or [])]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has none of {', '.join(BLOCK_LISTS)}: compile it whole")
    return blocks


def _check_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown compile preset {name!r}; valid: {', '.join(PRESETS)}")
    p = PRESETS[name]
    if p.regional and p.mode in GRAPHED_MODES:
        raise ValueError(f"preset {name!r} compiles per block with mode {p.mode!r}, which replays CUDA graphs: each "
                         f"block's output would be overwritten by the next block's replay")
    return p


def supported_inductor_options(options: dict) -> tuple[dict, list[str]]:
    """The options this torch's inductor knows (older / newer versions rename some) and the names it lacks."""
    from torch._inductor import config

    known, missing = {}, []
    for key, value in options.items():
        *parents, leaf = key.split(".")  # nested sections, e.g. "triton.enable_persistent_tma_matmul"
        node = config
        for part in parents:
            node = getattr(node, part, None)
        (known.__setitem__(key, value) if node is not None and hasattr(node, leaf) else missing.append(key))
    return known, missing


@contextlib.contextmanager
def inductor_options(options: dict):
    """Apply inductor config overrides for the duration of a (first, compiling) call."""
    if not options:
        yield []
        return
    from torch._inductor import config

    known, missing = supported_inductor_options(options)
    with config.patch(known):
        yield missing


def prepare_for_sampling(model: nn.Module, preset: str = "max-autotune", dtype: torch.dtype | None = None,
                         fullgraph: bool = True) -> nn.Module:
    """Freeze `model` for sampling (eval, no grad, optional dtype cast) and compile its forward in place with the
    named preset; returns the same module object (its config, dtype, device and pipeline registration unchanged).

    In place matters: pipelines hold the transformer as a registered component, and `module.compile()` makes
    `module(...)` run the compiled graph without replacing the object. `fullgraph=False` lets a foreign model
    with graph breaks (a baseline) compile what it can; ours must compile whole."""
    p = _check_preset(preset)
    model.eval().requires_grad_(False)
    if dtype is not None:
        model.to(dtype)
    if p.mode is None:
        return model
    for module in repeated_blocks(model) if p.regional else [model]:
        _compile_in_place(module, p, fullgraph)
    model._sampling_preset = preset  # type: ignore[attr-defined]
    return model


def _compile_in_place(module: nn.Module, p: Preset, fullgraph: bool) -> None:
    # Compile the bound forward (not the module: its __call__ would route back here) and install it the way
    # nn.Module.compile does, as the module's call implementation; the inductor options are patched around every
    # call because inductor reads its config when it (re)compiles, which happens inside the first call at a shape.
    compiled = torch.compile(module.forward, mode=p.mode, fullgraph=fullgraph, dynamic=False)

    def call(*args, **kwargs):
        with inductor_options(p.inductor):
            return compiled(*args, **kwargs)

    module._compiled_call_impl = call  # type: ignore[attr-defined]


def preset_of(model: nn.Module) -> str:
    return getattr(model, "_sampling_preset", "eager")


def restore_eager(model: nn.Module) -> nn.Module:
    """Undo `prepare_for_sampling`'s compilation (the dtype cast stays)."""
    for module in [model, *(b for name in BLOCK_LISTS for b in (getattr(model, name, None) or []))]:
        module._compiled_call_impl = None  # type: ignore[attr-defined]
    model._sampling_preset = "eager"  # type: ignore[attr-defined]
    return model
