"""The staged shuffle groups like Beam's own, and the runner carries paths, not the values."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from vlforge.pipeline.staged_shuffle import StagedCoGroupByKey, StagedGroupByKey, _Stage

ITEMS = [("a", (1, "x")), ("b", (2, "y")), ("a", (3, "z")), ("c", (4, "w"))]


def _sorted(item):
    key, values = item
    return key, sorted(values)


def test_grouped_as_group_by_key(tmp_path):
    with TestPipeline() as p:
        items = p | beam.Create(ITEMS)
        staged = (
            items | "Staged" >> StagedGroupByKey(str(tmp_path / "g")) | "S1" >> beam.Map(_sorted)
        )
        plain = items | "Plain" >> beam.GroupByKey() | "S2" >> beam.Map(_sorted)
        assert_that(
            staged,
            equal_to([("a", [(1, "x"), (3, "z")]), ("b", [(2, "y")]), ("c", [(4, "w")])]),
            label="staged",
        )
        assert_that(
            plain,
            equal_to([("a", [(1, "x"), (3, "z")]), ("b", [(2, "y")]), ("c", [(4, "w")])]),
            label="plain",
        )
    # one file per value, each readable without pickle (staged_values)
    assert len(list((tmp_path / "g").glob("*.npz"))) == len(ITEMS)


def test_staging_sends_only_a_path(tmp_path):
    stage = _Stage(str(tmp_path))
    stage.setup()
    value = np.arange(10_000, dtype=np.int64)
    ((key, path),) = list(stage.process(("k", value)))
    assert key == "k" and isinstance(path, str) and path.startswith(str(tmp_path))


def test_joined_with_only_the_named_tags_staged(tmp_path):
    def joined(item):
        key, parts = item
        return key, sorted(parts["big"]), sorted(parts["small"])

    with TestPipeline() as p:
        big = p | "Big" >> beam.Create([("a", (1, 2)), ("b", (3, 4)), ("a", (5, 6))])
        small = p | "Small" >> beam.Create([("a", "s"), ("c", "t")])
        out = (
            {"big": big, "small": small}
            | StagedCoGroupByKey(str(tmp_path / "j"), staged=("big",))
            | beam.Map(joined)
        )
        assert_that(
            out, equal_to([("a", [(1, 2), (5, 6)], ["s"]), ("b", [(3, 4)], []), ("c", [], ["t"])])
        )
    assert len(list((tmp_path / "j" / "big").glob("*.npz"))) == 3
    assert not (tmp_path / "j" / "small").exists()
