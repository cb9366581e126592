"""Integer ONNX export of fake-quantized models, and its verification against onnxruntime."""

from mecqtk.export.api import (
    EXPORT_FORMATS,
    ExportFormat,
    ExportResult,
    check_model,
    default_opset,
    export_model,
    save_export,
    self_check,
)
from mecqtk.export.manifest import Manifest, TensorEntry, read_manifest
from mecqtk.export.snap import bias_grids, snap_biases
from mecqtk.export.verify import LayerAgreement, VerifyReport, compare

__all__ = [
    "EXPORT_FORMATS",
    "ExportFormat",
    "ExportResult",
    "LayerAgreement",
    "Manifest",
    "TensorEntry",
    "VerifyReport",
    "bias_grids",
    "check_model",
    "compare",
    "default_opset",
    "export_model",
    "read_manifest",
    "save_export",
    "self_check",
    "snap_biases",
]
