"""VAR sampling speed and memory, ours against the official FoundationVision/VAR code in the same process, plus
parity of the two on the same random weights.

    scripts/gpu/var_fetch_official.sh                       # official models/ + dist.py -> third_party/VAR (ignored)
    python bench/var_speed.py --official third_party/VAR    # GPU: VAR-d16 and d30 at 256 px, batch 1 / 16 / 64
    python bench/var_speed.py --smoke --official third_party/VAR   # CPU: tiny sizes, proves the script end to end

What one run measures (random weights; one process; JSON to --out with device, date, torch and command):
1. parity (fp32, no autocast): the same random VAR (per depth) and tokenizer weights loaded into ours and the
   official modules; teacher-forced logits for the same labels and teacher-forcing input (official
   `cond_drop_rate` set to 0), and the tokenizer's tokens and reconstruction for the same images
   (`img_to_idxBl` / `idxBl_to_img` vs `encode_indices` / `decode_indices`).
2. speed per (depth, batch): class-conditional sampling with guidance --cfg, --top-k, --top-p, including the
   decode to pixels. Ours: bf16 weights and a bf16 `caching.KVCache`; official: fp32 weights under bf16 autocast,
   its own KV cache (`autoregressive_infer_cfg`). Burn-in runs, then timed repeats (synchronised); img/s, s/batch,
   peak allocated memory (reset per measurement), KV bytes at the last scale (ours: `KVCache.nbytes()`, checked
   against 2 · layers · 2B · L · width · 2 bytes; official: the sizes of its cached_k / cached_v tensors just before
   it drops them), and MFU from an analytic FLOP count (matmuls + attention over the visible prefix, both halves of
   the guided batch) against --peak-tflops (H100 SXM dense bf16: 989).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.profiling import profile_top  # noqa: E402
from caching import kv_bytes  # noqa: E402
from vlm.var import VAR  # noqa: E402
from vlm.var_graphs import ScaleGraphs  # noqa: E402
from vlm.var_pipeline import sample_tokens  # noqa: E402
from vlm.vqvae import MultiScaleVQVAE  # noqa: E402

FULL = dict(depths=(16, 30), batches=(1, 16, 64), vq="vqvae-ch160v4096z32", image=256)
# Smoke: the release's layout at toy sizes (head width 64, GroupNorm 32 needs ch >= 32).
SMOKE_PATCH = (1, 2, 3, 4)
SMOKE = dict(depths=(2,), batches=(1, 4), image=64,
             vq_kwargs=dict(ch=32, ch_mult=(1, 1, 2, 2, 4), vocab_size=64, z_channels=8, patch_nums=SMOKE_PATCH,
                            sample_size=64),
             var_kwargs=dict(num_classes=10, vocab_size=64, z_channels=8, patch_nums=SMOKE_PATCH))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official", default=None, help="folder holding the official models/ package and dist.py")
    p.add_argument("--depths", type=int, nargs="+", default=None)
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--top-k", type=int, default=900)
    p.add_argument("--top-p", type=float, default=0.96)
    p.add_argument("--burn-in", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU in float32")
    p.add_argument("--profile", type=int, nargs="*", default=None, metavar="BATCH",
                   help="print the top ops by device time of one sampling run, ours and official, at these batches "
                        "(default with no value: batch 1)")
    p.add_argument("--variants", nargs="+", default=["eager", "fast"], choices=["eager", "fast", "fast-compiled"],
                   help="ours: eager = the plain sampler and a float32 decoder over the whole batch; fast = one CUDA "
                        "graph per scale (vlm.var_graphs) and the decoder in bf16 channels-last, --decode-batch "
                        "images at a time (vlm.vqvae.fast_decoder); fast-compiled = fast with the decoder compiled. "
                        "Without a GPU, fast runs its static buffers eagerly")
    p.add_argument("--decode-batch", type=int, default=16)
    p.add_argument("--decoder-bench", action="store_true",
                   help="also time the decoder alone at the largest batch: float32 / bf16 / bf16 channels-last")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "var_speed.json"))
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- builders
def build_ours(depth: int, smoke: bool, device) -> tuple[VAR, MultiScaleVQVAE]:
    torch.manual_seed(depth)
    if smoke:
        var = VAR(depth=depth, embed_dim=64 * depth, num_heads=depth, init_adaln_gamma=0.5, **SMOKE["var_kwargs"])
        vq = MultiScaleVQVAE(**SMOKE["vq_kwargs"])
    else:
        # Random weights with a visible modulation (γ 0.5, not the training init's 1e-5), so parity is not trivial.
        var = VAR.from_name(f"VAR-d{depth}", init_adaln_gamma=0.5)
        vq = MultiScaleVQVAE.from_name(FULL["vq"])
    return var.to(device).eval(), vq.to(device).eval()


def import_official(path: str):
    root = Path(path).resolve()
    if not (root / "models" / "var.py").is_file() or not (root / "dist.py").is_file():
        raise SystemExit(f"--official {root} must hold models/ and dist.py (scripts/gpu/var_fetch_official.sh)")
    sys.path.insert(0, str(root))
    import models  # noqa: F401  (the official package)
    from models.var import VAR as OfficialVAR
    from models.vqvae import VQVAE as OfficialVQVAE
    commit = (root / "COMMIT").read_text().strip() if (root / "COMMIT").is_file() else "unknown"
    return OfficialVAR, OfficialVQVAE, commit


def build_official(OfficialVAR, OfficialVQVAE, ours: VAR, vq: MultiScaleVQVAE, device):
    c, vc = ours.config, vq.config
    # The official VQVAE hard-codes ch_mult (1, 1, 2, 2, 4); both our configs used here have it.
    ovq = OfficialVQVAE(vocab_size=vc.vocab_size, z_channels=vc.z_channels, ch=vc.ch, test_mode=True,
                        share_quant_resi=vc.share_quant_resi, v_patch_nums=tuple(vc.patch_nums)).to(device)
    ovar = OfficialVAR(vae_local=ovq, num_classes=c.num_classes, depth=c.depth, embed_dim=c.embed_dim,
                       num_heads=c.num_heads, norm_eps=c.norm_eps, cond_drop_rate=0.0, attn_l2_norm=c.attn_l2_norm,
                       patch_nums=tuple(c.patch_nums), flash_if_available=True, fused_if_available=True).to(device)
    ovq.load_state_dict(vq.state_dict(), strict=True)
    ovar.load_state_dict(ours.state_dict(), strict=True)
    return ovar.eval(), ovq.eval()


# ----------------------------------------------------------------------------------------------- parity
@torch.no_grad()
def parity(ours: VAR, vq: MultiScaleVQVAE, ovar, ovq, image: int, device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    B = 4
    x = (torch.rand(B, 3, image, image, generator=g) * 2 - 1).to(device)
    tokens = vq.encode_indices(x)
    otokens = ovq.img_to_idxBl(x)
    same_tokens = sum(int((a == b).sum()) for a, b in zip(tokens, otokens)) / sum(t.numel() for t in tokens)
    rec = vq.decode_indices(tokens)
    orec = ovq.idxBl_to_img(tokens, same_shape=True, last_one=True)
    labels = torch.tensor([0, 1, 2, ours.config.num_classes - 1], device=device)
    tf = vq.teacher_forcing_input(tokens)
    otf = ovq.quantize.idxBl_to_var_input(tokens)
    logits = ours(labels, tf)
    ologits = ovar(labels, otf)
    return {"token_agreement": same_tokens,
            "reconstruction_max_abs_diff": float((rec - orec).abs().max()),
            "teacher_forcing_input_max_abs_diff": float((tf - otf).abs().max()),
            "logits_max_abs_diff": float((logits - ologits).abs().max()),
            "logits_rel_diff": float((logits - ologits).norm() / ologits.norm())}


# ----------------------------------------------------------------------------------------------- speed
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_image(var: VAR) -> float:
    """Matmul + attention FLOPs of one guided image (two rows): per token and layer 24·C² (qkv, proj, FFN 4C),
    attention 4·C·(visible tokens), the head 2·C·V; ada_lin per row and scale (negligible) is left out."""
    C, V, depth = var.config.embed_dim, var.config.vocab_size, len(var.blocks)
    total, seen = 0.0, 0
    for n in var.segments:
        seen += n
        total += n * (depth * (24 * C * C + 4 * C * seen) + 2 * C * V)
    return 2 * total


def timed(fn, burn_in: int, repeats: int, device) -> tuple[float, int]:
    for _ in range(burn_in):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return (time.perf_counter() - t0) / repeats, peak


def ours_sampler(var, vq, B, args, dtype, device, record, fast: bool = False):
    """`fast`: vq is already a fast_decoder copy; the transformer replays per-scale CUDA graphs (static buffers on a
    CPU), built on the first call and kept in `record["graphs"]` (the caller frees them)."""
    labels = torch.arange(B, device=device) % var.config.num_classes
    null = torch.full_like(labels, var.null_class_id)
    gen = torch.Generator(device=device)

    @torch.no_grad()
    def run():
        gen.manual_seed(0)  # every call draws the same tokens (same_tokens compares calls)
        graphs = None
        if fast:
            if "graphs" not in record:
                t0 = time.perf_counter()
                record["graphs"] = ScaleGraphs(var, 2 * B, cache_dtype=dtype)
                record["graphs_build_s"] = time.perf_counter() - t0
            graphs = record["graphs"]
        tokens, f_hat, cache = sample_tokens(var, vq, var.condition(labels), var.condition(null),
                                             guidance_scale=args.cfg, top_k=args.top_k, top_p=args.top_p,
                                             generator=gen, cache_dtype=dtype, graphs=graphs)
        record["kv_bytes"] = cache.nbytes()
        record["tokens"] = tokens
        return vq.fhat_to_img(f_hat, batch_chunk=args.decode_batch if fast else None)
    return run


def same_tokens(var, vq, vq_fast, B, args, dtype, device) -> float:
    """Share of equal tokens between the eager sampler and the graphed one, same seed (1.0: same kernels)."""
    a, b = {}, {}
    ours_sampler(var, vq, B, args, dtype, device, a)()
    fast = ours_sampler(var, vq_fast, B, args, dtype, device, b, fast=True)
    fast()  # records (GPU) on this call, replays on the next
    fast()
    b["graphs"] = None
    n = sum(t.numel() for t in a["tokens"])
    return sum(int((x == y).sum()) for x, y in zip(a["tokens"], b["tokens"])) / n


@torch.no_grad()
def decoder_bench(vq, B: int, device, chunk: int, repeats: int) -> dict:
    """The decoder alone on B random f̂ maps: float32 (whole batch, and in chunks), bf16, bf16 channels-last."""
    z, H = vq.config.z_channels, vq.patch_nums[-1]
    f_hat = torch.randn(B, z, H, H, device=device, generator=torch.Generator(device=device).manual_seed(0))
    ref = vq.fhat_to_img(f_hat)
    out = {}
    variants = [("float32", None, None, None, False), ("float32", chunk, None, None, False),
                ("bf16", chunk, torch.bfloat16, False, False), ("bf16-channels-last", chunk, torch.bfloat16, True, False),
                ("bf16-compiled", chunk, torch.bfloat16, False, True)]
    for name, ch, dt, cl, comp in variants:
        m = copy.deepcopy(vq) if dt is not None else vq
        if dt is not None:
            m.fast_decoder(dt, channels_last=cl, compile=comp and device.type == "cuda")
        sec, peak = timed(lambda: m.fhat_to_img(f_hat, batch_chunk=ch), 1, repeats, device)
        img = m.fhat_to_img(f_hat, batch_chunk=ch)
        out[f"{name}, chunk {ch or B}"] = {"seconds": sec, "ms_per_image": 1e3 * sec / B, "peak_memory_bytes": peak,
                                           "max_abs_diff_vs_float32": float((img - ref).abs().max()),
                                           "mean_abs_diff_vs_float32": float((img - ref).abs().mean())}
        del m
    return out


def official_sampler(ovar, B, args, dtype, device, record):
    labels = torch.arange(B, device=device) % ovar.num_classes

    def recording(attn, orig):
        def kv_caching(enable):
            # Called with False after the last scale: its cache is complete here, and dropped by `orig`.
            if not enable and attn.cached_k is not None:
                rec = ovar._bench_record
                rec["kv_bytes"] = rec.get("kv_bytes", 0) + attn.cached_k.nbytes + attn.cached_v.nbytes
            orig(enable)
        return kv_caching

    for b in ovar.blocks:
        if not hasattr(b.attn, "_bench_wrapped"):
            b.attn.kv_caching = recording(b.attn, b.attn.kv_caching)
            b.attn._bench_wrapped = True

    @torch.no_grad()
    def run():
        ovar._bench_record = record
        record.pop("kv_bytes", None)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return ovar.autoregressive_infer_cfg(B, labels, g_seed=0, cfg=args.cfg, top_k=args.top_k,
                                                 top_p=args.top_p)
    return run


def main(args) -> dict:
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    plan = SMOKE if args.smoke else FULL
    depths, batches = args.depths or plan["depths"], args.batches or plan["batches"]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.smoke:
        args.top_k = min(args.top_k, SMOKE["var_kwargs"]["vocab_size"] // 2)
    official = import_official(args.official) if args.official else None
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
               "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv),
               "settings": {"cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p, "dtype": str(dtype),
                            "burn_in": args.burn_in, "repeats": args.repeats, "smoke": args.smoke},
               "official_commit": official[2] if official else None, "parity": {}, "runs": []}
    for depth in depths:
        var, vq = build_ours(depth, args.smoke, device)
        name = f"VAR-d{depth}"
        if official:
            ovar, ovq = build_official(official[0], official[1], var, vq, device)
            results["parity"][name] = parity(var, vq, ovar, ovq, plan["image"], device)
            print(name, "parity", results["parity"][name], flush=True)
        var_fast = var.to(dtype)  # ours samples with low-precision weights (the official keeps fp32 + autocast)
        vq_fast = copy.deepcopy(vq).fast_decoder(dtype) if "fast" in args.variants else None
        vq_comp = (copy.deepcopy(vq).fast_decoder(dtype, compile=device.type == "cuda")
                   if "fast-compiled" in args.variants else None)
        fl = flops_per_image(var_fast)
        if args.decoder_bench:
            results.setdefault("decoder", {})[name] = decoder_bench(vq, max(batches), device, args.decode_batch,
                                                                    args.repeats)
            print(name, "decoder", json.dumps(results["decoder"][name]), flush=True)
        if "fast" in args.variants and "eager" in args.variants:
            results.setdefault("graphs_same_tokens_as_eager", {})[name] = same_tokens(
                var_fast, vq, vq_fast, min(batches), args, dtype, device)
            print(name, "graphed vs eager tokens equal:", results["graphs_same_tokens_as_eager"][name], flush=True)
        for B in batches:
            row = {"model": name, "batch": B, "flops_per_image": fl}
            impls = []
            if "eager" in args.variants:
                impls.append(("ours", ours_sampler(var_fast, vq, B, args, dtype, device, rec := {}), rec))
            if official:
                impls.append(("official", official_sampler(ovar, B, args, dtype, device, orec := {}), orec))
            if "fast" in args.variants:
                impls.append(("ours_fast", ours_sampler(var_fast, vq_fast, B, args, dtype, device, frec := {},
                                                        fast=True), frec))
            if "fast-compiled" in args.variants:
                impls.append(("ours_fast_compiled", ours_sampler(var_fast, vq_comp, B, args, dtype, device,
                                                                 crec := {}, fast=True), crec))
            for impl, fn, record in impls:
                if args.profile is not None and B in (args.profile or [1]):
                    profile_top(f"{name} batch {B} {impl}", fn, device, rows=15, warmup=True)
                try:
                    sec, peak = timed(fn, args.burn_in, args.repeats, device)
                except torch.OutOfMemoryError:
                    row[impl] = {"oom": True}
                    record.pop("graphs", None)
                    torch.cuda.empty_cache()
                    continue
                row[impl] = {"seconds_per_batch": sec, "images_per_second": B / sec, "peak_memory_bytes": peak,
                             "kv_bytes": record.get("kv_bytes"),
                             "mfu": fl * B / sec / (args.peak_tflops * 1e12) if device.type == "cuda" else None}
                if "graphs_build_s" in record:
                    row[impl]["graphs_build_s"] = record["graphs_build_s"]
                record.pop("graphs", None)  # free the graphed cache before the next implementation
                record.pop("tokens", None)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            expected = kv_bytes(depth, var.L, var.num_heads, var.head_dim, batch=2 * B, dtype=dtype)
            row["kv_bytes_formula"] = expected
            for impl in ("ours", "ours_fast", "ours_fast_compiled"):
                if impl in row and "kv_bytes" in row[impl]:
                    row[f"{impl}_kv_matches_formula"] = row[impl]["kv_bytes"] == expected
            off = row.get("official", {}).get("seconds_per_batch")
            for impl, key in (("ours", "speedup"), ("ours_fast", "speedup_fast"),
                              ("ours_fast_compiled", "speedup_fast_compiled")):
                if off and "seconds_per_batch" in row.get(impl, {}):
                    row[key] = off / row[impl]["seconds_per_batch"]
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            write(results, args.out, complete=False)  # a run cut off by a time limit keeps what it measured
        del var, vq
        if official:
            del ovar, ovq
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write(results, args.out, complete=True)
    print(f"wrote {args.out}")
    return results


def write(results: dict, path: str, complete: bool) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**results, "complete": complete}, indent=2) + "\n")


if __name__ == "__main__":
    main(parse_args())
