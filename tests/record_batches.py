"""Records into and out of the assemble's batch shape for dedup tests: the steps pass
`(batch id, marks)` and read columns through a reader, which `BatchColumns` serves from memory
(the corpus reads the chunk checkpoints). `from tests.record_batches import marked_rows_of`."""

from __future__ import annotations

import apache_beam as beam

from vlforge.pipeline.dedup import apply_marks


def as_batches(records: list[dict], size: int = 3) -> list[tuple[int, list[dict]]]:
    """Consecutive batches of `size` records (small, so every test crosses batch boundaries)."""
    return [(i // size, records[i : i + size]) for i in range(0, len(records), size)]


class BatchColumns:
    """A ColumnReader over in-memory batches: (batch id, columns) → that batch's columns."""

    def __init__(self, batches: list[tuple[int, list[dict]]]):
        self.batches = dict(batches)

    def __call__(self, batch_id: int, columns: list[str]) -> dict[str, list]:
        return {c: [r.get(c) for r in self.batches[batch_id]] for c in columns}


def marked_rows_of(pipeline, records: list[dict], make_transform, size: int = 3):
    """`records` in batches of `size` through `make_transform(reader)`: one element per record,
    with its final status, reason and detail."""
    batches = as_batches(records, size)
    by_batch = dict(batches)
    return (
        pipeline
        | "Unmarked" >> beam.Create([(batch_id, {}) for batch_id, _ in batches])
        | make_transform(BatchColumns(batches))
        | "Rows"
        >> beam.FlatMapTuple(lambda batch_id, marks: apply_marks(by_batch[batch_id], marks))
    )
