"""The two export formats: graph structure, storage types, checker, and onnxruntime's fusions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from export_nets import INPUT_SHAPE, images, quantized
from onnx import TensorProto, numpy_helper

from mecqtk.errors import ExportError
from mecqtk.export import check_model, export_model
from mecqtk.export.onnx_export import owner_module
from mecqtk.export.session import make_session
from mecqtk.quant.modules import QuantizedLayer
from mecqtk.quant.quantizers import FakeQuantizer


def _fused_ops(model: onnx.ModelProto, tmp_path) -> Counter:
    """Operator counts of the graph onnxruntime actually runs (after its optimisations)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def _convs_feeding_a_quantizer(gm) -> set[str]:
    """Conv nodes whose output reaches an activation quantizer through ReLU only."""
    modules = dict(gm.named_modules())
    found = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], QuantizedLayer):
            continue
        current = node
        while len(current.users) == 1:
            current = next(iter(current.users))
            if current.op == "call_module" and isinstance(modules[current.target], FakeQuantizer):
                found.add(node.name)
                break
            is_relu = current.target in (torch.relu, F.relu) or (
                current.op == "call_module" and isinstance(modules[current.target], torch.nn.ReLU))
            if not is_relu:
                break
    return found


def _weight_types(model: onnx.ModelProto) -> dict[str, int]:
    """Storage type of each layer's weight codes, by layer name (packed ones included)."""
    return {t.name.split(".weight_codes")[0]: t.data_type for t in model.graph.initializer
            if ".weight_codes" in t.name and "shift_factor" not in t.name}


def _owned(model: onnx.ModelProto, module: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if owner_module(n, {module}) == module]


def test_qcdq_holds_int8_weights_and_clips_low_bit_activations(residual_net, tmp_path):
    gm = quantized(residual_net, 2, 2)
    model, manifest = export_model(gm, INPUT_SHAPE, "qcdq")
    assert model.opset_import[0].version == 21
    assert set(_weight_types(model).values()) == {TensorProto.INT8}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    holds = [n for n in model.graph.node if n.op_type == "Clip" and n.name.endswith(".hold")]
    clips = [n for n in model.graph.node if n.op_type == "Clip" and n not in holds]
    two_bit = [e for e in manifest.activations() if e.bits == 2]
    assert len(clips) == len(two_bit) == 3
    for clip in clips:
        assert (inits[clip.input[1]], inits[clip.input[2]]) == (0, 3)  # unsigned 2-bit grid
    # the 8-bit residual stream requantized for the 2-bit convs: by adding a dequantized zero,
    # so onnxruntime runs it as one QLinearAdd (which the model computes in eval mode) and its
    # DoubleQDQPairsRemover has no Q -> DQ -> Q -> DQ chain to merge into one rounding
    assert not holds
    requantizations = [n for n in model.graph.node if n.name.endswith(".requantize")]
    assert len(requantizations) == 3 and all(n.op_type == "Add" for n in requantizations)
    for add in requantizations:
        zero = next(n for n in model.graph.node if n.output[0] == add.input[1])
        assert zero.op_type == "DequantizeLinear" and inits[zero.input[0]] == 0
    # every node records the module that made it: a reported layer can be found in the graph
    for module in ("conv1", "conv2", "conv3", "branch", "fc", "aq_relu", "aq_relu_1"):
        assert _owned(model, module), module
    quantizers = {e.layer for e in manifest.activations()}
    assert all(owner_module(clip, quantizers) for clip in clips)
    fused = _fused_ops(model, tmp_path)
    assert fused["Clip"] == 3 and fused["QLinearAdd"] >= 3, fused


@pytest.mark.parametrize("export_format", ["qcdq", "packed"])
def test_convs_between_quantized_activations_run_on_integer_kernels(plain_net, export_format,
                                                                     tmp_path):
    gm = quantized(plain_net, 2, 2)
    model, _ = export_model(gm, INPUT_SHAPE, export_format)
    ops = _fused_ops(model, tmp_path)
    # conv1 and conv2 sit between two quantizers (conv3 too when the recipe quantizes the
    # mean's input); fc gives float logits from a quantized input
    between = _convs_feeding_a_quantizer(gm)
    assert between >= {"conv1", "conv2"}
    assert ops["QLinearConv"] == len(between)
    assert ops["Conv"] + ops["FusedConv"] == 3 - len(between)
    assert ops["QGemm"] == 1


def test_packed_stores_int2_and_computes_exactly_what_qcdq_does(residual_net):
    gm = quantized(residual_net, 2, 2)
    qcdq, _ = export_model(gm, INPUT_SHAPE, "qcdq")
    packed, manifest = export_model(gm, INPUT_SHAPE, "packed")
    assert packed.opset_import[0].version == 25
    types = _weight_types(packed)
    assert types["conv2"] == TensorProto.INT2
    assert types["conv1"] == TensorProto.INT8  # first layer: 8 bits
    entry = next(e for e in manifest.tensors if e.role == "weight" and e.layer == "conv2")
    assert entry.storage == "int2"
    weight_bytes = {
        fmt: sum(len(t.raw_data) for t in m.graph.initializer
                 if t.name.startswith("conv2.weight_codes") and "shift" not in t.name)
        for fmt, m in (("qcdq", qcdq), ("packed", packed))
    }
    assert weight_bytes["packed"] * 4 == weight_bytes["qcdq"]
    x = images(4).numpy()
    out_q = make_session(qcdq, threads=1).run(None, {"input": x})[0]
    out_p = make_session(packed, threads=1).run(None, {"input": x})[0]
    np.testing.assert_array_equal(out_q, out_p)


def test_packed_four_bit_needs_only_opset_21(plain_net):
    gm = quantized(plain_net, 4, 4)
    packed, _ = export_model(gm, INPUT_SHAPE, "packed")
    assert packed.opset_import[0].version == 21
    assert _weight_types(packed)["conv2"] == TensorProto.INT4


@pytest.mark.parametrize("export_format", ["qcdq", "packed"])
def test_graph_passes_full_checker_and_strict_shape_inference(residual_net, export_format):
    gm = quantized(residual_net, 4, 4)
    model, manifest = export_model(gm, INPUT_SHAPE, export_format)
    onnx.checker.check_model(model, full_check=True)
    inferred = check_model(model)
    shaped = {v.name: v for v in inferred.graph.value_info}
    conv3 = next(n.output[0] for n in _owned(model, "conv3") if n.op_type == "Conv")
    assert [d.dim_value for d in shaped[conv3].type.tensor_type.shape.dim[1:]] == [16, 8, 8]
    relu_codes = next(e.onnx["codes"] for e in manifest.activations() if e.layer == "aq_relu")
    assert shaped[relu_codes].type.tensor_type.elem_type == TensorProto.UINT8
    output_dims = model.graph.output[0].type.tensor_type.shape.dim
    assert (output_dims[0].dim_param, output_dims[1].dim_value) == ("N", 10)


def test_signed_activations_are_stored_as_uint8_with_zero_point_128(plain_net):
    gm = quantized(plain_net, 4, 4)  # the image input is signed 8-bit
    model, manifest = export_model(gm, INPUT_SHAPE, "qcdq")
    entry = next(e for e in manifest.activations() if e.layer == "aq_x")
    assert entry.signed and (entry.qmin, entry.qmax) == (-128, 127)
    assert (entry.storage, entry.storage_offset) == ("uint8", 128)
    quantize = next(n for n in model.graph.node if n.name == entry.onnx["quantize"])
    zero_point = next(t for t in model.graph.initializer if t.name == quantize.input[2])
    assert zero_point.data_type == TensorProto.UINT8
    assert numpy_helper.to_array(zero_point) == 128


def test_opset_below_what_the_format_needs_is_refused(residual_net):
    gm = quantized(residual_net, 2, 2)
    with pytest.raises(ExportError, match="opset 25"):
        export_model(gm, INPUT_SHAPE, "packed", opset=21)
    with pytest.raises(ExportError, match="outside"):
        export_model(gm, INPUT_SHAPE, "qcdq", opset=9)
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(gm, INPUT_SHAPE, "int3")  # type: ignore[arg-type]


def test_training_mode_and_uncalibrated_models_are_refused(residual_net):
    from export_nets import recipe

    from mecqtk.qat import prepare

    gm = quantized(residual_net, 4, 4)
    with pytest.raises(ExportError, match="training mode"):
        export_model(gm.train(), INPUT_SHAPE)
    raw = prepare(residual_net, recipe(4, 4)).eval()
    with pytest.raises(ExportError, match="never calibrated"):
        export_model(raw, INPUT_SHAPE)
