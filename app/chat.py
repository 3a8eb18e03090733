"""`ditstudio chat --model shapes-llava --image PATH --question TEXT`: ask a vision-language model about an image,
the answer streaming to stdout; and the web UI's Chat tab (`build_chat_tab`), whose handler is one call into the
same `chat` function.

`chat(model, image, question, ...)` is the one entry: the model is a shipped name or a LLaVA folder
(`vlm.llava.LlavaVLM.from_pretrained`, cached per folder), the image a path, a PIL image, an (H, W, 3) uint8 array
or a (3, H, W) uint8 tensor. Short questions get LLaVA-1.5's "Answer the question using a single word or phrase."
instruction; questions asking for a description ("describe ...", "what is in the picture?") do not, as in
training (`short_answer=None`; pass True / False to choose). Greedy at temperature 0, else nucleus sampling
seeded by `seed`. Tokens stream to `stream(text_so_far)` as they are generated.
"""
from __future__ import annotations

import functools
import re
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import PIL.Image
import torch

from app.catalog import resolve_model

DEFAULT_MODEL = "shapes-llava"
MAX_NEW_TOKENS = 256
_DESCRIBE = re.compile(r"\b(describe|description)\b|what is in (the|this) (picture|image|scene)")


@functools.lru_cache(maxsize=4)
def _load(folder: str, device: str):
    from vlm.llava import LlavaVLM

    return LlavaVLM.from_pretrained(folder, device=device)


def load_chat_model(model, device: str = "cpu"):
    """A LlavaVLM from a shipped model's name or a folder (or a LlavaVLM passed through)."""
    if hasattr(model, "model") and hasattr(model, "vision_tower"):
        return model
    if not isinstance(model, (str, Path)) or not str(model).strip():
        raise ValueError(f"model must be a model name or folder; got {model!r}")
    folder = resolve_model(str(model))
    cfg = folder / "config.json"
    if not cfg.is_file() or '"LlavaModel"' not in cfg.read_text():
        raise ValueError(f"{model!r} ({folder}) is not a vision-language (LLaVA) model folder")
    return _load(str(folder.resolve()), device)


def read_image(image) -> torch.Tensor:
    """A path / PIL image / (H, W, 3) uint8 array / (3, H, W) uint8 tensor -> (1, 3, H, W) uint8."""
    if image is None or (isinstance(image, str) and not image.strip()):
        raise ValueError("no image: give an image (a path, a PIL image or an array)")
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        try:
            with PIL.Image.open(path) as im:
                image = im.convert("RGB")
        except PIL.UnidentifiedImageError as exc:
            raise ValueError(f"{path} is not a readable image") from exc
    if isinstance(image, PIL.Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(f"image arrays must be (H, W, 3) uint8; got {image.shape} {image.dtype}")
        image = torch.from_numpy(np.array(image[..., :3])).permute(2, 0, 1)  # a copy: PIL arrays are read-only
    if not torch.is_tensor(image) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a path, a PIL image, an (H, W, 3) uint8 array or a (3, H, W) uint8 tensor; "
                         f"got {type(image).__name__}")
    return image[None]


def is_description_request(question: str) -> bool:
    return bool(_DESCRIBE.search(question.lower()))


def check_settings(max_new_tokens, temperature, top_p, seed) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}; got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 5:
        raise ValueError(f"temperature must be a number in [0, 5]; got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")


def chat_stream(model, image, question: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                top_p: float = 1.0, seed: int | None = None, short_answer: bool | None = None,
                device: str = "cpu") -> Iterator[str]:
    """Yields the answer so far after every generated token (the last yield is the answer)."""
    from vlm.generate import stream_answers

    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty: ask something about the image")
    check_settings(max_new_tokens, temperature, top_p, seed)
    img = read_image(image)
    vlm = load_chat_model(model, device)
    short = not is_description_request(question) if short_answer is None else short_answer
    for texts in stream_answers(vlm, img, [question.strip()], short_answer=short, max_new_tokens=max_new_tokens,
                                temperature=float(temperature), top_p=float(top_p), seed=seed):
        yield texts[0]


def chat(model, image, question: str, *, stream: Callable[[str], None] | None = None, max_new_tokens: int = 64,
         temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, short_answer: bool | None = None,
         device: str = "cpu") -> str:
    """The answer to `question` about `image`; `stream(text_so_far)` after every token."""
    text = ""
    for text in chat_stream(model, image, question, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, seed=seed, short_answer=short_answer, device=device):
        if stream is not None:
            stream(text)
    return text


# ----------------------------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="ask a vision-language model about an image (the answer streams)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a shipped VLM's name or a LLaVA folder ({DEFAULT_MODEL})")
    p.add_argument("--image", required=True, help="the image file")
    p.add_argument("--question", required=True, help="the question")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args) -> int:
    printed = ""

    def stream(text: str) -> None:
        nonlocal printed
        # Word-level decoding can re-space earlier text (punctuation); print only what extends the output.
        new = text[len(printed):] if text.startswith(printed) else "\n" + text
        sys.stdout.write(new)
        sys.stdout.flush()
        printed = text

    chat(args.model, args.image, args.question, stream=stream, max_new_tokens=args.max_new_tokens,
         temperature=args.temperature, top_p=args.top_p, seed=args.seed, device=args.device)
    sys.stdout.write("\n")
    return 0


# ----------------------------------------------------------------------------------------------- UI
def chat_handler(model, image, question, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=0, device="cpu"):
    """The Chat tab's event handler (a generator): yields the answer as it streams in. Bad input -> gr.Error."""
    import gradio as gr

    try:
        if image is None:
            raise ValueError("upload an image first (or send one from a generation gallery)")
        seed = None if seed is None or seed == "" else int(seed)
        for text in chat_stream(model, image, question or "", max_new_tokens=int(max_new_tokens),
                                temperature=float(temperature), top_p=float(top_p), seed=seed, device=device):
            yield text
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise gr.Error(str(exc)) from exc


def build_chat_tab(models: list[str] | None = None, device: str | None = None):
    """The Chat tab's components, to be built inside `with gr.Tab("Chat"):`. Returns the components as a dict
    (the image box is `image`, so a generation gallery can send a picture to it)."""
    import gradio as gr

    from app.catalog import list_models

    if models is None:
        models = [m.name for m in list_models() if m.task == "vlm"]
    with gr.Row():
        with gr.Column(scale=2):
            model = gr.Dropdown(models, value=models[0] if models else None, label="model")
            image = gr.Image(label="image", type="pil", height=256)
            question = gr.Textbox(label="question", placeholder="what colour is the star?", lines=2)
            with gr.Row():
                max_new = gr.Slider(1, MAX_NEW_TOKENS, value=64, step=1, label="max new tokens")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p")
                seed = gr.Number(value=0, precision=0, label="seed")
            ask = gr.Button("Ask", variant="primary")
        with gr.Column(scale=3):
            answer = gr.Textbox(label="answer", lines=6, interactive=False)

    def handler(m, img, q, n, t, p, s):
        yield from chat_handler(m, img, q, n, t, p, s, device=device or "cpu")

    ev = ask.click(handler, [model, image, question, max_new, temperature, top_p, seed], answer, api_name="chat")
    question.submit(handler, [model, image, question, max_new, temperature, top_p, seed], answer, api_name=False)
    return {"model": model, "image": image, "question": question, "answer": answer, "ask": ask, "event": ev}


__all__ = ["build_chat_tab", "chat", "chat_handler", "chat_stream", "load_chat_model", "read_image"]
