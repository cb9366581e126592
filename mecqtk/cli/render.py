"""Rendering of result dataclasses for the terminal (no I/O besides printing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from mecqtk.outcome import RunSummary


def render_summary(summary: RunSummary, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"{summary.model} · {summary.recipe}")
    table.add_column("epoch", justify="right")
    table.add_column("train loss", justify="right")
    table.add_column("val top-1 %", justify="right")
    table.add_column("seconds", justify="right")
    for record in summary.history:
        table.add_row(str(record["epoch"]), f"{record['train_loss']:.4f}",
                      f"{record['val_top1']:.2f}", f"{record['epoch_seconds']:.0f}")
    console.print(table)
    console.print(
        f"float top-1 {summary.fp_top1:.2f} %  ->  quantized top-1 {summary.quant_top1:.2f} %"
        f"   ({summary.wall_seconds:.0f} s)   run folder: {summary.out}"
    )
