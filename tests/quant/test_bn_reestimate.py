"""BatchNorm re-estimation with the final quantizers (quant.calibrate.reestimate_batchnorm)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mecqtk import calibrate, load_recipe, prepare
from mecqtk.quant.bn_fold import FoldedBNLayer, freeze_bn_stats
from mecqtk.quant.calibrate import reestimate_batchnorm
from mecqtk.quant.quantizers import FakeQuantizer


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 6, 6, generator=g) * 2 + 1 for _ in range(3)]


def test_statistics_are_the_average_over_the_batches_through_the_final_quantizers():
    torch.manual_seed(0)
    qmodel = prepare(_model(), load_recipe("w4a4_lsq"))
    calibrate(qmodel, _batches()[:1])
    bn = [m for m in qmodel.modules() if isinstance(m, nn.BatchNorm2d)][1]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(9.0)
    steps = {n: m.scale.detach().clone() for n, m in qmodel.named_modules()
             if isinstance(m, FakeQuantizer)}
    # what reaches the second BatchNorm in training mode, batch by batch
    inputs = []
    hook = bn.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    qmodel.eval()
    assert reestimate_batchnorm(qmodel, _batches()) == 3
    hook.remove()
    assert len(inputs) == 3 and not qmodel.training
    means = torch.stack([x.mean((0, 2, 3)) for x in inputs])
    variances = torch.stack([x.var((0, 2, 3), unbiased=True) for x in inputs])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    # the quantizers are as they were: nothing tracked or learned
    for name, module in qmodel.named_modules():
        if isinstance(module, FakeQuantizer):
            assert torch.equal(module.scale.detach(), steps[name]), name


def test_statistics_a_recipe_froze_are_kept():
    recipe = load_recipe("w4a4_lsq")
    recipe = dataclasses.replace(recipe, quant=dataclasses.replace(
        recipe.quant, batchnorm=dataclasses.replace(recipe.quant.batchnorm, fold=True)))
    torch.manual_seed(0)
    qmodel = prepare(_model(), recipe)
    calibrate(qmodel, _batches()[:1])
    folded = [m for m in qmodel.modules() if isinstance(m, FoldedBNLayer)]
    assert len(folded) == 2
    folded[0].freeze()
    kept = folded[0].bn.running_mean.clone()
    before = folded[1].bn.running_mean.clone()
    reestimate_batchnorm(qmodel.train(), _batches())
    assert torch.equal(folded[0].bn.running_mean, kept)
    assert not torch.equal(folded[1].bn.running_mean, before)
    assert freeze_bn_stats(qmodel) == 2 and reestimate_batchnorm(qmodel, _batches()) == 0
