"""timm zoo models through convert -> torch.onnx -> onnxruntime, on real CIFAR-10 images.

The CI subset covers a ResNet, a ConvNeXt (LayerNorm), a ViT (attention), a MobileNetV2
(BatchNormAct, depthwise convs) and a MobileNetV3 (squeeze-excitation means over 2x2 maps, which
land on half codes: without the integer pool's arithmetic in the deploy form the self-check
refuses it) at W4A4; the whole zoo at W4A4 and W2A2 runs under ``-m slow``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mecqtk
from mecqtk.errors import ExportError
from mecqtk.export import compare, export_model, snap_biases
from zoo import COVERAGE_MODELS, small_model

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
CI_MODELS = ["resnet18", "convnext_atto", "vit_tiny_patch16_224", "mobilenetv2_100",
             "mobilenetv3_small_100"]


def _images(folder: Path, n: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    classes = sorted(p.name for p in folder.iterdir())
    files = [sorted((folder / c).glob("*.jpg")) for c in classes]
    batch, labels = [], []
    for i in range(n):
        image = Image.open(files[i % len(classes)][i // len(classes)]).convert("RGB")
        if image.size != (side, side):
            image = image.resize((side, side), Image.BILINEAR)
        array = (np.asarray(image, np.float32) / 255.0 - MEAN) / STD
        batch.append(torch.from_numpy(array.transpose(2, 0, 1).copy()))
        labels.append(i % len(classes))
    return torch.stack(batch), torch.tensor(labels)


def _export_and_compare(name: str, recipe: str, data: Path, n: int) -> float:
    torch.manual_seed(0)
    model, shape = small_model(name)
    gm = mecqtk.prepare(model, mecqtk.load_recipe(recipe))
    train, _ = _images(data / "train", 64, shape[-1])
    gm.train()
    with torch.no_grad():  # BatchNorm statistics settled on real images, as after training
        for batch in train.split(16):
            gm(batch)
    gm.eval()
    mecqtk.calibrate(gm, list(train.split(16)))
    snap_biases(gm)
    exported, manifest = export_model(gm, tuple(shape), "qcdq", probe=train[:16])
    assert manifest.self_check["probe"] == "images" and manifest.self_check["n"] == 16
    test, labels = _images(data / "test", n, shape[-1])
    report = compare(gm, exported, manifest, zip(test.split(32), labels.split(32), strict=True),
                     threads=1)
    assert report.n == n
    return report.top1_agreement_pct


@pytest.mark.parametrize("name", CI_MODELS)
def test_zoo_subset_w4a4_agrees_with_onnxruntime(name, shared_dir, one_torch_thread):
    data = shared_dir / "data" / "cifar10-jpeg"
    agreement = _export_and_compare(name, "w4a4_lsq.yaml", data, 64)
    assert agreement >= 99.0


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["w4a4_lsq.yaml", "w2a2_lsq.yaml"])
@pytest.mark.parametrize("name", list(COVERAGE_MODELS))
def test_whole_zoo_agrees_with_onnxruntime(name, recipe, shared_dir, one_torch_thread):
    data = shared_dir / "data" / "cifar10-jpeg"
    assert _export_and_compare(name, recipe, data, 256) >= 99.0


def test_a_wrong_translation_is_caught_by_the_self_check(plain_net, monkeypatch):
    """A translation that forgets the integer Clip of a 2-bit grid still exports, but computes
    something else: export_model refuses it and names the first diverging tensor."""
    from export_nets import INPUT_SHAPE, quantized
    from onnxscript import opset21 as op

    import mecqtk.export.translate as translate

    def without_clip(x, scale, zero_point, qmin, qmax, axis):
        codes = op.QuantizeLinear(x, scale, zero_point, axis=axis)
        return op.DequantizeLinear(codes, scale, zero_point, axis=axis)

    gm = quantized(plain_net, 2, 2)
    export_model(gm, INPUT_SHAPE, "qcdq")  # the real translation passes
    monkeypatch.setattr(translate, "quantize_dequantize", without_clip)
    with pytest.raises(ExportError, match=r"first diverging tensor .* \(quantizer aq_"):
        export_model(gm, INPUT_SHAPE, "qcdq")


def test_near_zero_gamma_from_timm_init_exports(shared_dir, one_torch_thread):
    """timm zero-initialises the last BatchNorm gamma of each residual block; after a few steps
    it is near zero and the folded weight scale collapses. The export keeps such a layer's bias
    in float (no int32 overflow, no refusal) and still agrees with the model."""
    data = shared_dir / "data" / "cifar10-jpeg"
    torch.manual_seed(0)
    model, shape = small_model("resnet50")
    gm = mecqtk.prepare(model, mecqtk.load_recipe("w4a4_lsq.yaml"))
    train, labels = _images(data / "train", 32, shape[-1])
    mecqtk.calibrate(gm, list(train.split(16)))
    optimizer = torch.optim.SGD(gm.parameters(), lr=1e-3, momentum=0.9)
    gm.train()
    for batch, target in zip(train.split(16), labels.split(16), strict=True):
        loss = torch.nn.functional.cross_entropy(gm(batch), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gm.eval()
    gammas = [m.weight.abs().max().item() for n, m in gm.named_modules()
              if n.endswith("bn3") and isinstance(m, torch.nn.BatchNorm2d)]
    assert gammas and min(gammas) < 1e-2  # the zero-initialised gammas are still near zero
    snap_biases(gm)
    exported, manifest = export_model(gm, tuple(shape), "qcdq", probe=train[:16])
    test, test_labels = _images(data / "test", 32, shape[-1])
    report = compare(gm, exported, manifest,
                     zip(test.split(32), test_labels.split(32), strict=True), threads=1)
    assert report.top1_agreement_pct >= 99.0
    weights = [e for e in manifest.tensors if e.role == "weight"]
    assert all(np.isfinite(np.asarray(e.scale)).all() for e in weights)
