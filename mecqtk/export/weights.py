"""Integer weights and biases of one Conv/Linear: BatchNorm folding, int32 bias, storage packing.

BatchNorm after a convolution is folded without touching the integer weights: its per-channel
factor ``g = gamma / sqrt(var + eps)`` multiplies the weight *scale* (a negative ``g`` simply
makes that channel's scale negative; the codes keep their grid), and the shift goes into the bias.
The bias is stored as int32 at scale ``s_x * s_w`` (per channel), the accumulator unit of the
integer convolution, so onnxruntime can run it on its integer kernels. Low-bit codes sit shifted
left in their int8 container (:func:`code_shift`), which makes that unit, and so the bias
rounding error, up to 64 times finer without changing any dequantized weight.

A channel whose BatchNorm factor is exactly zero (timm zero-initialises some gammas) outputs a
constant: its weights are stored as zeros and its scale is left unfolded, so nothing is divided
by zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch
import torch.fx as fx
from torch import nn

from mecqtk.errors import ExportError
from mecqtk.graph.introspect import batchnorm_user

INT32_LIMIT = 2**31 - 1


def foldable_batchnorm(node: fx.Node, modules: dict[str, nn.Module],
                       channels: int) -> fx.Node | None:
    """The BatchNorm node :func:`~mecqtk.graph.introspect.batchnorm_user` finds after ``node``,
    when it is in eval mode (its running statistics are what it computes with)."""
    user = batchnorm_user(node, modules, channels)
    if user is None or modules[str(user.target)].training:
        return None
    return user


@dataclass(frozen=True)
class BatchNormFold:
    """The eval-mode affine map of a BatchNorm: ``y = (x - mean) * factor + beta``."""

    name: str
    factor: np.ndarray  # float64 gamma / sqrt(var + eps)
    mean: np.ndarray
    beta: np.ndarray

    @classmethod
    def from_module(cls, name: str, bn: nn.modules.batchnorm._BatchNorm) -> BatchNormFold:
        assert bn.running_mean is not None and bn.running_var is not None
        def values(t: torch.Tensor | None, default: float) -> np.ndarray:
            if t is None:
                return np.full(bn.num_features, default)
            return t.detach().double().cpu().numpy()

        var, mean = values(bn.running_var, 1.0), values(bn.running_mean, 0.0)
        gamma, beta = values(bn.weight, 1.0), values(bn.bias, 0.0)
        return cls(name, gamma / np.sqrt(var + bn.eps), mean, beta)


@dataclass(frozen=True)
class LayerTerms:
    """The float weight a quantized layer multiplies with, and the bias added after it.

    With BatchNorm folded during training (a layer that has ``folded_bias()``, see
    ``quant.batchnorm.fold``) the weight already includes ``gamma / sigma`` and the bias is the
    folded one; ``bias_owner`` is then the BatchNorm, whose ``bias`` (beta) moves that bias.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    bias_owner: nn.Module | None
    folded_in_training: bool


def layer_terms(module: nn.Module, where: str) -> LayerTerms:
    """Weight and bias of a :class:`~mecqtk.quant.modules.QuantizedLayer` (or a subclass)."""
    layer = module.layer
    effective = getattr(module, "effective_weight", None)
    weight = effective() if callable(effective) else layer.weight
    folded_bias = getattr(module, "folded_bias", None)
    if not callable(folded_bias):
        return LayerTerms(weight, layer.bias, layer, False)
    bn = module.bn
    for name in ("drop", "act"):
        tail = getattr(bn, name, None)
        if isinstance(tail, nn.Module) and not isinstance(tail, nn.Identity):
            raise ExportError(f"{where}: a folded BatchNorm with its own {name} is not exported")
    return LayerTerms(weight, folded_bias(), bn if bn.bias is not None else None, True)


@dataclass(frozen=True)
class FoldedLayer:
    """What goes into the ONNX graph for one layer's weight and bias."""

    codes: np.ndarray  # int64 logical weight codes, [C_out, ...]
    scale: np.ndarray  # float32 [C_out]: step of one logical code, BatchNorm factor folded in
    zero_point: np.ndarray  # int64 [C_out], logical
    shift: int  # the graph dequantizes codes << shift with scale / 2**shift (see code_shift)
    bias: np.ndarray | None  # float64 [C_out] real-valued bias (BatchNorm shift folded in)
    bias_codes: np.ndarray | None  # int32 [C_out], when the input scale is known
    bias_scale: np.ndarray | None  # float32 [C_out] = input scale * dequantization scale
    constant_channels: tuple[int, ...]  # channels with a zero BatchNorm factor
    float_bias_reason: str | None = None  # why an int32 bias was not possible, if it was not

    @property
    def dequant_scale(self) -> np.ndarray:
        """The scale the graph's DequantizeLinear applies to the shifted codes (exact)."""
        return np.ldexp(self.scale, -self.shift).astype(np.float32)


def _per_channel(values: np.ndarray, channels: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(values).reshape(-1), (channels,)).copy()


def fold_layer(
    codes: np.ndarray,
    weight_scale: np.ndarray,
    weight_zero_point: np.ndarray,
    bias: torch.Tensor | None,
    batchnorm: BatchNormFold | None,
    input_scale: float | None,
    where: str,
    shift: int = 0,
) -> FoldedLayer:
    """Fold ``batchnorm`` into the weight scale and bias, and quantize the bias to int32.

    Args:
        codes: Integer weight codes (logical grid), output channels first.
        weight_scale: The weight quantizer's step size (per channel or one value).
        weight_zero_point: Its zero point (same shape).
        bias: The layer's own float bias, if any.
        batchnorm: The BatchNorm that follows the layer, if it is folded.
        input_scale: Per-tensor step of the quantized input; None keeps the bias in float.
        where: Layer name for error messages.
        shift: Left shift of the codes inside their container (see :func:`code_shift`).
    """
    channels = codes.shape[0]
    scale = _per_channel(weight_scale, channels).astype(np.float64)
    zero_point = _per_channel(weight_zero_point, channels).astype(np.int64)
    real_bias = (
        bias.detach().double().cpu().numpy() if bias is not None else np.zeros(channels)
    )
    has_bias = bias is not None
    codes = codes.copy()
    constant: tuple[int, ...] = ()
    if batchnorm is not None:
        factor = batchnorm.factor
        constant = tuple(int(c) for c in np.flatnonzero(factor == 0))
        codes[list(constant)] = zero_point[list(constant)].reshape(-1, *[1] * (codes.ndim - 1))
        scale = np.where(factor == 0, scale, scale * factor)
        real_bias = (real_bias - batchnorm.mean) * factor + batchnorm.beta
        has_bias = True
    scale32 = scale.astype(np.float32)
    if not has_bias:
        return FoldedLayer(codes, scale32, zero_point, shift, None, None, None, constant)
    if input_scale is None:
        return FoldedLayer(codes, scale32, zero_point, shift, real_bias, None, None, constant)
    dequant_scale = np.ldexp(scale32, -shift).astype(np.float32)
    bias_scale = (np.float32(input_scale) * dequant_scale).astype(np.float32)
    bias_codes = np.rint(real_bias / bias_scale.astype(np.float64))
    worst = int(np.argmax(np.abs(bias_codes)))
    if abs(bias_codes[worst]) > INT32_LIMIT // 2:
        # A near-zero BatchNorm factor (timm zero-initialises the last gamma of residual blocks)
        # makes the accumulator unit tiny: the bias stays float for this layer, which computes
        # the same values; this one layer then runs on float kernels (see
        # onnx_export.float_biases_outside).
        return FoldedLayer(codes, scale32, zero_point, shift, real_bias, None, None, constant,
                           float_bias_reason=(
                               f"channel {worst}'s bias {real_bias[worst]:.4g} needs "
                               f"{abs(bias_codes[worst]):.3g} int32 accumulator steps"))
    return FoldedLayer(
        codes, scale32, zero_point, shift, real_bias, bias_codes.astype(np.int32), bias_scale,
        constant,
    )


def code_shift(bits: int) -> int:
    """How far b-bit weight codes are shifted left inside their 8-bit container.

    ``(c << k) * (s / 2**k)`` equals ``c * s`` exactly in float32, so the dequantized weights do
    not change, but the accumulator unit ``s_x * s / 2**k`` (the int32 bias step) becomes
    ``2**k`` times finer. At 2 bits that turns a bias rounding error that flips about one
    activation code in a thousand into one that flips a few in a million.
    """
    return max(8 - bits, 0)


def storage_dtype(bits: int, signed: bool, packed: bool) -> np.dtype:
    """Container for ``bits``-wide weight codes: 8-bit for qcdq, the narrowest fit when packed."""
    if packed and bits <= 2:
        return np.dtype(ml_dtypes.int2 if signed else ml_dtypes.uint2)
    if packed and bits <= 4:
        return np.dtype(ml_dtypes.int4 if signed else ml_dtypes.uint4)
    return np.dtype(np.int8 if signed else np.uint8)


def to_storage(codes: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Codes cast to ``dtype`` after checking every one fits (a silent wrap would be fatal)."""
    info = ml_dtypes.iinfo(dtype)
    if codes.size and (codes.min() < int(info.min) or codes.max() > int(info.max)):
        raise ExportError(f"weight codes [{codes.min()}, {codes.max()}] do not fit {dtype}")
    return codes.astype(dtype)
