"""Public export entry points: a GraphModule (or a run folder) to an ONNX file + quant manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx.checker
import onnx.shape_inference
import torch
import torch.fx as fx

from mecqtk.errors import ExportError
from mecqtk.export import ops, quantized, shape_ops  # noqa: F401  (registers the handlers)
from mecqtk.export.builder import GraphBuilder
from mecqtk.export.lower import EXPORT_FORMATS, ExportFormat, Lowering
from mecqtk.export.manifest import Manifest, manifest_path_for, sha256_of
from mecqtk.export.shapes import record_values
from mecqtk.io import atomic_write_bytes
from mecqtk.quant.modules import QuantizedLayer

DEFAULT_OPSET = 21
MIN_OPSET = 13
# Cast from INT2 (packed 2-bit weights) exists from opset 25 on.
PACKED_INT2_OPSET = 25

METADATA_FORMAT = "mecqtk.format"
METADATA_RUN = "mecqtk.run_dir"


@dataclass
class ExportResult:
    """What `mecqtk export` wrote."""

    model_path: Path
    manifest_path: Path
    export_format: str
    opset: int
    file_bytes: int
    quantized_tensors: int
    nodes: int


def default_opset(gm: fx.GraphModule, export_format: ExportFormat) -> int:
    """21 (INT4 storage, integer Clip), or 25 when a packed export stores 2-bit weights."""
    if export_format == "packed" and any(
        m.weight_quantizer.bits <= 2 for m in gm.modules() if isinstance(m, QuantizedLayer)
    ):
        return PACKED_INT2_OPSET
    return DEFAULT_OPSET


def check_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx.checker's full check (which runs strict shape inference); returns the inferred model."""
    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first_line = str(err).splitlines()[0]
        raise ExportError(f"exported graph fails the ONNX checker: {first_line}") from err


@torch.no_grad()
def export_model(
    gm: fx.GraphModule,
    input_shape: tuple[int, ...],
    export_format: ExportFormat = "qcdq",
    opset: int | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[onnx.ModelProto, Manifest]:
    """Lower a calibrated fake-quantized GraphModule to an integer ONNX model and its manifest.

    Args:
        gm: The model from :func:`mecqtk.prepare` (calibrated or trained), in eval mode.
        input_shape: One input without the batch dimension, e.g. ``(3, 32, 32)``.
        export_format: ``qcdq`` (int8 containers) or ``packed`` (INT4/INT2 weight storage).
        opset: ONNX opset; None picks the lowest one the format needs (21 or 25).
        metadata: Extra model properties to store in the file.

    Example:
        >>> model, manifest = export_model(qmodel.eval(), (3, 32, 32), "qcdq")
        >>> onnx.save(model, "model.onnx")
    """
    if export_format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {export_format!r}; use one of {EXPORT_FORMATS}")
    if gm.training:
        raise ExportError("the model is in training mode; call .eval() before exporting")
    chosen = opset if opset is not None else default_opset(gm, export_format)
    if not MIN_OPSET <= chosen <= onnx.defs.onnx_opset_version():
        raise ExportError(
            f"opset {chosen} is outside {MIN_OPSET}..{onnx.defs.onnx_opset_version()}"
        )
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    try:
        gm.cpu()
        values = record_values(gm, tuple(input_shape))
        lowering = Lowering(gm, values, GraphBuilder(type(gm).__name__), export_format, chosen)
        outputs = lowering.run(tuple(input_shape))
    finally:
        gm.to(device)
    props = {METADATA_FORMAT: export_format, **(metadata or {})}
    model = lowering.builder.model(chosen, props, doc="exported by mecqtk")
    check_model(model)
    manifest = Manifest(
        export_format=export_format,
        opset=chosen,
        input={"name": "input", "shape": ["N", *input_shape]},
        outputs=outputs,
        tensors=lowering.entries,
    )
    return model, manifest


def save_export(
    model: onnx.ModelProto, manifest: Manifest, path: str | Path, source: dict[str, Any]
) -> ExportResult:
    """Write ``model`` to ``path`` and the manifest beside it (``quant_manifest.json``)."""
    path = Path(path)
    atomic_write_bytes(path, model.SerializeToString())
    manifest.model_file = path.name
    manifest.model_sha256 = sha256_of(path)
    manifest.source = source
    manifest_path = manifest_path_for(path)
    manifest.write(manifest_path)
    return ExportResult(
        model_path=path,
        manifest_path=manifest_path,
        export_format=manifest.export_format,
        opset=manifest.opset,
        file_bytes=path.stat().st_size,
        quantized_tensors=len(manifest.tensors),
        nodes=len(model.graph.node),
    )
