"""dit.fast: the compiled sampling path is the same model (same object, same outputs as eager) and the pipeline
uses it unchanged."""

import pytest
import torch

from dit.dit import DiT
from dit.fast import PRESETS, preset_of, prepare_for_sampling, restore_eager, supported_inductor_options


def _rel(a, b) -> float:
    """Relative error of the whole tensor: fusion reorders float sums, so single elements near zero may differ
    by more than 1e-4 relative while the tensor agrees to float32 rounding."""
    return ((a - b).norm() / b.norm()).item()


def _random_dit(seed=0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    with torch.no_grad():  # adaLN-Zero zeros would make every output 0 and the comparison empty
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def test_compiled_forward_equals_eager_and_keeps_the_object():
    model = _random_dit()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        ref = model(x, t, y)
    same = prepare_for_sampling(model, "default")
    assert same is model and preset_of(model) == "default"
    with torch.no_grad():
        out = model(x, t, y)
    assert out.abs().max() > 0.1
    assert _rel(out, ref) < 1e-5
    restore_eager(model)
    assert preset_of(model) == "eager"


def test_preset_errors_and_inductor_option_filter():
    with pytest.raises(ValueError, match="unknown compile preset 'fastest'.*valid: eager"):
        prepare_for_sampling(_random_dit(), "fastest")
    known, missing = supported_inductor_options({"epilogue_fusion": True, "no_such_option_xyz": 1})
    assert known == {"epilogue_fusion": True} and missing == ["no_such_option_xyz"]
    assert set(PRESETS) >= {"eager", "default", "cudagraphs", "max-autotune", "fused"}


def test_pipeline_with_the_compiled_transformer_gives_the_eager_image(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler

    from dit.pipelines import ClassToImagePipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=16).eval()
    pipe = ClassToImagePipeline(transformer=_random_dit(), vae=vae, scheduler=DDIMScheduler())
    kw = dict(class_labels=[1, 2], num_inference_steps=4, guidance_scale=3.0, output_type="latent")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).latents
    prepare_for_sampling(pipe.transformer, "default")
    out = pipe(generator=torch.Generator().manual_seed(0), **kw).latents
    assert _rel(out, ref) < 1e-4  # float32 rounding, compounded over 4 guided steps


def test_regional_compilation_compiles_one_block_for_all(monkeypatch):
    """The regional presets compile the blocks, not the model: one traced graph serves every block (the compile
    time lever at XL), and the output is eager's."""
    from dit.fast import repeated_blocks

    model = _random_dit()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        ref = model(x, t, y)
    graphs, real = [], torch.compile

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    # The "regional" preset as it is, with a counting backend in place of inductor.
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "mode": None, "backend": count}))
    prepare_for_sampling(model, "regional")
    with torch.no_grad():
        out = model(x, t, y)
    assert len(repeated_blocks(model)) == 2 and len(graphs) == 1  # block 1 reused block 0's graph
    assert model._compiled_call_impl is None and all(b._compiled_call_impl is not None for b in model.blocks)
    assert _rel(out, ref) < 1e-6
    restore_eager(model)
    assert all(b._compiled_call_impl is None for b in model.blocks)
    with pytest.raises(ValueError, match="compile it whole"):
        prepare_for_sampling(torch.nn.Linear(2, 2), "regional")


def test_regional_presets_never_replay_cuda_graphs(monkeypatch):
    """Per-block compilation with a CUDA-graph mode fails on the GPU (each block's output is overwritten by the next
    block's replay: measured on the H100 with the first `fused-regional`); every regional preset must avoid it, and a
    preset that does not is refused before compiling."""
    from dit import fast

    for name, p in fast.PRESETS.items():
        if p.regional:
            assert p.mode not in fast.GRAPHED_MODES, name
    monkeypatch.setitem(fast.PRESETS, "bad", fast.Preset("max-autotune", regional=True))
    with pytest.raises(ValueError, match="overwritten"):
        prepare_for_sampling(_random_dit(), "bad")


def test_supported_inductor_options_reads_nested_sections():
    """Options in inductor's sub-sections ("triton.*") are applied when this torch has them and reported otherwise."""
    from dit.fast import supported_inductor_options

    known, missing = supported_inductor_options({"triton.enable_persistent_tma_matmul": True, "triton.no_such": 1,
                                                 "no_section.x": 2, "epilogue_fusion": True})
    assert known == {"triton.enable_persistent_tma_matmul": True, "epilogue_fusion": True}
    assert missing == ["triton.no_such", "no_section.x"]
