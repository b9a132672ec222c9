"""`vlforge report` command line: flags → write_report, then one summary line with the path."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlforge.errors import UserError

DESCRIPTION = """\
Write a self-contained static HTML page (no server, no network: plots are inline SVG, images
inline JPEG) about a corpus and, with --run, a training run: the filter funnel with the reasons
rows left and failures by host; distributions of image sizes, aspect ratios, caption lengths,
languages, tags, boxes per image, scene-graph sizes and mined negatives; a paged grid of samples
with their detected boxes drawn, tags, scene graph, hard negatives and rewrites; and the run's
loss per task, learning rate, throughput, evaluation metrics and MoE load per expert.

Which shards are browsed: --shards when given; otherwise the latest stage found next to the
corpus directory (a sibling directory whose manifest.json says it read the corpus: mined, else
featurized), else the corpus's own shards. --corpus may also name a featurized or mined
directory; the crawl output it was made from is then found through its manifest.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="a corpus and training run as one static HTML page",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--corpus",
        required=True,
        type=Path,
        help="corpus directory (`vlforge corpus` output: manifest.json, stats.parquet)",
    )
    p.add_argument(
        "--run", type=Path, default=None, help="training run directory (with metrics.jsonl)"
    )
    p.add_argument(
        "--shards",
        default=None,
        help="shards to browse: a directory, glob, brace pattern (a-{000000..000009}.tar) "
        "or `::`-separated list (default: auto-detect, see above)",
    )
    p.add_argument("--out", type=Path, default=Path("report"), help="output directory")
    p.add_argument("--samples", type=int, default=48, help="samples in the grid")
    p.add_argument(
        "--max-scan",
        type=int,
        default=20_000,
        help="samples read for the box, tag and scene-graph distributions",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "--check",
        action="store_true",
        help="open the written page in headless Chromium, save OUT/screenshot.png and fail on "
        "any console error",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlforge.report.build import print_progress, write_report

    if args.samples < 0 or args.max_scan < 0:
        raise UserError("--samples and --max-scan must not be negative")
    path = write_report(
        args.corpus,
        args.run,
        args.out,
        args.shards,
        grid_samples=args.samples,
        max_scan=args.max_scan,
        progress=None if args.quiet else print_progress,
    )
    if args.check:
        check(path)
    size_kb = path.stat().st_size / 1024
    print(f"vlforge report: wrote {path} ({size_kb:,.0f} KB); open it in a browser", flush=True)
    return 0


def check(page: Path) -> None:
    """Load the page as a reader's browser would; a console error is a broken report."""
    from vlforge.report.browser import load_page

    try:
        load = load_page(page, page.parent / "screenshot.png")
    except OSError as err:
        raise UserError(f"--check: chromium could not load {page}: {err}") from None
    if load.errors:
        first = load.errors[0]
        raise UserError(
            f"--check: {len(load.errors)} console error(s) in {page}; first: {first.text}"
        )
    sys.stderr.write(f"report: chromium loaded {page} with no console errors\n")
