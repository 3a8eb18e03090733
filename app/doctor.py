"""`ditstudio doctor`: what this machine offers DiT Studio — library versions, the compute device, which
attention backends work here (and why not, where they don't), which one `auto` picks per pattern, and which
shipped models are present."""
from __future__ import annotations

import importlib.metadata as metadata
import json
import platform
import sys

import torch

from app.catalog import list_models, models_dir

LIBRARIES = ["torch", "torchvision", "diffusers", "accelerate", "transformers", "peft", "gradio",
             "open_clip_torch", "safetensors", "numpy", "xformers", "triton"]


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="versions, device, attention backends and shipped models")
    p.add_argument("--device", default=None, help="device to check (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def report(device: torch.device) -> dict:
    from attention import auto_choices, available_backends

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return {
        "python": sys.version.split()[0],
        "versions": {lib: _version(lib) for lib in LIBRARIES},
        "device": device_info(device),
        "attention_backends": {name: {"ok": ok, "reason": reason}
                               for name, (ok, reason) in available_backends(device).items()},
        "attention_auto": {"dtype": str(dtype).removeprefix("torch."), **auto_choices(device, dtype=dtype)},
        "models_dir": str(models_dir()),
        "models": [{"name": m.name, "task": m.task, "size_mb": round(m.size_bytes / 1e6, 2), "path": str(m.path)}
                   for m in list_models()],
    }


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device here")
    rep = report(device)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"DiT Studio doctor — Python {rep['python']}")
    print("\nLibraries:")
    for lib, ver in rep["versions"].items():
        print(f"  {lib:16s} {ver or 'not installed'}")
    d = rep["device"]
    print(f"\nDevice: {d['device']} ({d.get('name', '')})" + (f", {d['memory_gib']} GiB, sm {d['capability']}"
                                                               if "memory_gib" in d else f", {d['cpu_threads']} threads"))
    print("\nAttention backends:")
    for name, b in rep["attention_backends"].items():
        print(f"  {name:16s} {'ok' if b['ok'] else 'unavailable'}{'' if b['ok'] else ': ' + b['reason']}")
    auto = dict(rep["attention_auto"])
    print(f"\nauto picks ({auto.pop('dtype')}):")
    for pattern, name in auto.items():
        print(f"  {pattern:24s} -> {name}")
    print(f"\nShipped models ({rep['models_dir']}):")
    if not rep["models"]:
        print("  none found")
    for m in rep["models"]:
        print(f"  {m['name']:24s} {m['task']:18s} {m['size_mb']:.2f} MB")
    return 0
