"""The recipe registry: `@register_recipe("name")` on a builder, `build_recipe("name")` to make.

A builder is any callable `(size: str, vocab_size: int, **overrides) -> Recipe` — usually the
recipe class's `build` classmethod (see base.py), so adding a recipe is one short file plus its
import in recipes/__init__.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from vlforge.train.recipes.base import Recipe

_REGISTRY: dict[str, Callable[..., Recipe]] = {}
T = TypeVar("T")


def register_recipe(name: str) -> Callable[[T], T]:
    """Register a builder function, or a Recipe class (its `build` classmethod), under `name`."""

    def deco(obj: T) -> T:
        if name in _REGISTRY:
            raise ValueError(f"recipe {name!r} is registered twice")
        builder = obj.build if isinstance(obj, type) else obj  # type: ignore[attr-defined]
        _REGISTRY[name] = builder  # type: ignore[assignment]
        return obj

    return deco


def list_recipes() -> list[str]:
    import vlforge.train.recipes  # noqa: F401  (registers the built-in recipes)

    return sorted(_REGISTRY)


def build_recipe(
    name: str, size: str = "small", vocab_size: int = 30522, **overrides: Any
) -> Recipe:
    """A fresh recipe of `size` ("small" for CPU tests/demos, "base" for the paper's sizes);
    overrides replace config fields (unknown names raise ValueError)."""
    known = list_recipes()
    if name not in _REGISTRY:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(known)}")
    return _REGISTRY[name](size=size, vocab_size=vocab_size, **overrides)
