"""Beam stage: crawl one chunk of rows (fetch, check, resize, filter) and checkpoint it.

One DoFn call handles a whole chunk: its rows are coroutines on the worker's fetch loop, at most
--threads in flight; small images decode on that loop, large ones in a small pool beside it
(CrawlSettings says why). The network step is checkpointed per chunk: a chunk's results are
written (atomically, while the next chunk is fetched) before its bundle commits and before
anything downstream reads them back (CheckpointColumns), so an interrupted run loses at most the
two chunks in flight per worker.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics

from vlforge.pipeline import progress, storage
from vlforge.pipeline.fetch import FetchConfig, Fetcher, is_retryable
from vlforge.pipeline.filters import CaptionFilter, FilterConfig, image_reason
from vlforge.pipeline.image_processing import ImageProcessor, ResizeConfig
from vlforge.pipeline.work_plan import WorkPlan

# Columns of a fetched checkpoint; `jpg` is only set for rows that passed.
CHECKPOINT_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("extra", pa.string()),
        ("source", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("http_status", pa.int32()),
        ("attempts", pa.int32()),
        ("final_url", pa.string()),
        ("language", pa.string()),
        ("language_score", pa.float32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
        ("phash", pa.string()),
        ("fetch_ms", pa.float32()),
        ("jpg", pa.binary()),
    ]
)
SMALL_IMAGE_BYTES = 64 * 1024  # bodies below this decode one at a time (see image_threads)
RECORD_FIELDS = [f.name for f in CHECKPOINT_SCHEMA if f.name not in ("jpg", "extra")]


@dataclass(frozen=True)
class CrawlSettings:
    fetch: FetchConfig = field(default_factory=FetchConfig)
    resize: ResizeConfig = field(default_factory=ResizeConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    # Rows in flight per worker (img2dataset's thread_count): each holds one request, then its
    # image, so at most this many bodies wait in memory. They are coroutines on one loop thread,
    # not OS threads (fetch.py says why).
    threads: int = 32
    # Large images decoded, resized and hashed at once per worker, by a pool of this many
    # threads. CPU work spreads over processes (--workers): threads in one process contend for
    # Python's GIL, and 32 of them decoding at once crawled the demo world ~15% slower than two
    # at a time. Small images (SMALL_IMAGE_BYTES) decode on the loop thread itself, one at a
    # time: their time is mostly GIL-held Python around short C calls, so handing them to
    # another thread only adds contention (demo world, ~15 KB JPEGs: 2.49 -> 2.3 ms CPU per
    # row), while a large photo spends most of its time in C that releases the
    # GIL (decode, resize), so two at once use two cores (500-2000 px photos: two 8% faster).
    image_threads: int = 2
    retry_failed: bool = False


def _write_checkpoint(path: str, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=CHECKPOINT_SCHEMA)
    storage.write_parquet(path, table, uncompressed=("jpg",))


def _empty_row(row: dict) -> dict:
    out = {name: None for name in CHECKPOINT_SCHEMA.names}
    out.update({k: row[k] for k in ("row_id", "key", "url", "caption", "extra", "source")})
    out.update(status="ok", reason="", detail="", http_status=0, attempts=0, final_url="")
    return out


class CheckpointColumns:
    """The assemble's ColumnReader: (chunk, columns) → those columns of the chunk's checkpoint,
    read column-projected (pipeline/dedup.py says why the steps read, not carry, the rows)."""

    def __init__(self, plan: WorkPlan):
        self.plan = plan

    def __call__(self, chunk: int, columns: list[str]) -> dict[str, list]:
        return storage.read_parquet(self.plan.fetched_path(chunk), columns).to_pydict()


class CrawlChunk(beam.DoFn):
    """chunk id → its checkpoint written (rows fetched, checked, resized, filtered)."""

    def __init__(self, plan: WorkPlan, settings: CrawlSettings):
        self.plan = plan
        self.settings = settings
        self.rows_counter = Metrics.counter("crawl", "rows")
        self.requests_counter = Metrics.counter("crawl", "http_requests")
        self.chunks_fetched = Metrics.counter("crawl", "chunks_fetched")
        self.chunks_reused = Metrics.counter("crawl", "chunks_reused")

    def setup(self) -> None:
        # Built once per worker: connection limits and robots caches are per worker, as are models.
        self.fetcher = Fetcher(self.settings.fetch)
        self.processor = ImageProcessor(self.settings.resize)
        self.caption_filter = CaptionFilter(self.settings.filters)
        self.decoders = ThreadPoolExecutor(
            max_workers=self.settings.image_threads, thread_name_prefix="decode"
        )
        # A chunk's checkpoint is written while the next chunk is fetched: the write (arrow
        # conversion, parquet, storage) left the worker's fetch threads idle ~5% of the crawl.
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.writing: Future | None = None

    def teardown(self) -> None:
        self.fetcher.close()
        self.decoders.shutdown(wait=True)
        self.writer.shutdown(wait=True)

    def start_bundle(self) -> None:
        self.writing = None

    def finish_bundle(self) -> None:
        # The bundle commits only once its last checkpoint is written; a failed write fails the
        # bundle, whose chunks (no checkpoint yet) are crawled again on the retry.
        self._wait_for_write()

    def process(self, chunk: int):
        self._requests = 0  # counted in the output too: some runners report no metrics
        path = self.plan.fetched_path(chunk)
        if not storage.exists(path):
            rows = storage.read_parquet(self.plan.input_path(chunk)).to_pylist()
            crawled = self._crawl_rows(rows)
            self._wait_for_write()  # at most one chunk's rows wait in memory for their write
            self.writing = self.writer.submit(_write_checkpoint, path, crawled)
            self.chunks_fetched.inc()
            rows_done = len(crawled)
        elif self.settings.retry_failed:
            rows_done = self._retry(chunk, storage.read_parquet(path))
        else:
            self.chunks_reused.inc()
            return
        yield {"chunk": chunk, "rows": rows_done, "requests": self._requests}

    def _wait_for_write(self) -> None:
        if self.writing is not None:
            writing, self.writing = self.writing, None
            writing.result()  # re-raises the write's error

    def _retry(self, chunk: int, table: pa.Table) -> int:
        """Crawl the chunk's retryable failures again; returns the chunk's row count."""
        rows = table.to_pylist()
        again = [
            i for i, r in enumerate(rows) if r["status"] == "failed" and is_retryable(r["reason"])
        ]
        if not again:
            self.chunks_reused.inc()
            return len(rows)
        redone = self._crawl_rows([rows[i] for i in again])
        for i, new in zip(again, redone, strict=True):
            rows[i] = new
        _write_checkpoint(self.plan.fetched_path(chunk), rows)
        self.chunks_fetched.inc()
        return len(rows)

    def _crawl_rows(self, rows: list[dict]) -> list[dict]:
        results = self.fetcher.run(self._crawl_all(rows))
        # Beam metrics belong to the bundle's thread: increments from the loop would be lost.
        self.rows_counter.inc(len(results))
        requests = sum(r["attempts"] or 0 for r in results)
        self._requests += requests
        self.requests_counter.inc(requests)
        return results

    async def _crawl_all(self, rows: list[dict]) -> list[dict]:
        in_flight = asyncio.Semaphore(self.settings.threads)

        async def crawl(row: dict) -> dict:
            async with in_flight:
                return await self._crawl_row(row)

        return await asyncio.gather(*(crawl(row) for row in rows))

    async def _crawl_row(self, row: dict) -> dict:
        out = _empty_row(row)
        try:
            await self._fill(row, out)
        except Exception as err:  # one row's trouble is that row's status, never the chunk's
            out.update(
                status="failed",
                reason="crawl_error",
                detail=f"{type(err).__name__}: {err}"[:300],
                jpg=None,
            )
        finally:
            progress.advance(1)
        return out

    async def _fill(self, row: dict, out: dict) -> None:
        dup_of = row.get("dup_of")
        if dup_of is not None and dup_of >= 0:  # repeated URL: decided before any request
            out.update(status="duplicate", reason="duplicate_url", detail=f"row {dup_of}")
            return
        verdict = self.caption_filter.check(row["caption"])
        out.update(language=verdict.language, language_score=verdict.language_score)
        if verdict.reason:
            out.update(status="filtered", reason=verdict.reason)
            return
        started = time.monotonic()
        fetched = await self.fetcher.get(row["url"])
        out.update(
            http_status=fetched.http_status,
            attempts=fetched.attempts,
            final_url=fetched.final_url,
            fetch_ms=round((time.monotonic() - started) * 1000, 1),
        )
        if fetched.status != "ok":
            out.update(status=fetched.status, reason=fetched.reason, detail=fetched.detail)
            return
        if len(fetched.body) < SMALL_IMAGE_BYTES:
            image = self.processor.process(fetched.body)
        else:
            loop = asyncio.get_running_loop()
            image = await loop.run_in_executor(self.decoders, self.processor.process, fetched.body)
        if not image.ok:
            out.update(status="failed", reason=image.reason, detail=image.detail)
            return
        out.update(
            original_width=image.original_width,
            original_height=image.original_height,
            width=image.width,
            height=image.height,
            sha256=image.sha256,
            phash=image.phash,
        )
        reason = image_reason(self.settings.filters, image.original_width, image.original_height)
        if reason:
            out.update(status="filtered", reason=reason)
            return
        out["jpg"] = image.jpg
