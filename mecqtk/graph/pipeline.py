"""prepare(): the pass pipeline that turns a float model into a fake-quantized GraphModule."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch.fx as fx
from torch import nn

from mecqtk.graph.annotate import annotate
from mecqtk.graph.attention import decompose_sdpa, unfuse_timm_attention
from mecqtk.graph.insert import insert_quantizers
from mecqtk.graph.tracer import trace
from mecqtk.recipe.schema import QuantConfig, Recipe

Pass = Callable[[fx.GraphModule], fx.GraphModule]


def run_passes(gm: fx.GraphModule, passes: list[Pass]) -> fx.GraphModule:
    """Apply GraphModule -> GraphModule passes in order, then lint and recompile once."""
    for graph_pass in passes:
        gm = graph_pass(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def prepare(model: nn.Module, recipe: Recipe | QuantConfig) -> fx.GraphModule:
    """Trace ``model`` and insert fake-quantizers as ``recipe`` says.

    ``model`` itself is left untouched (it can serve as the float teacher). The returned
    GraphModule trains like the original; call :func:`mecqtk.calibrate` on a few
    batches before training so the step sizes start from the data.

    Example:
        >>> import timm
        >>> from mecqtk import prepare, load_recipe
        >>> qmodel = prepare(timm.create_model("resnet18"), load_recipe("w4a4_lsq.yaml"))
    """
    config = recipe.quant if isinstance(recipe, Recipe) else recipe
    model = copy.deepcopy(model)
    unfuse_timm_attention(model)
    gm = trace(model, extra_leaf_classes=config.leaf_modules)
    for attr in ("pretrained_cfg", "default_cfg", "num_classes", "num_features"):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    return run_passes(gm, [decompose_sdpa, lambda g: annotate(g, config), insert_quantizers])
