import pytest
import yaml

from mecqtk.models import create_model
from mecqtk.qat import prepare
from mecqtk.recipe import dump_recipe, load_recipe
from mecqtk.report.sensitivity import name_pattern, rank_by_sensitivity, suggest_recipe
from mecqtk.report.sites import find_sites


def _bits(qmodel):
    return {s.name: (s.weight_quantizer.bits, s.input_quantizer.bits) for s in find_sites(qmodel)}


def test_suggested_recipe_raises_the_worst_layers_and_loads(tmp_path):
    recipe = load_recipe("w2a2_lsq.yaml")
    model = create_model("cifar_resnet20", num_classes=10)
    sites = find_sites(prepare(model, recipe))
    # conv1 is already 8-bit and cannot be raised: the next two layers are
    ranking = ["conv1", "layer2.1.conv2", "layer1.0.conv1", "layer3.0.conv2"]
    mixed, raised = suggest_recipe(recipe, sites, ranking, raise_top=2)
    assert raised == {"layer2.1.conv2": 4, "layer1.0.conv1": 4}
    path = tmp_path / "suggested.yaml"
    path.write_text(dump_recipe(mixed))
    loaded = load_recipe(path)
    assert loaded == mixed
    assert loaded.name == "w2a2_lsq_mixed"
    assert [r.match.name for r in loaded.quant.rules[:2]] == ["layer2.1.conv2", "layer1.0.conv1"]
    assert loaded.quant.rules[2:] == recipe.quant.rules
    assert loaded.train == recipe.train
    bits = _bits(prepare(model, loaded))
    assert bits["layer2.1.conv2"] == bits["layer1.0.conv1"] == (4, 4)
    assert bits["conv1"] == bits["linear"] == (8, 8)
    assert all(b == (2, 2) for name, b in bits.items()
               if name not in {"conv1", "linear", "layer2.1.conv2", "layer1.0.conv1"})


def test_a_four_bit_layer_is_raised_to_eight_with_a_calibrated_step(tmp_path):
    recipe = load_recipe("w4a4_lsq.yaml")
    model = create_model("cifar_resnet20", num_classes=10)
    sites = find_sites(prepare(model, recipe))
    mixed, raised = suggest_recipe(recipe, sites, ["layer3.2.conv2"], raise_top=3)
    assert raised == {"layer3.2.conv2": 8}
    rule = mixed.quant.rules[0]
    assert (rule.weight.bits, rule.weight.learn_step) == (8, False)
    (tmp_path / "r.yaml").write_text(dump_recipe(mixed))
    qmodel = prepare(model, load_recipe(tmp_path / "r.yaml"))
    layer = qmodel.get_submodule("layer3.2.conv2")
    assert layer.weight_quantizer.bits == 8 and not layer.weight_quantizer.scale.requires_grad


def test_name_patterns_match_exactly_one_module():
    assert name_pattern("layer1.0.conv1") == "layer1.0.conv1"
    assert name_pattern("blocks[0].conv") == r"re:blocks\[0\]\.conv"
    doc = yaml.safe_load(f"name: '{name_pattern('a*b')}'")
    assert doc["name"] == r"re:a\*b"


def test_sensitivity_on_real_images(w2a2_report):
    sensitivity = w2a2_report.sensitivity
    assert sensitivity.subject.kind == "float_checkpoint_calibrated"
    # the probed model bypassed is the float checkpoint itself
    assert sensitivity.float_score.top1 == pytest.approx(w2a2_report.float_score.top1)
    assert sensitivity.float_score.loss == pytest.approx(w2a2_report.float_score.loss, rel=1e-5)
    assert len(sensitivity.layers) == 20
    assert w2a2_report.ranking_by == "sensitivity"
    assert w2a2_report.ranking == rank_by_sensitivity(
        sensitivity.float_score, sensitivity.quantized_score, sensitivity.layers)
    added = {e.name: sensitivity.loss_added(e.name) for e in sensitivity.layers}
    two_bit = [v for name, v in added.items() if name not in ("conv1", "linear")]
    # quantizing one layer to 2 bits costs loss on average; an 8-bit layer costs far less
    assert sum(two_bit) / len(two_bit) > 0.02
    assert abs(added["conv1"]) < max(two_bit)
    ranked_costs = [added[name] for name in w2a2_report.ranking]
    assert ranked_costs == sorted(ranked_costs, reverse=True)
    # the suggestion raises the top-ranked layers that are below 8 bits
    expected = [n for n in w2a2_report.ranking if n not in ("conv1", "linear")][:3]
    assert list(sensitivity.raised) == expected
    assert set(sensitivity.raised.values()) == {4}
