"""FP8 linear layers for sampling: e4m3 weights and activations with per-row scales, products on FP8 tensor cores.

`quantize_linears(model)` swaps the transformer blocks' `nn.Linear`s (q/k/v, output projections, MLP — where the
FLOPs are) for `FP8Linear`, by name, in place; embedders, modulation and the final layer stay in the model's
dtype. It is a sampling-time method: weights are quantised once, activations per call.

    y = (x_q · s_x) (W_q · s_w)^T + b,    x_q = round_e4m3(x / s_x),  s_x = amax_row(x) / 448   (one scale per token)
                                          W_q = round_e4m3(W / s_w),  s_w = amax_row(W) / 448   (one per output channel)

On a GPU with FP8 tensor cores (compute capability ≥ 8.9) the product is `torch._scaled_mm` (fp32 accumulation,
output in the activation dtype, bias fused); elsewhere the same quantised operands are dequantised and multiplied
in float32 — bit-for-bit the quantisation error, not its speed — which is what the CPU tests check.

Why by hand: torchao has the same recipe for inference (dynamic per-row float8 activations and weights), but it
is not a dependency here and not on the GPU machine, whose torch it would have to match. Its product is this one,
`torch._scaled_mm`. What is ours is the row-quantisation kernel below, which quantises proj's and fc2's inputs in
one read, GELU included, and the MLP hand-over that lets fc2 take the GELU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Row kernels share their launch (rows per program and warps autotuned per width; the interpreter's fixed choice)
# with the kept-token kernels, which hold rows the same way.
from .kept_tokens import row_autotune, row_grid, row_launch, triton

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
# Linears inside the blocks of DiT / PixArtDiT / LatteDiT, by the last part of their name.
BLOCK_LINEARS = ("qkv", "proj", "fc1", "fc2", "q", "kv")
# Linears whose input comes from a kernel inductor cannot fuse the quantisation into (cuDNN attention, the FP8 fc1):
# their input is quantised by `fp8_quantize_rows` (fc2's with the MLP's GELU applied on the way).
OWN_QUANTISATION = ("proj", "fc2")
MAX_KERNEL_WIDTH = 16384  # a row is held in registers


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


_BIAS_IN_KERNEL: dict = {}  # (device type, index) -> whether _scaled_mm takes a bias with per-row scales there


def bias_in_kernel(device: torch.device) -> bool:
    """Whether this torch's `_scaled_mm` adds a bf16 bias inside the product with per-row scales on `device` (probed
    once per device with a 16×16 product). Where it does, the bias costs nothing; where not, a separate add reads
    and writes the whole output again (for qkv at DiT-XL/2 batch 32: 113 MB each way, per block)."""
    key = (device.type, device.index)
    if key not in _BIAS_IN_KERNEL:
        a = torch.ones(16, 16, device=device).to(E4M3)
        ones = torch.ones(16, 1, device=device)
        bias = torch.full((16,), 0.5, device=device, dtype=torch.bfloat16)
        try:
            y = torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t(), bias=bias, out_dtype=torch.bfloat16)
            _BIAS_IN_KERNEL[key] = bool((y.float() == 16.5).all())
        except (RuntimeError, NotImplementedError):
            _BIAS_IN_KERNEL[key] = False
    return _BIAS_IN_KERNEL[key]


# ----------------------------------------------------------------------------------------------- row quantisation
# The inputs of `proj` (the attention's output) and `fc2` (GELU of fc1's output) come from kernels inductor cannot
# fuse into (cuDNN attention, the FP8 product), so their quantisation is a pass of its own. Inductor's version of it
# (amax over the row, then the scaled cast) reads each row twice and ran at ~1 TB/s on the H100: GELU + quantise of
# fc1's output took 9.0 of a 30.4 ms DiT-XL/2 forward (bench/results/gpu_round18/call1). This kernel holds whole
# rows in registers, so it reads them once: GELU (optional, tanh form, in float32), row amax, scale, e4m3 cast.
# Why by hand: no library op quantises rows with a fused GELU in one read; `torch.library.custom_op` keeps it one
# call inside compiled graphs and CUDA graphs (as dit/epilogue.py and dit/kept_tokens.py).
if triton is not None:
    import triton.language as tl

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, rows, width, GELU: tl.constexpr, BLOCK: tl.constexpr,
                              ROWS: tl.constexpr):
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        ok = row < rows
        mask = ok[:, None] & (cols < width)[None, :]
        offs = row.to(tl.int64)[:, None] * width + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GELU:  # 0.5 x (1 + tanh(u)), tanh(u) = 1 - 2 / (exp(2u) + 1)  (saturates correctly at both ends)
            u = tl.minimum(0.7978845608028654 * (x + 0.044715 * x * x * x), 20.0)  # tanh(20) is 1 in float32
            x = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.where(amax > 0, amax / 448.0, 1.0)
        q = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
        tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row, scale, mask=ok)

    _quantize_rows_kernel = row_autotune(_quantize_rows_kernel, key=("width", "GELU"))


def launch_quantize_rows(x: Tensor, gelu: bool, out_dtype: torch.dtype = E4M3) -> tuple[Tensor, Tensor]:
    """Run the kernel on a contiguous (M, K) tensor; `out_dtype` float32 returns the scaled values before the cast
    (the CPU interpreter's e4m3 cast is not exact, so its tests check those)."""
    rows, width = x.shape
    q = torch.empty(rows, width, dtype=out_dtype, device=x.device)
    s = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    _quantize_rows_kernel[row_grid(rows)](x, q, s, rows, width, GELU=gelu, **row_launch(width))
    return q, s


@torch.library.custom_op("ditstudio::fp8_quantize_rows", mutates_args=())
def fp8_quantize_rows(x: Tensor, gelu: bool) -> tuple[Tensor, Tensor]:
    """quantize_rows(gelu_tanh(x) if gelu else x) for a contiguous (M, K) tensor: the kernel on CUDA, torch elsewhere."""
    if x.is_cuda and triton is not None and x.shape[-1] <= MAX_KERNEL_WIDTH:
        return launch_quantize_rows(x.contiguous(), gelu)  # (a no-op for the layers' inputs, already contiguous)
    return quantize_rows(torch.nn.functional.gelu(x.float(), approximate="tanh") if gelu else x)


@fp8_quantize_rows.register_fake
def _(x: Tensor, gelu: bool) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=E4M3), x.new_empty(x.shape[0], 1, dtype=torch.float32)


class FP8Linear(nn.Module):
    """A frozen linear layer with e4m3 weights (per output channel scales) and per-token e4m3 activations.

    `fast_accum`: Hopper's FP8 tensor cores accumulate in reduced precision unless the kernel promotes the partial
    sums to fp32 at intervals; `use_fast_accum=True` skips that promotion (faster, less exact). Off by default; the
    benchmark measures both."""

    def __init__(self, weight_q: Tensor, weight_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype,
                 fast_accum: bool = False):
        super().__init__()
        out_features, in_features = weight_q.shape
        if in_features % 16 or out_features % 16:
            # _scaled_mm's layout rule; the emulation would run, but a model should not silently differ by device
            raise ValueError(f"FP8Linear needs in and out features divisible by 16, got {in_features}, {out_features}")
        self.in_features, self.out_features, self.out_dtype = in_features, out_features, out_dtype
        self.fast_accum = fast_accum
        self.register_buffer("weight_q", weight_q)  # (N, K) e4m3, row-major: its .t() is the column-major B
        self.register_buffer("weight_scale", weight_scale.reshape(1, out_features).contiguous())  # (1, N) float32
        self.register_buffer("bias", bias)
        # Whether the GPU product takes the bias (set by `prepare_kernel` once the layer sits on its GPU; a plain
        # attribute, so that torch.compile reads it as a constant).
        self.kernel_bias = False
        # Set by `quantize_linears`: quantise the input with `fp8_quantize_rows` on CUDA (own_quantisation), and apply
        # the MLP's tanh GELU to it first (takes_gelu: the MLP then hands fc2 fc1's output as it is, dit.dit.MLP).
        self.own_quantisation = False
        self.takes_gelu = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, fast_accum: bool = False) -> "FP8Linear":
        w = linear.weight.detach()
        q, scale = quantize_rows(w)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        dtype = w.dtype if w.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
        layer = cls(q, scale, bias, dtype, fast_accum)
        layer.prepare_kernel()
        return layer

    def prepare_kernel(self) -> None:
        """Decide, on the layer's current device, whether the product adds the bias (call again after moving it)."""
        device = self.weight_q.device
        self.kernel_bias = (self.bias is not None and fp8_supported(device) and bias_in_kernel(device))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.own_quantisation and x.is_cuda:
            xq, xs = fp8_quantize_rows(x2, self.takes_gelu)
        else:  # (M, K), (M, 1); under torch.compile this fuses into the producer's kernel (a LayerNorm's, say)
            xq, xs = quantize_rows(F.gelu(x2, approximate="tanh") if self.takes_gelu else x2)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else self.out_dtype
        if x.is_cuda and fp8_supported(x.device) and out_dtype in (torch.bfloat16, torch.float16):
            y = self.product(xq, xs, out_dtype)
        else:  # emulation: the same quantised operands, dequantised, product in float32
            y = (xq.float() * xs) @ (self.weight_q.float() * self.weight_scale.t()).t()
            if self.bias is not None:
                y = y + self.bias.float()
            y = y.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def product(self, xq: Tensor, xs: Tensor, out_dtype: torch.dtype) -> Tensor:
        """The FP8 tensor-core product of quantised rows `xq` (M, K) with scales `xs` (M, 1), bias added."""
        bias = self.bias.to(out_dtype) if self.kernel_bias and out_dtype == torch.bfloat16 else None
        y = torch._scaled_mm(xq, self.weight_q.t(), scale_a=xs, scale_b=self.weight_scale, bias=bias,
                             out_dtype=out_dtype, use_fast_accum=self.fast_accum)
        if self.bias is not None and bias is None:
            y = y + self.bias.to(out_dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, e4m3, per-row scales"
                + (", fast accumulation" if self.fast_accum else ""))


def quantize_linears(model: nn.Module, names: tuple[str, ...] = BLOCK_LINEARS, blocks_only: bool = True,
                     fast_accum: bool = False) -> list[str]:
    """Replace, in place, every `nn.Linear` whose own name is in `names` (and, with `blocks_only`, that sits inside
    a `blocks` / `spatial_blocks` / `temporal_blocks` list) by an `FP8Linear`; returns the replaced paths."""
    if is_quantized(model):
        raise ValueError(f"{type(model).__name__} already has FP8 linears (restore_linears first)")
    replaced, originals = [], []
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{path}.{child_name}" if path else child_name
            if not isinstance(child, nn.Linear) or child_name not in names:
                continue
            if blocks_only and not any(part.endswith("blocks") for part in full.split(".")):
                continue
            layer = FP8Linear.from_linear(child, fast_accum)
            layer.own_quantisation = child_name in OWN_QUANTISATION
            # An MLP (fc1, GELU, fc2) lets fc2 apply the GELU while quantising its input: one read of fc1's output.
            layer.takes_gelu = child_name == "fc2" and type(module).__name__ == "MLP"
            setattr(module, child_name, layer)
            originals.append((module, child_name, child))
            replaced.append(full)
    if not replaced:
        raise ValueError(f"no linear layer named {', '.join(names)} found in {type(model).__name__}'s blocks")
    # The float layers, kept (outside the module tree, so they are neither parameters nor saved) for restore_linears:
    # a pipeline cached by the app serves the next request in float again.
    model.__dict__["_fp8_originals"] = originals
    return replaced


def is_quantized(model: nn.Module) -> bool:
    return bool(model.__dict__.get("_fp8_originals"))


def restore_linears(model: nn.Module) -> int:
    """Undo `quantize_linears`: the original float layers back in place; returns how many."""
    originals = model.__dict__.pop("_fp8_originals", [])
    for module, name, linear in originals:
        setattr(module, name, linear)
    return len(originals)
