"""Which graph values are provably non-negative, so their quantizer can use an unsigned grid.

An unsigned grid doubles the resolution of a post-ReLU activation, which matters most at 2 bits.
The analysis is conservative: anything not shown non-negative is treated as signed.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
_NONNEG_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.softmax,
    F.softmax, torch.abs, torch.exp,
}
_NONNEG_METHODS = {"relu", "relu_", "sigmoid", "softmax", "abs", "exp"}
# Ops whose output is non-negative whenever their (first) tensor input is.
_PRESERVING_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout,
    nn.Identity, nn.Upsample,
)
_PRESERVING_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten,
    F.dropout, F.interpolate, torch.reshape, F.pad,
}
_PRESERVING_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "mean", "max",
    "squeeze", "unsqueeze", "expand", "clone",
}
# Ops whose output is non-negative when all tensor inputs are.
_ALL_INPUTS_FUNCTIONS = {operator.add, torch.add, torch.cat, operator.mul, torch.mul}
_ALL_INPUTS_METHODS = {"add", "mul"}


def _ends_nonnegative(module: nn.Module) -> bool:
    """A timm norm-act layer (BatchNormAct2d, GroupNormAct, ...) whose activation, applied
    last, is non-negative: its output is."""
    from timm.layers import norm_act

    return isinstance(module, norm_act.BatchNormAct2d | norm_act.GroupNormAct
                      | norm_act.GroupNorm1Act | norm_act.LayerNormAct
                      | norm_act.LayerNormAct2d) and isinstance(
        getattr(module, "act", None), _NONNEG_MODULES)


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def _constants_nonnegative(node: fx.Node) -> bool:
    """True when every numeric constant argument (x + 0.5, x * 2) is >= 0."""
    constants = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, int | float)]
    return all(c >= 0 for c in constants)


def nonnegative_values(gm: fx.GraphModule) -> set[str]:
    """Names of the nodes whose output is >= 0 for every input."""
    modules = dict(gm.named_modules())
    nonneg: set[str] = set()
    for node in gm.graph.nodes:
        inputs = _tensor_inputs(node)
        first_ok = bool(inputs) and inputs[0].name in nonneg
        all_ok = (
            bool(inputs) and all(i.name in nonneg for i in inputs) and _constants_nonnegative(node)
        )
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, _NONNEG_MODULES) or _ends_nonnegative(module) or (
                isinstance(module, _PRESERVING_MODULES) and first_ok
            ):
                nonneg.add(node.name)
        elif node.op == "call_function":
            if node.target in _NONNEG_FUNCTIONS or (
                node.target in _PRESERVING_FUNCTIONS and first_ok
            ) or (node.target in _ALL_INPUTS_FUNCTIONS and all_ok) or (
                node.target is operator.getitem and first_ok
            ):
                nonneg.add(node.name)
        elif node.op == "call_method" and (
            node.target in _NONNEG_METHODS
            or (node.target in _PRESERVING_METHODS and first_ok)
            or (node.target in _ALL_INPUTS_METHODS and all_ok)
        ):
            nonneg.add(node.name)
    return nonneg
