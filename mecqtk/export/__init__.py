"""Integer ONNX export of fake-quantized models, and its verification against onnxruntime."""

from mecqtk.export.api import ExportResult, check_model, default_opset, export_model, save_export
from mecqtk.export.lower import EXPORT_FORMATS, ExportFormat
from mecqtk.export.manifest import Manifest, TensorEntry, read_manifest

__all__ = [
    "EXPORT_FORMATS",
    "ExportFormat",
    "ExportResult",
    "Manifest",
    "TensorEntry",
    "check_model",
    "default_opset",
    "export_model",
    "read_manifest",
    "save_export",
]
