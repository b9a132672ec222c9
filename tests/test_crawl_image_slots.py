"""The crawl's threads fetch concurrently, but at most `image_threads` of them decode at once."""

from __future__ import annotations

import hashlib
import threading

from vlforge.pipeline.crawl_stage import CrawlChunk, CrawlSettings
from vlforge.pipeline.fetch import FetchResult
from vlforge.pipeline.image_processing import ProcessedImage
from vlforge.pipeline.work_plan import WorkPlan


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
        hashlib.sha256(body * 200).digest()
        with self.lock:
            self.active -= 1
        return ProcessedImage(False, "decode_error", "fake")


class _InstantFetcher:
    def fetch(self, url: str) -> FetchResult:
        return FetchResult("ok", "", http_status=200, final_url=url, attempts=1, body=b"x" * 20_000)

    def close(self) -> None:
        pass


def _crawl(image_threads: int) -> int:
    dofn = CrawlChunk(
        WorkPlan("/nonexistent", 200, 200, 1),
        CrawlSettings(threads=16, image_threads=image_threads),
    )
    dofn.setup()
    dofn.fetcher, dofn.processor = _InstantFetcher(), _CountingProcessor()
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
