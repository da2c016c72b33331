"""A procedural world of coloured shapes on textured ground, with exact masks and captions.

    from toyworld import make_scene, SPLITS
    scene = make_scene(seed=SPLITS["test"].start + 7, size=256)
    scene.image        # uint8 [H, W, 3]
    scene.caption      # "a red circle and an orange circle on grass"
    scene.concepts     # Concept(name, level, mask [H, W] bool, objects), for words and phrases

Deterministic by seed: `make_scene(seed, size)` draws everything from `numpy.random.default_rng(seed)`
and draws the same scene (up to resolution) at every size. Seeds are split into fixed ranges
(SPLITS): train on "train", tune on "val", report on "test" only.

Hard cases come in fixed proportions (KIND_WEIGHTS): look-alike pairs (the same shape in two close
colours: red/orange, blue/purple, yellow/orange, pink/purple), two instances of one concept, and
two adjacent (touching) objects; the rest are plain scenes of 1-4 distinct objects.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS = {  # name -> RGB in 0..255
    "red": (210, 35, 35),
    "orange": (240, 130, 25),
    "yellow": (235, 215, 45),
    "green": (40, 150, 60),
    "blue": (35, 75, 215),
    "purple": (135, 55, 195),
    "pink": (240, 120, 190),
    "white": (245, 245, 240),
}
LOOKALIKE_PAIRS = (("red", "orange"), ("blue", "purple"), ("yellow", "orange"), ("pink", "purple"))
BACKGROUNDS = ("grass", "sand", "water", "stone")
KIND_WEIGHTS = {"plain": 0.40, "lookalike": 0.30, "multi": 0.15, "adjacent": 0.15}
NUMBER_WORDS = {2: "two", 3: "three"}


@dataclass(frozen=True)
class SeedRange:
    start: int
    stop: int

    def __contains__(self, seed: int) -> bool:
        return self.start <= seed < self.stop

    def seeds(self, n: int) -> range:
        if n > self.stop - self.start:
            raise ValueError(f"only {self.stop - self.start} seeds in this split")
        return range(self.start, self.start + n)


# Fixed and documented: never tune on "test".
SPLITS = {
    "train": SeedRange(0, 1_000_000),
    "val": SeedRange(1_000_000, 1_100_000),
    "test": SeedRange(2_000_000, 2_100_000),
}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cx: float          # centre, fraction of the width
    cy: float          # centre, fraction of the height
    radius: float      # fraction of the image side
    angle: float       # radians

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Concept:
    name: str
    level: str                       # "word" (a colour, a shape or the ground) or "phrase"
    mask: np.ndarray                 # [H, W] bool: every pixel of every object it names
    objects: tuple[int, ...]         # indices into Scene.objects ((): the ground)


@dataclass
class Scene:
    seed: int
    kind: str
    image: np.ndarray                # uint8 [H, W, 3]
    caption: str
    objects: tuple[Obj, ...]
    object_masks: np.ndarray         # [n, H, W] bool, visible pixels of each object
    background: str
    concepts: list[Concept] = field(default_factory=list)
    lookalike: tuple[int, int] | None = None   # the two objects of a look-alike pair

    def concept(self, name: str) -> Concept:
        for c in self.concepts:
            if c.name == name:
                return c
        raise KeyError(name)


# --- geometry ------------------------------------------------------------------------

def _shape_sdf(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside where < 0; x, y in units of the object's radius, already rotated."""
    if shape == "circle":
        return np.hypot(x, y) - 1.0
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) - 0.8
    if shape == "diamond":
        return (np.abs(x) + np.abs(y)) - 1.05
    if shape == "triangle":  # equilateral, circumradius 1, pointing up
        k = np.sqrt(3.0)
        return np.maximum(np.maximum(-y - 0.5, (k * x + y) / 2 - 0.5), (-k * x + y) / 2 - 0.5)
    if shape == "star":  # five points, inner radius 0.5
        r, t = np.hypot(x, y), np.arctan2(y, x)
        spoke = 0.5 + 0.5 * np.abs(np.cos(2.5 * t))
        return r - spoke ** 1.5
    raise ValueError(shape)


def _inside(obj: Obj, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    dx, dy = (xs - obj.cx) / obj.radius, (ys - obj.cy) / obj.radius
    c, s = np.cos(obj.angle), np.sin(obj.angle)
    return _shape_sdf(obj.shape, c * dx + s * dy, -s * dx + c * dy) < 0


def _box(obj: Obj, n: int) -> tuple[slice, slice]:
    """Rows and columns (of an n x n pixel grid) that can hold the object: every shape lies within
    1.05 radii of its centre."""
    r = 1.1 * obj.radius
    rows = slice(max(0, int((obj.cy - r) * n)), min(n, int(np.ceil((obj.cy + r) * n)) + 1))
    cols = slice(max(0, int((obj.cx - r) * n)), min(n, int(np.ceil((obj.cx + r) * n)) + 1))
    return rows, cols


def _grid(size: int, supersample: int = 1):
    n = size * supersample
    coords = (np.arange(n) + 0.5) / n
    return np.meshgrid(coords, coords)  # xs, ys


# --- textures ------------------------------------------------------------------------

def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random cells x cells grid, bicubic-ish upsampled (resolution
    independent: the same rng draws give the same pattern at every size)."""
    grid = rng.random((cells + 3, cells + 3))
    t = (np.arange(size) + 0.5) / size * cells + 1.0
    i = np.floor(t).astype(int)
    f = t - i
    w = [(-f ** 3 + 2 * f ** 2 - f) / 2, (3 * f ** 3 - 5 * f ** 2 + 2) / 2,
         (-3 * f ** 3 + 4 * f ** 2 + f) / 2, (f ** 3 - f ** 2) / 2]
    rows = sum(w[k][:, None] * grid[i - 1 + k] for k in range(4))          # [size, cells+3]
    out = sum(w[k][None, :] * rows[:, i - 1 + k] for k in range(4))        # [size, size]
    return np.clip(out, 0, 1)


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    coarse, fine = _value_noise(rng, size, 6), _value_noise(rng, size, 24)
    n = 0.6 * coarse + 0.4 * fine
    if kind == "grass":
        base, var = np.array([70, 125, 50]), np.array([40, 45, 25])
    elif kind == "sand":
        base, var = np.array([200, 180, 130]), np.array([35, 30, 25])
    elif kind == "water":
        ys = (np.arange(size) + 0.5) / size
        waves = 0.5 + 0.5 * np.sin(ys * 40.0 + 3.0 * coarse)
        n = 0.5 * waves + 0.5 * fine
        base, var = np.array([45, 95, 150]), np.array([30, 40, 45])
    elif kind == "stone":
        base, var = np.array([120, 120, 125]), np.array([55, 55, 55])
    else:
        raise ValueError(kind)
    return base + (n[..., None] - 0.5) * 2 * var


# --- scenes --------------------------------------------------------------------------

def _draw_objects(rng: np.random.Generator, kind: str) -> tuple[list[Obj], tuple[int, int] | None]:
    """Shapes, colours, sizes and positions (fractions of the side), without heavy overlap."""
    if kind == "plain":
        n = int(rng.integers(1, 5))
    else:
        n = int(rng.integers(2, 5))
    specs: list[tuple[str, str]] = []
    pair = None
    if kind == "lookalike":
        a, b = LOOKALIKE_PAIRS[int(rng.integers(len(LOOKALIKE_PAIRS)))]
        if rng.random() < 0.5:
            a, b = b, a
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        specs += [(shape, a), (shape, b)]
        pair = (0, 1)
    elif kind == "multi":
        spec = (SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))])
        specs += [spec, spec]
    while len(specs) < n:
        spec = (SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))])
        if spec in specs:
            continue  # one instance per phrase outside "multi"
        if kind == "lookalike" and spec[0] == specs[0][0]:
            continue  # keep the pair the only same-shape objects
        specs.append(spec)
    objs: list[Obj] = []
    for index, (shape, colour) in enumerate(specs):
        for _attempt in range(200):
            radius = float(np.exp(rng.uniform(np.log(0.08), np.log(0.22 if n > 2 else 0.3))))
            angle = float(rng.uniform(-0.4, 0.4)) if shape != "circle" else 0.0
            if kind == "adjacent" and index == 1:
                # touching the first object: centres one radius sum apart, in a random direction
                first = objs[0]
                direction = rng.uniform(0, 2 * np.pi)
                dist = 0.92 * (first.radius + radius)
                cx, cy = first.cx + dist * np.cos(direction), first.cy + dist * np.sin(direction)
            else:
                cx, cy = rng.uniform(radius, 1 - radius, size=2)
            if not (radius * 0.7 <= cx <= 1 - radius * 0.7 and radius * 0.7 <= cy <= 1 - radius * 0.7):
                continue
            ok = all(np.hypot(cx - o.cx, cy - o.cy) > 0.9 * (o.radius + radius) for o in objs)
            if ok:
                objs.append(Obj(shape, colour, float(cx), float(cy), radius, angle))
                break
        else:
            break  # no room: fewer objects
    if pair is not None and len(objs) < 2:
        pair = None
    return objs, pair


def _caption(objs: list[Obj], background: str) -> str:
    groups: dict[str, int] = {}
    for o in objs:
        groups[o.phrase] = groups.get(o.phrase, 0) + 1
    parts = []
    for phrase, count in groups.items():
        if count == 1:
            parts.append(("an " if phrase[0] in "aeiou" else "a ") + phrase)
        else:
            parts.append(f"{NUMBER_WORDS[count]} {phrase}s")
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{text} on {background}"


def make_scene(seed: int, size: int = 256, kind: str | None = None) -> Scene:
    """One scene; `kind` forces a scene kind (else drawn by KIND_WEIGHTS)."""
    rng = np.random.default_rng(seed)
    kinds = list(KIND_WEIGHTS)
    drawn = kinds[int(rng.choice(len(kinds), p=list(KIND_WEIGHTS.values())))]
    kind = kind or drawn
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    tex_rng = np.random.default_rng([seed, 1])
    objs, pair = _draw_objects(rng, kind)
    if kind in ("multi", "lookalike", "adjacent") and len(objs) < 2:
        kind = "plain"
    # Image: 2x supersampled for smooth edges; masks exact at pixel centres. Later objects occlude
    # earlier ones (objects barely overlap, adjacent ones may share an edge).
    ss = 2
    xs2, ys2 = _grid(size, ss)
    up = lambda a: np.repeat(np.repeat(a, ss, 0), ss, 1)  # smooth textures need no supersampling
    canvas = up(_background(tex_rng, background, size))
    shade = up(_value_noise(np.random.default_rng([seed, 2]), size, 8))
    xs, ys = _grid(size)
    visible = np.zeros((len(objs), size, size), bool)
    for i, o in enumerate(objs):
        box2, box = _box(o, size * ss), _box(o, size)
        inside2 = _inside(o, xs2[box2], ys2[box2])
        colour = np.array(COLOURS[o.colour], float)
        canvas[box2][inside2] = colour * (0.88 + 0.24 * shade[box2][inside2, None])
        inside = np.zeros((size, size), bool)
        inside[box] = _inside(o, xs[box], ys[box])
        visible[:i] &= ~inside
        visible[i] = inside
    image = sum(canvas[i::ss, j::ss] for i in range(ss) for j in range(ss)) / ss ** 2
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    scene = Scene(seed, kind, image, _caption(objs, background), tuple(objs), visible, background, lookalike=pair)
    scene.concepts = _concepts(scene)
    return scene


def _concepts(scene: Scene) -> list[Concept]:
    out: list[Concept] = []
    objs, masks = scene.objects, scene.object_masks

    def add(name, level, members):
        members = tuple(members)
        mask = masks[list(members)].any(0) if members else ~masks.any(0)
        if mask.any():
            out.append(Concept(name, level, mask, members))

    for phrase in dict.fromkeys(o.phrase for o in objs):
        add(phrase, "phrase", [i for i, o in enumerate(objs) if o.phrase == phrase])
    for colour in dict.fromkeys(o.colour for o in objs):
        add(colour, "word", [i for i, o in enumerate(objs) if o.colour == colour])
    for shape in dict.fromkeys(o.shape for o in objs):
        add(shape, "word", [i for i, o in enumerate(objs) if o.shape == shape])
    add(scene.background, "word", [])
    return out
