"""DyDiT's kept-token MLP on the GPU: Triton kernels around the MLP's products (inference, sliced path).

The sliced path gathers the tokens a block's token router keeps into `capacity` rows, runs the narrow MLP on them and
writes them back (`dit.dydit.sliced_token_mlp`). In plain torch, compiled by inductor, that cost (H100, DyDiT-XL/2,
batch 32, 50 steps; docs/dydit.md, twelfth session): a gather + LayerNorm + modulation kernel of 125 ms at 0.7-0.9
TB/s, and 201 ms of index and scatter work, part of it a full copy of the residual stream per block (the capacity
scatter writes its spare rows into a scratch row appended to a copy of x, so that no two rows collide). Together
about a quarter of the run, where the products take half.

Here, one pass each, over the kept rows only where they are the point:
- `kept_rows`: the kept rows' indices (torch.nonzero_static's result) and their count, in one launch where
  nonzero_static takes several (cub's select and memsets).
- `gather_norm_modulate`: row i of the output is LayerNorm(x[idx[i]]) * (1 + scale[s]) + shift[s], s = idx[i] // N
  (the token's sequence), computed in float32 and rounded once; rows past the kept count are zeros.
- `scatter_gated_residual_`: x[idx[i]] += gate[s] * update[i] for the kept rows only, in place: the spare rows are
  masked out, so no scratch row and no copy of x are needed.
- `norm_modulate`: the attention half's LayerNorm + modulation of the whole stream (the gather kernel without the
  gather).
Measured (sixteenth session, docs/dydit.md): 1.09-1.27x faster sampling than the plain-torch path in the same run.

Why by hand: no library op gathers rows, normalises and modulates them in one pass, and torch's scatter needs either
atomics (index_add: 17% of a compiled run) or a padded copy (index_copy). All are opaque custom ops with fake
implementations (`torch.library.custom_op`, as dit/epilogue.py's fused product): torch.compile keeps each as one call
in its graph (there is nothing left around them to fuse), and CUDA graphs capture them. On the CPU the Triton
interpreter runs them (TRITON_INTERPRET=1, tests/test_kept_tokens.py); the model's CPU path stays plain torch.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # triton ships with torch's Linux wheels; elsewhere the sliced path keeps its plain-torch gather and scatter
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

# "auto": the kernels on CUDA (half or float32, rows up to MAX_WIDTH wide); "mlp": only the MLP's gather and scatter
# (the attention half's LayerNorm left to inductor); "off": never (plain torch everywhere; with "mlp", to compare the
# paths on the GPU in one run: bench/dydit_speed.py's -plain and -mlp variants); "on": on every device, the CPU
# included, which needs the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported: the tests' way of
# running the kernels here).
MODE = os.environ.get("DITSTUDIO_KEPT_TOKEN_KERNELS", "auto")
# Read once, as triton.jit does when it wraps the kernels below: the interpreter is chosen at import, not per launch.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MODES = ("auto", "mlp", "off", "on")
MAX_WIDTH = 8192



def kernels_apply(x: Tensor, part: str = "mlp") -> bool:
    """Whether the sliced path should use these kernels for x (S, n, D): part "mlp" (gather and scatter) or "norm"
    (the attention half's LayerNorm + modulation)."""
    if MODE not in MODES:
        raise ValueError(f"DITSTUDIO_KEPT_TOKEN_KERNELS={MODE!r}: expected one of {', '.join(MODES)}")
    if MODE == "off" or (MODE == "mlp" and part != "mlp") or (MODE != "on" and not x.is_cuda):
        return False
    return triton is not None and x.shape[-1] <= MAX_WIDTH and x.dtype in (torch.bfloat16, torch.float16,
                                                                           torch.float32)


def row_autotune(kernel, key: tuple[str, ...] = ("width",), restore: tuple[str, ...] = ()):
    """For any row-per-program kernel with a ROWS meta-parameter (these, and dit/fp8.py's row quantisation), with
    `row_grid` and `row_launch`. Triton's autotuner over rows per program and warps, keyed on the row width (and the kernel's mode): it times
    each choice on the device at the first launch (before any CUDA graph capture: the step graphs warm every step up
    first). An in-place kernel restores its output between trials. The interpreter runs the plain kernel (two rows per program, so that the
    tests cover a last program with a row past the end).

    Several rows per program (sixteenth session: one row each ran at 1.2-2.2 TB/s on the H100, against about 3 TB/s
    a plain copy reaches): a program's loads of a 1152-wide bf16 row are 2.3 KB, too little in flight to hide the
    index load before them and the memory latency of the row itself."""
    if INTERPRETED:
        return kernel
    configs = [triton.Config({"ROWS": r}, num_warps=w) for r in (1, 2, 4, 8) for w in (2, 4, 8, 16)]
    return triton.autotune(configs, key=list(key), restore_value=list(restore))(kernel)


if triton is not None:
    @triton.jit
    def _kept_rows_kernel(keep_ptr, idx_ptr, count_ptr, rows, capacity, fill, BLOCK: tl.constexpr):
        # One program walks the keep mask in blocks, carrying the running count: the kept rows' indices in order,
        # then `fill` up to the capacity (torch.nonzero_static's result, in one launch instead of cub's several).
        offset = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
        for start in range(0, rows, BLOCK):
            r = start + tl.arange(0, BLOCK)
            keep = tl.load(keep_ptr + r, mask=r < rows, other=0).to(tl.int32)
            pos = offset + tl.cumsum(keep, axis=0) - 1
            tl.store(idx_ptr + pos, r.to(tl.int64), mask=(keep > 0) & (pos < capacity))
            offset += tl.sum(keep, axis=0)
        tl.store(count_ptr, offset.to(tl.int64))
        for start in range(0, capacity, BLOCK):
            c = start + tl.arange(0, BLOCK)
            tl.store(idx_ptr + c, tl.full([BLOCK], fill, tl.int64), mask=(c < capacity) & (c >= offset))

    # A row is one power-of-two block, its columns past the width masked. (Seventeenth session: a row read as a
    # power-of-two head + rest, 1152 = 1024 + 128 with no masked column, was faster alone but slower inside the
    # sampling run on the H100 -- gather + norm 154 against 95 ms, scatter 56 against 42 ms at batch 32 -- so it was
    # dropped; docs/dydit.md.)
    @triton.jit
    def _gather_norm_modulate_kernel(x_ptr, idx_ptr, count_ptr, shift_ptr, scale_ptr, mod_stride, out_ptr, n_out,
                                     tokens_per_seq, width, eps, BLOCK: tl.constexpr, GATHER: tl.constexpr,
                                     ROWS: tl.constexpr):
        # A (ROWS, BLOCK) tile: ROWS output rows of one row each.
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        in_row = cols < width
        out_ok = row < n_out
        if GATHER:  # row i reads kept row idx[i]; rows past the count are zeros
            valid = out_ok & (row < tl.load(count_ptr))
            src = tl.load(idx_ptr + row, mask=out_ok, other=0).to(tl.int64)
        else:  # every row in place (the attention half's norm)
            valid = out_ok
            src = row.to(tl.int64)
        mask = valid[:, None] & in_row[None, :]
        x = tl.load(x_ptr + src[:, None] * width + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / width
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / width + eps)
        mod = (src // tokens_per_seq)[:, None] * mod_stride + cols[None, :]
        scale = tl.load(scale_ptr + mod, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + mod, mask=mask, other=0.0).to(tl.float32)
        y = tl.where(mask, centred * rstd[:, None] * (1.0 + scale) + shift, 0.0)
        tl.store(out_ptr + row.to(tl.int64)[:, None] * width + cols[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=out_ok[:, None] & in_row[None, :])

    @triton.jit
    def _scatter_gated_residual_kernel(x_ptr, idx_ptr, count_ptr, update_ptr, gate_ptr, mod_stride, n_rows,
                                       tokens_per_seq, width, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        valid = (row < n_rows) & (row < tl.load(count_ptr))
        cols = tl.arange(0, BLOCK)
        mask = valid[:, None] & (cols < width)[None, :]
        dst = tl.load(idx_ptr + row, mask=valid, other=0).to(tl.int64)
        gate = tl.load(gate_ptr + (dst // tokens_per_seq)[:, None] * mod_stride + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
        update = tl.load(update_ptr + row.to(tl.int64)[:, None] * width + cols[None, :], mask=mask,
                         other=0.0).to(tl.float32)
        x = tl.load(x_ptr + dst[:, None] * width + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + dst[:, None] * width + cols[None, :], (x + gate * update).to(x_ptr.dtype.element_ty),
                 mask=mask)

    _gather_norm_modulate_kernel = row_autotune(_gather_norm_modulate_kernel, key=("width", "GATHER"))
    _scatter_gated_residual_kernel = row_autotune(_scatter_gated_residual_kernel, restore=("x_ptr",))


def row_grid(n_rows: int):
    return lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),)


def row_launch(width: int) -> dict:
    block = triton.next_power_of_2(width)
    if INTERPRETED:
        return {"BLOCK": block, "ROWS": 2, "num_warps": 4}
    return {"BLOCK": block}  # rows per program and warps are the autotuner's


@torch.library.custom_op("ditstudio::kept_rows", mutates_args=())
def kept_rows(keep: Tensor, capacity: int, fill: int) -> tuple[Tensor, Tensor]:
    """(idx (capacity,), count ()): torch.nonzero_static(keep, size=capacity, fill_value=fill) and keep.sum() for a
    1-d bool mask, in one launch (kept rows past the capacity are counted, not listed)."""
    if keep.ndim != 1 or keep.dtype != torch.bool:
        raise ValueError(f"kept_rows: keep must be a 1-d bool mask, got {keep.dtype} {tuple(keep.shape)}")
    idx = torch.empty(capacity, dtype=torch.long, device=keep.device)
    count = torch.empty((), dtype=torch.long, device=keep.device)
    # One block of up to 16384 rows (DiT-XL/2 at batch 32 guided: the whole mask in one pass, no carried count).
    block = min(triton.next_power_of_2(max(keep.shape[0], 16)), 16384)
    _kept_rows_kernel[(1,)](keep, idx, count, keep.shape[0], capacity, fill, BLOCK=block,
                            num_warps=16 if block >= 8192 else 8)
    return idx, count


@kept_rows.register_fake
def _(keep: Tensor, capacity: int, fill: int) -> tuple[Tensor, Tensor]:
    return keep.new_empty(capacity, dtype=torch.long), keep.new_empty((), dtype=torch.long)


def _check(x: Tensor, idx: Tensor | None, count: Tensor | None, *mods: Tensor) -> None:
    if x.ndim != 2 or not x.is_contiguous():
        raise ValueError(f"kept-token kernels: x must be a contiguous (rows, width) tensor, got {tuple(x.shape)}")
    if idx is not None and (idx.ndim != 1 or count.numel() != 1):
        raise ValueError("kept-token kernels: idx must be 1-d and count one element")
    for m in mods:
        if m.ndim != 2 or m.shape[1] != x.shape[1] or m.stride(1) != 1:
            raise ValueError(f"kept-token kernels: a modulation must be (sequences, {x.shape[1]}) with unit column "
                             f"stride, got {tuple(m.shape)} strides {m.stride()}")


@torch.library.custom_op("ditstudio::gather_norm_modulate", mutates_args=())
def gather_norm_modulate(x: Tensor, idx: Tensor, count: Tensor, shift: Tensor, scale: Tensor, tokens_per_seq: int,
                         eps: float) -> Tensor:
    """(capacity, D): LayerNorm(x[idx[i]]) * (1 + scale[idx[i] // tokens_per_seq]) + shift[...] for i < count, zeros
    after. x (rows, D) contiguous; idx (capacity,) row indices (entries past count are not read); count a 1-element
    tensor (count > capacity: every row is kept); shift / scale (sequences, D) with unit column stride (views of the
    adaLN output's chunks are fine)."""
    _check(x, idx, count, shift, scale)
    out = x.new_empty(idx.shape[0], x.shape[1])
    _gather_norm_modulate_kernel[row_grid(idx.shape[0])](
        x, idx, count, shift, scale, shift.stride(0), out, idx.shape[0], tokens_per_seq, x.shape[1], eps, GATHER=True,
        **row_launch(x.shape[1]))
    return out


@gather_norm_modulate.register_fake
def _(x: Tensor, idx: Tensor, count: Tensor, shift: Tensor, scale: Tensor, tokens_per_seq: int, eps: float) -> Tensor:
    return x.new_empty(idx.shape[0], x.shape[1])


@torch.library.custom_op("ditstudio::norm_modulate", mutates_args=())
def norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, tokens_per_seq: int, eps: float) -> Tensor:
    """(rows, D): LayerNorm(x[r]) * (1 + scale[r // tokens_per_seq]) + shift[...] for every row: the same kernel
    without the gather (the attention half's norm of the whole stream)."""
    _check(x, None, None, shift, scale)
    out = torch.empty_like(x)
    _gather_norm_modulate_kernel[row_grid(x.shape[0])](
        x, x, x, shift, scale, shift.stride(0), out, x.shape[0], tokens_per_seq, x.shape[1], eps, GATHER=False,
        **row_launch(x.shape[1]))
    return out


@norm_modulate.register_fake
def _(x: Tensor, shift: Tensor, scale: Tensor, tokens_per_seq: int, eps: float) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("ditstudio::scatter_gated_residual_", mutates_args={"x"})
def scatter_gated_residual_(x: Tensor, idx: Tensor, count: Tensor, update: Tensor, gate: Tensor,
                            tokens_per_seq: int) -> None:
    """x[idx[i]] += gate[idx[i] // tokens_per_seq] * update[i] for i < count, in place (rows past count untouched).
    The indices below count must be distinct (they are: `torch.nonzero_static` of the keep mask)."""
    _check(x, idx, count, gate)
    if update.shape != (idx.shape[0], x.shape[1]) or not update.is_contiguous():
        raise ValueError(f"kept-token kernels: update must be contiguous ({idx.shape[0]}, {x.shape[1]}), "
                         f"got {tuple(update.shape)}")
    _scatter_gated_residual_kernel[row_grid(idx.shape[0])](
        x, idx, count, update, gate, gate.stride(0), idx.shape[0], tokens_per_seq, x.shape[1], **row_launch(x.shape[1]))


@scatter_gated_residual_.register_fake
def _(x: Tensor, idx: Tensor, count: Tensor, update: Tensor, gate: Tensor, tokens_per_seq: int) -> None:
    return None


def tuned_configs() -> dict:
    """The autotuner's choice per kernel and key (rows per program, warps), for the benchmark's record."""
    if triton is None or INTERPRETED:
        return {}
    return {name: {str(key): str(cfg) for key, cfg in kernel.cache.items()}
            for name, kernel in (("gather_norm_modulate", _gather_norm_modulate_kernel),
                                 ("scatter_gated_residual", _scatter_gated_residual_kernel))}
