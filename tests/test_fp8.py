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
