"""The BatchNorm spread floor on tiny maps (mecqtk.quant.bn_spread)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mecqtk.quant.bn_spread import SPREAD_FLOOR, floor_batchnorm_spread


def _input(side: int, constant_channel: int | None = 0) -> torch.Tensor:
    x = torch.randn(64, 4, side, side, generator=torch.Generator().manual_seed(0))
    if constant_channel is not None:  # the same 2-bit code in every sample
        x[:, constant_channel] = 0.75
    return x.requires_grad_(True)


def _forward_backward(bn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = bn(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(out, x, upstream)
    return out.detach(), grad


def test_a_channel_without_batch_spread_no_longer_multiplies_its_gradient_by_300():
    plain = nn.BatchNorm2d(4).train()
    floored = copy.deepcopy(plain)
    assert floor_batchnorm_spread(floored) == 1
    x = _input(1)
    out_plain, grad_plain = _forward_backward(plain, x)
    out_floored, grad_floored = _forward_backward(floored, x)
    # plain BatchNorm divides the constant channel by sqrt(eps): gain ~316
    assert grad_plain[:, 0].abs().max() > 100
    sigma = x.detach()[:, 1:].std((0, 2, 3), unbiased=False)
    bound = 1.0 / (SPREAD_FLOOR * float(sigma.median()))
    assert grad_floored[:, 0].abs().max() < 3 * bound
    # the other channels are untouched, bit for bit, forward and backward
    assert torch.equal(out_floored[:, 1:], out_plain[:, 1:])
    assert torch.equal(grad_floored[:, 1:], grad_plain[:, 1:])
    # the constant channel's output is its shift either way
    torch.testing.assert_close(out_floored[:, 0], out_plain[:, 0])


def test_larger_maps_and_eval_mode_are_untouched():
    plain = nn.BatchNorm2d(4).train()
    floored = copy.deepcopy(plain)
    floor_batchnorm_spread(floored)
    x = _input(8)  # 64 pixels: per-channel statistics over 64 x 64 values
    for a, b in zip(_forward_backward(plain, x), _forward_backward(floored, x), strict=True):
        assert torch.equal(a, b)
    plain.eval()
    floored.eval()
    x = _input(1)
    for a, b in zip(_forward_backward(plain, x), _forward_backward(floored, x), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(plain.running_var, floored.running_var)


def test_prepare_gives_every_batchnorm_the_floor():
    from mecqtk.qat import prepare
    from mecqtk.quant.bn_spread import SpreadFloor
    from mecqtk.recipe import QuantConfig

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4))
    qmodel = prepare(model, QuantConfig())
    bns = [m for m in qmodel.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2
    assert all(any(isinstance(h, SpreadFloor) for h in bn._forward_pre_hooks.values())
               for bn in bns)
    assert floor_batchnorm_spread(qmodel) == 0  # once only


def test_running_variance_of_a_floored_channel_records_the_floor():
    """Eval mode divides by sqrt(running_var + eps): a floored channel must have learned the
    floor there, not its shrunk batch variance (which left it dividing by sqrt(eps))."""
    bn = nn.BatchNorm2d(4).train()
    floor_batchnorm_spread(bn)
    x = _input(1).detach()
    x[:, 0] += 1e-4 * torch.randn(64, 1, 1, generator=torch.Generator().manual_seed(2))
    for _ in range(150):
        bn(x)
    sigma = torch.sqrt(x.var((0, 2, 3), unbiased=False) + bn.eps)
    floor = SPREAD_FLOOR * float(sigma.median())
    # converged (0.9**150 of the initial 1 is left): the floored channel divides by the floor
    assert float(torch.sqrt(bn.running_var[0] + bn.eps)) == pytest.approx(floor, rel=0.02)
    # the other channels keep BatchNorm's own unbiased batch variance
    unbiased = x[:, 1:].var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(bn.running_var[1:], unbiased, rtol=0.01, atol=1e-3)


def test_the_floor_arithmetic_runs_on_one_precompiled_graph_equal_to_the_plain_function():
    """The per-channel arithmetic (median, floor, gain, shift, running-variance correction) is
    one compiled call, checked against the plain function on its first inputs: none refused,
    none run by the fallback, and the same terms as the plain function."""
    from mecqtk.quant import bn_spread

    kernel = bn_spread._floor_terms_kernel
    refused = sum(graph is None for graph in kernel.compiled.values())
    fallback_calls = kernel.fallback_calls
    for channels in (4, 24):  # one graph serves every channel count
        bn = nn.BatchNorm2d(channels).train()
        floor_batchnorm_spread(bn)
        spread = torch.rand(channels, 1, 1, generator=torch.Generator().manual_seed(channels))
        x = torch.stack([0.5 + spread, -0.5 - spread])  # every channel spread by at least 0.5
        x[:, 0] = 0.75  # but this one: the same code in both samples
        _, mean, invstd = torch.ops.aten._native_batch_norm_legit(x, None, None, True, 0.0,
                                                                  bn.eps)
        unbiasing = torch.tensor(2.0)
        fast = kernel(mean, invstd, unbiasing, bn.eps, bn.momentum)
        plain = bn_spread._floor_terms(mean, invstd, unbiasing, bn.eps, bn.momentum)
        assert bool(fast[0]) and bool(plain[0])  # channel 0 is below the floor
        for a, b in zip(fast[1:], plain[1:], strict=True):
            assert torch.equal(a, b)
        assert float(fast[1][0]) < 1.0 and float(fast[1][1:].min()) == 1.0  # gains
        bn(x.requires_grad_(True)).sum().backward()  # the hook itself, through the kernel
    assert sum(graph is None for graph in kernel.compiled.values()) == refused
    assert kernel.fallback_calls == fallback_calls
