"""`vlforge corpus` command line: flags → CorpusConfig, then a run and its summary."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from vlforge.errors import UserError

FILTER_FLAGS = {
    "min_side": int,
    "max_side": int,
    "max_aspect": float,
    "min_caption_chars": int,
    "max_caption_chars": int,
    "min_caption_words": int,
    "min_language_score": float,
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "corpus",
        help="crawl URL lists into filtered, deduplicated WebDataset shards (Apache Beam)",
        description="Crawl URL lists into filtered, deduplicated WebDataset shards. Any flag "
        "this command does not know is handed to Beam (e.g. --runner DataflowRunner --project P).",
    )
    p.add_argument(
        "--urls", required=True, help="list file, directory or glob (parquet/csv/tsv/jsonl)"
    )
    p.add_argument("--out", required=True, help="output directory (local, gs://, s3://)")
    p.add_argument("--url-col", default="url")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--prefix", default="corpus", help="shard name prefix")
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--chunk-size", type=int, default=1_000, help="rows per crawl checkpoint")
    p.add_argument("--workers", type=int, default=1, help="DirectRunner processes")
    p.add_argument(
        "--threads",
        type=int,
        default=32,
        help="requests in flight per worker (coroutines on one event loop)",
    )
    p.add_argument(
        "--image-threads",
        type=int,
        default=2,
        help="threads per worker decoding images of 64 KiB and more (CPU scales with --workers)",
    )
    g = p.add_argument_group("fetch")
    g.add_argument("--timeout", type=float, default=10.0, help="seconds for connect and each read")
    g.add_argument("--deadline", type=float, default=30.0, help="seconds per attempt in all")
    g.add_argument("--retries", type=int, default=2)
    g.add_argument("--backoff", type=float, default=1.0, help="first retry delay, doubling")
    g.add_argument("--max-redirects", type=int, default=5)
    g.add_argument("--max-bytes", type=int, default=32 * 1024 * 1024)
    g.add_argument("--per-host", type=int, default=16, help="concurrent requests per host")
    g.add_argument(
        "--allow-private",
        nargs="*",
        metavar="CIDR",
        default=None,
        help="allow non-public addresses: all of them, or only the networks given",
    )
    g.add_argument("--respect-robots", action="store_true", help="check robots.txt")
    g.add_argument("--ignore-x-robots", action="store_true", help="do not honour X-Robots-Tag")
    r = p.add_argument_group("resize (img2dataset's resizer)")
    r.add_argument("--image-size", type=int, default=256)
    r.add_argument("--resize-mode", default="border")
    r.add_argument("--resize-only-if-bigger", action="store_true")
    r.add_argument("--encode-quality", type=int, default=95)
    r.add_argument("--max-pixels", type=int, default=100_000_000, help="decompression-bomb guard")
    f = p.add_argument_group("filters")
    f.add_argument("--preset", default="none", help="named filter set, e.g. datacomp-basic")
    for name, kind in FILTER_FLAGS.items():
        f.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    f.add_argument("--languages", default=None, help="comma-separated ISO codes to keep, e.g. en")
    f.add_argument("--blocklist", default=None, help="file with one blocked word or phrase a line")
    f.add_argument("--phash-distance", type=int, default=None)
    for what in ("urls", "images", "near-images", "captions"):
        f.add_argument(f"--no-dedup-{what}", action="store_true")
    p.add_argument(
        "--retry-failed", action="store_true", help="re-fetch rows that failed transiently"
    )
    p.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run, accepts_extra_args=True)


def config_from_args(args: argparse.Namespace):
    from vlforge.pipeline.address_guard import parse_allowed_networks
    from vlforge.pipeline.corpus import CorpusConfig
    from vlforge.pipeline.crawl_stage import CrawlSettings
    from vlforge.pipeline.fetch import FetchConfig
    from vlforge.pipeline.filters import FilterConfig, apply_preset
    from vlforge.pipeline.image_processing import RESIZE_MODES, ResizeConfig

    for name in ("threads", "image_threads", "workers", "image_size", "max_bytes", "per_host"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.resize_mode not in RESIZE_MODES:
        raise UserError(f"--resize-mode must be one of {', '.join(RESIZE_MODES)}")
    try:
        networks = parse_allowed_networks(args.allow_private)
        filters = apply_preset(FilterConfig(), args.preset)
    except ValueError as err:
        raise UserError(str(err)) from err
    overrides = {n: getattr(args, n) for n in FILTER_FLAGS if getattr(args, n) is not None}
    if args.languages is not None:
        overrides["languages"] = tuple(x.strip() for x in args.languages.split(",") if x.strip())
    if args.blocklist is not None:
        path = Path(args.blocklist)
        if not path.is_file():
            raise UserError(f"--blocklist {path}: no such file")
        words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
        overrides["blocklist"] = tuple(w for w in words if w and not w.startswith("#"))
    if args.phash_distance is not None:
        overrides["phash_max_distance"] = args.phash_distance
    filters = replace(
        filters,
        **overrides,
        dedup_urls=not args.no_dedup_urls,
        dedup_images=not args.no_dedup_images,
        dedup_near_images=not args.no_dedup_near_images,
        dedup_captions=not args.no_dedup_captions,
    )
    fetch = FetchConfig(
        timeout=args.timeout,
        deadline=args.deadline,
        retries=args.retries,
        backoff=args.backoff,
        max_redirects=args.max_redirects,
        max_bytes=args.max_bytes,
        per_host=args.per_host,
        allowed_networks=networks,
        respect_robots=args.respect_robots,
        respect_x_robots=not args.ignore_x_robots,
    )
    resize = ResizeConfig(
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        resize_only_if_bigger=args.resize_only_if_bigger,
        encode_quality=args.encode_quality,
        max_pixels=args.max_pixels,
    )
    return CorpusConfig(
        urls=args.urls,
        out=args.out,
        url_col=args.url_col,
        caption_col=args.caption_col,
        prefix=args.prefix,
        shard_size=args.shard_size,
        chunk_size=args.chunk_size,
        workers=args.workers,
        crawl=CrawlSettings(
            fetch=fetch,
            resize=resize,
            filters=filters,
            threads=args.threads,
            image_threads=args.image_threads,
            retry_failed=args.retry_failed,
        ),
        overwrite=args.overwrite,
        beam_args=list(args.extra_args),
        show_progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from vlforge.pipeline.corpus import run_corpus
    from vlforge.pipeline.funnel import format_summary

    manifest = run_corpus(config_from_args(args))
    print(format_summary(manifest), file=sys.stdout)
    return 0
