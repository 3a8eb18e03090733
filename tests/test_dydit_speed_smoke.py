"""CPU smoke check of bench/dydit_speed.py: DiT-T/2, 3 DDIM steps, batches 1 and 2, both lambdas, every variant."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("dydit_speed", ROOT / "bench" / "dydit_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dydit_speed_smoke(tmp_path):
    bench = load_bench()
    out = tmp_path / "dydit_speed.json"
    start = time.perf_counter()
    assert bench.main(["--size", "tiny", "--device", "cpu", "--steps", "3", "--batches", "1", "2",
                       "--repeats", "2", "--out", str(out)]) == 0
    assert time.perf_counter() - start < 120  # a smoke check, on a shared CPU
    result = json.loads(out.read_text())
    for key in ("device", "date", "torch", "command", "rows"):
        assert key in result
    rows = {(r["lam"], r["batch"], r["variant"]): r for r in result["rows"]}
    for lam in (0.5, 0.7):
        for batch in (1, 2):
            for variant in ("dense", "sliced", "masked"):
                r = rows[(lam, batch, variant)]
                assert r["img_per_s"] > 0 and r["speedup"] > 0
                assert set(r["split_ms"]) >= {"attention_core", "mlp", "gather_scatter", "router_plan",
                                             "host_sync_cpu"}
            assert rows[(lam, batch, "dense")]["executed_flops_ratio"] == 1.0
            assert rows[(lam, batch, "dense")]["speedup"] == pytest.approx(1.0)
            assert rows[(lam, batch, "sliced")]["executed_flops_ratio"] == pytest.approx(lam, abs=0.05)
            # the masked path runs every shape densely; its masks alone would reach lambda
            assert rows[(lam, batch, "masked")]["executed_flops_ratio"] == 1.0
            assert rows[(lam, batch, "masked")]["mask_flops_ratio"] == pytest.approx(lam, abs=0.05)
