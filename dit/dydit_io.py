"""Save and load a DyDiT (dit/dydit.py) as a small folder.

Layout:
    dydit_config.json   {"format": "dydit", "version": 1, "tau", "lam", "base", "backbone", "hidden_size",
                         "num_heads", "depth", ...extra}
    routers.safetensors the routers' state dict (keys as in `DyDiT.routers.state_dict()`)
    transformer/        only when "backbone" == "included": the full DiT (`DiT.save_pretrained`)

"base" is the dense DiT the routers were trained on: a path relative to the folder (e.g. "../shapes-c2i"; a
pipeline folder or a bare transformer folder), or null when the backbone is included. With a frozen backbone
(routers-only fine-tuning) only the routers are stored and the backbone is read from "base" on load.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .dit import DiT
from .dydit import DyDiT

CONFIG_NAME = "dydit_config.json"
ROUTERS_NAME = "routers.safetensors"
BACKBONE_DIR = "transformer"
FORMAT_VERSION = 1


def _transformer_folder(path: Path) -> Path:
    """A pipeline folder -> its transformer sub-folder; a transformer folder as it is."""
    index = path / "model_index.json"
    if index.is_file():
        sub = json.loads(index.read_text()).get("component_folders", {}).get("transformer", "transformer")
        return path / sub
    return path


def load_base_dit(path: str | Path) -> DiT:
    """Our class DiT from a transformer folder or a pipeline folder holding one."""
    folder = _transformer_folder(Path(path))
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"base model {path}: no DiT there ({config} is missing)")
    name = json.loads(config.read_text()).get("_class_name")
    if name != "DiT":
        raise ValueError(f"base model {path}: config.json names {name!r}; DyDiT routes our class DiT only")
    return DiT.from_pretrained(folder, torch_dtype=torch.float32)


def save_dydit(folder: str | Path, model: DyDiT, *, lam: float, base: str | Path | None = None,
               include_backbone: bool = False, extra: dict | None = None) -> Path:
    """Write `model` to `folder`. `base` is the dense DiT folder the backbone comes from (stored relative to `folder`);
    without one, or with `include_backbone`, the full DiT weights are written as well."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    include_backbone = include_backbone or base is None
    rel_base = None if base is None else os.path.relpath(Path(base).resolve(), folder.resolve())
    cfg = model.dit.config
    config = {
        "format": "dydit", "version": FORMAT_VERSION,
        "tau": model.routers[0].gate.tau, "lam": lam,
        "base": rel_base, "backbone": "included" if include_backbone else "base",
        "hidden_size": cfg.hidden_size, "num_heads": cfg.num_heads, "depth": len(model.dit.blocks),
        **(extra or {}),
    }
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.routers.state_dict().items()}
    save_file(state, str(folder / ROUTERS_NAME))
    if include_backbone:
        model.dit.save_pretrained(folder / BACKBONE_DIR)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return folder


def load_dydit(folder: str | Path) -> DyDiT:
    """The DyDiT saved by `save_dydit` (in eval mode, float32, on the CPU)."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: not a DyDiT folder ({CONFIG_NAME} is missing)")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != "dydit" or config.get("version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format {config.get('format')!r} version {config.get('version')!r}; "
                         f"expected 'dydit' version {FORMAT_VERSION}")
    if config["backbone"] == "included":
        dit = load_base_dit(folder / BACKBONE_DIR)
    else:
        if not config.get("base"):
            raise ValueError(f"{cfg_path}: the backbone is not included and no base model is named")
        base = (folder / config["base"]).resolve()
        if not base.exists():
            raise FileNotFoundError(f"{folder}: its base model {config['base']!r} ({base}) is missing; the routers "
                                    f"alone are not a model")
        dit = load_base_dit(base)
    got = (dit.config.hidden_size, dit.config.num_heads, len(dit.blocks))
    want = (config["hidden_size"], config["num_heads"], config["depth"])
    if got != want:
        raise ValueError(f"{folder}: routers were trained for hidden_size/num_heads/depth {want}, "
                         f"the backbone has {got}")
    model = DyDiT.from_dit(dit, tau=config["tau"])
    state = load_file(str(folder / ROUTERS_NAME))
    expected = model.routers.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{folder}/{ROUTERS_NAME}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{folder}/{ROUTERS_NAME}: shapes do not match the backbone: {'; '.join(bad[:4])}")
    model.routers.load_state_dict(state)
    return model.eval()
