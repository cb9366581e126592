"""The policy pass: decide, from the recipe, what every quantizable node gets. Mutates nothing but
node metadata; :mod:`mecqtk.graph.insert` then carries the decisions out mechanically."""

from __future__ import annotations

import dataclasses
import fnmatch
import re

import torch.fx as fx
from torch import nn

from mecqtk.graph.meta import NodeQuant, OpKind, set_quant
from mecqtk.graph.signedness import nonnegative_values
from mecqtk.quant.modules import QuantizedLayer, is_quantizable_layer
from mecqtk.quant.spec import QuantSpec
from mecqtk.recipe.schema import LayerMatch, QuantConfig, QuantizerConfig, QuantizerOverride


def layer_kind(module: nn.Module) -> OpKind:
    return "linear" if isinstance(module, nn.Linear) else "conv"


def name_matches(pattern: str, name: str) -> bool:
    """Glob match, or a full regex match when the pattern starts with ``re:``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _rule_applies(match: LayerMatch, name: str, kind: OpKind, position: set[str]) -> bool:
    if match.name is not None and not name_matches(match.name, name):
        return False
    if match.op and kind not in match.op:
        return False
    return match.position == "any" or match.position in position


def _apply(base: QuantizerConfig, overrides: list[QuantizerOverride]) -> QuantizerConfig:
    """Each field takes its value from the first override that sets it, else from ``base``."""
    values = {}
    for f in dataclasses.fields(QuantizerConfig):
        chosen = next((getattr(o, f.name) for o in overrides if getattr(o, f.name) is not None),
                      None)
        values[f.name] = getattr(base, f.name) if chosen is None else chosen
    return QuantizerConfig(**values)


def _spec(config: QuantizerConfig, signed: bool) -> QuantSpec:
    return QuantSpec(
        bits=config.bits,
        signed=signed,
        quantizer=config.quantizer,
        granularity=config.granularity,
        observer=config.observer,
        learn_step=config.learn_step,
    )


def _signed(config: QuantizerConfig, provably_nonnegative: bool) -> bool:
    if config.signed == "auto":
        return not provably_nonnegative
    return config.signed == "signed"


def resolve_layer(
    config: QuantConfig, name: str, kind: OpKind, position: set[str], input_nonnegative: bool
) -> NodeQuant:
    """The decision for one layer: recipe defaults, overridden by the matching rules in order."""
    matching = [r for r in config.rules if _rule_applies(r.match, name, kind, position)]
    skip_rule = next((i for i, r in enumerate(matching) if r.skip), None)
    if skip_rule is not None:
        return NodeQuant(kind=kind, module_name=name, skipped=f"recipe rule skips {name}")
    weight = _apply(config.weight, [r.weight for r in matching])
    activation = _apply(config.activation, [r.activation for r in matching])
    return NodeQuant(
        kind=kind,
        module_name=name,
        weight=_spec(weight, signed=True),
        inputs=(_spec(activation, _signed(activation, input_nonnegative)),),
    )


def quantizable_layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    modules = dict(gm.named_modules())
    return [
        n for n in gm.graph.nodes
        if n.op == "call_module"
        and (is_quantizable_layer(modules[n.target]) or isinstance(modules[n.target], QuantizedLayer))
    ]


def annotate(gm: fx.GraphModule, config: QuantConfig) -> fx.GraphModule:
    """Record a :class:`NodeQuant` on every Conv/Linear node of ``gm``."""
    modules = dict(gm.named_modules())
    nodes = quantizable_layer_nodes(gm)
    nonneg = nonnegative_values(gm)
    for index, node in enumerate(nodes):
        position = set()
        if index == 0:
            position.add("first")
        if index == len(nodes) - 1:
            position.add("last")
        source = node.args[0]
        input_nonneg = isinstance(source, fx.Node) and source.name in nonneg
        decision = resolve_layer(
            config, str(node.target), layer_kind(modules[node.target]), position, input_nonneg
        )
        set_quant(node, decision)
    return gm
