"""Second pass, one shard at a time: search, filter, rewrite, and copy the shard with mine.json.

All of a shard's queries go to faiss in one batched search and one exact sparse rerank; the
candidate filters run over the shard's (sample, candidate) pairs as arrays (mine_filter). What is
left per sample in Python is assembling its few chosen entries, its rewrites and its JSON.

Per sample, as before: hard negatives are the best-scoring candidates below dup_threshold and at
or above min_negative_score whose text never shows this image and which are certainly false of
it; positives are other samples with the same text (round a seeded ring), then the members of
near-duplicate texts (cosine ≥ dup_threshold); image positives likewise over tag texts.
`alignment` is how well the caption fits its own image by the detector's tags (alignment.py);
with config.drop_misaligned set, samples at/above it are left out of the written shard.
"""

from __future__ import annotations

import json

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from vlforge.pipeline import progress
from vlforge.pipeline.alignment import graph_alignment, misaligned
from vlforge.pipeline.mine_config import MineConfig
from vlforge.pipeline.mine_corpus import POSITIVE_MEMBERS, Corpus, SearchSpace
from vlforge.pipeline.mine_filter import as_sg, certainly_false_pairs, compact_graph, sample_facts
from vlforge.pipeline.mine_groups import ring_others
from vlforge.pipeline.mine_scan import MineInput, gc_paused, parse_json, read_shard
from vlforge.pipeline.mine_shards import MINE_FIELD, output_path, write_mined_tar, write_stats
from vlforge.pipeline.neighbours import NeighbourIndex, rerank
from vlforge.pipeline.rewrites import SlotVocabulary, rewrite
from vlforge.pipeline.tfidf import stable_hash

# json.dumps(m, sort_keys=True) builds a new encoder per call; one shared encoder, same bytes.
_ENCODER = json.JSONEncoder(sort_keys=True)
RERANK_BATCH = 2048  # queries per sparse rerank: bounds the repeated-row matrices' memory


def search(
    space: SearchSpace, index: NeighbourIndex | None, rows: np.ndarray, candidates: int
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of distinct text rows: (ids, exact scores) best first, self and misses as -1."""
    n_texts = len(space.groups.texts)
    if index is None or not len(rows) or not n_texts:
        return np.full((len(rows), 0), -1, np.int64), np.zeros((len(rows), 0), np.float32)
    k = min(candidates + 1, n_texts)
    query_rows = space.sparse[rows]
    # The queries are indexed texts: grouped by their own IVF list, neighbouring queries probe
    # mostly the same lists, which then stay in cache (the search is memory-bound).
    order = np.argsort(index.lists[rows], kind="stable")
    _, found = index.search(space.reducer.transform(query_rows), k, order)
    ids = np.empty_like(found)
    scores = np.empty(found.shape, np.float32)
    for lo in range(0, len(rows), RERANK_BATCH):
        hi = lo + RERANK_BATCH
        scores[lo:hi], ids[lo:hi] = rerank(query_rows[lo:hi], space.sparse, found[lo:hi])
    ids[ids == rows[:, None]] = -1
    return ids, scores


def _has_image(space: SearchSpace, n_images: int, rows: np.ndarray, images: np.ndarray):
    codes = rows * n_images + images
    at = np.minimum(np.searchsorted(space.pair_codes, codes), len(space.pair_codes) - 1)
    return space.pair_codes[at] == codes


class _Indexes:
    """Deserialised faiss indexes, kept per fingerprint for the life of the worker."""

    def __init__(self, config: MineConfig):
        self.config = config
        self.cache: dict[int, NeighbourIndex | None] = {}

    def get(self, space: SearchSpace) -> NeighbourIndex | None:
        if space.fingerprint not in self.cache:
            if len(self.cache) >= 4:  # a new corpus (another run in this worker)
                self.cache.clear()
            self.cache[space.fingerprint] = (
                None
                if space.index is None
                else NeighbourIndex.from_bytes(space.index, self.config.neighbours)
            )
        return self.cache[space.fingerprint]


def mine_shard(
    scan: MineInput, data: bytes, corpus: Corpus, config: MineConfig, indexes: _Indexes
) -> list[dict]:
    """The mine dict of every scanned sample of one shard, in scan order."""
    from vlforge.pipeline.mine_stage import certainly_false

    n = len(scan.keys)
    if not n:
        return []
    gids = corpus.shard_start[scan.shard] + np.arange(n)
    images = corpus.images
    own_images = images[gids]
    sgs = [parse_json(scan.index.field(data, int(i), "sg.json")) for i in scan.rows]
    tags = [parse_json(scan.index.field(data, int(i), "tags.json")) for i in scan.rows]
    has_tags = np.fromiter((t is not None for t in tags), bool, n)

    # ---- captions: search each distinct text once, then every sample's candidate pairs
    space = corpus.captions_space
    rows = space.groups.row[gids]
    distinct, inverse = np.unique(rows, return_inverse=True)
    ids, scores = search(space, indexes.get(space), distinct, config.candidates)
    ids, scores = ids[inverse], scores[inverse]  # samples × candidates
    valid = ids >= 0
    safe = np.where(valid, ids, 0)
    maybe = valid & (scores < config.dup_threshold) & (scores >= config.min_negative_score)
    sample_of = np.repeat(np.arange(n), ids.shape[1])
    flat = np.flatnonzero(maybe.ravel())
    shows_image = _has_image(
        space, corpus.n_images, safe.ravel()[flat], own_images[sample_of[flat]]
    )
    flat = flat[~shows_image]
    false = np.zeros(len(flat), bool)
    pair_samples, pair_rows = sample_of[flat], safe.ravel()[flat]
    own_graphs = [compact_graph(sg) for sg in sgs]  # sample_facts and alignment read them
    if corpus.claims is not None:
        tagged = has_tags[pair_samples]
        facts = sample_facts(
            own_graphs,
            [(t or {}).get("tags", []) for t in tags],
            {name: i for i, name in enumerate(corpus.detectable)},
            corpus.relations,
        )
        false[tagged] = certainly_false_pairs(
            pair_samples[tagged], pair_rows[tagged], facts, corpus.claims, corpus.relations
        )
        python = np.flatnonzero(~tagged)
    else:
        python = np.arange(len(flat))
    if len(python):
        detectable = set(corpus.detectable) if corpus.detectable else None
        graphs: dict[int, dict | None] = {}
        for j in python.tolist():
            s, r = int(pair_samples[j]), int(pair_rows[j])
            if r not in graphs:
                graphs[r] = as_sg(corpus.text_graphs[r])
            false[j] = certainly_false(graphs[r], sgs[s], tags[s], detectable)
    negative = np.zeros(ids.size, bool)
    negative[flat[false]] = True
    negative = negative.reshape(ids.shape)
    negative &= np.cumsum(negative, axis=1) <= config.k_negatives
    duplicate = valid & (scores >= config.dup_threshold)

    ring = ring_others(space.groups, gids, images, config.k_positives)
    t_space = corpus.tags_space
    t_rows = t_space.groups.row[gids]
    t_ring = ring_others(t_space.groups, gids, images, config.k_image_positives)
    has_tag_text = t_rows >= 0
    t_distinct, t_inverse = np.unique(t_rows[has_tag_text], return_inverse=True)
    t_ids, t_scores = search(t_space, indexes.get(t_space), t_distinct, config.candidates)
    t_of = np.full(n, -1, np.int64)
    t_of[has_tag_text] = t_inverse

    vocab = _vocabulary(corpus.vocabulary)
    detectable = _detectable_set(corpus.detectable)
    names = detectable or set()
    keys, captions = corpus.keys, corpus.captions
    first, t_first = space.groups.first, t_space.groups.first
    # Each sample's chosen entries as Python lists, cut from arrays computed once per shard.
    neg_rows, neg_cols = np.nonzero(negative)
    neg_at = np.searchsorted(neg_rows, np.arange(n + 1))
    neg_first = first[ids[neg_rows, neg_cols]].tolist()
    neg_scores = [round(x, 4) for x in scores[neg_rows, neg_cols].tolist()]
    dup_rows, dup_cols = np.nonzero(duplicate)
    dup_at = np.searchsorted(dup_rows, np.arange(n + 1))
    dup_ids = ids[dup_rows, dup_cols].tolist()
    dup_scores = scores[dup_rows, dup_cols].tolist()
    out = []
    for j in range(n):
        positives = [{"key": keys[g], "caption": captions[g], "score": 1.0} for g in ring[j]]
        for at in range(dup_at[j], dup_at[j + 1]):
            if len(positives) >= config.k_positives:
                break
            r, score = dup_ids[at], round(dup_scores[at], 4)
            lo, hi = space.groups.offsets[r], space.groups.offsets[r + 1]
            group = space.groups.members[lo : min(hi, lo + POSITIVE_MEMBERS)]
            positives.extend(
                {"key": keys[g], "caption": captions[g], "score": score}
                for g in group.tolist()
                if images[g] != own_images[j]
            )
        negatives = [
            {"key": keys[g], "caption": captions[g], "score": neg_scores[at]}
            for at in range(neg_at[j], neg_at[j + 1])
            for g in (neg_first[at],)
        ]
        found = [{"key": keys[g], "score": 1.0} for g in t_ring[j]]
        if t_of[j] >= 0:
            for r, score in zip(t_ids[t_of[j]].tolist(), t_scores[t_of[j]].tolist(), strict=True):
                if r < 0:
                    continue
                if score < config.image_threshold or len(found) >= config.k_image_positives:
                    break
                g = int(t_first[r])
                if images[g] != own_images[j]:
                    found.append({"key": keys[g], "score": round(score, 4)})
        out.append(
            {
                "alignment": graph_alignment(own_graphs[j], tags[j], names),
                "hard_negatives": negatives,
                "positives": positives[: config.k_positives],
                "image_positives": found[: config.k_image_positives],
                "rewrites": _rewrites(scan, j, sgs[j], tags[j], vocab, detectable, config),
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


class MineShards(beam.DoFn):
    """MineInput (+ the Corpus side input) → the mined shard written to out_dir, and its counts."""

    def __init__(self, config: MineConfig, out_dir: str):
        self.config = config
        self.out_dir = out_dir
        self.written = Metrics.counter("mine", "samples_out")
        self.negatives = Metrics.counter("mine", "negatives")
        self.dropped = Metrics.counter("mine", "dropped_misaligned")
        self._indexes: _Indexes | None = None

    def setup(self):
        self._indexes = _Indexes(self.config)

    def process(self, scan: MineInput, corpus: Corpus):
        if self._indexes is None:
            self.setup()
        target = output_path(scan.shard, self.out_dir)
        with gc_paused():
            data = read_shard(scan.shard)
            mines = mine_shard(scan, data, corpus, self.config, self._indexes)
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
