"""TF-IDF over a corpus on Beam: hashed term counts, document frequencies, IDF, dense unit vectors.

Terms are scikit-learn's HashingVectorizer features (unigrams and bigrams, so "red circle and
blue square" and "blue circle and red square" are not the same bag), which needs no vocabulary
pass and gives every worker the same columns. Document frequencies are summed by one
CombineGlobally; IDF is sklearn's smoothed formula, so results match TfidfVectorizer exactly.

Search runs on dense vectors. We reduce with TruncatedSVD (LSA) fitted on a deterministic sample
rather than a sparse random projection: a random projection keeps cosines only to about
±1/sqrt(dim) (±0.09 at 128 dims), which swamps the gap between a hard negative and an unrelated
caption, while captions are Zipfian enough that a few hundred SVD directions carry most of their
TF-IDF mass. The dense space only proposes candidates; scores and thresholds use the exact
sparse cosine (see neighbours.rerank), so the reduction never decides what is a duplicate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.preprocessing import normalize

N_FEATURES = 2**20  # collisions among ~1e5 distinct uni+bigrams of a caption corpus stay rare


def hashing_vectorizer(n_features: int = N_FEATURES) -> HashingVectorizer:
    # Raw counts (no norm, no sign flipping): IDF weighting and normalisation happen after.
    return HashingVectorizer(
        n_features=n_features,
        ngram_range=(1, 2),
        alternate_sign=False,
        norm=None,
        lowercase=True,
        dtype=np.float32,
    )


def term_counts(texts: Sequence[str], n_features: int = N_FEATURES) -> sp.csr_matrix:
    """Hashed term counts, one row per text."""
    matrix = hashing_vectorizer(n_features).transform(list(texts))
    matrix.sum_duplicates()
    return matrix.tocsr()


def doc_frequencies(texts: Sequence[str], n_features: int = N_FEATURES) -> np.ndarray:
    """How many of `texts` contain each hashed term (int64, length n_features)."""
    counts = term_counts(texts, n_features)
    return np.bincount(counts.indices, minlength=n_features).astype(np.int64)


def idf_from_df(df: np.ndarray, n_docs: int) -> np.ndarray:
    """sklearn's smooth IDF: ln((1 + n) / (1 + df)) + 1, float32."""
    return (np.log((1.0 + n_docs) / (1.0 + df.astype(np.float64))) + 1.0).astype(np.float32)


def tfidf(texts: Sequence[str], idf: np.ndarray, sublinear_tf: bool = True) -> sp.csr_matrix:
    """L2-normalised TF-IDF rows (float32 CSR)."""
    matrix = term_counts(texts, len(idf))
    if sublinear_tf:  # a word repeated in a caption is not twice as informative
        np.log1p(matrix.data, out=matrix.data)
    matrix.data *= idf[matrix.indices]
    return normalize(matrix, norm="l2", copy=False).astype(np.float32)


@dataclass(frozen=True)
class Reducer:
    """TF-IDF rows → dense unit vectors: an SVD basis over the sample's most frequent columns."""

    columns: np.ndarray  # int64 hashed feature ids kept
    components: np.ndarray  # float32, dim × len(columns)

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def transform(self, rows: sp.csr_matrix) -> np.ndarray:
        dense = np.asarray(rows[:, self.columns] @ self.components.T, dtype=np.float32)
        norms = np.linalg.norm(dense, axis=1, keepdims=True)
        # A text made only of unseen terms projects to zero: it stays zero (matches nothing).
        return np.divide(dense, norms, out=np.zeros_like(dense), where=norms > 0)


def fit_reducer(
    sample: sp.csr_matrix, dim: int = 128, max_columns: int = 32768, seed: int = 0
) -> Reducer:
    """Fit the SVD on a sample; the basis is kept only over its `max_columns` commonest terms.

    The full basis would be dim × 2**20 dense floats; rare terms carry almost no SVD mass and are
    still scored exactly in the sparse rerank.
    """
    df = np.bincount(sample.indices, minlength=sample.shape[1])
    seen = np.flatnonzero(df)
    order = np.lexsort((seen, -df[seen]))  # by frequency, ties by column id: deterministic
    columns = np.sort(seen[order[:max_columns]])
    sub = sample[:, columns]
    k = max(1, min(dim, sub.shape[0] - 1, sub.shape[1] - 1))
    if k < 1 or sub.shape[1] <= 1 or sub.shape[0] <= 1:
        components = np.eye(1, len(columns), dtype=np.float32)
    else:
        svd = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=7, random_state=seed)
        svd.fit(sub)
        components = svd.components_.astype(np.float32)
    return Reducer(columns=columns.astype(np.int64), components=components)


def stable_hash(text: str, seed: int = 0) -> int:
    """A 64-bit hash that is the same in every process (Python's hash() is salted)."""
    digest = hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


# ---- Beam ---------------------------------------------------------------------------------


class _SumDocFrequencies(beam.CombineFn):
    """(n_docs, df) partial sums → corpus totals; accumulators are one dense int64 vector."""

    def __init__(self, n_features: int):
        self.n_features = n_features

    def create_accumulator(self):
        return (0, None)

    def add_input(self, acc, batch):
        n, df = acc
        n_new, df_new = batch
        return (n + n_new, df_new.copy() if df is None else df + df_new)

    def merge_accumulators(self, accumulators):
        n, df = 0, None
        for n_part, df_part in accumulators:
            n += n_part
            if df_part is not None:
                df = df_part.copy() if df is None else df + df_part
        return (n, df)

    def extract_output(self, acc):
        n, df = acc
        return (n, np.zeros(self.n_features, np.int64) if df is None else df)


class CorpusIdf(beam.PTransform):
    """PCollection of texts → a single element: the IDF vector (use as an AsSingleton side input)."""

    def __init__(self, n_features: int = N_FEATURES, batch_size: int = 4096):
        super().__init__()
        self.n_features = n_features
        self.batch_size = batch_size

    def expand(self, texts):
        n_features = self.n_features
        return (
            texts
            | "Batch"
            >> beam.BatchElements(
                min_batch_size=min(64, self.batch_size), max_batch_size=self.batch_size
            )
            | "DocFreq" >> beam.Map(lambda batch: (len(batch), doc_frequencies(batch, n_features)))
            | "SumDocFreq" >> beam.CombineGlobally(_SumDocFrequencies(n_features))
            | "Idf" >> beam.MapTuple(lambda n, df: idf_from_df(df, n))
        )


class FitReducer(beam.PTransform):
    """Texts + IDF side input → one Reducer fitted on the `sample_size` texts of lowest hash.

    A hash-chosen sample (not Beam's random Sample) keeps runs identical for the same seed.
    """

    def __init__(self, idf, dim: int, sample_size: int, max_columns: int, seed: int):
        super().__init__()
        self.idf = idf
        self.dim = dim
        self.sample_size = sample_size
        self.max_columns = max_columns
        self.seed = seed

    def expand(self, texts):
        seed, dim, max_columns = self.seed, self.dim, self.max_columns

        def fit(sample: list[str], idf: np.ndarray) -> Reducer:
            sample = sorted(sample)
            return fit_reducer(tfidf(sample, idf), dim, max_columns, seed)

        return (
            texts
            | "Sample"
            >> beam.combiners.Top.Of(self.sample_size, key=lambda t: -stable_hash(t, seed))
            | "Fit" >> beam.Map(fit, beam.pvalue.AsSingleton(self.idf))
        )
