"""FP8 against bf16 on DiT-XL/2's block products, kernel by kernel (GPU; not a test).

The four block linears of DiT-XL/2 at 256 px, batch 32 guided (M = 64 × 256 = 16,384 tokens): qkv 1152→3456,
proj 1152→1152, fc1 1152→4608, fc2 4608→1152. Per shape, CUDA-event medians of:
  bf16       F.linear (cuBLAS, bias in the epilogue)
  row        torch._scaled_mm, e4m3, per-row scales (activations per token, weights per output channel), bias in the
             kernel where this torch takes it (dit.fp8.bias_in_kernel), fp32 promotion of partial sums
  row-fast   the same with use_fast_accum
  tensor-fast  per-tensor scales, use_fast_accum (the kernel behind the issue's 1,076-1,276 TFLOP/s figure)
  quant      dit.fp8.quantize_rows of the (M, K) activations alone, compiled (what fusion into the producer saves)
and the relative error of each FP8 product against the float32 product of the unquantised operands.

    python bench/fp8_gemm.py --out bench/results/fp8_gemm.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dit.fp8 import E4M3, bias_in_kernel, quantize_rows  # noqa: E402

SHAPES = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}


def timed_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 10)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default="bench/results/fp8_gemm.json")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    M = args.tokens
    kernel_bias = bias_in_kernel(dev)
    rows = []
    quant = torch.compile(quantize_rows)
    for name, (K, N) in SHAPES.items():
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * K ** -0.5
        b = torch.randn(N, device=dev, dtype=torch.bfloat16) * 0.1
        ref = x.float() @ w.float().t() + b.float()
        xq, xs = quantize_rows(x)
        wq, ws = quantize_rows(w)
        ws = ws.reshape(1, N).contiguous()
        xt = (x.float().abs().amax() / 448).reshape(()).float()
        wt = (w.float().abs().amax() / 448).reshape(()).float()
        xqt = (x.float() / xt).to(E4M3)
        wqt = (w.float() / wt).to(E4M3)
        bias = b if kernel_bias else None

        def rowwise(fast):
            y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, bias=bias, out_dtype=torch.bfloat16,
                                 use_fast_accum=fast)
            return y if bias is not None else y + b

        variants = {
            "bf16": lambda: F.linear(x, w, b),
            "row": lambda: rowwise(False),
            "row-fast": lambda: rowwise(True),
            "tensor-fast": lambda: torch._scaled_mm(xqt, wqt.t(), scale_a=xt, scale_b=wt, bias=b,
                                                    out_dtype=torch.bfloat16, use_fast_accum=True),
        }
        flop = 2 * M * K * N
        row = {"linear": name, "M": M, "K": K, "N": N}
        for v, fn in variants.items():
            ms = timed_ms(fn, args.reps)
            out = fn().float()
            row[v] = {"ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1),
                      "rel_err_vs_fp32": round(((out - ref).norm() / ref.norm()).item(), 5)}
        row["quant_ms"] = round(timed_ms(lambda: quant(x), args.reps), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "date": dt.date.today().isoformat(), "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
              "bias_in_kernel": kernel_bias, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
