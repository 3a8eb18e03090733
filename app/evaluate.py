"""`ditstudio eval --model NAME_OR_PATH`: re-run a shipped model's evaluation (the kind, sample count and seed
its model card names) and print the metrics beside the ones on the card. A VAR (VARPipeline) folder is evaluated by
`vlm.var_pipeline.evaluate_var` with or without a card (the card's n, seed, cfg, top_k, top_p when it has one)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from app.catalog import resolve_model


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="reproduce a shipped model's metrics with the project's own evaluation")
    p.add_argument("--model", required=True, help="a shipped model's name or a model folder")
    p.add_argument("--n", type=int, default=None, help="samples (default: as on the model card)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: as on the model card)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _is_var(folder: Path) -> bool:
    from app.catalog import VAR_PIPELINE, describe

    return (folder / "model_index.json").is_file() and describe(folder)["class_name"] == VAR_PIPELINE


def evaluate_var_folder(folder: Path, n: int | None = None, seed: int | None = None, device: str = "cpu") -> dict:
    """A VARPipeline folder's shapes prompt accuracy (`evaluate_var`), sampled as its card's eval names (cfg, top_k,
    top_p; without a card, VAR's DEFAULT_SAMPLING and n = 192)."""
    from vlm.var_pipeline import VARPipeline, evaluate_var

    card = json.loads((folder / "card.json").read_text()) if (folder / "card.json").is_file() else {}
    spec = card.get("eval", {})
    n = n or spec.get("n", 192)
    seed = spec.get("seed", 0) if seed is None else seed
    sampling = {name: spec[key] for key, name in (("cfg", "guidance_scale"), ("top_k", "top_k"), ("top_p", "top_p"))
                if key in spec}
    pipe = VARPipeline.from_pretrained(folder).to(device)
    metrics = evaluate_var(pipe, n=n, seed=seed, **sampling)
    return {"model": folder.name, "n": n, "seed": seed, "metrics": metrics, "card_metrics": card.get("metrics", {}),
            "targets": card.get("targets", {})}


def evaluate_folder(folder: Path, n: int | None = None, seed: int | None = None, device: str = "cpu") -> dict:
    if n is not None and n < 1:
        raise ValueError(f"--n must be >= 1; got {n}")
    if _is_var(folder):
        return evaluate_var_folder(folder, n=n, seed=seed, device=device)
    card_path = folder / "card.json"
    if not card_path.is_file():
        raise FileNotFoundError(f"{folder} has no card.json: it is not a shipped model with a recorded evaluation")
    card = json.loads(card_path.read_text())
    spec = card.get("eval", {})
    n = n or spec.get("n", 256)
    seed = spec.get("seed", 0) if seed is None else seed
    kind = spec.get("kind")
    if kind == "clip":
        from shapes.clip import ShapesCLIP, evaluate_clip
        metrics = evaluate_clip(ShapesCLIP.from_pretrained(folder, device=device), n=n, seed=seed)
    elif kind == "vae":
        from diffusers import AutoencoderKL

        from shapes.vae import evaluate_vae
        metrics = evaluate_vae(AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).to(device).eval(),
                               n=n, seed=seed)
    elif kind in ("class", "text", "video"):
        from dit.evaluation import evaluate_pipeline
        from dit.pipelines import ClassToImagePipeline
        from dit.text_pipelines import TextToImagePipeline, TextToVideoPipeline

        cls = {"class": ClassToImagePipeline, "text": TextToImagePipeline, "video": TextToVideoPipeline}[kind]
        from dit.dydit_io import is_dydit_folder, load_dydit_pipeline

        # a DyDiT folder: its routers (+ adapters) on the dense base pipeline it references
        pipe = (load_dydit_pipeline(folder) if is_dydit_folder(folder) else cls.from_pretrained(folder)).to(device)
        pipe.set_progress_bar_config(disable=True)
        metrics = evaluate_pipeline(pipe, n=n, seed=seed, steps=spec.get("steps", 25), cfg=spec.get("cfg", 4.0),
                                    sampler=spec.get("sampler", "dpm++"))
    elif kind == "var-tokenizer":
        from vlm.var_pipeline import evaluate_tokenizer
        from vlm.vqvae import MultiScaleVQVAE

        metrics = evaluate_tokenizer(MultiScaleVQVAE.from_pretrained(folder, torch_dtype=torch.float32).to(device)
                                     .eval(), n=n, seed=seed)
    elif kind == "vqa":
        from vlm.generate import evaluate_vqa
        from vlm.llava import LlavaVLM

        metrics = evaluate_vqa(LlavaVLM.from_pretrained(folder, device=device), n=n, seed=seed)
    else:
        raise ValueError(f"{folder}/card.json names evaluation kind {kind!r}; "
                         "known: clip, vae, class, text, video, var-tokenizer, vqa")
    return {"model": folder.name, "n": n, "seed": seed, "metrics": metrics, "card_metrics": card.get("metrics", {}),
            "targets": card.get("targets", {})}


def run(args) -> int:
    result = evaluate_folder(resolve_model(args.model), n=args.n, seed=args.seed, device=args.device)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['model']}: n={result['n']} seed={result['seed']}")
    print(f"  {'metric':28s} {'now':>10s} {'card':>10s}  target")
    for k, v in result["metrics"].items():
        card = result["card_metrics"].get(k, "")
        fmt = (lambda x: f"{x:10.4f}" if isinstance(x, float) else f"{x!s:>10}")
        print(f"  {k:28s} {fmt(v)} {fmt(card)}  {result['targets'].get(k, '')}")
    return 0
