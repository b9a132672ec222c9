"""Paths through Beam FileSystems (local, gs://, s3://) with writes that appear atomically.

Every file a reader may see is written under a temporary name in the same directory and renamed
into place, so an interrupted run never leaves a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

RAW = CompressionTypes.UNCOMPRESSED


def join(base: str, *parts: str) -> str:
    return FileSystems.join(base, *parts)


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def makedirs(path: str) -> None:
    if not FileSystems.exists(path):
        with contextlib.suppress(OSError):  # object stores have no directories
            FileSystems.mkdirs(path)


def glob(pattern: str) -> list[str]:
    """Sorted paths matching a glob; [] when nothing matches."""
    try:
        result = FileSystems.match([pattern])[0]
    except Exception:  # BeamIOError for a missing directory
        return []
    return sorted(m.path for m in result.metadata_list)


def delete(paths: list[str]) -> None:
    if paths:
        FileSystems.delete(paths)


def delete_tree(path: str) -> None:
    """Delete a directory and everything under it; nothing when it is not there."""
    if "://" not in path:
        shutil.rmtree(path, ignore_errors=True)
        return
    delete(glob(join(path, "**")))  # object stores: every key under the prefix


def read_bytes(path: str) -> bytes:
    with FileSystems.open(path, compression_type=RAW) as handle:
        return handle.read()


@contextlib.contextmanager
def atomic_writer(path: str) -> Iterator[BinaryIO]:
    """Yield a stream to a temporary sibling; rename onto `path` only if the block succeeds."""
    directory, name = path.rsplit("/", 1) if "/" in path else (".", path)
    tmp = join(directory, f".tmp-{uuid.uuid4().hex[:12]}-{name}")
    handle = FileSystems.create(tmp, compression_type=RAW)
    try:
        yield handle
        handle.close()
    except BaseException:
        handle.close()
        with contextlib.suppress(Exception):
            FileSystems.delete([tmp])
        raise
    if "://" not in path:
        os.replace(tmp, path)  # atomic on POSIX, even over an existing file
        return
    if FileSystems.exists(path):
        FileSystems.delete([path])  # object stores cannot rename onto an existing key
    FileSystems.rename([tmp], [path])


def write_bytes(path: str, data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def write_parquet(path: str, table: pa.Table, uncompressed: tuple[str, ...] = ()) -> None:
    """zstd for every column except `uncompressed` ones (JPEG bytes do not shrink further)."""
    buffer = io.BytesIO()
    codec = {name: ("none" if name in uncompressed else "zstd") for name in table.column_names}
    pq.write_table(table, buffer, compression=codec)
    write_bytes(path, buffer.getvalue())


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    with FileSystems.open(path, compression_type=RAW) as handle:
        return pq.read_table(io.BytesIO(handle.read()), columns=columns)
