"""bench/sample_dit.py in its tiny CPU mode: every workload builds diffusers' model and ours with the same weights,
both pipelines sample, and the recorded parity says they compute the same thing (the GPU run's numbers rest on it)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_smoke_run_records_parity_and_speed_rows(tmp_path):
    out = tmp_path / "smoke.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "sample_dit.py"), "--smoke", "--presets", "eager",
                    "--reps", "1", "--batches", "1", "--out", str(out)], check=True, cwd=REPO, capture_output=True)
    result = json.loads(out.read_text())
    assert set(result["parity"]) == {"dit256", "pixart512", "latte512"}
    for name, parity in result["parity"].items():
        assert parity["fp32_ours_vs_diffusers"] < 1e-5, (name, parity)
    rows = {(r["workload"], r["impl"]): r for r in result["rows"]}
    assert len(rows) == 6 and not [r for r in rows.values() if "error" in r]
    for (name, impl), r in rows.items():
        assert r["forward_ms"] > 0 and r["img_per_s"] > 0 and r["forward_gflop"] > 0
        assert ("img_per_s_vae" in r) == (name != "latte512")  # timings themselves are noise on a shared CPU
    # the two libraries' forwards count the same FLOPs (same architecture, same shapes)
    for name in ("dit256", "pixart512", "latte512"):
        a, b = rows[(name, "ours")]["forward_gflop"], rows[(name, "diffusers")]["forward_gflop"]
        assert abs(a - b) <= 0.02 * b, (name, a, b)
    assert result["command"].startswith("python") and result["torch"] and result["date"]
