"""Plots as inline SVG: matplotlib on the Agg backend, serialized to an `<svg>` element.

Text stays text (svg.fonttype "none"), which keeps each plot a few kilobytes and lets the page's
fonts render it; each figure gets its own hash salt so the ids matplotlib generates for clip paths
are deterministic yet differ between the many SVGs sharing one HTML document.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display here; must precede pyplot's import

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from vlforge.report.run_data import Series  # noqa: E402

PALETTE = ("#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477")
# Beyond this many series a legend stops helping; lines are still drawn.
MAX_LEGEND = 16


def to_svg(fig: Figure, name: str) -> str:
    """The figure as an `<svg>` element (no XML prolog or doctype, which HTML does not allow)."""
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _figure(width: float = 5.2, height: float = 3.0) -> tuple[Figure, plt.Axes]:
    fig, ax = plt.subplots(figsize=(width, height), dpi=96)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(alpha=0.25)
    return fig, ax


def histogram(values: Sequence[float], title: str, xlabel: str, bins: int | str = "auto") -> str:
    fig, ax = _figure()
    if len(values):
        counts = Counter(values)
        if len(counts) <= 30 and all(float(v).is_integer() for v in counts):
            # Small integer counts (boxes, objects): one bar per value reads better than bins.
            distinct = sorted(counts)
            ax.bar(distinct, [counts[v] for v in distinct], width=0.8, color=PALETTE[0])
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlim(min(distinct) - 1, max(distinct) + 1)
        else:
            ax.hist(values, bins=bins, color=PALETTE[0])
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    return to_svg(fig, title)


def bars(labels: Sequence[str], counts: Sequence[int], title: str, xlabel: str = "rows") -> str:
    """Horizontal bars, largest first at the top."""
    height = max(2.0, 0.6 + 0.26 * len(labels))
    fig, ax = _figure(5.8, height)
    positions = list(range(len(labels)))[::-1]
    ax.barh(positions, counts, color=PALETTE[0])
    ax.set_yticks(positions, [str(label) for label in labels])
    for y, n in zip(positions, counts, strict=True):
        ax.text(n, y, f" {n}", va="center", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    return to_svg(fig, title)


def scatter(xs: Sequence[float], ys: Sequence[float], title: str, xlabel: str, ylabel: str) -> str:
    fig, ax = _figure()
    ax.scatter(xs, ys, s=6, alpha=0.5, color=PALETTE[0], linewidths=0)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return to_svg(fig, title)


def funnel(stages: Sequence[str], remaining: Sequence[int], title: str) -> str:
    return bars(stages, remaining, title, xlabel="rows remaining")


def lines(
    series: dict[str, Series], title: str, ylabel: str, log_y: bool = False, xlabel: str = "step"
) -> str:
    fig, ax = _figure(5.8, 3.2)
    for i, (name, s) in enumerate(series.items()):
        ax.plot(s.steps, s.values, label=name, color=PALETTE[i % len(PALETTE)], linewidth=1.2)
    if log_y and all(v > 0 for s in series.values() for v in s.values):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if 1 < len(series) <= MAX_LEGEND:
        ax.legend(fontsize=7, frameon=False)
    return to_svg(fig, title)


def expert_load(names: Sequence[str], values: Sequence[float], title: str) -> str:
    """Load per expert at the last logged step: balanced routing is a flat row of bars."""
    fig, ax = _figure(5.8, 3.0)
    ax.bar(range(len(values)), values, color=PALETTE[2])
    ax.set_xticks(range(len(values)), list(names), rotation=60, ha="right", fontsize=7)
    ax.set_title(title)
    ax.set_ylabel("load")
    return to_svg(fig, title)
