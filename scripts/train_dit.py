"""Train or fine-tune a class-conditional DiT on VAE latents, with the DDPM (ε + learned-σ VLB) or flow objective.

    accelerate launch scripts/train_dit.py --out runs/dit-t --model DiT-T/2 --steps 20000 --batch-size 256 \
        --mixed-precision bf16                                     # from scratch on rendered shapes classes
    python scripts/train_dit.py --out runs/ft --model runs/dit-t/model --data my_images/ --lora 8 \
        --steps 500 --batch-size 16 --lr 1e-4                      # LoRA fine-tune on a folder of class sub-folders
    python scripts/train_dit.py --out runs/smoke --model DiT-T/2 --steps 20 --batch-size 8 --cpu   # smoke test

`--model` is a named size (`DiT-T/2`, `DiT-XL/2`, ...), a folder saved by this project (`DiT.save_pretrained`),
a diffusers `DiTTransformer2DModel` folder, or an official facebookresearch/DiT checkpoint (.pt / .safetensors).
`--data shapes` renders a fresh batch of class scenes per step; `--data FOLDER` reads class sub-folders (or images
with a `metadata.jsonl` holding `file_name` and `label`), resized and centre-cropped to the VAE's resolution, and
encodes them once. Step `s`'s batch and noise come from (seed, s, rank), so a resumed run is exact. The EMA of the
weights (merged LoRA) is saved to `--out/model` in float32, with a model card.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from diffusers import AutoencoderKL  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

from dit.dit import DIT_CONFIGS, DiT  # noqa: E402
from dit.loaders import dit_from_diffusers, load_official_dit  # noqa: E402
from dit.objectives import make_objective  # noqa: E402
from shapes import NUM_CLASSES  # noqa: E402
from shapes.data import make_batch  # noqa: E402
from shapes.render import to_float  # noqa: E402
from training import add_common_args, cosine_schedule, optimizer_step, start_run, write_model_card  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED_VAE = REPO / "weights" / "shapes-vae"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# The linears LoRA adapts: attention q/k/v and output projection, and both MLP layers of every block.
LORA_TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
EVAL_SEED = 12345


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--model", default="DiT-T/2", help="named size, our saved folder, diffusers DiT folder or official .pt")
    p.add_argument("--objective", default="ddpm", choices=["ddpm", "flow"])
    p.add_argument("--timestep-sampling", default="uniform", choices=["uniform", "logit_normal"], help="flow only")
    p.add_argument("--data", default="shapes", help="'shapes' or a folder of images (class sub-folders)")
    p.add_argument("--vae", default=str(SHIPPED_VAE))
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=None, help="LR warm-up steps (default: min(500, steps // 10))")
    p.add_argument("--eval-n", type=int, default=64, help="size of the fixed, seeded evaluation batch")
    p.add_argument("--log-every", type=int, default=10)
    p.set_defaults(lr=1e-4)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- model
def load_dit(spec: str, objective: str) -> DiT:
    """A DiT from a named size (fresh; learns σ only under the DDPM objective), our or diffusers' saved folder, or an
    official checkpoint file."""
    if spec in DIT_CONFIGS:
        return DiT.from_name(spec, learn_sigma=objective == "ddpm")
    path = Path(spec)
    if path.is_dir():
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        if config.get("_class_name") == "DiT":
            return DiT.from_pretrained(path)
        if config.get("_class_name") == "DiTTransformer2DModel":
            return dit_from_diffusers(path)
        if (path / "transformer" / "config.json").is_file():  # a whole diffusers DiTPipeline folder
            return dit_from_diffusers(path / "transformer")
        raise ValueError(f"{path} is neither our DiT folder nor a diffusers DiTTransformer2DModel folder")
    if path.is_file():
        return load_official_dit(path)
    raise ValueError(f"--model {spec!r}: not a named size ({', '.join(DIT_CONFIGS)}), folder or checkpoint file")


def add_lora(model: DiT, rank: int):
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


@dataclass
class LatentData:
    """`batch(seed, n, device)` -> (latents (n, C, h, w), class labels (n,)); `num_classes` used by the data."""
    batch: callable
    num_classes: int
    description: str


def shapes_data(vae: AutoencoderKL) -> LatentData:
    size = vae.config.sample_size

    def batch(seed: int, n: int, device):
        b = make_batch("class", seed, n, size=size, device=vae.device)
        return encode(vae, b["image"]).to(device), b["label"].to(device)

    return LatentData(batch, NUM_CLASSES, "rendered shapes class scenes")


def _load_image(path: Path, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (bicubic), centre-crop to size x size: uint8 (3, size, size)."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _folder_items(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        items = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES]
    elif (folder / "metadata.jsonl").is_file():
        rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
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


def folder_data(folder: Path, vae: AutoencoderKL, encode_batch: int = 64) -> LatentData:
    """Every image encoded once and kept in memory (meant for small fine-tuning folders)."""
    files, labels, classes = _folder_items(folder)
    size = vae.config.sample_size
    latents = torch.cat([encode(vae, torch.stack([_load_image(f, size) for f in files[i:i + encode_batch]])).cpu()
                         for i in range(0, len(files), encode_batch)])
    labels_t = torch.tensor(labels)

    def batch(seed: int, n: int, device):
        idx = torch.randint(0, len(files), (n,), generator=torch.Generator().manual_seed(seed))
        return latents[idx].to(device), labels_t[idx].to(device)

    return LatentData(batch, len(classes), f"{len(files)} images in {len(classes)} classes from {folder}")


def make_data(spec: str, vae: AutoencoderKL) -> LatentData:
    """The one place a data source is chosen (text / video variants add theirs here)."""
    return shapes_data(vae) if spec == "shapes" else folder_data(Path(spec), vae)


def batch_seed(seed: int, step: int, rank: int) -> int:
    return seed * 1_000_003 + step * 64 + rank


# ----------------------------------------------------------------------------------------------- main
def extra_metrics(model: DiT) -> dict:
    """Hook for sample-based metrics (e.g. analyser accuracy of generated classes); none yet."""
    return {}


@torch.no_grad()
def eval_loss(model, objective, eval_batch, device) -> float:
    """The objective on a fixed batch with fixed timesteps and noise: comparable across steps and runs."""
    was_training = model.training
    model.eval()
    x0, y = eval_batch
    out = objective(lambda x, t, c: model(x, t, c), x0, y, torch.Generator(device).manual_seed(EVAL_SEED))
    model.train(was_training)
    return out["loss"].item()


def main(args) -> dict:
    run = start_run(args)
    acc = run.accelerator
    vae = AutoencoderKL.from_pretrained(args.vae).to(acc.device).eval().requires_grad_(False)
    data = make_data(args.data, vae)
    model = load_dit(args.model, args.objective)
    if (vae.config.latent_channels, vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)) != \
            (model.config.in_channels, model.config.sample_size):
        raise ValueError(f"the VAE's latents do not fit the model ({model.config.in_channels} channels, "
                         f"{model.config.sample_size} px)")
    if data.num_classes > model.config.num_classes:
        raise ValueError(f"the data has {data.num_classes} classes, the model only {model.config.num_classes}")
    objective = make_objective(args.objective, **(
        {"timestep_sampling": args.timestep_sampling} if args.objective == "flow" else {}))
    net = add_lora(model, args.lora) if args.lora else model
    params = [p for p in net.parameters() if p.requires_grad]
    ema = EMAModel(params, decay=args.ema_decay)
    ema.to(acc.device)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = cosine_schedule(opt, args.steps, args.warmup if args.warmup is not None else min(500, args.steps // 10))
    net, opt, sched = acc.prepare(net, opt, sched)
    acc.register_for_checkpointing(ema)
    step = run.resume()

    eval_batch = data.batch(EVAL_SEED, args.eval_n, acc.device)
    unwrapped = acc.unwrap_model(net)

    def evaluate() -> dict:
        return {"eval_loss": eval_loss(unwrapped, objective, eval_batch, acc.device), **extra_metrics(unwrapped)}

    bar = tqdm(total=args.steps, initial=step, disable=not acc.is_local_main_process, desc="dit")
    net.train()
    while step < args.steps:
        seed = batch_seed(args.seed, step, acc.process_index)
        x0, y = data.batch(seed, args.batch_size, acc.device)
        gen = torch.Generator(acc.device).manual_seed(seed)
        with acc.autocast():
            terms = objective(lambda x, t, c: net(x, t, c), x0, y, gen)
        acc.backward(terms["loss"])
        optimizer_step(acc, params, opt, sched)
        ema.step(params)
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            bar.set_postfix(loss=f"{terms['loss'].item():.4f}")
            run.log({"step": step, **{k: v.item() for k, v in terms.items()}, "lr": sched.get_last_lr()[0]})
        state = run.end_of_step(step, bar, evaluate)
        if state == "interrupted":
            bar.close()
            return {}
        if state == "stop":
            break
    bar.close()

    metrics = {}
    acc.wait_for_everyone()
    if acc.is_main_process:
        ema.copy_to(params)  # the shipped weights are the EMA
        final = unwrapped.merge_and_unload() if args.lora else unwrapped
        final = final.float().eval()
        folder = run.out / "model"
        final.save_pretrained(folder)
        metrics = {"eval_loss": eval_loss(final, objective, eval_batch, acc.device), "eval_n": args.eval_n,
                   **extra_metrics(final)}
        run.plot(["eval_loss"])
        write_model_card(
            folder, title=f"dit-{args.objective}",
            summary=f"Class-conditional DiT ({args.model}) trained with the {args.objective} objective on "
                    f"{data.description}; latents from the VAE at `{args.vae}`. "
                    f"{'LoRA rank %d, merged; ' % args.lora if args.lora else ''}EMA weights (decay {args.ema_decay}).",
            run=run, metrics=metrics, targets={},
            extra={"objective": args.objective, "data": args.data, "base_model": args.model, "lora": args.lora,
                   "vae": args.vae})
        print({"final": metrics})
    acc.end_training()
    return metrics


if __name__ == "__main__":
    main(parse_args())
