"""One place that appends a benchmark row to bench/results.md, with the date and the machine."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.md"
HEADER = (
    "# Benchmarks\n\n| date | machine | bench | setup | ours | peer | ratio |\n"
    "|---|---|---|---|---|---|---|\n"
)


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, load {load:.1f}"


def record(bench: str, setup: str, ours: str, peer: str, ratio: str) -> str:
    """Append one row (creating the table if needed) and return it."""
    row = (
        f"| {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC | {machine()} | {bench} | {setup} | "
        f"{ours} | {peer} | {ratio} |"
    )
    if not RESULTS.exists():
        RESULTS.write_text(HEADER)
    with RESULTS.open("a") as handle:
        handle.write(row + "\n")
    return row
