"""Graph rewriting with torch.fx: trace -> annotate (policy) -> insert (mechanics)."""

from mecqtk.graph.annotate import annotate
from mecqtk.graph.insert import activation_quantizers, insert_quantizers
from mecqtk.graph.meta import META_KEY, NodeQuant, annotated_nodes, get_quant
from mecqtk.graph.pipeline import prepare, run_passes
from mecqtk.graph.tracer import QuantTracer, trace

__all__ = [
    "META_KEY",
    "NodeQuant",
    "QuantTracer",
    "activation_quantizers",
    "annotate",
    "annotated_nodes",
    "get_quant",
    "insert_quantizers",
    "prepare",
    "run_passes",
    "trace",
]
