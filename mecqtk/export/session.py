"""onnxruntime sessions for exported models, and a diagnostic copy that also returns the integer
codes of every quantized activation."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import helper

from mecqtk.errors import ExportError
from mecqtk.export.manifest import Manifest


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX file, with a one-line error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path))
    except Exception as err:
        raise ExportError(f"{path}: not an ONNX model ({type(err).__name__})") from None


def make_session(model: onnx.ModelProto | str | Path, threads: int = 2) -> ort.InferenceSession:
    """A CPU session with all graph optimisations (the integer-kernel fusions among them)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own exception classes for every load failure
        raise ExportError(f"onnxruntime cannot load the model: {str(err).splitlines()[0]}") from err


def with_code_outputs(model: onnx.ModelProto, manifest: Manifest) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs each activation's integer codes."""
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in inferred.graph.value_info}
    diagnostic = onnx.ModelProto()
    diagnostic.CopyFrom(model)
    present = {o.name for o in diagnostic.graph.output}
    for entry in manifest.activations():
        codes = entry.onnx["codes"]
        if codes in present:
            continue
        if codes in known:
            diagnostic.graph.output.append(known[codes])
        else:
            elem = onnx.TensorProto.UINT8 if entry.storage == "uint8" else onnx.TensorProto.INT8
            diagnostic.graph.output.append(helper.make_tensor_value_info(codes, elem, None))
        present.add(codes)
    return diagnostic
