"""quant_manifest.json: bits, scale, zero point and axis of every quantized tensor of an export.

The exporter creates one :class:`TensorEntry` at the moment it writes a tensor's initializers,
from the very arrays it writes, so the manifest and the graph cannot disagree.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mecqtk.errors import ExportError
from mecqtk.io import atomic_write_json

MANIFEST_NAME = "quant_manifest.json"
MANIFEST_FORMAT = "mecqtk-quant-manifest/1"

Role = Literal["activation", "weight", "bias"]


def _plain(values: np.ndarray) -> float | int | list[Any]:
    """A numpy array as JSON numbers; float32 values survive the round trip exactly."""
    array = np.asarray(values)
    if array.dtype.kind == "f":
        array = array.astype(np.float64)
    return array.tolist()


@dataclass
class TensorEntry:
    """One quantized tensor: its logical integer grid and where the graph stores it.

    ``scale`` is the real value of one logical code step (for weights: with the BatchNorm
    factor folded in); ``qmin``/``qmax``/``zero_point`` are on the logical grid. The graph's
    DequantizeLinear sees ``(code << code_shift) + storage_offset`` with scale
    ``scale / 2**code_shift`` and zero point ``(zero_point << code_shift) + storage_offset``.
    ``onnx`` names the graph tensors (codes initializer or QuantizeLinear output, scale, ...).
    """

    name: str
    role: Role
    layer: str
    bits: int
    signed: bool
    qmin: int
    qmax: int
    scale: float | list[float]
    zero_point: int | list[int]
    axis: int | None
    storage: str
    storage_offset: int
    onnx: dict[str, str]
    code_shift: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        *,
        name: str,
        role: Role,
        layer: str,
        bits: int,
        signed: bool,
        qrange: tuple[int, int],
        scale: np.ndarray,
        zero_point: np.ndarray,
        axis: int | None,
        storage: str,
        storage_offset: int,
        onnx: dict[str, str],
        code_shift: int = 0,
        notes: dict[str, Any] | None = None,
    ) -> TensorEntry:
        return cls(
            name=name, role=role, layer=layer, bits=bits, signed=signed, qmin=qrange[0],
            qmax=qrange[1], scale=_plain(scale), zero_point=_plain(zero_point), axis=axis,
            storage=storage, storage_offset=storage_offset, onnx=onnx, code_shift=code_shift,
            notes=notes or {},
        )


@dataclass
class Manifest:
    """Everything a deployment needs to know about the integer grids of one ONNX file."""

    export_format: str
    opset: int
    input: dict[str, Any]
    outputs: list[str]
    tensors: list[TensorEntry]
    source: dict[str, Any] = field(default_factory=dict)
    model_file: str = ""
    model_sha256: str = ""
    # the export's own onnxruntime check (probe kind, images, agreement, first diverging tensor)
    self_check: dict[str, Any] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT

    def activations(self) -> list[TensorEntry]:
        return [t for t in self.tensors if t.role == "activation"]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: str | Path) -> None:
        atomic_write_json(path, self.as_json())


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_path_for(model_path: str | Path) -> Path:
    return Path(model_path).parent / MANIFEST_NAME


def read_manifest(path: str | Path) -> Manifest:
    """Load a manifest written by :meth:`Manifest.write`."""
    try:
        data = json.loads(Path(path).read_text())
        tensors = [TensorEntry(**t) for t in data.pop("tensors")]
        return Manifest(tensors=tensors, **data)
    except FileNotFoundError:
        raise ExportError(
            f"{path}: no quant manifest beside the model; re-run `mecqtk export`"
        ) from None
    except (ValueError, TypeError, KeyError) as err:
        raise ExportError(f"{path}: not a mecqtk quant manifest ({type(err).__name__})") from None
