"""The commands and recipes the documentation shows are ones mecqtk accepts.

Every ``mecqtk ...`` line in a ``bash`` block is parsed by the real click command (unknown
options, missing required ones and malformed values fail); every ``yaml`` block of the
getting-started page is loaded as a recipe; docs/design.md's resnet18 block is the code that
``trace`` and ``prepare`` build today.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from mecqtk.cli import main
from mecqtk.recipe import recipe_from_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES_WITH_COMMANDS = ["README.md", "docs/getting_started.md", "docs/report.md",
                       "docs/benchmarks.md"]
PAGES_WITH_RECIPES = ["docs/getting_started.md"]


def code_blocks(page: str, language: str) -> list[str]:
    text = (REPO_ROOT / page).read_text()
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def command_lines(page: str) -> list[str]:
    """Each ``mecqtk`` command of the page's bash blocks, continuation lines joined."""
    commands = []
    for block in code_blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split(" && "):
                part = re.split(r" #| > | \| ", part)[0].strip()  # comment, redirect, pipe
                if part.startswith("mecqtk "):
                    commands.append(part)
    return commands


def parse(command_line: str) -> None:
    """Let click parse the arguments exactly as the real command would, without running it."""
    args = shlex.split(command_line)[1:]
    group: click.Command = main
    ctx = main.make_context("mecqtk", list(args), resilient_parsing=True)
    while isinstance(group, click.Group) and args and not args[0].startswith("-"):
        name, *args = args
        command = group.get_command(ctx, name)
        assert command is not None, f"no command {name!r} in: {command_line}"
        group = command
        ctx = command.make_context(name, list(args), parent=ctx)


EXAMPLES = [(page, line) for page in PAGES_WITH_COMMANDS for line in command_lines(page)]


def test_the_pages_show_commands():
    assert len(command_lines("docs/getting_started.md")) >= 10


@pytest.mark.parametrize(("page", "command_line"), EXAMPLES,
                         ids=[f"{page}:{line[:60]}" for page, line in EXAMPLES])
def test_every_documented_command_parses(page, command_line):
    try:
        parse(command_line)
    except click.UsageError as err:
        pytest.fail(f"{page}: `{command_line}` is rejected: {err.format_message()}")


@pytest.mark.parametrize("page", PAGES_WITH_RECIPES)
def test_every_documented_recipe_loads(page):
    blocks = code_blocks(page, "yaml")
    assert blocks
    for block in blocks:
        recipe_from_dict(yaml.safe_load(block))


@pytest.mark.parametrize("page", ["README.md", *sorted(
    str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "docs").glob("*.md"))])
def test_local_links_point_to_files(page):
    path = REPO_ROOT / page
    for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", path.read_text()):
        linked = (path.parent / target).resolve()
        assert linked.exists(), f"{page} links to missing {target}"


def _statements(code: str) -> list[str]:
    """fx code lines without indentation and without the ``;  x = None`` clean-ups."""
    return [line.split(";")[0].strip() for line in code.splitlines() if line.strip()]


def test_design_page_shows_the_resnet18_block_prepare_builds():
    import timm

    from mecqtk.graph import trace
    from mecqtk.qat import prepare
    from mecqtk.recipe import load_recipe

    traced_block, prepared_block = code_blocks("docs/design.md", "python")[:2]
    model = timm.create_model("resnet18")
    for shown, code in ((traced_block, trace(model).code),
                        (prepared_block, prepare(model, load_recipe("w4a4_lsq.yaml")).code)):
        wanted, built = _statements(shown), _statements(code)
        assert wanted[0] in built, f"docs/design.md shows code prepare does not build: {wanted[0]}"
        start = built.index(wanted[0])
        assert built[start:start + len(wanted)] == wanted
