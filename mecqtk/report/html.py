"""report.html: one self-contained page (inline CSS, figures as data: URIs, no scripts)."""

from __future__ import annotations

import base64
from html import escape

from mecqtk.report import plots, table
from mecqtk.report.jsonfile import SUGGESTED_RECIPE_FILE
from mecqtk.report.result import Report, Score

# Histograms are drawn for this many layers from the top of the ranking.
WORST_LAYERS_PLOTTED = 4

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f0f0f0; } th.name { text-align: left; }
td.name { text-align: left; font-family: monospace; }
.note { color: #555; font-size: 13px; } figure { margin: 12px 0; }
img { max-width: 100%; border: 1px solid #eee; }
"""


_NAME_COLUMNS = ("layer", "name")
_NAME_CLASS = ' class="name"'


def _image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption class=\"note\">{escape(alt)}</figcaption></figure>")


def _score(score: Score) -> str:
    return f"top-1 {score.top1:.2f} %, loss {score.loss:.4f}"


def _table(headers: list[table.Column], body: list[list[str]]) -> str:
    head = "".join(
        f'<th{_NAME_CLASS if c.title in _NAME_COLUMNS else ""} title="{escape(c.help)}">'
        f"{escape(c.title)}</th>" for c in headers)
    lines = []
    for row in body:
        cells = "".join(
            f"<td{_NAME_CLASS}>{escape(cell)}</td>" if headers[i].title in _NAME_COLUMNS
            else f"<td>{escape(cell)}</td>"
            for i, cell in enumerate(row)
        )
        lines.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _summary(report: Report) -> str:
    items = [
        f"<li>run <code>{escape(report.run)}</code>: model <b>{escape(report.model)}</b>, "
        f"recipe <b>{escape(report.recipe)}</b></li>",
        f"<li>{report.images} images from <code>{escape(report.data)}</code></li>",
        f"<li>quantized: {_score(report.quantized_score)}; float reference: "
        f"{_score(report.float_score)}; trained weights with quantizers bypassed: "
        f"{_score(report.bypass_score)}</li>",
        f"<li>float reference: {escape(report.reference.kind)} — "
        f"{escape(report.reference.detail)}</li>",
        f"<li>ranked by {escape(report.ranking_by)}, worst first</li>",
    ]
    return f"<ul>{''.join(items)}</ul>"


def _sensitivity_section(report: Report) -> str:
    sensitivity = report.sensitivity
    if sensitivity is None:
        return ""
    headers = [table.Column(t, h) for t, h in (
        ("name", "layer"), ("alone top-1", "only this layer quantized"),
        ("alone loss", "only this layer quantized"),
        ("loss added", "alone loss minus the all-float loss"),
        ("all-but top-1", "all layers quantized except this one"),
        ("all-but loss", "all layers quantized except this one"),
        ("loss recovered", "all-quantized loss minus all-but loss"))]
    order = {name: i for i, name in enumerate(report.ranking)}
    body = [
        [e.name, f"{e.alone.top1:.2f}", f"{e.alone.loss:.4f}",
         table.signed_number(sensitivity.loss_added(e.name), 4), f"{e.all_but.top1:.2f}",
         f"{e.all_but.loss:.4f}", table.signed_number(sensitivity.loss_recovered(e.name), 4)]
        for e in sorted(sensitivity.layers, key=lambda e: order.get(e.name, len(order)))
    ]
    raised = ", ".join(f"<code>{escape(n)}</code> → {b} bits"
                       for n, b in sensitivity.raised.items()) or "none"
    return (
        "<h2>Sensitivity</h2>"
        f"<p class=\"note\">probed model: {escape(sensitivity.subject.kind)} — "
        f"{escape(sensitivity.subject.detail)}.</p>"
        f"<p class=\"note\">all quantized: {_score(sensitivity.quantized_score)}; all float "
        f"(quantizers bypassed): {_score(sensitivity.float_score)}. Suggested recipe "
        f"<code>{SUGGESTED_RECIPE_FILE}</code> "
        f"(<code>{escape(sensitivity.suggested_recipe.name)}</code>) raises {raised}; "
        f"pass it to <code>mecqtk quantize --recipe</code>.</p>"
        + _image(plots.sensitivity_chart(sensitivity, report.ranking),
                 "Loss recovered / added per layer")
        + _table(headers, body)
    )


def _comparison_section(report: Report) -> str:
    comparison = report.comparison
    if comparison is None:
        return ""
    keys = list(comparison.layers[0].deltas) if comparison.layers else []
    headers = [table.Column("name", "layer")] + [
        table.Column(f"Δ {k}", "this run minus the compared run") for k in keys]
    body = [[d.name + ("" if d.in_this and d.in_other else
                       (" (this run only)" if d.in_this else " (other run only)"))]
            + [table.signed_number(d.deltas[k], 2) for k in keys] for d in comparison.layers]
    return (
        "<h2>Comparison</h2>"
        f"<p class=\"note\">this run: {_score(comparison.this_score)}; "
        f"<code>{escape(comparison.other_run)}</code> ({escape(comparison.other_recipe)}): "
        f"{_score(comparison.other_score)}. Deltas are this run minus the other.</p>"
        + (f"<p class=\"note\"><b>Note:</b> the runs' float references differ ("
           f"{escape(report.reference.kind)} here, {escape(comparison.other_reference.kind)} "
           "there), so the out-SQNR deltas compare errors against different models.</p>"
           if comparison.other_reference.kind != report.reference.kind else "")
        + _image(plots.compare_chart(comparison), "Per-layer SQNR change")
        + _table(headers, body)
    )


def render_html(report: Report) -> str:
    """The whole page as a string; every figure is embedded, nothing is fetched.

    Example:
        >>> page = render_html(report)  # doctest: +SKIP
        >>> page.count("data:image/png;base64,") >= 3  # doctest: +SKIP
        True
    """
    worst = report.ranking[:WORST_LAYERS_PLOTTED]
    histograms = "".join(
        _image(plots.layer_histograms(report, name),
               f"{name}: histograms with the quantization grid (black lines: levels, red "
               "dashes: saturation bounds)")
        for name in worst
    )
    title = f"mecqtk report · {report.model} · {report.recipe}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{escape(title)}</h1>{_summary(report)}"
        "<h2>Layers, worst first</h2>"
        + _table(table.columns(report), table.rows(report))
        + "<h2>SQNR per layer</h2>"
        + _image(plots.sqnr_chart(report), "SQNR per layer, in graph order")
        + "<h2>Level usage</h2>"
        + _image(plots.level_usage_chart(report), "Level usage per layer, in graph order")
        + f"<h2>Worst {len(worst)} layers: histograms</h2>" + histograms
        + _sensitivity_section(report)
        + _comparison_section(report)
        + "</body></html>\n"
    )
