"""Captions from a small grammar with paraphrases, and their parser (captions back to object specifications).

Grammar (square brackets optional, | alternatives)::

    caption   := [frame] objects [background]
    frame     := "two shapes:" | "there are two shapes:" | "a picture of" | "an image showing" | ...
    objects   := object ("," object)* "and" object          (or: object relation object ["and" object])
    object    := ("a" | "an") [size] colour shape [position] [motion]
    size      := small | little | large | big
    position  := "in the top left" | "at the top" | "on the left" | "in the centre" | "in the lower right corner" ...
    relation  := "above" | "below" | "to the left of" | "left of" | "to the right of" | "right of"
    motion    := "moving to the right" | "rising" | "bouncing" | "growing" | "turning blue" | ...

``parse_caption`` inverts it into a ``ParsedCaption``: one ``ParsedObject`` per object with the attributes the
caption states (None where it says nothing), relations between objects, and a stated count. Metrics check only
what the caption states.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np

from .scene import CELLS, COLOURS, SHAPES, Scene, SceneBatch, id_to_class

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
PLURALS = {s: (s + "es" if s.endswith(("s", "x", "ss")) else s + "s") for s in SHAPES}

# Position phrases per 3x3 cell; the first entry is the canonical one.
POSITION_PHRASES = {
    "top-left": ("in the top left", "at the top left", "in the upper left", "in the top left corner",
                 "in the upper left corner"),
    "top": ("at the top", "at the top centre", "in the top middle", "at the top in the middle"),
    "top-right": ("in the top right", "at the top right", "in the upper right", "in the top right corner",
                  "in the upper right corner"),
    "left": ("on the left", "on the left side", "in the middle left", "at the left"),
    "centre": ("in the centre", "in the middle", "at the centre", "in the center"),
    "right": ("on the right", "on the right side", "in the middle right", "at the right"),
    "bottom-left": ("in the bottom left", "at the bottom left", "in the lower left", "in the bottom left corner",
                    "in the lower left corner"),
    "bottom": ("at the bottom", "at the bottom centre", "in the bottom middle", "at the bottom in the middle"),
    "bottom-right": ("in the bottom right", "at the bottom right", "in the lower right", "in the bottom right corner",
                     "in the lower right corner"),
}  # fmt: skip
SIZE_WORDS = {"small": ("small", "small", "little"), "large": ("large", "large", "big"), "tiny": ("tiny",)}
MOTION_PHRASES = {
    "left": ("moving to the left", "moving left", "sliding to the left", "drifting left"),
    "right": ("moving to the right", "moving right", "sliding to the right", "drifting right"),
    "up": ("moving up", "moving upwards", "rising", "floating up"),
    "down": ("moving down", "moving downwards", "falling", "sinking"),
    "bounce": ("bouncing", "bouncing up and down", "hopping"),
    "grow": ("growing", "getting bigger", "expanding"),
    "shrink": ("shrinking", "getting smaller"),
    "recolour": ("turning {c2}", "changing colour to {c2}", "changing from {c1} to {c2}"),
}
RELATION_PHRASES = {
    "above": ("above",),
    "below": ("below", "under"),
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
}
FRAMES_MANY = (
    "{n} shapes: {x}", "there are {n} shapes: {x}", "a picture of {x}", "an image showing {x}", "{x}", "{x}", "{x}"
)
FRAMES_ONE = ("a picture of {x}", "an image showing {x}", "there is {x}", "{x}", "{x}", "{x}")
FRAMES_VIDEO = ("a video of {x}", "{x}", "{x}", "a clip showing {x}")
BACKGROUND_WORDS = {"flat": ("plain", "grey", "flat"), "gradient": ("gradient", "shaded"), "noise": ("noisy", "grainy")}


# ----------------------------------------------------------------------------------------------- parsed form
@dataclass
class ParsedObject:
    """What a caption says about one object; None = not stated."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    cell: str | None = None
    motion: str | None = None
    colour2: str | None = None


@dataclass
class ParsedCaption:
    """Objects in caption order, relations ``(i, rel, j)`` meaning object i is ``rel`` ("above", "below",
    "left", "right") of object j, and the stated number of shapes (None if not stated; else len(objects))."""

    objects: list[ParsedObject] = field(default_factory=list)
    relations: list[tuple[int, str, int]] = field(default_factory=list)
    count: int | None = None


# ----------------------------------------------------------------------------------------------- generation
def _pick(rng, options):
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(shape: str, colour: str | None, size: str | None = None, rng=None) -> str:
    """'a large red circle'; ``rng`` picks synonyms ("big", "little")."""
    words = []
    if size is not None:
        words.append(_pick(rng, SIZE_WORDS[size]))
    if colour is not None:
        words.append(colour)
    words.append(shape)
    return f"{_article(words[0])} {' '.join(words)}"


def position_phrase(cell: str, rng=None) -> str:
    return _pick(rng, POSITION_PHRASES[cell])


def motion_phrase(motion: str, colour: str, colour2: str | None, rng=None) -> str:
    return _pick(rng, MOTION_PHRASES[motion]).format(c1=colour, c2=colour2)


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def class_caption(class_id: int) -> str:
    """Caption of a class label, e.g. 'a red circle'."""
    shape, colour = id_to_class(class_id)
    return object_phrase(shape, colour)


def _relation(a, b) -> list[str]:
    """Relations that hold between objects a and b (by grid cell)."""
    ra, ca = divmod(CELLS.index(a.cell), 3)
    rb, cb = divmod(CELLS.index(b.cell), 3)
    out = []
    if ra < rb:
        out.append("above")
    if ra > rb:
        out.append("below")
    if ca < cb:
        out.append("left")
    if ca > cb:
        out.append("right")
    return out


def caption(scene: Scene, rng=None, relation_prob: float = 0.25, background_prob: float = 0.15) -> str:
    """Caption of a still scene. With ``rng=None`` the canonical caption ("a large red circle in the top left
    and a small blue star at the bottom"); with a Generator a random paraphrase (synonyms, frames such as
    "two shapes: ...", optionally a relation between two objects, optionally the background)."""
    objs = scene.objects
    if rng is None:
        return _join([f"{object_phrase(o.shape, o.colour, o.size)} {position_phrase(o.cell)}" for o in objs])
    keep_size = rng.random() < 0.8
    phrases = [object_phrase(o.shape, o.colour, o.size if keep_size else None, rng) for o in objs]
    rel = None
    if len(objs) >= 2 and rng.random() < relation_prob:
        i, j = (0, 1) if rng.random() < 0.5 else (1, 0)
        options = _relation(objs[i], objs[j])
        if options:
            rel = (i, _pick(rng, options), j)
    if rel is not None:
        i, r, j = rel
        body = f"{phrases[i]} {_pick(rng, RELATION_PHRASES[r])} {phrases[j]}"
        rest = [f"{phrases[k]} {position_phrase(objs[k].cell, rng)}" for k in range(len(objs)) if k not in (i, j)]
        text = _join([body] + rest)
    else:
        with_pos = rng.random() < 0.92
        text = _join([f"{p} {position_phrase(o.cell, rng)}" if with_pos else p for p, o in zip(phrases, objs)])
    frame = _pick(rng, FRAMES_MANY if len(objs) > 1 else FRAMES_ONE)
    text = frame.format(n=NUMBER_WORDS[len(objs)], x=text)
    if rng.random() < background_prob:
        kind = scene.background.kind
        text += f" on {_article(BACKGROUND_WORDS[kind][0])} {_pick(rng, BACKGROUND_WORDS[kind])} background"
    return text


# Share of a paraphrased video caption's objects whose starting position is stated ("... in the top left moving right").
VIDEO_POSITION_PROB = 0.3


def video_caption(scene: Scene, rng=None, position_prob: float = VIDEO_POSITION_PROB) -> str:
    """Caption of a video scene: every object with its motion ("a green square moving to the right and a
    small red star growing"). Sizes are left out for growing/shrinking objects; paraphrases add the starting
    position of each object with probability ``position_prob``."""
    parts = []
    for o in scene.objects:
        size = None if o.motion in ("grow", "shrink") else o.size
        if rng is not None and rng.random() < 0.3:
            size = None
        mp = motion_phrase(o.motion, o.colour, o.colour2, rng)
        colour = o.colour
        if o.motion == "recolour" and mp.startswith("changing from"):
            colour = None  # the motion phrase names it
        text = object_phrase(o.shape, colour, size, rng)
        if rng is not None and rng.random() < position_prob:
            text += " " + position_phrase(o.cell, rng)
        parts.append(f"{text} {mp}")
    text = _join(parts)
    return text if rng is None else _pick(rng, FRAMES_VIDEO).format(x=text)


# The motion a counterfactual caption states instead of the true one: the opposite where there is one (the hardest
# negative: the same words but one), else the closest other motion. A recolouring object keeps its motion and turns
# into another colour.
COUNTERFACTUAL_MOTION = {"left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink",
                         "shrink": "grow", "bounce": "down", "recolour": "recolour"}


def counterfactual_scene(scene: Scene) -> Scene:
    """The scene with every object's motion replaced by ``COUNTERFACTUAL_MOTION``'s (a recolouring object turns
    into the next colour that is neither its own nor the true one). Only the caption of it is used: it describes a
    video that differs from the rendered one in the motions alone."""
    objs = []
    for o in scene.objects:
        motion, colour2 = COUNTERFACTUAL_MOTION[o.motion], o.colour2
        if o.motion == "recolour":
            i = COLOURS.index(o.colour2)
            colour2 = next(c for c in (COLOURS[(i + k) % len(COLOURS)] for k in range(1, len(COLOURS)))
                           if c != o.colour)
        objs.append(replace(o, motion=motion, colour2=colour2))
    return replace(scene, objects=objs)


def counterfactual_video_caption(scene: Scene, rng=None, position_prob: float = VIDEO_POSITION_PROB) -> str:
    """``video_caption`` of ``counterfactual_scene(scene)``: the same objects (and, given a copy of the rng the true
    caption was drawn with, mostly the same wording) with other motions."""
    return video_caption(counterfactual_scene(scene), rng, position_prob)


def captions(batch: SceneBatch, rng=None, video: bool = False, **kw) -> list[str]:
    """Captions of every scene of a batch (canonical when ``rng`` is None)."""
    fn = video_caption if video else caption
    return [fn(batch[i], rng, **kw) for i in range(len(batch))]


# ----------------------------------------------------------------------------------------------- parsing
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{PLURALS[s]: s for s in SHAPES}, "disc": "circle", "discs": "circle"}
_PLURAL_WORDS = set(PLURALS.values()) | {"discs"}
_SIZE_LOOKUP = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
_COLOUR_ALIASES = {c: c for c in COLOURS} | {"violet": "purple", "gray": None}
_NUM_LOOKUP = {w: i for i, w in enumerate(NUMBER_WORDS)} | {str(i): i for i in range(11)}
_ALL_MOTION_WORDS = "moving|sliding|drifting|going|travelling|traveling|floating"
_SUBS = [
    (r"\bon (?:a|an) \w+ background\b", " "),
    (r"\bchanging (?:colou?r )?from (\w+) to (\w+)\b", r" __from_\1 __rec_\2 "),
    (r"\bchanging colou?r to (\w+)\b", r" __rec_\1 "),
    (r"\b(?:turning|becoming) (\w+)\b", r" __rec_\1 "),
    (r"\bbouncing up and down\b|\bbouncing\b|\bhopping\b", " __mot_bounce "),
    (rf"\b(?:{_ALL_MOTION_WORDS})(?: to(?:wards)? the| towards)? (left|right)\b", r" __mot_\1 "),
    (rf"\b(?:{_ALL_MOTION_WORDS}) (up|down)(?:wards)?\b", r" __mot_\1 "),
    (r"\brising\b", " __mot_up "),
    (r"\b(?:falling|sinking|dropping)\b", " __mot_down "),
    (r"\b(?:growing|getting bigger|expanding)\b", " __mot_grow "),
    (r"\b(?:shrinking|getting smaller)\b", " __mot_shrink "),
    (r"\b(?:to the )?left of\b", " __rel_left "),
    (r"\b(?:to the )?right of\b", " __rel_right "),
    (r"\babove\b", " __rel_above "),
    (r"\b(?:below|under|beneath)\b", " __rel_below "),
    (r"\b(\w+) (?:shapes|objects)\b", r" __count_\1 "),
]
_SUBS = [(re.compile(p), s) for p, s in _SUBS]
_VERTICAL = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
_HORIZONTAL = {"left": 0, "right": 2}
_MIDDLE = {"middle", "centre", "center"}


def _cell_from_words(words: list[str]) -> str | None:
    if not words:
        return None
    row = next((_VERTICAL[w] for w in words if w in _VERTICAL), 1)
    col = next((_HORIZONTAL[w] for w in words if w in _HORIZONTAL), 1)
    return CELLS[row * 3 + col]


def parse_caption(text: str) -> ParsedCaption:
    """Parse a caption of the grammar above (robust to word order within an object phrase and to unknown
    filler words) into a ``ParsedCaption``. "two red circles" yields two objects."""
    t = " " + text.lower().replace("-", " ") + " "
    t = re.sub(r"[,;:.!?]", " ", t)
    for pat, sub in _SUBS:
        t = pat.sub(sub, t)
    out = ParsedCaption()
    adj: dict = {}
    pos_words: list[str] = []
    pending_rel = None
    current: list[int] = []  # indices of the objects the next position/motion words describe

    def flush_position():
        cell = _cell_from_words(pos_words)
        if cell is not None:
            for i in current:
                out.objects[i].cell = cell
        pos_words.clear()

    for w in t.split():
        if w in _SIZE_LOOKUP:
            adj["size"] = _SIZE_LOOKUP[w]
        elif w in _COLOUR_ALIASES and _COLOUR_ALIASES[w] is not None:
            adj["colour"] = _COLOUR_ALIASES[w]
        elif w in _NUM_LOOKUP:
            adj["n"] = _NUM_LOOKUP[w]
        elif w in _SHAPE_WORDS:
            flush_position()
            n = adj.pop("n", 1) if w in _PLURAL_WORDS else 1
            start = len(out.objects)
            for _ in range(max(n, 1)):
                out.objects.append(ParsedObject(shape=_SHAPE_WORDS[w], colour=adj.get("colour"), size=adj.get("size")))
            if pending_rel is not None:
                out.relations.append((pending_rel[0], pending_rel[1], start))
                pending_rel = None
            current = list(range(start, len(out.objects)))
            adj = {}
        elif w in _VERTICAL or w in _HORIZONTAL or w in _MIDDLE:
            pos_words.append(w)
        elif w.startswith("__mot_"):
            for i in current:
                out.objects[i].motion = w[6:]
        elif w.startswith("__rec_"):
            c = _COLOUR_ALIASES.get(w[6:])
            for i in current:
                out.objects[i].motion, out.objects[i].colour2 = "recolour", c
        elif w.startswith("__from_"):
            c = _COLOUR_ALIASES.get(w[7:])
            for i in current:
                if out.objects[i].colour is None:
                    out.objects[i].colour = c
        elif w.startswith("__rel_"):
            flush_position()
            if current:
                pending_rel = (current[-1], w[6:])
        elif w.startswith("__count_"):
            out.count = _NUM_LOOKUP.get(w[8:])
    flush_position()
    return out


def scene_to_parsed(scene: Scene, video: bool = False) -> ParsedCaption:
    """The full specification of a scene in parsed form (what a perfect caption would state)."""
    objs = [
        ParsedObject(
            o.shape,
            o.colour,
            None if (video and o.motion in ("grow", "shrink")) else o.size,
            o.cell,
            o.motion if video else None,
            o.colour2 if video else None,
        )
        for o in scene.objects
    ]
    return ParsedCaption(objs, [], len(objs))


def class_to_parsed(class_id: int) -> ParsedCaption:
    shape, colour = id_to_class(class_id)
    return ParsedCaption([ParsedObject(shape=shape, colour=colour)], [], 1)


def as_parsed(prompt, video: bool = False) -> ParsedCaption:
    """A prompt in any form -- class id, caption string, Scene or ParsedCaption -- as a ParsedCaption."""
    if isinstance(prompt, ParsedCaption):
        return prompt
    if isinstance(prompt, Scene):
        return scene_to_parsed(prompt, video)
    if isinstance(prompt, str):
        return parse_caption(prompt)
    if isinstance(prompt, (int, np.integer)) or (hasattr(prompt, "ndim") and prompt.ndim == 0):
        return class_to_parsed(int(prompt))
    raise TypeError(f"cannot interpret prompt {prompt!r}")


__all__ = [
    "NUMBER_WORDS",
    "POSITION_PHRASES",
    "MOTION_PHRASES",
    "RELATION_PHRASES",
    "ParsedObject",
    "ParsedCaption",
    "object_phrase",
    "position_phrase",
    "motion_phrase",
    "COUNTERFACTUAL_MOTION",
    "VIDEO_POSITION_PROB",
    "counterfactual_scene",
    "counterfactual_video_caption",
    "class_caption",
    "caption",
    "video_caption",
    "captions",
    "parse_caption",
    "scene_to_parsed",
    "class_to_parsed",
    "as_parsed",
]
