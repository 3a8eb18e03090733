"""`ditstudio generate --model NAME_OR_PATH --class-label LABEL --out FOLDER`: class -> image with our DiT.

The model is a saved diffusers `DiTPipeline` folder (model_index.json naming DiTPipeline) or a shipped model's name.
`generate_class_images` is the one function the CLI, the UI and the tests call; it seeds
`torch.Generator(device).manual_seed(seed)` and hands it to the pipeline as one would to diffusers' `DiTPipeline`,
so a seed gives diffusers' image. The CLI writes one PNG per image, with the settings as PNG text under the key
"ditstudio", and prints one JSON line per image.
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

from app.catalog import resolve_model

TASK = "class-to-image"
PIPELINE_CLASS = "DiTPipeline"  # the `_class_name` a class -> image model folder's model_index.json carries
METADATA_KEY = "ditstudio"  # PNG text chunk holding the settings as JSON
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_NUM = 64  # images per label in one call: all of them go through the model as one batch
LABELS_SHOWN = 8  # valid label names listed when a name is unknown

# The cached pipelines are shared between callers (the UI calls repeatedly, possibly from several threads), and a
# call swaps the scheduler: one generation at a time.
_GENERATE_LOCK = threading.Lock()


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="class -> image with a DiT model, written as PNGs with their settings")
    p.add_argument("--model", required=True, help="a shipped model's name or a saved diffusers DiTPipeline folder")
    p.add_argument("--class-label", required=True, dest="class_label",
                   help="class id (integer) or a class name from the model's id2label")
    # Numbers are parsed here rather than by argparse, so that a bad value is one clear line like every other error.
    p.add_argument("--steps", default="50", help="sampling steps (default 50)")
    p.add_argument("--cfg", default="4.0", help="classifier-free guidance scale, >= 0; 1 = no guidance (default 4)")
    p.add_argument("--sampler", default=None,
                   help="ddpm, ddim, dpm++ or euler (default: the scheduler saved with the model)")
    p.add_argument("--seed", default="0", help="seed of the torch.Generator (default 0)")
    p.add_argument("--num", default="1", help=f"images for the label, 1..{MAX_NUM} (default 1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    p.add_argument("--out", required=True, help="folder for the PNG files (created if missing)")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------- model folder
@functools.lru_cache(maxsize=32)
def _model_index(folder: Path) -> dict:
    path = folder / "model_index.json"
    if not path.is_file():
        raise ValueError(f"model {folder} is not a class -> image model: no model_index.json")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if index.get("_class_name") != PIPELINE_CLASS:
        raise ValueError(f"model {folder} is a {index.get('_class_name')!r}, not a class -> image "
                         f"{PIPELINE_CLASS} folder")
    return index


def pipeline_folder(model: str | Path) -> Path:
    """The saved `DiTPipeline` folder `model` names (a shipped model's name or a path); ValueError otherwise."""
    folder = resolve_model(str(model)).resolve()
    _model_index(folder)
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


@functools.lru_cache(maxsize=4)
def load_pipeline(folder: Path, device: str, dtype: str):
    """The folder's `ClassToImagePipeline` on `device` in `dtype`, loaded once per process and key."""
    from dit.pipelines import ClassToImagePipeline

    torch_dtype = check_dtype(dtype)
    # Weights load in float32; cast only for another dtype (the cast makes diffusers log a warning).
    pipe = ClassToImagePipeline.from_pretrained(folder, torch_dtype=None if torch_dtype is torch.float32
                                                else torch_dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=32)
def _saved_scheduler(folder: Path):
    """The scheduler saved with the model: every sampler is built from its config, so swaps never drift."""
    import diffusers

    library, name = _model_index(folder)["scheduler"]
    cls = getattr(diffusers, name, None) if library == "diffusers" else None
    if cls is None:
        raise ValueError(f"{folder}/model_index.json: scheduler {library}.{name} is not a diffusers scheduler")
    return cls.from_pretrained(folder, subfolder="scheduler")


def make_sampler(folder: Path, sampler: str | None):
    """A fresh scheduler: the saved one (sampler None) or the named kind from the saved config; and its name."""
    from dit.pipelines import SAMPLERS, make_scheduler

    saved = _saved_scheduler(folder)
    if sampler is None:
        name = next((n for n, cls in SAMPLERS.items() if type(saved) is cls), type(saved).__name__)
        return type(saved).from_config(saved.config), name
    return make_scheduler(sampler, saved.config), sampler  # raises on an unknown name, listing the valid ones


# ----------------------------------------------------------------------------------------------- generation
def _check_numbers(steps, cfg, seed, num) -> None:
    def is_int(x):
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    if isinstance(cfg, bool) or not isinstance(cfg, numbers.Real) or not math.isfinite(cfg) or cfg < 0:
        raise ValueError(f"cfg (guidance scale) must be a finite number >= 0; got {cfg!r}")
    if not is_int(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63); got {seed!r}")
    if not is_int(num) or not 1 <= num <= MAX_NUM:
        raise ValueError(f"num must be an integer in [1, {MAX_NUM}]; got {num!r}")


def generate_class_images(model: str | Path, labels: int | str | list[int | str], steps: int = 50, cfg: float = 4.0,
                          sampler: str | None = None, seed: int = 0, num: int = 1, device: str | None = None,
                          dtype: str = "float32") -> list[tuple[PIL.Image.Image, dict]]:
    """`num` images per label, in one batch (label 0 x num, label 1 x num, ...), as (image, settings) pairs.

    The batch is what diffusers' `DiTPipeline` would get as `class_labels`, with
    `generator=torch.Generator(device).manual_seed(seed)`; settings: model, task, label, steps, cfg, sampler, seed,
    index (position in the batch), size, device, dtype, seconds (the batch's wall time).
    """
    _check_numbers(steps, cfg, seed, num)
    device = check_device(device)
    check_dtype(dtype)
    folder = pipeline_folder(model)
    scheduler, sampler_name = make_sampler(folder, sampler)
    pipe = load_pipeline(folder, device, dtype)
    labels = labels if isinstance(labels, (list, tuple)) else [labels]
    if not labels:
        raise ValueError("no class label given")
    class_ids = [resolve_label(folder, y, pipe.transformer.config.num_classes) for y in labels]
    batch = [y for y in class_ids for _ in range(num)]

    with _GENERATE_LOCK:
        pipe.scheduler = scheduler
        start = time.perf_counter()
        images = pipe(batch, num_inference_steps=steps, guidance_scale=float(cfg),
                      generator=torch.Generator(device).manual_seed(seed), output_type="pil").images
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        seconds = round(time.perf_counter() - start, 3)
    return [(image, {"model": folder.name, "task": TASK, "label": y, "steps": steps, "cfg": float(cfg),
                     "sampler": sampler_name, "seed": seed, "index": i, "size": list(image.size),
                     "device": device, "dtype": dtype, "seconds": seconds})
            for i, (image, y) in enumerate(zip(images, batch))]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-") or "x"


def save_png(image: PIL.Image.Image, settings: dict, out: Path, date: str) -> Path:
    """`{date}_{model}_{label}_{seed}_{index}.png` under `out`, settings as PNG text; never overwrites a file."""
    stem = f"{date}_{_safe(settings['model'])}_{settings['label']}_{settings['seed']}_{settings['index']}"
    path, n = out / f"{stem}.png", 1
    while path.exists():
        path, n = out / f"{stem}-{n}.png", n + 1
    info = PngInfo()
    info.add_text(METADATA_KEY, json.dumps(settings))
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_settings(path: str | Path) -> dict:
    """The settings a PNG written by `ditstudio generate` carries."""
    with PIL.Image.open(path) as image:
        return json.loads(image.text[METADATA_KEY])


def _parse(kind, name: str, text: str):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise ValueError(f"--{name} must be {'an integer' if kind is int else 'a number'}; got {text!r}") from None


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    results = generate_class_images(
        args.model, args.class_label, steps=_parse(int, "steps", args.steps), cfg=_parse(float, "cfg", args.cfg),
        sampler=args.sampler, seed=_parse(int, "seed", args.seed), num=_parse(int, "num", args.num),
        device=args.device, dtype=args.dtype)
    out.mkdir(parents=True, exist_ok=True)
    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    for image, settings in results:
        path = save_png(image, settings, out, date)
        print(json.dumps({"path": str(path), "seed": settings["seed"], "model": settings["model"],
                          "settings": settings, "seconds": settings["seconds"]}), flush=True)
    return 0
