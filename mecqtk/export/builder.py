"""A small ONNX graph builder: unique names, initializers, nodes, and the final ModelProto."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_UNSAFE = re.compile(r"[^A-Za-z0-9_.:/-]")

NUMPY_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}


def clean_name(name: str) -> str:
    """A name made of characters every ONNX tool accepts."""
    return _UNSAFE.sub("_", name)


class GraphBuilder:
    """Accumulates nodes and initializers; every name it hands out is unique in the graph."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._taken: set[str] = set()
        self._constants: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    def unique(self, name: str) -> str:
        """``name`` (cleaned) if still free, else ``name_1``, ``name_2``, ..."""
        base = clean_name(name)
        candidate, index = base, 0
        while candidate in self._taken:
            index += 1
            candidate = f"{base}_{index}"
        self._taken.add(candidate)
        return candidate

    def initializer(self, name: str, array: np.ndarray) -> str:
        """Add ``array`` (numpy, ml_dtypes int4/int2 too) as an initializer; returns its name."""
        unique = self.unique(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), unique))
        return unique

    def constant(self, array: np.ndarray | Sequence[int] | float | int, dtype: Any = None) -> str:
        """A shared initializer for a small constant (shapes, axes, clip bounds)."""
        value = np.asarray(array, dtype=dtype)
        key = (str(value.dtype), value.tobytes(), value.shape)
        if key not in self._constants:
            self._constants[key] = self.initializer(f"const_{len(self._constants)}", value)
        return self._constants[key]

    def node(
        self,
        op_type: str,
        inputs: Sequence[str],
        name: str,
        *,
        outputs: Sequence[str] | None = None,
        domain: str = "",
        doc: str | None = None,
        **attributes: Any,
    ) -> str:
        """Append a node; its (single, unless ``outputs`` is given) output is named after it."""
        node_name = self.unique(name)
        outs = list(outputs) if outputs is not None else [node_name]
        for out in outs:
            self._taken.add(out)
        proto = helper.make_node(
            op_type, list(inputs), outs, name=node_name, domain=domain or None, **attributes
        )
        if doc:
            proto.doc_string = doc
        self.nodes.append(proto)
        return outs[0]

    def add_input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        unique = self.unique(name)
        self.inputs.append(helper.make_tensor_value_info(unique, elem_type, list(shape)))
        return unique

    def add_output(self, tensor: str, elem_type: int, shape: Sequence[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(tensor, elem_type, list(shape)))

    def model(self, opset: int, metadata: dict[str, str], doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, self.initializers, doc_string=doc
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="mecqtk"
        )
        # IR version 10 is the first that knows INT4/UINT4 and is read by every current runtime.
        model.ir_version = max(10, helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))
        helper.set_model_props(model, metadata)
        return model
