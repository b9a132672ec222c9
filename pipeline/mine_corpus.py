"""The search index every shard is mined against, built from text buckets, never from one list.

Per space (captions, tags), from the TextBuckets (mine_buckets):
- the SVD reducer, fitted on the `svd_sample` distinct texts of lowest seeded hash, kept by a
  combiner that holds at most that many (LowestHashes);
- the faiss index trained on a deterministic sample of the texts' vectors: those whose hash is
  below a threshold set for training_size(n) of them (a little more, cut to exactly that many
  at training), so at most ~39 vectors per IVF list whatever the corpus;
- then filled bucket by bucket (neighbours.fill_part), the parts merged in bucket order, with
  the numeric per-text columns the search step reads: exact TF-IDF rows (the rerank), (text,
  image) codes ("this text shows the image"), each text's representative's image, and the
  texts' checkable claims (mine_filter) as integer arrays.

That one element per space is the search step's side input: vectors, ids and numbers; no key,
caption or text (the search step asks for those by row id, mine_buckets.resolve). The one
exception is `text_graphs`, compact scene graphs of each text, kept only when some sample has no
tags.json (those pairs take the Python certainly_false, which reads graphs).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import scipy.sparse as sp
from sklearn.preprocessing import normalize

from vlforge.pipeline.mine_buckets import CAPTIONS, TextBucket, pair_codes
from vlforge.pipeline.mine_config import MineConfig
from vlforge.pipeline.mine_filter import Claims, Relations, encode_claims
from vlforge.pipeline.mine_scan import CorpusStats, PickledBatch
from vlforge.pipeline.neighbours import (
    fill_part,
    index_kind,
    merge_parts,
    train_index,
    training_size,
)
from vlforge.pipeline.tfidf import Reducer, fit_reducer, idf_from_df

_HASH_SPACE = 1 << 64


@dataclass
class SearchIndex:
    """One space's index and per-text numbers, by global row id (mine_buckets.RowStarts)."""

    space: str
    n: int
    reducer: Reducer
    index: np.ndarray  # serialised faiss index; its ids are the rows
    sparse: sp.csr_matrix  # L2-normalised TF-IDF, one row per distinct text
    pair_codes: np.ndarray  # sorted uint64 pair_codes(row, image) over all members
    first_image: np.ndarray  # int64 per row: its representative's image
    claims: Claims | None  # captions, when some sample has tags
    text_graphs: list | None  # captions, only when some sample has no tags (see above)
    fingerprint: int  # identifies the index, so a worker deserialises it once


def space_idf(stats: CorpusStats, space: str) -> np.ndarray:
    if space == CAPTIONS:
        return idf_from_df(stats.caption_df, stats.n_captions)
    return idf_from_df(stats.tag_df, stats.n_tags)


def tfidf_rows(counts: sp.csr_matrix, idf: np.ndarray) -> sp.csr_matrix:
    """tfidf.tfidf() from counts already hashed: sublinear TF, IDF, L2."""
    if not counts.shape[0]:
        return counts.astype(np.float32)
    rows = counts.astype(np.float32, copy=True)
    np.log1p(rows.data, out=rows.data)
    rows.data *= idf[rows.indices]
    return normalize(rows, norm="l2", copy=False).astype(np.float32)


# ---- the SVD sample ---------------------------------------------------------------------------


@dataclass
class HashSample:
    """Texts with their hashes and term counts: a sample kept as arrays, not per-text objects."""

    hashes: np.ndarray  # uint64
    texts: list[str]
    counts: sp.csr_matrix

    def lowest(self, limit: int) -> HashSample:
        """The `limit` of lowest (hash, text) (distinct texts: hashes differ but for ~2^-64)."""
        order = sorted(range(len(self.texts)), key=lambda i: (int(self.hashes[i]), self.texts[i]))
        take = np.asarray(order[:limit], np.int64)
        return HashSample(
            self.hashes[take], [self.texts[i] for i in take.tolist()], self.counts[take]
        )


def svd_candidates(bucket: TextBucket, limit: int):
    """A bucket's `limit` texts of lowest hash: (space, HashSample)."""
    whole = HashSample(bucket.hashes, bucket.groups.texts, bucket.counts)
    yield bucket.space, whole.lowest(limit)


class LowestHashes(beam.CombineFn):
    """HashSamples → the `limit` texts of lowest (hash, text): state bounded by `limit`."""

    def __init__(self, limit: int):
        self.limit = limit

    def create_accumulator(self):
        return None

    def _merge(self, samples) -> HashSample | None:
        samples = [s for s in samples if s is not None]
        if not samples:
            return None
        joined = HashSample(
            np.concatenate([s.hashes for s in samples]),
            [t for s in samples for t in s.texts],
            sp.vstack([s.counts for s in samples], format="csr"),
        )
        return joined.lowest(self.limit)

    def add_input(self, acc, sample):
        return self._merge([acc, sample])

    def merge_accumulators(self, accumulators):
        return self._merge(list(accumulators))

    def extract_output(self, acc):
        return acc

    def get_accumulator_coder(self) -> beam.coders.Coder:
        return PickledBatch()


def fit_space_reducer(item, stats: CorpusStats, config: MineConfig):
    """(space, sampled texts) → (space, Reducer), fitted on the sample in text order."""
    space, sample = item
    order = np.asarray(sorted(range(len(sample.texts)), key=sample.texts.__getitem__), np.int64)
    rows = tfidf_rows(sample.counts[order], space_idf(stats, space))
    return space, fit_reducer(rows, config.dim, config.svd_columns, config.seed)


# ---- training on a sample -----------------------------------------------------------------


def _vectors(space: str, counts: sp.csr_matrix, reducer: Reducer, stats: CorpusStats):
    sparse = tfidf_rows(counts, space_idf(stats, space))
    return sparse, reducer.transform(sparse)


def train_candidates(bucket: TextBucket, reducers: dict, stats: CorpusStats, starts, config):
    """The bucket's vectors whose hash falls under the training sample's threshold."""
    n = starts.total(bucket.space)
    wanted = training_size(n, config.neighbours)
    if not wanted:
        return
    # A little above wanted/n, so that (almost surely) at least `wanted` pass; cut at training.
    share = min(1.0, (wanted * 1.05 + 64) / n)
    threshold = np.uint64(min(_HASH_SPACE - 1, int(share * _HASH_SPACE)))
    chosen = np.flatnonzero(bucket.hashes <= threshold)
    if not len(chosen):
        return
    _, dense = _vectors(bucket.space, bucket.counts[chosen], reducers[bucket.space], stats)
    yield bucket.space, (bucket.hashes[chosen], dense)


class ConcatSamples(beam.CombineFn):
    """(hashes, vectors) parts → one (hashes, vectors) pair (bounded: see train_candidates)."""

    def create_accumulator(self):
        return []

    def add_input(self, acc, part):
        acc.append(part)
        return acc

    def merge_accumulators(self, accumulators):
        return [p for acc in accumulators for p in acc]

    def extract_output(self, acc):
        return acc

    def get_accumulator_coder(self) -> beam.coders.Coder:
        return PickledBatch()


def train_space(item, starts, config: MineConfig):
    """(space, sampled parts) → (space, trained empty index): the `wanted` lowest hashes."""
    space, parts = item
    hashes = np.concatenate([h for h, _ in parts])
    vectors = np.concatenate([v for _, v in parts])
    n = starts.total(space)
    wanted = training_size(n, config.neighbours)
    # Hashes of distinct texts differ (64 bits): sorted by hash, the sample's order is fixed
    # whatever order the buckets arrived in.
    order = np.argsort(hashes, kind="stable")[:wanted]
    return space, train_index(n, vectors[order], config.neighbours)


# ---- filling, bucket by bucket --------------------------------------------------------------


@dataclass
class IndexPart:
    space: str
    bucket: int
    start: int
    sparse: sp.csr_matrix
    vectors: np.ndarray | None  # the flat index's vectors (it is filled in row order)
    faiss_part: np.ndarray | None  # IVF: the trained index with this bucket's vectors
    pair_codes: np.ndarray
    first_image: np.ndarray
    claims: Claims | None
    graphs: list | None


def index_part(
    bucket: TextBucket,
    reducers: dict,
    trained: dict,
    stats: CorpusStats,
    starts,
    config: MineConfig,
    relations: Relations,
):
    """TextBucket → (space, IndexPart): its rows' vectors in the index, and their numbers."""
    space = bucket.space
    start = starts.start(space, bucket.bucket)
    sparse, dense = _vectors(space, bucket.counts, reducers[space], stats)
    rows = start + np.arange(bucket.size, dtype=np.int64)
    n = starts.total(space)
    flat = index_kind(n, config.neighbours) == "flat"
    groups = bucket.groups
    member_rows = start + groups.row[groups.members]
    claims = graphs = None
    if space == CAPTIONS:
        if stats.tag_names:
            name_id = {name: i for i, name in enumerate(stats.tag_names)}
            claims = encode_claims(bucket.graphs, name_id, relations)
        if not stats.tag_names or stats.n_untagged:
            graphs = bucket.graphs
    yield (
        space,
        IndexPart(
            space=space,
            bucket=bucket.bucket,
            start=start,
            sparse=sparse,
            vectors=dense if flat else None,
            faiss_part=None if flat else fill_part(trained[space], rows, dense),
            pair_codes=pair_codes(member_rows, bucket.images[groups.members]),
            first_image=bucket.images[groups.first],
            claims=claims,
            graphs=graphs,
        ),
    )


def concat_claims(parts: list[Claims]) -> Claims:
    """Claims of consecutive row ranges → the Claims of all of them."""

    def ptr(name: str) -> np.ndarray:
        out, base = [np.zeros(1, np.int64)], 0
        for c in parts:
            p = getattr(c, name)
            out.append(p[1:] + base)
            base += int(p[-1])
        return np.concatenate(out)

    def cat(name: str, dtype) -> np.ndarray:
        return np.concatenate([getattr(c, name) for c in parts] or [np.zeros(0, dtype)])

    return Claims(
        has_objects=cat("has_objects", bool),
        obj_ptr=ptr("obj_ptr"),
        obj_name=cat("obj_name", np.int64),
        obj_need=cat("obj_need", np.int64),
        attr_ptr=ptr("attr_ptr"),
        attr_name=cat("attr_name", np.int64),
        attr_id=cat("attr_id", np.int64),
        rel_ptr=ptr("rel_ptr"),
        rel_s=cat("rel_s", np.int64),
        rel_r=cat("rel_r", np.int64),
        rel_o=cat("rel_o", np.int64),
    )


def assemble(item, reducers: dict, trained: dict, starts, config: MineConfig):
    """(space, [IndexPart]) → (space, SearchIndex), parts taken in bucket (= row) order."""
    import faiss

    space, parts = item
    parts = sorted(parts, key=lambda p: p.bucket)
    n = starts.total(space)
    assert sum(p.sparse.shape[0] for p in parts) == n and all(
        p.start == q.start + q.sparse.shape[0] for q, p in zip(parts, parts[1:], strict=False)
    ), "index parts must cover the rows once, in order"
    reducer = reducers[space]
    if index_kind(n, config.neighbours) == "flat":
        index = faiss.IndexFlatIP(reducer.dim)
        index.add(np.ascontiguousarray(np.concatenate([p.vectors for p in parts]), np.float32))
    else:
        index = merge_parts(trained[space], [p.faiss_part for p in parts])
    data = faiss.serialize_index(index)
    claims = [p.claims for p in parts]
    graphs = [p.graphs for p in parts]
    return space, SearchIndex(
        space=space,
        n=n,
        reducer=reducer,
        index=data,
        sparse=sp.vstack([p.sparse for p in parts], format="csr"),
        pair_codes=np.sort(np.concatenate([p.pair_codes for p in parts])),
        first_image=np.concatenate([p.first_image for p in parts]),
        claims=concat_claims(claims) if all(c is not None for c in claims) else None,
        text_graphs=[g for part in graphs for g in part]
        if all(g is not None for g in graphs)
        else None,
        fingerprint=(zlib.crc32(data.tobytes()) << 32) | zlib.crc32(space.encode()),
    )


for _type in (SearchIndex, IndexPart, HashSample):
    beam.coders.registry.register_coder(_type, PickledBatch)
