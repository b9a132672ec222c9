"""Crawl the same URL list with `vlforge corpus` and with img2dataset, in one run, on two image sets.

Same list, image size, resize mode, output format, process and thread counts, same nginx. The
sets: the demo world's renders, and real-photo-sized JPEGs (500–2000 px on the long side, cut and
scaled from real photos that installed packages ship). Both are written once to bench/work and
served as static files by nginx (Debian's, started and stopped here), so the server is not what
is measured. Each set prints one JSON line with its "ratio" (vlforge images/s over img2dataset's)
and appends a row to bench/results.md with the date and the machine. vlforge's count is its
stored samples plus the rows it fetched and resized but marked as duplicate images (work that
img2dataset, which does not deduplicate, would have stored).

    python bench/bench_corpus.py [--world 20000] [--photos 5000] [--processes 2] [--threads 32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from results_table import record  # noqa: E402

WORK = ROOT / "bench" / "work"
IMAGE_DUPLICATES = ("duplicate_image", "near_duplicate_image")
NGINX_CONF = """
worker_processes 2;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    types {{ image/jpeg jpg; }}
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {root};
    }}
}}
"""


def render_world(n: int, directory: Path) -> None:
    from vlforge.world.render import render_scene
    from vlforge.world.scene import sample_scene

    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = directory / f"{i}.jpg"
        if not path.exists():
            render_scene(sample_scene(7, i)).save(path, quality=90)


def write_photos(n: int, directory: Path) -> None:
    from photo_samples import real_photo_jpegs

    directory.mkdir(parents=True, exist_ok=True)
    if len(list(directory.glob("*.jpg"))) >= n:
        return
    for i, data in enumerate(real_photo_jpegs(n, min_side=500, max_side=2000, seed=0)):
        (directory / f"{i}.jpg").write_bytes(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def nginx(root: Path):
    """Debian's nginx serving `root` on a free loopback port, stopped on exit."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise SystemExit("bench_corpus: nginx is not installed (`make bench` installs it)")
    with tempfile.TemporaryDirectory(prefix="vlforge-nginx-") as tmp:
        port = free_port()
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, root=root))
        proc = subprocess.Popen([binary, "-c", str(conf), "-p", tmp, "-e", f"{tmp}/error.log"])
        try:
            _wait_until_serving(f"http://127.0.0.1:{port}/0.jpg", proc)
            yield port
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _wait_until_serving(url: str, proc: subprocess.Popen) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise SystemExit(f"bench_corpus: nginx exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("bench_corpus: nginx did not start serving")


def count_tar_samples(directory: Path) -> int:
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
    seconds = time.perf_counter() - started
    # img2dataset does not deduplicate: rows we fetched and resized, then marked as duplicate
    # images, are the same work as its stored ones (the photo set, cut from three photos, has
    # many near duplicates). Captions are unique, so no row is a caption duplicate.
    reasons = json.loads((out / "manifest.json").read_text())["reason_counts"]
    duplicates = sum(reasons.get(f"duplicate:{r}", 0) for r in IMAGE_DUPLICATES)
    return seconds, count_tar_samples(out) + duplicates


def run_img2dataset(urls: Path, out: Path, processes: int, threads: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    code = (
        "import os; os.environ['NO_ALBUMENTATIONS_UPDATE']='1'\n"
        "from img2dataset import download\n"
        f"download(url_list={str(urls)!r}, output_folder={str(out)!r}, input_format='parquet',"
        " url_col='url', caption_col='caption', output_format='webdataset', image_size=256,"
        f" resize_mode='border', processes_count={processes}, thread_count={threads},"
        " timeout=10, retries=0, number_sample_per_shard=1000, enable_wandb=False,"
        " distributor='multiprocessing')\n"
    )
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - started, count_tar_samples(out)


def bench_set(name: str, images: Path, n: int, args: argparse.Namespace) -> dict:
    """Both crawlers on one image set, alternating over `--rounds`; the best time of each."""
    times: dict[str, list[float]] = {"vlforge": [], "img2dataset": []}
    counts: dict[str, int] = {}
    with nginx(images) as port:
        urls = WORK / f"urls-{name}.parquet"
        pq.write_table(
            pa.table(
                {
                    "url": [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(n)],
                    "caption": [f"{name} image number {i} with things in it" for i in range(n)],
                }
            ),
            urls,
        )
        for round_ in range(args.rounds):
            order = [("img2dataset", run_img2dataset), ("vlforge", run_vlforge)]
            for tool, run in order if round_ % 2 == 0 else order[::-1]:
                seconds, count = run(urls, WORK / f"{tool}-{name}", args.processes, args.threads)
                times[tool].append(seconds)
                counts[tool] = count
                print(f"  {name:7s} {tool:11s} {count} images in {seconds:.1f} s", flush=True)
    rates = {tool: counts[tool] / min(times[tool]) for tool in times}
    ratio = rates["vlforge"] / rates["img2dataset"]
    line = {
        "set": name,
        "n": n,
        "vlforge_img_s": round(rates["vlforge"], 1),
        "img2dataset_img_s": round(rates["img2dataset"], 1),
        "vlforge_images": counts["vlforge"],  # stored + image duplicates
        "img2dataset_images": counts["img2dataset"],
        "ratio": round(ratio, 3),
    }
    record(
        f"corpus crawl ({name})",
        f"{n} {name} JPEGs from nginx on loopback, {args.processes} proc x {args.threads} "
        f"threads, 256 px border, best of {args.rounds}",
        f"vlforge {rates['vlforge']:.0f} img/s",
        f"img2dataset {rates['img2dataset']:.0f} img/s",
        f"{ratio:.2f}x",
    )
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=20_000, help="demo-world images")
    parser.add_argument("--photos", type=int, default=5_000, help="real-photo-sized JPEGs")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each crawler per set")
    args = parser.parse_args()

    sets = []
    if args.world:
        print(f"rendering {args.world} world images once into bench/work ...", flush=True)
        render_world(args.world, WORK / "images")
        sets.append(("world", WORK / "images", args.world))
    if args.photos:
        print(f"making {args.photos} real-photo-sized JPEGs once into bench/work ...", flush=True)
        write_photos(args.photos, WORK / "photos")
        sets.append(("photos", WORK / "photos", args.photos))
    lines = [bench_set(name, images, n, args) for name, images, n in sets]
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
