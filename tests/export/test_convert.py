"""The convert stage: the deploy form computes what the fake-quant model computes, and every
quantizer is one call of mecqtk's registered operator."""

from __future__ import annotations

import pytest
import torch
from export_nets import INPUT_SHAPE, images, quantized

import mecqtk
from mecqtk.export import snap_biases
from mecqtk.export.convert import DeployLayer, FrozenQuantizer, convert
from mecqtk.quant.arith import fake_quantize
from mecqtk.quant.quantizers import FakeQuantizer
from zoo import small_model


def test_custom_op_is_fake_quantize_bit_for_bit():
    x = torch.randn(4, 6, 5, 5) * 3
    scale = torch.rand(6) * 0.2 + 0.01
    zero = torch.tensor(128, dtype=torch.uint8)
    per_channel = torch.ops.mecqtk.quantize_dequantize(x, scale, torch.full((6,), 7).to(
        torch.uint8), 7 - 8, 7 + 7, 1)
    expected = fake_quantize(x, scale.reshape(1, -1, 1, 1), -8, 7)
    assert torch.equal(per_channel, expected)
    # a signed grid shifted by 128 into uint8 gives the same values
    per_tensor = torch.ops.mecqtk.quantize_dequantize(x, scale[:1], zero, 128 - 2, 128 + 1, 0)
    assert torch.equal(per_tensor, fake_quantize(x, scale[0], -2, 1))


@torch.no_grad()
def _deploy_matches(gm: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    deploy, report = convert(gm)
    assert report.layers > 0 and report.quantizers > 0
    assert not any(isinstance(m, FakeQuantizer) for m in deploy.modules())
    return gm(x), deploy(x)


def test_deploy_form_equals_fake_quant_bit_for_bit_without_batchnorm(plain_net):
    gm = quantized(plain_net, 2, 2)
    x = images(8)
    fake, deployed = _deploy_matches(gm, x)
    assert torch.equal(fake, deployed)


def test_deploy_form_folds_batchnorm_into_integer_weights(residual_net):
    gm = quantized(residual_net, 4, 4)
    snap_biases(gm)
    deploy, report = convert(gm)
    assert report.folded_batchnorms == 3
    layers = [m for m in deploy.modules() if isinstance(m, DeployLayer)]
    assert layers and all(m.weight_codes.dtype == torch.int8 for m in layers)
    assert all(m.bias_codes is None or m.bias_codes.dtype == torch.int32 for m in layers)
    x = images(16)
    with torch.no_grad():
        fake, deployed = gm(x), deploy(x)
    # folding changes float rounding only: logits within 1e-5 of their range
    assert (fake - deployed).abs().max() <= 1e-5 * (fake.max() - fake.min())


ZOO_SUBSET = ["resnet18", "convnext_atto", "vit_tiny_patch16_224", "mobilenetv2_100"]


@pytest.mark.parametrize("name", ZOO_SUBSET)
def test_deploy_form_of_zoo_models(name, one_torch_thread):
    torch.manual_seed(0)
    model, shape = small_model(name)
    gm = mecqtk.prepare(model, mecqtk.load_recipe("w4a4_lsq.yaml"))
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
    mecqtk.calibrate(gm, [x])
    snap_biases(gm.eval())
    fake, deployed = _deploy_matches(gm, x)
    assert torch.equal(fake.argmax(1), deployed.argmax(1))
    assert (fake - deployed).abs().max() <= 1e-4 * (fake.max() - fake.min())
    deploy, _ = convert(gm)
    frozen = [m for m in deploy.modules() if isinstance(m, FrozenQuantizer)]
    assert len(frozen) >= sum(isinstance(m, FakeQuantizer) for m in gm.modules()) - sum(
        isinstance(m, DeployLayer) for m in deploy.modules())


def test_convert_leaves_the_trained_model_alone(residual_net):
    gm = quantized(residual_net, 4, 4)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    convert(gm)
    after = gm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, FakeQuantizer) for m in gm.modules())
    _ = INPUT_SHAPE


class _PadThenPool(torch.nn.Module):
    """hgnetv2's stem: a zero-padded quantized value read by a conv (through its quantizer) and
    by a max pool whose output is concatenated. The pad is requantized on its grid, and the
    pool's chain then walks back through that new node."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv1b = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 2)
        self.conv3 = torch.nn.Conv2d(16, 8, 1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = x + torch.relu(self.conv1b(x))  # a quantized junction, then the pad
        padded = torch.nn.functional.pad(x, (0, 1, 0, 1))
        pooled = torch.nn.functional.max_pool2d(padded, 2, stride=1)
        x = torch.cat([pooled, self.conv2(padded)], 1)
        return self.fc(self.conv3(x).mean((2, 3)))


def test_a_chain_of_grid_preserving_ops_after_a_requantization_converts():
    gm = quantized(_PadThenPool(), 4, 4)
    deploy, report = convert(gm)
    assert report.regrids >= 1
    x = images(16, 2)
    with torch.no_grad():
        assert torch.equal(gm(x), deploy(x))


def test_deploy_layers_read_like_the_layers_they_replace(residual_net):
    """Leaf code reads ``self.proj.weight.device`` (timm's edgenext): the deploy layer's weight
    and bias are tensors, the dequantized integer codes."""
    gm = quantized(residual_net, 4, 4)
    snap_biases(gm)
    layer = convert(gm)[0].get_submodule("conv3")
    assert isinstance(layer, DeployLayer)
    assert layer.weight.device.type == "cpu" and layer.weight.shape == (16, 8, 3, 3)
    zero = layer.weight_zero_point.float().reshape(-1, 1, 1, 1)
    codes = layer.weight_codes.to(torch.float32) - zero
    torch.testing.assert_close(layer.weight, codes * layer.weight_scale.reshape(-1, 1, 1, 1),
                               rtol=0, atol=0)
    assert layer.bias is not None and layer.bias.shape == (16,)


def test_convs_whose_output_a_quantizer_reads_compute_the_runtimes_requantization(residual_net):
    """onnxruntime runs DequantizeLinear -> Conv -> [Relu] -> QuantizeLinear as one QLinearConv;
    the deploy form computes that group's arithmetic, and the plain form in the export trace."""
    gm = quantized(residual_net, 4, 4)
    snap_biases(gm)
    deploy, _ = convert(gm)
    requantizing = {name for name, m in deploy.named_modules()
                    if isinstance(m, DeployLayer) and m.requantization is not None}
    # conv1 -> bn1 -> relu -> aq; conv2 -> bn2 -> aq (before the residual add); conv3 -> bn3 ->
    # aq; branch -> relu -> aq. The Linear's logits stay float: QGemm with a float output.
    assert requantizing == {"conv1", "conv2", "conv3", "branch", "fc"}
    assert deploy.get_submodule("fc").requantization.output is None
    layer = deploy.get_submodule("conv3")
    x = torch.relu(images(8, 3)[:, :1].repeat(1, 8, 1, 1))
    step = layer.requantization.input_scale
    x = torch.round(x / step).clamp(0, 15) * step  # on the input quantizer's grid
    with torch.no_grad():
        fused = layer(x)
        saved, layer.requantization = layer.requantization, None
        plain = layer(x)
    out_step = saved.output_scale
    # both on the output grid, equal but for the roundings the fused form does differently
    codes = torch.round(fused / out_step)
    torch.testing.assert_close(fused, codes * out_step, rtol=0, atol=0)
    moved = torch.round(plain / out_step).clamp(saved.low, saved.high) != codes
    assert moved.float().mean() < 1e-3
