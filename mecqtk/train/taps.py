"""Feature taps: identity nodes inserted into a traced graph that keep the tensor passing through,
so a loss term can read features from any node without changing what the model computes."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from mecqtk.errors import RecipeError
from mecqtk.graph.introspect import pooled_features_node
from mecqtk.quant.quantizers import FakeQuantizer

POOLED = "pooled"
STAGES = "stages"


class FeatureTap(nn.Module):
    """Returns its input unchanged and keeps a reference to it in ``value``."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.value = x
        return x


def rows(features: torch.Tensor) -> torch.Tensor:
    """Features as one row per sample: spatial maps and token sequences are averaged."""
    if features.dim() == 2:
        return features
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    if features.dim() == 3:
        return features.mean(dim=1)
    return features.flatten(1)


def classifier_input(gm: fx.GraphModule) -> fx.Node:
    """The value feeding the last layer (the pooled penultimate features), in the quantized
    student and in the float teacher alike: :func:`~mecqtk.graph.introspect.pooled_features_node`.

    In a quantized graph that is the activation quantizer's output, so MEC sees the features the
    integer classifier will see.
    """
    node = pooled_features_node(gm)
    if node is None:
        raise RecipeError("mec.tap: no quantized layer to take 'pooled' features from")
    return node


def stage_modules(model: nn.Module) -> list[str]:
    """Module paths of ``model``'s intermediate stages: timm's ``feature_info`` without its first
    entry (the stem) and its last (the final stage, whose pooled output is the 'pooled' tap)."""
    info = getattr(model, "feature_info", None)
    modules = [entry["module"] for entry in info or () if isinstance(entry, dict)]
    if len(modules) < 3:
        raise RecipeError(
            f"mec.extra_taps: '{STAGES}' needs a model that lists its stages in timm's "
            f"feature_info ({type(model).__name__} lists {len(modules)}); name nodes instead "
            "(`mecqtk recipe explain` lists layers)"
        )
    return modules[1:-1]


def stage_output(gm: fx.GraphModule, module: str) -> fx.Node:
    """The value ``module`` (a stage) hands to the next stage: the last node traced inside it, or,
    in a quantized graph, that node's activation quantizer (the codes the next stage reads)."""
    inside = [node for node in gm.graph.nodes
              if any(path == module or path.startswith(module + ".")
                     for path, _ in (node.meta.get("nn_module_stack") or {}).values())]
    if not inside:
        raise RecipeError(f"mec.extra_taps: no traced node inside stage {module!r}")
    last = inside[-1]
    modules = dict(gm.named_modules())
    users = list(last.users)
    if len(users) == 1 and isinstance(modules.get(str(users[0].target)), FakeQuantizer):
        return users[0]
    return last


def find_node(gm: fx.GraphModule, name: str) -> fx.Node:
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    candidates = [n.name for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    raise RecipeError(
        f"mec.tap: no node named {name!r}; use 'pooled' or a node such as "
        f"{', '.join(candidates[-6:])} (`mecqtk recipe explain` lists layers)"
    )


def attach_tap(gm: fx.GraphModule, node: fx.Node) -> FeatureTap:
    """Insert a FeatureTap right after ``node``; every former user of ``node`` reads the tap."""
    tap = FeatureTap()
    name = f"feature_tap_{node.name}"
    gm.add_submodule(name, tap)
    with gm.graph.inserting_after(node):
        tap_node = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(tap_node, delete_user_cb=lambda user: user is not tap_node)
    gm.graph.lint()
    gm.recompile()
    return tap
