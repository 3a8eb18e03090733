"""`ditstudio`: the command line. Each subcommand lives in its own module with `add_parser(subparsers)` and
`run(args) -> int`; this file only wires them together, so the CLI stays as thin as the UI."""
from __future__ import annotations

import argparse
import sys

from app import bench, chat, doctor, evaluate, generate, models_cmd, serve

# Subcommand modules in the order `ditstudio --help` lists them; generate serves class→image, text→image and
# text→video folders (diffusion pipelines, and VAR pipelines for class / text→image), chat the vision-language models.
COMMANDS = [doctor, models_cmd, generate, chat, evaluate, bench, serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ditstudio",
        description="Efficient diffusion transformers and visual-autoregressive models: "
        "generate, chat, fine-tune, benchmark.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        # User errors (bad names, bad paths, bad values) get one clear line, not a traceback.
        print(f"ditstudio {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        import torch

        if not isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        print(f"ditstudio {args.command}: error: the GPU ran out of memory ({str(exc).splitlines()[0]}); lower "
              f"--num / --batch or --steps, or use --device cpu", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
