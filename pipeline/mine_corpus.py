"""The search index every shard is mined against, built from text buckets, never from one list.

Per space (captions, tags), from the TextBuckets (mine_buckets):
- the SVD reducer, fitted on the `svd_sample` distinct texts of lowest seeded hash, kept by a
  combiner that holds at most that many (LowestHashes);
- the faiss index trained on a deterministic sample of the texts' vectors: those whose hash is
  below a threshold set for training_size(n) of them (a little more, cut to exactly that many
  at training), so at most ~39 vectors per IVF list whatever the corpus;
- then filled bucket by bucket (neighbours.fill_part), each part written as a file with the
  numeric per-text columns the search step reads: exact TF-IDF rows (the rerank), (text,
  image) codes ("this text shows the image"), each text's representative's image, and the
  texts' checkable claims (mine_filter) as integer arrays; the parts are merged in bucket order
  into one file per column (mine_index_files, which says why files and not a side-input value).

The search step reads that merged index's handle (IndexFiles, staged by mine_phases); its files hold vectors,
ids and numbers, no key, caption or text (the search step asks for those by row id,
mine_buckets.resolve). The one exception is the texts' compact scene graphs, kept only when some
sample has no tags.json (those pairs take the Python certainly_false, which reads graphs).
"""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import scipy.sparse as sp
from sklearn.preprocessing import normalize

from vlforge.pipeline.mine_buckets import CAPTIONS, TextBucket, pair_codes
from vlforge.pipeline.mine_config import MineConfig
from vlforge.pipeline.mine_filter import Relations, encode_claims
from vlforge.pipeline.mine_index_files import assemble_files, write_part
from vlforge.pipeline.mine_scan import CorpusStats, PickledBatch
from vlforge.pipeline.neighbours import fill_part, index_kind, train_index, training_size
from vlforge.pipeline.tfidf import Reducer, fit_reducer, idf_from_df

_HASH_SPACE = 1 << 64


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


def svd_candidates(bucket: TextBucket, stats: CorpusStats, limit: int):
    """(space, HashSample): the bucket's texts that may be among the space's `limit` of lowest
    hash. Only those below a hash threshold are sent on, set for 2 * limit + 64 of the space's
    samples, so that what the runner holds until LowestHashes has combined them is bounded by
    the sample size, not the corpus (DaskRunner keeps a combiner's inputs in memory). The
    threshold counts samples, not distinct texts: a corpus mostly of repeated captions may
    yield fewer than `limit`, and the reducer is then fitted on fewer (the same on any runner).
    """
    n = stats.n_captions if bucket.space == CAPTIONS else stats.n_tags
    share = min(1.0, (2 * limit + 64) / max(1, n))
    threshold = np.uint64(min(_HASH_SPACE - 1, int(share * _HASH_SPACE)))
    chosen = np.flatnonzero(bucket.hashes <= threshold)
    whole = HashSample(
        bucket.hashes[chosen],
        [bucket.groups.texts[i] for i in chosen.tolist()],
        bucket.counts[chosen],
    )
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


def index_part(
    bucket: TextBucket,
    reducers: dict,
    trained: dict,
    stats: CorpusStats,
    starts,
    config: MineConfig,
    relations: Relations,
    directory: str,
):
    """TextBucket → (space, PartFile): its rows' vectors and numbers, written under `directory`."""
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
        write_part(
            directory,
            space,
            bucket.bucket,
            start,
            sparse=sparse,
            pair_codes=pair_codes(member_rows, bucket.images[groups.members]),
            first_image=bucket.images[groups.first],
            vectors=dense if flat else None,
            faiss_part=None if flat else fill_part(trained[space], rows, dense),
            claims=claims,
            graphs=graphs,
        ),
    )


def assemble(item, reducers: dict, trained: dict, starts, config: MineConfig, directory: str):
    """(space, [PartFile]) → (space, IndexFiles): the parts merged into the space's index files."""
    space, parts = item
    n = starts.total(space)
    kind = index_kind(n, config.neighbours)
    kind = "flat" if kind == "flat" else "ivf"
    return space, assemble_files(
        list(parts), directory, n, reducers[space], trained.get(space), kind
    )


for _type in (HashSample,):
    beam.coders.registry.register_coder(_type, PickledBatch)
