"""Beam transforms that mark duplicates among the rows that passed every filter.

What travels between the steps is each batch's marks, `(batch id, marks)`, never its rows:
`marks` maps a reason to (row ids, the earlier row each one repeats), as numpy arrays. Each step
reads the one column it needs (plus row id and status) through `read(batch id, columns)` — the
corpus reads it from the chunk's checkpoint, column-projected — so a runner that keeps a step's
output in memory (Beam's DaskRunner keeps whole PCollections) holds a few bytes per duplicate,
not a copy of every record per step (that was ~11 KiB a row per worker). The first row (lowest
row id) of each group is kept, so results do not depend on worker timing; a row marked by one
step is no candidate for the later ones.

Both transforms are keyed combiners with bounded state, so a popular key (one placeholder image
copied a million times) never becomes one list on one worker:
- exact: a min-combiner per key bucket finds each key's first row (O(1) state per key), and only
  the losers' (row id, winner) pairs are joined back to their batches.
- near: per LSH band key a combiner keeps at most `max_representatives` distinct hashes (each
  with its first row); every row is compared only to those, not to every other row of the band
  (which is quadratic, and blank or placeholder images make huge bands).

No `beam.Partition` (or other multi-output ParDo): Beam's DaskRunner (2.78) hands every output
of a multi-output ParDo to every consumer, so a Partition there does not split anything.
"""

from __future__ import annotations

from collections.abc import Callable

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from vlforge.pipeline.key_batches import (
    CompactingArrays,
    NotFirstOfKey,
    first_of_each,
    key_digests,
    spread_arrays,
)

# Distinct hashes kept per band key. Results equal an all-pairs comparison whenever a band holds
# at most this many distinct hashes (copies of one hash count once); beyond it, a row is compared
# to the band's first 64 distinct hashes only. Real photos almost never share a 6-16 bit band
# value with 64 other distinct hashes; hot bands are nearly always copies of one image.
MAX_REPRESENTATIVES = 64

# batch id, columns → {column: values, one per row of the batch}
ColumnReader = Callable[[int, list[str]], dict[str, list]]
Marks = dict[str, tuple[np.ndarray, np.ndarray]]


def marked_rows(marks: Marks) -> set[int]:
    return {row for rows, _ in marks.values() for row in rows.tolist()}


def candidates(columns: dict[str, list], marks: Marks) -> list[int]:
    """Positions of the batch's rows still competing: crawled `ok`, not marked by a step."""
    skip = marked_rows(marks)
    return [
        i
        for i, (row_id, status) in enumerate(zip(columns["row_id"], columns["status"], strict=True))
        if status == "ok" and row_id not in skip
    ]


def apply_marks(records: list[dict], marks: Marks) -> list[dict]:
    """Records with each marked row turned into `duplicate`, its reason and earlier row."""
    decided = {
        row: (reason, earlier)
        for reason, (rows, earliers) in marks.items()
        for row, earlier in zip(rows.tolist(), earliers.tolist(), strict=True)
    }
    if not decided:
        return records
    return [
        {**r, "status": "duplicate", "reason": decided[r["row_id"]][0],
         "detail": f"row {decided[r['row_id']][1]}"}
        if r["row_id"] in decided else r
        for r in records
    ]  # fmt: skip


def _candidate_values(read: ColumnReader, batch_id: int, marks: Marks, column: str):
    columns = read(batch_id, ["row_id", "status", column])
    keep = candidates(columns, marks)
    rows = np.array([columns["row_id"][i] for i in keep], dtype=np.int64)
    return rows, [columns[column][i] for i in keep]


class MarkRows(beam.PTransform):
    """(batch, marks) + (batch, (row ids, earlier row ids)) findings → the marks with those rows
    under `reason`, each naming its earliest earlier row (the min over its findings)."""

    def __init__(self, reason: str, found, label: str | None = None):
        super().__init__(label=label)
        self.reason = reason
        self.found = found

    def expand(self, batches):
        reason = self.reason
        counter = Metrics.counter("dedup", reason)

        def apply(joined):
            batch_id, grouped = joined
            found = list(grouped["found"])
            for marks in grouped["marks"]:  # exactly one
                if found:
                    rows, earlier = first_of_each(
                        np.concatenate([r for r, _ in found]), np.concatenate([e for _, e in found])
                    )  # each row once, with its earliest earlier row
                    counter.inc(len(rows))
                    marks = {**marks, reason: (rows, earlier)}
                yield batch_id, marks

        return (
            {"marks": batches, "found": self.found}
            | "Join" >> beam.CoGroupByKey()
            | "Apply" >> beam.FlatMap(apply)
        )


class MarkExactDuplicates(beam.PTransform):
    """Rows sharing `key_fn(value of column)` keep only their first; the rest become `reason`."""

    def __init__(
        self,
        read: ColumnReader,
        column: str,
        reason: str,
        buckets: int = 1,
        key_fn: Callable[[str], str] = str,
    ):
        super().__init__(label=f"Mark {reason}")
        self.read = read
        self.column = column
        self.reason = reason
        self.buckets = buckets
        self.key_fn = key_fn

    def expand(self, batches):
        read, column, key_fn = self.read, self.column, self.key_fn

        def keys(batch_id, marks):
            rows, values = _candidate_values(read, batch_id, marks, column)
            return batch_id, (rows, key_digests(key_fn(v) for v in values))

        losers = batches | "Keys" >> beam.MapTuple(keys) | "NotFirst" >> NotFirstOfKey(self.buckets)
        return batches | "Mark" >> MarkRows(self.reason, losers)


def _signed64(phash_hex: list[str]) -> np.ndarray:
    """64-bit hashes (hex) as int64, the same bits: distances are counted on them as unsigned."""
    return np.array([int(h, 16) for h in phash_hex], dtype=np.uint64).view(np.int64)


def band_keys(values: np.ndarray, max_distance: int) -> np.ndarray:
    """int64 hashes → (rows, max_distance + 1) band keys: two hashes within that Hamming distance
    agree exactly on at least one band (pigeonhole), so grouping by band finds every pair. A key
    is the band's number in the top byte and its bits below (a single band is the hash)."""
    n_bands = max_distance + 1
    if n_bands == 1:
        return values.reshape(-1, 1)
    bits = values.view(np.uint64)
    bounds = [round(i * 64 / n_bands) for i in range(n_bands + 1)]
    keys = np.empty((len(values), n_bands), dtype=np.uint64)
    for band in range(n_bands):
        width = bounds[band + 1] - bounds[band]  # ≤ 32 bits for 2 bands or more
        part = (bits >> np.uint64(bounds[band])) & np.uint64((1 << width) - 1)
        keys[:, band] = (np.uint64(band) << np.uint64(56)) | part
    return keys.view(np.int64)


def phash_bands(phash_hex: str, max_distance: int) -> list[int]:
    """One hash's band keys (see band_keys)."""
    return band_keys(_signed64([phash_hex]), max_distance)[0].tolist()


def hamming(a_hex: str, b_hex: str) -> int:
    return (int(a_hex, 16) ^ int(b_hex, 16)).bit_count()


def band_buckets(keys: np.ndarray, buckets: int) -> np.ndarray:
    """A band key's bucket: a multiplicative hash of the key, so nearby keys spread."""
    if buckets == 1:
        return np.zeros(len(keys), dtype=np.int64)
    mixed = keys.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(32)) % np.uint64(buckets)).astype(np.int64)


def first_distinct(keys, rows, values, limit: int):
    """(band key, row, hash) triples → per key its first `limit` distinct hashes (each with its
    lowest row), sorted by key then row.

    Mergeable: a hash cut from a partial result had `limit` other hashes with lower rows there,
    so it is not among the first `limit` overall either.
    """
    order = np.lexsort((rows, values, keys))  # per (key, hash), lowest row first
    keys, rows, values = keys[order], rows[order], values[order]
    first = np.ones(len(keys), dtype=bool)
    first[1:] = (keys[1:] != keys[:-1]) | (values[1:] != values[:-1])
    keys, rows, values = keys[first], rows[first], values[first]
    order = np.lexsort((rows, keys))
    keys, rows, values = keys[order], rows[order], values[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    rank = np.arange(len(keys)) - np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
    keep = rank < limit
    return keys[keep], rows[keep], values[keep]


class BandRepresentatives(CompactingArrays):
    """(batch, band keys, row ids, hashes) → (keys, rows, hashes): each band key's first
    `limit` distinct hashes by row id, sorted by key then row; state O(band keys × limit)."""

    def __init__(self, limit: int):
        self.limit = limit

    def parts(self, element: tuple) -> tuple:
        return element[1:]

    def reduce(self, keys, rows, values) -> tuple:
        return first_distinct(keys, rows, values, self.limit)

    def empty(self) -> tuple:
        return tuple(np.zeros(0, dtype=np.int64) for _ in range(3))


class RepresentativeIndex:
    """One bucket's band representatives as flat arrays, so a batch's rows are compared to them
    with numpy: a Python loop over the pairs (up to K per row and band; 3.4M on 20,000 demo
    images) cost more than the rest of the dedup."""

    SLICE = 4096  # members per numpy pass: pairs (≤ K each) stay a few MB whatever the chunk

    def __init__(self, reps: tuple):
        keys, self.rows, self.values = reps
        self.keys, self.starts, self.counts = np.unique(keys, return_index=True, return_counts=True)

    def earliest_twins(self, keys, rows, values, max_distance: int) -> tuple:
        """Members (band key, row id, hash) → (row ids, each one's earliest representative row
        within `max_distance` bits over all its bands here), for rows that have one."""
        found = [
            self._twins(keys[s : s + self.SLICE], rows[s : s + self.SLICE],
                        values[s : s + self.SLICE], max_distance)
            for s in range(0, len(keys), self.SLICE)
        ]  # fmt: skip
        return tuple(np.concatenate(parts) for parts in zip(*found, strict=True)) if found else ()

    def _twins(self, keys, rows, values, max_distance: int) -> tuple:
        at = np.searchsorted(self.keys, keys)  # every member's key is here: it fed the combiner
        starts, counts = self.starts[at], self.counts[at]
        member = np.repeat(np.arange(len(keys)), counts)  # one entry per (member, rep) pair
        rep = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        close = np.bitwise_count((values[member] ^ self.values[rep]).view(np.uint64))
        hit = (self.rows[rep] < rows[member]) & (close <= max_distance)
        return first_of_each(rows[member[hit]], self.rows[rep[hit]])  # each row's earliest twin


class MarkNearDuplicates(beam.PTransform):
    """Perceptual-hash near duplicates: a row is dropped when an earlier row's image is within
    `max_distance` bits. Candidate pairs come from LSH bands, each row compared only to its
    bands' first `max_representatives` distinct hashes (bounded work and memory per band)."""

    def __init__(
        self,
        read: ColumnReader,
        max_distance: int,
        max_representatives: int = MAX_REPRESENTATIVES,
        buckets: int = 1,
    ):
        super().__init__(label="Mark near_duplicate_image")
        self.read = read
        self.max_distance = max_distance
        self.max_representatives = max_representatives
        self.buckets = buckets

    def expand(self, batches):
        read, max_distance, buckets = self.read, self.max_distance, self.buckets

        def band_members(batch_id, marks):
            rows, hashes = _candidate_values(read, batch_id, marks, "phash")
            values = _signed64(hashes)
            keys = band_keys(values, max_distance)
            n_bands = keys.shape[1]
            keys = keys.reshape(-1)
            rows, values = np.repeat(rows, n_bands), np.repeat(values, n_bands)
            yield from spread_arrays(batch_id, band_buckets(keys, buckets), keys, rows, values)

        def earlier_twins(joined):
            _bucket, grouped = joined
            index = RepresentativeIndex(next(iter(grouped["reps"])))
            for batch_id, keys, rows, values in grouped["members"]:  # streamed, part by part
                twins = index.earliest_twins(keys, rows, values, max_distance)
                if twins and len(twins[0]):
                    yield batch_id, twins

        members = batches | "Bands" >> beam.FlatMapTuple(band_members)
        representatives = members | "Representatives" >> beam.CombinePerKey(
            BandRepresentatives(self.max_representatives)
        )
        twins = (
            {"members": members, "reps": representatives}
            | "JoinBand" >> beam.CoGroupByKey()
            | "Pairs" >> beam.FlatMap(earlier_twins)
        )
        return batches | "Mark" >> MarkRows("near_duplicate_image", twins)
