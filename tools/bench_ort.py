"""Latency and file size of mecqtk's integer ONNX exports against FP32 and onnxruntime's own int8.

For each model: the FP32 ONNX file (torch.onnx.export), onnxruntime's static int8 quantization of
that file (QDQ, per-channel weights, the peer), and mecqtk's W8A8, W4A4 and W2A2 exports as qcdq
and packed.
Weights are random (latency and size do not depend on them), BatchNorm
statistics are made trained-looking, and every quantizer is calibrated on real CIFAR-10 images
(resized to the model's input size). Latency: median of --runs timed runs after --warmup, at
batch 1 and 8, with --threads intra-op threads.

Usage:
    MECQTK_SHARED=../shared python tools/bench_ort.py --models resnet18,resnet50,cifar_resnet20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnxruntime import quantization as ortq
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mecqtk.data import build_data  # noqa: E402
from mecqtk.export import export_model  # noqa: E402
from mecqtk.models import create_model  # noqa: E402
from mecqtk.qat import prepare  # noqa: E402
from mecqtk.quant.calibrate import calibrate  # noqa: E402
from mecqtk.recipe import Recipe, load_recipe, recipe_from_dict  # noqa: E402

W8A8 = {
    "name": "w8a8_lsq",
    "quant": {"weight": {"bits": 8, "granularity": "per_channel"}, "activation": {"bits": 8}},
}
RECIPES = {"W8A8": None, "W4A4": "w4a4_lsq.yaml", "W2A2": "w2a2_lsq.yaml"}
NUM_CLASSES = {"cifar_resnet20": 10}


@dataclass
class Row:
    model: str
    variant: str
    file_mb: float
    batch1_ms: float
    batch8_ms: float
    speedup_b1: float = 0.0
    speedup_b8: float = 0.0
    size_ratio: float = 0.0


def shared_dir() -> Path:
    override = os.environ.get("MECQTK_SHARED")
    path = Path(override) if override else REPO.parent / "shared"
    if not (path / "data" / "cifar10-jpeg").is_dir():
        sys.exit(f"real images not found under {path}/data/cifar10-jpeg; set MECQTK_SHARED")
    return path


def trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random but non-trivial BatchNorm statistics, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.weight.copy_(torch.rand(c, generator=generator) * 0.5 + 0.5)
                bn.bias.copy_(torch.randn(c, generator=generator) * 0.1)
                bn.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                bn.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
    return model.eval()


def calibration_images(model: nn.Module, count: int, size: tuple[int, int]) -> torch.Tensor:
    """Real CIFAR-10 test images, normalised for ``model`` and resized to its input size."""
    proxy = nn.Module()  # the model's normalisation, CIFAR-10's ten classes
    proxy.pretrained_cfg = model.pretrained_cfg
    data = build_data(f"imagefolder:{shared_dir() / 'data' / 'cifar10-jpeg'}", model=proxy,
                      batch_size=count, limit_train=1, limit_val=count, seed=0)
    images = next(iter(data.val_loader))[0]
    if tuple(images.shape[2:]) != size:
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return images


def export_fp32(model: nn.Module, shape: tuple[int, ...], path: Path) -> None:
    torch.onnx.export(model, (torch.randn(1, *shape),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})


class _Reader(ortq.CalibrationDataReader):
    def __init__(self, images: torch.Tensor) -> None:
        self.batches = iter([{"input": images[i:i + 8].numpy()} for i in range(0, len(images), 8)])

    def get_next(self):
        return next(self.batches, None)


def export_ort_int8(fp32: Path, images: torch.Tensor, path: Path) -> None:
    """onnxruntime's recommended static int8 recipe: QDQ, per-channel s8 weights, u8 activations."""
    prepared = path.with_suffix(".pre.onnx")
    ortq.quant_pre_process(str(fp32), str(prepared))
    ortq.quantize_static(str(prepared), str(path), _Reader(images),
                         quant_format=ortq.QuantFormat.QDQ, per_channel=True,
                         activation_type=ortq.QuantType.QUInt8, weight_type=ortq.QuantType.QInt8,
                         calibrate_method=ortq.CalibrationMethod.MinMax)
    prepared.unlink()


def export_ours(model: nn.Module, recipe: Recipe, images: torch.Tensor, shape: tuple[int, ...],
                folder: Path, label: str) -> dict[str, Path]:
    gm = prepare(model, recipe)
    calibrate(gm, [images[i:i + 16] for i in range(0, len(images), 16)])
    gm.eval()
    paths = {}
    for variant in ("qcdq", "packed"):
        onnx_model, _ = export_model(gm, shape, variant)  # type: ignore[arg-type]
        path = folder / f"{label}_{variant}.onnx"
        path.write_bytes(onnx_model.SerializeToString())
        paths[variant] = path
    return paths


def median_ms(path: Path, batch: int, shape: tuple[int, ...], runs: int, warmup: int,
              threads: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(
        (batch, *shape)).astype(np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def bench_model(name: str, args: argparse.Namespace, folder: Path) -> list[Row]:
    torch.manual_seed(0)
    model = trained_looking(create_model(name, num_classes=NUM_CLASSES.get(name, 1000)))
    shape = tuple(model.pretrained_cfg["input_size"])
    images = calibration_images(model, args.calibration_images, shape[1:])
    files: dict[str, Path] = {"FP32": folder / f"{name}_fp32.onnx"}
    export_fp32(model, shape, files["FP32"])
    files["ORT int8 (static QDQ)"] = folder / f"{name}_ort_int8.onnx"
    export_ort_int8(files["FP32"], images, files["ORT int8 (static QDQ)"])
    for label, recipe_file in RECIPES.items():
        recipe = recipe_from_dict(W8A8) if recipe_file is None else load_recipe(recipe_file)
        for export_format, path in export_ours(model, recipe, images, shape, folder,
                                                f"{name}_{label}").items():
            files[f"mecqtk {label} {export_format}"] = path
    rows = []
    for variant, path in files.items():
        b1 = median_ms(path, 1, shape, args.runs, args.warmup, args.threads)
        b8 = median_ms(path, 8, shape, args.runs, args.warmup, args.threads)
        rows.append(Row(name, variant, path.stat().st_size / 1e6, b1, b8))
        print(f"  {name:15s} {variant:24s} {rows[-1].file_mb:8.2f} MB {b1:9.2f} ms {b8:9.2f} ms",
              file=sys.stderr, flush=True)
    base = rows[0]
    for row in rows:
        row.speedup_b1 = base.batch1_ms / row.batch1_ms
        row.speedup_b8 = base.batch8_ms / row.batch8_ms
        row.size_ratio = row.file_mb / base.file_mb
    return rows


def table(rows: list[Row], threads: int, runs: int) -> str:
    lines = [
        f"onnxruntime {ort.__version__}, {threads} intra-op threads, median of {runs} runs",
        "",
        "| model | variant | file MB | × FP32 size | batch 1 ms | speed-up | batch 8 ms "
        "| speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.variant} | {r.file_mb:.2f} | {r.size_ratio:.3f} | "
            f"{r.batch1_ms:.2f} | {r.speedup_b1:.2f}× | {r.batch8_ms:.2f} | {r.speedup_b8:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,cifar_resnet20")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--keep", type=Path, default=None, help="Keep the ONNX files here.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows as JSON.")
    args = parser.parse_args(argv)
    if args.runs < 20:
        parser.error("--runs must be at least 20")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            rows += bench_model(name.strip(), args, folder)
    print(table(rows, args.threads, args.runs))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
