"""The entry point: validate, pick a backend (auto table or override), run, zero invalid rows.

Who picks the backend, strongest first:
  1. ``backend=`` argument of :func:`attention` / :func:`explain` (``"auto"`` included),
  2. the innermost ``with use_backend(name):`` block (a contextvar, so per thread and per asyncio task),
  3. the environment variable ``DITSTUDIO_ATTENTION_BACKEND``,
  4. auto: the first backend of the matching :data:`AUTO_TABLE` row whose ``supports`` passes.
A forced backend that cannot run the call raises ``ValueError`` with its reason; there is no silent fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections import UserDict
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .backends import BACKENDS, TRACEABLE, static_supports
from .problem import IndexArg, Problem, prepare

ENV_VAR = "DITSTUDIO_ATTENTION_BACKEND"

# The pattern key of the table: what the kernel has to handle, derived from the Problem's form.
TABLE_PATTERN = {
    "none": "dense",  # also dense cross-attention, GQA and equal-count token subsets
    "causal": "causal",
    "causal_bottom_right": "causal_rect",
    "block_causal": "block_causal",
    "explicit": "masked",  # key padding, unequal subsets, subsets with a causal pattern, causal with Nq > Nk
}

_HALF = ("bf16", "fp16")


class AutoTable(UserDict):
    """(device kind, dtype, head_dim bucket, pattern) -> preference list; "*" matches any dtype / bucket.

    Head-dim buckets: 64 (D <= 64), 128 (D <= 128), 256 (larger). A pattern may also have a "<pattern>:train"
    row, used first for calls that need gradients, where a kernel's backward speed differs from its forward.
    Rows are stored as tuples and every change bumps ``version``, so cached auto decisions never go stale.
    """

    version = 0

    def __setitem__(self, key, order):
        unknown = [name for name in order if name not in BACKENDS]
        if unknown:
            raise ValueError(f"AUTO_TABLE row {key} names unknown backends {unknown}")
        super().__setitem__(key, tuple(order))
        self.version += 1

    def __delitem__(self, key):
        super().__delitem__(key)
        self.version += 1


AUTO_TABLE = AutoTable()

# CUDA sm90 (H100), bf16/fp16: from bench/attention.py on an H100, torch 2.11, 2026-11-23 (useful TFLOP/s):
#   dense: cuDNN is fastest everywhere it matters (DiT-XL/2 256px 216, 512px 328, N=4096 D=64 460, D=128 614;
#     flash 154/219/299/344; flex 152/229/402/468; also fwd+bwd: 153 vs flex 102, flash 95).
#   causal square: cuDNN (LM N=4096: 544; flex 367; flash 298). causal_rect (text queries after a prefix,
#     B=8): memory-efficient with its built-in bottom-right mask 98, flash 91, cuDNN 91 (explicit mask).
#   block_causal (VAR-d30 training): cuDNN with a cached bias 120 (fwd+bwd 113) vs flex 81 (98): flex's
#     128-token blocks skip only ~22% of the work for VAR's scales, and partial blocks cost extra.
#   masked (key padding etc.): with key padding as a (B,1,1,Nk) bias, cuDNN 0.30 ms vs memory-efficient 0.46
#     (DiT-XL/2 256px, a quarter of the keys padded; bench/results/attention_padded.json); flex must build its
#     BlockMask on every call for data-dependent masks (milliseconds), so it comes last.
#   Calls of ~20 us (B=1 LM prefill) are decided by launch overhead and noise; not worth a size dimension.
# Flex ranks after flash where they are close because it compiles (and recompiles per shape); flash does not.
for _dt in _HALF:
    AUTO_TABLE[("cuda-sm90", _dt, 64, "dense")] = ["sdpa_cudnn", "flex", "sdpa_flash", "sdpa_efficient", "sdpa_math"]
    AUTO_TABLE[("cuda-sm90", _dt, "*", "dense")] = ["sdpa_cudnn", "sdpa_flash", "flex", "sdpa_efficient", "sdpa_math"]
    AUTO_TABLE[("cuda-sm90", _dt, "*", "causal")] = ["sdpa_cudnn", "flex", "sdpa_flash", "sdpa_efficient", "sdpa_math"]
    AUTO_TABLE[("cuda-sm90", _dt, "*", "causal_rect")] = ["sdpa_efficient", "sdpa_flash", "sdpa_cudnn", "flex", "sdpa_math"]
    AUTO_TABLE[("cuda-sm90", _dt, "*", "block_causal")] = ["sdpa_cudnn", "flex", "sdpa_efficient", "sdpa_math"]
    # Training: the split into dense prefix calls (problem.block_causal_pieces) wins forward (cuDNN 0.80 ms vs
    # flex 1.78 at VAR-d30's 680 tokens, B=64) but its backward does not: forward+backward cuDNN 6.7 ms, flex 5.0.
    AUTO_TABLE[("cuda-sm90", _dt, "*", "block_causal:train")] = ["flex", "sdpa_cudnn", "sdpa_efficient", "sdpa_math"]
    AUTO_TABLE[("cuda-sm90", _dt, "*", "masked")] = ["sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flex"]
    # Other CUDA GPUs (sm80 and friends), unmeasured: flash is the safe fast kernel; cuDNN attention is newer.
    AUTO_TABLE[("cuda", _dt, "*", "dense")] = ["sdpa_flash", "sdpa_cudnn", "flex", "sdpa_efficient", "sdpa_math"]
    AUTO_TABLE[("cuda", _dt, "*", "causal")] = ["sdpa_flash", "sdpa_cudnn", "flex", "sdpa_efficient", "sdpa_math"]
    AUTO_TABLE[("cuda", _dt, "*", "causal_rect")] = ["sdpa_efficient", "sdpa_flash", "flex", "sdpa_math"]
    AUTO_TABLE[("cuda", _dt, "*", "block_causal")] = ["sdpa_efficient", "flex", "sdpa_math"]
    AUTO_TABLE[("cuda", _dt, "*", "masked")] = ["sdpa_efficient", "flex", "sdpa_math"]
for _pat in TABLE_PATTERN.values():
    # float32 on CUDA: flash and cuDNN are half-only; memory-efficient takes float32.
    AUTO_TABLE[("cuda", "fp32", "*", _pat)] = ["sdpa_efficient", "flex", "sdpa_math"]
    AUTO_TABLE[("cuda", "*", "*", _pat)] = ["sdpa_math"]

# CPU, measured here on 2 cores (torch 2.14; B=1-2, H=8, N=256-1024, D=64/128; dense, causal, key padding):
# float32: the CPU flash kernel beats math 1.3-4x forward and is as fast or faster forward+backward.
# bfloat16: flash is 1.2-3.5x faster forward but its backward is 3-6x *slower* than math's, so training
# (a call that needs gradients) has its own ":train" row. float16: math ties flash forward and is 5-10x
# faster backward. Eager flex is 5-30x slower than either and has no backward on CPU: never auto-picked.
for _pat in TABLE_PATTERN.values():
    AUTO_TABLE[("cpu", "*", "*", _pat)] = ["sdpa_flash", "sdpa_math"]
    AUTO_TABLE[("cpu", "bf16", "*", _pat + ":train")] = ["sdpa_math", "sdpa_flash"]
    AUTO_TABLE[("cpu", "fp16", "*", _pat)] = ["sdpa_math", "sdpa_flash"]

# When no row lists a backend that works: the always-correct ones.
FALLBACK = ["sdpa_math", "reference"]

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def head_dim_bucket(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


_DEVICE_KINDS: dict[tuple, tuple[str, ...]] = {}


def device_kinds(device: torch.device | str) -> tuple[str, ...]:
    """Most specific first: e.g. ("cuda-sm90", "cuda") on an H100, ("cpu",) on a CPU."""
    device = torch.device(device)
    key = (device.type, device.index)
    if key not in _DEVICE_KINDS:
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            _DEVICE_KINDS[key] = (f"cuda-sm{major}{minor}", "cuda")
        else:
            _DEVICE_KINDS[key] = (device.type,)
    return _DEVICE_KINDS[key]


def table_row(
    device: torch.device | str, dtype: torch.dtype, head_dim: int, pattern: str, training: bool = False
) -> tuple[tuple, list[str]]:
    """The AUTO_TABLE row for a call: (key found, preference list); most specific key first, else FALLBACK."""
    dt, bucket = dtype_name(dtype), head_dim_bucket(head_dim)
    patterns = (pattern + ":train", pattern) if training else (pattern,)
    for kind in device_kinds(device):
        for pat in patterns:
            for key in ((kind, dt, bucket, pat), (kind, dt, "*", pat), (kind, "*", "*", pat)):
                if key in AUTO_TABLE:
                    return key, AUTO_TABLE[key]
    return ("fallback",), tuple(FALLBACK)


@dataclass
class Decision:
    """Which backend runs a call and why."""

    backend: str
    reason: str
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (backend, why not), in the order tried
    source: str = "auto"  # who forced it: "argument", "use_backend", "env"; or "auto" (the table chose)


_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("ditstudio_attention_backend", default=None)


def _check_name(name, where: str) -> str:
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"unknown attention backend {name!r} ({where}); expected 'auto' or one of {sorted(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend for every attention call in this block (unless a call passes ``backend=``)."""
    token = _FORCED.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _FORCED.reset(token)


def _requested(backend: str | None) -> tuple[str, str]:
    if backend is not None:
        return _check_name(backend, "backend argument"), "argument"
    forced = _FORCED.get()
    if forced is not None:
        return forced, "use_backend"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check_name(env, f"environment variable {ENV_VAR}"), "env"
    return "auto", "auto"


# Auto decisions by (problem features, table version). Every call re-checks the cached winner's supports():
# support is fixed per feature set except flex's shape budget, which can only run out.
_AUTO_DECISIONS: dict[tuple, Decision] = {}


def clear_decision_cache() -> None:
    _AUTO_DECISIONS.clear()


@torch._dynamo.assume_constant_result
def _requested_at_trace_time() -> str:
    # Dynamo (torch 2.11) cannot trace ContextVar.get; this runs once at trace time and becomes a constant.
    return _FORCED.get() or os.environ.get(ENV_VAR, "").strip() or "auto"


def _decide_traced(p: Problem, backend: str | None) -> Decision:
    """The decision while torch.compile traces a model. Probes run kernels and the SDPA switches are global
    state, neither of which a graph can hold, so: the ``backend`` argument if given, else the decision an
    eager call with the same features cached, else the first backend of the table row whose static rules
    (device, dtype, mask form) pass. ``use_backend`` and the env var are read at trace time like any Python
    state (a change needs a recompile)."""
    name = backend if backend is not None else _requested_at_trace_time()
    _check_name(name, "backend")
    if name != "auto":
        ok, reason = static_supports(name, p)
        if not ok:
            raise ValueError(f"attention backend {name!r} does not support this call under torch.compile: {reason}")
        return Decision(name, "forced (traced)", [], "traced")
    cached = _AUTO_DECISIONS.get((p.features, AUTO_TABLE.version))
    if cached is not None and cached.backend in TRACEABLE:
        return cached
    key, order = table_row(p.q.device, p.q.dtype, p.q.shape[-1], TABLE_PATTERN[p.form], p.needs_grad)
    for candidate in list(order) + FALLBACK:
        if candidate in TRACEABLE and static_supports(candidate, p)[0]:
            return Decision(candidate, f"first statically valid traceable backend of AUTO_TABLE{key}", [], "traced")
    return Decision("reference", "fallback (traced)", [], "traced")


def decide(p: Problem, backend: str | None = None) -> Decision:
    """Pick the backend for a prepared Problem (see module docstring for the order of authority)."""
    if torch.compiler.is_compiling():
        return _decide_traced(p, backend)
    name, source = _requested(backend)
    if name != "auto":
        ok, reason = BACKENDS[name].supports(p)
        if not ok:
            raise ValueError(f"attention backend {name!r} (chosen by {source}) does not support this call: {reason}")
        return Decision(name, f"forced by {source}: {reason}", [], source)
    cache_key = (p.features, AUTO_TABLE.version)
    cached = _AUTO_DECISIONS.get(cache_key)
    if cached is not None and BACKENDS[cached.backend].supports(p)[0]:
        return cached
    pattern = TABLE_PATTERN[p.form]
    key, order = table_row(p.q.device, p.q.dtype, p.q.shape[-1], pattern, p.needs_grad)
    rejected: list[tuple[str, str]] = []
    for candidate in list(order) + [b for b in FALLBACK if b not in order]:
        ok, reason = BACKENDS[candidate].supports(p)
        if ok:
            where = f"AUTO_TABLE{key}" if candidate in order else "fallback"
            decision = Decision(candidate, f"first supported backend of {where} for a {pattern} call: {reason}",
                                rejected, "auto")
            _AUTO_DECISIONS[cache_key] = decision
            return decision
        rejected.append((candidate, reason))
    raise AssertionError("the reference backend supports every call")  # unreachable: reference always says yes


def explain(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pattern: str = "dense",
    segments: Sequence[int] | None = None,
    key_padding_mask: Tensor | None = None,
    q_index: IndexArg = None,
    kv_index: IndexArg = None,
    scale: float | None = None,
    backend: str | None = None,
) -> Decision:
    """The decision :func:`attention` would take for these arguments, without computing attention."""
    p = prepare(q, k, v, pattern=pattern, segments=segments, key_padding_mask=key_padding_mask,
                q_index=q_index, kv_index=kv_index, scale=scale)
    return decide(p, backend)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pattern: str = "dense",
    segments: Sequence[int] | None = None,
    key_padding_mask: Tensor | None = None,
    q_index: IndexArg = None,
    kv_index: IndexArg = None,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Attention over (batch, heads, tokens, head_dim) tensors; returns (B, H, Nq', Dv).

    pattern: "dense" (self or cross, Nq != Nk allowed), "causal" (bottom-right aligned when Nq != Nk: query i
        sees keys j <= i + Nk - Nq), or "block_causal" with ``segments`` (lengths summing to Nk; a token sees
        its own and all earlier segments; with Nq < Nk the queries are the last Nq tokens).
    k, v may have fewer heads than q (grouped-query attention; kv head h // (H / Hkv) serves query head h).
    key_padding_mask: (B, Nk) bool, True = keep.
    q_index / kv_index: kept tokens per sample, (B, n) LongTensor, or a list of B 1-D LongTensors with unequal
        counts; kv_index may also be per kv-head, (B, Hkv, n) (or a list of (Hkv, n_i)). Patterns are applied
        to the original token positions. The output holds only the kept queries; with unequal query counts it
        is padded to the longest, (B, H, max_n, Dv), and padded rows are zero.
    Rows that see no key at all (everything padded, causal with Nq > Nk) are zero, on every backend.
    scale: defaults to 1/sqrt(head_dim).
    backend: None (use_backend / env var / auto), "auto", or a name from BACKENDS.
    """
    p = prepare(q, k, v, pattern=pattern, segments=segments, key_padding_mask=key_padding_mask,
                q_index=q_index, kv_index=kv_index, scale=scale)
    decision = decide(p, backend)
    if torch.compiler.is_compiling():
        return p.finish(TRACEABLE[decision.backend](p))
    return p.finish(BACKENDS[decision.backend].run(p))


def _standard_calls(device: torch.device, dtype: torch.dtype, head_dim: int) -> dict[str, tuple]:
    """Small representative calls of each pattern, for doctor-style summaries."""

    def t(B, H, N):
        return torch.zeros(B, H, N, head_dim, device=device, dtype=dtype)

    kpm = torch.ones(2, 64, dtype=torch.bool, device=device)
    kpm[1, 40:] = False
    uneven = [torch.arange(0, 64, 2, device=device), torch.arange(0, 48, device=device)]
    return {
        "dense": ((t(2, 4, 64), t(2, 4, 64), t(2, 4, 64)), {}),
        "dense_cross": ((t(2, 4, 64), t(2, 4, 16), t(2, 4, 16)), {}),
        "gqa": ((t(2, 8, 64), t(2, 2, 64), t(2, 2, 64)), {}),
        "causal": ((t(2, 4, 64), t(2, 4, 64), t(2, 4, 64)), {"pattern": "causal"}),
        "causal_rect": ((t(2, 4, 16), t(2, 4, 64), t(2, 4, 64)), {"pattern": "causal"}),
        "block_causal": ((t(2, 4, 30), t(2, 4, 30), t(2, 4, 30)), {"pattern": "block_causal", "segments": [1, 4, 9, 16]}),
        "key_padding": ((t(2, 4, 64), t(2, 4, 64), t(2, 4, 64)), {"key_padding_mask": kpm}),
        "token_subset_unequal": ((t(2, 4, 64), t(2, 4, 64), t(2, 4, 64)), {"q_index": uneven, "kv_index": uneven}),
    }


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict[str, tuple[bool, str]]:
    """name -> (ok, reason) for a plain dense call (head_dim 64) on ``device``: which backends work here."""
    device = torch.device(device)
    dtype = dtype or _default_dtype(device)
    (q, k, v), kwargs = _standard_calls(device, dtype, 64)["dense"]
    with torch.no_grad():
        p = prepare(q, k, v, **kwargs)
        return {name: backend.supports(p) for name, backend in BACKENDS.items()}


def auto_choices(device: torch.device | str = "cpu", dtype: torch.dtype | None = None, head_dim: int = 64) -> dict[str, str]:
    """pattern -> the backend auto dispatch picks on ``device`` for a standard set of patterns (inference)."""
    device = torch.device(device)
    dtype = dtype or _default_dtype(device)
    with torch.no_grad():
        return {
            name: explain(*tensors, backend="auto", **kwargs).backend
            for name, (tensors, kwargs) in _standard_calls(device, dtype, head_dim).items()
        }
