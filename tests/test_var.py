"""VAR (vlm/var.py, vlm/vqvae.py, vlm/var_pipeline.py): the release's layout and sizes, block-causal attention equal to
its dense reference through the model, cached sampling equal to uncached recomputation token for token, KV memory
accounting equal to the tensors and the bf16 formula, the tokenizer's round trip, pipelines' save/load, bad input."""

import math

import numpy as np
import pytest
import torch

import vlm.var as var_module
from caching import kv_bytes
from shapes.vae import training_images
from vlm.var import VAR, TextVAR, block_causal_bias
from vlm.var_graphs import ScaleGraphs
from vlm.var_pipeline import VARPipeline, filter_logits, guidance_ratio, sample_tokens
from vlm.vqvae import MultiScaleVQVAE, phi_indices

torch.set_num_threads(1)


def tiny(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return VAR.from_name("VAR-tiny").to(dtype).eval(), MultiScaleVQVAE.from_name("vqvae-tiny").to(dtype).eval()


# ----------------------------------------------------------------------------------------------- layout and sizes
def test_phi_sharing_is_the_release_list():
    assert phi_indices(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # the spec's list (k = 2 is a float tie)
    # The official rule for other schedules: nearest of linspace(1/12, 11/12, 4) to k / (K - 1), numpy float64.
    ticks = np.linspace(1 / 12, 11 / 12, 4)
    assert phi_indices(6, 4) == [int(np.argmin(np.abs(ticks - k / 5))) for k in range(6)] == [0, 0, 1, 2, 3, 3]


def test_release_sizes_have_the_official_keys_and_parameter_counts():
    with torch.device("meta"):
        d16, d30 = VAR.from_name("VAR-d16"), VAR.from_name("VAR-d30")
        vq = MultiScaleVQVAE.from_name("vqvae-ch160v4096z32")
    sd16 = d16.state_dict()
    assert len(sd16) == 220 and len(d30.state_dict()) == 402
    assert sum(p.numel() for p in d16.parameters()) == 310_283_520
    assert d30.config.embed_dim == 64 * 30 and d30.config.num_heads == 30
    shapes = {"pos_1LC": (1, 680, 1024), "class_emb.weight": (1001, 1024), "lvl_embed.weight": (10, 1024),
              "word_embed.weight": (1024, 32), "attn_bias_for_masking": (1, 1, 680, 680), "lvl_1L": (1, 680),
              "blocks.3.attn.scale_mul_1H11": (1, 16, 1, 1), "blocks.3.attn.mat_qkv.weight": (3072, 1024),
              "blocks.3.ada_lin.1.weight": (6144, 1024), "head_nm.ada_lin.1.weight": (2048, 1024),
              "head.weight": (4096, 1024), "blocks.0.attn.zero_k_bias": (1024,)}
    assert {k: tuple(sd16[k].shape) for k in shapes} == shapes
    vsd = vq.state_dict()
    assert len(vsd) == 324 and round(sum(p.numel() for p in vq.parameters()) / 1e6, 1) == 108.9
    vshapes = {"encoder.conv_in.weight": (160, 3, 3, 3), "encoder.down.4.attn.0.qkv.weight": (1920, 640, 1, 1),
               "encoder.down.2.block.0.nin_shortcut.weight": (320, 160, 1, 1),
               "encoder.conv_out.weight": (32, 640, 3, 3),
               "decoder.up.3.block.0.nin_shortcut.weight": (320, 640, 1, 1), "decoder.conv_out.weight": (3, 160, 3, 3),
               "decoder.up.4.attn.2.proj_out.weight": (640, 640, 1, 1), "quantize.embedding.weight": (4096, 32),
               "quantize.quant_resi.qresi_ls.3.weight": (32, 32, 3, 3), "quantize.ema_vocab_hit_SV": (10, 4096),
               "quant_conv.weight": (32, 32, 3, 3), "post_quant_conv.weight": (32, 32, 3, 3)}
    assert {k: tuple(vsd[k].shape) for k in vshapes} == vshapes


def test_unknown_names_raise_with_the_valid_ones():
    with pytest.raises(ValueError, match="VAR-d16"):
        VAR.from_name("VAR-d17")
    with pytest.raises(ValueError, match="TextVAR-tiny"):
        TextVAR.from_name("VAR-d16")
    with pytest.raises(ValueError, match="vqvae-tiny"):
        MultiScaleVQVAE.from_name("vae")


# ----------------------------------------------------------------------------------------------- attention
def _dense_reference(model):
    """An attention replacement that applies the official (1, 1, L, L) additive mask buffer in float64."""
    def attn(q, k, v, *, pattern="dense", segments=None, scale=None, key_padding_mask=None):
        s = (q.double() @ k.double().transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if pattern == "block_causal":
            n = sum(segments)
            s = s + model.attn_bias_for_masking[:, :, :n, :n].double()
        else:
            assert pattern == "dense"
            if key_padding_mask is not None:
                s = s.masked_fill(~key_padding_mask[:, None, None, :], -torch.inf)
        return (s.softmax(-1) @ v.double()).to(q.dtype)
    return attn


@pytest.mark.parametrize("patch_nums", [(1, 2, 4, 8), (1, 3, 5)])  # odd scale lengths too
def test_block_causal_attention_equals_the_dense_mask_through_the_model(monkeypatch, patch_nums):
    torch.manual_seed(1)
    model = VAR.from_name("VAR-tiny", patch_nums=patch_nums).double().eval()
    labels = torch.tensor([0, 3, 10])
    x = torch.randn(3, model.L - 1, 8, dtype=torch.float64)
    fast = model(labels, x)
    monkeypatch.setattr(var_module, "attention", _dense_reference(model))
    ref = model(labels, x)
    assert fast.shape == (3, model.L, 64)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    # and the mask buffer is the official rule: key level <= query level
    lvl = torch.cat([torch.full((p * p,), k) for k, p in enumerate(patch_nums)])
    assert torch.equal(block_causal_bias(patch_nums)[0, 0] == 0, lvl[:, None] >= lvl[None, :])


def test_teacher_forced_logits_of_a_scale_ignore_later_scales():
    model, _ = tiny()
    labels = torch.tensor([1, 2])
    x = torch.randn(2, model.L - 1, 8, dtype=torch.float64)
    y = x.clone()
    y[:, 4:] += 5.0  # scales 2 and 3 (tokens 5..) change; tokens 0..4 are scales 0 and 1
    a, b = model(labels, x), model(labels, y)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-12)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3


def test_text_model_cross_attention_respects_the_padding_mask(monkeypatch):
    torch.manual_seed(2)
    model = TextVAR.from_name("TextVAR-tiny").double().eval()
    text = torch.randn(2, 5, 12, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    x = torch.randn(2, model.L - 1, 8, dtype=torch.float64)
    out = model(text, mask, x)
    text2 = text.clone()
    text2[0, 3:] = 99.0  # padded tokens of row 0 must not matter
    torch.testing.assert_close(model(text2, mask, x)[0], out[0], rtol=0, atol=1e-12)
    monkeypatch.setattr(var_module, "attention", _dense_reference(model))
    torch.testing.assert_close(model(text, mask, x), out, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cached_sampling_gives_the_tokens_of_uncached_recomputation(dtype):
    model, vq = tiny(dtype)
    pipe = VARPipeline(model, vq)
    kw = dict(guidance_scale=3.0, top_k=40, top_p=0.9, output_type="pt")
    a = pipe([1, 2, 3, 7], generator=torch.Generator().manual_seed(5), **kw)
    b = pipe([1, 2, 3, 7], generator=torch.Generator().manual_seed(5), use_cache=False, **kw)
    assert [t.shape for t in a.tokens] == [(4, 1), (4, 4), (4, 16), (4, 64)]
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    c = pipe([1, 2, 3, 7], generator=torch.Generator().manual_seed(6), **kw)
    assert not all(torch.equal(x, y) for x, y in zip(a.tokens, c.tokens))  # the seed matters


def test_cached_text_sampling_equals_uncached():
    torch.manual_seed(3)
    model = TextVAR.from_name("TextVAR-tiny").double().eval()
    _, vq = tiny()
    text = torch.randn(3, 6, 12, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    cond, null = model.condition(text, mask), model.condition(torch.zeros_like(text), torch.ones_like(mask))
    runs = [sample_tokens(model, vq, cond, null, guidance_scale=2.0, top_k=20, use_cache=c,
                          generator=torch.Generator().manual_seed(0))[0] for c in (True, False)]
    assert all(torch.equal(x, y) for x, y in zip(*runs))
    # The per-scale graph runner's static buffers (text context copied in) give the same tokens; a context of
    # another length is refused (its buffers have the first run's shape).
    graphs = ScaleGraphs(model, rows=6, capture=False)
    got = sample_tokens(model, vq, cond, null, guidance_scale=2.0, top_k=20, generator=torch.Generator().manual_seed(0),
                        graphs=graphs)[0]
    assert all(torch.equal(x, y) for x, y in zip(runs[0], got))
    longer = (torch.cat([text, text], 1), torch.cat([mask, mask], 1))
    c2, n2 = model.condition(*longer), model.condition(torch.zeros_like(longer[0]), torch.ones_like(longer[1]))
    with pytest.raises(ValueError, match="another transformer or 6 rows"):
        sample_tokens(model, vq, c2, n2, guidance_scale=2.0, graphs=graphs)


def test_sampling_inputs_are_the_teacher_forcing_input_of_the_sampled_tokens(monkeypatch):
    """What the sampler feeds scale k equals what training feeds it for the same tokens, and the sampled scale's
    logits equal the teacher-forced forward's (cache vs full pyramid)."""
    model, vq = tiny()
    seen = []
    orig = model.logits
    monkeypatch.setattr(model, "logits", lambda h, c: seen.append(orig(h, c)) or seen[-1])
    tokens, _, _ = sample_tokens(model, vq, model.condition(torch.tensor([4, 5])), None,
                                 generator=torch.Generator().manual_seed(0))
    tf = vq.teacher_forcing_input(tokens)
    assert tf.shape == (2, model.L - 1, 8)
    full = orig(model.run_blocks(model.embed(model.condition(torch.tensor([4, 5]))[0], tf),
                                 model.condition(torch.tensor([4, 5]))[0]), model.condition(torch.tensor([4, 5]))[0])
    torch.testing.assert_close(torch.cat(seen, 1), full, rtol=1e-9, atol=1e-9)


def test_filter_logits_top_k_and_top_p_against_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 50, generator=g, dtype=torch.float64)
    k = filter_logits(logits, top_k=7)
    assert (k.isfinite().sum(-1) == 7).all()
    assert torch.equal(k.isfinite(), logits >= logits.topk(7).values[..., -1:])
    p = filter_logits(logits, top_p=0.8)
    probs = logits.softmax(-1)
    for row_l, row_p in zip(p.view(-1, 50), probs.view(-1, 50)):
        order = row_p.argsort(descending=True)
        need = int((row_p[order].cumsum(0) < 0.8).sum()) + 1  # the smallest prefix whose mass reaches 0.8
        assert set(row_l.isfinite().nonzero().flatten().tolist()) == set(order[:need].tolist())
    assert torch.equal(filter_logits(logits), logits)
    assert guidance_ratio(1.5, 0, 10) == 0 and guidance_ratio(1.5, 9, 10) == 1.5


def test_kv_cache_memory_accounting_matches_tensors_and_the_bf16_formula():
    model, vq = tiny(torch.float32)
    B = 3
    tokens, _, cache = sample_tokens(model, vq, model.condition(torch.tensor([0, 1, 2])),
                                     model.condition(torch.tensor([10, 10, 10])), guidance_scale=1.5,
                                     cache_dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    L, depth, width = model.L, len(model.blocks), model.config.embed_dim
    live = sum(layer.k.nbytes + layer.v.nbytes for layer in cache.layers)
    assert cache.nbytes() == live == 2 * depth * (2 * B) * L * width * 2  # K+V, layers, cond+null rows, bf16
    assert cache.nbytes() == kv_bytes(depth, L, model.num_heads, model.head_dim, batch=2 * B, dtype=torch.bfloat16)
    assert cache.bytes_per_layer() == [live // depth] * depth
    per_token = 2 * depth * (2 * B) * width * 2
    assert cache.bytes_per_segment() == {k: p * p * per_token for k, p in enumerate(model.patch_nums)}
    assert cache[0].k.dtype == torch.bfloat16 and cache.length(1) == L
    # the release's numbers: d16 / d30 at batch 64, bf16
    for d in (16, 30):
        assert kv_bytes(d, 680, d, 64, batch=128, dtype=torch.bfloat16) == 2 * d * 128 * 680 * 64 * d * 2


# ----------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_shapes_teacher_forcing_and_decode_agree():
    _, vq = tiny()
    x = training_images(3, size=16, seed=0).double()
    idx = vq.encode_indices(x)
    assert [t.shape for t in idx] == [(3, 1), (3, 4), (3, 16), (3, 64)] and all(t.dtype == torch.long for t in idx)
    # teacher-forcing input of scale k = area_down(f̂ of scales < k): rebuild it scale by scale with add_scale
    f_hat = torch.zeros(3, 8, 8, 8, dtype=torch.float64)
    maps = []
    for k in range(3):
        f_hat = vq.add_scale(f_hat, k, idx[k])
        maps.append(vq.next_scale_map(f_hat, k + 1).flatten(2).transpose(1, 2))
    torch.testing.assert_close(vq.teacher_forcing_input(idx), torch.cat(maps, 1), rtol=0, atol=1e-12)
    f_hat = vq.add_scale(f_hat, 3, idx[3])
    torch.testing.assert_close(vq.indices_to_fhat(idx), f_hat, rtol=0, atol=1e-12)
    torch.testing.assert_close(vq.decode_indices(idx), vq.fhat_to_img(f_hat), rtol=0, atol=1e-12)
    # the quantizer's own f̂ equals the one rebuilt from its tokens
    _, q_hat, partial = vq.quantize.quantize(vq.features(x))
    torch.testing.assert_close(q_hat, f_hat, rtol=0, atol=1e-12)
    assert len(partial) == 4


def test_tokenizer_round_trip_after_short_training_improves_with_every_scale():
    """A short CPU training (100 steps of 8 scenes at 16 px; ~8 s) of a narrow tokenizer: the full pyramid
    reconstructs held-out scenes above 20.5 dB (untrained: 14.3 dB), each added scale lowers the error (the
    residual design working), and codes are in use at every scale but the 1x1 one. This is a weak tokenizer: each
    image's mean colour alone scores 21.8 dB on these mostly-background scenes; what a longer run reaches is on the
    shapes tokenizer's model card (docs/var.md). The exactness properties are tested above."""
    torch.manual_seed(0)
    vq = MultiScaleVQVAE.from_name("vqvae-tiny", using_sa=False, ch=8, norm_groups=4)
    opt = torch.optim.Adam(vq.parameters(), lr=5e-3)
    for s in range(100):
        x = training_images(8, size=16, seed=s)
        rec, vq_loss, _ = vq(x)
        loss = torch.nn.functional.mse_loss(rec, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    vq.eval()
    x = training_images(64, size=16, seed=12345)
    idx = vq.encode_indices(x)
    psnr = [10 * math.log10(4 / float(((vq.decode_indices(idx, upto=k + 1) - x) ** 2).mean())) for k in range(4)]
    assert psnr[-1] > 20.5, psnr
    assert all(b > a for a, b in zip(psnr, psnr[1:])), psnr
    assert min(vq.quantize.vocab_usage()[1:]) > 30.0


def test_tokenizer_straight_through_gradients_and_vq_loss():
    _, vq = tiny(torch.float32)
    vq.train()
    x = training_images(2, size=16, seed=1)
    rec, vq_loss, idx = vq(x)
    assert rec.shape == x.shape and vq_loss.ndim == 0 and vq_loss > 0
    torch.nn.functional.mse_loss(rec, x).backward()
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0  # the reconstruction reaches the encoder
    assert vq.quantize.embedding.weight.grad is None  # ... but not the codebook (only the VQ loss does)
    assert vq.quantize.ema_vocab_hit_SV.sum(1).tolist() == [2 * p * p for p in vq.patch_nums]


# ----------------------------------------------------------------------------------------------- pipeline
def test_pipeline_save_load_round_trip_and_output(tmp_path):
    model, vq = tiny(torch.float32)
    pipe = VARPipeline(model, vq)
    steps = []
    out = pipe([2, 9], guidance_scale=2.0, top_k=10, generator=torch.Generator().manual_seed(1),
               callback=lambda k, K, toks, f_hat: steps.append((k, K, len(toks), pipe.preview(f_hat)[0].size)))
    assert len(out.images) == 2 and out.images[0].size == (16, 16) and out.images[0].mode == "RGB"
    assert steps == [(k, 4, k + 1, (16, 16)) for k in range(4)]
    pipe.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / "tokenizer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "p" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    again = VARPipeline.from_pretrained(tmp_path / "p")
    out2 = again([2, 9], guidance_scale=2.0, top_k=10, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, out2.tokens))
    # a referenced (shared) tokenizer instead of a copy
    pipe.save_pretrained(tmp_path / "q", tokenizer_folder=tmp_path / "p" / "tokenizer")
    assert not (tmp_path / "q" / "tokenizer").exists()
    out3 = VARPipeline.from_pretrained(tmp_path / "q")([2, 9], guidance_scale=2.0, top_k=10,
                                                        generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, out3.tokens))


def test_text_pipeline_with_the_shapes_clip(tmp_path):
    from pathlib import Path

    from shapes.clip import ShapesCLIP

    clip_dir = Path(__file__).resolve().parents[1] / "weights" / "shapes-clip"
    clip = ShapesCLIP.from_pretrained(clip_dir)
    torch.manual_seed(0)
    model = TextVAR.from_name("TextVAR-tiny", text_dim=clip.config.text_width).eval()
    _, vq = tiny(torch.float32)
    pipe = VARPipeline(model, vq, text_encoder=clip)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = pipe(["a red star", "a big blue circle in the top left"], generator=g(), top_k=10, output_type="pt")
    b = pipe(["a red star", "a big blue circle in the top left"], generator=g(), top_k=10, output_type="pt",
             use_cache=False)
    assert a.images.shape == (2, 3, 16, 16) and all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    pipe.save_pretrained(tmp_path / "t", text_encoder_folder=clip_dir)
    again = VARPipeline.from_pretrained(tmp_path / "t")
    c = again(["a red star", "a big blue circle in the top left"], generator=g(), top_k=10, output_type="pt")
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, c.tokens))


def test_bad_input_is_refused(tmp_path):
    model, vq = tiny(torch.float32)
    pipe = VARPipeline(model, vq)
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 10\)"):
        pipe([10])
    with pytest.raises(ValueError, match="class ids"):
        pipe(["a red star"])
    with pytest.raises(ValueError, match="top_k"):
        pipe([1], top_k=-1)
    with pytest.raises(TypeError, match="unknown arguments"):
        pipe([1], num_steps=3)
    with pytest.raises(ValueError, match="images must be"):
        vq.encode_indices(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="scales of tokens"):
        vq.decode_indices([torch.zeros(1, 1, dtype=torch.long)])
    with pytest.raises(ValueError, match="teacher-forcing input"):
        model(torch.tensor([1]), torch.zeros(1, 5, 8))
    with pytest.raises(ValueError, match="differ"):
        sample_tokens(VAR.from_name("VAR-tiny", patch_nums=(1, 2, 3, 8)), vq, model.condition(torch.tensor([1])), None)
    with pytest.raises(ValueError, match="needs a text_encoder"):
        VARPipeline(TextVAR.from_name("TextVAR-tiny"), vq)
    with pytest.raises(ValueError, match="not a saved VAR pipeline"):
        VARPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="last patch_num"):
        MultiScaleVQVAE.from_name("vqvae-tiny", sample_size=32)


@pytest.mark.parametrize("text", [False, True])
def test_bf16_autocast_training_forward_matches_float32(text):
    # Mixed-precision training (train_var.py --mixed-precision bf16): the l2-normalised q, k come out of autocast's
    # float32 normalisation and v out of a bf16 linear; the forward must still run and agree with float32.
    torch.manual_seed(0)
    model = (TextVAR.from_name("TextVAR-tiny") if text else VAR.from_name("VAR-tiny")).train()
    cond = (torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool)) if text else (torch.tensor([1, 2]),)
    x = torch.randn(2, model.L - 1, 8)
    ref = model(*cond, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*cond, x)
    assert out.shape == ref.shape
    assert (out.float() - ref).abs().max() / ref.abs().max() < 0.05
    out.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
