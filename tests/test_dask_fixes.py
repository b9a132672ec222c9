"""The DaskRunner workarounds of pipeline/dask_fixes.py that need no cluster: per-pipeline
partition counts, and joins that keep the partition count instead of adding it up."""

from __future__ import annotations

import dask
import dask.bag as db
from apache_beam.runners.dask.dask_runner import DaskOptions

from vlforge.pipeline.beam_options import build_options
from vlforge.pipeline.dask_fixes import _group_by_key_apply, install, spread


def test_each_pipeline_gets_its_own_partition_count_and_keeps_the_other_flags():
    options = build_options(["--runner", "DaskRunner", "--dask_client_address", "h:8786"], 1)
    plan, crawl = spread(options, 1), spread(options, 40)  # a one-piece plan, then the crawl
    assert plan.view_as(DaskOptions).npartitions == 1
    assert crawl.view_as(DaskOptions).npartitions == 40
    assert crawl.view_as(DaskOptions).address == "h:8786"
    assert options.view_as(DaskOptions).npartitions is None
    chosen = build_options(["--runner", "DaskRunner", "--dask_npartitions", "3"], 1)
    assert spread(chosen, 40).view_as(DaskOptions).npartitions == 3  # the user's choice stands


def test_group_by_key_after_a_flatten_keeps_the_pipeline_partition_count():
    install()

    class Op:  # what the runner hands the GroupByKey translation
        bag_kwargs = {"npartitions": 4}

    left = db.from_sequence([(i % 5, i) for i in range(40)], npartitions=4)
    right = db.from_sequence([(i % 5, -i) for i in range(40)], npartitions=4)
    joined = db.concat([left, right])  # the runner's Flatten: 8 partitions
    assert joined.npartitions == 8
    with dask.config.set(
        {"scheduler": "sync", "dataframe.shuffle.method": "tasks"}
    ):  # as on a cluster
        grouped = _group_by_key_apply(Op(), joined)
        assert grouped.npartitions == 4
        groups = dict(grouped.compute())
    assert sorted(groups) == [0, 1, 2, 3, 4]
    assert sorted(groups[2]) == sorted(
        [i for i in range(40) if i % 5 == 2] + [-i for i in range(40) if i % 5 == 2]
    )
