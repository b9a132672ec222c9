"""Second pass, one shard at a time: search (numbers only), then write with the texts looked up.

SearchShard: all of a shard's queries go to faiss in one batched search and one exact sparse
rerank against each space's index, mapped from its files (mine_index_files: vectors, ids, TF-IDF
rows, claims; no texts); the
candidate filters run over the shard's (sample, candidate) pairs as arrays (mine_filter). Out
come, per sample, the chosen rows (hard negatives, near-duplicate texts, image positives) with
their scores, and the Requests for their texts, keyed by bucket (mine_buckets.resolve answers
them). WriteShard joins the answers back by shard and writes the shard with mine.json.

Per sample, as before: hard negatives are the best-scoring candidates below dup_threshold and at
or above min_negative_score whose text never shows this image and which are certainly false of
it; positives are other samples with the same text (round a seeded ring), then the members of
near-duplicate texts (cosine ≥ dup_threshold); image positives likewise over tag texts.
`alignment` is how well the caption fits its own image by the detector's tags (alignment.py);
with config.drop_misaligned set, samples at/above it are left out of the written shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from vlforge.pipeline import progress
from vlforge.pipeline.alignment import graph_alignment, misaligned
from vlforge.pipeline.mine_buckets import (
    CAPTIONS,
    DUPLICATE,
    IMAGE,
    NEGATIVE,
    TAGS,
    Requests,
    image_hash,
    pair_codes,
)
from vlforge.pipeline.mine_config import MineConfig
from vlforge.pipeline.mine_filter import as_sg, certainly_false_pairs, compact_graph, sample_facts
from vlforge.pipeline.mine_index_files import OpenIndex, open_index
from vlforge.pipeline.mine_scan import (
    CorpusStats,
    MineInput,
    PickledBatch,
    gc_paused,
    parse_json,
    read_shard,
)
from vlforge.pipeline.mine_shards import MINE_FIELD, output_path, write_mined_tar, write_stats
from vlforge.pipeline.neighbours import rerank
from vlforge.pipeline.rewrites import SlotVocabulary, rewrite
from vlforge.pipeline.staged_values import Staged
from vlforge.pipeline.tfidf import stable_hash

# json.dumps(m, sort_keys=True) builds a new encoder per call; one shared encoder, same bytes.
_ENCODER = json.JSONEncoder(sort_keys=True)
RERANK_BATCH = 2048  # queries per sparse rerank: bounds the repeated-row matrices' memory


def search(
    space: OpenIndex | None, rows: np.ndarray, candidates: int
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of distinct text rows: (ids, exact scores) best first, self and misses as -1."""
    n_texts = space.n if space is not None else 0
    if space is None or not len(rows) or not n_texts:
        return np.full((len(rows), 0), -1, np.int64), np.zeros((len(rows), 0), np.float32)
    k = min(candidates + 1, n_texts)
    query_rows = space.sparse[rows]
    # The queries are indexed texts: grouped by their own IVF list, neighbouring queries probe
    # mostly the same lists, which then stay in cache (the search is memory-bound).
    index = space.neighbours
    order = np.argsort(index.lists[rows], kind="stable")
    _, found = index.search(space.reducer.transform(query_rows), k, order)
    ids = np.empty_like(found)
    scores = np.empty(found.shape, np.float32)
    for lo in range(0, len(rows), RERANK_BATCH):
        hi = lo + RERANK_BATCH
        scores[lo:hi], ids[lo:hi] = rerank(query_rows[lo:hi], space.sparse, found[lo:hi])
    ids[ids == rows[:, None]] = -1
    return ids, scores


@dataclass
class ShardSearch:
    """One shard's search: per sample, everything but the texts of the chosen entries."""

    scan: MineInput
    mines: list[dict]  # per sample: alignment and rewrites
    ring: list  # per sample: [(key, caption)] of others with its caption text
    tag_ring: list  # per sample: [key] of others with its tag text
    # chosen entries, each (sample, slot, row, score) arrays: negatives, near-duplicate texts,
    # image positives
    negatives: tuple
    duplicates: tuple
    images: tuple


def _entries(mask: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> tuple:
    sample, _ = np.nonzero(mask)  # row-major: the order of ids[mask]
    slot = np.arange(len(sample)) - np.searchsorted(sample, sample)  # place among its own
    return sample.astype(np.int64), slot.astype(np.int64), ids[mask], scores[mask]


def search_shard(
    scan: MineInput,
    data: bytes,
    sample_rows: list,
    indexes: dict,
    stats: CorpusStats,
    config: MineConfig,
) -> ShardSearch:
    """A shard's samples searched against each space's index (OpenIndex by space)."""
    from vlforge.pipeline.mine_stage import certainly_false

    n = len(scan.keys)
    rows = {CAPTIONS: np.full(n, -1, np.int64), TAGS: np.full(n, -1, np.int64)}
    rings: dict[str, list] = {CAPTIONS: [[] for _ in range(n)], TAGS: [[] for _ in range(n)]}
    for part in sample_rows:
        rows[part.space][part.positions] = part.rows
        for at, ring in zip(part.positions.tolist(), part.ring, strict=True):
            rings[part.space][at] = ring
    own_images = np.fromiter((image_hash(i) for i in scan.images), np.int64, n)
    sgs = [parse_json(scan.index.field(data, int(i), "sg.json")) for i in scan.rows]
    tags = [parse_json(scan.index.field(data, int(i), "tags.json")) for i in scan.rows]
    has_tags = np.fromiter((t is not None for t in tags), bool, n)
    empty = (np.zeros(0, np.int64),) * 3 + (np.zeros(0, np.float32),)

    # ---- captions: search each distinct text once, then every sample's candidate pairs
    space = indexes.get(CAPTIONS)
    own_graphs = [compact_graph(sg) for sg in sgs]  # sample_facts and alignment read them
    negatives = duplicates = empty
    if space is not None and n:  # every sample scanned has a caption text (maybe "")
        distinct, inverse = np.unique(rows[CAPTIONS], return_inverse=True)
        ids, scores = search(space, distinct, config.candidates)
        ids, scores = ids[inverse], scores[inverse]  # samples × candidates
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        maybe = valid & (scores < config.dup_threshold) & (scores >= config.min_negative_score)
        sample_of = np.repeat(np.arange(n), ids.shape[1])
        flat = np.flatnonzero(maybe.ravel())
        candidate_rows = safe.ravel()[flat]
        shows_image = space.has_image(
            candidate_rows, pair_codes(candidate_rows, own_images[sample_of[flat]])
        )
        flat = flat[~shows_image]
        false = np.zeros(len(flat), bool)
        pair_samples, pair_rows = sample_of[flat], safe.ravel()[flat]
        if space.claims is not None:
            tagged = has_tags[pair_samples]
            facts = sample_facts(
                own_graphs,
                [(t or {}).get("tags", []) for t in tags],
                {name: i for i, name in enumerate(stats.tag_names)},
                space_relations(),
            )
            false[tagged] = certainly_false_pairs(
                pair_samples[tagged], pair_rows[tagged], facts, space.claims, space_relations()
            )
            python = np.flatnonzero(~tagged)
        else:
            python = np.arange(len(flat))
        if len(python):
            detectable = set(stats.tag_names) if stats.tag_names else None
            graphs: dict[int, dict | None] = {}
            for j in python.tolist():
                s, r = int(pair_samples[j]), int(pair_rows[j])
                if r not in graphs:
                    graphs[r] = as_sg(space.text_graph(r))
                false[j] = certainly_false(graphs[r], sgs[s], tags[s], detectable)
        negative = np.zeros(ids.size, bool)
        negative[flat[false]] = True
        negative = negative.reshape(ids.shape)
        negative &= np.cumsum(negative, axis=1) <= config.k_negatives
        negatives = _entries(negative, ids, scores)
        duplicates = _entries(valid & (scores >= config.dup_threshold), ids, scores)

    # ---- tags: image positives, the ring's first, then neighbours of another image
    t_space = indexes.get(TAGS)
    images = empty
    has_tag_text = rows[TAGS] >= 0
    if t_space is not None and has_tag_text.any():
        t_distinct, t_inverse = np.unique(rows[TAGS][has_tag_text], return_inverse=True)
        t_ids, t_scores = search(t_space, t_distinct, config.candidates)
        t_of = np.full(n, -1, np.int64)
        t_of[has_tag_text] = t_inverse
        chosen = ([], [], [], [])
        limit = config.k_image_positives
        for j in np.flatnonzero(has_tag_text).tolist():
            found = len(rings[TAGS][j])
            slot = 0
            ids_j, scores_j = t_ids[t_of[j]], t_scores[t_of[j]]
            for r, score in zip(ids_j.tolist(), scores_j.tolist(), strict=True):
                if r < 0:
                    continue
                if score < config.image_threshold or found >= limit:
                    break
                if t_space.first_image[r] != own_images[j]:
                    for column, value in zip(chosen, (j, slot, r, score), strict=True):
                        column.append(value)
                    slot += 1
                    found += 1
        images = (
            np.asarray(chosen[0], np.int64),
            np.asarray(chosen[1], np.int64),
            np.asarray(chosen[2], np.int64),
            np.asarray(chosen[3], np.float32),
        )

    vocab = _vocabulary(stats.vocabulary)
    detectable = _detectable_set(stats.tag_names)
    names = detectable or set()
    mines = [
        {
            "alignment": graph_alignment(own_graphs[j], tags[j], names),
            "rewrites": _rewrites(scan, j, sgs[j], tags[j], vocab, detectable, config),
        }
        for j in range(n)
    ]
    return ShardSearch(scan, mines, rings[CAPTIONS], rings[TAGS], negatives, duplicates, images)


_RELATIONS: list = []


def space_relations():
    """The stage's Relations table (mine_stage's OPPOSITE / ASYMMETRIC), built once."""
    if not _RELATIONS:
        from vlforge.pipeline.mine_filter import Relations
        from vlforge.pipeline.mine_stage import ASYMMETRIC, OPPOSITE

        _RELATIONS.append(Relations(OPPOSITE, ASYMMETRIC))
    return _RELATIONS[0]


def requests(search: ShardSearch, starts) -> list:
    """((space, bucket), Requests) for the texts a shard's search chose."""
    out = []
    own = np.fromiter(
        (image_hash(i) for i in search.scan.images), np.int64, len(search.scan.images)
    )
    for space, kinds in ((CAPTIONS, (NEGATIVE, DUPLICATE)), (TAGS, (IMAGE,))):
        parts = [
            (kind, entries)
            for kind, entries in zip(
                (NEGATIVE, DUPLICATE, IMAGE),
                (search.negatives, search.duplicates, search.images),
                strict=True,
            )
            if kind in kinds and len(entries[0])
        ]
        if not parts:
            continue
        kind = np.concatenate([np.full(len(e[0]), k, np.int64) for k, e in parts])
        sample = np.concatenate([e[0] for _, e in parts])
        slot = np.concatenate([e[1] for _, e in parts])
        row = np.concatenate([e[2] for _, e in parts])
        bucket = starts.bucket_of(space, row)
        for b in np.unique(bucket).tolist():
            at = np.flatnonzero(bucket == b)
            out.append(
                (
                    (space, b),
                    Requests(
                        search.scan.shard, kind[at], sample[at], slot[at], row[at], own[sample[at]]
                    ),
                )
            )
    return out


def assemble_mines(search: ShardSearch, resolved: list, config: MineConfig) -> list[dict]:
    """The mine dict of every sample of the shard, in scan order, with the texts filled in."""
    n = len(search.scan.keys)
    texts: dict[tuple[int, int, int], object] = {}
    for part in resolved:
        for key, value in zip(
            zip(part.kind.tolist(), part.sample.tolist(), part.slot.tolist(), strict=True),
            part.values,
            strict=True,
        ):
            texts[key] = value

    def per_sample(kind: int, entries: tuple) -> list[list]:
        out: list[list] = [[] for _ in range(n)]
        sample, slot, _, scores = entries
        for j, s, score in zip(sample.tolist(), slot.tolist(), scores.tolist(), strict=True):
            out[j].append((texts[(kind, j, s)], score))
        return out

    negatives = per_sample(NEGATIVE, search.negatives)
    duplicates = per_sample(DUPLICATE, search.duplicates)
    images = per_sample(IMAGE, search.images)
    out = []
    for j in range(n):
        positives = [{"key": k, "caption": c, "score": 1.0} for k, c in search.ring[j]]
        for members, score in duplicates[j]:
            if len(positives) >= config.k_positives:
                break
            score = round(score, 4)
            positives.extend({"key": k, "caption": c, "score": score} for k, c in members)
        found = [{"key": k, "score": 1.0} for k in search.tag_ring[j]]
        found.extend({"key": k, "score": round(score, 4)} for k, score in images[j])
        out.append(
            {
                **search.mines[j],
                "hard_negatives": [
                    {"key": k, "caption": c, "score": round(score, 4)}
                    for (k, c), score in negatives[j]
                ],
                "positives": positives[: config.k_positives],
                "image_positives": found[: config.k_image_positives],
            }
        )
    return out


def _rewrites(scan, j, sg, tags, vocab, detectable, config: MineConfig) -> list[dict]:
    if not sg:
        return []
    key = scan.keys[j]
    rng = np.random.default_rng(stable_hash(key, config.seed))
    return rewrite(
        scan.captions[j],
        sg,
        vocab,
        rng,
        kinds=config.rewrite_kinds,
        per_kind=config.rewrites_per_kind,
        image_tags=tags,
        detectable=detectable,
    )


_VOCAB_CACHE: dict[int, SlotVocabulary] = {}


def _vocabulary(table: dict) -> SlotVocabulary:
    """One SlotVocabulary (with its sorted name lists) per side-input value, not per shard."""
    vocab = _VOCAB_CACHE.get(id(table))
    if vocab is None or vocab.table is not table:
        _VOCAB_CACHE.clear()
        vocab = _VOCAB_CACHE[id(table)] = SlotVocabulary(table)
    return vocab


def _detectable_set(names: list[str] | None) -> set[str] | None:
    return set(names) if names else None


class SearchShards(beam.DoFn):
    """(shard, {"input": [MineInput], "rows": [SampleRows]}) → ShardSearch.

    `indexes` (space → staged IndexFiles) and `stats` (staged CorpusStats) are read once per
    worker (staged_values.Staged); the index files themselves are mapped (open_index).
    """

    def __init__(self, config: MineConfig, indexes: dict[str, Staged], stats: Staged):
        self.config = config
        self.indexes = indexes
        self.stats = stats

    def process(self, item):
        opened = {
            space: open_index(handle.get(), self.config.neighbours)
            for space, handle in self.indexes.items()
        }
        stats = self.stats.get()
        _, joined = item
        (scan,) = joined["input"]
        with gc_paused():
            data = read_shard(scan.shard)
            result = search_shard(scan, data, list(joined["rows"]), opened, stats, self.config)
            del data
        yield result


class WriteShards(beam.DoFn):
    """(shard, {"search": [ShardSearch], "texts": [Resolved]}) → the mined shard, its counts."""

    def __init__(self, config: MineConfig, out_dir: str):
        self.config = config
        self.out_dir = out_dir
        self.written = Metrics.counter("mine", "samples_out")
        self.negatives = Metrics.counter("mine", "negatives")
        self.dropped = Metrics.counter("mine", "dropped_misaligned")

    def process(self, item):
        _, joined = item
        (search,) = joined["search"]
        scan = search.scan
        target = output_path(scan.shard, self.out_dir)
        with gc_paused():
            data = read_shard(scan.shard)
            mines = assemble_mines(search, list(joined["texts"]), self.config)
            threshold = self.config.drop_misaligned
            drop = {
                int(i)
                for i, m in zip(scan.rows.tolist(), mines, strict=True)
                if threshold is not None and misaligned(m["alignment"], threshold)
            }
            payloads = {
                int(i): _ENCODER.encode(m).encode()
                for i, m in zip(scan.rows.tolist(), mines, strict=True)
                if int(i) not in drop
            }
            write_mined_tar(target, data, scan.index, payloads, MINE_FIELD, drop)
            counts = write_stats(scan.shard, target, scan.index.keys, scan.rows, mines, drop)
            n_negatives = sum(
                len(m["hard_negatives"])
                for i, m in zip(scan.rows.tolist(), mines, strict=True)
                if i not in drop
            )
            # Dropped before the collector resumes, so that it does not walk them all once.
            del mines, payloads, data
        self.written.inc(len(counts))
        self.negatives.inc(n_negatives)
        self.dropped.inc(len(drop))
        progress.advance(len(counts) + len(drop))
        yield {
            "shard": target.rsplit("/", 1)[-1],
            "samples": len(counts),
            "dropped_misaligned": len(drop),
        }


beam.coders.registry.register_coder(ShardSearch, PickledBatch)
