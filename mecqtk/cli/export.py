"""`mecqtk export`: a run folder to an integer ONNX file and its quant manifest."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click
from rich.console import Console

from mecqtk.export.api import ExportResult


def render_export(result: ExportResult, console: Console | None = None) -> None:
    console = console or Console()
    console.print(
        f"wrote {result.model_path} ({result.file_bytes / 1e6:.2f} MB, {result.export_format}, "
        f"opset {result.opset}, {result.nodes} nodes, {result.quantized_tensors} quantized "
        f"tensors)\nmanifest: {result.manifest_path}"
    )


@click.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "export_format", type=click.Choice(["qcdq", "packed"]), default="qcdq",
              show_default=True,
              help="qcdq: int8 weight containers (deployable default); packed: INT4/INT2 weight "
                   "storage, a smaller file.")
@click.option("--opset", type=click.IntRange(min=1), default=None,
              help="ONNX opset [default: 21; 25 for packed 2-bit weights].")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output .onnx file [default: RUN_DIR/onnx-<format>/model.onnx].")
@click.option("--data", default=None,
              help="Images for the export's own onnxruntime check (16 of its validation set), "
                   "e.g. imagefolder:PATH [default: random inputs at the model's size].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON line.")
def export_command(run_dir: Path, export_format: str, opset: int | None, out: Path | None,
                   data: str | None, as_json: bool) -> None:
    """Export the trained model of RUN_DIR to ONNX with integer weights and activations.

    Writes quant_manifest.json (bits, scale, zero point, axis of every quantized tensor)
    beside the model. The file is run in onnxruntime against the model before it is written;
    if they disagree beyond the stated tolerance nothing is written and the command exits
    non-zero naming the first diverging tensor (`mecqtk verify` is the full real-data check).

    \b
    Example:
      mecqtk export runs/r20_w2a2 --format packed --data imagefolder:data/cifar10-jpeg
    """
    from mecqtk.run_export import export_run

    result = export_run(run_dir, export_format, opset, out, data)  # type: ignore[arg-type]
    if as_json:
        click.echo(json.dumps({k: str(v) if isinstance(v, Path) else v
                               for k, v in asdict(result).items()}))
    else:
        render_export(result)
