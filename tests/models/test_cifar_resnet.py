"""CIFAR ResNets in timm's registry, model creation and checkpoint loading."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.fx

from mecqtk.errors import ModelError
from mecqtk.models import create_model, load_checkpoint_weights
from mecqtk.models.cifar_resnet import ChannelPadShortcut

CIFAR_NAMES = ["cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56"]
# 6n+2 layers; counts as published with the original architecture (0.27/0.46/0.66/0.85 M).
PARAM_COUNTS = {
    "cifar_resnet20": 269_722,
    "cifar_resnet32": 464_154,
    "cifar_resnet44": 658_586,
    "cifar_resnet56": 853_018,
}
CHECKPOINTS = {
    "cifar_resnet20": "resnet20-12fca82f.th",
    "cifar_resnet32": "resnet32-d509ac18.th",
    "cifar_resnet44": "resnet44-014dd654.th",
    "cifar_resnet56": "resnet56-4bfd9763.th",
}


def test_all_variants_are_in_timms_registry():
    assert timm.list_models("cifar_resnet*") == CIFAR_NAMES


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_parameter_count_matches_the_paper(name):
    model = timm.create_model(name, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


def test_pretrained_cfg_describes_cifar_input():
    cfg = timm.create_model("cifar_resnet20", num_classes=10).pretrained_cfg
    assert cfg["mean"] == (0.485, 0.456, 0.406)
    assert cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["input_size"] == (3, 32, 32)
    assert cfg["first_conv"] == "conv1"
    assert cfg["classifier"] == "linear"


def test_state_dict_keys_follow_the_shared_naming():
    keys = set(timm.create_model("cifar_resnet20", num_classes=10).state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer3.2.conv2.weight", "linear.bias"} <= keys
    assert not any("shortcut" in key for key in keys)


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_plain_fx_trace_reproduces_the_model(name):
    model = timm.create_model(name, num_classes=10).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def test_option_a_shortcut_subsamples_and_zero_pads_both_sides():
    x = torch.randn(2, 16, 8, 8)
    out = ChannelPadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any()
    assert not out[:, 24:].any()


def test_timm_style_head_methods():
    model = timm.create_model("cifar_resnet20", num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (3, 64, 8, 8)
    assert model.forward_head(features, pre_logits=True).shape == (3, model.num_features)
    assert model.get_classifier() is model.linear
    model.reset_classifier(7)
    assert model(x).shape == (3, 7)
    assert model.num_classes == 7
    model.reset_classifier(0)
    assert model(x).shape == (3, 64)


def test_features_only_gives_stem_and_three_stages():
    model = timm.create_model("cifar_resnet20", features_only=True)
    shapes = [tuple(f.shape) for f in model(torch.randn(1, 3, 32, 32))]
    assert shapes == [(1, 16, 32, 32), (1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8)]


def test_kaiming_normal_initialisation():
    torch.manual_seed(0)
    weight = timm.create_model("cifar_resnet20", num_classes=10).layer3[1].conv1.weight
    expected_std = (2.0 / (64 * 3 * 3)) ** 0.5
    assert weight.std().item() == pytest.approx(expected_std, rel=0.03)
    assert abs(weight.mean().item()) < 0.05 * expected_std


def test_create_model_builds_cifar_and_timm_models():
    assert create_model("cifar_resnet20", num_classes=100).linear.out_features == 100
    assert create_model("resnet18", num_classes=10).fc.out_features == 10


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ModelError, match="unknown model 'cifar_resnet2'") as info:
        create_model("cifar_resnet2", num_classes=10)
    assert "cifar_resnet20" in str(info.value)
    with pytest.raises(ModelError, match="resnet50"):
        create_model("resnet5O", num_classes=10)


def test_pretrained_without_published_weights_is_an_error():
    with pytest.raises(ModelError, match="no downloadable pretrained weights"):
        create_model("cifar_resnet20", num_classes=10, pretrained=True)


# ---------------------------------------------------------------- checkpoints


def _saved(tmp_path: Path, obj: object, name: str = "ckpt.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_nested_prefixed_checkpoint_without_bn_counters_loads(tmp_path):
    source = timm.create_model("cifar_resnet20", num_classes=10)
    state = {f"module.{k}": v for k, v in source.state_dict().items() if "num_batches" not in k}
    path = _saved(tmp_path, {"model": state, "epoch": 3})
    model = create_model("cifar_resnet20", num_classes=10, checkpoint=path)
    for key, value in source.state_dict().items():
        if "num_batches" not in key:
            assert torch.equal(model.state_dict()[key], value), key


def test_raw_state_dict_loads(tmp_path):
    source = timm.create_model("cifar_resnet20", num_classes=10)
    model = timm.create_model("cifar_resnet20", num_classes=10)
    load_checkpoint_weights(model, _saved(tmp_path, source.state_dict()))
    assert torch.equal(model.linear.weight, source.linear.weight)


def test_missing_keys_are_listed_and_truncated(tmp_path):
    path = _saved(tmp_path, timm.create_model("cifar_resnet20", num_classes=10).state_dict())
    with pytest.raises(ModelError) as info:
        create_model("cifar_resnet32", num_classes=10, checkpoint=path)
    message = str(info.value)
    assert "missing keys (60): layer1.3.conv1.weight" in message
    assert "and 55 more" in message
    assert "\n" not in message


def test_unexpected_keys_are_listed(tmp_path):
    state = timm.create_model("cifar_resnet20", num_classes=10).state_dict()
    state["head.extra.weight"] = torch.zeros(2)
    with pytest.raises(ModelError, match=r"unexpected keys \(1\): head.extra.weight"):
        create_model("cifar_resnet20", num_classes=10, checkpoint=_saved(tmp_path, state))


def test_classifier_size_mismatch_names_both_class_counts(tmp_path):
    path = _saved(tmp_path, timm.create_model("cifar_resnet20", num_classes=10).state_dict())
    with pytest.raises(ModelError) as info:
        create_model("cifar_resnet20", num_classes=100, checkpoint=path)
    message = str(info.value)
    assert "linear.weight is (10, 64) in the checkpoint but (100, 64) in the model" in message
    assert "classifier has 10 classes but the model was built with num_classes=100" in message


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        create_model("cifar_resnet20", num_classes=10, checkpoint=tmp_path / "nope.pth")


def test_truncated_checkpoint_is_unreadable(tmp_path):
    full = _saved(tmp_path, timm.create_model("cifar_resnet20", num_classes=10).state_dict())
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ModelError, match=r"cannot read checkpoint .*truncated\.pth") as info:
        create_model("cifar_resnet20", num_classes=10, checkpoint=truncated)
    assert "\n" not in str(info.value)


def test_checkpoint_with_python_objects_is_refused(tmp_path):
    # weights_only=True must refuse arbitrary pickled objects instead of executing them.
    state = timm.create_model("cifar_resnet20", num_classes=10).state_dict()
    path = _saved(tmp_path, {"state_dict": state, "args": argparse.Namespace(lr=0.1)})
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        create_model("cifar_resnet20", num_classes=10, checkpoint=path)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [(torch.zeros(3), "holds a Tensor, not a dict"), ({"epoch": 3}, "has no state dict")],
)
def test_checkpoint_without_state_dict(tmp_path, content, pattern):
    with pytest.raises(ModelError, match=pattern):
        create_model("cifar_resnet20", num_classes=10, checkpoint=_saved(tmp_path, content))


# ---------------------------------------------------------------- shared weights and data


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_shared_checkpoints_load(shared_dir, name):
    path = shared_dir / "data" / "weights" / "cifar-resnet" / CHECKPOINTS[name]
    model = create_model(name, num_classes=10, checkpoint=path)
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.linear.weight, saved["module.linear.weight"])


def test_shared_resnet20_scores_81_percent_on_jpeg_test_set(shared_dir):
    from mecqtk.data import build_data

    weights = shared_dir / "data" / "weights" / "cifar-resnet" / CHECKPOINTS["cifar_resnet20"]
    model = create_model("cifar_resnet20", num_classes=10, checkpoint=weights).eval()
    data = build_data(
        f"imagefolder:{shared_dir / 'data' / 'cifar10-jpeg'}",
        model=model,
        batch_size=128,
        limit_train=None,
        limit_val=None,
        seed=0,
        eval_batch_size=500,
    )
    model = model.to(memory_format=torch.channels_last)
    correct = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for images, labels in data.val_loader:
            logits = model(images.contiguous(memory_format=torch.channels_last))
            correct += (logits.argmax(1) == labels).sum().item()
    elapsed = time.perf_counter() - start
    assert data.val_loader.num_samples == 10_000
    top1 = 100.0 * correct / 10_000
    print(f"resnet20 JPEG test top-1 {top1:.2f} % in {elapsed:.1f} s (decode included)")
    assert top1 == pytest.approx(81.0, abs=0.3)
