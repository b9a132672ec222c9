"""TF-IDF on Beam: IDF against a hand computation and sklearn, the Beam combiner, the SVD reduction."""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from sklearn.feature_extraction.text import TfidfVectorizer

from vlforge.pipeline.tfidf import (
    CorpusIdf,
    doc_frequencies,
    fit_reducer,
    hashing_vectorizer,
    idf_from_df,
    tfidf,
)

DOCS = ["red circle", "blue circle", "red square", "a red circle above a blue square"]


def column(term: str) -> int:
    return int(hashing_vectorizer().transform([term]).indices[0])


def test_idf_matches_hand_computation():
    df = doc_frequencies(DOCS)
    idf = idf_from_df(df, len(DOCS))
    # n = 4 documents; "red" is in 3, "circle" in 3, "blue" in 2, "above" in 1, "red circle" in 2.
    for term, in_docs in [("red", 3), ("circle", 3), ("blue", 2), ("above", 1), ("red circle", 2)]:
        assert df[column(term)] == in_docs
        assert math.isclose(idf[column(term)], math.log(5 / (1 + in_docs)) + 1, rel_tol=1e-6)


def test_tfidf_cosines_match_sklearn():
    idf = idf_from_df(doc_frequencies(DOCS), len(DOCS))
    ours = tfidf(DOCS, idf)
    reference = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit_transform(DOCS)
    np.testing.assert_allclose(
        (ours @ ours.T).toarray(), (reference @ reference.T).toarray(), atol=1e-5
    )


def test_beam_combiner_gives_the_same_idf():
    texts = DOCS * 3 + ["green star"]
    expected = idf_from_df(doc_frequencies(texts), len(texts))

    def check(outputs):
        assert len(outputs) == 1
        np.testing.assert_allclose(outputs[0], expected)

    with TestPipeline() as p:
        # Small batches force several partial sums through the combiner's merge.
        idf = p | beam.Create(texts) | CorpusIdf(batch_size=2)
        assert_that(idf, check)


def test_reducer_keeps_cosines_on_a_small_vocabulary_and_is_seeded():
    texts = [f"a {c} {s} left of a {c2} {s}" for c in ["red", "blue", "green"]
             for c2 in ["pink", "gray"] for s in ["circle", "square", "star"]]  # fmt: skip
    idf = idf_from_df(doc_frequencies(texts), len(texts))
    rows = tfidf(texts, idf)
    reducer = fit_reducer(rows, dim=64, seed=3)
    dense = reducer.transform(rows)
    np.testing.assert_allclose(np.linalg.norm(dense, axis=1), 1.0, atol=1e-5)
    # The vocabulary's rank is below 64, so the SVD keeps every cosine.
    np.testing.assert_allclose(dense @ dense.T, (rows @ rows.T).toarray(), atol=1e-3)
    again = fit_reducer(rows, dim=64, seed=3).transform(rows)
    np.testing.assert_array_equal(dense, again)


def test_unseen_terms_project_to_zero():
    idf = idf_from_df(doc_frequencies(DOCS), len(DOCS))
    reducer = fit_reducer(tfidf(DOCS, idf), dim=2)
    assert not reducer.transform(tfidf(["zebra"], idf)).any()
