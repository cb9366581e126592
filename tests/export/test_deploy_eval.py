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
