"""dit.fp8: the FP8 linear's quantisation (per-row e4m3 scales) is exact in its CPU emulation, its error against
the float linear is the size e4m3 implies, and the swap is by name, blocks only, with the rest untouched."""

import pytest
import torch
from torch import nn

from dit.dit import DiT
from dit.fp8 import E4M3, FP8Linear, quantize_linears, quantize_rows


def test_quantize_rows_round_trip_and_zero_rows():
    x = torch.randn(5, 32) * torch.tensor([1e-3, 1.0, 10.0, 300.0, 0.0])[:, None]
    q, s = quantize_rows(x)
    assert q.dtype == E4M3 and s.shape == (5, 1) and s[4].item() == 1.0
    deq = q.float() * s
    assert deq[4].abs().max() == 0  # an all-zero row stays zero
    rel = ((deq[:4] - x[:4]).abs() / x[:4].abs().amax(dim=1, keepdim=True)).max()
    assert rel <= 2 ** -4  # e4m3: 3 mantissa bits, half an ulp of the largest element at most
    assert (q.float().abs().amax(dim=1)[:4] == 448).all()  # each row's scale maps its amax to e4m3's max


def test_fp8_linear_emulation_matches_its_definition_and_error_is_small():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(3, 7, 64)
    fp8 = FP8Linear.from_linear(lin)
    xq, xs = quantize_rows(x.reshape(-1, 64))
    wq, ws = quantize_rows(lin.weight)
    expected = ((xq.float() * xs) @ (wq.float() * ws).t() + lin.bias).reshape(3, 7, 48)
    torch.testing.assert_close(fp8(x), expected, rtol=0, atol=0)
    ref = lin(x)
    err = ((fp8(x) - ref).norm() / ref.norm()).item()
    assert 1e-3 < err < 0.06, err  # quantised (not a no-op), within e4m3's few-percent error


def test_swap_by_name_in_blocks_only_and_model_error():
    torch.manual_seed(0)
    model = DiT(sample_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=5)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 3])
    with torch.no_grad():
        ref = model(x, t, y)
    replaced = quantize_linears(model)
    assert sorted(replaced) == sorted(f"blocks.{i}.{n}" for i in range(2)
                                      for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    assert isinstance(model.blocks[0].modulation, nn.Linear) and isinstance(model.final.linear, nn.Linear)
    with torch.no_grad():
        out = model(x, t, y)
    err = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < err < 0.08, err
    with pytest.raises(ValueError, match="no linear layer named"):
        quantize_linears(nn.Sequential(nn.Linear(16, 16)))
    with pytest.raises(ValueError, match="divisible by 16"):
        FP8Linear.from_linear(nn.Linear(20, 16))


def _cpu_scaled_mm() -> bool:
    a = torch.ones(16, 16).to(E4M3)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _cpu_scaled_mm(), reason="this torch has no CPU _scaled_mm")
@pytest.mark.parametrize("kernel_bias", [True, False])
def test_kernel_product_equals_the_emulation(kernel_bias):
    """The GPU path's call (scale shapes, transposes, bias in or after the kernel) checked on the CPU kernel, which
    recent torch versions have: it must give the emulation's result to bf16 output rounding."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    fp8 = FP8Linear.from_linear(lin)
    fp8.kernel_bias = kernel_bias
    x = torch.randn(10, 64, dtype=torch.bfloat16)
    xq, xs = quantize_rows(x)
    got = fp8.product(xq, xs, torch.bfloat16).float()
    emulated = fp8(x).float()  # on the CPU forward() takes the emulation
    torch.testing.assert_close(got, emulated, rtol=2e-2, atol=2e-2)
    assert fp8.weight_scale.shape == (1, 48) and fp8.weight_scale.is_contiguous()


def test_mlp_hands_fc2_the_gelu_and_the_output_is_unchanged():
    """quantize_linears lets an MLP's FP8 fc2 apply the GELU while quantising; the model computes the same function
    as with the GELU applied by the MLP (on the CPU bit for bit: the same ops in the same order)."""
    torch.manual_seed(0)
    model = DiT(sample_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=5)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    quantize_linears(model)
    fc2s = [b.mlp.fc2 for b in model.blocks]
    assert all(f.takes_gelu and f.own_quantisation for f in fc2s)
    assert not model.blocks[0].mlp.fc1.takes_gelu and model.blocks[0].attn.proj.own_quantisation
    assert not model.blocks[0].attn.proj.takes_gelu and not model.blocks[0].attn.qkv.own_quantisation
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 3])
    with torch.no_grad():
        fused = model(x, t, y)
        for f in fc2s:
            f.takes_gelu = False  # the MLP applies F.gelu itself again
        plain = model(x, t, y)
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)


def test_row_quantisation_kernel_in_the_interpreter():
    """The Triton kernel (GELU, row amax, scale, clamp) against torch, run by the Triton interpreter on the CPU. The
    interpreter's e4m3 cast is not exact (-125.8 gave -64), so the kernel writes its float32 values before the cast
    here; the cast itself is checked on CUDA."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from dit.fp8 import launch_quantize_rows
        torch.manual_seed(0)
        for width in (40, 1152):
            x = 4 * torch.randn(5, width)
            x[3] = 0  # an all-zero row keeps scale 1
            x[1, 7] = 3e3  # an outlier sets its row's scale
            for gelu in (False, True):
                ref = F.gelu(x, approximate="tanh") if gelu else x
                amax = ref.abs().amax(1, keepdim=True)
                scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
                q, s = launch_quantize_rows(x.contiguous(), gelu, out_dtype=torch.float32)
                torch.testing.assert_close(s, scale, rtol=1e-6, atol=0)
                # atol: the kernel's tanh (via exp) differs from torch's by float32 rounding near 0; e4m3's finest
                # step is 2^-9 = 2e-3, so 1e-4 is far below anything the cast could show
                torch.testing.assert_close(q, (ref / scale).clamp(-448, 448), rtol=1e-5, atol=1e-4)
                assert s[3].item() == 1.0 and q[3].abs().max() == 0
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=root)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_row_quantisation_kernel_on_cuda():
    """The kernel's e4m3 values and scales against torch's quantize_rows of the same (GELU'd) rows: scales to float
    rounding, values within one e4m3 step (the kernel's GELU is computed differently, in float32 throughout)."""
    from dit.fp8 import fp8_quantize_rows

    torch.manual_seed(0)
    for width in (1152, 4608, 40):
        x = (3 * torch.randn(300, width, device="cuda")).to(torch.bfloat16)
        for gelu in (False, True):
            ref_q, ref_s = quantize_rows(torch.nn.functional.gelu(x.float(), approximate="tanh") if gelu else x)
            q, s = fp8_quantize_rows(x, gelu)
            assert q.dtype == E4M3 and q.shape == x.shape and s.shape == (300, 1)
            torch.testing.assert_close(s, ref_s, rtol=1e-5, atol=0)
            step = (ref_q.float().abs() * 2 ** -3).clamp(min=2 ** -9)  # one e4m3 step at each value
            assert ((q.float() - ref_q.float()).abs() <= step + 1e-6).all()
            assert (q.float() == ref_q.float()).float().mean() > 0.97  # mostly identical, ties and GELU rounding aside
