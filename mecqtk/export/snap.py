"""Conversion step: put every bias the export stores as int32 on that int32 grid, in the model.

An integer convolution adds its bias in accumulator units ``s_x * s_w`` (per channel), so the
exported bias is the trained one rounded to that grid. The difference is tiny, but a quantized
network amplifies it: at 4 and 2 bits a rounding error of half an accumulator unit flips an
activation code now and then, and flipped codes spread through residual connections until a few
percent of predictions change. Snapping the model's own bias (BatchNorm's shift, or the layer's
bias) to the grid before the final evaluation makes the PyTorch model compute what the exported
file computes; its accuracy is then measured on exactly the deployed arithmetic.

Snapping is idempotent and changes each bias by at most half an accumulator unit. Run it after
training, once the step sizes and BatchNorm statistics are final.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from mecqtk.export.qparams import weight_codes, weight_params
from mecqtk.export.weights import (
    BatchNormFold,
    code_shift,
    fold_layer,
    foldable_batchnorm,
    layer_terms,
)
from mecqtk.graph.introspect import feeding_quantizer, graph_modules, qualified
from mecqtk.quant.modules import QuantizedLayer
from mecqtk.quant.quantizers import FakeQuantizer, Mode


@dataclass(frozen=True)
class BiasGrid:
    """One layer's int32 bias grid: where the bias lives and what it should be."""

    layer: str
    owner: nn.Module  # the BatchNorm whose shift is folded in, or the layer itself
    owner_kind: str  # "batchnorm" or "layer"
    target: np.ndarray  # float64 folded bias on the int32 grid
    current: np.ndarray  # float64 folded bias now
    unit: np.ndarray  # float64 accumulator unit per channel
    offset: np.ndarray  # folded bias minus the owner's bias parameter

    @property
    def off_grid_units(self) -> float:
        """Largest distance of the current bias from its grid, in accumulator units."""
        return float(np.max(np.abs(self.current - self.target) / np.abs(self.unit)))


def input_quantizer(node: fx.Node, modules: dict[str, nn.Module]) -> FakeQuantizer | None:
    """The activation quantizer feeding ``node`` (see
    :func:`~mecqtk.graph.introspect.feeding_quantizer`) when it defines an integer grid:
    quantizing, per tensor, with a step size set."""
    found = feeding_quantizer(node, modules)
    if found is None:
        return None
    module = found[1]
    ready = module.mode is Mode.QUANTIZE and module.axis is None
    return module if ready and bool(module.initialized) else None


@torch.no_grad()
def bias_grids(gm: fx.GraphModule) -> list[BiasGrid]:
    """The int32 bias grid of every quantized layer whose input is quantized per tensor, in the
    top graph and in every nested (leaf-interior) graph, as :func:`~mecqtk.export.convert.convert`
    folds them."""
    grids = []
    for prefix, graph_module in graph_modules(gm):
        grids.extend(_graph_bias_grids(graph_module, prefix))
    return grids


def _graph_bias_grids(gm: fx.GraphModule, prefix: str) -> list[BiasGrid]:
    modules = dict(gm.named_modules())
    grids = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[str(node.target)], QuantizedLayer):
            continue
        layer = modules[str(node.target)]
        quantizer = input_quantizer(node, modules)
        if quantizer is None:
            continue
        where = qualified(prefix, node.name)
        params = weight_params(layer.weight_quantizer, where)
        terms = layer_terms(layer, where)
        codes = weight_codes(layer.weight_quantizer, terms.weight)
        owner = terms.bias_owner
        bn = None
        if not terms.folded_in_training:
            bn_node = foldable_batchnorm(node, modules, codes.shape[0])
            if bn_node is not None:
                owner = modules[str(bn_node.target)]
                bn = BatchNormFold.from_module(qualified(prefix, bn_node.name), owner)
        folded = fold_layer(codes, params.scale, params.zero_point, terms.bias, bn,
                            float(quantizer.step_size().item()), where,
                            shift=code_shift(params.grid.bits))
        if (folded.bias_codes is None or folded.bias_scale is None or folded.bias is None
                or owner is None or getattr(owner, "bias", None) is None):
            continue
        target = folded.bias_codes.astype(np.float64) * folded.bias_scale.astype(np.float64)
        own = owner.bias.detach().double().cpu().numpy()
        kind = "layer" if owner is layer.layer else "batchnorm"
        grids.append(BiasGrid(where, owner, kind, target, folded.bias,
                              folded.bias_scale.astype(np.float64), folded.bias - own))
    return grids


@torch.no_grad()
def snap_biases(gm: fx.GraphModule) -> int:
    """Move each bias the export will round to int32 onto that grid; returns how many layers.

    Example:
        >>> snap_biases(qmodel.eval())  # after training, before the final evaluation
        20
    """
    grids = bias_grids(gm)
    for grid in grids:
        parameter = grid.owner.bias
        value = torch.from_numpy(grid.target - grid.offset)
        parameter.copy_(value.to(dtype=parameter.dtype, device=parameter.device))
    return len(grids)
