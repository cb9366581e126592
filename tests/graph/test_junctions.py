"""Residual add, concat and pooling annotations (quant.residual) and their insertion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mecqtk.errors import RecipeError
from mecqtk.graph import annotate, annotated_nodes, trace
from mecqtk.qat import prepare
from mecqtk.quant.quantizers import FakeQuantizer
from mecqtk.recipe import QuantConfig, recipe_from_dict


class Residual(nn.Module):
    """conv -> bn -> relu -> conv, plus the block input; then a cat and a pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.conv2(torch.relu(self.bn(self.conv1(x))))
        s = y + x
        t = s + torch.relu(s)  # one operand already quantized (s), one not
        c = torch.cat([t, torch.relu(x)], dim=1)
        p = self.pool(c)
        return self.fc(F.adaptive_avg_pool2d(p, 1).flatten(1)) + x.shape[1]


def _through_regrid(node):
    """``prepare`` puts an IntegerRegrid (the eval-time requantization of the deploy form, a
    pass-through in training) in front of a quantizer that reads another: look through it."""
    if node.op == "call_module" and str(node.target).startswith("integer_regrid_"):
        return node.args[0]
    return node


def _decisions(gm):
    return {d.kind + ":" + n.name: d for n, d in annotated_nodes(gm)}


def test_add_cat_pool_are_annotated_with_8bit_specs():
    gm = annotate(trace(Residual()), QuantConfig())
    found = _decisions(gm)
    add = found["add:add"]
    assert [s.bits for s in add.inputs] == [8, 8] and add.output.bits == 8
    assert add.inputs[0].signed and add.inputs[1].signed  # conv output and raw input: signed
    assert add.module_name == "add"
    second = found["add:add_1"]
    # s is the output of a quantized add: already on a grid, so not requantized
    assert second.inputs[0] is None and second.inputs[1] is not None
    assert not second.inputs[1].signed  # relu output: provably non-negative -> unsigned
    cat = found["cat:cat"]
    assert cat.inputs[0] is None  # t is an annotated add output
    assert cat.inputs[1].bits == 8 and not cat.inputs[1].signed
    assert cat.output.bits == 8 and cat.output.granularity == "per_tensor"
    assert found["pool:pool"].inputs[0] is None  # cat output is already quantized
    adaptive = found["pool:adaptive_avg_pool2d"]
    # its input is the max pool of the quantized cat: already on that 8-bit grid
    assert adaptive.inputs[0] is None and adaptive.output is None
    # x.shape[1] + <tensor> is a shape value plus a tensor: must not be touched
    assert not any(n.name == "add_2" for n, _ in annotated_nodes(gm))


def test_insert_wires_quantizers_into_add_and_cat_operands():
    qmodel = prepare(Residual(), QuantConfig())
    graph = {n.name: n for n in qmodel.graph.nodes}
    modules = dict(qmodel.named_modules())
    add = graph["integer_add"]  # the add, computing onnxruntime's QLinearAdd in eval mode
    assert all(isinstance(modules[a.target], FakeQuantizer) for a in add.args)
    # every consumer of the add sees its quantized output
    assert all(u.op == "call_module" and u.target.startswith("aq_") for u in add.users)
    cat_pieces = graph["cat"].args[0]
    assert all(p.op == "call_module" and p.target.startswith("aq_") for p in cat_pieces)
    out = qmodel(torch.randn(2, 4, 8, 8))
    out.sum().backward()
    assert torch.isfinite(out).all()
    # 8-bit junction steps are calibrated, not learned (quant.residual.learn_step: false)
    assert not modules[next(iter(add.users)).target].scale.requires_grad


def test_residual_section_can_disable_ops_and_rules_can_skip():
    config = recipe_from_dict({"quant": {
        "residual": {"ops": ["add"], "bits": 6},
        "rules": [{"match": {"name": "add_1", "op": ["add"]}, "skip": True}],
    }}).quant
    found = _decisions(annotate(trace(Residual()), config))
    assert found["add:add"].output.bits == 6
    assert found["add:add_1"].skipped == "recipe rule quant.rules[0] skips it"
    assert not any(k.startswith(("cat:", "pool:")) for k in found)
    off = recipe_from_dict({"quant": {"residual": {"enabled": False}}}).quant
    assert {d.kind for _, d in annotated_nodes(annotate(trace(Residual()), off))} == {
        "conv", "linear"}


def test_residual_section_is_validated():
    with pytest.raises(RecipeError, match=r"quant.residual.bits: 9 is out of range"):
        recipe_from_dict({"quant": {"residual": {"bits": 9}}})
    with pytest.raises(RecipeError, match=r"quant.residual.ops\[0\]: 'mul' is not allowed"):
        recipe_from_dict({"quant": {"residual": {"ops": ["mul"]}}})


class Attention(nn.Module):
    def forward(self, q, k, mask):
        logits = q @ k.transpose(-2, -1)
        return (logits + mask).softmax(-1)


def test_attention_logit_add_is_left_float_with_reason():
    gm = annotate(trace(Attention()), QuantConfig())
    add = next(q for n, q in annotated_nodes(gm) if q.kind == "add")
    assert add.skipped is not None and "softmax" in add.skipped


def _resnet18(activation_bits: int):
    timm = pytest.importorskip("timm")
    config = recipe_from_dict({"quant": {"activation": {"bits": activation_bits}}}).quant
    return prepare(timm.create_model("resnet18"), config)


def test_resnet18_block_sums_are_quantized_by_the_relu_consumers():
    gm = _resnet18(4)
    adds = [(n, q) for n, q in annotated_nodes(gm) if q.kind == "add"]
    assert len(adds) == 8
    for node, quant in adds:
        # add -> ReLU -> (next convs, next add): the ReLU output is quantized by them, so
        # quantizing the sum too would only add error and a float DQ -> ReLU -> Q on export.
        assert quant.output is None
        (relu,) = node.users
        assert all(u.op == "call_module" and u.target.startswith("aq_") for u in relu.users)
    pools = [q for _, q in annotated_nodes(gm) if q.kind == "pool"]
    assert [p.module_name for p in pools] == ["maxpool", "global_pool.pool"]
    assert not pools[0].inputs[0].signed  # after a ReLU
    assert pools[1].inputs[0].bits == 8 and not pools[1].inputs[0].signed


def test_a_value_wanted_on_two_grids_is_stored_at_the_wider_one():
    gm = _resnet18(4)
    modules = dict(gm.named_modules())
    graph = {n.name: n for n in gm.graph.nodes}
    wide = graph["aq_layer1_0_act2"]  # the 8-bit residual stream after block layer1.0
    narrow = graph["aq_layer1_0_act2_u4"]  # what layer1.1.conv1 reads
    assert modules[wide.target].spec.bits == 8 and modules[narrow.target].spec.bits == 4
    # the 4-bit grid requantizes the stored 8-bit tensor
    assert _through_regrid(narrow.args[0]) is wide
    assert graph["layer1_1_conv1"].args[0] is narrow and wide in graph["integer_add_1"].args


def test_equal_grids_share_one_quantizer_and_a_max_pool_keeps_its_input_grid():
    gm = _resnet18(8)
    graph = {n.name: n for n in gm.graph.nodes}
    # conv input (learned step) and residual operand (calibrated step): one 8-bit quantizer
    assert not any(name.startswith("aq_layer1_0_act2_") for name in graph)
    assert graph["layer1_1_conv1"].args[0] is graph["aq_layer1_0_act2"]
    # max-pooling the 8-bit quantized stem output picks values on its grid: no requantization
    assert graph["layer1_0_conv1"].args[0] is graph["maxpool"]
    assert graph["maxpool"].args[0] is graph["aq_act1"]
    x = torch.randn(2, 3, 32, 32)
    assert torch.isfinite(gm(x)).all()


def test_cifar_resnet20_shortcuts_share_the_block_inputs_quantizer():
    """nn.Identity and the strided slice + zero pad of option A keep their input's grid: the
    block input is quantized once (8 bits, shared with the shortcut) and requantized for the
    block's 4-bit conv, as in timm's resnet18; nothing quantizes the shortcut's output."""
    from mecqtk.models import create_model

    recipe = recipe_from_dict({"quant": {"weight": {"bits": 4}, "activation": {"bits": 4}}})
    qmodel = prepare(create_model("cifar_resnet20", num_classes=10), recipe)
    graph = {n.name: n for n in qmodel.graph.nodes}
    modules = dict(qmodel.named_modules())
    identity = graph["layer1_0_shortcut"]  # nn.Identity
    assert identity.args[0].target == "aq_act1" and modules["aq_act1"].bits == 8
    assert graph["layer1_0_conv1"].args[0].target == "aq_act1_u4"
    assert _through_regrid(graph["aq_act1_u4"].args[0]) is graph["aq_act1"]
    assert modules["aq_act1_u4"].bits == 4
    assert graph["integer_add"].args[1] is identity
    # option A in layer2.0: slice + pad of the stored 8-bit block input, straight into the add
    assert graph["getitem"].args[0].target == "aq_layer1_2_act2"
    assert graph["pad"].args[0] is graph["getitem"]
    assert graph["integer_add_3"].args[1] is graph["pad"]
    assert not any(name.startswith(("aq_layer1_0_shortcut", "aq_pad", "aq_add"))
                   for name in modules)
    assert torch.isfinite(qmodel(torch.randn(2, 3, 32, 32))).all()
