"""Questions about a demo-world image, answered from its truth (LXMERT's image-QA task).

Three kinds, each asked only when the image settles the answer: the colour of a shape (all
objects of that shape share one colour), the shape of a colour (exactly one object has it), and
counts (of one shape, possibly absent → "zero", or of all shapes). Answers are single words from
`ANSWERS`, the fixed vocabulary a QA head classifies into.
"""

from __future__ import annotations

import random
from collections import Counter

from vlforge.world.captions import PLURALS
from vlforge.world.scene import COLOURS, SHAPES, Scene

NUMBER_WORDS = ("zero", "one", "two", "three", "four")
ANSWERS: tuple[str, ...] = (*COLOURS, *SHAPES, *NUMBER_WORDS)


def all_questions(scene: Scene) -> list[dict[str, str]]:
    """Every question the scene answers: {"question", "answer", "kind"} (colour/shape/count)."""
    objects = scene.objects
    shapes = Counter(o.shape for o in objects)
    colours = Counter(o.colour for o in objects)
    out: list[dict[str, str]] = []
    for shape, n in shapes.items():
        hues = {o.colour for o in objects if o.shape == shape}
        if len(hues) == 1:
            q = (
                f"what colour is the {shape}?"
                if n == 1
                else f"what colour are the {PLURALS[shape]}?"
            )
            out.append({"question": q, "answer": hues.pop(), "kind": "colour"})
    for colour, n in colours.items():
        if n == 1:
            shape = next(o.shape for o in objects if o.colour == colour)
            q = f"what shape is the {colour} object?"
            out.append({"question": q, "answer": shape, "kind": "shape"})
    for shape in SHAPES:
        q = f"how many {PLURALS[shape]} are there?"
        out.append({"question": q, "answer": NUMBER_WORDS[shapes[shape]], "kind": "count"})
    q = "how many shapes are there?"
    out.append({"question": q, "answer": NUMBER_WORDS[len(objects)], "kind": "count"})
    return out


def scene_questions(scene: Scene, rng: random.Random, limit: int = 4) -> list[dict[str, str]]:
    """Up to `limit` of the scene's questions: one of each kind first, then others at random.

    Counts of absent shapes are most of the pool; drawing by kind keeps colour and shape
    questions from being crowded out."""
    pool = all_questions(scene)
    rng.shuffle(pool)
    first = [next(q for q in pool if q["kind"] == k) for k in ("colour", "shape", "count")
             if any(q["kind"] == k for q in pool)]  # fmt: skip
    rest = [q for q in pool if q not in first]
    return (first + rest)[:limit]
