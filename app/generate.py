"""`ditstudio generate --model NAME_OR_PATH (--label LABEL | --prompt TEXT) --out FOLDER`: class -> image,
text -> image and text -> video with our DiT models, and class / text -> image with VAR (next-scale) models.

The model is a shipped model's name or a saved pipeline folder; its model_index.json `_class_name` picks the kind:
- "DiTPipeline" (a diffusers DiT folder) or "ClassToImagePipeline" (ours): class -> image, `--label`;
- "TextToImagePipeline": text -> image, `--prompt` (and `--negative-prompt`);
- "TextToVideoPipeline": text -> video, `--prompt` (and `--negative-prompt`);
- "VARPipeline" (vlm/var_pipeline.py): class -> image (a `VAR` transformer, `--label`) or text -> image (a `TextVAR`,
  `--prompt`), sampled scale by scale with `--cfg`, `--top-k`, `--top-p`; it has no steps, sampler or negative
  prompt, and the diffusion models take no top-k / top-p: either given to the other family is one clear error.
`load_pipeline` is the one loading entry (cached per folder, device, dtype). `generate_class_images`,
`generate_text_images`, `generate_videos` and `generate_var_images` are the functions the CLI, the UI and the tests
call; each seeds
`torch.Generator(device).manual_seed(seed)` and hands it to the pipeline as one would to diffusers' `DiTPipeline`,
so a seed gives diffusers' image. The CLI writes one PNG per image, with the settings as PNG text under the key
"ditstudio", and one animated GIF per video (settings as JSON in the GIF comment; `--save-frames` also writes each
frame as a PNG), and prints one JSON line per image or video. `--size PX` and `--frames F` (video) only confirm the
model's fixed resolution and frame count: any other value is one clear error before sampling.
"""
from __future__ import annotations

import functools
import json
import math
import numbers
import re
import threading
import time
from datetime import datetime
from pathlib import Path

import PIL.Image
import torch
from PIL.PngImagePlugin import PngInfo

from app.catalog import VAR_PIPELINE, VAR_TASKS, resolve_model

# model_index.json `_class_name` -> kind of model; the kinds' tasks (the settings' "task").
CLASS, TEXT, VIDEO = "class", "text", "video"
PIPELINE_KINDS = {"DiTPipeline": CLASS, "ClassToImagePipeline": CLASS, "TextToImagePipeline": TEXT,
                  "TextToVideoPipeline": VIDEO}
TASKS = {CLASS: "class-to-image", TEXT: "text-to-image", VIDEO: "text-to-video"}
TASK = TASKS[CLASS]
# VARPipeline folders: the transformer class model_index.json names -> kind (the catalog's task table, as kinds).
VAR_KINDS = {name: next(k for k, t in TASKS.items() if t == task) for name, task in VAR_TASKS.items()}
METADATA_KEY = "ditstudio"  # PNG text chunk holding the settings as JSON (GIFs: the comment holds the same JSON)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_NUM = 64  # images per label / prompt in one call: all of them go through the model as one batch
LABELS_SHOWN = 8  # valid label names listed when a name is unknown
DEFAULT_FPS = 4.0
PROMPT_IN_NAME = 40  # characters of the prompt kept in a file name
DEFAULT_STEPS = 50  # diffusion models' --steps

# The cached pipelines are shared between callers (the UI calls repeatedly, possibly from several threads), and a
# call swaps the scheduler: one generation at a time.
_GENERATE_LOCK = threading.Lock()


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="class -> image, text -> image or text -> video with a DiT or VAR model, "
                                        "written as PNGs / GIFs with their settings")
    p.add_argument("--model", required=True,
                   help="a shipped model's name or a saved pipeline folder (DiTPipeline, ClassToImagePipeline, "
                        "TextToImagePipeline, TextToVideoPipeline or VARPipeline)")
    p.add_argument("--label", "--class-label", dest="class_label", action="append", default=None,
                   help="class models: class id (integer) or a class name from the model's id2label; repeatable")
    p.add_argument("--prompt", action="append", default=None, help="text and video models: the prompt; repeatable")
    p.add_argument("--negative-prompt", dest="negative_prompt", default=None,
                   help="text and video models: the prompt guidance steers away from (default: the empty prompt)")
    # Numbers are parsed here rather than by argparse, so that a bad value is one clear line like every other error.
    p.add_argument("--steps", default=None,
                   help=f"diffusion models: sampling steps (default {DEFAULT_STEPS}); VAR samples one step per scale")
    p.add_argument("--cfg", default=None,
                   help="classifier-free guidance scale, >= 0; 1 = no guidance (default 4; a VAR model with a card: "
                        "the card's evaluation setting, as for --top-k / --top-p)")
    p.add_argument("--sampler", default=None,
                   help="diffusion models: ddpm, ddim, dpm++ or euler (default: the scheduler saved with the model)")
    p.add_argument("--top-k", dest="top_k", default=None,
                   help="VAR models: sample each token from the k most likely codes, an integer >= 0 (default 0: off)")
    p.add_argument("--top-p", dest="top_p", default=None,
                   help="VAR models: then from the smallest set of codes whose probability reaches p, in [0, 1] "
                        "(default 0: off; 1 is off too)")
    p.add_argument("--seed", default="0", help="seed of the torch.Generator (default 0)")
    p.add_argument("--num", default="1", help=f"images (videos) per label or prompt, 1..{MAX_NUM} (default 1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    p.add_argument("--compile", default=None, metavar="PRESET",
                   help="diffusion models: compile the transformer with a dit.fast preset (eager, default, "
                        "cudagraphs, max-autotune, fused; default: eager). The first batch pays the compilation; "
                        "worth it on a GPU for many batches (ditstudio bench --compile measures it)")
    p.add_argument("--fp8", action="store_true",
                   help="diffusion models: the transformer's block linears in FP8 (e4m3, per-row scales; dit/fp8.py): "
                        "tensor cores on Hopper / Ada GPUs, an exact emulation elsewhere (slower there). Measured on "
                        "an H100 with DiT-XL/2: docs/benchmarks.md")
    p.add_argument("--cuda-graphs", dest="cuda_graphs", action="store_true",
                   help="VAR models on --device cuda: replay the transformer as one CUDA graph per scale (recorded on "
                        "the first batch; the same tokens as without). Measured on an H100: VAR-d30 at batch 1 in "
                        "0.06 s instead of 0.29 s (docs/var.md)")
    p.add_argument("--fps", default=None, help=f"video models: GIF frames per second, > 0 (default {DEFAULT_FPS:g})")
    p.add_argument("--save-frames", dest="save_frames", action="store_true",
                   help="video models: also write every frame as a PNG")
    p.add_argument("--frames", default=None,
                   help="video models: frames per video; must be the model's own count (see `ditstudio models`)")
    p.add_argument("--size", default=None,
                   help="image size in px; must be the model's resolution (see `ditstudio models`)")
    p.add_argument("--out", required=True, help="folder for the PNG / GIF files (created if missing)")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------- model folder
def _index_folder(folder: Path) -> Path:
    """Where a model folder's model_index.json lives: the folder itself, or a DyDiT folder's base pipeline."""
    from app.catalog import DYDIT_CONFIG

    config = folder / DYDIT_CONFIG
    if not config.is_file():
        return folder
    base = json.loads(config.read_text()).get("base")
    if not base:
        raise ValueError(f"DyDiT model {folder} names no base pipeline in {DYDIT_CONFIG}")
    return (folder / base).resolve()


@functools.lru_cache(maxsize=32)
def _model_index(folder: Path) -> dict:
    folder = _index_folder(folder)
    path = folder / "model_index.json"
    if not path.is_file():
        raise ValueError(f"model {folder} is not a pipeline folder: no model_index.json")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(index, dict) or index.get("_class_name") not in (*PIPELINE_KINDS, VAR_PIPELINE):
        name = index.get("_class_name") if isinstance(index, dict) else None
        raise ValueError(f"model {folder} is a {name!r} folder; generate takes "
                         f"{', '.join([*PIPELINE_KINDS, VAR_PIPELINE])}")
    if index["_class_name"] == VAR_PIPELINE:
        transformer = (index.get("transformer") or [None, None])[-1]
        if transformer not in VAR_KINDS:
            raise ValueError(f"model {folder} is a VARPipeline with a {transformer!r} transformer; valid: "
                             f"{', '.join(VAR_KINDS)}")
    return index


def _kind(index: dict) -> str:
    if index["_class_name"] == VAR_PIPELINE:
        return VAR_KINDS[index["transformer"][-1]]
    return PIPELINE_KINDS[index["_class_name"]]


def pipeline_folder(model: str | Path) -> Path:
    """The saved pipeline folder `model` names (a shipped model's name or a path); ValueError otherwise."""
    folder = resolve_model(str(model)).resolve()
    _model_index(folder)
    return folder


def model_kind(model: str | Path) -> str:
    """"class", "text" or "video": what the model folder's `_class_name` (a VARPipeline: its transformer) makes it."""
    return _kind(_model_index(pipeline_folder(model)))


def is_var(model: str | Path) -> bool:
    """Whether the model is a next-scale VARPipeline folder (else a diffusion pipeline)."""
    return _model_index(pipeline_folder(model))["_class_name"] == VAR_PIPELINE


def var_scales(model: str | Path) -> int:
    """A VAR model's number of scales K (its sampling steps): the transformer config's patch_nums."""
    folder = pipeline_folder(model)
    config = folder / _model_index(folder)["component_folders"]["transformer"] / "config.json"
    return len(json.loads(config.read_text())["patch_nums"])


def check_kind(model: str | Path, kind: str) -> Path:
    """The model's folder, or a ValueError if it is not a model of `kind`."""
    folder = pipeline_folder(model)
    index = _model_index(folder)
    if _kind(index) != kind:
        raise ValueError(f"model {folder.name} is a {TASKS[_kind(index)]} model ({index['_class_name']}), "
                         f"not a {TASKS[kind]} model")
    return folder


def label_ids(folder: Path) -> dict[str, int]:
    """Class name -> id from the folder's `id2label`, read as diffusers' `DiTPipeline` reads it: every
    comma-separated alias of a class is a name of its own."""
    id2label = _model_index(folder).get("id2label") or {}
    names = {}
    for key, value in id2label.items():
        for name in str(value).split(","):
            names[name.strip()] = int(key)
    return dict(sorted(names.items()))


def resolve_label(folder: Path, label: int | str, num_classes: int) -> int:
    """An integer id (or its decimal text) in [0, num_classes), or a name from id2label."""
    if isinstance(label, bool):
        raise ValueError(f"class label must be an integer id or a class name; got {label!r}")
    if isinstance(label, numbers.Integral):
        class_id = int(label)
    elif isinstance(label, str) and re.fullmatch(r"\s*[+-]?\d+\s*", label):
        class_id = int(label)
    elif isinstance(label, str):
        names = label_ids(folder)
        if label.strip() not in names:
            if not names:
                raise ValueError(f"unknown class label {label!r}: model {folder.name} has no id2label; "
                                 f"give a class id in [0, {num_classes})")
            shown = ", ".join(repr(n) for n in list(names)[:LABELS_SHOWN])
            raise ValueError(f"unknown class label {label!r}; valid names include {shown} "
                             f"({len(names)} in all), or a class id in [0, {num_classes})")
        class_id = names[label.strip()]
    else:
        raise ValueError(f"class label must be an integer id or a class name; got {label!r}")
    if not 0 <= class_id < num_classes:
        raise ValueError(f"class id {class_id} out of range: model has classes [0, {num_classes})")
    return class_id


# ----------------------------------------------------------------------------------------------- loading
def check_device(device: str | None) -> str:
    """'cpu', 'cuda' or 'cuda:N' (None: cuda if available, else cpu); ValueError if CUDA is asked for but absent."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} asked for, but torch sees no CUDA device here")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _pipeline_class(index: dict):
    if index["_class_name"] == VAR_PIPELINE:
        from vlm.var_pipeline import VARPipeline
        return VARPipeline
    kind = _kind(index)
    if kind == CLASS:
        from dit.pipelines import ClassToImagePipeline
        return ClassToImagePipeline
    from dit.text_pipelines import TextToImagePipeline, TextToVideoPipeline
    return TextToImagePipeline if kind == TEXT else TextToVideoPipeline


@functools.lru_cache(maxsize=4)
def load_pipeline(folder: Path, device: str, dtype: str):
    """The folder's pipeline (`ClassToImagePipeline` for DiTPipeline / ClassToImagePipeline folders,
    `TextToImagePipeline`, `TextToVideoPipeline`, `VARPipeline`, by model_index.json `_class_name`) on `device` in
    `dtype`, loaded once per process and key."""
    torch_dtype = check_dtype(dtype)
    if _index_folder(folder) != folder:  # DyDiT: the base pipeline with the routed transformer (dit/dydit_io.py)
        from dit.dydit_io import load_dydit_pipeline

        pipe = load_dydit_pipeline(folder).to(device)
        pipe = pipe if torch_dtype is torch.float32 else pipe.to(dtype=torch_dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    cls = _pipeline_class(_model_index(folder))
    # Weights load in float32; cast only for another dtype (the cast makes diffusers log a warning).
    pipe = cls.from_pretrained(folder, torch_dtype=None if torch_dtype is torch.float32 else torch_dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=32)
def _saved_scheduler(folder: Path):
    """The scheduler saved with the model: every sampler is built from its config, so swaps never drift."""
    import diffusers

    index = _model_index(folder)
    library, name = index["scheduler"]
    cls = getattr(diffusers, name, None) if library == "diffusers" else None
    if cls is None:
        raise ValueError(f"{folder}/model_index.json: scheduler {library}.{name} is not a diffusers scheduler")
    # Text pipelines name their scheduler folder in component_folders; diffusers folders use scheduler/.
    subfolder = (index.get("component_folders") or {}).get("scheduler", "scheduler")
    return cls.from_pretrained((_index_folder(folder) / subfolder).resolve())


def make_sampler(folder: Path, sampler: str | None):
    """A fresh scheduler: the saved one (sampler None) or the named kind from the saved config; and its name."""
    from dit.pipelines import SAMPLERS, make_scheduler

    saved = _saved_scheduler(folder)
    if sampler is None:
        name = next((n for n, cls in SAMPLERS.items() if type(saved) is cls), type(saved).__name__)
        return type(saved).from_config(saved.config), name
    return make_scheduler(sampler, saved.config), sampler  # raises on an unknown name, listing the valid ones


# ----------------------------------------------------------------------------------------------- generation
def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_numbers(steps, cfg, seed, num) -> None:
    """steps None: a VAR model (one step per scale)."""
    if steps is not None and (not _is_int(steps) or steps < 1):
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    if isinstance(cfg, bool) or not isinstance(cfg, numbers.Real) or not math.isfinite(cfg) or cfg < 0:
        raise ValueError(f"cfg (guidance scale) must be a finite number >= 0; got {cfg!r}")
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63); got {seed!r}")
    if not _is_int(num) or not 1 <= num <= MAX_NUM:
        raise ValueError(f"num must be an integer in [1, {MAX_NUM}]; got {num!r}")


def check_compile(compile: str | None) -> str:
    """A dit.fast preset name (None: eager)."""
    from dit.fast import PRESETS

    preset = "eager" if compile is None else compile
    if preset not in PRESETS:
        raise ValueError(f"compile preset {compile!r} is unknown; valid: {', '.join(PRESETS)}")
    return preset


def _use_preset(pipe, folder: Path, preset: str) -> None:
    """Put the (cached, shared) pipeline's transformer in `preset`: compiled in place by dit.fast, or back to eager.
    A DyDiT transformer is refused: its token and width masks change the shapes with the timestep, so a
    whole-graph, static-shape compilation does not apply (its speed path is bench/dydit_speed.py)."""
    from dit.fast import prepare_for_sampling, preset_of, restore_eager

    model = pipe.transformer
    if preset != "eager" and getattr(model, "counter", None) is not None:
        raise ValueError(f"model {folder.name} is a DyDiT model: --compile applies to dense transformers only; "
                         "leave it out (eager)")
    if preset_of(model) == preset:
        return
    restore_eager(model)
    prepare_for_sampling(model, preset)


def _use_fp8(pipe, folder: Path, fp8: bool) -> None:
    """Give the (cached, shared) pipeline's transformer FP8 block linears (dit/fp8.py) or its float ones back. Done
    with the transformer eager: a compiled graph would keep the layers it was traced with."""
    from dit.fast import preset_of, restore_eager
    from dit.fp8 import is_quantized, quantize_linears, restore_linears

    model = pipe.transformer
    if fp8 and getattr(model, "counter", None) is not None:
        raise ValueError(f"model {folder.name} is a DyDiT model: --fp8 applies to dense transformers only")
    if fp8 == is_quantized(model):
        return
    if preset_of(model) != "eager":
        restore_eager(model)
    if fp8:
        quantize_linears(model)
    else:
        restore_linears(model)


def _prepare(model, kind: str, steps, cfg, seed, num, sampler, device, dtype, compile=None, fp8: bool = False):
    """The checks every generate_* runs, then (folder, pipeline, fresh scheduler, sampler name, device); the
    pipeline's transformer is left with FP8 block linears or not (`fp8`) and in the `compile` preset (dit.fast;
    None: eager)."""
    _check_numbers(steps, cfg, seed, num)
    device = check_device(device)
    check_dtype(dtype)
    preset = check_compile(compile)
    folder = check_kind(model, kind)
    if is_var(folder):
        raise ValueError(f"model {folder.name} is a VAR (next-scale) model: it has no steps or sampler; sample it "
                         "with generate_var_images")
    scheduler, sampler_name = make_sampler(folder, sampler)
    pipe = load_pipeline(folder, device, dtype)
    with _GENERATE_LOCK:
        _use_fp8(pipe, folder, bool(fp8))
        _use_preset(pipe, folder, preset)
    return folder, pipe, scheduler, sampler_name, device


def _sample(pipe, scheduler, device: str, seed: int, call):
    """`call(generator)` with the scheduler swapped in, under the lock; -> (its result, wall seconds, the executed
    FLOPs of a DyDiT model: `_flops_settings`)."""
    with _GENERATE_LOCK:
        if scheduler is not None:  # None: a VAR pipeline, which has none
            pipe.scheduler = scheduler
        counter = getattr(pipe.transformer, "counter", None)  # a DyDiT's MAC counter (dit/dydit.py)
        if counter is not None:
            counter.reset()
        start = time.perf_counter()
        result = call(torch.Generator(device).manual_seed(seed))
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        seconds = round(time.perf_counter() - start, 3)
        return result, seconds, _flops_settings(counter)


def _flops_settings(counter) -> dict:
    """For a DyDiT model (its transformer's MacCounter, dit/dydit.py), what the batch executed: flops_executed
    (executed / dense FLOPs of the transformer blocks) and gflops_dense / gflops_executed; nothing for a dense one."""
    if counter is None:
        return {}
    return {"flops_executed": round(counter.ratio, 4), "gflops_dense": round(2 * counter.dense / 1e9, 3),
            "gflops_executed": round(2 * counter.executed / 1e9, 3)}


def _settings(folder: Path, kind: str, steps, cfg, sampler_name, seed, device, dtype, seconds, **extra) -> dict:
    return {"model": folder.name, "task": TASKS[kind], **extra, "steps": steps, "cfg": float(cfg),
            "sampler": sampler_name, "seed": seed, "device": device, "dtype": dtype, "seconds": seconds}


def _compiled(compile: str | None, fp8: bool = False) -> dict:
    """The settings entries of a compiled or FP8 run (nothing otherwise, so plain settings stay as they were)."""
    return ({} if check_compile(compile) == "eager" else {"compile": compile}) | ({"fp8": True} if fp8 else {})


def generate_class_images(model: str | Path, labels: int | str | list[int | str], steps: int = 50, cfg: float = 4.0,
                          sampler: str | None = None, seed: int = 0, num: int = 1, device: str | None = None,
                          dtype: str = "float32", callback=None,
                          compile: str | None = None, fp8: bool = False) -> list[tuple[PIL.Image.Image, dict]]:
    """`num` images per label, in one batch (label 0 x num, label 1 x num, ...), as (image, settings) pairs.

    The batch is what diffusers' `DiTPipeline` would get as `class_labels`, with
    `generator=torch.Generator(device).manual_seed(seed)`; settings: model, task, label, index (position in the
    batch), size, steps, cfg, sampler, seed, device, dtype, seconds (the batch's wall time).
    `callback(step, t, latents)` runs after every scheduler step. `compile`: a dit.fast preset for the transformer
    (None: eager; recorded in the settings). `fp8`: the transformer's block linears in FP8 (dit/fp8.py: e4m3 tensor
    cores on Hopper / Ada GPUs, an exact emulation elsewhere; recorded in the settings).
    """
    folder, pipe, scheduler, sampler_name, device = _prepare(model, CLASS, steps, cfg, seed, num, sampler, device,
                                                             dtype, compile, fp8)
    labels = list(labels) if isinstance(labels, (list, tuple)) else [labels]
    if not labels:
        raise ValueError("no class label given")
    class_ids = [resolve_label(folder, y, pipe.transformer.config.num_classes) for y in labels]
    batch = [y for y in class_ids for _ in range(num)]
    images, seconds, flops = _sample(pipe, scheduler, device, seed, lambda generator: pipe(
        batch, num_inference_steps=steps, guidance_scale=float(cfg), generator=generator, output_type="pil",
        callback=callback).images)
    return [(image, _settings(folder, CLASS, steps, cfg, sampler_name, seed, device, dtype, seconds, label=y,
                              index=i, size=list(image.size), **flops, **_compiled(compile, fp8)))
            for i, (image, y) in enumerate(zip(images, batch))]


def _check_prompts(prompts, negative_prompt) -> tuple[list[str], str]:
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("no prompt given")
    bad = [x for x in prompts if not isinstance(x, str)]
    if bad:
        raise ValueError(f"every prompt must be a string; got {bad!r}")
    negative_prompt = "" if negative_prompt is None else negative_prompt
    if not isinstance(negative_prompt, str):
        raise ValueError(f"negative_prompt must be a string; got {negative_prompt!r}")
    return list(prompts), negative_prompt


def _generate_text(kind: str, model, prompts, steps, cfg, seed, num, sampler, negative_prompt, device, dtype,
                   callback, compile=None, fp8=False):
    prompts, negative_prompt = _check_prompts(prompts, negative_prompt)
    folder, pipe, scheduler, sampler_name, device = _prepare(model, kind, steps, cfg, seed, num, sampler, device,
                                                             dtype, compile, fp8)
    output = _sample(pipe, scheduler, device, seed, lambda generator: pipe(
        prompts, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=float(cfg),
        generator=generator, output_type="pil", callback=callback, num_images_per_prompt=num))
    batch = [prompt for prompt in prompts for _ in range(num)]  # the pipeline's prompt-major order
    return folder, output, batch, negative_prompt, sampler_name, device


def generate_text_images(model: str | Path, prompts: str | list[str], steps: int = 20, cfg: float = 4.5,
                         seed: int = 0, num: int = 1, sampler: str | None = None, negative_prompt: str | None = None,
                         device: str | None = None, dtype: str = "float32",
                         callback=None, compile: str | None = None,
                         fp8: bool = False) -> list[tuple[PIL.Image.Image, dict]]:
    """`num` images per prompt, in one batch (prompt-major), as (image, settings) pairs: `TextToImagePipeline` with
    `generator=torch.Generator(device).manual_seed(seed)`; settings: model, task, prompt, negative_prompt, index,
    size, steps, cfg, sampler, seed, device, dtype, seconds."""
    folder, (output, seconds, flops), batch, negative, sampler_name, device = _generate_text(
        TEXT, model, prompts, steps, cfg, seed, num, sampler, negative_prompt, device, dtype, callback, compile, fp8)
    return [(image, _settings(folder, TEXT, steps, cfg, sampler_name, seed, device, dtype, seconds, prompt=prompt,
                              negative_prompt=negative, index=i, size=list(image.size), **flops,
                              **_compiled(compile, fp8)))
            for i, (image, prompt) in enumerate(zip(output.images, batch))]


def generate_videos(model: str | Path, prompts: str | list[str], steps: int = 20, cfg: float = 4.5, seed: int = 0,
                    num: int = 1, sampler: str | None = None, negative_prompt: str | None = None,
                    device: str | None = None, dtype: str = "float32",
                    callback=None, compile: str | None = None,
                    fp8: bool = False) -> list[tuple[list[PIL.Image.Image], dict]]:
    """`num` videos per prompt, as (frames, settings) pairs, frames a list of F PIL images: `TextToVideoPipeline`
    with `generator=torch.Generator(device).manual_seed(seed)`; settings as `generate_text_images`' plus
    num_frames."""
    folder, (output, seconds, flops), batch, negative, sampler_name, device = _generate_text(
        VIDEO, model, prompts, steps, cfg, seed, num, sampler, negative_prompt, device, dtype, callback, compile, fp8)
    return [(frames, _settings(folder, VIDEO, steps, cfg, sampler_name, seed, device, dtype, seconds, prompt=prompt,
                               negative_prompt=negative, index=i, size=list(frames[0].size),
                               num_frames=len(frames), **flops, **_compiled(compile, fp8)))
            for i, (frames, prompt) in enumerate(zip(output.frames, batch))]


def card_sampling(folder: Path) -> dict:
    """The sampling settings (cfg, top_k, top_p) a model card's evaluation used; {} without a card."""
    path = Path(folder) / "card.json"
    if not path.is_file():
        return {}
    ev = json.loads(path.read_text()).get("eval") or {}
    return {k: ev[k] for k in ("cfg", "top_k", "top_p") if k in ev}


def check_top_k_top_p(top_k, top_p) -> None:
    """VAR's token filters: top_k an integer >= 0 (0 or >= the vocabulary: off), top_p in [0, 1] (0 or 1: off)."""
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"top-k must be an integer >= 0 (0 = off); got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not math.isfinite(top_p) \
            or not 0 <= top_p <= 1:
        raise ValueError(f"top-p must be a number in [0, 1] (0 = off); got {top_p!r}")


def generate_var_images(model: str | Path, prompts: int | str | list[int | str], cfg: float = 4.0, seed: int = 0,
                        num: int = 1, top_k: int = 0, top_p: float = 0.0, device: str | None = None,
                        dtype: str = "float32", callback=None, cuda_graphs: bool = False
                        ) -> list[tuple[PIL.Image.Image, dict]]:
    """`num` images per class label (a class VAR: ids or id2label names) or prompt (a text VAR), in one batch
    (prompt-major), as (image, settings) pairs: `VARPipeline` with `guidance_scale=cfg`, `top_k`, `top_p` and
    `generator=torch.Generator(device).manual_seed(seed)`; settings: model, task, family "var", label or prompt,
    index, size, scales (K, VAR's steps), cfg, top_k, top_p, seed, device, dtype, seconds.
    `callback(k, K, tokens, f_hat)` runs after every scale (`pipe.preview(f_hat)` gives its images).
    `cuda_graphs`: the transformer replayed as one CUDA graph per scale (vlm.var_graphs; needs a CUDA device)."""
    _check_numbers(None, cfg, seed, num)
    check_top_k_top_p(top_k, top_p)
    device = check_device(device)
    if cuda_graphs and not str(device).startswith("cuda"):
        raise ValueError(f"--cuda-graphs needs --device cuda (got {device})")
    check_dtype(dtype)
    folder = pipeline_folder(model)
    index = _model_index(folder)
    if index["_class_name"] != VAR_PIPELINE:
        raise ValueError(f"model {folder.name} is a diffusion model, not a VAR model: it takes steps and a sampler, "
                         "not top-k / top-p")
    kind = _kind(index)
    pipe = load_pipeline(folder, device, dtype)
    if kind == CLASS:
        labels = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        if not labels:
            raise ValueError("no class label given")
        items = [resolve_label(folder, y, pipe.transformer.config.num_classes) for y in labels]
        what = "label"
    else:
        items, _ = _check_prompts(prompts, None)
        what = "prompt"
    output, seconds, _ = _sample(pipe, None, device, seed, lambda generator: pipe(
        items, guidance_scale=float(cfg), top_k=int(top_k), top_p=float(top_p), generator=generator,
        num_images_per_prompt=num, output_type="pil", callback=callback, cuda_graphs=cuda_graphs))
    batch = [item for item in items for _ in range(num)]  # the pipeline's prompt-major order
    scales = len(pipe.transformer.patch_nums)
    return [(image, {"model": folder.name, "task": TASKS[kind], "family": "var", what: item, "index": i,
                     "size": list(image.size), "scales": scales, "cfg": float(cfg), "top_k": int(top_k),
                     "top_p": float(top_p), "seed": seed, "device": device, "dtype": dtype, "seconds": seconds})
            for i, (image, item) in enumerate(zip(output.images, batch))]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-") or "x"


def _free_path(out: Path, stem: str, suffix: str) -> Path:
    path, n = out / f"{stem}{suffix}", 1
    while path.exists():
        path, n = out / f"{stem}-{n}{suffix}", n + 1
    return path


def _stem(settings: dict, date: str) -> str:
    """`{date}_{model}_{label or prompt}_{seed}_{index}`: '_' separates the fields."""
    what = settings["label"] if "label" in settings else _safe(settings["prompt"])[:PROMPT_IN_NAME].strip("-.") or "x"
    return f"{date}_{_safe(settings['model'])}_{what}_{settings['seed']}_{settings['index']}"


def save_png(image: PIL.Image.Image, settings: dict, out: Path, date: str, stem: str | None = None) -> Path:
    """`{date}_{model}_{label or prompt}_{seed}_{index}.png` under `out`, settings as PNG text; never overwrites a
    file."""
    path = _free_path(out, stem or _stem(settings, date), ".png")
    info = PngInfo()
    info.add_text(METADATA_KEY, json.dumps(settings))
    image.save(path, format="PNG", pnginfo=info)
    return path


def save_gif(frames: list[PIL.Image.Image], settings: dict, out: Path, date: str, fps: float = DEFAULT_FPS,
             write_frames: bool = False) -> tuple[Path, list[Path]]:
    """An animated GIF (looping, 1000/fps ms per frame, settings JSON as its comment) and, with `write_frames`,
    each frame as `{stem}_f{k}.png` (exact pixels; the GIF's palette may change them). Never overwrites a file.
    Note: the GIF writer merges consecutive identical frames (their durations add up)."""
    path = _free_path(out, _stem(settings, date), ".gif")
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                   duration=round(1000 / fps), comment=json.dumps(settings))
    frame_paths = [save_png(frame, {**settings, "frame": k}, out, date, stem=f"{path.stem}_f{k}")
                   for k, frame in enumerate(frames)] if write_frames else []
    return path, frame_paths


def read_settings(path: str | Path) -> dict:
    """The settings a PNG or GIF written by `ditstudio generate` carries."""
    with PIL.Image.open(path) as image:
        if image.format == "GIF":
            comment = image.info.get("comment", b"")
            return json.loads(comment.decode() if isinstance(comment, bytes) else comment)
        return json.loads(image.text[METADATA_KEY])


def _parse(kind, name: str, text: str):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise ValueError(f"--{name} must be {'an integer' if kind is int else 'a number'}; got {text!r}") from None


def _check_flags(args, kind: str, name: str, var: bool = False) -> None:
    """The options the model's kind (and family: VAR or diffusion) takes: one clear error for one of another."""
    what = f"model {name} is a {TASKS[kind]} model"
    if var:
        wrong = [flag for flag, value in (("--steps", args.steps), ("--sampler", args.sampler),
                                          ("--negative-prompt", args.negative_prompt),
                                          ("--compile", getattr(args, "compile", None)),
                                          ("--fp8", getattr(args, "fp8", False) or None)) if value is not None]
        if wrong:
            raise ValueError(f"model {name} is a VAR (next-scale) model: it samples one step per scale and takes "
                             f"no {' / '.join(wrong)} (its options: --cfg, --top-k, --top-p)")
    else:
        wrong = [flag for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p),
                                          ("--cuda-graphs", getattr(args, "cuda_graphs", False) or None))
                 if value is not None]
        if wrong:
            raise ValueError(f"{what}: {' / '.join(wrong)} only appl{'ies' if len(wrong) == 1 else 'y'} to VAR "
                             "(next-scale) models, not to this diffusion model")
    if kind == CLASS:
        wrong = [flag for flag, value in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt))
                 if value is not None]
        if wrong:
            raise ValueError(f"{what}: it takes --label, not {' / '.join(wrong)}")
        if not args.class_label:
            raise ValueError(f"{what}: give --label (a class id or name)")
    else:
        if args.class_label:
            raise ValueError(f"{what}: it takes --prompt, not --label")
        if not args.prompt:
            raise ValueError(f"{what}: give --prompt")
    if kind != VIDEO:
        wrong = [flag for flag, value in (("--fps", args.fps is not None), ("--frames", args.frames is not None),
                                          ("--save-frames", args.save_frames)) if value]
        if wrong:
            raise ValueError(f"{what}: {' / '.join(wrong)} only apply to text-to-video models")


def _check_shape(args, folder: Path) -> None:
    """--size and --frames must be what the model generates (its transformer has fixed positions)."""
    from app.catalog import describe

    info = describe(folder)
    if args.size is not None:
        size = _parse(int, "size", args.size)
        if size != info["resolution"]:
            raise ValueError(f"--size {size}: model {folder.name} generates {info['resolution']} px images only; "
                             f"give --size {info['resolution']} or leave it out")
    if args.frames is not None:
        frames = _parse(int, "frames", args.frames)
        if frames != info["frames"]:
            raise ValueError(f"--frames {frames}: model {folder.name} generates exactly {info['frames']} frames "
                             f"(its temporal positions are fixed); give --frames {info['frames']} or leave it out")


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    kind, var = model_kind(args.model), is_var(args.model)
    _check_flags(args, kind, args.model, var)
    _check_shape(args, pipeline_folder(args.model))
    fps = DEFAULT_FPS
    if kind == VIDEO and args.fps is not None:
        fps = _parse(float, "fps", args.fps)
        if not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"--fps must be a finite number > 0; got {args.fps!r}")
    # VAR models sample best at the settings their card was evaluated with (docs/var.md): those are the defaults
    # for what the command line leaves out; diffusion models and card-less folders keep 4 / off / off.
    card = card_sampling(pipeline_folder(args.model)) if var else {}
    cfg = args.cfg if args.cfg is not None else str(card.get("cfg", 4.0))
    numbers_ = dict(cfg=_parse(float, "cfg", cfg), seed=_parse(int, "seed", args.seed),
                    num=_parse(int, "num", args.num))
    if var:
        top_k = args.top_k if args.top_k is not None else str(card.get("top_k", 0))
        top_p = args.top_p if args.top_p is not None else str(card.get("top_p", 0.0))
        filters = dict(top_k=_parse(int, "top-k", top_k), top_p=_parse(float, "top-p", top_p))
        results = generate_var_images(args.model, args.class_label if kind == CLASS else args.prompt,
                                      device=args.device, dtype=args.dtype, cuda_graphs=args.cuda_graphs,
                                      **filters, **numbers_)
    else:
        steps = _parse(int, "steps", str(DEFAULT_STEPS) if args.steps is None else args.steps)
        common = dict(sampler=args.sampler, device=args.device, dtype=args.dtype, steps=steps,
                      compile=check_compile(args.compile), fp8=args.fp8, **numbers_)
        if kind == CLASS:
            labels = args.class_label if len(args.class_label) > 1 else args.class_label[0]
            results = generate_class_images(args.model, labels, **common)
        elif kind == TEXT:
            results = generate_text_images(args.model, args.prompt, negative_prompt=args.negative_prompt, **common)
        else:
            results = generate_videos(args.model, args.prompt, negative_prompt=args.negative_prompt, **common)
    out.mkdir(parents=True, exist_ok=True)
    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    for result, settings in results:
        record = {}
        if kind == VIDEO:
            settings = {**settings, "fps": fps}
            path, frame_paths = save_gif(result, settings, out, date, fps=fps, write_frames=args.save_frames)
            record["frames"] = [str(f) for f in frame_paths]
        else:
            path = save_png(result, settings, out, date)
        print(json.dumps({"path": str(path), **record, "seed": settings["seed"], "model": settings["model"],
                          "settings": settings, "seconds": settings["seconds"]}), flush=True)
    return 0
