"""Where the compiled sliced DyDiT path loses time in its two LayerNorm kernels (docs/dydit.md, twelfth session:
113 and 125 ms at batch 32 over a 50-step run, about 3x what their bytes need on the H100).

Times, in isolation at DyDiT-XL/2's batch-32 shapes (64 sequences x 256 tokens x 1152, bf16), the two functions
the compiled path fuses, under the ways it could be compiled:
- `ln-mod`: LayerNorm + adaLN modulation of the whole stream (before attention);
- `gather-ln-mod`: gather of the kept tokens (capacity rows, one scratch row), LayerNorm, modulation read per row
  through token // 256 (before the MLP).
Sixteenth session: dit/kept_tokens.py's Triton kernels for both (and the MLP's gated scatter, against the plain
path's padded copy + index_copy), on CUDA. Each with the modulations as contiguous (S, D) tensors or as chunks of
the (S, 6D) adaLN output (what the model passes), compiled static (every size known) or the way `DyDiT.compile_sliced` does it (`_compiled_dynamic`:
symbolic leading sizes, the rest static). Eager rows for reference. CUDA events, median of --reps.

    python bench/dydit_ln_probe.py --out bench/results/dydit_ln_probe.json          # H100
    python bench/dydit_ln_probe.py --device cpu --seqs 2 --reps 3                   # smoke check
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dit import kept_tokens  # noqa: E402
from dit.dydit import _compiled_dynamic, _kept_rows  # noqa: E402


def ln_mod(x, shift, scale):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def gather_ln_mod(x_flat, keep_flat, shift, scale, capacity: int, tokens: int):
    rows = keep_flat.shape[0]
    idx = torch.nonzero_static(keep_flat, size=capacity, fill_value=rows).squeeze(1)
    sample = (idx // tokens).clamp_max(shift.shape[0] - 1)
    h = F.layer_norm(x_flat.index_select(0, idx), (x_flat.shape[-1],), eps=1e-6)
    return h * (1 + scale.index_select(0, sample)) + shift.index_select(0, sample)


def timed(fn, args, reps: int, device: str, calls: int = 20) -> float:
    """Median over `reps` of the mean time of `calls` calls, in microseconds; on the GPU the calls are one CUDA graph
    replayed, so that no host work (guards, launches) sits inside the timed span (call 3 of the thirteenth session
    timed single eager launches and measured the host, 150-300 us, not the kernels)."""
    for _ in range(3):
        fn(*args)
    if device != "cpu":
        # The kernels alone: `calls` calls captured in one CUDA graph, replayed (no host work in the timed span).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn(*args)
    times = []
    for _ in range(reps):
        if device == "cpu":
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(*args)
            times.append((time.perf_counter() - t0) * 1e6 / calls)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seqs", type=int, default=64, help="sequences (batch 32 with guidance: 64)")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--width", type=int, default=1152)
    p.add_argument("--keep", type=float, default=0.5, help="share of tokens kept for the MLP")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--products", action="store_true", help="also time the proj / fc2 products' weight layouts")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev, dt = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    S, n, D = args.seqs, args.tokens, args.width
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(S, n, D, device=dev, dtype=dt, generator=g)
    mod6 = torch.randn(S, 6 * D, device=dev, dtype=dt, generator=g)
    chunks = mod6.chunk(6, dim=1)
    contig = [c.contiguous() for c in chunks]
    rows = S * n
    padded = torch.cat([x.reshape(rows, D), x.new_zeros(1, D)])
    keep = torch.rand(rows, device=dev, generator=g) < args.keep
    capacity = int(rows * min(1.0, args.keep + 0.1))
    elt = x.element_size()
    bytes_ln = 2 * rows * D * elt
    bytes_gather = 2 * capacity * D * elt

    results = []

    def add(name, fn, fargs, nbytes):
        try:
            us = timed(fn, fargs, args.reps, dev)
            results.append({"variant": name, "us": round(us, 2), "GB_per_s": round(nbytes / us / 1e3, 1)})
        except Exception as e:  # a variant that does not compile here is reported, not fatal
            results.append({"variant": name, "error": f"{type(e).__name__}: {e}"[:300]})
        print(results[-1], flush=True)

    gather_fn = lambda xf, k, sh, sc: gather_ln_mod(xf, k, sh, sc, capacity, n)  # noqa: E731
    for mods_name, (shift, scale) in (("contiguous", (contig[0], contig[1])), ("chunks", (chunks[0], chunks[1]))):
        add(f"ln-mod eager, {mods_name}", ln_mod, (x, shift, scale), bytes_ln)
        add(f"gather-ln-mod eager, {mods_name}", gather_fn, (padded, keep, shift, scale), bytes_gather)
        torch._dynamo.reset()
        add(f"ln-mod static, {mods_name}", torch.compile(ln_mod, dynamic=False, fullgraph=True),
            (x, shift, scale), bytes_ln)
        add(f"ln-mod dynamic rows, {mods_name}", _compiled_dynamic(ln_mod, None), (x, shift, scale), bytes_ln)
        # capacity and tokens are closed over: constants in both compiled variants, as in the model
        add(f"gather-ln-mod static, {mods_name}", torch.compile(gather_fn, dynamic=False, fullgraph=True),
            (padded, keep, shift, scale), bytes_gather)
        add(f"gather-ln-mod dynamic rows, {mods_name}", _compiled_dynamic(gather_fn, None),
            (padded, keep, shift, scale), bytes_gather)
    if dev == "cuda" or kept_tokens.MODE == "on":  # dit/kept_tokens.py's kernels, same shapes and bytes
        kernel_gather = lambda xf, k, sh, sc: kept_tokens.gather_norm_modulate(  # noqa: E731
            xf, *_kept_rows(k, capacity, rows), sh, sc, n, 1e-6)
        kernel_ln = lambda xx, sh, sc: kept_tokens.norm_modulate(xx.view(rows, D), sh, sc, n, 1e-6)  # noqa: E731
        x_flat = x.reshape(rows, D)
        update = torch.randn(capacity, D, device=dev, dtype=dt, generator=g)
        kernel_scatter = lambda xf, k, u, gt: kept_tokens.scatter_gated_residual_(  # noqa: E731
            xf, *_kept_rows(k, capacity, rows), u, gt, n)

        def index_copy_scatter(xf, k, u, gt):  # the plain path's scatter: a padded copy of x, then index_copy
            idx, _ = _kept_rows(k, capacity, rows)
            p_ = torch.cat([xf, xf.new_zeros(1, D)])
            sample = (idx // n).clamp_max(S - 1)
            return p_.index_copy_(0, idx, p_.index_select(0, idx) + gt.index_select(0, sample) * u)[:rows]

        for mods_name, (shift, scale, gate) in (("chunks", chunks[:3]),):
            add(f"ln-mod kernel, {mods_name}", kernel_ln, (x, shift, scale), bytes_ln)
            add(f"gather-ln-mod kernel (nonzero included), {mods_name}", kernel_gather, (x_flat, keep, shift, scale),
                bytes_gather)
            idx_k, count_k = kept_tokens.kept_rows(keep, capacity, rows)
            add(f"gather-ln-mod kernel alone (indices made before), {mods_name}",
                lambda xf, i, c, sh, sc: kept_tokens.gather_norm_modulate(xf, i, c, sh, sc, n, 1e-6),
                (x_flat, idx_k, count_k, shift, scale), bytes_gather)
            add("kept_rows kernel (bytes: the mask and the indices)", lambda k: kept_tokens.kept_rows(k, capacity, rows),
                (keep,), rows + 8 * capacity)
            add(f"scatter kernel (in place), {mods_name}", kernel_scatter, (x_flat.clone(), keep, update, gate),
                3 * capacity * D * elt)
            torch._dynamo.reset()
            add(f"index_copy scatter, padded copy, compiled dynamic rows, {mods_name}",
                _compiled_dynamic(index_copy_scatter, None), (x_flat, keep, update, gate), 3 * capacity * D * elt)
    if dev == "cuda" and args.products:
        # Seventeenth session: the sliced path's proj and fc2 products read their weights as row prefixes of the
        # transposed weight (`BlockWeights`: contiguous at every width) and cuBLAS runs them "NN"; the dense model's
        # F.linear runs "TN". At batch 32 the sliced fc2 ran at ~450 TFLOP/s (sixteenth session). Each layout at the
        # sliced shapes (half the heads / groups), and the dense shape for reference.
        def product(name, M, K, N, layout):
            w = torch.randn(N, 2 * K if layout == "TN column prefix" else K, device=dev, dtype=dt, generator=g)
            a = torch.randn(M, K, device=dev, dtype=dt, generator=g)
            b = torch.randn(N, device=dev, dtype=dt, generator=g)
            if layout == "NN row prefix":  # (2K, N) transposed weight, its first K rows
                wt = torch.randn(2 * K, N, device=dev, dtype=dt, generator=g)[:K]
                fn, fargs = (lambda a_, w_, b_: torch.addmm(b_, a_, w_)), (a, wt, b)
            elif layout == "TN column prefix":  # (N, 2K) weight, its first K columns: lda 2K
                fn, fargs = (lambda a_, w_, b_: F.linear(a_, w_, b_)), (a, w[:, :K], b)
            else:  # "TN contiguous": a copy of the slice
                fn, fargs = (lambda a_, w_, b_: F.linear(a_, w_, b_)), (a, w, b)
            try:
                us = timed(fn, fargs, args.reps, dev)
                results.append({"variant": f"product {name}, {layout}", "M": M, "K": K, "N": N, "us": round(us, 2),
                                "TFLOP_per_s": round(2 * M * K * N / us / 1e6, 1)})
            except Exception as e:
                results.append({"variant": f"product {name}, {layout}", "error": f"{type(e).__name__}: {e}"[:300]})
            print(results[-1], flush=True)

        for layout in ("NN row prefix", "TN column prefix", "TN contiguous"):
            product("fc2 sliced (kept rows, half the groups)", capacity, 4 * D // 2, D, layout)
            product("proj sliced (half the heads)", rows, D // 2, D, layout)
        product("fc2 dense", rows, 4 * D, D, "TN contiguous")
        product("proj dense", rows, D, D, "TN contiguous")
    out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python " + " ".join(sys.argv), "shapes": {"seqs": S, "tokens": n, "width": D,
           "capacity": capacity, "dtype": str(dt)},
           "bytes_note": "GB/s counts one read and one write of the rows processed", "rows": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
