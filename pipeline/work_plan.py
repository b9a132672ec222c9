"""The run's work directory: input split into chunks, and per-chunk crawl checkpoints.

Layout under `OUT/_work/`: `plan.json` (fingerprint of the input and of the settings that shape
crawl results), `input/chunk-N.parquet` (normalized rows), `fetched/chunk-N.parquet` (crawl results
with image bytes). A chunk is done exactly when its fetched file exists: that is what lets a rerun
resume where it stopped, and a rerun after completion make no request at all.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa

from vlforge.errors import UserError
from vlforge.pipeline import storage
from vlforge.pipeline.filters import normalize_caption
from vlforge.pipeline.urls import normalize_url, sample_key


@dataclass(frozen=True)
class WorkPlan:
    out_dir: str
    n_rows: int
    chunk_size: int
    n_chunks: int

    @property
    def work_dir(self) -> str:
        return storage.join(self.out_dir, "_work")

    def input_path(self, chunk: int) -> str:
        return storage.join(self.work_dir, "input", f"chunk-{chunk:06d}.parquet")

    def fetched_path(self, chunk: int) -> str:
        return storage.join(self.work_dir, "fetched", f"chunk-{chunk:06d}.parquet")

    def done_chunks(self) -> set[int]:
        done = storage.glob(storage.join(self.work_dir, "fetched", "chunk-*.parquet"))
        return {int(p.rsplit("chunk-", 1)[1].split(".")[0]) for p in done}


def normalize_rows(table: pa.Table) -> pa.Table:
    """Add row_id, normalized URL and caption, key, and mark repeated URLs (first one wins)."""
    urls = table.column("url").to_pylist()
    captions = [normalize_caption(c) for c in table.column("caption").to_pylist()]
    normalized = [normalize_url(u) for u in urls]
    first_seen: dict[str, int] = {}
    dup_of = []
    for i, url in enumerate(normalized):
        first = first_seen.setdefault(url, i)
        dup_of.append(first if first != i else -1)
    return pa.table(
        {
            "row_id": pa.array(range(len(urls)), pa.int64()),
            "url": pa.array(urls, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "key": pa.array([sample_key(u) for u in normalized], pa.string()),
            "dup_of": pa.array(dup_of, pa.int64()),
            "extra": table.column("extra"),
            "source": table.column("source"),
        }
    )


def fingerprint(rows: pa.Table, settings: dict) -> str:
    digest = hashlib.sha256()
    for column in ("url", "caption", "extra"):
        for value in rows.column(column).to_pylist():
            digest.update(value.encode("utf-8", "surrogatepass") + b"\x00")
    digest.update(repr(sorted(settings.items())).encode())
    return digest.hexdigest()[:24]


def prepare(
    out_dir: str, rows: pa.Table, chunk_size: int, settings: dict, overwrite: bool
) -> WorkPlan:
    """Write the chunked input once; on a rerun check it is the same input and settings."""
    plan = WorkPlan(out_dir, rows.num_rows, chunk_size, -(-rows.num_rows // chunk_size))
    plan_path = storage.join(plan.work_dir, "plan.json")
    print_fp = fingerprint(rows, {**settings, "chunk_size": chunk_size})
    if storage.exists(plan_path) and not overwrite:
        previous = storage.read_json(plan_path)
        if previous.get("fingerprint") == print_fp:
            return plan
        else:
            raise UserError(
                f"{out_dir} holds a run of a different list or different settings; "
                "use another --out or pass --overwrite to start it again"
            )
    if overwrite:
        stale = storage.glob(storage.join(plan.work_dir, "*", "chunk-*.parquet"))
        storage.delete(stale)
    for sub in ("input", "fetched"):
        storage.makedirs(storage.join(plan.work_dir, sub))
    for chunk in range(plan.n_chunks):
        piece = rows.slice(chunk * chunk_size, chunk_size)
        storage.write_parquet(plan.input_path(chunk), piece)
    storage.write_json(
        plan_path,
        {
            "fingerprint": print_fp,
            "n_rows": plan.n_rows,
            "chunk_size": chunk_size,
            "settings": settings,
        },
    )
    return plan
