"""`vlforge mine`: TF-IDF hard negatives, retrieved positives and scene-graph rewrites per sample.

MineCorpus is the composite transform (light records in, (key, mine dict) out), usable inside
the one pipeline; run_mine wraps it with shard reading, writing, a manifest and progress.

  records ─┬─ captions ─ CorpusIdf ─┐
           ├─ group by caption text ─ vectors (IDF, SVD side inputs) ─ faiss ─ per sample:
           │     hard negatives (below dup_threshold, certainly false of the image),
           │     positives (same text, or at/above dup_threshold: near-duplicates never negatives)
           ├─ group by tag text ─ same search ─ image positives (UNIMO's visual retrieval)
           └─ rewrites (corpus slot vocabulary as a side input)
  → CoGroupByKey(key) → mine.json

"Certainly false of the image" (see certainly_false) uses the detector's tags: a mined caption
mentions an object the image lacks, too many of one, or contradicts the sample's own caption
about an object the image has only one of. Captions that might be true are left out (neither
negative nor positive); without tags only captions whose scene graph says nothing beyond the
sample's own are left out.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import re
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from tqdm import tqdm

from vlforge import __version__
from vlforge.errors import UserError
from vlforge.pipeline import progress, storage
from vlforge.pipeline.neighbours import NeighbourConfig, NeighbourIndex, rerank
from vlforge.pipeline.rewrites import (
    KINDS,
    SlotVocabulary,
    attribute_category,
    rewrite,
    slot_surfaces,
)
from vlforge.pipeline.tfidf import CorpusIdf, FitReducer, stable_hash, tfidf


@dataclass(frozen=True)
class MineConfig:
    """Knobs of the mining stage; defaults are what `vlforge mine` uses."""

    k_negatives: int = 5  # hard-negative captions per sample
    k_positives: int = 5  # retrieved positive captions per sample
    k_image_positives: int = 5  # image positives per sample
    candidates: int = 64  # neighbours fetched from faiss before the exact rerank and filters
    dup_threshold: float = 0.9  # TF-IDF cosine at/above which a caption is a near-duplicate
    min_negative_score: float = 0.05  # below this a "hard" negative shares nothing with the caption
    image_threshold: float = 0.8  # tag TF-IDF cosine at/above which an image is a positive
    rewrites_per_kind: int = 1
    rewrite_kinds: tuple[str, ...] = KINDS
    dim: int = 128  # dense dimensions for search (TruncatedSVD)
    svd_sample: int = 20_000  # captions the SVD is fitted on
    svd_columns: int = 32_768  # commonest hashed terms the SVD basis keeps
    neighbours: NeighbourConfig = field(default_factory=NeighbourConfig)
    seed: int = 0


def normalize_text(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def tag_text(tags: dict | None) -> str:
    """Tags as words: names, plus attribute_name pairs ("red_circle") so colour binding counts."""
    words = []
    for tag in (tags or {}).get("tags", []):
        name = str(tag.get("name", "")).replace(" ", "_")
        words.append(name)
        for attr in tag.get("attributes", []):
            attr_name = attr if isinstance(attr, str) else attr.get("name", "")
            words.append(f"{attr_name}_{name}".replace(" ", "_"))
    return " ".join(sorted(words))


# ---- is a mined caption certainly false of this image? ---------------------------------------

OPPOSITE = {
    "left of": {"right of"},
    "right of": {"left of"},
    "above": {"below", "under"},
    "on": {"below", "under"},
    "below": {"above", "on"},
    "under": {"above", "on"},
    "in front of": {"behind"},
    "behind": {"in front of"},
}
ASYMMETRIC = frozenset(OPPOSITE)


def _graph(sg: dict | None) -> tuple[dict, list[tuple[str, str]], list[tuple[str, str, str]]]:
    """(object name → count, [(object name, attribute)], [(subject name, relation, object name)])."""
    sg = sg or {}
    names = {o["id"]: o["name"] for o in sg.get("objects", [])}
    counts: dict[str, int] = Counter()
    for obj in sg.get("objects", []):
        counts[obj["name"]] += int(obj.get("count", 1))
    attrs = [
        (names[a["object"]], a["name"]) for a in sg.get("attributes", []) if a["object"] in names
    ]
    rels = [
        (names[r["subject"]], r["name"], names[r["object"]])
        for r in sg.get("relations", [])
        if r["subject"] in names and r["object"] in names
    ]
    return dict(counts), attrs, rels


def certainly_false(
    candidate: dict | None, own: dict | None, tags: dict | None, detectable: set[str] | None = None
) -> bool:
    """True when the candidate caption's scene graph cannot hold for this image.

    `detectable`: the detector's object names (every tag name in the corpus). Only those can be
    called absent: a "background" or a "photo" the detector has no class for proves nothing.
    """
    if candidate and detectable is not None:
        keep = {o["id"] for o in candidate.get("objects", []) if o["name"] in detectable}
        candidate = {
            "objects": [o for o in candidate.get("objects", []) if o["id"] in keep],
            "attributes": [a for a in candidate.get("attributes", []) if a["object"] in keep],
            "relations": [
                r
                for r in candidate.get("relations", [])
                if r["subject"] in keep and r["object"] in keep
            ],
        }
    c_counts, c_attrs, c_rels = _graph(candidate)
    o_counts, o_attrs, o_rels = _graph(own)
    if not c_counts:
        return False  # nothing we can check ("a photo", unparsed text): might be true
    if tags is None:
        # No detector evidence: the only safe call is "says nothing the own caption doesn't".
        subgraph = (
            all(o_counts.get(n, 0) >= c for n, c in c_counts.items())
            and set(c_attrs) <= set(o_attrs)
            and set(c_rels) <= set(o_rels)
        )
        return not subgraph
    present = Counter(str(t.get("name")) for t in tags.get("tags", []))
    for name, count in c_counts.items():
        if present[name] == 0 or present[name] < min(count, 2):
            return True  # an object the detector does not see, or "two" of a single one
    unique = {n for n, c in present.items() if c == 1}
    tag_attrs = {
        (str(t["name"]), a if isinstance(a, str) else a.get("name", ""))
        for t in tags.get("tags", [])
        for a in t.get("attributes", [])
    }
    known = set(o_attrs) | tag_attrs
    for name, attr in c_attrs:
        if name not in unique:
            continue
        category = attribute_category(attr)
        for k_name, k_attr in known:
            same_slot = k_name == name and k_attr != attr and category != "other"
            if same_slot and attribute_category(k_attr) == category:
                return True  # the one circle is red, the candidate says blue
    for s, r, o in c_rels:
        if s not in unique or o not in unique or s == o:
            continue
        for os_, orel, oo in o_rels:
            if (os_, oo) == (s, o) and r in OPPOSITE.get(orel, ()):
                return True
            if (os_, oo) == (o, s) and r == orel and r in ASYMMETRIC:
                return True
    return False


# ---- search ---------------------------------------------------------------------------------


def build_search_corpus(entries: list[tuple[str, dict]], idf: np.ndarray, reducer) -> dict:
    """Unique texts (sorted, for stable row ids) → sparse TF-IDF rows, dense vectors, payloads."""
    entries = sorted(entries, key=lambda e: e[0])
    texts = [t for t, _ in entries]
    sparse = tfidf(texts, idf) if texts else None
    dense = reducer.transform(sparse) if texts else np.zeros((0, reducer.dim), np.float32)
    return {
        "texts": texts,
        "payloads": [p for _, p in entries],
        "sparse": sparse,
        "dense": dense,
        "row_of": {t: i for i, t in enumerate(texts)},
        "fingerprint": stable_hash("\n".join(texts)),
    }


class SearchTexts(beam.DoFn):
    """Batches of (text, members) → (text, members, [(row, exact cosine)]) best first.

    The faiss index is built once per corpus per worker and kept on the DoFn.
    """

    def __init__(self, config: NeighbourConfig, candidates: int):
        self.config = config
        self.candidates = candidates
        self._fingerprint = None
        self._index: NeighbourIndex | None = None

    def process(self, batch, corpus):
        if not corpus["texts"]:
            return
        if self._fingerprint != corpus["fingerprint"]:
            self._index = NeighbourIndex(corpus["dense"], self.config)
            self._fingerprint = corpus["fingerprint"]
        rows = np.array([corpus["row_of"][text] for text, _ in batch], dtype=np.int64)
        k = min(self.candidates + 1, len(corpus["texts"]))
        _, ids = self._index.search(corpus["dense"][rows], k)
        scores, ids = rerank(corpus["sparse"][rows], corpus["sparse"], ids)
        for (text, members), row, s, i in zip(batch, rows, scores, ids, strict=True):
            keep = (i >= 0) & (i != row)
            yield text, members, list(zip(i[keep].tolist(), s[keep].tolist(), strict=True))


class NeighbourTexts(beam.PTransform):
    """(text, member) pairs → (text, sorted members, neighbours, corpus) for each unique text.

    `payload(text, members)` says what a neighbour needs to carry (a key, a caption, a graph).
    The corpus is attached by the caller as a side input; here we emit it as a second output.
    """

    def __init__(self, payload, config: MineConfig):
        super().__init__()
        self.payload = payload
        self.config = config

    def expand(self, pairs):
        cfg = self.config
        payload = self.payload
        groups = (
            pairs
            | "ByText" >> beam.GroupByKey()
            | "SortMembers" >> beam.MapTuple(lambda t, ms: (t, sorted(ms, key=lambda m: m["key"])))
        )
        texts = groups | "Texts" >> beam.Keys()
        # Document frequencies count samples (duplicates included), as a web corpus has them.
        idf = pairs | "AllTexts" >> beam.Keys() | "Idf" >> CorpusIdf()
        reducer = texts | "Reducer" >> FitReducer(
            idf, cfg.dim, cfg.svd_sample, cfg.svd_columns, cfg.seed
        )
        corpus = (
            groups
            | "Payload" >> beam.MapTuple(lambda t, ms: (t, payload(t, ms)))
            | "AllPayloads" >> beam.combiners.ToList()
            | "Build"
            >> beam.Map(
                build_search_corpus,
                beam.pvalue.AsSingleton(idf),
                beam.pvalue.AsSingleton(reducer),
            )
        )
        searched = (
            groups
            | "Batch" >> beam.BatchElements(min_batch_size=16, max_batch_size=1024)
            | "Search"
            >> beam.ParDo(
                SearchTexts(cfg.neighbours, cfg.candidates), beam.pvalue.AsSingleton(corpus)
            )
        )
        return searched, corpus


POSITIVE_MEMBERS = 16  # samples of one near-duplicate text a neighbour carries as positives


def _caption_payload(text: str, members: list[dict]) -> dict:
    first = members[0]
    return {
        "key": first["key"],
        "caption": first["caption"],
        "images": sorted({m["image"] for m in members}),
        "members": [(m["key"], m["caption"], m["image"]) for m in members[:POSITIVE_MEMBERS]],
        "sg": _compact_sg(first.get("sg")),
    }


def _compact_sg(sg: dict | None) -> dict | None:
    if not sg:
        return None
    return {k: sg.get(k, []) for k in ("objects", "attributes", "relations")}


def caption_parts(element, corpus, config: MineConfig, detectable: list[str] | None = None):
    """Per member of one caption text: hard negatives and positives."""
    text, members, neighbours = element
    payloads = corpus["payloads"]
    ring = _ring(members, config.seed)
    index = {m["key"]: i for i, m in enumerate(ring)}
    detectable_set = _as_set(detectable)
    for member in members:
        positives = [
            {"key": m["key"], "caption": m["caption"], "score": 1.0}
            for m in _ordered_others(ring, member, config.k_positives, index)
        ]
        negatives = []
        for row, score in neighbours:
            other = payloads[row]
            if score >= config.dup_threshold:
                positives.extend(
                    {"key": key, "caption": caption, "score": round(score, 4)}
                    for key, caption, image in other["members"]
                    if image != member["image"]
                )
                continue  # a near-duplicate is never a negative
            if len(negatives) >= config.k_negatives or score < config.min_negative_score:
                continue
            if member["image"] in other["images"]:
                continue
            tags = member.get("tags")
            if not certainly_false(other["sg"], member.get("sg"), tags, detectable_set):
                continue
            negatives.append(
                {"key": other["key"], "caption": other["caption"], "score": round(score, 4)}
            )
        yield (
            member["key"],
            {
                "hard_negatives": negatives,
                "positives": positives[: config.k_positives],
            },
        )


def _ordered_others(
    ring: list[dict], member: dict, limit: int, index: dict[str, int] | None = None
) -> list[dict]:
    """Up to `limit` other samples with the same text: the next ones round a seeded ring.

    Each sample gets different partners (not always the lowest keys), in O(limit) per sample.
    """
    if index is not None:
        at = index[member["key"]]
    else:
        at = next(i for i, m in enumerate(ring) if m["key"] == member["key"])
    out = []
    for step in range(1, len(ring)):
        if len(out) >= limit:
            break
        other = ring[(at + step) % len(ring)]
        if other["image"] != member["image"]:
            out.append(other)
    return out


def _ring(members: list[dict], seed: int) -> list[dict]:
    return sorted(members, key=lambda m: (stable_hash(m["key"], seed), m["key"]))


def image_parts(element, corpus, config: MineConfig):
    text, members, neighbours = element
    payloads = corpus["payloads"]
    ring = _ring(members, config.seed)
    index = {m["key"]: i for i, m in enumerate(ring)}
    for member in members:
        found = [
            {"key": m["key"], "score": 1.0}
            for m in _ordered_others(ring, member, config.k_image_positives, index)
        ]
        for row, score in neighbours:
            if score < config.image_threshold or len(found) >= config.k_image_positives:
                break
            other = payloads[row]
            if other["image"] != member["image"]:
                found.append({"key": other["key"], "score": round(score, 4)})
        yield member["key"], {"image_positives": found[: config.k_image_positives]}


class _VocabularyFn(beam.CombineFn):
    def create_accumulator(self):
        return SlotVocabulary()

    def add_input(self, vocab, record):
        if record.get("sg"):
            for kind, name, form, surface in slot_surfaces(record["caption"], record["sg"]):
                vocab.add(kind, name, form, surface)
        return vocab

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        merged = next(accumulators)
        for other in accumulators:
            merged.merge(other)
        return merged

    def extract_output(self, vocab):
        return vocab.table


_VOCAB_CACHE: dict[int, SlotVocabulary] = {}


def _vocabulary(table: dict) -> SlotVocabulary:
    """One SlotVocabulary (with its sorted name lists) per side-input value, not per record."""
    vocab = _VOCAB_CACHE.get(id(table))
    if vocab is None or vocab.table is not table:
        _VOCAB_CACHE.clear()
        vocab = _VOCAB_CACHE[id(table)] = SlotVocabulary(table)
    return vocab


_SET_CACHE: dict[int, tuple[list[str], set[str]]] = {}


def _as_set(names: list[str] | None) -> set[str] | None:
    """The side input's list as a set, built once per side-input value rather than per element."""
    if names is None:
        return None
    cached = _SET_CACHE.get(id(names))
    if cached is None or cached[0] is not names:
        _SET_CACHE.clear()
        cached = _SET_CACHE[id(names)] = (names, set(names))
    return cached[1]


def rewrite_part(
    record: dict, table: dict, config: MineConfig, detectable: list[str] | None = None
):
    if not record.get("sg"):
        return record["key"], {"rewrites": []}
    rng = np.random.default_rng(stable_hash(record["key"], config.seed))
    made = rewrite(
        record["caption"],
        record["sg"],
        _vocabulary(table),
        rng,
        kinds=config.rewrite_kinds,
        per_kind=config.rewrites_per_kind,
        image_tags=record.get("tags"),
        detectable=_as_set(detectable) if detectable else None,
    )
    return record["key"], {"rewrites": made}


def _merge_parts(element) -> tuple[str, dict]:
    key, groups = element
    mine: dict[str, Any] = {
        "hard_negatives": [],
        "positives": [],
        "image_positives": [],
        "rewrites": [],
    }
    for parts in groups.values():
        for part in parts:
            mine.update(part)
    return key, mine


class MineCorpus(beam.PTransform):
    """Light records ({key, caption, image, sg, tags}) → (key, mine dict) for every record."""

    def __init__(self, config: MineConfig = MineConfig()):
        super().__init__()
        self.config = config

    def expand(self, records):
        cfg = self.config
        count = Metrics.counter("mine", "negatives")

        def counted(kv):
            count.inc(len(kv[1]["hard_negatives"]))
            return kv

        caption_pairs = records | "CaptionPairs" >> beam.Map(
            lambda r: (normalize_text(r["caption"]), r)
        )
        searched, corpus = caption_pairs | "Captions" >> NeighbourTexts(_caption_payload, cfg)
        # The detector's classes: every object name any image's tags use.
        detectable = (
            records
            | "TagNames"
            >> beam.FlatMap(
                lambda r: {str(t.get("name")) for t in (r.get("tags") or {}).get("tags", [])}
            )
            | "DistinctNames" >> beam.Distinct()
            | "NameList" >> beam.combiners.ToList()
            | "Sorted" >> beam.Map(lambda names: sorted(names) or None)
        )
        captions = searched | "CaptionParts" >> beam.FlatMap(
            caption_parts,
            beam.pvalue.AsSingleton(corpus),
            cfg,
            beam.pvalue.AsSingleton(detectable),
        )
        tag_pairs = (
            records
            | "TagPairs" >> beam.Map(lambda r: (tag_text(r.get("tags")), r))
            | "HasTags" >> beam.Filter(lambda kv: bool(kv[0]))
        )
        t_searched, t_corpus = tag_pairs | "Tags" >> NeighbourTexts(
            lambda t, ms: {"key": ms[0]["key"], "image": ms[0]["image"]}, cfg
        )
        images = t_searched | "ImageParts" >> beam.FlatMap(
            image_parts, beam.pvalue.AsSingleton(t_corpus), cfg
        )
        vocab = records | "Vocabulary" >> beam.CombineGlobally(_VocabularyFn())
        rewrites = records | "Rewrites" >> beam.Map(
            rewrite_part, beam.pvalue.AsSingleton(vocab), cfg, beam.pvalue.AsSingleton(detectable)
        )
        keys = records | "Keys" >> beam.Map(lambda r: (r["key"], {}))
        return (
            {"k": keys, "c": captions, "i": images, "r": rewrites}
            | "ByKey" >> beam.CoGroupByKey()
            | "Merge" >> beam.Map(_merge_parts)
            | "Count" >> beam.Map(counted)
        )


# ---- the stage on its own: shards in, shards out --------------------------------------------


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"vlforge": __version__, "python": platform.python_version()}
    for dist in ("apache-beam", "webdataset", "scikit-learn", "faiss-cpu", "numpy", "scipy"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "missing"
    return versions


class _Progress:
    """A tqdm bar over samples written, fed by the in-process writer DoFns."""

    def __init__(self, total: int | None, enabled: bool):
        self.bar = tqdm(
            total=total, unit="sample", desc="mine", disable=not enabled, mininterval=0.5
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self.bar.update(progress.rows_done() - self.bar.n)

    def __enter__(self) -> _Progress:
        progress.reset()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.bar.update(progress.rows_done() - self.bar.n)
        self.bar.close()


def _count_rows(shards: list[str]) -> int | None:
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    total = 0
    for shard in shards:
        parquet = shard[: -len(".tar")] + ".parquet"
        if not storage.exists(parquet):
            return None
        with FileSystems.open(parquet, compression_type=storage.RAW) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def run_mine(
    source: str,
    out: str,
    config: MineConfig = MineConfig(),
    beam_args: list[str] | None = None,
    workers: int = 1,
    show_progress: bool = True,
) -> dict:
    """Mine every shard under `source` into `out`; returns the manifest it wrote."""
    from vlforge.pipeline.beam_options import build_options
    from vlforge.pipeline.mine_shards import (
        ReadLightRecords,
        WriteMinedShard,
        check_shard,
        list_shards,
    )

    started = time.time()
    _check(config)
    shards = list_shards(source)
    for shard in shards:
        check_shard(shard)
    if any(storage.join(out, s.rsplit("/", 1)[-1]) == s for s in shards):
        raise UserError(f"--out {out} holds the input shards; choose another directory")
    storage.makedirs(out)
    options = build_options(beam_args or [], workers)
    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    written_path = storage.join(out, ".mine-shards.json")

    def advance(kv):
        progress.advance(1)
        return kv

    with _Progress(_count_rows(shards), show_progress), _user_errors_from_workers():
        with beam.Pipeline(options=options) as pipeline:
            records = (
                pipeline
                | "Shards" >> beam.Create(shards)
                | "Read" >> beam.ParDo(ReadLightRecords())
            )
            mined = records | "Mine" >> MineCorpus(config)
            shard_of = records | "ShardOf" >> beam.Map(lambda r: (r["key"], r["shard"]))
            by_shard = (
                {"mine": mined | "Progress" >> beam.Map(advance), "shard": shard_of}
                | "Join" >> beam.CoGroupByKey()
                | "ToShard" >> beam.FlatMap(_to_shard)
            )
            # Shards with no caption at all still get copied through.
            every = pipeline | "AllShards" >> beam.Create([(s, None) for s in shards])
            _ = (
                (by_shard, every)
                | "Flat" >> beam.Flatten()
                | "GroupShard" >> beam.GroupByKey()
                | "Entries" >> beam.MapTuple(lambda s, kvs: (s, [kv for kv in kvs if kv]))
                | "Write" >> beam.ParDo(WriteMinedShard(out))
                | "Written" >> beam.combiners.ToList()
                | "Record" >> beam.Map(lambda w: storage.write_json(written_path, w))
            )
        result = pipeline.result
    finished = time.time()
    written = sorted(storage.read_json(written_path), key=lambda w: w["shard"])
    storage.delete([written_path])
    manifest = _manifest(source, out, config, shards, written, result, workers)
    manifest["timings"] = {
        "pipeline_s": round(finished - started, 3),
        "total_s": round(time.time() - started, 3),
    }
    manifest["figures"] = summarize_output(out)
    storage.write_json(storage.join(out, "manifest.json"), manifest)
    return manifest


@contextlib.contextmanager
def _user_errors_from_workers():
    """A UserError raised in a DoFn (a shard corrupt past its header) reaches the user as one line."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise UserError(str(cause).split("\n")[0].split(" [while running")[0]) from err


def _to_shard(element):
    key, groups = element
    mines, shards = groups["mine"], groups["shard"]
    for shard in shards[:1]:
        yield shard, (key, mines[0] if mines else {})


def _check(config: MineConfig) -> None:
    if min(config.k_negatives, config.k_positives, config.k_image_positives) < 0:
        raise UserError("k values must not be negative")
    if config.candidates < 1 or config.dim < 1:
        raise UserError("--candidates and --dim must be at least 1")
    if not 0.0 < config.dup_threshold <= 1.0 or not 0.0 < config.image_threshold <= 1.0:
        raise UserError("thresholds must lie in (0, 1]")
    unknown = set(config.rewrite_kinds) - set(KINDS)
    if unknown:
        raise UserError(
            f"unknown rewrite kind(s) {', '.join(sorted(unknown))}; use {', '.join(KINDS)}"
        )


def summarize_output(out: str) -> dict:
    """Counts over the written shards' parquet columns: samples, and per-sample means."""
    totals: Counter = Counter()
    for path in storage.glob(storage.join(out, "*.parquet")):
        table = storage.read_parquet(path)
        totals["samples"] += table.num_rows
        for name in ("n_hard_negatives", "n_positives", "n_image_positives", "n_rewrites"):
            if name in table.column_names:
                totals[name] += sum(v or 0 for v in table.column(name).to_pylist())
                totals[name + "_nonzero"] += sum(1 for v in table.column(name).to_pylist() if v)
    return dict(totals)


def _manifest(source, out, config, shards, written, result, workers) -> dict:
    counters: dict[str, int] = {}
    try:
        for counter in result.metrics().query()["counters"]:
            name = f"{counter.key.metric.namespace}/{counter.key.metric.name}"
            counters[name] = counters.get(name, 0) + int(
                counter.committed or counter.attempted or 0
            )
    except Exception:  # some runners report no metrics
        pass
    return {
        "stage": "mine",
        "config": {"in": source, "out": out, "workers": workers, **asdict(config)},
        "versions": _versions(),
        "machine": {"platform": platform.platform()},
        "shards_in": len(shards),
        "shards": written,
        "samples": sum(w["samples"] for w in written),
        "beam_counters": dict(sorted(counters.items())),
    }


def format_summary(manifest: dict) -> str:
    figures = manifest.get("figures", {})
    n = max(1, figures.get("samples", 0))
    lines = [
        f"vlforge mine: {manifest['samples']} samples in {len(manifest['shards'])} shard(s) -> "
        f"{manifest['config']['out']} ({manifest['timings']['total_s']:.1f} s)",
        f"  {'per sample':<22}{'mean':>8}{'with any':>10}",
    ]
    for name, label in (
        ("n_hard_negatives", "hard negatives"),
        ("n_positives", "positive captions"),
        ("n_image_positives", "image positives"),
        ("n_rewrites", "rewrites"),
    ):
        lines.append(
            f"  {label:<22}{figures.get(name, 0) / n:>8.2f}{figures.get(name + '_nonzero', 0):>10}"
        )
    return "\n".join(lines)
