"""Where models are found: the shipped defaults under `weights/` in the repository (or DITSTUDIO_MODELS_DIR),
each a diffusers-style folder with a `config.json` (or `model_index.json`) and a model card `README.md`."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# A DyDiT folder (dit/dydit_io.py): routers (+ TD-LoRA) on a dense base pipeline it references by relative path.
DYDIT_CONFIG = "dydit_config.json"
SHIPPED_DIR = REPO_ROOT / "weights"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    task: str
    size_bytes: int


def models_dir() -> Path:
    return Path(os.environ.get("DITSTUDIO_MODELS_DIR", SHIPPED_DIR))


_models_dir = models_dir  # for functions whose `models_dir` argument shadows the name


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _task_of(folder: Path) -> str:
    if (folder / DYDIT_CONFIG).is_file():
        return "DyDiT"
    for name in ("model_index.json", "config.json"):
        cfg = folder / name
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"{cfg} is not valid JSON: {exc}") from exc
            return str(data.get("ditstudio_task") or data.get("_class_name") or "unknown")
    return "unknown"


def list_models(directory: Path | None = None) -> list[ModelEntry]:
    """Every model folder directly under `directory` (default: the shipped models)."""
    root = Path(directory) if directory is not None else models_dir()
    if not root.is_dir():
        return []
    entries = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if any((folder / n).is_file() for n in ("config.json", "model_index.json", DYDIT_CONFIG)):
            entries.append(ModelEntry(folder.name, folder, _task_of(folder), _folder_bytes(folder)))
    return entries


def resolve_model(name_or_path: str, models_dir: str | Path | None = None) -> Path:
    """A path to a model folder, or a model's name: one in `models_dir` (if given) or a shipped one (see
    `ditstudio models`)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    known = {m.name: m.path for m in list_models()}
    if models_dir is not None:
        extra = Path(models_dir)
        if not extra.is_dir():
            raise ValueError(f"--models-dir {extra} is not a folder")
        known.update({p.name: p for p in _scan(extra) if p.name not in known})
    if name_or_path in known:
        return known[name_or_path]
    where = str(_models_dir()) + (f" or {models_dir}" if models_dir is not None else "")
    raise ValueError(f"unknown model {name_or_path!r}: not a folder, and not one of the known models "
                     f"({', '.join(sorted(known)) or 'none found in ' + where})")


# ----------------------------------------------------------------------------------------------- describing folders
# model_index.json `_class_name` -> task of a generator folder (app.generate.PIPELINE_KINDS maps the same names to
# kinds; kept here too so the catalog never imports torch). Folders with a plain config.json (the shipped VAE and
# CLIP) are components: task "component", not servable on their own.
PIPELINE_TASKS = {"DiTPipeline": "class-to-image", "ClassToImagePipeline": "class-to-image",
                  "TextToImagePipeline": "text-to-image", "TextToVideoPipeline": "text-to-video"}
# A saved vlm.var_pipeline.VARPipeline (next-scale prediction): its transformer class decides the task.
VAR_PIPELINE = "VARPipeline"
VAR_TASKS = {"VAR": "class-to-image", "TextVAR": "text-to-image"}
COMPONENT = "component"
SOURCES = ("shipped", "models-dir", "path")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path.name} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def _component_path(folder: Path, index: dict, name: str) -> Path:
    """Where a pipeline folder keeps component `name`: its component_folders entry (our pipelines reference the
    shared VAE / text encoder) or the diffusers default `name/`."""
    referenced = (index.get("component_folders") or {}).get(name)
    return (folder / referenced).resolve() if referenced else folder / name


def vae_scale_factor(vae_config: dict) -> int:
    """Pixels per latent pixel, as diffusers computes it: 2 ** (number of VAE blocks - 1)."""
    blocks = vae_config.get("block_out_channels")
    if not isinstance(blocks, list) or not blocks:
        raise ValueError("VAE config.json has no block_out_channels")
    return 2 ** (len(blocks) - 1)


def describe_dydit(folder: Path) -> dict:
    """A DyDiT folder: its base pipeline's task, resolution and frames, plus method "DyDiT", lam (the trained
    target FLOPs ratio) and flops_executed (the executed / dense block FLOPs its card measured over sampling runs,
    None if not measured); size_bytes is the folder itself (routers, adapters), the base is in `uses`."""
    config = _read_json(folder / DYDIT_CONFIG)
    if config.get("format") != "dydit" or not config.get("base"):
        raise ValueError(f"{DYDIT_CONFIG} is not a DyDiT config with a base model")
    base = (folder / config["base"]).resolve()
    try:
        info = describe(base)
    except ValueError as exc:
        raise ValueError(f"its base model {config['base']} cannot be served: {exc}") from exc
    if info["task"] == COMPONENT:
        raise ValueError(f"its base model {config['base']} is a bare transformer; the app needs a pipeline folder")
    card = _read_json(folder / "card.json") if (folder / "card.json").is_file() else {}
    measured = (card.get("comparison") or {}).get("sampling_flops_ratio")
    return {**info, "name": folder.name, "path": str(folder), "class_name": "DyDiT",
            "transformer": f"DyDiT({info['transformer']})", "uses": sorted({str(base), *info["uses"]}),
            "method": "DyDiT", "lam": config.get("lam"), "flops_executed": measured, "base": base.name}


def _referenced(folder: Path, index: dict) -> list[str]:
    """The component folders a pipeline folder references outside itself (shared VAE, tokenizer, text encoder)."""
    return sorted({str(_component_path(folder, index, n)) for n in (index.get("component_folders") or {})
                   if not _component_path(folder, index, n).is_relative_to(folder.resolve())})


def describe_diffusion(folder: Path, index: dict) -> dict:
    """The fields of a diffusion pipeline folder (PIPELINE_TASKS): resolution = transformer sample_size x VAE
    downsampling, frames for video models, family "dit"."""
    name = index["_class_name"]
    transformer_dir, vae_dir = _component_path(folder, index, "transformer"), _component_path(folder, index, "vae")
    for what, path in (("transformer", transformer_dir), ("VAE", vae_dir)):
        if not (path / "config.json").is_file():
            raise ValueError(f"{what} config {path / 'config.json'} not found")
    transformer = _read_json(transformer_dir / "config.json")
    vae = _read_json(vae_dir / "config.json")
    sample_size = transformer.get("sample_size")
    if not isinstance(sample_size, int) or isinstance(sample_size, bool) or sample_size < 1:
        raise ValueError(f"transformer config has no valid sample_size ({sample_size!r})")
    info = {"task": PIPELINE_TASKS[name], "class_name": name, "transformer": transformer.get("_class_name"),
            "resolution": sample_size * vae_scale_factor(vae), "family": "dit", "uses": _referenced(folder, index)}
    if info["task"] == "text-to-video":
        frames = transformer.get("num_frames")
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
            raise ValueError(f"video transformer config has no valid num_frames ({frames!r})")
        info["frames"] = frames
    reference = transformer_dir / "image_model.json"  # a video transformer saved over its image model (dit/latte.py)
    if reference.is_file():
        image = (transformer_dir / str(_read_json(reference).get("image_model", ""))).resolve()
        if not (image / "config.json").is_file():
            raise ValueError(f"its transformer is saved over the image model at {image}, which is not there")
        info["uses"] = sorted({*info["uses"], str(image)})
    return info


def describe_var(folder: Path, index: dict) -> dict:
    """The fields of a VARPipeline folder (vlm/var_pipeline.py): task from its transformer class (VAR: class-to-image,
    TextVAR: text-to-image, which also needs its referenced text encoder), resolution = the tokenizer's
    sample_size, family "var"."""
    transformer_name = (index.get("transformer") or [None, None])[-1]
    if transformer_name not in VAR_TASKS:
        raise ValueError(f"model_index.json names a {transformer_name!r} VAR transformer; valid: "
                         f"{', '.join(VAR_TASKS)}")
    needed = [("transformer", "transformer"), ("tokenizer", "vqvae")]
    if transformer_name == "TextVAR":
        needed.append(("text encoder", "text_encoder"))
    folders = index.get("component_folders") or {}
    for what, name in needed:
        if name not in folders:
            raise ValueError(f"model_index.json has no component_folders entry for the {what} ({name!r})")
        if not (_component_path(folder, index, name) / "config.json").is_file():
            raise ValueError(f"{what} config {_component_path(folder, index, name) / 'config.json'} not found")
    tokenizer = _read_json(_component_path(folder, index, "vqvae") / "config.json")
    size = tokenizer.get("sample_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tokenizer config has no valid sample_size ({size!r})")
    return {"task": VAR_TASKS[transformer_name], "class_name": VAR_PIPELINE, "transformer": transformer_name,
            "resolution": size, "family": "var", "uses": _referenced(folder, index)}


def describe(folder: str | Path) -> dict:
    """Metadata of one model folder: name, path, task (class-to-image, text-to-image, text-to-video or component),
    class_name, family ("var" for next-scale VARPipeline folders, "dit" for the diffusion pipelines, None for
    components), size_bytes / size_mb (the folder itself; referenced shared components are listed in `uses`, not
    counted), resolution (px: transformer sample_size x VAE downsampling; VAR: the tokenizer's sample_size), frames
    (video models, else None), transformer (its class name) and uses. Raises ValueError with a reason for an
    unreadable or unknown folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    info = {"name": folder.name, "path": str(folder), "task": None, "class_name": None, "resolution": None,
            "frames": None, "transformer": None, "uses": [], "method": None, "lam": None, "flops_executed": None,
            "family": None}
    index_path, config_path = folder / "model_index.json", folder / "config.json"
    if (folder / DYDIT_CONFIG).is_file():
        info = describe_dydit(folder)
    elif index_path.is_file():
        index = _read_json(index_path)
        name = index.get("_class_name")
        if name == VAR_PIPELINE:
            info.update(describe_var(folder, index))
        elif name in PIPELINE_TASKS:
            info.update(describe_diffusion(folder, index))
        else:
            raise ValueError(f"model_index.json names a {name!r} pipeline; the app serves "
                             f"{', '.join([*PIPELINE_TASKS, VAR_PIPELINE])}")
    elif config_path.is_file():
        config = _read_json(config_path)
        info.update(task=COMPONENT, class_name=config.get("_class_name"))
        size = config.get("image_size", config.get("sample_size"))
        info["resolution"] = size if isinstance(size, int) and not isinstance(size, bool) else None
    else:
        raise ValueError("not a model folder: no model_index.json or config.json")
    info["size_bytes"] = _folder_bytes(folder)
    info["size_mb"] = round(info["size_bytes"] / 2**20, 2)
    return info


def _scan(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def servable_models(models_dir: str | Path | None = None, extra_paths=(), include_components: bool = False,
                    ) -> list[dict]:
    """Every model the app can serve, as `describe` dicts plus "source": the shipped defaults (weights/ or
    $DITSTUDIO_MODELS_DIR; "shipped"), every folder in `models_dir` ("models-dir") and the `extra_paths` folders
    ("path"), each folder once (first source wins). A folder that cannot be read is an entry with "name", "path",
    "source" and "error" (the reason) instead of metadata; components (VAE, text encoder) only with
    `include_components`. Never raises for a bad folder."""
    candidates = [(p, "shipped") for p in _scan(_models_dir())]
    if models_dir is not None:
        candidates += [(p, "models-dir") for p in _scan(Path(models_dir))]
    candidates += [(Path(p), "path") for p in extra_paths]
    seen, out = set(), []
    for folder, source in candidates:
        key = folder.resolve()
        if key in seen:
            continue
        seen.add(key)
        try:
            info = describe(folder)
        except (ValueError, OSError) as exc:
            out.append({"name": folder.name, "path": str(folder), "source": source, "error": str(exc)})
            continue
        if info["task"] == COMPONENT and not include_components:
            continue
        out.append({**info, "source": source})
    return out
