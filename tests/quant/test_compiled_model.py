"""The QAT model under torch.compile: one graph, the eager arithmetic, AMP dtypes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mecqtk import calibrate, prepare
from mecqtk.quant.quantizers import FakeQuantizer, LSQPlusQuantizer
from mecqtk.quant.spec import QuantSpec
from mecqtk.recipe import load_recipe
from mecqtk.train.compiled import compiles


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.nn.functional.hardswish(self.bn2(self.conv2(y)) + y)
        return self.fc(y.mean((2, 3)))


def _qmodel(recipe: str) -> nn.Module:
    torch.manual_seed(0)
    qmodel = prepare(_Block(), load_recipe(recipe))
    calibrate(qmodel, [torch.randn(8, 3, 4, 4)])
    return qmodel.train()


@pytest.mark.parametrize("recipe", ["w4a4_lsq", "w2a2_lsq", "w2a2_mec"])
def test_a_prepared_model_traces_as_one_graph_in_training_mode(recipe):
    # 4x4 maps: the BatchNorm spread floor (a forward pre-hook) is active too
    explained = torch._dynamo.explain(_qmodel(recipe))(torch.randn(8, 3, 4, 4))
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_compiled_quantizers_equal_eager_bit_for_bit():
    torch.manual_seed(2)
    quantizers = {
        "lsq_weight": FakeQuantizer(QuantSpec(bits=4, signed=True, granularity="per_channel"),
                                    channels=6, axis=0),
        "lsq_plus": LSQPlusQuantizer(QuantSpec(bits=2, signed=False, quantizer="lsq_plus")),
    }
    x = torch.randn(6, 4, 3, 3)
    for name, quantizer in quantizers.items():
        quantizer.scale.data.uniform_(0.05, 0.3)
        compiled = torch.compile(quantizer, fullgraph=True)
        results = []
        for module in (quantizer, compiled):
            xs = x.clone().requires_grad_(True)
            quantizer.zero_grad()
            out = module(xs)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            results.append((out.detach(), xs.grad, quantizer.scale.grad.clone()))
        assert torch.equal(results[0][0], results[1][0]), name
        assert torch.equal(results[0][1], results[1][1]), name
        torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-5, atol=1e-7)


def test_compile_model_auto_compiles_on_cuda_only():
    assert compiles("auto", torch.device("cuda", 0))
    assert not compiles("auto", torch.device("cpu"))
    assert compiles(True, torch.device("cpu")) and not compiles(False, torch.device("cuda"))


def test_channels_last_trains_to_the_same_numbers():
    """NHWC activations and weights (train.channels_last) through every quantizer: the same
    logits and step-size gradients as contiguous tensors."""
    results = []
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    for channels_last in (False, True):
        qmodel = _qmodel("w4a4_lsq")
        inputs = x
        if channels_last:
            qmodel = qmodel.to(memory_format=torch.channels_last)
            inputs = x.contiguous(memory_format=torch.channels_last)
        out = qmodel(inputs)
        out.square().sum().backward()
        steps = [m.scale.grad for m in qmodel.modules()
                 if isinstance(m, FakeQuantizer) and m.scale.grad is not None]
        results.append((out.detach(), torch.cat([g.reshape(-1) for g in steps])))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)
