"""GroupByKey and CoGroupByKey whose values travel as staged files, only their paths through the
runner.

Why: DaskRunner's GroupByKey is an in-memory dask bag shuffle with no spilling, so every value
being grouped sits in some worker's memory until its group is consumed. With a fixed number
of workers, a mining shuffle of text parts or sample rows then holds the corpus's texts divided
by the worker count: at a fixed worker count it grows with the corpus. (At 300k
rows on 2 workers this was not yet the largest part of the group phase's peak: the README's
scaling page has the per-phase figures.) Here the task that makes a value writes it
(staged_values: arrays and JSON, no pickle) and sends `(key, path)`; the grouping moves paths
only, and the step after it reads one group's files. A worker then holds one element's values
at a time, whatever the corpus. Beam's own runners spill or stream their shuffles (Dataflow's
shuffle service, Flink's managed memory); this is what gives the same bound on Dask. The cost
is a write and a read of each value on the work directory's disk or bucket.
"""

from __future__ import annotations

import uuid

import apache_beam as beam

from vlforge.pipeline import staged_values, storage


class _Stage(beam.DoFn):
    """(key, value) → (key, path of the value's file under `directory`)."""

    def __init__(self, directory: str):
        self.directory = directory

    def setup(self) -> None:
        storage.makedirs(self.directory)

    def process(self, item):
        key, value = item
        yield key, stage_value(self.directory, value)


def stage_value(directory: str, value) -> str:
    """Write `value` to a new file under `directory` (which exists); returns its path."""
    return staged_values.write(storage.join(directory, f"{uuid.uuid4().hex}.npz"), value)


def _read_all(paths) -> list:
    return [staged_values.read(path) for path in paths]


def read_group(item):
    """(key, [path]) → (key, [value]): a group of staged values read back."""
    key, paths = item
    return key, _read_all(paths)


class StagedGroupByKey(beam.PTransform):
    """GroupByKey with each value staged under `directory` (a work directory the caller deletes)."""

    def __init__(self, directory: str):
        super().__init__()
        self.directory = directory

    def expand(self, pcoll):
        return (
            pcoll
            | "StageValues" >> beam.ParDo(_Stage(self.directory))
            | "GroupPaths" >> beam.GroupByKey()
            | "ReadValues" >> beam.Map(read_group)
        )


def _read_joined(item, staged: frozenset):
    key, joined = item
    return key, {tag: _read_all(v) if tag in staged else list(v) for tag, v in joined.items()}


class StagedCoGroupByKey(beam.PTransform):
    """CoGroupByKey over {tag: PCollection}; the values of the tags in `staged` travel as files
    under `directory/<tag>`, the others (already small) as they are."""

    def __init__(self, directory: str, staged: tuple[str, ...]):
        super().__init__()
        self.directory = directory
        self.staged = frozenset(staged)

    def expand(self, pcolls: dict):
        moved = {
            tag: pcoll
            | f"Stage{tag.title()}" >> beam.ParDo(_Stage(storage.join(self.directory, tag)))
            if tag in self.staged
            else pcoll
            for tag, pcoll in pcolls.items()
        }
        return (
            moved
            | "JoinPaths" >> beam.CoGroupByKey()
            | "ReadValues" >> beam.Map(_read_joined, self.staged)
        )
