"""In eval mode a prepared model computes its deploy form bit for bit (export/deploy_eval.py)."""

from __future__ import annotations

import pytest
import torch
from export_nets import ResidualNet, images, quantized, randomize_batchnorms

from mecqtk.export import snap_biases
from mecqtk.export.convert import convert
from mecqtk.export.deploy_eval import DeployForm, float_layer_outputs


def _forms(gm) -> list[DeployForm]:
    return [m.deploy_form for m in gm.modules() if isinstance(getattr(m, "deploy_form", None),
                                                              DeployForm)]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_eval_mode_computes_exactly_what_the_deploy_form_computes(bits):
    # seed 1: here the training-time arithmetic, bn(conv(x, w)), differs from the deploy form's
    # conv(x, w * g) + b by float rounding (0.001-0.006 of the logits on this machine)
    torch.manual_seed(1)
    gm = quantized(randomize_batchnorms(ResidualNet(), 1), bits, bits, seed=1)
    snap_biases(gm)
    assert len(_forms(gm)) == 5
    assert sum(f.batchnorm is not None for f in _forms(gm)) == 3  # bn1, bn2, bn3 absorbed
    x = images(256, 11)
    deploy, _ = convert(gm)
    with torch.no_grad():
        assert torch.equal(gm(x), deploy(x))
        with float_layer_outputs(gm):  # BatchNorm separate, as in training
            unfolded = gm(x)
    scale = float(unfolded.abs().max())
    torch.testing.assert_close(unfolded, deploy(x), rtol=0.0, atol=0.05 * scale)


def test_the_eval_form_follows_every_change_to_the_model(residual_net):
    gm = quantized(residual_net, 4, 4)
    x = images(32, 4)
    with torch.no_grad():
        before = gm(x)
        gm.bn2.running_mean.add_(0.3)  # statistics, parameters and steps all key the cache
        gm.conv3.layer.weight.mul_(1.5)
        after = gm(x)
        assert not torch.equal(before, after)
        assert torch.equal(after, convert(gm)[0](x))


def test_training_mode_is_untouched(residual_net):
    gm = quantized(residual_net, 4, 4).train()
    x = images(16, 5)
    out = gm(x)
    assert not any(f.active() for f in _forms(gm))
    out.square().mean().backward()
    assert gm.conv1.layer.weight.grad is not None and gm.bn1.weight.grad is not None
    assert gm.conv1.weight_quantizer.scale.grad is not None


class _EagerLeaf(torch.nn.Module):
    """A leaf whose own code calls its conv (an eager layer with its own input quantizer and
    a bias the top graph's snapping never sees; timm's xcit positional encoding)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 1:  # torch.fx cannot trace a branch on a shape
            x = x + self.conv(x)
        return x


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.leaf = _EagerLeaf()
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.leaf(torch.relu(self.stem(x))).mean((2, 3)))


def test_eager_layers_compute_their_deploy_form_too():
    from mecqtk.quant.modules import QuantizedLayer

    torch.manual_seed(0)
    gm = quantized(_Net(), 4, 4)
    eager = gm.get_submodule("leaf.conv")
    assert isinstance(eager, QuantizedLayer) and eager.input_quantizer is not None
    assert isinstance(eager.deploy_form, DeployForm)
    snap_biases(gm)  # the top graph's biases; the eager conv's stays off its int32 grid
    x = images(64, 6)
    with torch.no_grad():
        assert torch.equal(gm(x), convert(gm)[0](x))
