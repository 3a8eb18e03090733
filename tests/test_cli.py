"""The `ditstudio` command line: doctor, eval, and clear errors for bad input."""
import json
import subprocess
import sys

import pytest

from app.cli import main


def test_doctor_json_reports_versions_backends_and_models(capsys):
    assert main(["doctor", "--json", "--device", "cpu"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["versions"]["torch"] and rep["versions"]["diffusers"]
    backends = rep["attention_backends"]
    assert backends["sdpa_math"]["ok"] and backends["reference"]["ok"]
    assert not backends["xformers"]["ok"] and backends["xformers"]["reason"]
    auto = rep["attention_auto"]
    assert auto["dense"] in backends and backends[auto["dense"]]["ok"]
    assert {"shapes-clip", "shapes-vae"} <= {m["name"] for m in rep["models"]}


def test_doctor_text_output(capsys):
    assert main(["doctor", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Attention backends:" in out and "auto picks" in out and "shapes-clip" in out


def test_eval_reproduces_the_card_on_a_small_set(capsys):
    assert main(["eval", "--model", "shapes-clip", "--n", "256", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["metrics"]["zero_shot_accuracy"] >= 0.95
    assert res["card_metrics"]["zero_shot_accuracy"] >= 0.95


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    pytest.param(["doctor", "--device", "cuda"], "no CUDA device", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="this machine has a CUDA device")),
])
def test_bad_input_gives_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "app.cli", "--help"], capture_output=True, text=True, check=True)
    assert "doctor" in out.stdout and "eval" in out.stdout


def test_gpu_out_of_memory_is_one_line(monkeypatch, capsys):
    """A CUDA out-of-memory error in any subcommand is a one-line message and exit code 3, not a traceback."""
    import torch

    from app import cli, doctor

    def boom(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(doctor, "run", boom)
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS)  # the parser is rebuilt from the patched module
    code = cli.main(["doctor"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "ran out of memory" in err[0] and "20.00 GiB" in err[0]
