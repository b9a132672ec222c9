"""faiss neighbours: exact flat index, the IVF path (threshold lowered), batching, the rerank."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from vlforge.pipeline.neighbours import (
    NeighbourConfig,
    NeighbourIndex,
    exact_search,
    recall_at_k,
    rerank,
)


def unit_vectors(n: int, dim: int, seed: int = 0, clusters: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(clusters, size=n)] + 0.5 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_flat_index_is_exact():
    x = unit_vectors(500, 16)
    index = NeighbourIndex(x, NeighbourConfig(use_gpu=False))
    assert index.kind == "flat"
    scores, ids = index.search(x[:20], 5)
    brute = x[:20] @ x.T
    np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :5], atol=1e-5)


def test_ivf_path_with_a_lowered_threshold_has_high_recall_and_is_deterministic():
    x = unit_vectors(6000, 32)
    config = NeighbourConfig(ivf_threshold=1000, use_gpu=False)
    index = NeighbourIndex(x, config)
    assert index.kind == "ivf" and index.nlist > 1
    _, approx = index.search(x[:500], 10)
    _, exact = exact_search(x, x[:500], 10)
    assert recall_at_k(approx, exact) >= 0.95
    _, again = NeighbourIndex(x, config).search(x[:500], 10)
    np.testing.assert_array_equal(approx, again)


def test_batched_queries_equal_one_batch():
    x = unit_vectors(300, 8)
    one = NeighbourIndex(x, NeighbourConfig(batch_size=10_000, use_gpu=False)).search(x, 4)
    many = NeighbourIndex(x, NeighbourConfig(batch_size=7, use_gpu=False)).search(x, 4)
    np.testing.assert_array_equal(one[1], many[1])


def test_k_larger_than_the_corpus_is_clamped():
    x = unit_vectors(3, 4)
    scores, ids = NeighbourIndex(x, NeighbourConfig(use_gpu=False)).search(x, 10)
    assert ids.shape == (3, 3)


def test_rerank_orders_by_exact_cosine_then_id_and_drops_missing():
    corpus = sp.csr_matrix(np.array([[1, 0], [0.6, 0.8], [1, 0], [0, 1]], dtype=np.float32))
    query = corpus[[0]]
    scores, ids = rerank(query, corpus, np.array([[3, -1, 2, 1, 0]]))
    assert ids.tolist() == [[0, 2, 1, 3, -1]]
    np.testing.assert_allclose(scores[0, :4], [1, 1, 0.6, 0])
    assert scores[0, 4] == -np.inf


def test_search_order_and_storage_do_not_change_the_answers():
    x = unit_vectors(6000, 32)
    for storage in ("fp16", "flat"):
        index = NeighbourIndex(
            x, NeighbourConfig(ivf_threshold=1000, use_gpu=False, storage=storage)
        )
        assert index.kind == "ivf"
        # Each vector sits in the list the coarse quantizer assigns it to.
        _, nearest = index.index.quantizer.search(x, 1)
        np.testing.assert_array_equal(index.lists, nearest[:, 0])
        plain = index.search(x[:700], 10)
        order = np.argsort(index.lists[:700], kind="stable")
        grouped = NeighbourIndex(
            x, NeighbourConfig(ivf_threshold=1000, use_gpu=False, storage=storage, batch_size=64)
        ).search(x[:700], 10, order)
        np.testing.assert_array_equal(plain[1], grouped[1])
        _, exact = exact_search(x, x[:700], 10)
        assert recall_at_k(plain[1], exact) >= 0.95
    restored = NeighbourIndex.from_bytes(index.to_bytes(), NeighbourConfig(use_gpu=False))
    np.testing.assert_array_equal(restored.lists, index.lists)


def test_unknown_storage_is_refused():
    with pytest.raises(ValueError, match="storage"):
        NeighbourIndex(unit_vectors(2000, 8), NeighbourConfig(ivf_threshold=100, storage="pq"))
