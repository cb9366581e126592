"""prepare(): a float model made quantization-aware, the first stage of the pipeline.

The graph pipeline (:mod:`mecqtk.graph.pipeline`) traces the model and inserts fake-quantizers;
this module adds what needs the packages above the graph: in eval mode the model computes the
deployed integer model's arithmetic (:mod:`mecqtk.export.deploy_eval`), so validation, the
self-check and ``mecqtk verify`` measure the file users ship, and BatchNorms whose channels
collapse are floored (:mod:`mecqtk.quant.bn_spread`).
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from mecqtk.export.deploy_eval import compute_deploy_form_in_eval
from mecqtk.graph.introspect import weight_quantizers
from mecqtk.graph.pipeline import fake_quantize_graph
from mecqtk.quant.bn_spread import floor_batchnorm_spread
from mecqtk.recipe.schema import QuantConfig, Recipe


def prepare(model: nn.Module, recipe: Recipe | QuantConfig) -> fx.GraphModule:
    """Trace ``model`` and insert fake-quantizers as ``recipe`` says.

    ``model`` itself is left untouched (it can serve as the float teacher). The returned
    GraphModule trains like the original; in eval mode it computes what the exported integer
    model computes. Call :func:`mecqtk.calibrate` on a few batches before training so the step
    sizes start from the data.

    Example:
        >>> import timm
        >>> from mecqtk import prepare, load_recipe
        >>> qmodel = prepare(timm.create_model("resnet18"), load_recipe("w4a4_lsq.yaml"))
    """
    prepared = fake_quantize_graph(model, recipe)
    # a layer's weight is kept for its backward as the float32 tensor: as codes it would save
    # little memory (one weight, not a batch of activations) and cost a decoding pass per step
    for quantizer in weight_quantizers(prepared).values():
        quantizer.keeps_codes = False
    compute_deploy_form_in_eval(prepared)
    floor_batchnorm_spread(prepared)
    return prepared
