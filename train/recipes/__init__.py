"""Recipes: one small file per paper over the shared blocks; `build_recipe(name)` makes one."""

import importlib
import pkgutil

from vlforge.train.recipes.registry import build_recipe, list_recipes, register_recipe

# Importing a recipe's module registers it (timm style). Every module of this package is imported,
# so a new recipe is one file with one decorator and nothing else to edit.
_SUPPORT = {"base", "registry"}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _SUPPORT and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["build_recipe", "list_recipes", "register_recipe"]
