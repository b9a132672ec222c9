"""Captions of a scene from varied templates, each with the scene graph of exactly what it says.

The graph is the truth the text parser is scored against (featurize/scene_graph.py), so it follows
the parser's conventions: objects in order of mention with a count ("two hearts" -> count 2),
colours, sizes and background textures as attributes, and canonical relation names. A background
mentioned as "on a striped background" is an object ("background") that every listed group is
"on"; "The background is striped." is the same object without a relation. Nothing unmentioned
appears in the graph, and everything a caption says is true of its scene.

Templates vary sentence shape (phrase, "There is", verb, participle, list, "A picture of",
coordination, two sentences with a definite back-reference) so that exact caption repeats stay
rare: the crawler drops exact duplicate captions, and clean rows are meant to survive.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from vlforge.world.scene import Scene, relation_of

PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "hexagon": "hexagons",
    "heart": "hearts",
}
NUMBERS = {2: "two", 3: "three", 4: "four"}
# Phrase -> canonical relation name, per geometric relation of subject to object.
RELATION_PHRASES: dict[str, tuple[tuple[str, str], ...]] = {
    "left of": (
        ("to the left of", "left of"),
        ("on the left of", "left of"),
        ("next to", "next to"),
        ("beside", "next to"),
    ),
    "right of": (
        ("to the right of", "right of"),
        ("on the right of", "right of"),
        ("next to", "next to"),
        ("beside", "next to"),
    ),
    "above": (("above", "above"), ("over", "above")),
    "below": (("below", "below"),),
}
VERBS = ("sits", "is", "lies", "stands")
PARTICIPLES = ("sitting", "lying", "placed")
PICTURE_WORDS = ("photo", "picture", "image")
BACKGROUND_LEADS = ("The background is",)
SHORTEST = 10  # words; shorter captions get a sentence about the background


class _Graph:
    """Collects the caption's objects, attributes and relations in order of mention."""

    def __init__(self) -> None:
        self.objects: list[dict] = []
        self.attributes: list[dict] = []
        self.relations: list[dict] = []

    def add(self, name: str, attributes: list[str], count: int = 1) -> int:
        oid = len(self.objects)
        self.objects.append({"id": oid, "name": name, "count": count})
        self.attributes.extend({"object": oid, "name": a} for a in attributes)
        return oid

    def relate(self, subject: int, name: str, obj: int) -> None:
        self.relations.append({"subject": subject, "name": name, "object": obj})

    def as_dict(self) -> dict:
        return {"objects": self.objects, "attributes": self.attributes, "relations": self.relations}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(scene: Scene, i: int, rng: random.Random, graph: _Graph) -> tuple[str, int]:
    """A singular noun phrase for object i ("a small red circle"); returns (text, caption id)."""
    obj = scene.objects[i]
    words = []
    if rng.random() < 0.5:
        words.append(obj.size)
    if len(scene.objects) == 1 or rng.random() < 0.85:  # lone shapes always say their colour
        words.append(obj.colour)
    words.append(obj.shape)
    text = f"{_article(words[0])} {' '.join(words)}"
    return text, graph.add(obj.shape, words[:-1])


def _groups(scene: Scene, rng: random.Random) -> list[list[int]]:
    """Objects grouped by (shape, colour), in a random order: the units a list can count."""
    by_key: dict[tuple[str, str], list[int]] = {}
    for i, obj in enumerate(scene.objects):
        by_key.setdefault((obj.shape, obj.colour), []).append(i)
    groups = list(by_key.values())
    rng.shuffle(groups)
    return groups


def _group_np(
    scene: Scene, members: list[int], rng: random.Random, graph: _Graph
) -> tuple[str, int]:
    if len(members) == 1:
        return _np(scene, members[0], rng, graph)
    first = scene.objects[members[0]]
    words = []
    sizes = {scene.objects[m].size for m in members}
    if len(sizes) == 1 and rng.random() < 0.5:
        words.append(first.size)
    words.append(first.colour)  # counted groups always name the colour that makes them a group
    text = f"{NUMBERS[len(members)]} {' '.join(words)} {PLURALS[first.shape]}"
    return text, graph.add(first.shape, words, count=len(members))


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _relation(scene: Scene, i: int, j: int, rng: random.Random) -> tuple[str, str]:
    """(phrase, canonical name) for object i relative to object j."""
    return rng.choice(RELATION_PHRASES[relation_of(scene, i, j)])


def _background(scene: Scene, graph: _Graph, rng: random.Random) -> tuple[str, int]:
    word = scene.background.word
    return f"{_article(word)} {word} background", graph.add("background", [word])


def _background_sentence(scene: Scene, g: _Graph, rng: random.Random, p: float = 0.5) -> str:
    """ " The background is dotted." (with a leading space) or ""; one-shape scenes always get it,
    because a bare "There is a pink heart." repeats too often."""
    if len(scene.objects) > 1 and rng.random() >= p:
        return ""
    words = [scene.background.word]
    # Half the time the tone too ("dark and striped"): more variety, fewer repeated captions.
    # Only in this coordinated form, the one the parser reads reliably ("a dark striped
    # background" loses "dark"; "light and speckled" loses "speckled").
    if scene.background.tone and scene.background.texture != "noise" and rng.random() < 0.5:
        words.insert(0, scene.background.tone)
    g.add("background", words)
    return f" {rng.choice(BACKGROUND_LEADS)} {' and '.join(words)}."


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def _styled(text: str, rng: random.Random, background: tuple[Scene, _Graph] | None = None) -> str:
    """Half the phrase captions are written as sentences, half as lower-case alt text; a sentence
    may be followed by one about the `background` (scene, graph) when given."""
    if rng.random() < 0.5:
        return text
    return _sentence(text) + (_background_sentence(*background, rng, 0.4) if background else "")


# ---- templates: each returns the caption, filling `graph` as it goes ---------------------------


def _list_on_background(scene: Scene, rng: random.Random, g: _Graph) -> str:
    parts, ids = zip(*(_group_np(scene, m, rng, g) for m in _groups(scene, rng)), strict=True)
    bg_text, bg = _background(scene, g, rng)
    for oid in ids:
        g.relate(oid, "on", bg)
    return _styled(f"{_join(list(parts))} on {bg_text}", rng)


def _there_is_list(scene: Scene, rng: random.Random, g: _Graph) -> str:
    groups = _groups(scene, rng)
    parts = [_group_np(scene, m, rng, g)[0] for m in groups]
    verb = "is" if len(groups[0]) == 1 else "are"
    return f"There {verb} {_join(parts)}.{_background_sentence(scene, g, rng)}"


def _picture_of(scene: Scene, rng: random.Random, g: _Graph) -> str:
    word = rng.choice(PICTURE_WORDS)
    parts, ids = zip(*(_group_np(scene, m, rng, g) for m in _groups(scene, rng)), strict=True)
    bg_text, bg = _background(scene, g, rng)
    for oid in ids:
        g.relate(oid, "on", bg)
    # Always with the background: "a photo of two red squares" alone reads as Pidgin to langid.
    return _styled(f"{_article(word)} {word} of {_join(list(parts))} on {bg_text}", rng)


def _shows_list(scene: Scene, rng: random.Random, g: _Graph) -> str:
    parts = [_group_np(scene, m, rng, g)[0] for m in _groups(scene, rng)]
    lead = rng.choice(("This image shows", "The picture shows", "This photo shows"))
    return f"{lead} {_join(parts)}.{_background_sentence(scene, g, rng)}"


def _pair(scene: Scene, rng: random.Random) -> tuple[int, int]:
    i, j = rng.sample(range(len(scene.objects)), 2)
    return i, j


def _phrase_relation(scene: Scene, rng: random.Random, g: _Graph) -> str:
    i, j = _pair(scene, rng)
    a, ia = _np(scene, i, rng, g)
    phrase, name = _relation(scene, i, j, rng)
    b, ib = _np(scene, j, rng, g)
    g.relate(ia, name, ib)
    return _styled(f"{a} {phrase} {b}", rng, (scene, g))


def _there_is_relation(scene: Scene, rng: random.Random, g: _Graph) -> str:
    i, j = _pair(scene, rng)
    a, ia = _np(scene, i, rng, g)
    phrase, name = _relation(scene, i, j, rng)
    b, ib = _np(scene, j, rng, g)
    g.relate(ia, name, ib)
    return f"There is {a} {phrase} {b}.{_background_sentence(scene, g, rng, 0.4)}"


def _verb_relation(scene: Scene, rng: random.Random, g: _Graph) -> str:
    i, j = _pair(scene, rng)
    a, ia = _np(scene, i, rng, g)
    phrase, name = _relation(scene, i, j, rng)
    b, ib = _np(scene, j, rng, g)
    g.relate(ia, name, ib)
    return _styled(f"{a} {rng.choice(VERBS)} {phrase} {b}", rng, (scene, g))


def _participle_relation(scene: Scene, rng: random.Random, g: _Graph) -> str:
    i, j = _pair(scene, rng)
    a, ia = _np(scene, i, rng, g)
    phrase, name = _relation(scene, i, j, rng)
    b, ib = _np(scene, j, rng, g)
    g.relate(ia, name, ib)
    return _styled(f"{a} {rng.choice(PARTICIPLES)} {phrase} {b}", rng, (scene, g))


def _relation_then_background(scene: Scene, rng: random.Random, g: _Graph) -> str:
    i, j = _pair(scene, rng)
    a, ia = _np(scene, i, rng, g)
    phrase, name = _relation(scene, i, j, rng)
    b, ib = _np(scene, j, rng, g)
    g.relate(ia, name, ib)
    return f"{_sentence(f'{a} is {phrase} {b}')}{_background_sentence(scene, g, rng, 1.0)}"


def _shared_relation(scene: Scene, rng: random.Random, g: _Graph) -> str | None:
    """ "a red circle and a blue star above a green square": both subjects share the phrase."""
    n = len(scene.objects)
    for _ in range(6):
        i, j, k = rng.sample(range(n), 3)
        if relation_of(scene, i, k) != relation_of(scene, j, k):
            continue
        a, ia = _np(scene, i, rng, g)
        b, ib = _np(scene, j, rng, g)
        phrase, name = _relation(scene, i, k, rng)
        c, ic = _np(scene, k, rng, g)
        g.relate(ia, name, ic)
        g.relate(ib, name, ic)
        return _styled(f"{a} and {b} {phrase} {c}", rng, (scene, g))
    return None


def _two_sentences(scene: Scene, rng: random.Random, g: _Graph) -> str | None:
    """Second sentence refers back with "The <shape>", which the parser merges with the first."""
    i, j, k = rng.sample(range(len(scene.objects)), 3)
    shape_i, shape_j = scene.objects[i].shape, scene.objects[j].shape
    if shape_i == shape_j:
        return None
    a, ia = _np(scene, i, rng, g)
    phrase, name = _relation(scene, i, j, rng)
    b, ib = _np(scene, j, rng, g)
    g.relate(ia, name, ib)
    phrase2, name2 = _relation(scene, j, k, rng)
    c, ic = _np(scene, k, rng, g)
    g.relate(ib, name2, ic)
    return f"{_sentence(f'{a} is {phrase} {b}')} The {shape_j} is {phrase2} {c}."


def _counted_relation(scene: Scene, rng: random.Random, g: _Graph) -> str | None:
    """ "two yellow hearts above a blue square": only when every member stands in that relation."""
    for members in _groups(scene, rng):
        if len(members) < 2:
            continue
        others = [k for k in range(len(scene.objects)) if k not in members]
        if not others:
            return None
        k = rng.choice(others)
        names = {relation_of(scene, m, k) for m in members}
        if len(names) != 1:
            return None
        phrase, name = _relation(scene, members[0], k, rng)
        a, ia = _group_np(scene, members, rng, g)
        c, ic = _np(scene, k, rng, g)
        g.relate(ia, name, ic)
        return _styled(f"{a} {phrase} {c}", rng, (scene, g))
    return None


Template = Callable[[Scene, random.Random, _Graph], "str | None"]
# (template, minimum number of objects, weight)
TEMPLATES: tuple[tuple[Template, int, float], ...] = (
    (_list_on_background, 1, 1.0),
    (_there_is_list, 1, 0.6),
    (_picture_of, 1, 0.8),
    (_shows_list, 1, 0.6),
    (_phrase_relation, 2, 1.2),
    (_there_is_relation, 2, 0.8),
    (_verb_relation, 2, 1.0),
    (_participle_relation, 2, 0.5),
    (_relation_then_background, 2, 0.8),
    (_shared_relation, 3, 0.8),
    (_two_sentences, 3, 0.8),
    (_counted_relation, 3, 1.2),
)


def caption_scene(scene: Scene, rng: random.Random) -> tuple[str, dict]:
    """A caption of `scene` and its scene graph; `rng` picks the template and the wording."""
    n = len(scene.objects)
    usable = [(t, w) for t, minimum, w in TEMPLATES if n >= minimum]
    for _ in range(8):
        template = rng.choices([t for t, _ in usable], [w for _, w in usable])[0]
        graph = _Graph()
        text = template(scene, rng, graph)
        if text is None:
            continue
        if len(text.split()) < SHORTEST and "background" not in text:
            # Short verbless phrases ("a pink star beside a star") both repeat often and read as
            # Pidgin or Indonesian to a language identifier: lengthen them with the background.
            text = text if text.endswith(".") else _sentence(text)
            text += _background_sentence(scene, graph, rng, 1.0)
        return text, graph.as_dict()
    graph = _Graph()  # every scene has at least one object, so the list template always works
    return _list_on_background(scene, rng, graph), graph.as_dict()


# ---- captions of the mess: too short, not English -----------------------------------------------


def short_caption(scene: Scene, rng: random.Random) -> tuple[str, dict]:
    """At most five characters ("star", "red"): what a crawler's caption-length filter drops."""
    shapes = [o.shape for o in scene.objects if len(o.shape) <= 5]
    if shapes:
        name = rng.choice(shapes)
        return name, {
            "objects": [{"id": 0, "name": name, "count": 1}],
            "attributes": [],
            "relations": [],
        }
    colours = [o.colour for o in scene.objects if len(o.colour) <= 5]
    return (rng.choice(colours) if colours else "shape"), _Graph().as_dict()


# Foreign words: (masculine?, noun) per shape, and (masculine, feminine) colour forms.
_FOREIGN = {
    "fr": {
        "shapes": {
            "circle": (True, "cercle"),
            "square": (True, "carré"),
            "triangle": (True, "triangle"),
            "star": (False, "étoile"),
            "hexagon": (True, "hexagone"),
            "heart": (True, "cœur"),
        },
        "colours": {
            "red": ("rouge", "rouge"),
            "orange": ("orange", "orange"),
            "yellow": ("jaune", "jaune"),
            "green": ("vert", "verte"),
            "blue": ("bleu", "bleue"),
            "purple": ("violet", "violette"),
            "pink": ("rose", "rose"),
            "brown": ("marron", "marron"),
        },
    },
    "es": {
        "shapes": {
            "circle": (True, "círculo"),
            "square": (True, "cuadrado"),
            "triangle": (True, "triángulo"),
            "star": (False, "estrella"),
            "hexagon": (True, "hexágono"),
            "heart": (True, "corazón"),
        },
        "colours": {
            "red": ("rojo", "roja"),
            "orange": ("naranja", "naranja"),
            "yellow": ("amarillo", "amarilla"),
            "green": ("verde", "verde"),
            "blue": ("azul", "azul"),
            "purple": ("morado", "morada"),
            "pink": ("rosa", "rosa"),
            "brown": ("marrón", "marrón"),
        },
    },
    "de": {
        "shapes": {
            "circle": (True, "Kreis"),
            "square": (False, "Quadrat"),
            "triangle": (False, "Dreieck"),
            "star": (True, "Stern"),
            "hexagon": (False, "Sechseck"),
            "heart": (False, "Herz"),
        },
        "colours": {
            "red": ("Rot", "Rot"),
            "orange": ("Orange", "Orange"),
            "yellow": ("Gelb", "Gelb"),
            "green": ("Grün", "Grün"),
            "blue": ("Blau", "Blau"),
            "purple": ("Lila", "Lila"),
            "pink": ("Rosa", "Rosa"),
            "brown": ("Braun", "Braun"),
        },
    },
}


def _foreign_np(lang: str, shape: str, colour: str) -> str:
    masculine, noun = _FOREIGN[lang]["shapes"][shape]
    colour_m, colour_f = _FOREIGN[lang]["colours"][colour]
    if lang == "de":  # "ein Kreis in Rot" avoids adjective declension
        return f"{'ein' if masculine else 'ein'} {noun} in {colour_m}"
    article = ("un" if masculine else "une") if lang == "fr" else ("un" if masculine else "una")
    return f"{article} {noun} {colour_m if masculine else colour_f}"


def foreign_caption(scene: Scene, rng: random.Random) -> tuple[str, dict]:
    """A French, Spanish or German sentence naming the scene's shapes and colours."""
    lang = rng.choice(("fr", "es", "de"))
    graph = _Graph()
    parts = []
    for obj in scene.objects[:3]:
        parts.append(_foreign_np(lang, obj.shape, obj.colour))
        graph.add(obj.shape, [obj.colour])
    joiner = {"fr": " et ", "es": " y ", "de": " und "}[lang]
    listed = ", ".join(parts[:-1]) + joiner + parts[-1] if len(parts) > 1 else parts[0]
    if lang == "fr":
        text = rng.choice(
            ("Il y a {} sur ce dessin.", "Sur cette image, on voit {}.", "Voici {} avec le fond.")
        )
    elif lang == "es":
        text = rng.choice(
            (
                "En esta imagen hay {}.",
                "Aquí se ve {} sobre el fondo.",
                "La foto muestra {} juntos.",
            )
        )
    else:
        text = rng.choice(
            (
                "Auf dem Bild sieht man {}.",
                "Hier ist {} auf dem Hintergrund zu sehen.",
                "Das Foto zeigt {} nebeneinander.",
            )
        )
    return text.format(listed), graph.as_dict()
