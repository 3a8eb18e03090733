"""`ditstudio models [--json] [--all] [--models-dir DIR] [PATH ...]`: every model the app can serve.

Lists the shipped defaults (weights/ or $DITSTUDIO_MODELS_DIR; source "shipped"), every folder in `--models-dir`
("models-dir") and the folders given as paths ("path"): name, task (class-to-image, text-to-image, text-to-video),
size on disk (MB, the folder itself; the shared VAE / text encoder it references is not counted), resolution (px:
transformer sample_size x VAE downsampling), frames (video models), source, and for dynamic models (DyDiT) the
executed share of the dense FLOPs their card measured over sampling runs, with the trained target lambda. Components (the shipped VAE and CLIP)
are not servable on their own and are left out unless `--all` (task "component"). A folder that cannot be read is
skipped with its reason: an entry with an "error" field in `--json`, a line under the table otherwise. The metadata
comes from `app.catalog.servable_models`, which the UI reuses.
"""
from __future__ import annotations

import json
from pathlib import Path

from app.catalog import servable_models


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the models the app can serve: task, size, resolution, frames, source")
    p.add_argument("paths", nargs="*", metavar="PATH", help="model folders to include as well")
    p.add_argument("--models-dir", dest="models_dir", default=None,
                   help="a folder of model folders to list besides the shipped ones")
    p.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    p.add_argument("--all", action="store_true", help="also list components (VAE, text encoder)")
    p.set_defaults(func=run)


def _cell(value) -> str:
    return "-" if value is None else str(value)


def _flops(m: dict) -> str:
    """Executed / dense FLOPs: 1 for a dense model; a DyDiT's measured ratio and its lambda."""
    if m.get("method") != "DyDiT":
        return "1"
    measured = "?" if m.get("flops_executed") is None else f"{m['flops_executed']:.2f}"
    return f"{measured} (DyDiT, λ {m.get('lam')})"


def table(models: list[dict]) -> str:
    """The rows that could be read as a plain-text table."""
    header = ("name", "task", "size (MB)", "resolution (px)", "frames", "source", "FLOPs vs dense")
    rows = [(m["name"], m["task"], f"{m['size_mb']:.1f}", _cell(m["resolution"]), _cell(m["frames"]), m["source"],
             _flops(m)) for m in models if "error" not in m]
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args) -> int:
    if args.models_dir is not None and not Path(args.models_dir).is_dir():
        raise ValueError(f"--models-dir {args.models_dir} is not a folder")
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"no such folder: {', '.join(missing)}")
    models = servable_models(args.models_dir, args.paths, include_components=args.all)
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    print(table(models))
    for m in models:
        if "error" in m:
            print(f"skipped {m['path']} ({m['source']}): {m['error']}")
    return 0
