"""Beam stage: the workers read the input lists and write the crawl's work chunks.

Two small pipelines, run before the crawl (and never again once `_work/plan.json` exists):
  count (only for csv/tsv/jsonl pieces, whose row counts no metadata holds):
      pieces → CountPiece → one summary of (piece, rows, byte range)
  split:
      pieces → PieceUrls → NotFirstOfKey(normalized URL) → (piece, (rows, first rows))
             ↘ CoGroupByKey by piece ↙
      WritePiece: the piece read again, its rows normalized, numbered, marked and written as
      `_work/input/chunk-N.parquet` → one summary (rows, chunks, repeated URLs, errors)
Repeated URLs are decided before any request (the lowest row id wins), by a keyed min-combiner:
no process holds every URL. Only (row id, 16-byte URL digest) arrays are shuffled; captions and
extra columns stay with the worker that reads the piece. A piece that cannot be read is reported as one error
line in the summary, which the launcher raises.
"""

from __future__ import annotations

from collections.abc import Callable

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics

from vlforge.pipeline import storage
from vlforge.pipeline.filters import normalize_caption
from vlforge.pipeline.input_lists import (
    Piece,
    count_piece,
    iter_piece,
    iter_piece_urls,
    unreadable_message,
)
from vlforge.pipeline.key_batches import NotFirstOfKey, bucket_count, key_digests
from vlforge.pipeline.urls import normalize_url, sample_key
from vlforge.pipeline.work_plan import INPUT_SCHEMA, WorkPlan

_READ_ERRORS = (pa.ArrowInvalid, OSError, ValueError, UnicodeDecodeError)
MAX_ERRORS = 5


class PlanSummary(beam.CombineFn):
    """Per-piece outputs → totals, counted pieces and the first few errors."""

    def create_accumulator(self) -> dict:
        return {"rows": 0, "chunks": 0, "duplicate_urls": 0, "pieces": [], "errors": []}

    def add_input(self, acc: dict, element: dict) -> dict:
        for name in ("rows", "chunks", "duplicate_urls"):
            acc[name] += element.get(name, 0)
        if "piece" in element:
            acc["pieces"].append(element["piece"])
        if "error" in element:
            acc["errors"] = sorted({*acc["errors"], element["error"]})[:MAX_ERRORS]
        return acc

    def merge_accumulators(self, accumulators) -> dict:
        merged = self.create_accumulator()
        for acc in accumulators:
            for name in ("rows", "chunks", "duplicate_urls"):
                merged[name] += acc[name]
            merged["pieces"].extend(acc["pieces"])
            merged["errors"] = sorted({*merged["errors"], *acc["errors"]})[:MAX_ERRORS]
        return merged

    def extract_output(self, acc: dict) -> dict:
        return {**acc, "pieces": sorted(acc["pieces"], key=lambda p: p["index"])}


def _write_json(path: str) -> Callable[[dict], str]:
    def write(summary: dict) -> str:
        storage.write_json(path, summary)
        return path

    return write


def build_count(pipeline, pieces: list[Piece], url_col: str, summary_path: str):
    """Count the rows of csv/tsv/jsonl pieces on the workers; one summary file at the end."""

    def count(piece: Piece):
        try:
            counted = count_piece(piece, url_col)
        except _READ_ERRORS as err:
            yield {"error": unreadable_message(piece, err)}
            return
        yield {
            "piece": {
                "index": counted.index,
                "n_rows": counted.n_rows,
                "byte_range": list(counted.byte_range),
            }
        }

    created = pipeline | "Pieces" >> beam.Create(pieces)
    if len(pieces) > 1:
        created = created | "Spread" >> beam.Reshuffle()
    return (
        created
        | "Count" >> beam.FlatMap(count)
        | "CountSummary" >> beam.CombineGlobally(PlanSummary())
        | "WriteCountSummary" >> beam.Map(_write_json(summary_path))
    )


def _url_pairs(url_col: str) -> Callable[[Piece], object]:
    """A piece → (piece index, (row ids, digests of the normalized URLs)) per batch of its rows."""

    def pairs(piece: Piece):
        row_id = piece.first_row
        try:
            for batch in iter_piece_urls(piece, url_col):
                rows = np.arange(row_id, row_id + len(batch), dtype=np.int64)
                yield piece.index, (rows, key_digests(normalize_url(url) for url in batch))
                row_id += len(batch)
        except _READ_ERRORS:
            return  # WritePiece reads the piece again and reports the error

    return pairs


class WritePiece(beam.DoFn):
    """(piece, its repeated rows) → the piece's work chunks written; yields its counts."""

    def __init__(self, plan: WorkPlan, url_col: str, caption_col: str):
        self.plan = plan
        self.url_col = url_col
        self.caption_col = caption_col
        self.rows_counter = Metrics.counter("plan", "rows")

    def process(self, element):
        _index, grouped = element
        piece = next(iter(grouped["piece"]))
        repeated = {
            row: first
            for rows, firsts in grouped["dups"]
            for row, first in zip(rows.tolist(), firsts.tolist(), strict=True)
        }
        try:
            chunks = self._write(piece, repeated)
        except _READ_ERRORS as err:
            yield {"error": unreadable_message(piece, err)}
            return
        self.rows_counter.inc(piece.n_rows)
        yield {"rows": piece.n_rows, "chunks": chunks, "duplicate_urls": len(repeated)}

    def _write(self, piece: Piece, repeated: dict[int, int]) -> int:
        size = self.plan.chunk_size
        columns: dict[str, list] = {name: [] for name in INPUT_SCHEMA.names}
        row_id, chunk = piece.first_row, piece.first_chunk

        def flush() -> None:
            storage.write_parquet(
                self.plan.input_path(chunk), pa.table(columns, schema=INPUT_SCHEMA)
            )
            for values in columns.values():
                values.clear()

        for batch in iter_piece(piece, self.url_col, self.caption_col):
            for url, caption, extra in batch:
                normalized = normalize_url(url)
                columns["row_id"].append(row_id)
                columns["url"].append(url)
                columns["caption"].append(normalize_caption(caption))
                columns["key"].append(sample_key(normalized))
                columns["dup_of"].append(repeated.get(row_id, -1))
                columns["extra"].append(extra)
                columns["source"].append(piece.path)
                row_id += 1
                if len(columns["row_id"]) == size:
                    flush()
                    chunk += 1
        if columns["row_id"]:
            flush()
            chunk += 1
        if row_id - piece.first_row != piece.n_rows:
            raise ValueError(
                f"{row_id - piece.first_row} rows where {piece.n_rows} were counted "
                "(did the list change while the run was planned?)"
            )
        return chunk - piece.first_chunk


def build_split(
    pipeline,
    pieces: list[Piece],
    plan: WorkPlan,
    url_col: str,
    caption_col: str,
    dedup_urls: bool,
    summary_path: str,
):
    """Write every work chunk from the pieces; one summary file at the end (the only sink, for
    Beam's DaskRunner, which runs only what leads to the graph's last transform)."""
    created = pipeline | "Pieces" >> beam.Create(pieces)
    if len(pieces) > 1:
        created = created | "Spread" >> beam.Reshuffle()
    keyed = created | "ByPiece" >> beam.Map(lambda p: (p.index, p))
    if dedup_urls:
        repeated = (
            created
            | "Urls" >> beam.FlatMap(_url_pairs(url_col))
            | "Repeated" >> NotFirstOfKey(bucket_count(sum(p.n_rows for p in pieces)))
        )
        joined = {"piece": keyed, "dups": repeated} | "Join" >> beam.CoGroupByKey()
    else:
        joined = keyed | "NoRepeats" >> beam.MapTuple(lambda i, p: (i, {"piece": [p], "dups": []}))
    return (
        joined
        | "Write" >> beam.ParDo(WritePiece(plan, url_col, caption_col))
        | "SplitSummary" >> beam.CombineGlobally(PlanSummary())
        | "WriteSplitSummary" >> beam.Map(_write_json(summary_path))
    )
