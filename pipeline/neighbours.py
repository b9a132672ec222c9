"""Inner-product nearest neighbours over unit vectors with faiss, plus an exact sparse rerank.

Index choice (knobs in NeighbourConfig), by the number of vectors n:
- below `ivf_threshold`: IndexFlatIP, exact;
- from there to `pq_threshold`: an IVF index with nlist = clamp(4 * sqrt(n), 16, 65536) lists and
  nprobe = 32, its lists holding whole vectors as float16 (`storage="fp16"`, faiss's scalar
  quantizer; `storage="flat"` keeps float32). Its error is mostly probing too few lists; on
  demo-world captions nprobe=32 gives recall@10 ≈ 0.97-0.98 against the flat index at 100k and
  at 816k distinct captions (bench/bench_mine.py measures it on every run). fp16 took a third
  off the search time at 1M captions (the search is bound by memory bandwidth) with recall@10
  unchanged (0.9824 vs 0.9825);
- at or above `pq_threshold` (2,000,000 vectors: where the fp16 lists, 256 bytes per 128-d
  vector, pass half a GiB on every worker): IVF-PQ, `pq_bytes` bytes per vector (32: 8x
  smaller than fp16). Its candidates are approximate, but every candidate is rescored exactly
  (rerank), so what PQ costs is candidates missed, not wrong scores.
Training never sees the whole corpus: k-means runs on a deterministic sample of at most
`train_size` points per list (39, faiss's minimum without a warning; at least 39 * 256 for PQ's
codebooks) for `train_iterations` passes (faiss's 256 points and 25 passes cost more than all
the searching at 1M vectors; 39 points and 5 passes gave recall@10 0.9816 against 0.9821). The
trained, empty index is then filled part by part (`fill_part`, one text bucket at a time) and
the parts merged in a fixed order (`merge_parts` in memory; mining merges them on disk, in
mine_index_files, with the same order), so the index, and every answer, is the same
on each run and on every runner. A fixed k-means seed; on a GPU when faiss was built with one
(faiss-gpu): the same index moved with index_cpu_to_all_gpus.
Queries run in batches of `batch_size` so memory stays bounded for any corpus size; `order`
lets a caller search them grouped by IVF list (see `lists`), so that consecutive queries scan
the same lists while they are in cache. Each query's answer does not depend on the order.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import scipy.sparse as sp

from vlforge.pipeline.neighbour_config import NeighbourConfig


def gpu_count() -> int:
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:  # faiss-cpu builds have no GPU module
        return 0


def default_nlist(n: int) -> int:
    return int(min(65536, max(16, round(4 * math.sqrt(max(n, 1))))))


def index_kind(n: int, config: NeighbourConfig) -> str:
    """ "flat", "ivf" or "ivfpq" for n vectors."""
    if n < config.ivf_threshold:
        return "flat"
    return "ivfpq" if n >= config.pq_threshold else "ivf"


def ivf_nlist(n: int, config: NeighbourConfig) -> int:
    return min(config.nlist or default_nlist(n), max(1, n // 39))


def training_size(n: int, config: NeighbourConfig) -> int:
    """How many vectors the trainer is given for n vectors (0 for the flat index)."""
    kind = index_kind(n, config)
    if kind == "flat":
        return 0
    wanted = ivf_nlist(n, config) * config.train_size
    if kind == "ivfpq":
        wanted = max(wanted, 39 * 256)  # each PQ codebook has 256 centroids
    return min(n, wanted)


def _pq_subquantizers(dim: int, wanted: int) -> int:
    m = max(1, min(wanted, dim))
    while dim % m:  # faiss needs m to divide the dimension
        m -= 1
    return m


def train_index(n: int, sample: np.ndarray, config: NeighbourConfig) -> np.ndarray:
    """A trained, empty index for n vectors (serialised), trained on `sample` only."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    dim = sample.shape[1]
    kind = index_kind(n, config)
    if kind == "flat":
        return faiss.serialize_index(faiss.IndexFlatIP(dim))
    nlist = ivf_nlist(n, config)
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivfpq":
        m = _pq_subquantizers(dim, config.pq_bytes)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    elif config.storage == "fp16":
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
    elif config.storage == "flat":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown IVF storage {config.storage!r}; use fp16 or flat")
    index.cp.seed = config.seed
    # Training is k-means over nlist centroids: at 1M captions (4,000 lists) faiss's defaults
    # (256 points per list, 25 passes) cost more than all the searching.
    index.cp.niter = config.train_iterations
    index.cp.max_points_per_centroid = config.train_size
    index.train(sample)
    index.nprobe = min(config.nprobe, nlist)
    return faiss.serialize_index(index)


def fill_part(trained: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """The trained index with only these vectors added (serialised): one part of the index."""
    index = faiss.deserialize_index(trained)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if isinstance(index, faiss.IndexIVF):
        index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    else:
        raise ValueError("fill_part is for IVF indexes; a flat index takes the vectors in order")
    return faiss.serialize_index(index)


def merge_parts(trained: np.ndarray, parts: list[np.ndarray]):
    """One index from parts filled from the same trained index, merged in the given order."""
    index = faiss.deserialize_index(trained)
    for part in parts:
        index.merge_from(faiss.deserialize_index(part), 0)
    return index


class NeighbourIndex:
    """Unit vectors (n × d float32) → top-k by inner product (cosine), exact or IVF."""

    def __init__(self, vectors: np.ndarray, config: NeighbourConfig = NeighbourConfig()):
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n = len(vectors)
        m = training_size(n, config)
        # A seeded sample of at most m vectors (in id order): training never needs them all.
        chosen = np.sort(np.random.default_rng(config.seed).permutation(n)[:m])
        index = faiss.deserialize_index(train_index(n, vectors[chosen], config))
        if isinstance(index, faiss.IndexIVF):
            index.add_with_ids(vectors, np.arange(n, dtype=np.int64))
        else:
            index.add(vectors)
        self._adopt(index, config)

    @classmethod
    def from_index(cls, index, config: NeighbourConfig = NeighbourConfig()) -> NeighbourIndex:
        self = cls.__new__(cls)
        self._adopt(index, config)
        return self

    def _adopt(self, index, config: NeighbourConfig) -> None:
        self.n, self.dim, self.config = int(index.ntotal), int(index.d), config
        self.kind = "flat"
        self.nlist: int | None = None
        if isinstance(index, faiss.IndexIVF):
            self.kind = "ivfpq" if isinstance(index, faiss.IndexIVFPQ) else "ivf"
            self.nlist = int(index.nlist)
        self.lists = _list_of_each_vector(index, self.n)
        self._set(index)

    def _set(self, index) -> None:
        self.on_gpu = False
        if self.config.use_gpu and gpu_count() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
            self.on_gpu = True
        self.index = index

    def to_bytes(self) -> np.ndarray:
        """The CPU index serialised (uint8), to ship one trained index to every worker."""
        index = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        return faiss.serialize_index(index)

    @classmethod
    def from_bytes(
        cls, data: np.ndarray, config: NeighbourConfig = NeighbourConfig()
    ) -> NeighbourIndex:
        return cls.from_index(faiss.deserialize_index(data), config)

    def search(
        self, queries: np.ndarray, k: int, order: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each len(queries) × k; missing neighbours have id -1 and score -inf.

        `order`: a permutation of the queries to search them in (answers come back in the
        queries' own order); e.g. np.argsort(index.lists[ids]) for queries that are indexed
        vectors.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, self.n))
        scores = np.empty((len(queries), k), np.float32)
        ids = np.empty((len(queries), k), np.int64)
        if order is None:
            order = np.arange(len(queries))
        step = self.config.batch_size
        for start in range(0, len(queries), step):
            which = order[start : start + step]
            scores[which], ids[which] = self.index.search(queries[which], k)
        scores[ids < 0] = -np.inf
        return scores, ids


def _list_of_each_vector(index, n: int) -> np.ndarray:
    """The IVF list holding each indexed vector (int64 per id); all 0 for a flat index."""
    lists = np.zeros(n, np.int64)
    if not isinstance(index, faiss.IndexIVF):
        return lists
    invlists = index.invlists
    for number in range(index.nlist):
        size = invlists.list_size(number)
        if size:
            lists[faiss.rev_swig_ptr(invlists.get_ids(number), size)] = number
    return lists


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The flat index's answer, whatever the size (the reference for recall)."""
    return NeighbourIndex(vectors, NeighbourConfig(ivf_threshold=len(vectors) + 1)).search(
        queries, k
    )


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean share of each query's exact top-k found in its approximate top-k."""
    hits = 0
    total = 0
    for a, e in zip(approx_ids, exact_ids, strict=True):
        truth = set(e[e >= 0].tolist())
        hits += len(truth.intersection(a[a >= 0].tolist()))
        total += len(truth)
    return hits / total if total else 1.0


def rerank(
    query_rows: sp.csr_matrix, corpus_rows: sp.csr_matrix, candidates: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact sparse cosine of each query with its candidates, sorted best first.

    Ties break by candidate id so the order never depends on faiss's internal order.
    Returns (scores, ids) shaped like `candidates`; -1 ids keep score -inf and sort last.
    """
    b, c = candidates.shape
    safe = np.where(candidates < 0, 0, candidates)
    left = query_rows[np.repeat(np.arange(b), c)]
    right = corpus_rows[safe.ravel()]
    scores = np.asarray(left.multiply(right).sum(axis=1), dtype=np.float32).reshape(b, c)
    scores[candidates < 0] = -np.inf
    order = np.lexsort((candidates, -scores), axis=1) if b else np.zeros((0, c), np.int64)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1)
