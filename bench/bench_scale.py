"""The corpus at 10k / 100k / 1M rows on Beam's DaskRunner, network left out: wall time, peak RSS
of the launcher and of the largest worker, CPU per row; then mining at scale through
bench/bench_scale_mine.py's `measure_mine`.

The crawl is replaced by its checkpoints: for each size the bench writes the URL list (parquet,
row groups of 10k rows) and every chunk's `_work/fetched/chunk-N.parquet` as the crawl would have
(statuses, reasons, hashes, a small JPEG for each kept row; repeated URLs, copied images, near
copies and repeated captions in the proportions below). `vlforge corpus` then does everything
but the network: planning by the workers (list read piece by piece, repeated URLs by a keyed
combiner, input chunks written), no crawl (every chunk is done), and the assemble step (exact,
near and caption dedup, shard numbering, tar + parquet shards, the stats dataset).

Each size runs `vlforge corpus --runner DaskRunner` as a child process (the launcher) against a
fresh dask.distributed LocalCluster of --workers processes: the launcher's and each worker's
peak from the VmHWM of their own address space (bench/peak_memory.py says why not ru_maxrss).
Per-worker peak should stay flat (<= 1.5x from 100k to 1M) and time grow linearly with rows.

    python bench/bench_scale.py [--sizes 10000,100000,1000000] [--mine-sizes 1000000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 1_000
ROW_GROUP = 10_000  # a multiple of CHUNK: every chunk holds CHUNK rows, as the checkpoints assume
SHARD = 10_000
REPEAT_URL_EVERY = 50  # row i repeats row i - 25's URL: 2% duplicate_url
# Shares of the other rows by crawl outcome.
OUTCOMES = [
    ("ok", "", 0.62),
    ("filtered", "caption_too_short", 0.12),
    ("filtered", "min_side", 0.06),
    ("failed", "http_404", 0.12),
    ("failed", "timeout", 0.04),
    ("blocked", "robots_txt", 0.04),
]


def _jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 60, 40)).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def _url(i: int) -> str:
    j = i - 25 if i % REPEAT_URL_EVERY == 49 else i
    return f"http://h{j % 997}.example/img/{j}.jpg"


def build_inputs(directory: Path, n: int, seed: int = 0) -> Path:
    """The URL list and one fetched checkpoint per chunk for n rows (reused when built)."""
    from vlforge.pipeline.crawl_stage import CHECKPOINT_SCHEMA
    from vlforge.pipeline.urls import normalize_url, sample_key

    source = directory / f"in-{n}-s{seed}"
    if (source / "done.json").exists():
        return source
    shutil.rmtree(source, ignore_errors=True)
    (source / "fetched").mkdir(parents=True)
    rng = random.Random(seed)
    jpg = _jpeg()
    urls = [_url(i) for i in range(n)]
    captions = [f"a {rng.choice(['red', 'blue', 'green'])} shape number {i}" for i in range(n)]
    for i in range(0, n, 40):  # 2.5% repeat an earlier caption
        if i > 100:
            captions[i] = captions[i - 97]
    list_path = source / "urls.parquet"
    scores = [round(rng.random(), 3) for _ in range(n)]
    pq.write_table(
        pa.table({"url": urls, "caption": captions, "score": scores}),
        list_path,
        row_group_size=ROW_GROUP,
    )
    weights = [w for *_, w in OUTCOMES]
    images: list[tuple[int, str]] = []  # (phash, sha256) of kept images so far
    for chunk in range(-(-n // CHUNK)):
        rows = []
        for i in range(chunk * CHUNK, min(n, (chunk + 1) * CHUNK)):
            url = urls[i]
            row = dict.fromkeys(CHECKPOINT_SCHEMA.names)
            row.update(
                row_id=i, key=sample_key(normalize_url(url)), url=url, caption=captions[i],
                extra=json.dumps({"score": scores[i]}), source=str(list_path),
                detail="", http_status=0, attempts=1, final_url="",
            )  # fmt: skip
            if i % REPEAT_URL_EVERY == 49:
                row.update(status="duplicate", reason="duplicate_url", detail=f"row {i - 25}")
                rows.append(row)
                continue
            status, reason, _ = rng.choices(OUTCOMES, weights)[0]
            row.update(status=status, reason=reason)
            if status == "ok":
                roll = rng.random()
                if roll < 0.03 and images:  # an exact copy of an earlier image
                    value, sha = rng.choice(images)
                elif roll < 0.06 and images:  # a near copy: 2 bits flipped
                    value, sha = rng.choice(images)[0] ^ 0b101, f"near{i}"
                else:
                    value, sha = rng.getrandbits(64), f"img{i}"
                images.append((value, sha))
                row.update(
                    http_status=200, final_url=url, language="en", language_score=0.99,
                    original_width=640, original_height=480, width=32, height=32,
                    sha256=sha, phash=f"{value:016x}", fetch_ms=12.5, jpg=jpg,
                )  # fmt: skip
            rows.append(row)
        table = pa.Table.from_pylist(rows, schema=CHECKPOINT_SCHEMA)
        pq.write_table(table, source / "fetched" / f"chunk-{chunk:06d}.parquet")
    (source / "done.json").write_text(json.dumps({"n": n}))
    return source


def _worker_usage() -> dict:
    from bench.peak_memory import peak_kib  # VmHWM: ru_maxrss would include the bench's own size

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"max_rss_kb": peak_kib(), "cpu_s": usage.ru_utime + usage.ru_stime}


def measure_corpus(n: int, work: Path, workers: int = 2, extra: tuple[str, ...] = ()) -> dict:
    """Plan + assemble n rows on a fresh LocalCluster; wall, peak RSS (MiB), CPU ms per row."""
    sys.path.insert(0, str(ROOT))
    from bench.bench_scale_mine import local_cluster
    from bench.peak_memory import read_report

    source = build_inputs(work, n)
    out = work / f"out-{n}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source / "fetched", out / "_work" / "fetched")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    report = work / f"launcher-peak-{n}.kib"
    with local_cluster(workers) as (cluster, client):
        command = [
            sys.executable, str(ROOT / "bench" / "peak_memory.py"), str(report), "corpus", "--urls", str(source / "urls.parquet"),
            "--out", str(out), "--chunk-size", str(CHUNK), "--shard-size", str(SHARD),
            "--no-progress", "--runner", "DaskRunner",
            "--dask_client_address", cluster.scheduler_address, *extra,
        ]  # fmt: skip
        started = time.time()
        child = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE)
        output = child.stdout.read().decode() if child.stdout else ""
        _, status, launcher = os.wait4(child.pid, 0)
        wall = time.time() - started
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"vlforge corpus failed at n={n}: {output}")
        used = client.run(_worker_usage)
    manifest = json.loads((out / "manifest.json").read_text())
    launcher_cpu = launcher.ru_utime + launcher.ru_stime
    worker_cpu = sum(u["cpu_s"] for u in used.values())
    shutil.rmtree(out, ignore_errors=True)
    return {
        "stage": "corpus",
        "n": n,
        "samples_out": manifest["samples"],
        "shards": len(manifest["shards"]),
        "http_requests": manifest["http_requests"],
        "workers": workers,
        "wall_s": round(wall, 1),
        "plan_s": manifest["timings"]["plan_s"],
        "assemble_s": manifest["timings"]["assemble_s"],
        "launcher_peak_mib": round(read_report(report) / 1024),
        "worker_peak_mib": round(max(u["max_rss_kb"] for u in used.values()) / 1024),
        "cpu_s": round(launcher_cpu + worker_cpu, 1),
        "cpu_ms_per_row": round(1000 * (launcher_cpu + worker_cpu) / n, 3),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| stage | rows | wall s | launcher peak MiB | largest worker peak MiB | CPU ms/row |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['stage']} | {r['n']:,} | {r['wall_s']} | {r['launcher_peak_mib']} | "
            f"{r['worker_peak_mib']} | {r['cpu_ms_per_row']} |"
        )
    return "\n".join(lines)


def _ratios(results: list[dict], stage: str) -> str:
    runs = {r["n"]: r for r in results if r["stage"] == stage}
    if 100_000 not in runs or 1_000_000 not in runs:
        return ""
    base, big = runs[100_000], runs[1_000_000]
    return (
        f"{stage} 100k → 1M: worker peak {big['worker_peak_mib'] / base['worker_peak_mib']:.2f}x "
        f"(target <= 1.5x), wall {big['wall_s'] / base['wall_s']:.1f}x for 10x rows, "
        f"CPU per row {big['cpu_ms_per_row'] / base['cpu_ms_per_row']:.2f}x"
    )


def record(results: list[dict], command: str) -> str:
    sys.path.insert(0, str(ROOT))
    from bench.results_table import RESULTS, machine

    notes = [n for n in (_ratios(results, "corpus"), _ratios(results, "mine")) if n]
    section = (
        f"\n## Corpus and mining at scale, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{machine()}\n\n`{command}`: DaskRunner on a LocalCluster of "
        f"{results[0]['workers']} worker processes; corpus = planning by the workers + the "
        "assemble step from pre-made crawl checkpoints (no network), mining = "
        "bench/bench_scale_mine.py.\n\n" + table(results) + "\n"
    )
    if notes:
        section += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    with RESULTS.open("a") as handle:
        handle.write(section)
    return section


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="corpus rows per run")
    parser.add_argument(
        "--mine-sizes", default="1000000", help="captions per mining run ('' for none)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / "bench" / "work" / "scale"))
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--beam-args", default="", help="more Beam flags for the corpus runs")
    args = parser.parse_args()
    work = Path(args.work)
    results = []
    for n in (int(s) for s in args.sizes.split(",") if s):
        results.append(measure_corpus(n, work, args.workers, tuple(args.beam_args.split())))
        print(json.dumps(results[-1]), flush=True)
    mine_sizes = [int(s) for s in args.mine_sizes.split(",") if s]
    if mine_sizes:
        sys.path.insert(0, str(ROOT))
        from bench.bench_scale_mine import measure_mine

        for n in mine_sizes:
            results.append(
                {"stage": "mine", **measure_mine(n, work / "mine", workers=args.workers)}
            )
            print(json.dumps(results[-1]), flush=True)
    print(table(results))
    if not args.no_record and results:
        command = "python bench/bench_scale.py " + " ".join(sys.argv[1:])
        print(record(results, command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
