"""Screenshots of every tab of the web UI for docs/app.md: serves the app on the shipped models, drives Debian's
chromium with Playwright through one generation per tab (and one benchmark run), and saves a PNG per tab.

    python scripts/app_screenshots.py --out docs/img/app
"""
from __future__ import annotations

import argparse
import re
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from playwright.sync_api import sync_playwright  # noqa: E402

from app.ui import launch_app  # noqa: E402

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
DONE = re.compile(r"seed \d+ · \d+ in [\d.]+ s · saved to")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="docs/img/app")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo, url = launch_app(port=port, outputs_dir=tempfile.mkdtemp(prefix="ditstudio-shots-"), device="cpu",
                           block=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(url)
            for tab, prompt, name in (("Text → image", "a big red star in the top left", "text_to_image"),
                                      ("Class → image", None, "class_to_image"),
                                      ("Text → video", "a video of a green heart moving right", "text_to_video")):
                page.get_by_role("tab", name=tab).click()
                panel = page.get_by_role("tabpanel")
                if prompt:
                    panel.get_by_label("prompt", exact=True).fill(prompt)
                panel.get_by_label("batch size").first.fill("4" if name != "text_to_video" else "1")
                panel.get_by_role("button", name="Generate").click()
                panel.get_by_text(DONE).wait_for(timeout=180_000)
                page.wait_for_timeout(1500)  # the images load
                page.screenshot(path=str(out / f"{name}.png"), full_page=True)
                print("saved", out / f"{name}.png", flush=True)
            page.get_by_role("tab", name="Benchmark").click()
            panel = page.get_by_role("tabpanel")
            panel.get_by_label("steps").first.fill("10")
            panel.get_by_role("button", name="Run benchmark").click()
            page.wait_for_function("() => [...document.images].some(i => i.src.includes('bench-'))", timeout=180_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out / "benchmark.png"), full_page=True)
            print("saved", out / "benchmark.png", flush=True)
            browser.close()
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
