"""Step sizes stay valid by construction: a floor set at calibration, projection after updates."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import timm
import torch
from torch import nn

import mecqtk
from mecqtk import doctor as doctor_module
from mecqtk.data import build_data
from mecqtk.doctor import check_model
from mecqtk.quant.arith import fake_quantize
from mecqtk.quant.calibrate import has_initial_statistics, settle_batchnorm
from mecqtk.quant.modules import layer_weight_quantizers
from mecqtk.quant.quantizers import (
    FakeQuantizer,
    Mode,
    first_invalid_step,
    keep_steps_valid,
    make_quantizer,
)
from mecqtk.quant.spec import QuantSpec
from mecqtk.train.optim import build_optimizer

SPECS = [
    ("lsq", "per_channel", "signed"),
    ("lsq", "per_tensor", "unsigned"),
    ("lsq_plus", "per_tensor", "signed"),
    ("pact", "per_tensor", "unsigned"),
]


def _calibrated(quantizer_name: str, granularity: str, signed: str, bits: int = 2):
    spec = QuantSpec(bits=bits, quantizer=quantizer_name, granularity=granularity,
                     observer="mse", signed=signed)
    quantizer = make_quantizer(spec, channels=4, axis=0)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    if signed == "unsigned":
        x = x.abs()
    x[3] = 0.0  # a channel that saw only zeros (a weight scaled by a zero-initialised BN gamma)
    quantizer.start_observing()
    quantizer(x)
    quantizer.finish_observing()
    return quantizer, x


@pytest.mark.parametrize(("name", "granularity", "signed"), SPECS)
def test_calibration_sets_a_floor_relative_to_the_range(name, granularity, signed):
    quantizer, x = _calibrated(name, granularity, signed)
    floor, step = quantizer.step_floor, quantizer.scale.detach()
    assert floor.shape == step.shape
    assert (floor > 0).all() and (step >= floor).all()
    if granularity == "per_channel":
        bound = max(-quantizer.qmin, quantizer.qmax)
        expected = x[:3].abs().amax(dim=1) / bound / 256
        torch.testing.assert_close(floor[:3], expected)
        assert floor[3] == floor[:3].median()  # the all-zero channel borrows the median
    assert quantizer.invalid_step() is None


@pytest.mark.parametrize(("name", "granularity", "signed"), SPECS)
def test_an_adversarial_step_gradient_cannot_make_a_step_non_positive(name, granularity, signed):
    quantizer, x = _calibrated(name, granularity, signed)
    optimizer = torch.optim.SGD(quantizer.parameters(), lr=1.0, momentum=0.9)
    for gradient in (1e12, float("inf"), float("nan")):
        optimizer.zero_grad()
        quantizer.scale.grad = torch.full_like(quantizer.scale, gradient)
        optimizer.step()
        # without the projection the forward already uses at least the floor...
        assert (quantizer.step_size() >= quantizer.step_floor).all()
        assert torch.isfinite(quantizer(x)).all()
        keep_steps_valid(quantizer)
        # ...and after it the learned parameter itself is back in range
        assert (quantizer.scale >= quantizer.step_floor).all()
        assert quantizer.invalid_step() is None


def test_projection_keeps_the_lsq_gradient_and_the_onnx_arithmetic():
    quantizer, x = _calibrated("lsq", "per_tensor", "signed", bits=4)
    x = x.clone().requires_grad_(True)
    out = quantizer(x)
    expected = fake_quantize(x.detach(), quantizer.scale.detach().reshape(()), -8, 7)
    assert torch.equal(out.detach(), expected)  # the floor never moves a valid step
    out.sum().backward()
    step = quantizer.scale.detach()
    scaled = x.detach() / step
    inside = (scaled >= -8) & (scaled <= 7)
    lsq = torch.where(inside, torch.round(scaled) - scaled, scaled.round().clamp(-8, 7)).sum()
    grad_scale = 1 / math.sqrt(x[0].numel() * 7)
    torch.testing.assert_close(quantizer.scale.grad, (lsq * grad_scale).reshape(1))


def test_checkpoints_without_a_floor_still_load():
    quantizer, _ = _calibrated("lsq", "per_channel", "signed")
    state = {k: v for k, v in quantizer.state_dict().items() if k != "step_floor"}
    fresh = make_quantizer(quantizer.spec, channels=4, axis=0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.scale, quantizer.scale)
    assert (fresh.step_floor > 0).all()


def test_batchnorm_statistics_are_settled_only_when_still_initial():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4))
    trained = model[4]
    trained.running_mean.fill_(0.5)  # as loaded from a checkpoint
    batches = [torch.randn(8, 3, 8, 8) * 3 + 1 for _ in range(3)]
    assert has_initial_statistics(model[1]) and not has_initial_statistics(trained)
    assert settle_batchnorm(model, batches) == 1
    assert (trained.running_mean == 0.5).all()
    features = torch.cat([model[0](b) for b in batches])
    torch.testing.assert_close(model[1].running_mean, features.mean(dim=(0, 2, 3)),
                               atol=1e-5, rtol=1e-5)
    assert model[1].momentum == 0.1 and model.training


@pytest.mark.parametrize("training", [True, False])
def test_calibration_fits_the_batchnorm_statistics_of_the_models_mode(training):
    """Two images on a 1x1 map give each channel one degree of freedom: eval mode on statistics
    settled from them amplifies every difference from the settling pass. A model in training mode
    is calibrated on what training computes (batch statistics), one in eval mode on what eval
    computes; the settled running statistics are the same either way."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 4), nn.BatchNorm2d(32), nn.ReLU(),  # 1x1 maps from here on
        nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32, 10))
    qmodel = mecqtk.prepare(model, mecqtk.load_recipe("w2a2_lsq.yaml")).train(training)
    images = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    settled = copy.deepcopy(qmodel)
    settle_batchnorm(settled, [images])
    mecqtk.calibrate(qmodel, [images], observer="minmax")
    assert qmodel.training == training
    for name, buffer in settled.named_buffers():
        if "running" in name:
            assert torch.equal(buffer, qmodel.get_buffer(name)), name
    weights = {id(q) for q in layer_weight_quantizers(qmodel).values()}
    activations = {name: q for name, q in qmodel.named_modules()
                   if isinstance(q, FakeQuantizer) and id(q) not in weights}
    seen = {}
    for name, quantizer in activations.items():
        quantizer.mode = Mode.BYPASS  # float activations, as calibration observes them
        quantizer.register_forward_pre_hook(
            lambda module, args, name=name: seen.__setitem__(name, args[0].abs().max()))
    with torch.no_grad():
        qmodel(images)
    assert len(seen) == len(activations) == 4
    for name, quantizer in activations.items():  # in training mode, before: 3.07, 1.40, 53.8
        bound = max(-quantizer.qmin, quantizer.qmax)  # for the 1.0 training computes
        torch.testing.assert_close(quantizer.scale.detach() * bound, seen[name].reshape(1),
                                   rtol=1e-4, atol=1e-6, msg=name)


def test_doctor_calibrating_on_two_images_leaves_efficientnet_alive(one_torch_thread):
    # before: activation steps 1e2-1e18 times the training activations past blocks.5.0, constant
    # logits (loss ln 1000) and an infinite gradient at the first or second step
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0")
    result = check_model(model, "w2a2_lsq.yaml", input_size=(3, 32, 32), name="efficientnet_b0",
                         steps=2)
    assert result.ok, (result.error, result.train_error)
    assert abs(result.losses[0] - math.log(1000)) > 1e-3, result.losses


# depthwise + squeeze-excitation + hard-swish (mobilenetv3), depthwise + SE + swish (efficientnet):
# from timm's initialisation both hit a NaN loss or a negative step within 4 SGD steps before
@pytest.mark.parametrize("recipe", ["w4a4_lsq.yaml", "w2a2_lsq.yaml"])
@pytest.mark.parametrize("model_name", ["mobilenetv3_small_100", "efficientnet_b0"])
def test_depthwise_se_families_train_from_timm_init(model_name, recipe, shared_dir,
                                                    one_torch_thread):
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10)
    loaded = mecqtk.load_recipe(recipe)
    data = build_data(f"imagefolder:{shared_dir}/data/cifar10-jpeg", model=model,
                      batch_size=64, eval_batch_size=64, limit_train=256, limit_val=64, seed=0)
    qmodel = mecqtk.prepare(model, loaded)
    mecqtk.calibrate(qmodel, [x for x, _ in itertools.islice(data.train_loader, 2)])
    optimizer = build_optimizer(qmodel, loaded.train.optimizer)
    qmodel.train()
    losses = []
    for images, labels in itertools.islice(itertools.cycle(data.train_loader), 4):
        loss = nn.functional.cross_entropy(qmodel(images), labels)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        gradient_norm = torch.cat([p.grad.reshape(-1) for p in qmodel.parameters()
                                   if p.grad is not None]).norm()
        assert torch.isfinite(gradient_norm)
        if recipe.startswith("w4a4"):  # 2e9 at the first step before BN statistics were settled
            assert gradient_norm < 1e3, f"gradient norm {gradient_norm:.3g}"
        optimizer.step()
        keep_steps_valid(qmodel)
        assert first_invalid_step(qmodel) is None
    assert all(math.isfinite(loss) for loss in losses), losses
    steps = [m.step_size().min().item() for m in qmodel.modules() if isinstance(m, FakeQuantizer)]
    assert min(steps) > 0


def test_doctor_names_a_planted_bad_step(monkeypatch):
    real_calibrate = doctor_module.calibrate

    def calibrate_then_break(model, *args, **kwargs):
        seen = real_calibrate(model, *args, **kwargs)
        model.get_submodule("layer1.0.conv2.weight_quantizer").scale.data[2] = -0.5
        return seen

    monkeypatch.setattr(doctor_module, "calibrate", calibrate_then_break)
    model = timm.create_model("resnet18", num_classes=10)
    result = check_model(model, "w4a4_lsq.yaml", input_size=(3, 32, 32), name="resnet18")
    assert not result.ok
    assert result.error == ("after calibration, layer1.0.conv2.weight_quantizer: step size -0.5 "
                            "is below its floor " + result.error.rsplit(" ", 1)[1])
    assert result.losses == ()


def test_doctor_takes_optimizer_steps():
    model = timm.create_model("mobilenetv3_small_100", num_classes=10)
    result = check_model(model, "w2a2_lsq.yaml", input_size=(3, 32, 32), steps=4)
    assert result.ok, (result.error, result.train_error)
    assert len(result.losses) == 4 and all(math.isfinite(v) for v in result.losses)
    assert result.smallest_step > 0
    assert result.as_json()["steps"] == 4


def test_doctor_calibrates_on_its_training_batch(one_torch_thread):
    # calibrated on the 2-image check batch, efficientnet_b0's activation steps past blocks.5.0
    # came out 1e2..1e18 times what training computes (statistics settled on 2 images leave a
    # 1x1 map's channels one degree of freedom): constant logits and an infinite gradient of
    # conv_stem at the first optimizer step
    model = timm.create_model("efficientnet_b0")
    result = check_model(model, "w2a2_lsq.yaml", input_size=(3, 32, 32), steps=2)
    assert result.ok, (result.error, result.train_error)
    assert len(set(result.losses)) == 2 and all(math.isfinite(v) for v in result.losses)
