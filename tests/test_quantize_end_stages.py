"""A failing export, verify or report at the end of `mecqtk quantize` never loses the run:
summary.json and the checkpoint are written, and the command fails with one retry line."""

import json

import pytest
import torch
from click.testing import CliRunner

import mecqtk.export
import mecqtk.report
import mecqtk.run_export
import mecqtk.train.session
from mecqtk.cli import main
from mecqtk.errors import ExportError
from mecqtk.run_export import export_run, verify_run
from mecqtk.train.loop import NonFiniteLossError


@pytest.fixture
def quantize_r20(shared_dir, tmp_path):
    """Runs `mecqtk quantize` on cifar_resnet20 (calibration only) with extra options."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "quant: {weight: {bits: 4, granularity: per_channel}, activation: {bits: 4}}\n"
        "train: {epochs: 0, batch_size: 32, eval_batch_size: 100, fused_quantizers: false}\n"
    )
    out = tmp_path / "run"
    data = f"imagefolder:{shared_dir / 'data/cifar10-jpeg'}"

    def run(*extra: str):
        result = CliRunner().invoke(main, [
            "quantize", "--model", "cifar_resnet20",
            "--checkpoint", str(shared_dir / "data/weights/cifar-resnet/resnet20-12fca82f.th"),
            "--recipe", str(recipe), "--data", data, "--limit-train", "64",
            "--limit-val", "100", "--out", str(out), "--no-progress", "--json", *extra,
        ])
        summary = json.loads((out / "summary.json").read_text())
        return result, summary, out
    return run


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_export_crash_keeps_the_run_and_names_the_node(quantize_r20, monkeypatch, one_torch_thread):
    def broken_export(*args, **kwargs):
        err = ExportError("layer1_0_conv1: quantized Conv2d has no ONNX lowering")
        err.node = "layer1_0_conv1"
        raise err

    monkeypatch.setattr(mecqtk.run_export, "export_and_verify", broken_export)
    result, summary, out = quantize_r20("--no-report")
    assert result.exit_code == 1
    line = _error_line(result)
    assert "export failed at node layer1_0_conv1" in line
    assert f"mecqtk export {out}" in line
    assert summary["export"]["status"] == "failed"
    assert summary["export"]["failing_node"] == "layer1_0_conv1"
    assert "no ONNX lowering" in summary["export"]["reason"]
    assert summary["report"]["status"] == "skipped"
    assert 60 < summary["quant_top1"] <= 100
    # the summary is also printed, and the checkpoint is a loadable trained model
    assert json.loads(result.stdout.strip().splitlines()[-1])["export"]["status"] == "failed"
    assert "state_dict" in torch.load(out / "checkpoint.pt", weights_only=True)
    assert "ExportError" in (out / "export-error.log").read_text()


def test_unexpected_exporter_bug_is_a_failed_export_not_a_traceback(quantize_r20, monkeypatch,
                                                                     one_torch_thread):
    def buggy_export(*args, **kwargs):
        raise TypeError("split is not a tensor")

    monkeypatch.setattr(mecqtk.run_export, "export_and_verify", buggy_export)
    result, summary, _ = quantize_r20("--no-report")
    assert result.exit_code == 1
    assert "export failed: TypeError: split is not a tensor" in _error_line(result)
    assert summary["export"] == {
        "status": "failed", "reason": "TypeError: split is not a tensor",
        "retry": summary["export"]["retry"]}


def test_low_agreement_export_fails_the_command(quantize_r20, monkeypatch, one_torch_thread):
    """A real ONNX file that computes something else (the classifier's sign flipped in the
    checkpoint it is compared with) agrees on few decisions: quantize must not exit 0."""

    def mismatched_export(run_dir, data, *, n=None, threshold_pct=99.0, show_progress=False,
                          **kwargs):
        exported = export_run(run_dir)
        checkpoint = run_dir / "checkpoint.pt"
        original = checkpoint.read_bytes()
        state = torch.load(checkpoint, weights_only=True)
        weights = state["state_dict"]
        classifier = next(k for k, v in weights.items() if k.endswith("weight") and v.dim() == 2)
        for key in (classifier, classifier.replace("weight", "bias")):
            weights[key] = -weights[key]
        torch.save(state, checkpoint)
        try:
            report = verify_run(exported.model_path, data, n, threshold_pct=threshold_pct,
                                run_dir=run_dir)
        finally:
            checkpoint.write_bytes(original)
        return exported, report

    monkeypatch.setattr(mecqtk.run_export, "export_and_verify", mismatched_export)
    result, summary, out = quantize_r20("--no-report")
    assert result.exit_code == 1
    export = summary["export"]
    assert export["status"] == "failed" and export["images"] == 100
    assert export["top1_agreement_pct"] < 20.0 and export["threshold_pct"] == 99.0
    assert "needs 99 %" in _error_line(result)
    assert (out / "onnx-qcdq" / "model.onnx").is_file()


def test_no_export_is_skipped_and_exits_0(quantize_r20, one_torch_thread):
    result, summary, out = quantize_r20("--no-report", "--no-export")
    assert result.exit_code == 0, result.output
    assert summary["export"] == {"status": "skipped", "reason": "--no-export"}
    assert not (out / "onnx-qcdq").exists()


def test_report_crash_keeps_the_summary(quantize_r20, monkeypatch, one_torch_thread):
    def broken_report(*args, **kwargs):
        raise RuntimeError("histogram of an empty tensor")

    monkeypatch.setattr(mecqtk.report, "write_report", broken_report)
    result, summary, out = quantize_r20("--no-export")
    assert result.exit_code == 1
    line = _error_line(result)
    assert "report failed: RuntimeError: histogram of an empty tensor" in line
    assert f"mecqtk report {out}" in line
    assert summary["report"]["status"] == "failed"
    assert summary["export"]["status"] == "skipped"


def test_biases_that_cannot_be_snapped_do_not_lose_the_run(quantize_r20, monkeypatch,
                                                           one_torch_thread):
    """timm's zero-initialised gammas can leave a folded weight scale too small for an int32
    bias; that must fail the export, not the run before its checkpoint is written."""

    def unsnappable(gm):
        raise ExportError("layer2_0_conv2: channel 18 has a bias of 0.0001261 that needs "
                          "4.18e+09 steps of the int32 accumulator")

    monkeypatch.setattr(mecqtk.export, "snap_biases", unsnappable)
    result, summary, out = quantize_r20("--no-report", "--no-export", "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert "biases left off the int32 grid (layer2_0_conv2: channel 18" in " ".join(
        result.output.split())
    assert summary["epochs"] == 1 and 60 < summary["quant_top1"] <= 100
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize(("error", "code", "line"), [
    (NonFiniteLossError("loss is nan at step 2 of epoch 1"), 2,
     "error: loss is nan at step 2 of epoch 1"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), 1,
     "error: training failed: RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
])
def test_a_training_failure_leaves_a_summary(error, code, line, quantize_r20, monkeypatch,
                                             one_torch_thread):
    def failing_epoch(*args, **kwargs):
        raise error

    monkeypatch.setattr(mecqtk.train.session, "train_one_epoch", failing_epoch)
    result, summary, out = quantize_r20("--epochs", "1")
    assert result.exit_code == code
    assert _error_line(result).startswith(line)
    assert summary["train"] == {"status": "failed", "reason": line.split("failed: ")[-1]
                                .removeprefix("error: ")}
    assert summary["export"]["status"] == summary["report"]["status"] == "skipped"
    assert summary["epochs_finished"] == 0 and 60 < summary["calibrated_top1"] <= 100
    assert type(error).__name__ in (out / "train-error.log").read_text()
    # the calibrated model was checkpointed before training began
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 0


def test_force_clears_what_a_failed_run_left(quantize_r20, monkeypatch, one_torch_thread):
    def broken_export(*args, **kwargs):
        raise ExportError("fc: no lowering")

    with monkeypatch.context() as patched:
        patched.setattr(mecqtk.run_export, "export_and_verify", broken_export)
        result, _, out = quantize_r20("--no-report")
    assert result.exit_code == 1 and (out / "export-error.log").is_file()
    result, summary, out = quantize_r20("--force", "--no-report", "--no-export")
    assert result.exit_code == 0, result.output
    assert summary["export"]["status"] == "skipped"
    assert not (out / "export-error.log").exists()
