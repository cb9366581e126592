"""docs/cli.md, rendered from the click commands themselves: the page shows exactly what
``--help`` prints, for every command and subcommand.

Regenerate with ``python tools/gen_docs.py`` (all generated pages) or
``python tools/cli_reference.py > docs/cli.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import click

from mecqtk.cli import main

# A fixed width: click otherwise wraps help to the terminal it runs in, and the page must not
# depend on who regenerated it.
HELP_WIDTH = 100
REGENERATE_COMMAND = "python tools/gen_docs.py"


@dataclass(frozen=True)
class CommandHelp:
    """One command's ``--help``, as the user would see it."""

    path: str  # "mecqtk recipe show"
    summary: str  # the first sentence, as in the parent group's command list
    help_text: str
    is_group: bool


def _context(command: click.Command, name: str, parent: click.Context | None) -> click.Context:
    # the command's own context_settings too (main's -h), as click's make_context applies them
    settings = {**command.context_settings, "terminal_width": HELP_WIDTH,
                "max_content_width": HELP_WIDTH}
    return click.Context(command, info_name=name, parent=parent, **settings)


def command_helps(command: click.Command = main, name: str = "mecqtk",
                  parent: click.Context | None = None) -> Iterator[CommandHelp]:
    """Every command under ``command`` (itself first), depth first, subcommands sorted by name.

    Example:
        >>> [h.path for h in command_helps()][:2]
        ['mecqtk', 'mecqtk doctor']
    """
    ctx = _context(command, name, parent)
    is_group = isinstance(command, click.Group)
    yield CommandHelp(path=ctx.command_path, summary=command.get_short_help_str(limit=200),
                      help_text=command.get_help(ctx).rstrip(), is_group=is_group)
    if is_group:
        for child_name in command.list_commands(ctx):
            child = command.get_command(ctx, child_name)
            if child is not None and not child.hidden:
                yield from command_helps(child, child_name, ctx)


def _anchor(path: str) -> str:
    # GitHub's heading anchors: lower case, spaces to dashes, other punctuation dropped
    return path.lower().replace(" ", "-")


def render_cli_reference() -> str:
    """docs/cli.md: the ``--help`` of every mecqtk command.

    Example:
        >>> "## mecqtk quantize" in render_cli_reference()
        True
    """
    helps = list(command_helps())
    lines = [
        f"<!-- Generated from the click commands in mecqtk/cli/ by `{REGENERATE_COMMAND}`; "
        "edit the commands' help, not this file. -->",
        "",
        "# Command-line reference",
        "",
        "Every command prints this with `--help` (or `-h`). User errors (a bad recipe, an "
        "unknown model, missing data, a broken checkpoint, an occupied output folder) end with "
        "exit code 2 and one line on stderr; `mecqtk verify` exits with 1 when the agreement "
        "is below its threshold.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for item in helps[1:]:
        lines.append(f"| [`{item.path}`](#{_anchor(item.path)}) | {item.summary} |")
    lines.append("")
    for item in helps:
        lines += [f"## {item.path}", "", "```text", item.help_text, "```", ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(render_cli_reference(), end="")
