"""Scenes of the demo world: a few coloured shapes on a textured background, with their truth.

A scene is a pure function of (seed, index): the URL list, the server and every test rebuild the
same scene from those two numbers, so nothing but the numbers has to be stored or sent.
Boxes are tight (the renderer scales each shape's outline to fill its box exactly), objects never
overlap, and every pair of objects stands in exactly one geometric relation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "heart")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Saturated object colours, far from the greyish backgrounds so shapes stand out.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (255, 127, 14),
    "yellow": (240, 216, 20),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "purple": (128, 50, 170),
    "pink": (247, 120, 190),
    "brown": (130, 75, 30),
}

# Texture name -> the adjective captions use for it (all read as attributes by the parser).
TEXTURES = ("plain", "noise", "stripes", "checker", "gradient", "dots")
TEXTURE_WORDS = {
    "plain": "plain",
    "noise": "speckled",
    "stripes": "striped",
    "checker": "checkered",
    "gradient": "shaded",
    "dots": "dotted",
}

MIN_SIDE, MAX_SIDE = 256, 480  # normal images; aspect is then at most 480/256 < 2
MIN_OBJECT = 24  # px: smaller shapes are not reliably detectable after a 256 px resize
_GAP = 4  # px kept free between two boxes so relations and boxes stay unambiguous
_N_OBJECTS = ((1, 0.12), (2, 0.38), (3, 0.28), (4, 0.22))


@dataclass(frozen=True)
class Background:
    texture: str  # one of TEXTURES
    base: tuple[int, int, int]
    accent: tuple[int, int, int]
    period: int  # px of one stripe/checker/dot cell
    angle: int  # degrees, for stripes and gradients
    seed: int  # noise field

    @property
    def word(self) -> str:
        return TEXTURE_WORDS[self.texture]

    @property
    def tone(self) -> str:
        """ "dark" or "light" when the background clearly is; "" in between."""
        lightness = (sum(self.base) + sum(self.accent)) / (6 * 255)
        return "dark" if lightness < 0.42 else "light" if lightness > 0.68 else ""


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: Background
    objects: list[WorldObject]
    relations: list[tuple[int, str, int]] = field(default_factory=list)


def scene_rng(seed: int, index: int, purpose: str) -> random.Random:
    """An independent, reproducible stream per (seed, index, purpose).

    String seeds hash with SHA-512 inside `random`, so they do not depend on PYTHONHASHSEED.
    """
    return random.Random(f"{purpose}:{seed}:{index}")


def _grey(rng: random.Random, light: float) -> tuple[int, int, int]:
    # Neutral with a faint tint: textures differ in lightness, never in hue like the objects.
    tint = [rng.uniform(-0.06, 0.06) for _ in range(3)]
    return tuple(max(0, min(255, round(255 * (light + t)))) for t in tint)  # type: ignore[return-value]


def _background(rng: random.Random) -> Background:
    texture = rng.choice(TEXTURES)
    light = rng.uniform(0.3, 0.85)
    other = light + rng.choice((-1, 1)) * rng.uniform(0.12, 0.25)
    other = min(0.95, max(0.1, other))
    return Background(
        texture=texture,
        base=_grey(rng, light),
        accent=_grey(rng, other),
        period=rng.randint(8, 40),
        angle=rng.choice((0, 45, 90, 135)) + rng.randint(-10, 10),
        seed=rng.getrandbits(31),
    )


def relation_between(a: tuple[float, ...], b: tuple[float, ...]) -> str:
    """The one relation of box a to box b: along the axis on which they are further apart."""
    gap_x = max(b[0] - a[2], a[0] - b[2])
    gap_y = max(b[1] - a[3], a[1] - b[3])
    if gap_x >= gap_y:
        return "left of" if a[2] <= b[0] or (a[0] + a[2]) < (b[0] + b[2]) else "right of"
    return "above" if a[3] <= b[1] or (a[1] + a[3]) < (b[1] + b[3]) else "below"


def _overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return not (
        a[2] + _GAP <= b[0] or b[2] + _GAP <= a[0] or a[3] + _GAP <= b[1] or b[3] + _GAP <= a[1]
    )


def _side(rng: random.Random, size: str, short: int) -> float:
    frac = rng.uniform(0.14, 0.2) if size == "small" else rng.uniform(0.3, 0.42)
    return max(float(MIN_OBJECT), frac * short)


def _place(
    rng: random.Random, width: int, height: int, side: float, boxes: list[tuple[float, ...]]
) -> tuple[float, float, float, float] | None:
    # Shapes are not all square: a little stretch varies the boxes the detector learns.
    w = min(max(MIN_OBJECT, side * rng.uniform(0.9, 1.12)), width - 2.0)
    h = min(max(MIN_OBJECT, side * rng.uniform(0.9, 1.12)), height - 2.0)
    if w < MIN_OBJECT or h < MIN_OBJECT:
        return None
    for _ in range(40):
        x0 = rng.uniform(1.0, width - 1.0 - w)
        y0 = rng.uniform(1.0, height - 1.0 - h)
        box = (round(x0, 1), round(y0, 1), round(x0 + w, 1), round(y0 + h, 1))
        if not any(_overlaps(box, other) for other in boxes):
            return box
    return None


def sample_scene(
    seed: int, index: int, width: int | None = None, height: int | None = None
) -> Scene:
    """The scene at (seed, index); `width`/`height` override the sampled size (tiny, wide rows)."""
    rng = scene_rng(seed, index, "scene")
    w = rng.randint(MIN_SIDE, MAX_SIDE)
    h = rng.randint(MIN_SIDE, MAX_SIDE)
    if width is not None or height is not None:
        w = width if width is not None else height  # type: ignore[assignment]
        h = height if height is not None else width  # type: ignore[assignment]
    background = _background(rng)
    short = min(w, h)
    wanted = rng.choices([k for k, _ in _N_OBJECTS], [p for _, p in _N_OBJECTS])[0]
    if short < 2 * MIN_OBJECT + _GAP:  # tiny images hold one shape
        wanted = 1
    objects: list[WorldObject] = []
    boxes: list[tuple[float, ...]] = []
    for i in range(wanted):
        shape, colour = rng.choice(SHAPES), rng.choice(COLOURS)
        if i == 1 and rng.random() < 0.3:
            # Twins (same shape and colour) let captions count: "two yellow hearts".
            shape, colour = objects[0].shape, objects[0].colour
        size = rng.choice(SIZES)
        box = _place(rng, w, h, _side(rng, size, short), boxes)
        if box is None and size == "large":
            size = "small"
            box = _place(rng, w, h, _side(rng, size, short), boxes)
        if box is None:
            if not objects:  # the first shape always fits: shrink it to the minimum
                side = min(MIN_OBJECT, short - 2)
                box = (1.0, 1.0, 1.0 + side, 1.0 + side)
            else:
                continue
        objects.append(WorldObject(shape, colour, size, box))
        boxes.append(box)
    relations = [
        (i, relation_between(objects[i].box, objects[j].box), j)
        for i in range(len(objects))
        for j in range(i + 1, len(objects))
    ]
    return Scene(w, h, background, objects, relations)


def relation_of(scene: Scene, i: int, j: int) -> str:
    """Relation of object i to object j (either order), from the stored pairs."""
    for s, name, o in scene.relations:
        if (s, o) == (i, j):
            return name
        if (s, o) == (j, i):
            return CONVERSE[name]
    raise KeyError((i, j))


def image_graph(scene: Scene) -> dict:
    """Everything true of the image, in the caption scene-graph format (one object per shape)."""
    return {
        "objects": [{"id": i, "name": o.shape, "count": 1} for i, o in enumerate(scene.objects)],
        "attributes": [
            {"object": i, "name": name}
            for i, o in enumerate(scene.objects)
            for name in (o.colour, o.size)
        ],
        "relations": [{"subject": s, "name": r, "object": o} for s, r, o in scene.relations],
    }
