"""CPU per image of the bytes -> stored JPEG step: ours against img2dataset's Resizer.

One thread, the same bytes for both, process CPU time (not wall time: the machine is shared).
The two sets of bench_corpus.py: demo-world renders (JPEG q90, as the bench serves them) and
real-photo-sized JPEGs (bench/photo_samples.py). Prints one JSON line per set.

    OMP_NUM_THREADS=1 python bench/bench_image_cpu.py [--n 200] [--image-size 256] [--mode border]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from photo_samples import real_photo_jpegs  # noqa: E402

from vlforge.pipeline.image_processing import (  # noqa: E402
    ImageProcessor,
    ResizeConfig,
    perceptual_hash,
)


def world_jpegs(n: int) -> list[bytes]:
    from vlforge.world.render import render_scene
    from vlforge.world.scene import sample_scene

    out = []
    for i in range(n):
        buf = io.BytesIO()
        render_scene(sample_scene(7, i)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def img2dataset_resizer(size: int, mode: str):
    package = importlib.util.find_spec("img2dataset")
    path = Path(list(package.submodule_search_locations)[0]) / "resizer.py"
    spec = importlib.util.spec_from_file_location("_i2d_resizer_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Resizer(image_size=size, resize_mode=mode, resize_only_if_bigger=False)


def cpu_ms(fn, datas: list[bytes], repeat: int = 3) -> float:
    """Best of `repeat` passes, CPU ms per image."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for data in datas:
            fn(data)
        best = min(best, time.process_time() - started)
    return 1000 * best / len(datas)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--mode", default="border")
    args = parser.parse_args()
    ours = ImageProcessor(ResizeConfig(image_size=args.image_size, resize_mode=args.mode))
    resizer = img2dataset_resizer(args.image_size, args.mode)

    def i2d(data: bytes) -> None:
        jpg = resizer(io.BytesIO(data))[0]
        assert jpg is not None

    def i2d_and_hash(data: bytes) -> None:  # what vlforge did before: Resizer, then hash its JPEG
        perceptual_hash(resizer(io.BytesIO(data))[0])

    for name, datas in (("world", world_jpegs(args.n)), ("photos", real_photo_jpegs(args.n))):
        line = {
            "set": name,
            "n": len(datas),
            "image_size": args.image_size,
            "mode": args.mode,
            "ours_ms": round(cpu_ms(ours.process, datas), 2),
            "img2dataset_resizer_ms": round(cpu_ms(i2d, datas), 2),
            "before_ms (resizer + phash of its jpeg)": round(cpu_ms(i2d_and_hash, datas), 2),
        }
        line["speedup_vs_resizer"] = round(line["img2dataset_resizer_ms"] / line["ours_ms"], 2)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
