"""Reading and writing recipes as YAML, and finding bundled recipes by bare name."""

from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path
from typing import Any

import yaml

from mecqtk.errors import RecipeError
from mecqtk.recipe.schema import Recipe
from mecqtk.recipe.validate import from_data, to_data


def bundled_recipe_dir() -> Path:
    """The folder of recipes shipped with mecqtk (source checkout or installed package).

    In a checkout (editable install or PYTHONPATH) the recipes' one home is the top-level
    ``recipes/`` folder; setup.py ships that folder in the wheel as ``mecqtk/recipes``. The
    checkout is recognised by its setup.py, so a stray ``recipes/`` beside an installed package in
    site-packages is never taken for it.
    """
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "setup.py").is_file() and (checkout / "recipes").is_dir():
        return checkout / "recipes"
    installed = Path(str(importlib.resources.files("mecqtk"))) / "recipes"
    if installed.is_dir():
        return installed
    raise RecipeError(
        f"mecqtk's bundled recipes are missing: neither {checkout / 'recipes'} (source checkout) "
        f"nor {installed} (installed package) exists; reinstall mecqtk"
    )


def bundled_recipes() -> list[str]:
    return sorted(p.name for p in bundled_recipe_dir().glob("*.yaml"))


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A path as given if it exists, else a bundled recipe of that name (``.yaml`` optional)."""
    path = Path(recipe)
    if path.is_file():
        return path
    if path.parent == Path("."):
        name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
        candidate = bundled_recipe_dir() / name
        if candidate.is_file():
            return candidate
    raise RecipeError(
        f"recipe {str(recipe)!r} not found; give a path or one of: {', '.join(bundled_recipes())}"
    )


def recipe_from_dict(data: Any) -> Recipe:
    return from_data(Recipe, data, "")


def load_recipe(recipe: str | Path) -> Recipe:
    """Load and validate a recipe from a path or a bundled name.

    Example:
        >>> from mecqtk.recipe import load_recipe
        >>> load_recipe("w2a2_lsq.yaml").quant.weight.bits
        2
    """
    path = resolve_recipe_path(recipe)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}: malformed YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read recipe: {err}") from None
    try:
        recipe = recipe_from_dict(data)
    except RecipeError as err:
        raise RecipeError(f"{path.name}: {err}") from None
    if not recipe.name:
        recipe = dataclasses.replace(recipe, name=path.stem)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML; loading it gives back an equal Recipe."""
    return yaml.safe_dump(to_data(recipe), sort_keys=False)
