"""HTML assembly: the template rendered with Jinja2, autoescaping everything but the SVG plots.

Captions, URLs and tags come from the crawl, i.e. from strangers: autoescaping keeps them text.
The plots are the only markup inserted raw, and matplotlib escapes the text inside them.
"""

from __future__ import annotations

import math
from typing import Any

import jinja2
from markupsafe import Markup

from vlforge.report.template import PAGE


def format_number(value: Any) -> str:
    """Readable form of a figure; the exact value stays in the element's data-value."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.3e}"
    return f"{value:.4g}"


def svg(markup: str) -> Markup:
    """Mark a matplotlib SVG as safe HTML (it is produced here, not taken from input)."""
    return Markup(markup)


def render_page(context: dict[str, Any]) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = format_number
    return env.from_string(PAGE).render(**context)
