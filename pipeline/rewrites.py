"""Rewritten hard negatives (UNIMO): swap one object, attribute or relation of a caption.

The caption's scene graph (featurize's sg.json) says which tokens name each slot; we replace
exactly those characters, so the rest of the sentence is untouched. The replacement is a value of
the same kind seen in the corpus, written the way the corpus writes it (its commonest surface
form: "to the left of" for "left of", "circles" for a plural "circle"), with the article before it
re-agreed ("a red" → "an orange").

Swaps that could still be true of the image are not made: an object already in the caption or
among the image's detected tags, an attribute the object already has (or the detector gives it),
a relation that the original one implies or nearly implies ("left of" → "next to").
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable
from itertools import accumulate
from typing import Any

import numpy as np

KINDS = ("object", "attribute", "relation")

# Attributes swap only within their category: "a big red circle" → "a big blue circle", never
# "a big small circle". Words outside the lexicon form one "other" category.
ATTRIBUTE_CATEGORIES: dict[str, frozenset[str]] = {
    "colour": frozenset(
        [
            "red",
            "green",
            "blue",
            "yellow",
            "orange",
            "purple",
            "pink",
            "brown",
            "black",
            "white",
            "gray",
            "grey",
            "silver",
            "gold",
            "golden",
            "beige",
            "tan",
            "navy",
            "teal",
            "maroon",
            "violet",
            "cyan",
            "magenta",
            "turquoise",
        ]
    ),
    "size": frozenset(
        [
            "big",
            "small",
            "large",
            "tiny",
            "huge",
            "little",
            "medium",
            "giant",
            "short",
            "tall",
            "long",
        ]
    ),
    "material": frozenset(
        ["wood", "wooden", "metal", "brick", "stone", "plastic", "leather", "steel", "concrete"]
    ),
    "texture": frozenset(["striped", "dotted", "plain", "checkered", "spotted", "patterned"]),
}
# Relations whose truth often comes with the original's: swapping to them is no safe negative.
RELATION_FAMILIES = (
    frozenset({"above", "on", "over", "on top of"}),
    frozenset({"below", "under", "beneath", "underneath"}),
)
NEARNESS = frozenset({"near", "next to", "beside", "by", "with"})
MIN_COUNT = 2  # a value seen once may be a parse error; do not spread it


_CATEGORY_OF: dict[str, str] = {}
for _category, _words in ATTRIBUTE_CATEGORIES.items():
    for _word in _words:
        _CATEGORY_OF.setdefault(_word, _category)


def attribute_category(name: str) -> str:
    return _CATEGORY_OF.get(name, "other")


def relation_compatible(original: str, candidate: str) -> bool:
    """May `candidate` be true whenever `original` is? Then it is no negative."""
    if candidate == original or candidate in NEARNESS:
        return False
    if original in NEARNESS:
        return False  # "next to" names no side: whichever side we name may be the true one
    return not any(original in family and candidate in family for family in RELATION_FAMILIES)


# ---- text surgery -------------------------------------------------------------------------


def token_offsets(caption: str, tokens: list[Any]) -> list[tuple[int, int]] | None:
    """Character (start, end) of each token, found in order; None if the tokens do not fit."""
    lowered = caption.lower()
    offsets = []
    cursor = 0
    for token in tokens:
        text = token if isinstance(token, str) else str(token.get("text", ""))
        text = text.strip().lower()
        if not text:
            offsets.append((cursor, cursor))
            continue
        start = lowered.find(text, cursor)
        if start < 0:
            return None
        offsets.append((start, start + len(text)))
        cursor = start + len(text)
    return offsets


_AN_EXCEPTIONS = re.compile(r"^(hour|honest|honou?r|heir|herb)", re.I)
_A_EXCEPTIONS = re.compile(
    r"^(one|once|uni|use|usu|ute|uk|eu|ewe|ubiq|u[bcfhjkqrstn][aeiou])", re.I
)


def indefinite_article(word: str) -> str:
    """'a' or 'an' before `word`, by its first sound as far as spelling tells."""
    if not word:
        return "a"
    if _AN_EXCEPTIONS.match(word):
        return "an"
    if _A_EXCEPTIONS.match(word):
        return "a"
    if word[0].isdigit():
        return "an" if word[0] == "8" or word.startswith(("11", "18")) else "a"
    return "an" if word[0].lower() in "aeiou" else "a"


_PREV_WORD = re.compile(r"(\b[Aa][Nn]?)(\s+)$")


def replace_span(caption: str, start: int, end: int, new: str) -> tuple[str, int, int]:
    """caption with [start, end) replaced by `new`, the article before it fixed.

    Returns (text, new_start, new_end): where `new` now sits.
    """
    if caption[start:end][:1].isupper():
        new = new[:1].upper() + new[1:]
    head, tail = caption[:start], caption[end:]
    match = _PREV_WORD.search(head)
    if match:
        old = match.group(1)
        article = indefinite_article(new.split(" ", 1)[0])
        if old[0].isupper():
            article = article.capitalize()
        head = head[: match.start(1)] + article + match.group(2)
    text = head + new + tail
    return text, len(head), len(head) + len(new)


def pluralize(noun: str) -> str:
    """A fallback when the corpus never wrote the plural: the regular English rules."""
    last = noun.rsplit(" ", 1)[-1]
    stem = noun[: len(noun) - len(last)]
    if re.search(r"(s|x|z|ch|sh)$", last):
        return stem + last + "es"
    if re.search(r"[^aeiou]y$", last):
        return stem + last[:-1] + "ies"
    return stem + last + "s"


# ---- the corpus's values ------------------------------------------------------------------


def slot_surfaces(caption: str, sg: dict) -> list[tuple[str, str, str, str]]:
    """(kind, name, form, surface) for every slot of one caption; form is singular/plural/-."""
    offsets = token_offsets(caption, sg.get("tokens") or [])
    if offsets is None:
        return []
    out = []
    counts = {o["id"]: o.get("count", 1) for o in sg.get("objects", [])}

    def text(span) -> str | None:
        s, e = span
        if not 0 <= s < e <= len(offsets):
            return None
        return caption[offsets[s][0] : offsets[e - 1][1]].lower()

    for obj in sg.get("objects", []):
        if "span" in obj and (surface := text(obj["span"])):
            form = "plural" if obj.get("count", 1) != 1 else "singular"
            out.append(("object", obj["name"], form, surface))
    for attr in sg.get("attributes", []):
        if "span" in attr and (surface := text(attr["span"])) and attr["object"] in counts:
            out.append(("attribute", attr["name"], "-", surface))
    for rel in sg.get("relations", []):
        if "span" in rel and (surface := text(rel["span"])):
            out.append(("relation", rel["name"], "-", surface))
    return out


class SlotVocabulary:
    """Values of each kind seen in the corpus, with how often each surface form was written.

    Held as plain dicts ({kind: {name: {form: {surface: count}}}}) so Beam can ship it.
    """

    def __init__(self, table: dict | None = None):
        self.table: dict = table or {kind: {} for kind in KINDS}
        self._names: dict[str, list[str]] = {}  # cached by names(); add() clears it
        self._counts: dict[tuple[str, str], int] = {}  # cached by count(); add() clears it
        # Per-sample rewriting filters the same lists again and again: the parts that depend
        # only on the vocabulary are cached here (add() clears them).
        self._options: dict[tuple[str, str], list[str]] = {}
        self._surfaces: dict[tuple[str, str, str], str] = {}

    def add(self, kind: str, name: str, form: str, surface: str, count: int = 1) -> None:
        self._names.clear()
        self._counts.clear()
        self._options.clear()
        self._surfaces.clear()
        forms = self.table[kind].setdefault(name, {})
        surfaces = forms.setdefault(form, {})
        surfaces[surface] = surfaces.get(surface, 0) + count

    def merge(self, other: SlotVocabulary) -> SlotVocabulary:
        for kind, names in other.table.items():
            for name, forms in names.items():
                for form, surfaces in forms.items():
                    for surface, count in surfaces.items():
                        self.add(kind, name, form, surface, count)
        return self

    @classmethod
    def from_captions(cls, pairs: Iterable[tuple[str, dict]]) -> SlotVocabulary:
        vocab = cls()
        for caption, sg in pairs:
            for kind, name, form, surface in slot_surfaces(caption, sg):
                vocab.add(kind, name, form, surface)
        return vocab

    def count(self, kind: str, name: str) -> int:
        # Cached: rewriting weighs every option by its count, for every sample.
        cached = self._counts.get((kind, name))
        if cached is None:
            forms = self.table[kind].get(name, {}).values()
            cached = self._counts[(kind, name)] = sum(sum(s.values()) for s in forms)
        return cached

    def names(self, kind: str) -> list[str]:
        """Values seen at least MIN_COUNT times, sorted (a deterministic order)."""
        if kind not in self._names:
            names = self.table[kind]
            self._names[kind] = sorted(n for n in names if self.count(kind, n) >= MIN_COUNT)
        return self._names[kind]

    def attributes_in(self, category: str) -> list[str]:
        """names("attribute") of one category, in the same order."""
        key = ("attribute", category)
        if key not in self._options:
            self._options[key] = [
                n for n in self.names("attribute") if attribute_category(n) == category
            ]
        return self._options[key]

    def relations_for(self, original: str) -> list[str]:
        """names("relation") that may replace `original` (see relation_compatible)."""
        key = ("relation", original)
        if key not in self._options:
            self._options[key] = [
                n for n in self.names("relation") if relation_compatible(original, n)
            ]
        return self._options[key]

    def surface(self, kind: str, name: str, form: str = "-") -> str:
        """The commonest written form; for an unseen plural, the regular plural of the name."""
        key = (kind, name, form)
        if key not in self._surfaces:
            surfaces = self.table[kind].get(name, {}).get(form)
            if surfaces:
                best = min(surfaces.items(), key=lambda kv: (-kv[1], kv[0]))[0]
            elif kind == "object" and form == "plural":
                best = pluralize(name)
            else:
                best = name
            self._surfaces[key] = best
        return self._surfaces[key]


# ---- rewriting ----------------------------------------------------------------------------


def _choose(rng: np.random.Generator, vocab: SlotVocabulary, kind: str, options: list[str]):
    """One option, drawn with probability proportional to its corpus count.

    The same draw as rng.choice(len(options), p=weights / weights.sum()) (one rng.random(),
    the same float operations, so the same answer and rng state) without its per-call
    validation, which cost more than the rest of a rewrite at a million samples.
    """
    if not options:
        return None
    weights = [float(vocab.count(kind, o)) for o in options]
    total = sum(weights)  # integer counts: exact in any summation order, as numpy's sum is
    cdf = list(accumulate(w / total for w in weights))  # np.cumsum adds in this order too
    last = cdf[-1]
    return options[bisect_right([c / last for c in cdf], rng.random())]


def rewrite(
    caption: str,
    sg: dict,
    vocab: SlotVocabulary,
    rng: np.random.Generator,
    kinds: Iterable[str] = KINDS,
    per_kind: int = 1,
    image_tags: dict | None = None,
    detectable: set[str] | None = None,
) -> list[dict]:
    """Up to `per_kind` rewrites of each kind, each changing exactly one slot.

    Each is {"caption", "kind", "slot" (index in sg's list of that kind), "from", "to",
    "span" (characters of the new words)}.
    """
    offsets = token_offsets(caption, sg.get("tokens") or [])
    if offsets is None:
        return []
    objects = {o["id"]: o for o in sg.get("objects", [])}
    caption_objects = {o["name"] for o in objects.values()}
    tag_objects, tag_attributes = _tag_sets(image_tags)
    # With the detector's evidence, swap only what it can vouch for: objects it has classes for
    # (never "background" into "circle"), and attributes/relations of objects the image has one
    # of (with two circles, "the blue circle" may be the other one).
    checked = image_tags is not None and detectable is not None
    in_image: Counter = Counter()
    for tag in (image_tags or {}).get("tags", []):
        # tags.json lists a name once with its detected instances (`count`, 1 in older shards):
        # with two hexagons, recolouring "the hexagon" may describe the other one.
        in_image[str(tag.get("name"))] += tag_count(tag)
    in_caption: Counter = Counter()
    for obj in objects.values():
        in_caption[obj["name"]] += int(obj.get("count", 1))

    def vouched(object_id) -> bool:
        name = objects.get(object_id, {}).get("name")
        if not checked:
            return name is not None
        return name in detectable and in_image[name] == 1 and in_caption[name] == 1

    out: list[dict] = []

    def chars(span) -> tuple[int, int] | None:
        s, e = span
        if not 0 <= s < e <= len(offsets):
            return None
        return offsets[s][0], offsets[e - 1][1]

    for kind in kinds:
        slots = {"object": "objects", "attribute": "attributes", "relation": "relations"}[kind]
        entries = [(i, x) for i, x in enumerate(sg.get(slots, [])) if "span" in x]
        order = rng.permutation(len(entries)) if entries else []
        made = 0
        for j in order:
            if made >= per_kind:
                break
            slot, entry = entries[int(j)]
            where = chars(entry["span"])
            if where is None:
                continue
            name = entry["name"]
            if kind == "object":
                if checked and name not in detectable:
                    continue
                options = [
                    n
                    for n in vocab.names("object")
                    if n not in caption_objects
                    and n not in tag_objects
                    and (not checked or n in detectable)
                ]
                form = "plural" if entry.get("count", 1) != 1 else "singular"
            elif kind == "attribute":
                owner = objects.get(entry["object"])
                if owner is None or not vouched(entry["object"]):
                    continue
                taken = {
                    a["name"]
                    for a in sg.get("attributes", [])
                    if objects.get(a["object"], {}).get("name") == owner["name"]
                }
                taken |= tag_attributes.get(owner["name"], set())
                options = [
                    n for n in vocab.attributes_in(attribute_category(name)) if n not in taken
                ]
                form = "-"
            else:
                if not (vouched(entry["subject"]) and vouched(entry["object"])):
                    continue
                options = vocab.relations_for(name)
                form = "-"
            new = _choose(rng, vocab, kind, options)
            if new is None:
                continue
            text, s, e = replace_span(caption, *where, vocab.surface(kind, new, form))
            out.append(
                {
                    "caption": text,
                    "kind": kind,
                    "slot": slot,
                    "from": name,
                    "to": new,
                    "span": [s, e],
                }
            )
            made += 1
    return out


def tag_count(tag: dict) -> int:
    """How many instances a tags.json entry stands for.

    featurize lists each class name once with `count`, its detected objects; shards written
    before that field have one entry per name, i.e. a count of 1.
    """
    try:
        count = int(tag.get("count", 1))
    except (TypeError, ValueError):
        return 1
    return max(1, count)


def _tag_sets(tags: dict | None) -> tuple[set[str], dict[str, set[str]]]:
    objects: set[str] = set()
    attributes: dict[str, set[str]] = {}
    for tag in (tags or {}).get("tags", []):
        objects.add(tag["name"])
        names = {a if isinstance(a, str) else a.get("name", "") for a in tag.get("attributes", [])}
        attributes.setdefault(tag["name"], set()).update(names)
    return objects, attributes


def apply_edit(sg: dict, edit: dict) -> dict:
    """The scene graph a rewrite claims: sg with the one slot renamed."""
    slots = {"object": "objects", "attribute": "attributes", "relation": "relations"}[edit["kind"]]
    out = {k: [dict(x) for x in sg.get(k, [])] for k in ("objects", "attributes", "relations")}
    out[slots][edit["slot"]]["name"] = edit["to"]
    return out
