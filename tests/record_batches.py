"""Records into and out of the assemble's batch shape, `(batch id, [record])`, for dedup tests:
`from tests.record_batches import as_batches, rows_of`."""

from __future__ import annotations

import apache_beam as beam


def as_batches(records: list[dict], size: int = 3) -> list[tuple[int, list[dict]]]:
    """Consecutive batches of `size` records (small, so every test crosses batch boundaries)."""
    return [(i // size, records[i : i + size]) for i in range(0, len(records), size)]


def rows_of() -> beam.PTransform:
    """Batches → one element per record."""
    return "Rows" >> beam.FlatMap(lambda batch: batch[1])
