"""Quality of mined shards against the demo world's truth: the figures `make demo` records.

- neg_false_rate: share of negatives (mined and rewritten) that are true of the image, judged by
  matching the negative caption's scene graph against the image's world truth (objects with
  their colour/size attributes, relations); target ≤ 0.01.
- neg_hardness: share of mined hard negatives whose scene graph differs from the sample's own
  caption in exactly one object, attribute or relation; beside it the same share for random
  negatives (another sample's caption drawn at random).
- ivf_recall10: recall@10 of the IVF index at the default nprobe against the exact index, on the
  corpus's own caption vectors (target ≥ 0.95).
- misaligned_flag_precision / misaligned_flag_recall: mine.json's `alignment` (alignment.py)
  flagging a sample (contradicted share ≥ the run's --drop-misaligned, else
  DEFAULT_FLAG_THRESHOLD) against the world's truth (kind "mismatched": another image's
  caption). Samples the run dropped count as flagged; their truth is read from the run's input
  shards (the manifest's `in`). If those are gone, precision is None and recall is only bounded
  (misaligned_flag_recall_max: as if every dropped sample was mismatched).

Figures over samples (own_caption_true_rate, the negatives') are over the kept samples; mined
negatives whose sample was dropped cannot be judged (no scene graph) and are counted apart.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from vlforge.errors import UserError
from vlforge.pipeline import storage
from vlforge.pipeline.alignment import misaligned
from vlforge.pipeline.mine_scan import index_shard, read_shard
from vlforge.pipeline.mine_shards import list_shards
from vlforge.pipeline.neighbours import NeighbourConfig, NeighbourIndex, exact_search, recall_at_k
from vlforge.pipeline.rewrites import apply_edit
from vlforge.pipeline.tfidf import doc_frequencies, fit_reducer, idf_from_df, tfidf

CONVERSE = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
    "on": "under",
    "under": "on",
    "in front of": "behind",
    "behind": "in front of",
}
SYMMETRIC_NEAR = frozenset({"near", "next to", "beside", "with"})


# ---- is a caption true of an image? ---------------------------------------------------------


def _image_graph(truth: dict) -> dict:
    """Everything true of the image. The world's `image_graph` lists every object, attribute and
    pairwise relation; `scene_graph` only what the caption mentions, which would call a negative
    false when it names something present but unmentioned."""
    return truth.get("image_graph") or truth.get("scene_graph") or {}


def _truth_objects(truth: dict) -> list[dict]:
    """World truth → [{"id", "name", "count", "attributes": set}] (image graph, or per-box lists)."""
    sg = _image_graph(truth)
    objects = [
        {"id": o["id"], "name": o["name"], "count": int(o.get("count", 1)), "attributes": set()}
        for o in sg.get("objects", [])
    ]
    by_id = {o["id"]: o for o in objects}
    for attr in sg.get("attributes", []):
        if attr["object"] in by_id:
            by_id[attr["object"]]["attributes"].add(attr["name"])
    if not objects and truth.get("labels"):
        for i, name in enumerate(truth["labels"]):
            attrs = {
                str(v[i])
                for v in (truth.get("colours"), truth.get("sizes"))
                if v is not None and i < len(v)
            }
            objects.append({"id": i, "name": name, "count": 1, "attributes": attrs})
    return objects


def _truth_relations(truth: dict) -> set[tuple[int, str, int]]:
    rels = set()
    for r in _image_graph(truth).get("relations", []):
        rels.add((r["subject"], r["name"], r["object"]))
        if r["name"] in CONVERSE:
            rels.add((r["object"], CONVERSE[r["name"]], r["subject"]))
    return rels


def _judgeable(caption_sg: dict, names: set[str]) -> dict:
    """The caption's claims about things the world's truth describes (its shapes).

    Words like "background" or "photo" name nothing the truth lists; a claim about them can be
    neither confirmed nor refuted, so it is left out rather than counted as false.
    """
    keep = {o["id"] for o in caption_sg.get("objects", []) if o["name"] in names}
    return {
        "objects": [o for o in caption_sg.get("objects", []) if o["id"] in keep],
        "attributes": [a for a in caption_sg.get("attributes", []) if a["object"] in keep],
        "relations": [
            r
            for r in caption_sg.get("relations", [])
            if r["subject"] in keep and r["object"] in keep
        ],
    }


def true_of(caption_sg: dict, truth: dict, names: set[str] | None = None) -> bool:
    """Does some assignment of the caption's objects to the image's satisfy every claim?

    `names`: the object names the world's truth can contain; claims about others are dropped.
    """
    if names is not None:
        caption_sg = _judgeable(caption_sg, names)
    objects = _truth_objects(truth)
    relations = _truth_relations(truth)
    related = {(s, o) for s, _, o in relations} | {(o, s) for s, _, o in relations}
    c_objects = caption_sg.get("objects", [])
    c_attrs: dict[int, set[str]] = {}
    for attr in caption_sg.get("attributes", []):
        c_attrs.setdefault(attr["object"], set()).add(attr["name"])
    c_rels = [(r["subject"], r["name"], r["object"]) for r in caption_sg.get("relations", [])]

    def candidates(obj) -> list[dict]:
        want = c_attrs.get(obj["id"], set())
        fits = [t for t in objects if t["name"] == obj["name"] and want <= t["attributes"]]
        # "two circles" needs two circles with those attributes, however the truth groups them.
        return fits if sum(t["count"] for t in fits) >= min(int(obj.get("count", 1)), 2) else []

    options = [candidates(o) for o in c_objects]
    if any(not opts for opts in options):
        return False
    ids = [o["id"] for o in c_objects]

    def relations_hold(assign: dict[int, int]) -> bool:
        for s, name, o in c_rels:
            if s not in assign or o not in assign:
                continue
            a, b = assign[s], assign[o]
            if name in SYMMETRIC_NEAR:
                if (a, b) not in related:
                    return False
            elif (a, name, b) not in relations:
                return False
        return True

    def search(i: int, assign: dict[int, int]) -> bool:
        if i == len(ids):
            return relations_hold(assign)
        for t in options[i]:
            # Distinct caption objects of one name are distinct things in the image.
            if t["id"] in assign.values() and t["count"] == 1:
                continue
            assign[ids[i]] = t["id"]
            if search(i + 1, assign):
                return True
            del assign[ids[i]]
        return False

    return search(0, {})


# ---- how far is one caption from another? ---------------------------------------------------


def _multisets(sg: dict) -> tuple[Counter, Counter, Counter]:
    names = {o["id"]: o["name"] for o in sg.get("objects", [])}
    objects = Counter(names.values())
    attrs = Counter((names.get(a["object"]), a["name"]) for a in sg.get("attributes", []))
    rels = Counter(
        (names.get(r["subject"]), r["name"], names.get(r["object"]))
        for r in sg.get("relations", [])
    )
    return objects, attrs, rels


def _one_change(a: Counter, b: Counter) -> tuple | None:
    """(removed, added) if b is a with exactly one element swapped, else None."""
    if sum(a.values()) != sum(b.values()):
        return None
    gone, new = a - b, b - a
    if sum(gone.values()) == 1 and sum(new.values()) == 1:
        return next(iter(gone)), next(iter(new))
    return None


def one_slot_apart(a: dict, b: dict) -> bool:
    """Is b's scene graph a's with exactly one object, attribute or relation name swapped?"""
    ao, aa, ar = _multisets(a)
    bo, ba, br = _multisets(b)
    if ao == bo:
        if aa == ba:
            change = _one_change(ar, br)
            return change is not None and (change[0][0], change[0][2]) == (
                change[1][0],
                change[1][2],
            )
        change = _one_change(aa, ba)
        return ar == br and change is not None and change[0][0] == change[1][0]
    change = _one_change(ao, bo)
    if change is None:
        return False
    old, new = change

    def rename(x):
        return new if x == old else x

    return (
        Counter({(rename(o), n): c for (o, n), c in aa.items()}) == ba
        and Counter({(rename(s), n, rename(o)): c for (s, n, o), c in ar.items()}) == br
    )


# ---- the figures ----------------------------------------------------------------------------


def _samples(mined_dir: str) -> Iterator[dict]:
    """Each sample's key and caption, its sg.json, metadata and mine.json still as bytes.

    One sample at a time: at a million samples the parsed truths, graphs and mine dicts did
    not fit in memory together (the 1M bench grew past 17 GB).
    """
    for path in list_shards(mined_dir):
        # The stage's own tar index, not tarfile: a pax header per member made reading a
        # million samples through tarfile take minutes per pass.
        data = read_shard(path)
        index = index_shard(path, data)
        for i, key in enumerate(index.keys):
            yield {
                "key": key,
                "caption": (index.field(data, i, "txt") or b"").decode("utf-8", "replace"),
                "meta": index.field(data, i, "json"),
                "sg": index.field(data, i, "sg.json"),
                "mine": index.field(data, i, "mine.json"),
            }


def _truth(meta: bytes | None) -> dict | None:
    world = json.loads(meta or b"{}").get("world")
    return json.loads(world) if isinstance(world, str) else world


def _parsed(data: bytes | None) -> dict | None:
    return json.loads(data) if data is not None else None


def negative_figures(samples: Callable[[], Iterable[dict]], seed: int = 0) -> dict:
    """The negatives' figures over `samples()` (called twice: the dicts _samples yields).

    The first pass keeps each sample's sg.json bytes by key (a negative names another sample)
    and the truth's object names; the second judges one sample at a time.
    """
    sg_of: dict[str, bytes] = {}
    names: set[str] = set()
    for sample in samples():
        if sample["sg"] and json.loads(sample["sg"]):
            sg_of[sample["key"]] = sample["sg"]
        truth = _truth(sample["meta"])
        if truth:
            names.update(o["name"] for o in _truth_objects(truth))
    keys = list(sg_of)
    counts: Counter = Counter()
    rng = np.random.default_rng(seed)
    for sample in samples():
        mine, truth = _parsed(sample["mine"]), _truth(sample["meta"])
        own = _parsed(sample["sg"]) if sample["key"] in sg_of else None
        if not mine or not truth or not own:
            continue
        for neg in mine.get("hard_negatives", []):
            if neg["key"] not in sg_of:
                counts["mined_unjudged"] += 1  # e.g. its sample was dropped as misaligned
                continue
            neg_sg = json.loads(sg_of[neg["key"]])
            counts["mined"] += 1
            counts["mined_true"] += true_of(neg_sg, truth, names)
            counts["mined_one_slot"] += one_slot_apart(own, neg_sg)
        for rw in mine.get("rewrites", []):
            counts["rewritten"] += 1
            counts[f"rewritten_{rw['kind']}"] += 1
            is_true = true_of(apply_edit(own, rw), truth, names)
            counts["rewritten_true"] += is_true
            counts[f"rewritten_{rw['kind']}_true"] += is_true
        if len(keys) > 1:
            other = keys[int(rng.integers(len(keys)))]
            if other != sample["key"]:
                other_sg = json.loads(sg_of[other])
                counts["random"] += 1
                counts["random_one_slot"] += one_slot_apart(own, other_sg)
                counts["random_true"] += true_of(other_sg, truth, names)
        counts["own_true"] += true_of(own, truth, names)
        counts["judged_samples"] += 1

    def share(a: str, b: str) -> float | None:
        return round(counts[a] / counts[b], 4) if counts[b] else None

    negatives = counts["mined"] + counts["rewritten"]
    return {
        "neg_false_rate": round((counts["mined_true"] + counts["rewritten_true"]) / negatives, 4)
        if negatives
        else None,
        "neg_false_rate_mined": share("mined_true", "mined"),
        "neg_false_rate_rewritten": share("rewritten_true", "rewritten"),
        **{
            f"neg_false_rate_{k}": share(f"rewritten_{k}_true", f"rewritten_{k}")
            for k in ("object", "attribute", "relation")
        },
        "neg_hardness": share("mined_one_slot", "mined"),
        "neg_hardness_random": share("random_one_slot", "random"),
        "random_false_rate": share("random_true", "random"),
        "own_caption_true_rate": share("own_true", "judged_samples"),
        "counts": dict(sorted(counts.items())),
    }


MAX_RECALL_QUERIES = 10_000  # exact answers cost n per query: all n queries would be O(n²)


def ivf_recall10(
    texts: Iterable[str], config: NeighbourConfig = NeighbourConfig(), dim: int = 128, seed: int = 0
) -> dict:
    """Recall@10 of the IVF index (threshold forced low, default nprobe) vs the exact index.

    Every text is indexed; queries are all of them up to MAX_RECALL_QUERIES, above that an even
    stride through the sorted texts (deterministic, and spread over the whole corpus).
    """
    texts = sorted(set(texts))
    if len(texts) < 20:
        return {"ivf_recall10": None, "n": len(texts)}
    idf = idf_from_df(doc_frequencies(texts), len(texts))
    rows = tfidf(texts, idf)
    vectors = fit_reducer(rows, dim=dim, seed=seed).transform(rows)
    ivf = NeighbourIndex(
        vectors,
        NeighbourConfig(
            ivf_threshold=1,
            nlist=config.nlist,
            nprobe=config.nprobe,
            use_gpu=config.use_gpu,
            train_size=config.train_size,
            train_iterations=config.train_iterations,
            storage=config.storage,
        ),
    )
    step = max(1, -(-len(texts) // MAX_RECALL_QUERIES))
    queries = vectors[::step]
    _, approx = ivf.search(queries, 10)
    _, exact = exact_search(vectors, queries, 10)
    return {
        "ivf_recall10": round(recall_at_k(approx, exact), 4),
        "n": len(texts),
        "queries": len(queries),
        "nlist": ivf.nlist,
        "nprobe": ivf.index.nprobe,
    }


DEFAULT_FLAG_THRESHOLD = 0.5  # contradicted share that flags a sample when the run kept all
MISMATCHED = "mismatched"


class AlignmentTally:
    """Flagged vs truly mismatched samples, one sample (or one dropped sample) at a time."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.counts: Counter = Counter()

    def add(self, sample: dict) -> None:
        truth = _truth(sample["meta"])
        if not truth or not sample["mine"]:
            return
        flagged = misaligned(json.loads(sample["mine"]).get("alignment"), self.threshold)
        self._count(flagged, truth.get("kind") == MISMATCHED)

    def add_dropped(self, kinds: list[str | None]) -> None:
        """Dropped samples (flagged by definition) by their world kind; None: no truth."""
        for kind in kinds:
            if kind is not None:
                self._count(True, kind == MISMATCHED)

    def _count(self, flagged: bool, mismatched: bool) -> None:
        self.counts["judged"] += 1
        self.counts["flagged"] += flagged
        self.counts["mismatched"] += mismatched
        self.counts["flagged_mismatched"] += flagged and mismatched

    def figures(self, unknown_dropped: int = 0) -> dict:
        """The figures; `unknown_dropped`: dropped samples whose truth could not be read."""
        c = self.counts
        out = {
            "misaligned_threshold": self.threshold,
            "misaligned_flagged": c["flagged"] + unknown_dropped,
            "misaligned_true": c["mismatched"] if not unknown_dropped else None,
            "misaligned_flag_precision": None,
            "misaligned_flag_recall": None,
        }
        if not c["judged"] and not unknown_dropped:
            return out  # no world truth: nothing to compare with
        if unknown_dropped:
            # Every dropped sample a true mismatch is the best case for recall.
            best = c["mismatched"] + unknown_dropped
            out["misaligned_flag_recall_max"] = round(
                (c["flagged_mismatched"] + unknown_dropped) / best, 4
            )
            return out
        if c["flagged"]:
            out["misaligned_flag_precision"] = round(c["flagged_mismatched"] / c["flagged"], 4)
        if c["mismatched"]:
            out["misaligned_flag_recall"] = round(c["flagged_mismatched"] / c["mismatched"], 4)
        return out


def dropped_kinds(source: str, kept: set[str]) -> list[str | None] | None:
    """The world kind of each input sample with a caption whose key is not in `kept`.

    None when the input shards cannot be read (moved, deleted, another machine's paths).
    """
    try:
        paths = list_shards(source)
        kinds = []
        for path in paths:
            data = read_shard(path)
            index = index_shard(path, data)
            for i, key in enumerate(index.keys):
                if key in kept or index.field(data, i, "txt") is None:
                    continue
                truth = _truth(index.field(data, i, "json"))
                kinds.append(truth.get("kind") if truth else None)
        return kinds
    except (UserError, OSError, ValueError):
        return None


def mine_quality(mined_dir: str, seed: int = 0) -> dict:
    """Every figure for a directory of mined shards (the demo's entry point)."""
    manifest_path = storage.join(mined_dir, "manifest.json")
    manifest = storage.read_json(manifest_path) if storage.exists(manifest_path) else {}
    run_threshold = manifest.get("config", {}).get("drop_misaligned")
    dropped = int(manifest.get("dropped_misaligned") or 0)
    figures = negative_figures(lambda: _samples(mined_dir), seed)
    tally = AlignmentTally(run_threshold if run_threshold is not None else DEFAULT_FLAG_THRESHOLD)
    captions, kept = [], set()
    for sample in _samples(mined_dir):
        captions.append(sample["caption"].strip().lower())
        tally.add(sample)
        if dropped:
            kept.add(sample["key"])
    unknown = 0
    if dropped:
        kinds = dropped_kinds(manifest.get("config", {}).get("in", ""), kept)
        if kinds is not None and len(kinds) == dropped:
            tally.add_dropped(kinds)
        else:
            unknown = dropped
    figures.update(tally.figures(unknown))
    figures["misaligned_dropped"] = dropped
    figures.update(ivf_recall10(captions))
    figures["samples"] = len(captions)
    if manifest:
        figures["mine_seconds"] = manifest.get("timings", {}).get("total_s")
    return figures
