"""fc1 + bias + tanh-GELU as one cuBLASLt call on the GPU (inference).

Measured on the H100 (DiT-XL/2, batch 32 guided, torch.compile default; bench/results/sample_dit_round8b.json): the
compiled forward spends 21.5 ms in cuBLAS products and 3.0 ms in one Triton kernel that applies GELU to fc1's output
— it reads and writes the 4x-wide hidden activations once more (~300 MB per block). cuBLASLt can apply bias + GELU
in the product's epilogue (CUBLASLT_EPILOGUE_GELU_BIAS, which is the tanh approximation, as DiT and PixArt use);
torch reaches it through `torch._addmm_activation(..., use_gelu=True)`. Inductor decomposes that op back into
mm + pointwise, so it is wrapped in a custom op that inductor keeps opaque (no library offers this fusion as a
compile-proof call; hence the few lines by hand).

Used by `dit.dit.MLP` only where it is exact and cheap to be right: CUDA, bf16/fp16, no autograd (training keeps
the plain ops, which have gradients), plain `nn.Linear` layers (FP8 or LoRA-wrapped layers keep their own path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.library.custom_op("ditstudio::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """gelu_tanh(x @ weight.T + bias) for x (..., K), weight (N, K), bias (N,)."""
    if x.is_cuda:
        out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    # (On the CPU `_addmm_activation` applies the erf GELU, not tanh: the plain ops give the model's function.)
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


@linear_gelu_tanh.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def can_fuse(x: Tensor, fc: torch.nn.Module) -> bool:
    return type(fc) is torch.nn.Linear and can_fuse_weights(x, fc.weight, fc.bias)


def can_fuse_weights(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """The same test for a product given by its tensors (DyDiT's sliced fc1 rows, dit/dydit.py)."""
    # Same dtype for input and weights too: under autocast (fp32 weights, half activations) the custom op would see
    # mixed dtypes, which cuBLASLt does not take; autocast's own linear then does the work.
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled()
            and bias is not None and weight.dtype == x.dtype)


# FlopCounterMode (the benchmarks' MFU) cannot see inside a custom op: count its product like the addmm it is.
from torch.utils.flop_counter import register_flop_formula  # noqa: E402


@register_flop_formula(torch.ops.ditstudio.linear_gelu_tanh)
def _linear_gelu_flops(x_shape, w_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    rows = 1
    for s in x_shape[:-1]:
        rows *= s
    return 2 * rows * x_shape[-1] * w_shape[0]
