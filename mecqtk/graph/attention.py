"""Make attention quantizable: its two products must be visible matmuls, not one fused kernel.

Two steps, both exact up to float rounding order:

1. :func:`unfuse_timm_attention` (before tracing) turns off timm's ``fused_attn`` flag on every
   module of the model copy. timm reads the flag when a module is built, so the environment
   variable ``TIMM_FUSED_ATTN`` and ``timm.layers.set_fused_attn`` come too late for a model that
   already exists; the per-module attribute does not. timm's non-fused path computes the same
   function as ``q @ k.T * scale -> softmax -> dropout -> @ v`` with the model's own masks/biases.
2. :func:`decompose_sdpa` (a graph pass) rewrites every remaining
   ``F.scaled_dot_product_attention`` call, from any model, into the same explicit sequence:
   two matmul nodes the annotate pass can quantize like any other.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_SDPA_PARAMS = list(inspect.signature(
    lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
    enable_gqa=False: None
).parameters)


def unfuse_timm_attention(model: nn.Module) -> int:
    """Switch every timm attention module of ``model`` to its explicit (non-fused) path.

    Returns the number of modules switched.

    Example:
        >>> unfuse_timm_attention(timm.create_model("vit_tiny_patch16_224"))
        12
    """
    switched = 0
    for module in model.modules():
        if getattr(module, "fused_attn", None) is True:
            module.fused_attn = False
            switched += 1
    return switched


@torch.fx.wrap
def _causal_mask(logits: torch.Tensor) -> torch.Tensor:
    rows, cols = logits.shape[-2:]
    keep = torch.ones(rows, cols, dtype=torch.bool, device=logits.device).tril(diagonal=0)
    return logits.masked_fill(~keep, float("-inf"))


@torch.fx.wrap
def _apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA's mask semantics: a bool mask keeps True entries, a float mask is added."""
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask


def _attention_function(
    has_mask: bool, scale_is_node: bool, scale: float | None, is_causal: bool, gqa: bool
) -> Callable[..., torch.Tensor]:
    """The explicit attention for one call site, specialised on its Python-valued arguments."""

    def attention(query, key, value, mask, step):
        if step is None:
            step = query.size(-1) ** -0.5 if scale is None else scale
        if gqa:
            repeats = query.size(-3) // key.size(-3)
            key = key.repeat_interleave(repeats, -3)
            value = value.repeat_interleave(repeats, -3)
        logits = (query @ key.transpose(-2, -1)) * step
        if is_causal:
            logits = _causal_mask(logits)
        if mask is not None:
            logits = _apply_mask(logits, mask)
        return logits.softmax(-1) @ value  # dropout is inserted as a module, see below

    # fx traces every parameter as a graph input: give each call site exactly the ones it has
    if has_mask and scale_is_node:
        return lambda query, key, value, mask, step: attention(query, key, value, mask, step)
    if has_mask:
        return lambda query, key, value, mask: attention(query, key, value, mask, None)
    if scale_is_node:
        return lambda query, key, value, step: attention(query, key, value, None, step)
    return lambda query, key, value: attention(query, key, value, None, None)


def _bind(node: fx.Node) -> dict[str, object] | None:
    bound = dict(zip(_SDPA_PARAMS, node.args, strict=False))
    bound.update(node.kwargs)
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                "enable_gqa": False}
    for key, value in defaults.items():
        bound.setdefault(key, value)
    if set(bound) - set(_SDPA_PARAMS):
        return None
    if any(isinstance(bound[k], fx.Node) for k in ("dropout_p", "is_causal", "enable_gqa")):
        return None  # run-time flags: cannot specialise, leave the call fused
    return bound


def _decompose(gm: fx.GraphModule, node: fx.Node, index: int) -> bool:
    bound = _bind(node)
    if bound is None:
        return False
    has_mask = isinstance(bound["attn_mask"], fx.Node)
    scale_is_node = isinstance(bound["scale"], fx.Node)
    function = _attention_function(
        has_mask, scale_is_node, None if scale_is_node else bound["scale"],
        bool(bound["is_causal"]), bool(bound["enable_gqa"]),
    )
    inputs = [bound["query"], bound["key"], bound["value"]]
    inputs += [bound["attn_mask"]] if has_mask else []
    inputs += [bound["scale"]] if scale_is_node else []
    sub = fx.Tracer().trace(function)
    placeholders = [n for n in sub.nodes if n.op == "placeholder"]
    value_map: dict[fx.Node, fx.Node] = dict(zip(placeholders, inputs, strict=False))
    with gm.graph.inserting_before(node):
        output = gm.graph.graph_copy(sub, value_map)
    copied = [value_map[n] for n in sub.nodes if n.op not in ("placeholder", "output")]
    for new in copied:  # scope the new nodes where the call was, for names and rules
        new.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
    if float(bound["dropout_p"]) > 0.0:  # a module, so it follows train()/eval() like the rest
        name = f"sdpa_dropout_{index}"
        gm.add_submodule(name, nn.Dropout(float(bound["dropout_p"])))
        softmax = next(n for n in copied if n.op == "call_method" and n.target == "softmax")
        with gm.graph.inserting_after(softmax):
            dropped = gm.graph.call_module(name, (softmax,))
        output.replace_input_with(softmax, dropped)
    node.replace_all_uses_with(output)
    gm.graph.erase_node(node)
    return True


def decompose_sdpa(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace each ``F.scaled_dot_product_attention`` node by matmul -> softmax -> matmul.

    Example:
        >>> gm = decompose_sdpa(trace(model))
    """
    calls = [n for n in gm.graph.nodes
             if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
    for index, node in enumerate(calls):
        _decompose(gm, node, index)
    return gm
