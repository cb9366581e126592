"""Simulated conv-BN folding: equal to conv+BN, never divides by gamma, freezes on request."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from mecqtk.graph import annotated_nodes, quant_report
from mecqtk.qat import prepare
from mecqtk.quant.bn_fold import FoldedBNLayer, bn_epoch_start, freeze_bn_stats
from mecqtk.quant.calibrate import calibrate
from mecqtk.quant.quantizers import Mode, make_quantizer
from mecqtk.quant.spec import QuantSpec
from mecqtk.recipe import recipe_from_dict

SPEC = QuantSpec(bits=4, signed=True, granularity="per_channel")


# two OpenMP threads on a busy 2-core machine make the resnet18 steps many times slower
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _folded(bias: bool = False):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    reference = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn))
    folded = FoldedBNLayer(conv, bn, make_quantizer(SPEC, channels=6, axis=0))
    folded.weight_quantizer.mode = Mode.BYPASS
    return folded, reference


def test_fold_equals_conv_then_bn_in_train_and_eval():
    for bias in (False, True):
        folded, reference = _folded(bias)
        x = torch.randn(4, 3, 8, 8)
        torch.testing.assert_close(folded(x), reference(x), atol=1e-5, rtol=1e-5)
        # running statistics moved exactly as BN's own
        torch.testing.assert_close(folded.bn.running_mean, reference[1].running_mean)
        torch.testing.assert_close(folded.bn.running_var, reference[1].running_var)
        folded.eval()
        reference.eval()
        torch.testing.assert_close(folded(x), reference(x), atol=1e-5, rtol=1e-5)


def test_frozen_statistics_give_the_exported_form():
    folded, reference = _folded(bias=True)
    before = folded.bn.running_mean.clone()
    assert freeze_bn_stats(nn.Sequential(folded)) == 1
    x = torch.randn(4, 3, 8, 8)
    out = folded(x)  # training mode, but frozen
    assert torch.equal(folded.bn.running_mean, before)
    exported = nn.functional.conv2d(x, folded.effective_weight(), folded.folded_bias(), 1, 1)
    torch.testing.assert_close(out, exported, atol=1e-5, rtol=1e-5)
    reference.eval()
    torch.testing.assert_close(out, reference(x), atol=1e-5, rtol=1e-5)


def test_zero_gamma_gives_zero_channel_not_nan_and_still_learns():
    folded, _ = _folded()
    with torch.no_grad():
        folded.bn.weight[:2] = 0.0
    folded.weight_quantizer.mode = Mode.QUANTIZE
    calibrate(nn.Sequential(folded), [torch.randn(4, 3, 8, 8)])
    scale = folded.weight_quantizer.scale
    assert torch.all(scale > 1e-4)  # a zero channel gets a usable step, not 1e-8
    out = folded(torch.randn(4, 3, 8, 8))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(folded.bn.weight.grad).all()
    assert folded.bn.weight.grad[:2].abs().sum() > 0  # gamma = 0 can move away from 0


def test_resnet18_folded_trains_from_timm_init_without_nan():
    model = timm.create_model("resnet18", num_classes=10)
    zero_gammas = sum(int((m.weight == 0).all()) for m in model.modules()
                      if isinstance(m, nn.BatchNorm2d))
    assert zero_gammas == 8  # timm zero-initialises the last BN of every residual block
    recipe = recipe_from_dict({"quant": {"weight": {"bits": 2}, "activation": {"bits": 2},
                                         "batchnorm": {"fold": True, "freeze_epoch": 1}}})
    qmodel = prepare(model, recipe)
    assert sum(isinstance(m, FoldedBNLayer) for m in qmodel.modules()) == 20
    assert all(q.bn for _, q in annotated_nodes(qmodel) if q.kind == "conv")
    rows = quant_report(model, qmodel).layers
    assert sum(r.op.endswith("+ folded BN") for r in rows) == 20 and len(rows) == 21
    assert not any(isinstance(m, nn.BatchNorm2d) and not isinstance(p, FoldedBNLayer)
                   for p in qmodel.modules() for m in p.children())
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    calibrate(qmodel, [x], observer="minmax")  # MSE on 11M weights is slow on 2 cores
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(2):
        assert bn_epoch_start(qmodel, epoch, recipe.quant.batchnorm.freeze_epoch) == (epoch >= 1)
        loss = nn.functional.cross_entropy(qmodel(x), y)
        optimizer.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in qmodel.parameters()
                   if p.grad is not None)
        optimizer.step()
    assert all(bool(m.stats_frozen) for m in qmodel.modules() if isinstance(m, FoldedBNLayer))
