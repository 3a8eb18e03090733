"""scripts/train_llava.py --workers: DataLoader processes build the steps' batches ahead of the loop. Each batch is
seeded by its step, so the samples, the trained weights and resuming do not depend on the worker count."""
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import train_llava  # noqa: E402
from shapes.data import make_batch  # noqa: E402
from test_llava import tiny_tokenizer  # noqa: E402


def test_worker_batches_equal_the_inline_batches():
    tok = tiny_tokenizer()
    args = train_llava.parse_args(["--out", "unused", "--steps", "9", "--stage1-steps", "3", "--batch-size", "5",
                                   "--workers", "2"])
    scenes = make_batch("caption", np.random.default_rng(0), 16)["scenes"]
    feats = torch.randn(16, 4, 8).half()
    got = list(train_llava.step_batches(2, args, scenes, feats, tok))
    assert len(got) == 7  # steps 2 .. 8, stage 1 and stage 2 ones
    for step, batch in zip(range(2, 9), got):
        want = train_llava.step_batch(step, args, scenes, feats, tok)
        assert all(torch.equal(a, b) for a, b in zip(batch, want)), step


def test_training_with_workers_gives_the_same_weights(tmp_path):
    def run(out, workers):
        args = train_llava.parse_args(["--out", str(out), "--size", "shapes-llava-tiny", "--steps", "4",
                                       "--stage1-steps", "1", "--batch-size", "4", "--pool", "32", "--eval-n", "4",
                                       "--eval-every", "1000", "--ckpt-every", "1000", "--log-every", "1", "--cpu",
                                       "--threads", "1", "--save-dtype", "float32", "--workers", str(workers)])
        train_llava.main(args)
        return load_file(str(out / "model" / "diffusion_pytorch_model.safetensors"))

    inline, workers = run(tmp_path / "a", 0), run(tmp_path / "b", 2)
    assert inline.keys() == workers.keys()
    for k in inline:
        torch.testing.assert_close(workers[k], inline[k], rtol=0, atol=0, msg=k)
