import torch

from mecqtk.quant import fake_quantize
from mecqtk.quant.observers import LSQInitObserver, MinMaxObserver, MSEObserver, PercentileObserver


def _mse(x, s, qmin, qmax):
    return (fake_quantize(x, s[:, None], qmin, qmax) - x).pow(2).mean().item()


def test_minmax_puts_the_largest_value_on_the_last_code():
    obs = MinMaxObserver()
    obs.update(torch.tensor([0.5, -3.0, 1.0]))
    assert obs.compute_scale(-8, 7).item() == 3.0 / 8


def test_mse_beats_minmax_on_heavy_tails():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((20000,))
    mse, mm = MSEObserver(), MinMaxObserver()
    mse.update(x)
    mm.update(x)
    s_mse, s_mm = mse.compute_scale(-2, 1), mm.compute_scale(-2, 1)
    assert _mse(x[None], s_mse, -2, 1) < 0.5 * _mse(x[None], s_mm, -2, 1)


def test_per_channel_observers_give_one_step_per_channel():
    w = torch.randn(8, 4, 3, 3) * torch.arange(1, 9).view(8, 1, 1, 1)
    for cls in (MinMaxObserver, MSEObserver, PercentileObserver, LSQInitObserver):
        obs = cls(axis=0)
        obs.update(w)
        scale = obs.compute_scale(-8, 7)
        assert scale.shape == (8,)
        # channels with larger weights get larger steps
        assert scale[-1] > scale[0]


def test_lsq_init_formula():
    obs = LSQInitObserver()
    x = torch.tensor([1.0, -3.0])
    obs.update(x)
    assert torch.allclose(obs.compute_scale(-2, 1), torch.tensor([2 * 2.0 / 1.0]))
