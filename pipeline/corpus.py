"""`vlforge corpus`: URL lists → crawled, filtered, deduplicated WebDataset shards, on Beam.

The flow (each step a small transform in its own module), as Beam pipelines:
  plan:     (first run only) the workers read the lists piece by piece, mark repeated URLs by a
            keyed min-combiner and write the work chunks (pipeline/plan_stage.py); the launcher
            knows only the lists' metadata (pipeline/input_splits.py)
  crawl:    chunks not yet done → CrawlChunk (fetch, check, resize, filter; one checkpoint each)
  assemble: every chunk, as (chunk, marks) → MarkExactDuplicates(image) →
            MarkNearDuplicates(phash) → MarkExactDuplicates(caption) → AssignShards →
            WriteShard, and stats.parquet/ (a dataset: one part per chunk, by the workers);
            each step reads the checkpoint columns it needs (CheckpointColumns);
            then manifest.json and the summary from one small run summary.
The split lets a rerun skip the network entirely and lets the global steps run where moving
records is cheap, while the crawl spreads over worker processes or a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import TextIO

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import StandardOptions
from tqdm import tqdm

from vlforge.errors import UserError
from vlforge.pipeline import progress, storage
from vlforge.pipeline.beam_options import assemble_options, build_options, is_local
from vlforge.pipeline.crawl_stage import (
    CHECKPOINT_SCHEMA,
    RECORD_FIELDS,
    CheckpointColumns,
    CrawlChunk,
    CrawlSettings,
)
from vlforge.pipeline.dask_fixes import close_client, spread
from vlforge.pipeline.dedup import MarkExactDuplicates, MarkNearDuplicates, apply_marks
from vlforge.pipeline.filters import caption_key
from vlforge.pipeline.funnel import funnel_counts
from vlforge.pipeline.input_lists import inspect_list, resolve_paths
from vlforge.pipeline.key_batches import bucket_count
from vlforge.pipeline.redact import redact
from vlforge.pipeline.shard_writer import AssignShards, ShardParts, WriteShard, kept_shards
from vlforge.pipeline.stats_dataset import STATS_NAME, part_name, stats_parts
from vlforge.pipeline.work_plan import InputSpec, WorkPlan, prepare
from vlforge.versions import package_versions

# One row per input row: the checkpoint's record columns (no image bytes, no raw extra
# columns) plus the shard a kept sample went to.
STATS_SCHEMA = pa.schema(
    [f for f in CHECKPOINT_SCHEMA if f.name in RECORD_FIELDS] + [pa.field("shard", pa.string())]
)
# Rows per partition of the assemble on runners that take a partition count (DaskRunner): its
# elements are a chunk's marks and keys (tens of bytes a row), and every partition is a task
# per step and shuffle stage; one per chunk made the task bookkeeping, not the rows, most of
# the workers' memory and time.
ASSEMBLE_PARTITION_ROWS = 50_000
# Runners whose workers never share the launcher's disk: a local --out cannot work there.
REMOTE_ONLY_RUNNERS = ("DataflowRunner", "Flink", "Spark", "PortableRunner", "Prism")


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


class WriteStatsPart(beam.DoFn):
    """(chunk, (marks, its first sample number)) → one part of the stats dataset (the
    checkpoint's rows with their final status, reason, detail and shard); yields its (status,
    reason) counts.

    Each worker writes the parts of the chunks it holds, in parallel; parts go to a staging
    directory first and reach OUT/stats.parquet/ only when the whole run is done.
    """

    def __init__(self, plan: WorkPlan, staging: str, shard_size: int, prefix: str):
        self.plan = plan
        self.staging = staging
        self.shard_size = shard_size
        self.prefix = prefix

    def process(self, element):
        chunk, (marks, first_sample) = element
        records = storage.read_parquet(self.plan.fetched_path(chunk), RECORD_FIELDS).to_pylist()
        columns = {name: [r[name] for r in records] for name in ("row_id", "status")}
        shards = kept_shards(columns, marks, first_sample, self.shard_size, self.prefix)
        records = apply_marks(records, marks)
        records.sort(key=lambda r: r["row_id"])
        table = {name: [r.get(name) for r in records] for name in STATS_SCHEMA.names}
        table["shard"] = [shards.get(r["row_id"]) for r in records]
        path = storage.join(self.staging, part_name(chunk))
        storage.write_parquet(path, pa.table(table, schema=STATS_SCHEMA))
        counts = Counter((r["status"], r["reason"] or "") for r in records)
        # One counter update per (status, reason) and chunk: one per row cost more than the row.
        for (status, reason), n in counts.items():
            Metrics.counter("status", f"{status}:{reason or '-'}").inc(n)
        yield {"counts": sorted(counts.items())}


class RunSummary(beam.CombineFn):
    """Shard descriptions and status counts → one small summary (the launcher's only input)."""

    def create_accumulator(self) -> dict:
        return {"shards": [], "counts": {}, "requests": 0}

    def add_input(self, acc: dict, element: dict) -> dict:
        if "shard" in element:
            acc["shards"].append(element)
        for pair, n in element.get("counts", ()):
            acc["counts"][tuple(pair)] = acc["counts"].get(tuple(pair), 0) + n
        acc["requests"] += element.get("requests", 0)
        return acc

    def merge_accumulators(self, accumulators) -> dict:
        merged = self.create_accumulator()
        for acc in accumulators:
            merged["shards"].extend(acc["shards"])
            merged["requests"] += acc["requests"]
            for pair, n in acc["counts"].items():
                merged["counts"][pair] = merged["counts"].get(pair, 0) + n
        return merged

    def extract_output(self, acc: dict) -> dict:
        return {
            "shards": sorted(acc["shards"], key=lambda s: s["shard"]),
            "counts": sorted([status, reason, n] for (status, reason), n in acc["counts"].items()),
            "requests": acc["requests"],
        }


def _write_summary(path: str):
    def write(summary: dict) -> str:
        storage.write_json(path, summary)
        return path

    return write


def build_crawl(pipeline: beam.Pipeline, plan: WorkPlan, config: CorpusConfig, chunks: list[int]):
    """The network step: each chunk not yet checkpointed is fetched and written.

    Ends in one small summary file (HTTP requests made, counted from the DoFn's outputs): some
    runners (DaskRunner) report no Beam metrics, and every runner can write a file.
    """
    pending = pipeline | "Chunks" >> beam.Create(chunks)
    if len(chunks) > 1:  # lets multi-process and remote workers split the chunks among them
        pending = pending | "Spread" >> beam.Reshuffle()
    return (
        pending
        | "Crawl" >> beam.ParDo(CrawlChunk(plan, config.crawl))
        | "CrawlSummary" >> beam.CombineGlobally(RunSummary()).without_defaults()
        | "WriteCrawlSummary" >> beam.Map(_write_summary(_crawl_summary_path(plan)))
    )


def _crawl_summary_path(plan: WorkPlan) -> str:
    return storage.join(plan.work_dir, "crawl-summary.json")


def _stats_staging(plan: WorkPlan) -> str:
    return storage.join(plan.work_dir, "stats")


def build_assemble(pipeline: beam.Pipeline, plan: WorkPlan, config: CorpusConfig):
    """The cheap global steps, recomputed on every run from the checkpoints.

    One sink at the end (the run summary), every branch feeding it: Beam's DaskRunner (2.78)
    computes only the graph's last transform, so a branch that ends elsewhere would never run.
    Only each chunk's marks move from step to step; every step reads the columns it needs
    from the chunk checkpoints (pipeline/dedup.py says why), and only dedup keys are spread
    over buckets.
    """
    filters = config.crawl.filters
    buckets = bucket_count(plan.n_rows)
    read = CheckpointColumns(plan)
    batches = pipeline | "AllChunks" >> beam.Create([(c, {}) for c in range(plan.n_chunks)])
    if filters.dedup_images:
        batches = batches | MarkExactDuplicates(read, "sha256", "duplicate_image", buckets)
    if filters.dedup_near_images:
        batches = batches | MarkNearDuplicates(read, filters.phash_max_distance, buckets=buckets)
    if filters.dedup_captions:
        batches = batches | MarkExactDuplicates(
            read, "caption", "duplicate_caption", buckets, key_fn=caption_key
        )
    numbered = batches | "AssignShards" >> AssignShards(read)
    # Only (chunk, row ids) go through this shuffle: WriteShard reads the rows and their image
    # bytes back from the chunk checkpoints itself.
    written = (
        numbered
        | "ShardParts" >> beam.ParDo(ShardParts(read, config.shard_size, config.prefix))
        | "GroupShard" >> beam.GroupByKey()
        | "WriteShard" >> beam.ParDo(WriteShard(plan, [*RECORD_FIELDS, "jpg", "extra"]))
    )
    parts = numbered | "WriteStats" >> beam.ParDo(
        WriteStatsPart(plan, _stats_staging(plan), config.shard_size, config.prefix)
    )
    summary_path = storage.join(plan.work_dir, "assemble-summary.json")
    return (
        (written, parts)
        | "Outputs" >> beam.Flatten()
        | "Summary" >> beam.CombineGlobally(RunSummary())
        | "WriteSummary" >> beam.Map(_write_summary(summary_path))
    )


def _publish_stats(plan: WorkPlan, out: str) -> None:
    """Move the staged parts to OUT/stats.parquet/, replacing an earlier run's stats whole."""
    staging, final = _stats_staging(plan), storage.join(out, STATS_NAME)
    if "://" not in out:
        if os.path.isdir(final):
            shutil.rmtree(final)
        elif os.path.exists(final):  # an older version's single file
            os.remove(final)
        os.replace(staging, final)  # one rename: readers see all parts or the old ones
        return
    storage.delete(storage.glob(storage.join(final, "*")))
    parts = stats_parts(staging)
    FileSystems.rename(parts, [storage.join(final, p.rsplit("/", 1)[1]) for p in parts])


def _check_out(config: CorpusConfig, options) -> str:
    """A relative local --out is made absolute: workers in other processes have other working
    directories. A local --out is refused where workers cannot share this machine's disk."""
    out = config.out
    if "://" in out:
        return out
    runner = options.view_as(StandardOptions).runner or ""
    if any(name in runner for name in REMOTE_ONLY_RUNNERS):
        raise UserError(
            f"--out {out}: a local path cannot be written by {runner} workers on other "
            "machines; use gs:// or s3://"
        )
    return os.path.abspath(out)


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
    config = replace(config, out=_check_out(config, options))
    # Metadata only (footers, headers, digests): the rows are read by the workers.
    files = [
        inspect_list(path, config.url_col, config.caption_col)
        for path in resolve_paths(config.urls)
    ]
    spec = InputSpec(
        config.urls, files, config.url_col, config.caption_col, config.crawl.filters.dedup_urls
    )
    settings = {
        "fetch": asdict(config.crawl.fetch),
        "resize": asdict(config.crawl.resize),
        "filters": asdict(config.crawl.filters),
    }
    logging.getLogger("apache_beam").setLevel(logging.ERROR)

    def run_plan(build, items: int) -> None:
        # Like the assemble step: in this process on DirectRunner, on the cluster elsewhere.
        _run(spread(assemble_options(options), items), build)

    plan = prepare(config.out, spec, config.chunk_size, settings, config.overwrite, run_plan)
    done_before = plan.done_chunks()
    planned = time.time()
    local = is_local(options)
    todo = sorted(set(range(plan.n_chunks)) - (set() if config.crawl.retry_failed else done_before))
    worker_log = (
        None if local or "://" in config.out else os.path.join(plan.work_dir, "workers.log")
    )
    results = []
    requests = 0
    if todo:
        storage.delete(storage.glob(_crawl_summary_path(plan)))
        with (
            _worker_stderr_to(worker_log) as terminal,
            _Progress(plan, local, config.show_progress, terminal),
        ):
            results.append(
                _run(spread(options, len(todo)), lambda p: build_crawl(p, plan, config, todo))
            )
        if storage.exists(_crawl_summary_path(plan)):  # absent when no chunk had work left
            requests = storage.read_json(_crawl_summary_path(plan))["requests"]
    crawled = time.time()
    # Dedup and sharding move only small records: on DirectRunner they run in this process,
    # where passing records between steps costs nothing (worker processes would pickle each).
    staging = _stats_staging(plan)
    storage.delete(storage.glob(storage.join(staging, "*")))
    storage.makedirs(staging)
    partitions = min(plan.n_chunks, bucket_count(plan.n_rows, ASSEMBLE_PARTITION_ROWS))
    assemble_opts = spread(assemble_options(options), partitions)
    results.append(_run(assemble_opts, lambda p: build_assemble(p, plan, config)))
    finished = time.time()
    summary = storage.read_json(storage.join(plan.work_dir, "assemble-summary.json"))
    shards = summary["shards"]
    _remove_stale_shards(config, {s["shard"] for s in shards})
    _publish_stats(plan, config.out)
    counts = {(status, reason): n for status, reason, n in summary["counts"]}
    manifest = _manifest(config, plan, counts, shards, results, len(done_before), len(todo))
    manifest["http_requests"] = requests
    manifest["timings"] = {
        "plan_s": round(planned - started, 3),
        "crawl_s": round(crawled - planned, 3),
        "assemble_s": round(finished - crawled, 3),
        "total_s": round(time.time() - started, 3),
    }
    storage.write_json(storage.join(config.out, "manifest.json"), redact(manifest))
    return manifest


def _run(options, build) -> object:
    """Build and run one pipeline to the end; a DaskRunner's client is closed afterwards."""
    pipeline = beam.Pipeline(options=options)
    build(pipeline)
    result = pipeline.run()
    try:
        result.wait_until_finish()
    finally:
        close_client(result)
    return result


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
    config, plan, counts: dict, shards, results, reused_chunks: int, crawled_chunks: int
) -> dict:
    by_status: dict[str, int] = {}
    for (status, _reason), n in counts.items():
        by_status[status] = by_status.get(status, 0) + n
    return {
        "stage": "corpus",
        "config": {
            **{k: v for k, v in asdict(config).items() if k not in ("crawl",)},
            "crawl": asdict(config.crawl),
        },
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "cpus": _cpu_count()},
        "rows": sum(counts.values()),
        "chunks": {"total": plan.n_chunks, "reused": reused_chunks, "crawled": crawled_chunks},
        "status_counts": dict(sorted(by_status.items())),
        "reason_counts": {
            f"{status}:{reason or '-'}": n for (status, reason), n in sorted(counts.items())
        },
        "funnel": funnel_counts(counts),
        "shards": sorted(shards, key=lambda s: s["shard"]),
        "samples": by_status.get("ok", 0),
        # Beam's own counters where the runner reports them (DaskRunner reports none).
        "beam_counters": _counter_values(results),
    }


def _cpu_count() -> int:
    return os.cpu_count() or 1
