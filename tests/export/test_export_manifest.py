"""quant_manifest.json agrees with the graph it describes and with the trained quantizers."""

from __future__ import annotations

import numpy as np
import pytest
from export_nets import INPUT_SHAPE, quantized
from onnx import numpy_helper

from mecqtk.export import export_model, read_manifest
from mecqtk.export.qparams import SIGNED_ACTIVATION_OFFSET
from mecqtk.quant.quantizers import FakeQuantizer


@pytest.mark.parametrize("export_format", ["qcdq", "packed"])
def test_every_scale_and_zero_point_matches_the_graph(residual_net, export_format):
    gm = quantized(residual_net, 2, 2)
    model, manifest = export_model(gm, INPUT_SHAPE, export_format)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    produced = {out for node in model.graph.node for out in node.output}
    roles = {}
    for entry in manifest.tensors:
        roles[entry.role] = roles.get(entry.role, 0) + 1
        assert entry.name in produced  # the DequantizeLinear output the entry describes
        graph_scale = inits[entry.onnx["scale"]].astype(np.float64)
        np.testing.assert_array_equal(graph_scale * 2.0**entry.code_shift, entry.scale)
        if entry.role == "bias":
            assert inits[entry.onnx["codes"]].dtype == np.int32
            continue
        stored_zero = inits[entry.onnx["zero_point"]].astype(np.int64)
        expected = (np.asarray(entry.zero_point) << entry.code_shift) + entry.storage_offset
        np.testing.assert_array_equal(stored_zero, expected)
        if entry.role == "weight":
            codes = inits[entry.onnx["codes"]]
            assert codes.dtype.name == entry.storage
            logical = codes.astype(np.int64) >> (entry.code_shift if codes.dtype == np.int8
                                                 and entry.bits < 8 else 0)
            assert entry.qmin <= logical.min() and logical.max() <= entry.qmax
        else:
            assert entry.onnx["codes"] in produced
    quantizers = sum(1 for n in gm.graph.nodes if n.op == "call_module"
                     and isinstance(gm.get_submodule(n.target), FakeQuantizer))
    # every layer has a bias (a BatchNorm shift or its own); one entry per activation quantizer
    assert roles == {"activation": quantizers, "weight": 5, "bias": 5}


def test_entries_match_the_trained_quantizers(residual_net):
    gm = quantized(residual_net, 4, 4)
    _, manifest = export_model(gm, INPUT_SHAPE, "qcdq")
    for entry in manifest.activations():
        quantizer = gm.get_submodule(entry.layer)
        assert (entry.bits, entry.signed) == (quantizer.bits, quantizer.signed)
        assert (entry.qmin, entry.qmax) == (quantizer.qmin, quantizer.qmax)
        assert entry.scale == float(quantizer.step_size().item())
        assert entry.storage_offset == (SIGNED_ACTIVATION_OFFSET if quantizer.signed else 0)
    conv2 = next(e for e in manifest.tensors if e.role == "weight" and e.layer == "conv2")
    trained = gm.get_submodule("conv2").weight_quantizer.step_size().detach().double().numpy()
    np.testing.assert_array_equal(conv2.notes["trained_scale"], trained.astype(np.float32))
    assert conv2.notes["folded_batchnorm"] == "bn2" and conv2.notes["constant_channels"] == [0]
    assert conv2.axis == 0 and conv2.bits == 4 and conv2.code_shift == 4


def test_manifest_round_trips_through_json(residual_net, tmp_path):
    gm = quantized(residual_net, 4, 4)
    _, manifest = export_model(gm, INPUT_SHAPE, "packed")
    manifest.write(tmp_path / "quant_manifest.json")
    again = read_manifest(tmp_path / "quant_manifest.json")
    assert again == manifest
    assert again.tensors[0].scale == manifest.tensors[0].scale
