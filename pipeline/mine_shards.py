"""Shard I/O for mining: listing and checking shards, and writing them back with mine.json added.

The writer copies the input tar's bytes unchanged (positions from mine_tar's index), so every
earlier field survives a mining pass bit for bit. read_samples (webdataset's tar iterators, no
decoders: its defaults unpickle) is for readers of mined shards: the evaluation and tests.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Collection, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems

from vlforge.errors import UserError
from vlforge.pipeline import storage
from vlforge.pipeline.mine_tar import BLOCK, SampleIndex, end_of_archive, member_bytes

# Same fixed member mtime as the corpus writer: reruns give byte-identical shards.
_FIXED_MTIME = 1_700_000_000.0
MINE_FIELD = "mine.json"


def list_shards(source: str) -> list[str]:
    """--in as a directory, a glob or one .tar → sorted shard paths; a UserError if none."""
    if source.endswith(".tar") and not any(c in source for c in "*?["):
        found = [source] if storage.exists(source) else []
    elif any(c in source for c in "*?["):
        found = [p for p in storage.glob(source) if p.endswith(".tar")]
    else:
        found = storage.glob(storage.join(source, "*.tar"))
    found = [p for p in found if not p.rsplit("/", 1)[-1].startswith(".tmp-")]
    if not found:
        raise UserError(f"{source}: no .tar shards found")
    return found


def read_samples(path: str) -> Iterator[dict]:
    """{"__key__": str, ext: bytes, ...} per sample, in the tar's order."""
    import webdataset as wds  # here: it imports torch (seconds), and the stage never reads

    try:
        with FileSystems.open(path, compression_type=storage.RAW) as handle:
            stream = io.BytesIO(handle.read())
        members = ({**m, "__url__": path} for m in wds.tariterators.tar_file_iterator(stream))
        for sample in wds.tariterators.group_by_keys(members):
            yield {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
    except (OSError, ValueError, tarfile.TarError) as err:
        raise UserError(f"{path}: not a readable WebDataset shard ({err})") from err


def check_shard(path: str) -> None:
    """Fail before the pipeline starts if a shard's first header is not a tar header."""
    try:
        with FileSystems.open(path, compression_type=storage.RAW) as handle:
            head = handle.read(1024 * 64)
        with tarfile.open(fileobj=io.BytesIO(head), mode="r|*") as tar:
            tar.next()
    except (OSError, ValueError, tarfile.TarError) as err:
        if isinstance(err, tarfile.ReadError) and "unexpected end" in str(err):
            return  # a member larger than the probe: the header itself was fine
        raise UserError(f"{path}: not a readable WebDataset shard ({err})") from err


def output_path(shard: str, out_dir: str) -> str:
    return storage.join(out_dir, shard.rsplit("/", 1)[-1])


def write_mined_tar(
    target: str,
    data: bytes,
    index: SampleIndex,
    payloads: dict[int, bytes],
    field: str,
    drop: Collection[int] = (),
) -> None:
    """The input tar's bytes, unchanged, with a `field` member after each sample in `payloads`.

    `payloads` maps a sample's position in `index` to its new member's bytes. A sample that
    already has `field` (a shard mined before) has the old member left out, not duplicated.
    Samples whose positions are in `drop` are left out whole (every member of theirs).
    """
    view = memoryview(data)
    with storage.atomic_writer(target) as handle:
        cursor = written = 0
        for i in sorted(set(payloads) | set(drop)):
            if i in drop:
                start = int(index.start[i])
                handle.write(view[cursor:start])
                written += start - cursor
                cursor = int(index.end[i])
                continue
            old = index.fields[i].get(field)
            if old is not None:
                body, size, header = old
                handle.write(view[cursor:header])
                written += header - cursor
                cursor = body + -(-size // BLOCK) * BLOCK
            end = int(index.end[i])
            member = member_bytes(f"{index.keys[i]}.{field}", payloads[i], _FIXED_MTIME)
            handle.write(view[cursor:end])
            handle.write(member)
            written += end - cursor + len(member)
            cursor = end
        handle.write(view[cursor : index.data_end])
        written += index.data_end - cursor
        handle.write(end_of_archive(written))


def write_stats(
    shard: str,
    target: str,
    keys: list[str],
    rows: np.ndarray,
    mines: list[dict],
    drop: Collection[int] = (),
) -> list[dict]:
    """The sibling parquet, with the mining counts joined on as columns; returns the counts.

    Samples at positions in `drop` (left out of the tar) lose their parquet rows too.
    """
    mined = dict(zip(rows.tolist(), mines, strict=True))
    counts = [_counts(key, mined.get(i)) for i, key in enumerate(keys) if i not in drop]
    source = shard[: -len(".tar")] + ".parquet"
    dest = target[: -len(".tar")] + ".parquet"
    if storage.exists(source):
        table = storage.read_parquet(source)
        if drop and "key" in table.column_names:
            gone = pa.array(sorted({keys[i] for i in drop}), table.schema.field("key").type)
            table = table.filter(pc.invert(pc.is_in(table.column("key"), value_set=gone)))
        if "key" in table.column_names and table.num_rows:
            by_key = {c["key"]: c for c in counts}
            for name in ("n_hard_negatives", "n_positives", "n_image_positives", "n_rewrites"):
                values = [by_key.get(k, {}).get(name, 0) for k in table.column("key").to_pylist()]
                if name in table.column_names:
                    table = table.drop_columns([name])
                table = table.append_column(name, pa.array(values, pa.int32()))
            storage.write_parquet(dest, table)
            return counts
    storage.write_parquet(dest, pa.Table.from_pylist(counts) if counts else pa.table({}))
    return counts


def _counts(key: str, mine: dict | None) -> dict:
    mine = mine or {}
    return {
        "key": key,
        "n_hard_negatives": len(mine.get("hard_negatives", [])),
        "n_positives": len(mine.get("positives", [])),
        "n_image_positives": len(mine.get("image_positives", [])),
        "n_rewrites": len(mine.get("rewrites", [])),
    }
