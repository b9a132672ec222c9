"""Generators behind `vlforge generate`: one module per recipe, registered by name.

A generator is a function `(args: argparse.Namespace) -> int` decorated with
`@register_generator("recipe")`; every module of this package is imported on first use, so a new
generator is one file with one decorator (the same pattern as train/recipes/__init__.py).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable

from vlforge.errors import UserError

Generator = Callable[[argparse.Namespace], int]
_REGISTRY: dict[str, Generator] = {}
_DISCOVERED = False


def register_generator(name: str) -> Callable[[Generator], Generator]:
    """Register `fn` as the generator of recipe `name` (one per name)."""

    def deco(fn: Generator) -> Generator:
        if name in _REGISTRY:
            raise ValueError(f"generator {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _discover() -> None:
    # Imported lazily (not at package import) so a generator module may import this package's
    # `register_generator` without a cycle, and `vlforge --help` stays cheap.
    global _DISCOVERED
    if _DISCOVERED:
        return
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _DISCOVERED = True


def list_generators() -> list[str]:
    """Names of the recipes that have a generator."""
    _discover()
    return sorted(_REGISTRY)


def run_generate(args: argparse.Namespace) -> int:
    """Dispatch `vlforge generate --recipe NAME …` to NAME's generator."""
    known = list_generators()
    if args.recipe not in _REGISTRY:
        raise UserError(f"no generator for recipe {args.recipe!r}; known: {', '.join(known)}")
    if args.n is not None and args.n < 1:
        raise UserError("--n must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    if args.max_len is not None and args.max_len < 1:
        raise UserError("--max-len must be at least 1")
    return int(_REGISTRY[args.recipe](args) or 0)


__all__ = ["list_generators", "register_generator", "run_generate"]
