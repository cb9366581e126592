"""Tracer errors, automatic leaves, and layers inside leaves still quantized."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from mecqtk.errors import GraphError
from mecqtk.graph import trace
from mecqtk.graph.meta import graph_info
from mecqtk.graph.quant_plan import quant_report
from mecqtk.qat import prepare
from mecqtk.quant.modules import QuantizedLayer
from mecqtk.recipe import QuantConfig


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return torch.relu(self.conv(x)) + x


class DataDependent(nn.Module):
    """Python control flow on a tensor value: symbolic tracing cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.inner = Inner()

    def forward(self, x):
        if x.abs().sum() >= 0:  # always true, but only known at run time
            x = self.conv(x)
        return self.inner(x) + x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(DataDependent())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_trace_error_names_module_path_class_and_recipe_key():
    with pytest.raises(GraphError) as info:
        trace(Net())
    message = str(info.value)
    assert "in module body.0 (DataDependent)" in message
    assert "quant.leaf_modules" in message and "\n" not in message


def test_root_failure_says_the_models_own_forward():
    with pytest.raises(GraphError, match=r"cannot trace DataDependent: its own forward"):
        trace(DataDependent())


def test_auto_leaf_keeps_the_class_whole_and_quantizes_its_layers():
    config = QuantConfig()
    model = Net()
    qmodel = prepare(model, config)
    assert graph_info(qmodel).auto_leaves == ("DataDependent",)
    block = qmodel.body[0] if isinstance(qmodel.body, nn.Sequential) else qmodel.get_submodule(
        "body.0")
    # its direct conv runs in eager code: wrapped with an input quantizer
    assert isinstance(block.conv, QuantizedLayer) and block.conv.input_quantizer is not None
    # its traceable child became a graph of its own, annotated like the top one
    assert isinstance(block.inner, torch.fx.GraphModule)
    assert isinstance(block.inner.conv, QuantizedLayer) and block.inner.conv.input_quantizer is None
    assert any(n.target == "aq_x" for n in block.inner.graph.nodes)  # graph-level input quantizer
    report = quant_report(model, qmodel)
    assert report.layers_total == 4 and report.layers_quantized == 4
    eager = {r.name for r in report.rows if r.eager}
    assert eager == {"body.0.conv"}
    x = torch.rand(2, 3, 8, 8)
    out = qmodel(x)
    out.sum().backward()
    assert block.conv.weight_quantizer.scale.grad is not None


def test_recipe_leaf_modules_and_auto_leaf_off():
    from mecqtk.recipe import recipe_from_dict

    strict = recipe_from_dict({"quant": {"auto_leaf": False}}).quant
    with pytest.raises(GraphError, match="DataDependent"):
        prepare(Net(), strict)
    named = recipe_from_dict({"quant": {"auto_leaf": False,
                                        "leaf_modules": ["DataDependent"]}}).quant
    qmodel = prepare(Net(), named)
    assert graph_info(qmodel).auto_leaves == ()
    assert quant_report(Net(), qmodel).layers_quantized == 4


class Dropper(nn.Module):
    """Reads self.training in forward and holds no layer: must stay a module (leaf)."""

    def forward(self, x):
        return x * 0.0 if self.training else x


def test_train_dependent_modules_without_layers_are_leaves():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), Dropper())
    qmodel = prepare(model, QuantConfig())
    assert any(n.op == "call_module" and n.target == "1" for n in qmodel.graph.nodes)
    qmodel.eval()
    assert qmodel(torch.ones(1, 3, 2, 2)).abs().sum() > 0


def test_functional_layers_are_quantized_and_unused_ones_reported_float():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.read = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return torch.nn.functional.linear(self.used(x), self.read.weight)

    model = Functional()
    qmodel = prepare(model, QuantConfig())
    report = quant_report(model, qmodel)
    floats = {r.name: r.float_reason for r in report.layers_float}
    assert set(floats) == {"unused"} and "never called" in floats["unused"]
    read = next(r for r in report.rows if r.name == "read")
    assert read.quantized and read.op == "Linear (functional)"
    # F.linear(..., self.read.weight): the weight argument goes through a per-channel quantizer
    quantizer = qmodel.get_submodule("wq_read")
    assert quantizer.per_channel and quantizer.scale.numel() == 4
    linear = next(n for n in qmodel.graph.nodes if n.target is torch.nn.functional.linear)
    assert linear.args[1].target == "wq_read" and linear.args[0].target.startswith("aq_")
    qmodel.eval()  # a step that is not learned follows the data in training mode
    with torch.no_grad():
        quantizer.scale.fill_(0.05)
    weight = quantizer(qmodel.get_parameter("read.weight"))
    codes = weight / 0.05
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    out = qmodel.train()(torch.randn(3, 4))
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert qmodel.get_parameter("read.weight").grad is not None  # straight through the quantizer
    assert not quantizer.scale.requires_grad  # last layer: 8-bit step, calibrated not learned


class OptionalMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        if mask is not None:  # a traced Proxy is never None: this branch needs the default
            x = x * mask
        return self.fc(x)


def test_optional_forward_arguments_are_traced_at_their_defaults():
    qmodel = prepare(OptionalMask(), QuantConfig())
    assert not any(n.target is operator.mul for n in qmodel.graph.nodes)
    assert torch.isfinite(qmodel(torch.randn(2, 4))).all()
    with pytest.raises(AssertionError, match="mask has been specialized"):
        qmodel(torch.randn(2, 4), torch.ones(2, 4))


class HeadWithFunctionalDropout(nn.Module):
    """timm's ghostnet/efficientnet head: ``F.dropout(x, p, training=self.training)``."""

    def __init__(self, explicit_off: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.explicit_off = explicit_off

    def forward(self, x):
        x = torch.nn.functional.dropout(x, p=0.5, training=self.training)
        if self.explicit_off:  # written never to drop
            x = torch.nn.functional.dropout(x, p=0.5, training=False)
        return self.fc(x)


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_functional_dropout_follows_train_and_eval(traced_in):
    model = HeadWithFunctionalDropout()
    model.train(traced_in == "train")
    gm = trace(model)
    dropouts = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "dropout"]
    assert len(dropouts) == 1 and isinstance(gm.dropout, nn.Dropout) and gm.dropout.p == 0.5
    x = torch.randn(64, 16)
    gm.eval()
    model.eval()
    assert torch.equal(gm(x), model(x))  # traced in training mode it used to keep dropping
    gm.train()
    assert not torch.equal(gm(x), gm(x))


def test_dropout_written_off_stays_off():
    model = HeadWithFunctionalDropout(explicit_off=True).train()
    gm = trace(model)
    kept = [n for n in gm.graph.nodes if n.op == "call_function"
            and n.target is torch.nn.functional.dropout]
    assert len(kept) == 1 and kept[0].kwargs["training"] is False


class InnerWithSize(Inner):
    def __init__(self) -> None:
        super().__init__()
        self.window = 2  # a plain attribute the leaf's own code reads


class ReadsChildAttribute(DataDependent):
    def __init__(self) -> None:
        super().__init__()
        self.inner = InnerWithSize()

    def forward(self, x):
        if x.abs().sum() >= 0:
            x = self.conv(x)
        return nn.functional.avg_pool2d(self.inner(x), self.inner.window)


def test_plain_attributes_of_traced_children_survive_a_deep_copy():
    """timm's efficientvit_m0 reads ``self.attn.resolution`` from leaf code; the convert stage
    deep-copies the model, and GraphModule's deep copy drops attributes it was not told of."""
    import copy

    model = Net()
    model.body = nn.Sequential(ReadsChildAttribute())
    qmodel = prepare(model, QuantConfig())
    inner = qmodel.get_submodule("body.0.inner")
    assert isinstance(inner, torch.fx.GraphModule) and inner.window == 2
    copied = copy.deepcopy(qmodel)
    assert copied.get_submodule("body.0.inner").window == 2
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(copied(x), qmodel(x))
