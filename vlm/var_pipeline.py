"""VAR sampling: next-scale prediction with a KV cache, batched classifier-free guidance that grows over scales,
top-k / top-p, seeded generators, a per-scale callback; and a thin diffusers pipeline around it.

Free functions first (what the pipeline, tests, benchmark and ScaleKV call), then the pipeline:

- `sample_tokens(transformer, vqvae, cond, null, ...)`: the loop over scales k = 0..K-1. Inputs of scale k: sos for
  k = 0, else word_embed(area_down(f̂, pn_k)); the blocks run over this scale's tokens only, each layer appending
  its K/V to a `caching.KVCache` (dense attention to the cache); with guidance the batch is [cond; null] and
  logits = (1 + t)·cond − t·null with t = cfg·k/(K−1) (none at the first scale, full at the last, as VAR does);
  then top-k / top-p filtering and one multinomial draw per token from `generator`; f̂ += φ_k(up(e[r_k])).
  `use_cache=False` recomputes the whole prefix pyramid at every scale with the block-causal mask instead (the
  reference the cached path must equal token for token).
- `filter_logits`: top-k, then top-p (nucleus) over what is left, as the official `sample_with_top_k_top_p_`;
  `draw_tokens` draws from that distribution, with top-k over the k sorted candidates only (`top_k_candidates`).

Pipeline folder (`save_pretrained` / `from_pretrained`):

    <folder>/
      model_index.json   {"_class_name": "VARPipeline", "transformer": ["vlm.var", "VAR" | "TextVAR"],
                          "vqvae": ["vlm.vqvae", "MultiScaleVQVAE"], "text_encoder": ["shapes.clip", "ShapesCLIP"]
                          (text models only), "component_folders": {"transformer": "transformer",
                          "vqvae": "tokenizer", "text_encoder": "../shapes-clip"}}
      tokenizer/         config.json + diffusion_pytorch_model.safetensors (or a referenced folder, see below)
      transformer/       config.json + diffusion_pytorch_model.safetensors

The text encoder is referenced, not copied (like dit/text_pipelines.py), and so may the tokenizer be
(`save_pretrained(tokenizer_folder=...)`): relative paths resolve against <folder>.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from torch import Tensor

from caching import CachePolicy, KVCache
from shapes.clip import ShapesCLIP

from dit.int8_weights import save_int8

from .var import VAR, TextVAR
from .var_graphs import ScaleGraphs
from .vqvae import MultiScaleVQVAE

MODEL_INDEX = "model_index.json"
TRANSFORMERS = {"VAR": VAR, "TextVAR": TextVAR}
TEXT_ENCODERS = {"ShapesCLIP": ShapesCLIP}
OUTPUT_TYPES = ("pil", "pt", "np", "tokens")
# Guidance and filtering of the paper's FID runs (the app's demo uses a stronger guidance).
DEFAULT_SAMPLING = dict(guidance_scale=1.5, top_k=900, top_p=0.96)

# callback(scale index k, number of scales K, tokens so far (list of (B, l_i)), f̂ (B, Cv, H, W)) after each scale;
# `VARPipeline.preview(f_hat)` turns f̂ into images for a progress preview.
ScaleCallback = Callable[[int, int, list, Tensor], None]


# ----------------------------------------------------------------------------------------------- sampling
def filter_logits(logits_BlV: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """Keep the `top_k` largest logits (0: all), then the smallest set whose probability reaches `top_p`
    (0 or >= 1: all); the rest become -inf. Returns a new tensor."""
    V = logits_BlV.shape[-1]
    out = logits_BlV.clone()
    if top_k > 0 and top_k < V:
        kth = out.topk(top_k, dim=-1).values[..., -1:]
        out.masked_fill_(out < kth, -torch.inf)
    if 0 < top_p < 1:
        sorted_logits, sorted_idx = out.sort(dim=-1)  # ascending
        drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop_sorted[..., -1] = False  # the most likely token always stays
        out.masked_fill_(drop_sorted.scatter(-1, sorted_idx, drop_sorted), -torch.inf)
    return out


def top_k_candidates(logits_BlV: Tensor, top_k: int, top_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """The distribution filter_logits(logits, top_k, top_p).softmax(-1) leaves, over its top_k candidates only:
    (probabilities (N, top_k), token ids (N, top_k)), N = all positions. topk returns the candidates sorted, so
    top-p needs no sort of the whole vocabulary and no scatter back (at VAR's top-k 900 of 4096, with 64 images the
    last scale alone is 16k rows; two full-vocabulary sorts per scale were most of the sampler's device time).
    The suffix sums run from the least likely candidate up, the order filter_logits's ascending cumsum adds them."""
    V = logits_BlV.shape[-1]
    vals, cand = logits_BlV.reshape(-1, V).topk(top_k, dim=-1)  # descending
    if 0 < top_p < 1:
        mass_from_here_down = vals.softmax(-1).flip(-1).cumsum(-1).flip(-1)
        drop = mass_from_here_down <= 1 - top_p
        drop[:, 0] = False  # the most likely token always stays
        vals = vals.masked_fill(drop, -torch.inf)
    return vals.softmax(-1), cand


def draw_tokens(logits_BlV: Tensor, top_k: int = 0, top_p: float = 0.0,
                generator: torch.Generator | None = None) -> Tensor:
    """One token id per position (B, l) from softmax(logits) after top-k, then top-p (filter_logits's rule)."""
    B, V = logits_BlV.shape[0], logits_BlV.shape[-1]
    if 0 < top_k < V:
        probs, cand = top_k_candidates(logits_BlV, top_k, top_p)
        pick = torch.multinomial(probs, 1, generator=generator)
        return cand.gather(-1, pick).view(B, -1)
    probs = filter_logits(logits_BlV, top_k, top_p).softmax(-1)
    return torch.multinomial(probs.view(-1, V), 1, generator=generator).view(B, -1)


def guidance_ratio(guidance_scale: float, k: int, num_scales: int) -> float:
    """t_k = cfg · k / (K − 1): no guidance on the first (global) scale, the full ratio on the last."""
    return guidance_scale * k / (num_scales - 1)


@torch.no_grad()
def sample_tokens(transformer: VAR | TextVAR, vqvae: MultiScaleVQVAE, cond: tuple, null: tuple | None, *,
                  guidance_scale: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                  generator: torch.Generator | None = None, use_cache: bool = True,
                  cache_dtype: torch.dtype | None = None, cache_policy: CachePolicy | None = None,
                  callback: ScaleCallback | None = None, graphs: ScaleGraphs | None = None
                  ) -> tuple[list[Tensor], Tensor, KVCache | None]:
    """Sample one token pyramid per condition row.

    cond / null: the transformer's `condition(...)` outputs (cond_BC, context) for the prompts and for the null
    prompt (same batch B); null None means no guidance. Returns (tokens: K LongTensors (B, l_k), f̂, the cache
    (for memory reports; None without cache)).

    `graphs`: a `vlm.var_graphs.ScaleGraphs` for this many rows (2B with guidance): the transformer runs as one
    replayed CUDA graph per scale on its own cache (same kernels, same tokens); sampling stays here."""
    K = len(transformer.patch_nums)
    if tuple(vqvae.patch_nums) != tuple(transformer.patch_nums):
        raise ValueError(f"tokenizer patch_nums {vqvae.patch_nums} differ from the transformer's "
                         f"{transformer.patch_nums}")
    if vqvae.config.vocab_size != transformer.config.vocab_size or \
            vqvae.config.z_channels != transformer.config.z_channels:
        raise ValueError("tokenizer and transformer disagree on vocabulary size or token channels")
    cond_BC, ctx = cond
    B = cond_BC.shape[0]
    guided = null is not None and guidance_scale != 0
    if guided:
        # One forward over [cond; null]: the two halves share every weight read.
        cond_BC = torch.cat((cond_BC, null[0]))
        if ctx is not None:
            ctx = (torch.cat((ctx[0], null[1][0])), torch.cat((ctx[1], null[1][1])))
    rows = cond_BC.shape[0]
    if graphs is not None:
        if not use_cache or cache_policy is not None:
            raise ValueError("CUDA graphs replay the full KV cache: use_cache=True and no cache_policy")
        if graphs.transformer is not transformer or not graphs.matches(rows, ctx):
            raise ValueError(f"these graphs were built for another transformer or {graphs.rows} rows; this run has "
                             f"{rows}")
        graphs.start(cond_BC, ctx)
        cache = graphs.cache
    else:
        cache = transformer.make_cache(rows, dtype=cache_dtype, policy=cache_policy) if use_cache else None
    H = vqvae.patch_nums[-1]
    f_hat = torch.zeros(B, vqvae.config.z_channels, H, H, device=cond_BC.device,
                        dtype=vqvae.quantize.embedding.weight.dtype)
    tokens: list[Tensor] = []
    inputs: list[Tensor] = []  # each scale's input tokens (rows, l_k, C), for the uncached recomputation
    for k in range(K):
        if k == 0:
            x = transformer.embed_scale(0, cond_BC=cond_BC)
        else:
            m = vqvae.next_scale_map(f_hat, k).flatten(2).transpose(1, 2)  # (B, l_k, Cv)
            x = transformer.embed_scale(k, map_BlCv=m.to(cond_BC.dtype))
            if guided:
                x = x.repeat(2, 1, 1)
        if graphs is not None:
            logits = graphs.step(k, x)  # (rows, l_k, V) float32
        else:
            if use_cache:
                h = transformer.run_blocks(x, cond_BC, ctx, cache=cache, scale_index=k)
            else:
                inputs.append(x)
                h = transformer.run_blocks(torch.cat(inputs, 1), cond_BC, ctx, segments=transformer.segments[:k + 1])
                h = h[:, -transformer.segments[k]:]
            logits = transformer.logits(h, cond_BC)  # (rows, l_k, V) float32
        if guided:
            t = guidance_ratio(guidance_scale, k, K)
            logits = (1 + t) * logits[:B] - t * logits[B:]
        idx = draw_tokens(logits, top_k, top_p, generator)
        tokens.append(idx)
        f_hat = vqvae.add_scale(f_hat, k, idx)
        if callback is not None:
            callback(k, K, tokens, f_hat)
    return tokens, f_hat, cache


# ----------------------------------------------------------------------------------------------- pipeline
@dataclass
class VAROutput(BaseOutput):
    """images: list of PIL images, or (B, 3, H, W) tensor / (B, H, W, 3) array in [0, 1]; tokens: per scale
    (B, pn_k²) LongTensors; kv_cache_bytes: live K/V bytes at the end of sampling (0 without cache)."""

    images: list | Tensor | np.ndarray | None
    tokens: list
    kv_cache_bytes: int = 0


class VARPipeline(DiffusionPipeline):
    """tokenizer (`vqvae`) + next-scale transformer (+ text encoder for `TextVAR`).

    pipe([3, 17], guidance_scale=4, top_k=900, top_p=0.95, generator=torch.Generator().manual_seed(0))
    pipe(["a red star", "a big blue circle"], ...)    # text models
    """

    model_cpu_offload_seq = "text_encoder->transformer->vqvae"

    def __init__(self, transformer: VAR | TextVAR, vqvae: MultiScaleVQVAE, text_encoder: ShapesCLIP | None = None):
        super().__init__()
        if isinstance(transformer, TextVAR) and text_encoder is None:
            raise ValueError("a TextVAR needs a text_encoder (e.g. shapes.clip.ShapesCLIP)")
        if isinstance(transformer, VAR) and text_encoder is not None:
            raise ValueError("a class-conditional VAR takes no text_encoder")
        self.register_modules(transformer=transformer, vqvae=vqvae, text_encoder=text_encoder)
        self.text_encoder_folder: Path | None = None

    @property
    def task(self) -> str:
        return "text" if isinstance(self.transformer, TextVAR) else "class"

    # --- conditions
    def conditions(self, prompts: Sequence, num_images_per_prompt: int = 1) -> tuple[tuple, tuple]:
        """(cond, null) as the transformer's condition() outputs for the prompts and for the null prompt."""
        device = self._execution_device
        if self.task == "class":
            n = self.transformer.config.num_classes
            if not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in prompts):
                raise ValueError(f"a class-conditional VAR takes class ids, got {list(prompts)[:4]}")
            bad = [int(p) for p in prompts if not 0 <= int(p) < n]
            if bad:
                raise ValueError(f"class ids must be in [0, {n}); got {bad}")
            labels = torch.tensor([int(p) for p in prompts], device=device).repeat_interleave(num_images_per_prompt)
            return (self.transformer.condition(labels),
                    self.transformer.condition(torch.full_like(labels, self.transformer.null_class_id)))
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"a text-conditional VAR takes strings, got {list(prompts)[:4]}")
        texts = [p for p in prompts for _ in range(num_images_per_prompt)]
        # One encoder call for prompts and the empty (null) prompt, so both have the same token count.
        tok, mask = self.text_encoder.encode_text_tokens(texts + [""])
        dtype = self.transformer.dtype
        tok, mask = tok.to(device, dtype), mask.to(device)
        n = len(texts)
        null_tok, null_mask = tok[n:].expand(n, -1, -1), mask[n:].expand(n, -1)
        return self.transformer.condition(tok[:n], mask[:n]), self.transformer.condition(null_tok, null_mask)

    @torch.no_grad()
    def preview(self, f_hat: Tensor) -> list[PIL.Image.Image]:
        """Images of the current f̂ (what the callback shows after each scale)."""
        return self._to_output(self.vqvae.fhat_to_img(f_hat), "pil")

    @staticmethod
    def _to_output(x_B3HW: Tensor, output_type: str):
        x = (x_B3HW.float() + 1) / 2
        if output_type == "pt":
            return x.clamp(0, 1)
        arr = x.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return arr
        return [PIL.Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]

    @torch.no_grad()
    def __call__(self, prompts, *, guidance_scale: float = DEFAULT_SAMPLING["guidance_scale"],
                 top_k: int = DEFAULT_SAMPLING["top_k"], top_p: float = DEFAULT_SAMPLING["top_p"],
                 generator: torch.Generator | None = None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", callback: ScaleCallback | None = None, use_cache: bool = True,
                 cache_dtype: torch.dtype | None = None, cache_policy: CachePolicy | None = None,
                 cuda_graphs: bool = False, decode_batch: int | None = 16, **unused) -> VAROutput:
        """Sample `num_images_per_prompt` images per prompt (class ids, or strings for text models).
        `num_inference_steps` (a diffusion setting, passed by shared evaluation code) is ignored: VAR has one step
        per scale. Unknown keyword arguments raise.

        `cuda_graphs`: replay the transformer as one CUDA graph per scale (vlm.var_graphs; recorded on the first
        call for this many rows, then reused: it keeps a full KV cache for that batch between calls).
        `decode_batch`: images decoded to pixels at a time (bounds the decoder's activation memory; None: all)."""
        unused.pop("num_inference_steps", None)
        if unused:
            raise TypeError(f"unknown arguments: {sorted(unused)}")
        if isinstance(prompts, (str, int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: give at least one class id or text")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if top_k < 0 or not 0 <= top_p <= 1 or guidance_scale < 0 or num_images_per_prompt < 1:
            raise ValueError(f"need top_k >= 0, 0 <= top_p <= 1, guidance_scale >= 0, num_images_per_prompt >= 1; "
                             f"got {top_k}, {top_p}, {guidance_scale}, {num_images_per_prompt}")
        if decode_batch is not None and decode_batch < 1:
            raise ValueError(f"decode_batch must be >= 1 or None, got {decode_batch}")
        cond, null = self.conditions(prompts, num_images_per_prompt)
        null = null if guidance_scale else None
        graphs = self._scale_graphs(cond, null, cache_dtype) if cuda_graphs else None
        tokens, f_hat, cache = sample_tokens(self.transformer, self.vqvae, cond, null,
                                             guidance_scale=guidance_scale, top_k=top_k, top_p=top_p,
                                             generator=generator, use_cache=use_cache, cache_dtype=cache_dtype,
                                             cache_policy=cache_policy, callback=callback, graphs=graphs)
        images = None if output_type == "tokens" else self._to_output(
            self.vqvae.fhat_to_img(f_hat, batch_chunk=decode_batch), output_type)
        return VAROutput(images=images, tokens=tokens, kv_cache_bytes=cache.nbytes() if cache is not None else 0)

    def _scale_graphs(self, cond: tuple, null: tuple | None, cache_dtype) -> ScaleGraphs:
        """The pipeline's ScaleGraphs for this batch (one kept: a new batch size or text length replaces it)."""
        rows = cond[0].shape[0] * (2 if null is not None else 1)
        ctx = cond[1]  # what sample_tokens will hand the graphs: [cond; null] rows with guidance
        if ctx is not None and null is not None:
            ctx = tuple(torch.cat(pair) for pair in zip(ctx, null[1]))
        g = getattr(self, "_graphs", None)
        stale_dtype = cache_dtype is not None and g is not None and g.cache.layers[0].k_buf.dtype != cache_dtype
        if g is None or stale_dtype or not g.matches(rows, ctx):
            self._graphs = None  # free the old cache and graphs before building new ones
            g = self._graphs = ScaleGraphs(self.transformer, rows, cache_dtype=cache_dtype, capture=True)
        return g

    # --- folders
    def save_pretrained(self, folder: str | Path, text_encoder_folder: str | Path | None = None,
                        dtype: torch.dtype | None = None, tokenizer_folder: str | Path | None = None,
                        id2label: dict[int, str] | None = None, int8: bool = False, **_) -> None:
        """Write tokenizer/ and transformer/ (safetensors; `dtype` e.g. torch.float16 to ship; `int8`: the
        transformer's linear weights as int8 with per-row scales, `dit.int8_weights`) and model_index.json;
        a text model references its text encoder's folder (`text_encoder_folder`, else the one it was loaded
        from). With `tokenizer_folder` (a saved MultiScaleVQVAE folder) the tokenizer is referenced instead of
        copied, so that shipped class and text models share one tokenizer. `id2label`: a class model's names."""
        folder = Path(folder)
        folders = {"transformer": "transformer", "vqvae": "tokenizer"}
        if tokenizer_folder is not None:
            if not (Path(tokenizer_folder) / "config.json").is_file():
                raise ValueError(f"tokenizer_folder {tokenizer_folder} holds no saved tokenizer (config.json)")
            folders["vqvae"] = Path(os.path.relpath(Path(tokenizer_folder).resolve(), folder.resolve())).as_posix()
        index = {"_class_name": type(self).__name__, "_diffusers_version": diffusers.__version__,
                 "transformer": ["vlm.var", type(self.transformer).__name__],
                 "vqvae": ["vlm.vqvae", type(self.vqvae).__name__]}
        if self.task == "text":
            source = text_encoder_folder or self.text_encoder_folder
            if source is None or not Path(source).is_dir():
                raise ValueError(f"no text encoder folder to reference ({source}): pass text_encoder_folder=")
            index["text_encoder"] = ["shapes.clip", type(self.text_encoder).__name__]
            folders["text_encoder"] = Path(os.path.relpath(Path(source).resolve(),
                                                            folder.resolve())).as_posix()
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("transformer",) + (("vqvae",) if tokenizer_folder is None else ()):
            model = getattr(self, name)
            if name == "transformer" and int8:
                save_int8(model, folder / folders[name])
                continue
            orig = model.dtype
            model.to(dtype or orig).save_pretrained(folder / folders[name])
            model.to(orig)
        index["component_folders"] = folders
        if id2label is not None:  # class names, where diffusers' DiTPipeline keeps them (generate --label NAME)
            index["id2label"] = {str(k): v for k, v in sorted(id2label.items())}
        (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype | None = None, **_) -> "VARPipeline":
        folder = Path(folder)
        index_path = folder / MODEL_INDEX
        if not index_path.is_file():
            raise ValueError(f"{folder} is not a saved VAR pipeline: no {MODEL_INDEX}")
        index = json.loads(index_path.read_text())
        if index.get("_class_name") != cls.__name__:
            raise ValueError(f"{index_path} describes a {index.get('_class_name')!r}, not a {cls.__name__}")
        name = index.get("transformer", [None, None])[1]
        if name not in TRANSFORMERS:
            raise ValueError(f"{index_path}: unknown transformer {name!r}; valid: {', '.join(TRANSFORMERS)}")
        folders = {k: (folder / v).resolve() for k, v in index.get("component_folders", {}).items()}
        for k in ("transformer", "vqvae") + (("text_encoder",) if name == "TextVAR" else ()):
            if k not in folders or not folders[k].is_dir():
                raise ValueError(f"{index_path}: component folder for {k} missing ({folders.get(k)})")
        text_encoder = None
        if name == "TextVAR":
            enc = index.get("text_encoder", [None, None])[1]
            if enc not in TEXT_ENCODERS:
                raise ValueError(f"{index_path}: unknown text encoder {enc!r}; valid: {', '.join(TEXT_ENCODERS)}")
            text_encoder = TEXT_ENCODERS[enc].from_pretrained(folders["text_encoder"]).eval()
        pipe = cls(transformer=TRANSFORMERS[name].from_pretrained(folders["transformer"],
                                                                  torch_dtype=torch.float32).eval(),
                   vqvae=MultiScaleVQVAE.from_pretrained(folders["vqvae"], torch_dtype=torch.float32).eval(),
                   text_encoder=text_encoder)
        pipe.text_encoder_folder = folders.get("text_encoder")
        if (pipe.transformer.patch_nums != pipe.vqvae.patch_nums
                or pipe.transformer.config.vocab_size != pipe.vqvae.config.vocab_size):
            raise ValueError(f"{folder}: transformer and tokenizer do not match (patch_nums "
                             f"{pipe.transformer.patch_nums} vs {pipe.vqvae.patch_nums}, vocabulary "
                             f"{pipe.transformer.config.vocab_size} vs {pipe.vqvae.config.vocab_size})")
        return pipe.to(dtype=torch_dtype) if torch_dtype is not None else pipe


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate_var(pipe: VARPipeline, n: int = 192, seed: int = 0, batch_size: int = 64, **sampling) -> dict:
    """The shapes-world prompt accuracy of a VAR pipeline, with dit/evaluation.py's prompts: class ids spread over
    the 48 classes, or one-object and two-object captions; batch i's generator seeded with seed + i."""
    from dit.evaluation import caption_prompts, class_prompts
    from shapes.metrics import prompt_accuracy

    settings = {**DEFAULT_SAMPLING, **sampling}
    t0 = time.perf_counter()

    def generate(prompts):
        out = []
        for i, start in enumerate(range(0, len(prompts), batch_size)):
            g = torch.Generator(pipe._execution_device).manual_seed(seed + i)
            x = pipe(prompts[start:start + batch_size], generator=g, output_type="pt", **settings).images
            out.append((x * 255).round().to(torch.uint8).cpu())
        return torch.cat(out)

    if pipe.task == "class":
        labels = class_prompts(n, seed)
        m = prompt_accuracy(generate(labels), labels)
        metrics = {"prompt_accuracy": m["accuracy"], "shape": m["shape"], "colour": m["colour"], "count": m["count"]}
    else:
        metrics = {}
        for objects, name in ((1, "one_object"), (2, "two_object")):
            caps = caption_prompts(n, objects, seed)
            m = prompt_accuracy(generate(caps), caps)
            metrics.update({f"{name}_accuracy": m["accuracy"], f"{name}_shape": m["shape"],
                            f"{name}_colour": m["colour"], f"{name}_count": m["count"]})
    return {**metrics, **settings, "n": n, "seed": seed, "eval_seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def evaluate_tokenizer(vq: MultiScaleVQVAE, n: int = 256, seed: int = 2024, batch_size: int = 64) -> dict:
    """Held-out round trip on captioned scenes (1-3 objects): PSNR (dB, uint8 images) of the full token pyramid
    and of each partial sum f̂_{≤k}, the analyser's agreement on the reconstructions, and code usage per scale."""
    from shapes.data import eval_set
    from shapes.metrics import analyser_agreement, psnr
    from shapes.render import to_float, to_uint8

    ref = eval_set("caption", n, seed, size=vq.config.sample_size)
    images = ref["image"]
    K = len(vq.patch_nums)
    recs = [[] for _ in range(K)]
    device = vq.device
    for i in range(0, n, batch_size):
        x = to_float(images[i:i + batch_size]).to(device, vq.dtype)
        tokens = vq.encode_indices(x)
        for k in range(K):
            recs[k].append(to_uint8(vq.decode_indices(tokens, upto=k + 1).float()).cpu())
    recs = [torch.cat(r) for r in recs]
    metrics = {"psnr_db": psnr(recs[-1], images, data_range=255.0),
               "analyser_agreement": analyser_agreement(recs[-1], ref["scenes"])["accuracy"]}
    for k, pn in enumerate(vq.patch_nums[:-1]):
        metrics[f"psnr_db_upto_{pn}x{pn}"] = psnr(recs[k], images, data_range=255.0)
    metrics["vocab_usage_pct"] = [round(u, 1) for u in vq.quantize.vocab_usage()]
    return metrics
