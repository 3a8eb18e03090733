"""DyDiT's kept-token kernels (`dit/kept_tokens.py`): the gather + LayerNorm + modulation and the gated scatter that
the sliced path runs on the GPU. On the CPU the Triton interpreter runs the very kernels the GPU compiles
(TRITON_INTERPRET=1 must be set before triton is imported, hence the subprocesses): each against plain torch, and a
whole guided DDIM run of a planned DyDiT with the kernels against the same run with the plain-torch gather and
scatter. On CUDA the same run in bf16, eager and compiled."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def interpreted(code: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "DITSTUDIO_KEPT_TOKEN_KERNELS": "on",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_kernels_equal_plain_torch_in_the_interpreter():
    out = interpreted("""
        import torch, torch.nn.functional as F
        from dit.kept_tokens import gather_norm_modulate, scatter_gated_residual_
        torch.manual_seed(0)
        S, n, D = 3, 7, 40  # D not a power of two: the masked columns
        x = 3 * torch.randn(S * n, D) + 1
        ada = torch.randn(S, 6 * D)  # the modulations as the model passes them: chunk views, row stride 6 D
        shift, scale, gate = ada[:, :D], ada[:, D:2 * D], ada[:, 2 * D:3 * D]
        for p, cap in [(0.5, 13), (0.9, 12)]:  # spare rows (an odd count: a last program half past the end); overflow
            keep = torch.rand(S * n) < p
            idx = torch.nonzero_static(keep, size=cap, fill_value=S * n).squeeze(1)
            count = keep.sum()
            k = min(int(count), cap)
            rows, seq = idx[:k], idx[:k] // n
            h = gather_norm_modulate(x, idx, count, shift, scale, n, 1e-6)
            ref = F.layer_norm(x[rows], (D,), eps=1e-6) * (1 + scale[seq]) + shift[seq]
            assert h.shape == (cap, D)
            torch.testing.assert_close(h[:k], ref, rtol=1e-5, atol=1e-5)
            assert torch.equal(h[k:], torch.zeros(cap - k, D))
            update = torch.randn(cap, D)
            got = x.clone()
            scatter_gated_residual_(got, idx, count, update, gate, n)
            ref = x.clone()
            ref[rows] += gate[seq] * update[:k]
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
            untouched = torch.ones(S * n, dtype=torch.bool)
            untouched[rows] = False
            assert torch.equal(got[untouched], x[untouched])  # the other rows (and no scratch row) as they were
            print("ok", cap, int(count))
        # the same kernel without the gather: every row, in order (the attention half's norm)
        from dit.kept_tokens import norm_modulate
        full = norm_modulate(x, shift, scale, n, 1e-6)
        seq = torch.arange(S * n) // n
        torch.testing.assert_close(full, F.layer_norm(x, (D,), eps=1e-6) * (1 + scale[seq]) + shift[seq],
                                   rtol=1e-5, atol=1e-5)
        # other widths: 45 (19 of 64 columns masked), 32 (a power of two: none masked)
        for D2 in (32, 45):
            x2, ada2 = torch.randn(S * n, D2), torch.randn(S, 3 * D2)
            sh2, sc2, gt2 = ada2[:, :D2], ada2[:, D2:2 * D2], ada2[:, 2 * D2:]
            seq2 = torch.arange(S * n) // n
            torch.testing.assert_close(norm_modulate(x2, sh2, sc2, n, 1e-6), F.layer_norm(x2, (D2,), eps=1e-6)
                                       * (1 + sc2[seq2]) + sh2[seq2], rtol=1e-5, atol=1e-5)
            keep2 = torch.rand(S * n) < 0.5
            idx2, count2 = torch.nonzero_static(keep2, size=11, fill_value=S * n).squeeze(1), keep2.sum()
            k2 = min(int(count2), 11)
            r2, s2 = idx2[:k2], idx2[:k2] // n
            h2 = gather_norm_modulate(x2, idx2, count2, sh2, sc2, n, 1e-6)
            torch.testing.assert_close(h2[:k2], F.layer_norm(x2[r2], (D2,), eps=1e-6) * (1 + sc2[s2]) + sh2[s2],
                                       rtol=1e-5, atol=1e-5)
            assert torch.equal(h2[k2:], torch.zeros(11 - k2, D2))
            u2, got2, ref2 = torch.randn(11, D2), x2.clone(), x2.clone()
            scatter_gated_residual_(got2, idx2, count2, u2, gt2, n)
            ref2[r2] += gt2[s2] * u2[:k2]
            torch.testing.assert_close(got2, ref2, rtol=1e-6, atol=1e-6)
        # half precision: one rounding at the end, so within bf16 rounding of the float32 result
        xb = x.bfloat16()
        hb = gather_norm_modulate(xb, idx, count, shift.bfloat16(), scale.bfloat16(), n, 1e-6)
        h32 = gather_norm_modulate(xb.float(), idx, count, shift.bfloat16().float(), scale.bfloat16().float(), n, 1e-6)
        torch.testing.assert_close(hb.float(), h32, rtol=1e-2, atol=1e-2)
        # the kept rows listed in one launch: torch.nonzero_static and the count, spare rows filled
        from dit.kept_tokens import kept_rows
        for rows, cap, p in [(40000, 22000, 0.5), (5000, 2000, 0.5), (9, 4, 0.0), (7, 7, 1.0)]:  # 40000: 3 blocks
            keep = torch.rand(rows) < p
            idx, c = kept_rows(keep, cap, rows)
            assert torch.equal(idx, torch.nonzero_static(keep, size=cap, fill_value=rows).squeeze(1))
            assert int(c) == int(keep.sum())
        # bad input: a clear error, nothing written
        for bad in [lambda: gather_norm_modulate(x.t(), idx, count, shift, scale, n, 1e-6),
                    lambda: gather_norm_modulate(x, idx, count, shift[:, :5], scale, n, 1e-6),
                    lambda: scatter_gated_residual_(x, idx, count, torch.randn(cap + 1, D), gate, n),
                    lambda: kept_rows(keep.float(), cap, rows)]:
            try:
                bad()
            except ValueError as e:
                print("refused:", str(e)[:60])
    """)
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["ok", "ok"] + ["refused:"] * 4, out


def test_sliced_sampling_with_the_kernels_equals_plain_torch_in_the_interpreter():
    """A planned DyDiT (per-step widths, calibrated capacities, TD-LoRA) through a guided DDIM run: kernels on, eager
    and compiled (`compile_sliced`: inductor keeps them as single calls through their fake implementations, the
    scatter in place in the block's residual buffer), against the plain-torch gather and scatter. The kernels update
    x in place; the plain path does not."""
    out = interpreted("""
        import torch
        from torch._dynamo.utils import counters
        from dit import kept_tokens
        from test_dydit_compiled import planned_dydit
        from test_step_graphs import ddim, scheduler
        model, x0, y = planned_dydit(lora=True)
        sched = scheduler()
        calls = []
        gather, norm = kept_tokens.gather_norm_modulate, kept_tokens.norm_modulate
        kept_tokens.gather_norm_modulate = lambda *a: calls.append("gather") or gather(*a)
        kept_tokens.norm_modulate = lambda *a: calls.append("norm") or norm(*a)
        runs = {}
        for mode in ("off", "on"):
            kept_tokens.MODE = mode
            assert len(calls) == 0  # the plain path does not call the kernels
            model.set_sampling_grid(sched.timesteps)
            runs[mode] = ddim(lambda i, *a: model(*a, mode="sliced").sample, sched, x0, y)
        assert model.token_overflow() == 0
        for part in ("gather", "norm"):  # every block of every step, one call each
            assert calls.count(part) == 3 * len(sched.timesteps), calls
        err = float((runs["on"] - runs["off"]).abs().max() / runs["off"].abs().max())
        assert err < 1e-5, err
        print("eager", err)
        kept_tokens.gather_norm_modulate, kept_tokens.norm_modulate = gather, norm
        model.compile_sliced()
        counters.clear()
        model.set_sampling_grid(sched.timesteps)
        got = ddim(lambda i, *a: model(*a, mode="sliced").sample, sched, x0, y)
        err = float((got - runs["off"]).abs().max() / runs["off"].abs().max())
        assert err < 1e-4, err
        assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
        print("compiled", err)
    """)
    assert [line.split()[0] for line in out.splitlines()] == ["eager", "compiled"], out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True])
def test_sliced_sampling_with_the_kernels_on_cuda(compiled):
    """bf16 on the GPU: kernels against the plain-torch gather and scatter, eager or compiled, over a guided DDIM run."""
    from dit import kept_tokens
    from test_dydit_compiled import planned_dydit
    from test_step_graphs import ddim, scheduler

    model, x0, y = planned_dydit(lora=True)
    dev = torch.device("cuda")
    model.to(dev, torch.bfloat16)
    x0, y = x0.to(dev, torch.bfloat16), y.to(dev)
    sched = scheduler(dev)
    if compiled:
        model.compile_sliced()
    runs = {}
    try:
        for mode in ("off", "auto"):
            kept_tokens.MODE = mode
            torch._dynamo.reset()
            model.set_sampling_grid(sched.timesteps)
            runs[mode] = ddim(lambda i, *a: model(*a, mode="sliced").sample, sched, x0, y).float()
    finally:
        kept_tokens.MODE = "auto"
    assert float((runs["auto"] - runs["off"]).norm() / runs["off"].norm()) < 2e-2  # bf16 rounding, fused differently
