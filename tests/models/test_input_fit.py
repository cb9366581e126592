"""Fixed-input-size timm models on 32-px images: built at that size where timm allows it, else
the images are resized to the model's size; checked through `mecqtk quantize`."""

import json

import pytest
import torch
from click.testing import CliRunner

from mecqtk.cli import main
from mecqtk.data import build_data, peek_image_size
from mecqtk.models import create_model, fit_model_to_images
from mecqtk.rundir import load_quantized_model


@pytest.mark.parametrize(("name", "how", "kwargs"), [
    ("resnet18", "native", {}),
    ("vit_tiny_patch16_224", "img_size", {"img_size": 32}),
    ("swin_tiny_patch4_window7_224", "img_size", {"img_size": 32}),
    ("levit_128s", "img_size", {"img_size": 32}),
])
def test_fit_at_the_images_size(name, how, kwargs, one_torch_thread):
    fit = fit_model_to_images(name, 10, (3, 32, 32))
    assert (fit.how, fit.model_kwargs, fit.input_size) == (how, kwargs, (3, 32, 32))
    model = create_model(name, num_classes=10, **fit.model_kwargs).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_attention_biases_fixed_to_7x7_mean_resizing(one_torch_thread):
    # EfficientFormer's attention biases are sized for a 7x7 final grid even when built with
    # img_size=32, so only 224-px inputs work
    fit = fit_model_to_images("efficientformer_l1", 10, (3, 32, 32))
    assert (fit.how, fit.input_size, fit.model_kwargs) == ("resize", (3, 224, 224), {})
    assert fit.interpolation == "bicubic"
    assert "resized to 224x224" in fit.describe("efficientformer_l1", (3, 32, 32))


def test_small_images_are_resized_to_the_input_size(shared_dir):
    spec = f"imagefolder:{shared_dir / 'data/cifar10-jpeg'}"
    assert peek_image_size(spec) == (3, 32, 32)
    model = create_model("resnet18", num_classes=10)
    plain = build_data(spec, model=model, batch_size=8, limit_train=20, limit_val=10, seed=0)
    resized = build_data(spec, model=model, batch_size=8, limit_train=20, limit_val=10, seed=0,
                         input_size=(3, 64, 64))
    assert resized.input_size == (3, 64, 64) and plain.input_size == (3, 32, 32)
    small, _ = next(iter(plain.val_loader))
    large, _ = next(iter(resized.val_loader))
    assert large.shape == (8, 3, 64, 64)
    # upsampling keeps the image: averaging 2x2 blocks gives back the 32-px picture closely
    pooled = torch.nn.functional.avg_pool2d(large, 2)
    assert (pooled - small).abs().mean() < 0.05 * small.abs().mean()
    train_images, _ = next(iter(resized.train_loader))
    assert train_images.shape == (8, 3, 64, 64)


@pytest.mark.parametrize(("name", "line"), [
    ("vit_tiny_patch16_224", "built at the images' size (img_size=32)"),
    ("swin_tiny_patch4_window7_224", "built at the images' size (img_size=32)"),
    ("resnet18", None),
])
def test_quantize_fixed_size_models_on_32px(name, line, shared_dir, tmp_path, one_torch_thread):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "quant: {weight: {bits: 4}, activation: {bits: 4}, calibration: {batches: 1}}\n"
        "train: {epochs: 0, batch_size: 16, eval_batch_size: 20, fused_quantizers: false}\n"
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "quantize", "--model", name, "--recipe", str(recipe),
        "--data", f"imagefolder:{shared_dir / 'data/cifar10-jpeg'}", "--limit-train", "16",
        "--limit-val", "20", "--out", str(out), "--no-progress", "--no-report", "--no-export",
    ])
    assert result.exit_code == 0, result.output
    logged = " ".join(result.output.split())  # rich wraps long lines
    assert line in logged if line else "img_size" not in logged and "resized" not in logged
    info = json.loads((out / "run.json").read_text())
    assert info["input_size"] == [3, 32, 32]
    assert info["model_kwargs"] == ({} if name == "resnet18" else {"img_size": 32})
    qmodel, _, _ = load_quantized_model(out)
    with torch.no_grad():
        assert qmodel(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_model_that_runs_at_no_size_is_a_one_line_error(shared_dir, tmp_path, monkeypatch):
    import mecqtk.models.input_fit as input_fit

    monkeypatch.setattr(input_fit, "_failure_at", lambda model, size: "RuntimeError: too small")
    result = CliRunner().invoke(main, [
        "quantize", "--model", "resnet18", "--recipe", "w4a4_lsq.yaml",
        "--data", f"imagefolder:{shared_dir / 'data/cifar10-jpeg'}", "--out",
        str(tmp_path / "run"), "--no-progress",
    ])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: resnet18 does not run on 32x32 images (RuntimeError: too small), and neither "
        "built for that size nor at its own size 224x224; pick another model"]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_weights_made_at_224_mean_resizing_the_images(shared_dir, tmp_path, one_torch_thread):
    """A ViT checkpoint's position embeddings are for 224 px: it does not fit the model built
    at img_size=32, so the 32-px images are resized to 224 instead."""
    weights = tmp_path / "vit224.pt"
    torch.manual_seed(0)
    torch.save(create_model("vit_tiny_patch16_224", num_classes=10).state_dict(), weights)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "quant: {weight: {bits: 8}, activation: {bits: 8}, calibration: {batches: 1}}\n"
        "train: {epochs: 0, batch_size: 4, eval_batch_size: 10, fused_quantizers: false}\n"
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "quantize", "--model", "vit_tiny_patch16_224", "--checkpoint", str(weights),
        "--recipe", str(recipe), "--data", f"imagefolder:{shared_dir / 'data/cifar10-jpeg'}",
        "--limit-train", "10", "--limit-val", "10", "--out", str(out), "--no-progress",
        "--no-report", "--no-export",
    ])
    assert result.exit_code == 0, result.output
    assert "fits vit_tiny_patch16_224 at its own size only; images are resized to 224x224" in (
        " ".join(result.output.split()))
    info = json.loads((out / "run.json").read_text())
    assert info["input_size"] == [3, 224, 224] and info["model_kwargs"] == {}
