"""Train or fine-tune a DiT -- class-conditional (DiT), text-conditional (PixArt-style) or text-to-video (Latte-style) --
on VAE latents, with the DDPM (ε + learned-σ VLB) or flow objective.

    accelerate launch scripts/train_dit.py --out runs/c2i --model DiT-T/2 --steps 20000 --batch-size 256 \
        --mixed-precision bf16                                     # class -> image from scratch on shapes scenes
    accelerate launch scripts/train_dit.py --out runs/t2i --model PixArt-T/2 ...   # text -> image on shapes captions
    accelerate launch scripts/train_dit.py --out runs/t2v --model Latte-T/2 ...    # text -> video on shapes videos
    python scripts/train_dit.py --out runs/ft --model shapes-t2i --data my_images/ --lora 8 \
        --steps 500 --batch-size 16 --lr 1e-4                      # LoRA fine-tune on a folder of captioned images
    python scripts/train_dit.py --out runs/smoke --model DiT-T/2 --steps 20 --batch-size 8 --cpu   # smoke test

`--model` is a named size (`DiT-T/2`, `DiT-XL/2`, `PixArt-T/2`, `Latte-T/2`, ...), a shipped model's name, a folder
saved by this project (a pipeline folder or a bare transformer), a diffusers `DiTTransformer2DModel` /
`PixArtTransformer2DModel` / `LatteTransformer3DModel` folder or pipeline folder, or an official facebookresearch/DiT
checkpoint (.pt / .safetensors). The model's class decides the task (class / text / video).

`--data shapes` renders a fresh batch per step (class scenes, captioned scenes, or captioned videos); `--data FOLDER`
reads the user's images, resized and centre-cropped to the VAE's resolution and encoded once: class sub-folders,
or a `metadata.jsonl` (the diffusers / datasets "imagefolder" convention) whose rows hold `file_name` and `label`
(class models) or `text` / `caption` (text models). Text models see the empty prompt for `--uncond-prob` of the
captions (what classifier-free guidance needs); class models drop labels inside the model (`class_dropout_prob`).

Step `s`'s batch, caption dropout and noise come from (seed, s, rank), so a resumed run is exact. The EMA of the
weights (merged LoRA) is saved as a pipeline folder `ditstudio generate` and the app load (`--save-to`, default
`--out/model`; the VAE and text encoder are referenced, not copied) with a model card and, every `--eval-every`
steps, the analyser's metrics of samples from the EMA weights (`dit.evaluation`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from diffusers import AutoencoderKL  # noqa: E402

from dit.caption_contrast import CaptionContrast  # noqa: E402
from dit.dit import DIT_CONFIGS, DiT  # noqa: E402
from dit.evaluation import TARGETS, evaluate_pipeline  # noqa: E402
from dit.grounding import CrossAttentionMaps, grounding_loss, object_masks, object_token_sets  # noqa: E402
from dit.latte import (  # noqa: E402
    LATTE_CONFIGS,
    LatteDiT,
    init_from_image_model,
    with_temporal_text_attention,
    with_temporal_text_modulation,
)
from dit.loaders import dit_from_diffusers, latte_from_diffusers, load_official_dit, pixart_from_diffusers  # noqa: E402
from dit.objectives import PREDICTION_TYPES, make_objective  # noqa: E402
from dit.pipelines import ClassToImagePipeline, make_scheduler  # noqa: E402
from dit.pixart import PIXART_CONFIGS, PixArtDiT, with_caption_refiner  # noqa: E402
from dit.text_pipelines import TextToImagePipeline, TextToVideoPipeline  # noqa: E402
from shapes import NUM_CLASSES  # noqa: E402
from shapes.data import make_batch  # noqa: E402
from shapes.render import render_layers, to_float  # noqa: E402
from shapes.scene import COLOURS, SHAPES, class_name, frame_times, scenes_at  # noqa: E402
from shapes.text import VIDEO_POSITION_PROB  # noqa: E402
from training import (EMA, SpikeGuard, add_common_args, cosine_schedule, full, local, optimizer_step,  # noqa: E402
                      start_run, write_model_card)  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED_VAE = REPO / "weights" / "shapes-vae"
SHIPPED_CLIP = REPO / "weights" / "shapes-clip"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# The linears LoRA adapts: self-attention q/k/v and output, cross-attention q, k/v and output, both MLP layers, in
# every block (DiT / PixArt `blocks`, Latte `spatial_blocks` and `temporal_blocks`).
LORA_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q|kv|proj)|mlp\.(fc1|fc2))"
EVAL_SEED = 12345
# The model class -> task, and what each task's pipeline is.
TASK_OF = {DiT: "class", PixArtDiT: "text", LatteDiT: "video"}
PIPELINES = {"class": ClassToImagePipeline, "text": TextToImagePipeline, "video": TextToVideoPipeline}
OURS = {"DiT": DiT, "PixArtDiT": PixArtDiT, "LatteDiT": LatteDiT}
DIFFUSERS = {"DiTTransformer2DModel": dit_from_diffusers, "PixArtTransformer2DModel": pixart_from_diffusers,
             "LatteTransformer3DModel": latte_from_diffusers}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--model", default="DiT-T/2", help="named size, shipped model, saved folder or official .pt")
    p.add_argument("--objective", default="ddpm", choices=["ddpm", "flow"])
    p.add_argument("--vlb-weight", type=float, default=1.0, help="ddpm with learned σ: weight of the VLB term")
    p.add_argument("--p2-gamma", type=float, default=0.0,
                   help="ddpm: weight each sample's loss by P2's 1 / (k + SNR_t)^gamma (dit/objectives.py), which "
                        "lowers the low-noise steps so the high-noise ones (layout, motion) count more; 0: off")
    p.add_argument("--p2-k", type=float, default=1.0, help="ddpm: P2's k")
    p.add_argument("--prediction-type", default=None, choices=list(PREDICTION_TYPES),
                   help="ddpm: what the model predicts, ε or v (dit/objectives.py); default: the --model pipeline's "
                        "scheduler's type, else epsilon. Changing a trained model's type retrains its meaning")
    p.add_argument("--adam-impl", default="auto", choices=["auto", "fused", "foreach", "loop"],
                   help="AdamW implementation (auto: fused on CUDA, foreach elsewhere)")
    p.add_argument("--timestep-sampling", default="uniform", choices=["uniform", "logit_normal"], help="flow only")
    p.add_argument("--data", default="shapes", help="'shapes' or a folder of images (class sub-folders or metadata.jsonl)")
    p.add_argument("--vae", default=str(SHIPPED_VAE))
    p.add_argument("--text-encoder", default=str(SHIPPED_CLIP), help="text / video models: the ShapesCLIP folder")
    p.add_argument("--uncond-prob", type=float, default=0.1, help="text models: share of captions replaced by ''")
    p.add_argument("--pool", type=int, default=0,
                   help="shapes data: render and encode this many items once and sample batches from them (0: fresh "
                        "batches every step, CPU-bound)")
    p.add_argument("--objects", default="1-3", metavar="MIN-MAX",
                   help="shapes text data: objects per scene (the evaluation asks for one- and two-object captions; "
                        "'1-2' leaves out the three-object scenes)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--qk-norm", action="store_true",
                   help="fresh named sizes: RMSNorm on queries and keys (bounded attention logits; docs/dit.md)")
    p.add_argument("--caption-refiner", type=int, default=0, metavar="LAYERS",
                   help="text / video models: add a bidirectional caption refiner of this many layers in front of the "
                        "blocks (zero-initialised, so a trained model starts unchanged; dit/pixart.py CaptionRefiner)")
    p.add_argument("--caption-refiner-mlp-ratio", type=float, default=1.0)
    p.add_argument("--temporal-text", action="store_true",
                   help="video models: add the caption's modulation of the temporal blocks (zero-initialised, so a "
                        "trained model starts unchanged; dit/latte.py with_temporal_text_modulation)")
    p.add_argument("--temporal-text-attention", type=int, default=0, metavar="WIDTH",
                   help="video models: give the temporal blocks a narrow cross-attention of this width to the caption "
                        "(output zero-initialised, so a trained model starts unchanged; dit/latte.py "
                        "TemporalTextAttention)")
    p.add_argument("--grounding-loss", type=float, default=0.0, metavar="WEIGHT",
                   help="text / video models on the shapes world (with --pool): add WEIGHT x TokenCompose's token "
                        "loss, which pulls each object's caption tokens' cross-attention onto that object, frame by "
                        "frame in a video (dit/grounding.py)")
    p.add_argument("--caption-contrast", type=float, default=0.0, metavar="WEIGHT",
                   help="video models on the shapes world (with --pool): add WEIGHT x the counterfactual-caption "
                        "contrast, which asks each video's caption to explain it better than the same caption with "
                        "other motions (dit/caption_contrast.py); a step runs the model on twice the rows")
    p.add_argument("--contrast-margin", type=float, default=0.05,
                   help="caption contrast: the counterfactual's error must exceed the true caption's by this share")
    p.add_argument("--contrast-from", type=float, default=0.4, metavar="T_OVER_T",
                   help="caption contrast: only at noise levels t/T of at least this (where a motion is decided)")
    p.add_argument("--video-position-prob", type=float, default=VIDEO_POSITION_PROB, metavar="P",
                   help="shapes videos: the share of caption objects whose starting position is stated (the world's "
                        "default %(default)s; 1 states it always, so the motion words decide where each object goes)")
    p.add_argument("--init-from-image", default=None, metavar="T2I",
                   help="video models: start from this text-to-image model (shipped name or folder, same width and "
                        "depth as --model): spatial blocks and embedders copied, temporal blocks start as identities "
                        "(dit/latte.py init_from_image_model)")
    p.add_argument("--save-over-image", default=None, metavar="T2I",
                   help="video models: save only the weights that differ from this text-to-image model (shipped "
                        "name or folder) and a reference to it (dit/latte.py save_over_image_model). A video model "
                        "loaded over an image model is saved over it again without this flag")
    p.add_argument("--trainable", default=None, metavar="REGEX",
                   help="train only the parameters whose names match (re.search), freeze the rest: e.g. "
                        "'temporal_blocks\\.' trains a video model's motion blocks on a frozen image model "
                        "(with --init-from-image, as AnimateDiff's motion modules)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and optimiser state over the processes (FSDP2, one shard group per "
                        "transformer block) instead of replicating them (DDP): for the XL sizes")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=None, help="LR warm-up steps (default: min(500, steps // 10))")
    p.add_argument("--eval-n", type=int, default=64, help="size of the fixed, seeded evaluation batch (loss)")
    p.add_argument("--sample-eval-n", type=int, default=0,
                   help="prompts per sample-based evaluation (analyser metrics of generated samples; 0: off)")
    p.add_argument("--sample-eval-cfg", type=float, default=4.0)
    p.add_argument("--final-eval-n", type=int, default=None, help="prompts for the final (model card) evaluation "
                   "(default: --sample-eval-n)")
    p.add_argument("--anneal-to-time-limit", action="store_true",
                   help="decay the LR by elapsed time as well as steps, so a --time-limit run ends annealed")
    p.add_argument("--keep-best", action="store_true",
                   help="ship the EMA weights that scored best in the sample evaluations, not necessarily the last")
    p.add_argument("--save-to", default=None, help="the pipeline folder to write (default: --out/model)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimiser step (each process's share of --batch-size is split in these)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (memory for ~1/3 more compute)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--rollback-on-spike", type=int, default=0, metavar="WINDOW",
                   help="every WINDOW steps compare the window's mean loss with the best so far; past 3x, restore "
                        "the last healthy weights / optimiser / EMA and halve the LR (0: off; scripts/training.py)")
    p.set_defaults(lr=1e-4)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- model
def load_model(spec: str, objective: str, qk_norm: bool = False) -> torch.nn.Module:
    """A fresh named size (learns σ only under the DDPM objective; `qk_norm` adds QK-norm), a shipped model, a saved
    folder (ours or diffusers', transformer or whole pipeline) or an official DiT checkpoint file."""
    for configs, cls in ((DIT_CONFIGS, DiT), (PIXART_CONFIGS, PixArtDiT), (LATTE_CONFIGS, LatteDiT)):
        if spec in configs:
            return cls.from_name(spec, learn_sigma=objective == "ddpm", qk_norm=qk_norm)
    if qk_norm:  # a trained model's architecture is its own: adding norms would change what it computes
        raise ValueError(f"--qk-norm applies to a fresh named size, not to --model {spec!r} (a trained model keeps "
                         "its own architecture; its config says whether it has QK-norm)")
    path = _shipped_or_path(spec)
    if path.is_dir():
        if (path / "model_index.json").is_file():  # a pipeline folder: its transformer
            index = json.loads((path / "model_index.json").read_text())
            sub = index.get("component_folders", {}).get("transformer", "transformer")
            return load_model(str(path / sub), objective)
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        name = config.get("_class_name")
        if name in OURS:
            return OURS[name].from_pretrained(path, torch_dtype=torch.float32)
        if name in DIFFUSERS:
            return DIFFUSERS[name](path)
        raise ValueError(f"{path}: config.json names {name!r}; expected one of {', '.join([*OURS, *DIFFUSERS])}")
    if path.is_file():
        return load_official_dit(path)
    names = [*DIT_CONFIGS, *PIXART_CONFIGS, *LATTE_CONFIGS]
    raise ValueError(f"--model {spec!r}: not a named size ({', '.join(names)}), shipped model, folder or file")


def prediction_type_of(spec: str) -> str:
    """What a --model pipeline folder's scheduler says its transformer predicts ("epsilon" when there is none: a named
    size, a bare transformer folder, an official checkpoint)."""
    path = _shipped_or_path(spec)
    config = path / "scheduler" / "scheduler_config.json"
    if (path / "model_index.json").is_file() and config.is_file():
        return json.loads(config.read_text()).get("prediction_type", "epsilon")
    return "epsilon"


def _shipped_or_path(spec: str) -> Path:
    """A shipped model's name (weights/<name>) or a path."""
    path = Path(spec)
    return REPO / "weights" / spec if not path.exists() and (REPO / "weights" / spec).is_dir() else path


def task_of(model) -> str:
    return TASK_OF[type(model)]


def add_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=LORA_TARGETS, init_lora_weights=True)
    return get_peft_model(model, config)


# ----------------------------------------------------------------------------------------------- data
@torch.no_grad()
def encode(vae: AutoencoderKL, images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> scaled latents (z - shift) * scale, using the posterior mean (deterministic)."""
    x = to_float(images_u8.to(vae.device)).to(vae.dtype)
    z = vae.encode(x).latent_dist.mode().float()
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


@torch.no_grad()
def encode_video(vae: AutoencoderKL, video_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, 3, H, W) -> latents (B, C, T, h, w), every frame through the image VAE."""
    B, T = video_u8.shape[:2]
    z = encode(vae, video_u8.reshape(B * T, *video_u8.shape[2:]))
    return z.view(B, T, *z.shape[1:]).transpose(1, 2).contiguous()


@dataclass
class LatentData:
    """`batch(seed, n, device)` -> (latents, condition): class ids (n,) or a list of n captions."""
    batch: Callable
    num_classes: int | None
    description: str
    # `grounding(seed, n, device)` -> (object masks (n, K, N), object tokens (n, K, L)) of the same items as
    # `batch(seed, n, device)`; None where the data has no such targets
    grounding: Callable | None = None
    # `counterfactual(seed, n, device)` -> token ids (n, L) of the same items' counterfactual captions (their motions
    # replaced: dit/caption_contrast.py); None where the data has none
    counterfactual: Callable | None = None


def shapes_data(task: str, vae: AutoencoderKL, num_frames: int = 8, pool: int = 0, seed: int = 0,
                tokenize: Callable | None = None, objects: tuple[int, int] = (1, 3),
                targets: Callable | None = None, counterfactual: bool = False,
                position_prob: float = VIDEO_POSITION_PROB) -> LatentData:
    """Rendered shapes data. `pool` 0: a fresh batch rendered and encoded every step (scene sampling and captions run
    on the CPU, ~60 ms per 256 scenes: it starves a GPU). `pool` N: N items rendered and encoded once up front (on
    the VAE's device, from `seed`), then every step draws its batch from them -- for a 2 M-parameter model,
    100k+ distinct scenes are plenty. A pool's captions are kept as token ids (`tokenize`), so steps skip the
    tokenizer too. `objects`: (min, max) objects per captioned scene. `targets(batch, token ids)` -> grounding
    targets (pool only) kept beside each item (`grounding_targets`). `counterfactual` (videos, pool only): each
    item's counterfactual caption is kept too, as token ids. `position_prob` (videos): the share of caption objects
    whose starting position is stated."""
    size = vae.config.sample_size
    kind = {"class": "class", "text": "caption", "video": "video"}[task]
    if counterfactual and (task != "video" or not pool):
        raise ValueError("counterfactual captions come with video data from a pool (--pool N)")

    def fresh(seed: int, n: int, device):
        extra = {"objects": objects} if task == "text" else {"position_prob": position_prob} if task == "video" else {}
        b = make_batch(kind, seed, n, size=size, device=vae.device, num_frames=num_frames, **extra)
        if task == "class":
            return encode(vae, b["image"]).to(device), b["label"].to(device)
        if task == "text":
            if targets is not None:
                ids = tokenize(b["caption"])
                return encode(vae, b["image"]).to(device), ids, targets(b, ids)
            return encode(vae, b["image"]).to(device), b["caption"]
        if targets is not None or counterfactual:
            ids = tokenize(b["caption"])
            return (encode_video(vae, b["video"]).to(device), ids, targets(b, ids) if targets is not None else None,
                    tokenize(b["counterfactual"]) if counterfactual else None)
        return encode_video(vae, b["video"]).to(device), b["caption"]

    lo, hi = objects
    what = {"class": "class scenes", "text": f"captioned scenes ({lo}-{hi} objects, paraphrased captions)",
            "video": f"captioned {num_frames}-frame videos (1-2 moving objects)"}[task]
    num_classes = NUM_CLASSES if task == "class" else None
    if not pool:
        if targets is not None:
            raise ValueError("grounding targets are kept with a data pool: add --pool N")
        return LatentData(fresh, num_classes, f"rendered shapes {what}, fresh every step")

    chunk = 256 if task == "video" else 2048
    parts = [fresh(np.random.default_rng([seed, 0x9001, i]), min(chunk, pool - start), vae.device)  # apart from steps
             for i, start in enumerate(tqdm(range(0, pool, chunk), desc="rendering the data pool", mininterval=10))]
    latents = torch.cat([p[0] for p in parts])
    if task == "class" or targets is not None or counterfactual:  # labels, or captions already tokenised
        conds = torch.cat([p[1] for p in parts])
    else:
        conds = torch.cat([tokenize(p[1]) for p in parts]) if tokenize else [c for p in parts for c in p[1]]
    if targets is not None:
        masks, tokens = (torch.cat([p[2][i].to(vae.device) for p in parts]) for i in (0, 1))
    if counterfactual:
        counter_ids = torch.cat([p[3] for p in parts])

    def pick(seed: int, n: int) -> torch.Tensor:
        return torch.randint(0, pool, (n,), generator=torch.Generator().manual_seed(seed))

    def from_pool(seed: int, n: int, device):
        idx = pick(seed, n)
        cond = conds[idx.to(conds.device)].to(device) if torch.is_tensor(conds) else [conds[i] for i in idx.tolist()]
        return latents[idx.to(latents.device)].to(device), cond

    def grounding(seed: int, n: int, device):
        idx = pick(seed, n).to(masks.device)
        return masks[idx].to(device), tokens[idx].to(device)

    def counterfactuals(seed: int, n: int, device):
        return counter_ids[pick(seed, n).to(counter_ids.device)].to(device)

    return LatentData(from_pool, num_classes, f"a pool of {pool:,} rendered shapes {what}",
                      grounding if targets is not None else None, counterfactuals if counterfactual else None)


def grounding_targets(text_encoder, grid: int, size: int, frames: int | None = None) -> Callable:
    """fn(make_batch's dict, its captions' token ids (B, L)) -> (object masks (B, K, grid²), object tokens (B, K, L)):
    which latent cells each scene object covers and which caption tokens name it (dit/grounding.py). Videos
    (`frames`): masks (B, F, K, grid²), each frame's own, and each object's whole phrase, motion words included."""
    def targets(b: dict, ids: torch.Tensor):
        scenes = b["scenes"]
        words = [text_encoder.tokenizer.convert_ids_to_tokens(row) for row in ids.tolist()]
        tokens = object_token_sets(words, scenes.shape, scenes.colour, SHAPES, COLOURS, ids.shape[1],
                                   whole_phrase=frames is not None)
        K = scenes.shape.shape[1]
        if frames is None:
            slots = render_layers(scenes, size, device=ids.device).objects
            return object_masks(slots, K, grid), torch.from_numpy(tokens)
        slots = render_layers(scenes_at(scenes, frame_times(frames)), size, device=ids.device).objects
        return object_masks(slots, K, grid).view(len(scenes), frames, K, -1), torch.from_numpy(tokens)
    return targets


def _load_image(path: Path, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (bicubic), centre-crop to size x size: uint8 (3, size, size)."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _metadata(folder: Path) -> list[dict]:
    rows = []
    for i, line in enumerate((folder / "metadata.jsonl").read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{folder}/metadata.jsonl line {i} is not JSON: {exc}") from exc
    if not rows or not all("file_name" in r for r in rows):
        raise ValueError(f"{folder}/metadata.jsonl: every row needs a 'file_name'")
    missing = [r["file_name"] for r in rows if not (folder / r["file_name"]).is_file()]
    if missing:
        raise ValueError(f"{folder}/metadata.jsonl names files that are not there: {', '.join(missing[:5])}")
    return rows


def _folder_items(folder: Path, task: str) -> tuple[list[Path], list, list[str] | None]:
    """(files, per-file condition, class names or None): class ids for class models, captions for text models."""
    if not folder.is_dir():
        raise ValueError(f"--data {folder}: not a folder (and not 'shapes')")
    if task == "video":
        raise ValueError("video models train on the shapes world only (--data shapes); a folder holds still images")
    has_metadata = (folder / "metadata.jsonl").is_file()
    if task == "text":
        if not has_metadata:
            raise ValueError(f"{folder} has no metadata.jsonl: a text model needs a caption ('text') per image")
        rows = _metadata(folder)
        key = next((k for k in ("text", "caption") if all(k in r for r in rows)), None)
        if key is None:
            raise ValueError(f"{folder}/metadata.jsonl: every row needs a 'text' (or 'caption') for a text model")
        return [folder / r["file_name"] for r in rows], [str(r[key]) for r in rows], None
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        items = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES]
    elif has_metadata:
        rows = _metadata(folder)
        if not all("label" in r for r in rows):
            raise ValueError(f"{folder}/metadata.jsonl: class-conditional training needs a 'label' in every row")
        classes = sorted({str(r["label"]) for r in rows})
        items = [(folder / r["file_name"], classes.index(str(r["label"]))) for r in rows]
    else:
        raise ValueError(f"{folder} has no class sub-folders and no metadata.jsonl")
    if not items:
        raise ValueError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    files, labels = zip(*items)
    return list(files), list(labels), classes


def folder_data(folder: Path, task: str, vae: AutoencoderKL, encode_batch: int = 64) -> LatentData:
    """Every image encoded once and kept in memory (meant for small fine-tuning folders)."""
    files, conds, classes = _folder_items(folder, task)
    size = vae.config.sample_size
    latents = torch.cat([encode(vae, torch.stack([_load_image(f, size) for f in files[i:i + encode_batch]])).cpu()
                         for i in range(0, len(files), encode_batch)])
    labels_t = torch.tensor(conds) if task == "class" else None

    def batch(seed: int, n: int, device):
        idx = torch.randint(0, len(files), (n,), generator=torch.Generator().manual_seed(seed))
        cond = labels_t[idx].to(device) if task == "class" else [conds[i] for i in idx.tolist()]
        return latents[idx].to(device), cond

    what = f"in {len(classes)} classes" if classes else "with captions"
    return LatentData(batch, len(classes) if classes else None, f"{len(files)} images {what} from {folder}")


def parse_objects(spec: str) -> tuple[int, int]:
    """'1-2' -> (1, 2); '2' -> (2, 2)."""
    try:
        lo, _, hi = spec.partition("-")
        return int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"--objects takes MIN-MAX (e.g. 1-2), got {spec!r}") from None


def make_data(spec: str, task: str, vae: AutoencoderKL, num_frames: int = 8, pool: int = 0, seed: int = 0,
              tokenize: Callable | None = None, objects: str = "1-3", targets: Callable | None = None,
              counterfactual: bool = False, position_prob: float = VIDEO_POSITION_PROB) -> LatentData:
    """The one place a data source is chosen."""
    if spec == "shapes":
        return shapes_data(task, vae, num_frames, pool, seed, tokenize, parse_objects(objects), targets, counterfactual,
                           position_prob)
    if position_prob != VIDEO_POSITION_PROB:
        raise ValueError("--video-position-prob sets how the shapes world captions its videos (--data shapes)")
    if targets is not None:
        raise ValueError("--grounding-loss needs the shapes world's object masks (--data shapes)")
    if counterfactual:
        raise ValueError("--caption-contrast needs the shapes world's counterfactual captions (--data shapes)")
    return folder_data(Path(spec), task, vae)


def batch_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of step `step`'s whole global batch: its items, timesteps, noise and condition dropout (train_dit
    draws the global batch on every process and takes its rows; `rank` is for scripts that draw per process)."""
    return seed * 1_000_003 + step * 64 + rank


def take(cond, rows: slice):
    """Rows of a condition: class ids (B,), or text (tokens (B, L, E), keep (B, L))."""
    return tuple(c[rows] for c in cond) if isinstance(cond, tuple) else cond[rows]


# ----------------------------------------------------------------------------------------------- conditioning
class Conditioner:
    """Raw conditions -> the model's inputs, and the one call of the model the objective makes.

    Class models take the ids; in training (a `seed` given), `uncond_prob` of them become `null_class` (the DiT's
    class_dropout_prob and null id: the script draws this dropout from the step's seed instead of leaving it to the
    model's own torch.rand, so that it is a function of the sample's place in the global batch, whatever the
    number of processes and micro-batches). Text models take the frozen text encoder's tokens and keep mask; in
    training, `uncond_prob` of the captions (chosen from the step's seed) become the empty prompt, the pipelines'
    default negative prompt.
    """

    def __init__(self, task: str, text_encoder=None, uncond_prob: float = 0.0, null_class: int | None = None):
        self.task, self.text_encoder, self.uncond_prob = task, text_encoder, uncond_prob
        self.null_class = null_class
        # the empty prompt's token ids (1, L): the pipelines' default negative prompt, tokenised once
        self.empty_ids = text_encoder.tokenize([""]) if text_encoder is not None else None

    @torch.no_grad()
    def __call__(self, cond, seed: int | None = None):
        """cond: class ids, captions, or captions' token ids (B, L) from the encoder's tokenizer."""
        if self.task == "class":
            if seed is None or self.uncond_prob <= 0 or self.null_class is None:
                return cond
            drop = torch.from_numpy(np.random.default_rng(seed).random(len(cond)) < self.uncond_prob).to(cond.device)
            return torch.where(drop, torch.full_like(cond, self.null_class), cond)
        ids = cond if torch.is_tensor(cond) else self.text_encoder.tokenize(list(cond))
        if seed is not None and self.uncond_prob > 0:
            drop = self.dropped(seed, len(ids)).to(ids.device)
            ids = torch.where(drop[:, None], self.empty_ids.to(ids.device), ids)
        tokens, keep = self.text_encoder.encode_text_tokens(ids)
        return tokens.float(), keep

    def dropped(self, seed: int, n: int) -> torch.Tensor:
        """(n,) bool: the rows of step `seed`'s batch whose caption becomes the empty prompt."""
        if self.uncond_prob <= 0:
            return torch.zeros(n, dtype=torch.bool)
        return torch.from_numpy(np.random.default_rng(seed).random(n) < self.uncond_prob)

    def grounded(self, tokens_BKL: torch.Tensor, seed: int) -> torch.Tensor:
        """Grounding token targets (dit/grounding.py) without the captions that step `seed` drops to the empty
        prompt: their tokens are gone, so they have nothing to ground."""
        return tokens_BKL & ~self.dropped(seed, len(tokens_BKL)).to(tokens_BKL.device)[:, None, None]

    def model_fn(self, net):
        if self.task == "class":
            return lambda x, t, y: net(x, t, y)
        return lambda x, t, c: net(x, t, encoder_hidden_states=c[0], encoder_attention_mask=c[1])


def build_pipeline(task: str, model, vae: AutoencoderKL, scheduler, text_encoder):
    if task == "class":
        return ClassToImagePipeline(transformer=model, vae=vae, scheduler=scheduler)
    return PIPELINES[task](transformer=model, vae=vae, scheduler=scheduler, text_encoder=text_encoder)


# ----------------------------------------------------------------------------------------------- main
@torch.no_grad()
def eval_loss(model, objective, conditioner, eval_batch, device) -> float:
    """The objective on a fixed batch with fixed timesteps and noise: comparable across steps and runs."""
    was_training = model.training
    model.eval()
    x0, cond = eval_batch
    out = objective(conditioner.model_fn(model), x0, cond, torch.Generator(device).manual_seed(EVAL_SEED))
    model.train(was_training)
    if "mse" in out:  # DDPM: the unweighted loss, so a --p2-gamma run compares with the others
        return (out["mse"] + getattr(objective, "vlb_weight", 0.0) * out.get("vlb", 0.0)).item()
    return out["loss"].item()


def sample_metrics(args, task, model, vae, objective, text_encoder, n: int | None = None) -> dict:
    """Analyser metrics of `n` (default --sample-eval-n) samples from `model` (dit.evaluation); DDPM objective only."""
    n = n or args.sample_eval_n
    if not n or args.objective != "ddpm":
        return {}
    was_training = model.training
    model.eval()
    pipe = build_pipeline(task, model, vae, objective.scheduler, text_encoder)
    pipe.set_progress_bar_config(disable=True)
    out = evaluate_pipeline(pipe, n=n, seed=0, cfg=args.sample_eval_cfg)
    model.train(was_training)
    return {k: v for k, v in out.items() if isinstance(v, float) and k not in ("cfg",)}


def selection_score(task: str, metrics: dict) -> float:
    """One number to pick the best weights by: the mean of the task's target metrics."""
    return float(np.mean([metrics[k] for k in TARGETS[task] if k in metrics] or [-1.0]))


def main(args) -> dict:
    # --batch-size is the global batch and one optimiser step consumes it whatever the number of processes, so the
    # LR schedule advances once per step (accelerate advances it once per process unless batches are "split").
    if args.fsdp and args.lora:
        raise ValueError("--fsdp with --lora is not supported: a LoRA fine-tune's trainable weights are small, train "
                         "it with DDP (without --fsdp)")
    run = start_run(args, split_batches=True, fsdp=args.fsdp, checkpoint_blocks=args.gradient_checkpointing)
    acc = run.accelerator
    sharded = acc.is_fsdp2  # --fsdp on more than one process
    vae = AutoencoderKL.from_pretrained(args.vae).to(acc.device).eval().requires_grad_(False)
    model = load_model(args.model, args.objective, args.qk_norm)
    # where a video model's saved folder points for the weights it shares with its image model (None: a full save)
    args.image_model_folder = _shipped_or_path(args.save_over_image) if args.save_over_image \
        else getattr(model, "image_model_folder", None)
    if args.image_model_folder is not None and not isinstance(model, LatteDiT):
        raise ValueError(f"--save-over-image applies to video models; --model {args.model} is not one")
    task = task_of(model)
    if args.caption_refiner:
        if task == "class":
            raise ValueError("--caption-refiner applies to text and video models (they read captions)")
        folder = getattr(model, "image_model_folder", None)
        model = with_caption_refiner(model, args.caption_refiner, args.caption_refiner_mlp_ratio)
        if folder is not None:
            model.image_model_folder = folder
    if args.temporal_text:
        if task != "video":
            raise ValueError("--temporal-text applies to video models (it conditions their temporal blocks)")
        model = with_temporal_text_modulation(model)
    if args.temporal_text_attention:
        if task != "video":
            raise ValueError("--temporal-text-attention applies to video models (it feeds their temporal blocks)")
        model = with_temporal_text_attention(model, args.temporal_text_attention)
    if args.init_from_image:
        image = load_model(args.init_from_image, args.objective)
        if task != "video" or task_of(image) != "text":
            raise ValueError(f"--init-from-image starts a video model from a text-to-image model; got a {task} model "
                             f"({args.model}) and a {task_of(image)} model ({args.init_from_image})")
        init_from_image_model(model, image)
    if (vae.config.latent_channels, vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)) != \
            (model.config.in_channels, model.config.sample_size):
        raise ValueError(f"the VAE's latents do not fit the model ({model.config.in_channels} channels, "
                         f"{model.config.sample_size} px)")
    text_encoder = None
    if task != "class":
        from shapes.clip import ShapesCLIP

        text_encoder = ShapesCLIP.from_pretrained(args.text_encoder, device=acc.device).eval().requires_grad_(False)
    if task == "class":
        drop = model.config.class_dropout_prob
        conditioner = Conditioner(task, uncond_prob=drop, null_class=model.config.num_classes if drop > 0 else None)
        model.label_embed.dropout_prob = 0.0  # the conditioner drops labels instead (see Conditioner); runtime only
    else:
        conditioner = Conditioner(task, text_encoder, args.uncond_prob)
    world, accum = acc.num_processes, args.grad_accum
    if accum < 1 or args.batch_size % (world * accum):
        raise ValueError(f"--batch-size {args.batch_size} (the global batch) must be a multiple of processes x "
                         f"--grad-accum = {world} x {accum}")
    micro = args.batch_size // (world * accum)
    if args.gradient_checkpointing and not sharded:  # under FSDP the plugin checkpoints the blocks (fsdp_plugin)
        model.enable_gradient_checkpointing()
    targets = None
    if args.grounding_loss:
        if task == "class":
            raise ValueError("--grounding-loss applies to text and video models (it grounds caption tokens)")
        targets = grounding_targets(text_encoder, model.config.sample_size // model.config.patch_size,
                                    vae.config.sample_size, model.config.num_frames if task == "video" else None)
    if not 0 <= args.video_position_prob <= 1:
        raise ValueError(f"--video-position-prob must be in [0, 1], got {args.video_position_prob}")
    if args.video_position_prob != VIDEO_POSITION_PROB and task != "video":
        raise ValueError("--video-position-prob applies to video models")
    if args.caption_contrast:
        if task != "video":
            raise ValueError("--caption-contrast applies to video models (its counterfactuals change the motions)")
        if args.grounding_loss:
            raise ValueError("--caption-contrast and --grounding-loss do not combine (one records attention maps "
                             "of a forward the other doubles)")
    data = make_data(args.data, task, vae, getattr(model.config, "num_frames", 8), args.pool, args.seed,
                     text_encoder.tokenize if text_encoder is not None else None, args.objects, targets,
                     counterfactual=bool(args.caption_contrast), position_prob=args.video_position_prob)
    if task == "class" and data.num_classes > model.config.num_classes:
        raise ValueError(f"the data has {data.num_classes} classes, the model only {model.config.num_classes}")
    if (args.p2_gamma or args.prediction_type) and args.objective != "ddpm":
        raise ValueError("--p2-gamma and --prediction-type are DDPM options; the flow objective predicts a velocity "
                         "and has --timestep-sampling instead")
    objective = make_objective(args.objective, **(
        {"timestep_sampling": args.timestep_sampling} if args.objective == "flow" else
        {"vlb_weight": args.vlb_weight, "p2_gamma": args.p2_gamma, "p2_k": args.p2_k,
         "prediction_type": args.prediction_type or prediction_type_of(args.model)}))
    contrast = CaptionContrast(objective, args.caption_contrast, args.contrast_margin, args.contrast_from) \
        if args.caption_contrast else None
    if args.trainable:
        if args.lora:
            raise ValueError("--trainable with --lora: LoRA already decides what trains (its adapters)")
        for n, p in model.named_parameters():
            p.requires_grad_(bool(re.search(args.trainable, n)))
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"--trainable {args.trainable!r} matches no parameter of {type(model).__name__}")
    net = add_lora(model, args.lora) if args.lora else model
    params = [p for p in net.parameters() if p.requires_grad]
    impl = args.adam_impl if args.adam_impl != "auto" else ("fused" if acc.device.type == "cuda" else "foreach")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=impl == "fused" or None,
                            foreach=impl == "foreach" if impl != "fused" else None)
    sched = cosine_schedule(opt, args.steps, args.warmup if args.warmup is not None else min(500, args.steps // 10),
                            run.time_progress if args.anneal_to_time_limit else None)
    net, opt, sched = acc.prepare(net, opt, sched)
    # Under FSDP the prepared model's parameters are new tensors (DTensor shards): the EMA averages those, shard by
    # shard, and gathers the full weights when they are saved or evaluated.
    params = [p for p in net.parameters() if p.requires_grad]
    ema = EMA(params, decay=args.ema_decay, foreach=True)
    acc.register_for_checkpointing(ema)
    step = run.resume()

    x_eval, c_eval = data.batch(EVAL_SEED, args.eval_n, acc.device)
    eval_batch = (x_eval, conditioner(c_eval))
    unwrapped = acc.unwrap_model(net)
    base = unwrapped.get_base_model() if args.lora else unwrapped  # the DiT / PixArtDiT / LatteDiT itself

    best = {"score": -1.0, "step": None, "params": None}  # the best EMA weights seen by the sample evaluation
    replica = {}

    def gathered(averaged: bool):
        """FSDP, on every process (a collective): the full weights, current or EMA, in an unsharded copy of the
        model on the main process (None elsewhere), which the main process evaluates and saves."""
        if averaged:
            current = [local(p).detach().clone() for p in params]
            ema.copy_to(params)
        state = acc.get_state_dict(net)
        if averaged:
            with torch.no_grad():
                for p, c in zip(params, current):
                    local(p).copy_(c)
        if not acc.is_main_process:
            return None
        if "model" not in replica:
            with torch.random.fork_rng(devices=[]):  # its throw-away initialisation leaves the RNG alone
                cls = next(c for c in TASK_OF if isinstance(base, c))  # not fully_shard's FSDP<class> subclass
                replica["model"] = cls.from_config(base.config).to(acc.device)
        replica["model"].load_state_dict(state)
        return replica["model"]

    def evaluate() -> dict:
        """Loss of the current weights; sample metrics of the EMA weights (what would ship). With --keep-best the
        EMA weights that scored best so far are remembered (a late divergence then cannot ruin the result). Under
        FSDP this runs on every process (gathering the weights) and the main process evaluates."""
        main = acc.is_main_process
        current = gathered(averaged=False) if sharded else unwrapped
        metrics = {"eval_loss": eval_loss(current, objective, conditioner, eval_batch, acc.device)} if main else {}
        if args.sample_eval_n:
            if sharded:
                shipped = gathered(averaged=True)  # (the same copy: the current weights' loss is taken)
            else:
                ema.store(params)
                ema.copy_to(params)
                shipped = base
            if main:
                metrics.update(sample_metrics(args, task, shipped, vae, objective, text_encoder))
                score = selection_score(task, metrics)
                if args.keep_best and score > best["score"]:
                    kept = shipped.parameters() if sharded else params
                    best.update(score=score, step=step, params=[p.detach().clone() for p in kept])
            if not sharded:
                ema.restore(params)
        return metrics

    guard = SpikeGuard(unwrapped, opt, sched, ema, every=args.rollback_on_spike,
                       reduce=lambda t: acc.reduce(t, reduction="mean")) if args.rollback_on_spike else None
    bar = tqdm(total=args.steps, initial=step, disable=not acc.is_local_main_process, desc=f"dit-{task}")
    net.train()
    model_fn = conditioner.model_fn(torch.compile(net) if args.compile else net)
    maps = CrossAttentionMaps(base) if args.grounding_loss else None
    while step < args.steps:
        # The whole global batch (items, t, noise, condition dropout) comes from the step's seed on every process;
        # each process takes its rows and splits them in micro-batches, so the gradient (DDP's mean over processes
        # of the mean over micro-batches) is the one a single process would compute for the global batch.
        seed = batch_seed(args.seed, step)
        x0_all, raw = data.batch(seed, args.batch_size, acc.device)
        cond_all = conditioner(raw, seed)
        t_all, noise_all = objective.sample(x0_all, torch.Generator(acc.device).manual_seed(seed))
        if maps is not None:
            masks_all, tokens_all = data.grounding(seed, args.batch_size, acc.device)
            tokens_all = conditioner.grounded(tokens_all, seed)
        if contrast is not None:  # the same items' counterfactual captions, never dropped; rows dropped to '' idle
            counter_all = conditioner(data.counterfactual(seed, args.batch_size, acc.device))
            kept_all = ~conditioner.dropped(seed, args.batch_size).to(acc.device)
        parts = []
        for m in range(accum):
            rows = slice((acc.process_index * accum + m) * micro, (acc.process_index * accum + m + 1) * micro)
            # no gradient all-reduce until the last micro-batch has added its share
            with (acc.no_sync(net) if m < accum - 1 else contextlib.nullcontext()), acc.autocast(), \
                    (maps.recording() if maps is not None else contextlib.nullcontext()):
                if contrast is not None:
                    terms = contrast(model_fn, x0_all[rows], take(cond_all, rows), take(counter_all, rows),
                                     (t_all[rows], noise_all[rows]), kept_all[rows])
                else:
                    terms = objective(model_fn, x0_all[rows], take(cond_all, rows),
                                      draws=(t_all[rows], noise_all[rows]))
                if maps is not None:
                    masks, tokens = masks_all[rows], tokens_all[rows]
                    if masks.ndim == 4:  # video (b, F, K, N): every frame grounded on its own
                        tokens = tokens.repeat_interleave(masks.shape[1], dim=0)
                        masks = masks.flatten(0, 1)
                    g = grounding_loss(maps.take(), masks, tokens)
                    terms = {**terms, "loss": terms["loss"] + args.grounding_loss * g, "grounding": g.detach()}
                acc.backward(terms["loss"] / accum)
            parts.append(terms)
        terms = {k: torch.stack([t[k] for t in parts]).mean() for k in parts[0]}  # this process's rows
        grad_norm = optimizer_step(acc, params, opt, sched)
        ema.step(params)
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            terms = {k: acc.reduce(v.detach(), reduction="mean") for k, v in terms.items()}  # the global batch's
            bar.set_postfix(loss=f"{terms['loss'].item():.4f}")
            run.log({"step": step, **{k: v.item() for k, v in terms.items()},
                     "grad_norm": None if grad_norm is None else float(full(grad_norm)), "lr": sched.get_last_lr()[0],
                     "seconds": round(run.train_seconds(), 3)})
        if guard is not None and (event := guard.update(step, terms["loss"])):
            run.log(event)
            bar.write(f"loss spike at step {step}: window mean {event['window_loss']:.4f} vs best "
                      f"{event['best_window_loss']:.4f}; rolled back, LR x{event['lr_scale']:g}")
        state = run.end_of_step(step, bar, evaluate, evaluate_everywhere=sharded)
        if state == "interrupted":
            bar.close()
            return {}
        if state == "stop":
            break
    bar.close()

    metrics = {}
    acc.wait_for_everyone()
    if sharded:  # the EMA's full weights, in an unsharded copy on the main process (a collective)
        unwrapped = base = gathered(averaged=True)
        params = [p for p in base.parameters() if p.requires_grad] if acc.is_main_process else None
    if acc.is_main_process:
        final_n = args.final_eval_n or args.sample_eval_n
        if not sharded:
            ema.copy_to(params)  # the shipped weights are the EMA
        selected = step
        if args.keep_best and best["params"] is not None:
            last = selection_score(task, sample_metrics(args, task, base, vae, objective, text_encoder))
            if best["score"] > last:  # same prompts and seed as the periodic evaluations
                with torch.no_grad():
                    for p, b in zip(params, best["params"]):
                        p.copy_(b)
                selected = best["step"]
                print(f"keeping the EMA weights of step {selected} (score {best['score']:.3f} > {last:.3f} at the end)")
        final = unwrapped.merge_and_unload() if args.lora else unwrapped
        final = final.float().eval()
        folder = Path(args.save_to) if args.save_to else run.out / "model"
        save_pipeline(folder, task, final, vae, objective, text_encoder, args)  # rounds to --save-dtype first
        metrics = {"eval_loss": eval_loss(final, objective, conditioner, eval_batch, acc.device),
                   **sample_metrics(args, task, final, vae, objective, text_encoder, final_n)}
        run.plot(["eval_loss", *[k for k in TARGETS[task] if k in metrics]])
        card_extra = {"fsdp": sharded, "selected_step": selected, "objective": args.objective, "data": args.data, "base_model": args.model, "lora": args.lora,
                      "task": task, "vae": _shown(args.vae)}
        if final_n and args.objective == "ddpm":
            card_extra["eval"] = {"kind": task, "n": final_n, "seed": 0, "cfg": args.sample_eval_cfg, "steps": 25,
                                  "sampler": "dpm++"}
        write_model_card(
            folder, title=folder.name,
            summary=f"{task.capitalize()}-conditional {type(final).__name__} ({args.model}) trained with the "
                    f"{args.objective} objective on {data.description}; latents from the VAE at `{_shown(args.vae)}`"
                    f"{'; text from `%s`' % _shown(args.text_encoder) if task != 'class' else ''}. "
                    f"{'LoRA rank %d, merged; ' % args.lora if args.lora else ''}EMA weights (decay {args.ema_decay}).",
            run=run, metrics={**metrics, "eval_loss_n": args.eval_n},  # the loss batch; the samples: card "eval"
            targets=TARGETS[task] if args.data == "shapes" else {}, extra=card_extra)
        print({"final": metrics})
    acc.end_training()
    return metrics


def _shown(path: str) -> str:
    """A path as the card shows it: relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


def save_pipeline(folder: Path, task: str, model, vae, objective, text_encoder, args) -> None:
    """The pipeline folder: transformer (in --save-dtype) and scheduler written, VAE / text encoder referenced."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    # DDPM-trained models ship with DPM-Solver++ on the training schedule: the app's 25-step default needs it.
    scheduler = make_scheduler("dpm++", objective.scheduler.config) if args.objective == "ddpm" \
        else FlowMatchEulerDiscreteScheduler()
    saved = model.to(torch.float16) if args.save_dtype == "float16" else model
    pipe = build_pipeline(task, saved, vae, scheduler, text_encoder)
    if task == "class":
        id2label = {i: class_name(i) for i in range(NUM_CLASSES)} if args.data == "shapes" else None
        pipe.save_pretrained(folder, vae_folder=args.vae, id2label=id2label)
    elif task == "video":
        pipe.save_pretrained(folder, vae_folder=args.vae, text_encoder_folder=args.text_encoder,
                             image_model_folder=getattr(args, "image_model_folder", None))
    else:
        pipe.save_pretrained(folder, vae_folder=args.vae, text_encoder_folder=args.text_encoder)
    model.float()


if __name__ == "__main__":
    main(parse_args())
