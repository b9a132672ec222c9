"""Training loader samples/s against what a training step consumes, in one run.

Writes featurized-looking shards once to bench/work/loader (256 px jpg, 10–100 regions of 1024-d
float16 features, 91-class cls_prob, mine.json), then measures:
- the loader (decode, tokenize, mask, assemble) for a UNITER-style batch (regions, 7-d geometry,
  sampled MLM/MRC/ITM) and a CLIP-style batch (224 px pixels), at 0, 1 and 2 workers;
- the training step of the `uniter` and `clip` recipes (--size) on batches already in memory;
  the loader is measured with the batch spec that recipe's training would use.
The loader keeps up when its samples/s at the workers used is above the step's. Appends a line
per recipe to bench/results.md with the date and the machine.

    python bench/bench_train_loader.py [--batch-size 32] [--batches 20] [--steps 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from vlforge.train.collate import Assembler, BatchSpec
from vlforge.train.data import Loader, StreamConfig, expand_shards
from vlforge.train.tokenizer import corpus_captions, train_wordpiece

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "loader"
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon"]


def write_shards(n_shards: int, per_shard: int, feat_dim: int = 1024, classes: int = 91) -> str:
    pattern = str(WORK / f"bench-{{000000..{n_shards - 1:06d}}}.tar")
    if all((WORK / f"bench-{s:06d}.tar").is_file() for s in range(n_shards)):
        return pattern  # written by an earlier run
    WORK.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(n_shards):
        with wds.TarWriter(str(WORK / f"bench-{s:06d}.tar")) as w:
            for i in range(per_shard):
                arr = rng.integers(0, 255, size=(256, 256, 3), dtype=np.uint8)
                arr[::2] //= 2  # some structure, so JPEG sizes are realistic, not noise-sized
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="JPEG", quality=90)
                n = int(rng.integers(10, 101))
                xy = rng.uniform(0, 200, size=(n, 2))
                boxes = np.concatenate([xy, xy + rng.uniform(8, 56, size=(n, 2))], 1)
                prob = rng.dirichlet(np.ones(classes), size=n)
                c, sh = COLOURS[rng.integers(6)], SHAPES[rng.integers(5)]
                caption = f"a {c} {sh} next to a {COLOURS[rng.integers(6)]} {SHAPES[rng.integers(5)]} on a textured background"
                w.write(
                    {
                        "__key__": f"b{s:03d}{i:05d}",
                        "jpg": buf.getvalue(),
                        "txt": caption,
                        "json": {"width": 256, "height": 256},
                        "boxes.npy": boxes.astype(np.float32),
                        "feats.npy": rng.normal(size=(n, feat_dim)).astype(np.float16),
                        "cls_prob.npy": prob.astype(np.float16),
                        "mine.json": {
                            "hard_negatives": [{"caption": "a blue star", "key": "x", "score": 0.4}]
                        },
                    }
                )
    return pattern


def loader_rate(pattern, spec, tok, batch_size, workers, batches) -> float:
    fields, required = spec.fields()
    cfg = StreamConfig(tuple(expand_shards(pattern)), seed=0, shuffle_buffer=256)
    loader = Loader(
        cfg, Assembler(spec, tok), batch_size, num_workers=workers, fields=fields, required=required
    )
    it = iter(loader)
    next(it)  # worker start-up and first shard open are not throughput
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batch_size * batches / (time.perf_counter() - t)


def recipe_and_spec(name: str, size: str, tok, fallback: BatchSpec):
    """The recipe (None without train/recipes) and the batch spec the trainer would use."""
    try:
        from vlforge.train.recipes import build_recipe
    except ImportError:
        return None, fallback
    from vlforge.train.trainer import TrainConfig, batch_spec

    torch.manual_seed(0)
    sized = {"region_dim": 1024, "num_region_classes": 91}
    recipe = build_recipe(name, size=size, vocab_size=tok.vocab_size, **sized)
    return recipe, batch_spec(recipe, TrainConfig(recipe=name, shards="-", out="-"))


def step_rate(recipe, spec, pattern, tok, batch_size, steps) -> float:
    """Samples/s of the training step alone, on batches already assembled."""
    from vlforge.train.schedule import build_scheduler
    from vlforge.train.trainer import TrainConfig, build_optimizer, train_step

    fields, required = spec.fields()
    cfg = StreamConfig(tuple(expand_shards(pattern)))
    loader = Loader(cfg, Assembler(spec, tok), batch_size, fields=fields, required=required)
    it = iter(loader)
    batches = [next(it) for _ in range(steps + 1)]
    opt = build_optimizer(recipe, TrainConfig(recipe=recipe.name, shards="-", out="-"))
    sched = build_scheduler(opt, "constant", 0, steps)
    cpu = torch.device("cpu")
    train_step(recipe, opt, sched, [batches[0]], "fp32", 1.0, cpu)  # warm-up
    t = time.perf_counter()
    for b in batches[1:]:
        train_step(recipe, opt, sched, [b], "fp32", 1.0, cpu)
    return batch_size * steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=400)
    ap.add_argument("--size", default="small", help="recipe size for the training step")
    args = ap.parse_args()
    pattern = write_shards(args.shards, args.per_shard)
    tok = train_wordpiece(corpus_captions(expand_shards(pattern), 2000), vocab_size=1000)
    specs = {
        "uniter": BatchSpec(
            inputs=frozenset({"text", "regions"}), tasks={"mlm": 1, "mrc": 1, "itm": 1},
            task_mode="sample", geometry=7, max_regions=100,
        ),
        "clip": BatchSpec(inputs=frozenset({"text", "pixels"}), tasks={"contrastive": 1}, image_size=224),
    }  # fmt: skip
    results = ROOT / "bench" / "results.md"
    if not results.exists():
        results.write_text(
            "# Benchmarks\n\n| date | machine | bench | setup | ours | peer | ratio |\n"
            "|---|---|---|---|---|---|---|\n"
        )
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"
    summary = {}
    for name, fallback in specs.items():
        recipe, spec = recipe_and_spec(name, args.size, tok, fallback)
        rates = {
            w: loader_rate(pattern, spec, tok, args.batch_size, w, args.batches) for w in (0, 1, 2)
        }
        step = (
            step_rate(recipe, spec, pattern, tok, args.batch_size, args.steps) if recipe else None
        )
        for w, r in rates.items():
            print(f"{name}: loader {w} workers {r:.0f} samples/s")
        print(f"{name}: training step " + (f"{step:.0f} samples/s" if step else "n/a (no recipes)"))
        best = max(rates.values())
        ratio = f"{best / step:.2f}x" if step else "n/a"
        visual = (
            f"{spec.max_regions} regions max, 1024-d"
            if "regions" in spec.inputs
            else f"{spec.image_size} px"
        )
        line = (
            f"| {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC | {machine} | train loader vs step ({name} {args.size}) | "
            f"batch {args.batch_size}, {visual}, tasks {'/'.join(spec.tasks)}; "
            f"loader at 0/1/2 workers {rates[0]:.0f}/{rates[1]:.0f}/{rates[2]:.0f} samples/s | "
            f"loader {best:.0f} samples/s | step "
            + (f"{step:.0f} samples/s" if step else "n/a")
            + f" | {ratio} |"
        )
        with results.open("a") as handle:
            handle.write(line + "\n")
        summary[name] = {"loader_samples_s": rates, "step_samples_s": step}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
