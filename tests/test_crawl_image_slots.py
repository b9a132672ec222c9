"""The crawl's rows fetch concurrently, but at most `image_threads` of them decode at once."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import pyarrow as pa
import pytest

from vlforge.pipeline import storage
from vlforge.pipeline.crawl_stage import SMALL_IMAGE_BYTES, CrawlChunk, CrawlSettings
from vlforge.pipeline.fetch import FetchResult
from vlforge.pipeline.image_processing import ProcessedImage
from vlforge.pipeline.work_plan import INPUT_SCHEMA, WorkPlan


class _CountingProcessor:
    """Records how many threads are inside process() at once; the work inside releases the GIL
    (hashing a few MB), as decoding and resizing do."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0

    def process(self, body: bytes) -> ProcessedImage:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        hashlib.sha256(body * 20).digest()
        with self.lock:
            self.active -= 1
        return ProcessedImage(False, "decode_error", "fake")


class _InstantFetcher:
    def __init__(self, body_bytes: int) -> None:
        self.body = b"x" * body_bytes

    async def get(self, url: str) -> FetchResult:
        return FetchResult("ok", "", http_status=200, final_url=url, attempts=1, body=self.body)

    def run(self, work):
        return asyncio.run(work)

    def close(self) -> None:
        pass


def _crawl(image_threads: int, body_bytes: int = 200_000) -> int:
    dofn = CrawlChunk(
        WorkPlan("/nonexistent", 200, 200, 1),
        CrawlSettings(threads=16, image_threads=image_threads),
    )
    dofn.setup()
    dofn.fetcher, dofn.processor = _InstantFetcher(body_bytes), _CountingProcessor()
    dofn._requests = 0
    rows = [
        {"row_id": i, "key": str(i), "url": f"http://127.0.0.1/{i}.jpg", "caption": "a red circle",
         "extra": "{}", "source": "list", "dup_of": -1}
        for i in range(200)
    ]  # fmt: skip
    out = dofn._crawl_rows(rows)
    assert [r["reason"] for r in out] == ["decode_error"] * 200  # every row reached the decoder
    return dofn.processor.most


def test_at_most_image_threads_rows_decode_at_once():
    assert _crawl(image_threads=1) == 1
    assert 1 <= _crawl(image_threads=2) <= 2
    assert 1 <= _crawl(image_threads=3) <= 3


def test_small_images_decode_one_at_a_time():
    assert _crawl(image_threads=4, body_bytes=SMALL_IMAGE_BYTES - 1) == 1


def _plan_with_inputs(tmp_path, chunks: int) -> WorkPlan:
    plan = WorkPlan(str(tmp_path), 2 * chunks, 2, chunks)
    for chunk in range(chunks):
        rows = [
            {
                "row_id": 2 * chunk + i,
                "url": "http://127.0.0.1/x.jpg",
                "caption": "a red circle",
                "key": f"k{chunk}{i}",
                "dup_of": 0,
                "extra": "{}",
                "source": "list",
            }
            for i in range(2)
        ]  # fmt: skip  (repeated URLs: decided without any request)
        storage.makedirs(storage.join(plan.work_dir, "input"))
        storage.write_parquet(plan.input_path(chunk), pa.Table.from_pylist(rows, INPUT_SCHEMA))
    return plan


def test_checkpoints_are_written_by_the_end_of_the_bundle(tmp_path):
    plan = _plan_with_inputs(tmp_path, 3)
    dofn = CrawlChunk(plan, CrawlSettings())
    dofn.setup()
    dofn.start_bundle()
    outputs = [out for chunk in range(3) for out in dofn.process(chunk)]
    dofn.finish_bundle()
    dofn.teardown()
    assert [o["rows"] for o in outputs] == [2, 2, 2]
    for chunk in range(3):
        statuses = storage.read_parquet(plan.fetched_path(chunk), ["status"]).column(0)
        assert statuses.to_pylist() == ["duplicate", "duplicate"]


def test_a_failed_checkpoint_write_fails_the_bundle(tmp_path):
    plan = _plan_with_inputs(tmp_path, 1)
    (tmp_path / "_work" / "fetched").write_text("a file where the checkpoint directory goes")
    dofn = CrawlChunk(plan, CrawlSettings())
    dofn.setup()
    dofn.start_bundle()
    list(dofn.process(0))
    with pytest.raises(OSError):
        dofn.finish_bundle()
    dofn.teardown()
