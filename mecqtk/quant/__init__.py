"""Quantization primitives: ONNX-exact fake-quant arithmetic, quantizers, observers, layers."""

from mecqtk.quant.arith import fake_quantize, integer_range, quantize_to_codes
from mecqtk.quant.bn_fold import FoldedBNLayer, bn_epoch_start, freeze_bn_stats
from mecqtk.quant.modules import QuantizedLayer, is_quantizable_layer
from mecqtk.quant.quantizers import (
    FakeQuantizer,
    LSQPlusQuantizer,
    LSQQuantizer,
    Mode,
    PACTQuantizer,
    make_quantizer,
)
from mecqtk.quant.registry import OBSERVERS, QUANTIZERS, register_observer, register_quantizer
from mecqtk.quant.spec import QuantSpec

__all__ = [
    "OBSERVERS",
    "QUANTIZERS",
    "FakeQuantizer",
    "FoldedBNLayer",
    "LSQPlusQuantizer",
    "LSQQuantizer",
    "Mode",
    "PACTQuantizer",
    "QuantSpec",
    "QuantizedLayer",
    "bn_epoch_start",
    "fake_quantize",
    "freeze_bn_stats",
    "integer_range",
    "is_quantizable_layer",
    "make_quantizer",
    "quantize_to_codes",
    "register_observer",
    "register_quantizer",
]
