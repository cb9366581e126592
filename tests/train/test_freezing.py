import torch
from torch import nn

from mecqtk import calibrate, prepare
from mecqtk.models import create_model
from mecqtk.quant.bn_fold import FoldedBNLayer
from mecqtk.quant.modules import QuantizedLayer
from mecqtk.quant.quantizers import make_quantizer
from mecqtk.quant.spec import QuantSpec
from mecqtk.recipe import recipe_from_dict
from mecqtk.train.freezing import MOMENTUM, OscillationFreezer


def linear_layer() -> QuantizedLayer:
    layer = QuantizedLayer(nn.Linear(4, 2, bias=False),
                           make_quantizer(QuantSpec(bits=2, signed=True), channels=1))
    with torch.no_grad():
        layer.layer.weight.copy_(torch.tensor([[0.45, 0.1, -0.3, 0.0], [0.2, -0.2, 0.0, 0.3]]))
        layer.weight_quantizer.scale.fill_(0.5)  # codes -2..1: bin edges at ±0.25, 0.75
    return layer


def test_a_weight_that_keeps_flipping_is_frozen_at_its_bin_centre_and_stays_there():
    layer = linear_layer()
    weight = layer.layer.weight
    threshold = 2.5 * MOMENTUM  # passed at the third oscillation
    freezer = OscillationFreezer(threshold, layer)
    flips = 0
    with torch.no_grad():
        for step in range(12):
            # weight[0, 0] crosses the 0.25 bin edge back and forth (codes 1, 0, 1, ...);
            # weight[1, 0] drifts one way only, crossing 0.25 once
            weight[0, 0] = 0.2 if step % 2 == 0 else 0.3
            weight[1, 0] += 0.01
            freezer.after_update()
            state = freezer.trainable[0]
            if not state.frozen[0, 0]:
                flips += 1
    state = freezer.trainable[0]
    assert state.frozen[0, 0] and not state.frozen[1, 0]
    assert state.frozen.sum() == 1
    # the first change has no previous direction; frozen by the update of the third oscillation
    assert flips == 3
    assert weight[0, 0] in (0.0, 0.5)  # a bin centre: code 0 or 1 times the step
    held = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] = -0.9  # a later update is undone
        freezer.after_update()
    assert weight[0, 0].item() == held
    assert freezer(None, None, None, 0)["log_frozen_weight_fraction"].item() == 1 / 8


def test_freezing_through_a_folded_batchnorm_holds_the_code_the_export_will_use():
    torch.manual_seed(0)
    recipe = recipe_from_dict({"quant": {"weight": {"bits": 2, "granularity": "per_channel"},
                                         "activation": {"bits": 2}, "batchnorm": {"fold": True}}})
    model = prepare(create_model("cifar_resnet20", num_classes=10), recipe)
    calibrate(model, [torch.randn(8, 3, 32, 32)])
    freezer = OscillationFreezer(0.5, model)
    index = next(i for i, layer in enumerate(freezer.layers)
                 if isinstance(layer, FoldedBNLayer) and layer.weight_quantizer.qmax == 1)
    layer, state = freezer.layers[index], freezer.trainable[index]
    with torch.no_grad():
        layer.bn.weight.mul_(torch.linspace(0.5, 2.0, layer.bn.num_features))
        state.frequency[0, 0, 0, 0] = 1.0  # as if it had oscillated every step
        state.average_code[0, 0, 0, 0] = -1.3  # -1.28 .. -1.31 after this update's codes
        freezer.after_update()
    assert state.frozen.sum() == 1
    codes = layer.weight_quantizer.codes(layer.effective_weight())
    assert codes[0, 0, 0, 0].item() == -1
    folded = layer.effective_weight()[0, 0, 0, 0] / layer.weight_quantizer.step_size()[0]
    assert abs(folded.item() + 1.0) < 1e-5  # the bin centre, not just inside the bin
