"""Oscar object tags from a region set: detected class names, each once, with its best score
and how many regions reached the threshold for it (`count`).

A region's class is its best foreground class (`1 + argmax(cls_prob[:, 1:])`, background at
column 0). A class becomes a tag when some region reaches `min_score` for it, the same threshold
that admits a region in the bottom-up rule, so the boxes added only to reach the 10-box floor do
not turn into tags. Attributes come from an attribute head when the detector has one (the Visual
Genome bottom-up model does; the demo detector does not, so its tags carry none).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlforge.featurize.regions import BACKGROUND_COLUMN, RegionSet

MIN_SCORE = 0.2
MIN_ATTRIBUTE_SCORE = 0.2
MAX_ATTRIBUTES = 3


def object_tags(
    regions: RegionSet,
    class_names: Sequence[str],
    attribute_names: Sequence[str] | None = None,
    min_score: float = MIN_SCORE,
) -> dict:
    """The `tags.json` content: tags sorted by score (then name), highest first."""
    best: dict[str, tuple[float, int]] = {}
    counts: dict[str, int] = {}
    if len(regions):
        probs = regions.cls_prob.astype(np.float32)
        foreground = probs[:, BACKGROUND_COLUMN + 1 :]
        classes = foreground.argmax(axis=1) + BACKGROUND_COLUMN + 1
        scores = foreground.max(axis=1)
        for row, (cls, score) in enumerate(zip(classes.tolist(), scores.tolist(), strict=True)):
            name = class_names[cls]
            if score < min_score:
                continue
            # Regions already went through per-class NMS, so each one is a distinct instance:
            # the count lets a filter tell "two squares" from "a square" after deduplication.
            counts[name] = counts.get(name, 0) + 1
            if score > best.get(name, (-1.0, -1))[0]:
                best[name] = (score, row)
    tags = []
    for name, (score, row) in sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0])):
        tags.append(
            {
                "name": name,
                "score": round(float(score), 4),
                "count": counts[name],
                "attributes": _attributes(regions, row, attribute_names),
            }
        )
    return {
        "tags": tags,
        "min_score": min_score,
        "has_attributes": regions.attr_prob is not None and attribute_names is not None,
    }


def _attributes(regions: RegionSet, row: int, attribute_names: Sequence[str] | None) -> list[dict]:
    if regions.attr_prob is None or not attribute_names:
        return []
    probs = regions.attr_prob[row].astype(np.float32)
    # Column 0 of a bottom-up attribute head is "no attribute", like the class background.
    order = [
        int(i)
        for i in np.argsort(-probs, kind="stable")
        if i != 0 and probs[i] >= MIN_ATTRIBUTE_SCORE
    ]
    return [
        {"name": attribute_names[i], "score": round(float(probs[i]), 4)}
        for i in order[:MAX_ATTRIBUTES]
    ]


def tag_text(tags: dict) -> str:
    """The tag sequence Oscar feeds its encoder: names in score order, space separated."""
    return " ".join(t["name"] for t in tags["tags"])
