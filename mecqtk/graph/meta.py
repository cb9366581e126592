"""Typed node metadata: the single place where the annotate pass records its decisions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.fx as fx

from mecqtk.quant.spec import QuantSpec

META_KEY = "mecqtk"

OpKind = Literal["conv", "linear", "matmul", "add", "cat", "pool"]


@dataclass(frozen=True)
class NodeQuant:
    """What one graph node gets: a weight quantizer, quantizers on its inputs, one on its output.

    ``inputs[i]`` is the spec for the node's i-th tensor argument (None: left as is). ``skipped``
    holds the reason when a quantizable node is deliberately left in float.
    """

    kind: OpKind
    module_name: str
    weight: QuantSpec | None = None
    inputs: tuple[QuantSpec | None, ...] = ()
    output: QuantSpec | None = None
    skipped: str | None = None

    @property
    def quantized(self) -> bool:
        return self.skipped is None


def get_quant(node: fx.Node) -> NodeQuant | None:
    return node.meta.get(META_KEY)


def set_quant(node: fx.Node, quant: NodeQuant) -> None:
    node.meta[META_KEY] = quant


def annotated_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, NodeQuant]]:
    """Annotated nodes in graph (topological) order."""
    return [(n, q) for n in gm.graph.nodes if (q := get_quant(n)) is not None]
