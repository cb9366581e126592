"""`mecqtk verify`: onnxruntime against the PyTorch quantized model on real images."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from mecqtk.export.verify import DEFAULT_THRESHOLD_PCT, VerifyReport

VERIFY_FAILED_EXIT = 1


def render_verify(report: VerifyReport, all_layers: bool = False,
                  console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"per-layer integer codes, onnxruntime vs PyTorch ({report.n} images)")
    for column in ("layer", "bits", "codes differing %", "max |Δcode|", "mean |Δcode|"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    shown = [layer for layer in report.layers if all_layers or layer.differing]
    for layer in shown:
        table.add_row(layer.layer, str(layer.bits), f"{layer.differing_pct:.4f}",
                      str(layer.max_abs_diff), f"{layer.mean_abs_diff:.2f}")
    if shown:
        console.print(table)
    identical = len(report.layers) - sum(1 for layer in report.layers if layer.differing)
    console.print(f"{identical} of {len(report.layers)} quantized activations identical")
    console.print(
        f"first diverging layer: {report.first_diverging_layer or 'none'}\n"
        f"top-1 agreement {report.top1_agreement_pct:.2f} %  "
        f"(onnx top-1 {report.onnx_top1_pct:.2f} %, torch top-1 {report.torch_top1_pct:.2f} %)\n"
        f"|Δlogit| max {report.max_abs_logit_diff:.4g}  mean {report.mean_abs_logit_diff:.3g}  "
        f"max relative to the logit range {report.max_rel_logit_diff:.3g}\n"
        f"{_reproducibility(report)}"
        f"{'PASS' if report.passed else 'FAIL'} (threshold {report.threshold_pct:g} %)  "
        f"{report.seconds:.0f} s"
    )
    if report.off_grid_bias_layers:
        console.print(
            f"note: {report.off_grid_bias_layers} layers of the PyTorch model have biases off "
            "the int32 grid the export rounds them to; mecqtk.export.snap_biases(model) before "
            "the final evaluation makes both compute the same thing"
        )


def _reproducibility(report: VerifyReport) -> str:
    if report.deploy_top1_agreement_pct is None or report.model_deploy_top1_agreement_pct is None:
        return ""
    return (f"onnx vs the deploy form it was exported from: "
            f"{report.deploy_top1_agreement_pct:.2f} % top-1 agreement; deploy form (BN folded, "
            f"int32 biases) vs the trained model: {report.model_deploy_top1_agreement_pct:.2f} %\n")


@click.command("verify")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="imagefolder:PATH or cifar10:PATH (its eval split).")
@click.option("--n", "n", type=click.IntRange(min=1), default=None,
              help="Number of images (class-balanced subset) [default: all].")
@click.option("--threshold", type=click.FloatRange(0, 100), default=DEFAULT_THRESHOLD_PCT,
              show_default=True, help="Minimum top-1 agreement in percent.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder of an ONNX file exported elsewhere.")
@click.option("--format", "export_format", type=click.Choice(["qcdq", "packed"]), default="qcdq",
              show_default=True, help="Which export of a run folder to verify.")
@click.option("--batch-size", type=click.IntRange(min=1), default=100, show_default=True,
              help="Images per onnxruntime and PyTorch batch.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="onnxruntime intra-op threads.")
@click.option("--all-layers", is_flag=True, help="List identical layers too.")
@click.option("--json", "as_json", is_flag=True, help="Print verify.json's content as one line.")
def verify_command(target: Path, data: str, n: int | None, threshold: float, run_dir: Path | None,
                   export_format: str, batch_size: int, threads: int, all_layers: bool,
                   as_json: bool) -> None:
    """Run TARGET (a run folder or an exported .onnx) in onnxruntime and the PyTorch quantized
    model on the same real images; compare top-1, logits and every layer's integer codes.

    Writes verify.json beside the ONNX file; exits with status 1 when top-1 agreement is
    below --threshold.

    \b
    Example:
      mecqtk verify runs/r20_w2a2 --data imagefolder:../shared/data/cifar10-jpeg --n 2000
    """
    from mecqtk.run_export import verify_run

    report = verify_run(target, data, n, threshold_pct=threshold, run_dir=run_dir,
                        export_format=export_format, batch_size=batch_size,  # type: ignore[arg-type]
                        threads=threads, show_progress=not as_json)
    if as_json:
        click.echo(json.dumps(report.as_json()))
    else:
        render_verify(report, all_layers)
    if not report.passed:
        raise SystemExit(VERIFY_FAILED_EXIT)
