"""GPU sampling speed of our DiT family against diffusers at real sizes, random weights (speed does not depend on
them), bf16, in one run (issue 6). Not a test.

Workloads (the issue's):
  dit256    DiT-XL/2, 256 px, 50 DDIM steps, guidance 4.0 (batched cond + uncond), images per batch 1 / 8 / 32
  dit512    DiT-XL/2, 512 px, same sampler, 1 / 8 / 32
  pixart512 PixArt-α 512 px (28 layers, 16×72 heads, 120 T5 tokens), 20 DPM-Solver++ steps, guidance 4.5, 1 / 8
  latte512  Latte-1 (28 + 28 blocks, 16 frames, 512 px, 120 tokens): one guided forward (batch 2) and a 50-step
            estimate

For each workload, implementation (diffusers' model in diffusers' own pipeline; ours in ours) and compile preset
(dit/fast.py: eager, default, cudagraphs, max-autotune, fused) it measures, after a warm-up run that compiles:
img/s without the VAE and with the VAE decode, model FLOP utilisation (FLOPs of one forward counted by
FlopCounterMode × forwards / time / the GPU's dense bf16 peak), peak memory, compile time; for the eager and the
best preset a kernel-time split of one step (matrix products, attention, norms / elementwise, other) and the host
gap (wall − kernel time), plus the scheduler's own cost per run. Parity: the fast path's forward against the eager
bf16 forward, both against float32 (the criterion: within bf16 rounding, i.e. no worse than eager bf16).

    python bench/sample_dit.py --out bench/results/sample_dit.json                       # everything (long)
    python bench/sample_dit.py --workloads dit256 --presets eager,max-autotune --batches 32 --merge
    python bench/sample_dit.py --smoke --out /tmp/smoke.json                               # tiny sizes, CPU

Results are written after every measurement (`--merge` keeps earlier rows of the same file), so a device call that
runs out of time keeps what it measured; `--budget-s` skips what would not finish.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

# Run as a script, bench/ would come first on sys.path and bench/attention.py would shadow the attention package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from dit.fast import PRESETS, prepare_for_sampling, restore_eager  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s; MFU is reported against these.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}

XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28)
WORKLOADS = {
    "dit256": dict(kind="class", config=dict(XL, sample_size=32, patch_size=2, num_embeds_ada_norm=1000),
                   steps=50, cfg=4.0, sampler="ddim", batches=(1, 8, 32), pixels=256),
    "dit512": dict(kind="class", config=dict(XL, sample_size=64, patch_size=2, num_embeds_ada_norm=1000),
                   steps=50, cfg=4.0, sampler="ddim", batches=(1, 8, 32), pixels=512),
    "pixart512": dict(kind="text", config=dict(XL, sample_size=64, patch_size=2, caption_channels=4096,
                                               norm_type="ada_norm_single", norm_elementwise_affine=False,
                                               norm_eps=1e-6),
                      steps=20, cfg=4.5, sampler="dpm++", batches=(1, 8), pixels=512, text_tokens=120),
    # cross_attention_dim as in Latte-1's config (diffusers' LatteTransformer3DModel defaults to None).
    "latte512": dict(kind="video", config=dict(XL, sample_size=64, patch_size=2, caption_channels=4096,
                                               cross_attention_dim=1152, video_length=16, norm_type="ada_norm_single",
                                               activation_fn="gelu-approximate", attention_bias=True,
                                               norm_elementwise_affine=False, norm_eps=1e-6),
                     steps=50, cfg=4.5, sampler="ddim", batches=(1,), pixels=512, text_tokens=120, frames=16),
}
# Tiny stand-ins with the same structure, for --smoke on a CPU.
SMOKE = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2)
SMOKE_WORKLOADS = {
    "dit256": dict(WORKLOADS["dit256"], config=dict(SMOKE, sample_size=8, patch_size=2, num_embeds_ada_norm=1000),
                   steps=3, batches=(1, 2)),
    "pixart512": dict(WORKLOADS["pixart512"], config=dict(WORKLOADS["pixart512"]["config"], **SMOKE, sample_size=8,
                                                          caption_channels=32, cross_attention_dim=32),
                      steps=3, batches=(1,), text_tokens=7),
    "latte512": dict(WORKLOADS["latte512"], config=dict(WORKLOADS["latte512"]["config"], **SMOKE, sample_size=8,
                                                        caption_channels=32, video_length=3,
                                                        cross_attention_dim=32),
                     steps=3, text_tokens=7, frames=3),
}
# The SD VAE (f8, 4 latent channels) every workload decodes with.
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SMOKE_VAE = dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


# ----------------------------------------------------------------------------------------------- building
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights of std 1/sqrt(fan_in) (zero-initialised layers would make the work trivially cheap in places and
    hide mapping errors); per-block copies of diffusers' DiT embedder are kept identical, as in a real checkpoint,
    so that our one-embedder model can be converted from it."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm1.emb." in name and not name.startswith("transformer_blocks.0."):
                continue
            std = 1.0 if "embedding_table" in name else (0.02 if p.ndim == 1 else p[0].numel() ** -0.5)
            p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
        blocks = getattr(model, "transformer_blocks", [])
        if blocks and hasattr(blocks[0], "norm1") and hasattr(blocks[0].norm1, "emb"):
            emb0 = blocks[0].norm1.emb.state_dict()
            for block in blocks[1:]:
                block.norm1.emb.load_state_dict(emb0)


def build_models(w: dict, device, seed: int = 0):
    """(diffusers model, our model with the same weights), float32 on `device`."""
    from diffusers import DiTTransformer2DModel, LatteTransformer3DModel, PixArtTransformer2DModel

    from dit.loaders import dit_from_diffusers, latte_from_diffusers, pixart_from_diffusers

    cls, convert = {"class": (DiTTransformer2DModel, dit_from_diffusers),
                    "text": (PixArtTransformer2DModel, pixart_from_diffusers),
                    "video": (LatteTransformer3DModel, latte_from_diffusers)}[w["kind"]]
    theirs = cls(**w["config"])
    randomize_(theirs, seed)
    ours = convert(theirs)
    return theirs.to(device).eval(), ours.to(device).eval()


def build_vae(smoke: bool, device, seed: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**(SMOKE_VAE if smoke else SD_VAE)).to(device).eval()


def make_scheduler(name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    return DDIMScheduler() if name == "ddim" else DPMSolverMultistepScheduler()


def text_inputs(w: dict, batch: int, device, dtype, seed: int = 2):
    g = torch.Generator(device="cpu").manual_seed(seed)
    E, L = w["config"]["caption_channels"], w["text_tokens"]
    cond = torch.randn(batch, L, E, generator=g).to(device, dtype)
    neg = torch.randn(batch, L, E, generator=g).to(device, dtype)
    mask = torch.ones(batch, L, dtype=torch.long, device=device)
    return cond, neg, mask


# ----------------------------------------------------------------------------------------------- runners
def sampler_fn(w: dict, impl: str, model, vae, batch: int, device, dtype, with_vae: bool):
    """A closure running one whole sampling of `batch` outputs the way each library's pipeline does it."""
    steps, cfg = w["steps"], w["cfg"]
    gen = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731
    if w["kind"] == "class":
        labels = [i % w["config"]["num_embeds_ada_norm"] for i in range(batch)]
        if impl == "diffusers":
            from diffusers import DiTPipeline

            pipe = DiTPipeline(transformer=model, vae=vae, scheduler=make_scheduler(w["sampler"]))
            if not with_vae:
                return None  # DiTPipeline always decodes: its no-VAE time is (with VAE) - (VAE alone)
            return lambda: pipe(class_labels=labels, guidance_scale=cfg, num_inference_steps=steps,
                                generator=gen(), output_type="np")
        from dit.pipelines import ClassToImagePipeline

        pipe = ClassToImagePipeline(transformer=model, vae=vae, scheduler=make_scheduler(w["sampler"]))
        return lambda: pipe(class_labels=labels, guidance_scale=cfg, num_inference_steps=steps, generator=gen(),
                            output_type="np" if with_vae else "latent")
    if w["kind"] == "text":
        cond, neg, mask = text_inputs(w, batch, device, dtype)
        out = "np" if with_vae else "latent"
        if impl == "diffusers":
            from diffusers import PixArtAlphaPipeline

            pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=model,
                                       scheduler=make_scheduler(w["sampler"]))
            return lambda: pipe(prompt_embeds=cond, prompt_attention_mask=mask, negative_prompt=None,
                                negative_prompt_embeds=neg, negative_prompt_attention_mask=mask,
                                guidance_scale=cfg, num_inference_steps=steps, generator=gen(), output_type=out,
                                use_resolution_binning=False)
        from dit.text_pipelines import TextToImagePipeline

        pipe = TextToImagePipeline(transformer=model, vae=vae, scheduler=make_scheduler(w["sampler"]),
                                   text_encoder=None)
        return lambda: pipe(prompt_embeds=cond, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                            negative_prompt_attention_mask=mask, guidance_scale=cfg, num_inference_steps=steps,
                            generator=gen(), output_type=out)
    return None  # video: forward timing only (the 50-step estimate is steps × forward)


def forward_inputs(w: dict, impl: str, batch: int, device, dtype):
    """(args, kwargs) of one guided forward (2 × batch rows) in each library's calling convention."""
    cfg = w["config"]
    g = torch.Generator(device="cpu").manual_seed(3)
    S, C = cfg["sample_size"], cfg["in_channels"]
    rows = 2 * batch
    # One timestep broadcast to the guided batch (stride 0), as both libraries' pipelines pass it: a contiguous
    # tensor fails the compiled forward's stride guard in the pipeline's first call and compiles it a second time
    # (~40 s per compiled row at XL; seen on the CPU smoke with TORCH_LOGS=recompiles).
    t = torch.tensor([500], device=device, dtype=torch.long).expand(rows)
    if w["kind"] == "class":
        x = torch.randn(rows, C, S, S, generator=g).to(device, dtype)
        y = (torch.arange(rows) % cfg["num_embeds_ada_norm"]).to(device)
        return ((x, t, y), {}) if impl != "diffusers" else ((x,), dict(timestep=t, class_labels=y))
    cond, neg, mask = text_inputs(w, batch, device, dtype)
    text, keep = torch.cat([cond, neg]), torch.cat([mask, mask])
    shape = (rows, C, S, S) if w["kind"] == "text" else (rows, C, w["frames"], S, S)
    x = torch.randn(*shape, generator=g).to(device, dtype)
    if impl != "diffusers":
        # all tokens are kept, and our pipelines pass no mask then (dit/text_pipelines.py): the same call here
        return (x, t, text, None if bool(keep.all()) else keep.bool()), {}
    kw = dict(timestep=t, encoder_hidden_states=text)
    if w["kind"] == "text":  # as PixArtAlphaPipeline calls it (return_dict too: another guard of the compiled graph)
        kw.update(encoder_attention_mask=keep, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                  return_dict=False)
    # (diffusers' LattePipeline passes no text mask — its transformer mishandles one — and all tokens are kept here)
    return (x,), kw


def call_forward(impl: str, model, args, kwargs):
    out = model(*args, **kwargs)
    if impl != "diffusers":
        return out
    return out[0] if isinstance(out, tuple) else out.sample


# ----------------------------------------------------------------------------------------------- measuring
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int) -> list[float]:
    """Seconds per call (CUDA events on the GPU, wall clock on the CPU), after the caller's warm-up."""
    out = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            out.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def peak_memory(fn, device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def forward_flops(impl: str, model, args, kwargs) -> int:
    with FlopCounterMode(display=False) as counter:
        call_forward(impl, model, args, kwargs)
    return counter.get_total_flops()


KERNEL_CLASSES = (  # (class, substrings of CUDA kernel names), first match wins
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "softmax")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "triton_tem", "matmul", "sm90_", "sm80_", "ampere_")),
    ("norm/elementwise", ("triton_poi", "triton_red", "triton_per", "elementwise", "norm", "vectorized", "reduce",
                          "gelu", "silu", "mul", "add", "copy", "cat", "unrolled")),
)


def kernel_split(fn, device, classes=KERNEL_CLASSES, top: int = 14) -> dict | None:
    """Kernel time of one call by class (`classes`: (class, name substrings), first match wins), the number of
    kernels, the host gap (wall minus the union of kernel intervals) and the `top` kernels by time."""
    if torch.device(device).type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    split = {k: 0.0 for k, _ in classes}
    split["other"] = 0.0
    intervals, by_name = [], {}
    for ev in prof.events():
        if ev.device_type.name != "CUDA" or ev.device_time_total <= 0:
            continue
        name = ev.name.lower()
        kind = next((k for k, keys in classes if any(s in name for s in keys)), "other")
        split[kind] += ev.device_time_total / 1e6
        ms, n = by_name.get(ev.name, (0.0, 0))
        by_name[ev.name] = (ms + ev.device_time_total / 1e3, n + 1)
        intervals.append((ev.time_range.start, ev.time_range.end))
    busy, end = 0.0, -math.inf
    for a, b in sorted(intervals):  # union of kernel intervals (µs)
        if b > end:
            busy += b - max(a, end)
            end = b
    return {**{k: round(v * 1e3, 3) for k, v in split.items()}, "kernel_busy_ms": round(busy / 1e3, 3),
            "wall_ms": round(wall * 1e3, 3), "host_gap_ms": round(wall * 1e3 - busy / 1e3, 3),
            "kernels": len(intervals),
            # the kernels that take the time (name cut to 90 characters, ms over the call, launches)
            "top_kernels": [(k[:90], round(ms, 3), n) for k, (ms, n) in
                            sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]]}


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def peak_flops(device) -> float | None:
    name = device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def scheduler_cost(w: dict, device, dtype, reps: int) -> dict:
    """Seconds per sampling run of everything but the transformer: our shared loop (dit.pipelines.denoise: input
    scaling, the guided batch, the guidance combination, the scheduler step) with a model that costs nothing."""
    from types import SimpleNamespace

    from dit.pipelines import denoise

    cfg, out = {}, w["config"]["out_channels"]
    S = w["config"]["sample_size"]
    frames = (w["frames"],) if w["kind"] == "video" else ()
    for batch in w["batches"]:
        sched = make_scheduler(w["sampler"])
        pipe = SimpleNamespace(scheduler=sched, progress_bar=lambda it: it)
        zeros = torch.zeros(2 * batch, out, *frames, S, S, device=device, dtype=dtype)
        latents = torch.randn(batch, w["config"]["in_channels"], *frames, S, S, device=device, dtype=dtype)

        def run():
            sched.set_timesteps(w["steps"], device=device)
            return denoise(pipe, lambda x, t: zeros, latents, w["cfg"], None, None)

        run()
        cfg[batch] = round(statistics.median(timed(run, device, reps)), 5)
    return cfg


# ----------------------------------------------------------------------------------------------- main
def preset_order(presets: list[str], diffusers_presets: list[str]) -> list[str]:
    """Every preset either side runs under, diffusers' first: the baseline must be in every run (a run with
    --presets cudagraphs once measured ours alone, H100 2026-11-25, when diffusers ran only where the lists met)."""
    return list(dict.fromkeys([*diffusers_presets, *presets]))


def runs_under(impl: str, preset: str, presets: list[str], diffusers_presets: list[str]) -> bool:
    return preset in (diffusers_presets if impl == "diffusers" else presets)


def measure(args, name: str, w: dict, device, dtype, result: dict, save, deadline: float) -> None:
    theirs, ours = build_models(w, device)
    vae = build_vae(args.smoke, device).to(dtype)
    peak = peak_flops(device)
    models = {"diffusers": theirs, "ours": ours}

    # Parity first (float32 reference, then the cast), on one guided forward at the smallest batch.
    parity = {}
    b0 = w["batches"][0]
    ref_args = forward_inputs(w, "ours", b0, device, torch.float32)
    with torch.no_grad():
        ref = call_forward("ours", ours, *ref_args)
        ref_theirs = call_forward("diffusers", theirs, *forward_inputs(w, "diffusers", b0, device, torch.float32))
    parity["fp32_ours_vs_diffusers"] = rel(ref, ref_theirs)
    for model in models.values():
        model.to(dtype)
    with torch.no_grad():
        eager_out = call_forward("ours", ours, *forward_inputs(w, "ours", b0, device, dtype))
    parity["eager_bf16_vs_fp32"] = rel(eager_out, ref)
    for variant in args.fp8:  # our model with e4m3 block linears (dit/fp8.py), against the bf16 and float32 outputs
        import copy

        from dit.fp8 import fp8_supported, quantize_linears

        impl = "ours-fp8" + ("-fast" if variant == "fast" else "")
        models[impl] = copy.deepcopy(ours)
        quantize_linears(models[impl], fast_accum=variant == "fast")
        with torch.no_grad():
            fp8_out = call_forward(impl, models[impl], *forward_inputs(w, "ours", b0, device, dtype))
        parity[f"{impl}_vs_bf16"] = rel(fp8_out, eager_out)
        parity[f"{impl}_vs_fp32"] = rel(fp8_out, ref)
        parity["fp8_tensor_cores"] = fp8_supported(device)
        parity["fp8_bias_in_kernel"] = next(m.kernel_bias for m in models[impl].modules() if hasattr(m, "kernel_bias"))

    # Our eager forward under each attention backend (what `auto` picks is one of them), at the largest batch.
    if args.attention_backends:
        from attention import use_backend

        bmax = max(args.batches or w["batches"])
        fargs = forward_inputs(w, "ours", bmax, device, dtype)
        times = {}
        for backend in args.attention_backends.split(","):
            try:
                with use_backend(backend), torch.no_grad():
                    fwd = lambda: call_forward("ours", ours, *fargs)  # noqa: E731
                    fwd()
                    times[backend] = round(statistics.median(timed(fwd, device, args.reps)) * 1e3, 3)
            except Exception as e:  # noqa: BLE001 — a backend that cannot run this problem is a result too
                times[backend] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        result.setdefault("attention_backend_forward_ms", {})[f"{name}|batch {bmax}"] = times
        save()

    # VAE decode alone (latents of the workload's shape), per batch.
    vae_s = {}
    for batch in w["batches"]:
        if w["kind"] == "video":
            break
        z = torch.randn(batch, 4, w["config"]["sample_size"], w["config"]["sample_size"], device=device, dtype=dtype)
        with torch.no_grad():
            fn = lambda: vae.decode(z / vae.config.scaling_factor).sample  # noqa: E731
            fn()
            vae_s[batch] = statistics.median(timed(fn, device, args.reps))
    result.setdefault("vae_decode_s", {})[name] = vae_s
    result.setdefault("scheduler_s", {})[name] = scheduler_cost(w, device, dtype, args.reps)

    # FLOPs of one forward, counted once per (impl, batch) on the eager model: counting through a compiled model
    # does not work, and re-compiling after an eager detour would cost a second compile per row.
    flops = {}
    for impl, model in models.items():
        for batch in w["batches"]:
            if not args.batches or batch in args.batches:
                with torch.no_grad():
                    flops[impl, batch] = forward_flops(impl, model, *forward_inputs(w, impl, batch, device, dtype))

    for preset in preset_order(args.presets, args.diffusers_presets):
        for impl, model in models.items():
            if not runs_under(impl, preset, args.presets, args.diffusers_presets):
                continue
            restore_eager(model)
            # A fresh dynamo cache per (impl, preset): the same forward compiled under the previous presets at every
            # batch (and the pipeline's guided batch) would otherwise exhaust its recompile limit (a cudagraphs row
            # failed with FailOnRecompileLimitHit after the default preset's rows, H100 2026-11-24).
            torch._dynamo.reset()
            t_compile0 = time.perf_counter()
            prepare_for_sampling(model, preset, fullgraph=impl != "diffusers")
            for batch in w["batches"]:
                if args.batches and batch not in args.batches:
                    continue
                key = f"{name}|{impl}|{preset}|{batch}"
                if time.perf_counter() > deadline:
                    result["skipped"].append(key)
                    save()
                    continue
                row = {"workload": name, "impl": impl, "preset": preset, "batch": batch}
                try:
                    fargs = forward_inputs(w, impl, batch, device, dtype)
                    with torch.no_grad():
                        t1 = time.perf_counter()
                        fwd = lambda: call_forward(impl, model, *fargs)  # noqa: E731
                        out = fwd().clone()  # a CUDA-graph preset's output is overwritten by the next replay
                        fwd()
                        sync(device)
                        row["first_calls_s"] = round(time.perf_counter() - t1, 2)  # includes compiling this shape
                        row["forward_ms"] = round(statistics.median(timed(fwd, device, args.reps)) * 1e3, 3)
                        if impl == "ours" and batch == b0 and preset != "eager":
                            row["fast_vs_eager_bf16"] = rel(out, eager_out)
                            row["fast_vs_fp32"] = rel(out, ref)
                        row["forward_gflop"] = round(flops[impl, batch] / 1e9, 4)
                        if preset == "eager" or preset in args.split_preset.split(","):
                            row["split_one_forward"] = kernel_split(fwd, device)
                        for with_vae in (False, True):
                            run = sampler_fn(w, impl, model, vae, batch, device, dtype, with_vae)
                            if run is None:
                                continue
                            run()  # warm-up: compiles the pipeline's shapes, fills caches
                            s = statistics.median(timed(run, device, args.reps))
                            row["sample_s_vae" if with_vae else "sample_s"] = round(s, 4)
                        if "sample_s_vae" in row and "sample_s" not in row:  # diffusers' DiT: subtract the decode
                            row["sample_s"] = round(row["sample_s_vae"] - vae_s[batch], 4)
                        if w["kind"] == "video":
                            row["sample_s"] = round(w["steps"] * row["forward_ms"] / 1e3, 4)  # estimate: steps × fwd
                            row["sample_s_is_estimate"] = True
                        row["img_per_s"] = round(batch / row["sample_s"], 3)
                        if "sample_s_vae" in row:
                            row["img_per_s_vae"] = round(batch / row["sample_s_vae"], 3)
                        if peak:
                            row["mfu"] = round(row["forward_gflop"] * 1e9 / (row["forward_ms"] / 1e3) / peak, 4)
                        run = sampler_fn(w, impl, model, vae, batch, device, dtype, True) or fwd
                        row["peak_memory_gib"] = peak_memory(run, device)
                except torch.cuda.OutOfMemoryError as e:  # a result, not a crash: the other rows still run
                    row["error"] = f"out of memory: {str(e).splitlines()[0]}"
                    torch.cuda.empty_cache()
                except Exception as e:  # noqa: BLE001 — record and go on; the JSON says what failed
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                row["compile_and_run_s"] = round(time.perf_counter() - t_compile0, 1)
                result["rows"] = [r for r in result["rows"] if (r["workload"], r["impl"], r["preset"], r["batch"])
                                  != (name, impl, preset, batch)] + [row]
                save()
                print(json.dumps(row), flush=True)
            restore_eager(model)
    result.setdefault("parity", {})[name] = parity
    save()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/sample_dit.json")
    p.add_argument("--workloads", default=None, help="comma list of " + ", ".join(WORKLOADS))
    p.add_argument("--presets", default="eager,default,max-autotune,fused", help="comma list of " + ", ".join(PRESETS))
    p.add_argument("--batches", default=None, help="comma list (default: each workload's)")
    p.add_argument("--diffusers-presets", default="eager,default",
                   help="the presets diffusers' baseline is timed under (its best measured is torch.compile default)")
    p.add_argument("--split-preset", default="fused", help="the preset whose kernel split is recorded beside eager")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=1e9, help="skip measurements that would start after this")
    p.add_argument("--merge", action="store_true", help="keep the rows already in --out")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (runs on a CPU in under a minute)")
    p.add_argument("--attention-backends", default=None,
                   help="comma list of attention backends to time our eager forward under (e.g. "
                        "sdpa_cudnn,sdpa_flash,sdpa_efficient,flex)")
    p.add_argument("--fp8", nargs="?", const="accurate", default="",
                   help="also time our model with FP8 block linears (dit/fp8.py): comma list of 'accurate' (fp32 "
                        "promotion of the partial sums) and 'fast' (use_fast_accum); bare --fp8 = accurate")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    table = SMOKE_WORKLOADS if args.smoke else WORKLOADS
    names = args.workloads.split(",") if args.workloads else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; valid: {', '.join(table)}")
    args.presets = args.presets.split(",")
    bad = [x for x in args.presets if x not in PRESETS]
    if bad:
        p.error(f"unknown preset(s) {bad}; valid: {', '.join(PRESETS)}")
    args.diffusers_presets = args.diffusers_presets.split(",")
    args.fp8 = [v for v in args.fp8.split(",") if v]
    if set(args.fp8) - {"accurate", "fast"}:
        p.error(f"--fp8 takes accurate and/or fast, got {','.join(args.fp8)}")
    args.batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    if args.batches:  # a workload none of whose batch sizes was asked for would be skipped without a row
        idle = [n for n in names if not set(args.batches) & set(table[n]["batches"])]
        if idle:
            p.error(f"--batches {','.join(map(str, args.batches))} gives no batch size to "
                    + "; ".join(f"{n} (it runs {', '.join(map(str, table[n]['batches']))})" for n in idle))
    out = Path(args.out)
    result = json.loads(out.read_text()) if args.merge and out.is_file() else {"rows": []}
    command = " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv])
    result["commands"] = result.get("commands", []) + [command]  # with --merge, every run that added rows
    result.update(device=device_name(device), date=dt.date.today().isoformat(), torch=torch.__version__,
                  command=command,
                  dtype=str(dtype).replace("torch.", ""), smoke=args.smoke, skipped=[])

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")

    deadline = t0 + args.budget_s
    for name in names:
        measure(args, name, table[name], device, dtype, result, save, deadline)
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = ["| workload | impl | preset | batch | img/s (no VAE) | img/s (with VAE) | fwd ms | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["workload"], r["batch"], r["preset"], r["impl"])):
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['impl']} | {r['preset']} | {r['batch']} | {r['error']} |||||")
            continue
        lines.append(f"| {r['workload']} | {r['impl']} | {r['preset']} | {r['batch']} | {r.get('img_per_s', '')} | "
                     f"{r.get('img_per_s_vae', '')} | {r.get('forward_ms', '')} | {r.get('mfu', '')} | "
                     f"{'' if r.get('peak_memory_gib') is None else round(r['peak_memory_gib'], 2)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
