"""Batched RunInference featurize stage vs a plain per-image loop over the same detector, one run.

Both sides do the same work per image: decode the corpus jpg, extract regions (bottom-up rule,
pooled features, class distribution), encode boxes/feats/cls_prob as .npy and the tags as JSON.
The stage side is the Beam composite (`FeaturizeRegions`, DirectRunner, detector loaded once per
worker by the ModelHandler), timed end to end including pipeline start-up, at 1 worker (the
loop's resources) and at --workers processes. Prints images/s of each and the ratios (target
≥ 1.5x) and appends a line to bench/results.md with the date and the machine.

On CPU the tiny detector is compute-bound (RoIAlign over 300 proposals, the box head, convs), so
batching alone gains little at one thread; the stage's speed-up comes from Beam's workers. Keep
torch at one thread per process on a shared machine: two OpenMP threads stall at every barrier.

    python bench/bench_featurize.py [--n 512] [--batch-size 8] [--workers 2] [--weights PATH]

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
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "featurize"


def machine() -> str:
    load = os.getloadavg()[0]
    return f"{platform.machine()}, {os.cpu_count()} CPUs, load ~{load:.1f} (shared)"


def run_stage(shards: list[str], weights: str, args: argparse.Namespace, workers: int) -> float:
    import apache_beam as beam

    from vlforge.featurize.beam_stage import FeaturizeRegions
    from vlforge.featurize.shards import read_raw_samples
    from vlforge.pipeline.beam_options import build_options

    def read(path: str):
        for sample in read_raw_samples(path):
            yield sample["__key__"], sample

    started = time.perf_counter()
    with beam.Pipeline(options=build_options([], workers)) as pipeline:
        _ = (
            pipeline
            | beam.Create(shards)
            | beam.Reshuffle()  # spread shards over the workers
            | beam.FlatMap(read)
            | FeaturizeRegions(weights, batch_size=args.batch_size, threads=args.threads)
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
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workers", type=int, default=2, help="DirectRunner processes (stage)")
    parser.add_argument("--no-record", action="store_true", help="do not append to results.md")
    args = parser.parse_args(argv)

    import torch

    from vlforge.featurize.detector import build_detector, load_detector, save_detector
    from vlforge.featurize.regions import RegionExtractor, decode_image
    from vlforge.featurize.shards import npy_bytes, read_raw_samples, write_shard
    from vlforge.featurize.tags import object_tags
    from vlforge.featurize.train_detector import CLASS_NAMES, world_example

    def world_sample(i: int) -> dict:
        ex = world_example(21, i)
        return {"__key__": ex.key, "jpg": ex.jpg, "txt": "a caption", "json": "{}"}

    torch.set_num_threads(args.threads)
    weights = args.weights
    if weights is None:
        WORK.mkdir(parents=True, exist_ok=True)
        weights = str(WORK / "random-tiny.pt")
        torch.manual_seed(0)
        from vlforge.featurize.detector import DetectorConfig

        save_detector(build_detector(CLASS_NAMES), weights, CLASS_NAMES, DetectorConfig())
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

    # Plain loop: one image per forward, the same model file, the same outputs.
    started = time.perf_counter()
    model, meta = load_detector(weights)
    extractor = RegionExtractor(model, meta["class_names"])
    regions_loop = 0
    for sample in (x for path in shards for x in read_raw_samples(path)):
        image, reason = decode_image(sample["jpg"])
        (regions,) = extractor.extract([image], [reason])
        encoded = (npy_bytes(regions.boxes), npy_bytes(regions.feats), npy_bytes(regions.cls_prob))
        json.dumps(object_tags(regions, meta["class_names"]))
        regions_loop += len(regions) + 0 * len(encoded)
    loop_s = time.perf_counter() - started

    # The stage: RunInference batches through the ModelHandler; once with the same single
    # worker as the loop, once with Beam's own parallelism (DirectRunner processes).
    stage_s = {workers: run_stage(shards, weights, args, workers) for workers in (1, args.workers)}

    loop_rate = args.n / loop_s
    rates = {w: args.n / s for w, s in stage_s.items()}
    print(f"per-image loop: {loop_rate:.1f} images/s ({loop_s:.1f}s, {regions_loop} regions)")
    for w, rate in rates.items():
        print(
            f"RunInference stage, batch {args.batch_size}, {w} worker(s): {rate:.1f} images/s "
            f"({stage_s[w]:.1f}s) = {rate / loop_rate:.2f}x the loop"
        )
    ratio = rates[args.workers] / loop_rate
    print(f"ratio: {ratio:.2f}x with {args.workers} worker(s) (target >= 1.5x)")
    if not args.no_record:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        setup = (
            f"{args.n} demo-world 256 px jpgs in {args.shards} shards, {meta.get('backbone')} Faster R-CNN, "
            f"{args.threads} torch thread(s), decode + regions + npy/tags encode"
        )
        line = (
            f"| {now} | {machine()} | featurize: RunInference vs per-image loop | {setup} | "
            f"stage (batch {args.batch_size}) {rates[args.workers]:.1f} images/s with {args.workers} "
            f"workers, {rates[1]:.1f} with 1 | loop {loop_rate:.1f} images/s | "
            f"{ratio:.2f}x ({rates[1] / loop_rate:.2f}x at 1 worker) |\n"
        )
        results = ROOT / "bench" / "results.md"
        with results.open("a") as handle:
            handle.write(line)
        print(f"appended to {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
