"""FP8 linear layers for sampling: e4m3 weights and activations with per-row scales, products on FP8 tensor cores.

`quantize_linears(model)` swaps the transformer blocks' `nn.Linear`s (q/k/v, output projections, MLP — where the
FLOPs are) for `FP8Linear`, by name, in place; embedders, modulation and the final layer stay in the model's
dtype. It is a sampling-time method: weights are quantised once, activations per call.

    y = (x_q · s_x) (W_q · s_w)^T + b,    x_q = round_e4m3(x / s_x),  s_x = amax_row(x) / 448   (one scale per token)
                                          W_q = round_e4m3(W / s_w),  s_w = amax_row(W) / 448   (one per output channel)

On a GPU with FP8 tensor cores (compute capability ≥ 8.9) the product is `torch._scaled_mm` (fp32 accumulation,
output in the activation dtype, bias fused); elsewhere the same quantised operands are dequantised and multiplied
in float32 — bit-for-bit the quantisation error, not its speed — which is what the CPU tests check.

Why by hand: torchao's float8 recipes target training (dynamic scaling of both operands and the gradients) and are
not a dependency here; `torch._scaled_mm` is the kernel they call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
# Linears inside the blocks of DiT / PixArtDiT / LatteDiT, by the last part of their name.
BLOCK_LINEARS = ("qkv", "proj", "fc1", "fc2", "q", "kv")


def fp8_supported(device: torch.device | str) -> bool:
    """FP8 tensor cores: NVIDIA compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(…, K) -> e4m3 values and float32 scales (…, 1), one scale per row (amax / 448; all-zero rows get 1)."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


class FP8Linear(nn.Module):
    """A frozen linear layer with e4m3 weights (per output channel scales) and per-token e4m3 activations."""

    def __init__(self, weight_q: Tensor, weight_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype):
        super().__init__()
        out_features, in_features = weight_q.shape
        if in_features % 16 or out_features % 16:
            # _scaled_mm's layout rule; the emulation would run, but a model should not silently differ by device
            raise ValueError(f"FP8Linear needs in and out features divisible by 16, got {in_features}, {out_features}")
        self.in_features, self.out_features, self.out_dtype = in_features, out_features, out_dtype
        self.register_buffer("weight_q", weight_q)  # (N, K) e4m3, row-major: its .t() is the column-major B
        self.register_buffer("weight_scale", weight_scale)  # (N, 1) float32
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        w = linear.weight.detach()
        q, scale = quantize_rows(w)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        dtype = w.dtype if w.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
        return cls(q, scale, bias, dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, xs = quantize_rows(x2)  # (M, K), (M, 1)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else self.out_dtype
        if x.is_cuda and fp8_supported(x.device) and out_dtype in (torch.bfloat16, torch.float16):
            y = torch._scaled_mm(xq, self.weight_q.t(), scale_a=xs, scale_b=self.weight_scale.t(), out_dtype=out_dtype)
            if self.bias is not None:  # (row-wise scaling does not take a bias in every torch version)
                y = y + self.bias.to(out_dtype)
        else:  # emulation: the same quantised operands, dequantised, product in float32
            y = (xq.float() * xs) @ (self.weight_q.float() * self.weight_scale).t()
            if self.bias is not None:
                y = y + self.bias.float()
            y = y.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3, per-row scales"


def quantize_linears(model: nn.Module, names: tuple[str, ...] = BLOCK_LINEARS, blocks_only: bool = True) -> list[str]:
    """Replace, in place, every `nn.Linear` whose own name is in `names` (and, with `blocks_only`, that sits inside
    a `blocks` / `spatial_blocks` / `temporal_blocks` list) by an `FP8Linear`; returns the replaced paths."""
    replaced = []
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{path}.{child_name}" if path else child_name
            if not isinstance(child, nn.Linear) or child_name not in names:
                continue
            if blocks_only and not any(part.endswith("blocks") for part in full.split(".")):
                continue
            setattr(module, child_name, FP8Linear.from_linear(child))
            replaced.append(full)
    if not replaced:
        raise ValueError(f"no linear layer named {', '.join(names)} found in {type(model).__name__}'s blocks")
    return replaced
