"""Rule resolution order, tensor-value and signedness analyses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mecqtk.graph import trace
from mecqtk.graph.rules import name_matches, resolve
from mecqtk.graph.signedness import nonnegative_values
from mecqtk.graph.values import ValueKind, value_kinds
from mecqtk.recipe import recipe_from_dict


def test_name_patterns_glob_and_regex():
    assert name_matches("layer1.*", "layer1.0.conv1")
    assert not name_matches("layer1.*", "layer10")
    assert name_matches("re:layer[12]\\.\\d\\.conv\\d", "layer2.1.conv2")
    assert not name_matches("re:conv", "layer1.0.conv1")  # regexes match the whole name


def _config(rules, **sections):
    return recipe_from_dict({"quant": {"rules": rules, **sections}}).quant


def test_first_matching_rule_wins_per_field_and_defaults_fill_the_rest():
    config = _config([
        {"match": {"name": "blocks.*"}, "weight": {"bits": 6}},
        {"match": {"op": ["linear"]}, "weight": {"bits": 3, "granularity": "per_tensor"},
         "activation": {"bits": 5}},
        {"match": {"position": "last"}, "weight": {"bits": 8}, "activation": {"bits": 8}},
    ], weight={"bits": 2}, activation={"bits": 2})
    inner = resolve(config, "blocks.0.fc", "linear", set())
    assert inner.weight.bits == 6  # rule 0 sets bits first
    assert inner.weight.granularity == "per_tensor"  # rule 1 is the first to set granularity
    assert inner.activation.bits == 5
    head = resolve(config, "head", "linear", {"last"})
    assert head.weight.bits == 3 and head.activation.bits == 5  # rule 1 precedes rule 2
    conv = resolve(config, "stem", "conv", {"first"})
    assert conv.weight.bits == 2 and conv.activation.bits == 2  # no rule: section defaults


def test_skip_and_junction_defaults():
    config = _config([
        {"match": {"name": "head"}, "weight": {"bits": 8}},
        {"match": {"name": "head"}, "skip": True},
        {"match": {"op": ["add"]}, "activation": {"bits": 6}},
    ], residual={"bits": 7})
    assert resolve(config, "head", "linear", set()).skipped == "recipe rule quant.rules[1] skips it"
    assert resolve(config, "layer1.0.add", "add", set()).activation.bits == 6
    cat = resolve(config, "cat_1", "cat", set())
    assert cat.activation.bits == 7 and cat.weight is None
    # position rules never match non-layer nodes (which have no position)
    positioned = _config([{"match": {"position": "first"}, "activation": {"bits": 3}}])
    assert resolve(positioned, "add", "add", set()).activation.bits == 8


class Mixed(nn.Module):
    def forward(self, x, mask=None):
        n = x.shape[1] + 1
        size = x.size(0)
        parts = torch.split(x, 2, dim=1)
        y = parts[0] * 2
        z = x.view(size, -1)
        return y, z, n


def test_value_kinds_tell_tensors_from_sizes():
    kinds = {n.name: k for n, k in value_kinds(trace(Mixed())).items()}
    assert kinds["x"] is ValueKind.TENSOR and kinds["mask"] is ValueKind.OTHER
    assert kinds["getattr_1"] is ValueKind.OTHER  # x.shape
    assert kinds["add"] is ValueKind.OTHER  # x.shape[1] + 1
    assert kinds["size"] is ValueKind.OTHER
    assert kinds["split"] is ValueKind.SEQUENCE and kinds["getitem_1"] is ValueKind.TENSOR
    assert kinds["mul"] is ValueKind.TENSOR and kinds["view"] is ValueKind.TENSOR


class Signs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        a = self.act(self.conv(x))
        b = F.max_pool2d(a, 2)  # max of non-negatives
        c = b + a[:, :, ::2, ::2]  # sum of non-negatives
        d = c - 1.0  # can go negative
        e = torch.sigmoid(d) * c
        f = c * -2.0  # negative constant
        g = torch.cat([b, e], 1).flatten(1).softmax(-1)
        return d, e, f, g, self.conv(x)


def test_signedness_analysis():
    nonneg = nonnegative_values(trace(Signs()))
    assert {"act", "max_pool2d", "add", "sigmoid", "mul", "cat", "flatten", "softmax"} <= nonneg
    assert not {"x", "conv", "sub", "mul_1", "conv_1"} & nonneg


class NormActs(nn.Module):
    """timm's fused norm + activation layers (inception_v3, densenet, mobilenetv2, regnet)."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import BatchNormAct2d

        self.conv = nn.Conv2d(3, 4, 1)
        self.relu6 = BatchNormAct2d(4, act_layer=nn.ReLU6)
        self.relu = BatchNormAct2d(4, act_layer=nn.ReLU)
        self.silu = BatchNormAct2d(4, act_layer=nn.SiLU)
        self.plain = BatchNormAct2d(4, apply_act=False)

    def forward(self, x):
        x = self.conv(x)
        return self.relu6(x), self.relu(x), self.silu(x), self.plain(x)


def test_norm_act_layers_ending_in_a_nonnegative_activation_are_nonnegative():
    nonneg = nonnegative_values(trace(NormActs()))
    assert {"relu6", "relu"} <= nonneg
    assert not {"silu", "plain", "conv"} & nonneg
