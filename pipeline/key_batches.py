"""Keyed dedup over batches of rows: the first row of each key, found with bounded state.

The corpus's global steps move rows as batches, `(batch id, ...)` — one work chunk's rows, or
one piece of an input list — not one element per row: Beam's in-process runner costs several
microseconds per element and step, and per-row elements through the dedup and shard steps cost
more CPU than fetching and resizing the images (0.4 ms a row, measured on 20,000 rows).

A batch's keys travel as numpy arrays, `(row ids int64, key digests S16)`, not as lists of
Python tuples: a runner that keeps a step's output in worker memory until every consumer has
read it (Beam's DaskRunner keeps whole PCollections) holds 24 bytes a row instead of ~200
(a tuple, an int and a 64-character hash or a URL), which is what keeps a worker's peak flat as
the corpus grows. Keys are 128-bit BLAKE2b digests: two different keys share one with odds of
about n²/2¹²⁹ (1e-19 at 10^10 rows).

  spread:  each batch's (row id, key) pairs are split by their digest into `buckets` groups,
           one element per (batch, bucket) that has any;
  first:   a combiner per bucket keeps the lowest row id of each key (one entry per distinct
           key: a key copied a million times is one entry, never one list);
  losers:  each (batch, bucket) element joined with its bucket's firsts yields its rows that are
           not first, as (batch id, (row ids, first row ids)).
The number of buckets grows with the corpus (`bucket_count`), so a bucket's state stays near
`ROWS_PER_BUCKET` keys whatever the size; a small corpus is one bucket and a few elements.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable, Iterator

import apache_beam as beam
import numpy as np

# Keys per bucket, on average: a bucket's firsts are two arrays of this many entries (~2.4 MB).
ROWS_PER_BUCKET = 100_000
DIGEST = np.dtype("S16")
_EMPTY_ROWS = np.zeros(0, dtype=np.int64)


def bucket_count(n_rows: int, rows_per_bucket: int = ROWS_PER_BUCKET) -> int:
    return max(1, -(-n_rows // rows_per_bucket))


def key_digests(keys: Iterable[str]) -> np.ndarray:
    """16-byte BLAKE2b digests of `keys`, as one fixed-width array (the same in every process:
    Python's own hash() of a str is salted per process)."""
    joined = b"".join(hashlib.blake2b(k.encode("utf-8"), digest_size=16).digest() for k in keys)
    return np.frombuffer(joined, dtype=DIGEST)


def digest_buckets(digests: np.ndarray, buckets: int) -> np.ndarray:
    """The bucket of each digest: its first 8 bytes, modulo `buckets`."""
    if buckets == 1:
        return np.zeros(len(digests), dtype=np.int64)
    head = np.frombuffer(digests.tobytes(), dtype="<u8")[::2]
    return (head % np.uint64(buckets)).astype(np.int64)


def spread_arrays(
    batch_id: Hashable, buckets: np.ndarray, *arrays: np.ndarray
) -> Iterator[tuple[int, tuple]]:
    """A batch's parallel arrays → (bucket, (batch id, *the arrays' entries of that bucket)) per
    bucket that has any."""
    if len(buckets) == 0:
        return
    if (buckets == buckets[0]).all():
        yield int(buckets[0]), (batch_id, *arrays)
        return
    for bucket in np.unique(buckets):
        take = buckets == bucket
        yield int(bucket), (batch_id, *(a[take] for a in arrays))


def _spread_keys(batch: tuple, buckets: int) -> Iterator[tuple[int, tuple]]:
    batch_id, (rows, digests) = batch
    yield from spread_arrays(batch_id, digest_buckets(digests, buckets), rows, digests)


def first_of_each(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys, rows) → the distinct keys, sorted, each with its lowest row."""
    order = np.lexsort((rows, keys))
    keys, rows = keys[order], rows[order]
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    return keys[first], rows[first]


class CompactingArrays(beam.CombineFn):
    """A combiner over parallel numpy arrays, kept as a list of parts and reduced (`reduce`)
    into one part whenever the parts after the first outgrow it: adding stays amortized
    O(log n) per entry and the state is whatever `reduce` keeps. Subclasses say which arrays of
    an element are added (`parts`), how parts reduce, and what an empty result is."""

    def parts(self, element: tuple) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def reduce(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def empty(self) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def create_accumulator(self) -> list:
        return []

    def _compact(self, acc: list) -> list:
        if not acc:
            return acc
        return [self.reduce(*(np.concatenate(column) for column in zip(*acc, strict=True)))]

    def add_input(self, acc: list, element: tuple) -> list:
        acc.append(self.parts(element))
        pending = sum(len(part[0]) for part in acc[1:])
        return self._compact(acc) if pending > max(65_536, 2 * len(acc[0][0])) else acc

    def merge_accumulators(self, accumulators) -> list:
        return self._compact([part for acc in accumulators for part in acc])

    def extract_output(self, acc: list) -> tuple[np.ndarray, ...]:
        acc = self._compact(acc)
        return acc[0] if acc else self.empty()


class FirstRowPerKey(CompactingArrays):
    """(batch id, row ids, digests) elements → (distinct digests sorted, lowest row id of each);
    state O(distinct keys)."""

    def parts(self, element: tuple) -> tuple[np.ndarray, np.ndarray]:
        _batch_id, rows, keys = element
        return keys, rows

    def reduce(self, keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return first_of_each(keys, rows)

    def empty(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(0, dtype=DIGEST), _EMPTY_ROWS


def _losers(joined):
    _bucket, grouped = joined
    first_keys, first_rows = next(iter(grouped["first"]))
    for batch_id, rows, keys in grouped["members"]:  # streamed: one batch's part at a time
        firsts = first_rows[np.searchsorted(first_keys, keys)]
        lose = firsts != rows
        if lose.any():
            yield batch_id, (rows[lose], firsts[lose])


class NotFirstOfKey(beam.PTransform):
    """(batch id, (row ids, key digests)) → (batch id, (row ids, first row id of each one's
    key)) for the rows that are not the first (lowest row id) of their key; batches without
    such rows yield nothing."""

    def __init__(self, buckets: int = 1, label: str | None = None):
        super().__init__(label=label)
        self.buckets = buckets

    def expand(self, pairs):
        spread = pairs | "Spread" >> beam.FlatMap(_spread_keys, self.buckets)
        first = spread | "First" >> beam.CombinePerKey(FirstRowPerKey())
        return (
            {"members": spread, "first": first}
            | "Join" >> beam.CoGroupByKey()
            | "Losers" >> beam.FlatMap(_losers)
        )
