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
                    "--diffusers-presets", "eager", "--reps", "1", "--batches", "1", "--out", str(out)], check=True, cwd=REPO, capture_output=True)
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


NO_RECOMPILE = """
import json, torch
from bench import sample_dit as sd

counts = {}
for name in ("dit256", "pixart512"):
    w = sd.SMOKE_WORKLOADS[name]
    theirs, ours = sd.build_models(w, "cpu")
    vae = sd.build_vae(True, "cpu")
    for impl, model in (("diffusers", theirs), ("ours", ours)):
        graphs = []

        def count(gm, example_inputs, graphs=graphs):
            graphs.append(gm)
            return gm.forward

        args, kwargs = sd.forward_inputs(w, impl, 1, "cpu", torch.float32)
        with torch.no_grad():  # eager first, as the bench's parity and FLOP passes run before any preset
            sd.call_forward(impl, model, args, kwargs)
        torch._dynamo.reset()
        model.compile(backend=count, dynamic=False)  # in place, as dit.fast compiles a preset
        with torch.no_grad():
            sd.call_forward(impl, model, args, kwargs)
            after_forward = len(graphs)
            sd.sampler_fn(w, impl, model, vae, 1, "cpu", torch.float32, True)()
        counts[name + "|" + impl] = [after_forward, len(graphs)]
print(json.dumps(counts))
"""


def test_bench_forward_is_called_as_the_pipelines_call_it():
    """A compiled row times the forward first, then samples through the same compiled model with each library's
    pipeline. The bench's forward must pass what the pipeline passes (a timestep broadcast with stride 0; for ours no
    text mask when every token is kept; for diffusers' PixArt return_dict=False): any guard that fails on the
    pipeline's first call compiles the model a second time, ~40 s per compiled row at XL on the H100."""
    done = subprocess.run([sys.executable, "-c", NO_RECOMPILE], check=True, cwd=REPO, capture_output=True, text=True)
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(counts) == 4
    for key, (after_forward, after_pipeline) in counts.items():
        assert after_forward >= 1 and after_pipeline == after_forward, (key, counts)


def test_diffusers_baseline_runs_under_its_presets_whatever_ours_run_under():
    from bench import sample_dit as sd

    order = sd.preset_order(["cudagraphs"], ["default"])
    assert order == ["default", "cudagraphs"]
    plan = [(p, impl) for p in order for impl in ("diffusers", "ours", "ours-fp8")
            if sd.runs_under(impl, p, ["cudagraphs"], ["default"])]
    assert plan == [("default", "diffusers"), ("cudagraphs", "ours"), ("cudagraphs", "ours-fp8")]
    assert sd.preset_order(["eager", "default"], ["eager", "default"]) == ["eager", "default"]


def test_batches_that_leave_a_workload_nothing_are_refused(capsys):
    """--batches 8 with latte512 (which runs batch 1 only) once measured PixArt alone without a word (H100,
    2026-11-25): now it is an error naming the workload and its batch sizes."""
    import pytest

    from bench import sample_dit as sd

    with pytest.raises(SystemExit):
        sd.main(["--workloads", "pixart512,latte512", "--batches", "8", "--out", "/dev/null"])
    assert "latte512 (it runs 1)" in capsys.readouterr().err
