"""Repack a trained DyDiT folder for shipping: its routers and TD-LoRA, its backbone included (fp16, or int8 linear
weights with per-row scales), served with another pipeline's VAE, scheduler and text encoder.

Why: the text DyDiT was trained on the QK-norm text transformer (resume/shapes-t2i-qknorm), not on the shipped
shapes-t2i, whose other DyDiT-free users (RelaCtrl, TREAD, PPCL, TerDiT) keep that model. The shipped folder therefore
carries its own backbone and borrows only the components from weights/shapes-t2i. Stored int8 the backbone takes
about half of fp16's bytes, which keeps both shipped DyDiTs under the issue's 4 MB.

    python scripts/pack_dydit.py resume/shapes-dydit-t2i-qk-lam0.55 weights/shapes-dydit-t2i \\
        --components weights/shapes-t2i --int8
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit.dydit_io import CONFIG_NAME, extra_config, load_dydit, read_config, save_dydit  # noqa: E402
from dit.pipelines import MODEL_INDEX  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a DyDiT folder (dit/dydit_io.py)")
    p.add_argument("dest", help="the folder to write (replaced if it is a DyDiT folder)")
    p.add_argument("--components", required=True, help="the pipeline folder whose VAE, scheduler, text encoder serve it")
    p.add_argument("--int8", action="store_true", help="store the backbone's linear weights as int8 (per-row scales)")
    args = p.parse_args(argv)
    source, dest, components = Path(args.source), Path(args.dest), Path(args.components)
    if not (components / MODEL_INDEX).is_file():
        p.error(f"--components {components}: not a pipeline folder ({MODEL_INDEX} is missing)")
    config = read_config(source)
    if dest.exists():
        if not (dest / CONFIG_NAME).is_file():
            p.error(f"{dest} exists and is not a DyDiT folder; not replacing it")
        shutil.rmtree(dest)
    model = load_dydit(source)
    keep = extra_config(config)
    keep["trained_on"] = config.get("base")  # the dense model it was trained on, as the source folder named it
    save_dydit(dest, model, lam=config["lam"], base=components, include_backbone=True, int8_backbone=args.int8,
               extra=keep)
    if (source / "card.json").is_file():
        shutil.copy(source / "card.json", dest / "card.json")
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(json.dumps({"dest": str(dest), "bytes": size, "int8": args.int8}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
