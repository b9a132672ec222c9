"""Crawl the same loopback URL list with `vlforge corpus` and with img2dataset, in one run.

Same list, image size, resize mode, output format, process and thread counts. The images are
demo-world renders written once to bench/work and served as static files by a separate process,
so neither crawler pays for rendering. Prints images/s of each and the ratio, and appends a line
to bench/results.md with the date and the machine.

    python bench/bench_corpus.py [--n 20000] [--processes 2] [--threads 32]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import multiprocessing
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from results_table import record  # noqa: E402

WORK = ROOT / "bench" / "work"


def render_images(n: int, directory: Path) -> None:
    from vlforge.world.render import render_scene
    from vlforge.world.scene import sample_scene

    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = directory / f"{i}.jpg"
        if not path.exists():
            render_scene(sample_scene(7, i)).save(path, quality=90)


def serve(directory: Path, port: int) -> None:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    server.request_queue_size = 1024
    server.serve_forever()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def count_tar_samples(directory: Path) -> int:
    import tarfile

    total = 0
    for tar in directory.glob("*.tar"):
        with tarfile.open(tar) as handle:
            total += sum(1 for m in handle.getmembers() if m.name.endswith(".jpg"))
    return total


def run_vlforge(urls: Path, out: Path, processes: int, threads: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        str(ROOT / ".venv" / "bin" / "vlforge"), "corpus", "--urls", str(urls), "--out", str(out),
        "--workers", str(processes), "--threads", str(threads), "--allow-private", "127.0.0.0/8",
        "--image-size", "256", "--resize-mode", "border", "--timeout", "10", "--retries", "0",
        "--no-progress", "--chunk-size", "1000",
        # img2dataset has no per-host cap; ours (16 by default) would halve concurrency against
        # the one loopback host, so it is set to the thread count for a like-for-like run.
        "--per-host", str(threads),
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started, count_tar_samples(out)


def run_img2dataset(urls: Path, out: Path, processes: int, threads: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    code = (
        "import os; os.environ['NO_ALBUMENTATIONS_UPDATE']='1'\n"
        "from img2dataset import download\n"
        f"download(url_list={str(urls)!r}, output_folder={str(out)!r}, input_format='parquet',"
        " url_col='url', caption_col='caption', output_format='webdataset', image_size=256,"
        f" resize_mode='border', processes_count={processes}, thread_count={threads},"
        " timeout=10, retries=0, number_sample_per_shard=10000, enable_wandb=False,"
        " distributor='multiprocessing')\n"
    )
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - started, count_tar_samples(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    args = parser.parse_args()

    images = WORK / "images"
    print(f"rendering {args.n} world images once into {images} ...", flush=True)
    render_images(args.n, images)
    port = free_port()
    server = multiprocessing.Process(target=serve, args=(images, port), daemon=True)
    server.start()
    time.sleep(0.5)  # not a correctness wait: the first request of each crawler retries anyway
    urls = WORK / "urls.parquet"
    pq.write_table(
        pa.table(
            {
                "url": [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(args.n)],
                "caption": [f"world image number {i} with coloured shapes" for i in range(args.n)],
            }
        ),
        urls,
    )
    try:
        i2d_s, i2d_n = run_img2dataset(urls, WORK / "img2dataset", args.processes, args.threads)
        vl_s, vl_n = run_vlforge(urls, WORK / "vlforge", args.processes, args.threads)
    finally:
        server.terminate()
    vl_rate, i2d_rate = vl_n / vl_s, i2d_n / i2d_s
    ratio = vl_rate / i2d_rate
    print(f"img2dataset: {i2d_n} images in {i2d_s:.1f} s = {i2d_rate:.0f} img/s")
    print(f"vlforge    : {vl_n} images in {vl_s:.1f} s = {vl_rate:.0f} img/s")
    print(f"ratio vlforge / img2dataset = {ratio:.2f}x")
    record(
        "corpus crawl",
        f"{args.n} loopback URLs, {args.processes} proc x {args.threads} threads, 256 px border",
        f"vlforge {vl_rate:.0f} img/s",
        f"img2dataset {i2d_rate:.0f} img/s",
        f"{ratio:.2f}x",
    )
    print(json.dumps({"vlforge_img_s": vl_rate, "img2dataset_img_s": i2d_rate, "ratio": ratio}))


if __name__ == "__main__":
    main()
