"""`vlforge corpus`: URL lists → crawled, filtered, deduplicated WebDataset shards, on Beam.

The flow (each step a small transform in its own module), as two Beam pipelines:
  crawl:    chunks not yet done → CrawlChunk (fetch, check, resize, filter; one checkpoint each)
  assemble: every checkpoint → ReadChunkRecords → MarkExactDuplicates(image) →
            MarkNearDuplicates(phash) → MarkExactDuplicates(caption) → AssignShards →
            WriteShard → stats.parquet; then manifest.json and the summary.
The split lets a rerun skip the network entirely and lets the global steps run where moving
records is cheap, while the crawl spreads over worker processes or a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TextIO

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from vlforge.errors import UserError
from vlforge.pipeline import progress, storage
from vlforge.pipeline.beam_options import assemble_options, build_options, is_local
from vlforge.pipeline.crawl_stage import (
    CHECKPOINT_SCHEMA,
    RECORD_FIELDS,
    CrawlChunk,
    CrawlSettings,
    ReadChunkRecords,
)
from vlforge.pipeline.dedup import MarkExactDuplicates, MarkNearDuplicates
from vlforge.pipeline.filters import caption_key
from vlforge.pipeline.funnel import funnel_counts
from vlforge.pipeline.input_lists import read_rows
from vlforge.pipeline.redact import redact
from vlforge.pipeline.shard_writer import AssignShards, WriteShard
from vlforge.pipeline.work_plan import WorkPlan, normalize_rows, prepare
from vlforge.versions import package_versions

# One row per input row: the checkpoint's record columns (no image bytes, no raw extra
# columns) plus the shard a kept sample went to.
STATS_SCHEMA = pa.schema(
    [f for f in CHECKPOINT_SCHEMA if f.name in RECORD_FIELDS] + [pa.field("shard", pa.string())]
)


@dataclass
class CorpusConfig:
    urls: str
    out: str
    url_col: str = "url"
    caption_col: str = "caption"
    prefix: str = "corpus"
    shard_size: int = 10_000
    chunk_size: int = 1_000
    workers: int = 1
    crawl: CrawlSettings = field(default_factory=CrawlSettings)
    overwrite: bool = False
    beam_args: list[str] = field(default_factory=list)
    show_progress: bool = True


def _write_stats(records: list[dict], path: str) -> int:
    records = sorted(records, key=lambda r: r["row_id"])
    columns = {name: [r.get(name) for r in records] for name in STATS_SCHEMA.names}
    storage.write_parquet(path, pa.table(columns, schema=STATS_SCHEMA))
    return len(records)


def build_crawl(pipeline: beam.Pipeline, plan: WorkPlan, config: CorpusConfig, chunks: list[int]):
    """The network step: each chunk not yet checkpointed is fetched and written."""
    pending = pipeline | "Chunks" >> beam.Create(chunks)
    if len(chunks) > 1:  # lets multi-process and remote workers split the chunks among them
        pending = pending | "Spread" >> beam.Reshuffle()
    return pending | "Crawl" >> beam.ParDo(CrawlChunk(plan, config.crawl))


def build_assemble(pipeline: beam.Pipeline, plan: WorkPlan, config: CorpusConfig):
    """The cheap global steps, recomputed on every run from the checkpoints."""
    filters = config.crawl.filters
    records = (
        pipeline
        | "AllChunks" >> beam.Create(list(range(plan.n_chunks)))
        | "Records" >> beam.ParDo(ReadChunkRecords(plan))
    )
    if filters.dedup_images:
        records = records | MarkExactDuplicates(lambda r: r["sha256"], "duplicate_image")
    if filters.dedup_near_images:
        records = records | MarkNearDuplicates(filters.phash_max_distance)
    if filters.dedup_captions:
        records = records | MarkExactDuplicates(
            lambda r: caption_key(r["caption"]), "duplicate_caption"
        )
    kept, rest = records | "KeptOrNot" >> beam.Partition(
        lambda r, _n: 0 if r["status"] == "ok" else 1, 2
    )
    numbered = kept | "AssignShards" >> AssignShards(config.shard_size, config.prefix)
    written = (
        numbered
        | "GroupShard" >> beam.GroupByKey()
        | "WriteShard" >> beam.ParDo(WriteShard(plan, config.prefix))
    )
    stats_path = storage.join(config.out, "stats.parquet")
    _ = (
        (numbered | "Numbered" >> beam.Values(), rest)
        | "All" >> beam.Flatten()
        | "StatsList" >> beam.combiners.ToList()
        | "WriteStats" >> beam.Map(_write_stats, stats_path)
    )
    shards_path = storage.join(plan.work_dir, "shards.json")
    _ = (
        written
        | "ShardList" >> beam.combiners.ToList()
        | "WriteShardList" >> beam.Map(lambda shards: storage.write_json(shards_path, shards))
    )


@contextlib.contextmanager
def _worker_stderr_to(log_path: str | None) -> Iterator[TextIO]:
    """Send fd 2 (inherited by DirectRunner's worker processes, which log at INFO) to a file,
    keeping a handle on the real terminal for our own progress bar."""
    if log_path is None:
        yield sys.stderr
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        yield terminal
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        terminal.close()


class _Progress:
    """A tqdm bar fed by in-process DoFns, or by counting chunk checkpoints for remote workers."""

    def __init__(self, plan: WorkPlan, local: bool, enabled: bool, stream: TextIO):
        self.plan = plan
        self.bar = tqdm(
            total=plan.n_rows,
            unit="row",
            desc="crawl",
            disable=not enabled,
            mininterval=0.5,
            file=stream,
        )
        self.local = local
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Progress:
        progress.reset()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _rows(self) -> int:
        if self.local:
            return progress.rows_done()
        return min(self.plan.n_rows, len(self.plan.done_chunks()) * self.plan.chunk_size)

    def _poll(self) -> None:
        while not self._stop.wait(0.5 if self.local else 2.0):
            self.bar.update(self._rows() - self.bar.n)

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.bar.update(self._rows() - self.bar.n)
        self.bar.close()


def run_corpus(config: CorpusConfig) -> dict:
    """Run the whole corpus stage; returns the manifest it wrote."""
    started = time.time()
    options = build_options(config.beam_args, config.workers)
    if config.shard_size < 1 or config.chunk_size < 1:
        raise UserError("--shard-size and --chunk-size must be positive")
    rows = normalize_rows(read_rows(config.urls, config.url_col, config.caption_col))
    if rows.num_rows == 0:
        raise UserError(f"{config.urls}: the list has no rows")
    storage.makedirs(config.out)
    settings = {
        "fetch": asdict(config.crawl.fetch),
        "resize": asdict(config.crawl.resize),
        "filters": asdict(config.crawl.filters),
    }
    plan = prepare(config.out, rows, config.chunk_size, settings, config.overwrite)
    done_before = plan.done_chunks()
    planned = time.time()
    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    local = is_local(options)
    todo = sorted(set(range(plan.n_chunks)) - (set() if config.crawl.retry_failed else done_before))
    worker_log = (
        None if local or "://" in config.out else os.path.join(plan.work_dir, "workers.log")
    )
    results = []
    if todo:
        with (
            _worker_stderr_to(worker_log) as terminal,
            _Progress(plan, local, config.show_progress, terminal),
            beam.Pipeline(options=options) as crawl,
        ):
            build_crawl(crawl, plan, config, todo)
        results.append(crawl.result)
    crawled = time.time()
    # Dedup and sharding move only small records: on DirectRunner they run in this process,
    # where passing records between steps costs nothing (worker processes would pickle each).
    with beam.Pipeline(options=assemble_options(options)) as assemble:
        build_assemble(assemble, plan, config)
    results.append(assemble.result)
    finished = time.time()
    shards = storage.read_json(storage.join(plan.work_dir, "shards.json"))
    _remove_stale_shards(config, {s["shard"] for s in shards})
    stats = storage.read_parquet(storage.join(config.out, "stats.parquet"))
    manifest = _manifest(config, plan, stats, shards, results, len(done_before), len(todo))
    manifest["timings"] = {
        "plan_s": round(planned - started, 3),
        "crawl_s": round(crawled - planned, 3),
        "assemble_s": round(finished - crawled, 3),
        "total_s": round(time.time() - started, 3),
    }
    storage.write_json(storage.join(config.out, "manifest.json"), redact(manifest))
    return manifest


def _remove_stale_shards(config: CorpusConfig, current: set[str]) -> None:
    """A rerun may write fewer shards than before; leftovers would double-count samples."""
    for suffix in (".tar", ".parquet"):
        for path in storage.glob(storage.join(config.out, f"{config.prefix}-*{suffix}")):
            name = path.rsplit("/", 1)[-1][: -len(suffix)]
            if name not in current:
                storage.delete([path])


def _counter_values(results: list) -> dict[str, int]:
    counters = []
    for result in results:
        try:
            counters.extend(result.metrics().query()["counters"])
        except Exception:  # some runners report no metrics
            continue
    out: dict[str, int] = {}
    for counter in counters:
        name = f"{counter.key.metric.namespace}/{counter.key.metric.name}"
        out[name] = out.get(name, 0) + int(counter.committed or counter.attempted or 0)
    return dict(sorted(out.items()))


def _versions() -> dict[str, str]:
    return package_versions(
        "apache-beam", "webdataset", "img2dataset", "pyarrow", "imagehash", "py3langid"
    )


def _manifest(
    config, plan, stats: pa.Table, shards, results, reused_chunks: int, crawled_chunks: int
) -> dict:
    by_status = stats.group_by("status").aggregate([("row_id", "count")]).to_pylist()
    by_reason = stats.group_by(["status", "reason"]).aggregate([("row_id", "count")]).to_pylist()
    counters = _counter_values(results)
    return {
        "stage": "corpus",
        "config": {
            **{k: v for k, v in asdict(config).items() if k not in ("crawl",)},
            "crawl": asdict(config.crawl),
        },
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "cpus": _cpu_count()},
        "rows": stats.num_rows,
        "chunks": {"total": plan.n_chunks, "reused": reused_chunks, "crawled": crawled_chunks},
        "http_requests": counters.get("crawl/http_requests", 0),
        "status_counts": {r["status"]: r["row_id_count"] for r in by_status},
        "reason_counts": {
            f"{r['status']}:{r['reason'] or '-'}": r["row_id_count"] for r in by_reason
        },
        "funnel": funnel_counts(stats),
        "shards": sorted(shards, key=lambda s: s["shard"]),
        "samples": int(pc.sum(pc.equal(stats.column("status"), "ok")).as_py() or 0),
        "beam_counters": counters,
    }


def _cpu_count() -> int:
    return os.cpu_count() or 1
