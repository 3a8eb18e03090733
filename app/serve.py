"""`ditstudio serve`: the Gradio app (app/ui.py) on localhost unless told otherwise; prints the URL."""
from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="start the web UI")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--models-dir", default=None, help="folder of model folders (default: the shipped models)")
    p.add_argument("--outputs", default="outputs", help="where every result is saved (default ./outputs)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--share", default="no", choices=["no", "yes"], help="a public gradio.live link (default no)")
    p.set_defaults(func=run)


def run(args) -> int:
    from app.ui import launch_app

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535; got {args.port}")
    if args.models_dir is not None and not Path(args.models_dir).is_dir():
        raise ValueError(f"--models-dir {args.models_dir} is not a folder")
    demo, url = launch_app(args.host, args.port, args.models_dir, args.outputs, args.device,
                           share=args.share == "yes", block=False)
    print(f"DiT Studio is running at {url} (Ctrl+C to stop)", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0
