"""Recipes, the language: schema (attrs) and load (YAML, base:, overrides). Turning a recipe
into components is mfrecipes.build's."""
from mfrecipes.recipe.load import apply_overrides, dump_yaml, load_raw, load_recipe
from mfrecipes.recipe.schema import Recipe

__all__ = ["Recipe", "load_recipe", "load_raw", "apply_overrides", "dump_yaml"]
