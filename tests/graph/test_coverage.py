"""Coverage suite: the 25 timm architectures of issue 3 at W2A2 and W4A4.

Each model is traced, quantized, calibrated (min-max) and run once forward and backward on a
small input, then trained for a few optimizer steps with the recipe's optimizer at its full
learning rate. Every Conv/Linear must be quantized (the report covers every layer of the float
model, so nothing can stay float silently), every quantized layer must run, outputs and
gradients must be finite, and the loss and every learned step size must stay valid through the
steps. A quick subset runs by default; ``pytest -m slow`` runs all 25.
"""

from __future__ import annotations

import math

import pytest
from torch import nn

from mecqtk.doctor import DEFAULT_STEPS, check_model
from mecqtk.quant.modules import is_quantizable_layer
from zoo import COVERAGE_MODELS, small_model

# conv + pool + residual add; a timm leaf with attention inside; attention with cat; SAME-padded
QUICK = ("resnet18d", "mobilevit_xxs", "deit_tiny_patch16_224", "tf_efficientnet_b0")
RECIPES = ("w2a2_lsq.yaml", "w4a4_lsq.yaml")


def _params(names):
    return [pytest.param(name, marks=[] if name in QUICK else [pytest.mark.slow])
            for name in names]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", _params(COVERAGE_MODELS))
def test_model_is_fully_quantized_and_runs(name, recipe):
    model, size = small_model(name)
    layers = [n for n, m in model.named_modules() if is_quantizable_layer(m)]
    result = check_model(model, recipe, input_size=size, name=name)
    assert result.traced, result.error
    assert result.error is None, result.error
    assert result.forward_ok and result.backward_ok
    assert result.report is not None
    assert {r.name for r in result.report.layers} == set(layers)  # every layer has a row
    assert result.float_layers == []
    assert result.layers_quantized == len(layers) > 0
    assert result.not_run == ()
    assert result.train_error is None, result.train_error
    assert len(result.losses) == result.steps == DEFAULT_STEPS
    assert all(math.isfinite(loss) for loss in result.losses)
    assert result.smallest_step is not None and result.smallest_step > 0
    assert result.ok


def test_attention_models_quantize_their_matmuls():
    model, size = small_model("deit_tiny_patch16_224")
    result = check_model(model, "w4a4_lsq.yaml", input_size=size)
    depth = sum(isinstance(m, nn.LayerNorm) for m in model.modules()) // 2
    assert result.ops["matmul"] == 2 * depth == 24
