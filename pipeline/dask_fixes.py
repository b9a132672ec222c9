"""Workarounds for Beam's DaskRunner (apache-beam 2.78), installed when a stage runs on it.

1. Outputs leak between bundles. The runner turns every ParDo into a dask `map_partitions` over
   `apply_dofn_to_bundle`, whose receivers (one list per ParDo) are built once at graph time and
   never emptied: each bundle returns its own outputs plus those of every earlier bundle of the
   same ParDo that ran in that worker process. A side input computed inside a task (the runner
   computes it there with `worker_client`) runs the upstream ParDos again in the same process,
   so the main input saw every shard twice: mining's document frequencies came out doubled.
   `_apply_dofn_to_bundle` empties the receivers before and after each bundle. The graph holds
   the function by reference (module and name), so workers import this module and use it too.
2. Side inputs are recomputed from scratch by every bundle that reads them: the runner hands
   each task the side input's dask bag, which the task computes again (its FIXME). Mining's
   corpus side input was rebuilt, every shard scanned again, once per shard (mining now
   stages such values in files instead: mine_phases). `install` has the
   runner persist each side input's bag on the cluster once, as the launcher builds the graph;
   tasks then fetch the computed partitions instead of recomputing them. Each persist is
   waited for before the next graph is sent: side inputs that share upstream steps (mining's
   reducer, trained index and filled index all read the text buckets) would otherwise send the
   same keys fused differently while the first is still running, which dask refuses
   ("different run_spec", then FutureCancelledError). Upstream steps are recomputed for each
   side input instead (their keys are released once a side input is done).
3. Partitions multiply along joins. The runner's Flatten is `dask.bag.concat` (partition counts
   add up) and its GroupByKey keeps its input's partitions, so every CoGroupByKey (a Flatten
   then a GroupByKey) leaves more partitions than either side had: the corpus assemble's chain
   of joins went from one partition per chunk to ~50, and the task shuffle's cost and the
   workers' bookkeeping (up to 73,000 task states held per worker at 100k rows, while the
   results they held were under 1 MiB) grew faster than the rows. `install` has GroupByKey
   produce at most the pipeline's partition count (`--dask_npartitions`, which `spread` sets
   to one per work item). With `spread`'s copy and the assemble's 50k-row partitions, the
   corpus assemble at 100k rows went from 90 s to 8 s.
4. The runner's client is never closed; once the cluster goes away it retries for 30 s and logs
   errors. `close_client` closes it when the pipeline is done.
"""

from __future__ import annotations

import copy
from typing import Any


def _apply_dofn_to_bundle(items, invoker_args, invoker_kwargs, tagged_receivers) -> list:
    from apache_beam.runners.dask import transform_evaluator

    _ensure_installed()  # a worker that unpickled this function has not patched its runner yet
    del tagged_receivers.values[:]
    try:
        return list(
            transform_evaluator._vlforge_original_apply(
                items, invoker_args, invoker_kwargs, tagged_receivers
            )
        )
    finally:
        del tagged_receivers.values[:]


_PERSISTED: list = []  # the launcher's handles on persisted side inputs: alive until the run ends


def _persisted_side_input_class() -> type:
    """The runner's side-input iterator over a bag persisted once on the cluster.

    Defined on first use (the runner's module imports dask and distributed, ~0.5 s, which no
    other runner needs) and kept as this module's `PersistedSideInput`, so that tasks unpickle
    it by reference: a worker's lookup goes through the module `__getattr__` below.
    """
    cls = globals().get("PersistedSideInput")
    if cls is not None:
        return cls
    from apache_beam.runners.dask.transform_evaluator import DaskBagWindowedIterator

    class PersistedSideInput(DaskBagWindowedIterator):
        def __init__(self, bag, window_fn, lazy_side_inputs: bool = False):
            from distributed import get_client, wait

            persisted = get_client().persist(bag)
            wait(persisted)  # see the module docstring, 2.
            _PERSISTED.append(persisted)
            super().__init__(persisted, window_fn, lazy_side_inputs)

    # Named as a module-level class, so pickle refers to it instead of copying it by value.
    PersistedSideInput.__module__, PersistedSideInput.__qualname__ = __name__, "PersistedSideInput"
    globals()["PersistedSideInput"] = PersistedSideInput
    return PersistedSideInput


def __getattr__(name: str) -> Any:
    if name == "PersistedSideInput":
        return _persisted_side_input_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _group_key(item):
    return item[0]


def _group_value(item):
    from apache_beam.runners.dask.transform_evaluator import defenestrate

    key, values = item
    return key, [defenestrate(element[1]) for element in values]


def _group_by_key_apply(self, input_bag, side_inputs=None):
    """The runner's GroupByKey with at most the pipeline's partition count (docstring, 3.)."""
    cap = self.bag_kwargs.get("npartitions")
    if cap and input_bag.npartitions > cap:
        # Neighbouring partitions are concatenated, no shuffle. Not groupby(npartitions=):
        # the task shuffle that distributed uses ignores it.
        input_bag = input_bag.repartition(npartitions=cap)
    return input_bag.groupby(_group_key).map(_group_value)


def install() -> None:
    """Patch the runner (idempotent); call before the pipeline is built."""
    from apache_beam.runners.dask import dask_runner, transform_evaluator

    if not hasattr(transform_evaluator, "_vlforge_original_apply"):
        transform_evaluator._vlforge_original_apply = transform_evaluator.apply_dofn_to_bundle
    transform_evaluator.apply_dofn_to_bundle = _apply_dofn_to_bundle
    transform_evaluator.GroupByKey.apply = _group_by_key_apply
    if not getattr(dask_runner, "_vlforge_persisting", False):
        dask_runner.DaskBagWindowedIterator = _persisted_side_input_class()
        dask_runner._vlforge_persisting = True


def _ensure_installed() -> None:
    # A worker unpickling the graph imports this module; the original must be known there.
    from apache_beam.runners.dask import transform_evaluator

    if not hasattr(transform_evaluator, "_vlforge_original_apply"):
        install()


def close_client(result: Any) -> None:
    """Close the dask client a DaskRunner result holds (other runners' results: nothing)."""
    client = getattr(result, "client", None)
    if client is not None and hasattr(client, "close"):
        _PERSISTED.clear()
        client.close()


def spread(options: Any, items: int) -> Any:
    """Options for one pipeline of `items` work items (shards, chunks, partition groups): one
    dask partition per item, unless the user chose a partitioning.

    The runner's Create packs up to 128 elements into one partition, and a partition is one
    task on one worker: a run of a few dozen shards would use a single worker. A copy: a stage
    runs several pipelines on one set of options, and the first one's count (a plan of one
    piece) must not become every later pipeline's (the crawl then ran on one worker).
    """
    from apache_beam.options.pipeline_options import StandardOptions

    from vlforge.pipeline.beam_options import DASK_RUNNER

    if options.view_as(StandardOptions).runner != DASK_RUNNER:
        return options
    from apache_beam.runners.dask.dask_runner import DaskOptions

    dask = options.view_as(DaskOptions)
    if dask.npartitions is not None or dask.partition_size is not None:
        return options
    # Not from_dictionary: it writes each value back as `--dest`, and flags whose dest differs
    # (--dask_client_address is `address`) would be dropped.
    copied = copy.deepcopy(options)
    copied.view_as(DaskOptions).npartitions = max(1, items)
    return copied
