"""Beam transforms that number the kept samples in input order and write WebDataset shards.

Each shard is `{prefix}-{NNNNNN}.tar` (jpg, txt, json per key) with a sibling parquet of per-sample
stats, both written under temporary names and renamed, so readers never see half a shard.
"""

from __future__ import annotations

import json
from collections import defaultdict

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


class AssignShards(beam.PTransform):
    """Kept records → (shard index, record), numbering them by row id across all chunks.

    Counts per chunk go through a small side input, so no step ever holds every record at once.
    """

    def __init__(self, shard_size: int, prefix: str):
        super().__init__()
        self.shard_size = shard_size
        self.prefix = prefix

    def expand(self, kept):
        by_chunk = (
            kept
            | "ByChunk" >> beam.Map(lambda r: (r["chunk"], r))
            | "GroupChunk" >> beam.GroupByKey()
        )
        counts = by_chunk | "Count" >> beam.MapTuple(lambda chunk, rows: (chunk, len(list(rows))))
        shard_size, prefix = self.shard_size, self.prefix

        def number(element, counts_by_chunk):
            chunk, rows = element
            offset = sum(n for c, n in counts_by_chunk.items() if c < chunk)
            for i, record in enumerate(sorted(rows, key=lambda r: r["row_id"])):
                shard = (offset + i) // shard_size
                yield shard, {**record, "shard": shard_name(prefix, shard)}

        return by_chunk | "Number" >> beam.FlatMap(number, beam.pvalue.AsDict(counts))


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
    """(shard index, records) → tar + parquet, reading image bytes back from the checkpoints."""

    def __init__(self, plan: WorkPlan, prefix: str):
        self.plan = plan
        self.prefix = prefix
        self.samples = Metrics.counter("write", "samples")
        self.shards = Metrics.counter("write", "shards")

    def process(self, element):
        index, records = element
        records = sorted(records, key=lambda r: r["row_id"])
        wanted: dict[int, set[int]] = defaultdict(set)
        for record in records:
            wanted[record["chunk"]].add(record["row_id"])
        payload: dict[int, tuple[bytes, str]] = {}
        for chunk, row_ids in wanted.items():
            table = storage.read_parquet(self.plan.fetched_path(chunk), ["row_id", "jpg", "extra"])
            for row_id, jpg, extra in zip(
                table.column("row_id").to_pylist(),
                table.column("jpg").to_pylist(),
                table.column("extra").to_pylist(),
                strict=True,
            ):
                if row_id in row_ids:
                    payload[row_id] = (jpg, extra)
        name = shard_name(self.prefix, index)
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
