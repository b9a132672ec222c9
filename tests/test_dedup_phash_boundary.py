"""The phash distance boundary: `--phash-distance d` means within d bits, d included.

README: `near_duplicate_image` (phash within `--phash-distance`). A pair exactly d bits apart
is a near duplicate, a pair d + 1 bits apart is not, wherever the differing bits fall (the
LSH bands must not lose a pair at the boundary: one differing bit in each of d bands is the
worst case for d + 1 bands).
"""

from __future__ import annotations

import random

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from tests.record_batches import marked_rows_of
from vlforge.pipeline.dedup import MarkNearDuplicates, hamming


def _record(row_id: int, phash: int) -> dict:
    return {"row_id": row_id, "phash": f"{phash:016x}", "sha256": str(row_id), "status": "ok"}


def _spread_mask(bits: int, n_bands: int) -> int:
    """`bits` set bits, one per band of a 64-bit hash split into n_bands, from the low end."""
    return sum(1 << (round(i * 64 / n_bands)) for i in range(bits))


@pytest.mark.parametrize("distance", [0, 1, 4, 9])
def test_pairs_at_the_distance_are_duplicates_one_more_bit_are_not(distance):
    rng = random.Random(distance)
    masks = [_spread_mask(distance, distance + 1), (1 << distance) - 1]  # spread, and packed
    masks += [sum(1 << b for b in rng.sample(range(64), distance)) for _ in range(20)]
    records, expected = [], []
    for mask in masks:
        # d + 1 bits: the same d bits and one more, outside them.
        extra = next(b for b in rng.sample(range(64), 64) if not mask >> b & 1)
        for flips, duplicate in ((mask, True), (mask | 1 << extra, False)):
            base = rng.getrandbits(64)
            first, second = len(records), len(records) + 1
            pair = [_record(first, base), _record(second, base ^ flips)]
            # Pairs are independent: far from every other pair's hashes (random 64-bit hashes
            # are ~32 bits apart; within 10 bits has odds of 1e-8).
            assert all(
                hamming(a["phash"], b["phash"]) > distance + 1 for a in pair for b in records
            )
            records += pair
            assert hamming(records[first]["phash"], records[second]["phash"]) == (
                distance if duplicate else distance + 1
            )
            expected.append((first, "ok", ""))
            expected.append(
                (second, "duplicate", "near_duplicate_image") if duplicate else (second, "ok", "")
            )
    with beam.Pipeline() as p:
        marked = marked_rows_of(
            p, records, lambda read: MarkNearDuplicates(read, distance)
        ) | beam.Map(lambda r: (r["row_id"], r["status"], r.get("reason", "")))
        assert_that(marked, equal_to(expected))
