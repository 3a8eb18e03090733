"""Benchmark every attention backend on the shapes of DiT Studio's real models.

    python bench/attention.py                    # GPU, bf16, the real shapes (about 3-4 minutes on an H100)
    python bench/attention.py --quick --device cpu   # tiny shapes: a smoke test of this script

For each case (a model's attention call) and each backend: median time, useful TFLOP/s, errors (a backend that
cannot run a call, or does not load, is recorded with its reason, never aborts the run). Per case: the best
backend, what auto dispatch picks and auto/best time ratio (target <= 1.05), and for non-dense patterns the
useful TFLOP/s of the best kernel divided by the best dense TFLOP/s at the same shape (target >= 0.80).

Useful FLOPs count only the (query, key) pairs the mask keeps: 4 * B * H * D * pairs forward (two matmuls),
3.5x that for forward + backward (the backward does five matmuls' worth, the usual FlashAttention count).

Writes JSON (device, torch version, date, command line, all rows) to --out, a markdown table next to it (.md)
and to stdout, and prints the AUTO_TABLE rows derived from the measurements, ready to paste into
attention/dispatch.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Run as a script, this file's folder comes first on sys.path and the file itself would shadow the
# `attention` package; put the repository root there instead.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import attention as attn  # noqa: E402
from attention.dispatch import TABLE_PATTERN, device_kinds, dtype_name, head_dim_bucket  # noqa: E402
from attention.problem import prepare  # noqa: E402

# VAR: scales 1,2,3,4,5,6,8,10,13,16 -> 680 tokens; heads = depth, width = 64 * depth (d30: 30 heads, D=64).
VAR_SCALES = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
VAR_SEGMENTS = [s * s for s in VAR_SCALES]


@dataclass
class Case:
    name: str
    model: str
    B: int
    H: int
    Nq: int
    Nk: int
    D: int
    pattern: str = "dense"
    segments: list[int] | None = None
    padded_fraction: float = 0.0  # share of keys padded away (key_padding_mask), for variable-length batches
    train: bool = False  # forward + backward
    dense_of: str | None = None  # the dense case at the same shape, for pattern efficiency
    note: str = ""


def real_cases() -> list[Case]:
    lm = dict(H=32, D=128)
    return [
        Case("dit256", "DiT-XL/2 256px", 64, 16, 256, 256, 72),
        Case("dit256_train", "DiT-XL/2 256px fwd+bwd", 64, 16, 256, 256, 72, train=True),
        Case("dit256_padded", "DiT-XL/2 256px, 1/8 keys padded", 64, 16, 256, 256, 72, padded_fraction=0.125),
        Case("dit512", "DiT-XL/2 512px", 64, 16, 1024, 1024, 72),
        Case("n4096_d64", "DiT 4096 tokens (B=4 fills the chip)", 4, 16, 4096, 4096, 64),
        Case("n4096_d128", "DiT 4096 tokens (B=4 fills the chip)", 4, 16, 4096, 4096, 128),
        Case("var_last_scale", "VAR-d30 last scale vs 680 cached (B=64 x2 CFG)", 128, 30, 256, 680, 64),
        Case("var_train", "VAR-d30 training, block-causal", 64, 30, 680, 680, 64, "block_causal", VAR_SEGMENTS),
        Case("var_train_fb", "VAR-d30 training fwd+bwd", 64, 30, 680, 680, 64, "block_causal", VAR_SEGMENTS,
             train=True),
        Case("llava_b1", "7B LM prefill 576 vis + 64 text (LLaVA)", 1, Nq=640, Nk=640, pattern="causal", **lm),
        Case("llava_b8", "7B LM prefill 576 vis + 64 text (LLaVA)", 8, Nq=640, Nk=640, pattern="causal", **lm),
        Case("saisa_b1", "7B LM, text queries only (SAISA)", 1, Nq=64, Nk=640, pattern="causal", **lm),
        Case("saisa_b8", "7B LM, text queries only (SAISA)", 8, Nq=64, Nk=640, pattern="causal", **lm),
        Case("lm_long", "long-context LM", 2, Nq=4096, Nk=4096, pattern="causal", **lm),
    ]


def quick_cases() -> list[Case]:
    """The same cases with tiny shapes (head dims kept): exercises every code path in seconds on a CPU."""
    segs = [s * s for s in VAR_SCALES[:5]]  # 55 tokens
    lm = dict(H=2, D=128)
    return [
        Case("dit256", "DiT-XL/2 (quick)", 2, 2, 16, 16, 72),
        Case("dit256_train", "DiT-XL/2 fwd+bwd (quick)", 2, 2, 16, 16, 72, train=True),
        Case("dit256_padded", "DiT-XL/2 padded (quick)", 2, 2, 16, 16, 72, padded_fraction=0.125),
        Case("n4096_d64", "long DiT (quick)", 1, 2, 64, 64, 64),
        Case("var_last_scale", "VAR last scale (quick)", 2, 3, 25, 55, 64),
        Case("var_train", "VAR training (quick)", 2, 3, 55, 55, 64, "block_causal", segs),
        Case("var_train_fb", "VAR training fwd+bwd (quick)", 2, 3, 55, 55, 64, "block_causal", segs, train=True),
        Case("llava_b1", "LM prefill (quick)", 1, Nq=40, Nk=40, pattern="causal", **lm),
        Case("saisa_b1", "LM text queries (quick)", 1, Nq=8, Nk=40, pattern="causal", **lm),
    ]


def with_dense_twins(cases: list[Case]) -> list[Case]:
    """Add a dense case at the shape of every non-dense case (once per shape) and link them."""
    out: list[Case] = []
    dense_by_shape: dict[tuple, str] = {}

    def shape(c):
        return (c.B, c.H, c.Nq, c.Nk, c.D, c.train)

    for c in cases:
        if c.pattern == "dense" and not c.padded_fraction:
            dense_by_shape.setdefault(shape(c), c.name)
    for c in cases:
        if (c.pattern != "dense" or c.padded_fraction) and shape(c) not in dense_by_shape:
            twin = Case(c.name + "_dense", c.model + " (dense twin)", c.B, c.H, c.Nq, c.Nk, c.D, train=c.train)
            dense_by_shape[shape(c)] = twin.name
            out.append(twin)
        if c.pattern != "dense" or c.padded_fraction:
            c.dense_of = dense_by_shape[shape(c)]
        out.append(c)
    return out


def make_inputs(c: Case, device, dtype, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(c.train)

    q, k, v = rand(c.B, c.H, c.Nq, c.D), rand(c.B, c.H, c.Nk, c.D), rand(c.B, c.H, c.Nk, c.D)
    kwargs: dict = {"pattern": c.pattern}
    if c.segments:
        kwargs["segments"] = c.segments
    if c.padded_fraction:
        # Variable-length batch: sample b keeps a prefix of its keys, lengths spread around (1 - fraction).
        keep_len = [max(1, round(c.Nk * (1 - c.padded_fraction * 2 * (b + 0.5) / c.B))) for b in range(c.B)]
        kpm = torch.arange(c.Nk)[None, :] < torch.tensor(keep_len)[:, None]
        kwargs["key_padding_mask"] = kpm.to(device)
    return q, k, v, kwargs


def useful_pairs(c: Case, kwargs) -> int:
    """(query, key) pairs the mask keeps, summed over the batch (per head)."""
    offset = c.Nk - c.Nq
    if c.pattern == "dense":
        per_sample = c.Nq * c.Nk
    elif c.pattern == "causal":
        per_sample = sum(min(c.Nk, max(0, i + offset + 1)) for i in range(c.Nq))
    else:
        seg_end = []
        end = 0
        for s in c.segments:
            end += s
            seg_end += [end] * s
        per_sample = sum(seg_end[i + offset] for i in range(c.Nq))
    if "key_padding_mask" in kwargs:  # dense + padding: queries see the kept keys of their sample
        kept = kwargs["key_padding_mask"].sum(dim=1).tolist()
        return sum(c.Nq * n for n in kept)
    return per_sample * c.B


def timer(fn, device, quick: bool, rotate) -> float:
    """Median milliseconds of fn(); warm-up first; inputs rotate between calls (``rotate`` picks the next)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(lambda: fn(rotate()), warmup=25, rep=100 if not quick else 20,
                                  return_mode="median"))
        except ImportError:
            pass
        fn(rotate())
        torch.cuda.synchronize()
        times = []
        for _ in range(10 if quick else 50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            args = rotate()
            start.record()
            fn(args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    fn(rotate())
    times = []
    deadline = time.perf_counter() + (0.5 if quick else 3.0)
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        args = rotate()
        t0 = time.perf_counter()
        fn(args)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_case(c: Case, backends: list[str], device, dtype, quick: bool, n_sets: int) -> dict:
    sets = [make_inputs(c, device, dtype, seed) for seed in range(n_sets)]
    q, k, v, kwargs = sets[0]
    pairs = useful_pairs(c, kwargs)  # summed over the batch already
    flops = 4 * c.H * c.D * pairs * (3.5 if c.train else 1.0)
    problem = prepare(q, k, v, **kwargs)
    row: dict = {
        "case": c.name, "model": c.model, "pattern": c.pattern, "train": c.train,
        "table_pattern": TABLE_PATTERN[problem.form] + (":train" if c.train else ""),
        "shape": {"B": c.B, "H": c.H, "Nq": c.Nq, "Nk": c.Nk, "D": c.D, "segments": c.segments,
                  "padded_fraction": c.padded_fraction},
        "useful_pairs_per_head": pairs,  # (q, k) pairs kept by the mask, summed over the batch
        "useful_flops": flops, "dense_of": c.dense_of, "backends": {},
    }
    counter = [0]

    def rotate():
        counter[0] += 1
        return sets[counter[0] % n_sets]

    def call(name):
        def fn(args):
            q_, k_, v_, kw = args
            out = attn.attention(q_, k_, v_, backend=name, **kw)
            if c.train:
                out.backward(torch.ones_like(out))
                for t in (q_, k_, v_):
                    t.grad = None
            return out

        return fn

    check = None
    # "auto" is timed through the real dispatch path too, so its Python overhead shows.
    for name in backends + ["auto"]:
        result: dict = {"ok": False}
        t0 = time.perf_counter()
        try:
            with torch.no_grad() if not c.train else torch.enable_grad():
                if name != "auto":
                    ok, reason = attn.BACKENDS[name].supports(prepare(q, k, v, **kwargs))
                    if not ok:
                        raise ValueError(reason)
                out = call(name)((q, k, v, kwargs)).detach().float()
                if check is None:
                    check = out
                err = (out - check).abs().max().item()
                ms = timer(call(name), device, quick, rotate)
            result = {"ok": True, "ms": ms, "tflops": flops / ms / 1e9, "max_abs_diff_vs_first": err}
        except ValueError as e:
            result["error"] = f"unsupported: {e}"
        except torch.cuda.OutOfMemoryError as e:
            result["error"] = f"out of memory: {str(e).splitlines()[0]}"
        except Exception as e:  # record, never abort the benchmark
            result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            result["traceback"] = traceback.format_exc(limit=3)
        result["wall_s"] = round(time.perf_counter() - t0, 2)
        row["backends"][name] = result
        shown = f"{result['ms']:.4g} ms {result['tflops']:.4g} TFLOP/s" if result["ok"] else result["error"][:150]
        print(f"  {c.name:16s} {name:15s} {shown}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # The same call inside a torch.compile'd graph (fullgraph: the layer must trace without a break), as a
    # compiled model runs it: the layer's Python dispatch cost is gone there.
    row["compiled_ms"] = None
    if not c.train and device.type == "cuda":
        try:
            torch._dynamo.reset()
            compiled = torch.compile(lambda q_, k_, v_: attn.attention(q_, k_, v_, **kwargs), fullgraph=True,
                                     dynamic=False)
            with torch.no_grad():
                err = (compiled(q, k, v).float() - check).abs().max().item() if check is not None else None
                row["compiled_ms"] = timer(lambda a: compiled(a[0], a[1], a[2]), device, quick, rotate)
            row["compiled_max_abs_diff"] = err
            print(f"  {c.name:16s} {'auto compiled':15s} {row['compiled_ms']:.4g} ms", flush=True)
        except Exception as e:  # record, never abort the benchmark
            row["compiled_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"  {c.name:16s} {'auto compiled':15s} {row['compiled_error'][:150]}", flush=True)

    auto = row["backends"].pop("auto")
    ok = {n: r for n, r in row["backends"].items() if r["ok"]}
    with torch.no_grad() if not c.train else torch.enable_grad():
        decision = attn.explain(q, k, v, backend="auto", **kwargs)
    row["auto"] = decision.backend
    row["auto_reason"] = decision.reason
    row["auto_ms"] = auto.get("ms")  # measured through attention(backend="auto"), dispatch overhead included
    row["auto_error"] = auto.get("error")
    if ok:
        best = min(ok, key=lambda n: ok[n]["ms"])
        row["best"] = best
        row["best_ms"] = ok[best]["ms"]
        row["best_tflops"] = ok[best]["tflops"]
        row["auto_over_best"] = None
        if row["auto_ms"]:
            # Run-to-run noise (~5-10% on a GPU) is as large as the 5% target, so time auto and the best
            # backend alternately a few times and compare the medians of those paired runs.
            paired_auto, paired_best = [], []
            with torch.no_grad() if not c.train else torch.enable_grad():
                for _ in range(3):
                    paired_best.append(timer(call(best), device, quick, rotate))
                    paired_auto.append(timer(call("auto"), device, quick, rotate))
            row["paired_auto_ms"] = statistics.median(paired_auto)
            row["paired_best_ms"] = statistics.median(paired_best)
            row["auto_over_best"] = row["paired_auto_ms"] / row["paired_best_ms"]
    return row


def add_pattern_efficiency(rows: list[dict]) -> None:
    by_name = {r["case"]: r for r in rows}
    for r in rows:
        twin = by_name.get(r["dense_of"] or "")
        if twin and r.get("best_tflops") and twin.get("best_tflops"):
            r["dense_best_tflops"] = twin["best_tflops"]
            r["pattern_efficiency"] = r["best_tflops"] / twin["best_tflops"]
            if r.get("auto_ms"):
                r["auto_pattern_efficiency"] = (r["useful_flops"] / r["auto_ms"] / 1e9) / twin["best_tflops"]


def derive_table(rows: list[dict], device, dtype) -> dict:
    """Fastest-first backend list per (device kind, dtype, head_dim bucket, pattern) from the measurements.

    Within a group, backends are ranked by the geometric mean of (time / best time) over its cases; a backend
    that failed any case of the group goes after those that ran all of them.
    """
    kind = device_kinds(device)[0]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (kind, dtype_name(dtype), head_dim_bucket(r["shape"]["D"]), r["table_pattern"])
        groups.setdefault(key, []).append(r)
    table = {}
    for key, group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        scores = {}
        for name in group[0]["backends"]:
            ratios = [r["backends"][name]["ms"] / r["best_ms"] for r in group if r["backends"][name]["ok"]]
            if ratios:
                complete = len(ratios) == len(group)
                scores[name] = (not complete, math.exp(sum(map(math.log, ratios)) / len(ratios)))
        table[key] = sorted(scores, key=lambda n: scores[n])
    return table


def markdown(rows: list[dict], backends: list[str], meta: dict) -> str:
    lines = [
        f"Attention backends. device: {meta['device']}; torch {meta['torch']}; {meta['dtype']}; date {meta['date']}.",
        f"Command: `{meta['command']}`",
        "",
        "Each cell: median ms / useful TFLOP/s. auto ms: attention(backend='auto') timed, dispatch included; "
        "auto/best: auto's time over the best backend's, both re-timed alternately 3 times (target <= 1.05). "
        "compiled ms: the same auto call inside a torch.compile'd fullgraph (no Python dispatch), over the best "
        "backend's eager time. "
        "pattern eff.: best useful TFLOP/s over the best dense TFLOP/s at the same shape (target >= 0.80).",
        "",
        "| case | shape (B,H,Nq,Nk,D) | pattern | " + " | ".join(backends)
        + " | best | auto | auto ms | auto/best | compiled ms | compiled/best | pattern eff. |",
        "|" + "---|" * (len(backends) + 10),
    ]
    for r in rows:
        s = r["shape"]
        cells = []
        for name in backends:
            res = r["backends"][name]
            cells.append(f"{res['ms']:.3g} / {res['tflops']:.3g}" if res["ok"] else "n/a")
        ratio = f"{r['auto_over_best']:.2f}" if r.get("auto_over_best") else "-"
        auto_ms = f"{r['auto_ms']:.3g}" if r.get("auto_ms") else "failed"
        eff = f"{r['pattern_efficiency']:.2f}" if r.get("pattern_efficiency") else "-"
        comp_ms = f"{r['compiled_ms']:.3g}" if r.get("compiled_ms") else "-"
        comp_ratio = f"{r['compiled_ms'] / r['best_ms']:.2f}" if r.get("compiled_ms") and r.get("best_ms") else "-"
        pattern = r["table_pattern"]
        lines.append(f"| {r['case']} | {s['B']},{s['H']},{s['Nq']},{s['Nk']},{s['D']} | {pattern} | "
                     + " | ".join(cells) + f" | {r.get('best', '-')} | {r['auto']} | {auto_ms} | {ratio} | "
                     f"{comp_ms} | {comp_ratio} | {eff} |")
    errors = sorted({(n, res["error"]) for r in rows for n, res in r["backends"].items() if not res["ok"]})
    if errors:
        lines += ["", "Why cells are n/a (distinct reasons):", ""]
        lines += [f"- {n}: {e}" for n, e in errors]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (smoke test)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends (default: all but the float64 reference)")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "attention.json"))
    parser.add_argument("--sets", type=int, default=3, help="input sets to rotate between calls")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    backends = args.backends.split(",") if args.backends else [n for n in attn.BACKENDS if n != "reference"]
    for name in backends:
        if name not in attn.BACKENDS:
            parser.error(f"unknown backend {name!r}; choose from {sorted(attn.BACKENDS)}")
    cases = quick_cases() if args.quick else real_cases()
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.name in wanted]
    cases = with_dense_twins(cases)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    meta = {
        "device": device_name,
        "device_kind": device_kinds(device)[0],
        "torch": torch.__version__,
        "dtype": args.dtype,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "bench/attention.py"]
                            + (sys.argv[1:] if argv is None else list(argv))),
        "quick": args.quick,
    }
    print(f"attention benchmark on {device_name}, torch {torch.__version__}, {args.dtype}", flush=True)
    print("available:", {n: ok for n, (ok, _) in attn.available_backends(device, dtype).items()}, flush=True)
    started = time.perf_counter()
    rows = []
    for c in cases:
        print(f"[{time.perf_counter() - started:6.1f}s] {c.name}: {c.model} B={c.B} H={c.H} Nq={c.Nq} Nk={c.Nk} "
              f"D={c.D} {c.pattern}{' fwd+bwd' if c.train else ''}", flush=True)
        rows.append(run_case(c, backends, device, dtype, args.quick, args.sets))
    add_pattern_efficiency(rows)
    meta["total_s"] = round(time.perf_counter() - started, 1)

    table = derive_table(rows, device, dtype)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "derived_auto_table": {repr(k): v for k, v in table.items()}},
                  f, indent=1)
    md = markdown(rows, backends, meta)
    md_path = os.path.splitext(args.out)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(md)
    print()
    print(md, flush=True)
    print("# AUTO_TABLE rows measured on", device_name, f"(torch {torch.__version__}); paste into attention/dispatch.py")
    print("MEASURED_AUTO_TABLE = {")
    for key, order in table.items():
        print(f"    {key!r}: {order!r},")
    print("}")
    print(f"\nwrote {args.out} and {md_path} in {meta['total_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
