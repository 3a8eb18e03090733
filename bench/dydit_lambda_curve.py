"""DyDiT accuracy over λ (issue 8: "a curve over λ ∈ {0.3 … 0.9}"), collected from the dense-vs-DyDiT comparisons
that `scripts/finetune_dydit.py --evaluate` wrote on the GPU (the same 480 seeded class prompts, or 480 captions per
object count, for every point of a curve), into one JSON, a markdown table and a plot. It re-measures nothing: each
point names the comparison it comes from (a comparison.json, or RESULTS.json#RUN for a run of a device call's
results.json, scripts/gpu/collect_t2i_call.py).

    python bench/dydit_lambda_curve.py              # class: the eleventh and twelfth sessions' points
    python bench/dydit_lambda_curve.py --task text  # text: the sixteenth session's points (bench/results/gpu_round16/)
    python bench/dydit_lambda_curve.py --point 0.6=path/to/comparison.json ...
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
R = "bench/results/gpu_round11"
R12 = "bench/results/gpu_round12/call1/runs"
# λ -> comparison.json (which call trained it is in docs/dydit.md, "Eleventh session" and "Twelfth session")
DEFAULT_POINTS = {
    0.3: f"{R}/call3/models/runs/dydit-lam0.3/comparison.json",
    0.5: f"{R}/call6/compare/models/runs/compare-1/comparison.json",  # shipped in the eleventh session
    0.54: f"{R12}/dydit-lam0.54/comparison.json",
    0.56: f"{R12}/dydit-lam0.56/comparison.json",  # = weights/shapes-dydit-c2i
    0.58: f"{R12}/dydit-lam0.58/comparison.json",
    0.6: f"{R}/call6/compare/models/runs/compare-2/comparison.json",  # the λ 0.6 run the three above continued
    0.7: f"{R}/call3/models/runs/dydit-lam0.7/comparison.json",
    0.9: f"{R}/call5/models/runs/compare-1/comparison.json",
}
T16 = "bench/results/gpu_round16"
# The text curve: the shipped λ 0.55 state (call 3) continued for the same 400 s (about 1,676 steps × 256) at each λ,
# side by side in one call; the λ 0.55 point is that state itself (docs/dydit.md, "Sixteenth session").
TEXT_POINTS = {
    0.3: f"{T16}/lambda_curve/results.json#cont0.3",
    0.5: f"{T16}/lambda_curve/results.json#cont0.5",
    0.55: f"{T16}/call3/results.json#contlow0.55",  # the sixteenth session's shipped state (replaced in the 17th)
    0.7: f"{T16}/lambda_curve/results.json#cont0.7",
    0.9: f"{T16}/lambda_curve/results.json#cont0.9",
}
# what each task's curve reads from a comparison: its accuracy, and the parts shown beside it
TASKS = {"class": ("prompt_accuracy", ("shape", "colour", "count")),
         "text": ("one_object_accuracy", ("one_object_shape", "one_object_colour", "one_object_count",
                                          "two_object_accuracy"))}


def read_comparison(path: str) -> dict:
    """A comparison.json, or RESULTS.json#RUN: that run's comparison in a device call's results.json."""
    file, _, run = path.partition("#")
    data = json.loads((ROOT / file).read_text())
    if not run:
        return data
    if run not in data.get("runs", {}) or "comparison" not in data["runs"][run]:
        raise ValueError(f"{file}: no comparison for run {run!r} (runs: {sorted(data.get('runs', {}))})")
    return data["runs"][run]["comparison"]


def load_points(points: dict[float, str], task: str = "class") -> list[dict]:
    accuracy, parts = TASKS[task]
    rows = []
    for lam, path in sorted(points.items()):
        c = read_comparison(path)
        if c.get("kind") != task:
            raise ValueError(f"{path}: a {c.get('kind')!r} comparison; this curve is for the {task} model")
        d = c["dydit"]
        rows.append({"lam": lam, "source": path, "device": c.get("device"), "n": d["n"],
                     "flops": c["sampling_flops_ratio"], "flops_with_overheads": c["sampling_flops_ratio_with_overheads"],
                     "accuracy": d[accuracy], **{k: d[k] for k in parts}, "dense_accuracy": c["dense"][accuracy]})
    dense = {r["dense_accuracy"] for r in rows}
    if len(dense) != 1:
        raise ValueError(f"the comparisons disagree on the dense model's accuracy ({sorted(dense)}): not one prompt set")
    return rows


def markdown(rows: list[dict], task: str = "class") -> str:
    dense = rows[0]["dense_accuracy"]
    parts = TASKS[task][1]
    name = "prompt accuracy" if task == "class" else "one-object accuracy"
    lines = [f"| λ | executed / dense FLOPs (+ overheads) | {name} | vs dense | {' / '.join(parts).replace('_', ' ')} |",
             "|---|---|---|---|---|",
             f"| dense | 1 | {dense:.3f} | | |"]
    for r in sorted(rows, key=lambda r: -r["lam"]):
        lines.append(f"| {r['lam']} | {r['flops']:.3f} ({r['flops_with_overheads']:.3f}) | {r['accuracy']:.3f} | "
                     f"{100 * (r['accuracy'] - dense):+.1f} pt | {' / '.join(f'{r[k]:.3f}' for k in parts)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, task: str = "class") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = rows[0]["dense_accuracy"]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot([r["flops"] for r in rows], [r["accuracy"] for r in rows], "o-", label="DyDiT (block FLOPs)")
    ax.plot([r["flops_with_overheads"] for r in rows], [r["accuracy"] for r in rows], "s--", alpha=0.6,
            label="DyDiT (+ routers, adapters)")
    ax.axhline(dense, color="k", lw=1, label=f"dense {dense:.3f}")
    ax.axhline(dense - 0.02, color="k", lw=1, ls=":", label="dense − 2 points (target)")
    ax.axvspan(0.5, 0.6, color="g", alpha=0.08, label="40–50% fewer FLOPs (target)")
    for r in rows:
        ax.annotate(f"λ {r['lam']}", (r["flops"], r["accuracy"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=7)
    ax.set_xlabel("executed / dense FLOPs over the sampling run")
    ax.set_ylabel("prompt accuracy (480 prompts, GPU)" if task == "class" else
                  "one-object accuracy (480 captions, GPU)")
    ax.set_title(f"shapes-dydit-{'c2i' if task == 'class' else 't2i'}: accuracy over λ", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--point", action="append", default=None, metavar="LAMBDA=COMPARISON_JSON",
                   help="a point of the curve (repeat); default: the eleventh and twelfth sessions'")
    p.add_argument("--task", choices=list(TASKS), default="class")
    p.add_argument("--out", default=None, help="default bench/results/dydit_lambda_curve[_text].json")
    p.add_argument("--plot", default=None, help="default docs/img/dydit_lambda_curve[_text].png; '' for none")
    args = p.parse_args(argv)
    suffix = "" if args.task == "class" else "_text"
    args.out = args.out or f"bench/results/dydit_lambda_curve{suffix}.json"
    args.plot = f"docs/img/dydit_lambda_curve{suffix}.png" if args.plot is None else args.plot
    points = DEFAULT_POINTS if args.task == "class" else TEXT_POINTS
    if args.point:
        try:
            points = {float(k): v for k, _, v in (s.partition("=") for s in args.point)}
        except ValueError:
            p.error("--point takes LAMBDA=PATH, e.g. 0.6=bench/results/.../comparison.json")
    rows = load_points(points, args.task)
    result = {"device": f"{rows[0]['device']} (the comparisons' device: NVIDIA H100 80GB HBM3, torch 2.11.0+cu130)",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "torch": "2.11.0+cu130 (comparisons); collected here without torch",
              "command": " ".join(shlex.quote(a) for a in ["python", "bench/dydit_lambda_curve.py",
                                                            *(argv if argv is not None else sys.argv[1:])]),
              "rows": rows}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(rows, ROOT / args.plot, args.task)
    print(markdown(rows, args.task))
    return 0


if __name__ == "__main__":
    sys.exit(main())
