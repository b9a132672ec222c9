"""The corpus funnel: how many rows survive each stage, from the per-row stats."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import pyarrow as pa

CAPTION_REASONS = frozenset(
    {"caption_too_short", "caption_too_few_words", "caption_too_long", "blocklist", "language"}
)
IMAGE_REASONS = frozenset({"min_side", "max_side", "aspect_ratio"})
DUPLICATE_AFTER_FETCH = frozenset({"duplicate_image", "near_duplicate_image", "duplicate_caption"})


def funnel_counts(stats: pa.Table | Mapping[tuple[str, str], int]) -> list[dict]:
    """Ordered stages with rows remaining after each; each row leaves at exactly one stage.

    From the rows' (status, reason) counts, which the pipeline sums while it writes the stats
    dataset (no step reads every row back), or from a stats table.
    """
    if isinstance(stats, pa.Table):
        pairs = Counter(
            zip(
                stats.column("status").to_pylist(),
                [r or "" for r in stats.column("reason").to_pylist()],
                strict=True,
            )
        )
    else:
        pairs = Counter({(s, r or ""): n for (s, r), n in stats.items()})
    total = sum(pairs.values())

    def removed(pred) -> int:
        return sum(n for (status, reason), n in pairs.items() if pred(status, reason))

    steps = [
        ("input rows", 0),
        ("unique URLs", removed(lambda s, r: r == "duplicate_url")),
        ("captions pass", removed(lambda s, r: s == "filtered" and r in CAPTION_REASONS)),
        ("allowed (robots, address)", removed(lambda s, r: s == "blocked")),
        ("downloaded + decoded", removed(lambda s, r: s == "failed")),
        ("images pass", removed(lambda s, r: s == "filtered" and r in IMAGE_REASONS)),
        ("deduplicated", removed(lambda s, r: r in DUPLICATE_AFTER_FETCH)),
    ]
    out, remaining = [], total
    for name, gone in steps:
        remaining -= gone
        out.append({"stage": name, "removed": gone, "remaining": remaining})
    return out


def format_summary(manifest: dict) -> str:
    """A short table a person can read at the end of a run."""
    lines = []
    timings = manifest.get("timings", {})
    lines.append(
        f"vlforge corpus: {manifest['rows']} rows -> {manifest['samples']} samples in "
        f"{len(manifest['shards'])} shard(s) at {manifest['config']['out']} "
        f"({timings.get('total_s', 0):.1f} s, {manifest['http_requests']} HTTP requests, "
        f"{manifest['chunks']['reused']}/{manifest['chunks']['total']} chunks reused)"
    )
    lines.append(f"  {'stage':<28}{'removed':>9}{'remaining':>11}")
    for step in manifest["funnel"]:
        lines.append(f"  {step['stage']:<28}{step['removed']:>9}{step['remaining']:>11}")
    lines.append(f"  {'status:reason':<40}{'rows':>8}")
    for name, count in sorted(manifest["reason_counts"].items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {name:<40}{count:>8}")
    return "\n".join(lines)
