"""The policy pass: decide, from the recipe, what every quantizable node gets. Mutates nothing but
node metadata; :mod:`mecqtk.graph.insert` then carries the decisions out mechanically.

The semantics of each decision are documented on its record, :class:`~mecqtk.graph.meta.LayerQuant`
(conv, linear, matmul) or :class:`~mecqtk.graph.meta.JunctionQuant` (add, cat, pool, select).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from mecqtk.graph.introspect import batchnorm_user, graph_modules
from mecqtk.graph.leaves import eager_layers
from mecqtk.graph.meta import (
    JunctionQuant,
    LayerQuant,
    NodeQuant,
    OpKind,
    annotated_nodes,
    get_quant,
    graph_info,
    set_quant,
    skipped_quant,
)
from mecqtk.graph.ops import (
    LAYER_KINDS,
    functional_weight,
    layer_name,
    node_arguments,
    node_kind,
    operand_nodes,
    preserves_grid,
    selects_values,
)
from mecqtk.graph.rules import resolve
from mecqtk.graph.signedness import nonnegative_values
from mecqtk.graph.values import ValueKind, value_kinds
from mecqtk.quant.bn_fold import can_fold
from mecqtk.quant.modules import is_layer, layer_kind
from mecqtk.quant.spec import QuantSpec
from mecqtk.recipe.schema import QuantConfig, QuantizerConfig

_SOFTMAX_FUNCTIONS = {torch.softmax, F.softmax}
# Ops an attention logit passes through between its add and the softmax.
_LOGIT_PATH_METHODS = {"view", "reshape", "masked_fill", "add", "unsqueeze", "contiguous", "float"}
_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu}
_RELU_METHODS = {"relu", "relu_"}


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def spec_from(config: QuantizerConfig, nonnegative: bool, *, weight: bool = False) -> QuantSpec:
    """Resolve ``signed: auto`` against what the signedness analysis proved."""
    if weight or config.signed == "signed":
        signed = True
    elif config.signed == "unsigned":
        signed = False
    else:
        signed = not nonnegative
    return QuantSpec(bits=config.bits, signed=signed, quantizer=config.quantizer,
                     granularity=config.granularity if weight else "per_tensor",
                     observer=config.observer, learn_step=config.learn_step)


def op_name(node: fx.Node) -> str:
    """``<scope>.<node name>``: the module whose forward runs the op, then the node's name; a
    module call is named by its module."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    scope = next(reversed(stack.values()))[0] if stack else ""
    return ".".join(p for p in (scope, node.name) if p)


def layer_positions(names: list[str]) -> dict[str, set[str]]:
    """``first`` / ``last`` for the first and last layer of ``names`` (in execution order)."""
    positions: dict[str, set[str]] = {n: set() for n in names}
    if names:
        positions[names[0]].add("first")
        positions[names[-1]].add("last")
    return positions


def _qualified(prefix: str, name: str) -> str:
    return ".".join(p for p in (prefix, name) if p)


def layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if node_kind(n, modules) in LAYER_KINDS]


def _feeds_softmax(node: fx.Node, modules: dict[str, nn.Module], depth: int = 4) -> bool:
    """Whether ``node`` is an attention logit: it reaches a softmax through reshapes, masking and
    more adds only. Quantizing logits to 8 bits next to a -100 mask costs real accuracy."""
    frontier = [node]
    for _ in range(depth):
        following = []
        for value in frontier:
            for user in value.users:
                if user.op == "call_function" and user.target in _SOFTMAX_FUNCTIONS:
                    return True
                if user.op == "call_method" and user.target == "softmax":
                    return True
                if user.op == "call_module" and isinstance(modules[user.target], nn.Softmax):
                    return True
                if (user.op == "call_method" and user.target in _LOGIT_PATH_METHODS) or (
                    user.op == "call_function" and node_kind(user, modules) == "add"
                ):
                    following.append(user)
        frontier = following
    return False


class _Annotator:
    """Walks one GraphModule in topological order and records a LayerQuant or JunctionQuant on
    each decision."""

    def __init__(self, gm: fx.GraphModule, config: QuantConfig, prefix: str,
                 positions: dict[str, set[str]]) -> None:
        self.gm = gm
        self.config = config
        self.prefix = prefix
        self.positions = positions
        self.modules = dict(gm.named_modules())
        self.kinds = value_kinds(gm)
        nonneg_names = nonnegative_values(gm)
        self.nonneg = {n for n in gm.graph.nodes if n.name in nonneg_names}
        self.quantized_outputs: set[fx.Node] = set()
        # Values known to lie on an integer grid, e.g. a max pool of a quantized tensor.
        self.grids: dict[fx.Node, QuantSpec] = {}

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if selects_values(node, self.modules):
                self._select(node)
                continue
            kind = node_kind(node, self.modules)
            if kind is None:
                continue
            decision = self.decide(node, kind)
            if decision is None:
                continue
            set_quant(node, decision)
            if isinstance(decision, JunctionQuant) and decision.output is not None:
                self.quantized_outputs.add(node)
                self.grids[node] = decision.output
            if kind == "pool" and decision.quantized and preserves_grid(node, self.modules):
                source = node_arguments(node)[0]
                grid = decision.inputs[0] if decision.inputs else None
                grid = grid or self.grids.get(source)
                if grid is not None:
                    self.grids[node] = grid
        for node, decision in annotated_nodes(self.gm):
            if (isinstance(decision, JunctionQuant) and decision.output is not None
                    and self._requantized_after_relu(node)):
                set_quant(node, replace(decision, output=None))

    def _select(self, node: fx.Node) -> None:
        """Identity, slicing or zero padding (a CIFAR ResNet's shortcut): its output lies on
        its input's grid. When the input has none yet and the node leads to a residual
        junction, the input is quantized on the junction's grid here, so the value is stored
        once on the block input (shared with, and requantized for, the block's first conv)
        instead of a second time after the shortcut, and the shortcut runs on integers."""
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op == "get_attr" or not self._is_tensor(
                source):
            return
        grid = self.grids.get(source)
        if grid is None:
            config = self._junction_activation(node)
            if config is None:
                return
            grid = spec_from(config, source in self.nonneg)
            inputs = [None] * len(node_arguments(node))
            inputs[0] = grid
            set_quant(node, JunctionQuant(kind="select", module_name=op_name(node),
                                          inputs=tuple(inputs)))
        self.grids[node] = grid
        if source in self.nonneg:
            self.nonneg.add(node)

    def _junction_activation(self, node: fx.Node) -> QuantizerConfig | None:
        """The activation config of the first add/cat that ``node`` feeds through other
        value-selecting nodes, when that junction is quantized."""
        frontier, seen = list(node.users), set()
        while frontier:
            user = frontier.pop(0)
            if user in seen:
                continue
            seen.add(user)
            if selects_values(user, self.modules):
                frontier.extend(user.users)
                continue
            kind = node_kind(user, self.modules)
            if kind not in ("add", "cat"):
                continue
            residual = self.config.residual
            if not (residual.enabled and kind in residual.ops) or (
                    kind == "add" and _feeds_softmax(user, self.modules)):
                return None
            full_name = ".".join(p for p in (self.prefix, op_name(user)) if p)
            resolution = resolve(self.config, full_name, kind, set())
            return None if resolution.skipped is not None else resolution.activation
        return None

    def _requantized_after_relu(self, node: fx.Node) -> bool:
        """Whether ``node`` feeds only a ReLU whose every consumer quantizes it.

        The ReLU output is then on a grid anyway, and quantizing the sum before the ReLU as
        well only adds error; worse, in the integer graph it leaves a dequantize -> ReLU ->
        quantize pair in float between the fused QLinearAdd and the next QLinearConv, which
        costs a ResNet a fifth of its integer speed-up (onnxruntime folds a ReLU into the
        quantize that follows it, but not into a dequantize)."""
        users = list(node.users)
        if len(users) != 1 or not _is_relu(users[0], self.modules):
            return False
        relu = users[0]
        if not relu.users:
            return False
        for consumer in relu.users:
            decision = get_quant(consumer)
            if decision is None or not decision.quantized:
                return False
            arguments = node_arguments(consumer)
            specs = [spec for argument, spec in zip(arguments, decision.inputs, strict=False)
                     if argument is relu]
            if not specs or any(spec is None for spec in specs):
                return False
        return True

    def _input_spec(self, config: QuantizerConfig, source: fx.Node) -> QuantSpec | None:
        """The spec ``source`` needs, or None when it already lies on an equally fine grid of
        the same sign (a max pool of a tensor quantized like that)."""
        spec = spec_from(config, source in self.nonneg)
        grid = self.grids.get(source)
        if grid is not None and (grid.bits, grid.signed) == (spec.bits, spec.signed):
            return None
        return spec

    def _is_tensor(self, value: fx.Node) -> bool:
        return self.kinds.get(value) is ValueKind.TENSOR

    def decide(self, node: fx.Node, kind: OpKind) -> NodeQuant | None:
        arguments = node_arguments(node)
        operands = operand_nodes(node, kind)
        if not operands:
            return None
        if kind == "add" and not all(self._is_tensor(arguments[i]) for i in operands):
            return None  # not an op on tensors (x.shape[1] + 1), or operands we cannot see
        if kind in ("add", "cat") and all(arguments[i].op == "get_attr" for i in operands):
            return None  # combines parameters (BEiT's q/k/v biases), not activations
        if kind in LAYER_KINDS:
            return self._layer(node, kind, arguments, operands[0])
        residual = self.config.residual
        if kind != "matmul" and not (residual.enabled and kind in residual.ops):
            return None
        name = op_name(node)
        full_name = ".".join(p for p in (self.prefix, name) if p)
        resolution = resolve(self.config, full_name, kind, set())
        if resolution.skipped is not None:
            return skipped_quant(kind, name, resolution.skipped)
        if kind == "add" and _feeds_softmax(node, self.modules):
            return skipped_quant(kind, name, "attention logits (feeds a softmax): left in float")
        assert resolution.activation is not None
        inputs: list[QuantSpec | None] = [None] * len(arguments)
        for i in operands:
            source = arguments[i]
            if kind != "matmul" and source in self.quantized_outputs:
                continue  # already on a grid: requantizing would only add error
            inputs[i] = self._input_spec(resolution.activation, source)
        if kind == "matmul":  # both operands are activations, the product stays float
            return LayerQuant(kind=kind, module_name=name, inputs=tuple(inputs))
        output = None
        if kind in ("add", "cat"):
            output = spec_from(resolution.activation, node in self.nonneg)
        return JunctionQuant(kind=kind, module_name=name, inputs=tuple(inputs), output=output)

    def _layer(self, node: fx.Node, kind: OpKind, arguments: list[fx.Node],
               data: int) -> NodeQuant:
        module_name = layer_name(node, self.modules)
        name = _qualified(self.prefix, module_name)
        resolution = resolve(self.config, name, kind, self.positions.get(name, set()))
        if resolution.skipped is not None:
            return skipped_quant(kind, module_name, resolution.skipped)
        assert resolution.weight is not None and resolution.activation is not None
        inputs: list[QuantSpec | None] = [None] * len(arguments)
        inputs[data] = self._input_spec(resolution.activation, arguments[data])
        functional = functional_weight(node, self.modules)
        folds = self.config.batchnorm.fold and node.op == "call_module"
        return LayerQuant(
            kind=kind,
            module_name=module_name,
            weight=spec_from(resolution.weight, False, weight=True),
            inputs=tuple(inputs),
            bn=self._foldable_bn(node) if folds else None,
            weight_input=functional[1] if functional else None,
        )

    def _foldable_bn(self, node: fx.Node) -> str | None:
        """The BN this layer feeds, when it is the layer's only user and used nowhere else."""
        layer = self.modules[node.target]
        channels = getattr(layer, "out_channels", getattr(layer, "out_features", -1))
        bn_node = batchnorm_user(node, self.modules, channels)
        if bn_node is None:
            return None
        target = str(bn_node.target)
        calls = sum(1 for n in self.gm.graph.nodes if n.op == "call_module" and n.target == target)
        if calls != 1 or not can_fold(layer, self.modules[target]):
            return None
        return target


def annotate(
    gm: fx.GraphModule,
    config: QuantConfig,
    *,
    prefix: str = "",
    positions: dict[str, set[str]] | None = None,
) -> fx.GraphModule:
    """Record a :class:`~mecqtk.graph.meta.LayerQuant` or
    :class:`~mecqtk.graph.meta.JunctionQuant` on every node ``config`` quantizes or deliberately
    skips.

    Args:
        gm: a traced model (or a traced submodule of one).
        config: the recipe's ``quant`` section.
        prefix: qualified name of ``gm`` inside the whole model, for rule matching.
        positions: ``first``/``last`` per qualified layer name across the whole model; by
            default the first and last layer of ``gm``.

    Example:
        >>> gm = annotate(trace(model), load_recipe("w4a4_lsq.yaml").quant)
    """
    if positions is None:
        modules = dict(gm.named_modules())
        names = [_qualified(prefix, layer_name(n, modules)) for n in layer_nodes(gm)]
        positions = layer_positions(names)
    _Annotator(gm, config, prefix, positions).run()
    return gm


def _eager_decision(config: QuantConfig, gm: fx.GraphModule, name: str, full_name: str,
                    positions: dict[str, set[str]]) -> LayerQuant:
    """A layer run by leaf code: no graph around it, so its input's sign is unknown (signed)."""
    kind = layer_kind(gm.get_submodule(name)) or "conv"
    resolution = resolve(config, full_name, kind, positions.get(full_name, set()))
    if resolution.skipped is not None:
        return LayerQuant(kind=kind, module_name=name, skipped=resolution.skipped)
    assert resolution.weight is not None and resolution.activation is not None
    return LayerQuant(kind=kind, module_name=name,
                      weight=spec_from(resolution.weight, False, weight=True),
                      inputs=(spec_from(resolution.activation, False),))


def layer_order(gm: fx.GraphModule, prefix: str = "") -> list[str]:
    """Qualified names of all layers in (approximate) execution order: graph order, and inside a
    leaf module the order its submodules were registered in."""
    order: list[str] = []

    def walk_leaf(module: nn.Module, path: str) -> None:
        for name, child in module.named_children():
            if isinstance(child, fx.GraphModule):
                order.extend(layer_order(child, f"{path}.{name}"))
            elif is_layer(child):
                order.append(f"{path}.{name}")
            else:
                walk_leaf(child, f"{path}.{name}")

    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if functional_weight(node, modules) is not None:
            order.append(_qualified(prefix, layer_name(node, modules)))
        if node.op != "call_module":
            continue
        module = modules[node.target]
        path = _qualified(prefix, str(node.target))
        if is_layer(module):
            order.append(path)
        else:
            walk_leaf(module, path)
    return list(dict.fromkeys(order))


def annotate_model(gm: fx.GraphModule, config: QuantConfig) -> fx.GraphModule:
    """:func:`annotate` every graph of the model (the top one and those traced inside leaves),
    and decide for the eager layers of each (recorded in its :class:`GraphInfo`)."""
    positions = layer_positions(layer_order(gm))
    for prefix, sub in list(graph_modules(gm)):
        annotate(sub, config, prefix=prefix, positions=positions)
        graph_info(sub).eager_layers = {
            name: _eager_decision(config, sub, name, ".".join(p for p in (prefix, name) if p),
                                  positions)
            for name in eager_layers(sub)
        }
    return gm
