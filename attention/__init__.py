"""The one attention entry point every model in DiT Studio calls.

`attention(q, k, v, ...)` on (batch, heads, tokens, head_dim) tensors serves dense, causal (also rectangular,
bottom-right aligned), block-causal by segments, grouped-query, key-padding and token-subset patterns, and
dispatches to torch SDPA (cuDNN / flash / memory-efficient / math), FlexAttention, xformers or a float64
reference. `backend="auto"` picks from a small measured table; `use_backend(...)` and the environment
variable DITSTUDIO_ATTENTION_BACKEND override it.
"""
