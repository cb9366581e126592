"""The model's QLinearAdd arithmetic (integer_kernels.qlinear_add) against onnxruntime's kernel."""

import platform

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mecqtk.export.integer_kernels import OutputGrid, qlinear_add

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="the emulated kernel is onnxruntime's x86-64 (FMA) QLinearAdd")


def grid(step: float, zero: int) -> OutputGrid:
    return OutputGrid(float(np.float32(step)), zero, -zero, 255.0 - zero, torch.uint8)


def ort_add(a: np.ndarray, ga: OutputGrid, b: np.ndarray, gb: OutputGrid, out: OutputGrid,
            constant_b: bool, folder) -> np.ndarray:
    """DequantizeLinear x2 -> Add -> QuantizeLinear, which onnxruntime fuses into QLinearAdd."""
    values = {"sa": (ga.step, np.float32), "za": (ga.zero, np.uint8),
              "sb": (gb.step, np.float32), "zb": (gb.zero, np.uint8),
              "sc": (out.step, np.float32), "zc": (out.zero, np.uint8)}
    inits = [numpy_helper.from_array(np.array(v, d), k) for k, (v, d) in values.items()]
    inputs = [helper.make_tensor_value_info("a", TensorProto.UINT8, list(a.shape))]
    if constant_b:
        inits.append(numpy_helper.from_array(b.astype(np.uint8).reshape(()), "b"))
    else:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.UINT8, list(b.shape)))
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
             helper.make_node("Add", ["fa", "fb"], ["sum"]),
             helper.make_node("QuantizeLinear", ["sum", "sc", "zc"], ["c"])]
    graph = helper.make_graph(nodes, "add", inputs,
                              [helper.make_tensor_value_info("c", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.optimized_model_filepath = str(folder / "fused.onnx")
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node] == [
        "QLinearAdd"]
    return session.run(None, {"a": a} if constant_b else {"a": a, "b": b})[0]


@pytest.mark.parametrize("constant_b", [False, True])
def test_qlinear_add_codes_equal_onnxruntimes(constant_b, tmp_path):
    rng = np.random.default_rng(0)
    differing = 0
    for trial in range(25):
        ga, gb, out = (grid(10 ** rng.uniform(-3, 0), int(rng.choice([0, 128, rng.integers(256)])))
                       for _ in range(3))
        if trial == 0:  # a runaway step: the sum leaves int32, which the kernel maps to code 0
            ga = grid(2.0e13, 128)
        a = rng.integers(0, 256, (1, 3001)).astype(np.uint8)
        b = rng.integers(0, 256, (1,) if constant_b else (1, 3001)).astype(np.uint8)
        expected = ort_add(a, ga, b, gb, out, constant_b, tmp_path)
        second = float(b[0]) if constant_b else torch.from_numpy(b).double()
        codes = qlinear_add(torch.from_numpy(a).double(), ga, second, gb, out)
        differing += int((codes.clamp(0, 255).numpy().astype(np.uint8) != expected).sum())
    assert differing == 0
