"""Quantization primitives: ONNX-exact fake-quant arithmetic, quantizers, observers, layers."""

from mecqtk.quant.arith import fake_quantize, integer_range, quantize_to_codes
from mecqtk.quant.modules import QuantizedLayer, is_quantizable_layer
from mecqtk.quant.quantizers import FakeQuantizer, LSQQuantizer, Mode, make_quantizer
from mecqtk.quant.registry import OBSERVERS, QUANTIZERS, register_observer, register_quantizer
from mecqtk.quant.spec import QuantSpec

__all__ = [
    "OBSERVERS",
    "QUANTIZERS",
    "FakeQuantizer",
    "LSQQuantizer",
    "Mode",
    "QuantSpec",
    "QuantizedLayer",
    "fake_quantize",
    "integer_range",
    "is_quantizable_layer",
    "make_quantizer",
    "quantize_to_codes",
    "register_observer",
    "register_quantizer",
]
