"""Regenerate the documentation pages that are rendered from code.

    docs/recipes.md  from the recipe dataclasses (mecqtk/recipe/schema.py)
    docs/cli.md      from the click commands (mecqtk/cli/)

Usage (from the repository root):
    python tools/gen_docs.py           # rewrite the pages
    python tools/gen_docs.py --check   # list stale pages and exit 1; writes nothing

tests/recipe/test_reference_docs.py and tests/test_cli_reference_docs.py fail while a page is
stale.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def generated_pages() -> dict[Path, Callable[[], str]]:
    """Each generated page and the function that renders it."""
    from cli_reference import render_cli_reference  # tools/, beside this script
    from recipe_reference import render_reference

    return {
        REPO_ROOT / "docs" / "recipes.md": render_reference,
        REPO_ROOT / "docs" / "cli.md": render_cli_reference,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a page differs from its rendering; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for path, render in generated_pages().items():
        text = render()
        current = path.read_text() if path.is_file() else None
        if current == text:
            continue
        stale.append(path.relative_to(REPO_ROOT))
        if not args.check:
            path.write_text(text)
    verb = "stale" if args.check else "rewrote"
    for path in stale:
        print(f"{verb}: {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    # Document this checkout's code, not whichever copy of mecqtk is installed.
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
