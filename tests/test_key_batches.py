"""NotFirstOfKey: the rows that are not the first of their key, from batches spread over buckets."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to

from vlforge.pipeline.key_batches import (
    FirstRowPerKey,
    NotFirstOfKey,
    bucket_count,
    digest_buckets,
    key_digests,
)


def _brute_force(pairs: list[tuple[int, str]]) -> list[tuple[int, int]]:
    first: dict[str, int] = {}
    for row_id, key in pairs:
        first[key] = min(row_id, first.get(key, row_id))
    return sorted((row_id, first[key]) for row_id, key in pairs if first[key] != row_id)


def _arrays(pairs: list[tuple[int, str]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([r for r, _ in pairs], dtype=np.int64), key_digests(k for _, k in pairs)


@pytest.mark.parametrize("buckets", [1, 4])
def test_losers_equal_brute_force_whatever_the_batching_and_order(buckets):
    rng = random.Random(2)
    pairs = [(row_id, f"k{rng.randrange(60)}") for row_id in range(500)]
    rng.shuffle(pairs)
    batches = [(i, pairs[i * 45 : (i + 1) * 45]) for i in range(12)]
    batch_of = {row_id: b for b, part in batches for row_id, _ in part}
    arrays = [(b, _arrays(part)) for b, part in batches]
    with beam.Pipeline() as p:
        losers = (
            p
            | beam.Create(arrays)
            | NotFirstOfKey(buckets)
            | beam.FlatMapTuple(
                lambda b, found: [
                    (b, r, f) for r, f in zip(*(a.tolist() for a in found), strict=True)
                ]
            )
        )
        expected = [(batch_of[row], row, first) for row, first in _brute_force(pairs)]
        assert len(expected) == 440
        assert_that(losers, equal_to(expected))


def test_first_row_per_key_merges_partial_accumulators_like_one_pass():
    fn = FirstRowPerKey()
    pairs = [(row, f"k{row % 7}") for row in random.Random(4).sample(range(1000), 300)]
    one = fn.add_input(fn.create_accumulator(), (0, *_arrays(pairs)))
    parts = []
    for i in range(0, 300, 41):  # partial accumulators of two elements each
        acc = fn.add_input(fn.create_accumulator(), (i, *_arrays(pairs[i : i + 20])))
        parts.append(fn.add_input(acc, (i, *_arrays(pairs[i + 20 : i + 41]))))
    truth = {}
    for row, key in pairs:
        digest = key_digests([key])[0]
        truth[digest] = min(row, truth.get(digest, row))

    def as_dict(output):
        keys, rows = output
        assert list(keys) == sorted(keys)  # the losers' lookup searches them
        return dict(zip(keys.tolist(), rows.tolist(), strict=True))

    assert as_dict(fn.extract_output(one)) == truth
    assert as_dict(fn.extract_output(fn.merge_accumulators(parts))) == truth


def test_buckets_grow_with_the_corpus_and_agree_across_processes():
    assert bucket_count(0) == 1 and bucket_count(100_000) == 1 and bucket_count(100_001) == 2
    keys = ["a", "https://example.com/x.jpg", "(3, 17)"]
    here = digest_buckets(key_digests(keys), 97).tolist()
    spread = digest_buckets(key_digests(f"key{i}" for i in range(500)), 97)
    assert len(set(spread.tolist())) > 80  # keys do spread
    code = (
        "from vlforge.pipeline.key_batches import digest_buckets, key_digests;"
        f"print(digest_buckets(key_digests({keys!r}), 97).tolist())"
    )
    for seed in ("1", "2"):  # str hashes are salted per process; buckets must not be
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == str(here)
