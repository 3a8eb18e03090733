"""bench/dydit_lambda_curve.py collects the GPU comparisons into one curve: every point is its comparison file's
numbers, the points must share one dense reference, and a text comparison is refused."""
import importlib.util
import json
from pathlib import Path

import pytest

# Loaded from its file: bench/ on sys.path would shadow the attention package with bench/attention.py.
_spec = importlib.util.spec_from_file_location(
    "dydit_lambda_curve", Path(__file__).resolve().parents[1] / "bench" / "dydit_lambda_curve.py")
curve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(curve)


def test_points_are_their_comparisons(tmp_path):
    out = tmp_path / "curve.json"
    assert curve.main(["--out", str(out), "--plot", ""]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["lam"] for r in rows] == sorted(curve.DEFAULT_POINTS)
    for r in rows:
        c = json.loads((curve.ROOT / r["source"]).read_text())
        assert r["accuracy"] == c["dydit"]["prompt_accuracy"] and r["flops"] == c["sampling_flops_ratio"]
        assert r["n"] == 480 and abs(r["flops"] - r["lam"]) < 0.02  # each model reached its λ
    assert {r["dense_accuracy"] for r in rows} == {0.96875}


def test_refuses_mixed_references_and_text_comparisons(tmp_path):
    src = json.loads((curve.ROOT / curve.DEFAULT_POINTS[0.5]).read_text())
    other = dict(src, dense=dict(src["dense"], prompt_accuracy=0.5))
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="disagree"):
        curve.load_points({0.5: curve.DEFAULT_POINTS[0.5], 0.6: str(tmp_path / "other.json")})
    (tmp_path / "text.json").write_text(json.dumps(dict(src, kind="text")))
    with pytest.raises(ValueError, match="class"):
        curve.load_points({0.5: str(tmp_path / "text.json")})


def test_text_curve_reads_runs_of_device_results(tmp_path):
    out = tmp_path / "curve.json"
    assert curve.main(["--task", "text", "--out", str(out), "--plot", ""]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["lam"] for r in rows] == sorted(curve.TEXT_POINTS)
    for r in rows:
        file, run = r["source"].split("#")
        c = json.loads((curve.ROOT / file).read_text())["runs"][run]["comparison"]
        assert r["accuracy"] == c["dydit"]["one_object_accuracy"] and r["flops"] == c["sampling_flops_ratio"]
        assert r["n"] == 480 and abs(r["flops"] - r["lam"]) < 0.03
    assert {r["dense_accuracy"] for r in rows} == {0.91875}
    with pytest.raises(ValueError, match="no comparison for run"):
        curve.read_comparison(curve.TEXT_POINTS[0.3].replace("cont0.3", "cont0.4"))
    with pytest.raises(ValueError, match="text model"):  # a class comparison in the text curve
        curve.load_points({0.5: curve.DEFAULT_POINTS[0.5]}, "text")
