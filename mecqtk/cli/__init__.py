"""The `mecqtk` command line: each command parses, calls one library function, and renders.

The command modules import the stages they run inside the command functions, so a command loads
only its own stage (`mecqtk verify` never imports the trainer). No import here dodges a cycle.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from mecqtk.errors import MecqtkError


class MecqtkGroup(click.Group):
    """Turns user errors (MecqtkError) into one line on stderr and exit code 2, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MecqtkError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(err.exit_code)


@click.group(cls=MecqtkGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mecqtk")
def main() -> None:
    """mecqtk: quantization-aware training at 2-8 bits for timm models.

    \b
    Example:
      mecqtk quantize --model cifar_resnet20 --recipe quickstart.yaml \\
          --data imagefolder:../shared/data/cifar10-jpeg --out runs/quick
    """


def _register() -> None:
    from mecqtk.cli.doctor import doctor_command
    from mecqtk.cli.export import export_command
    from mecqtk.cli.quantize import quantize_command
    from mecqtk.cli.recipe import recipe_group
    from mecqtk.cli.report import report_command
    from mecqtk.cli.verify import verify_command

    main.add_command(quantize_command)
    main.add_command(recipe_group)
    main.add_command(doctor_command)
    main.add_command(export_command)
    main.add_command(verify_command)
    main.add_command(report_command)


_register()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
