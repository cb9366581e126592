"""The pass pipeline that turns a float model into a fake-quantized GraphModule.

:func:`fake_quantize_graph` runs it; :func:`mecqtk.qat.prepare` (the public entry point) adds the
convert stage's eval-mode arithmetic on top, one layer up, since that arithmetic belongs to the
export package, which builds on this one. The pipeline, in order (each pass GraphModule ->
GraphModule; see docs/design.md):

1. ``unfuse_timm_attention`` on a copy of the model, then :func:`~mecqtk.graph.tracer.trace`
   (timm-aware leaves; with ``quant.auto_leaf`` a submodule that fails to trace is kept whole);
2. :func:`~mecqtk.graph.leaves.trace_leaf_interiors`: trace what can be traced inside leaves;
3. :func:`~mecqtk.graph.attention.decompose_sdpa` in every graph;
4. :func:`~mecqtk.graph.annotate.annotate_model`: the recipe's decisions as node metadata;
5. :func:`~mecqtk.graph.insert.insert_model`: quantizers built and wired, no decisions.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch.fx as fx
from torch import nn

from mecqtk.graph.annotate import annotate_model
from mecqtk.graph.attention import decompose_sdpa, unfuse_timm_attention
from mecqtk.graph.insert import insert_model
from mecqtk.graph.introspect import graph_modules
from mecqtk.graph.leaves import trace_leaf_interiors
from mecqtk.graph.tracer import trace
from mecqtk.recipe.schema import QuantConfig, Recipe

Pass = Callable[[fx.GraphModule], fx.GraphModule]


def in_every_graph(graph_pass: Pass) -> Pass:
    """Run a single-graph pass on the top graph and on every graph nested in it."""

    def run(gm: fx.GraphModule) -> fx.GraphModule:
        for _, sub in list(graph_modules(gm)):
            graph_pass(sub)
        return gm

    return run


def run_passes(gm: fx.GraphModule, passes: list[Pass]) -> fx.GraphModule:
    """Apply GraphModule -> GraphModule passes in order, then lint and recompile each graph."""
    for graph_pass in passes:
        gm = graph_pass(gm)
    for _, sub in graph_modules(gm):
        sub.graph.lint()
        sub.recompile()
    return gm


def trace_float(model: nn.Module, recipe: Recipe | QuantConfig) -> fx.GraphModule:
    """A traced copy of the float ``model``, leaves handled as the recipe says (steps 1 and 2 of
    the pipeline above): the graph :func:`prepare` quantizes, and the float teacher of MEC and
    distillation (:class:`mecqtk.train.teacher.Teacher`). One function for both, so a model that
    prepare traces the teacher traces too, with the same node names for feature taps.

    ``model`` itself is left untouched.

    Example:
        >>> gm = trace_float(timm.create_model("mobilevit_xxs"), QuantConfig())
    """
    config = recipe.quant if isinstance(recipe, Recipe) else recipe
    model = copy.deepcopy(model)
    unfuse_timm_attention(model)
    gm = trace(model, config.leaf_modules, auto_leaf=config.auto_leaf, specialize_defaults=True)
    for attr in ("pretrained_cfg", "default_cfg", "num_classes", "num_features"):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    return trace_leaf_interiors(gm, config.leaf_modules, auto_leaf=config.auto_leaf)


def fake_quantize_graph(model: nn.Module, recipe: Recipe | QuantConfig) -> fx.GraphModule:
    """Trace ``model`` and insert fake-quantizers as ``recipe`` says (the whole pipeline above).

    ``model`` itself is left untouched. Users call :func:`mecqtk.prepare`, which also gives the
    result the integer arithmetic of the deployed model in eval mode; this is the graph part only.

    Example:
        >>> gm = fake_quantize_graph(timm.create_model("resnet18"), load_recipe("w4a4_lsq.yaml"))
    """
    config = recipe.quant if isinstance(recipe, Recipe) else recipe
    return run_passes(trace_float(model, config), [
        in_every_graph(decompose_sdpa),
        lambda g: annotate_model(g, config),
        insert_model,
    ])
