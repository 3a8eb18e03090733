"""VAR's per-scale graph runner (vlm/var_graphs.py) and the decoder's fast path (vlm/vqvae.py), on the CPU.

On a CPU `ScaleGraphs` runs its static buffers eagerly (no capture): these tests check that path gives the plain
sampler's tokens exactly, reused across runs, and refuses what it cannot replay. The capture itself is checked on
the GPU by bench/var_speed.py (replayed tokens against eager ones, recorded in its JSON)."""

import pytest
import torch

from vlm.var import VAR
from vlm.var_graphs import ScaleGraphs
from vlm.var_pipeline import VARPipeline, sample_tokens
from vlm.vqvae import MultiScaleVQVAE

torch.set_num_threads(1)


def tiny(seed=0):
    torch.manual_seed(seed)
    return VAR.from_name("VAR-tiny").double().eval(), MultiScaleVQVAE.from_name("vqvae-tiny").double().eval()


def test_static_buffers_give_the_plain_samplers_tokens_run_after_run():
    model, vq = tiny()
    labels, null = torch.tensor([1, 4, 7]), torch.full((3,), model.null_class_id)
    cond, nul = model.condition(labels), model.condition(null)
    graphs = ScaleGraphs(model, rows=6, capture=False)
    for seed in (0, 1):  # the second run reuses the buffers and cache
        kw = dict(guidance_scale=2.0, top_k=20, top_p=0.9)
        ref, f_ref, c_ref = sample_tokens(model, vq, cond, nul, generator=torch.Generator().manual_seed(seed), **kw)
        got, f_got, c_got = sample_tokens(model, vq, cond, nul, generator=torch.Generator().manual_seed(seed),
                                          graphs=graphs, **kw)
        assert all(torch.equal(a, b) for a, b in zip(ref, got))
        torch.testing.assert_close(f_got, f_ref, rtol=0, atol=0)
        assert c_got is graphs.cache and c_got.nbytes() == c_ref.nbytes()
        for a, b in zip(c_ref.layers, c_got.layers):
            torch.testing.assert_close(b.k, a.k, rtol=0, atol=0)


def test_graphs_refuse_what_they_cannot_replay():
    model, vq = tiny()
    cond = model.condition(torch.tensor([1, 2]))
    graphs = ScaleGraphs(model, rows=2, capture=False)
    with pytest.raises(ValueError, match="another transformer or 2 rows"):  # 2 rows built, guidance needs 4
        sample_tokens(model, vq, cond, model.condition(torch.tensor([10, 10])), graphs=graphs)
    with pytest.raises(ValueError, match="use_cache=True and no cache_policy"):
        sample_tokens(model, vq, cond, None, graphs=graphs, use_cache=False)
    other, _ = tiny(seed=1)
    with pytest.raises(ValueError, match="another transformer"):
        sample_tokens(other, vq, other.condition(torch.tensor([1, 2])), None, graphs=graphs)
    with pytest.raises(ValueError, match="CUDA graphs need"):
        ScaleGraphs(model, rows=2, capture=True)


def test_decoder_in_bf16_channels_last_and_in_chunks():
    _, vq = tiny()
    vq = vq.float()
    f_hat = torch.randn(5, vq.config.z_channels, vq.patch_nums[-1], vq.patch_nums[-1])
    ref = vq.fhat_to_img(f_hat)
    chunked = vq.fhat_to_img(f_hat, batch_chunk=2)
    torch.testing.assert_close(chunked, ref, rtol=1e-5, atol=1e-5)
    vq.fast_decoder(torch.bfloat16, channels_last=True)
    assert vq.decoder.conv_in.weight.dtype == torch.bfloat16
    assert vq.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert vq.quantize.embedding.weight.dtype == torch.float32  # tokens and f̂ keep their precision
    fast = vq.fhat_to_img(f_hat.double(), batch_chunk=2)
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    err = (fast - ref).abs().max().item()
    assert 0 < err < 0.05, err  # bf16 rounding, not a different image


def test_pipeline_cuda_graphs_flag_on_cpu_is_refused_clearly_and_decode_batch_checked():
    model, vq = tiny()
    pipe = VARPipeline(model.float(), vq.float())
    with pytest.raises(ValueError, match="CUDA graphs need"):
        pipe([1, 2], cuda_graphs=True, output_type="tokens")
    with pytest.raises(ValueError, match="decode_batch"):
        pipe([1], decode_batch=0)
    a = pipe([1, 2], generator=torch.Generator().manual_seed(0), output_type="pt", decode_batch=1).images
    b = pipe([1, 2], generator=torch.Generator().manual_seed(0), output_type="pt", decode_batch=None).images
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k,top_p", [(7, 0.0), (7, 0.8), (50, 0.5), (3, 0.999)])
def test_top_k_candidates_are_filter_logits_distribution(top_k, top_p):
    from vlm.var_pipeline import draw_tokens, filter_logits, top_k_candidates

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 50, generator=g, dtype=torch.float64) * 3
    probs, cand = top_k_candidates(logits, top_k, top_p)
    full = torch.zeros(10, 50, dtype=torch.float64).scatter(-1, cand, probs)
    torch.testing.assert_close(full, filter_logits(logits, top_k, top_p).softmax(-1).view(10, 50), rtol=0, atol=1e-12)
    tok = draw_tokens(logits, top_k, top_p, torch.Generator().manual_seed(1))
    assert tok.shape == (2, 5) and bool((full.gather(-1, tok.view(10, 1)) > 0).all())
    # The draw follows the distribution: 20k draws from one row, against its probabilities.
    row = logits[:1, :1].expand(1, 20000, 50)
    counts = torch.bincount(draw_tokens(row, top_k, top_p, torch.Generator().manual_seed(2)).flatten(), minlength=50)
    assert (counts.double() / 20000 - full[0]).abs().max() < 0.015


def test_compiled_fast_decoder_keeps_the_checkpoint_keys():
    _, vq = tiny()
    keys = set(vq.float().state_dict())
    vq.fast_decoder(torch.bfloat16, compile=True)  # nn.Module.compile: in place, compiled lazily on first call
    assert set(vq.state_dict()) == keys
    assert vq.decoder.conv_in.weight.dtype == torch.bfloat16
    assert vq.decoder.conv_in.weight.is_contiguous()
