"""Interrupted runs resume chunk by chunk; the private-address guard sends nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import FAST_CRAWL, run_cli


def _path(url: str) -> str:
    return "/" + url.split("://", 1)[1].split("/", 1)[1]


def _write_list(path, urls):
    captions = [f"a small red circle above a blue square number {i}" for i in range(len(urls))]
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)


def test_private_guard_blocks_without_sending_a_request(world_server, tmp_path):
    urls = [world_server.image_url(7, i) for i in range(5)]
    urls.append(world_server.base_url.replace("127.0.0.1", "localhost") + _path(urls[0]))
    _write_list(tmp_path / "l.parquet", urls)
    before = sum(world_server.request_log.values())
    code, _, stderr = run_cli(
        "corpus", "--urls", str(tmp_path / "l.parquet"), "--out", str(tmp_path / "out"),
        "--no-progress", "--no-dedup-urls",
    )  # fmt: skip
    assert code == 0, stderr
    stats = pq.read_table(tmp_path / "out" / "stats.parquet").to_pylist()
    assert {(s["status"], s["reason"]) for s in stats} == {("blocked", "private_address")}
    assert sum(world_server.request_log.values()) == before


def _wait_for(predicate, limit_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "crawler exited"
        assert time.monotonic() < deadline, "the first chunk never finished"
        time.sleep(0.05)


def test_resume_after_interrupted_run(world_server, tmp_path):
    # Chunk 0 is ordinary; chunk 1 holds a request open until we release it, so the crawler is
    # interrupted (SIGKILL, the worst case) with one chunk done and one in flight.
    first = [world_server.image_url(21, i) for i in range(6)]
    second = [world_server.image_url(21, i) for i in range(6, 11)] + [world_server.hold_url(1)]
    _write_list(tmp_path / "l.parquet", first + second)
    out = tmp_path / "out"
    args = ["corpus", "--urls", str(tmp_path / "l.parquet"), "--out", str(out), "--chunk-size", "6",
            "--shard-size", "4", *FAST_CRAWL, "--timeout", "30", "--deadline", "60"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlforge.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        done = out / "_work" / "fetched" / "chunk-000000.parquet"
        _wait_for(
            lambda: done.exists() and world_server.request_log[_path(second[-1])] > 0, 120, proc
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Nothing half-done is visible under a final name.
    assert not (out / "stats.parquet").exists() and not (out / "manifest.json").exists()
    assert not list(out.glob("corpus-*"))
    assert not (out / "_work" / "fetched" / "chunk-000001.parquet").exists()
    world_server.release_holds()

    before = {u: world_server.request_log[_path(u)] for u in first + second}
    code, stdout, stderr = run_cli(*args)
    assert code == 0, stderr
    after = {u: world_server.request_log[_path(u)] for u in first + second}
    assert all(after[u] == before[u] for u in first)  # the finished chunk is not fetched again
    assert all(after[u] == before[u] + 1 for u in second[:-1])
    stats = pq.read_table(out / "stats.parquet").to_pylist()
    assert len(stats) == 12 and "1/2 chunks reused" in stdout
    assert [s["status"] for s in stats[:11]] == ["ok"] * 11
