"""Two gloo processes under torchrun reproduce one process with the same global batch."""

import json
import subprocess
from pathlib import Path

import pytest

from run_helpers import quantize_command, quantize_env

RECIPE = """
quant:
  weight: {bits: 4, granularity: per_channel}
  activation: {bits: 4}
  calibration: {batches: 1}
train:
  epochs: 1
  batch_size: 32
  eval_batch_size: 100
  optimizer: {lr: 0.01}
  fused_quantizers: false
mec: {enabled: true, view: teacher}
"""


def _run(shared_dir: Path, recipe: Path, out: Path, nproc: int) -> dict:
    command = quantize_command(shared_dir, recipe, out, "--nproc", str(nproc))
    result = subprocess.run(command, env=quantize_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def test_two_processes_match_one_process_with_the_same_global_batch(shared_dir, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    one = _run(shared_dir, recipe, tmp_path / "one", 1)
    two = _run(shared_dir, recipe, tmp_path / "two", 2)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    # Same global batches, same per-sample augmentation, same steps; what differs is BatchNorm
    # statistics over 16 instead of 32 images per process. Stated tolerances:
    assert two["step"] == one["step"] == 10
    assert abs(two["val_top1"] - one["val_top1"]) <= 5.0
    assert abs(two["train_ce"] - one["train_ce"]) <= 0.25
    # the MEC term sees the all-gathered global batch in both runs
    assert two["train_log_coding_length_per_sample"] == pytest.approx(
        one["train_log_coding_length_per_sample"], rel=0.05)
    # epoch sums are reduced over ranks: 320 images -> multiples of 100/320 %
    assert (two["train_top1"] * 320 / 100) == pytest.approx(round(two["train_top1"] * 3.2))
