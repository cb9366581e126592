"""Recipe rules resolved for one node: the section defaults, then the matching rules in order.

Resolution order, for every field of a quantizer config (bits, quantizer, granularity, observer,
signed): the first matching rule in ``quant.rules`` that sets the field wins; a field no matching
rule sets keeps the section default (``quant.weight``, ``quant.activation``, or ``quant.residual``
for add/cat/pool). A node matched by any rule with ``skip: true`` stays in float.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass

from mecqtk.graph.meta import OpKind
from mecqtk.recipe.schema import (
    LayerMatch,
    QuantConfig,
    QuantizerConfig,
    QuantizerOverride,
)

JUNCTION_KINDS = ("add", "cat", "pool")


def name_matches(pattern: str, name: str) -> bool:
    """Glob match, or a full regex match when the pattern starts with ``re:``.

    Example:
        >>> name_matches("layer1.*", "layer1.0.conv1"), name_matches("re:.*conv\\\\d", "stem.conv1")
        (True, True)
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def rule_applies(match: LayerMatch, name: str, kind: OpKind, position: set[str]) -> bool:
    """Every condition the rule gives must hold; ``position`` is empty for non-layer nodes."""
    if match.name is not None and not name_matches(match.name, name):
        return False
    if match.op and kind not in match.op:
        return False
    return match.position == "any" or match.position in position


def merge(base: QuantizerConfig, overrides: list[QuantizerOverride]) -> QuantizerConfig:
    """Each field takes its value from the first override that sets it, else from ``base``."""
    values = {}
    for f in dataclasses.fields(QuantizerConfig):
        chosen = next(
            (getattr(o, f.name) for o in overrides if getattr(o, f.name) is not None), None
        )
        values[f.name] = getattr(base, f.name) if chosen is None else chosen
    return QuantizerConfig(**values)


@dataclass(frozen=True)
class Resolution:
    """The recipe's answer for one node: skip (with the reason), or the configs to build from."""

    weight: QuantizerConfig | None = None
    activation: QuantizerConfig | None = None
    skipped: str | None = None


def resolve(config: QuantConfig, name: str, kind: OpKind, position: set[str]) -> Resolution:
    """What ``quant`` says for the node ``name`` of ``kind`` at ``position`` (first/last layer)."""
    indexed = [(i, r) for i, r in enumerate(config.rules)
               if rule_applies(r.match, name, kind, position)]
    skip = next((i for i, r in indexed if r.skip), None)
    if skip is not None:
        return Resolution(skipped=f"recipe rule quant.rules[{skip}] skips it")
    base = config.residual.as_quantizer() if kind in JUNCTION_KINDS else config.activation
    activation = merge(base, [r.activation for _, r in indexed])
    weight = None
    if kind in ("conv", "linear"):
        weight = merge(config.weight, [r.weight for _, r in indexed])
    return Resolution(weight=weight, activation=activation)
