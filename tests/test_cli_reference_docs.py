"""docs/cli.md is rendered from the click commands; every command's help carries an example."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

# the renderer is a tool (tools/cli_reference.py), not part of the library; tests/conftest.py
# puts tools/ on the path
from cli_reference import (
    HELP_WIDTH,
    REGENERATE_COMMAND,
    command_helps,
    render_cli_reference,
)
from mecqtk.cli import main

CLI_MD = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
HELPS = list(command_helps())


def test_cli_md_is_up_to_date():
    current = CLI_MD.read_text() if CLI_MD.is_file() else ""
    assert current == render_cli_reference(), (
        f"docs/cli.md differs from the commands' --help; regenerate it with `{REGENERATE_COMMAND}`"
    )


def test_every_command_and_subcommand_is_documented():
    paths = [item.path for item in HELPS]
    assert {"mecqtk", "mecqtk quantize", "mecqtk recipe show", "mecqtk verify"} <= set(paths)
    page = render_cli_reference()
    for path in paths:
        assert f"## {path}\n" in page


@pytest.mark.parametrize("item", HELPS, ids=lambda item: item.path)
def test_every_help_has_an_example(item):
    lines = item.help_text.splitlines()
    assert "  Example:" in lines, f"`{item.path} --help` needs an Example: block"
    example = lines[lines.index("  Example:") + 1].strip()
    assert example.startswith("mecqtk "), f"{item.path}: the example should be a command line"


@pytest.mark.parametrize("item", HELPS, ids=lambda item: item.path)
def test_every_option_says_what_it_does(item):
    command = main
    for name in item.path.split()[1:]:
        command = command.get_command(click.Context(command), name)  # type: ignore[union-attr]
    silent = [p.name for p in command.params if isinstance(p, click.Option) and not p.help]
    assert not silent, f"{item.path}: options without help: {silent}"


@pytest.mark.parametrize("item", HELPS, ids=lambda item: item.path)
def test_the_page_shows_what_help_prints(item):
    args = [*item.path.split()[1:], "--help"]
    result = CliRunner().invoke(main, args, prog_name="mecqtk", terminal_width=HELP_WIDTH)
    assert result.exit_code == 0, result.output
    assert result.output == item.help_text + "\n"
