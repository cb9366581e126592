"""docs/recipes.md is rendered from the recipe schema; these tests keep the two in step."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import pytest
import yaml

from mecqtk.recipe import Recipe, recipe_from_dict
from mecqtk.recipe.validate import field_docs

# the renderer is a tool (tools/recipe_reference.py), not part of the library; tests/conftest.py
# puts tools/ on the path
from recipe_reference import (
    EXAMPLE_NODES,
    REGENERATE_COMMAND,
    RULES_EXAMPLE,
    class_doc,
    render_reference,
)

RECIPES_MD = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"


@pytest.fixture(scope="module")
def rendered() -> str:
    return render_reference()


def config_classes(cls: type = Recipe) -> list[type]:
    """Every config dataclass a recipe is made of, ``cls`` first."""
    found = [cls]
    for tp in get_type_hints(cls).values():
        inner = get_args(tp)[0] if get_origin(tp) in (tuple, list) else tp
        if dataclasses.is_dataclass(inner):
            found += [c for c in config_classes(inner) if c not in found]
    return found


def test_recipes_md_is_up_to_date(rendered):
    current = RECIPES_MD.read_text() if RECIPES_MD.is_file() else ""
    assert current == rendered, (
        f"docs/recipes.md differs from the recipe schema; regenerate it with `{REGENERATE_COMMAND}`"
    )


def test_the_rendering_is_deterministic(rendered):
    assert render_reference() == rendered


@pytest.mark.parametrize("cls", config_classes(), ids=lambda cls: cls.__name__)
def test_every_section_and_key_has_a_doc(cls):
    assert class_doc(cls), f"{cls.__name__} needs a docstring: it introduces its section"
    undocumented = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("doc")]
    assert not undocumented, (
        f"{cls.__name__}: give {', '.join(undocumented)} a doc "
        "(constrained(..., doc=...) in mecqtk/recipe/schema.py)"
    )


def test_every_key_appears_with_its_dotted_path(rendered):
    for key, *_ in field_docs(Recipe):
        assert f"`{key}`" in rendered, key


def test_section_defaults_are_shown_where_the_section_sets_them(rendered):
    # quant.weight defaults to per-channel (quant.activation to per-tensor), same class
    row = next(line for line in rendered.splitlines()
               if line.startswith("| `quant.weight.granularity`"))
    assert "`per_channel`" in row and "per_tensor`;" not in row
    row = next(line for line in rendered.splitlines()
               if line.startswith("| `quant.activation.granularity`"))
    assert "`per_tensor`" in row


def test_every_bundled_recipe_is_listed(rendered):
    from mecqtk.recipe import bundled_recipes

    for name in bundled_recipes():
        assert f"| `{name}` |" in rendered


def test_the_rules_example_is_a_valid_recipe():
    quant = recipe_from_dict(yaml.safe_load(RULES_EXAMPLE)).quant
    assert len(quant.rules) == 5 and quant.rules[2].skip


def test_the_rules_example_names_real_layers_and_ops(one_torch_thread):
    """The example table's names and skips are what `mecqtk recipe explain` reports."""
    from mecqtk.doctor import explain

    recipe = recipe_from_dict(yaml.safe_load(RULES_EXAMPLE))
    rows = {row.name: row for row in explain("cifar_resnet20", recipe).report.rows}
    for name, kind, _ in EXAMPLE_NODES:
        assert name in rows, f"{name} is not a layer or op of cifar_resnet20"
        assert rows[name].kind == kind
    assert not rows["layer1.0.add"].quantized and rows["layer2.0.add_3"].quantized
    assert rows["layer3.2.conv2"].weight.startswith("s4") and rows["conv1"].weight == "s8 lsq/ch"
