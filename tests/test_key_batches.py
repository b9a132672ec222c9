"""NotFirstOfKey: the rows that are not the first of their key, from batches spread over buckets."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from vlforge.pipeline.key_batches import FirstRowPerKey, NotFirstOfKey, bucket_count, stable_bucket


def _brute_force(pairs: list[tuple[int, str]]) -> list[tuple[int, int]]:
    first: dict[str, int] = {}
    for row_id, key in pairs:
        first[key] = min(row_id, first.get(key, row_id))
    return sorted((row_id, first[key]) for row_id, key in pairs if first[key] != row_id)


@pytest.mark.parametrize("buckets", [1, 4])
def test_losers_equal_brute_force_whatever_the_batching_and_order(buckets):
    rng = random.Random(2)
    pairs = [(row_id, f"k{rng.randrange(60)}") for row_id in range(500)]
    rng.shuffle(pairs)
    batches = [(i, pairs[i * 45 : (i + 1) * 45]) for i in range(12)]
    batch_of = {row_id: b for b, part in batches for row_id, _ in part}
    with beam.Pipeline() as p:
        losers = (
            p
            | beam.Create(batches)
            | NotFirstOfKey(buckets)
            | beam.FlatMapTuple(lambda b, found: [(b, row, first) for row, first in found])
        )
        expected = [(batch_of[row], row, first) for row, first in _brute_force(pairs)]
        assert len(expected) == 440
        assert_that(losers, equal_to(expected))


def test_first_row_per_key_merges_partial_accumulators_like_one_pass():
    fn = FirstRowPerKey()
    pairs = [(row, f"k{row % 7}") for row in random.Random(4).sample(range(1000), 300)]
    one = fn.add_input(fn.create_accumulator(), (0, pairs))
    parts = [
        fn.add_input(fn.create_accumulator(), (i, pairs[i : i + 41])) for i in range(0, 300, 41)
    ]
    truth = {}
    for row, key in pairs:
        truth[key] = min(row, truth.get(key, row))
    assert fn.extract_output(one) == truth
    assert fn.extract_output(fn.merge_accumulators(parts)) == truth


def test_buckets_grow_with_the_corpus_and_agree_across_processes():
    assert bucket_count(0) == 1 and bucket_count(100_000) == 1 and bucket_count(100_001) == 2
    keys = ["a", "https://example.com/x.jpg", (3, 17)]
    here = [stable_bucket(k, 97) for k in keys]
    assert len(set(stable_bucket(f"key{i}", 97) for i in range(500))) > 80  # keys do spread
    code = (
        "from vlforge.pipeline.key_batches import stable_bucket;"
        f"print([stable_bucket(k, 97) for k in {keys!r}])"
    )
    for seed in ("1", "2"):  # str hashes are salted per process; buckets must not be
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == str(here)
