"""Attention: SDPA decomposition, timm's fused flag, and both matmul operands quantized."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from mecqtk.graph import annotate, annotated_nodes, trace
from mecqtk.graph.attention import decompose_sdpa, unfuse_timm_attention
from mecqtk.graph.ops import node_arguments
from mecqtk.qat import prepare
from mecqtk.recipe import QuantConfig, recipe_from_dict


class Calls(nn.Module):
    def forward(self, q, k, v, m):
        return (
            F.scaled_dot_product_attention(q, k, v),
            F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3),
            F.scaled_dot_product_attention(q, k, v, is_causal=True),
            F.scaled_dot_product_attention(q, k, v, attn_mask=m > 0),
            F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True),
        )


def test_decomposed_sdpa_equals_the_fused_kernel():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    m = torch.randn(5, 5)
    gm = fx.symbolic_trace(Calls())
    expected = gm(q, k, v, m)
    gm = decompose_sdpa(gm)
    gm.recompile()
    assert not any(n.target is F.scaled_dot_product_attention for n in gm.graph.nodes)
    matmuls = [n for n in gm.graph.nodes if n.target is torch.matmul or n.name.startswith("matmul")]
    assert len(matmuls) == 10
    for want, got in zip(expected, gm(q, k, v, m), strict=True):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_sdpa_dropout_becomes_a_module_that_respects_eval():
    class Drop(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    gm = decompose_sdpa(fx.symbolic_trace(Drop()))
    gm.recompile()
    assert isinstance(gm.sdpa_dropout_0, nn.Dropout) and gm.sdpa_dropout_0.p == 0.5
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    gm.eval()
    torch.testing.assert_close(gm(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               atol=2e-6, rtol=1e-5)


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(2, 5, 3, 8).permute(2, 0, 1, 3).unbind(0)
        return F.scaled_dot_product_attention(q, k, v)


def test_both_matmul_operands_are_quantized_softmax_unsigned():
    gm = annotate(decompose_sdpa(trace(SelfAttention())), QuantConfig())
    matmuls = [(n, q) for n, q in annotated_nodes(gm) if q.kind == "matmul"]
    assert len(matmuls) == 2
    (_, scores), (node, mixed) = matmuls
    assert [s.signed for s in scores.inputs if s] == [True, True]  # q and k: signed 4-bit
    assert all(s.bits == 4 for s in scores.inputs if s)
    assert mixed.inputs[0].signed is False  # softmax output: provably non-negative
    assert node_arguments(node)[0].name == "softmax"
    eight = recipe_from_dict({"quant": {"rules": [
        {"match": {"op": ["matmul"]}, "activation": {"bits": 8}}]}}).quant
    gm = annotate(decompose_sdpa(trace(SelfAttention())), eight)
    assert {s.bits for _, q in annotated_nodes(gm) if q.kind == "matmul"
            for s in q.inputs if s} == {8}


def test_vit_attention_is_unfused_and_quantized():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2)
    assert unfuse_timm_attention(timm.create_model("vit_tiny_patch16_224", depth=2)) == 2
    qmodel = prepare(model, QuantConfig())
    matmuls = [q for _, q in annotated_nodes(qmodel) if q.kind == "matmul"]
    assert len(matmuls) == 4 and all(q.quantized for q in matmuls)
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))  # copy only
    out = qmodel(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert torch.isfinite(out).all()
