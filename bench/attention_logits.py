"""Attention-logit probe of a trained DiT / PixArt / Latte model (CPU, seconds): per block and timestep, the largest
|q·k|/√d, the logits' spread, the attention entropy (against its maximum ln N), the mean |q| and |k|, and how much
bf16 rounding of q and k alone changes the block's attention output (float64 reference). Growth of these logits is
what made our continued shapes trainings diverge (docs/dit.md); run it on a checkpoint before continuing it.

    python bench/attention_logits.py weights/shapes-c2i [--out bench/results/attention_logits_shapes-c2i.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # bench/attention.py would otherwise shadow the attention package
sys.path.insert(1, str(REPO / "scripts"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from train_dit import load_model  # noqa: E402


def model_inputs(model, batch: int, t: int, g: torch.Generator) -> tuple:
    c = model.config
    S, C = c["sample_size"], c["in_channels"]
    time = torch.full((batch,), t)
    if "num_classes" in c:
        return torch.randn(batch, C, S, S, generator=g), time, torch.arange(batch) % c["num_classes"]
    text = torch.randn(batch, min(8, c["max_text_tokens"]), c["caption_channels"], generator=g)
    if "num_frames" in c:
        return torch.randn(batch, C, c["num_frames"], S, S, generator=g), time, text
    return torch.randn(batch, C, S, S, generator=g), time, text


def probe(model, timesteps=(50, 500, 950), batch: int = 8, seed: int = 0) -> list[dict]:
    captured: dict[str, torch.Tensor] = {}
    attn = {name: m for name, m in model.named_modules() if hasattr(m, "qkv") and hasattr(m, "qk_norm")}
    hooks = [m.qkv.register_forward_hook(lambda mod, i, out, n=name: captured.__setitem__(n, out))
             for name, m in attn.items()]
    rows = []
    try:
        for t in timesteps:
            captured.clear()
            with torch.no_grad():
                model(*model_inputs(model, batch, t, torch.Generator().manual_seed(seed)))
                for name, m in attn.items():
                    out = captured[name]
                    B, N, D3 = out.shape
                    h = m.num_heads
                    q, k, v = out.view(B, N, 3, h, D3 // 3 // h).permute(2, 0, 3, 1, 4)
                    q, k = m.qk_norm(q, k)
                    q, k, v = q.double(), k.double(), v.double()
                    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
                    p = logits.softmax(-1)
                    ref = p @ v
                    rounded = F.scaled_dot_product_attention(q.bfloat16().double(), k.bfloat16().double(), v)
                    rows.append(dict(
                        module=name, t=t, max_abs_logit=round(logits.abs().max().item(), 2),
                        logit_std=round(logits.std().item(), 3),
                        entropy=round(-(p * p.clamp_min(1e-300).log()).sum(-1).mean().item(), 3),
                        max_entropy=round(math.log(N), 3), mean_q_norm=round(q.norm(dim=-1).mean().item(), 2),
                        mean_k_norm=round(k.norm(dim=-1).mean().item(), 2),
                        bf16_qk_rel_error=float(f"{((rounded - ref).norm() / ref.norm()).item():.3e}")))
    finally:
        for hk in hooks:
            hk.remove()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="a model folder, shipped name or named size (as scripts/train_dit.py --model)")
    p.add_argument("--timesteps", type=int, nargs="+", default=[50, 500, 950])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = p.parse_args(argv)
    model = load_model(args.model, "ddpm").float().eval()
    rows = probe(model, args.timesteps, args.batch)
    for r in rows:
        print(f"t={r['t']:4d} {r['module']:28s} max|logit| {r['max_abs_logit']:10.1f}  entropy {r['entropy']:.2f}/"
              f"{r['max_entropy']:.2f}  |q| {r['mean_q_norm']:7.1f}  bf16 q,k error {r['bf16_qk_rel_error']:.2e}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(
            model=args.model, date=dt.date.today().isoformat(), torch=torch.__version__, device="cpu (float64 probe)",
            command=" ".join(shlex.quote(a) for a in ["python", *sys.argv]), rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
