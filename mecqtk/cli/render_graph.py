"""Rendering of layer reports and doctor results for the terminal (no I/O besides printing)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from mecqtk.doctor import DoctorResult, Explanation
from mecqtk.graph.quant_plan import QuantReport


def render_report(report: QuantReport, title: str, console: Console | None = None) -> None:
    """One row per quantizable layer or op: what it gets, or float and why."""
    console = console or Console()
    table = Table(title=title)
    table.add_column("layer / op", overflow="fold")
    for column in ("kind", "weight", "input(s)", "output", "status"):
        table.add_column(column)
    for row in report.rows:
        status = "quantized" if row.quantized else f"[red]float: {row.float_reason}[/red]"
        if row.quantized and row.eager:
            status += " (leaf code)"
        table.add_row(row.name, row.op, row.weight or "-", ", ".join(row.inputs) or "-",
                      row.output or "-", status)
    console.print(table)
    floats = report.layers_float
    console.print(
        f"{report.layers_quantized}/{report.layers_total} Conv/Linear layers quantized"
        + (f", {len(floats)} left float" if floats else "")
        + (f"; traced with {', '.join(report.auto_leaves)} kept whole (quant.leaf_modules)"
           if report.auto_leaves else "")
    )


def render_explanation(explanation: Explanation, console: Console | None = None) -> None:
    render_report(explanation.report, f"{explanation.model} · {explanation.recipe}", console)


def render_doctor(result: DoctorResult, console: Console | None = None) -> None:
    console = console or Console()
    if result.report is not None:
        render_report(result.report, f"{result.model} · {result.recipe}", console)

    def mark(flag: bool) -> str:
        return "[green]yes[/green]" if flag else "[red]no[/red]"

    kept = f" (kept whole: {', '.join(result.auto_leaves)})" if result.auto_leaves else ""
    console.print(f"traced: {mark(result.traced)}{kept}")
    console.print(f"forward ok: {mark(result.forward_ok)}   backward ok: {mark(result.backward_ok)}"
                  f"   input {tuple(result.input_size)}   {result.seconds:.1f} s")
    if result.not_run:
        console.print(f"[red]quantized layers that never ran:[/red] {', '.join(result.not_run)}")
    if result.error:
        console.print(f"[red]error:[/red] {result.error}")
    if result.steps:
        trained = len(result.losses) == result.steps and result.train_error is None
        losses = " → ".join(f"{loss:.3g}" for loss in result.losses) or "–"
        smallest = "–" if result.smallest_step is None else f"{result.smallest_step:.3g}"
        console.print(f"optimizer steps: {mark(trained)} {len(result.losses)}/{result.steps}"
                      f"   loss {losses}   smallest learned step {smallest}")
    if result.train_error:
        console.print(f"[red]training error:[/red] {result.train_error}")
    console.print(f"verdict: {mark(result.ok)}")
