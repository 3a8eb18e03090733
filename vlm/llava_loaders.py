"""Load LLaVA-1.5 checkpoints into `LlavaModel` + `CLIPTower`: the llava-hf layout (transformers'
`LlavaForConditionalGeneration`) and the original haotian-liu layout (`LlavaLlamaForCausalLM`), told apart by
their keys, from safetensors (single file or shards with an index) or `.bin` files read with
`torch.load(weights_only=True)` (never unpickled).

Key layouts (ours on the right; our names are Llama's, so the mapping is prefixes only):

  llava-hf, transformers >= 4.52 / 5.x            llava-hf, older                        ours
  model.language_model.X                          language_model.model.X                 X
  lm_head.weight                                  language_model.lm_head.weight          lm_head.weight
  model.multi_modal_projector.linear_{1,2}.*      multi_modal_projector.linear_{1,2}.*   mm_projector.{0,2}.*
  model.vision_tower.X                            vision_tower.vision_model.X            tower X

  original: model.X -> X, lm_head.weight, model.mm_projector.{0,2}.* -> mm_projector.{0,2}.*,
            model.vision_tower.vision_tower.vision_model.X -> tower X (present only in self-trained checkpoints;
            released ones need the CLIP folder passed as `vision_tower=`), *.rotary_emb.inv_freq ignored.

Any key the layout does not explain, and any parameter the checkpoint does not provide, is an error naming them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .llava import CLIP_VIT_L_336, CLIPTower, LlavaModel, LlavaVLM

IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


# ----------------------------------------------------------------------------------------------- files
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: a file (.safetensors / .bin / .pt) or a folder with one file or shards + index."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = []
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index).is_file():
                weight_map = json.loads((path / index).read_text())["weight_map"]
                files = [path / f for f in sorted(set(weight_map.values()))]
                break
        if not files:
            files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise FileNotFoundError(f"{path} holds no checkpoint (*.safetensors, pytorch_model*.bin or an index)")
    else:
        raise FileNotFoundError(f"{path} does not exist")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint shard {f} named by the index is missing")
        part = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True)
        state.update(part)
    return state


# ----------------------------------------------------------------------------------------------- layouts
def detect_layout(keys) -> str:
    keys = list(keys)
    if any(".mm_projector." in k or k.startswith("mm_projector.") for k in keys):
        return "original"
    if any("multi_modal_projector." in k for k in keys):
        return "llava-hf"
    raise ValueError("not a LLaVA checkpoint: no projector keys (model.mm_projector.* for the original layout, "
                     "multi_modal_projector.* for llava-hf); first keys: " + ", ".join(keys[:5]))


_HF_RULES = [
    (re.compile(r"^(?:model\.language_model\.|language_model\.model\.)(.+)$"), "lm", r"\1"),
    (re.compile(r"^(?:language_model\.)?lm_head\.(.+)$"), "lm", r"lm_head.\1"),
    (re.compile(r"^(?:model\.)?multi_modal_projector\.linear_1\.(.+)$"), "lm", r"mm_projector.0.\1"),
    (re.compile(r"^(?:model\.)?multi_modal_projector\.linear_2\.(.+)$"), "lm", r"mm_projector.2.\1"),
    (re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(.+)$"), "tower", r"\1"),
]
_ORIGINAL_RULES = [
    (re.compile(r"^model\.vision_tower\.vision_tower\.(?:vision_model\.)?(.+)$"), "tower", r"\1"),
    (re.compile(r"^model\.mm_projector\.(.+)$"), "lm", r"mm_projector.\1"),
    (re.compile(r"^model\.(.+)$"), "lm", r"\1"),
    (re.compile(r"^lm_head\.(.+)$"), "lm", r"lm_head.\1"),
]


def convert_state_dict(state: dict[str, torch.Tensor]) -> tuple[str, dict, dict]:
    """-> (layout, decoder+projector state in our names, vision tower state with `vision_model.` stripped)."""
    layout = detect_layout(state)
    rules = _HF_RULES if layout == "llava-hf" else _ORIGINAL_RULES
    lm, tower, unknown = {}, {}, []
    for k, v in state.items():
        if IGNORED.match(k):
            continue
        for pattern, target, repl in rules:
            if pattern.match(k):
                (lm if target == "lm" else tower)[pattern.sub(repl, k)] = v
                break
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"{layout} checkpoint has {len(unknown)} unexpected keys: {unknown[:8]}")
    return layout, lm, tower


# ----------------------------------------------------------------------------------------------- configs
def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rp.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"RoPE scaling {rp.get('rope_type')!r} is not supported (Llama default RoPE only)")
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def model_config(cfg: dict, layout: str) -> tuple[dict, dict, int]:
    """(LlavaModel kwargs, CLIPVisionConfig kwargs, feature layer) from a checkpoint's config.json."""
    if layout == "llava-hf":
        text, vision = dict(cfg["text_config"]), dict(cfg["vision_config"])
        if cfg.get("projector_hidden_act", "gelu") != "gelu":
            raise ValueError(f"projector activation {cfg['projector_hidden_act']!r}: only LLaVA-1.5's GELU MLP")
        if cfg.get("vision_feature_select_strategy", "default") != "default":
            raise ValueError("only vision_feature_select_strategy 'default' (CLS dropped) is supported")
        layer = cfg.get("vision_feature_layer", -2)
        image_token = cfg.get("image_token_index", cfg.get("image_token_id", 32000))
    else:
        text = cfg
        if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise ValueError(f"mm_projector_type {cfg['mm_projector_type']!r}: only mlp2x_gelu (LLaVA-1.5)")
        if cfg.get("mm_vision_select_feature", "patch") != "patch":
            raise ValueError("only mm_vision_select_feature 'patch' (CLS dropped) is supported")
        vision = dict(cfg.get("vision_config") or CLIP_VIT_L_336)
        layer = cfg.get("mm_vision_select_layer", -2)
        image_token = -200  # LLaVA's IMAGE_TOKEN_INDEX: never embedded, replaced before the embedding lookup
    if isinstance(layer, list):
        raise ValueError(f"vision_feature_layer {layer}: one layer only (LLaVA-1.5)")
    eos = text.get("eos_token_id", 2)
    kwargs = dict(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
        intermediate_size=text["intermediate_size"], rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(text), max_position_embeddings=text.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
        mm_hidden_size=vision["hidden_size"] if layout == "llava-hf" else cfg.get("mm_hidden_size", vision["hidden_size"]),
        image_token_id=image_token, pad_token_id=text.get("pad_token_id") or 0,
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        vision_tower={"kind": "clip", "config": vision, "feature_layer": layer})
    for k in ("attention_bias", "mlp_bias"):
        if text.get(k):
            raise ValueError(f"{k}=True is not a Llama-2 / Vicuna layout")
    vision = {k: v for k, v in vision.items() if not k.startswith("_") and k not in (
        "model_type", "architectures", "transformers_version", "torch_dtype", "dtype")}
    return kwargs, vision, layer


# ----------------------------------------------------------------------------------------------- loading
def _load_strict(module: torch.nn.Module, state: dict, what: str, optional=()) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected keys "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{what}: {k} has shape {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} "
                             f"in the model built from its config")
    module.load_state_dict(state, strict=False, assign=True)


def load_llava(path: str | Path, *, vision_tower: str | Path | None = None, dtype: torch.dtype = torch.float32,
               device="cpu", tokenizer: bool = True) -> LlavaVLM:
    """A LLaVA-1.5 checkpoint folder (config.json + weights) -> LlavaVLM (CLIPTower + LlavaModel [+ tokenizer]).
    `vision_tower`: a transformers CLIPVisionModel folder, for original checkpoints without the tower's weights."""
    from transformers import CLIPVisionModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a LLaVA checkpoint folder")
    cfg = json.loads((path / "config.json").read_text())
    layout, lm_state, tower_state = convert_state_dict(read_state_dict(path))
    kwargs, vision_cfg, layer = model_config(cfg, layout)
    with torch.device("meta"):
        model = LlavaModel(**kwargs)
        tower = CLIPTower(vision_cfg, layer)
    tied = ("lm_head.weight",) if kwargs["tie_word_embeddings"] else ()
    _load_strict(model, lm_state, f"{path} ({layout}) decoder/projector", optional=tied)
    if kwargs["tie_word_embeddings"]:
        model.lm_head.weight = model.embed_tokens.weight
    if not tower_state:
        if vision_tower is None:
            raise ValueError(f"{path} holds no vision tower weights (released LLaVA checkpoints do not); pass "
                             f"vision_tower=<a CLIPVisionModel folder, e.g. clip-vit-large-patch14-336>")
        tower.model = CLIPVisionModel.from_pretrained(str(vision_tower), dtype=dtype)
    else:
        own = tower.model.state_dict()
        prefix = "vision_model." if next(iter(own)).startswith("vision_model.") else ""
        # CLIPVisionModel keeps position_ids as a buffer in some versions: not a weight, rebuilt below.
        tower_state = {prefix + k: v for k, v in tower_state.items() if not k.endswith("position_ids")}
        opt = tuple(k for k in own if k.endswith("position_ids"))
        _load_strict(tower.model, tower_state, f"{path} ({layout}) vision tower", optional=opt)
        for name, buf in list(tower.model.named_buffers()):
            if buf.is_meta and name.endswith("position_ids"):
                mod = tower.model.get_submodule(name.rsplit(".", 1)[0])
                mod.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    model = model.to(device=device, dtype=dtype).eval()
    tower = tower.to(device=device, dtype=dtype).eval()
    tok = None
    if tokenizer and any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        from .vlm_tokenizer import VLMTokenizer

        tok = VLMTokenizer.from_folder(path, kwargs["image_token_id"])
    return LlavaVLM(model, tower, tok)


__all__ = ["convert_state_dict", "detect_layout", "load_llava", "model_config", "read_state_dict"]
