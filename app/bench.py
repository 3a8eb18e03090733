"""`ditstudio bench --model NAME [--model NAME2 ...]`: the user-facing sampling-speed benchmark.

Times each model side by side in one run, at the same settings: the saved sampler, `--steps` steps, guidance 4.0
(conditional and unconditional halves batched in one forward), a batch of `--batch` samples of a default class /
prompt per task, `output_type="np"` (VAE decode included). Per model: one warm-up sample (loading is not timed),
one untimed sample under FlopCounterMode, then the median of `--repeats` full samples (CUDA events + synchronize on a GPU, perf_counter on the CPU).

Reported per row: img/s and s/img (video models: videos/s, s/video, and frames/s), executed transformer GFLOPs per
sample (torch.utils.flop_counter.FlopCounterMode around every transformer call of one full sample, divided by the
batch: matmuls, convolutions and SDPA; the text encoder and VAE are in `pipeline_gflops`), peak memory (GPU:
torch.cuda.max_memory_allocated during the timed samples; CPU: growth of the process's peak RSS, which is 0 when an
earlier model already set a higher peak) and the speed-up over the first model. `run_bench` and `plot_bench` are what
the CLI and the UI's Benchmark tab call.
"""
from __future__ import annotations

import contextlib
import json
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from app.catalog import describe, resolve_model

DEFAULT_OUT = "bench/results/user_bench.json"
CFG = 4.0
DEFAULT_CLASS = 7
PROMPTS = {"text-to-image": "a red star in the top left and a big blue circle",
           "text-to-video": "a video of a green heart moving right"}
MAX_BATCH = 64


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="sampling speed of one or more models side by side: img/s, GFLOPs, memory")
    p.add_argument("--model", action="append", required=True,
                   help="a model's name (see `ditstudio models`), a model folder, or a named DiT size such as "
                        "DiT-XL/2 (random weights and a random SD-VAE-shaped VAE: speed does not depend on weight "
                        "values); repeat to compare")
    p.add_argument("--compile", default=None,
                   help="compile the transformers for sampling with a dit.fast preset (eager, default, cudagraphs, "
                        "max-autotune, fused); default: eager")
    p.add_argument("--fp8", action="store_true",
                   help="the transformers' block linears in FP8 (dit/fp8.py; tensor cores on Hopper / Ada GPUs)")
    p.add_argument("--models-dir", dest="models_dir", default=None, help="a folder of model folders to look in too")
    p.add_argument("--variant", action="append", default=None,
                   help="reserved for efficiency methods (none available yet: giving it is an error)")
    p.add_argument("--steps", default="25", help="sampling steps (default 25)")
    p.add_argument("--batch", default="1", help=f"samples per call, 1..{MAX_BATCH} (default 1)")
    p.add_argument("--size", default=None, help="image size in px; must be every model's resolution (default: it)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    p.add_argument("--repeats", default="3", help="timed samples per model; the median is reported (default 3)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT}); a .png plot beside it")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------- measuring
def _count(value, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"--{name} must be an integer; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer in [{low}, {high if high is not None else 'inf'}); got {value!r}"
                         if high is None else f"{name} must be an integer in [{low}, {high}]; got {value!r}")
    return value


def _sample(pipe, task: str, steps: int, batch: int, seed: int, device: str):
    generator = torch.Generator(device).manual_seed(seed)
    if task == "class-to-image":
        label = DEFAULT_CLASS % pipe.transformer.config.num_classes
        return pipe([label] * batch, num_inference_steps=steps, guidance_scale=CFG, generator=generator,
                    output_type="np")
    return pipe(PROMPTS[task], num_inference_steps=steps, guidance_scale=CFG, generator=generator,
                output_type="np", num_images_per_prompt=batch)


@contextlib.contextmanager
def _count_transformer_flops(pipe):
    """Adds up FlopCounterMode's total over every transformer call while active: yields a dict with "flops"."""
    counted = {"flops": 0}
    forward = pipe.transformer.forward

    def counting(*a, **k):
        with FlopCounterMode(display=False) as counter:
            out = forward(*a, **k)
        counted["flops"] += counter.get_total_flops()
        return out

    pipe.transformer.forward = counting
    try:
        yield counted
    finally:
        del pipe.transformer.forward  # back to the class's forward


def _timed(pipe, task, steps, batch, seed, device) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        _sample(pipe, task, steps, batch, seed, device)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    _sample(pipe, task, steps, batch, seed, device)
    return time.perf_counter() - t0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"


def _named_dit(name: str) -> dict | None:
    """A named class-conditional DiT size (DiT-XL/2, DiT-T/1, ...) as a benchmark subject, or None."""
    from dit.dit import DIT_CONFIGS

    if name not in DIT_CONFIGS:
        return None
    cfg = DIT_CONFIGS[name]
    # ImageNet sizes decode through the SD VAE (f8), the shapes sizes through the shipped shapes VAE (f4).
    factor = 8 if cfg["sample_size"] >= 32 else 4
    return {"name": f"{name} (random weights)", "task": "class-to-image", "resolution": cfg["sample_size"] * factor,
            "frames": None, "size_name": name, "vae_factor": factor}


def _random_dit_pipeline(info: dict, device: str, dtype: str):
    """Our pipeline around a named DiT size with random weights (std 1/sqrt(fan_in), so no layer is a trivial zero)
    and a random VAE of the SD layout (or the shipped shapes VAE): for timing only."""
    from diffusers import AutoencoderKL, DDIMScheduler

    from app.generate import check_dtype
    from dit.dit import DiT
    from dit.pipelines import ClassToImagePipeline

    g = torch.Generator().manual_seed(0)
    model = DiT.from_name(info["size_name"])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.ndim == 1 else p[0].numel() ** -0.5))
    if info["vae_factor"] == 8:
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    else:
        vae = AutoencoderKL.from_pretrained(Path(__file__).resolve().parents[1] / "weights" / "shapes-vae")
    pipe = ClassToImagePipeline(transformer=model.eval(), vae=vae.eval(), scheduler=DDIMScheduler())
    return pipe.to(device=device, dtype=check_dtype(dtype))


def run_bench(models, steps: int = 25, batch: int = 1, size: int | None = None, device: str | None = None,
              dtype: str = "float32", repeats: int = 3, variants=None, models_dir=None, progress=None,
              compile: str | None = None, fp8: bool = False) -> dict:
    """Benchmark `models` (names or folders) side by side; -> {"device", "torch", "date", "settings", "rows"}.

    Everything is checked before any model loads: ValueError for an unknown or non-generator model, a `size` that
    is not a model's resolution, bad numbers, device or dtype, or any `variants` (reserved). `progress(message)`,
    if given, is called as each model starts."""
    from app.generate import _GENERATE_LOCK, check_device, check_dtype, load_pipeline, make_sampler

    if variants:
        raise ValueError(f"--variant {', '.join(map(str, variants))}: no efficiency methods are available to "
                         "benchmark yet; leave --variant out to time the models as they are")
    models = [models] if isinstance(models, (str, Path)) else list(models)
    if not models:
        raise ValueError("no model given")
    steps, batch = _count(steps, "steps", 1), _count(batch, "batch", 1, MAX_BATCH)
    repeats = _count(repeats, "repeats", 1)
    if size is not None:
        size = _count(size, "size", 1)
    device = check_device(device)
    check_dtype(dtype)
    if compile is not None:
        from dit.fast import PRESETS

        if compile not in PRESETS:
            raise ValueError(f"--compile {compile!r}: unknown preset; valid: {', '.join(PRESETS)}")
    infos = []
    for model in models:
        named = _named_dit(str(model))
        if named is not None:
            if size is not None and size != named["resolution"]:
                raise ValueError(f"--size {size}: {model} generates {named['resolution']} px only")
            infos.append((str(model), None, named))
            continue
        folder = resolve_model(str(model), models_dir).resolve()
        info = describe(folder)
        if info["family"] == "var":
            raise ValueError(f"model {model} is a VAR (next-scale) model: bench times the diffusion models; VAR's "
                             "benchmark is bench/var_speed.py")
        if info["task"] not in PROMPTS and info["task"] != "class-to-image":
            raise ValueError(f"model {model} is a {info['task']}, not a generator: bench times class-to-image, "
                             "text-to-image and text-to-video models")
        if size is not None and size != info["resolution"]:
            raise ValueError(f"--size {size}: model {info['name']} generates {info['resolution']} px only")
        infos.append((str(model), folder, info))

    rows = []
    for model, folder, info in infos:
        if progress is not None:
            progress(f"benchmarking {info['name']}")
        task = info["task"]
        with _GENERATE_LOCK:  # the UI shares the cached pipelines
            if folder is None:
                pipe = _random_dit_pipeline(info, device, dtype)
            else:
                pipe = load_pipeline(folder, device, dtype)
                pipe.scheduler = make_sampler(folder, None)[0]
            if fp8:  # the block linears in FP8 (dit/fp8.py); put back below, as the compilation is
                from dit.fp8 import quantize_linears

                quantize_linears(pipe.transformer)
            rss_before = _peak_rss_mb()
            # One untimed sample to count FLOPs, before any compilation: torch.compile does not run under a dispatch
            # mode (FlopCounterMode). On torch 2.11 the compiled DiT-XL/2 then ran at its eager speed in the timed
            # samples (11.6 img/s against the benchmark's 20.5, H100, eighteenth session); on 2.14 fullgraph raises.
            with _count_transformer_flops(pipe) as transformer_flops, FlopCounterMode(display=False) as whole:
                _sample(pipe, task, steps, batch, 0, device)
            if compile is not None:
                from dit.fast import prepare_for_sampling

                prepare_for_sampling(pipe.transformer, compile)
            _sample(pipe, task, steps, batch, 0, device)  # the warm-up sample (compiles, tunes, allocates)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            times = [_timed(pipe, task, steps, batch, r + 1, device) for r in range(repeats)]
            if device.startswith("cuda"):
                peak_mb, peak_kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
            else:
                peak_mb, peak_kind = max(0.0, _peak_rss_mb() - rss_before), "cpu_peak_rss_growth"
        seconds = statistics.median(times)
        frames = info["frames"] or 1
        row = {"model": info["name"], "path": str(folder) if folder is not None else None, "task": task, "resolution": info["resolution"],
               "frames": info["frames"],
               "params": sum(p.numel() for p in pipe.transformer.parameters()),
               "tokens": (pipe.transformer.config.sample_size // pipe.transformer.config.patch_size) ** 2 * frames,
               "seconds": round(seconds, 4), "times": [round(t, 4) for t in times],
               "img_per_s": round(batch / seconds, 4), "s_per_img": round(seconds / batch, 4),
               "frames_per_s": round(batch * frames / seconds, 4) if info["frames"] else None,
               "gflops": round(transformer_flops["flops"] / batch / 1e9, 4),
               "pipeline_gflops": round(whole.get_total_flops() / batch / 1e9, 4),
               "peak_mem_mb": round(peak_mb, 1), "peak_mem_kind": peak_kind, "compile": compile or "eager",
               "fp8": bool(fp8)}
        if compile is not None:  # the loaded pipeline is cached for the UI: hand it back uncompiled
            from dit.fast import restore_eager

            restore_eager(pipe.transformer)
        if fp8:
            from dit.fp8 import restore_linears

            restore_linears(pipe.transformer)
        rows.append(row)
    for row in rows:
        row["speedup"] = round(rows[0]["s_per_img"] / row["s_per_img"], 3)
    rows[0]["speedup"] = 1.0
    return {"device": _device_name(device), "device_arg": device, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": "run_bench(" + ", ".join(f"{k}={v!r}" for k, v in dict(
                models=models, steps=steps, batch=batch, size=size, device=device, dtype=dtype,
                repeats=repeats, compile=compile, fp8=fp8).items()) + ")",
            "settings": {"steps": steps, "batch": batch, "cfg": CFG, "sampler": "saved with each model",
                         "dtype": dtype, "repeats": repeats, "size": size, "output_type": "np"},
            "rows": rows}


# ----------------------------------------------------------------------------------------------- reporting
def table(result: dict) -> str:
    header = ("model", "task", "img/s", "frames/s", "s/img", "GFLOPs/sample", "peak mem (MB)", "speed-up")
    rows = [(r["model"], r["task"], f"{r['img_per_s']:.3g}",
             "-" if r["frames_per_s"] is None else f"{r['frames_per_s']:.3g}", f"{r['s_per_img']:.3g}",
             f"{r['gflops']:.3g}", f"{r['peak_mem_mb']:.1f}", f"{r['speedup']:.2f}x") for r in result["rows"]]
    widths = [max(len(x[i]) for x in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_bench(result: dict, path: str | Path) -> Path:
    """A bar plot of img/s per model (s/img and speed-up on the bars) at `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 3.6))
    bars = ax.bar([r["model"] for r in rows], [r["img_per_s"] for r in rows], color="tab:blue")
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['s_per_img']:.3g} s\n{r['speedup']:.2f}x", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=8)
    s = result["settings"]
    ax.set_ylabel("samples / s (videos for video models)")
    ax.set_title(f"{result['device']}\n{s['steps']} steps, batch {s['batch']}, {s['dtype']}", fontsize=9)
    ax.margins(y=0.25)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _command(args) -> str:
    argv = ["ditstudio", "bench"]
    for m in args.model:
        argv += ["--model", m]
    for flag in ("models_dir", "steps", "batch", "size", "device", "dtype", "repeats", "compile", "out"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    if getattr(args, "fp8", False):
        argv.append("--fp8")
    return shlex.join(argv)


def run(args) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise ValueError(f"--out {out} must be a .json file (the plot goes beside it as .png)")
    result = run_bench(args.model, steps=args.steps, batch=args.batch,
                       size=None if args.size is None else args.size, device=args.device, dtype=args.dtype,
                       repeats=args.repeats, variants=args.variant, models_dir=args.models_dir,
                       progress=lambda msg: print(msg, file=sys.stderr, flush=True), compile=args.compile,
                       fp8=args.fp8)
    result["command"] = _command(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot = plot_bench(result, out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {out} and {plot}")
    return 0
