"""scripts/train_dit.py splits one global batch over processes (DDP) and micro-batches (accumulation) without
changing what is learned: two processes (torchrun, gloo on the CPU — the GPU path is the same code under
`accelerate launch --multi_gpu`) and two micro-batches give the loss curve and final weights of one process at the
same global batch, to float rounding. The same holds with the model sharded over the two processes (--fsdp,
FSDP2), also across a checkpoint and resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit.dit import DiT
from dit.latte import LatteDiT
from dit.pixart import PixArtDiT

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import train_dit  # noqa: E402
from training import EMA, fsdp_plugin  # noqa: E402

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


def _torchrun(args, port):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), str(REPO / "scripts" / "train_dit.py"), *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


@needs_vae
def test_fsdp_two_processes_equal_one_process_and_resume_exactly(tiny, tmp_path):
    """--fsdp on two gloo processes: the loss curve and the saved (gathered EMA) weights of one process, with two
    micro-batches per process (FSDP2's deferred gradient reduction); and a run stopped after a step-2 checkpoint,
    then resumed (with block checkpointing and the spike guard's snapshots on, which must not change the numbers),
    goes on with the uninterrupted run's losses and ends with its weights."""
    one = tmp_path / "one"
    train_dit.main(train_dit.parse_args(["--out", str(one), "--model", str(tiny), *ARGS]))
    fsdp = tmp_path / "fsdp"
    _torchrun(["--out", str(fsdp), "--model", str(tiny), "--fsdp", "--grad-accum", "2", *ARGS], 29518)
    resumed = tmp_path / "resumed"
    again = ["--out", str(resumed), "--model", str(tiny), "--fsdp", *ARGS, "--ckpt-every", "2"]
    _torchrun([*again, "--stop-after", "2"], 29519)
    assert (resumed / "checkpoints" / "step_2" / "pytorch_model_fsdp.bin").is_file()  # accelerate's FSDP path
    _torchrun([*again, "--gradient-checkpointing", "--rollback-on-spike", "1"], 29520)
    assert json.loads((fsdp / "model" / "card.json").read_text())["fsdp"] is True  # sharded, not a DDP fallback
    ref = _result(one)
    _close(_result(fsdp), ref, "FSDP, 2 processes")
    _close(_result(resumed), _result(fsdp), "FSDP, stopped at step 2 and resumed")


def test_fsdp_plugin_shards_the_blocks():
    """The plugin: FSDP2, one shard group per transformer block of each family (from `_no_split_modules`), low
    precision compute with fp32 gradient reduction, accelerate's block checkpointing on request."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = fsdp_plugin("bf16", checkpoint_blocks=True)
    assert plugin.fsdp_version == 2 and plugin.activation_checkpointing and plugin.reshard_after_forward is True
    assert plugin.mixed_precision_policy == MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                 reduce_dtype=torch.float32)
    assert fsdp_plugin("no").mixed_precision_policy is None
    tiny = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2)
    models = {DiT(**tiny, num_classes=4): {"DiTBlock"},
              PixArtDiT(**tiny, caption_channels=8, max_text_tokens=4): {"PixArtBlock"},
              LatteDiT(**tiny, caption_channels=8, max_text_tokens=4, num_frames=2): {"PixArtBlock",
                                                                                      "LatteTemporalBlock"}}
    for model, blocks in models.items():
        plugin = fsdp_plugin()
        plugin.set_auto_wrap_policy(model)  # what accelerate.prepare does first
        groups = {type(m).__name__ for m in model.modules()
                  if plugin.auto_wrap_policy(module=m, recurse=False, nonwrapped_numel=0)}
        assert groups == blocks, (type(model).__name__, groups)


def test_ema_checkpoint_keeps_the_shadows_in_place():
    """training.EMA loads a checkpoint into its existing shadows (device and layout kept), unlike diffusers'."""
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    ema = EMA(params, decay=0.5, foreach=True)
    state = {**ema.state_dict(), "shadow_params": [torch.full((3,), 2.0), torch.full((2, 2), 3.0)],
             "optimization_step": 7}
    shadows = ema.shadow_params
    ema.load_state_dict(state)
    assert ema.shadow_params is shadows and ema.optimization_step == 7
    assert shadows[0].tolist() == [2.0] * 3 and shadows[1].eq(3.0).all()
    ema.copy_to(params)
    assert params[1].eq(3.0).all()


@needs_vae
def test_global_batch_must_split_evenly(tiny, tmp_path):
    with pytest.raises(ValueError, match="multiple of processes x --grad-accum = 1 x 3"):
        train_dit.main(train_dit.parse_args(["--out", str(tmp_path), "--model", str(tiny), "--grad-accum", "3",
                                             *ARGS]))
