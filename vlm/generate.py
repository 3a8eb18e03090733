"""Decoding for LlavaModel: free `prefill` / `decode_step` functions (gpt-fast `generate.py` style, each
compilable on its own) over the shared `caching.KVCache`, greedy or nucleus sampling, stop tokens and stop
strings, streaming, and batches with left or right padding.

Padding: the prompt's attention mask (after the image tokens were merged) is kept for the whole generation; the
cache holds the pads too, and every attention call masks them by `key_padding_mask`. New tokens' positions
continue from each row's real length, so a padded row decodes exactly as it would alone (tested). With right
padding the first new token is read at each row's last real token, and the next ones are cached after the pads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

from caching import KVCache

from .llava import AttnSpec, LlavaModel, MultimodalInputs


# ----------------------------------------------------------------------------------------------- steps
def prefill(model: LlavaModel, embeds: Tensor, position_ids: Tensor, key_padding_mask: Tensor, cache: KVCache,
            last_index: Tensor, visual_residuals=None, image_index=None, core=None) -> Tensor:
    """Run the prompt (B, L, D) once, filling the cache (segment 0); returns the logits (B, V) read at
    `last_index` (B,), each row's last real token. `core`: `prefill_core` or a compiled copy of it
    (torch.compile(prefill_core, fullgraph=True): 1.3-1.75x faster on the H100 at the 7B size, docs/llava.md)."""
    mask = None if bool(key_padding_mask.all()) else key_padding_mask
    return (core or prefill_core)(model, embeds, position_ids, mask, cache, last_index, visual_residuals,
                                  image_index)


def prefill_core(model: LlavaModel, embeds: Tensor, position_ids: Tensor, key_padding_mask: Tensor | None,
                 cache: KVCache, last_index: Tensor, visual_residuals=None, image_index=None) -> Tensor:
    """`prefill` after its one data-dependent decision (is there padding?), so torch.compile can take it whole
    (fullgraph): the benchmark's compiled prefill."""
    h = model.decode(embeds, position_ids, attn=AttnSpec("causal", key_padding_mask), cache=cache, segment=0,
                     visual_residuals=visual_residuals, image_index=image_index)
    h_last = h.gather(1, last_index.view(-1, 1, 1).expand(-1, 1, h.shape[-1]))[:, 0]
    return model.lm_head(h_last)


def decode_step(model: LlavaModel, tokens: Tensor, position_ids: Tensor, key_padding_mask: Tensor | None,
                cache: KVCache, step: int) -> Tensor:
    """One new token per row (B, 1) at `position_ids` (B, 1), attending all cached keys (mask (B, Nk) over
    cache + this token, or None); appended to the cache as segment `step`. Returns logits (B, V)."""
    h = model.decode(model.embed_tokens(tokens), position_ids, attn=AttnSpec("causal", key_padding_mask),
                     cache=cache, segment=step)
    return model.lm_head(h[:, -1])


def sample_next(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """(B, V) logits -> (B,) token ids: argmax at temperature 0, else nucleus sampling (top_p) at `temperature`."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(probs.cpu() if generator is not None and generator.device.type == "cpu" else probs,
                             1, generator=generator).view(-1).to(logits.device)


# ----------------------------------------------------------------------------------------------- the loop
@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int = 0
    stop_token_ids: list[int] = field(default_factory=list)

    def check(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1; got {self.max_new_tokens!r}")
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0; got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p!r}")


def last_real_index(mask: Tensor) -> Tensor:
    """Index of each row's last real token (B,), for left and right padding alike."""
    L = mask.shape[1]
    idx = torch.arange(L, device=mask.device).expand_as(mask)
    return torch.where(mask, idx, -1).amax(-1)


def generate_steps(model: LlavaModel, inputs: MultimodalInputs, cfg: GenerationConfig,
                   visual_residuals=None) -> Iterator[Tensor]:
    """Yields the (B,) new tokens of each step; rows that finished (eos / stop token) yield the pad id. Ends when
    every row finished or after cfg.max_new_tokens. The caller may stop consuming early (stop strings)."""
    cfg.check()
    B, L, _ = inputs.embeds.shape
    m = model
    device = inputs.embeds.device
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    cache = KVCache(len(m.layers), B, m.num_kv_heads, m.head_dim, L + cfg.max_new_tokens,
                    dtype=inputs.embeds.dtype, device=device)
    mask = torch.ones(B, L + cfg.max_new_tokens, dtype=torch.bool, device=device)
    mask[:, :L] = inputs.attention_mask
    stops = set(cfg.stop_token_ids) | ({cfg.eos_token_id} if cfg.eos_token_id is not None else set())
    stop_t = torch.tensor(sorted(stops), device=device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    pos = inputs.attention_mask.long().sum(-1, keepdim=True)  # (B, 1): next position of each row
    logits = prefill(m, inputs.embeds, inputs.position_ids, inputs.attention_mask, cache,
                     last_real_index(inputs.attention_mask), visual_residuals, inputs.image_index)
    for step in range(1, cfg.max_new_tokens + 1):
        tok = sample_next(logits, cfg.temperature, cfg.top_p, gen)
        tok = torch.where(done, torch.full_like(tok, cfg.pad_token_id), tok)
        yield tok
        done = done | torch.isin(tok, stop_t)
        if bool(done.all()) or step == cfg.max_new_tokens:
            return
        Nk = L + step
        kpm = mask[:, :Nk]
        logits = decode_step(m, tok[:, None], pos, None if bool(kpm.all()) else kpm, cache, step)
        pos = pos + 1


@torch.no_grad()
def generate(model: LlavaModel, inputs: MultimodalInputs, cfg: GenerationConfig,
             on_tokens: Callable[[Tensor], None] | None = None) -> list[list[int]]:
    """Token ids generated per row (without the stop token, without pads). `on_tokens(tokens (B,))` streams."""
    out: list[list[int]] = [[] for _ in range(inputs.embeds.shape[0])]
    stops = set(cfg.stop_token_ids) | ({cfg.eos_token_id} if cfg.eos_token_id is not None else set())
    finished = [False] * len(out)
    for tok in generate_steps(model, inputs, cfg):
        if on_tokens is not None:
            on_tokens(tok)
        for i, t in enumerate(tok.tolist()):
            if finished[i]:
                continue
            if t in stops:
                finished[i] = True
            else:
                out[i].append(t)
    return out


@torch.no_grad()
def generate_uncached(model: LlavaModel, inputs: MultimodalInputs, max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding by full recomputation of the whole sequence every step (the reference the cached path
    must equal); no stop tokens."""
    emb, mask = inputs.embeds, inputs.attention_mask
    out = []
    for _ in range(max_new_tokens):
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        h = model.decode(emb, pos, attn=AttnSpec("causal", None if bool(mask.all()) else mask))
        last = last_real_index(mask)
        tok = model.lm_head(h.gather(1, last.view(-1, 1, 1).expand(-1, 1, h.shape[-1]))[:, 0]).argmax(-1)
        out.append(tok)
        emb = torch.cat([emb, model.embed_tokens(tok)[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1).tolist()


# ----------------------------------------------------------------------------------------------- static shapes
class StaticKV:
    """The shared KVCache's buffers seen with fixed shapes, for torch.compile / CUDA graphs (gpt-fast's static
    cache): `append` writes at the tensor `write_index` (index_copy_, no Python int) and returns the whole
    buffers (B, H_kv, capacity, D); the decode step's key_padding_mask (B, capacity) hides unwritten slots. The
    wrapped cache's lengths are brought up to date by `sync` after decoding, so its memory report stays exact."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.write_index: Tensor | None = None
        # Fixed addresses, so a CUDA graph may mutate the buffers in place (what transformers' StaticCache does).
        for L in cache.layers:
            torch._dynamo.mark_static_address(L.k_buf)
            torch._dynamo.mark_static_address(L.v_buf)

    def append(self, layer: int, k: Tensor, v: Tensor, *, segment: int = 0, q: Tensor | None = None):
        L = self.cache.layers[layer]
        L.k_buf.index_copy_(2, self.write_index, k.to(L.k_buf.dtype))
        L.v_buf.index_copy_(2, self.write_index, v.to(L.v_buf.dtype))
        return L.k_buf, L.v_buf

    def sync(self, length: int, first_step: int) -> None:
        for L in self.cache.layers:
            n = length - L.length
            L.pos_buf[:, :, L.length:length] = torch.arange(L.appended, L.appended + n, device=L.pos_buf.device)
            L.seg_buf[:, :, L.length:length] = torch.arange(first_step, first_step + n, device=L.seg_buf.device,
                                                            dtype=torch.int32)
            L.length, L.appended = length, L.appended + n


def decode_step_static(model: LlavaModel, tokens: Tensor, position_ids: Tensor, key_padding_mask: Tensor,
                       static: StaticKV, write_index: Tensor) -> Tensor:
    """`decode_step` with fixed shapes: attends the whole capacity under `key_padding_mask` (B, capacity).
    Compile it once (torch.compile(mode="reduce-overhead") captures a CUDA graph) and call it every step."""
    static.write_index = write_index
    h = model.decode(model.embed_tokens(tokens), position_ids, attn=AttnSpec("causal", key_padding_mask),
                     cache=static)
    return model.lm_head(h[:, -1])


@torch.no_grad()
def generate_static(model: LlavaModel, inputs: MultimodalInputs, max_new_tokens: int, step_fn=None,
                    static: StaticKV | None = None, prefill_fn=None) -> tuple[Tensor, KVCache]:
    """Greedy decoding of exactly max_new_tokens tokens (no stop), prefill on the shared cache, then the static
    step (`step_fn`, default `decode_step_static`; pass a compiled one; `prefill_fn`: a compiled `prefill_core`).
    Returns tokens (B, T) and the cache.

    `static`: a StaticKV to reuse (its cache is reset; batch must match, capacity at least prompt + new tokens).
    Under torch.compile(mode="reduce-overhead") the cache buffers are static-address inputs of the CUDA graph: a
    fresh cache per call moves them and the graph is re-recorded every call; reusing one keeps one graph, as
    transformers' StaticCache.reset() does."""
    B, L, _ = inputs.embeds.shape
    device = inputs.embeds.device
    if static is None:
        cache = KVCache(len(model.layers), B, model.num_kv_heads, model.head_dim, L + max_new_tokens,
                        dtype=inputs.embeds.dtype, device=device)
        static = StaticKV(cache)
    else:
        cache = static.cache
        if cache.batch != B or cache.layers[0].capacity < L + max_new_tokens:
            raise ValueError(f"the reused cache holds batch {cache.batch} x {cache.layers[0].capacity} tokens; this "
                             f"call needs batch {B} x {L + max_new_tokens}")
        cache.reset()
    cap = cache.layers[0].capacity
    logits = prefill(model, inputs.embeds, inputs.position_ids, inputs.attention_mask, cache,
                     last_real_index(inputs.attention_mask), core=prefill_fn)
    step_fn = step_fn or decode_step_static
    mask = torch.zeros(B, cap, dtype=torch.bool, device=device)
    mask[:, :L] = inputs.attention_mask
    pos = inputs.attention_mask.long().sum(-1, keepdim=True)
    write = torch.tensor([L], device=device)
    out = []
    for step in range(1, max_new_tokens + 1):
        tok = logits.argmax(-1)
        out.append(tok)
        if step == max_new_tokens:
            break
        mask[:, L + step - 1] = True  # (in place: a CUDA graph reads the same mask tensor every step)
        logits = step_fn(model, tok[:, None], pos, mask, static, write)
        pos += 1
        write += 1
    static.sync(L + max_new_tokens - 1, first_step=1)
    return torch.stack(out, 1), cache


# ----------------------------------------------------------------------------------------------- text level
def build_prompt_batch(vlm, questions: list[str], short_answer: list[bool] | bool = True,
                       padding_side: str = "left") -> tuple[Tensor, Tensor]:
    """Token ids (B, T) and mask of v1 prompts "...USER: <image>\\n{q} ASSISTANT:", padded on `padding_side`."""
    from .vlm_tokenizer import prompt_v1, user_prompt

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
    if isinstance(short_answer, bool):
        short_answer = [short_answer] * len(questions)
    tok = vlm.tokenizer
    seqs = [tok.encode_prompt(prompt_v1([(user_prompt(q, s), None)])) for q, s in zip(questions, short_answer)]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if padding_side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = True
    return ids, mask


def check_questions(questions) -> list[str]:
    qs = [questions] if isinstance(questions, str) else list(questions)
    if not qs:
        raise ValueError("give at least one question")
    for q in qs:
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"every question must be a non-empty string; got {q!r}")
    return qs


@torch.no_grad()
def stream_answers(vlm, images: Tensor, questions, *, short_answer=True, max_new_tokens: int = 32,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   stop_strings: tuple[str, ...] = (), padding_side: str = "left",
                   image_features: Tensor | None = None) -> Iterator[list[str]]:
    """Yields the answers so far (one string per question) after every generated token; the last yield is
    final. images: (B, 3, H, W) uint8, one per question. Stop strings end a row and are cut from its text."""
    qs = check_questions(questions)
    if image_features is None:
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[0] != len(qs):
            raise ValueError(f"images must be a (B, 3, H, W) tensor with one image per question ({len(qs)}); got "
                             f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        image_features = vlm.encode_images(images)
    ids, mask = build_prompt_batch(vlm, qs, short_answer, padding_side)
    model = vlm.model
    inputs = model.build_inputs(ids.to(vlm.device), image_features.to(vlm.device), mask.to(vlm.device))
    tok = vlm.tokenizer
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                           eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    ids_out: list[list[int]] = [[] for _ in qs]
    finished = [False] * len(qs)
    texts = [""] * len(qs)
    for new in generate_steps(model, inputs, cfg):
        for i, t in enumerate(new.tolist()):
            if finished[i]:
                continue
            if t == cfg.eos_token_id:
                finished[i] = True
                continue
            ids_out[i].append(t)
            texts[i] = tok.decode(ids_out[i])
            for s in stop_strings:
                if s and s in texts[i]:
                    texts[i] = texts[i][: texts[i].index(s)].rstrip()
                    finished[i] = True
        yield list(texts)
        if all(finished):
            return


def answer(vlm, images: Tensor, questions, **kw) -> list[str]:
    """The final answers of `stream_answers`."""
    out = None
    for out in stream_answers(vlm, images, questions, **kw):
        pass
    return out


__all__ = ["GenerationConfig", "StaticKV", "answer", "decode_step_static", "generate_static", "prefill_core", "evaluate_vqa", "vqa_eval_set", "build_prompt_batch", "decode_step", "generate", "generate_steps",
           "generate_uncached", "last_real_index", "prefill", "sample_next", "stream_answers"]


# ----------------------------------------------------------------------------------------------- evaluation
DESCRIBE_QUESTIONS = ("describe the image.", "what is in the picture?", "describe the scene briefly.")


def vqa_eval_set(n: int, seed: int, n_describe: int | None = None) -> dict:
    """Held-out questions: `n` short-answer questions (shapes.eval_set "vqa", every short kind) and
    `n_describe` (default n // 4) description requests on caption scenes, answered by the canonical caption."""
    import numpy as np

    from shapes import eval_set

    short = eval_set("vqa", n, seed)
    n_describe = n // 4 if n_describe is None else n_describe
    desc = eval_set("caption", max(n_describe, 1), seed)
    rng = np.random.default_rng(seed)
    qd = [DESCRIBE_QUESTIONS[int(rng.integers(len(DESCRIBE_QUESTIONS)))] for _ in range(n_describe)]
    return {"image": torch.cat([short["image"], desc["image"][:n_describe]]),
            "question": short["question"] + qd,
            "answer": short["answer"] + desc["canonical"][:n_describe],
            "question_kind": short["question_kind"] + ["describe"] * n_describe}


@torch.no_grad()
def evaluate_vqa(vlm, n: int = 512, seed: int = 0, batch_size: int = 64, data: dict | None = None,
                 with_examples: bool = False) -> dict:
    """Exact match per question kind on held-out shapes questions (greedy, batched with left padding), overall
    over the short-answer kinds (`vqa_exact_match`), and description accuracy by the caption parser
    (`describe`: the answer parses to the same objects as the canonical caption)."""
    import time

    from shapes.metrics import vqa_accuracy

    t0 = time.time()
    data = data or vqa_eval_set(n, seed)
    preds = []
    for i in range(0, len(data["question"]), batch_size):
        qs = data["question"][i:i + batch_size]
        kinds = data["question_kind"][i:i + batch_size]
        short = [k != "describe" for k in kinds]
        preds += answer(vlm, data["image"][i:i + batch_size], qs, short_answer=short,
                        max_new_tokens=6 if all(short) else 48)
    kinds = data["question_kind"]
    short_idx = [i for i, k in enumerate(kinds) if k != "describe"]
    short = vqa_accuracy([preds[i] for i in short_idx], [data["answer"][i] for i in short_idx],
                         [kinds[i] for i in short_idx])
    per_kind = vqa_accuracy(preds, data["answer"], kinds)
    out = {"vqa_exact_match": short["accuracy"]}
    out.update({k: v for k, v in per_kind.items() if k not in ("accuracy", "n")})
    out.update(n_short=len(short_idx), n_describe=len(kinds) - len(short_idx), eval_seconds=round(time.time() - t0, 1))
    if with_examples:  # a few (question, answer, prediction) triples for model cards
        out["examples"] = [{"q": data["question"][i], "a": data["answer"][i], "pred": preds[i]}
                           for i in range(0, len(preds), max(1, len(preds) // 6))][:6]
    return out
