"""In eval mode a quantized layer computes exactly what its deploy form (and so the file) computes.

During training a quantized Conv/Linear and the BatchNorm after it compute ``bn(conv(x, w_q))``.
The deploy form (:func:`~mecqtk.export.convert.convert`) folds the BatchNorm into the weight
scales and the int32 bias: ``conv(x, w_q * g) + b``. The two differ by float rounding only, but a
4-bit network amplifies a rounding at a code boundary: one flipped code in 4 million spread to
1-2 % of the top-1 decisions of calibrated efficientnet_b0, densenet121 and dla34, so a model
and its own file could not be shown to agree.

:func:`compute_deploy_form_in_eval` (run by :func:`mecqtk.prepare`) gives every quantized layer
(of every graph, and every eager layer leaf code calls) an eval form: in eval mode, once its
quantizers quantize, the layer computes with its
:class:`~mecqtk.export.convert.DeployLayer` (built by the convert stage's own code, cached until a
parameter, statistic or step changes) and the BatchNorm it absorbs passes its input through (its
activation, for timm's BatchNormAct2d, still applies). Training is untouched. The accuracy a run
reports is then that of the arithmetic it deploys, and the convert stage is exact by construction.
Per-layer error measurements that compare a layer's output with its float twin switch it off
with :func:`float_layer_outputs`.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.fx as fx
from torch import nn

from mecqtk.export.convert import DeployLayer, _batchnorm_tail, _deploy_layer
from mecqtk.export.float64_norms import norms_in_float64
from mecqtk.export.integer_kernels import IntegerAdd, IntegerRegrid, IntegerSpatialMean, quantizes
from mecqtk.graph.introspect import (
    batchnorm_user,
    feeding_quantizer,
    graph_modules,
    grid_quantizer,
    is_relu,
    qualified,
    requantizing_quantizer,
)
from mecqtk.graph.ops import ADD_FUNCTIONS, image_mean_dims
from mecqtk.quant.modules import QuantizedLayer
from mecqtk.quant.quantizers import FakeQuantizer

Tensor = torch.Tensor


class DeployForm:
    """The eval form of one quantized layer: its deploy layer, rebuilt when its inputs change."""

    def __init__(self, layer: QuantizedLayer, where: str, batchnorm: nn.Module | None,
                 batchnorm_name: str | None, input_quantizer: FakeQuantizer | None,
                 output: tuple[FakeQuantizer, bool] | None = None) -> None:
        self.layer = layer
        self.where = where
        self.batchnorm = batchnorm
        self.batchnorm_name = batchnorm_name
        self.input_quantizer = input_quantizer
        self.output = output  # the quantizer reading the output directly (see convert)
        self.enabled = True
        self._key: tuple | None = None
        self._deploy: DeployLayer | None = None

    def active(self) -> bool:
        """Whether this forward uses the deploy form: eval mode, quantizers quantizing."""
        if not self.enabled or self.layer.training or not quantizes(self.layer.weight_quantizer):
            return False
        return self.batchnorm is None or not self.batchnorm.training

    def _input_step(self) -> float | None:
        quantizer = self.input_quantizer
        if quantizes(quantizer) and quantizer is not None and quantizer.axis is None:
            return float(quantizer.step_size().item())
        return None

    def _state_key(self) -> tuple:
        output = None if self.output is None else self.output[0]
        quantizers = [q for q in (self.input_quantizer, output) if q is not None]
        modules = [self.layer, *quantizers] + ([self.batchnorm] if self.batchnorm else [])
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        modes = tuple((q.mode, bool(q.initialized)) for q in quantizers)
        return (modes, *((id(t), t._version) for t in tensors))

    @torch.no_grad()
    def deploy_layer(self) -> DeployLayer:
        key = self._state_key()
        if self._deploy is None or key != self._key:
            deploy = _deploy_layer(self.layer, self.where, self.batchnorm, self._input_step(),
                                   self.batchnorm_name, self.output)
            self._deploy = deploy.to(self.layer.weight_quantizer.scale.device)
            self._key = key
        return self._deploy

    def __deepcopy__(self, memo: dict) -> DeployForm:
        # the convert stage deep-copies the model: the cached deploy layer (a copy of every
        # weight) is rebuilt on demand, not copied
        copied = DeployForm.__new__(DeployForm)
        memo[id(self)] = copied
        for key, value in vars(self).items():
            setattr(copied, key, None if key in ("_key", "_deploy") else copy.deepcopy(value, memo))
        return copied

    def __call__(self, x: Tensor) -> Tensor:
        return self.deploy_layer()(x)  # an eager layer's deploy form quantizes x itself


class _AbsorbedBatchNorm:
    """Forward hook of a BatchNorm its layer's deploy form has absorbed: while that form is
    active the BatchNorm's output is its input (through its activation tail, if any)."""

    def __init__(self, form: DeployForm) -> None:
        self.form = form
        self.tail = _batchnorm_tail(form.batchnorm) if form.batchnorm is not None else None

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if not self.form.active():
            return None
        return args[0] if self.tail is None else self.tail(args[0])


def _module_calls(graph: fx.Graph) -> Counter:
    return Counter(str(n.target) for n in graph.nodes if n.op == "call_module")


def _replace_by_module(graph_module: fx.GraphModule, node: fx.Node, name: str,
                       module: nn.Module, args: tuple) -> fx.Node:
    """Put ``module`` (as submodule ``name``, called on ``args``) in place of ``node``, keeping
    its annotation (the quantized op it was)."""
    graph_module.add_submodule(name, module)
    with graph_module.graph.inserting_before(node):
        new = graph_module.graph.call_module(name, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph_module.graph.erase_node(node)
    return new


def _integer_means(graph_module: fx.GraphModule, modules: dict[str, nn.Module]) -> int:
    """Each spatial mean between two per-tensor quantizers becomes an
    :class:`~mecqtk.export.integer_kernels.IntegerSpatialMean` (the same float mean in
    training); returns how many."""
    replaced = 0
    for node in list(graph_module.graph.nodes):
        dims = image_mean_dims(node)
        found = feeding_quantizer(node, modules) if dims is not None else None
        if dims is None or found is None or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        target = modules.get(str(user.target)) if user.op == "call_module" else None
        if not isinstance(target, FakeQuantizer):
            continue
        _replace_by_module(graph_module, node, f"integer_{node.name}",
                           IntegerSpatialMean(dims, found[1], target), (node.args[0],))
        replaced += 1
    if replaced:
        graph_module.recompile()
    return replaced


def _quantizer_call(node: object, modules: dict[str, nn.Module]) -> FakeQuantizer | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, FakeQuantizer):
            return module
    return None


def _integer_adds(graph_module: fx.GraphModule, modules: dict[str, nn.Module]) -> int:
    """Each add of two quantized values whose only reader is a quantizer (directly, or through
    one ReLU that the quantizer's unsigned grid makes redundant) becomes an
    :class:`~mecqtk.export.integer_kernels.IntegerAdd`; returns how many."""
    replaced = 0
    for node in list(graph_module.graph.nodes):
        if (node.op != "call_function" or node.target not in ADD_FUNCTIONS or node.kwargs
                or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args)
                or len(node.users) != 1):
            continue
        # the convert stage requantizes a chain of slices, pads or max pools on its input's grid,
        # so the file dequantizes each operand right before the add
        found = [grid_quantizer(arg, modules, through_selections=True) for arg in node.args]
        sources = [None if f is None else f[1] for f in found]
        reader = next(iter(node.users))
        relu = is_relu(reader, modules) and len(reader.users) == 1
        target = _quantizer_call(next(iter(reader.users)) if relu else reader, modules)
        if sources[0] is None or sources[1] is None or target is None:
            continue
        name = f"integer_{node.name}"
        add = _replace_by_module(graph_module, node, name,
                                 IntegerAdd(sources[0], sources[1], target, relu),
                                 tuple(node.args))
        # the module path the file's Add is traced under, so the export finds it by its maker
        add.meta["nn_module_stack"] = {**(add.meta.get("nn_module_stack") or {}),
                                       name: (name, IntegerAdd)}
        replaced += 1
    if replaced:
        graph_module.recompile()
    return replaced


def _integer_regrids(graph_module: fx.GraphModule, modules: dict[str, nn.Module],
                     prefix: str) -> int:
    """Each quantizer reading another quantizer's output directly gets an
    :class:`~mecqtk.export.integer_kernels.IntegerRegrid` in front; returns how many."""
    added = 0
    for node in list(graph_module.graph.nodes):
        target = _quantizer_call(node, modules)
        source = _quantizer_call(node.args[0], modules) if target is not None else None
        if source is None or source is target:
            continue
        name = f"integer_regrid_{node.name}"
        graph_module.add_submodule(
            name, IntegerRegrid(source, target, qualified(prefix, str(node.target))))
        with graph_module.graph.inserting_before(node):
            regrid = graph_module.graph.call_module(name, (node.args[0],))
        node.replace_input_with(node.args[0], regrid)
        added += 1
    if added:
        graph_module.recompile()
    return added


def compute_deploy_form_in_eval(gm: fx.GraphModule) -> int:
    """Give every quantized layer of ``gm``'s graphs its eval form, and every normalisation
    its float64 eval form (:mod:`~mecqtk.export.float64_norms`); returns how many.

    Example:
        >>> compute_deploy_form_in_eval(qmodel)  # done by mecqtk.prepare
        20
    """
    installed = 0
    for prefix, graph_module in graph_modules(gm):
        modules = dict(graph_module.named_modules())
        calls = _module_calls(graph_module.graph)
        for node in graph_module.graph.nodes:
            module = modules.get(str(node.target)) if node.op == "call_module" else None
            if (not isinstance(module, QuantizedLayer) or module.input_quantizer is not None
                    or calls[str(node.target)] != 1):
                continue
            bn_node = None
            if not callable(getattr(module, "folded_bias", None)):
                channels = getattr(module.layer, "out_channels",
                                   getattr(module.layer, "out_features", None))
                # the convert stage folds this BatchNorm when it is in eval mode (active())
                bn_node = batchnorm_user(node, modules, channels) if channels else None
                if bn_node is not None and calls[str(bn_node.target)] != 1:
                    bn_node = None
            bn = None if bn_node is None else modules[str(bn_node.target)]
            found = feeding_quantizer(node, modules)
            form = DeployForm(module, qualified(prefix, str(node.target)), bn,
                              None if bn_node is None else bn_node.name,
                              None if found is None else found[1],
                              requantizing_quantizer(node, modules, bn_node))
            module.deploy_form = form
            if bn is not None:
                bn.register_forward_hook(_AbsorbedBatchNorm(form))
            installed += 1
        installed += _integer_means(graph_module, modules)
        installed += _integer_adds(graph_module, modules)
        installed += _integer_regrids(graph_module, modules, prefix)
    # eager layers (called by leaf code): their own input quantizer, no BatchNorm folded, as
    # the convert stage builds them
    for name, module in gm.named_modules():
        if isinstance(module, QuantizedLayer) and module.input_quantizer is not None:
            module.deploy_form = DeployForm(module, name, None, None, module.input_quantizer)
            installed += 1
    return installed + norms_in_float64(gm)


@contextmanager
def float_layer_outputs(model: nn.Module) -> Iterator[None]:
    """Within this block every quantized layer computes its training-time form in eval mode too
    (its own output, the BatchNorm after it separate), so per-layer measurements can compare a
    layer's output with its float twin's."""
    forms = [f for m in model.modules() if isinstance(f := getattr(m, "deploy_form", None),
                                                        DeployForm)]
    previous = [f.enabled for f in forms]
    for form in forms:
        form.enabled = False
    try:
        yield
    finally:
        for form, enabled in zip(forms, previous, strict=True):
            form.enabled = enabled
