"""The corpus steps that must stay bounded as the corpus grows: dedup by keyed combiners with
bounded state (hot keys, hot LSH bands), and stats written as a parquet dataset."""

from __future__ import annotations

import random

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to

from tests.record_batches import marked_rows_of
from vlforge.pipeline.dedup import (
    BandRepresentatives,
    MarkExactDuplicates,
    MarkNearDuplicates,
    hamming,
)


def _record(row_id: int, phash: int, sha: str = "s", status: str = "ok") -> dict:
    return {"row_id": row_id, "phash": f"{phash:016x}", "sha256": sha, "status": status}


def _marks(records: list[dict], make_transform, expected: list[tuple]) -> None:
    """Run `make_transform(reader)` over `records`; (row id, status, reason, detail) must equal
    `expected`."""
    with beam.Pipeline() as p:
        marked = marked_rows_of(p, records, make_transform) | beam.Map(
            lambda r: (r["row_id"], r["status"], r.get("reason", ""), r.get("detail"))
        )
        assert_that(marked, equal_to(expected))


def _all_pairs_near(records: list[dict], max_distance: int) -> list[tuple]:
    """The definition, by brute force: a kept row's earliest earlier twin within the distance."""
    out = []
    for r in records:
        if r["status"] != "ok":
            out.append((r["row_id"], r["status"], "", None))
            continue
        twins = [
            e["row_id"]
            for e in records
            if e["status"] == "ok"
            and e["row_id"] < r["row_id"]
            and hamming(e["phash"], r["phash"]) <= max_distance
        ]
        if twins:
            out.append((r["row_id"], "duplicate", "near_duplicate_image", f"row {min(twins)}"))
        else:
            out.append((r["row_id"], "ok", "", None))
    return sorted(out)


@pytest.mark.parametrize("buckets", [1, 7])
def test_near_dedup_equals_all_pairs_on_clustered_hashes(buckets):
    rng = random.Random(3)
    centres = [rng.getrandbits(64) for _ in range(25)]
    records = []
    for row_id in range(400):
        value = rng.choice(centres)
        for bit in rng.sample(range(64), rng.randrange(0, 9)):  # 0-8 bits from a centre
            value ^= 1 << bit
        records.append(_record(row_id, value, status="ok" if row_id % 13 else "failed"))
    rng.shuffle(records)  # input order must not matter, only row ids
    expected = _all_pairs_near(records, 4)
    assert sum(1 for g in expected if g[1] == "duplicate") > 50  # the clusters make twins
    _marks(records, lambda read: MarkNearDuplicates(read, 4, buckets=buckets), expected)


def test_hot_band_of_thousands_of_identical_hashes_completes_and_marks_each_copy():
    placeholder = 0x0123_4567_89AB_CDEF
    rng = random.Random(5)
    others = [rng.getrandbits(64) for _ in range(40)]
    records = [_record(i, placeholder) for i in range(5000)]
    records += [_record(5000 + i, v) for i, v in enumerate(others)]
    expected = [(0, "ok", "", None)]
    expected += [(i, "duplicate", "near_duplicate_image", "row 0") for i in range(1, 5000)]
    expected += _all_pairs_near(records[5000:], 4)  # the placeholder is far from all of them
    assert all(hamming(r["phash"], f"{placeholder:016x}") > 4 for r in records[5000:])
    _marks(records, lambda read: MarkNearDuplicates(read, 4), expected)


def test_hot_band_beyond_the_representative_bound_stays_bounded_and_correct_for_copies():
    # 300 distinct hashes share band 0's bits (the low 13 bits are zero in every one); each also
    # has a copy later on. With at most 8 representatives per band the copies are still found:
    # each copy's own first occurrence is a representative of some other band it shares.
    rng = random.Random(9)
    values = [rng.getrandbits(64) & ~((1 << 13) - 1) for _ in range(300)]
    records = [_record(i, v) for i, v in enumerate(values)]
    records += [_record(300 + i, v) for i, v in enumerate(values)]
    expected = _all_pairs_near(records, 4)
    assert [e[1] for e in expected[300:]] == ["duplicate"] * 300
    _marks(records, lambda read: MarkNearDuplicates(read, 4, max_representatives=8), expected)


def test_band_representatives_merge_partial_accumulators_like_one_pass():
    fn = BandRepresentatives(3)
    rng = random.Random(1)
    # (band key, row, hash): 4 band keys, 6 distinct hashes, rows in random order
    elements = [(rng.randrange(4), row, rng.randrange(6)) for row in rng.sample(range(1000), 400)]

    def element(part):
        return (0, *(np.array(column, dtype=np.int64) for column in zip(*part, strict=True)))

    one = fn.add_input(fn.create_accumulator(), element(elements))
    parts = []
    for start in range(0, 400, 37):  # partial accumulators over arbitrary slices, then merged
        acc = fn.add_input(fn.create_accumulator(), element(elements[start : start + 20]))
        parts.append(fn.add_input(acc, element(elements[start + 20 : start + 37])))
    first_rows: dict[tuple[int, int], int] = {}
    for key, row, value in elements:
        first_rows[key, value] = min(row, first_rows.get((key, value), row))
    truth = []
    for key in range(4):
        firsts = sorted((row, value) for (k, value), row in first_rows.items() if k == key)
        truth += [(key, row, value) for row, value in firsts[:3]]

    def triples(output):
        return list(zip(*(column.tolist() for column in output), strict=True))

    assert triples(fn.extract_output(one)) == truth
    assert triples(fn.extract_output(fn.merge_accumulators(parts))) == truth


@pytest.mark.parametrize("buckets", [1, 5])
def test_exact_dedup_hot_key_keeps_the_first_and_names_it_in_every_copy(buckets):
    records = [_record(i, 0, sha="same") for i in range(3000, 0, -1)]
    records.append(_record(0, 0, sha="same", status="filtered"))  # not a candidate: untouched
    expected = [(0, "filtered", "", None), (1, "ok", "", None)]
    expected += [(i, "duplicate", "duplicate_image", "row 1") for i in range(2, 3001)]
    records += [_record(4000 + i, 0, sha=f"unique-{i}") for i in range(50)]  # other buckets
    expected += [(4000 + i, "ok", "", None) for i in range(50)]
    _marks(
        records,
        lambda read: MarkExactDuplicates(read, "sha256", "duplicate_image", buckets),
        expected,
    )
