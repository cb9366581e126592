"""Every bad input a user can give `mecqtk quantize`: exit code 2, one line on stderr, no
traceback, and nothing half-written that looks like a finished run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from mecqtk.cli import main

TINY_RECIPE = """
quant:
  weight: {bits: 4, granularity: per_channel}
  activation: {bits: 4}
  calibration: {batches: 1}
train: {epochs: 1, batch_size: 8, eval_batch_size: 8, fused_quantizers: false}
"""


def _folder(root: Path, train_classes=("cat", "dog"), val_classes=("cat", "dog"), count=4) -> Path:
    rng = np.random.default_rng(0)
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def _recipe(tmp_path: Path, text: str = TINY_RECIPE) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def _quantize(tmp_path: Path, *args: str, data: Path | None = None, recipe: Path | None = None,
              model: str = "cifar_resnet20"):
    data = data if data is not None else _folder(tmp_path / "data")
    recipe = recipe if recipe is not None else _recipe(tmp_path)
    argv = ["quantize", "--model", model, "--recipe", str(recipe), "--data",
            f"imagefolder:{data}", "--out", str(tmp_path / "run"), "--no-progress",
            "--no-report", "--no-export", *args]
    return CliRunner().invoke(main, argv)


def _assert_clean_failure(result, *fragments: str, progress_before: bool = False) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    if not progress_before:  # failures before training print nothing else
        assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_malformed_yaml(tmp_path):
    result = _quantize(tmp_path, recipe=_recipe(tmp_path, "train: {epochs: 1\n"))
    _assert_clean_failure(result, "malformed YAML at line")


def test_unknown_recipe_key(tmp_path):
    result = _quantize(tmp_path, recipe=_recipe(tmp_path, "train: {epoch: 1}\n"))
    _assert_clean_failure(result, "train.epoch: unknown key", "epochs")


def test_bits_outside_2_to_8(tmp_path):
    result = _quantize(tmp_path, recipe=_recipe(tmp_path, "quant: {activation: {bits: 1}}\n"))
    _assert_clean_failure(result, "quant.activation.bits: 1 is out of range", ">= 2 and <= 8")


def test_unknown_model_name_suggests_close_names(tmp_path):
    result = _quantize(tmp_path, model="resnet19")
    _assert_clean_failure(result, "resnet19", "resnet18")


def test_missing_data_folder(tmp_path):
    result = _quantize(tmp_path, data=tmp_path / "nowhere")
    _assert_clean_failure(result, "does not exist")


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    result = _quantize(tmp_path, data=tmp_path / "empty")
    _assert_clean_failure(result, "train")


def test_class_folders_differ_between_train_and_val(tmp_path):
    data = _folder(tmp_path / "data", val_classes=("cat", "emu"))
    result = _quantize(tmp_path, data=data)
    _assert_clean_failure(result, "dog", "emu")


def test_truncated_checkpoint(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, good)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(good.read_bytes()[:300])
    result = _quantize(tmp_path, "--checkpoint", str(broken))
    _assert_clean_failure(result, "broken.pt")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_checkpoint_of_another_architecture(tmp_path):
    from mecqtk.models import create_model

    other = tmp_path / "r32.pt"
    torch.save({"state_dict": create_model("cifar_resnet32", num_classes=2).state_dict()}, other)
    result = _quantize(tmp_path, "--checkpoint", str(other))
    _assert_clean_failure(result, "unexpected", "layer1.3")


def test_output_folder_holding_another_run_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    result = _quantize(tmp_path)
    _assert_clean_failure(result, "already holds a run", "--resume", "--force")
    assert (run / "summary.json").read_text() == "{}"


def test_resume_without_a_run_is_refused(tmp_path):
    result = _quantize(tmp_path, "--resume")
    _assert_clean_failure(result, "no such run folder")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    recipe = _recipe(tmp_path, TINY_RECIPE.replace(
        "train: {epochs: 1,", "train: {epochs: 3, checkpoint_every_steps: 1, "
        "optimizer: {lr: 1.0e+30, momentum: 0.0},"))
    result = _quantize(tmp_path, recipe=recipe)
    _assert_clean_failure(result, "loss is", "step", "last good checkpoint is kept",
                          progress_before=True)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values()
               if v.is_floating_point())
    # the summary says training failed, and where (never that the run finished)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train"]["status"] == "failed" and "loss is" in summary["train"]["reason"]
    assert summary["export"] == {"status": "skipped", "reason": "training failed"}
    assert "quant_top1" not in summary
