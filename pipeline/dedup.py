"""Beam transforms that mark duplicates among the rows that passed every filter.

The first row (lowest row id) of each group is kept, so results do not depend on worker timing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics


def _is_candidate(record: dict) -> bool:
    return record["status"] == "ok"


def _mark(record: dict, reason: str, detail: str) -> dict:
    return {**record, "status": "duplicate", "reason": reason, "detail": detail}


class MarkExactDuplicates(beam.PTransform):
    """Rows sharing `key_fn(record)` keep only their first; the rest become `reason`."""

    def __init__(self, key_fn: Callable[[dict], str], reason: str):
        super().__init__(label=f"Mark {reason}")
        self.key_fn = key_fn
        self.reason = reason

    def expand(self, records):
        candidates, others = records | "Split" >> beam.Partition(
            lambda r, _n: 0 if _is_candidate(r) else 1, 2
        )
        reason = self.reason
        counter = Metrics.counter("dedup", reason)

        def keep_first(group: tuple[str, Iterable[dict]]):
            rows = sorted(group[1], key=lambda r: r["row_id"])
            yield rows[0]
            for row in rows[1:]:
                counter.inc()
                yield _mark(row, reason, f"row {rows[0]['row_id']}")

        decided = (
            candidates
            | "Key" >> beam.Map(lambda r: (self.key_fn(r), r))
            | "Group" >> beam.GroupByKey()
            | "KeepFirst" >> beam.FlatMap(keep_first)
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


class MarkNearDuplicates(beam.PTransform):
    """Perceptual-hash near duplicates: a row is dropped when an earlier row's image is within
    `max_distance` bits. Candidate pairs come from LSH bands, not an all-pairs comparison."""

    def __init__(self, max_distance: int):
        super().__init__(label="Mark near_duplicate_image")
        self.max_distance = max_distance

    def expand(self, records):
        candidates, others = records | "Split" >> beam.Partition(
            lambda r, _n: 0 if _is_candidate(r) else 1, 2
        )
        max_distance = self.max_distance

        def band_keys(record: dict):
            for band in phash_bands(record["phash"], max_distance):
                yield band, (record["row_id"], record["phash"])

        def earlier_twins(group):
            rows = sorted(set(group[1]))
            ids = np.array([r for r, _ in rows], dtype=np.int64)
            hashes = np.array([int(h, 16) for _, h in rows], dtype=np.uint64)
            # All pairs of the bucket at once: popcount of XOR (vectorized; buckets are small).
            distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
            close = np.tril(distances <= max_distance, k=-1)  # only rows earlier than each row
            for j in np.flatnonzero(close.any(axis=1)):
                yield int(ids[j]), int(ids[np.argmax(close[j])])

        dropped = (
            candidates
            | "Bands" >> beam.FlatMap(band_keys)
            | "GroupBand" >> beam.GroupByKey()
            | "Pairs" >> beam.FlatMap(earlier_twins)
            | "FirstTwin" >> beam.CombinePerKey(min)
        )
        counter = Metrics.counter("dedup", "near_duplicate_image")

        def decide(joined):
            _row_id, grouped = joined
            twins = list(grouped["twin"])
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
