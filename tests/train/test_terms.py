import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F

from mecqtk import calibrate, prepare
from mecqtk.errors import GraphError, RecipeError
from mecqtk.graph import graph_info, trace
from mecqtk.mec import grouped_mec_loss, mec_loss
from mecqtk.models import create_model
from mecqtk.quant import FakeQuantizer
from mecqtk.recipe import DistillConfig, MECConfig, load_recipe, recipe_from_dict
from mecqtk.recipe.schema import MECTap
from mecqtk.train.taps import attach_tap, classifier_input
from mecqtk.train.teacher import Teacher
from mecqtk.train.terms import DistillTerm, MECTerm, build_loss_terms, second_view


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", num_classes=10).eval()
    qmodel = prepare(model, load_recipe("w4a4_lsq"))
    images = torch.randn(16, 3, 32, 32)
    calibrate(qmodel, [images])
    return model, qmodel, images


def test_tap_keeps_outputs_and_captures_pooled_quantized_features(setup):
    _, qmodel, images = setup
    gm = prepare(create_model("cifar_resnet20", num_classes=10), load_recipe("w4a4_lsq"))
    gm.load_state_dict(qmodel.state_dict())
    gm.eval()
    before = gm(images)
    node = classifier_input(gm)
    assert node.name.startswith("aq_")  # the classifier's input quantizer: quantized features
    tap = attach_tap(gm, node)
    assert torch.equal(gm(images), before)
    assert tap.value.shape == (16, 64)
    step = gm.get_submodule(node.target).step_size().item()
    codes = tap.value / step
    assert torch.allclose(codes, codes.round(), atol=1e-4)


@pytest.mark.parametrize(("experts", "form"), [(1, "mixture"), (4, "grouped"), (4, "mixture")])
def test_mec_term_against_the_library_loss(setup, experts, form):
    model, qmodel, images = setup
    gm = prepare(model, load_recipe("w4a4_lsq"))
    gm.load_state_dict(qmodel.state_dict())
    teacher = Teacher(model)
    config = MECConfig(enabled=True, weight=0.5, experts=experts, expert_form=form)
    term = MECTerm(config, gm, gm, teacher, steps_per_epoch=10, probe=images[:4])
    gm.train()
    logits = gm(images)
    out = term(images, torch.zeros(16, dtype=torch.long), logits, step=5)
    z1 = term.student_tap.value
    z2 = term.teacher_tap.value
    assert z1.shape == z2.shape == (16, 64)
    if experts == 1:
        expected = mec_loss(z1, z2.detach(), eps2=64.0, order=4)
        assert torch.allclose(out["log_mec_loss"], expected)
    elif form == "grouped":
        expected = grouped_mec_loss(z1, z2.detach(), eps2=64.0, groups=4, order=4)
        assert torch.allclose(out["log_mec_loss"], expected)
    else:
        assert len(list(term.trainable.parameters())) > 0  # the gate trains
    assert torch.allclose(out["mec"], 0.5 * out["log_mec_loss"])
    out["mec"].backward()
    grads = [q.scale.grad for q in gm.modules() if isinstance(q, FakeQuantizer)
             and q.scale.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in teacher.graph.parameters())


def test_stage_taps_add_one_weighted_mec_loss_per_intermediate_stage(setup):
    model, qmodel, images = setup
    gm = prepare(model, load_recipe("w4a4_lsq"))
    gm.load_state_dict(qmodel.state_dict())
    teacher = Teacher(model)
    config = MECConfig(enabled=True, weight=0.5, extra_taps=(MECTap("stages", 0.25),))
    term = MECTerm(config, gm, gm, teacher, steps_per_epoch=10, probe=images[:4],
                   float_model=model)
    # cifar_resnet20's feature_info: act1 (stem), layer1, layer2, layer3 -> layer1 and layer2
    assert [t.value.shape[1] for _, t, _ in term.extra] == [16, 32]
    gm.train()
    logits = gm(images)
    out = term(images, torch.zeros(16, dtype=torch.long), logits, step=5)
    expected = sum(
        0.25 * mec_loss(s.value.mean(dim=(2, 3)), t.value.mean(dim=(2, 3)), eps2=float(c), order=4)
        for (_, s, t), c in zip(term.extra, (16, 32), strict=True))
    assert torch.allclose(out["log_mec_taps_loss"], expected)
    assert torch.allclose(out["mec_taps"], 0.5 * expected)
    # the student taps read the stage's activation quantizer: codes, not float activations
    first = term.extra[0][1].value
    step = gm.get_submodule("aq_layer1_2_act2").step_size().item()
    assert torch.allclose(first / step, (first / step).round(), atol=1e-4)
    out["mec_taps"].backward()
    stem = gm.get_submodule("layer1.0.conv1").layer.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    with pytest.raises(RecipeError, match="feature_info"):
        MECTerm(config, gm, gm, teacher, steps_per_epoch=10, probe=images[:4],
                float_model=torch.nn.Linear(2, 2))


def test_mec_weight_warms_up(setup):
    model, qmodel, images = setup
    gm = prepare(model, load_recipe("w4a4_lsq"))
    gm.load_state_dict(qmodel.state_dict())
    config = MECConfig(enabled=True, view="self", weight=1.0, weight_warmup_epochs=1.0)
    term = MECTerm(config, gm, gm, None, steps_per_epoch=10, probe=images[:4])
    logits = gm(images)
    at_zero = term(images, None, logits, step=0)
    assert at_zero["mec"].item() == 0.0
    halfway = term(images, None, logits, step=5)
    assert torch.allclose(halfway["mec"], 0.5 * halfway["log_mec_loss"])


def test_distill_term_is_temperature_scaled_kl(setup):
    model, qmodel, images = setup
    teacher = Teacher(model)
    term = DistillTerm(DistillConfig(enabled=True, weight=2.0, temperature=3.0), teacher)
    logits = qmodel(images)
    out = term(images, None, logits, step=0)
    with torch.no_grad():
        t = model(images)
    p = F.softmax(t / 3, dim=1)
    expected = 2.0 * 9.0 * (p * (p.log() - F.log_softmax(logits / 3, dim=1))).sum(1).mean()
    assert torch.allclose(out["kd"], expected, rtol=1e-4)


def test_terms_own_their_trainable_parts_and_random_streams(setup):
    model, qmodel, images = setup
    teacher = Teacher(model)
    config = DistillConfig(enabled=True, weight=1.0, temperature=2.0)
    first, second = DistillTerm(config, teacher), DistillTerm(config, teacher)
    assert first.trainable is not second.trainable  # not one ModuleDict shared by the class
    first.trainable["extra"] = torch.nn.Linear(2, 2)
    assert len(list(second.trainable.parameters())) == 0 and first.generator is None
    mec = MECTerm(MECConfig(enabled=True, view="augmented", projector=8), qmodel, qmodel, None,
                  10, images, seed=3)
    # what a checkpoint keeps of each term (train.session): the MEC term's draws resume exactly
    assert isinstance(mec.generator, torch.Generator) and mec.generator.initial_seed() == 3
    assert sum(p.numel() for p in mec.trainable.parameters()) == 64 * 8 + 8


class _Branchy(torch.nn.Module):
    """A user's block around a timm block: Python control flow on a tensor value, which symbolic
    tracing cannot follow, so prepare keeps it whole (auto_leaf)."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        if x.abs().sum() >= 0:  # always true, but only known at run time
            x = self.block(x)
        return x


def test_teacher_is_traced_like_prepare_on_a_model_that_needs_leaves(one_torch_thread):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    model.layer2[0] = _Branchy(model.layer2[0])
    model.eval()
    with pytest.raises(GraphError, match="_Branchy"):
        trace(model)  # how the teacher was traced before: MEC/KD stopped where prepare did not
    recipe = recipe_from_dict({
        "mec": {"enabled": True, "extra_taps": [{"tap": "stages", "weight": 0.25}]},
        "distill": {"enabled": True},
    })
    qmodel = prepare(model, recipe)
    assert graph_info(qmodel).auto_leaves == ("_Branchy",)
    images = torch.randn(8, 3, 32, 32)
    calibrate(qmodel, [images])
    mec, kd = build_loss_terms(recipe, model, qmodel, qmodel, 10, images[:4], torch.device("cpu"))
    assert graph_info(mec.teacher.graph).auto_leaves == ("_Branchy",)
    qmodel.train()
    out = {**mec(images, None, qmodel(images), step=5), **kd(images, None, qmodel(images), 5)}
    assert mec.teacher_tap.value.shape == mec.student_tap.value.shape == (8, 512)
    # layer1..layer3 (feature_info without stem and last stage), layer2 through the leaf: the
    # teacher's stage features sit where the student's do
    assert [t.value.shape for _, _, t in mec.extra] == [s.value.shape for _, s, _ in mec.extra]
    assert [t.value.shape[1] for _, _, t in mec.extra] == [64, 128, 256]
    with torch.no_grad():
        assert torch.allclose(kd.teacher(images), model(images), atol=1e-5)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_second_view_is_a_shifted_flipped_copy():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    view = second_view(images, torch.Generator().manual_seed(0), pad=2)
    assert view.shape == images.shape
    assert not torch.equal(view, images)


def test_fake_quant_under_bf16_autocast_computes_float32_codes_and_returns_bf16():
    spec = dataclasses.replace(
        prepare(create_model("cifar_resnet20", num_classes=10), load_recipe("w4a4_lsq"))
        .get_submodule("aq_x").spec)
    quantizer = FakeQuantizer(spec).eval()
    quantizer.scale.data.fill_(0.1)
    x = torch.randn(64, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = quantizer(x)
    # the autocast dtype goes on (as the float layer's output would), the codes are ONNX's
    assert y.dtype == torch.bfloat16
    codes = torch.round(x.float() / torch.tensor(0.1)).clamp(quantizer.qmin, quantizer.qmax)
    assert torch.equal(y, (codes * torch.tensor(0.1)).to(torch.bfloat16))
    assert torch.equal(y, quantizer(x.float()).to(torch.bfloat16))


def test_steps_that_are_not_learned_follow_the_data_in_training():
    gm = prepare(create_model("cifar_resnet20", num_classes=10), load_recipe("w4a4_lsq"))
    images = torch.randn(8, 3, 32, 32)
    calibrate(gm, [images])
    first = gm.get_submodule("conv1").weight_quantizer  # 8-bit, not learned
    first_in = gm.get_submodule("aq_x")
    assert not first.scale.requires_grad
    with torch.no_grad():
        gm.get_submodule("conv1").layer.weight.mul_(2.0)
    before = first_in.scale.clone()
    gm.eval()
    gm(images * 3)
    assert torch.equal(first_in.scale, before)  # eval: fixed
    gm.train()
    gm(images * 3)
    weight = gm.get_submodule("conv1").layer.weight
    assert torch.allclose(first.scale, weight.abs().amax(dim=(1, 2, 3)) / 128)
    assert first_in.scale > before  # moving average towards the larger range


def test_oscillation_dampening_pulls_each_weight_to_its_codes_value_and_ramps_up():
    from mecqtk.quant.modules import QuantizedLayer
    from mecqtk.train.terms import DampeningTerm

    torch.manual_seed(0)
    qmodel = prepare(create_model("cifar_resnet20", num_classes=10), load_recipe("w2a2_lsq"))
    calibrate(qmodel, [torch.randn(8, 3, 32, 32)])
    term = DampeningTerm(0.5, qmodel, total_steps=100)
    layers = [m for m in qmodel.modules() if isinstance(m, QuantizedLayer)]
    assert len(term.layers) == len(layers) == 20  # 19 convs and the classifier
    x = torch.zeros(2, 3, 32, 32)
    assert float(term(x, None, None, 0)["dampen"]) == 0.0  # the ramp starts at 0
    out = term(x, None, None, 100)
    distance = float(out["log_weight_bin_distance"])
    assert 0.0 < distance <= 0.25  # at most half a step from a code's value, squared
    weights = sum(m.layer.weight.numel() for m in layers)
    torch.testing.assert_close(out["dampen"], torch.tensor(0.5 * distance * weights))
    out["dampen"].backward()
    # the gradient points from each weight's code value toward the weight: descent moves the
    # weight to the centre of its bin
    layer = layers[5]
    w = layer.effective_weight().detach()
    quantizer = layer.weight_quantizer
    step = quantizer.broadcast(quantizer.step_size(), w).detach()
    target = quantizer.codes(w) * step
    inside = (w > quantizer.qmin * step) & (w < quantizer.qmax * step) & (w != target)
    grad = layer.layer.weight.grad
    assert bool((torch.sign(grad[inside]) == torch.sign((w - target)[inside])).all())
    # weights on their code's value cost nothing
    with torch.no_grad():
        for m in layers:
            m.layer.weight.copy_(m.weight_quantizer.codes(m.effective_weight())
                                 * m.weight_quantizer.broadcast(m.weight_quantizer.step_size(),
                                                                m.layer.weight))
    assert float(term(x, None, None, 100)["log_weight_bin_distance"]) == 0.0
