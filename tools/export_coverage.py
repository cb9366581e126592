"""Export coverage: timm models x bit widths -> integer ONNX, checked in onnxruntime on real images.

For each model (default: the 25 of ``tools/zoo.py``) and each of W8A8, W4A4, W2A2 it does what
a new user's calibrated model goes through: prepare with the LSQ recipe at that width, settle the
BatchNorm statistics on real training images, calibrate the step sizes on them, snap the biases,
then ``export_model`` (convert -> torch.onnx -> self-check on 16 real images). The file is run in
onnxruntime against the PyTorch model on N real CIFAR-10 test images (top-1 agreement, max
|delta logit| / logit range), onnxruntime's optimised graph is read back to count how many
Conv/MatMul/Gemm nodes run on integer kernels, and the file size is recorded.

Usage (from the repository root):
    python tools/export_coverage.py                           # the 25, W8A8 W4A4 W2A2
    python tools/export_coverage.py --bits 4,2 --json out.jsonl
    python tools/export_coverage.py --models resnet18,vit_tiny_patch16_224 --bits 4
    python tools/export_coverage.py --models further --bits 4,2   # held-out architectures
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mecqtk  # noqa: E402
from mecqtk.export import compare, export_model, snap_biases  # noqa: E402
from mecqtk.export.convert import convert  # noqa: E402
from mecqtk.models.input_fit import fit_model_to_images  # noqa: E402
from mecqtk.recipe.loader import recipe_from_dict  # noqa: E402
from zoo import COVERAGE_MODELS, FURTHER_MODELS, small_model  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
RECIPES = {4: "w4a4_lsq.yaml", 2: "w2a2_lsq.yaml"}
INTEGER_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
               "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
FLOAT_OPS = {"Conv", "FusedConv", "MatMul", "Gemm", "FusedGemm", "FusedMatMul", "NhwcFusedConv"}


@dataclass
class Row:
    model: str
    bits: int
    exported: bool
    reason: str = ""
    top1_agreement_pct: float | None = None
    max_rel_logit_diff: float | None = None
    deploy_top1_agreement_pct: float | None = None
    model_deploy_top1_agreement_pct: float | None = None
    integer_kernel_fraction: float | None = None
    integer_nodes: int = 0
    float_nodes: int = 0
    file_bytes: int = 0
    seconds: float = 0.0


def load_images(split: str, n: int, side: int,
                offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of ``split`` (classes in turn), resized to ``side`` and normalised."""
    classes = sorted(p.name for p in (DATA / split).iterdir())
    files = [sorted((DATA / split / c).glob("*.jpg")) for c in classes]
    images, labels = [], []
    for i in range(offset, offset + n):
        label = i % len(classes)
        image = Image.open(files[label][i // len(classes)]).convert("RGB")
        if image.size != (side, side):
            image = image.resize((side, side), Image.BILINEAR)
        array = (np.asarray(image, np.float32) / 255.0 - MEAN) / STD
        images.append(torch.from_numpy(array.transpose(2, 0, 1).copy()))
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def recipe_for(bits: int) -> mecqtk.Recipe:
    """The shipped LSQ recipe at 4 and 2 bits; at 8 bits the W4A4 one with every width 8."""
    if bits != 8:
        return mecqtk.load_recipe(RECIPES[bits])
    return recipe_from_dict({
        "name": "w8a8_lsq",
        "quant": {
            "weight": {"bits": 8, "quantizer": "lsq", "granularity": "per_channel",
                       "observer": "mse"},
            "activation": {"bits": 8, "quantizer": "lsq", "observer": "mse"},
        },
    })


def integer_kernels(model_path: Path) -> tuple[int, int]:
    """(integer, float) Conv/MatMul/Gemm nodes in the graph onnxruntime runs."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    optimized = model_path.with_suffix(".opt.onnx")
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    return sum(op in INTEGER_OPS for op in ops), sum(op in FLOAT_OPS for op in ops)


def model_for(name: str) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """A zoo model at its small input, any other timm model fitted to 32-px images as
    `mecqtk quantize` fits it (run as is, built at that size, or at its own size)."""
    if name in COVERAGE_MODELS:
        return small_model(name)
    import timm

    fit = fit_model_to_images(name, 10, (3, 32, 32))
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **fit.model_kwargs)
    return model, fit.input_size


def run_one(name: str, bits: int, n: int, folder: Path) -> Row:
    import onnx

    start = time.perf_counter()
    row = Row(name, bits, False)
    try:
        torch.manual_seed(0)
        model, shape = model_for(name)
        gm = mecqtk.prepare(model, recipe_for(bits))
        train, _ = load_images("train", 64, shape[-1])
        gm.train()
        with torch.no_grad():  # BatchNorm statistics settled on real images
            for batch in train.split(16):
                gm(batch)
        gm.eval()
        mecqtk.calibrate(gm, list(train.split(16)))
        snap_biases(gm)
        test, labels = load_images("test", n, shape[-1])
        exported, manifest = export_model(gm, tuple(shape), "qcdq", probe=train[:16])
        path = folder / f"{name}_w{bits}.onnx"
        onnx.save(exported, str(path))
        row.exported = True
        row.file_bytes = path.stat().st_size
        batches = list(zip(test.split(64), labels.split(64), strict=True))
        report = compare(gm, exported, manifest, batches, threads=1, deploy=convert(gm)[0])
        row.top1_agreement_pct = report.top1_agreement_pct
        row.max_rel_logit_diff = report.max_rel_logit_diff
        row.deploy_top1_agreement_pct = report.deploy_top1_agreement_pct
        row.model_deploy_top1_agreement_pct = report.model_deploy_top1_agreement_pct
        row.integer_nodes, row.float_nodes = integer_kernels(path)
        total = row.integer_nodes + row.float_nodes
        row.integer_kernel_fraction = row.integer_nodes / total if total else None
        if not report.passed:
            row.reason = f"first diverging: {report.first_diverging_layer}"
    except Exception as err:  # one model's failure is a row, not the end of the table
        lines = [line for line in str(err).splitlines() if line.strip()]
        row.reason = f"{type(err).__name__}: {lines[0][:160] if lines else ''}"
        if "--debug" in sys.argv:
            traceback.print_exc()
    row.seconds = time.perf_counter() - start
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(COVERAGE_MODELS),
                        help="comma-separated timm names, or 'further' for the held-out list "
                             "(default: the 25 of tools/zoo.py)")
    parser.add_argument("--bits", default="8,4,2", help="comma-separated widths: 8, 4, 2")
    parser.add_argument("--n", type=int, default=256, help="real test images per model")
    parser.add_argument("--json", type=Path, help="also append every row as a JSON line here")
    parser.add_argument("--debug", action="store_true", help="print tracebacks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not DATA.is_dir():
        print(f"error: {DATA} not found (real CIFAR-10 images are needed)", file=sys.stderr)
        return 2
    console = Console(width=160)
    table = Table(title=f"mecqtk export coverage ({args.n} real CIFAR-10 test images)")
    for column in ("model", "bits", "exported", "top-1 agree %", "vs deploy %", "deploy vs model %",
                   "max |dlogit|/range",
                   "integer kernels", "size KB", "s", "reason"):
        table.add_column(column)
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        names = FURTHER_MODELS if args.models == "further" else args.models.split(",")
        for name in names:
            for bits in (int(b) for b in args.bits.split(",")):
                row = run_one(name, bits, args.n, Path(tmp))
                rows.append(row)
                console.print(f"{name} W{bits}A{bits}: exported={row.exported} "
                              f"agree={row.top1_agreement_pct} {row.reason} "
                              f"({row.seconds:.0f} s)")
                if args.json:
                    with args.json.open("a") as handle:
                        handle.write(json.dumps(asdict(row)) + "\n")
                table.add_row(
                    name, f"W{bits}A{bits}",
                    "[green]yes[/green]" if row.exported else "[red]no[/red]",
                    "" if row.top1_agreement_pct is None else f"{row.top1_agreement_pct:.1f}",
                    "" if row.deploy_top1_agreement_pct is None
                    else f"{row.deploy_top1_agreement_pct:.1f}",
                    "" if row.model_deploy_top1_agreement_pct is None
                    else f"{row.model_deploy_top1_agreement_pct:.1f}",
                    "" if row.max_rel_logit_diff is None else f"{row.max_rel_logit_diff:.2e}",
                    "" if row.integer_kernel_fraction is None
                    else f"{row.integer_nodes}/{row.integer_nodes + row.float_nodes}",
                    f"{row.file_bytes / 1024:.0f}" if row.file_bytes else "",
                    f"{row.seconds:.0f}", row.reason,
                )
    console.print(table)
    for bits in sorted({r.bits for r in rows}, reverse=True):
        at = [r for r in rows if r.bits == bits]
        good = sum(1 for r in at if r.exported and (r.top1_agreement_pct or 0) >= 99.0)
        console.print(f"W{bits}A{bits}: {good}/{len(at)} exported with top-1 agreement >= 99 %")
    console.print(f"wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
