"""onnxruntime against the fake-quantized PyTorch model: integer codes layer by layer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from export_nets import INPUT_SHAPE, images, quantized

from mecqtk.export import export_model
from mecqtk.export.convert import convert
from mecqtk.export.session import make_session
from mecqtk.export.verify import compare


def _batches(count: int = 3, size: int = 32):
    return [(images(size, seed), torch.arange(size) % 10) for seed in range(count)]


@pytest.mark.parametrize("export_format", ["qcdq", "packed"])
@pytest.mark.parametrize("bits", [2, 4])
def test_codes_agree_exactly_without_bias(plain_net, bits, export_format):
    gm = quantized(plain_net, bits, bits)
    model, manifest = export_model(gm, INPUT_SHAPE, export_format)
    report = compare(gm, model, manifest, _batches(), threads=1, deploy=convert(gm)[0])
    assert report.n == 96
    assert len(report.layers) >= 4
    assert [layer.differing for layer in report.layers] == [0] * len(report.layers)
    assert report.first_diverging_layer is None
    assert report.top1_agreement_pct == 100.0
    assert report.max_abs_logit_diff < 1e-6
    assert report.deploy_top1_agreement_pct == report.model_deploy_top1_agreement_pct == 100.0


def test_eight_bit_codes_agree_exactly(plain_net):
    # 8-bit codes are large: a float32 convolution rounds its sum, and a float requantization
    # rounds y / s_y, differently from onnxruntime's exact int32 accumulator times
    # float32(s_x * s_w / s_y). Before the deploy form computed QLinearConv's arithmetic, 4 and
    # 10 codes of aq_relu_1 and aq_relu_2 moved by one here.
    gm = quantized(plain_net, 8, 8)
    model, manifest = export_model(gm, INPUT_SHAPE, "qcdq")
    report = compare(gm, model, manifest, _batches(4, 64), threads=1)
    assert [layer.differing for layer in report.layers] == [0] * len(report.layers)
    assert report.top1_agreement_pct == 100.0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_folded_batchnorm_and_int32_bias_agree(residual_net, bits):
    # BatchNorm folded into per-channel scales (one gamma is zero, some are negative), biases
    # rounded to int32, residual adds, a concat: every code equal
    gm = quantized(residual_net, bits, bits)
    model, manifest = export_model(gm, INPUT_SHAPE, "qcdq")
    report = compare(gm, model, manifest, _batches(4, 64), threads=1)
    assert report.top1_agreement_pct == 100.0
    assert [layer.differing for layer in report.layers] == [0] * len(report.layers)
    assert report.max_rel_logit_diff < 1e-6


def test_dynamic_batch(residual_net):
    gm = quantized(residual_net, 4, 4)
    model, _ = export_model(gm, INPUT_SHAPE, "qcdq")
    session = make_session(model, threads=1)
    for batch in (1, 5):
        x = images(batch, seed=7)
        out = session.run(None, {"input": x.numpy()})[0]
        assert out.shape == (batch, 10)
        np.testing.assert_allclose(out, gm(x).detach().numpy(), atol=0.05)


def test_verify_names_the_first_layer_after_a_corrupted_weight(plain_net):
    gm = quantized(plain_net, 4, 4)
    model, manifest = export_model(gm, INPUT_SHAPE, "qcdq")
    corrupted = onnx.ModelProto()
    corrupted.CopyFrom(model)
    weight = next(t for t in corrupted.graph.initializer if t.name == "conv2.weight_codes")
    codes = onnx.numpy_helper.to_array(weight).copy()
    codes[:, :, 1, 1] = -codes[:, :, 1, 1]
    weight.CopyFrom(onnx.numpy_helper.from_array(codes, weight.name))
    report = compare(gm, corrupted, manifest, _batches(2), threads=1)
    differing = {layer.layer: layer.differing_pct for layer in report.layers}
    # conv2 feeds relu_1: its quantizer is the first to differ, everything before is identical
    assert report.first_diverging_layer == "aq_relu_1"
    assert differing["aq_x"] == differing["aq_relu"] == 0
    assert differing["aq_relu_1"] > 5


class _Squeeze(torch.nn.Module):
    """A squeeze-excitation squeeze over a 2x2 map: a mean of four codes lands on half codes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 8, stride=8, bias=False)
        self.fc = torch.nn.Conv2d(16, 10, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.fc(x.mean((2, 3), keepdim=True)).flatten(1)


def test_a_spatial_mean_computes_what_the_integer_pool_computes():
    gm = quantized(_Squeeze(), 4, 4, first_last_bits=None)
    mean_quantizer, input_quantizer = gm.get_submodule("aq_mean"), gm.get_submodule("aq_relu")
    with torch.no_grad():  # the same step: every sum that is 2 mod 4 is an exact tie
        mean_quantizer.scale.copy_(input_quantizer.scale)
    model, manifest = export_model(gm, INPUT_SHAPE, "qcdq")
    assert [n.op_type for n in model.graph.node].count("GlobalAveragePool") == 1
    report = compare(gm, model, manifest, _batches(4, 64), threads=1)
    by_name = {layer.layer: layer for layer in report.layers}
    assert by_name["aq_mean"].codes == 256 * 16
    # a float mean then round(y / s) missed the integer kernel's round-half-to-even on 4 of
    # these 4096 codes
    assert by_name["aq_mean"].differing == 0
    assert report.top1_agreement_pct == 100.0
