"""Simulated conv-BatchNorm folding during QAT, without ever dividing by BN's gamma.

The quantized layer convolves with the folded weight ``w * gamma / sigma_run`` (what an integer
kernel will use after export), quantized. While BN statistics still move, the output is corrected
to what BN with batch statistics would give (Krishnamoorthi 2018, "Quantizing deep convolutional
networks", section 3.2)::

    y = conv(x, Q(w * gamma / sigma_run)) * (sigma_run / sigma_batch)
        + beta + gamma * (b - mu_batch) / sigma_batch

where ``mu_batch`` and ``sigma_batch`` come from a float conv of the same input (treated as
constants in the backward pass) and ``b`` is the conv's own bias. Once the statistics are frozen
(:func:`freeze_bn_stats`, or in eval mode) the correction is 1 and
``y = conv(x, Q(w_fold)) + beta + gamma * (b - mu_run) / sigma_run``: exactly the exported form.

torch.ao's version recovers the unfolded output by dividing by ``gamma / sigma``; timm
zero-initialises the last gamma of each residual block, so that division gives inf/NaN at the
first step. Here gamma only ever multiplies.
"""

from __future__ import annotations

import torch
from torch import nn

from mecqtk.quant.layer_forms import layer_form
from mecqtk.quant.modules import QuantizedLayer
from mecqtk.quant.quantizers import FakeQuantizer

BatchNorm = nn.modules.batchnorm._BatchNorm


def can_fold(layer: nn.Module, bn: nn.Module) -> bool:
    """A BN with running statistics over the layer's output channels, and a layer with a form."""
    channels = getattr(layer, "out_channels", getattr(layer, "out_features", None))
    return (
        isinstance(bn, BatchNorm)
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.num_features == channels
        and layer_form(layer) is not None
    )


def _per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [C] vector shaped to broadcast along dim 1 of ``like`` (N, C, ...)."""
    return t.reshape(1, -1, *([1] * (like.dim() - 2)))


class FoldedBNLayer(QuantizedLayer):
    """``bn(layer(x))`` computed as a quantized conv with BN folded into its weight.

    ``bn`` keeps its parameters and running statistics (and, for timm's BatchNormAct2d, applies
    its dropout and activation after). ``stats_frozen`` (a buffer, so it survives checkpoints)
    stops the running statistics and switches to the exported form.
    """

    def __init__(self, layer: nn.Module, bn: BatchNorm, weight_quantizer: FakeQuantizer) -> None:
        super().__init__(layer, weight_quantizer)
        self.bn = bn
        self.register_buffer("stats_frozen", torch.tensor(False))
        # the same flag as a Python bool, which forward reads: reading the buffer would cost a
        # host sync per layer and break a compiled graph (torch.compile guards on the bool)
        self.frozen = False

    def freeze(self) -> None:
        """Stop updating the running statistics (see :func:`freeze_bn_stats`)."""
        self.stats_frozen.fill_(True)
        self.frozen = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.frozen = bool(self.stats_frozen)

    def _bn_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bn = self.bn
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_var)
        sigma = torch.sqrt(bn.running_var + bn.eps)
        return gamma, beta, sigma

    def effective_weight(self) -> torch.Tensor:
        """The folded weight ``w * gamma / sigma_run`` that the quantizer sees."""
        gamma, _, sigma = self._bn_terms()
        weight = super().effective_weight()
        return weight * (gamma / sigma).reshape(-1, *([1] * (weight.dim() - 1)))

    def weight_gain(self) -> torch.Tensor | None:
        gain = super().weight_gain()
        if gain is None:
            return None
        gamma, _, sigma = self._bn_terms()
        weight = self.layer.weight
        return gain * (gamma / sigma).reshape(-1, *([1] * (weight.dim() - 1)))

    def folded_bias(self) -> torch.Tensor:
        """The bias of the exported conv: ``beta + gamma * (b - mu_run) / sigma_run``."""
        gamma, beta, sigma = self._bn_terms()
        bias = self.layer.bias if self.layer.bias is not None else torch.zeros_like(beta)
        return beta + gamma * (bias - self.bn.running_mean) / sigma

    @torch.no_grad()
    def _batch_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of the float layer's output, and the running-statistics update."""
        form = layer_form(self.layer)
        assert form is not None
        out = form.apply(self.layer, x, super().effective_weight(), self.layer.bias)
        dims = [d for d in range(out.dim()) if d != 1]
        mean = out.mean(dims)
        var = out.var(dims, unbiased=False)
        bn = self.bn
        count = out.numel() // out.shape[1]
        bn.num_batches_tracked.add_(1)
        momentum = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
        bn.running_mean.lerp_(mean, momentum)
        bn.running_var.lerp_(var * count / max(count - 1, 1), momentum)
        return mean, var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        form = layer_form(self.layer)
        assert form is not None
        gamma, beta, sigma = self._bn_terms()
        bias = self.layer.bias
        if self.training and not self.frozen:
            mean, var = self._batch_statistics(x)
            gamma, beta, sigma = self._bn_terms()  # sigma_run moved with this batch
            sigma_batch = torch.sqrt(var + self.bn.eps)
            scale = sigma / sigma_batch
        else:
            mean, sigma_batch, scale = self.bn.running_mean, sigma, None
        y = form.apply(self.layer, x, self.weight_quantizer(self.effective_weight()),
                       self.layer.bias)
        if bias is not None:
            y = y - _per_channel(bias, y)
        if scale is not None:
            y = y * _per_channel(scale, y)
        b = bias if bias is not None else torch.zeros_like(beta)
        y = y + _per_channel(beta + gamma * (b - mean) / sigma_batch, y)
        return self._tail(y)

    def _tail(self, y: torch.Tensor) -> torch.Tensor:
        """timm's BatchNormAct2d applies dropout and an activation after normalising."""
        for name in ("drop", "act"):
            module = getattr(self.bn, name, None)
            if isinstance(module, nn.Module):
                y = module(y)
        return y


def freeze_bn_stats(model: nn.Module) -> int:
    """Stop updating the running statistics of every folded conv-BN; returns how many.

    From then on each folded layer computes exactly its exported form (folded weight, folded
    bias), in training too. Call at the start of an epoch, after ``model.train()``.

    Example:
        >>> freeze_bn_stats(qmodel)
        20
    """
    frozen = 0
    for module in model.modules():
        if isinstance(module, FoldedBNLayer):
            module.freeze()
            frozen += 1
    return frozen


def bn_epoch_start(model: nn.Module, epoch: int, freeze_epoch: int | None) -> bool:
    """The training loop's hook: freeze folded BN statistics once ``epoch >= freeze_epoch``
    (``quant.batchnorm.freeze_epoch``; None never freezes). Returns whether they are frozen."""
    if freeze_epoch is None or epoch < freeze_epoch:
        return False
    freeze_bn_stats(model)
    return True
