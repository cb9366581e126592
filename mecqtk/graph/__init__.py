"""Graph rewriting with torch.fx: trace -> annotate (policy) -> insert (mechanics).

See docs/design.md for the pass pipeline. ``mecqtk.doctor`` (above this package) holds
``explain``/``doctor``.
"""

from mecqtk.graph.annotate import annotate, annotate_model
from mecqtk.graph.attention import decompose_sdpa, unfuse_timm_attention
from mecqtk.graph.insert import insert_model, insert_quantizers
from mecqtk.graph.introspect import (
    activation_quantizers,
    graph_modules,
    quantized_layers,
    weight_quantizers,
)
from mecqtk.graph.leaves import trace_leaf_interiors
from mecqtk.graph.meta import (
    META_KEY,
    GraphInfo,
    JunctionQuant,
    LayerQuant,
    NodeQuant,
    annotated_nodes,
    get_quant,
    graph_info,
)
from mecqtk.graph.pipeline import fake_quantize_graph, run_passes
from mecqtk.graph.quant_plan import LayerRow, QuantReport, quant_report
from mecqtk.graph.tracer import QuantTracer, trace

__all__ = [
    "META_KEY",
    "GraphInfo",
    "JunctionQuant",
    "LayerQuant",
    "LayerRow",
    "NodeQuant",
    "QuantReport",
    "QuantTracer",
    "activation_quantizers",
    "annotate",
    "annotate_model",
    "annotated_nodes",
    "decompose_sdpa",
    "fake_quantize_graph",
    "get_quant",
    "graph_info",
    "graph_modules",
    "insert_model",
    "insert_quantizers",
    "quant_report",
    "quantized_layers",
    "run_passes",
    "trace",
    "trace_leaf_interiors",
    "unfuse_timm_attention",
    "weight_quantizers",
]
