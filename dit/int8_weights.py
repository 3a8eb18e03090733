"""Int8 storage of a model's weights: the matrices of its linear layers as int8 with one fp16 scale per output row,
everything else in fp16, in one safetensors file beside the usual config.json.

Why: the shipped VAR models share an 8 MB budget (tokenizer and both transformers, docs/var.md), and fp16 left no
room for a larger class model. Stored this way a matrix takes about half the bytes of fp16, and per-row absmax
scaling of a small trained transformer moves its samples within noise (measured on shapes-var-c2i: prompt accuracy
0.927 in fp16 and 0.927 with every linear weight rounded so; docs/var.md). It is a storage format only: loading
dequantises into an ordinary float model (computation is unchanged and runs in float32 / bf16 as before).
Written by hand because neither diffusers nor safetensors has a quantised storage format for a plain ModelMixin
(diffusers' quantisation backends, bitsandbytes / torchao, quantise the computation and need their packages).

    save_int8(model, folder)            config.json + weights_int8.safetensors (any stale diffusers weights removed)
    load_int8(cls, folder, dtype=None)  the model, dequantised, in float32 (or `dtype`)

A tensor `name` quantised is stored as int8 `name` plus fp16 `name` + SCALE_SUFFIX (its rows' scales, (rows, 1));
the file's metadata says which format it is, so a file of another kind is refused with a clear error.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

INT8_WEIGHTS = "weights_int8.safetensors"
SCALE_SUFFIX = ".int8_row_scale"
FORMAT = "int8-per-row-absmax-v1"
# Matrices smaller than this stay fp16: their scales would cost more than int8 saves, and they are few.
MIN_ELEMENTS = 4096


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, cols) float -> int8 (rows, cols) and fp16 scales (rows, 1) with w ≈ q · scale (symmetric, absmax/127
    per row; a zero row keeps scale 1 and q 0). The scale is rounded to fp16 first, so q is computed against the
    scale that is stored."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / scale.float()), -127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()


def linear_weight_names(model: nn.Module) -> set[str]:
    """State-dict names of the weights of every nn.Linear that are big enough to quantise."""
    return {f"{name}.weight" if name else "weight" for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.numel() >= MIN_ELEMENTS}


@torch.no_grad()
def save_int8(model, folder: str | Path) -> dict:
    """Write `model` (a diffusers ModelMixin / ConfigMixin) as config.json + INT8_WEIGHTS; returns
    {"quantised": n tensors, "fp16": m tensors, "bytes": file size}."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    quantise = linear_weight_names(model)
    tensors: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        if name in quantise:
            tensors[name], tensors[name + SCALE_SUFFIX] = quantize_rows(t)
        elif t.is_floating_point():
            tensors[name] = t.detach().to(torch.float16).contiguous()
        else:
            tensors[name] = t.detach().contiguous()
    for stale in folder.glob("diffusion_pytorch_model*.safetensors"):
        stale.unlink()
    model.save_config(folder)
    save_file(tensors, folder / INT8_WEIGHTS, metadata={"format": "pt", "storage": FORMAT})
    return {"quantised": len(quantise), "fp16": len(tensors) - 2 * len(quantise),
            "bytes": (folder / INT8_WEIGHTS).stat().st_size}


def load_int8(cls, folder: str | Path, torch_dtype: torch.dtype | None = None):
    """The inverse of `save_int8`: `cls` built from folder/config.json, its weights dequantised from INT8_WEIGHTS.
    Every tensor the model has must be in the file with its shape; anything else is refused."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    path = folder / INT8_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    if meta.get("storage") != FORMAT:
        raise ValueError(f"{path}: storage format {meta.get('storage')!r}, expected {FORMAT!r}")
    model = cls.from_config(cls.load_config(folder))
    expected = model.state_dict()
    state, problems = {}, []
    for name, ref in expected.items():
        if name not in stored:
            problems.append(f"missing {name}")
            continue
        t = stored[name]
        if name + SCALE_SUFFIX in stored:
            t = dequantize_rows(t, stored[name + SCALE_SUFFIX])
        if t.shape != ref.shape:
            problems.append(f"{name} {tuple(t.shape)} != {tuple(ref.shape)}")
        state[name] = t.to(ref.dtype)
    extra = sorted(k for k in stored if k not in expected and not k.endswith(SCALE_SUFFIX))
    if problems or extra:
        raise ValueError(f"{path} does not fit {cls.__name__}: {problems[:5]}, unexpected {extra[:5]}")
    model.load_state_dict(state)
    return (model.to(torch_dtype) if torch_dtype is not None else model).eval()
