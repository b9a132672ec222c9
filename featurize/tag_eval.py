"""Object tags against the demo world's truth: the tag figures `make demo` records.

Each featurized sample of the demo world carries its truth in `json["world"]` (object labels,
colours, sizes). For every such sample:

- tag_precision: share of tags whose name is an object in the image;
- tag_recall: share of the image's distinct object names that became tags;
- tag_count_accuracy: among correctly named tags, share whose `count` equals the true number;
- tag_attribute_precision: among attributes of correctly named tags of a single-instance object
  (where "the" object is unambiguous), share true of that object.

Tags are what Oscar reads and what mining's negative filter trusts, so their errors show up
downstream as wrong anchors and as false negatives.
"""

from __future__ import annotations

import json
from collections import Counter

from vlforge.pipeline.mine_shards import list_shards, read_samples


def _truth(sample: dict) -> dict | None:
    try:
        meta = json.loads(sample.get("json", b"{}") or b"{}")
    except ValueError:
        return None
    world = meta.get("world")
    if isinstance(world, str):
        try:
            world = json.loads(world)
        except ValueError:
            return None
    return world if isinstance(world, dict) and world.get("labels") is not None else None


def tag_figures(samples: list[tuple[dict, dict]]) -> dict:
    """Figures over (tags.json content, world truth) pairs."""
    counts: Counter = Counter()
    for tags, truth in samples:
        labels = list(truth.get("labels", []))
        true_counts = Counter(labels)
        attributes: dict[str, set[str]] = {}
        for i, name in enumerate(labels):
            for group in ("colours", "sizes"):
                values = truth.get(group) or []
                if i < len(values):
                    attributes.setdefault(name, set()).add(str(values[i]))
        names = set()
        for tag in tags.get("tags", []):
            name = str(tag.get("name"))
            names.add(name)
            counts["tags"] += 1
            if name not in true_counts:
                continue
            counts["tags_true"] += 1
            counts["count_right"] += int(tag.get("count", 1)) == true_counts[name]
            if true_counts[name] == 1:
                for attr in tag.get("attributes", []):
                    counts["attributes"] += 1
                    counts["attributes_true"] += attr.get("name") in attributes.get(name, set())
        counts["truth_names"] += len(true_counts)
        counts["truth_names_found"] += len(names & set(true_counts))
        counts["samples"] += 1

    def share(a: str, b: str) -> float | None:
        return round(counts[a] / counts[b], 4) if counts[b] else None

    return {
        "tag_precision": share("tags_true", "tags"),
        "tag_recall": share("truth_names_found", "truth_names"),
        "tag_count_accuracy": share("count_right", "tags_true"),
        "tag_attribute_precision": share("attributes_true", "attributes"),
        "tag_eval_samples": counts["samples"],
    }


def tag_quality(featurized_dir: str) -> dict:
    """tag_figures over every demo-world sample in a featurized shard directory."""
    pairs = []
    for path in list_shards(featurized_dir):
        for sample in read_samples(path):
            truth = _truth(sample)
            if truth is None or "tags.json" not in sample:
                continue
            pairs.append((json.loads(sample["tags.json"]), truth))
    return tag_figures(pairs)
