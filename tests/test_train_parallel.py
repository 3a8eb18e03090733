"""scripts/train_dit.py splits one global batch over processes (DDP) and micro-batches (accumulation) without
changing what is learned: two processes (torchrun, gloo on the CPU — the GPU path is the same code under
`accelerate launch --multi_gpu`) and two micro-batches give the loss curve and final weights of one process at the
same global batch, to float rounding."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit.dit import DiT

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import train_dit  # noqa: E402

needs_vae = pytest.mark.skipif(not train_dit.SHIPPED_VAE.is_dir(), reason="shapes-vae not shipped yet")
ARGS = ["--steps", "4", "--batch-size", "8", "--pool", "32", "--lr", "2e-3", "--warmup", "1", "--cpu",
        "--eval-n", "8", "--log-every", "1", "--eval-every", "1000", "--ckpt-every", "1000", "--ema-decay", "0.5"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_dit_parallel")
    torch.manual_seed(0)
    model = DiT(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=48)
    with torch.no_grad():  # a "pretrained" stand-in: gradients reach every block
        for block in model.blocks:
            block.modulation.weight.normal_(std=0.02)
        model.final.linear.weight.normal_(std=0.02)
    model.save_pretrained(folder)
    return folder


def _result(out: Path):
    losses = [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    weights = load_file(out / "model" / "transformer" / "diffusion_pytorch_model.safetensors")
    return losses, weights


def _close(a, b, what):
    (la, wa), (lb, wb) = a, b
    assert len(la) == len(lb) == 4
    for x, y in zip(la, lb):
        assert abs(x - y) <= 1e-4 * abs(y), (what, la, lb)
    for k in wa:
        err = ((wa[k] - wb[k]).norm() / (wb[k].norm() + 1e-12)).item()
        assert err < 1e-4, (what, k, err)


@needs_vae
def test_two_processes_and_accumulation_equal_one_process(tiny, tmp_path):
    one = tmp_path / "one"
    train_dit.main(train_dit.parse_args(["--out", str(one), "--model", str(tiny), *ARGS]))
    accum = tmp_path / "accum"
    train_dit.main(train_dit.parse_args(["--out", str(accum), "--model", str(tiny), "--grad-accum", "2", *ARGS]))
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", str(REPO / "scripts" / "train_dit.py"), "--out", str(ddp),
                          "--model", str(tiny), *ARGS], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ref = _result(one)
    assert ref[0][-1] < ref[0][0] * 1.5  # it trained (lr 2e-3, 4 steps), not a frozen model compared with itself
    _close(_result(accum), ref, "2 micro-batches")
    _close(_result(ddp), ref, "2 processes")


@needs_vae
def test_global_batch_must_split_evenly(tiny, tmp_path):
    with pytest.raises(ValueError, match="multiple of processes x --grad-accum = 1 x 3"):
        train_dit.main(train_dit.parse_args(["--out", str(tmp_path), "--model", str(tiny), "--grad-accum", "3",
                                             *ARGS]))
