"""Beam transforms that mark duplicates among the rows that passed every filter.

The first row (lowest row id) of each group is kept, so results do not depend on worker timing.

Both transforms are keyed combiners with bounded state, so a popular key (one placeholder image
copied a million times) never becomes one list on one worker:
- exact: a min-combiner per key finds the first row (O(1) state per key), and only the winner's
  id is joined back to the rows; the join's grouped rows are streamed, never listed or sorted.
- near: per LSH band key a combiner keeps at most `max_representatives` distinct hashes (each
  with its first row); every row is compared only to those, not to every other row of the band
  (which is quadratic, and blank or placeholder images make huge bands).

No `beam.Partition` (or other multi-output ParDo): Beam's DaskRunner (2.78) hands every output
of a multi-output ParDo to every consumer, so a Partition there does not split anything.
"""

from __future__ import annotations

from collections.abc import Callable

import apache_beam as beam
from apache_beam.metrics import Metrics

# Distinct hashes kept per band key. Results equal an all-pairs comparison whenever a band holds
# at most this many distinct hashes (copies of one hash count once); beyond it, a row is compared
# to the band's first 64 distinct hashes only. Real photos almost never share a 6-16 bit band
# value with 64 other distinct hashes; hot bands are nearly always copies of one image.
MAX_REPRESENTATIVES = 64


def _is_candidate(record: dict) -> bool:
    return record["status"] == "ok"


def _mark(record: dict, reason: str, detail: str) -> dict:
    return {**record, "status": "duplicate", "reason": reason, "detail": detail}


def _split(records, label: str):
    """(candidates, others) by two filters, not a Partition (see the module docstring)."""
    candidates = records | f"{label}Candidates" >> beam.Filter(_is_candidate)
    others = records | f"{label}Others" >> beam.Filter(lambda r: not _is_candidate(r))
    return candidates, others


class MarkExactDuplicates(beam.PTransform):
    """Rows sharing `key_fn(record)` keep only their first; the rest become `reason`."""

    def __init__(self, key_fn: Callable[[dict], str], reason: str):
        super().__init__(label=f"Mark {reason}")
        self.key_fn = key_fn
        self.reason = reason

    def expand(self, records):
        candidates, others = _split(records, "")
        reason = self.reason
        counter = Metrics.counter("dedup", reason)
        keyed = candidates | "Key" >> beam.Map(lambda r: (self.key_fn(r), r))
        first = (
            keyed
            | "RowIds" >> beam.MapTuple(lambda key, r: (key, r["row_id"]))
            | "First" >> beam.CombinePerKey(min)
        )

        def decide(joined):
            _key, grouped = joined
            winner = next(iter(grouped["first"]))
            for record in grouped["rows"]:  # streamed: a hot key is never held as one list
                if record["row_id"] == winner:
                    yield record
                else:
                    counter.inc()
                    yield _mark(record, reason, f"row {winner}")

        decided = (
            {"rows": keyed, "first": first}
            | "Join" >> beam.CoGroupByKey()
            | "Decide" >> beam.FlatMap(decide)
        )
        return (decided, others) | "Merge" >> beam.Flatten()


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


class MarkNearDuplicates(beam.PTransform):
    """Perceptual-hash near duplicates: a row is dropped when an earlier row's image is within
    `max_distance` bits. Candidate pairs come from LSH bands, each row compared only to its
    bands' first `max_representatives` distinct hashes (bounded work and memory per band)."""

    def __init__(self, max_distance: int, max_representatives: int = MAX_REPRESENTATIVES):
        super().__init__(label="Mark near_duplicate_image")
        self.max_distance = max_distance
        self.max_representatives = max_representatives

    def expand(self, records):
        candidates, others = _split(records, "")
        max_distance = self.max_distance

        def band_keys(record: dict):
            value = int(record["phash"], 16)
            for band in phash_bands(record["phash"], max_distance):
                yield band, (record["row_id"], value)

        members = candidates | "Bands" >> beam.FlatMap(band_keys)
        representatives = members | "Representatives" >> beam.CombinePerKey(
            FirstDistinctHashes(self.max_representatives)
        )

        def earlier_twins(joined):
            _band, grouped = joined
            reps = next(iter(grouped["reps"]))
            for row_id, value in grouped["members"]:  # streamed; at most K comparisons each
                for rep_row, rep_value in reps:
                    if rep_row >= row_id:
                        break  # reps are sorted by row id: only earlier rows can be twins
                    if (value ^ rep_value).bit_count() <= max_distance:
                        yield row_id, rep_row
                        break  # the earliest twin in this band; min over bands follows

        dropped = (
            {"members": members, "reps": representatives}
            | "JoinBand" >> beam.CoGroupByKey()
            | "Pairs" >> beam.FlatMap(earlier_twins)
            | "FirstTwin" >> beam.CombinePerKey(min)
        )
        counter = Metrics.counter("dedup", "near_duplicate_image")

        def decide(joined):
            _row_id, grouped = joined
            twins = list(grouped["twin"])  # at most one: FirstTwin combined them
            for record in grouped["record"]:
                if twins:
                    counter.inc()
                    yield _mark(record, "near_duplicate_image", f"row {min(twins)}")
                else:
                    yield record

        decided = (
            {
                "record": candidates | "ByRow" >> beam.Map(lambda r: (r["row_id"], r)),
                "twin": dropped,
            }
            | "Join" >> beam.CoGroupByKey()
            | "Decide" >> beam.FlatMap(decide)
        )
        return (decided, others) | "Merge" >> beam.Flatten()
