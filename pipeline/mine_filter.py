"""certainly_false (mine_stage) for many (sample, candidate caption) pairs at once, in numpy.

Calling the Python check once per candidate was the stage's largest cost (64 candidates per
sample). The rules are the same, restated over integer codes so that a shard's pairs are
checked with a few array operations:

- objects: a claim (name, count) is false when the image has fewer than max(1, min(count, 2))
  of that name, where the image's number is the larger of the tag's `count` and the own
  caption's count;
- attributes: a claim (name, attr) about a name the image has exactly one of is false when the
  sample already knows (own caption or tags) another attribute of that name in attr's category,
  and not attr itself;
- relations: a claim (a, r, b) between two once-present names a ≠ b is false when the sample's
  own caption has (a, r', b) with r ∈ OPPOSITE[r'], or (b, r, a) with r asymmetric.

Candidates are restricted to the detector's names first, and a candidate with no object left
is never false, as in certainly_false. Samples without tags take the Python path (the subgraph
rule), which is rare and needs no vectors. tests/test_mine_filter.py checks both agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from vlforge.pipeline.rewrites import ATTRIBUTE_CATEGORIES, tag_count

# Compact graphs: names resolved, as in mine_stage._graph.
# (((name, count), ...), ((name, attr), ...), ((subject, relation, object), ...))
Graph = tuple[
    tuple[tuple[str, int], ...], tuple[tuple[str, str], ...], tuple[tuple[str, str, str], ...]
]

CATEGORY_OF = {w: c for c, words in ATTRIBUTE_CATEGORIES.items() for w in words}
ATTRS = sorted(CATEGORY_OF)
ATTR_ID = {a: i for i, a in enumerate(ATTRS)}
CATEGORIES = sorted(ATTRIBUTE_CATEGORIES)
ATTR_CATEGORY = np.array([CATEGORIES.index(CATEGORY_OF[a]) for a in ATTRS], np.int64)


def compact_graph(sg: dict | None) -> Graph | None:
    """sg.json → names-only graph (what certainly_false reads), small enough to ship per sample."""
    if not sg:
        return None
    names = {o["id"]: o["name"] for o in sg.get("objects", [])}
    counts: dict[str, int] = {}
    for obj in sg.get("objects", []):
        counts[obj["name"]] = counts.get(obj["name"], 0) + int(obj.get("count", 1))
    attrs = tuple(
        (names[a["object"]], a["name"]) for a in sg.get("attributes", []) if a["object"] in names
    )
    rels = tuple(
        (names[r["subject"]], r["name"], names[r["object"]])
        for r in sg.get("relations", [])
        if r["subject"] in names and r["object"] in names
    )
    return tuple(counts.items()), attrs, rels


def as_sg(graph: Graph | None) -> dict | None:
    """A compact graph back as an sg dict (ids invented) for the Python certainly_false."""
    if graph is None:
        return None
    objs, attrs, rels = graph
    ids = {name: i for i, (name, _) in enumerate(objs)}
    return {
        "objects": [{"id": ids[n], "name": n, "count": c} for n, c in objs],
        "attributes": [{"object": ids[n], "name": a} for n, a in attrs if n in ids],
        "relations": [
            {"subject": ids[s], "name": r, "object": ids[o]}
            for s, r, o in rels
            if s in ids and o in ids
        ],
    }


class Relations:
    """Relation names that can contradict, and for each, which own relations contradict it."""

    def __init__(self, opposite: dict[str, set[str]], asymmetric: Iterable[str]):
        self.names = sorted(set(opposite) | {r for v in opposite.values() for r in v})
        self.id = {r: i for i, r in enumerate(self.names)}
        asym = set(asymmetric)
        # (claim relation id, own relation id, reversed?) rows
        rows = []
        for r in self.names:
            for own, opposites in sorted(opposite.items()):
                if r in opposites:
                    rows.append((self.id[r], self.id[own], 0))
            if r in asym:
                rows.append((self.id[r], self.id[r], 1))
        table = np.array(rows, np.int64).reshape(-1, 3)
        order = np.argsort(table[:, 0], kind="stable")
        self.table = table[order]
        self.ptr = np.searchsorted(self.table[:, 0], np.arange(len(self.names) + 1))


@dataclass
class Claims:
    """Each candidate text's checkable claims, CSR by text row, over detectable name ids."""

    has_objects: np.ndarray  # bool per row: any detectable object (else never false)
    obj_ptr: np.ndarray
    obj_name: np.ndarray
    obj_need: np.ndarray
    attr_ptr: np.ndarray
    attr_name: np.ndarray
    attr_id: np.ndarray
    rel_ptr: np.ndarray
    rel_s: np.ndarray
    rel_r: np.ndarray
    rel_o: np.ndarray


def encode_claims(
    graphs: list[Graph | None], name_id: dict[str, int], relations: Relations
) -> Claims:
    has, obj, attr, rel = [], ([], [], []), ([], [], []), ([], [], [], [])
    for graph in graphs:
        objs, attrs, rels = graph or ((), (), ())
        kept = [(name_id[n], c) for n, c in objs if n in name_id]
        has.append(bool(kept))
        obj[0].append(len(kept))
        for n, c in kept:
            obj[1].append(n)
            obj[2].append(max(1, min(c, 2)))
        a_kept = [(name_id[n], ATTR_ID[a]) for n, a in attrs if n in name_id and a in ATTR_ID]
        attr[0].append(len(a_kept))
        for n, a in a_kept:
            attr[1].append(n)
            attr[2].append(a)
        r_kept = [
            (name_id[s], relations.id[r], name_id[o])
            for s, r, o in rels
            if s in name_id and o in name_id and r in relations.id and s != o
        ]
        rel[0].append(len(r_kept))
        for s, r, o in r_kept:
            rel[1].append(s)
            rel[2].append(r)
            rel[3].append(o)

    def ptr(counts: list[int]) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)

    def arr(values: list[int]) -> np.ndarray:
        return np.asarray(values, np.int64)

    return Claims(
        has_objects=np.asarray(has, bool),
        obj_ptr=ptr(obj[0]),
        obj_name=arr(obj[1]),
        obj_need=arr(obj[2]),
        attr_ptr=ptr(attr[0]),
        attr_name=arr(attr[1]),
        attr_id=arr(attr[2]),
        rel_ptr=ptr(rel[0]),
        rel_s=arr(rel[1]),
        rel_r=arr(rel[2]),
        rel_o=arr(rel[3]),
    )


def expand(ptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For CSR pointers and a list of rows: (position in `rows`, entry index) for every entry."""
    counts = ptr[rows + 1] - ptr[rows]
    total = int(counts.sum())
    which = np.repeat(np.arange(len(rows)), counts)
    first = np.repeat(ptr[rows] - (np.cumsum(counts) - counts), counts)
    return which, first + np.arange(total)


@dataclass
class SampleFacts:
    """What the shard's samples (with tags) know, as codes, for the vectorised rules."""

    present: np.ndarray  # samples × names, int32: max(tag counts, own caption's count)
    known_attr: np.ndarray  # sorted codes (sample, name, attr id)
    known_cat: np.ndarray  # sorted codes (sample, name, category)
    known_cat_count: np.ndarray  # distinct known attributes per known_cat code
    own_rel: np.ndarray  # sorted codes (sample, subject, relation id, object)


def sample_facts(
    owns: list[Graph | None],
    tag_lists: list[list[dict]],
    name_id: dict[str, int],
    relations: Relations,
) -> SampleFacts:
    n_names = max(1, len(name_id))
    n_attrs, n_cats, n_rels = len(ATTRS), len(CATEGORIES), max(1, len(relations.names))
    present = np.zeros((len(owns), n_names), np.int32)
    attr_codes, rel_codes = [], []
    for s, (own, tags) in enumerate(zip(owns, tag_lists, strict=True)):
        known = set()
        for tag in tags:
            name = str(tag.get("name"))
            n = name_id.get(name)
            if n is None:
                continue
            present[s, n] += tag_count(tag)
            for a in tag.get("attributes", []):
                a = a if isinstance(a, str) else a.get("name", "")
                if a in ATTR_ID:
                    known.add((n, ATTR_ID[a]))
        if own:
            for name, count in own[0]:
                # The own caption's objects count as present, as in certainly_false.
                if name in name_id:
                    present[s, name_id[name]] = max(present[s, name_id[name]], count)
            for name, a in own[1]:
                if name in name_id and a in ATTR_ID:
                    known.add((name_id[name], ATTR_ID[a]))
            for sub, r, obj in own[2]:
                if sub in name_id and obj in name_id and r in relations.id:
                    rel_codes.append(
                        ((s * n_names + name_id[sub]) * n_rels + relations.id[r]) * n_names
                        + name_id[obj]
                    )
        attr_codes.extend((s * n_names + n) * n_attrs + a for n, a in known)
    known_attr = np.unique(np.asarray(attr_codes, np.int64))
    per_name = known_attr // n_attrs
    cats = (per_name * n_cats) + ATTR_CATEGORY[known_attr % n_attrs]
    known_cat, known_cat_count = np.unique(cats, return_counts=True)
    return SampleFacts(
        present=present,
        known_attr=known_attr,
        known_cat=known_cat,
        known_cat_count=known_cat_count,
        own_rel=np.unique(np.asarray(rel_codes, np.int64)),
    )


def _member(sorted_codes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    if not len(sorted_codes):
        return np.zeros(len(codes), bool)
    at = np.minimum(np.searchsorted(sorted_codes, codes), len(sorted_codes) - 1)
    return sorted_codes[at] == codes


def certainly_false_pairs(
    samples: np.ndarray,
    rows: np.ndarray,
    facts: SampleFacts,
    claims: Claims,
    relations: Relations,
) -> np.ndarray:
    """certainly_false for each (sample index into facts, candidate text row) pair."""
    n_pairs = len(samples)
    false = np.zeros(n_pairs, bool)
    if not n_pairs:
        return false
    n_names = facts.present.shape[1]
    n_attrs, n_cats, n_rels = len(ATTRS), len(CATEGORIES), max(1, len(relations.names))
    # Objects: absent, or fewer than the claim needs.
    which, entry = expand(claims.obj_ptr, rows)
    bad = facts.present[samples[which], claims.obj_name[entry]] < claims.obj_need[entry]
    false[which[bad]] = True
    # Attributes about a once-present object that contradict a known one of the same category.
    which, entry = expand(claims.attr_ptr, rows)
    s, n, a = samples[which], claims.attr_name[entry], claims.attr_id[entry]
    unique = facts.present[s, n] == 1
    base = s * n_names + n
    cat_codes = base * n_cats + ATTR_CATEGORY[a]
    in_cat = np.zeros(len(cat_codes), np.int64)
    if len(facts.known_cat):
        at = np.minimum(np.searchsorted(facts.known_cat, cat_codes), len(facts.known_cat) - 1)
        hit = facts.known_cat[at] == cat_codes
        in_cat[hit] = facts.known_cat_count[at[hit]]
    self_known = _member(facts.known_attr, base * n_attrs + a)
    bad = unique & ~self_known & (in_cat > 0)
    false[which[bad]] = True
    # Relations between once-present objects that the own caption contradicts.
    which, entry = expand(claims.rel_ptr, rows)
    s = samples[which]
    sub, rel, obj = claims.rel_s[entry], claims.rel_r[entry], claims.rel_o[entry]
    ok = (facts.present[s, sub] == 1) & (facts.present[s, obj] == 1)
    which, s, sub, rel, obj = which[ok], s[ok], sub[ok], rel[ok], obj[ok]
    w2, option = expand(relations.ptr, rel)
    own_r, reverse = relations.table[option, 1], relations.table[option, 2] == 1
    left = np.where(reverse, obj[w2], sub[w2])
    right = np.where(reverse, sub[w2], obj[w2])
    codes = ((s[w2] * n_names + left) * n_rels + own_r) * n_names + right
    bad = _member(facts.own_rel, codes)
    false[which[w2[bad]]] = True
    return false & claims.has_objects[rows]
