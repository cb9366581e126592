import pytest
import timm
import torch
from torch import nn

from mecqtk import calibrate, prepare
from mecqtk.graph import annotated_nodes
from mecqtk.graph.signedness import nonnegative_values
from mecqtk.graph.tracer import trace
from mecqtk.quant import FakeQuantizer, QuantizedLayer
from mecqtk.recipe import load_recipe, recipe_from_dict


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(x, 2)
        y = self.conv2(x)  # input after relu + max-pool: unsigned
        z = self.conv3(y)  # input is a conv output: signed
        return self.fc(z.mean(dim=(2, 3)))


def _specs(gm):
    """Layer decisions by module name (junction ops are tested in test_junctions.py)."""
    return {q.module_name: q for _, q in annotated_nodes(gm) if q.kind in ("conv", "linear")}


def test_every_layer_gets_weight_and_input_quantizers():
    gm = prepare(TinyNet(), load_recipe("w2a2_lsq"))
    specs = _specs(gm)
    assert set(specs) == {"conv1", "conv2", "conv3", "fc"}
    layers = [m for m in gm.modules() if isinstance(m, QuantizedLayer)]
    assert len(layers) == 4
    assert specs["conv1"].weight.bits == 8 and specs["conv1"].inputs[0].bits == 8  # first
    assert specs["fc"].weight.bits == 8 and specs["fc"].inputs[0].bits == 8  # last
    assert specs["conv2"].weight.bits == 2 and specs["conv2"].inputs[0].bits == 2
    assert specs["conv1"].inputs[0].signed  # normalised image
    assert not specs["conv2"].inputs[0].signed  # relu -> max-pool
    assert specs["conv3"].inputs[0].signed  # raw conv output
    assert specs["conv2"].weight.granularity == "per_channel"


def test_prepare_leaves_the_float_model_untouched():
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare(model, load_recipe("w4a4_lsq"))
    assert not any(isinstance(m, QuantizedLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rules_are_ordered_and_can_skip():
    recipe = recipe_from_dict({"quant": {
        "weight": {"bits": 2}, "activation": {"bits": 2},
        "rules": [
            {"match": {"name": "conv3"}, "skip": True},
            {"match": {"name": "re:conv[23]"}, "weight": {"bits": 6}},
            {"match": {"op": ["conv"]}, "weight": {"bits": 5}, "activation": {"bits": 3}},
        ],
    }})
    specs = _specs(prepare(TinyNet(), recipe))
    assert specs["conv3"].skipped and not specs["conv3"].quantized
    assert specs["conv2"].weight.bits == 6  # first matching rule wins for weight bits
    assert specs["conv2"].inputs[0].bits == 3  # a later rule still sets activation bits
    assert specs["conv1"].weight.bits == 5
    assert specs["fc"].weight.bits == 2


def test_calibrated_model_runs_and_trains_on_grid():
    torch.manual_seed(0)
    gm = prepare(TinyNet(), load_recipe("w2a2_lsq"))
    x = torch.randn(16, 3, 16, 16)
    calibrate(gm, [x])
    quantizers = [m for m in gm.modules() if isinstance(m, FakeQuantizer)]
    assert all(bool(q.initialized) for q in quantizers)
    out = gm(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    conv2 = gm.get_submodule("conv2")
    w = conv2.quantized_weight().detach()
    codes = w / conv2.weight_quantizer.scale.detach().view(-1, 1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-5)
    assert codes.abs().max() <= 2
    # learned steps get gradients; the 8-bit first/last layer steps stay as calibrated
    assert all((q.scale.grad is not None) == (q.spec.bits < 8) for q in quantizers)


def test_nonnegativity_analysis():
    gm = trace(TinyNet())
    nonneg = nonnegative_values(gm)
    assert "relu" in nonneg and "max_pool2d" in nonneg
    assert "conv2" not in nonneg and "x" not in nonneg


@pytest.mark.parametrize("name", [
    "resnet18", "mobilenetv2_100", "efficientnet_b0", "vit_tiny_patch16_224",
])
def test_timm_families_have_every_conv_and_linear_quantized(name):
    model = timm.create_model(name, num_classes=10)
    dense = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())
    gm = prepare(model, load_recipe("w4a4_lsq"))
    quantized = [m for m in gm.modules() if isinstance(m, QuantizedLayer)]
    assert len(quantized) == dense
    size = 224 if "vit" in name else 64
    x = torch.randn(2, 3, size, size)
    calibrate(gm, [x])
    out = gm(x)
    out.sum().backward()
    assert out.shape == (2, 10) and torch.isfinite(out).all()
