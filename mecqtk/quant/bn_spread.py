"""BatchNorm on tiny feature maps during QAT: a floor on each channel's batch spread.

On a 1x1 map (timm's ImageNet networks at 32 px: ghostnet's last stages, efficientnet's last
blocks) a BatchNorm in training mode normalises each channel over the batch alone. After 2- or
4-bit activations a depthwise conv's channel is often the same code for every sample, its batch
variance is exactly 0, and BatchNorm divides by ``sqrt(eps)``: its backward multiplies that
channel's gradient by ``gamma / sqrt(1e-5)``, about 300. Measured on ghostnet_100 at W2A2 from
timm's initialisation (batch 128): gradient gains of 120-160 at ``blocks.7``/``blocks.8``'s
BatchNorms, weight gradients of 1e5, and a NaN loss at the third SGD step.

The fix is at that source: on maps of at most :data:`TINY_MAP_PIXELS` pixels, a channel's batch
standard deviation is taken as at least :data:`SPREAD_FLOOR` times the median over the layer's
channels. It is done by a forward pre-hook that scales the channel's deviations from its batch
mean by a constant ``k < 1`` (no gradient through ``k``), so the BatchNorm itself, its running
statistics, its checkpoint keys and its eval-mode arithmetic (what the export folds) stay as
they are; a channel above the floor is passed through untouched, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

TINY_MAP_PIXELS = 16
SPREAD_FLOOR = 0.1

BatchNorm = nn.modules.batchnorm._BatchNorm


class SpreadFloor:
    """Forward pre-hook of one BatchNorm (see the module docstring)."""

    def __call__(self, bn: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if (not bn.training or not isinstance(x, torch.Tensor) or x.dim() != 4
                or x.shape[2] * x.shape[3] > TINY_MAP_PIXELS or x.shape[0] < 2):
            return None
        with torch.no_grad():
            stats = x.float()
            mean = stats.mean((0, 2, 3), keepdim=True)
            var = stats.var((0, 2, 3), unbiased=False, keepdim=True)
            sigma = torch.sqrt(var + bn.eps)
            floor = SPREAD_FLOOR * sigma.median()
            below = sigma < floor
            if not bool(below.any()):
                return None
            # standard BatchNorm of mean + k (x - mean) divides x - mean by sqrt(k^2 var + eps)
            # / k; this k makes that exactly the floor
            k = torch.sqrt(bn.eps / (floor**2 - var).clamp_min(bn.eps)).to(x.dtype)
            mean = mean.to(x.dtype)
        return (torch.where(below, mean + (x - mean) * k, x), *args[1:])


def floor_batchnorm_spread(model: nn.Module) -> int:
    """Give every BatchNorm of ``model`` the spread floor; returns how many.

    Example:
        >>> floor_batchnorm_spread(qmodel)  # done by mecqtk.prepare
        49
    """
    count = 0
    for module in model.modules():
        if isinstance(module, BatchNorm) and not any(
                isinstance(h, SpreadFloor) for h in module._forward_pre_hooks.values()):
            module.register_forward_pre_hook(SpreadFloor())
            count += 1
    return count
