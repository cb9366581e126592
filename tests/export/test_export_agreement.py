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


def test_eight_bit_codes_differ_only_by_rare_float_ties(plain_net):
    # 8-bit codes are large, so float32 rounding in PyTorch's convolution (the integer kernel
    # is exact) can move a value across a rounding boundary: rarely, and by one code.
    gm = quantized(plain_net, 8, 8)
    model, manifest = export_model(gm, INPUT_SHAPE, "qcdq")
    report = compare(gm, model, manifest, _batches(), threads=1)
    for layer in report.layers:
        assert layer.differing_pct < 0.01
        assert layer.max_abs_diff <= 1
    assert report.top1_agreement_pct == 100.0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_folded_batchnorm_and_int32_bias_agree(residual_net, bits):
    # BatchNorm folded into per-channel scales (one gamma is zero, some are negative) and biases
    # rounded to int32: only rare code differences remain. An 8-bit grid is fine compared with
    # the rounding of the bias and with one step of a low-bit input, so more of its codes move,
    # and by several steps where a low-bit input code flipped.
    gm = quantized(residual_net, bits, bits)
    model, manifest = export_model(gm, INPUT_SHAPE, "qcdq")
    report = compare(gm, model, manifest, _batches(4, 64), threads=1)
    assert report.top1_agreement_pct == 100.0
    assert report.layers[0].differing == 0  # the input quantizer sees identical float images
    for layer in report.layers:
        assert layer.differing_pct < (0.2 if layer.bits <= 4 else 3.0), layer
        if layer.bits <= 4:
            assert layer.max_abs_diff <= 1, layer
    assert report.max_rel_logit_diff < 0.01


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
