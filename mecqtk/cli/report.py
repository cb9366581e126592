"""`mecqtk report`: per-layer quantization error audit of a run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from mecqtk.report import WrittenReport


def render_report(written: WrittenReport, console: Console | None = None) -> None:
    """The ranking table, the accuracies and the files written, for the terminal."""
    from mecqtk.report import table

    console = console or Console()
    report = written.report
    grid = Table(title=f"{report.model} · {report.recipe} · {report.images} images · "
                       f"worst first by {report.ranking_by}", box=box.SIMPLE_HEAD,
                 pad_edge=False)
    name_width = max(len(entry.name) for entry in report.layers)
    for column in table.columns(report, compact=True):
        if column.title == "layer":  # names stay whole; narrow terminals squeeze the numbers
            grid.add_column(column.title, no_wrap=True, min_width=name_width)
        else:
            grid.add_column(column.title, justify="right")
    for row in table.rows(report, compact=True):
        grid.add_row(*row)
    console.print(grid)
    console.print(
        f"quantized top-1 {report.quantized_score.top1:.2f} % (loss "
        f"{report.quantized_score.loss:.4f}); float reference top-1 "
        f"{report.float_score.top1:.2f} % ({report.reference.kind})", highlight=False)
    if report.sensitivity is not None:
        raised = ", ".join(f"{name} -> {bits} bits"
                           for name, bits in report.sensitivity.raised.items()) or "none"
        console.print(f"suggested recipe raises: {raised}", highlight=False)
    if report.comparison is not None:
        other = report.comparison
        console.print(f"compared with {other.other_run} ({other.other_recipe}): top-1 "
                      f"{other.this_score.top1:.2f} % vs {other.other_score.top1:.2f} %",
                      highlight=False)
        if other.other_reference.kind != report.reference.kind:
            console.print(f"note: float references differ ({report.reference.kind} here, "
                          f"{other.other_reference.kind} there): Δ out compares errors "
                          "against different models", highlight=False)
    console.print("wrote " + ", ".join(str(path) for path in written.files), highlight=False)


@click.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--data", help="Data to measure on [default: the run's own data].")
@click.option("--n", "n", type=click.IntRange(min=1), default=500, show_default=True,
              help="Validation images (a fixed class-balanced subset).")
@click.option("--sensitivity", is_flag=True,
              help="Quantize one layer at a time (and all but one); suggest a mixed recipe.")
@click.option("--raise-top", type=click.IntRange(min=0), default=3, show_default=True,
              help="Layers the suggested recipe raises to 4 or 8 bits (with --sensitivity).")
@click.option("--compare", type=click.Path(path_type=Path),
              help="Another run folder: per-layer deltas against it, on the same images.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where to measure; auto: cuda when a GPU is available.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead.")
@click.option("--no-progress", is_flag=True, help="No status lines or progress bars.")
def report_command(run_dir, data, n, sensitivity, raise_top, compare, device, as_json,
                   no_progress) -> None:
    """Measure every quantized layer of RUN_DIR; write report.json and report.html into it.

    \b
    Example:
      mecqtk report runs/r20_w2a2 --n 500 --sensitivity --compare runs/r20_w2a2_mec
    """
    from mecqtk.device import resolve_device
    from mecqtk.report import ReportOptions, report_to_json, write_report

    written = write_report(run_dir, options=ReportOptions(
        data=data, n=n, sensitivity=sensitivity, raise_top=raise_top, compare=compare,
        device=str(resolve_device(device)), show_progress=not (no_progress or as_json),
    ))
    if as_json:
        click.echo(json.dumps(report_to_json(written.report), allow_nan=False))
    else:
        render_report(written)
