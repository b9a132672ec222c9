"""`vlforge demo`: the whole flow on the demo world, outputs under runs/demo, figures in metrics.json.

Today the flow is world → corpus; featurize, mine and train join it as their stages land.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vlforge.errors import UserError

# The crawl settings the demo world's expectations (vlforge.world.mess.KINDS) are written for.
DEMO_CORPUS_FLAGS = [
    "--preset",
    "datacomp-basic",
    "--respect-robots",
    "--allow-private",
    "127.0.0.0/8",
    "--timeout",
    "1.5",
    "--deadline",
    "3",
    "--retries",
    "2",
    "--backoff",
    "0.1",
    "--max-bytes",
    str(8 * 1024 * 1024),
]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the whole flow on the demo world")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--n", type=int, default=600, help="pairs in the demo world")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=run)


def demo_corpus_args(urls: str, out: str, workers: int = 1) -> list[str]:
    return ["corpus", "--urls", urls, "--out", out, "--workers", str(workers), *DEMO_CORPUS_FLAGS]


def run(args: argparse.Namespace) -> int:
    from vlforge.cli import build_parser
    from vlforge.pipeline.cli import config_from_args
    from vlforge.pipeline.corpus import run_corpus
    from vlforge.pipeline.funnel import format_summary
    from vlforge.world.server import WorldServer
    from vlforge.world.url_list import make_url_list

    if args.n < 100:
        raise UserError("--n must be at least 100 so every kind of mess appears")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict = {"seed": args.seed, "n": args.n}
    started = time.time()
    with WorldServer(hold_seconds=30.0, slow_body_seconds=20.0) as server:
        urls = make_url_list(args.n, args.seed, server.base_url, out / "urls.parquet")
        print(f"world: {args.n} pairs at {server.base_url} -> {urls}")
        corpus_args = build_parser().parse_args(
            demo_corpus_args(str(urls), str(out / "corpus"), args.workers) + ["--overwrite"]
        )
        corpus_args.extra_args = []
        manifest = run_corpus(config_from_args(corpus_args))
    print(format_summary(manifest))
    metrics["corpus"] = {
        "rows": manifest["rows"],
        "samples": manifest["samples"],
        "status_counts": manifest["status_counts"],
        "funnel": manifest["funnel"],
        "http_requests": manifest["http_requests"],
        "seconds": manifest["timings"]["total_s"],
    }
    metrics["corpus"]["truth_agreement"] = _truth_agreement(out / "corpus")
    metrics["seconds"] = round(time.time() - started, 2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    agree = metrics["corpus"]["truth_agreement"]
    print(
        f"demo: {agree['matching']}/{agree['rows']} rows got the status and reason the world "
        f"expects; metrics in {out / 'metrics.json'}",
        file=sys.stdout,
    )
    return 0


def _truth_agreement(corpus_dir: Path) -> dict:
    """Compare each row's status/reason with what the world says it should be."""
    import pyarrow.parquet as pq

    from vlforge.world.mess import KINDS

    stats = pq.read_table(corpus_dir / "stats.parquet").to_pylist()
    urls = pq.read_table(corpus_dir.parent / "urls.parquet").to_pylist()
    matching, mismatches = 0, {}
    seen_captions: set[str] = set()
    for row, stat in zip(urls, stats, strict=True):
        kind = KINDS[json.loads(row["world"])["kind"]]
        expected = (kind.expect_status, kind.expect_reason)
        got = (stat["status"], stat["reason"] or "")
        if got == ("duplicate", "duplicate_caption") and expected == ("ok", ""):
            expected = got if stat["caption"] in seen_captions else expected
        if got == ("ok", ""):
            seen_captions.add(stat["caption"])
        if got == expected:
            matching += 1
        else:
            label = f"{kind.name}: expected {expected[0]}:{expected[1]} got {got[0]}:{got[1]}"
            mismatches[label] = mismatches.get(label, 0) + 1
    return {"rows": len(stats), "matching": matching, "mismatches": mismatches}
