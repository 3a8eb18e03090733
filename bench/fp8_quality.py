"""What FP8 linears cost in quality on the shipped shapes defaults (issue 6, "beyond bf16"). CPU; not a test.

For each model: the card's evaluation prompts and seeds (25 DPM-Solver++ steps, guidance 4), sampled twice from the
same noise, once with the float32 transformer and once with its block linears swapped for `dit.fp8.FP8Linear`
(e4m3 weights per output channel, activations per token). On the CPU the FP8 layer runs its exact emulation: the
same quantised operands the GPU's `_scaled_mm` multiplies, dequantised, product in float32 (the GPU's accurate mode
accumulates in float32 too), so the images are the FP8 model's up to accumulation order. Reports, per model, the
prompt accuracies of both, and the PSNR between each pair of images (uint8, per image, then averaged).

    python bench/fp8_quality.py --models shapes-c2i,shapes-t2i --n 256 --out bench/results/fp8_quality.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from dit.evaluation import caption_prompts, class_prompts, generate_samples, task_of  # noqa: E402
from dit.fp8 import quantize_linears  # noqa: E402
from shapes.metrics import prompt_accuracy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    return [float("inf") if m == 0 else float(10 * torch.log10(255.0 ** 2 / m)) for m in mse]


def load(folder: Path):
    from dit.pipelines import ClassToImagePipeline
    from dit.text_pipelines import TextToImagePipeline

    kind = json.loads((folder / "card.json").read_text())["eval"]["kind"]
    cls = {"class": ClassToImagePipeline, "text": TextToImagePipeline}[kind]
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_sampler("dpm++")
    return pipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="shapes-c2i,shapes-t2i")
    p.add_argument("--n", type=int, default=256, help="prompts per set (text models: per object count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/fp8_quality.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"device": f"cpu ({platform.machine()}, {args.threads} threads)", "torch": torch.__version__,
              "date": dt.date.today().isoformat(),
              "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]), "models": {}}
    for name in args.models.split(","):
        pipe = load(ROOT / "weights" / name)
        task = task_of(pipe)
        sets = ([("class", class_prompts(args.n, args.seed))] if task == "class" else
                [(f"{k}_object", caption_prompts(args.n, k, args.seed)) for k in (1, 2)])
        row, t0 = {}, time.perf_counter()
        images = {}
        for variant in ("float32", "fp8"):
            if variant == "fp8":
                row["fp8_linears"] = len(quantize_linears(pipe.transformer))
            for set_name, prompts in sets:
                x = generate_samples(pipe, prompts, 64, args.seed, 25, 4.0)
                images[variant, set_name] = x
                row[f"{set_name}_accuracy_{variant}"] = prompt_accuracy(x, prompts)["accuracy"]
        for set_name, _ in sets:
            values = psnr(images["float32", set_name], images["fp8", set_name])
            finite = [v for v in values if v != float("inf")]
            row[f"{set_name}_psnr_db_mean"] = round(sum(finite) / max(len(finite), 1), 2)
            row[f"{set_name}_identical_images"] = len(values) - len(finite)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        result["models"][name] = row
        print(name, json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
