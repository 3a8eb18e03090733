"""Scene description: vocabulary, the `Scene`/`Obj` dataclasses, the batched `SceneBatch` and seeded sampling.

One scene description drives every modality (image, class label, caption, video, control maps, questions).
Geometry is resolution free: positions and sizes are fractions of the image side, with x to the right and y
downwards, so the same scene renders at 32, 64, 128 or 256 px.

Sampling is vectorised over a batch with a numpy ``Generator``; everything downstream of a ``SceneBatch`` is a
pure function of it, so a seed fixes every output.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

# ----------------------------------------------------------------------------------------------- vocabulary
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
# Object colours, far apart in RGB (min pairwise distance > 100: red-orange and yellow-orange are the closest).
PALETTE = np.array(
    [
        (230, 30, 30),  # red
        (30, 175, 45),  # green
        (35, 70, 235),  # blue
        (245, 230, 30),  # yellow
        (145, 40, 190),  # purple
        (245, 128, 0),  # orange
        (250, 250, 250),  # white
        (15, 15, 15),  # black
    ],
    dtype=np.uint8,
)
SIZES = ("small", "large", "tiny")  # "tiny" only appears in the high-resolution scenes
SIZE_RADIUS = (0.085, 0.13, 0.017)  # half-extent as a fraction of the image side (tiny ~ 8.7 px at 256 px)
CELLS = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")
MOTIONS = ("none", "left", "right", "up", "down", "bounce", "grow", "shrink", "recolour")
BACKGROUNDS = ("flat", "gradient", "noise")

NUM_SHAPES, NUM_COLOURS = len(SHAPES), len(COLOURS)
NUM_CLASSES = NUM_SHAPES * NUM_COLOURS  # 48 (shape, colour) classes of the single-object scenes
NULL_CLASS = NUM_CLASSES  # id 48: the "no class" label for classifier-free guidance
CLASS_NAMES = tuple(f"{COLOURS[i % NUM_COLOURS]} {SHAPES[i // NUM_COLOURS]}" for i in range(NUM_CLASSES))

# Bounding box of each shape in its unit frame (half-extent r = 1, y down): x0, y0, x1, y1.
SHAPE_BBOX = np.array(
    [
        (-1.0, -1.0, 1.0, 1.0),  # circle, radius 1
        (-0.85, -0.85, 0.85, 0.85),  # square
        (-1.0, -0.8660254, 1.0, 0.8660254),  # equilateral triangle, side 2, apex up
        (-0.95105652, -1.0, 0.95105652, 0.80901699),  # five-point star, outer radius 1, apex up
        (-1.0, -1.0, 1.0, 1.0),  # plus-shaped cross, arm half-width 0.33
        (-1.0, -0.9142136, 1.0, 0.9142136),  # heart, width 2
    ],
    dtype=np.float32,
)

# Background tones: low-saturation mid greys, far (>= ~95 RGB units) from every palette colour.
BG_GREY = (95, 165)  # grey level range (0..255)
BG_TINT = 12  # max per-channel tint
BG_NOISE_AMP = 12  # amplitude of the triangular per-pixel noise of "noise" backgrounds (std ~ 4.9)

GRID_JITTER = 0.035  # max jitter of an object centre around its grid-cell centre
MIN_GAP = 0.03  # min gap between object bounding boxes (about 2 px at 64 px)
BORDER = 0.01  # min gap between an object and the image border
MOTION_DISTANCE = 0.3  # travel of left/right/up/down objects over a video
BOUNCE_HEIGHT = 0.2  # height of each of the two hops of a bouncing object


def class_to_id(shape: str | int, colour: str | int) -> int:
    """Class id of a (shape, colour) pair: ``shape_index * 8 + colour_index`` (0..47)."""
    s = SHAPES.index(shape) if isinstance(shape, str) else int(shape)
    c = COLOURS.index(colour) if isinstance(colour, str) else int(colour)
    return s * NUM_COLOURS + c


def id_to_class(class_id: int) -> tuple[str, str]:
    """(shape, colour) names of a class id; raises on the null class or out-of-range ids."""
    class_id = int(class_id)
    if not 0 <= class_id < NUM_CLASSES:
        raise ValueError(f"class id {class_id} is not one of the {NUM_CLASSES} classes (null class is {NULL_CLASS})")
    return SHAPES[class_id // NUM_COLOURS], COLOURS[class_id % NUM_COLOURS]


def class_name(class_id: int) -> str:
    """Readable name of a class id, e.g. ``"red circle"``; the null class is ``"null"``."""
    return "null" if int(class_id) == NULL_CLASS else CLASS_NAMES[int(class_id)]


def cell_of(cx, cy):
    """3x3 grid cell index (row * 3 + col) of normalised centre coordinates (scalars or arrays)."""
    col = np.clip(np.floor(np.asarray(cx) * 3), 0, 2).astype(np.int64)
    row = np.clip(np.floor(np.asarray(cy) * 3), 0, 2).astype(np.int64)
    return row * 3 + col


def cell_centre(cell):
    """Normalised (cx, cy) of the centre of a 3x3 grid cell."""
    cell = np.asarray(cell)
    return ((cell % 3) + 0.5) / 3.0, ((cell // 3) + 0.5) / 3.0


# ----------------------------------------------------------------------------------------------- dataclasses
@dataclass
class Obj:
    """One object. ``cx, cy`` is the centre of its bounding box, ``r`` its half-extent (fractions of the image
    side); ``cell`` is the 3x3 grid cell it was placed in (its starting cell in a video). ``motion`` says what
    it does in a video; ``colour2`` is the colour it turns into when ``motion == "recolour"``."""

    shape: str
    colour: str
    size: str
    cell: str
    cx: float
    cy: float
    r: float
    motion: str = "none"
    colour2: str | None = None

    @property
    def class_id(self) -> int:
        return class_to_id(self.shape, self.colour)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """Normalised (x0, y0, x1, y1) of the shape."""
        b = SHAPE_BBOX[SHAPES.index(self.shape)]
        return (self.cx + self.r * b[0], self.cy + self.r * b[1], self.cx + self.r * b[2], self.cy + self.r * b[3])


@dataclass
class Background:
    """``kind`` is flat / gradient / noise; colours are RGB in 0..255; the gradient runs from ``colour1`` to
    ``colour2`` along ``angle`` (radians, 0 = left to right); ``seed`` drives the per-pixel noise."""

    kind: str = "flat"
    colour1: tuple[float, float, float] = (128.0, 128.0, 128.0)
    colour2: tuple[float, float, float] = (128.0, 128.0, 128.0)
    angle: float = 0.0
    seed: int = 0


@dataclass
class Scene:
    """A background and a list of objects."""

    objects: list[Obj] = field(default_factory=list)
    background: Background = field(default_factory=Background)


# ----------------------------------------------------------------------------------------------- SceneBatch
@dataclass
class SceneBatch:
    """Structure-of-arrays form of B scenes with up to K objects each (padding slots have ``shape == -1``).

    Integer arrays index into the vocabularies (SHAPES, COLOURS, SIZES, CELLS, MOTIONS, BACKGROUNDS).
    Geometry is float32 in image fractions; background colours are float32 in 0..255.
    """

    shape: np.ndarray  # (B, K) int64, -1 = empty slot
    colour: np.ndarray  # (B, K) int64
    size: np.ndarray  # (B, K) int64
    cell: np.ndarray  # (B, K) int64
    cx: np.ndarray  # (B, K) float32
    cy: np.ndarray  # (B, K) float32
    r: np.ndarray  # (B, K) float32
    motion: np.ndarray  # (B, K) int64
    colour2: np.ndarray  # (B, K) int64, -1 unless recolour
    bg_kind: np.ndarray  # (B,) int64
    bg1: np.ndarray  # (B, 3) float32
    bg2: np.ndarray  # (B, 3) float32
    bg_angle: np.ndarray  # (B,) float32
    bg_seed: np.ndarray  # (B,) int64

    def __len__(self) -> int:
        return self.shape.shape[0]

    @property
    def max_objects(self) -> int:
        return self.shape.shape[1]

    @property
    def valid(self) -> np.ndarray:
        """(B, K) bool: which slots hold an object."""
        return self.shape >= 0

    @property
    def num_objects(self) -> np.ndarray:
        return self.valid.sum(1)

    @property
    def class_id(self) -> np.ndarray:
        """(B, K) class ids, -1 in empty slots."""
        return np.where(self.valid, self.shape * NUM_COLOURS + self.colour, -1)

    def bboxes(self) -> np.ndarray:
        """(B, K, 4) normalised (x0, y0, x1, y1) of every slot (garbage in empty slots)."""
        b = SHAPE_BBOX[np.clip(self.shape, 0, None)]
        r = self.r[..., None]
        return np.stack([self.cx, self.cy, self.cx, self.cy], -1) + r * b

    def select(self, idx) -> "SceneBatch":
        """A new batch of the scenes ``idx`` (index array, slice or bool mask)."""
        return SceneBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @staticmethod
    def concat(batches: list["SceneBatch"]) -> "SceneBatch":
        k = max(b.max_objects for b in batches)
        padded = [b.pad_to(k) for b in batches]
        return SceneBatch(**{f.name: np.concatenate([getattr(b, f.name) for b in padded]) for f in fields(SceneBatch)})

    def pad_to(self, k: int) -> "SceneBatch":
        """The same scenes with K padded up to ``k`` empty slots."""
        extra = k - self.max_objects
        if extra <= 0:
            return self
        out = {}
        for f in fields(self):
            a = getattr(self, f.name)
            if a.ndim >= 2 and f.name not in ("bg1", "bg2"):
                fill = -1 if a.dtype.kind == "i" else 0
                a = np.concatenate([a, np.full((a.shape[0], extra), fill, a.dtype)], 1)
            out[f.name] = a
        return SceneBatch(**out)

    def __getitem__(self, i: int) -> Scene:
        """Scene ``i`` as dataclasses."""
        objs = []
        for k in np.flatnonzero(self.valid[i]):
            c2 = int(self.colour2[i, k])
            objs.append(
                Obj(
                    shape=SHAPES[self.shape[i, k]],
                    colour=COLOURS[self.colour[i, k]],
                    size=SIZES[self.size[i, k]],
                    cell=CELLS[self.cell[i, k]],
                    cx=float(self.cx[i, k]),
                    cy=float(self.cy[i, k]),
                    r=float(self.r[i, k]),
                    motion=MOTIONS[self.motion[i, k]],
                    colour2=COLOURS[c2] if c2 >= 0 else None,
                )
            )
        bg = Background(
            kind=BACKGROUNDS[self.bg_kind[i]],
            colour1=tuple(float(v) for v in self.bg1[i]),
            colour2=tuple(float(v) for v in self.bg2[i]),
            angle=float(self.bg_angle[i]),
            seed=int(self.bg_seed[i]),
        )
        return Scene(objs, bg)

    def to_scenes(self) -> list[Scene]:
        return [self[i] for i in range(len(self))]

    @staticmethod
    def from_scenes(scenes: list[Scene], max_objects: int | None = None) -> "SceneBatch":
        """Batch a list of ``Scene`` objects (inverse of ``to_scenes``)."""
        n = len(scenes)
        k = max_objects or max(1, max((len(s.objects) for s in scenes), default=1))
        b = _empty_batch(n, k)
        for i, s in enumerate(scenes):
            if len(s.objects) > k:
                raise ValueError(f"scene {i} has {len(s.objects)} objects, more than max_objects={k}")
            for j, o in enumerate(s.objects):
                b.shape[i, j] = SHAPES.index(o.shape)
                b.colour[i, j] = COLOURS.index(o.colour)
                b.size[i, j] = SIZES.index(o.size)
                b.cell[i, j] = CELLS.index(o.cell)
                b.cx[i, j], b.cy[i, j], b.r[i, j] = o.cx, o.cy, o.r
                b.motion[i, j] = MOTIONS.index(o.motion)
                b.colour2[i, j] = COLOURS.index(o.colour2) if o.colour2 else -1
            bg = s.background
            b.bg_kind[i] = BACKGROUNDS.index(bg.kind)
            b.bg1[i], b.bg2[i] = bg.colour1, bg.colour2
            b.bg_angle[i], b.bg_seed[i] = bg.angle, bg.seed
        return b


def _empty_batch(n: int, k: int) -> SceneBatch:
    neg = lambda: np.full((n, k), -1, np.int64)  # noqa: E731
    return SceneBatch(
        shape=neg(),
        colour=neg(),
        size=neg(),
        cell=neg(),
        cx=np.zeros((n, k), np.float32),
        cy=np.zeros((n, k), np.float32),
        r=np.zeros((n, k), np.float32),
        motion=np.zeros((n, k), np.int64),
        colour2=neg(),
        bg_kind=np.zeros(n, np.int64),
        bg1=np.full((n, 3), 128, np.float32),
        bg2=np.full((n, 3), 128, np.float32),
        bg_angle=np.zeros(n, np.float32),
        bg_seed=np.zeros(n, np.int64),
    )


# ----------------------------------------------------------------------------------------------- sampling
def as_rng(seed_or_rng) -> np.random.Generator:
    """A numpy Generator from an int seed, a SeedSequence or a Generator (returned as is)."""
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


def _sample_backgrounds(rng: np.random.Generator, b: SceneBatch, kinds=None) -> None:
    n = len(b)
    lo, hi = BG_GREY
    kind = rng.integers(0, len(BACKGROUNDS), n) if kinds is None else np.broadcast_to(np.asarray(kinds), (n,)).copy()
    g1 = rng.uniform(lo, hi, n)
    # second gradient colour: 30..70 grey levels away, reflected back into range
    g2 = g1 + rng.choice([-1.0, 1.0], n) * rng.uniform(30, 70, n)
    g2 = np.where(g2 > hi, g1 - (g2 - g1), g2)
    g2 = np.where(g2 < lo, g1 + (g1 - g2), g2)
    g2 = np.clip(g2, lo, hi)
    t1 = rng.uniform(-BG_TINT, BG_TINT, (n, 3))
    t2 = rng.uniform(-BG_TINT, BG_TINT, (n, 3))
    c1 = g1[:, None] + t1
    c2 = np.where((kind == 1)[:, None], g2[:, None] + t2, c1)
    b.bg_kind[:] = kind
    b.bg1[:] = c1
    b.bg2[:] = c2
    b.bg_angle[:] = rng.uniform(0, 2 * np.pi, n)
    b.bg_seed[:] = rng.integers(0, 2**31 - 1, n)


def _boxes(shape, cx, cy, r, pad=0.0):
    bb = SHAPE_BBOX[np.clip(shape, 0, None)]
    return (cx + r * bb[..., 0] - pad, cy + r * bb[..., 1] - pad, cx + r * bb[..., 2] + pad, cy + r * bb[..., 3] + pad)


def _pair_conflicts(x0, y0, x1, y1, valid, gap) -> np.ndarray:
    """(B,) bool: some pair of valid boxes is closer than ``gap`` (boxes are (B, K) arrays)."""
    k = x0.shape[1]
    bad = np.zeros(x0.shape[0], bool)
    for i in range(k):
        for j in range(i + 1, k):
            gx = np.maximum(x0[:, j] - x1[:, i], x0[:, i] - x1[:, j])
            gy = np.maximum(y0[:, j] - y1[:, i], y0[:, i] - y1[:, j])
            bad |= valid[:, i] & valid[:, j] & (np.maximum(gx, gy) < gap)
    return bad


def _place_on_grid(rng, b: SceneBatch, jitter=GRID_JITTER) -> None:
    """Jitter centres around their cells, keep them inside the image, re-draw jitter until no two boxes are
    closer than MIN_GAP (falling back to no jitter, which always fits)."""
    n, k = b.shape.shape
    ccx, ccy = cell_centre(np.clip(b.cell, 0, None))
    valid = b.valid
    bb = SHAPE_BBOX[np.clip(b.shape, 0, None)] * b.r[..., None]  # (B, K, 4) box relative to the centre
    lo_x, lo_y, hi_x, hi_y = BORDER - bb[..., 0], BORDER - bb[..., 1], 1 - BORDER - bb[..., 2], 1 - BORDER - bb[..., 3]
    todo = np.ones(n, bool)
    for attempt in range(12):
        m = int(todo.sum())
        if m == 0:
            break
        j = jitter if attempt < 11 else 0.0
        jx = rng.uniform(-j, j, (m, k)) if j else np.zeros((m, k))
        jy = rng.uniform(-j, j, (m, k)) if j else np.zeros((m, k))
        cx = np.clip(ccx[todo] + jx, lo_x[todo], hi_x[todo])
        cy = np.clip(ccy[todo] + jy, lo_y[todo], hi_y[todo])
        b.cx[todo] = cx
        b.cy[todo] = cy
        sub = np.flatnonzero(todo)
        bad = _pair_conflicts(*_boxes(b.shape[sub], b.cx[sub], b.cy[sub], b.r[sub]), valid[sub], MIN_GAP)
        todo[sub[~bad]] = False
    b.cx[~valid] = 0
    b.cy[~valid] = 0


def sample_scenes(
    rng,
    n: int,
    min_objects: int = 1,
    max_objects: int = 3,
    shapes=None,
    colours=None,
    sizes=None,
    backgrounds=None,
) -> SceneBatch:
    """Sample ``n`` scenes of ``min_objects..max_objects`` objects on the 3x3 grid (distinct cells).

    ``shapes`` / ``colours`` / ``sizes`` optionally fix attributes: an (n, K) int array (K = max_objects), or
    None for uniform. ``backgrounds`` is None (uniform over flat/gradient/noise), an index or an (n,) array.
    """
    rng = as_rng(rng)
    k = max_objects
    b = _empty_batch(n, k)
    num = rng.integers(min_objects, max_objects + 1, n)
    valid = np.arange(k)[None, :] < num[:, None]
    cells = np.argsort(rng.random((n, 9)), axis=1)[:, :k]
    shape = rng.integers(0, NUM_SHAPES, (n, k)) if shapes is None else np.asarray(shapes).reshape(n, k)
    colour = rng.integers(0, NUM_COLOURS, (n, k)) if colours is None else np.asarray(colours).reshape(n, k)
    size = rng.integers(0, 2, (n, k)) if sizes is None else np.asarray(sizes).reshape(n, k)
    b.shape[:] = np.where(valid, shape, -1)
    b.colour[:] = np.where(valid, colour, -1)
    b.size[:] = np.where(valid, size, -1)
    b.cell[:] = np.where(valid, cells, -1)
    b.r[:] = np.where(valid, np.asarray(SIZE_RADIUS, np.float32)[np.clip(size, 0, None)], 0)
    _place_on_grid(rng, b)
    _sample_backgrounds(rng, b, backgrounds)
    return b


def sample_class_scenes(rng, n: int | None = None, labels=None, backgrounds=None) -> SceneBatch:
    """Single-object scenes; ``labels`` (class ids 0..47) fixes each scene's (shape, colour), else uniform."""
    rng = as_rng(rng)
    if labels is None:
        labels = rng.integers(0, NUM_CLASSES, n)
    labels = np.asarray(labels, np.int64).reshape(-1)
    if np.any((labels < 0) | (labels >= NUM_CLASSES)):
        raise ValueError("labels must be class ids in 0..47 (the null class has no scene)")
    n = len(labels)
    return sample_scenes(
        rng, n, 1, 1, shapes=labels // NUM_COLOURS, colours=labels % NUM_COLOURS, backgrounds=backgrounds
    )


def sample_video_scenes(rng, n: int, min_objects: int = 1, max_objects: int = 2, motions=None) -> SceneBatch:
    """Scenes whose objects each move (left/right/up/down/bounce), grow, shrink or change colour.

    Positions are starting positions (``cell`` is the starting cell). Whole trajectories stay inside the image
    and apart from each other (rejection sampling). ``motions`` optionally fixes an (n, K) array of motion ids.
    """
    rng = as_rng(rng)
    k = max_objects
    out = _empty_batch(n, k)
    todo = np.arange(n)
    for _ in range(100):
        m = len(todo)
        if m == 0:
            break
        b = _empty_batch(m, k)
        num = rng.integers(min_objects, max_objects + 1, m)
        valid = np.arange(k)[None, :] < num[:, None]
        shape = rng.integers(0, NUM_SHAPES, (m, k))
        colour = rng.integers(0, NUM_COLOURS, (m, k))
        size = rng.integers(0, 2, (m, k))
        motion = rng.integers(1, len(MOTIONS), (m, k)) if motions is None else np.asarray(motions)[todo]
        size = np.where(motion == MOTIONS.index("grow"), 0, np.where(motion == MOTIONS.index("shrink"), 1, size))
        colour2 = (colour + rng.integers(1, NUM_COLOURS, (m, k))) % NUM_COLOURS
        r = np.asarray(SIZE_RADIUS, np.float32)[size]
        r_max = np.where((motion == MOTIONS.index("grow")) | (motion == MOTIONS.index("shrink")), SIZE_RADIUS[1], r)
        bb = SHAPE_BBOX[shape] * r_max[..., None]  # largest box over the track, relative to the centre
        # allowed range of the start centre so the whole track stays inside the image
        lo_x, hi_x = BORDER - bb[..., 0], 1 - BORDER - bb[..., 2]
        lo_y, hi_y = BORDER - bb[..., 1], 1 - BORDER - bb[..., 3]
        mv = lambda name: motion == MOTIONS.index(name)  # noqa: E731
        hi_x = np.where(mv("right"), hi_x - MOTION_DISTANCE, hi_x)
        lo_x = np.where(mv("left"), lo_x + MOTION_DISTANCE, lo_x)
        hi_y = np.where(mv("down"), hi_y - MOTION_DISTANCE, hi_y)
        lo_y = np.where(mv("up") | mv("bounce"), lo_y + np.where(mv("up"), MOTION_DISTANCE, BOUNCE_HEIGHT), lo_y)
        cx = rng.uniform(lo_x, hi_x).astype(np.float32)
        cy = rng.uniform(lo_y, hi_y).astype(np.float32)
        # swept boxes over the track
        x0, y0, x1, y1 = cx + bb[..., 0], cy + bb[..., 1], cx + bb[..., 2], cy + bb[..., 3]
        x1 = np.where(mv("right"), x1 + MOTION_DISTANCE, x1)
        x0 = np.where(mv("left"), x0 - MOTION_DISTANCE, x0)
        y1 = np.where(mv("down"), y1 + MOTION_DISTANCE, y1)
        y0 = np.where(mv("up"), y0 - MOTION_DISTANCE, np.where(mv("bounce"), y0 - BOUNCE_HEIGHT, y0))
        bad = _pair_conflicts(x0, y0, x1, y1, valid, MIN_GAP)
        b.shape[:] = np.where(valid, shape, -1)
        b.colour[:] = np.where(valid, colour, -1)
        b.size[:] = np.where(valid, size, -1)
        b.cx[:], b.cy[:] = np.where(valid, cx, 0), np.where(valid, cy, 0)
        b.cell[:] = np.where(valid, cell_of(cx, cy), -1)
        b.r[:] = np.where(valid, r, 0)
        b.motion[:] = np.where(valid, motion, 0)
        b.colour2[:] = np.where(valid & mv("recolour"), colour2, -1)
        _sample_backgrounds(rng, b)
        ok = ~bad
        for f in fields(SceneBatch):
            getattr(out, f.name)[todo[ok]] = getattr(b, f.name)[ok]
        todo = todo[bad]
    if len(todo):
        raise RuntimeError("could not place video objects; lower max_objects")
    return out


def sample_tiny_scenes(rng, n: int, min_objects: int = 1, max_objects: int = 8, fine_grid: int = 6) -> SceneBatch:
    """High-resolution scenes: up to 8 tiny (~8 px at 256 px) objects, one per cell of a ``fine_grid`` x
    ``fine_grid`` grid (jittered inside it), so every object also lies inside one 3x3 cell."""
    rng = as_rng(rng)
    k = max_objects
    b = _empty_batch(n, k)
    num = rng.integers(min_objects, max_objects + 1, n)
    valid = np.arange(k)[None, :] < num[:, None]
    fine = np.argsort(rng.random((n, fine_grid * fine_grid)), axis=1)[:, :k]
    r = SIZE_RADIUS[2]
    step = 1.0 / fine_grid
    slack = step / 2 - r - MIN_GAP / 2
    cx = (fine % fine_grid + 0.5) * step + rng.uniform(-slack, slack, (n, k))
    cy = (fine // fine_grid + 0.5) * step + rng.uniform(-slack, slack, (n, k))
    b.shape[:] = np.where(valid, rng.integers(0, NUM_SHAPES, (n, k)), -1)
    b.colour[:] = np.where(valid, rng.integers(0, NUM_COLOURS, (n, k)), -1)
    b.size[:] = np.where(valid, 2, -1)
    b.cx[:], b.cy[:] = np.where(valid, cx, 0), np.where(valid, cy, 0)
    b.cell[:] = np.where(valid, cell_of(cx, cy), -1)
    b.r[:] = np.where(valid, r, 0)
    _sample_backgrounds(rng, b)
    return b


# ----------------------------------------------------------------------------------------------- video frames
def frame_times(num_frames: int) -> np.ndarray:
    """Normalised times t in [0, 1] of the frames of a video."""
    return np.linspace(0.0, 1.0, num_frames, dtype=np.float32)


def scenes_at(b: SceneBatch, t) -> SceneBatch:
    """The scenes of a video batch at normalised times ``t`` ((T,) array): a batch of B*T frame scenes, frame
    ``f`` of video ``i`` at row ``i*T + f``. Each frame keeps its object's identity, motion and starting cell."""
    t = np.asarray(t, np.float32).reshape(-1)
    tt = t[None, :, None]  # (1, T, 1)
    rep = lambda a: np.repeat(a[:, None], len(t), 1)  # noqa: E731  (B, T, ...)
    mv = lambda name: rep(b.motion) == MOTIONS.index(name)  # noqa: E731
    cx, cy, r = rep(b.cx), rep(b.cy), rep(b.r)
    cx = cx + np.where(mv("right"), MOTION_DISTANCE * tt, 0) - np.where(mv("left"), MOTION_DISTANCE * tt, 0)
    cy = cy + np.where(mv("down"), MOTION_DISTANCE * tt, 0) - np.where(mv("up"), MOTION_DISTANCE * tt, 0)
    cy = cy - np.where(mv("bounce"), BOUNCE_HEIGHT * np.abs(np.sin(2 * np.pi * tt)), 0)
    rs, rl = SIZE_RADIUS[0], SIZE_RADIUS[1]
    r = np.where(mv("grow"), rs + (rl - rs) * tt, np.where(mv("shrink"), rl - (rl - rs) * tt, r))
    colour = np.where(mv("recolour") & (tt >= 0.5), rep(b.colour2), rep(b.colour))
    flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
    out = SceneBatch(
        shape=flat(rep(b.shape)),
        colour=flat(colour),
        size=flat(rep(b.size)),
        cell=flat(rep(b.cell)),
        cx=flat(cx).astype(np.float32),
        cy=flat(cy).astype(np.float32),
        r=flat(r).astype(np.float32),
        motion=flat(rep(b.motion)),
        colour2=flat(rep(b.colour2)),
        bg_kind=flat(rep(b.bg_kind)),
        bg1=flat(rep(b.bg1)),
        bg2=flat(rep(b.bg2)),
        bg_angle=flat(rep(b.bg_angle)),
        bg_seed=flat(rep(b.bg_seed)),
    )
    return out


__all__ = [
    "SHAPES",
    "COLOURS",
    "PALETTE",
    "SIZES",
    "SIZE_RADIUS",
    "CELLS",
    "MOTIONS",
    "BACKGROUNDS",
    "NUM_CLASSES",
    "NULL_CLASS",
    "CLASS_NAMES",
    "SHAPE_BBOX",
    "class_to_id",
    "id_to_class",
    "class_name",
    "cell_of",
    "cell_centre",
    "Obj",
    "Background",
    "Scene",
    "SceneBatch",
    "as_rng",
    "sample_scenes",
    "sample_class_scenes",
    "sample_video_scenes",
    "sample_tiny_scenes",
    "frame_times",
    "scenes_at",
]
