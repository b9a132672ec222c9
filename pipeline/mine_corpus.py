"""The corpus every shard is mined against, built once from all ShardScans (one Beam element).

Nearest neighbours need the whole corpus in one index, so this is the stage's one global step:
distinct caption texts and tag texts with their members and rings (mine_groups), exact TF-IDF
rows (for the rerank), the SVD reducer, and the trained faiss index serialised so that every
worker searches the same index without training its own. Per-sample columns (keys, captions,
image ids) are held for the whole corpus because a neighbour or a ring partner may sit in any
shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import scipy.sparse as sp
from sklearn.preprocessing import normalize

from vlforge.pipeline.mine_config import MineConfig
from vlforge.pipeline.mine_filter import Claims, Relations, encode_claims
from vlforge.pipeline.mine_groups import TextGroups, group_texts
from vlforge.pipeline.mine_scan import CorpusColumns, CorpusStats, PickledBatch, gc_paused
from vlforge.pipeline.neighbours import NeighbourIndex
from vlforge.pipeline.tfidf import Reducer, fit_reducer, idf_from_df, stable_hash

POSITIVE_MEMBERS = 16  # samples of one near-duplicate text a neighbour carries as positives


@dataclass
class SearchSpace:
    """One kind of text (captions or tags): groups, exact rows, reducer and index."""

    groups: TextGroups
    sparse: sp.csr_matrix  # L2-normalised TF-IDF, one row per distinct text
    reducer: Reducer
    index: np.ndarray | None  # NeighbourIndex.to_bytes(); None when there is no text
    fingerprint: int  # identifies the index, so a worker deserialises it once
    pair_codes: np.ndarray  # sorted row * n_images + image over all members: "has this image"


@dataclass
class Corpus:
    shard_start: dict[str, int]  # first corpus sample id of each shard's scan
    keys: list[str]
    captions: list[str]
    images: np.ndarray  # int64 image id per sample
    n_images: int
    captions_space: SearchSpace
    tags_space: SearchSpace
    vocabulary: dict  # SlotVocabulary.table
    detectable: list[str] | None  # every tag name in the corpus; None when no sample has tags
    claims: Claims | None  # the caption texts' checkable claims (None without detectable names)
    # Each caption text's compact graph, kept only when some sample has no tags (or no sample
    # has any): those pairs take the Python certainly_false.
    text_graphs: list | None
    relations: Relations


def _tfidf_rows(counts: sp.csr_matrix, idf: np.ndarray) -> sp.csr_matrix:
    """tfidf.tfidf() from counts already hashed: sublinear TF, IDF, L2."""
    rows = counts.astype(np.float32, copy=True)
    np.log1p(rows.data, out=rows.data)
    rows.data *= idf[rows.indices]
    return normalize(rows, norm="l2", copy=False).astype(np.float32)


def _space(
    groups: TextGroups,
    counts: sp.csr_matrix,
    idf: np.ndarray,
    images: np.ndarray,
    n_images: int,
    config: MineConfig,
) -> SearchSpace:
    """counts: hashed term counts, one row per distinct text (row order of `groups`)."""
    sparse = _tfidf_rows(counts, idf) if counts.shape[0] else counts.astype(np.float32)
    texts = groups.texts
    # The SVD sample: the svd_sample texts of lowest seeded hash (a deterministic sample), in
    # text order. Rows are in text order already, so sorting row ids sorts the texts.
    hashes = np.fromiter((stable_hash(t, config.seed) for t in texts), np.uint64, len(texts))
    if len(texts) > config.svd_sample:
        chosen = np.sort(np.argsort(hashes, kind="stable")[: config.svd_sample])
    else:
        chosen = np.arange(len(texts))
    if len(texts):
        reducer = fit_reducer(sparse[chosen], config.dim, config.svd_columns, config.seed)
        dense = reducer.transform(sparse)
        index = NeighbourIndex(dense, config.neighbours).to_bytes()
    else:
        reducer = Reducer(np.zeros(1, np.int64), np.zeros((1, 1), np.float32))
        index = None
    sizes = np.diff(groups.offsets)
    rows = np.repeat(np.arange(len(texts), dtype=np.int64), sizes)
    pair_codes = np.unique(rows * n_images + images[groups.members])
    return SearchSpace(
        groups=groups,
        sparse=sparse,
        reducer=reducer,
        index=index,
        fingerprint=stable_hash("\n".join(texts), config.seed),
        pair_codes=pair_codes,
    )


def build_corpus(
    scans: list[CorpusColumns], stats: CorpusStats, config: MineConfig, opposite, asymmetric
) -> Corpus:
    """Every shard's columns (any order) + corpus statistics → the Corpus side input."""
    with gc_paused():
        return _build_corpus(scans, stats, config, opposite, asymmetric)


def _build_corpus(
    scans: list[CorpusColumns], stats: CorpusStats, config: MineConfig, opposite, asymmetric
) -> Corpus:
    scans = sorted(scans, key=lambda s: s.shard)
    shard_start, keys, captions, texts, image_names, tag_texts = {}, [], [], [], [], []
    for scan in scans:
        shard_start[scan.shard] = len(keys)
        keys += scan.keys
        captions += scan.captions
        texts += scan.texts
        image_names += scan.images
        tag_texts += scan.tag_texts
    graphs = [g for scan in scans for g in scan.graphs]
    image_id: dict[str, int] = {}
    images = np.fromiter(
        (image_id.setdefault(name, len(image_id)) for name in image_names),
        np.int64,
        len(image_names),
    )
    n_images = max(1, len(image_id))

    caption_groups = group_texts(texts, keys, config.seed)
    caption_counts = sp.vstack([s.caption_counts for s in scans], format="csr")
    captions_space = _space(
        caption_groups,
        caption_counts[caption_groups.first] if len(caption_groups.texts) else caption_counts,
        idf_from_df(stats.caption_df, stats.n_captions),
        images,
        n_images,
        config,
    )
    tag_groups = group_texts([t or None for t in tag_texts], keys, config.seed)
    # tag_counts hold rows only for samples with a tag text: map sample id → its row there.
    has_tag_text = np.fromiter((bool(t) for t in tag_texts), bool, len(tag_texts))
    tag_row = np.cumsum(has_tag_text) - 1
    tag_counts = sp.vstack([s.tag_counts for s in scans], format="csr")
    tags_space = _space(
        tag_groups,
        tag_counts[tag_row[tag_groups.first]] if len(tag_groups.texts) else tag_counts,
        idf_from_df(stats.tag_df, stats.n_tags),
        images,
        n_images,
        config,
    )
    detectable = stats.tag_names or None
    relations = Relations(opposite, asymmetric)
    text_graphs = [graphs[i] for i in caption_groups.first.tolist()]
    claims = None
    if detectable is not None:
        name_id = {n: i for i, n in enumerate(detectable)}
        claims = encode_claims(text_graphs, name_id, relations)
    untagged = any(not scan.has_tags.all() for scan in scans)
    return Corpus(
        shard_start=shard_start,
        keys=keys,
        captions=captions,
        images=images,
        n_images=n_images,
        captions_space=captions_space,
        tags_space=tags_space,
        vocabulary=stats.vocabulary,
        detectable=detectable,
        claims=claims,
        relations=relations,
        text_graphs=text_graphs if claims is None or untagged else None,
    )


beam.coders.registry.register_coder(Corpus, PickledBatch)
