"""The FX -> ONNX walk: every node of the fake-quantized GraphModule becomes ONNX nodes.

Each FX node is looked up in three handler tables (modules by class, functions by target,
methods by name). Nodes whose value is a plain Python value (``x.size(0)``, a tuple index) emit
nothing: their recorded value is used where needed. ONNX node and tensor names are the FX node
names, so a mismatch reported by ``mecqtk verify`` points straight back to a layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.fx as fx
from onnx import TensorProto
from torch import nn

from mecqtk.errors import ExportError
from mecqtk.export.builder import GraphBuilder
from mecqtk.export.manifest import TensorEntry
from mecqtk.export.qparams import QuantParams
from mecqtk.export.shapes import GraphValues

ExportFormat = Literal["qcdq", "packed"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("qcdq", "packed")
INPUT_NAME = "input"

ModuleHandler = Callable[["Lowering", fx.Node, nn.Module], str]
CallHandler = Callable[["Lowering", fx.Node], str]

MODULE_HANDLERS: dict[type, ModuleHandler] = {}
FUNCTION_HANDLERS: dict[Any, CallHandler] = {}
METHOD_HANDLERS: dict[str, CallHandler] = {}


def module_handler(*classes: type) -> Callable[[ModuleHandler], ModuleHandler]:
    def register(fn: ModuleHandler) -> ModuleHandler:
        for cls in classes:
            MODULE_HANDLERS[cls] = fn
        return fn

    return register


def function_handler(*targets: Any) -> Callable[[CallHandler], CallHandler]:
    def register(fn: CallHandler) -> CallHandler:
        for target in targets:
            FUNCTION_HANDLERS[target] = fn
        return fn

    return register


def method_handler(*names: str) -> Callable[[CallHandler], CallHandler]:
    def register(fn: CallHandler) -> CallHandler:
        for name in names:
            METHOD_HANDLERS[name] = fn
        return fn

    return register


@dataclass
class PythonValue:
    """A node whose value is not a tensor (a size, a shape tuple); it emits no ONNX node."""

    value: Any


@dataclass
class Lowering:
    """State of one export: the builder, what each FX node became, and the manifest entries."""

    gm: fx.GraphModule
    values: GraphValues
    builder: GraphBuilder
    export_format: ExportFormat
    opset: int
    env: dict[str, str | PythonValue] = field(default_factory=dict)
    quantized: dict[str, QuantParams] = field(default_factory=dict)  # ONNX name -> grid
    folded_into: dict[str, str] = field(default_factory=dict)  # BN node -> layer output
    entries: list[TensorEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.modules = dict(self.gm.named_modules())

    # ---- reading arguments -------------------------------------------------------------
    def tensor(self, arg: Any, node: fx.Node) -> str:
        """ONNX name of a tensor argument; Python numbers become float32 constants."""
        if isinstance(arg, fx.Node):
            value = self.env[arg.name]
            if isinstance(value, PythonValue):
                if isinstance(value.value, int | float):
                    return self.builder.constant(np.float32(value.value))
                raise ExportError(f"{node.name}: argument {arg.name} is not a tensor")
            return value
        if isinstance(arg, int | float) and not isinstance(arg, bool):
            return self.builder.constant(np.float32(arg))
        raise ExportError(f"{node.name}: cannot export argument {arg!r} as a tensor")

    def static(self, arg: Any, node: fx.Node) -> Any:
        """The Python value of an argument that must not depend on the batch size."""
        if isinstance(arg, fx.Node):
            if self.values.info(arg).is_tensor:
                raise ExportError(f"{node.name}: expected a constant, got tensor {arg.name}")
            if self.values.follows_batch(arg):
                raise ExportError(
                    f"{node.name}: argument {arg.name} depends on the batch size; only "
                    "reshapes may use such values"
                )
            return self.values.info(arg).value
        if isinstance(arg, list | tuple):
            return type(arg)(self.static(a, node) for a in arg)
        return arg

    def rank(self, node: fx.Node) -> int:
        return len(self.values.shape(node))

    def need_opset(self, version: int, why: str) -> None:
        if self.opset < version:
            raise ExportError(f"{why} needs ONNX opset {version} or later; pass --opset {version}")

    # ---- the walk ----------------------------------------------------------------------
    def run(self, input_shape: tuple[int, ...]) -> list[str]:
        outputs: list[str] = []
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if self.env:
                    raise ExportError(f"{node.name}: only models with one input can be exported")
                self.env[node.name] = self.builder.add_input(
                    INPUT_NAME, TensorProto.FLOAT, ["N", *input_shape]
                )
            elif node.op == "output":
                outputs = self._outputs(node)
            else:
                self.env[node.name] = self._lower(node)
        return outputs

    def _lower(self, node: fx.Node) -> str | PythonValue:
        info = self.values.info(node)
        if not info.is_tensor:
            return PythonValue(info.value)
        if info.dtype not in (torch.float32, None):
            raise ExportError(f"{node.name}: produces {info.dtype}; only float32 graphs export")
        if node.name in self.folded_into:
            return self.folded_into[node.name]
        if node.op == "get_attr":
            return self._constant(node)
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            handler = next(
                (MODULE_HANDLERS[c] for c in type(module).__mro__ if c in MODULE_HANDLERS), None
            )
            if handler is None:
                raise self._unsupported(node, type(module).__name__)
            return handler(self, node, module)
        if node.op == "call_function":
            handler = FUNCTION_HANDLERS.get(node.target)
            if handler is None:
                raise self._unsupported(node, getattr(node.target, "__name__", str(node.target)))
            return handler(self, node)
        if node.op == "call_method":
            handler = METHOD_HANDLERS.get(str(node.target))
            if handler is None:
                raise self._unsupported(node, f"Tensor.{node.target}")
            return handler(self, node)
        raise self._unsupported(node, node.op)

    def _unsupported(self, node: fx.Node, what: str) -> ExportError:
        return ExportError(
            f"{node.name}: no ONNX lowering for {what}; keep that part out of the exported model "
            "or add a handler in mecqtk/export"
        )

    def _constant(self, node: fx.Node) -> str:
        value = self.gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        array = torch.as_tensor(value).detach().cpu().numpy()
        return self.builder.initializer(node.name, array.astype(np.float32))

    def _outputs(self, node: fx.Node) -> list[str]:
        result = node.args[0]
        items = list(result) if isinstance(result, list | tuple) else [result]
        names: list[str] = []
        for index, item in enumerate(items):
            if not isinstance(item, fx.Node):
                raise ExportError(f"model output {index} is not a tensor")
            name = self.tensor(item, node)
            if name in names or name == INPUT_NAME:  # an output must be a distinct node output
                name = self.builder.node("Identity", [name], f"output_{index}")
            shape = ["N" if d is None else d for d in self.values.dynamic_shape(item)]
            self.builder.add_output(name, TensorProto.FLOAT, shape)
            names.append(name)
        return names
