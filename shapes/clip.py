"""The tiny shapes CLIP: open_clip's own `CLIP` model code with a small custom config (both towers), a
word-level tokenizer trained with the `tokenizers` library on the shapes vocabulary, and save/load as a
diffusers-style folder (config.json + model.safetensors + tokenizer files + README model card).

Its text tower is the text encoder of the text→image/video models (`encode_text_tokens`: per-token
features and a padding mask); its image tower is the vision encoder of the vision-language models
(`image_patch_features`: penultimate-layer patch features, CLS dropped, as LLaVA takes them) and the
feature extractor of the Fréchet distance (`encode_image`).

Why not open_clip's BPE tokenizer: its 49,408-entry vocabulary alone would be a 49,408 × width embedding
table, several MB — over this model's whole weight budget — for a world whose captions use ~100 words.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import load_file, save_file

from .data import eval_set, make_batch
from .render import to_float
from .scene import CLASS_NAMES, COLOURS, SHAPES

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[SOT]", "[EOT]"]
PAD_ID, UNK_ID, SOT_ID, EOT_ID = range(4)

# CLIP's usual pixel normalisation is for photographs; the shapes world is flat colours, so images go in as
# [-1, 1] (the same range the VAE and the diffusion models use) and the model learns its own first layer.


@dataclass
class ShapesCLIPConfig:
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 96
    vision_layers: int = 4
    vision_head_width: int = 32
    text_width: int = 96
    text_layers: int = 4
    text_heads: int = 3
    context_length: int = 32
    vocab_size: int = 128
    embed_dim: int = 96
    extra: dict = field(default_factory=dict)

    def vision_cfg(self) -> CLIPVisionCfg:
        return CLIPVisionCfg(layers=self.vision_layers, width=self.vision_width, head_width=self.vision_head_width,
                             patch_size=self.patch_size, image_size=self.image_size)

    def text_cfg(self) -> CLIPTextCfg:
        return CLIPTextCfg(context_length=self.context_length, vocab_size=self.vocab_size, width=self.text_width,
                           heads=self.text_heads, layers=self.text_layers, pad_id=PAD_ID, eos_id=EOT_ID,
                           pool_type="eos")


def train_tokenizer(texts, vocab_size: int = 128):
    """A word-level `tokenizers` tokenizer over `texts`, wrapped as a transformers fast tokenizer that adds
    [SOT] ... [EOT] and pads with [PAD] = 0. Words beyond `vocab_size` map to [UNK]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(single="[SOT] $A [EOT]", special_tokens=[
        ("[SOT]", SOT_ID), ("[EOT]", EOT_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[SOT]", eos_token="[EOT]")


def vocabulary_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Texts covering the shapes grammar's vocabulary: paraphrased captions of stills and videos, questions and
    answers, and the class prompts."""
    texts = list(class_prompts())
    for kind in ("caption", "video", "vqa"):
        batch = make_batch(kind, seed, n, size=32)
        texts += batch["caption"] + batch["canonical"] + batch.get("question", []) + batch.get("answer", [])
    return texts


class ShapesCLIP(torch.nn.Module):
    """open_clip `CLIP` plus its tokenizer. `model` is the unmodified open_clip module."""

    def __init__(self, config: ShapesCLIPConfig, tokenizer):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.model = CLIP(config.embed_dim, config.vision_cfg(), config.text_cfg())

    # ----- text -----
    def tokenize(self, texts: list[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ids = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.config.context_length, return_tensors="pt").input_ids
        # Truncation can cut the [EOT]; the pooled feature is read at [EOT], so put it back in the last slot.
        cut = (ids == EOT_ID).sum(-1) == 0
        ids[cut, -1] = EOT_ID
        return ids.to(self.device)

    def encode_text(self, texts, normalize: bool = True) -> torch.Tensor:
        ids = texts if torch.is_tensor(texts) else self.tokenize(texts)
        return self.model.encode_text(ids, normalize=normalize)

    def encode_text_tokens(self, texts) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token features after the final LayerNorm, (B, L, text_width), and the keep mask (B, L):
        what a text-conditional generator cross-attends to."""
        ids = texts if torch.is_tensor(texts) else self.tokenize(texts)
        m = self.model
        x = m.token_embedding(ids) + m.positional_embedding
        x = m.transformer(x, attn_mask=m.attn_mask)
        return m.ln_final(x), ids != PAD_ID

    # ----- image -----
    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) uint8, or float in [-1,1] -> float (B,3,S,S) in [-1,1] at the tower's size."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) uint8 or float in [-1, 1]; got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            images = to_float(images)
        size = self.config.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return images.to(self.device, self.dtype)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_image(self._prepare(images), normalize=normalize)

    def feature_blocks(self, layer: int = -2) -> list:
        """The image resblocks whose output is hidden state `layer` (LLaVA's hidden_states index when negative: -2
        is the first 3 of 4 blocks; the block index when >= 0)."""
        blocks = list(self.model.visual.transformer.resblocks)
        return blocks[: len(blocks) + layer + 1 if layer < 0 else layer + 1]

    def image_patch_features(self, images: torch.Tensor, layer: int = -2) -> torch.Tensor:
        """Patch features of resblock `layer` (default the penultimate), CLS dropped: (B, patches, width)."""
        x = self.model.visual._embeds(self._prepare(images))
        for blk in self.feature_blocks(layer):
            x = blk(x)
        return x[:, 1:]

    # ----- io -----
    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.logit_scale.dtype

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype = torch.float16) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {"_class_name": "ShapesCLIP", "ditstudio_task": "clip", **asdict(self.config)}
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, folder / "model.safetensors")
        self.tokenizer.save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> "ShapesCLIP":
        from transformers import PreTrainedTokenizerFast

        folder = Path(folder)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not a shapes CLIP folder: {name} is missing")
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.pop("_class_name", None) != "ShapesCLIP":
            raise ValueError(f"{folder}/config.json does not describe a ShapesCLIP")
        cfg.pop("ditstudio_task", None)
        model = cls(ShapesCLIPConfig(**cfg), PreTrainedTokenizerFast.from_pretrained(folder))
        state = load_file(folder / "model.safetensors")
        missing, unexpected = model.model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder}/model.safetensors does not match its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return model.to(device=device, dtype=dtype).eval()


# ----- evaluation -----
def class_prompts() -> list[str]:
    """The zero-shot prompt of each (shape, colour) class, in class-id order."""
    return [f"a {name}" for name in CLASS_NAMES]


@torch.no_grad()
def _features(fn, items, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([fn(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]).float()


@torch.no_grad()
def evaluate_clip(clip: ShapesCLIP, n: int = 1024, seed: int = 0) -> dict:
    """Held-out metrics on fixed seeded sets:
    - zero_shot_accuracy: single-object images classified among the 48 "a {colour} {shape}" prompts
      (also per attribute: shape_accuracy, colour_accuracy);
    - retrieval_top1_256: each canonical caption retrieves its image among 256 scenes of 1-3 objects, averaged
      over n // 256 groups (and image→caption the other way)."""
    single = eval_set("class", n, seed)
    text = clip.encode_text(class_prompts())
    img = _features(clip.encode_image, single["image"])
    pred = (img @ text.T).argmax(-1).cpu()
    label = single["label"]
    n_colours = len(COLOURS)
    metrics = {
        "zero_shot_accuracy": (pred == label).float().mean().item(),
        "shape_accuracy": (pred // n_colours == label // n_colours).float().mean().item(),
        "colour_accuracy": (pred % n_colours == label % n_colours).float().mean().item(),
    }
    groups = max(1, n // 256)
    scenes = eval_set("caption", 256 * groups, seed)
    img = _features(clip.encode_image, scenes["image"])
    txt = _features(clip.encode_text, scenes["canonical"])
    t2i = i2t = 0.0
    for g in range(groups):
        sl = slice(256 * g, 256 * (g + 1))
        sim = txt[sl] @ img[sl].T
        target = torch.arange(sim.shape[0], device=sim.device)
        t2i += (sim.argmax(1) == target).float().mean().item() / groups
        i2t += (sim.argmax(0) == target).float().mean().item() / groups
    metrics.update(retrieval_top1_256=t2i, image_to_text_top1_256=i2t, n=n, shapes=len(SHAPES))
    return metrics


# ----- Fréchet distance on the image tower's features (the shapes world's FID) -----
FID_KINDS = ("class", "caption")  # which real-image distribution a reference describes
FID_REFERENCE_N = 10_000
FID_REFERENCE_SEED = 4242  # kept apart from evaluation seeds


def fid_feature_fn(clip: ShapesCLIP):
    """uint8 (B, 3, H, W) images -> (B, embed_dim) unnormalised image embeddings."""
    return lambda images: clip.encode_image(images, normalize=False).float().cpu()


def fid_stats_path(folder: str | Path, kind: str) -> Path:
    if kind not in FID_KINDS:
        raise ValueError(f"unknown Fréchet reference {kind!r}; shipped: {FID_KINDS}")
    return Path(folder) / f"fid_stats_{kind}_64px.npz"


def compute_reference_stats(clip: ShapesCLIP, folder: str | Path, n: int = FID_REFERENCE_N) -> None:
    """Mean and covariance of the image features of `n` rendered 64 px scenes per kind, saved beside the CLIP."""
    from .metrics import feature_stats, image_features, save_stats

    for kind in FID_KINDS:
        images = eval_set(kind, n, FID_REFERENCE_SEED)["image"]
        save_stats(fid_stats_path(folder, kind), *feature_stats(image_features(images, fid_feature_fn(clip))))


def frechet_to_reference(clip: ShapesCLIP, folder: str | Path, images: torch.Tensor, kind: str = "caption") -> float:
    """Fréchet distance between `images` ((B, 3, H, W) uint8 or float in [-1, 1]) and the shipped reference
    statistics of real scenes of `kind`. Use thousands of images: the estimate is biased upwards at small B."""
    from .metrics import frechet_distance_images, load_stats

    path = fid_stats_path(folder, kind)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: compute it with shapes.clip.compute_reference_stats")
    return frechet_distance_images(images, load_stats(path), fid_feature_fn(clip))
