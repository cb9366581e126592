"""`mecqtk recipe ...`: list, show and check recipes."""

from __future__ import annotations

import click

from mecqtk.recipe import bundled_recipes, dump_recipe, load_recipe


@click.group("recipe")
def recipe_group() -> None:
    """Inspect recipes.

    \b
    Example:
      mecqtk recipe show w2a2_lsq.yaml
    """


@recipe_group.command("list")
def list_command() -> None:
    """List the bundled recipes.

    \b
    Example:
      mecqtk recipe list
    """
    for name in bundled_recipes():
        click.echo(name)


@recipe_group.command("show")
@click.argument("recipe")
def show_command(recipe: str) -> None:
    """Validate RECIPE and print it with every default filled in.

    \b
    Example:
      mecqtk recipe show w2a2_lsq.yaml
    """
    click.echo(dump_recipe(load_recipe(recipe)), nl=False)


@recipe_group.command("explain")
@click.option("--model", required=True, help="timm model name, e.g. resnet18.")
@click.option("--recipe", required=True, help="Recipe YAML path or bundled name.")
def explain_command(model: str, recipe: str) -> None:
    """Print, per layer of MODEL, what RECIPE quantizes and how (no training).

    \b
    Example:
      mecqtk recipe explain --model resnet18 --recipe w2a2_lsq.yaml
    """
    from mecqtk.cli.render_graph import render_explanation
    from mecqtk.doctor import explain

    render_explanation(explain(model, recipe))
