import math

import pytest

from mecqtk.report.compare import COMPARED, layer_deltas


def test_deltas_are_this_minus_other_per_layer(w2a2_report):
    comparison = w2a2_report.comparison
    assert comparison is not None and comparison.other_recipe == "w4a4_lsq_tiny"
    assert comparison.this_score == w2a2_report.quantized_score
    # the W4A4 run started from random init: its reference is its bypassed model
    assert comparison.other_reference.kind == "bypass"
    others = {entry.name: entry for entry in comparison.other_layers}
    assert [d.name for d in comparison.layers] == [e.name for e in w2a2_report.layers]
    for delta in comparison.layers:
        this, other = w2a2_report.layer(delta.name), others[delta.name]
        assert delta.in_this and delta.in_other
        assert delta.deltas["output_sqnr_db"] == pytest.approx(
            this.output_sqnr_db - other.output_sqnr_db)
        assert delta.deltas["local_sqnr_db"] == pytest.approx(
            this.local_sqnr_db - other.local_sqnr_db)
        expected_bits = 0 if delta.name in ("conv1", "linear") else 2 - 4
        assert delta.deltas["weight_bits"] == delta.deltas["input_bits"] == expected_bits
    # 2-bit weights lose about 12 dB of SQNR against 4-bit ones (6 dB per bit)
    middle = [d.deltas["weight_sqnr_db"] for d in comparison.layers
              if d.name not in ("conv1", "linear")]
    assert -16 < sum(middle) / len(middle) < -8


def test_layers_in_one_run_only_have_no_deltas(w2a2_report):
    layers = w2a2_report.layers
    deltas = layer_deltas(layers[:3], layers[1:])
    names = [(d.name, d.in_this, d.in_other) for d in deltas]
    assert names[0] == (layers[0].name, True, False)
    assert names[-1] == (layers[-1].name, False, True)
    assert len(deltas) == len(layers)
    assert all(v is None for v in deltas[0].deltas.values())
    assert all(v == 0.0 or (v is None) or math.isnan(v) for v in deltas[1].deltas.values())
    assert set(deltas[1].deltas) == set(COMPARED)
