import dataclasses

import pytest
from click.testing import CliRunner

from mecqtk.cli import main
from mecqtk.errors import RecipeError
from mecqtk.recipe import (
    bundled_recipe_dir,
    bundled_recipes,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
)


@pytest.mark.parametrize("name", bundled_recipes())
def test_every_bundled_recipe_loads_and_round_trips(name, tmp_path):
    recipe = load_recipe(bundled_recipe_dir() / name)
    path = tmp_path / name
    path.write_text(dump_recipe(recipe))
    assert load_recipe(path) == recipe


def test_the_issue_recipes_are_bundled():
    assert {"w4a4_lsq.yaml", "w2a2_lsq.yaml", "quickstart.yaml"} <= set(bundled_recipes())


def test_bare_name_resolves_with_or_without_suffix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a bare name must not depend on the working directory
    assert load_recipe("w2a2_lsq.yaml").quant.weight.bits == 2
    assert load_recipe("w2a2_lsq").quant.activation.bits == 2


@pytest.mark.parametrize(("data", "message"), [
    ({"quant": {"weight": {"bits": 9}}},
     "quant.weight.bits: 9 is out of range; allowed: >= 2 and <= 8"),
    ({"quant": {"activation": {"bits": 1}}},
     "quant.activation.bits: 1 is out of range; allowed: >= 2 and <= 8"),
    ({"quant": {"wieght": {}}},
     "quant.wieght: unknown key; allowed keys here: weight, activation"),
    ({"train": {"optimizer": {"lr": -0.1}}},
     "train.optimizer.lr: -0.1 is out of range; allowed: > 0.0"),
    ({"train": {"epochs": "ten"}}, "train.epochs: expected an integer, got 'ten'"),
    ({"train": {"batch_size": 12.5}}, "train.batch_size: expected an integer, got 12.5"),
    ({"train": {"optimizer": {"name": "lion"}}},
     "train.optimizer.name: 'lion' is not allowed; use one of sgd, adamw"),
    ({"quant": {"weight": {"quantizer": "magic"}}},
     "quant.weight.quantizer: 'magic' is not allowed; use one of"),
    ({"quant": {"weight": {"granularity": "per_row"}}},
     "quant.weight.granularity: 'per_row' is not allowed; use one of per_tensor, per_channel"),
    ({"quant": {"rules": [{"match": {}, "skip": True}]}},
     "quant.rules[0]: match: a rule needs at least one of name, op, position"),
    ({"quant": {"rules": [{"match": {"op": ["conv", "lstm"]}}]}},
     "quant.rules[0].match.op[1]: 'lstm' is not allowed"),
    ({"quant": {"weight": {"signed": "unsigned"}}},
     "quant: weight.signed: weights are always signed"),
    ({"train": {"nesterov": True}}, "train.nesterov: unknown key"),
    ([1, 2], "recipe: expected a mapping, got list"),
])
def test_recipe_errors_name_the_key_and_what_is_allowed(data, message):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_recipes_are_frozen():
    recipe = load_recipe("w4a4_lsq")
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.train.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(("text", "message"), [
    ("quant: [1\n", "malformed YAML at line 2"),
    ("quant:\n  weight: {bits: 12}\n", "quant.weight.bits: 12 is out of range"),
    ("train:\n  seed: -1\n", "train.seed: -1 is out of range; allowed: >= 0"),
])
def test_cli_reports_recipe_errors_in_one_line_with_exit_code_2(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["recipe", "show", str(path)])
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_missing_recipe_lists_the_bundled_ones():
    result = CliRunner().invoke(main, ["recipe", "show", "w3a3_nothing.yaml"])
    assert result.exit_code == 2
    assert "w2a2_lsq.yaml" in result.stderr


def test_yaml_is_never_evaluated_as_code(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(RecipeError, match="malformed YAML"):
        load_recipe(path)


def test_a_written_section_starts_from_the_section_default():
    # Left out, quant.weight is per-channel and signed; writing only its bits keeps that.
    weight = recipe_from_dict({"quant": {"weight": {"bits": 2}}}).quant.weight
    assert (weight.bits, weight.granularity, weight.signed) == (2, "per_channel", "signed")
    activation = recipe_from_dict({"quant": {"activation": {"bits": 3}}}).quant.activation
    assert (activation.bits, activation.granularity, activation.signed) == (3, "per_tensor", "auto")
    # and an explicit key still wins
    tensor = recipe_from_dict({"quant": {"weight": {"granularity": "per_tensor"}}}).quant.weight
    assert tensor.granularity == "per_tensor" and tensor.bits == 4
