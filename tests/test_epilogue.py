"""fc1 + bias + tanh-GELU in one call (dit/epilogue.py): the same function as the plain ops, used only where exact."""
import pytest
import torch
import torch.nn.functional as F

from dit.epilogue import can_fuse, linear_gelu_tanh

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuBLASLt epilogue)")


def _ref(x, w, b):
    return F.gelu(F.linear(x, w, b), approximate="tanh")


def test_cpu_path_is_the_plain_ops_also_compiled():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 5, 8, generator=g), torch.randn(16, 8, generator=g), torch.randn(16, generator=g)
    assert torch.equal(linear_gelu_tanh(x, w, b), _ref(x, w, b))
    compiled = torch.compile(lambda x: linear_gelu_tanh(x, w, b) * 2, fullgraph=True)  # opaque op, no graph break
    torch.testing.assert_close(compiled(x), 2 * _ref(x, w, b))


def test_used_only_for_gpu_half_precision_inference_on_plain_linears():
    fc = torch.nn.Linear(8, 16)
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert not can_fuse(x, fc)  # CPU
    if torch.cuda.is_available():
        fc_c, x_c = fc.cuda().bfloat16(), x.cuda().bfloat16()
        with torch.no_grad():
            assert can_fuse(x_c, fc_c) and not can_fuse(x_c.float(), fc_c)
            assert not can_fuse(x_c, torch.nn.Linear(8, 16).cuda())  # autocast-style fp32 weights, half inputs
        assert not can_fuse(x_c, fc_c)  # autograd on: training keeps the differentiable ops

        class Wrapped(torch.nn.Linear):
            pass

        with torch.no_grad():
            assert not can_fuse(x_c, Wrapped(8, 16).cuda().bfloat16())  # FP8 / LoRA / subclassed layers keep theirs


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cublaslt_epilogue_is_tanh_gelu(dtype):
    """cuBLASLt's GELU epilogue is the tanh approximation DiT uses: equal to the plain ops within half-precision
    rounding (an erf GELU would differ by up to ~1e-3 absolute near |x| ~ 2, visible at these magnitudes)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 256, 1152, device="cuda", generator=g).to(dtype)
    w = (torch.randn(4608, 1152, device="cuda", generator=g) / 1152 ** 0.5).to(dtype)
    b = torch.randn(4608, device="cuda", generator=g).to(dtype)
    with torch.no_grad():
        got = linear_gelu_tanh(x, w, b).float()
        ref = _ref(x.float(), w.float(), b.float())
    err = (got - ref).abs().max().item()
    assert err < 3e-2, err
    assert (got - ref).norm() / ref.norm() < 4e-3


@cuda
def test_dit_mlp_uses_it_and_matches_training_path():
    from dit.dit import MLP

    mlp = MLP(256, 4.0).cuda().bfloat16()
    x = torch.randn(2, 64, 256, device="cuda", dtype=torch.bfloat16)
    train_path = mlp(x).float()  # grad enabled: plain ops
    with torch.no_grad():
        fused = mlp(x).float()
    assert (fused - train_path).norm() / train_path.norm() < 1e-2


def test_flop_counter_counts_the_fused_product():
    """The benchmarks' MFU comes from FlopCounterMode, which sees a custom op as one call: its formula is the addmm's
    (a GPU run counted DiT-XL/2's forward at 10.3 instead of 15.2 TFLOP before it was registered)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, w, b = torch.randn(3, 7, 8), torch.randn(16, 8), torch.randn(16)
    with FlopCounterMode(display=False) as fc:
        linear_gelu_tanh(x, w, b)
    assert fc.get_total_flops() == 2 * 21 * 8 * 16


@cuda
def test_dydit_sliced_mlp_uses_it(monkeypatch):
    """DyDiT's sliced MLP takes the same fused fc1 + GELU on GPU half-precision inference, and its output matches the
    unfused path's within bf16 rounding."""
    import dit.dydit as dydit_module
    from dit.dit import DiT
    from dit.dydit import DyDiT

    torch.manual_seed(0)
    base = DiT(sample_size=16, patch_size=2, in_channels=4, hidden_size=256, depth=2, num_heads=4, num_classes=10)
    with torch.no_grad():  # every weight random (the zero-initialised adaLN and output layers would give 0 / 0)
        for p in base.parameters():
            p.copy_(0.1 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p[0].numel() ** 0.5)
    model = DyDiT.from_dit(base).cuda().bfloat16().eval()
    x = torch.randn(4, 4, 16, 16, device="cuda", dtype=torch.bfloat16)
    y = torch.tensor([0, 3, 5, 9], device="cuda")
    calls = []
    real = dydit_module.linear_gelu_tanh
    monkeypatch.setattr(dydit_module, "linear_gelu_tanh", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fused = model(x, 500, y, mode="sliced").sample.float()
        assert calls, "the sliced MLP did not take the fused product"
        monkeypatch.setattr(dydit_module, "can_fuse_weights", lambda *a: False)
        plain = model(x, 500, y, mode="sliced").sample.float()
    assert plain.norm() > 0
    assert (fused - plain).norm() / plain.norm() < 1e-2
