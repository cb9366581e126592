"""`mecqtk doctor` and `mecqtk recipe explain`, through click's CliRunner."""

from __future__ import annotations

import json

from click.testing import CliRunner
from torch import nn

from mecqtk.cli import main
from mecqtk.doctor import check_model
from mecqtk.recipe import recipe_from_dict


def test_doctor_json_last_line_reports_a_healthy_model():
    result = CliRunner().invoke(main, ["doctor", "--model", "resnet18", "--recipe",
                                       "w2a2_lsq.yaml", "--image-size", "32", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["traced"] and report["forward_ok"] and report["backward_ok"] and report["ok"]
    assert report["layers_total"] == 21 and report["layers_quantized"] == 21
    assert report["layers_float"] == 0 and report["float_layers"] == []
    assert report["layers_not_run"] == []
    assert report["needed_leaves"] is False and report["input_size"] == [3, 32, 32]
    assert report["quantized_ops"] == {"pool": 2, "add": 8}


def test_doctor_reports_leaves_for_mobilevit():
    result = CliRunner().invoke(main, ["doctor", "--model", "mobilevit_xxs", "--image-size",
                                       "64", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["ok"] and report["layers_total"] == report["layers_quantized"] == 72
    assert report["quantized_ops"]["matmul"] == 18  # attention inside timm's leaf MobileVitBlock


def test_doctor_table_and_unknown_model():
    runner = CliRunner()
    result = runner.invoke(main, ["doctor", "--model", "resnet18", "--image-size", "32"])
    assert result.exit_code == 0
    assert "21/21 Conv/Linear layers quantized" in result.output and "verdict: yes" in result.output
    bad = runner.invoke(main, ["doctor", "--model", "resnet1888"])
    assert bad.exit_code == 2 and "unknown model 'resnet1888'" in bad.output


def test_explain_prints_every_layer_with_specs_and_skips():
    result = CliRunner().invoke(
        main, ["recipe", "explain", "--model", "resnet18", "--recipe", "w2a2_lsq.yaml"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    first = next(line for line in lines if "│ conv1 " in line)
    assert "s8 lsq/ch" in first and "s8 lsq/t" in first  # first layer: 8-bit by rule
    inner = next(line for line in lines if "layer1.0.conv1" in line)
    assert "s2 lsq/ch" in inner and "u2 lsq/t" in inner  # after ReLU: unsigned 2-bit
    # The first add's shortcut is the max pool of an 8-bit tensor, already on a u8 grid; the
    # sum itself is not quantized because the ReLU after it is (by the next layers).
    first_add = next(line for line in lines if "layer1.0.add" in line).split("│")
    assert [cell.strip() for cell in first_add[4:6]] == ["s8 lsq/t", "-"]
    second_add = next(line for line in lines if "layer1.1.add" in line).split("│")
    assert [cell.strip() for cell in second_add[4:6]] == ["s8 lsq/t, u8 lsq/t", "-"]
    assert "21/21 Conv/Linear layers quantized" in result.output


def test_explain_shows_float_layers_with_reason(tmp_path):
    recipe = tmp_path / "skip_fc.yaml"
    recipe.write_text("quant:\n  rules:\n    - {match: {name: fc}, skip: true}\n")
    result = CliRunner().invoke(
        main, ["recipe", "explain", "--model", "resnet18", "--recipe", str(recipe)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    fc = next(line for line in result.output.splitlines() if "│ fc " in line)
    assert "float: recipe rule quant.rules[0] skips it" in fc
    assert "20/21 Conv/Linear layers quantized, 1 left float" in result.output


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) if x.abs().sum() >= 0 else x  # decided on a tensor value


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _Branchy()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_check_model_reports_needed_leaves_and_json_fields():
    result = check_model(_Net(), "w2a2_lsq.yaml", input_size=(3, 8, 8), name="net")
    data = result.as_json()
    assert data["needed_leaves"] is True and data["auto_leaves"] == ["_Branchy"]
    assert data["ok"] and data["layers_total"] == data["layers_quantized"] == 2
    assert data["forward_ok"] and data["backward_ok"] and data["traced"]
    strict = recipe_from_dict({"quant": {"auto_leaf": False}})
    failed = check_model(_Net(), strict, input_size=(3, 8, 8), name="net")
    assert not failed.traced and not failed.ok
    assert "body (_Branchy)" in failed.error and "quant.leaf_modules" in failed.error
    assert failed.as_json()["layers_total"] == 0
