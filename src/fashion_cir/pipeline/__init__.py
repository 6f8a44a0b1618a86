"""Recipes and their runner: the whole pipeline as typed, resumable steps."""

from .recipe import Recipe, load_recipe
from .runner import run_recipe

__all__ = ["Recipe", "load_recipe", "run_recipe"]
