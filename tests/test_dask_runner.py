"""`vlforge corpus` on Beam's DaskRunner over a dask.distributed cluster of separate worker
processes: its outputs equal the DirectRunner's (stats rows, statuses, reasons, sample keys and
fields, shards), and what only a one-machine runner could do is refused with a clear error.

The cluster fixture lives in tests/dask_cluster.py, for other stages' DaskRunner tests too.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import webdataset as wds
from distributed import Client

from tests.conftest import FAST_CRAWL, run_cli
from tests.dask_cluster import dask_address, dask_flags  # noqa: F401 (a fixture)
from vlforge.pipeline.stats_dataset import read_stats, stats_parts
from vlforge.world.url_list import make_url_list

N_ROWS, CHUNK = 60, 20
# Timing-dependent by nature: how long a fetch took and how many attempts a slow host needed.
TIMING_FIELDS = ("fetch_ms", "attempts")


def _comparable(stats: list[dict]) -> list[dict]:
    out = []
    for row in stats:
        row = {k: v for k, v in row.items() if k not in TIMING_FIELDS}
        # Exception texts may name an object's address (`<_io.BytesIO object at 0x...>`).
        row["detail"] = re.sub(r" at 0x[0-9a-f]+", "", row["detail"] or "")
        out.append(row)
    return out


def _samples(out) -> list[tuple]:
    shards = sorted(str(p) for p in out.glob("corpus-*.tar"))
    return [
        (s["__key__"], s["jpg"], s["txt"], s["json"])
        for s in wds.WebDataset(shards, shardshuffle=False)
    ]


def _corpus(urls, out, *extra: str) -> dict:
    code, _stdout, stderr = run_cli(
        "corpus", "--urls", str(urls), "--out", str(out), "--shard-size", "20",
        "--chunk-size", str(CHUNK), *FAST_CRAWL, *extra,
    )  # fmt: skip
    assert code == 0, stderr
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def url_list(world_server, tmp_path_factory):
    return make_url_list(
        N_ROWS, 11, world_server.base_url, tmp_path_factory.mktemp("l") / "u.parquet"
    )


def test_corpus_on_dask_equals_direct(url_list, dask_address, tmp_path):  # noqa: F811
    direct = _corpus(url_list, tmp_path / "direct")
    dask = _corpus(url_list, tmp_path / "dask", *dask_flags(dask_address))
    got = read_stats(tmp_path / "dask" / "stats.parquet").to_pylist()
    want = read_stats(tmp_path / "direct" / "stats.parquet").to_pylist()
    assert [r["row_id"] for r in got] == list(range(N_ROWS))
    assert _comparable(got) == _comparable(want)
    assert len({r["status"] for r in got}) >= 4  # the list exercised kept, failed, blocked, ...
    samples = _samples(tmp_path / "dask")
    assert samples and samples == _samples(tmp_path / "direct")  # keys, image bytes, txt, json
    for key in ("rows", "samples", "status_counts", "reason_counts", "funnel", "shards", "chunks"):
        assert dask[key] == direct[key], key
    assert dask["http_requests"] > 0  # counted from outputs: DaskRunner reports no metrics
    assert dask["beam_counters"] == {}
    # The stats are a dataset: one part per crawl chunk, written by the workers.
    assert len(stats_parts(str(tmp_path / "dask" / "stats.parquet"))) == N_ROWS // CHUNK
    with Client(dask_address) as client:
        ran = client.run(lambda: "vlforge.pipeline.crawl_stage" in sys.modules).values()
    assert any(ran)  # the crawl ran in the worker processes, not only in this one


def test_rerun_on_dask_reuses_every_chunk(url_list, dask_address, tmp_path, world_server):  # noqa: F811
    first = _corpus(url_list, tmp_path / "out", *dask_flags(dask_address))
    before = sum(world_server.request_log.values())
    again = _corpus(url_list, tmp_path / "out", *dask_flags(dask_address))
    assert sum(world_server.request_log.values()) == before
    assert again["http_requests"] == 0 and again["chunks"]["reused"] == N_ROWS // CHUNK
    assert again["reason_counts"] == first["reason_counts"]


def test_local_out_with_a_remote_only_runner_is_refused(url_list, tmp_path):
    code, _, stderr = run_cli(
        "corpus", "--urls", str(url_list), "--out", "relative/out", "--runner", "DataflowRunner",
        "--project", "p", "--region", "r", "--temp_location", "gs://b/t", *FAST_CRAWL,
    )  # fmt: skip
    assert code == 2 and stderr.count("\n") == 1
    assert "vlforge: error:" in stderr and "gs://" in stderr
    assert not (tmp_path / "relative").exists()
