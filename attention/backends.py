"""Attention backends: plain functions in one registry, each with a validity check.

``BACKENDS[name] = Backend(run, supports)``:

* ``run(problem) -> Tensor`` computes attention for a normalised :class:`~attention.problem.Problem` and returns
  (B, H, Nq, Dv); the caller zeroes the rows flagged in ``problem.zero_rows`` (same rule for everyone).
* ``supports(problem) -> (ok, reason)``. Static rules first (device, dtype, mask kinds a kernel cannot take),
  then, where a call is cheap, a *probe*: the backend runs a tiny problem with the same features (device, dtype,
  head dims, mask form, GQA, Nq/Nk relation, per-head mask, backward) and must match the float64 reference.
  The probe result is cached per feature set, so a kernel that merely "should" work but does not load, does
  not support this head_dim, or silently computes something else is rejected with the exception text.

No backend drops an argument: every Problem carries an exact mask, and a backend that cannot express it says
so in ``supports``.
"""

from __future__ import annotations

import functools
import types
import warnings
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend
from torch.nn.attention import sdpa_kernel
from torch.nn.attention.bias import CausalVariant

from .problem import Problem, block_causal_pieces, tiny_like


class Backend(NamedTuple):
    run: Callable[[Problem], Tensor]
    supports: Callable[[Problem], tuple[bool, str]]


HALF = (torch.float16, torch.bfloat16)

# Relative tolerance of a probe's output and gradients against the float64 reference on its tiny problem:
# loose enough for the dtype's rounding (and TF32 on CUDA), tight enough to catch a wrong mask.
_PROBE_TOL = {torch.float64: 1e-6, torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}

_PROBES: dict[tuple, tuple[bool, str]] = {}


def _error_text(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:300]}"


def _rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / (b.abs().max() + 1e-6))


def _check_on_tiny(run: Callable[[Problem], Tensor], tiny: Problem) -> tuple[bool, str]:
    """Run ``run`` on a tiny problem (forward, and backward if it needs grad) and compare with float64."""
    tol = _PROBE_TOL[tiny.q.dtype]
    out = tiny.finish(run(tiny))
    ref = tiny.finish(reference(tiny))
    err = _rel_err(out, ref)
    if not err <= tol:  # also catches NaN
        return False, f"probe result differs from the float64 reference (relative error {err:.2e} > {tol:.0e})"
    if tiny.needs_grad:
        leaves = (tiny.q, tiny.k, tiny.v)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        got = torch.autograd.grad(out, leaves, g)
        want = torch.autograd.grad(ref, leaves, g)
        for name, a, b in zip("qkv", got, want):
            err = _rel_err(a, b)
            if not err <= tol:
                return False, f"probe gradient d{name} differs from the float64 reference ({err:.2e} > {tol:.0e})"
    return True, "probe ok"


def _probe(name: str, p: Problem, run: Callable[[Problem], Tensor], variant: str = "") -> tuple[bool, str]:
    key = (name, variant) + p.features
    if key not in _PROBES:
        # SDPA explains *why* a kernel was not usable only in warnings ("No available kernel" is the error):
        # record them and put them in the reason.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                tiny = tiny_like(p)
                # The probe judges the kernel at the problem's own dtype: no autocast around it. Its own autograd
                # graph keeps its tensors itself (identity saved-tensor hooks): under activation checkpointing the
                # first call's probe would otherwise count among the block's saved tensors, the recomputation
                # (probe cached) saves fewer, and torch.utils.checkpoint raises CheckpointError.
                with torch.set_grad_enabled(tiny.needs_grad), torch.autocast(p.q.device.type, enabled=False), \
                        torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                    _PROBES[key] = _check_on_tiny(run, tiny)
            except Exception as e:  # the probe exists to turn kernel errors into reasons
                why = [str(w.message).split(" (Triggered internally")[0] for w in caught]
                why = [w for w in why if w and not w.endswith("kernel not used because:")]
                detail = f" ({'; '.join(dict.fromkeys(why))})" if why else ""
                _PROBES[key] = (False, f"probe failed: {_error_text(e)}{detail}")
    return _PROBES[key]


def clear_probe_cache() -> None:
    """Forget probe results and auto decisions (e.g. after installing xformers or changing CUDA settings)."""
    from .dispatch import clear_decision_cache

    _PROBES.clear()
    _xformers_loads.cache_clear()
    clear_decision_cache()


def _repeat_kv(p: Problem) -> tuple[Tensor, Tensor]:
    """Expand grouped kv heads to one per query head (Llama's repeat_kv)."""
    if p.group == 1:
        return p.k, p.v
    return p.k.repeat_interleave(p.group, dim=1), p.v.repeat_interleave(p.group, dim=1)


# ----------------------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------------------


def reference(p: Problem) -> Tensor:
    """softmax(q k^T * scale + mask) v in float64 with an explicit boolean mask, cast back to q's dtype."""
    k, v = _repeat_kv(p)
    with torch.autocast(p.q.device.type, enabled=False):  # float64 means float64, also inside autocast
        scores = torch.matmul(p.q.double(), k.double().transpose(-1, -2)) * p.scale
        mask = p.dense_mask()
        if mask is not None:
            # Never a fully masked row: prepare() opens rows without keys (they are zeroed afterwards).
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), v.double()).to(p.q.dtype)


def reference_supports(p: Problem) -> tuple[bool, str]:
    return True, "float64 reference runs any problem (slow; for tests and as a last resort)"


# ----------------------------------------------------------------------------------------------------------
# torch SDPA, one explicit kernel per backend
# ----------------------------------------------------------------------------------------------------------


def _flash_bottom_right(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    # The flash kernel's own causal flag is bottom-right aligned for Nq != Nk (what
    # torch.nn.attention.bias.causal_lower_right uses internally); SDPA's is_causal would be top-left.
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[0]


def _efficient_bottom_right(q: Tensor, k: Tensor, v: Tensor, scale: float, needs_grad: bool) -> Tensor:
    # Memory-efficient kernel with its built-in lower-right causal mask (no mask tensor is read).
    out = torch.ops.aten._efficient_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        None, None, None, None, None, 0.0, int(CausalVariant.LOWER_RIGHT),
        compute_log_sumexp=needs_grad, scale=scale,
    )[0]
    return out.transpose(1, 2)


# SDPA's kernel switches: torch._C's getters/setters, the same ones torch.nn.attention.sdpa_kernel flips
# (global, not per thread), without its generator context manager, which is several times slower per call.
# "overrideable" (out-of-tree devices) exists in newer torch only and is switched off with the others.
_SDP_SWITCHES = {
    getattr(SDPBackend, member): (getattr(torch._C, f"_get_{name}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{name}"))
    for name, member in [("cudnn", "CUDNN_ATTENTION"), ("flash", "FLASH_ATTENTION"),
                         ("mem_efficient", "EFFICIENT_ATTENTION"), ("math", "MATH"), ("overrideable", "OVERRIDEABLE")]
    if hasattr(SDPBackend, member) and hasattr(torch._C, f"_get_{name}_sdp_enabled")
}


class _OnlyKernel:
    """``with _OnlyKernel(SDPBackend.X):`` lets SDPA use kernel X and nothing else (so it fails, not falls back)."""

    def __init__(self, kernel: SDPBackend):
        self.kernel = kernel

    def __enter__(self):
        self.saved = [is_on() for is_on, _ in _SDP_SWITCHES.values()]
        for kernel, (_, switch) in _SDP_SWITCHES.items():
            switch(kernel == self.kernel)

    def __exit__(self, *exc):
        for (_, switch), was_on in zip(_SDP_SWITCHES.values(), self.saved):
            switch(was_on)


def _sdpa_run(p: Problem, kernel: SDPBackend, gqa_native: bool) -> Tensor:
    q = p.q
    if p.form == "causal_bottom_right" and q.is_cuda and kernel in (SDPBackend.FLASH_ATTENTION,
                                                                  SDPBackend.EFFICIENT_ATTENTION):
        k, v = _repeat_kv(p)
        if kernel == SDPBackend.FLASH_ATTENTION:
            return _flash_bottom_right(q, k, v, p.scale)
        return _efficient_bottom_right(q, k, v, p.scale, p.needs_grad)
    if p.group > 1 and not gqa_native:
        k, v = _repeat_kv(p)
        gqa = {}
    else:
        k, v = p.k, p.v
        gqa = {"enable_gqa": True} if p.group > 1 else {}
    with _OnlyKernel(kernel):
        if p.form == "none":
            return F.scaled_dot_product_attention(q, k, v, scale=p.scale, **gqa)
        if p.form == "block_causal":
            return _block_causal_split(p.with_kv(k, v), lambda q_, k_, v_, bias: F.scaled_dot_product_attention(
                q_, k_, v_, attn_mask=bias, scale=p.scale, **gqa))
        if p.form == "causal":  # square only, so SDPA's top-left alignment is the right one
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=p.scale, **gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=p.additive_mask(), scale=p.scale, **gqa)


def _block_causal_split(p: Problem, call: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]) -> Tensor:
    """Block-causal attention as dense prefix calls plus one small masked call (problem.block_causal_pieces),
    concatenated along the tokens. `call(q, k, v, bias)` runs one SDPA piece."""
    Nq, Nk = p.q.shape[2], p.k.shape[2]
    pieces = block_causal_pieces(p.mask_key[1], Nq, Nk)
    if len(pieces) == 1 and pieces[0][3]:
        return call(p.q, p.k, p.v, p.additive_mask())
    outs = []
    for q_start, q_end, keys, masked in pieces:
        bias = None
        if masked:
            bias = p.additive_mask()[q_start:q_end, :keys].contiguous()
        outs.append(call(p.q[:, :, q_start:q_end], p.k[:, :, :keys], p.v[:, :, :keys], bias))
    return torch.cat(outs, dim=2)


def _sdpa_traced(p: Problem, kernel: SDPBackend) -> Tensor:
    """The SDPA call as torch.compile can trace it: `sdpa_kernel` (which dynamo understands) instead of
    flipping the global switches, GQA by repeated heads (valid for every kernel), and rectangular causal as the
    cached additive bias (dynamo cannot build torch's CausalBias subclass)."""
    k, v = _repeat_kv(p)
    if p.form == "block_causal":
        with sdpa_kernel([kernel]):
            return _block_causal_split(p.with_kv(k, v), lambda q_, k_, v_, bias: F.scaled_dot_product_attention(
                q_, k_, v_, attn_mask=bias, scale=p.scale))
    if p.form == "causal":
        mask, causal = None, True
    else:
        mask, causal = p.additive_mask(), False
    with sdpa_kernel([kernel]):
        return F.scaled_dot_product_attention(p.q, k, v, attn_mask=mask, is_causal=causal, scale=p.scale)


# Read once at import: under torch.compile (torch 2.11, CUDA) the call `torch.backends.cudnn.is_available()` is a
# torch function returning a bool, which dynamo cannot put in a graph: it broke LLaVA's compiled decode step into a
# frame per layer (measured on the H100). A build-time flag, so reading it early loses nothing.
_CUDNN_BUILT = torch.backends.cudnn.is_available()


def _sdpa_static(name: str, p: Problem) -> tuple[bool, str]:
    dev, dtype = p.q.device.type, p.q.dtype
    if name == "sdpa_cudnn":
        if dev != "cuda":
            return False, f"cuDNN attention runs on CUDA only (tensors on {dev})"
        if not _CUDNN_BUILT:
            return False, "cuDNN is not available in this torch build"
        if dtype not in HALF:
            return False, f"cuDNN attention needs float16/bfloat16, got {dtype}"
    elif name == "sdpa_flash":
        if dev == "cuda":
            if dtype not in HALF:
                return False, f"CUDA flash attention needs float16/bfloat16, got {dtype}"
            if p.form not in ("none", "causal", "causal_bottom_right"):
                return False, f"CUDA flash attention takes no arbitrary mask (this call needs a {p.form} mask)"
        elif dev != "cpu":
            return False, f"no flash attention kernel for {dev}"
    elif name == "sdpa_efficient":
        if dev != "cuda":
            return False, f"memory-efficient attention runs on CUDA only (tensors on {dev})"
    return True, ""


def _sdpa_backend(name: str, kernel: SDPBackend) -> Backend:
    def gqa_variant(p: Problem) -> tuple[bool, str, bool]:
        """Probe the kernel; for GQA try SDPA's enable_gqa first, then repeated kv heads."""
        ok, reason = _sdpa_static(name, p)
        if not ok:
            return False, reason, False
        variants = (True, False) if p.group > 1 else (False,)
        reasons = []
        for native in variants:
            ok, reason = _probe(name, p, lambda t: _sdpa_run(t, kernel, native), "gqa" if native else "")
            if ok:
                how = " (GQA via enable_gqa)" if native else (" (GQA via repeated kv heads)" if p.group > 1 else "")
                return True, f"{reason}{how}", native
            reasons.append(("enable_gqa: " if native else "") + reason)
        return False, "; ".join(reasons), False

    def supports(p: Problem) -> tuple[bool, str]:
        ok, reason, _ = gqa_variant(p)
        return ok, reason

    def run(p: Problem) -> Tensor:
        ok, reason, native = gqa_variant(p)
        if not ok:
            raise ValueError(f"backend {name!r} does not support this call: {reason}")
        return _sdpa_run(p, kernel, native)

    run.__name__ = supports.__name__ = name
    return Backend(run, supports)


# ----------------------------------------------------------------------------------------------------------
# FlexAttention
# ----------------------------------------------------------------------------------------------------------

# On CPU, torch.compile(flex_attention) builds a C++ kernel per shape and mask: about 20 s for the first call
# and 6 s per new shape on a 2-core machine, which makes it impractical for the CPU paths of this project
# (tests, laptops). So on CPU we run flex *eagerly* (its unfused reference implementation, correct but not
# fast) unless FLEX_COMPILE_ON_CPU is set. On CUDA flex is always compiled: eager flex materialises the
# full score matrix there and is slower than any SDPA kernel.
FLEX_COMPILE_ON_CPU = False


# Dynamo keeps at most `recompile_limit` (default 8) shape specialisations per compiled function and past that
# silently runs flex *eagerly* (unfused, the full score matrix in memory). A model sees more shapes than that
# (resolutions, prompt lengths, batch sizes). So we count the specialisations of each mask kind ourselves,
# lift dynamo's limit while a new one compiles, and past FLEX_MAX_SHAPES flex_supports() refuses the call
# with a reason (auto then takes the next backend) instead of running slowly.
FLEX_MAX_SHAPES = 64
_FLEX_SHAPES: dict[str, set] = {}


def _flex_call(q, k, v, block_mask, scale, enable_gqa):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


@functools.cache
def _compiled_flex(mask_kind: str):
    """One compiled flex_attention per mask kind (dense / causal / causal_bottom_right / block_causal / explicit).

    Dynamo caches compiled code per *code object*, so each kind gets its own copy of ``_flex_call``'s code
    (same body, new name): the kinds then keep separate caches and separate recompile counts.
    dynamic=False: flex's Triton templates are specialised per shape anyway and a static graph is fastest.
    """
    code = _flex_call.__code__.replace(co_name=f"flex_{mask_kind}")
    fn = types.FunctionType(code, _flex_call.__globals__, f"flex_{mask_kind}")
    return torch.compile(fn, dynamic=False)


def _flex_signature(p: Problem) -> tuple:
    """Everything dynamo specialises a compiled flex call on (dynamic=False guards sizes *and* strides)."""
    return tuple((t.shape, t.stride(), t.dtype, t.requires_grad) for t in (p.q, p.k, p.v)) + (
        str(p.q.device), torch.is_grad_enabled(), p.scale, p.group > 1, p.mask_per_batch, p.mask_per_head,
    )


def _eager_flex(*args, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        # Eager on CPU is our deliberate choice (see FLEX_COMPILE_ON_CPU), not a mistake worth a warning.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(*args, **kwargs)


def _flex_compiled_here(device: torch.device) -> bool:
    return device.type != "cpu" or FLEX_COMPILE_ON_CPU


def _flex_kind(p: Problem) -> str:
    return "dense" if p.form == "none" else p.form


@functools.lru_cache(maxsize=64)
def _cached_block_mask(mask_key: tuple, B: int | None, H: int | None, q_len: int, kv_len: int, device: str):
    """BlockMask of a data-independent pattern, rebuilt from its key alone so the cache is always right."""
    from torch.nn.attention.flex_attention import create_block_mask

    from . import masks

    kind = mask_key[0]
    if kind == "causal":
        mod = masks.causal_lower_right(q_len, kv_len)
    elif kind == "block_causal":
        mod = masks.block_causal(mask_key[1], q_len, device)
    else:
        raise AssertionError(f"no cached BlockMask for mask kind {kind!r}")
    return create_block_mask(mod, B, H, q_len, kv_len, device=device)


def _block_mask(p: Problem):
    if p.form == "none":
        return None
    Nq, Nk = p.q.shape[2], p.k.shape[2]
    if p.mask_key is not None:
        return _cached_block_mask(p.mask_key, None, None, Nq, Nk, str(p.q.device))
    # Data-dependent (padding, token subsets): nothing to key a cache on without reading the tensors.
    from torch.nn.attention.flex_attention import create_block_mask

    B, H = p.q.shape[0], p.q.shape[1]
    return create_block_mask(p.mask_mod, B, H if p.mask_per_head else None, Nq, Nk, device=p.q.device)


def flex(p: Problem) -> Tensor:
    q, k, v = p.q, p.k, p.v
    if not _flex_compiled_here(q.device):
        if not p.needs_grad:
            # torch refuses CPU flex when inputs merely *require* grad, even under no_grad; no graph is built
            # here anyway, so detaching changes nothing.
            q, k, v = q.detach(), k.detach(), v.detach()
        return _eager_flex(q, k, v, block_mask=_block_mask(p), scale=p.scale, enable_gqa=p.group > 1)
    if q.device.type == "cpu" and len({t.untyped_storage().data_ptr() for t in (q, k, v)}) < 3:
        # Compiled CPU flex (torch 2.11) rejects q/k/v that share a buffer (e.g. k is v); copy them apart.
        k, v = k.clone(), v.clone()
    kind, signature = _flex_kind(p), _flex_signature(p)
    seen = _FLEX_SHAPES.setdefault(kind, set())
    compiled = _compiled_flex(kind)
    if signature in seen:
        return compiled(q, k, v, _block_mask(p), p.scale, p.group > 1)
    if len(seen) >= FLEX_MAX_SHAPES:
        raise ValueError(f"flex: {len(seen)} shapes already compiled for {kind} masks (FLEX_MAX_SHAPES)")
    # A new specialisation: only a cache miss consults the limits, so lift them for this call only.
    limit = 2 * FLEX_MAX_SHAPES  # slack for recompiles our signature does not foresee
    with torch._dynamo.config.patch(recompile_limit=limit, accumulated_recompile_limit=4 * limit):
        out = compiled(q, k, v, _block_mask(p), p.scale, p.group > 1)
    seen.add(signature)
    return out


FLEX_MAX_HEAD_DIM = 256


def flex_supports(p: Problem) -> tuple[bool, str]:
    # Static rules only: a probe would compile a kernel (seconds) on CUDA.
    dev, dtype = p.q.device.type, p.q.dtype
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as e:
        return False, f"flex_attention unavailable: {_error_text(e)}"
    if dev not in ("cuda", "cpu"):
        return False, f"flex attention runs on CUDA and CPU here (tensors on {dev})"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False, f"flex attention needs float16/bfloat16/float32, got {dtype}"
    if dev == "cpu" and p.needs_grad:
        return False, "FlexAttention has no backward on CPU in torch (use sdpa_math / sdpa_flash for training on CPU)"
    if dev == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return False, "flex attention on CUDA needs Triton, which is not available"
        if p.q.shape[-1] < 16:
            return False, f"flex attention kernels need head_dim >= 16, got {p.q.shape[-1]}"
        if max(p.q.shape[-1], p.v.shape[-1]) > FLEX_MAX_HEAD_DIM:
            # Measured on the H100 (torch 2.11): the VAR tokenizer's mid-block attention (one head of 640) in bf16
            # fails to compile ("out of resource: Required 524288, Hardware limit 232448" bytes of shared memory).
            return False, (f"flex attention's Triton kernels need head_dim <= {FLEX_MAX_HEAD_DIM} (shared memory), "
                           f"got {max(p.q.shape[-1], p.v.shape[-1])}")
    if not _flex_compiled_here(p.q.device):
        return True, "flex attention, eager (unfused) on CPU"
    seen = _FLEX_SHAPES.get(_flex_kind(p), set())
    if len(seen) >= FLEX_MAX_SHAPES and _flex_signature(p) not in seen:
        return False, (f"flex has compiled {len(seen)} shapes for {_flex_kind(p)} masks (FLEX_MAX_SHAPES); "
                       "a new one would run unfused")
    return True, "flex attention, compiled"


# ----------------------------------------------------------------------------------------------------------
# xformers
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _xformers_loads(device: str) -> tuple[bool, str]:
    """Import xformers lazily and run one tiny call on ``device``.

    An import that succeeds proves little: xformers wheels carry kernels for one torch version, and under
    another torch they fail only when called. So we call it once per device and keep the exception text.
    """
    try:
        import xformers.ops as xops
    except ImportError as e:
        return False, f"xformers is not installed ({_error_text(e)})"
    except Exception as e:  # a broken install can raise anything at import
        return False, f"xformers failed to import: {_error_text(e)}"
    try:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        x = torch.randn(1, 8, 1, 64, device=device, dtype=dtype)
        out = xops.memory_efficient_attention(x, x, x)
        if not torch.isfinite(out).all():
            return False, f"xformers returned non-finite values on {device}"
    except Exception as e:
        return False, f"xformers kernels do not run on {device}: {_error_text(e)}"
    return True, "xformers kernels run"


def _xformers_bias(p: Problem):
    from xformers.ops import fmha

    if p.form == "none":
        return None
    if p.form == "causal":
        return fmha.attn_bias.LowerTriangularMask()
    if p.form == "causal_bottom_right":
        return fmha.attn_bias.LowerTriangularFromBottomRightMask()
    # Arbitrary mask: an additive bias. xformers wants its last dim stored with a multiple-of-8 stride.
    B, H, Nq, _ = p.q.shape
    Nk = p.k.shape[2]
    allowed = p.dense_mask().expand(B, H, Nq, Nk)
    storage = torch.zeros(B, H, Nq, (Nk + 7) // 8 * 8, device=p.q.device, dtype=p.q.dtype)
    bias = storage[..., :Nk]
    bias.masked_fill_(~allowed, float("-inf"))
    return bias


def xformers(p: Problem) -> Tensor:
    import xformers.ops as xops

    k, v = _repeat_kv(p)  # plain 4-D layout; xformers' 5-D GQA layout is not worth a separate path here
    out = xops.memory_efficient_attention(
        p.q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=_xformers_bias(p), scale=p.scale
    )
    return out.transpose(1, 2)


def xformers_supports(p: Problem) -> tuple[bool, str]:
    ok, reason = _xformers_loads(str(p.q.device))
    if not ok:
        return False, reason
    return _probe("xformers", p, xformers)


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------

BACKENDS: dict[str, Backend] = {
    "sdpa_cudnn": _sdpa_backend("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
    "sdpa_flash": _sdpa_backend("sdpa_flash", SDPBackend.FLASH_ATTENTION),
    "sdpa_efficient": _sdpa_backend("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
    "sdpa_math": _sdpa_backend("sdpa_math", SDPBackend.MATH),
    "flex": Backend(flex, flex_supports),
    "xformers": Backend(xformers, xformers_supports),
    "reference": Backend(reference, reference_supports),
}

# What torch.compile can trace (see dispatch._decide_traced): the SDPA kernels through `sdpa_kernel`, and the
# float64 reference (plain tensor ops). Flex and xformers are left to eager calls.
_SDPA_KERNELS = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}
TRACEABLE: dict[str, Callable[[Problem], Tensor]] = {
    **{name: functools.partial(_sdpa_traced, kernel=kernel) for name, kernel in _SDPA_KERNELS.items()},
    "reference": reference,
}


def static_supports(name: str, p: Problem) -> tuple[bool, str]:
    """The rules a backend can be judged by without running it (no probe)."""
    if name not in TRACEABLE:
        return False, f"{name} is not traceable by torch.compile; traceable: {sorted(TRACEABLE)}"
    if name == "reference":
        return True, ""
    ok, reason = _sdpa_static(name, p)
    if ok and name == "sdpa_flash" and p.q.device.type == "cuda":
        if p.v.shape[-1] != p.q.shape[-1]:
            return False, "CUDA flash attention needs the same head_dim for q, k and v"
        if p.form == "causal_bottom_right":  # eager calls reach flash's bottom-right kernel; a graph cannot
            return False, "traced calls give flash no bottom-right causal mask"
    return ok, reason
