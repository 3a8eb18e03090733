"""The one attention entry point every model in DiT Studio calls.

`attention(q, k, v, ...)` on (batch, heads, tokens, head_dim) tensors serves dense, causal (also rectangular,
bottom-right aligned), block-causal by segments, grouped-query, key-padding and token-subset patterns, and
dispatches to torch SDPA (cuDNN / flash / memory-efficient / math), FlexAttention, xformers or a float64
reference. `backend="auto"` picks from a small measured table; `use_backend(...)` and the environment
variable DITSTUDIO_ATTENTION_BACKEND override it.
"""

from .backends import BACKENDS, Backend, clear_probe_cache
from .dispatch import (
    AUTO_TABLE,
    ENV_VAR,
    Decision,
    attention,
    auto_choices,
    available_backends,
    explain,
    use_backend,
)
from .masks import and_masks, block_causal, causal_lower_right, dense_mask, noop, or_masks, padding
from .problem import Problem, prepare

__all__ = [
    "AUTO_TABLE",
    "BACKENDS",
    "Backend",
    "Decision",
    "ENV_VAR",
    "Problem",
    "and_masks",
    "attention",
    "auto_choices",
    "available_backends",
    "block_causal",
    "causal_lower_right",
    "clear_probe_cache",
    "dense_mask",
    "explain",
    "noop",
    "or_masks",
    "padding",
    "prepare",
    "use_backend",
]
