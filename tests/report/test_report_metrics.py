import math

import pytest
import torch

from mecqtk.models import create_model
from mecqtk.qat import prepare
from mecqtk.quant import QuantSpec, make_quantizer
from mecqtk.recipe import load_recipe
from mecqtk.report.collect import weight_stats
from mecqtk.report.metrics import (
    ErrorStats,
    LevelStats,
    entropy_bits,
    sqnr_db,
    unclamped_codes,
)
from mecqtk.report.sites import find_sites


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_sqnr_of_a_full_range_uniform_signal_is_analytic(bits):
    # x uniform over the whole signed grid [(qmin - 1/2) s, (qmax + 1/2) s]: the error is uniform
    # on [-s/2, s/2] (power s^2/12); the signal has variance (2^b s)^2/12 and mean -s/2, so
    # SQNR = 10 log10(4^b + 3) dB, i.e. 6.02 b dB plus a small-b correction.
    torch.manual_seed(bits)
    quantizer = make_quantizer(QuantSpec(bits=bits, signed=True))
    step = 0.05
    quantizer.scale.data.fill_(step)
    low, high = (quantizer.qmin - 0.5) * step, (quantizer.qmax + 0.5) * step
    x = torch.rand(2_000_000, dtype=torch.float64).float() * (high - low) + low
    measured = sqnr_db(x, quantizer(x))
    assert measured == pytest.approx(10 * math.log10(4**bits + 3), abs=0.03)
    if bits == 8:
        assert measured == pytest.approx(6.02 * bits, abs=0.05)


def test_error_stats_mse_cosine_and_accumulation():
    reference = torch.tensor([3.0, 4.0, 0.0, 0.0])
    test = torch.tensor([3.0, 4.5, 0.0, 0.5])
    whole = ErrorStats()
    whole.update(reference, test)
    halves = ErrorStats()
    halves.update(reference[:2], test[:2])
    halves.update(reference[2:], test[2:])
    assert whole.sqnr_db() == pytest.approx(10 * math.log10(25 / 0.5))
    assert halves.sqnr_db() == pytest.approx(whole.sqnr_db())
    assert whole.mse() == pytest.approx(0.5 / 4)
    assert whole.cosine() == pytest.approx(27 / (5 * math.sqrt(9 + 20.25 + 0.25)))
    exact = ErrorStats()
    exact.update(reference, reference)
    assert exact.sqnr_db() == math.inf
    assert math.isnan(ErrorStats().sqnr_db())


def test_level_usage_clipping_and_entropy_of_a_known_tensor():
    step = torch.tensor(0.5)
    x = torch.tensor([0.1, 0.4, 0.6, -0.9, -1.1, 3.0, -7.0, 0.5])
    # codes: 0, 1 (0.8 rounds to 1), 1, -2, -2, 6 -> clipped to 1, -14 -> clipped to -2, 1
    codes = unclamped_codes(x, step)
    assert codes.tolist() == [0.0, 1.0, 1.0, -2.0, -2.0, 6.0, -14.0, 1.0]
    levels = LevelStats(qmin=-2, qmax=1)
    levels.update(codes)
    assert levels.histogram == [3, 0, 1, 4]  # -2, -1, 0, 1
    assert (levels.used(), levels.total) == (3, 4)
    assert levels.clip_ratio() == pytest.approx(2 / 8)
    expected = -(3 / 8 * math.log2(3 / 8) + 1 / 8 * math.log2(1 / 8) + 4 / 8 * math.log2(4 / 8))
    assert levels.entropy_bits() == pytest.approx(expected)


def test_entropy_of_histograms():
    assert entropy_bits([5, 5, 5, 5]) == pytest.approx(2.0)
    assert entropy_bits([0, 9, 0, 0]) == 0.0
    assert entropy_bits([1, 0, 1, 2]) == pytest.approx(1.5)
    assert math.isnan(entropy_bits([0, 0]))


def test_weight_stats_of_a_known_per_channel_weight():
    qmodel = prepare(create_model("cifar_resnet20", num_classes=10), load_recipe("w2a2_lsq"))
    site = next(s for s in find_sites(qmodel) if s.name == "layer1.0.conv1")
    assert site.weight_quantizer.bits == 2 and site.weight_quantizer.per_channel
    with torch.no_grad():
        weight = site.layer.layer.weight  # [16, 16, 3, 3]
        weight.zero_()
        weight[:, 0, 0, 0] = 1.0  # code 1 at step 1, code 2 (clipped to 1) at step 0.5
        weight[:, 1, 0, 0] = -0.26  # code 0 at step 1, code -1 at step 0.5
        steps = torch.where(torch.arange(16) % 2 == 0, 1.0, 0.5)
        site.weight_quantizer.scale.copy_(steps)
    stats, in_steps = weight_stats(site)
    per_channel = 16 * 3 * 3
    assert stats.histogram == [0, 8, 16 * per_channel - 8 - 16, 16]
    assert (stats.levels_used, stats.levels_total, stats.qmin) == (3, 4, -2)
    assert stats.clip_ratio == pytest.approx(8 / (16 * per_channel))
    assert (stats.step.count, stats.step.min, stats.step.max) == (16, 0.5, 1.0)
    assert stats.step.mean == pytest.approx(0.75)
    assert in_steps.max().item() == pytest.approx(2.0)
    # error energy: 8 channels lose 0.26^2 (-0.26 -> 0), 8 lose 0.5^2 (1 clipped to 0.5)
    # and 0.24^2 (-0.26 -> -0.5)
    noise = 8 * 0.26**2 + 8 * (0.5**2 + 0.24**2)
    signal = 16 * (1 + 0.26**2)
    assert stats.sqnr_db == pytest.approx(10 * math.log10(signal / noise), rel=1e-5)
