"""Read URL lists (parquet, csv, tsv, jsonl; a file, a directory or a glob) in img2dataset's columns."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from vlforge.errors import UserError
from vlforge.pipeline import storage

FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def _format_of(path: str) -> str:
    for suffix, fmt in FORMATS.items():
        if path.lower().endswith(suffix):
            return fmt
    raise UserError(f"{path}: unknown list format (use .parquet, .csv, .tsv or .jsonl)")


def resolve_paths(spec: str) -> list[str]:
    """A file, a directory (every list inside) or a glob, as a sorted list of files."""
    if any(ch in spec for ch in "*?["):
        paths = storage.glob(spec)
    elif storage.exists(spec) and not _looks_like_file(spec):
        paths = [p for p in storage.glob(storage.join(spec, "*")) if _has_list_suffix(p)]
    elif storage.exists(spec):
        paths = [spec]
    else:
        raise UserError(f"{spec}: no such file or directory")
    paths = [p for p in paths if _has_list_suffix(p)]
    if not paths:
        raise UserError(f"{spec}: no .parquet/.csv/.tsv/.jsonl lists found")
    return paths


def _has_list_suffix(path: str) -> bool:
    return any(path.lower().endswith(s) for s in FORMATS)


def _looks_like_file(path: str) -> bool:
    return _has_list_suffix(path)


def read_table(path: str) -> pa.Table:
    fmt = _format_of(path)
    try:
        data = storage.read_bytes(path)
    except Exception as err:
        raise UserError(f"{path}: cannot read ({type(err).__name__})") from err
    try:
        if fmt == "parquet":
            return pq.read_table(io.BytesIO(data))
        if fmt in ("csv", "tsv"):
            return pacsv.read_csv(
                io.BytesIO(data),
                parse_options=pacsv.ParseOptions(
                    delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True
                ),
                convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
            )
        return pajson.read_json(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable {fmt} list ({first})") from err


def read_rows(spec: str, url_col: str = "url", caption_col: str = "caption") -> pa.Table:
    """All lists under `spec` as one table: `url`, `caption`, `extra` (other columns as JSON)."""
    parts = []
    for path in resolve_paths(spec):
        table = read_table(path)
        for col, flag in ((url_col, "--url-col"), (caption_col, "--caption-col")):
            if col not in table.column_names:
                have = ", ".join(table.column_names[:8])
                raise UserError(f"{path}: no column {col!r} (set {flag}; columns: {have})")
        extra_cols = [c for c in table.column_names if c not in (url_col, caption_col)]
        extras = table.select(extra_cols).to_pylist() if extra_cols else [{}] * table.num_rows
        parts.append(
            pa.table(
                {
                    "url": _as_strings(table.column(url_col)),
                    "caption": _as_strings(table.column(caption_col)),
                    "extra": pa.array(
                        [json.dumps(e, default=str, ensure_ascii=False) for e in extras],
                        pa.string(),
                    ),
                    "source": pa.array([path] * table.num_rows, pa.string()),
                }
            )
        )
    return pa.concat_tables(parts)


def _as_strings(column: pa.ChunkedArray) -> pa.Array:
    values = column.to_pylist()
    return pa.array(["" if v is None else str(v) for v in values], pa.string())
