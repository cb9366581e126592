"""`mecqtk quantize` end to end on a small slice of the real CIFAR-10, through click."""

import json
from pathlib import Path

import torch
import yaml
from click.testing import CliRunner

from mecqtk.cli import main
from mecqtk.rundir import load_quantized_model


def test_quantize_writes_a_complete_run_folder(shared_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "quant: {weight: {bits: 4, granularity: per_channel}, activation: {bits: 4}}\n"
        "train: {epochs: 1, batch_size: 32, eval_batch_size: 100, fused_quantizers: false}\n"
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "quantize", "--model", "cifar_resnet20",
        "--checkpoint", str(shared_dir / "data/weights/cifar-resnet/resnet20-12fca82f.th"),
        "--recipe", str(recipe), "--data", f"imagefolder:{shared_dir / 'data/cifar10-jpeg'}",
        "--limit-train", "320", "--limit-val", "200", "--out", str(out), "--no-progress",
        "--json", "--batch-size", "40",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    written = json.loads((out / "summary.json").read_text())
    assert summary.items() <= written.items()
    assert {"fp_top1", "quant_top1", "epochs", "wall_seconds"} <= set(summary)
    assert summary["epochs"] == 1
    assert 60 < summary["fp_top1"] <= 100 and 40 < summary["quant_top1"] <= 100
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1]
    assert metrics[0]["val_top1"] == summary["quant_top1"]
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["quant"]["weight"]["bits"] == 4 and resolved["train"]["epochs"] == 1
    assert resolved["train"]["batch_size"] == 40  # --batch-size overrides the recipe's 32
    assert (out / "report.json").is_file() and (out / "report.html").is_file()
    # integer ONNX exported and checked against the trained model with onnxruntime
    export = written["export"]
    assert export["status"] == "verified" and Path(export["onnx"]).is_file()
    assert export["top1_agreement_pct"] >= export["threshold_pct"] == 99.0
    assert written["report"] == {"status": "written"}
    # the run folder rebuilds the trained model exactly
    qmodel, info, _ = load_quantized_model(out)
    assert info.model == "cifar_resnet20" and info.num_classes == 10
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in qmodel.state_dict().items())
