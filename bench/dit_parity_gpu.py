"""DiT-XL/2 at 256 px on the GPU: our `DiT` loaded from a diffusers `DiTTransformer2DModel` with the same random
weights gives the same output — float32 to float32 rounding, bfloat16 within bfloat16 rounding — and a first
eager forward timing of both in the same run (the speed issue does the real benchmark).

    python bench/dit_parity_gpu.py --out bench/results/dit_parity_gpu.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

from pathlib import Path

# Run as a script, bench/ would come first on sys.path and bench/attention.py would shadow the attention package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from diffusers import DiTTransformer2DModel

from dit.loaders import dit_from_diffusers

XL2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
           sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """std 1/sqrt(fan_in) weights (zero-init layers would hide mapping errors); diffusers' per-block embedder
    copies are kept identical, as a converted checkpoint has them."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm1.emb." in name and not name.startswith("transformer_blocks.0."):
                continue
            std = 1.0 if "embedding_table" in name else (0.1 if p.ndim == 1 else p[0].numel() ** -0.5)
            p.copy_(torch.randn(p.shape, generator=g, device=p.device) * std)
        emb0 = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(emb0)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def time_ms(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = DiTTransformer2DModel(**XL2).cuda().eval()
    randomize_(ref, 0)
    ours = dit_from_diffusers(ref).cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(1)
    B = 8
    x = torch.randn(B, 4, 32, 32, device="cuda", generator=g)
    t = torch.randint(0, 1000, (B,), device="cuda", generator=g)
    y = torch.randint(0, 1001, (B,), device="cuda", generator=g)
    want = ref(x, timestep=t, class_labels=y).sample
    got = ours(x, t, y)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv),
              "config": "DiT-XL/2 256px (diffusers DiTTransformer2DModel, random weights std 1/sqrt(fan_in))",
              "fp32_rel_err_ours_vs_diffusers": rel(got, want)}
    ref_bf, ours_bf = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    result["bf16_rel_err_diffusers_vs_fp32"] = rel(ref_bf(xb, timestep=t, class_labels=y).sample, want)
    result["bf16_rel_err_ours_vs_fp32"] = rel(ours_bf(xb, t, y), want)
    xs = torch.randn(args.batch, 4, 32, 32, device="cuda", dtype=torch.bfloat16)
    ts = torch.randint(0, 1000, (args.batch,), device="cuda")
    ys = torch.randint(0, 1000, (args.batch,), device="cuda")
    for name, fn in [("diffusers", lambda: ref_bf(xs, timestep=ts, class_labels=ys).sample),
                     ("ours", lambda: ours_bf(xs, ts, ys))]:
        torch.cuda.reset_peak_memory_stats()
        result[f"eager_bf16_forward_ms_batch{args.batch}_{name}"] = time_ms(fn)
        result[f"peak_gib_{name}"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
