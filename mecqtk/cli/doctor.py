"""`mecqtk doctor`."""

from __future__ import annotations

import json

import click


@click.command("doctor")
@click.option("--model", required=True, help="timm model name, e.g. resnet18 or convnext_atto.")
@click.option("--recipe", default=None,
              help="Recipe YAML path or bundled name [default: w4a4_lsq.yaml].")
@click.option("--image-size", type=click.IntRange(min=8), default=None,
              help="Square input side [default: the model's own input size].")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as one JSON object on the last line.")
def doctor_command(model: str, recipe: str | None, image_size: int | None, as_json: bool) -> None:
    """Trace and quantize MODEL, run one forward and backward pass on a random input, and report
    which layers are quantized, which are left float (and why), and whether it all ran.

    \b
    Example:
      mecqtk doctor --model convnext_atto --recipe w2a2_lsq.yaml --json
    """
    from mecqtk.graph.doctor import doctor

    result = doctor(model, recipe, image_size=image_size)
    if as_json:
        click.echo(json.dumps(result.as_json()))
        return
    from mecqtk.cli.render_graph import render_doctor

    render_doctor(result)
