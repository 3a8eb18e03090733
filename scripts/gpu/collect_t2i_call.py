"""Turn one device call of `dydit_t2i_round13.sh` into one results file (device, torch, date, command, each run's
comparison and training log), and unpack each run's model for the next call or for shipping.

    python scripts/gpu/collect_t2i_call.py /work/.device/8 bench/results/gpu_round16/call1 --models-to /tmp/r16/call1

Reads the call's `device.txt` (written by `device_header` in scripts/gpu/env.sh) and `models.tgz`.
"""
import argparse
import json
import tarfile
from pathlib import Path


def read_header(path: Path) -> dict:
    lines = path.read_text().splitlines()
    gpu = lines[0].split(",")[0].strip()
    torch_version, date = lines[1].split()[1:3]
    command = next(line.split("command: ", 1)[1] for line in lines if line.startswith("command: "))
    return {"device": f"{gpu} (one GPU)", "torch": torch_version, "date": date, "command": command}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("call", type=Path, help="the device call's folder (device.txt, models.tgz)")
    ap.add_argument("out", type=Path, help="folder for results.json")
    ap.add_argument("--models-to", type=Path, required=True, help="where to unpack runs/t2i-*/ (model, logs)")
    ap.add_argument("--what", default="text DyDiT (routers + TD-LoRA on the QK-norm text backbone) continued, then "
                    "compared with the dense model on 480 seeded captions per object count; training logs as "
                    "written by scripts/finetune_dydit.py (log.jsonl)")
    args = ap.parse_args()

    args.models_to.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.call / "models.tgz") as tar:
        tar.extractall(args.models_to, filter="data")
    result = read_header(args.call / "device.txt") | {"what": args.what, "runs": {}}
    for run_dir in sorted((args.models_to / "runs").glob("t2i-*")):
        run = {}
        comparison = run_dir / "comparison.json"
        if comparison.is_file() and comparison.stat().st_size:
            run["comparison"] = json.loads(comparison.read_text())
        log = run_dir / "log.jsonl"
        if log.is_file():
            run["training_log"] = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        result["runs"][run_dir.name.removeprefix("t2i-")] = run
        summary = run.get("comparison", {})
        if summary:
            print(f"{run_dir.name}: one-object {summary['dydit']['one_object_accuracy']:.3f} "
                  f"(dense {summary['dense']['one_object_accuracy']:.3f}), two-object "
                  f"{summary['dydit']['two_object_accuracy']:.3f}, FLOPs {summary['sampling_flops_ratio']:.3f} "
                  f"({summary['sampling_flops_ratio_with_overheads']:.3f})")
        else:
            print(f"{run_dir.name}: no comparison")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
