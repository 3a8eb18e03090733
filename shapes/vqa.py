"""Visual questions with one-word answers, and a short description task.

Question kinds: ``colour``, ``shape``, ``count``, ``position``, ``existence``, ``size`` (one-word answers) and
``describe`` (answer: the canonical caption, scored by parsing it). Questions are only asked when their answer
is unambiguous in the scene (e.g. "what colour is the star?" only with exactly one star). Positions are the
3x3 cells, answered with one hyphenated word: top-left, top, top-right, left, centre, right, bottom-left,
bottom, bottom-right. Counts are number words (zero, one, two, ...).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from .scene import COLOURS, SHAPES, Scene
from .text import NUMBER_WORDS, PLURALS, _cell_from_words, caption, position_phrase

QUESTION_KINDS = ("colour", "shape", "count", "position", "existence", "size", "describe")
SHORT_KINDS = QUESTION_KINDS[:-1]


@dataclass
class QA:
    question: str
    answer: str
    kind: str


def _unique(objs, key):
    c = Counter(key(o) for o in objs)
    return [o for o in objs if c[key(o)] == 1]


def _candidates(scene: Scene, kind: str, rng) -> list[QA]:
    objs = scene.objects
    out: list[QA] = []
    if kind == "colour":
        for o in _unique(objs, lambda o: o.shape):
            out.append(QA(f"what colour is the {o.shape}?", o.colour, kind))
        for o in _unique(objs, lambda o: o.cell):
            out.append(QA(f"what colour is the shape {position_phrase(o.cell, rng)}?", o.colour, kind))
    elif kind == "shape":
        for o in _unique(objs, lambda o: o.colour):
            out.append(QA(f"what shape is the {o.colour} object?", o.shape, kind))
        for o in _unique(objs, lambda o: o.cell):
            out.append(QA(f"what shape is {position_phrase(o.cell, rng)}?", o.shape, kind))
    elif kind == "count":
        out.append(QA("how many shapes are there?", NUMBER_WORDS[len(objs)], kind))
        c = COLOURS[int(rng.integers(len(COLOURS)))]
        out.append(QA(f"how many {c} shapes are there?", NUMBER_WORDS[sum(o.colour == c for o in objs)], kind))
        s = SHAPES[int(rng.integers(len(SHAPES)))]
        out.append(QA(f"how many {PLURALS[s]} are there?", NUMBER_WORDS[sum(o.shape == s for o in objs)], kind))
    elif kind == "position":
        for o in _unique(objs, lambda o: (o.colour, o.shape)):
            out.append(QA(f"where is the {o.colour} {o.shape}?", o.cell, kind))
    elif kind == "existence":
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5 and objs:
            o = objs[int(rng.integers(len(objs)))]
            out.append(QA(f"is there a {o.colour} {o.shape}?", "yes", kind))
        else:
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
            c, s = absent[int(rng.integers(len(absent)))]
            out.append(QA(f"is there a {c} {s}?", "no", kind))
    elif kind == "size":
        for o in _unique(objs, lambda o: (o.colour, o.shape)):
            if o.size in ("small", "large"):
                out.append(QA(f"is the {o.colour} {o.shape} small or large?", o.size, kind))
    elif kind == "describe":
        q = ("describe the image.", "what is in the picture?", "describe the scene briefly.")
        out.append(QA(q[int(rng.integers(len(q)))], caption(scene), kind))
    else:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")
    return out


def make_question(scene: Scene, rng, kinds=SHORT_KINDS) -> QA:
    """One random question about ``scene`` of a kind drawn uniformly from ``kinds`` among those that have an
    unambiguous question here (count and existence always have one)."""
    kinds = list(kinds)
    order = rng.permutation(len(kinds))
    for i in order:
        cands = _candidates(scene, kinds[i], rng)
        if cands:
            return cands[int(rng.integers(len(cands)))]
    return _candidates(scene, "count", rng)[0]


def make_questions(scene: Scene, rng, kinds=QUESTION_KINDS) -> list[QA]:
    """All unambiguous questions of the given kinds about a scene (one random draw per template slot)."""
    return [qa for k in kinds for qa in _candidates(scene, k, rng)]


_SYNONYMS = {
    "center": "centre",
    "middle": "centre",
    "gray": "grey",
    "violet": "purple",
    "big": "large",
    "little": "small",
    "disc": "circle",
    **{str(i): w for i, w in enumerate(NUMBER_WORDS)},
}


_FILLER = {"a", "an", "the", "in", "at", "on", "corner", "side", "of", "it", "is"}
_POSITION_WORDS = {"top", "upper", "bottom", "lower", "left", "right", "centre"}


def normalise_answer(ans: str) -> str:
    """Lowercase, strip punctuation and articles, map synonyms and digits ("2" -> "two"), and join positions
    with hyphens ("top left" -> "top-left")."""
    a = ans.strip().lower()
    a = re.sub(r"[^\w\s-]", " ", a)
    words = [_SYNONYMS.get(w, w) for w in a.replace("-", " ").split() if w not in _FILLER]
    if words and all(w in _POSITION_WORDS for w in words):
        return _cell_from_words(words)
    return " ".join(words)


def exact_match(prediction: str, answer: str) -> bool:
    return normalise_answer(prediction) == normalise_answer(answer)


__all__ = ["QA", "QUESTION_KINDS", "SHORT_KINDS", "make_question", "make_questions", "normalise_answer", "exact_match"]

