"""Read URL lists (parquet, csv, tsv, jsonl; a file, a directory or a glob) in img2dataset's columns.

The launcher only inspects each file (`inspect_list`: the parquet footer, the CSV header, the first
JSON line, a digest of the head and tail); the rows are read by workers, one piece of a file at a
time (`iter_piece`, `iter_piece_urls`), so no process ever holds a whole list:
- parquet: a run of row groups, streamed in batches;
- jsonl: a byte range cut at line starts, one JSON object a line;
- csv/tsv: the whole file, streamed in blocks (a quoted field may hold a newline, so a byte offset
  alone cannot say where a row starts).
Every column is read as text; the extra columns are kept as JSON, a CSV value that reads as a
number written as that number (per value, so a row's JSON never depends on which rows share its
piece).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from vlforge.errors import UserError
from vlforge.pipeline import storage

FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
# Rows handed on at a time by the readers: bounds a worker's memory whatever the piece's size.
BATCH_ROWS = 4096
_DIGEST_BYTES = 64 * 1024
_CSV_BLOCK = 1 << 22
_INT = re.compile(r"[+-]?\d{1,18}")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


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


@dataclass(frozen=True)
class ListFile:
    """What the launcher knows of one list: metadata, never its rows."""

    path: str
    fmt: str
    size: int
    columns: tuple[str, ...]
    digest: str  # of the path, size, first and last 64 KiB: tells a changed list on a rerun
    row_groups: tuple[int, ...] = ()  # parquet: rows in each row group, from the footer


def _open(path: str):
    return FileSystems.open(path, compression_type=storage.RAW)


def _unreadable(path: str, fmt: str, err: Exception) -> UserError:
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return UserError(f"{path}: not a readable {fmt} list ({first})")


def _digest(path: str, size: int) -> str:
    digest = hashlib.sha256(f"{path}\x00{size}\x00".encode())
    with _open(path) as handle:
        digest.update(handle.read(_DIGEST_BYTES))
        if size > _DIGEST_BYTES:
            handle.seek(max(_DIGEST_BYTES, size - _DIGEST_BYTES))
            digest.update(handle.read(_DIGEST_BYTES))
    return digest.hexdigest()[:24]


def inspect_list(path: str, url_col: str = "url", caption_col: str = "caption") -> ListFile:
    """One list's format, size, columns and (parquet) row groups, reading only its metadata."""
    fmt = _format_of(path)
    try:
        size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
        digest = _digest(path, size)
    except Exception as err:
        raise UserError(f"{path}: cannot read ({type(err).__name__})") from err
    row_groups: tuple[int, ...] = ()
    try:
        with _open(path) as handle:
            if fmt == "parquet":
                meta = pq.ParquetFile(handle).metadata
                columns = tuple(meta.schema.to_arrow_schema().names)
                row_groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
            elif fmt in ("csv", "tsv"):
                reader = pacsv.open_csv(handle, **_csv_options(fmt, ()))
                columns = tuple(reader.schema.names)
            else:
                columns = tuple(_first_json_object(handle))
    except UserError:
        raise
    except (pa.ArrowInvalid, OSError, ValueError) as err:
        raise _unreadable(path, fmt, err) from err
    if size and not columns and fmt != "jsonl":
        raise UserError(f"{path}: not a readable {fmt} list (no columns)")
    if columns or fmt != "jsonl":  # an empty jsonl file has no rows, not a missing column
        for col, flag in ((url_col, "--url-col"), (caption_col, "--caption-col")):
            if col not in columns:
                have = ", ".join(columns[:8])
                raise UserError(f"{path}: no column {col!r} (set {flag}; columns: {have})")
    return ListFile(path, fmt, size, columns, digest, row_groups)


def _first_json_object(handle) -> dict:
    for raw in handle:
        if raw.strip():
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError("a line is not a JSON object")
            return value
    return {}


def _csv_options(fmt: str, columns: tuple[str, ...], only: tuple[str, ...] = ()) -> dict:
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in columns},
        strings_can_be_null=False,
        include_columns=list(only) or None,
    )
    return {
        "read_options": pacsv.ReadOptions(block_size=_CSV_BLOCK),
        "parse_options": pacsv.ParseOptions(
            delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True
        ),
        "convert_options": convert,
    }


@dataclass(frozen=True)
class Piece:
    """A part of one list that one worker reads start to end, and where its rows go.

    `n_rows` is -1 until counted (csv/tsv/jsonl); `first_row` is the global row id of its first
    row and `first_chunk` the work chunk its first row is written to (both -1 until known).
    """

    index: int
    path: str
    fmt: str
    columns: tuple[str, ...]
    n_rows: int = -1
    row_groups: tuple[int, int] = (0, 0)  # parquet: [start, stop)
    byte_range: tuple[int, int] = (0, 0)  # jsonl: [start, stop), cut at line starts once counted
    first_row: int = -1
    first_chunk: int = -1


def _csv_value(text: str):
    """A CSV field as JSON: numbers as numbers, the rest as text."""
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def _text(value) -> str:
    return "" if value is None else str(value)


def iter_piece(piece: Piece, url_col: str, caption_col: str) -> Iterator[list[tuple]]:
    """The piece's rows, in order, as batches of (url, caption, extra JSON)."""
    extra_cols = [c for c in piece.columns if c not in (url_col, caption_col)]
    if piece.fmt == "jsonl":
        rows = (
            (
                _text(obj.get(url_col)),
                _text(obj.get(caption_col)),
                json.dumps(
                    {k: v for k, v in obj.items() if k not in (url_col, caption_col)},
                    default=str,
                    ensure_ascii=False,
                ),
            )
            for obj in _json_objects(piece)
        )
        yield from _in_batches(rows)
        return
    convert = _csv_value if piece.fmt in ("csv", "tsv") else (lambda v: v)
    for table in _arrow_batches(piece, ()):
        urls = table.column(url_col).to_pylist()
        captions = table.column(caption_col).to_pylist()
        if extra_cols:
            rows = table.select(extra_cols).to_pylist()
            extras = [
                json.dumps(
                    {k: convert(v) if isinstance(v, str) else v for k, v in r.items()},
                    default=str,
                    ensure_ascii=False,
                )
                for r in rows
            ]
        else:
            extras = ["{}"] * len(urls)
        yield list(zip(map(_text, urls), map(_text, captions), extras, strict=True))


def iter_piece_urls(piece: Piece, url_col: str) -> Iterator[list[str]]:
    """Only the URL column of the piece's rows, in order (the duplicate-URL pass)."""
    if piece.fmt == "jsonl":
        yield from _in_batches(_text(obj.get(url_col)) for obj in _json_objects(piece))
        return
    for table in _arrow_batches(piece, (url_col,)):
        yield [_text(u) for u in table.column(url_col).to_pylist()]


def _in_batches(items: Iterator) -> Iterator[list]:
    """Consecutive lists of BATCH_ROWS items (the last one shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == BATCH_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch


def _arrow_batches(piece: Piece, only: tuple[str, ...]) -> Iterator[pa.Table]:
    with _open(piece.path) as handle:
        if piece.fmt == "parquet":
            start, stop = piece.row_groups
            if stop <= start:
                return
            batches = pq.ParquetFile(handle).iter_batches(
                batch_size=BATCH_ROWS, row_groups=range(start, stop), columns=list(only) or None
            )
            for batch in batches:
                yield pa.Table.from_batches([batch])
            return
        reader = pacsv.open_csv(handle, **_csv_options(piece.fmt, piece.columns, only))
        for batch in reader:
            yield pa.Table.from_batches([batch])


def _json_objects(piece: Piece) -> Iterator[dict]:
    start, stop = piece.byte_range
    with _open(piece.path) as handle:
        handle.seek(start)
        remaining = stop - start
        line_no = 0
        while remaining > 0:
            raw = handle.readline(remaining)
            if not raw:
                break
            remaining -= len(raw)
            line_no += 1
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except ValueError as err:
                raise ValueError(f"bad JSON at byte {stop - remaining - len(raw)}: {err}") from err
            if not isinstance(value, dict):
                raise ValueError(f"a line at byte {stop - remaining - len(raw)} is not an object")
            yield value


def count_piece(piece: Piece, url_col: str) -> Piece:
    """A csv/tsv/jsonl piece with its rows counted (and a jsonl range cut at line starts)."""
    from dataclasses import replace

    if piece.fmt == "parquet":
        return piece
    if piece.fmt == "jsonl":
        start, stop = _line_range(piece.path, *piece.byte_range)
        piece = replace(piece, byte_range=(start, stop))
        return replace(piece, n_rows=sum(1 for _ in _json_objects(piece)))
    n = sum(len(b) for b in iter_piece_urls(piece, url_col))
    return replace(piece, n_rows=n)


def _line_range(path: str, start: int, stop: int) -> tuple[int, int]:
    """[start, stop) moved to line starts: a line belongs to the range its first byte is in."""
    with _open(path) as handle:
        return _next_line_start(handle, start), _next_line_start(handle, stop)


def _next_line_start(handle, offset: int) -> int:
    """The first line start at or after `offset`."""
    if offset == 0:
        return 0
    handle.seek(offset - 1)
    line = handle.readline()  # ends at the newline at or after offset - 1 (or at the end)
    return offset - 1 + len(line)


def read_rows(spec: str, url_col: str = "url", caption_col: str = "caption") -> pa.Table:
    """All lists under `spec` as one table: `url`, `caption`, `extra` (other columns as JSON),
    `source`. For small lists (tests, tools); the corpus stage reads pieces in its workers."""
    from vlforge.pipeline.input_splits import plan_pieces

    columns: dict[str, list] = {"url": [], "caption": [], "extra": [], "source": []}
    files = [inspect_list(p, url_col, caption_col) for p in resolve_paths(spec)]
    for piece in plan_pieces(files, chunk_size=1):
        try:
            piece = count_piece(piece, url_col)
            batches = list(iter_piece(piece, url_col, caption_col))
        except (pa.ArrowInvalid, OSError, ValueError) as err:
            raise _unreadable(piece.path, piece.fmt, err) from err
        for batch in batches:
            for url, caption, extra in batch:
                columns["url"].append(url)
                columns["caption"].append(caption)
                columns["extra"].append(extra)
                columns["source"].append(piece.path)
    return pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()})


def unreadable_message(piece: Piece, err: Exception) -> str:
    """The one-line error a worker reports for a piece it cannot read."""
    return str(_unreadable(piece.path, piece.fmt, err))
