"""Micro-averaged F1 of predicted text scene graphs against truth.

Matching rule, per caption, then summed over all captions before computing F1 (micro average):
- objects: the multiset of object names. Each object entry counts once whatever its `count`
  ("two dogs" is one entry "dog"); true positives are the size of the multiset intersection, so
  two predicted "dog" against one true "dog" is one hit and one false positive.
- attributes: the multiset of (object name, attribute name) pairs.
- relations: the multiset of (subject name, relation name, object name) triples.
Names are compared exactly after lower-casing and whitespace normalisation; spans are ignored.
F1 = 2·TP / (2·TP + FP + FN), and 1.0 when a category is empty in both truth and prediction.

A graph is the parser's dict (attributes and relations refer to object ids) or the names-only
form used by hand labels, where they refer to object names directly:
    {"objects": ["man", {"name": "horse"}],
     "attributes": [{"object": "horse", "name": "brown"}] or [["horse", "brown"]],
     "relations": [{"subject": "man", "name": "ride", "object": "horse"}] or [["man", "ride", "horse"]]}
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

CATEGORIES = ("objects", "attributes", "relations")


def _norm(name: object) -> str:
    return " ".join(str(name).lower().split())


def _object_name(ref: object, names: Mapping[int, str]) -> str:
    # An int refers to an object id; anything else is already a name.
    if isinstance(ref, int) and not isinstance(ref, bool):
        return names.get(ref, f"#{ref}")
    return _norm(ref)


def graph_items(graph: Mapping) -> dict[str, Counter]:
    """The multisets the matching rule compares, one per category."""
    names: dict[int, str] = {}
    objects: Counter = Counter()
    for position, obj in enumerate(graph.get("objects", [])):
        if isinstance(obj, Mapping):
            name = _norm(obj["name"])
            names[obj.get("id", position)] = name
        else:
            name = _norm(obj)
        objects[name] += 1
    attributes: Counter = Counter()
    for attr in graph.get("attributes", []):
        if isinstance(attr, Mapping):
            attributes[(_object_name(attr["object"], names), _norm(attr["name"]))] += 1
        else:
            owner, name = attr
            attributes[(_object_name(owner, names), _norm(name))] += 1
    relations: Counter = Counter()
    for rel in graph.get("relations", []):
        if isinstance(rel, Mapping):
            subject, name, obj = rel["subject"], rel["name"], rel["object"]
        else:
            subject, name, obj = rel
        relations[(_object_name(subject, names), _norm(name), _object_name(obj, names))] += 1
    return {"objects": objects, "attributes": attributes, "relations": relations}


def match_counts(predicted: list[Mapping], truth: list[Mapping]) -> dict[str, tuple[int, int, int]]:
    """(true positives, false positives, false negatives) per category, summed over captions."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted graphs for {len(truth)} true graphs")
    totals = {category: [0, 0, 0] for category in CATEGORIES}
    for pred_graph, true_graph in zip(predicted, truth, strict=True):
        pred_items, true_items = graph_items(pred_graph), graph_items(true_graph)
        for category in CATEGORIES:
            hits = sum((pred_items[category] & true_items[category]).values())
            totals[category][0] += hits
            totals[category][1] += sum(pred_items[category].values()) - hits
            totals[category][2] += sum(true_items[category].values()) - hits
    return {category: tuple(counts) for category, counts in totals.items()}


def f1_scores(predicted: list[dict], truth: list[dict]) -> dict[str, float]:
    """Micro-averaged F1 per category: {"objects": f1, "attributes": f1, "relations": f1}."""
    scores = {}
    for category, (tp, fp, fn) in match_counts(predicted, truth).items():
        denominator = 2 * tp + fp + fn
        scores[category] = 1.0 if denominator == 0 else 2 * tp / denominator
    return scores
