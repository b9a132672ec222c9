"""`make gpu-check`: a short check that training and featurize run on a CUDA GPU (a few minutes).

On 64 demo-world images it runs, each with its throughput printed as one JSON line:
  1. featurize (the stage's public API, `featurize_shards`, on the GPU) with a random tiny
     detector: the 64 images get their regions;
  2. train steps of three recipes on the featurized shards through the trainer (`uniter`: regions,
     `clip`: pixels, `vilt`: pixels + text), bf16 autocast where the GPU has it;
  3. ZeRO-3 (FSDP2, parameters resharded after forward) of `uniter` on the one GPU.
Without a GPU it fails at once with one line. `--device cpu` runs the same code on the CPU (slowly,
fewer steps), to check the script itself on a machine without one.

    .venv/bin/python bench/gpu_check.py [--steps 20] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

RECIPES = ("uniter", "clip", "vilt")
IMAGES = 64


def say(check: str, **figures: object) -> None:
    print(json.dumps({"check": check, **figures}, sort_keys=True), flush=True)


def world_shards(root: Path, n: int) -> str:
    """n demo-world images with a caption naming their objects, in two corpus-style shards;
    returns their directory."""
    from vlforge.featurize.shards import write_shard
    from vlforge.featurize.train_detector import world_example
    from vlforge.world.scene import sample_scene

    root.mkdir(parents=True)
    half = n // 2
    for s, rows in enumerate([range(half), range(half, n)]):
        samples = []
        for i in rows:
            ex, scene = world_example(31, i), sample_scene(31, i)
            caption = " and ".join(f"a {o.size} {o.colour} {o.shape}" for o in scene.objects)
            samples.append({"__key__": ex.key, "jpg": ex.jpg, "txt": caption, "json": "{}"})
        write_shard(str(root / f"world-{s:06d}.tar"), samples)
    return str(root)  # featurize takes a directory or a glob (no brace ranges)


def featurize(pattern: str, out: Path, work: Path, device: str) -> str:
    from vlforge.featurize.beam_stage import featurize_shards
    from vlforge.featurize.detector import DetectorConfig, build_detector, save_detector
    from vlforge.featurize.train_detector import CLASS_NAMES

    weights = str(work / "random-tiny.pt")
    torch.manual_seed(0)  # speed does not depend on what the weights learned
    save_detector(build_detector(CLASS_NAMES), weights, CLASS_NAMES, DetectorConfig())
    started = time.perf_counter()
    featurize_shards(pattern, str(out), weights, batch_size=16, device=device)
    seconds = time.perf_counter() - started
    say("featurize", images=IMAGES, seconds=round(seconds, 2), images_per_s=IMAGES / seconds)
    return str(out / "world-{000000..000001}.tar")


def train(recipe: str, shards: str, out: Path, steps: int, device: str) -> None:
    from vlforge.train.trainer import TrainConfig, run

    cfg = TrainConfig(
        recipe=recipe, shards=shards, out=str(out), steps=steps, batch_size=16, lr=1e-4,
        workers=2, log_every=max(1, steps // 2), progress=False, vocab_size=500, device=device,
        shuffle_buffer=64,
    )  # fmt: skip
    summary = run(cfg)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    say(
        f"train {recipe}",
        steps=summary["steps"],
        loss=summary["loss"],
        samples_per_s=records[-1]["samples_per_s"],  # the last window: warm-up excluded
        precision="bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32",
    )


def zero3(shards: str, run_dir: Path, steps: int, device: str) -> None:
    """FSDP2 on a one-rank mesh: the sharding code runs (gather, reshard, reduce) on one GPU."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from vlforge.train import trainer
    from vlforge.train.device import backend_for, pick_device
    from vlforge.train.distributed import DistInfo, free_port
    from vlforge.train.parallel.zero import apply_fsdp
    from vlforge.train.schedule import build_scheduler
    from vlforge.train.tokenizer import load_tokenizer

    dev = pick_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group(backend_for(dev), rank=0, world_size=1)
    try:
        cfg = trainer.TrainConfig(
            recipe="uniter", shards=shards, out=str(run_dir), batch_size=16, workers=2, zero=3,
            shuffle_buffer=64,
        )  # fmt: skip
        tok = load_tokenizer(run_dir / "tokenizer.json")
        urls = trainer.expand_shards(shards)
        probe = trainer.build_recipe("uniter", "small", tok.vocab_size)
        spec = trainer.batch_spec(probe, cfg)
        sized = trainer.data_overrides(trainer.first_sample(urls, spec.fields()[1]))
        model = trainer.build_recipe("uniter", "small", tok.vocab_size, **sized).to(dev)
        model = apply_fsdp(model, init_device_mesh(dev.type, (1,), mesh_dim_names=("dp",)), 3)
        optimizer = trainer.build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, "constant", 0, steps, 0.0)
        batches = iter(trainer.make_loader(cfg, urls, spec, tok, DistInfo(device=dev), None))
        step = lambda: trainer.train_step(  # noqa: E731
            model, optimizer, scheduler, [next(batches)], "auto", 1.0, dev
        )
        step()  # the first step compiles kernels and allocates: not timed
        if dev.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps - 1):
            metrics = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
        say(
            "zero3 uniter",
            steps=steps,
            loss=metrics["loss"],
            samples_per_s=cfg.batch_size * (steps - 1) / seconds,
            peak_mib=peak,
        )
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("vlforge: error: gpu-check needs a CUDA GPU and torch sees none", file=sys.stderr)
        return 2
    if args.device == "cuda":
        say("device", name=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlforge-gpu-check-") as tmp:
        work = Path(tmp)
        raw = world_shards(work / "raw", IMAGES)
        shards = featurize(raw, work / "featurized", work, args.device)
        for recipe in RECIPES:
            train(recipe, shards, work / f"run-{recipe}", args.steps, args.device)
        zero3(shards, work / "run-uniter", args.steps, args.device)
    say("total", seconds=round(time.perf_counter() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
