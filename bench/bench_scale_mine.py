"""Mining at 10k / 100k / 1M captions on Beam's DaskRunner: wall time, peak RSS of the launcher and
of the largest worker, CPU seconds per row. `measure_mining(n, workdir)` (alias `measure_mine`)
is what bench/bench_scale.py calls; run alone it measures --sizes and records one row per size
in bench/results.md (--quality adds neg_false_rate and the IVF recall@10 of the mined output).

Inputs are bench_mine.py's: demo-world captions and tags, placeholder jpgs, shards of
--shard-size samples. One difference, to build 1M inputs in minutes: sg.json is the world's own
graph of each caption (what the parser recovers from it), with token spans found by a plain
tokenizer, instead of a spaCy parse of every distinct caption (~40 min for 1M here; parsing is
featurize's cost, not mining's).

Each size runs `vlforge mine --runner DaskRunner` as a child process (the launcher) against a
fresh dask.distributed LocalCluster of --workers worker processes, so each peak is that of one
process for one size: the VmHWM of its own address space (bench/peak_memory.py: not
ru_maxrss, which counts the bench process that started it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_TOKEN = re.compile(r"\w+|[^\w\s]")


def _with_spans(caption: str, graph: dict) -> dict:
    """The caption's graph with `tokens` and the first matching token span of each slot."""
    tokens = _TOKEN.findall(caption)
    lower = [t.lower() for t in tokens]

    def find(words: str) -> list[int] | None:
        parts = words.lower().split()
        for i in range(len(lower) - len(parts) + 1):
            if lower[i : i + len(parts)] == parts:
                return [i, i + len(parts)]
        return None

    out = {"objects": [], "attributes": [], "relations": [], "tokens": tokens}
    for kind in ("objects", "attributes", "relations"):
        for entry in graph.get(kind, []):
            span = find(entry["name"])
            out[kind].append({**entry, **({"span": span} if span else {})})
    return out


def build_inputs(directory: Path, n: int, shard_size: int, seed: int = 0) -> Path:
    """Input shards for n captions under directory (reused when already built)."""
    sys.path.insert(0, str(ROOT))
    from bench.bench_mine import write_shards

    source = directory / f"in-{n}-{shard_size}-s{seed}"
    marker = source / "input.json"
    if marker.exists():
        return source
    from vlforge.world.captions import caption_scene
    from vlforge.world.scene import image_graph, sample_scene, scene_rng

    captions, shapes, truths, graphs = [], [], [], {}
    for i in range(n):
        scene = sample_scene(seed, i)
        text, graph = caption_scene(scene, scene_rng(seed, i, "caption"))
        captions.append(text)
        shapes.append([o.shape for o in scene.objects])
        truths.append({"scene_graph": image_graph(scene)})
        if text not in graphs:
            graphs[text] = json.dumps(_with_spans(text, graph))
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    write_shards(source, captions, shapes, truths, shard_size, graphs)
    marker.write_text(json.dumps({"n": n, "distinct": len(graphs), "shard_size": shard_size}))
    return source


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class _Sampler:
    """Samples each worker's RSS every second with the task it is running: which step peaks."""

    def __init__(self, client):
        self.client = client
        self.peak: dict[str, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                rss = self.client.run(_rss_mib)
                running = self.client.processing()
            except Exception:  # the cluster is closing
                return
            for worker, mib in rss.items():
                tasks = ",".join(
                    sorted({str(k).split("-")[0][:40] for k in running.get(worker, ())})
                )
                if mib > self.peak.get(worker, (0.0, ""))[0]:
                    self.peak[worker] = (mib, tasks)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        return "; ".join(
            f"{mib:.0f} MiB during {tasks or '-'}" for mib, tasks in self.peak.values()
        )


def _worker_usage() -> dict:
    from bench.peak_memory import peak_kib  # VmHWM: ru_maxrss would include the bench's own size

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"max_rss_kb": peak_kib(), "cpu_s": usage.ru_utime + usage.ru_stime}


@contextlib.contextmanager
def local_cluster(workers: int):
    """A LocalCluster of `workers` single-thread processes on loopback, and a client on it; no
    memory limit, so peaks are measured rather than spilled or restarted (bench_scale too)."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=workers,
            processes=True,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
            memory_limit=0,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield cluster, client


def measure_mine(
    n: int,
    work: Path,
    shard_size: int = 10_000,
    workers: int = 2,
    seed: int = 0,
    quality: bool = False,
) -> dict:
    """Mine n captions on a fresh LocalCluster; wall, peak RSS (MiB) and CPU s per row.

    quality: also mine_quality's neg_false_rate and ivf_recall10 of the output (minutes more).
    """
    sys.path.insert(0, str(ROOT))
    from bench.peak_memory import read_report

    source = build_inputs(work, n, shard_size, seed)
    out = work / f"out-{n}"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    report = work / f"launcher-peak-{n}.kib"
    with local_cluster(workers) as (cluster, client):
        command = [
            sys.executable, str(ROOT / "bench" / "peak_memory.py"), str(report), "mine", "--in", str(source), "--out", str(out),
            "--no-progress", "--runner", "DaskRunner", "--dask_client_address",
            cluster.scheduler_address,
        ]  # fmt: skip
        started = time.time()
        with _Sampler(client) as sampler:
            child = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE)
            _, status, launcher = os.wait4(child.pid, 0)
        wall = time.time() - started
        summary = child.stdout.read().decode() if child.stdout else ""
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"vlforge mine failed at n={n}: {summary}")
        used = client.run(_worker_usage)
    launcher_cpu = launcher.ru_utime + launcher.ru_stime
    worker_cpu = sum(u["cpu_s"] for u in used.values())
    manifest = json.loads((out / "manifest.json").read_text())
    figures = {}
    if quality:
        from vlforge.pipeline.mine_eval import mine_quality

        found = mine_quality(str(out), seed)
        figures = {k: found.get(k) for k in ("neg_false_rate", "neg_hardness", "ivf_recall10")}
    shutil.rmtree(out, ignore_errors=True)
    return {
        "n": n,
        "samples_out": manifest["samples"],
        "shards": len(manifest["shards"]),
        "workers": workers,
        "wall_s": round(wall, 1),
        "launcher_peak_mib": round(read_report(report) / 1024),
        "worker_peak_mib": round(max(u["max_rss_kb"] for u in used.values()) / 1024),
        "cpu_s": round(launcher_cpu + worker_cpu, 1),
        "cpu_ms_per_row": round(1000 * (launcher_cpu + worker_cpu) / n, 3),
        "worker_peaks_sampled": sampler.summary(),
        **figures,
    }


def measure_mining(n_captions: int, workdir: Path, **options) -> dict:
    """measure_mine under the name bench/bench_scale.py asks for: n_captions on a fresh
    LocalCluster under workdir → n, wall_s, launcher_peak_mib, worker_peak_mib, cpu_s,
    cpu_ms_per_row (options: shard_size, workers, seed, quality)."""
    return measure_mine(n_captions, Path(workdir), **options)


def record_rows(results: list[dict]) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from bench.results_table import record

    rows = []
    base = next((r for r in results if r["n"] == 100_000), None)
    for r in results:
        flat = ""
        if base is not None and r["n"] > base["n"]:
            flat = f"worker peak {r['worker_peak_mib'] / base['worker_peak_mib']:.2f}x of 100k's"
        rows.append(
            record(
                "mine at scale (DaskRunner)",
                f"{r['n']:,} demo-world captions, {r['shards']} shards, LocalCluster "
                f"{r['workers']} worker processes",
                f"{r['wall_s']} s wall; launcher peak {r['launcher_peak_mib']} MiB, largest "
                f"worker peak {r['worker_peak_mib']} MiB; {r['cpu_ms_per_row']} CPU ms/row"
                + (
                    f"; neg_false_rate {r['neg_false_rate']}, ivf_recall10 {r['ivf_recall10']}"
                    if "neg_false_rate" in r
                    else ""
                ),
                "target: worker peak flat (<= 1.5x) from 100k to 1M",
                flat or "-",
            )
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / "bench" / "work" / "scale-mine"))
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--quality", action="store_true", help="also mine_quality's figures")
    args = parser.parse_args()
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        results.append(
            measure_mine(n, Path(args.work), args.shard_size, args.workers, quality=args.quality)
        )
        print(json.dumps(results[-1]), flush=True)
    if not args.no_record:
        for row in record_rows(results):
            print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
