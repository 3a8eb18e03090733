"""Tokenizers and the LLaVA-1.5 'v1' conversation template.

- Shapes models: a word-level tokenizer trained with the `tokenizers` library on the shapes captions, questions
  and answers plus the template's words, with the template's special tokens (<pad>, <unk>, <s>, </s>, <image>),
  saved beside the weights as tokenizer.json. Why word level: the shapes world has ~150 words, so its
  embedding table is tiny and every answer word is one token (hyphenated cells like "top-left" stay whole).
- Real checkpoints: the checkpoint folder's own tokenizer through transformers' AutoTokenizer.

Prompts hold the literal "<image>"; `encode_prompt` splits on it and inserts the model's image placeholder id
(LLaVA's `tokenizer_image_token`), so the same code serves the original layout (id -200, not in the vocabulary)
and llava-hf's (a real `<image>` token).
"""
from __future__ import annotations

import re
from pathlib import Path

IMAGE = "<image>"
# LLaVA v1 (conv_vicuna_v1): system + " " + "USER: <image>\n{q}" + " " + "ASSISTANT: {a}" + "</s>" (+ more turns).
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
SHAPES_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE]


def user_prompt(question: str, short_answer: bool) -> str:
    """The user turn of a visual question (LLaVA-1.5's VQA prompt adds the single-word instruction)."""
    return f"{IMAGE}\n{question}" + (VQA_SUFFIX if short_answer else "")


def prompt_v1(turns: list[tuple[str, str | None]], eos: str = "</s>") -> str:
    """The v1 template over (user, assistant) turns; a final assistant None leaves the prompt open for generation."""
    out = SYSTEM + " "
    for user, assistant in turns:
        out += f"USER: {user} ASSISTANT:"
        if assistant is not None:
            out += f" {assistant}{eos}"
    return out


def train_shapes_tokenizer(texts, vocab_size: int = 512):
    """A word-level PreTrainedTokenizerFast over `texts` + the template words, BOS <s> prepended."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # Words (hyphens kept inside them) and single punctuation marks.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex(r"[^\w\s-]"), behavior="isolated")])
    corpus = list(texts) + [SYSTEM, VQA_SUFFIX, "USER: ASSISTANT:"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SHAPES_SPECIALS))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=[IMAGE])


class VLMTokenizer:
    """A transformers tokenizer plus the LLaVA prompt rules: image placeholders, answer labels, stop tokens."""

    def __init__(self, tokenizer, image_token_id: int):
        self.tok = tokenizer
        self.image_token_id = image_token_id
        self.word_level = type(getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)).__name__ == "WordLevel"

    @classmethod
    def from_folder(cls, folder: str | Path, image_token_id: int) -> "VLMTokenizer":
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            raise FileNotFoundError(f"{folder} has no tokenizer (tokenizer.json / tokenizer.model)")
        return cls(AutoTokenizer.from_pretrained(str(folder)), image_token_id)

    def save_pretrained(self, folder) -> None:
        self.tok.save_pretrained(str(folder))

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def eos_id(self) -> int:
        return self.tok.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    def _ids(self, text: str, bos: bool) -> list[int]:
        return self.tok(text, add_special_tokens=bos).input_ids if text else (
            [self.tok.bos_token_id] if bos and self.tok.bos_token_id is not None else [])

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt with BOS; each "<image>" becomes the placeholder id."""
        chunks = text.split(IMAGE)
        ids = self._ids(chunks[0], bos=True)
        for chunk in chunks[1:]:
            ids += [self.image_token_id] + self._ids(chunk, bos=False)
        return ids

    def encode_conversation(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """(ids, labels) of a full conversation: labels are -100 except each assistant answer and its </s>."""
        from .llava import IGNORE_INDEX

        ids, labels, text = [], [], SYSTEM + " "
        for user, answer in turns:
            text += f"USER: {user} ASSISTANT:"
            part = self.encode_prompt(text) if not ids else self._encode_more(text)
            ids += part
            labels += [IGNORE_INDEX] * len(part)
            ans = self._ids(" " + answer, bos=False) + [self.eos_id]
            ids += ans
            labels += ans
            text = ""
        return ids, labels

    def _encode_more(self, text: str) -> list[int]:
        chunks = text.split(IMAGE)
        ids = self._ids(chunks[0], bos=False)
        for chunk in chunks[1:]:
            ids += [self.image_token_id] + self._ids(chunk, bos=False)
        return ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) >= 0]
        text = self.tok.decode(ids, skip_special_tokens=True)
        if self.word_level:  # word-level decoding joins every token with a space: undo it before punctuation
            text = re.sub(r" ([?.,!:;'])", r"\1", text)
        return text.strip()


__all__ = ["IMAGE", "SYSTEM", "VQA_SUFFIX", "VLMTokenizer", "prompt_v1", "train_shapes_tokenizer", "user_prompt"]
