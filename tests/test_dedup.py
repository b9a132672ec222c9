"""Exact and perceptual duplicate marking as Beam transforms."""

import random

import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to

from tests.record_batches import marked_rows_of
from vlforge.pipeline.dedup import MarkExactDuplicates, MarkNearDuplicates, hamming, phash_bands


def _record(row_id, phash="0" * 16, sha="s", status="ok"):
    return {"row_id": row_id, "phash": phash, "sha256": sha, "status": status, "reason": ""}


def test_bands_find_every_pair_within_distance():
    rng = random.Random(0)
    for _ in range(300):
        a = rng.getrandbits(64)
        bits = rng.sample(range(64), 4)
        b = a
        for bit in bits:
            b ^= 1 << bit
        ha, hb = f"{a:016x}", f"{b:016x}"
        assert hamming(ha, hb) == 4
        assert set(phash_bands(ha, 4)) & set(phash_bands(hb, 4))


def test_exact_duplicates_keep_the_first_row():
    records = [
        _record(5, sha="a"),
        _record(2, sha="a"),
        _record(3, sha="b"),
        _record(1, sha="a", status="failed"),
    ]
    with beam.Pipeline() as p:
        out = marked_rows_of(
            p, records, lambda read: MarkExactDuplicates(read, "sha256", "duplicate_image")
        ) | beam.Map(lambda r: (r["row_id"], r["status"], r["reason"]))
        assert_that(
            out,
            equal_to(
                [
                    (2, "ok", ""),
                    (5, "duplicate", "duplicate_image"),
                    (3, "ok", ""),
                    (1, "failed", ""),
                ]
            ),
        )


def test_near_duplicates_within_distance_only():
    base = 0x0F0F_1234_ABCD_9876
    near = base ^ 0b1011  # 3 bits away
    far = base ^ 0xFFFF_0000  # 16 bits away
    records = [
        _record(0, f"{base:016x}"),
        _record(1, f"{near:016x}"),
        _record(2, f"{far:016x}"),
        _record(3, f"{base:016x}", status="filtered"),
    ]
    with beam.Pipeline() as p:
        out = marked_rows_of(p, records, lambda read: MarkNearDuplicates(read, 4)) | beam.Map(
            lambda r: (r["row_id"], r["status"], r["reason"], r.get("detail", ""))
        )
        assert_that(
            out,
            equal_to(
                [
                    (0, "ok", "", ""),
                    (1, "duplicate", "near_duplicate_image", "row 0"),
                    (2, "ok", "", ""),
                    (3, "filtered", "", ""),
                ]
            ),
        )


def test_a_row_marked_by_one_step_is_no_candidate_for_the_next():
    # Row 1 repeats row 0's image; row 2 repeats row 1's caption. Row 1 is out after the image
    # step, so row 2's caption is the first one left and row 2 stays.
    records = [
        {**_record(0, sha="a"), "caption": "x"},
        {**_record(1, sha="a"), "caption": "y"},
        {**_record(2, sha="b"), "caption": "y"},
        {**_record(3, sha="c"), "caption": "y"},
    ]

    def both(read):
        return MarkExactDuplicates(read, "sha256", "duplicate_image") | MarkExactDuplicates(
            read, "caption", "duplicate_caption"
        )

    with beam.Pipeline() as p:
        out = marked_rows_of(p, records, both, size=2) | beam.Map(
            lambda r: (r["row_id"], r["status"], r["reason"], r.get("detail"))
        )
        assert_that(
            out,
            equal_to(
                [
                    (0, "ok", "", None),
                    (1, "duplicate", "duplicate_image", "row 0"),
                    (2, "ok", "", None),
                    (3, "duplicate", "duplicate_caption", "row 2"),
                ]
            ),
        )
