"""The web's mess in known proportions: every kind of row, and what the crawler must conclude.

Expectations are written for the demo crawl settings (`vlforge.demo.DEMO_CORPUS_FLAGS`: the
datacomp-basic filters, robots.txt respected, 127.0.0.0/8 the only private network allowed, short
timeouts and deadline, 8 MiB byte cap, retries). `proportion` is each kind's share of a list made
with the default `mess_fraction` (0.35); proportions sum to 1.

`mess_fraction` is the share of the 28 kinds that are neither clean nor mismatched; mismatched
rows scale with it (5% at the default) and clean rows take the rest (60% at the default).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DEFAULT_MESS_FRACTION = 0.35
MAX_MESS_FRACTION = 0.8  # above this too few clean rows remain to be duplicated
_MISMATCHED = 0.05


@dataclass(frozen=True)
class Kind:
    name: str
    proportion: float  # share of rows at the default mess_fraction
    expect_status: str  # ok, duplicate, filtered, failed or blocked
    expect_reason: str  # "" when ok


# (name, expected status, expected reason); clean and mismatched first, then the rest in equal
# shares. The order is also the order in which the allocation breaks ties.
_EXPECTATIONS: tuple[tuple[str, str, str], ...] = (
    ("clean", "ok", ""),
    ("mismatched", "ok", ""),
    ("dup_url", "duplicate", "duplicate_url"),
    ("dup_image", "duplicate", "duplicate_image"),
    ("near_dup", "duplicate", "near_duplicate_image"),
    ("tiny", "filtered", "min_side"),
    ("extreme_aspect", "filtered", "aspect_ratio"),
    ("short_caption", "filtered", "caption_too_short"),
    ("non_english", "filtered", "language"),
    ("blocklisted", "filtered", "blocklist"),
    ("http_404", "failed", "http_404"),
    ("http_500", "failed", "http_500"),
    ("flaky_503", "ok", ""),
    ("rate_limited", "ok", ""),
    ("always_429", "failed", "http_429"),
    ("timeout", "failed", "timeout"),
    ("slow_body", "failed", "deadline_exceeded"),
    ("truncated", "failed", "truncated"),
    ("corrupt", "failed", "decode_error"),
    ("redirect_loop", "failed", "too_many_redirects"),
    ("redirect_ok", "ok", ""),
    ("wrong_content_type", "failed", "wrong_content_type"),
    ("bad_magic", "failed", "bad_magic"),
    ("oversize", "failed", "too_large"),
    ("bomb", "failed", "decompression_bomb"),
    ("connection_reset", "failed", "connection_error"),
    ("x_robots_noai", "blocked", "x_robots_tag"),
    ("robots_disallowed", "blocked", "robots_txt"),
    ("redirect_private", "blocked", "private_address"),
    ("private_url", "blocked", "private_address"),
)
_REST = len(_EXPECTATIONS) - 2


def _default_proportion(name: str) -> float:
    if name == "clean":
        return 1.0 - DEFAULT_MESS_FRACTION - _MISMATCHED
    if name == "mismatched":
        return _MISMATCHED
    return DEFAULT_MESS_FRACTION / _REST


KINDS: dict[str, Kind] = {
    name: Kind(name, _default_proportion(name), status, reason)
    for name, status, reason in _EXPECTATIONS
}
# Kinds whose row repeats an earlier clean row (URL, bytes or scene).
SOURCED_KINDS = frozenset({"dup_url", "dup_image", "near_dup"})
# Kinds served by /w/{seed}/fault/{kind}/{index}.jpg (see url_list for the whole scheme).
FAULT_KINDS = (
    "http_404", "http_500", "flaky_503", "rate_limited", "always_429", "timeout", "slow_body",
    "truncated", "corrupt", "redirect_loop", "redirect_ok", "wrong_content_type", "bad_magic",
    "oversize", "bomb", "connection_reset", "x_robots_noai", "redirect_private",
)  # fmt: skip


def kind_counts(n: int, mess_fraction: float = DEFAULT_MESS_FRACTION) -> dict[str, int]:
    """Rows per kind for a list of n rows (largest-remainder rounding, deterministic).

    When mess_fraction > 0 and n >= 2 x the number of kinds, every kind gets at least one row
    (taken from the clean rows), so even small lists exercise every fault.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= mess_fraction <= MAX_MESS_FRACTION:
        raise ValueError(
            f"mess_fraction must be within 0..{MAX_MESS_FRACTION}, got {mess_fraction}"
        )
    scale = mess_fraction / DEFAULT_MESS_FRACTION
    targets = {name: n * k.proportion * scale for name, k in KINDS.items() if name != "clean"}
    total = round(sum(targets.values()))
    counts = {name: int(t) for name, t in targets.items()}
    by_remainder = sorted(targets, key=lambda name: targets[name] - counts[name], reverse=True)
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    if mess_fraction > 0 and n >= 2 * len(KINDS):
        counts = {name: max(1, c) for name, c in counts.items()}
    while n and sum(counts.values()) >= n:  # duplicates need at least one clean row to repeat
        largest = max(counts, key=lambda name: counts[name])
        counts[largest] -= 1
    return {"clean": n - sum(counts.values()), **counts}


def allocate(n: int, seed: int, mess_fraction: float = DEFAULT_MESS_FRACTION) -> list[str]:
    """The kind of each row: each kind spread evenly over the list (stratified), with a random
    phase per kind from `seed`; row 0 is always clean so every duplicate has an earlier source."""
    counts = kind_counts(n, mess_fraction)
    rng = random.Random(f"allocate:{seed}")
    keyed: list[tuple[float, int, str]] = []
    for order, (name, count) in enumerate(counts.items()):
        phase = rng.random()
        keyed.extend(((j + phase) / count, order, name) for j in range(count))
    keyed.sort()
    kinds = [name for _key, _order, name in keyed]
    if kinds and kinds[0] != "clean" and "clean" in counts and counts["clean"]:
        first = kinds.index("clean")
        kinds[0], kinds[first] = kinds[first], kinds[0]
    return kinds
