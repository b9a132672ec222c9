"""Beam transforms that mark duplicates among the rows that passed every filter.

Rows travel as batches, `(chunk, [record])` (see pipeline/key_batches.py for why). The first row
(lowest row id) of each group is kept, so results do not depend on worker timing.

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

from vlforge.pipeline.key_batches import NotFirstOfKey, spread_by_bucket

# Distinct hashes kept per band key. Results equal an all-pairs comparison whenever a band holds
# at most this many distinct hashes (copies of one hash count once); beyond it, a row is compared
# to the band's first 64 distinct hashes only. Real photos almost never share a 6-16 bit band
# value with 64 other distinct hashes; hot bands are nearly always copies of one image.
MAX_REPRESENTATIVES = 64


def _signed64(phash_hex: str) -> int:
    """A 64-bit hash as a signed int: Beam's fast coder writes ints up to 63 bits as varints and
    pickles larger ones one by one (that cost 1 s on 20,000 rows). Distances are counted on the
    same bits viewed as unsigned."""
    value = int(phash_hex, 16)
    return value - (1 << 64) if value >> 63 else value


def _is_candidate(record: dict) -> bool:
    return record["status"] == "ok"


class MarkRows(beam.PTransform):
    """Record batches + (batch, [(row id, earlier row id)]) marks → the batches with each marked
    row turned into `reason` naming its earliest earlier row (the min over its marks)."""

    def __init__(self, reason: str, marks, label: str | None = None):
        super().__init__(label=label)
        self.reason = reason
        self.marks = marks

    def expand(self, batches):
        reason = self.reason
        counter = Metrics.counter("dedup", reason)

        def apply(joined):
            batch_id, grouped = joined
            earliest: dict[int, int] = {}
            for marks in grouped["marks"]:
                for row_id, earlier in marks:
                    if earlier < earliest.get(row_id, earlier + 1):
                        earliest[row_id] = earlier
            for records in grouped["batch"]:  # exactly one
                if earliest:
                    counter.inc(len(earliest))
                    records = [
                        {**r, "status": "duplicate", "reason": reason,
                         "detail": f"row {earliest[r['row_id']]}"}
                        if r["row_id"] in earliest else r
                        for r in records
                    ]  # fmt: skip
                yield batch_id, records

        return (
            {"batch": batches, "marks": self.marks}
            | "Join" >> beam.CoGroupByKey()
            | "Apply" >> beam.FlatMap(apply)
        )


class MarkExactDuplicates(beam.PTransform):
    """Rows sharing `key_fn(record)` keep only their first; the rest become `reason`."""

    def __init__(self, key_fn: Callable[[dict], str], reason: str, buckets: int = 1):
        super().__init__(label=f"Mark {reason}")
        self.key_fn = key_fn
        self.reason = reason
        self.buckets = buckets

    def expand(self, batches):
        key_fn = self.key_fn
        losers = (
            batches
            | "Keys"
            >> beam.MapTuple(
                lambda batch_id, records: (
                    batch_id,
                    [(r["row_id"], key_fn(r)) for r in records if _is_candidate(r)],
                )
            )
            | "NotFirst" >> NotFirstOfKey(self.buckets)
        )
        return batches | "Mark" >> MarkRows(self.reason, losers)


def phash_bands(phash_hex: str, max_distance: int) -> list[tuple[int, int]]:
    """Split a 64-bit hash into max_distance + 1 bands: two hashes within that Hamming distance
    must agree exactly on at least one band (pigeonhole), so grouping by band finds every pair."""
    value = int(phash_hex, 16)
    n_bands = max_distance + 1
    bounds = [round(i * 64 / n_bands) for i in range(n_bands + 1)]
    return [
        (band, (value >> bounds[band]) & ((1 << (bounds[band + 1] - bounds[band])) - 1))
        for band in range(n_bands)
    ]


def hamming(a_hex: str, b_hex: str) -> int:
    return (int(a_hex, 16) ^ int(b_hex, 16)).bit_count()


class FirstDistinctHashes(beam.CombineFn):
    """(row id, hash) → {hash: its first row id} for the `limit` hashes seen first.

    Mergeable: a hash trimmed from a partial accumulator had `limit` other hashes seen before it
    there, so it is not among the first `limit` overall either.
    """

    def __init__(self, limit: int):
        self.limit = limit

    def create_accumulator(self) -> dict[int, int]:
        return {}

    def _trim(self, acc: dict[int, int]) -> dict[int, int]:
        if len(acc) <= self.limit:
            return acc
        return dict(sorted(acc.items(), key=lambda kv: kv[1])[: self.limit])

    def add_input(self, acc: dict[int, int], element: tuple[int, int]) -> dict[int, int]:
        row_id, value = element
        if row_id < acc.get(value, row_id + 1):
            acc[value] = row_id
        # Trim lazily (at twice the limit) so adding stays O(1) amortized.
        return self._trim(acc) if len(acc) > 2 * self.limit else acc

    def merge_accumulators(self, accumulators) -> dict[int, int]:
        merged: dict[int, int] = {}
        for acc in accumulators:
            for value, row_id in acc.items():
                if row_id < merged.get(value, row_id + 1):
                    merged[value] = row_id
            merged = self._trim(merged) if len(merged) > 2 * self.limit else merged
        return merged

    def extract_output(self, acc: dict[int, int]) -> list[tuple[int, int]]:
        return sorted((row_id, value) for value, row_id in self._trim(acc).items())


class BandRepresentatives(beam.CombineFn):
    """(batch, [(band key, row id, hash)]) → {band key: its first distinct hashes, by row id}:
    one FirstDistinctHashes per band key of the bucket."""

    def __init__(self, limit: int):
        self.per_band = FirstDistinctHashes(limit)

    def create_accumulator(self) -> dict:
        return {}

    def add_input(self, acc: dict, element: tuple) -> dict:
        per_band = self.per_band
        for band_key, row_id, value in element[1]:
            band = acc.get(band_key)
            acc[band_key] = per_band.add_input({} if band is None else band, (row_id, value))
        return acc

    def merge_accumulators(self, accumulators) -> dict:
        merged: dict = {}
        for acc in accumulators:
            for band_key, band in acc.items():
                if band_key in merged:
                    band = self.per_band.merge_accumulators([merged[band_key], band])
                merged[band_key] = band
        return merged

    def extract_output(self, acc: dict) -> dict:
        return {key: self.per_band.extract_output(band) for key, band in acc.items()}


class RepresentativeIndex:
    """One bucket's band representatives as flat arrays, so a batch's rows are compared to them
    with numpy: a Python loop over the pairs (up to K per row and band; 3.4M on 20,000 demo
    images) cost more than the rest of the dedup."""

    SLICE = 4096  # members per numpy pass: pairs (≤ K each) stay a few MB whatever the chunk

    def __init__(self, reps: dict):
        self.slices: dict = {}
        rows: list[int] = []
        values: list[int] = []
        for key, items in reps.items():
            self.slices[key] = (len(rows), len(items))
            for row_id, value in items:
                rows.append(row_id)
                values.append(value)
        self.rows = np.array(rows, dtype=np.int64)
        self.values = np.array(values, dtype=np.int64)

    def earliest_twins(self, members: list, max_distance: int) -> list[tuple[int, int]]:
        """(band key, row id, signed hash) members → (row id, its earliest representative row
        within `max_distance` bits, over all the row's bands here) for rows that have one."""
        found: list[tuple[int, int]] = []
        for start in range(0, len(members), self.SLICE):
            found += self._twins(members[start : start + self.SLICE], max_distance)
        return found

    def _twins(self, members: list, max_distance: int) -> list[tuple[int, int]]:
        spans = np.array([self.slices[key] for key, _, _ in members], dtype=np.int64)
        rows = np.array([row_id for _, row_id, _ in members], dtype=np.int64)
        values = np.array([value for _, _, value in members], dtype=np.int64)
        starts, counts = spans[:, 0], spans[:, 1]
        member = np.repeat(np.arange(len(members)), counts)  # one entry per (member, rep) pair
        rep = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        close = np.bitwise_count((values[member] ^ self.values[rep]).view(np.uint64))
        hit = (self.rows[rep] < rows[member]) & (close <= max_distance)
        hit_rows, twin_rows = rows[member[hit]], self.rows[rep[hit]]
        order = np.lexsort((twin_rows, hit_rows))  # by row, then twin: the first is the min
        hit_rows, twin_rows = hit_rows[order], twin_rows[order]
        first = np.ones(len(hit_rows), dtype=bool)
        first[1:] = hit_rows[1:] != hit_rows[:-1]
        return list(zip(hit_rows[first].tolist(), twin_rows[first].tolist(), strict=True))


class MarkNearDuplicates(beam.PTransform):
    """Perceptual-hash near duplicates: a row is dropped when an earlier row's image is within
    `max_distance` bits. Candidate pairs come from LSH bands, each row compared only to its
    bands' first `max_representatives` distinct hashes (bounded work and memory per band)."""

    def __init__(
        self, max_distance: int, max_representatives: int = MAX_REPRESENTATIVES, buckets: int = 1
    ):
        super().__init__(label="Mark near_duplicate_image")
        self.max_distance = max_distance
        self.max_representatives = max_representatives
        self.buckets = buckets

    def expand(self, batches):
        max_distance = self.max_distance

        def band_members(batch_id, records):
            members = []
            for r in records:
                if _is_candidate(r):
                    value = _signed64(r["phash"])
                    for band_key in phash_bands(r["phash"], max_distance):
                        members.append((band_key, r["row_id"], value))
            return batch_id, members

        def earlier_twins(joined):
            _bucket, grouped = joined
            index = RepresentativeIndex(next(iter(grouped["reps"])))
            for batch_id, members in grouped["members"]:  # streamed: one part at a time
                twins = index.earliest_twins(members, max_distance)
                if twins:
                    yield batch_id, twins

        members = (
            batches
            | "Bands" >> beam.MapTuple(band_members)
            | "Spread" >> beam.FlatMap(spread_by_bucket, self.buckets, lambda m: m[0])
        )
        representatives = members | "Representatives" >> beam.CombinePerKey(
            BandRepresentatives(self.max_representatives)
        )
        twins = (
            {"members": members, "reps": representatives}
            | "JoinBand" >> beam.CoGroupByKey()
            | "Pairs" >> beam.FlatMap(earlier_twins)
        )
        return batches | "Mark" >> MarkRows("near_duplicate_image", twins)
