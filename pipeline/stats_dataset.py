"""stats.parquet as a parquet dataset: a directory of parts, one per crawl chunk, written by the
workers in parallel (no step gathers every row). `read_stats` reads it back in row order, and
still reads the single file that earlier versions wrote."""

from __future__ import annotations

import os

import pyarrow as pa

from vlforge.pipeline import storage

STATS_NAME = "stats.parquet"


def part_name(chunk: int) -> str:
    return f"part-{chunk:06d}.parquet"


def stats_parts(path: str) -> list[str]:
    """The dataset's part files in row order (part names sort as their chunks)."""
    return storage.glob(storage.join(str(path), "part-*.parquet"))


def is_stats(path: str) -> bool:
    """A stats dataset directory (or an older single stats file) exists at `path`."""
    return storage.exists(str(path)) and (os.path.isfile(str(path)) or bool(stats_parts(path)))


def read_stats(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Every row of the stats at `path` (directory of parts, or one file), by row id."""
    path = str(path)
    if "://" not in path and os.path.isfile(path):
        return storage.read_parquet(path, columns)
    parts = stats_parts(path)
    if not parts:
        raise FileNotFoundError(f"{path}: no stats parts (part-*.parquet)")
    tables = [storage.read_parquet(p, columns) for p in parts]
    table = pa.concat_tables(tables, promote_options="default")
    if "row_id" in table.column_names:
        table = table.sort_by("row_id")
    return table
