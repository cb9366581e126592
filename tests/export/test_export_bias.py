"""Folded BatchNorm and the int32 bias at scale s_x * s_w."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from export_nets import INPUT_SHAPE, images, quantized
from onnx import numpy_helper

from mecqtk.export import export_model, snap_biases
from mecqtk.export.onnx_export import owner_module
from mecqtk.export.session import make_session
from mecqtk.export.weights import BatchNormFold, code_shift, fold_layer


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _input_quantizer(gm: torch.fx.GraphModule, layer: str) -> str:
    """The activation quantizer feeding ``layer``: conv3's input is stored at 8 bits for the
    shortcut beside it, and requantized to the conv's own grid (aq_relu_1_u2 at 2 bits)."""
    node = next(n for n in gm.graph.nodes if n.name == layer)
    return str(node.args[0].target)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bias_is_int32_at_input_scale_times_weight_scale(residual_net, bits):
    gm = quantized(residual_net, bits, bits)
    model, _ = export_model(gm, INPUT_SHAPE, "qcdq")
    inits = _initializers(model)
    layer = gm.get_submodule("conv3")
    bn = gm.get_submodule("bn3")
    s_x = np.float32(gm.get_submodule(_input_quantizer(gm, "conv3")).step_size().item())
    s_w = layer.weight_quantizer.step_size().detach().double().numpy()
    shift = code_shift(bits)
    g = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double().numpy()
    real_bias = ((layer.layer.bias - bn.running_mean).detach().double().numpy() * g
                 + bn.bias.detach().double().numpy())

    codes, bias_scale = inits["conv3.bias_codes"], inits["conv3.bias_scale"]
    weight_scale = inits["conv3.weight_scale"]
    assert codes.dtype == np.int32
    # the zero-gamma channel keeps its unfolded scale; the others carry gamma / sqrt(var + eps)
    expected_weight_scale = np.where(g == 0, s_w, s_w * g) / 2.0**shift
    np.testing.assert_allclose(weight_scale, expected_weight_scale, rtol=1e-6)
    assert (weight_scale < 0).sum() == (g < 0).sum() > 0
    np.testing.assert_array_equal(bias_scale, (s_x * weight_scale).astype(np.float32))
    np.testing.assert_array_equal(codes, np.rint(real_bias / bias_scale.astype(np.float64)))
    assert np.all(inits["conv3.weight_codes"][0] == 0)  # zero gamma: the channel is constant


def test_layer_output_is_the_integer_accumulator_times_its_scale(residual_net):
    """Run the exported graph up to conv3 and redo that conv in exact integer arithmetic."""
    gm = quantized(residual_net, 2, 2)
    model, manifest = export_model(gm, INPUT_SHAPE, "qcdq")
    source = _input_quantizer(gm, "conv3")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    conv3 = next(n.output[0] for n in model.graph.node
                 if n.op_type == "Conv" and owner_module(n, {"conv3"}) == "conv3")
    relu_codes = next(e.onnx["codes"] for e in manifest.activations() if e.layer == source)
    for name, elem in ((conv3, onnx.TensorProto.FLOAT), (relu_codes, onnx.TensorProto.UINT8)):
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    x = images(8, seed=3).numpy()
    conv_out, input_codes = make_session(probe, threads=1).run([conv3, relu_codes], {"input": x})
    inits = _initializers(model)
    weight = inits["conv3.weight_codes"].astype(np.int64)
    bias = inits["conv3.bias_codes"].astype(np.int64)
    relu = next(e for e in manifest.activations() if e.layer == source)
    centred = input_codes.astype(np.int64) - (int(relu.zero_point) + relu.storage_offset)
    accumulator = F.conv2d(torch.from_numpy(centred).double(), torch.from_numpy(weight).double(),
                           stride=2, padding=1).numpy()  # integers below 2**53: exact in float64
    assert np.array_equal(accumulator, np.round(accumulator))
    per_channel = (slice(None), None, None)
    expected = (accumulator + bias[per_channel]) * inits["conv3.bias_scale"][per_channel]
    np.testing.assert_allclose(conv_out, expected, rtol=1e-5, atol=1e-6)


def test_two_bit_codes_are_shifted_to_make_the_bias_finer(residual_net):
    gm = quantized(residual_net, 2, 2)
    model, manifest = export_model(gm, INPUT_SHAPE, "qcdq")
    inits = _initializers(model)
    codes = inits["conv2.weight_codes"]
    assert codes.dtype == np.int8
    assert np.all(codes % 64 == 0) and set(np.unique(codes // 64)) <= {-2, -1, 0, 1}
    entry = next(e for e in manifest.tensors if e.role == "weight" and e.layer == "conv2")
    assert entry.code_shift == 6 and entry.bits == 2
    np.testing.assert_array_equal(inits["conv2.weight_scale"] * 64, np.float32(entry.scale))


def test_fold_keeps_a_float_bias_when_int32_would_overflow():
    """A near-zero BatchNorm gamma makes the accumulator unit tiny: the bias stays float (the
    same values) instead of overflowing int32 or refusing the export."""
    codes = np.ones((2, 1, 1, 1), np.int64)
    bn = BatchNormFold("bn", factor=np.array([1e-12, 1.0]), mean=np.zeros(2), beta=np.ones(2))
    folded = fold_layer(codes, np.ones(2, np.float32), np.zeros(2, np.int64), None, bn, 1.0,
                        "conv")
    assert folded.bias_codes is None and folded.float_bias_reason is not None
    assert "channel 0" in folded.float_bias_reason
    np.testing.assert_array_equal(folded.bias, [1.0, 1.0])
    np.testing.assert_allclose(folded.scale, np.float32([1e-12, 1.0]))


def test_fold_never_divides_by_a_zero_gamma():
    codes = np.array([[[[1]]], [[[-1]]]], np.int64)
    bn = BatchNormFold("bn", factor=np.array([0.0, -2.0]), mean=np.array([0.5, 0.5]),
                       beta=np.array([0.75, 0.0]))
    folded = fold_layer(codes, np.array([0.5, 0.5], np.float32), np.zeros(2, np.int64), None, bn,
                        0.25, "conv")
    assert folded.constant_channels == (0,)
    np.testing.assert_array_equal(folded.codes[:, 0, 0, 0], [0, -1])
    np.testing.assert_array_equal(folded.scale, np.float32([0.5, -1.0]))
    # channel 0 outputs beta exactly: 0.75 / (0.25 * 0.5) = 6 steps; channel 1: -0.5 * -2 = 1
    np.testing.assert_array_equal(folded.bias_codes, [6, -4])


def test_a_float_bias_is_added_outside_the_conv_so_onnxruntime_cannot_saturate_it(residual_net):
    """onnxruntime fuses DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv and rounds a
    float bias to int32 itself, saturating one that needs more than 2**31 steps; the export adds
    such a bias in a separate Sum, so the file computes what the deploy form computes."""
    from mecqtk.export.convert import convert
    from mecqtk.export.verify import compare

    with torch.no_grad():
        residual_net.bn1.weight[0] = 1e-9  # accumulator unit ~1e-9 x smaller
        residual_net.bn1.bias[0] = 0.5  # so the bias needs ~1e10 of them
    gm = quantized(residual_net, 4, 4)
    snap_biases(gm)
    _, report = convert(gm)
    assert [layer.split(":")[0] for layer in report.float_bias_layers] == ["conv1"]
    model, manifest = export_model(gm, INPUT_SHAPE, "qcdq")  # refused before: 12.5 % of aq_relu
    weight = next(n for n in model.graph.node if n.input[0] == "conv1.weight_codes")
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and weight.output[0] in n.input)
    assert len(conv.input) == 2  # no bias input left for onnxruntime to quantize
    added = next(n for n in model.graph.node if conv.output[0] in n.input)
    assert added.op_type == "Sum"
    batches = [(images(64, 7), torch.arange(64) % 10)]
    checked = compare(gm, model, manifest, batches, threads=1, deploy=convert(gm)[0])
    assert all(layer.differing == 0 for layer in checked.layers), checked.layers
    assert checked.deploy_top1_agreement_pct == 100.0
