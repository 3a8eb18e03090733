"""LlavaModel, sequence building, tokenizer, KV-cached decoding (the cache equals full recomputation, padded
batches equal one-by-one generation), sampling, stop strings, streaming, save/load, and the method seams."""
import pytest
import torch

from shapes import eval_set
from shapes.clip import ShapesCLIP, vocabulary_corpus
from vlm.generate import (GenerationConfig, answer, build_prompt_batch, generate, generate_uncached, sample_next,
                          stream_answers)
from vlm.llava import (IGNORE_INDEX, LLAVA_SIZES, AttnSpec, LlavaModel, LlavaVLM, ShapesCLIPTower, from_name,
                       positions_from_mask)
from vlm.vlm_tokenizer import VLMTokenizer, prompt_v1, train_shapes_tokenizer, user_prompt

CLIP = "weights/shapes-clip"


def tiny_tokenizer() -> VLMTokenizer:
    t = train_shapes_tokenizer(vocabulary_corpus(n=200))
    return VLMTokenizer(t, t.convert_tokens_to_ids("<image>"))


def tiny_decoder(tok: VLMTokenizer):
    """shapes-llava-tiny, seeded, with larger random weights than the init, so greedy tokens differ from step to
    step and across rows (shared by the LLaVA test files)."""
    torch.manual_seed(0)
    model = from_name("shapes-llava-tiny", vocab_size=tok.vocab_size, image_token_id=tok.image_token_id,
                      pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0) if p.ndim > 1 else None
    return model


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def vlm(tok):
    return LlavaVLM(tiny_decoder(tok).eval(), ShapesCLIPTower(ShapesCLIP.from_pretrained(CLIP)), tok, CLIP)


@pytest.fixture(scope="module")
def data():
    return eval_set("vqa", 4, seed=7)


def test_template_and_labels(tok):
    ids, labels = tok.encode_conversation([(user_prompt("what colour is the star?", True), "red"),
                                           ("where is the red star?", "top-left")])
    text = tok.decode(ids)
    assert text.startswith("a chat between a curious user") and "assistant: red user: where is" in text
    assert ids.count(tok.image_token_id) == 1 and ids[0] == tok.tok.bos_token_id
    answered = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(answered) == "red top-left"  # answers and their </s> only (</s> decodes to nothing)
    assert answered.count(tok.eos_id) == 2
    assert prompt_v1([("<image>\nq", None)]).endswith("USER: <image>\nq ASSISTANT:")


def test_build_inputs_left_and_right_padding(vlm):
    m = vlm.model
    img = m.config.image_token_id
    ids = torch.tensor([[0, 0, 5, img, 7, 8], [5, 6, img, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    labels = torch.tensor([[-100, -100, -100, -100, -100, 8], [-100, -100, -100, -100, 8, 9]])
    feats = torch.randn(2, 3, 96)
    x = m.build_inputs(ids, feats, mask, labels)
    assert x.embeds.shape == (2, 8, 32)
    assert x.image_index.tolist() == [[3, 4, 5], [2, 3, 4]]
    assert x.attention_mask.tolist() == [[False, False] + [True] * 6, [True] * 8]
    assert x.position_ids.tolist() == [[0, 0, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert x.labels.tolist() == [[-100] * 7 + [8], [-100] * 6 + [8, 9]]
    proj = m.project(feats)
    torch.testing.assert_close(x.embeds[0, 3:6], proj[0])
    torch.testing.assert_close(x.embeds[1, 5], m.embed_tokens.weight[7])
    torch.testing.assert_close(x.embeds[1, 0], m.embed_tokens.weight[5])
    with pytest.raises(ValueError, match="exactly one image placeholder"):
        m.build_inputs(torch.tensor([[5, img, img]]), feats[:1])
    with pytest.raises(ValueError, match="image_features must be"):
        m.build_inputs(ids, torch.randn(2, 3, 95), mask)
    with pytest.raises(ValueError, match="no image_features"):
        m.build_inputs(ids, None, mask)


def test_left_padding_leaves_logits_unchanged(vlm, data):
    """A row's logits at its real tokens do not depend on pads before it (positions and masks are per row)."""
    m = vlm.model
    f = vlm.encode_images(data["image"][:2])
    ids, mask = build_prompt_batch(vlm, ["what shape is the red object?", "how many shapes are there in it?"])
    assert not mask[0].all()  # row 0 is shorter: left padded
    out = m(ids, f, mask)["logits"]
    n = int(mask[0].sum())
    alone = m(ids[:1, -n:], f[:1])["logits"]
    torch.testing.assert_close(out[0, -alone.shape[1]:], alone[0], rtol=1e-4, atol=1e-4)


def test_cached_greedy_equals_full_recomputation(vlm, data):
    f = vlm.encode_images(data["image"])
    ids, mask = build_prompt_batch(vlm, data["question"])
    x = vlm.model.build_inputs(ids, f, mask)
    cached = generate(vlm.model, x, GenerationConfig(max_new_tokens=10))
    full = generate_uncached(vlm.model, x, 10)
    assert cached == full
    assert len({tuple(c) for c in cached}) > 1 and len(set(cached[0])) > 1  # not a degenerate constant


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_one_by_one(vlm, data, side):
    qs = data["question"][:3] + ["what is in the picture?"]
    f = vlm.encode_images(data["image"])
    ids, mask = build_prompt_batch(vlm, qs, short_answer=[True, True, True, False], padding_side=side)
    assert len({int(r.sum()) for r in mask}) > 1  # unequal lengths: padding is exercised
    batched = generate(vlm.model, vlm.model.build_inputs(ids, f, mask), GenerationConfig(max_new_tokens=8))
    for i, q in enumerate(qs):
        ids1, mask1 = build_prompt_batch(vlm, [q], short_answer=i < 3)
        one = generate(vlm.model, vlm.model.build_inputs(ids1, f[i:i + 1], mask1), GenerationConfig(max_new_tokens=8))
        assert batched[i] == one[0], (side, i)


def test_kv_cache_segments_and_memory(vlm, data):
    """Prefill is segment 0 of the shared cache, each decode step its own segment; bytes are exact."""
    from caching import KVCache
    from vlm.generate import decode_step, last_real_index, prefill

    m = vlm.model
    f = vlm.encode_images(data["image"][:1])
    ids, mask = build_prompt_batch(vlm, data["question"][:1])
    x = m.build_inputs(ids, f, mask)
    L = x.embeds.shape[1]
    assert L == ids.shape[1] + 64 - 1  # 64 patch tokens replace one placeholder
    cache = KVCache(len(m.layers), 1, m.num_kv_heads, m.head_dim, L + 2)
    logits = prefill(m, x.embeds, x.position_ids, x.attention_mask, cache, last_real_index(x.attention_mask))
    tok = logits.argmax(-1, keepdim=True)
    decode_step(m, tok, torch.tensor([[L]]), None, cache, step=1)
    per_token = len(m.layers) * 2 * m.num_kv_heads * m.head_dim * 4  # layers x K,V x heads x dim x fp32
    assert cache.bytes_per_segment() == {0: L * per_token, 1: per_token}
    assert cache.memory_report()["tokens_per_layer"] == [L + 1] * len(m.layers)
    decode_step(m, tok, torch.tensor([[L + 1]]), None, cache, step=2)
    with pytest.raises(ValueError, match="capacity"):  # full: the cache refuses instead of reallocating
        decode_step(m, tok, torch.tensor([[L + 2]]), None, cache, step=3)


def test_sampling_seeded_and_top_p():
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]]).repeat(2000, 1)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = sample_next(logits, 1.0, 1.0, g1), sample_next(logits, 1.0, 1.0, g2)
    assert torch.equal(a, b)
    p = torch.softmax(logits[0], -1)
    freq = torch.bincount(a, minlength=4).float() / 2000
    assert (freq - p).abs().max() < 0.04
    # top_p 0.7: token 0 alone holds 0.66 < 0.7, so tokens {0, 1} stay, renormalised
    c = sample_next(logits, 1.0, 0.7, torch.Generator().manual_seed(1))
    assert set(c.tolist()) == {0, 1}
    assert abs((c == 0).float().mean().item() - (p[0] / (p[0] + p[1])).item()) < 0.04
    assert sample_next(logits[:1], 0.0).item() == 0


def test_stop_strings_streaming_and_seeds(vlm, data):
    img = data["image"][:1]
    chunks = list(stream_answers(vlm, img, "describe the image.", short_answer=False, max_new_tokens=6))
    assert [len(c) for c in chunks] == [1] * len(chunks)
    final = chunks[-1][0]
    assert all(final.startswith(c[0]) for c in chunks)  # each yield extends the previous answer
    words = final.split()
    assert len(words) >= 2
    stopped = answer(vlm, img, "describe the image.", short_answer=False, max_new_tokens=6, stop_strings=(words[1],))
    assert stopped == [final[: final.index(words[1])].rstrip()]
    s1 = answer(vlm, img, "describe", temperature=1.0, top_p=0.9, seed=3, max_new_tokens=6)
    s2 = answer(vlm, img, "describe", temperature=1.0, top_p=0.9, seed=3, max_new_tokens=6)
    assert s1 == s2
    with pytest.raises(ValueError, match="non-empty string"):
        answer(vlm, img, "  ")
    with pytest.raises(ValueError, match="one image per question"):
        answer(vlm, data["image"][:2], "what?")
    with pytest.raises(ValueError, match="max_new_tokens"):
        answer(vlm, img, "what?", max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        answer(vlm, img, "what?", top_p=0.0, temperature=1.0)


def test_save_load_round_trip(vlm, data, tmp_path):
    folder = tmp_path / "m"
    vlm.save_pretrained(folder, dtype=torch.float32)
    cfg = (folder / "config.json").read_text()
    assert '"kind": "shapes-clip"' in cfg and "shapes-clip" in cfg
    assert not list(folder.glob("*clip*"))  # the tower is referenced, not copied
    back = LlavaVLM.from_pretrained(folder)
    f = vlm.encode_images(data["image"][:2])
    torch.testing.assert_close(back.encode_images(data["image"][:2]), f)
    ids, mask = build_prompt_batch(vlm, data["question"][:2])
    torch.testing.assert_close(back.model(ids, f, mask)["logits"], vlm.model(ids, f, mask)["logits"])
    assert back.tokenizer.encode_prompt("USER: <image>\nhi") == vlm.tokenizer.encode_prompt("USER: <image>\nhi")


def test_sizes_registry():
    with pytest.raises(ValueError, match="unknown LLaVA size 'LLaVA-8B'.*LLaVA-7B"):
        from_name("LLaVA-8B")
    with torch.device("meta"):
        big = from_name("LLaVA-7B")
    n = sum(p.numel() for p in big.parameters())
    assert n == 6_738_415_616 + 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # Llama-2-7B + mlp2x_gelu projector
    assert LLAVA_SIZES["LLaVA-7B"]["vision_tower"]["config"]["image_size"] == 336
    with pytest.raises(ValueError, match="must divide"):
        LlavaModel(hidden_size=30, num_attention_heads=4)


def test_deepstack_and_naavit_seams(vlm, data):
    """visual_residuals add features at the visual positions before chosen layers (zeros change nothing; a
    residual before layer 1 leaves layer 0 and the tokens before the image unchanged); q_index restricts queries."""
    m = vlm.model
    f = vlm.encode_images(data["image"][:1])
    ids, mask = build_prompt_batch(vlm, data["question"][:1])
    x = m.build_inputs(ids, f, mask)
    base = m.decode(x.embeds, x.position_ids)
    zero = m.decode(x.embeds, x.position_ids, visual_residuals={1: torch.zeros(1, 64, 32)}, image_index=x.image_index)
    torch.testing.assert_close(zero, base)
    r = m.decode(x.embeds, x.position_ids, visual_residuals={1: torch.randn(1, 64, 32)}, image_index=x.image_index)
    first = int(x.image_index[0, 0])
    torch.testing.assert_close(r[:, :first], base[:, :first])
    assert (r[:, first:] - base[:, first:]).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="image_index"):
        m.decode(x.embeds, x.position_ids, visual_residuals={1: torch.zeros(1, 64, 32)})
    # q_index = every token: the same as no subset.
    allq = torch.arange(x.embeds.shape[1])[None]
    torch.testing.assert_close(m.decode(x.embeds, x.position_ids, attn=AttnSpec("causal", None, allq)), base)
    assert positions_from_mask(torch.tensor([[0, 1, 1], [1, 1, 0]])).tolist() == [[0, 0, 1], [0, 1, 1]]


def test_static_cache_decoding_equals_dynamic(vlm, data):
    """The fixed-shape decode step (for CUDA graphs / torch.compile) gives the cached path's tokens, padded batch
    included, and leaves the shared cache's accounting exact."""
    from vlm.generate import generate_static

    f = vlm.encode_images(data["image"])
    ids, mask = build_prompt_batch(vlm, data["question"])
    x = vlm.model.build_inputs(ids, f, mask)
    tokens, cache = generate_static(vlm.model, x, 7)
    assert tokens.tolist() == generate_uncached(vlm.model, x, 7)
    from vlm.generate import prefill_core
    seen = []
    again, _ = generate_static(vlm.model, x, 7, prefill_fn=lambda *a: seen.append(a[3]) or prefill_core(*a))
    assert again.tolist() == tokens.tolist() and len(seen) == 1 and seen[0] is not None  # padded batch: mask kept
    L = x.embeds.shape[1]
    assert cache.memory_report()["tokens_per_layer"] == [L + 6] * len(vlm.model.layers)
    assert sorted(cache.bytes_per_segment()) == list(range(7))


def test_static_decoding_reuses_one_cache_and_one_graph(vlm, data):
    """A reused StaticKV (reset per call) gives the same tokens as a fresh cache, and the compiled step is traced
    once, as one graph, for all calls (what lets a CUDA graph be recorded once on the GPU)."""
    from caching import KVCache
    from vlm.generate import StaticKV, decode_step_static, generate_static

    f = vlm.encode_images(data["image"])
    ids, mask = build_prompt_batch(vlm, data["question"])
    x = vlm.model.build_inputs(ids, f, mask)
    want, _ = generate_static(vlm.model, x, 5)
    m = vlm.model
    static = StaticKV(KVCache(len(m.layers), x.embeds.shape[0], m.num_kv_heads, m.head_dim, x.embeds.shape[1] + 9))
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(decode_step_static, backend=count, dynamic=False)
    for _ in range(3):
        tokens, cache = generate_static(m, x, 5, step, static=static)
        assert tokens.tolist() == want.tolist() and cache is static.cache
    assert len(graphs) == 1
    with pytest.raises(ValueError, match="needs batch"):
        generate_static(m, x, 20, step, static=static)  # capacity L + 9 < L + 20


def test_prefill_core_compiles_whole_and_equals_prefill(vlm, data):
    """The benchmark's compiled prefill: `prefill_core` traces as one graph (fullgraph) and gives prefill's logits
    and cache."""
    from caching import KVCache
    from vlm.generate import last_real_index, prefill, prefill_core

    m = vlm.model
    f = vlm.encode_images(data["image"][:2])
    ids, mask = build_prompt_batch(vlm, [data["question"][0]] * 2)  # same question: no padding
    x = m.build_inputs(ids, f, mask)
    B, L = x.embeds.shape[:2]

    def fresh():
        return KVCache(len(m.layers), B, m.num_kv_heads, m.head_dim, L + 2)

    want_cache, got_cache = fresh(), fresh()
    want = prefill(m, x.embeds, x.position_ids, x.attention_mask, want_cache, last_real_index(x.attention_mask))
    graphs = []
    core = torch.compile(prefill_core, backend=lambda gm, ex: (graphs.append(gm), gm.forward)[1], fullgraph=True,
                         dynamic=False)
    torch._dynamo.reset()
    got = core(m, x.embeds, x.position_ids, None, got_cache, last_real_index(x.attention_mask))
    assert len(graphs) == 1
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_cache.layers[0].k, want_cache.layers[0].k)
    assert got_cache.length(0) == want_cache.length(0) == L


def test_fused_projections_give_the_same_logits_and_tokens(vlm, data, tmp_path):
    """fuse_projections stacks q/k/v and gate/up into one matrix product each (inference): the logits, the cached
    and the static-shape greedy tokens stay those of the separate projections; saving is refused until
    unfuse_projections restores exactly the checkpoint's tensors."""
    import copy

    from vlm.generate import generate_static
    from vlm.llava import fuse_projections, unfuse_projections

    f = vlm.encode_images(data["image"])
    ids, mask = build_prompt_batch(vlm, data["question"])
    x = vlm.model.build_inputs(ids, f, mask)
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    want_logits = vlm.model.decode(x.embeds, x.position_ids, attn=AttnSpec("causal", x.attention_mask))
    want_tokens, _ = generate_static(vlm.model, x, 6)
    fused = copy.deepcopy(vlm)
    fuse_projections(fused.model)
    layer = fused.model.layers[0]
    assert layer.self_attn.qkv_proj is not None and not hasattr(layer.self_attn, "q_proj")
    assert layer.mlp.gate_up_proj.weight.shape[0] == 2 * vlm.model.layers[0].mlp.up_proj.weight.shape[0]
    got_logits = fused.model.decode(x.embeds, x.position_ids, attn=AttnSpec("causal", x.attention_mask))
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert generate_static(fused.model, x, 6)[0].tolist() == want_tokens.tolist()
    with pytest.raises(ValueError, match="fused"):
        fused.save_pretrained(tmp_path / "fused")
    unfuse_projections(fused.model)
    after = fused.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_tied_embeddings_save_once_and_retie(tok, tmp_path):
    """The shipped size ties lm_head to the embedding: saved once (safetensors refuses shared storage), re-tied
    on load, and a checkpoint whose weights do not match the config is refused."""
    from safetensors.torch import load_file, save_file

    m = from_name("shapes-llava", vocab_size=tok.vocab_size, image_token_id=tok.image_token_id,
                  pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
    assert m.lm_head.weight is m.embed_tokens.weight
    vlm = LlavaVLM(m, ShapesCLIPTower(ShapesCLIP.from_pretrained(CLIP)), tok, CLIP)
    vlm.save_pretrained(tmp_path / "m")
    state = load_file(tmp_path / "m" / "diffusion_pytorch_model.safetensors")
    assert "lm_head.weight" not in state and state["embed_tokens.weight"].dtype == torch.float16
    back = LlavaVLM.from_pretrained(tmp_path / "m")
    assert back.model.lm_head.weight is back.model.embed_tokens.weight
    torch.testing.assert_close(back.model.embed_tokens.weight, m.embed_tokens.weight.half().float())
    del state["norm.weight"]
    save_file(state, tmp_path / "m" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['norm.weight'\]"):
        LlavaVLM.from_pretrained(tmp_path / "m")
