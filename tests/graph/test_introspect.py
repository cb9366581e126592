"""One answer per question about a prepared model (mecqtk.graph.introspect)."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from mecqtk.graph import trace
from mecqtk.graph.introspect import (
    activation_quantizers,
    batchnorm_user,
    feeding_quantizer,
    pooled_features_node,
    quantized_layers,
    weight_quantizers,
)
from mecqtk.qat import prepare
from mecqtk.quant.quantizers import FakeQuantizer, make_quantizer
from mecqtk.quant.spec import QuantSpec
from mecqtk.recipe import load_recipe, recipe_from_dict

EIGHT_BITS = {
    "name": "w8a8",
    "quant": {"weight": {"bits": 8}, "activation": {"bits": 8}},
}


class PooledNet(nn.Module):
    """conv -> relu -> max pool -> conv: the second conv reads the pool, not a quantizer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_b(self.pool(F.relu(self.conv_a(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1))


class FunctionalHead(nn.Module):
    """A layer whose weight is passed to ``F.linear`` (BEiT's qkv): quantized by a graph node."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(F.linear(x, self.proj.weight, self.proj.bias)))


def test_the_layer_behind_a_max_pool_is_fed_by_the_quantizer_before_it():
    torch.manual_seed(0)
    qmodel = prepare(PooledNet(), recipe_from_dict(EIGHT_BITS))
    modules = dict(qmodel.named_modules())
    conv_b = next(n for n in qmodel.graph.nodes if n.target == "conv_b")
    assert conv_b.args[0].target == "pool"  # the pool's input is on the 8-bit grid already
    name, quantizer = feeding_quantizer(conv_b, modules)
    assert modules[conv_b.args[0].args[0].target] is quantizer and name.startswith("aq_")
    by_name = {site.name: site for site in quantized_layers(qmodel)}
    assert list(by_name) == ["conv_a", "conv_b", "fc"]
    assert by_name["conv_b"].input_name == name and by_name["conv_b"].input_quantizer is quantizer


class _AllLeaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


class _AliasChain(nn.Module):
    def __init__(self, computed: bool) -> None:
        super().__init__()
        self.q = make_quantizer(QuantSpec(bits=4, signed=True))
        self.same = nn.Identity()
        self.drop = nn.Dropout(0.1)
        self.conv = nn.Conv2d(2, 2, 1)
        self.computed = computed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.same(self.q(x)))
        return self.conv(torch.tanh(x) if self.computed else x)


def test_feeding_quantizer_looks_through_aliases_but_not_through_computation():
    for computed, expected in ((False, "q"), (True, None)):
        model = _AliasChain(computed)
        gm = fx.GraphModule(model, _AllLeaves().trace(model))
        conv = next(n for n in gm.graph.nodes if n.target == "conv")
        found = feeding_quantizer(conv, dict(gm.named_modules()))
        assert (found[0] if found else None) == expected


def test_activation_and_weight_quantizers_split_every_quantizer():
    torch.manual_seed(0)
    qmodel = prepare(FunctionalHead(), load_recipe("w4a4_lsq.yaml"))
    everything = {n for n, m in qmodel.named_modules() if isinstance(m, FakeQuantizer)}
    activations, weights = set(activation_quantizers(qmodel)), set(weight_quantizers(qmodel))
    assert activations | weights == everything and not activations & weights
    assert weights == {"wq_proj", "fc.weight_quantizer"}
    assert all(n.startswith("aq_") for n in activations) and len(activations) == 2


def test_student_and_teacher_pool_features_at_the_same_place():
    torch.manual_seed(0)
    model = PooledNet()
    student = prepare(model, load_recipe("w4a4_lsq.yaml"))
    teacher = trace(model)
    in_student, in_teacher = pooled_features_node(student), pooled_features_node(teacher)
    assert in_student.target.startswith("aq_")  # the quantized features the classifier reads
    assert in_student.args[0].name == in_teacher.name == "flatten"


class _ConvBN(nn.Module):
    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y if self.shared else self.bn(y)


def test_a_batchnorm_folds_only_as_the_layers_sole_user_over_its_channels():
    for shared in (False, True):
        gm = trace(_ConvBN(shared))
        conv = next(n for n in gm.graph.nodes if n.target == "conv")
        modules = dict(gm.named_modules())
        found = batchnorm_user(conv, modules, channels=4)
        assert (found.target if found else None) == (None if shared else "bn")
        assert batchnorm_user(conv, modules, channels=5) is None
