"""Kill a run with SIGKILL mid-epoch, resume it, and get what an uninterrupted run gets."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from run_helpers import quantize_command, quantize_env

RECIPE = """
quant:
  weight: {bits: 4, granularity: per_channel}
  activation: {bits: 4}
  calibration: {batches: 1}
train:
  epochs: 2
  batch_size: 32
  eval_batch_size: 100
  optimizer: {lr: 0.01}
  checkpoint_every_steps: 2
  fused_quantizers: false
"""


def _checkpoint_step(path: Path) -> int | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["step"]
    except Exception:
        return None


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(shared_dir, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(quantize_command(shared_dir, recipe, reference), env=quantize_env(), check=True,
                   capture_output=True)

    process = subprocess.Popen(quantize_command(shared_dir, recipe, killed), env=quantize_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # 10 steps per epoch: kill once a mid-epoch checkpoint of the second epoch is on disk
    while time.time() < deadline:
        step = _checkpoint_step(killed / "checkpoint.pt")
        if step is not None and step >= 12:
            break
        if process.poll() is not None:
            pytest.fail("the run finished before it could be killed")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved_step = _checkpoint_step(killed / "checkpoint.pt")
    assert saved_step is not None and saved_step % 10 != 0  # really mid-epoch
    assert not (killed / "summary.json").exists()  # nothing that looks finished

    refused = subprocess.run(quantize_command(shared_dir, recipe, killed), env=quantize_env(),
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    subprocess.run(quantize_command(shared_dir, recipe, killed, "--resume"),
                   env=quantize_env(), check=True, capture_output=True)
    summary = json.loads((killed / "summary.json").read_text())
    # only the steps after the last checkpoint were redone
    assert summary["resumed_from_step"] == saved_step
    got, want = _metrics(killed), _metrics(reference)
    assert [m["epoch"] for m in got] == [1, 2]
    for a, b in zip(got, want, strict=True):
        assert a["train_loss"] == b["train_loss"]
        assert a["val_top1"] == b["val_top1"]
        assert a["step"] == b["step"]
    reference_state = torch.load(reference / "checkpoint.pt", weights_only=True)["state_dict"]
    resumed_state = torch.load(killed / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(reference_state[k], resumed_state[k]) for k in reference_state)
