"""Data sources, class-balanced limits, augmentation and loaders."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from mecqtk.data import build_data, parse_spec, peek_num_classes
from mecqtk.data.augment import normalize, random_crop_flip
from mecqtk.data.memory import folder_store
from mecqtk.data.subset import balanced_subset
from mecqtk.errors import DataError
from mecqtk.models import create_model

CLASSES = ["cat", "dog", "emu"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pixels(label: int, index: int, side: int) -> np.ndarray:
    """A distinct, reproducible image per (label, index)."""
    rng = np.random.default_rng(1000 * label + index)
    return rng.integers(0, 256, (side, side, 3), dtype=np.uint8)


def _image_folder(
    root: Path,
    per_class: dict[str, dict[str, int]],
    side: int = 32,
    suffix: str = ".png",
) -> Path:
    """root/<split>/<class>/<i>.png holding _pixels(label, i); lossless so pixels can be checked."""
    for split, counts in per_class.items():
        for label, (name, count) in enumerate(counts.items()):
            class_dir = root / split / name
            class_dir.mkdir(parents=True)
            for index in range(count):
                image = Image.fromarray(_pixels(label, index, side))
                image.save(class_dir / f"{index:04d}{suffix}")
    return root


def _small_folder(root: Path, train: int = 6, val: int = 2, side: int = 32) -> Path:
    return _image_folder(
        root,
        {"train": dict.fromkeys(CLASSES, train), "val": dict.fromkeys(CLASSES, val)},
        side=side,
    )


def _model(num_classes: int = 3) -> torch.nn.Module:
    return create_model("cifar_resnet20", num_classes=num_classes)


def _build(spec: str, **overrides):
    options = {
        "model": _model(),
        "batch_size": 4,
        "limit_train": None,
        "limit_val": None,
        "seed": 0,
    }
    options.update(overrides)
    return build_data(spec, **options)


def _unnormalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images * std + mean).mul(255).round().to(torch.uint8)


# ---------------------------------------------------------------- spec parsing


@pytest.mark.parametrize("text", ["mnist:/tmp", "/tmp/data", "imagefolder:", "cifar10:  "])
def test_malformed_spec_names_the_allowed_forms(text):
    with pytest.raises(DataError, match=r"imagefolder:PATH .* or cifar10:PATH"):
        parse_spec(text)


def test_spec_with_missing_folder(tmp_path):
    with pytest.raises(DataError, match=f"data folder {tmp_path / 'absent'} does not exist"):
        parse_spec(f"imagefolder:{tmp_path / 'absent'}")


def test_spec_is_parsed_to_an_absolute_path(tmp_path):
    spec = parse_spec(f"CIFAR10:{tmp_path}")
    assert (spec.kind, spec.path) == ("cifar10", tmp_path)


# ---------------------------------------------------------------- image folder errors


def test_missing_train_folder(tmp_path):
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=f"{tmp_path} has no train/ folder"):
        peek_num_classes(f"imagefolder:{tmp_path}")


def test_missing_eval_folder(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="neither a val/ nor a test/ folder"):
        peek_num_classes(f"imagefolder:{tmp_path}")


def test_split_without_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'train'} has no class folders"):
        peek_num_classes(f"imagefolder:{tmp_path}")


def test_class_folders_differing_between_splits(tmp_path):
    _image_folder(
        tmp_path,
        {"train": {"cat": 1, "dog": 1}, "test": {"cat": 1, "eel": 1}},
    )
    with pytest.raises(DataError) as info:
        peek_num_classes(f"imagefolder:{tmp_path}")
    assert "only in train/: dog; only in test/: eel" in str(info.value)


def test_class_folder_without_images(tmp_path):
    _image_folder(tmp_path, {"train": {"cat": 2}, "val": {"cat": 1}})
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "val" / "dog").mkdir()
    with pytest.raises(DataError, match=f"class folder {tmp_path / 'train' / 'dog'} holds no"):
        _build(f"imagefolder:{tmp_path}", model=_model(2))


def test_corrupt_image_is_named(tmp_path):
    _small_folder(tmp_path, train=2, val=1)
    (tmp_path / "train" / "dog" / "0001.png").write_bytes(b"definitely not a png")
    data = _build(f"imagefolder:{tmp_path}")
    with pytest.raises(DataError, match=r"cannot decode image .*dog/0001\.png"):
        next(iter(data.train_loader))


def test_small_images_of_different_sizes(tmp_path):
    _small_folder(tmp_path, train=2, val=1)
    Image.fromarray(_pixels(0, 0, 24)).save(tmp_path / "train" / "emu" / "0001.png")
    data = _build(f"imagefolder:{tmp_path}")
    with pytest.raises(DataError, match=r"emu/0001\.png is 24x24 but .*cat/0000\.png is 32x32"):
        next(iter(data.train_loader))


def test_model_with_wrong_number_of_outputs(tmp_path):
    _small_folder(tmp_path, train=1, val=1)
    with pytest.raises(DataError, match="model has 10 outputs but the data has 3 classes"):
        _build(f"imagefolder:{tmp_path}", model=_model(10))


@pytest.mark.parametrize("option", ["limit_train", "limit_val"])
def test_non_positive_limits(tmp_path, option):
    _small_folder(tmp_path, train=1, val=1)
    with pytest.raises(DataError, match=f"{option} must be a positive number of images, got 0"):
        _build(f"imagefolder:{tmp_path}", **{option: 0})


# ---------------------------------------------------------------- class-balanced limits


def test_balanced_subset_takes_first_samples_of_each_class_round_robin():
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)
    picked = balanced_subset(labels, 8, "limit_train")
    # 8 = 3 + 3 + 2: the remainder goes to the lowest-numbered classes.
    assert picked.tolist() == [0, 1, 2, 5, 6, 7, 10, 11]


def test_balanced_subset_fills_up_from_larger_classes():
    labels = torch.tensor([0] * 6 + [1] * 1 + [2] * 6)
    counts = torch.bincount(labels[balanced_subset(labels, 9, "limit_train")])
    assert counts.tolist() == [4, 1, 4]


def test_balanced_subset_keeps_everything_at_or_above_size():
    labels = torch.tensor([1, 0, 1])
    assert balanced_subset(labels, None, "limit_val").tolist() == [0, 1, 2]
    assert balanced_subset(labels, 3, "limit_val").tolist() == [0, 1, 2]


def test_limits_are_balanced_and_independent_of_the_seed(tmp_path):
    _small_folder(tmp_path, train=6, val=4)
    spec = f"imagefolder:{tmp_path}"
    first = _build(spec, limit_train=7, limit_val=5, seed=0)
    second = _build(spec, limit_train=7, limit_val=5, seed=123)
    assert first.train_loader.num_samples == 7
    assert first.val_loader.num_samples == 5
    assert torch.bincount(first.train_loader.labels).tolist() == [3, 2, 2]
    assert [len(y) for _, y in first.train_loader] == [4]  # the incomplete last batch is dropped
    assert torch.equal(first.train_loader.labels, second.train_loader.labels)
    val_first = torch.cat([images for images, _ in first.val_loader])
    val_second = torch.cat([images for images, _ in second.val_loader])
    assert torch.equal(val_first, val_second)
    assert torch.bincount(torch.cat([y for _, y in first.val_loader])).tolist() == [2, 2, 1]


# ---------------------------------------------------------------- in-memory loading


def test_eval_batches_hold_exact_normalised_pixels_in_order(tmp_path):
    _small_folder(tmp_path, train=2, val=2)
    data = _build(f"imagefolder:{tmp_path}", eval_batch_size=4)
    assert (data.num_classes, data.class_names) == (3, CLASSES)
    assert (data.input_size, data.mean, data.std) == ((3, 32, 32), MEAN, STD)
    batches = list(data.val_loader)
    assert [len(labels) for _, labels in batches] == [4, 2]  # eval keeps the last batch
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    expected = torch.from_numpy(_pixels(2, 1, 32)).permute(2, 0, 1)
    assert torch.equal(_unnormalize(images[5:6])[0], expected)


def test_normalize_matches_torchvision_to_tensor_and_normalize():
    pixels = _pixels(0, 0, 32)
    reference = T.Normalize(MEAN, STD)(T.ToTensor()(Image.fromarray(pixels)))
    ours = normalize(torch.from_numpy(pixels).permute(2, 0, 1)[None], MEAN, STD)[0]
    assert torch.equal(ours, reference)


def test_random_crop_flip_is_a_shifted_window_of_the_zero_padded_image():
    images = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == images.shape
    assert out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flipped = 0
    for source, crop in zip(padded, out, strict=True):
        windows = [source[:, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        plain = any(torch.equal(crop, w) for w in windows)
        mirrored = any(torch.equal(crop, w.flip(2)) for w in windows)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 0 < flipped < 16
    assert (out == 0).any()  # some crops reach into the zero border


def test_training_batches_are_reproducible_per_seed_and_epoch(tmp_path):
    _small_folder(tmp_path, train=6, val=1)
    spec = f"imagefolder:{tmp_path}"

    def epoch_batches(data, epoch):
        data.train_loader.set_epoch(epoch)
        return [(x.clone(), y.clone()) for x, y in data.train_loader]

    run_a, run_b, other_seed = _build(spec), _build(spec), _build(spec, seed=1)
    first = epoch_batches(run_a, 0)
    assert len(first) == len(run_a.train_loader) == 4  # 18 images, batches of 4, last dropped
    assert all(x.shape == (4, 3, 32, 32) for x, _ in first)
    same = epoch_batches(run_b, 0)
    assert all(
        torch.equal(x1, x2) and torch.equal(y1, y2)
        for (x1, y1), (x2, y2) in zip(first, same, strict=True)
    )
    assert not torch.equal(first[0][0], epoch_batches(other_seed, 0)[0][0])
    next_epoch = epoch_batches(run_a, 1)
    assert not all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(first, next_epoch, strict=True))
    # Iterating again without set_epoch moves on to the following epoch by itself.
    auto = [(x.clone(), y.clone()) for x, y in run_b.train_loader]
    assert all(
        torch.equal(x1, x2) for (x1, _), (x2, _) in zip(auto, epoch_batches(run_a, 1), strict=True)
    )


def test_training_batches_are_augmented(tmp_path):
    _small_folder(tmp_path, train=8, val=1)
    data = _build(f"imagefolder:{tmp_path}", batch_size=24)
    rng_before = torch.get_rng_state()
    images, labels = next(iter(data.train_loader))
    assert torch.equal(torch.get_rng_state(), rng_before)
    raw = folder_store(tmp_path / "train", CLASSES).take(torch.arange(24))
    originals = {tuple(raw[i].flatten().tolist()) for i in range(24)}
    augmented = _unnormalize(images)
    unchanged = sum(tuple(img.flatten().tolist()) in originals for img in augmented)
    assert unchanged <= 2  # 1 in 162 crop/flip choices leaves an image as it was
    assert sorted(labels.tolist()) == [0] * 8 + [1] * 8 + [2] * 8


def test_distributed_sampler_with_one_process_matches_single_process(tmp_path):
    import torch.distributed as dist

    _small_folder(tmp_path / "data", train=4, val=1)
    spec = f"imagefolder:{tmp_path / 'data'}"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        sharded = _build(spec, distributed=True, seed=3)
        sharded_batches = [(x, y) for x, y in sharded.train_loader]
    finally:
        dist.destroy_process_group()
    single = [(x, y) for x, y in _build(spec, seed=3).train_loader]
    assert len(sharded_batches) == len(single) == 3
    for (x1, y1), (x2, y2) in zip(sharded_batches, single, strict=True):
        assert torch.equal(x1, x2)
        assert torch.equal(y1, y2)


def test_train_batch_smaller_than_batch_size_is_kept(tmp_path):
    _small_folder(tmp_path, train=1, val=1)
    data = _build(f"imagefolder:{tmp_path}", batch_size=8)
    assert [len(y) for _, y in data.train_loader] == [3]


def test_decoded_split_is_cached_per_process(tmp_path):
    _small_folder(tmp_path, train=2, val=1)
    store = folder_store(tmp_path / "train", CLASSES)
    pixels = store.take(torch.arange(6))
    assert folder_store(tmp_path / "train", CLASSES) is store
    assert store.take(torch.arange(6)).data_ptr() == pixels.data_ptr()


def test_eval_under_inference_mode_then_train(tmp_path):
    _small_folder(tmp_path, train=2, val=2)
    data = _build(f"imagefolder:{tmp_path}")
    with torch.inference_mode():
        list(data.val_loader)
    images, _ = next(iter(data.train_loader))
    assert not images.is_inference()


# ---------------------------------------------------------------- large images from disk


def test_large_images_stream_through_timm_transforms(tmp_path):
    _small_folder(tmp_path, train=3, val=2, side=80)
    spec = f"imagefolder:{tmp_path}"
    data = _build(spec, eval_batch_size=6)
    assert data.input_size == (3, 32, 32)  # from the model's pretrained_cfg
    val_images, val_labels = next(iter(data.val_loader))
    assert val_images.shape == (6, 3, 32, 32)
    assert val_labels.tolist() == [0, 0, 1, 1, 2, 2]
    rng_before = torch.get_rng_state()
    train_a = [x for x, _ in data.train_loader]
    assert torch.equal(torch.get_rng_state(), rng_before)  # transforms leave the global RNG alone
    train_b = [x for x, _ in _build(spec, num_workers=2).train_loader]
    assert len(train_a) == 2
    assert train_a[0].shape == (4, 3, 32, 32)
    # Same seed: identical random transforms whether decoded in-process or in workers.
    assert all(torch.equal(a, b) for a, b in zip(train_a, train_b, strict=True))
    data.train_loader.set_epoch(0)
    assert torch.equal(next(iter(data.train_loader))[0], train_a[0])
    epoch_one = next(iter(data.train_loader))[0]
    assert not torch.equal(epoch_one, train_a[0])


# ---------------------------------------------------------------- CIFAR-10 python batches


def _cifar_batches(folder: Path, per_batch: int = 3, test: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = ["plane", "car", "bird"]
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump({"label_names": names, "num_vis": 3072}, handle)
    rng = np.random.default_rng(0)
    for name, count in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [
        ("test_batch", test)
    ]:
        batch = {
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            "labels": [i % len(names) for i in range(count)],
        }
        with (folder / name).open("wb") as handle:
            pickle.dump(batch, handle)


@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_python_batches(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    _cifar_batches(folder)
    spec = f"cifar10:{tmp_path}"
    assert peek_num_classes(spec) == (3, ["plane", "car", "bird"])
    data = _build(spec, eval_batch_size=4)
    assert data.train_loader.num_samples == 15
    assert data.input_size == (3, 32, 32)
    images, labels = next(iter(data.val_loader))
    with (folder / "test_batch").open("rb") as handle:
        raw = pickle.load(handle)
    expected = torch.from_numpy(raw["data"]).view(-1, 3, 32, 32)
    assert torch.equal(_unnormalize(images), expected)
    assert labels.tolist() == raw["labels"]


def test_cifar10_missing_batch_files(tmp_path):
    _cifar_batches(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DataError, match=r"lacks the CIFAR-10 file\(s\) data_batch_4, test_batch"):
        peek_num_classes(f"cifar10:{tmp_path}")


def test_cifar10_damaged_batch(tmp_path):
    _cifar_batches(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(b"\x80\x04truncated")
    with pytest.raises(DataError, match=r"cannot read CIFAR-10 file .*data_batch_2"):
        _build(f"cifar10:{tmp_path}")


# ---------------------------------------------------------------- shared CIFAR-10 JPEGs


def test_shared_jpegs_classes_and_balanced_limit(shared_dir):
    spec = f"imagefolder:{shared_dir / 'data' / 'cifar10-jpeg'}"
    num_classes, names = peek_num_classes(spec)
    assert num_classes == 10
    assert names[:3] == ["airplane", "automobile", "bird"]
    model = create_model("cifar_resnet20", num_classes=10)
    data = build_data(spec, model=model, batch_size=50, limit_train=100, limit_val=30, seed=0)
    assert torch.bincount(data.train_loader.labels).tolist() == [10] * 10
    images, labels = next(iter(data.val_loader))
    assert images.shape == (30, 3, 32, 32)
    assert torch.bincount(labels).tolist() == [3] * 10
    first_file = shared_dir / "data" / "cifar10-jpeg" / "test" / "airplane"
    first = min(first_file.iterdir())
    expected = torch.from_numpy(np.array(Image.open(first).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(_unnormalize(images[:1])[0], expected)
