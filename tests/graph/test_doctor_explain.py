"""`mecqtk doctor` and `mecqtk recipe explain`, through click's CliRunner."""

from __future__ import annotations

import json

from click.testing import CliRunner

from mecqtk.cli import main


def test_doctor_json_last_line_reports_a_healthy_model():
    result = CliRunner().invoke(main, ["doctor", "--model", "resnet18", "--recipe",
                                       "w2a2_lsq.yaml", "--image-size", "32", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["traced"] and report["forward_ok"] and report["backward_ok"] and report["ok"]
    assert report["layers_total"] == 21 and report["layers_quantized"] == 21
    assert report["layers_float"] == [] and report["layers_not_run"] == []
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
    add = next(line for line in lines if "layer1.0.add" in line)
    assert "s8 lsq/t, u8 lsq/t" in add
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
