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
@click.option("--steps", type=click.IntRange(min=0), default=3, show_default=True,
              help="Optimizer steps to take (the recipe's optimizer at its full learning rate); "
                   "0 checks one forward and backward pass only.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as one JSON object on the last line.")
def doctor_command(model: str, recipe: str | None, image_size: int | None, steps: int,
                   as_json: bool) -> None:
    """Trace and quantize MODEL, run one forward and backward pass on a random input, take a few
    optimizer steps, and report which layers are quantized, which are left float (and why),
    whether it all ran, and whether the loss and every step size stayed valid. Exits 1 when the
    check fails.

    \b
    Example:
      mecqtk doctor --model convnext_atto --recipe w2a2_lsq.yaml --steps 5 --json
    """
    from mecqtk.doctor import doctor

    result = doctor(model, recipe, image_size=image_size, steps=steps)
    if as_json:
        click.echo(json.dumps(result.as_json()))
        return
    from mecqtk.cli.render_graph import render_doctor

    render_doctor(result)
