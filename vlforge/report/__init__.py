"""`vlforge report`: a corpus (and optionally a training run) as one self-contained HTML page.

The figures come from what the stages already write (manifest.json, stats.parquet, the shards,
metrics.jsonl); nothing is recomputed from the network. `write_report` is the entry point for
code (the demo calls it); `vlforge.report.cli` is the command.
"""

from __future__ import annotations

from pathlib import Path


def write_report(
    corpus: Path, run: Path | None = None, out: Path = Path("report"), shards: str | None = None
) -> Path:
    """Write OUT/index.html and return its path; see vlforge.report.build.write_report."""
    # Imported here so `import vlforge.report` stays cheap (matplotlib loads only when used).
    from vlforge.report.build import write_report as build

    return build(corpus, run, out, shards)


__all__ = ["write_report"]
