"""snap_biases: the PyTorch model's biases moved onto the int32 grid the export rounds them to."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_nets import INPUT_SHAPE, images, quantized
from onnx import numpy_helper
from torch import nn

from mecqtk.export import bias_grids, export_model, snap_biases
from mecqtk.export.verify import compare


def _bias_codes(gm) -> dict[str, np.ndarray]:
    model, _ = export_model(gm, INPUT_SHAPE, "qcdq")
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
            if t.name.endswith("_bias_codes")}


@pytest.mark.parametrize("bits", [2, 4])
def test_snapping_leaves_the_export_unchanged_and_makes_torch_match_it(residual_net, bits):
    gm = quantized(residual_net, bits, bits)
    exported_before = _bias_codes(gm)
    assert all(grid.off_grid_units > 0.1 for grid in bias_grids(gm))
    assert snap_biases(gm) == 5
    assert all(grid.off_grid_units < 0.01 for grid in bias_grids(gm))
    exported_after = _bias_codes(gm)
    assert exported_before.keys() == exported_after.keys()
    for name, codes in exported_before.items():
        np.testing.assert_array_equal(codes, exported_after[name])

    model, manifest = export_model(gm, INPUT_SHAPE, "qcdq")
    batches = [(images(64, seed), torch.arange(64) % 10) for seed in range(4)]
    report = compare(gm, model, manifest, batches, threads=1)
    assert report.off_grid_bias_layers == 0
    assert report.top1_agreement_pct == 100.0
    for layer in report.layers:
        assert layer.differing_pct < 0.001, layer  # at most a float tie here and there


def test_snapping_twice_changes_nothing(residual_net):
    gm = quantized(residual_net, 2, 2)
    snap_biases(gm)
    first = {k: v.clone() for k, v in gm.state_dict().items()}
    snap_biases(gm)
    for key, value in gm.state_dict().items():
        assert torch.equal(value, first[key]), key


def test_unsnapped_model_is_reported(residual_net):
    gm = quantized(residual_net, 2, 2)
    model, manifest = export_model(gm, INPUT_SHAPE, "qcdq")
    report = compare(gm, model, manifest, [(images(8), torch.zeros(8, dtype=torch.long))],
                     threads=1)
    assert report.off_grid_bias_layers == 5


def test_batchnorm_folded_during_training_exports_and_snaps(residual_net):
    pytest.importorskip("mecqtk.quant.bn_fold",
                        reason="this tree has no simulated conv-BN folding (quant.batchnorm.fold)")
    from mecqtk.qat import prepare
    from mecqtk.quant.calibrate import calibrate
    from mecqtk.recipe import recipe_from_dict

    torch.manual_seed(0)
    gm = prepare(residual_net, recipe_from_dict({
        "name": "w4a4_fold",
        "quant": {"weight": {"bits": 4, "granularity": "per_channel"},
                  "activation": {"bits": 4}, "batchnorm": {"fold": True}},
    }))
    calibrate(gm, [images(16, seed=5)])
    gm.eval()
    folded = pytest.importorskip("mecqtk.quant.bn_fold").FoldedBNLayer
    assert sum(isinstance(m, folded) for m in gm.modules()) == 3  # conv1, conv2, conv3
    assert snap_biases(gm) == 5
    model, manifest = export_model(gm, INPUT_SHAPE, "qcdq")
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    batches = [(images(64, seed), torch.arange(64) % 10) for seed in range(2)]
    report = compare(gm, model, manifest, batches, threads=1)
    assert report.top1_agreement_pct == 100.0
    assert report.off_grid_bias_layers == 0
    for layer in report.layers:
        assert layer.differing_pct < 0.01, layer


class _ConvBN(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class _UntraceableBlock(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, so the tracer keeps the block
    a leaf and opens its traceable children into nested graphs (as timm's MobileVitBlock)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inner = _ConvBN(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 1:
            x = self.inner(x)
        return x


class _NetWithLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = _UntraceableBlock(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_biases_inside_leaf_interiors_are_snapped_too():
    """The convert stage folds BatchNorms in nested (leaf-interior) graphs as well; their
    biases must be snapped like the top graph's, or the exported file computes something else
    (mobilevit_xxs W4A4 agreed on 69.5 % of top-1 decisions before)."""
    from export_nets import randomize_batchnorms

    gm = quantized(randomize_batchnorms(_NetWithLeaf()), 4, 4)
    nested = [g for g in bias_grids(gm) if g.layer.startswith("block.")]
    assert [g.layer for g in nested] == ["block.inner.conv"]
    assert nested[0].off_grid_units > 0.1
    snap_biases(gm)
    assert all(g.off_grid_units < 0.01 for g in bias_grids(gm))
    model, manifest = export_model(gm, INPUT_SHAPE, "qcdq")
    report = compare(gm, model, manifest, [(images(64, 3), torch.arange(64) % 10)], threads=1)
    assert report.off_grid_bias_layers == 0
    assert report.top1_agreement_pct == 100.0


def test_verification_in_memory_bounded_passes_counts_what_one_pass_counts(residual_net,
                                                                          monkeypatch):
    """compare() splits a batch so that all layers' codes of a pass stay within a memory budget
    (inception_v3 at 299 px ran out of 22 GB); the report must not depend on the split."""
    import mecqtk.export.verify as verify

    gm = quantized(residual_net, 4, 4)
    snap_biases(gm)
    model, manifest = export_model(gm, INPUT_SHAPE, "qcdq")
    batches = [(images(24, seed), torch.arange(24) % 10) for seed in range(2)]
    whole = compare(gm, model, manifest, batches, threads=1)
    monkeypatch.setattr(verify, "CODE_ELEMENTS_PER_PASS", 1)  # one image per pass
    split = compare(gm, model, manifest, batches, threads=1)
    assert split.n == whole.n == 48
    assert split.top1_agreement_pct == whole.top1_agreement_pct
    # float logits of a batch of one and of 24 round differently in the last bits
    assert split.max_abs_logit_diff < 1e-6 and whole.max_abs_logit_diff < 1e-6
    for a, b in zip(split.layers, whole.layers, strict=True):
        assert (a.layer, a.codes, a.differing, a.sum_abs_diff) == (
            b.layer, b.codes, b.differing, b.sum_abs_diff)
