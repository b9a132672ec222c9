"""Batched RunInference featurize stage vs a plain per-image loop over the same detector, one run.

Both sides do the same work per image: decode the corpus jpg, extract regions (bottom-up rule,
pooled features, class distribution), encode boxes/feats/cls_prob as .npy and the tags as JSON.

* Loop (the peer): the detector as a person would write it, `load_detector` → `model.eval()`,
  one image per `RegionExtractor.extract` call under `torch.inference_mode`, timed at 1 torch
  thread and at --workers torch threads; the faster of the two is the peer.
* Stage: `ReadShards` → `FeaturizeRegions` on the DirectRunner, timed end to end including
  pipeline and worker start-up and model loads, at 1 worker and at --workers workers, both as
  threads (what `vlforge featurize --workers N` does) and as processes (each imports torch and
  loads the detector itself). What the stage does differently from the loop: batches of
  --batch-size images per forward, (shard, part) work items spread over the workers, and the
  detector rewritten for CPU inference once per worker (`optimize_for_inference`: Conv+BN
  folded, channels-last convs, RoIAlign as one gather; same outputs to float16, see
  tests/test_featurize_stage.py). The threaded stage with the plain model is timed too, to
  show what parallelism alone gives.

Every measurement is repeated --repeats times, interleaved, and the median is reported (the
machine is shared; min..max are printed), with the CPU-ms per image each variant spent (all its
threads and worker processes), which load distorts far less than the wall clock. Before each
round the bench measures how many cores --workers busy threads actually get: with the kernel's
autogroup scheduling (/proc/sys/kernel/sched_autogroup_enabled) CPU time is shared per session,
so while any other session is busy this benchmark gets about one of two cores however many
workers it starts, and the worker variants cannot show their parallelism. The load average and
the usable cores go into the results row.
Prints images/s and the ratio to the faster loop (target >= 1.5x), and appends a row to
bench/results.md with the date and the machine.

    python bench/bench_featurize.py [--n 512] [--batch-size 8] [--workers 2] [--repeats 3]
        [--weights PATH]

Without --weights a randomly initialised demo detector is used: speed does not depend on what
the weights learned (the 10..100 box rule caps the work either way).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "featurize"


def cpu_seconds() -> float:
    """User + system CPU of this process and of its finished children (worker processes)."""
    me, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def usable_cores(threads: int, seconds: float = 1.5) -> float:
    """CPU-seconds per second that `threads` busy threads get right now (at most `threads`).

    Each runs one-thread convolutions, which release the GIL, so on an idle machine the answer
    is min(threads, CPUs); less means other work (or the scheduler's per-session share) takes
    the rest.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    x, w = torch.randn(1, 32, 64, 64), torch.randn(32, 32, 3, 3)
    stop = time.perf_counter() + seconds

    def spin() -> None:
        with torch.inference_mode():
            while time.perf_counter() < stop:
                torch.nn.functional.conv2d(x, w, padding=1)

    workers = [threading.Thread(target=spin) for _ in range(threads)]
    cpu, wall = time.process_time(), time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    got = (time.process_time() - cpu) / (time.perf_counter() - wall)
    torch.set_num_threads(before)
    return got


def machine(loads: list[float], cores: list[float], workers: int) -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, load {min(loads):.1f}..{max(loads):.1f}"
        f" (shared), {workers} busy threads got {min(cores):.1f}..{max(cores):.1f} cores"
    )


def run_loop(shards: list[str], weights: str, threads: int) -> float:
    """Seconds for the plain per-image loop, model load included."""
    import torch

    from vlforge.featurize.detector import load_detector
    from vlforge.featurize.regions import RegionExtractor, decode_image
    from vlforge.featurize.shards import npy_bytes, read_raw_samples
    from vlforge.featurize.tags import object_tags

    torch.set_num_threads(threads)
    started = time.perf_counter()
    model, meta = load_detector(weights)
    extractor = RegionExtractor(model.eval(), meta["class_names"])  # extract: inference_mode
    for sample in (x for path in shards for x in read_raw_samples(path)):
        image, reason = decode_image(sample["jpg"])
        (regions,) = extractor.extract([image], [reason])
        _ = (npy_bytes(regions.boxes), npy_bytes(regions.feats), npy_bytes(regions.cls_prob))
        json.dumps(object_tags(regions, meta["class_names"], meta.get("attribute_names")))
    return time.perf_counter() - started


def run_stage(
    shards: list[str],
    weights: str,
    args: argparse.Namespace,
    workers: int,
    threads: bool = True,
    optimize: bool = True,
) -> float:
    """Seconds for the Beam stage end to end: pipeline start, worker start-up, model loads."""
    import apache_beam as beam

    from vlforge.featurize.beam_stage import (
        FeaturizeRegions,
        ReadShards,
        parts_per_shard,
        use_worker_threads,
    )
    from vlforge.pipeline.beam_options import build_options

    parts = parts_per_shard(len(shards), workers)
    options = build_options([], workers)  # in-memory at 1, multi-processing above
    if threads:
        options = use_worker_threads(options)
    started = time.perf_counter()
    with beam.Pipeline(options=options) as pipeline:
        _ = (
            pipeline
            | ReadShards(shards, parts)
            | FeaturizeRegions(
                weights, batch_size=args.batch_size, threads=args.threads, optimize=optimize
            )
            | beam.combiners.Count.Globally()
        )
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per stage worker")
    parser.add_argument("--workers", type=int, default=2, help="DirectRunner workers (stage)")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs each")
    parser.add_argument("--no-record", action="store_true", help="do not append to results.md")
    args = parser.parse_args(argv)

    import torch

    from vlforge.featurize.detector import DetectorConfig, build_detector, save_detector
    from vlforge.featurize.shards import write_shard
    from vlforge.featurize.train_detector import CLASS_NAMES, world_example

    def world_sample(i: int) -> dict:
        ex = world_example(21, i)
        return {"__key__": ex.key, "jpg": ex.jpg, "txt": "a caption", "json": "{}"}

    weights = args.weights
    if weights is None:
        WORK.mkdir(parents=True, exist_ok=True)
        weights = str(WORK / "random-tiny.pt")
        torch.manual_seed(0)
        save_detector(build_detector(CLASS_NAMES), weights, CLASS_NAMES, DetectorConfig())
    backbone = json.loads(Path(weights + ".json").read_text()).get("backbone", "?")
    # Shards as the corpus writes them; both sides read them (Beam would otherwise pickle and
    # bz2-compress in-memory inputs into the pipeline graph, a cost no real run pays).
    shard_dir = WORK / "in"
    shard_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    per_shard = math.ceil(args.n / args.shards)
    for s in range(args.shards):
        path = str(shard_dir / f"bench-{s:06d}.tar")
        rows = range(s * per_shard, min(args.n, (s + 1) * per_shard))
        write_shard(path, [world_sample(i) for i in rows])
        shards.append(path)

    w = args.workers
    runs: dict[str, Callable[[], float]] = {
        "loop, 1 thread": lambda: run_loop(shards, weights, 1),
        f"loop, {w} threads": lambda: run_loop(shards, weights, w),
        "stage, 1 worker": lambda: run_stage(shards, weights, args, 1),
        f"stage, {w} threads": lambda: run_stage(shards, weights, args, w),
        f"stage, {w} processes": lambda: run_stage(shards, weights, args, w, threads=False),
        f"stage, {w} threads, plain model": lambda: run_stage(
            shards, weights, args, w, optimize=False
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    loads = [os.getloadavg()[0]]
    cores: list[float] = []
    for _ in range(args.repeats):  # interleaved, so a burst of load hits every variant alike
        cores.append(usable_cores(w))
        for name, run in runs.items():
            cpu_before = cpu_seconds()
            seconds[name].append(run())
            cpu[name].append(cpu_seconds() - cpu_before)
            loads.append(os.getloadavg()[0])
    rate = {name: args.n / statistics.median(s) for name, s in seconds.items()}
    # CPU-ms per image (all threads and worker processes): what each variant costs, which a
    # loaded machine distorts far less than the wall clock.
    cost = {name: 1000 * statistics.median(c) / args.n for name, c in cpu.items()}
    for name, s in seconds.items():
        spread = f"{args.n / max(s):.1f}..{args.n / min(s):.1f}"
        print(
            f"{name:32s} {rate[name]:6.1f} images/s (median of {len(s)}; {spread}), "
            f"{cost[name]:5.1f} CPU-ms/image"
        )
    loop1, loop_w = rate["loop, 1 thread"], rate[f"loop, {w} threads"]
    peer_name = "loop, 1 thread" if loop1 >= loop_w else f"loop, {w} threads"
    peer = max(loop1, loop_w)
    ours = rate[f"stage, {w} threads"]
    ratio = ours / peer
    print(
        f"ratio: {ratio:.2f}x the faster loop ({peer_name}) with {w} worker threads, "
        f"{rate[f'stage, {w} processes'] / peer:.2f}x with {w} processes (target >= 1.5x)"
    )
    print(f"load average (1 min) during the run: {min(loads):.1f}..{max(loads):.1f}")
    print(f"{w} busy threads got {min(cores):.2f}..{max(cores):.2f} cores (before each round)")
    if not args.no_record:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        setup = (
            f"{args.n} demo-world 256 px jpgs in {args.shards} shards, {backbone} Faster R-CNN, "
            f"decode + regions + npy/tags encode; median of {args.repeats}; stage: batch "
            f"{args.batch_size}, {args.threads} torch thread(s) per worker, "
            "optimize_for_inference (BN folded, channels-last, gather RoIAlign), start-up included"
        )
        line = (
            f"| {now} | {machine(loads, cores, w)} | featurize: RunInference vs per-image loop | {setup} | "
            f"stage {ours:.1f} images/s with {w} worker threads, "
            f"{rate[f'stage, {w} processes']:.1f} with {w} processes, "
            f"{rate['stage, 1 worker']:.1f} with 1 worker, "
            f"{rate[f'stage, {w} threads, plain model']:.1f} with {w} threads and the plain model | "
            f"loop {loop1:.1f} images/s at 1 torch thread, {loop_w:.1f} at {w} | "
            f"{ratio:.2f}x the faster loop (CPU-ms/image: stage {cost[f'stage, {w} threads']:.1f}, "
            f"loop {cost['loop, 1 thread']:.1f}) |\n"
        )
        results = ROOT / "bench" / "results.md"
        with results.open("a") as handle:
            handle.write(line)
        print(f"appended to {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
