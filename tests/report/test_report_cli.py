import json

from click.testing import CliRunner

from mecqtk.cli import main
from mecqtk.recipe import load_recipe
from mecqtk.report import read_report_json
from mecqtk.rundir import load_quantized_model


def test_report_command_writes_files_and_a_recipe_quantize_accepts(
        w2a2_run, w4a4_random_run, data_spec, tmp_path):
    from mecqtk.run import QuantizeOptions, quantize

    result = CliRunner().invoke(main, [
        "report", str(w2a2_run), "--data", data_spec, "--n", "10", "--sensitivity",
        "--raise-top", "2", "--compare", str(w4a4_random_run), "--device", "cpu",
        "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    assert "worst first by sensitivity" in result.output
    assert "layer1.0.conv1" in result.output and "suggested recipe raises" in result.output
    assert "note: float references differ" in result.output
    document = read_report_json(w2a2_run / "report.json")
    assert document["run"]["images"] == 10
    assert document["comparison"]["other_run"] == str(w4a4_random_run)
    assert (w2a2_run / "report.html").read_text().count("data:image/png;base64,") == 8
    raised = {r["name"]: r["bits"] for r in document["sensitivity"]["suggested_recipe"]["raised"]}
    assert len(raised) == 2 and set(raised.values()) == {4}
    recipe_path = w2a2_run / "suggested_recipe.yaml"
    recipe = load_recipe(recipe_path)
    assert [rule.match.name for rule in recipe.quant.rules[:2]] == list(raised)
    # `mecqtk quantize` takes the suggested recipe as it is
    out = tmp_path / "mixed"
    quantize(QuantizeOptions(model="cifar_resnet20", recipe=str(recipe_path), data=data_spec,
                             out=out, limit_train=50, limit_val=10, device="cpu",
                             show_progress=False))
    qmodel, _, _ = load_quantized_model(out)
    for name in raised:
        assert qmodel.get_submodule(name).weight_quantizer.bits == 4


def test_report_json_to_stdout(w4a4_random_run, data_spec):
    result = CliRunner().invoke(main, [
        "report", str(w4a4_random_run), "--data", data_spec, "--n", "10", "--json",
        "--device", "cpu"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["reference"]["kind"] == "bypass"
    assert document["sensitivity"] is None and document["comparison"] is None


def test_report_on_a_folder_without_a_run_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path), "--n", "5"])
    assert result.exit_code == 2
    assert "not a mecqtk run folder" in result.output
    assert "Traceback" not in result.output
