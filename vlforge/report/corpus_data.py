"""The crawl's figures: the filter funnel with the reasons at each stage, failures by host, and
the per-row distributions (image sizes, aspect ratios, caption lengths, languages).

Counts come from manifest.json as written (the page must agree with it to the row); the
distributions come from stats.parquet, one row per input row.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa

from vlforge.errors import UserError
from vlforge.pipeline.funnel import CAPTION_REASONS, DUPLICATE_AFTER_FETCH, IMAGE_REASONS
from vlforge.pipeline.stats_dataset import read_stats

# A web-scale crawl has thousands of hosts; the page lists the ones that failed most.
TOP_HOSTS = 25
STATS_COLUMNS = (
    "status",
    "reason",
    "url",
    "caption",
    "language",
    "original_width",
    "original_height",
    "width",
    "height",
)


@dataclass
class FunnelStep:
    stage: str
    remaining: int
    removed: int
    reasons: list[tuple[str, int]] = field(default_factory=list)  # (status:reason, rows)


@dataclass
class CorpusFigures:
    rows: int
    samples: int
    shards: int
    http_requests: int | None
    funnel: list[FunnelStep]
    status_counts: dict[str, int]
    reason_counts: dict[str, int]
    hosts: list[dict]  # {"host", "rows", "ok", "not_ok", "reasons": [(reason, n), ...]}
    kept: dict[str, list]  # per kept sample: widths, heights, aspects, caption words/chars
    languages: dict[str, int]
    timings: dict[str, float]


def _stage_of(status: str, reason: str) -> str | None:
    """The funnel stage (as named by vlforge.pipeline.funnel) where a row with this outcome left;
    the same rules that funnel uses, so the reasons listed under a stage add up to its count."""
    if reason == "duplicate_url":
        return "unique URLs"
    if status == "filtered" and reason in CAPTION_REASONS:
        return "captions pass"
    if status == "blocked":
        return "allowed (robots, address)"
    if status == "failed":
        return "downloaded + decoded"
    if status == "filtered" and reason in IMAGE_REASONS:
        return "images pass"
    if reason in DUPLICATE_AFTER_FETCH:
        return "deduplicated"
    return None


def funnel_steps(manifest: dict) -> list[FunnelStep]:
    reasons_at: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, count in manifest.get("reason_counts", {}).items():
        status, _, reason = name.partition(":")
        stage = _stage_of(status, reason)
        if stage is not None:
            reasons_at[stage].append((name, int(count)))
    steps = [
        FunnelStep(
            stage=str(s["stage"]),
            remaining=int(s["remaining"]),
            removed=int(s["removed"]),
            reasons=sorted(reasons_at.get(str(s["stage"]), []), key=lambda kv: (-kv[1], kv[0])),
        )
        for s in manifest.get("funnel", [])
    ]
    shards = manifest.get("shards") or []
    if "samples" in manifest:
        steps.append(
            FunnelStep(
                stage=f"written to {len(shards)} shard(s)",
                remaining=int(manifest["samples"]),
                removed=(steps[-1].remaining - int(manifest["samples"])) if steps else 0,
            )
        )
    return steps


def host_of(url: str | None) -> str:
    if not url:
        return "(no url)"
    try:
        return urlsplit(url).netloc or "(no host)"
    except ValueError:
        return "(bad url)"


def failures_by_host(statuses: list, reasons: list, urls: list) -> list[dict]:
    per_host: dict[str, Counter] = defaultdict(Counter)
    totals: Counter = Counter()
    for status, reason, url in zip(statuses, reasons, urls, strict=True):
        host = host_of(url)
        totals[host] += 1
        if status != "ok":
            per_host[host][f"{status}:{reason or '-'}"] += 1
    ranked = sorted(per_host, key=lambda h: (-sum(per_host[h].values()), h))[:TOP_HOSTS]
    return [
        {
            "host": host,
            "rows": totals[host],
            "not_ok": sum(per_host[host].values()),
            "ok": totals[host] - sum(per_host[host].values()),
            "reasons": per_host[host].most_common(),
        }
        for host in ranked
    ]


def _caption_words(caption: str | None) -> int:
    return len(caption.split()) if caption else 0


def corpus_figures(corpus: Path, manifest: dict) -> CorpusFigures:
    stats_path = corpus / "stats.parquet"
    try:
        # A dataset directory (one part per chunk) or an older single file.
        arrow = read_stats(stats_path)
        present = set(arrow.column_names)
        arrow = arrow.select([c for c in STATS_COLUMNS if c in present])
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"{stats_path}: not a readable parquet file ({err})") from None
    if "status" not in present:
        raise UserError(f"{stats_path}: no status column (not written by `vlforge corpus`)")
    # Older or trimmed stats files may lack a column: its figures are then simply empty.
    table = {
        c: arrow.column(c).to_pylist() if c in present else [None] * arrow.num_rows
        for c in STATS_COLUMNS
    }
    statuses, reasons, urls = table["status"], table["reason"], table["url"]
    ok = [i for i, s in enumerate(statuses) if s == "ok"]

    def kept_column(name: str) -> list:
        return [table[name][i] for i in ok]

    widths, heights = kept_column("original_width"), kept_column("original_height")
    sized = [(w, h) for w, h in zip(widths, heights, strict=True) if w and h]
    captions = kept_column("caption")
    kept = {
        "original_width": [w for w, _ in sized],
        "original_height": [h for _, h in sized],
        "aspect": [w / h for w, h in sized],
        "width": [w for w in kept_column("width") if w],
        "height": [h for h in kept_column("height") if h],
        "caption_words": [_caption_words(c) for c in captions],
        "caption_chars": [len(c or "") for c in captions],
    }
    languages = Counter((lang or "(none)") for lang in kept_column("language"))
    status_counts = manifest.get("status_counts") or dict(Counter(statuses))
    return CorpusFigures(
        rows=int(manifest.get("rows", len(statuses))),
        samples=int(manifest.get("samples", len(ok))),
        shards=len(manifest.get("shards") or []),
        http_requests=manifest.get("http_requests"),
        funnel=funnel_steps(manifest),
        status_counts={k: int(v) for k, v in status_counts.items()},
        reason_counts={k: int(v) for k, v in (manifest.get("reason_counts") or {}).items()},
        hosts=failures_by_host(statuses, reasons, urls),
        kept=kept,
        languages=dict(languages.most_common()),
        timings={k: float(v) for k, v in (manifest.get("timings") or {}).items()},
    )
