"""Recipes: typed run configuration, loaded and validated once from YAML."""

from mecqtk.recipe.loader import (
    bundled_recipe_dir,
    bundled_recipes,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
    resolve_recipe_path,
)
from mecqtk.recipe.schema import (
    BatchNormConfig,
    CalibrationConfig,
    DistillConfig,
    LayerMatch,
    LayerRule,
    MECConfig,
    OptimizerConfig,
    QuantConfig,
    QuantizerConfig,
    QuantizerOverride,
    Recipe,
    ResidualConfig,
    ScheduleConfig,
    TrainConfig,
)

__all__ = [
    "BatchNormConfig",
    "CalibrationConfig",
    "DistillConfig",
    "LayerMatch",
    "LayerRule",
    "MECConfig",
    "OptimizerConfig",
    "QuantConfig",
    "QuantizerConfig",
    "QuantizerOverride",
    "Recipe",
    "ResidualConfig",
    "ScheduleConfig",
    "TrainConfig",
    "bundled_recipe_dir",
    "bundled_recipes",
    "dump_recipe",
    "load_recipe",
    "recipe_from_dict",
    "resolve_recipe_path",
]
