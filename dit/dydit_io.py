"""Save and load a DyDiT (dit/dydit.py) as a small folder.

Layout:
    dydit_config.json   {"format": "dydit", "version": 1, "tau", "lam", "base", "backbone", "base_class",
                         "hidden_size", "num_heads", "depth", "td_lora": null or {"rank", "experts", "alpha"},
                         ...extra}
    routers.safetensors the routers' state dict (keys as in `DyDiT.routers.state_dict()`)
    td_lora.safetensors only with TD-LoRA: the adapters' state dict (keys as in `DyDiT.lora.state_dict()`)
    transformer/        only when "backbone" == "included": the full base model (`save_pretrained`, or int8 linear
                        weights with per-row scales, `dit.int8_weights`, where the folder must stay small)

"base" is the dense DiT the routers were trained on: a path relative to the folder (e.g. "../shapes-c2i"; a
pipeline folder or a bare transformer folder), or null when the backbone is included. With a frozen backbone
(routers-only fine-tuning) only the routers are stored and the backbone is read from "base" on load. An included
backbone with a pipeline "base" is a different dense model on the base's VAE, scheduler and text encoder (the
shipped text DyDiT: routers and TD-LoRA on the QK-norm text transformer, served with shapes-t2i's components).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .dit import DiT
from .dydit import DyDiT
from .int8_weights import INT8_WEIGHTS, load_int8, save_int8
from .latte import LatteDiT
from .pixart import PixArtDiT

CONFIG_NAME = "dydit_config.json"
ROUTERS_NAME = "routers.safetensors"
LORA_NAME = "td_lora.safetensors"
BASE_CLASSES = {"DiT": DiT, "PixArtDiT": PixArtDiT, "LatteDiT": LatteDiT}
BACKBONE_DIR = "transformer"
FORMAT_VERSION = 1
# The keys `save_dydit` writes itself; anything else in a config came in through `extra` (training details).
FORMAT_KEYS = frozenset({"format", "version", "tau", "lam", "base", "backbone", "base_class", "hidden_size",
                         "num_heads", "depth", "td_lora"})


def _transformer_folder(path: Path) -> Path:
    """A pipeline folder -> its transformer sub-folder; a transformer folder as it is."""
    index = path / "model_index.json"
    if index.is_file():
        sub = json.loads(index.read_text()).get("component_folders", {}).get("transformer", "transformer")
        return path / sub
    return path


def load_base_dit(path: str | Path):
    """Our DiT, PixArtDiT or LatteDiT from a transformer folder or a pipeline folder holding one (float32)."""
    folder = _transformer_folder(Path(path))
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"base model {path}: no DiT there ({config} is missing)")
    name = json.loads(config.read_text()).get("_class_name")
    if name not in BASE_CLASSES:
        raise ValueError(f"base model {path}: config.json names {name!r}; DyDiT routes {', '.join(BASE_CLASSES)}")
    if (folder / INT8_WEIGHTS).is_file():
        return load_int8(BASE_CLASSES[name], folder, torch.float32)
    return BASE_CLASSES[name].from_pretrained(folder, torch_dtype=torch.float32)


def _load_state(module, path: Path) -> None:
    """Strict load with a readable error (missing / unexpected keys, shape mismatches)."""
    state = load_file(str(path))
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: shapes do not match the backbone: {'; '.join(bad[:4])}")
    module.load_state_dict(state)


def save_dydit(folder: str | Path, model: DyDiT, *, lam: float, base: str | Path | None = None,
               include_backbone: bool = False, int8_backbone: bool = False, extra: dict | None = None) -> Path:
    """Write `model` to `folder`. `base` is the dense DiT folder the backbone comes from (stored relative to `folder`);
    without one, or with `include_backbone`, the full DiT weights are written as well (`int8_backbone`: its linear
    weights as int8 with per-row scales, about half the bytes of fp16)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    include_backbone = include_backbone or base is None
    rel_base = None if base is None else os.path.relpath(Path(base).resolve(), folder.resolve())
    cfg = model.dit.config
    lora = None if model.lora is None else {"rank": model.lora[0].rank, "experts": model.lora[0].experts,
                                            "alpha": model.lora[0].scale * model.lora[0].rank}
    config = {
        "format": "dydit", "version": FORMAT_VERSION,
        "tau": model.routers[0].gate.tau, "lam": lam,
        "base": rel_base, "backbone": "included" if include_backbone else "base",
        "base_class": type(model.dit).__name__,
        "hidden_size": cfg.hidden_size, "num_heads": cfg.num_heads, "depth": cfg.depth, "td_lora": lora,
        **(extra or {}),
    }
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.routers.state_dict().items()}
    save_file(state, str(folder / ROUTERS_NAME))
    if model.lora is not None:
        state = {k: v.detach().float().cpu().contiguous() for k, v in model.lora.state_dict().items()}
        save_file(state, str(folder / LORA_NAME))
    if include_backbone and int8_backbone:
        save_int8(model.dit, folder / BACKBONE_DIR)
    elif include_backbone:
        (folder / BACKBONE_DIR / INT8_WEIGHTS).unlink(missing_ok=True)
        model.dit.save_pretrained(folder / BACKBONE_DIR)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return folder


def read_config(folder: str | Path) -> dict:
    """dydit_config.json of a DyDiT folder, checked for format and version."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: not a DyDiT folder ({CONFIG_NAME} is missing)")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != "dydit" or config.get("version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format {config.get('format')!r} version {config.get('version')!r}; "
                         f"expected 'dydit' version {FORMAT_VERSION}")
    return config


def extra_config(config: dict) -> dict:
    """The `extra` entries of a DyDiT config (what `save_dydit` did not write itself), to carry into a re-save."""
    return {k: v for k, v in config.items() if k not in FORMAT_KEYS}


def included_backbone(folder: str | Path) -> str | None:
    """How a DyDiT folder stores an included backbone: "int8" (`dit.int8_weights`), "float" (`save_pretrained`), or
    None when the backbone is read from "base"."""
    if read_config(folder)["backbone"] != "included":
        return None
    return "int8" if (Path(folder) / BACKBONE_DIR / INT8_WEIGHTS).is_file() else "float"


def is_dydit_folder(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


def load_dydit_pipeline(folder: str | Path, sampler: str | None = None):
    """The base model's pipeline (its VAE, scheduler and text encoder, read from "base", which must be a pipeline
    folder) with a `DyDiTTransformer` of this folder's DyDiT as its transformer, attached so that every sampling
    run plans its widths once. `pipe.transformer.counter` accumulates the executed and dense MACs."""
    from .dydit import DyDiTTransformer
    from .pipelines import MODEL_INDEX, ClassToImagePipeline
    from .text_pipelines import TextToImagePipeline, TextToVideoPipeline

    folder = Path(folder)
    config = read_config(folder)
    base = (folder / config["base"]).resolve() if config.get("base") else None
    if base is None or not (base / MODEL_INDEX).is_file():
        raise ValueError(f"{folder}: a pipeline needs the base model's pipeline folder (VAE, scheduler, text "
                         f"encoder); 'base' is {config.get('base')!r}")
    pipeline_cls = {"DiT": ClassToImagePipeline, "PixArtDiT": TextToImagePipeline,
                    "LatteDiT": TextToVideoPipeline}[config.get("base_class", "DiT")]
    dense = pipeline_cls.from_pretrained(base, sampler=sampler)
    model = load_dydit(folder, backbone=None if config["backbone"] == "included" else dense.transformer)
    parts = dict(transformer=DyDiTTransformer(model), vae=dense.vae, scheduler=dense.scheduler)
    if pipeline_cls is not ClassToImagePipeline:
        parts["text_encoder"] = dense.text_encoder
    pipe = pipeline_cls(**parts)
    for name in ("vae_folder", "component_folders"):  # where the referenced components live, as the dense pipe
        if hasattr(dense, name):
            setattr(pipe, name, getattr(dense, name))
    pipe.transformer.attach(pipe)
    return pipe


def load_dydit(folder: str | Path, backbone=None) -> DyDiT:
    """The DyDiT saved by `save_dydit` (in eval mode, float32, on the CPU). `backbone`: an already loaded base model
    to route (it must be the one "base" names; its sizes are checked), instead of reading it again."""
    folder = Path(folder)
    config = read_config(folder)
    cfg_path = folder / CONFIG_NAME
    if backbone is not None:
        dit = backbone
    elif config["backbone"] == "included":
        dit = load_base_dit(folder / BACKBONE_DIR)
    else:
        if not config.get("base"):
            raise ValueError(f"{cfg_path}: the backbone is not included and no base model is named")
        base = (folder / config["base"]).resolve()
        if not base.exists():
            raise FileNotFoundError(f"{folder}: its base model {config['base']!r} ({base}) is missing; the routers "
                                    f"alone are not a model")
        dit = load_base_dit(base)
    got = (dit.config.hidden_size, dit.config.num_heads, dit.config.depth)
    want = (config["hidden_size"], config["num_heads"], config["depth"])
    if got != want:
        raise ValueError(f"{folder}: routers were trained for hidden_size/num_heads/depth {want}, "
                         f"the backbone has {got}")
    if config.get("base_class", "DiT") != type(dit).__name__:
        raise ValueError(f"{folder}: routers were trained for a {config.get('base_class')}, the backbone is a "
                         f"{type(dit).__name__}")
    model = DyDiT.from_dit(dit, tau=config["tau"])
    _load_state(model.routers, folder / ROUTERS_NAME)
    if config.get("td_lora"):
        lora = config["td_lora"]
        model.add_td_lora(lora["rank"], lora["experts"], lora["alpha"])
        if not (folder / LORA_NAME).is_file():
            raise FileNotFoundError(f"{folder}: dydit_config.json names a TD-LoRA adapter but {LORA_NAME} is missing")
        _load_state(model.lora, folder / LORA_NAME)
    return model.eval()
