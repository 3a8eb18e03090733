"""Where models are found: the shipped defaults under `weights/` in the repository (or DITSTUDIO_MODELS_DIR),
each a diffusers-style folder with a `config.json` (or `model_index.json`) and a model card `README.md`."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DIR = REPO_ROOT / "weights"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    task: str
    size_bytes: int


def models_dir() -> Path:
    return Path(os.environ.get("DITSTUDIO_MODELS_DIR", SHIPPED_DIR))


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _task_of(folder: Path) -> str:
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
        if any((folder / n).is_file() for n in ("config.json", "model_index.json")):
            entries.append(ModelEntry(folder.name, folder, _task_of(folder), _folder_bytes(folder)))
    return entries


def resolve_model(name_or_path: str) -> Path:
    """A shipped model's name (see `ditstudio models`) or a path to a model folder."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    known = {m.name: m.path for m in list_models()}
    if name_or_path in known:
        return known[name_or_path]
    raise ValueError(f"unknown model {name_or_path!r}: not a folder, and not one of the shipped models "
                     f"({', '.join(sorted(known)) or 'none found in ' + str(models_dir())})")
