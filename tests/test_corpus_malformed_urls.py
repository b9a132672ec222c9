"""A URL list as it comes from the web: malformed rows fail alone, the job goes on."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import FAST_CRAWL, run_cli
from vlforge.pipeline.image_processing import ImageProcessor

MALFORMED = [
    "http://[foo/x.jpg",
    "http://127.0.0.1:65536/x.jpg",
    "http://127.0.0.1:99999999/x.jpg",
    "http://127.0.0.1:port/x.jpg",
    "ftp://127.0.0.1/x.jpg",
    "javascript:alert(1)",
    "not a url at all",
    "",
    "http://",
    "http://exa mple.com/x.jpg",
    "http://ex..com/x.jpg",
]


def _crawl(tmp_path, urls):
    captions = [f"a small red circle above a blue square number {i}" for i in range(len(urls))]
    pq.write_table(pa.table({"url": urls, "caption": captions}), tmp_path / "l.parquet")
    code, _, stderr = run_cli(
        "corpus", "--urls", str(tmp_path / "l.parquet"), "--out", str(tmp_path / "out"),
        "--chunk-size", "4", *FAST_CRAWL, "--preset", "none", "--no-dedup-urls",
    )  # fmt: skip
    assert code == 0, stderr
    stats = pq.read_table(tmp_path / "out" / "stats.parquet").to_pylist()
    return {s["url"]: s for s in stats}


def test_malformed_urls_fail_their_rows_and_the_rest_is_crawled(world_server, tmp_path):
    good = [world_server.image_url(31, i) for i in range(6)]
    urls = [
        u for pair in zip(MALFORMED, good + [None] * 9, strict=False) for u in pair if u is not None
    ]
    by_url = _crawl(tmp_path, urls + ["http://127.0.0.1:1/x y.jpg"])
    assert len(by_url) == len(urls) + 1
    for url in MALFORMED:
        row = by_url[url]
        assert (row["status"], row["reason"]) == ("failed", "bad_url"), (url, row)
        assert row["detail"], url
    assert all(by_url[u]["status"] == "ok" for u in good)
    # Nothing listens on port 1: its robots.txt is unreachable, which RFC 9309 reads as disallow.
    assert by_url["http://127.0.0.1:1/x y.jpg"]["reason"] == "robots_txt"


def test_an_unforeseen_exception_fails_one_row_not_the_chunk(world_server, tmp_path, monkeypatch):
    urls = [world_server.image_url(32, i) for i in range(4)]
    original = ImageProcessor.process
    doomed = world_server.image_bytes(("img", 32, 2))

    def process(self, data: bytes):
        if data == doomed:
            raise RuntimeError("a decoder bug")
        return original(self, data)

    monkeypatch.setattr(ImageProcessor, "process", process)
    by_url = _crawl(tmp_path, urls)
    assert [by_url[u]["status"] for u in urls] == ["ok", "ok", "failed", "ok"]
    assert by_url[urls[2]]["reason"] == "crawl_error"
    assert "RuntimeError: a decoder bug" in by_url[urls[2]]["detail"]
