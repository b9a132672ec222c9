"""Beam transforms that number the kept samples in input order and write WebDataset shards.

Each shard is `{prefix}-{NNNNNN}.tar` (jpg, txt, json per key) with a sibling parquet of per-sample
stats, both written under temporary names and renamed, so readers never see half a shard.
"""

from __future__ import annotations

import json

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics

from vlforge.pipeline import storage
from vlforge.pipeline.dedup import ColumnReader, Marks, candidates
from vlforge.pipeline.mine_tar import end_of_archive, member_bytes
from vlforge.pipeline.work_plan import WorkPlan

# A fixed member mtime makes shards byte-identical across reruns of the same input. An integer:
# tarfile writes a float mtime as an extra 1 KiB pax header per member (3x the tar time).
_FIXED_MTIME = 1_700_000_000


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}"


class ChunkOffsets(beam.CombineFn):
    """(chunk, kept rows) → {chunk: kept rows in all earlier chunks}: one small dict of ints
    per chunk (not per row), so each chunk finds its first sample number in O(1)."""

    def create_accumulator(self) -> dict[int, int]:
        return {}

    def add_input(self, acc: dict[int, int], element: tuple[int, int]) -> dict[int, int]:
        chunk, kept = element
        acc[chunk] = kept
        return acc

    def merge_accumulators(self, accumulators) -> dict[int, int]:
        merged: dict[int, int] = {}
        for acc in accumulators:
            merged.update(acc)
        return merged

    def extract_output(self, acc: dict[int, int]) -> dict[int, int]:
        offsets, total = {}, 0
        for chunk in sorted(acc):
            offsets[chunk] = total
            total += acc[chunk]
        return offsets


def kept_shards(
    columns: dict[str, list], marks: Marks, first_sample: int, shard_size: int, prefix: str
) -> dict[int, str]:
    """{row id: shard} for a chunk's kept rows (ok, not marked), numbered in row-id order from
    the chunk's first sample number."""
    kept = sorted(columns["row_id"][i] for i in candidates(columns, marks))
    return {row: shard_name(prefix, (first_sample + n) // shard_size) for n, row in enumerate(kept)}


class AssignShards(beam.PTransform):
    """(chunk, marks) → (chunk, (marks, number of its first kept sample)), numbering kept rows
    by row id across all chunks; each chunk's rows are read (row id and status only) here and
    again by whoever needs their shards (`kept_shards`), never carried."""

    def __init__(self, read: ColumnReader):
        super().__init__()
        self.read = read

    def expand(self, batches):
        read = self.read

        def count(chunk, marks):
            return chunk, len(candidates(read(chunk, ["row_id", "status"]), marks))

        # Joined by chunk rather than read as a side input: on Beam's DaskRunner (2.78) a task
        # reading a side input keeps an open dask metrics context that records every task the
        # worker runs after it, so memory grew with chunks × tasks (~90 MB per worker at 100k
        # rows, measured).
        offsets = (
            batches
            | "Count" >> beam.MapTuple(count)
            | "Offsets" >> beam.CombineGlobally(ChunkOffsets())
            | "PerChunk" >> beam.FlatMap(lambda offsets_by_chunk: offsets_by_chunk.items())
        )

        def number(joined):
            chunk, grouped = joined
            (marks,), (first_sample,) = grouped["marks"], grouped["offset"]
            return chunk, (marks, first_sample)

        return (
            {"marks": batches, "offset": offsets}
            | "Join" >> beam.CoGroupByKey()
            | "Number" >> beam.Map(number)
        )


class ShardParts(beam.DoFn):
    """A numbered chunk → (shard name, (chunk, its kept row ids in that shard)), usually one or
    two: only row ids travel to the shard writer, which reads the rows from the checkpoint."""

    def __init__(self, read: ColumnReader, shard_size: int, prefix: str):
        self.read = read
        self.shard_size = shard_size
        self.prefix = prefix

    def process(self, element):
        chunk, (marks, first_sample) = element
        columns = self.read(chunk, ["row_id", "status"])
        parts: dict[str, list[int]] = {}
        shards = kept_shards(columns, marks, first_sample, self.shard_size, self.prefix)
        for row_id, shard in shards.items():
            parts.setdefault(shard, []).append(row_id)
        # As arrays: a shuffle of Python ints held ~36 bytes per kept row in the workers.
        for shard, row_ids in parts.items():
            yield shard, (chunk, np.array(row_ids, dtype=np.int64))


def sample_json(record: dict, extra: str) -> dict:
    """The `json` field of a sample: provenance, sizes, filter scores and the input's extra columns."""
    meta = {
        "key": record["key"],
        "url": record["url"],
        "source": record["source"],
        "row_id": record["row_id"],
        "status": record["status"],
        "http_status": record["http_status"],
        "final_url": record["final_url"],
        "original_width": record["original_width"],
        "original_height": record["original_height"],
        "width": record["width"],
        "height": record["height"],
        "sha256": record["sha256"],
        "phash": record["phash"],
        "language": record["language"],
        "language_score": record["language_score"],
    }
    meta.update(json.loads(extra or "{}"))
    return meta


STATS_FIELDS = [
    "key",
    "row_id",
    "url",
    "caption",
    "width",
    "height",
    "original_width",
    "original_height",
    "language",
    "language_score",
    "phash",
    "sha256",
]


def sample_members(key: str, jpg: bytes, caption: str, meta: dict) -> bytes:
    """One sample's tar members, as webdataset's TarWriter lays them out (fields sorted by name,
    its mode and owner, json as json.dumps). Built with mine_tar's ustar headers rather than
    through TarWriter: webdataset imports torch (~1.3 s in every process that writes a shard)
    and its tarfile path cost ~0.3 ms a sample."""
    return b"".join(
        (
            member_bytes(f"{key}.jpg", jpg, _FIXED_MTIME),
            member_bytes(f"{key}.json", json.dumps(meta).encode("utf-8"), _FIXED_MTIME),
            member_bytes(f"{key}.txt", caption.encode("utf-8"), _FIXED_MTIME),
        )
    )


class WriteShard(beam.DoFn):
    """(shard name, its parts: (chunk, row ids)) → tar + parquet, reading the rows and their
    image bytes back from the chunk checkpoints (kept rows are stored there as they are)."""

    def __init__(self, plan: WorkPlan, columns: list[str]):
        self.plan = plan
        self.columns = columns
        self.samples = Metrics.counter("write", "samples")
        self.shards = Metrics.counter("write", "shards")

    def process(self, element):
        name, parts = element
        records: list[dict] = []
        payload: dict[int, tuple[bytes, str]] = {}
        for chunk, row_ids in parts:
            wanted = set(row_ids.tolist())
            rows = storage.read_parquet(self.plan.fetched_path(chunk), self.columns).to_pylist()
            for row in rows:
                if row["row_id"] in wanted:
                    payload[row["row_id"]] = (row.pop("jpg"), row.pop("extra"))
                    records.append(row)
        records.sort(key=lambda r: r["row_id"])
        tar_path = storage.join(self.plan.out_dir, name + ".tar")
        with storage.atomic_writer(tar_path) as handle:
            written = 0
            for record in records:
                jpg, extra = payload[record["row_id"]]
                members = sample_members(
                    record["key"], jpg, record["caption"], sample_json(record, extra)
                )
                handle.write(members)
                written += len(members)
            handle.write(end_of_archive(written))
        stats = pa.Table.from_pylist([{f: r[f] for f in STATS_FIELDS} for r in records])
        storage.write_parquet(storage.join(self.plan.out_dir, name + ".parquet"), stats)
        self.samples.inc(len(records))
        self.shards.inc()
        size = sum(len(payload[r["row_id"]][0]) for r in records)
        yield {"shard": name, "samples": len(records), "image_bytes": size}
