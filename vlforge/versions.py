"""Versions of vlforge, Python and the named distributions, for run manifests."""

from __future__ import annotations

import importlib.metadata as md
import platform

from vlforge import __version__


def package_versions(*distributions: str) -> dict[str, str]:
    versions = {"vlforge": __version__, "python": platform.python_version()}
    for dist in distributions:
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "missing"
    return versions
