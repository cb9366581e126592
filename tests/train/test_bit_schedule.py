import torch

from mecqtk import calibrate, prepare
from mecqtk.models import create_model
from mecqtk.quant.quantizers import FakeQuantizer
from mecqtk.recipe import load_recipe
from mecqtk.train.bit_schedule import NARROW, WIDE, BitSchedule


def w2a2_model(images: torch.Tensor):
    torch.manual_seed(0)
    model = prepare(create_model("cifar_resnet20", num_classes=10), load_recipe("w2a2_lsq"))
    calibrate(model, [images])
    return model.train()


def narrow_quantizers(model) -> list[FakeQuantizer]:
    return [q for q in model.modules() if isinstance(q, FakeQuantizer) and q.bits == 2]


def step_ratios(quantizers, steps) -> torch.Tensor:
    return torch.cat([(q.step_size() / s).flatten()
                      for q, s in zip(quantizers, steps, strict=True)])


def test_wide_first_then_the_recipes_grid_with_fresh_steps():
    images = torch.randn(16, 3, 32, 32)
    model = w2a2_model(images)
    quantizers = narrow_quantizers(model)
    grids = [q.grid.clone() for q in quantizers]
    steps_2bit = [q.step_size().clone() for q in quantizers]
    schedule = BitSchedule(4, switch_step=3, qmodel=model)
    assert len(schedule.quantizers) == len(quantizers) > 0
    schedule.before_step(images, 0)
    assert schedule.phase == WIDE
    assert all(q.qmax - q.qmin == 15 for q in quantizers)
    # a 4-bit step covers a range with 15 gaps instead of 3: each step size is much smaller
    ratios = step_ratios(quantizers, steps_2bit)
    assert ratios.median() < 0.5
    weight = model.get_submodule("layer1.0.conv1")
    codes = weight.weight_quantizer.codes(weight.effective_weight())
    assert codes.min() >= -8 and codes.max() <= 7 and len(codes.unique()) > 4
    schedule.before_step(images, 1)
    schedule.before_step(images, 2)
    assert schedule.phase == WIDE
    schedule.before_step(images, 3)
    assert schedule.phase == NARROW
    assert all(q.qmax - q.qmin == 3 for q in quantizers)
    # the checkpoints' grid buffers never changed
    assert all(torch.equal(q.grid, g) for q, g in zip(quantizers, grids, strict=True))
    # back on 2 bits, the observer set the steps again: close to the first calibration's
    ratios = step_ratios(quantizers, steps_2bit)
    assert 0.5 < ratios.median() < 2.0


def test_a_run_resumed_in_the_wide_phase_keeps_its_saved_wide_steps():
    images = torch.randn(16, 3, 32, 32)
    model = w2a2_model(images)
    quantizers = narrow_quantizers(model)
    schedule = BitSchedule(4, switch_step=10, qmodel=model)
    schedule.before_step(images, 0)
    saved_model, saved_phase = model.state_dict(), schedule.trainable.state_dict()
    resumed = w2a2_model(images)
    resumed_quantizers = narrow_quantizers(resumed)
    resumed.load_state_dict(saved_model)  # the recipe's grid: loads
    again = BitSchedule(4, switch_step=10, qmodel=resumed)
    again.trainable.load_state_dict(saved_phase)
    again.before_step(images, 5)
    assert again.phase == WIDE
    assert len(quantizers) == len(resumed_quantizers) > 0
    for q, r in zip(quantizers, resumed_quantizers, strict=True):
        assert q.qmax - q.qmin == 15
        assert (r.qmin, r.qmax) == (q.qmin, q.qmax)
        assert torch.equal(r.step_size(), q.step_size())
