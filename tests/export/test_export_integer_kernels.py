"""What onnxruntime makes of an exported ResNet: integer kernels end to end, not float islands.

Speed on CPU comes from onnxruntime fusing DequantizeLinear -> op -> QuantizeLinear groups into
its QLinear* kernels; a tensor left in float between two of them costs a dequantize, the float
op and a quantize. These tests read the graph onnxruntime actually runs (its optimised copy).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_nets import randomize_batchnorms, recipe

from mecqtk.export import export_model, snap_biases
from mecqtk.qat import prepare
from mecqtk.quant.calibrate import calibrate

timm = pytest.importorskip("timm")
SHAPE = (3, 32, 32)


def _optimised_ops(model: onnx.ModelProto, folder) -> Counter:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.optimized_model_filepath = str(folder / "optimised.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("bits", [8, 4])
def test_resnet18_runs_on_integer_kernels_only(bits, tmp_path, one_torch_thread):
    torch.manual_seed(0)
    model = randomize_batchnorms(timm.create_model("resnet18", num_classes=10))
    gm = prepare(model, recipe(bits, bits))
    calibrate(gm, [torch.randn(8, *SHAPE)])
    snap_biases(gm.eval())  # as `mecqtk quantize` leaves a model: int32-exact biases
    exported, _ = export_model(gm, SHAPE, "qcdq")
    ops = _optimised_ops(exported, tmp_path)
    assert ops["QLinearConv"] == 20 and ops["QGemm"] == 1, ops
    # the residual adds run on QLinearAdd, which the model computes in eval mode
    # (integer_kernels.IntegerAdd); the ReLU after each add folds into its QuantizeLinear. At 4
    # bits the 8-bit residual stream is requantized for the 4-bit convs of the blocks with a
    # shortcut add by a QLinearAdd of a constant zero (IntegerRegrid); the stem's, after its max
    # pool, stays a float DequantizeLinear -> QuantizeLinear, as the model computes it. No float
    # conv, add, ReLU or max pool survives; the other float round trip is the image's quantize.
    assert ops["QLinearAdd"] == 8 + (0 if bits == 8 else 4), ops
    assert not {"Conv", "Add", "Sum", "Relu", "MaxPool"} & set(ops), ops
    assert ops["NhwcMaxPool"] == 1, ops
    assert ops["QuantizeLinear"] == 1 + (0 if bits == 8 else 1), ops
    assert ops.get("DequantizeLinear", 0) == (0 if bits == 8 else 1), ops

    session = ort.InferenceSession(exported.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(3))
    onnx_logits = session.run(None, {"input": x.numpy()})[0]
    torch_logits = gm(x).detach().numpy()
    assert (onnx_logits.argmax(1) == torch_logits.argmax(1)).mean() >= 15 / 16
    spread = torch_logits.max() - torch_logits.min()
    assert np.abs(onnx_logits - torch_logits).max() < 0.05 * spread


@pytest.mark.parametrize("bits", [8, 4])
def test_cifar_resnet20_shortcuts_keep_the_integer_path(bits, tmp_path, one_torch_thread):
    """Identity and option-A (strided slice + zero channel pad) shortcuts pass their input's
    grid on: every conv and add runs on integer kernels, and the pad runs on the codes."""
    from mecqtk.models import create_model

    torch.manual_seed(0)
    model = randomize_batchnorms(create_model("cifar_resnet20", num_classes=10))
    gm = prepare(model, recipe(bits, bits))
    calibrate(gm, [torch.randn(8, *SHAPE)])
    snap_biases(gm.eval())
    exported, _ = export_model(gm, SHAPE, "qcdq")
    ops = _optimised_ops(exported, tmp_path)
    # every add is a QLinearAdd (the model computes its arithmetic in eval mode), and so, at 4
    # bits, is the requantization of each block's 8-bit output for the next block's 4-bit conv
    assert ops["QLinearConv"] == 19 and ops["QGemm"] == 1, ops
    assert ops["QLinearAdd"] == 9 + (0 if bits == 8 else 9), ops
    assert not {"Conv", "Add", "Sum", "Relu"} & set(ops), ops
    assert ops["Pad"] == 2 and ops["Slice"] >= 2, ops
    # float round trips left: the image's quantize, and the two option-A shortcuts
    # (onnxruntime runs Slice and Pad between a DequantizeLinear and the convert stage's exact
    # requantization)
    assert ops["QuantizeLinear"] == 1 + 2, ops
    assert ops["DequantizeLinear"] == 2, ops

    session = ort.InferenceSession(exported.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(3))
    onnx_logits = session.run(None, {"input": x.numpy()})[0]
    torch_logits = gm(x).detach().numpy()
    assert (onnx_logits.argmax(1) == torch_logits.argmax(1)).all()
    spread = torch_logits.max() - torch_logits.min()
    assert np.abs(onnx_logits - torch_logits).max() < 1e-5 * spread  # the same codes


def test_a_vit_matches_the_model_bit_for_bit(tmp_path, one_torch_thread):
    """A ViT's Linears run in onnxruntime as MatMulIntegerToFloat and a float bias Add (3-D
    inputs, batch size unknown) and its head as QGemm; the model computes those kernels'
    arithmetic in eval mode, and each LayerNorm in float64 (export/float64_norms). Before, it
    computed float Linears: a code in ten thousand moved, and 1.6 % of top-1 decisions with it.
    Now every logit is the file's, bit for bit."""
    from zoo import small_model

    torch.manual_seed(0)
    model, shape = small_model("vit_tiny_patch16_224")
    gm = prepare(model, recipe(4, 4))
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))
    calibrate(gm, [x])
    snap_biases(gm.eval())
    exported, _ = export_model(gm, shape, "qcdq")
    ops = _optimised_ops(exported, tmp_path)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert ops["QGemm"] == 1 and ops["MatMulIntegerToFloat"] >= linears - 1, ops
    session = ort.InferenceSession(exported.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        torch_logits = gm(x).numpy()
    assert np.array_equal(onnx_logits, torch_logits)
