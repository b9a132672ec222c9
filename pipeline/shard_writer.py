"""Beam transforms that number the kept samples in input order and write WebDataset shards.

Each shard is `{prefix}-{NNNNNN}.tar` (jpg, txt, json per key) with a sibling parquet of per-sample
stats, both written under temporary names and renamed, so readers never see half a shard.
"""

from __future__ import annotations

import json

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics

from vlforge.pipeline import storage
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


class AssignShards(beam.PTransform):
    """Record batches (chunk, records) → the same batches, each kept record given the `shard`
    it goes to, numbering kept records by row id across all chunks."""

    def __init__(self, shard_size: int, prefix: str):
        super().__init__()
        self.shard_size = shard_size
        self.prefix = prefix

    def expand(self, batches):
        offsets = (
            batches
            | "Count"
            >> beam.MapTuple(
                lambda chunk, records: (chunk, sum(r["status"] == "ok" for r in records))
            )
            | "Offsets" >> beam.CombineGlobally(ChunkOffsets())
        )
        shard_size, prefix = self.shard_size, self.prefix

        def number(element, offsets_by_chunk):
            chunk, records = element
            index = offsets_by_chunk[chunk]
            numbered = []
            for record in sorted(records, key=lambda r: r["row_id"]):
                if record["status"] == "ok":
                    record = {**record, "shard": shard_name(prefix, index // shard_size)}
                    index += 1
                numbered.append(record)
            return chunk, numbered

        return batches | "Number" >> beam.Map(number, beam.pvalue.AsSingleton(offsets))


def shard_parts(batch: tuple) -> list[tuple[str, tuple[int, list[int]]]]:
    """A numbered batch → (shard name, (chunk, its kept row ids in that shard)), usually one or
    two: only row ids travel to the shard writer, which reads the rows from the checkpoint."""
    chunk, records = batch
    parts: dict[str, list[int]] = {}
    for record in records:
        if record.get("shard"):
            parts.setdefault(record["shard"], []).append(record["row_id"])
    return [(shard, (chunk, row_ids)) for shard, row_ids in parts.items()]


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
            wanted = set(row_ids)
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
