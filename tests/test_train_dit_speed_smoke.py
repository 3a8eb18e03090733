"""bench/train_dit_speed.py in its tiny CPU mode: diffusers' model and ours train on the same batch, count the same
FLOPs, and a --merge run keeps the earlier rows and names every command that wrote the file (the GPU run adds its
compiled row that way)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(out, *args):
    subprocess.run([sys.executable, str(REPO / "bench" / "train_dit_speed.py"), "--smoke", "--steps", "1",
                    "--warmup", "1", "--out", str(out), *args], check=True, cwd=REPO, capture_output=True)
    return json.loads(out.read_text())


def test_smoke_rows_flops_and_merge(tmp_path):
    out = tmp_path / "train.json"
    result = _run(out, "--variants", "diffusers:4,ours:4")
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"diffusers:4", "ours:4"} and not [r for r in rows.values() if "error" in r]
    for r in rows.values():
        assert r["img_per_s"] > 0 and r["accumulation"] == 2 and r["train_gflop_per_image"] > 0
    a, b = rows["ours:4"]["train_gflop_per_image"], rows["diffusers:4"]["train_gflop_per_image"]
    assert abs(a - b) <= 0.05 * b, (a, b)  # same architecture and shapes (diffusers' per-block embedders aside)
    result = _run(out, "--variants", "ours:8:ckpt", "--merge")
    assert [r["variant"] for r in result["rows"]] == ["diffusers:4", "ours:4", "ours:8:ckpt"]
    assert result["rows"][-1]["gradient_checkpointing"] and result["rows"][-1]["accumulation"] == 1
    assert len(result["commands"]) == 2 and result["command"] == result["commands"][-1]
