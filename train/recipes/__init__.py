"""Recipes: one small file per paper over the shared blocks; `build_recipe(name)` makes one."""

from vlforge.train.recipes.registry import build_recipe, list_recipes, register_recipe

# Importing a recipe's module registers it (timm style); a new recipe adds one line here.
from vlforge.train.recipes import clip, uniter, vilbert  # noqa: E402, F401  isort: skip

__all__ = ["build_recipe", "list_recipes", "register_recipe"]
