"""The corpus stage end to end against the demo world's faulty loopback server."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from tests.conftest import FAST_CRAWL, run_cli
from vlforge.pipeline.fetch import is_retryable
from vlforge.pipeline.filters import caption_key
from vlforge.world.mess import KINDS
from vlforge.world.url_list import make_url_list

N_ROWS = 160


@pytest.fixture(scope="module")
def crawled(world_server, tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    urls = make_url_list(N_ROWS, 11, world_server.base_url, base / "urls.parquet")
    out = base / "out"
    code, stdout, stderr = run_cli(
        "corpus", "--urls", str(urls), "--out", str(out), "--shard-size", "40", *FAST_CRAWL
    )
    assert code == 0, stderr
    return {"urls": urls, "out": out, "stdout": stdout}


def _rows(crawled):
    truth = pq.read_table(crawled["urls"]).to_pylist()
    stats = pq.read_table(crawled["out"] / "stats.parquet").to_pylist()
    return truth, stats


def test_every_input_row_is_accounted_for(crawled):
    truth, stats = _rows(crawled)
    assert [s["row_id"] for s in stats] == list(range(N_ROWS))
    assert [s["url"] for s in stats] == [t["url"] for t in truth]
    assert {s["status"] for s in stats} <= {"ok", "duplicate", "filtered", "failed", "blocked"}
    assert all(s["reason"] for s in stats if s["status"] != "ok")


def test_every_kind_ends_in_its_status_and_reason(crawled):
    truth, stats = _rows(crawled)
    seen_kinds, kept_captions, wrong = set(), set(), []
    for row, stat in zip(truth, stats, strict=True):
        kind = KINDS[json.loads(row["world"])["kind"]]
        seen_kinds.add(kind.name)
        expected = (kind.expect_status, kind.expect_reason)
        got = (stat["status"], stat["reason"])
        # Templated captions may repeat by chance; the repeat is then a caption duplicate.
        if expected == ("ok", "") and got == ("duplicate", "duplicate_caption"):
            assert caption_key(stat["caption"]) in kept_captions
            continue
        if got == ("ok", ""):
            kept_captions.add(caption_key(stat["caption"]))
        if got != expected:
            wrong.append((kind.name, expected, got, stat["detail"]))
    assert not wrong
    assert seen_kinds == set(KINDS)  # the list exercised every fault and every kind of mess


def test_shards_read_back_with_plain_webdataset(crawled):
    out = crawled["out"]
    _truth, stats = _rows(crawled)
    kept = [s for s in stats if s["status"] == "ok"]
    shards = sorted(str(p) for p in out.glob("corpus-*.tar"))
    assert len(shards) == -(-len(kept) // 40)
    samples = list(wds.WebDataset(shards, shardshuffle=False))  # no decoders: raw bytes only
    assert [s["__key__"] for s in samples] == [s["key"] for s in kept]
    for sample, stat in zip(samples, kept, strict=True):
        meta = json.loads(sample["json"])
        assert meta["url"] == stat["url"] and meta["row_id"] == stat["row_id"]
        assert "world" in meta  # extra input columns are kept
        assert sample["txt"].decode() == stat["caption"]
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.size == (256, 256)  # img2dataset's border mode pads to a square
        assert (meta["width"], meta["height"]) == image.size
    for shard in shards:  # the sibling parquet lists the same samples
        sibling = pq.read_table(shard.replace(".tar", ".parquet")).column("key").to_pylist()
        assert sibling == [s["__key__"] for s in wds.WebDataset(shard, shardshuffle=False)]


def test_manifest_and_summary(crawled):
    manifest = json.loads((crawled["out"] / "manifest.json").read_text())
    _truth, stats = _rows(crawled)
    assert manifest["rows"] == N_ROWS
    assert manifest["samples"] == sum(s["status"] == "ok" for s in stats)
    assert sum(manifest["status_counts"].values()) == N_ROWS
    assert manifest["funnel"][-1]["remaining"] == manifest["samples"]
    assert manifest["versions"]["apache-beam"] and manifest["timings"]["total_s"] > 0
    assert manifest["http_requests"] > 0
    assert "deduplicated" in crawled["stdout"] and "status:reason" in crawled["stdout"]


def test_rerun_after_completion_makes_no_requests(crawled, world_server):
    before = sum(world_server.request_log.values())
    tar_bytes = {p.name: p.read_bytes() for p in crawled["out"].glob("*.tar")}
    code, stdout, _ = run_cli(
        "corpus", "--urls", str(crawled["urls"]), "--out", str(crawled["out"]),
        "--shard-size", "40", *FAST_CRAWL,
    )  # fmt: skip
    assert code == 0
    assert sum(world_server.request_log.values()) == before
    assert {p.name: p.read_bytes() for p in crawled["out"].glob("*.tar")} == tar_bytes
    assert "0 HTTP requests" in stdout


def test_changed_settings_on_the_same_out_are_refused(crawled):
    code, _, stderr = run_cli(
        "corpus", "--urls", str(crawled["urls"]), "--out", str(crawled["out"]),
        "--image-size", "128", *FAST_CRAWL,
    )  # fmt: skip
    assert code == 2 and "different settings" in stderr and stderr.count("\n") == 1
    assert (crawled["out"] / "manifest.json").exists()  # nothing already written is lost


def test_retry_failed_refetches_exactly_the_retryable_rows(crawled, world_server):
    truth, stats = _rows(crawled)
    path = lambda url: "/" + url.split("://", 1)[1].split("/", 1)[1]  # noqa: E731
    retryable = {
        path(s["url"]) for s in stats if s["status"] == "failed" and is_retryable(s["reason"])
    }
    others = {path(s["url"]) for s in stats} - retryable
    assert retryable and others  # the world has both kinds
    counts_before = dict(world_server.request_log)
    code, _, stderr = run_cli(
        "corpus", "--urls", str(crawled["urls"]), "--out", str(crawled["out"]),
        "--shard-size", "40", "--retry-failed", *FAST_CRAWL,
    )  # fmt: skip
    assert code == 0, stderr
    after = world_server.request_log
    asked = {p for p in retryable | others if after.get(p, 0) > counts_before.get(p, 0)}
    # Redirect targets are asked through their first hop; robots.txt is not a row.
    assert asked == retryable
    again = {s["row_id"]: s for s in pq.read_table(crawled["out"] / "stats.parquet").to_pylist()}
    for before in stats:  # rows not retried keep their record exactly
        if path(before["url"]) in others:
            assert again[before["row_id"]] == before
    assert len(again) == N_ROWS
