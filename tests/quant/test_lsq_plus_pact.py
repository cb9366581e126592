"""LSQ+ and PACT: values exactly on an ONNX QDQ grid, and their published gradients."""

from __future__ import annotations

import pytest
import torch

from mecqtk.errors import RecipeError
from mecqtk.quant.observers import MinMaxObserver, MSEObserver, PercentileObserver
from mecqtk.quant.quantizers import LSQPlusQuantizer, PACTQuantizer, make_quantizer
from mecqtk.quant.spec import QuantSpec
from mecqtk.recipe import recipe_from_dict


def _onnx_qdq(x, scale, zero_point, qmin, qmax):
    """QuantizeLinear then DequantizeLinear, as the ONNX spec defines them (float32)."""
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def test_lsq_plus_output_is_an_onnx_qdq_pair_with_integer_zero_point():
    torch.manual_seed(0)
    quantizer = make_quantizer(QuantSpec(bits=4, signed=False, quantizer="lsq_plus"))
    assert isinstance(quantizer, LSQPlusQuantizer)
    x = torch.randn(4000) * 0.7 - 0.2  # a GELU-like asymmetric range
    quantizer.start_observing("minmax")
    quantizer(x)
    quantizer.finish_observing()
    zero_point = quantizer.zero_point()
    assert zero_point.item() == round(zero_point.item()) and 0 <= zero_point.item() <= 15
    with torch.no_grad():
        quantizer.offset.add_(0.3)  # a learned, non-integer offset is still rounded on use
    zp = quantizer.zero_point().detach()
    assert zp.item() == round(zp.item())
    out = quantizer(x)
    torch.testing.assert_close(out, _onnx_qdq(x, quantizer.scale, zp, 0, 15), rtol=0, atol=0)
    # min-max init covers the range: the extremes are representable up to half a step
    low = (0 - zp) * quantizer.scale
    assert low.item() <= x.min().item() + quantizer.scale.item() / 2


def test_lsq_plus_offset_gradient_only_from_clipped_values():
    quantizer = make_quantizer(QuantSpec(bits=2, signed=False, quantizer="lsq_plus"))
    with torch.no_grad():
        quantizer.scale.fill_(0.5)
        quantizer.offset.fill_(1.0)  # grid: 0.5 * ([0, 3] - 1) = [-0.5, 1.0]
    x = torch.tensor([[0.2, 0.6, 5.0, -3.0]], requires_grad=True)  # one sample of 4 values
    quantizer(x).sum().backward()
    # inside: straight-through for x, nothing for the offset; clipped: -scale per value in code
    # units, times LSQ's gradient scale 1/sqrt(values per sample * Qp)
    assert x.grad.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    g = 1.0 / (4 * 3) ** 0.5
    torch.testing.assert_close(quantizer.offset.grad, torch.tensor([-0.5 * 2 * g]))


def test_pact_output_on_grid_and_alpha_gradient():
    quantizer = make_quantizer(QuantSpec(bits=2, signed=False, quantizer="pact"))
    assert isinstance(quantizer, PACTQuantizer)
    with torch.no_grad():
        quantizer.scale.fill_(0.5)  # alpha = 3 * 0.5 = 1.5
    x = torch.tensor([-1.0, 0.3, 0.74, 1.2, 4.0], requires_grad=True)
    out = quantizer(x)
    torch.testing.assert_close(out, _onnx_qdq(x, torch.tensor(0.5), 0, 0, 3), rtol=0, atol=0)
    assert out.tolist() == [0.0, 0.5, 0.5, 1.0, 1.5]
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # d out / d alpha = 1 for x >= alpha, 0 inside (PACT); d/d scale = qmax * d/d alpha
    torch.testing.assert_close(quantizer.scale.grad, torch.tensor([3.0]))


def test_pact_signed_grid_clips_below_at_qmin_step():
    quantizer = make_quantizer(QuantSpec(bits=3, signed=True, quantizer="pact"))
    with torch.no_grad():
        quantizer.scale.fill_(0.25)
    x = torch.tensor([-5.0, 0.1, 5.0], requires_grad=True)
    out = quantizer(x)
    assert out.tolist() == [-1.0, 0.0, 0.75]
    out.sum().backward()
    torch.testing.assert_close(quantizer.scale.grad, torch.tensor([-4.0 + 3.0]))


@pytest.mark.parametrize("cls", [MinMaxObserver, MSEObserver, PercentileObserver])
def test_affine_observers_give_integer_zero_points_covering_the_range(cls):
    torch.manual_seed(0)
    observer = cls()
    x = torch.rand(10000) * 3.0 - 0.5  # [-0.5, 2.5]
    observer.update(x)
    scale, zero_point = observer.compute_affine(0, 15)
    assert zero_point.item() == round(zero_point.item()) and 0 < zero_point.item() < 8
    error = (_onnx_qdq(x, scale, zero_point, 0, 15) - x).abs().max()
    assert error <= scale.item() * 0.75


def test_activation_only_quantizers_are_rejected_for_weights():
    with pytest.raises(RecipeError, match=r"weight.quantizer: 'pact' quantizes activations only"):
        recipe_from_dict({"quant": {"weight": {"quantizer": "pact"}}})
    with pytest.raises(RecipeError, match=r"rules\[0\].weight.quantizer: 'lsq_plus'"):
        recipe_from_dict({"quant": {"rules": [
            {"match": {"op": ["conv"]}, "weight": {"quantizer": "lsq_plus"}}]}})
    recipe = recipe_from_dict({"quant": {"activation": {"quantizer": "lsq_plus"}}})
    assert recipe.quant.activation.quantizer == "lsq_plus"


def test_lsq_plus_with_a_calibrated_step_tracks_the_range_with_an_integer_zero_point():
    quantizer = make_quantizer(QuantSpec(bits=8, signed=False, quantizer="lsq_plus",
                                         learn_step=False))
    with torch.no_grad():
        quantizer.scale.fill_(1.0 / 255)
        quantizer.offset.fill_(0.0)  # range [0, 1]
    x = torch.linspace(-1.0, 3.0, 1000)
    quantizer.train()
    for _ in range(400):
        quantizer(x)
    zero_point = quantizer.zero_point()
    low = ((0 - zero_point) * quantizer.scale).item()
    high = ((255 - zero_point) * quantizer.scale).item()
    assert zero_point.item() == round(zero_point.item())
    assert -1.05 < low < -0.9 and 2.9 < high < 3.05  # the EMA reached the data's range
    assert not quantizer.scale.requires_grad and not quantizer.offset.requires_grad
