"""Typed node metadata: the single place where the annotate pass records its decisions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch.fx as fx

from mecqtk.quant.spec import QuantSpec
from mecqtk.recipe.schema import OpKind as RuleOpKind

META_KEY = "mecqtk"

# The op kinds of the recipe's rules, and "select": identity, slicing, zero padding ahead of a
# junction (see ops.selects_values), which no rule names.
OpKind = Literal[RuleOpKind, "select"]


# What kind of record a node gets: a layer (a weight, or two activation operands, multiplied) or
# a junction (values combined, pooled or selected, and stored again on a grid).
LayerOpKind = Literal["conv", "linear", "matmul"]
JunctionOpKind = Literal["add", "cat", "pool", "select"]
LAYER_RECORD_KINDS: tuple[LayerOpKind, ...] = get_args(LayerOpKind)


@dataclass(frozen=True)
class NodeQuant:
    """What one graph node gets: the fields every decision has. A node carries one of the two
    records below, never this base: :class:`LayerQuant` (conv/linear/matmul: weight and input
    quantizers) or :class:`JunctionQuant` (add/cat/pool/select: input and output quantizers).

    The annotate pass writes a record on every node it decides about; the insert pass builds
    exactly what it says and nothing else.

    ``inputs[i]`` refers to ``mecqtk.graph.ops.node_arguments(node)[i]``: the node's graph-value
    arguments, ``args`` then ``kwargs``, lists flattened (so for ``cat([a, b], 1)`` index 0 is
    ``a``); None means that argument is left as is. After insertion that argument is the output
    of a ``call_module`` node of a :class:`~mecqtk.quant.quantizers.FakeQuantizer` named
    ``aq_<source node>``, shared by every consumer asking for the same spec on the same value.

    An operand is *already quantized* when it is the ``output`` quantizer of another annotated node
    (a quantized add feeding the next add). A max pool of a quantized tensor is on that tensor's
    grid, so a consumer asking for a grid of the same bits and sign gets None there too.
    When one value is asked for on several grids, insert realises them as one stored tensor:
    equal (bits, sign) share a quantizer, and a narrower grid requantizes the widest one's output
    (see ``mecqtk.graph.insert``). Activation specs are signed unless the value is provably
    non-negative (:mod:`mecqtk.graph.signedness`) or the recipe fixes the sign. Every spec here is
    per-tensor except weights.

    ``module_name`` is, for conv/linear, the qualified name of the layer inside the GraphModule
    that holds the node (``gm.get_submodule(module_name)``); for the other kinds it is
    ``<scope>.<node name>``, the scope being the module whose forward runs the op
    (``layer1.0.add``), which is what recipe rules match. ``skipped`` holds the reason when a
    quantizable node is deliberately left in float; nothing is inserted for it.
    """

    kind: OpKind
    module_name: str
    inputs: tuple[QuantSpec | None, ...] = ()
    skipped: str | None = None

    @property
    def quantized(self) -> bool:
        return self.skipped is None


@dataclass(frozen=True)
class LayerQuant(NodeQuant):
    """A layer: its weight and its inputs are quantized, its output stays float until a consumer
    quantizes it. Specs come from the recipe's ``quant.weight`` (weights) and ``quant.activation``
    (inputs); ``quant.rules`` override either.

    - ``conv`` / ``linear``: a ``call_module`` node of an ``nn.Conv1d/2d/3d`` (any subclass, e.g.
      timm's Conv2dSame or StdConv2d; depthwise and grouped included) or ``nn.Linear``.
      ``weight`` quantizes the weight the layer really convolves with (for weight-standardised
      convs the standardised weight), per output channel (axis 0) when per-channel.
      ``inputs[0]`` quantizes the layer's input.
    - ``matmul``: ``a @ b``, ``torch.matmul``, ``torch.bmm``, ``Tensor.matmul/bmm`` (attention
      ``q @ k.T`` and ``attn @ v``; ``F.scaled_dot_product_attention`` is decomposed into these
      before annotation). ``inputs[0]`` and ``inputs[1]`` quantize both operands; ``weight`` is
      None (both operands are activations).

    A conv/linear node may also be a ``call_function`` of ``F.linear``/``F.conv*d`` whose weight
    argument is a layer's own parameter (``F.linear(x, self.qkv.weight, qkv_bias)`` in BEiT/EVA).
    ``module_name`` then names that layer, ``weight_input`` is the weight's index in
    ``node_arguments(node)``, and the insert pass puts a per-channel weight quantizer module named
    ``wq_<layer>`` between the parameter and the call (the layer module itself is not swapped).

    ``bn`` (conv/linear only, with ``quant.batchnorm.fold``) names the BatchNorm module, in the
    same GraphModule, whose node is the layer's only user: the insert pass replaces the layer by
    a :class:`~mecqtk.quant.bn_fold.FoldedBNLayer` holding that BN and removes the BN node (its
    users read the layer's output); ``weight`` then quantizes the folded weight.
    """

    kind: LayerOpKind
    weight: QuantSpec | None = None
    bn: str | None = None
    weight_input: int | None = None


@dataclass(frozen=True)
class JunctionQuant(NodeQuant):
    """A junction: values combined, pooled or selected. Specs come from the recipe's
    ``quant.residual`` section (8-bit by default); ``quant.rules`` override it. ``output`` is
    wired between the node and all its users.

    - ``add``: tensor + tensor (``operator.add``/``iadd``, ``torch.add``, ``Tensor.add/add_``);
      adding a Python number is not an ``add`` here. ``inputs[i]`` quantizes operand ``i`` unless
      it is already quantized (None then); ``output`` quantizes the sum, unless the sum's only
      user is a ReLU whose every consumer quantizes it (None then: see the annotate pass).
    - ``cat``: ``torch.cat``/``concat``. ``inputs[i]`` quantizes the ``i``-th concatenated piece
      unless already quantized; ``output`` quantizes the result.
    - ``pool``: max/avg/adaptive pooling (modules and functions) and the global mean over the
      spatial dims. ``inputs[0]`` quantizes the pooled tensor unless already quantized.
    - ``select``: identity, slicing or zero padding ahead of a junction (no rule names it):
      ``inputs[0]`` stores the value once, on the junction's grid.
    """

    kind: JunctionOpKind
    output: QuantSpec | None = None


def skipped_quant(kind: OpKind, module_name: str, reason: str) -> NodeQuant:
    """The record of a node deliberately left in float, of the class its kind takes."""
    record = LayerQuant if kind in LAYER_RECORD_KINDS else JunctionQuant
    return record(kind=kind, module_name=module_name, skipped=reason)  # type: ignore[arg-type]


@dataclass
class GraphInfo:
    """What the passes record about a whole GraphModule, under ``gm.meta["mecqtk"]``.

    ``auto_leaves``: module classes the tracer kept whole because tracing failed inside them.
    ``eager_layers``: decisions for Conv/Linear layers that run inside a leaf module's own
    (untraced) forward, by qualified name relative to ``gm``; the insert pass gives each a
    :class:`~mecqtk.quant.modules.QuantizedLayer` with an input quantizer.
    """

    auto_leaves: tuple[str, ...] = ()
    eager_layers: dict[str, LayerQuant] = field(default_factory=dict)


def graph_info(gm: fx.GraphModule) -> GraphInfo:
    """The GraphModule's record, created empty on first use."""
    info = gm.meta.get(META_KEY)
    if info is None:
        info = gm.meta[META_KEY] = GraphInfo()
    return info


def get_quant(node: fx.Node) -> NodeQuant | None:
    return node.meta.get(META_KEY)


def set_quant(node: fx.Node, quant: NodeQuant) -> None:
    node.meta[META_KEY] = quant


def annotated_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, NodeQuant]]:
    """Annotated nodes in graph (topological) order."""
    return [(n, q) for n in gm.graph.nodes if (q := get_quant(n)) is not None]
