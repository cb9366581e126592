"""The export's graph post-processing keeps onnxruntime from changing what the file computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mecqtk.export.onnx_export import (
    MODULE_KEY,
    float_adds_of_codes,
    global_average_pools,
    hold_requantized_codes,
    requantize_by_adding_zero,
)

SCALE_1, SCALE_2 = np.float32(0.011), np.float32(0.0109)  # two 8-bit steps in a row


def _requantize_chain() -> onnx.ModelProto:
    """x -> Q(s1) -> DQ -> Q(s2) -> DQ: a value requantized on a slightly different grid."""
    inits = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in (
        ("s1", SCALE_1, np.float32), ("s2", SCALE_2, np.float32), ("zp", 128, np.uint8))]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s1", "zp"], ["q1"], name="q1"),
        helper.make_node("DequantizeLinear", ["q1", "s1", "zp"], ["d1"], name="d1"),
        helper.make_node("QuantizeLinear", ["d1", "s2", "zp"], ["q2"], name="q2"),
        helper.make_node("DequantizeLinear", ["q2", "s2", "zp"], ["y"], name="d2"),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [4096])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [4096])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return _session(model).run(None, {"x": x})[0]


def test_requantization_keeps_both_roundings():
    x = np.random.default_rng(0).uniform(-1.4, 1.4, 4096).astype(np.float32)
    q1 = np.clip(np.rint(x / SCALE_1) + 128, 0, 255)
    d1 = ((q1 - 128) * SCALE_1).astype(np.float32)
    expected = (np.clip(np.rint(d1 / SCALE_2) + 128, 0, 255) - 128) * SCALE_2

    merged = _run(_requantize_chain(), x)  # onnxruntime folds the two pairs into one
    assert np.count_nonzero(merged != expected) > 100

    held = _requantize_chain()
    assert hold_requantized_codes(held) == 1
    assert np.array_equal(_run(held, x), expected.astype(np.float32))


def _made_by(node: onnx.NodeProto, module: str) -> onnx.NodeProto:
    node.metadata_props.append(onnx.StringStringEntryProto(key=MODULE_KEY, value=module))
    return node


def test_adds_of_two_dequantized_tensors_become_sums_unless_the_model_computes_qlinearadd():
    inits = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in (
        ("s", 0.1, np.float32), ("zp", 0, np.int8), ("c", np.ones(8), np.float32))]
    nodes = [
        helper.make_node("DequantizeLinear", ["a", "s", "zp"], ["da"]),
        helper.make_node("DequantizeLinear", ["b", "s", "zp"], ["db"]),
        helper.make_node("Add", ["da", "db"], ["sum"], name="codes_add"),
        helper.make_node("Add", ["sum", "c"], ["float_sum"], name="float_add"),
        _made_by(helper.make_node("Add", ["da", "db"], ["y"], name="kernel_add"),
                 "integer_add"),
    ]
    graph = helper.make_graph(
        nodes, "adds",
        [helper.make_tensor_value_info(n, TensorProto.INT8, [8]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [8]) for n in ("float_sum", "y")],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert float_adds_of_codes(model, {"integer_add"}) == 1
    assert [n.op_type for n in model.graph.node] == [
        "DequantizeLinear", "DequantizeLinear", "Sum", "Add", "Add"]


def test_a_requantization_the_model_computes_as_qlinearadd_adds_a_dequantized_zero():
    model = _requantize_chain()
    _made_by(model.graph.node[2], "aq_second")  # q2
    assert requantize_by_adding_zero(model, {"aq_other"}) == 0
    assert requantize_by_adding_zero(model, {"aq_second"}) == 1
    assert hold_requantized_codes(model) == 0  # no Q -> DQ -> Q chain left to merge
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "Add",
                   "QuantizeLinear", "DequantizeLinear"], ops
    zero = model.graph.node[2]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert inits[zero.input[0]] == 0 and inits[zero.input[2]] == 0 and zero.input[1] == "s2"
    x = np.random.default_rng(1).uniform(-1.4, 1.4, 4096).astype(np.float32)
    # the same value as the two roundings, up to onnxruntime's rounding of the requantization
    twice = (np.clip(np.round(np.clip(np.round(x / SCALE_1), -128, 127) * SCALE_1 / SCALE_2),
                     -128, 127) * SCALE_2)
    assert np.mean(np.isclose(_run(model, x), twice, atol=1e-6)) > 0.999


def _spatial_mean(input_scale: float, output_scale: float, side: int) -> onnx.ModelProto:
    """x (uint8 codes) -> DQ -> ReduceMean over H, W -> Q -> DQ."""
    inits = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in (
        ("s_in", input_scale, np.float32), ("s_out", output_scale, np.float32),
        ("zp", 0, np.uint8), ("axes", [2, 3], np.int64))]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "s_in", "zp"], ["d"]),
        helper.make_node("ReduceMean", ["d", "axes"], ["m"], name="mean", keepdims=1),
        helper.make_node("QuantizeLinear", ["m", "s_out", "zp"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s_out", "zp"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mean", [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 4, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return onnx.shape_inference.infer_shapes(model)


def test_spatial_means_become_global_pools_only_where_onnxruntime_takes_the_step_ratio():
    codes = np.random.default_rng(0).integers(0, 4, (2, 4, 1, 1)).astype(np.uint8)
    usual = _spatial_mean(0.5, 0.1, 4)
    assert global_average_pools(usual) == 1
    assert [n.op_type for n in usual.graph.node][1] == "GlobalAveragePool"

    # s_in / (s_out * pixels) = 300 >= 256: onnxruntime would refuse at run time
    # ("QLinearGlobalAveragePool parameter out of computation range"), so it stays a ReduceMean
    refused = _spatial_mean(3.0, 0.01, 1)
    fused = _spatial_mean(3.0, 0.01, 1)
    fused.graph.node[1].CopyFrom(helper.make_node("GlobalAveragePool", ["d"], ["m"], name="mean"))
    with pytest.raises(Exception, match="out of computation range"):  # onnxruntime's own type
        _session(fused).run(None, {"x": codes})
    assert global_average_pools(refused) == 0
    out = _session(refused).run(None, {"x": codes})[0]
    expected = np.clip(np.rint(codes * np.float32(3.0) / np.float32(0.01)), 0, 255) * 0.01
    np.testing.assert_allclose(out, expected.astype(np.float32), rtol=1e-6)
