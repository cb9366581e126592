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
mean by a constant ``k < 1`` (no gradient through ``k``), so the BatchNorm itself, its checkpoint
keys and its eval-mode arithmetic (what the export folds) stay as they are; a channel above the
floor keeps its values exactly (``1 * x + 0``; only a -0.0 becomes +0.0). A floored channel's
running variance records the floor (what training divided by), not its shrunk batch variance.
"""

from __future__ import annotations

import torch
from torch import nn

from mecqtk.quant.precompiled import PrecompiledKernel

TINY_MAP_PIXELS = 16
SPREAD_FLOOR = 0.1

BatchNorm = nn.modules.batchnorm._BatchNorm


def _floor_terms(mean: torch.Tensor, invstd: torch.Tensor, unbiasing: torch.Tensor,
                 eps: float, momentum: float | None):
    """The spread floor of one BatchNorm's batch statistics, per channel: whether any channel is
    below it, the gain ``k`` and shift ``(1 - k) mean`` that lift those channels onto it (1 and 0
    elsewhere), and the correction to add to the running variance (None without ``momentum``).

    Standard BatchNorm of ``mean + k (x - mean)`` divides ``x - mean`` by ``sqrt(k^2 var + eps) /
    k``; this ``k`` makes that exactly the floor. The running variance: BatchNorm's update is
    ``(1 - m) r + m v`` with the unbiased (``unbiasing`` = count / (count - 1)) shrunk variance
    ``v``; adding ``m (target - v) / (1 - m)`` to ``r`` first makes it ``(1 - m) r + m target``,
    so eval mode divides by what training divided by."""
    sigma = invstd.reciprocal()
    floor = SPREAD_FLOOR * sigma.median()
    below = sigma < floor
    var = (sigma.square() - eps).clamp_min(0.0)  # the biased batch variance
    k = torch.sqrt(eps / (floor**2 - var).clamp_min(eps))
    gain = torch.where(below, k, 1.0)
    shift = torch.where(below, (1.0 - k) * mean, 0.0)
    correction = None
    if momentum is not None:
        unbiased = k**2 * var * unbiasing
        correction = torch.where(below, (floor**2 - eps - unbiased) * (momentum / (1 - momentum)),
                                 0.0)
    return below.any(), gain, shift, correction


# about 30 operators on per-channel tensors, as one compiled call: at batch 2 a channel's spread
# over two samples often falls below the floor, and their dispatch cost 4-7 ms of a resnet18 step
_floor_terms_kernel = PrecompiledKernel(_floor_terms, _floor_terms)


class SpreadFloor:
    """Forward pre-hook of one BatchNorm (see the module docstring)."""

    def __call__(self, bn: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if (not bn.training or not isinstance(x, torch.Tensor) or x.dim() != 4
                or x.shape[2] * x.shape[3] > TINY_MAP_PIXELS or x.shape[0] < 2):
            return None
        with torch.no_grad():
            # BatchNorm's own statistics kernel: 3-5x faster on a CPU than a strided var_mean
            # over (0, 2, 3) (its normalised output is not used)
            _, mean, invstd = torch.ops.aten._native_batch_norm_legit(
                x if x.dtype == torch.float32 else x.float(), None, None, True, 0.0, bn.eps)
            count = x[:, 0].numel()
            momentum = bn.momentum
            if bn.running_var is None or momentum is None or not 0 < momentum < 1:
                momentum = None  # cumulative averages: left as BatchNorm keeps them
            compiling = torch.compiler.is_compiling()
            terms = _floor_terms if compiling else _floor_terms_kernel
            unbiasing = torch.tensor(count / max(count - 1, 1), device=x.device)
            any_below, gain, shift, correction = terms(mean, invstd, unbiasing, bn.eps, momentum)
            if x.device.type == "cpu" and not compiling and not bool(any_below):
                # usually no channel is below the floor: on a CPU reading that costs nothing
                # and spares a pass over the activation and its backward (on a GPU it would
                # wait for the device, and compiled it would break the graph)
                return None
            if correction is not None:
                bn.running_var.add_(correction.to(bn.running_var))
            # mean + k (x - mean) as one fused pass each way, k x + (1 - k) mean: as a where,
            # subtraction, product and sum (and their backward) the hook cost 23 ms of a 320 ms
            # W4A4 resnet18 step at 32 px, batch 128; now 13 ms. A channel above the floor gets
            # 1 x + 0, x itself
            gain = gain.reshape(1, -1, 1, 1).to(x.dtype)
            shift = shift.reshape(1, -1, 1, 1).to(x.dtype)
        return (torch.addcmul(shift, x, gain), *args[1:])


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
